"""Peak extra resident memory of one call in the current (fresh, benchmark) process.

Used by the benchmark workers (``fastloss._bench_linear``, ``fastloss._bench_torch``): each
runs in a subprocess, calls :func:`peak_probe` just before the measured call and
:func:`peak_after` after it; the difference is the call's peak extra memory.  The two
Linux primitives, :func:`status_bytes` and :func:`reset_peak_rss`, also serve the bench
CLI's in-process "rss" memory method (``fastloss.bench``) and benchmarks/sequence_vs_torch.py.
"""
from __future__ import annotations


def _maxrss_bytes() -> int:
    import resource                     # Unix only: the last fallback of peak_probe
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux: KiB


def status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_probe():
    """(method, before): how the peak extra memory of the next call is measured, and the value
    to subtract from :func:`peak_after`'s.

    Not ``ru_maxrss``: on Linux a process started by ``subprocess`` (vfork + exec) inherits
    its parent's high-water RSS in ``ru_maxrss``, so a parent that once touched 1 GiB (the
    bench CLI's read-bandwidth probe) hid every child's peak below that.  ``VmHWM`` is the
    high-water mark of this process's own address space; reset to the current RSS just
    before the call, ``VmHWM`` after it minus ``VmRSS`` before it is the call's peak extra
    memory.  Fallbacks: ``VmHWM`` growth without the reset, then ``ru_maxrss`` growth."""
    if reset_peak_rss() and status_bytes("VmRSS") is not None:
        return "VmHWM after - VmRSS before (VmHWM reset)", status_bytes("VmRSS")
    if status_bytes("VmHWM") is not None:
        return "VmHWM growth", status_bytes("VmHWM")
    return "ru_maxrss growth", _maxrss_bytes()


def peak_after(method: str) -> int:
    return _maxrss_bytes() if method.startswith("ru_maxrss") else status_bytes("VmHWM")
