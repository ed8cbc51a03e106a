"""Threads, ISA selection and the build report (``show_config``)."""
from __future__ import annotations

import operator
import os
import platform
import sys

import numpy as np

from fastloss import _core

__all__ = ["set_num_threads", "get_num_threads", "show_config", "config"]

#: Upper bound on ``num_threads``: larger values are almost certainly a mistake.
MAX_THREADS = 4096

_package_default: int | None = None


def _check_thread_count(n, name="num_threads"):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be None or an int, got {type(n).__name__}")
    n = operator.index(n)
    if n == -1:
        return _core.num_procs()
    if n < 1:
        raise ValueError(f"{name} must be >= 1, or -1 for all cores, or None; got {n}")
    if n > MAX_THREADS:
        raise ValueError(f"{name}={n} is larger than the supported maximum of {MAX_THREADS}")
    return n


def set_num_threads(n: int | None) -> None:
    """Set the process-wide default thread count (``None`` restores the OpenMP default).

    ``-1`` means all cores.  A ``num_threads=`` argument of a call overrides it for that
    call only.

    The setting is process-wide, as ``torch.set_num_threads``: it applies to the calls of
    every Python thread, including threads already running (a thread pool started before
    it).  To give one thread its own count without affecting the others, pass
    ``num_threads=`` to its calls: the argument changes no state (neither this default nor
    OpenMP's), so concurrent callers with different counts do not see each other's.
    """
    global _package_default
    _package_default = None if n is None else _check_thread_count(n, "n")


def get_num_threads() -> int:
    """The thread count a call with ``num_threads=None`` made by this thread uses now.

    The value set by :func:`set_num_threads` (process-wide), else OpenMP's default for the
    calling thread, ``omp_get_max_threads()`` (``OMP_NUM_THREADS``; a
    ``threadpoolctl.threadpool_limits`` block applies, as for any OpenMP code, to the
    thread that entered it), else 1 without OpenMP.  Calls never change it: the kernels
    pass their count to each parallel region and never call ``omp_set_num_threads``.
    """
    n = _package_default          # read once: another thread may reset it meanwhile
    if n is not None:
        return n
    return max(1, _core.omp_max_threads())


def resolve_num_threads(num_threads) -> int:
    """Thread count for one call (the Python layer's single place for this rule)."""
    if num_threads is None:
        return get_num_threads()
    return _check_thread_count(num_threads)


def _select_isa_from_env() -> None:
    name = os.environ.get("FASTLOSS_ISA", "").strip().lower()
    if not name:
        return
    if name not in _core.ISA_NAMES:
        raise ImportError(f"FASTLOSS_ISA={name!r} is not one of {', '.join(_core.ISA_NAMES)}")
    try:
        _core.set_isa(name)
    except RuntimeError as exc:
        raise ImportError(f"FASTLOSS_ISA={name!r}: {exc}") from None


def config() -> dict:
    """The build and runtime configuration as a dict (what :func:`show_config` prints)."""
    from fastloss import __version__

    return {
        "fastloss": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
        "compiler": _core.compiler(),
        "openmp": _core.have_openmp(),
        "default_threads": get_num_threads(),
        "cores": _core.num_procs(),
        "isa_compiled": list(_core.isa_compiled()),
        "isa_supported": list(_core.isa_supported()),
        "isa_selected": _core.get_isa(),
        "isa_forced_by_env": os.environ.get("FASTLOSS_ISA") or None,
    }


def show_config(file=None) -> None:
    """Print version, compiler, OpenMP, threads, ISAs (compiled / selected) and NumPy version."""
    c = config()
    lines = [
        f"fastloss       {c['fastloss']}",
        f"python         {c['python']}  ({c['platform']})",
        f"numpy          {c['numpy']}",
        f"compiler       {c['compiler']}",
        f"openmp         {'on' if c['openmp'] else 'OFF (built without OpenMP: single-threaded)'}",
        f"threads        {c['default_threads']} by default, {c['cores']} cores",
        f"isa compiled   {', '.join(c['isa_compiled'])}",
        f"isa supported  {', '.join(c['isa_supported'])}",
        f"isa selected   {c['isa_selected']}"
        + (f"  (FASTLOSS_ISA={c['isa_forced_by_env']})" if c["isa_forced_by_env"] else "  (best for this CPU)"),
    ]
    print("\n".join(lines), file=file or sys.stdout)
