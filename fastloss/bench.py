"""The benchmark behind ``python -m fastloss bench`` and ``benchmarks/`` (pytest-benchmark).

Design
------
* **One source of cases.**  :func:`cases` lists the cases (loss, size or shape, dtype,
  mode, threads, ISA) of both families from :data:`BENCH_LOSSES` (the regression losses
  of ``fastloss._registry.REGISTRY``, plus ``cross_entropy``); the CLI and
  ``benchmarks/`` both call it, and both build their callables with
  :func:`fastloss_fn`, :func:`numpy_fn` and :func:`torch_fn` and their inputs with
  :class:`InputCache`.
* **Cross-entropy.**  Logits of shape (rows, classes) ~ N(0, 1) in float32 (float16:
  those values rounded), class indices uniform; ``reduction="mean"``.  Modes: forward,
  and forward + gradient into a new array (``with_grad``), into a preallocated
  ``grad_out`` (``with_grad_out``: allocated once per group and first touched before
  timing) and in place (``with_grad_inplace``: ``grad_out=logits`` on a copy of the
  logits that an untimed ``prepare`` step refreshes before every call).  The with-grad
  variants form one group: their competitors have no ``out=``, so NumPy and torch are
  timed once per group and compared with each variant.  :data:`CE_PRESETS` holds the
  shape/dtype/mode sets of the default, ``--quick`` and full (``--full``,
  ``--loss cross_entropy``) runs.
* **Competitors.**  NumPy: ``fastloss.reference.<loss>(x, t, dtype=None)``, i.e. the
  loss computed in the input dtype as a user writes it by hand (with-grad: the forward
  plus ``reference.<loss>_grad``).  NumPy's elementwise code is single-threaded, so it
  is timed once per group and shown on every thread row.  NumPy's float16 ufuncs are
  ~8x slower than its float32 ones (cross-entropy with-grad on 8192x32000 float16 takes
  ~45 s a call), so for cross-entropy NumPy is timed only up to a number of elements
  per dtype (:func:`numpy_timed`; it still takes part in the warm-up check).  PyTorch
  CPU (when importable): ``torch.nn.functional.<loss>`` (rmse: ``sqrt(mse_loss)``);
  with-grad is the forward plus ``torch.autograd.grad`` with respect to the input (a
  backward into a fresh gradient, like ours); ``torch.set_num_threads`` follows the
  case.  Tensors come from ``torch.from_numpy``, outside the timed region.
* **Timing.**  The providers of one group (fastloss per mode, thread count and ISA,
  NumPy, torch per thread count) run in interleaved rounds (fastloss, NumPy, torch,
  fastloss, ...) so that the noise of this shared machine hits all of them alike.
  One warm-up call each first (on a 2**20-element prefix -- whole rows for
  cross-entropy -- for arrays above 32 MiB, which get fresh pages on every call
  anyway), then rounds until a minimum count and a minimum time are reached; fewer
  calls for large sizes, and slow competitors stop after 2 calls and 0.5 s
  (:class:`Policy`), which keeps the default run under two minutes.  Each sample is
  one call; results are released outside the timed region, and so is the ``prepare``
  step of the in-place variant.  Reported: the median (quartiles in JSON).  Only
  medians and ratios measured in the same run mean anything here; absolute times drift
  20-30 % between runs.
* **Memory** (cross-entropy).  Peak extra memory during one call, the result included,
  per provider and mode at the largest thread count: fastloss and NumPy with
  ``tracemalloc`` in one more, untimed call (NumPy reports its allocations to it, and
  fastloss allocates its outputs and scratch through NumPy); torch, which keeps no
  allocator statistics on CPU, by the growth of the peak RSS (``VmHWM`` reset through
  ``/proc/self/clear_refs``): during its first timed call for logits of 32 MiB or more
  (glibc gives such arrays fresh pages), and in a helper process with a low glibc mmap
  threshold for smaller ones (:func:`torch_memory_subprocess`).
* **Bandwidth.**  The plain read kernel ``fastloss._core.read_sum_f32`` on a 1 GiB
  float32 array, per thread count, before and after the cases (best of the pooled
  samples, as STREAM reports: contention only ever slows a read), is the yardstick
  for each fastloss case's GB/s (:meth:`Case.nbytes`).
* **Is it right?**  The warm-up results of fastloss and torch are compared with
  NumPy's (loss, and a strided sample of the gradient) and a mismatch is flagged,
  since a fast wrong answer is not a result; at one size per family (1e6, and the
  smallest cross-entropy shape, by default) the error of each provider against the
  float64 reference is printed (:func:`accuracy`).
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import fastloss
from fastloss import _core, reference
from fastloss._registry import REGISTRY

MODES = ("forward", "with_grad")
DEFAULT_SIZES = (10**6, 10**7, 10**8)
QUICK_SIZES = (10**6, 10**7)
#: pytest-benchmark's default sizes (FASTLOSS_BENCH_SIZES=1e6,1e7,1e8 adds 1e8).
PYTEST_SIZES = (10**6, 10**7)
DEFAULT_THREADS = (1, 2)
DEFAULT_DTYPE = "float32"
#: Elements of the warm-up call for large arrays (see policy_for).
WARMUP_PREFIX = 1 << 20
#: The array read by the bandwidth probe.
READ_BW_BYTES = 1 << 30
READ_BW_ROUNDS = 5

# ---- cross-entropy sets ---------------------------------------------------------------------------

CE_LOSS = "cross_entropy"
#: forward; with-grad into a new array, into a preallocated grad_out, in place (grad_out=logits).
CE_MODES = ("forward", "with_grad", "with_grad_out", "with_grad_inplace")
ALL_MODES = CE_MODES
MODE_LABELS = {"forward": "forward", "with_grad": "with-grad", "with_grad_out": "with-grad out=",
               "with_grad_inplace": "with-grad in-place"}
#: (rows, classes): LLM vocabularies (Llama 2, Llama 3, Gemma 3), one long row, a small vocabulary.
CE_SHAPES = ((8192, 32000), (2048, 128256), (256, 262144), (1, 262144), (32768, 1024))
CE_DTYPES = ("float32", "float16")
CE_BENCH_DTYPES = ("float16", "float32", "float64")
#: NumPy is timed up to this many elements per dtype (None: always); above it, it only
#: takes part in the warm-up check.  Default run: the small shape only (NumPy takes
#: ~1.3 s / ~3 s per forward / with-grad call at 8192x32000 float32, ~10 s / ~45 s in float16).
NUMPY_MAX_DEFAULT = {"float32": 1 << 21, "float16": 1 << 21, "float64": 1 << 21}
#: --full / --loss cross_entropy: every float32 shape; float16 up to (32768, 1024).
NUMPY_MAX_FULL = {"float32": None, "float16": 1 << 25, "float64": None}
#: The cross-entropy accuracy check runs at the smallest shape up to this many elements.
CE_ACCURACY_MAX = 1 << 25


@dataclass(frozen=True)
class Preset:
    """The cross-entropy cases of one kind of run."""

    shapes: tuple
    dtypes: tuple
    modes: tuple
    numpy_max: dict


CE_PRESETS = {
    # default `python -m fastloss bench` (with the regression losses, under 2 minutes)
    "default": Preset(((8192, 32000), (1, 262144)), CE_DTYPES, ("forward", "with_grad"), NUMPY_MAX_DEFAULT),
    "quick": Preset(((1, 262144), (32768, 1024)), CE_DTYPES, ("forward", "with_grad"), NUMPY_MAX_DEFAULT),
    # --full, --loss cross_entropy
    "full": Preset(CE_SHAPES, CE_DTYPES, CE_MODES, NUMPY_MAX_FULL),
    # pytest benchmarks/ (CI runs it with --benchmark-disable: small shapes, every mode)
    "pytest": Preset(((1, 262144), (64, 32000)), CE_DTYPES, CE_MODES, NUMPY_MAX_FULL),
}


# ---- the losses ----------------------------------------------------------------------------------

def standard_normal_f32(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` standard normal float32 values by the Box-Muller transform: ~2x faster than
    ``Generator.standard_normal(dtype=np.float32)`` (2.6 s instead of 4.7 s for 262M values
    here), which matters for a default run with a budget of two minutes."""
    x = np.empty(n, dtype=np.float32)
    h = (n + 1) // 2
    r = rng.random(h, dtype=np.float32)
    np.subtract(np.float32(1), r, out=r)       # (0, 1]
    np.log(r, out=r)
    np.multiply(r, np.float32(-2), out=r)
    np.sqrt(r, out=r)                          # radius
    a = rng.random(h, dtype=np.float32)
    np.multiply(a, np.float32(2 * np.pi), out=a)
    np.cos(a, out=x[:h])
    np.multiply(x[:h], r, out=x[:h])
    np.sin(a[:n - h], out=x[h:])
    np.multiply(x[h:], r[:n - h], out=x[h:])
    return x


def cross_entropy_inputs(rng: np.random.Generator, shape, dtype) -> dict:
    """logits ~ N(0, 1) of `shape` (rows, classes), drawn in float32
    (:func:`standard_normal_f32`) and rounded to `dtype` (so the float16 logits are the
    float32 ones rounded), and class indices uniform in [0, classes), int64."""
    shape = tuple(int(s) for s in shape)
    x = standard_normal_f32(rng, math.prod(shape)).reshape(shape)
    t = rng.integers(0, shape[-1], size=shape[:-1], dtype=np.int64)
    if np.dtype(dtype) != np.float32:
        x = x.astype(dtype)
    return {"input": x, "target": t}


@dataclass(frozen=True)
class BenchLoss:
    """How the benchmark runs one loss."""

    name: str
    family: str               # "regression" or "classification"
    func: Callable            # fastloss forward: func(x, t, num_threads=)
    with_grad: Callable       # (loss, grad) = with_grad(x, t, num_threads=[, grad_out=])
    reference: Callable       # NumPy: reference(x, t, dtype=None)
    reference_grad: Callable
    make_inputs: Callable     # (rng, shape, dtype) -> {"input": x, "target": t}
    modes: tuple              # the modes the loss is timed in
    arrays_read: int          # arrays of the input's size the forward reads (GB/s)
    memory: bool              # measure each provider's peak extra memory


def _bench_losses() -> dict[str, BenchLoss]:
    out = {name: BenchLoss(name, "regression", spec.func, spec.with_grad, spec.reference, spec.reference_grad,
                           spec.make_inputs, MODES, spec.arrays_read, False)
           for name, spec in REGISTRY.items() if spec.family == "regression"}
    # Not (yet) in the registry: the benchmark's own entry.  The target (8 bytes a row) is not
    # counted in GB/s: the logits are the traffic.
    out[CE_LOSS] = BenchLoss(CE_LOSS, "classification", fastloss.cross_entropy, fastloss.cross_entropy_with_grad,
                             reference.cross_entropy, reference.cross_entropy_grad, cross_entropy_inputs,
                             CE_MODES, 1, True)
    return out


BENCH_LOSSES: dict[str, BenchLoss] = _bench_losses()
#: --loss aliases.
FAMILIES = {"regression": tuple(n for n, s in BENCH_LOSSES.items() if s.family == "regression"),
            "classification": tuple(n for n, s in BENCH_LOSSES.items() if s.family == "classification")}


def regression_losses() -> list[str]:
    return list(FAMILIES["regression"])


def known_losses() -> list[str]:
    return list(BENCH_LOSSES)


def resolve_losses(names) -> list[str]:
    """Loss names and family aliases ("regression", "classification") -> loss names, in order."""
    out = []
    for name in names:
        name = name.strip()
        if name in FAMILIES:
            out += FAMILIES[name]
        elif name in BENCH_LOSSES:
            out.append(name)
        else:
            raise ValueError(f"unknown loss {name!r} (known: {', '.join(known_losses())}; "
                             f"families: {', '.join(FAMILIES)})")
    return list(dict.fromkeys(out))


def normalize_mode(text: str) -> str:
    m = text.strip().lower().replace("-", "_")
    if m not in ALL_MODES:
        raise ValueError(f"unknown mode {text!r} (known: {', '.join(ALL_MODES)})")
    return m


def isa_order() -> list[str]:
    """The ISAs this CPU runs, best first."""
    return list(reversed(_core.isa_supported()))


# ---- cases ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One fastloss measurement: ``loss`` on ``n`` elements of ``dtype`` (cross-entropy:
    logits of ``shape`` (rows, classes), n = rows * classes)."""

    loss: str
    n: int
    dtype: str
    mode: str          # "forward", "with_grad" (cross-entropy also "with_grad_out", "with_grad_inplace")
    threads: int
    isa: str
    shape: tuple | None = None

    @property
    def dims(self) -> tuple:
        return self.shape if self.shape is not None else (self.n,)

    @property
    def family(self) -> str:
        return BENCH_LOSSES[self.loss].family

    @property
    def size_label(self) -> str:
        return format_shape(self.shape) if self.shape is not None else format_size(self.n)

    @property
    def group_mode(self) -> str:
        """The with-grad variants share a group (and their competitors)."""
        return "forward" if self.mode == "forward" else "with_grad"

    @property
    def group(self) -> tuple:
        """Cases that share inputs and competitors (they are timed together)."""
        return (self.loss, self.dims, self.dtype, self.group_mode)

    def nbytes(self) -> int:
        """Minimum memory traffic: the input (and the regression target) read once, plus the
        gradient written once for with-grad."""
        arrays = BENCH_LOSSES[self.loss].arrays_read + (self.mode != "forward")
        return arrays * self.n * np.dtype(self.dtype).itemsize


def cases(losses=None, sizes=DEFAULT_SIZES, threads=DEFAULT_THREADS, modes=None, dtype=DEFAULT_DTYPE,
          isas=None, shapes=None, dtypes=None, preset="default") -> list[Case]:
    """The benchmark cases, in run order: the regression losses by size, loss, mode,
    threads, ISA; then cross-entropy by shape, dtype, mode, threads, ISA.

    ``losses``: loss names or family aliases (default: every loss); ``isas``: ISA names
    (default: the one fastloss selected at import).  Regression: ``sizes`` in ``dtype``.
    Cross-entropy: ``shapes`` (rows, classes) in ``dtypes`` (default: those of
    ``CE_PRESETS[preset]``).  ``modes``: applied to each family (a family takes the modes
    it has; default: the regression MODES, and the preset's modes for cross-entropy).
    """
    names = known_losses() if losses is None else resolve_losses(losses)
    pre = CE_PRESETS[preset]
    if modes is not None:
        modes = [normalize_mode(m) for m in modes]
    shapes = pre.shapes if shapes is None else tuple(tuple(int(v) for v in s) for s in shapes)
    dtypes = pre.dtypes if dtypes is None else tuple(np.dtype(d).name for d in dtypes)
    for d in dtypes:
        if d not in CE_BENCH_DTYPES:
            raise ValueError(f"cross-entropy dtype must be one of {', '.join(CE_BENCH_DTYPES)}, got {d!r}")
    for s in shapes:
        if len(s) != 2 or min(s) < 1:
            raise ValueError(f"a cross-entropy shape is ROWSxCLASSES with both >= 1, got {s!r}")
    isas = [_core.get_isa()] if isas is None else list(isas)
    threads = [int(th) for th in threads]
    out = []
    reg = [n for n in names if BENCH_LOSSES[n].family == "regression"]
    reg_modes = MODES if modes is None else [m for m in modes if m in MODES]
    dt = np.dtype(dtype).name
    out += [Case(loss, int(n), dt, mode, th, isa)
            for n in sizes for loss in reg for mode in reg_modes for th in threads for isa in isas]
    for loss in (n for n in names if BENCH_LOSSES[n].family == "classification"):
        ce_modes = pre.modes if modes is None else [m for m in modes if m in BENCH_LOSSES[loss].modes]
        out += [Case(loss, s[0] * s[1], d, mode, th, isa, s)
                for s in shapes for d in dtypes for mode in ce_modes for th in threads for isa in isas]
    if not out:
        raise ValueError(f"no cases: none of the modes {', '.join(modes or ())} applies to the losses "
                         f"{', '.join(names)}")
    return out


def numpy_timed(case: Case, numpy_max: dict | None = None) -> bool:
    """Whether the NumPy reference is timed in `case`'s group (always for regression)."""
    if numpy_max is None or case.family == "regression":
        return True
    limit = numpy_max.get(case.dtype)
    return limit is None or case.n <= limit


def make_inputs(loss: str, n, dtype: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """input and target for `loss` (`n`: an element count or a shape), from its generator."""
    shape = (int(n),) if np.isscalar(n) else tuple(int(v) for v in n)
    d = BENCH_LOSSES[loss].make_inputs(np.random.default_rng(seed), shape, np.dtype(dtype))
    return d["input"], d["target"]


class InputCache:
    """The inputs of the latest case (one input pair alive at a time: they reach 1 GB).

    Cases with the same generator, shape and dtype share them.  Cross-entropy float16
    logits are rounded from cached float32 ones of the same shape (what the generator
    does anyway), which skips drawing 262M normal numbers again (~3.6 s).
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.key = None
        self.value = None

    def get(self, case: Case) -> tuple[np.ndarray, np.ndarray]:
        gen = BENCH_LOSSES[case.loss].make_inputs
        key = (gen, case.dims, case.dtype)
        if key == self.key:
            return self.value
        prev, prev_key = self.value, self.key
        self.key = self.value = None
        if (gen is cross_entropy_inputs and prev_key is not None and prev_key[:2] == key[:2]
                and prev_key[2] == "float32"):
            x = prev[0].astype(case.dtype)
            value = (x, prev[1])
            prev = None
        else:
            prev = None
            gc.collect()
            value = make_inputs(case.loss, case.dims, case.dtype, self.seed)
        self.key, self.value = key, value
        return value

    def clear(self):
        self.key = self.value = None
        gc.collect()


# ---- the three providers of a case ----------------------------------------------------------------

class Call:
    """A zero-argument call with an untimed ``prepare`` step run before each call."""

    __slots__ = ("fn", "prepare")

    def __init__(self, fn: Callable[[], object], prepare: Callable[[], None] | None = None):
        self.fn = fn
        self.prepare = prepare

    def __call__(self):
        return self.fn()


class Scratch:
    """The gradient buffer of a group's ``with_grad_out`` and ``with_grad_inplace`` cases
    (shared: they run one after the other, and one buffer of the logits' size is enough)."""

    def __init__(self):
        self.buf = None

    def like(self, x: np.ndarray) -> np.ndarray:
        if self.buf is None or self.buf.dtype != x.dtype or self.buf.size < x.size:
            self.buf = None
            self.buf = np.empty(x.size, dtype=x.dtype)
        return self.buf[:x.size].reshape(x.shape)


def call_once(fn):
    """One call of a provider's callable, its ``prepare`` step included."""
    prepare = getattr(fn, "prepare", None)
    if prepare is not None:
        prepare()
    return fn()


def fastloss_fn(case: Case, x, t, scratch: Scratch | None = None) -> Callable[[], object]:
    """fastloss call of `case` (the ISA is selected by the caller: :func:`fastloss_setup`).

    ``with_grad_out`` writes into a buffer of `scratch`; ``with_grad_inplace`` overwrites a
    copy of the logits in that buffer, which the returned :class:`Call` refreshes in its
    untimed ``prepare`` step.
    """
    spec = BENCH_LOSSES[case.loss]
    th = case.threads
    if case.mode == "forward":
        f = spec.func
        return lambda: f(x, t, num_threads=th)
    f = spec.with_grad
    if case.mode == "with_grad":
        return lambda: f(x, t, num_threads=th)
    buf = (scratch or Scratch()).like(x)
    if case.mode == "with_grad_out":
        return lambda: f(x, t, num_threads=th, grad_out=buf)
    if case.mode == "with_grad_inplace":
        def refresh():
            np.copyto(buf, x)
        return Call(lambda: f(buf, t, num_threads=th, grad_out=buf), refresh)
    raise ValueError(f"unknown mode {case.mode!r}")


def fastloss_setup(case: Case) -> Callable[[], None]:
    isa = case.isa
    return lambda: _core.set_isa(isa)


def numpy_fn(case: Case, x, t) -> Callable[[], object]:
    """The NumPy baseline in the input dtype (``dtype=None``)."""
    spec = BENCH_LOSSES[case.loss]
    ref, ref_grad = spec.reference, spec.reference_grad
    if case.mode == "forward":
        return lambda: ref(x, t, dtype=None)
    return lambda: (ref(x, t, dtype=None), ref_grad(x, t, dtype=None))


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except Exception:
        return False
    return True


def torch_version() -> str | None:
    try:
        import torch
    except Exception:
        return None
    return torch.__version__


def _torch_loss(name: str):
    import torch
    import torch.nn.functional as F
    if name == "rmse":
        return lambda a, b: torch.sqrt(F.mse_loss(a, b))
    return getattr(F, name)


def torch_fn(case: Case, x, t) -> Callable[[], object]:
    """The PyTorch CPU call of `case` (tensors share memory with `x` and `t`); every
    with-grad mode is the forward + ``torch.autograd.grad`` into a fresh gradient (torch
    has no ``out=`` for a gradient)."""
    import torch
    f = _torch_loss(case.loss)
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    if case.mode == "forward":
        return lambda: f(xt, tt)
    xr = xt.requires_grad_(True)

    def with_grad():
        loss = f(xr, tt)
        return loss.detach(), torch.autograd.grad(loss, xr)[0]
    return with_grad


def torch_setup(threads: int) -> Callable[[], None]:
    import torch
    return lambda: torch.set_num_threads(threads)


# ---- peak memory ---------------------------------------------------------------------------------

#: How each provider's peak extra memory is measured.
MEMORY_METHODS = {"fastloss": "tracemalloc", "numpy": "tracemalloc", "torch": "rss"}
#: torch's peak RSS growth is measured in this process for logits of at least this size (glibc
#: serves arrays above its largest mmap threshold, 32 MiB, with fresh pages that RSS sees), and
#: in a helper process (:func:`torch_memory_subprocess`) for smaller ones.
RSS_IN_PROCESS_MIN_BYTES = 32 << 20
#: The helper process's glibc mmap threshold: every array above it gets fresh pages.
SUBPROCESS_MMAP_THRESHOLD = 1 << 16


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def rss_peak_available() -> bool:
    return _status_kib("VmHWM") is not None and _reset_peak_rss()


def peak_extra_memory(fn, method: str) -> int | None:
    """Bytes allocated at the peak of one call of `fn` beyond what was allocated before it,
    the returned result included (its ``prepare`` step runs first, not measured).

    ``"tracemalloc"``: Python and NumPy allocations (exact, any size).  ``"rss"``: growth
    of the peak resident set over the RSS before the call (for torch, whose CPU allocator
    keeps no statistics; page granularity, and memory that the C allocator reuses from
    earlier frees is not seen: reliable for arrays above glibc's mmap threshold, 32 MiB
    at most).  None if the method is not available here.
    """
    prepare = getattr(fn, "prepare", None)
    if prepare is not None:
        prepare()
    if method == "tracemalloc":
        was_tracing = tracemalloc.is_tracing()
        if not was_tracing:
            tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            r = fn()
            peak = tracemalloc.get_traced_memory()[1]
            del r
        finally:
            if not was_tracing:
                tracemalloc.stop()
        return max(0, peak - base)
    if method == "rss":
        if not _reset_peak_rss():
            return None
        rss0 = _status_kib("VmRSS")
        r = fn()
        hwm = _status_kib("VmHWM")
        del r
        if rss0 is None or hwm is None:
            return None
        return max(0, hwm - rss0) * 1024
    raise ValueError(f"unknown memory method {method!r}")


def torch_memory_key(case: Case) -> tuple:
    return (case.loss, case.dims, case.dtype, case.group_mode, case.threads)


class TorchMemoryHelper:
    """torch's peak extra memory (:func:`peak_extra_memory`, ``"rss"``) for each case of
    `requests`, measured after one warm-up call in a fresh Python process whose glibc serves
    every array above SUBPROCESS_MMAP_THRESHOLD bytes with fresh pages
    (``MALLOC_MMAP_THRESHOLD_``), so that small arrays are seen too.

    The process starts at construction; :meth:`result` waits for it.  (The CLI starts it
    while it makes large inputs, which is untimed and uses one core, and waits before timing.)
    Keys of the result: :func:`torch_memory_key`; an empty dict if the helper fails (the
    reason on stderr).
    """

    def __init__(self, requests: list[Case], timeout: float = 900.0):
        self.keys = list(dict.fromkeys(torch_memory_key(c) for c in requests))
        self.timeout = timeout
        self.proc = None
        if not self.keys:
            return
        root = os.path.dirname(os.path.dirname(os.path.abspath(fastloss.__file__)))
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(SUBPROCESS_MMAP_THRESHOLD),
                   PYTHONPATH=os.pathsep.join([root] + [v for v in [os.environ.get("PYTHONPATH")] if v]))
        payload = json.dumps([[k[0], list(k[1]), k[2], k[3], k[4]] for k in self.keys])
        code = "from fastloss.bench import _torch_memory_main; _torch_memory_main()"
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code, payload], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        except OSError as exc:
            print(f"fastloss bench: torch memory helper failed: {exc}", file=sys.stderr)

    def close(self):
        """Stop the process if it still runs (e.g. the run was interrupted)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        self.proc = None

    def result(self) -> dict[tuple, int | None]:
        if self.proc is None:
            return {}
        try:
            out, err = self.proc.communicate(timeout=self.timeout)
            values = json.loads(out.strip().splitlines()[-1]) if self.proc.returncode == 0 else None
        except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
            self.proc.kill()
            self.proc.communicate()
            print(f"fastloss bench: torch memory helper failed: {exc}", file=sys.stderr)
            return {}
        finally:
            proc, self.proc = self.proc, None
        if values is None or len(values) != len(self.keys):
            print(f"fastloss bench: torch memory helper failed (exit {proc.returncode}): {err.strip()[-500:]}",
                  file=sys.stderr)
            return {}
        return dict(zip(self.keys, values))


def torch_memory_subprocess(requests: list[Case], timeout: float = 900.0) -> dict[tuple, int | None]:
    """:class:`TorchMemoryHelper`, started and waited for."""
    return TorchMemoryHelper(requests, timeout).result()


def _torch_memory_main():
    """The helper process of :class:`TorchMemoryHelper`: requests in argv[1], JSON on stdout."""
    requests = json.loads(sys.argv[1])
    inputs, out = InputCache(), []
    for loss, dims, dtype, mode, threads in requests:
        dims = tuple(dims)
        c = Case(loss, math.prod(dims), dtype, mode, threads, _core.get_isa(), dims if len(dims) > 1 else None)
        x, t = inputs.get(c)
        torch_setup(threads)()
        fn = torch_fn(c, x, t)
        call_once(fn)  # first-call initialization is not the call's memory
        out.append(peak_extra_memory(fn, "rss"))
        fn = None
    print(json.dumps(out))


# ---- timing --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Policy:
    """How long one group of providers is timed.

    Rounds (one call of each provider still running) continue until every provider has
    ``min_calls`` calls and the group has run ``min_time`` seconds.  A slow competitor
    (NumPy, torch; never fastloss, whose time every ratio divides by) stops early, once
    it has ``slow_calls`` calls totalling ``slow_time`` seconds: at 1e8 elements one
    round of NumPy and torch over the regression losses takes ~20 s (one NumPy Huber
    call ~2 s), and torch's cross-entropy with-grad on 8192x32000 takes ~2 s at 1 thread,
    so 3 calls each would take the default run far past its budget of two minutes.
    ``warmup_prefix`` (elements, or None for the full arrays) is what the warm-up call
    runs on (whole rows for cross-entropy).
    """

    min_calls: int
    min_time: float
    slow_calls: int
    slow_time: float
    warmup_prefix: int | None = None
    max_rounds: int = 1000

    def done(self, samples: list, elapsed: float, competitor: bool) -> bool:
        k = len(samples)
        if k >= self.min_calls and elapsed >= self.min_time:
            return True
        return competitor and k >= self.slow_calls and sum(samples) >= self.slow_time


def policy_for(n: int, dtype=DEFAULT_DTYPE, quick: bool = False, repeat: int | None = None) -> Policy:
    """The timing policy of arrays of `n` elements (fewer calls for large sizes).

    ``repeat`` forces exactly that minimum number of calls for every provider.
    """
    if n <= 2 * 10**6:
        calls, min_time = 7, 0.25
    elif n <= 2 * 10**7:
        calls, min_time = 5, 0.2
    else:
        calls, min_time = 3, 0.0
    slow_calls, slow_time = 2, 0.5
    if quick:
        calls, min_time, slow_time = min(calls, 3), min(min_time, 0.1), 0.25
    if repeat is not None:
        calls = slow_calls = repeat
    # Arrays above glibc's largest mmap threshold (32 MiB) get fresh pages on every call,
    # cache and allocator hold no state across calls: a warm-up on a prefix is enough.
    prefix = WARMUP_PREFIX if n * np.dtype(dtype).itemsize > 32 << 20 else None
    return Policy(calls, min_time, slow_calls, slow_time, prefix)


@dataclass
class Provider:
    """One timed callable of a group: fastloss (per mode, threads and ISA), numpy, or torch."""

    name: str                 # "fastloss", "numpy", "torch"
    threads: int | None       # None: single-threaded by nature (numpy)
    isa: str | None
    make: Callable            # (x, t) -> zero-argument callable
    setup: Callable[[], None] | None = None
    samples: list = field(default_factory=list)
    mode: str | None = None   # fastloss: the case's mode (the competitors serve every mode of the group)
    timed: bool = True        # False: warm-up check only (a competitor too slow for this run)
    measure_rss: bool = False  # record the peak RSS growth of the first timed call (torch's memory)
    peak_rss: int | None = None

    @property
    def key(self) -> str:
        variant = {"with_grad_out": "out", "with_grad_inplace": "inplace"}.get(self.mode)
        parts = [self.name] + ([variant] if variant else []) + ([self.isa] if self.isa else []) \
            + ([f"{self.threads}t"] if self.threads else [])
        return "-".join(parts)


def time_call(fn, setup=None, clock=time.perf_counter, peak_rss: list | None = None) -> float:
    """Seconds of one call of `fn`; `setup` and `fn.prepare` run before the timed region and the
    result is released after it.  `peak_rss` (a list): append the call's peak RSS growth in bytes
    (:func:`peak_extra_memory`'s ``"rss"``; reset and read outside the timed region; the kernel
    tracks the peak anyway, so the call itself is not slowed)."""
    if setup is not None:
        setup()
    prepare = getattr(fn, "prepare", None)
    if prepare is not None:
        prepare()
    rss0 = _status_kib("VmRSS") if peak_rss is not None and _reset_peak_rss() else None
    t0 = clock()
    r = fn()
    t1 = clock()
    if rss0 is not None:
        hwm = _status_kib("VmHWM")
        peak_rss.append(None if hwm is None else max(0, hwm - rss0) * 1024)
    del r  # released outside the timed region
    return t1 - t0


def stats(samples) -> dict:
    a = np.asarray(samples, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median_s": float(med), "q1_s": float(q1), "q3_s": float(q3), "iqr_s": float(q3 - q1),
            "min_s": float(a.min()), "mean_s": float(a.mean()), "count": int(a.size),
            "samples_s": [float(v) for v in a]}


def _loss_grad(result):
    """(loss as float, gradient as ndarray or None) of any provider's result."""
    if isinstance(result, tuple):
        return float(result[0]), np.asarray(result[1])
    return float(result), None


def summary(result, points: int = 4096):
    """(loss, strided float64 sample of the gradient or None): what :func:`agree` compares.
    Taken right after each call (the in-place and out= variants share a buffer)."""
    loss, grad = _loss_grad(result)
    if grad is not None:
        flat = grad.reshape(-1)
        grad = flat[::max(1, flat.size // points)].astype(np.float64)
    return loss, grad


def agree(ref, got, rtol=1e-3) -> bool:
    """Loose agreement of two providers' :func:`summary` (float32 math on both sides)."""
    (l0, g0), (l1, g1) = ref, got
    if not abs(l0 - l1) <= rtol * max(abs(l0), abs(l1)) + 1e-30:
        return False
    if g0 is None:
        return True
    return bool(np.allclose(g0, g1, rtol=rtol, atol=rtol * float(np.max(np.abs(g0), initial=0.0))))


def agreement_rtol(dtype) -> float:
    """float16 results (NumPy's float16 loss, torch's float16 loss and gradients) round at 2**-11."""
    return 1e-3 if np.dtype(dtype).itemsize >= 4 else 8e-3


def _prefix(x, t, elements: int):
    """The first `elements` elements (1-D), or the first rows holding about that many."""
    if x.ndim <= 1:
        return x[:elements], t[:elements]
    rows = max(1, elements // x.shape[-1])
    return x[:rows], t[:rows]


def warm_up(providers: list[Provider], x, t, policy: Policy) -> dict[str, bool]:
    """One call of each provider (on a prefix for large sizes); returns agreement with numpy."""
    if policy.warmup_prefix is not None:
        x, t = _prefix(x, t, policy.warmup_prefix)
    results = {}
    for p in providers:
        if p.setup is not None:
            p.setup()
        results[p.key] = summary(call_once(p.make(x, t)))
    ok = {}
    rtol = agreement_rtol(x.dtype)
    ref = next((results[p.key] for p in providers if p.name == "numpy"), None)
    if ref is not None:
        for p in providers:
            if p.name != "numpy":
                ok[p.key] = agree(ref, results[p.key], rtol)
    return ok


def group_memory(providers: list[Provider], x, t, names=("fastloss", "numpy")) -> dict[tuple, int | None]:
    """Peak extra memory (bytes) of one untimed call per (provider, mode) of `names`, at its largest
    thread count; keys ("fastloss", mode), ("numpy", None), ("torch", None).  (The CLI measures
    torch's on its first timed call instead: ``Provider.measure_rss``.)"""
    chosen = {}
    for p in providers:
        if p.timed and p.name in names:
            chosen[(p.name, p.mode)] = p  # the last one: the most threads
    out = {}
    for key, p in chosen.items():
        if p.setup is not None:
            p.setup()
        out[key] = peak_extra_memory(p.make(x, t), MEMORY_METHODS[p.name])
    return out


def accuracy(case: Case, providers: list[Provider], x, t) -> dict[str, float]:
    """Error of one call of each provider against ``fastloss.reference`` in float64.

    forward: |loss - exact| / |exact|;  with-grad: max |grad - exact| / max |exact|
    (the loss of with-grad is the forward's).  The first fastloss provider stands for
    all: results are bitwise identical for every thread count by design.  Untimed
    competitors are left out.
    """
    spec = BENCH_LOSSES[case.loss]
    exact = float(spec.reference(x, t)) if case.mode == "forward" else spec.reference_grad(x, t)
    out = {}
    for p in providers:
        if p.name in out or not p.timed:
            continue
        if p.setup is not None:
            p.setup()
        loss, grad = _loss_grad(call_once(p.make(x, t)))
        if case.mode == "forward":
            out[p.name] = abs(loss - exact) / abs(exact)
        else:
            err = np.subtract(grad, exact, dtype=np.float64)
            out[p.name] = float(np.max(np.abs(err))) / float(np.max(np.abs(exact)))
            del err
    return out


def accuracy_size(sizes) -> int | None:
    """The size at which the error is measured: the largest up to 1e6, else the smallest
    up to 1e7, else none (the float64 reference and one call of each provider cost
    ~0.5 s at 1e6 and ~5 s at 1e7 over all regression losses)."""
    small = [n for n in sizes if n <= 10**6]
    if small:
        return max(small)
    return min((n for n in sizes if n <= 10**7), default=None)


def accuracy_shape(shapes) -> tuple | None:
    """The cross-entropy shape at which the error is measured: the smallest, up to
    CE_ACCURACY_MAX elements (the float64 reference costs ~1 s per 1e7 elements)."""
    shapes = [tuple(s) for s in shapes if math.prod(s) <= CE_ACCURACY_MAX]
    return min(shapes, key=math.prod, default=None)


def run_rounds(providers: list[Provider], x, t, policy: Policy) -> int:
    """Interleaved timed rounds; samples are appended to each timed provider.  Returns the rounds."""
    fns = [p.make(x, t) if p.timed else None for p in providers]
    active = [i for i, p in enumerate(providers) if p.timed]
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    rounds = 0
    start = time.perf_counter()
    try:
        while active and rounds < policy.max_rounds:
            for i in active:
                p = providers[i]
                rss = [] if p.measure_rss and p.peak_rss is None else None
                p.samples.append(time_call(fns[i], p.setup, peak_rss=rss))
                if rss:
                    p.peak_rss = rss[0]
            rounds += 1
            elapsed = time.perf_counter() - start
            active = [i for i in active
                      if not policy.done(providers[i].samples, elapsed, providers[i].name != "fastloss")]
    finally:
        if gc_was_enabled:
            gc.enable()
    return rounds


def group_providers(group_cases: list[Case], with_numpy=True, with_torch=False,
                    numpy_is_timed: bool = True) -> list[Provider]:
    """fastloss (per threads, mode, ISA), numpy (once), torch (per threads), interleaved in that
    order.  The out= and in-place cases of the group share one :class:`Scratch` buffer."""
    out = []
    threads = list(dict.fromkeys(c.threads for c in group_cases))
    first = group_cases[0]
    scratch = Scratch()
    for i, th in enumerate(threads):
        for c in group_cases:
            if c.threads == th:
                out.append(Provider("fastloss", th, c.isa, lambda x, t, c=c: fastloss_fn(c, x, t, scratch),
                                    fastloss_setup(c), mode=c.mode))
        if i == 0 and with_numpy:
            out.append(Provider("numpy", None, None, lambda x, t: numpy_fn(first, x, t), timed=numpy_is_timed))
        if with_torch:
            out.append(Provider("torch", th, None, lambda x, t: torch_fn(first, x, t), torch_setup(th)))
    return out


# ---- read bandwidth ------------------------------------------------------------------------------

def measure_read_bandwidth(threads, nbytes=READ_BW_BYTES, rounds=READ_BW_ROUNDS) -> dict[int, list[float]]:
    """Seconds per full read of an `nbytes` float32 array by ``_core.read_sum_f32``,
    per thread count (one warm-up round, then `rounds` interleaved rounds)."""
    a = np.ones(nbytes // 4, dtype=np.float32)  # written, so its pages are mapped
    samples = {th: [] for th in threads}
    for r in range(rounds + 1):
        for th in threads:
            dt = time_call(lambda: _core.read_sum_f32(a, th))
            if r:
                samples[th].append(dt)
    return samples


# ---- environment ---------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(threads, isas) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": _core.num_procs(),
        "threads": list(threads),
        "isa_timed": list(isas),
        "torch": torch_version(),
        "load_average": _loadavg(),
        "platform": platform.platform(),
        "argv": sys.argv,
    }
    env.update(fastloss.config())
    return env


# ---- the CLI run ---------------------------------------------------------------------------------

@dataclass
class Options:
    losses: list | None = None     # loss names or family aliases; None: every loss
    sizes: tuple = DEFAULT_SIZES   # regression element counts
    threads: tuple = DEFAULT_THREADS
    isas: list | None = None
    quick: bool = False
    repeat: int | None = None
    json_path: str | None = None
    torch: bool = True
    preset: str = "default"        # the cross-entropy set (CE_PRESETS): default, quick, full
    shapes: tuple | None = None    # cross-entropy (rows, classes); None: the preset's
    dtypes: tuple | None = None    # cross-entropy dtypes; None: the preset's
    modes: tuple | None = None     # None: the regression MODES and the preset's cross-entropy modes

    def cases(self) -> list[Case]:
        return cases(self.losses, self.sizes, self.threads, self.modes, DEFAULT_DTYPE, self.isas, self.shapes,
                     self.dtypes, self.preset)


class _Progress:
    """Per-group progress on stderr: one line each when not a TTY, one rewritten line on a TTY."""

    def __init__(self, total: int, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total = total
        self.done = 0

    def start(self, text: str):
        if self.tty:
            self.stream.write(f"\r\x1b[K[{self.done + 1}/{self.total}] {text} ...")
            self.stream.flush()

    def finish(self, text: str):
        self.done += 1
        if not self.tty:
            self.stream.write(f"[{self.done}/{self.total}] {text}\n")
            self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _group_title(c: Case) -> str:
    if c.family == "regression":
        return f"{c.size_label} {c.loss} {c.group_mode}"
    return f"{c.size_label} {c.dtype} {c.loss} {c.group_mode}"


def run(opts: Options, out=None) -> dict:
    """Time every case of `opts`, print the header and tables to `out`; return the report."""
    out = out or sys.stdout
    wall0 = time.perf_counter()
    isas = opts.isas or [_core.get_isa()]
    all_cases = cases(opts.losses, opts.sizes, opts.threads, opts.modes, DEFAULT_DTYPE, isas, opts.shapes,
                      opts.dtypes, opts.preset)
    numpy_max = CE_PRESETS[opts.preset].numpy_max
    use_torch = opts.torch and torch_available()
    env = environment(opts.threads, isas)
    env["memory_methods"] = {"fastloss": "tracemalloc", "numpy": "tracemalloc",
                             "torch": "peak RSS growth (VmHWM reset via /proc/self/clear_refs)"
                             if rss_peak_available() else None}
    print(format_header(env, use_torch, opts, all_cases), file=out, flush=True)

    selected_isa = _core.get_isa()
    torch_threads = None
    if use_torch:
        import torch
        torch_threads = torch.get_num_threads()
    groups: dict[tuple, list[Case]] = {}
    for c in all_cases:
        groups.setdefault(c.group, []).append(c)
    acc_at = {"regression": accuracy_size(sorted({c.n for c in all_cases if c.family == "regression"})),
              "classification": accuracy_shape({c.shape for c in all_cases if c.family == "classification"})}
    acc_at["regression"] = (acc_at["regression"],) if acc_at["regression"] else None

    records, bw = [], {th: [] for th in opts.threads}
    # torch's memory at logits under 32 MiB: measured by a helper process, which runs while the
    # first cross-entropy inputs are made (untimed, one core) and is waited for before timing
    torch_small = [dataclasses.replace(g[0], threads=max(c.threads for c in g)) for g in groups.values()
                   if BENCH_LOSSES[g[0].loss].memory
                   and g[0].n * np.dtype(g[0].dtype).itemsize < RSS_IN_PROCESS_MIN_BYTES]
    if not (use_torch and env["memory_methods"]["torch"]):
        torch_small = []
    helper, torch_sub = None, None
    progress = _Progress(len(groups))
    inputs = InputCache()
    try:
        for th, s in measure_read_bandwidth(opts.threads).items():
            bw[th] += s
        for gcases in groups.values():
            first = gcases[0]
            spec = BENCH_LOSSES[first.loss]
            title = _group_title(first)
            progress.start(title)
            g0 = time.perf_counter()  # the group's wall time, making its inputs included
            if torch_small and helper is None and spec.memory:
                helper = TorchMemoryHelper(torch_small)
            x, t = inputs.get(first)
            if helper is not None and torch_sub is None:
                torch_sub = helper.result()
            policy = policy_for(first.n, first.dtype, opts.quick, opts.repeat)
            provs = group_providers(gcases, with_numpy=True, with_torch=use_torch,
                                    numpy_is_timed=numpy_timed(first, numpy_max))
            ok = warm_up(provs, x, t, policy)
            mem = None
            torch_p = [p for p in provs if p.name == "torch"][-1:]  # the most threads
            if spec.memory:
                mem = group_memory(provs, x, t)  # fastloss and NumPy: tracemalloc, one untimed call each
                if torch_p and x.nbytes >= RSS_IN_PROCESS_MIN_BYTES:
                    torch_p[0].measure_rss = True  # torch: peak RSS of its first timed call
                elif torch_p and torch_sub is not None:
                    mem[("torch", None)] = torch_sub.get(torch_memory_key(dataclasses.replace(
                        first, threads=torch_p[0].threads)))
            run_rounds(provs, x, t, policy)
            if mem is not None and torch_p and torch_p[0].measure_rss:
                mem[("torch", None)] = torch_p[0].peak_rss
            acc = accuracy(first, provs, x, t) if first.dims == acc_at[spec.family] else None
            progress.finish(f"{title}: " + _progress_summary(provs) + f" [{time.perf_counter() - g0:.1f} s]")
            records += _records(gcases, provs, ok, acc, mem)
            provs = x = t = None  # the providers hold the group's scratch buffer
        inputs.clear()
        for th, s in measure_read_bandwidth(opts.threads).items():
            bw[th] += s
    finally:
        if helper is not None:
            helper.close()
        inputs.clear()
        progress.close()
        _core.set_isa(selected_isa)
        if torch_threads is not None:
            import torch
            torch.set_num_threads(torch_threads)

    # The yardstick is the best read (as STREAM reports): contention only ever slows a read.
    read_gbps = {th: READ_BW_BYTES / min(s) / 1e9 for th, s in bw.items()}
    for r in records:
        r["read_bw_gbps"] = read_gbps[r["threads"]]
        r["pct_read_bw"] = 100.0 * r["gbps"] / read_gbps[r["threads"]]
    ce_cases = [c for c in all_cases if c.family == "classification"]
    report = {
        "schema": "fastloss-bench/2",
        "environment": env,
        "options": {"sizes": list(dict.fromkeys(c.n for c in all_cases if c.family == "regression")),
                    "threads": list(opts.threads), "isas": isas,
                    "quick": opts.quick, "repeat": opts.repeat, "torch": use_torch,
                    "losses": list(dict.fromkeys(c.loss for c in all_cases)),
                    "preset": opts.preset,
                    "shapes": [list(s) for s in dict.fromkeys(c.shape for c in ce_cases)],
                    "dtypes": list(dict.fromkeys(c.dtype for c in ce_cases)),
                    "modes": list(dict.fromkeys(c.mode for c in all_cases)),
                    "numpy_max_elements": numpy_max},
        "read_bandwidth": {str(th): {"gbps": read_gbps[th], "bytes": READ_BW_BYTES,
                                     **stats(bw[th])} for th in opts.threads},
        "cases": records,
        "wall_time_s": time.perf_counter() - wall0,
        "load_average_end": _loadavg(),
    }
    print(format_table(report), file=out)
    mismatches = [r for r in records if r["agrees_with_numpy"] is False or r.get("torch_agrees") is False]
    for r in mismatches:
        print(f"WARNING: results disagree with NumPy: {r['loss']} {_size_label(r)} {r['dtype']} {r['mode']} "
              f"{r['threads']}t {r['isa']}", file=sys.stderr)
    if opts.json_path:
        with open(opts.json_path, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return report


def _progress_summary(provs: list[Provider]) -> str:
    parts = []
    for p in provs:
        if p.samples:
            parts.append(f"{p.key} {format_ms(float(np.median(p.samples)))} ms ({len(p.samples)})")
    return ", ".join(parts)


def _records(gcases: list[Case], provs: list[Provider], ok: dict, acc: dict | None,
             mem: dict | None) -> list[dict]:
    numpy_p = next(p for p in provs if p.name == "numpy")
    np_stats = stats(numpy_p.samples) if numpy_p.timed and numpy_p.samples else None
    recs = []
    for c in gcases:
        fl = next(p for p in provs if p.name == "fastloss" and p.threads == c.threads and p.isa == c.isa
                  and p.mode == c.mode)
        tp = next((p for p in provs if p.name == "torch" and p.threads == c.threads), None)
        fs = stats(fl.samples)
        ts = stats(tp.samples) if tp else None
        med = fs["median_s"]
        rec = {
            "family": c.family, "loss": c.loss, "n": c.n, "dtype": c.dtype, "mode": c.mode, "threads": c.threads,
            "isa": c.isa, "bytes": c.nbytes(), "gbps": c.nbytes() / med / 1e9,
            "fastloss": fs, "numpy": np_stats, "torch": ts,
            "numpy_timed": numpy_p.timed,
            "speedup_numpy": np_stats["median_s"] / med if np_stats else None,
            "speedup_torch": ts["median_s"] / med if ts else None,
            "agrees_with_numpy": ok.get(fl.key),
            "torch_agrees": ok.get(tp.key) if tp else None,
            "error_vs_float64": acc,
        }
        if c.shape is not None:
            rec["shape"] = list(c.shape)
        if mem is not None:
            rec["input_bytes"] = c.n * np.dtype(c.dtype).itemsize
            rec["peak_extra_bytes"] = {"fastloss": mem.get(("fastloss", c.mode)),
                                       "numpy": mem.get(("numpy", None)),
                                       "torch": mem.get(("torch", None))}
            rec["memory_threads"] = max(p.threads for p in provs if p.name == "fastloss")
            if tp is not None:
                rec["memory_torch_method"] = ("peak RSS growth, in process (first timed call)"
                                              if rec["input_bytes"] >= RSS_IN_PROCESS_MIN_BYTES
                                              else "peak RSS growth, helper process")
        recs.append(rec)
    return recs


# ---- formatting ----------------------------------------------------------------------------------

def format_size(n: int) -> str:
    if n >= 1000:
        e = len(str(n)) - 1
        m, r = divmod(n, 10**e)
        if r == 0:
            return f"{m}e{e}"
    return str(n)


def format_shape(shape) -> str:
    return "x".join(str(int(v)) for v in shape)


def _size_label(r: dict) -> str:
    return format_shape(r["shape"]) if r.get("shape") else format_size(r["n"])


def parse_size(text: str) -> int:
    """'1e7', '10000000' or '1_000_000' -> int (ValueError if not a positive integer)."""
    s = text.strip().replace("_", "")
    v = float(s) if any(ch in s for ch in "eE.") else int(s)
    if v != int(v) or v < 1:
        raise ValueError(f"size must be a positive integer, got {text!r}")
    return int(v)


def parse_shape(text: str) -> tuple[int, int]:
    """'8192x32000' -> (8192, 32000) (ValueError unless two positive integers)."""
    parts = text.strip().lower().split("x")
    if len(parts) != 2:
        raise ValueError(f"a shape is ROWSxCLASSES, e.g. 8192x32000, got {text!r}")
    return parse_size(parts[0]), parse_size(parts[1])


def format_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _ratio(v) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}x" if v >= 10 else f"{v:.2f}x"


def format_header(env: dict, use_torch: bool, opts: Options, all_cases: list[Case] | None = None) -> str:
    all_cases = opts.cases() if all_cases is None else all_cases
    lines = [
        f"fastloss {env['fastloss']} benchmark   {env['date']}",
        f"cpu        {env['cpu']}  ({env['cores']} cores)",
        f"isa        selected {env['isa_selected']}"
        + (f" (FASTLOSS_ISA={env['isa_forced_by_env']})" if env["isa_forced_by_env"] else "")
        + f"; supported {', '.join(env['isa_supported'])}; timed {', '.join(env['isa_timed'])}",
        f"threads    {', '.join(map(str, env['threads']))}   (OpenMP {'on' if env['openmp'] else 'OFF'})",
        f"versions   fastloss {env['fastloss']}, numpy {env['numpy']}, "
        f"torch {env['torch'] or 'not installed'}{'' if use_torch or not env['torch'] else ' (not used)'}, "
        f"python {env['python']}, {env['compiler']}",
    ]
    cases_lines = []
    reg = [c for c in all_cases if c.family == "regression"]
    if reg:
        cases_lines.append(f"regression {reg[0].dtype}, sizes {', '.join(dict.fromkeys(c.size_label for c in reg))}"
                           + (", --quick" if opts.quick else ""))
    ce = [c for c in all_cases if c.family == "classification"]
    if ce:
        which = ("--quick" if opts.quick else "full set" if opts.preset == "full"
                 else "default subset; --loss cross_entropy or --full for all")
        cases_lines.append(
            f"cross_entropy {', '.join(dict.fromkeys(c.size_label for c in ce))}; "
            f"{', '.join(dict.fromkeys(c.dtype for c in ce))}; "
            f"{', '.join(dict.fromkeys(MODE_LABELS[c.mode] for c in ce))}  ({which})")
    for i, text in enumerate(cases_lines):
        lines.append(("cases      " if i == 0 else "           ") + text)
    if env["load_average"]:
        lines.append(f"load       {env['load_average'][0]:.2f} (1-minute load average at start; "
                     f"{env['cores']} cores)")
    return "\n".join(lines)


def _format_rows(head: list[str], rows: list, left: set) -> list[str]:
    widths = [max([len(h)] + [len(row[i]) for row in rows if row]) for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if h in left else c.rjust(w) for c, w, h in zip(cells, widths, head)).rstrip()
    return [fmt(head)] + ["" if row is None else fmt(row) for row in rows]


def _format_accuracy(recs: list[dict], has_torch: bool) -> list[str]:
    """The error table of one family (recs at one size or shape)."""
    names = ("fastloss", "numpy", "torch") if has_torch else ("fastloss", "numpy")
    rows, seen, at = [], set(), None
    many_dtypes = len({r["dtype"] for r in recs}) > 1
    for r in recs:
        acc = r.get("error_vs_float64")
        key = (r["loss"], r["dtype"], "forward" if r["mode"] == "forward" else "with-grad")
        if not acc or key in seen:
            continue
        seen.add(key)
        at = r
        rows.append([r["loss"]] + ([r["dtype"]] if many_dtypes else []) + [key[2]]
                    + [f"{acc[k]:.1e}" if k in acc else "-" for k in names])
    if not rows:
        return []
    head = ["loss"] + (["dtype"] if many_dtypes else []) + ["mode", "fastloss", "NumPy"] \
        + (["torch"] if has_torch else [])
    where = f"n={format_size(at['n'])}" if not at.get("shape") else format_shape(at["shape"])
    lead = f"error at {where} against fastloss.reference in float64 (one call each; forward: relative"
    tail = ("error of the loss; with-grad: max |gradient error| / max |gradient|; float32 results round at ~6e-8"
            + (", float16 gradients at ~5e-4" if any(r["dtype"] == "float16" for r in recs) else "")
            + ("; '-': not timed" if any(not r["numpy_timed"] for r in recs if r.get("error_vs_float64")) else "")
            + "):")
    intro = [lead, tail] if at["family"] == "regression" else _note(lead + " " + tail, first="")
    return [""] + intro + _format_rows(head, rows, {"loss", "mode", "dtype"})


def _regression_table(recs: list[dict], first_isa: str, has_torch: bool) -> list[str]:
    multi_isa = len({r["isa"] for r in recs}) > 1
    head = ["loss", "n", "mode", "thr"] + (["isa"] if multi_isa else []) + ["fastloss", "NumPy"] \
        + (["torch"] if has_torch else []) + ["NumPy/fl"] + (["torch/fl"] if has_torch else []) \
        + ([f"vs {first_isa}"] if multi_isa else []) + ["GB/s", "%read"]
    base = {(r["loss"], r["n"], r["mode"], r["threads"]): r["fastloss"]["median_s"]
            for r in recs if r["isa"] == first_isa}
    rows, prev_n = [], None
    for r in recs:
        if prev_n is not None and r["n"] != prev_n:
            rows.append(None)
        prev_n = r["n"]
        row = [r["loss"], format_size(r["n"]), r["mode"].replace("_", "-"), str(r["threads"])]
        row += _timing_cells(r, has_torch, multi_isa, base.get((r["loss"], r["n"], r["mode"], r["threads"])))
        rows.append(row)
    return _format_rows(head, rows, {"loss", "mode", "isa"})


def _timing_cells(r: dict, has_torch: bool, multi_isa: bool, base_med) -> list[str]:
    """The cells every table shares: [isa], times, speedups, [vs the first ISA], GB/s, %read
    (flagged with ' !' when a provider disagreed with NumPy in the warm-up check)."""
    med = r["fastloss"]["median_s"]
    cells = [r["isa"]] if multi_isa else []
    cells += [format_ms(med), format_ms(r["numpy"]["median_s"]) if r["numpy"] else "-"]
    if has_torch:
        cells.append(format_ms(r["torch"]["median_s"]) if r["torch"] else "-")
    cells.append(_ratio(r["speedup_numpy"]))
    if has_torch:
        cells.append(_ratio(r["speedup_torch"]))
    if multi_isa:
        cells.append(_ratio(base_med / med) if base_med else "-")
    cells += [f"{r['gbps']:.1f}", f"{r['pct_read_bw']:.0f}%"]
    if r["agrees_with_numpy"] is False or r["torch_agrees"] is False:
        cells[-1] += " !"
    return cells


def _mem_cell(r: dict, who: str) -> str:
    v = (r.get("peak_extra_bytes") or {}).get(who)
    if v is None:
        return "-"
    return f"{v / r['input_bytes']:.2f}"


def _ce_table(recs: list[dict], first_isa: str, has_torch: bool) -> list[str]:
    multi_isa = len({r["isa"] for r in recs}) > 1
    multi_loss = len({r["loss"] for r in recs}) > 1
    head = (["loss"] if multi_loss else []) + ["shape", "dtype", "mode", "thr"] + (["isa"] if multi_isa else []) \
        + ["fastloss", "NumPy"] + (["torch"] if has_torch else []) + ["NumPy/fl"] \
        + (["torch/fl"] if has_torch else []) + ([f"vs {first_isa}"] if multi_isa else []) \
        + ["GB/s", "%read", "mem:fl", "mem:NumPy"] + (["mem:torch"] if has_torch else [])
    base = {(r["loss"], tuple(r["shape"]), r["dtype"], r["mode"], r["threads"]): r["fastloss"]["median_s"]
            for r in recs if r["isa"] == first_isa}
    rows, prev = [], None
    for r in recs:
        key = (r["loss"], tuple(r["shape"]), r["dtype"])
        if prev is not None and key != prev:
            rows.append(None)
        prev = key
        row = ([r["loss"]] if multi_loss else []) + [format_shape(r["shape"]), r["dtype"], MODE_LABELS[r["mode"]],
                                                     str(r["threads"])]
        row += _timing_cells(r, has_torch, multi_isa,
                             base.get((r["loss"], tuple(r["shape"]), r["dtype"], r["mode"], r["threads"])))
        row += [_mem_cell(r, "fastloss"), _mem_cell(r, "numpy")] + ([_mem_cell(r, "torch")] if has_torch else [])
        rows.append(row)
    return _format_rows(head, rows, {"loss", "shape", "dtype", "mode", "isa"})


def _numpy_limit_text(numpy_max: dict, dtypes) -> str:
    limits = {d: numpy_max.get(d) for d in dtypes}
    if len(set(limits.values())) == 1:
        lim = next(iter(limits.values()))
        return "at every shape" if lim is None else f"up to {_elements_text(lim)} elements"
    return "; ".join(f"{d} {'at every shape' if lim is None else 'up to ' + _elements_text(lim) + ' elements'}"
                     for d, lim in limits.items())


def _elements_text(n: int) -> str:
    return f"2**{n.bit_length() - 1}" if n & (n - 1) == 0 else format_size(n)


def _note(text: str, first: str = "  ", width: int = 112) -> list[str]:
    """A footnote paragraph, wrapped, continuation lines indented by two spaces."""
    return textwrap.wrap(text, width=width, initial_indent=first, subsequent_indent="  ",
                         break_on_hyphens=False, break_long_words=False)


def _ce_notes(recs: list[dict], report: dict, has_torch: bool) -> list[str]:
    opts = report["options"]
    modes = {r["mode"] for r in recs}
    threads = recs[0].get("memory_threads")
    skipped = list(dict.fromkeys(f"{format_shape(r['shape'])} {r['dtype']}" for r in recs if not r["numpy_timed"]))
    lines = _note("cross-entropy: reduction='mean', class-index targets, logits ~ N(0, 1) (float16: the float32 "
                  "values rounded).  GB/s = logits bytes read (+ gradient bytes written for with-grad) / fastloss "
                  "median (the targets, 8 bytes a row, are not counted); %read = that rate / the read bandwidth at "
                  "the same thread count.", first="")
    if modes & {"with_grad", "with_grad_out", "with_grad_inplace"}:
        lines += _note(
            "with-grad = cross_entropy_with_grad(x, t), a new gradient array"
            + ("; out= : grad_out = a preallocated array (allocated and first written before timing, reused by every "
               "call)" if "with_grad_out" in modes else "")
            + ("; in-place: grad_out = logits, on a copy of the logits that np.copyto refreshes before each call, "
               "outside the timed region (the copy leaves at most a last-level cache's worth of them in cache)"
               if "with_grad_inplace" in modes else "") + ".")
    lines += _note("NumPy = fastloss.reference.cross_entropy(x, t, dtype=None) (with-grad: + cross_entropy_grad), "
                   "computed in the logits' dtype, one thread"
                   + ("; torch = torch.nn.functional.cross_entropy(x, t) (with-grad: + torch.autograd.grad, a fresh "
                      "gradient), torch.set_num_threads(thr)" if has_torch else "") + "."
                   + ("  Neither has out= or an in-place gradient: every with-grad row of a shape and dtype shows the "
                      "same competitor times, measured once in that group, interleaved with all the fastloss "
                      "variants." if modes & {"with_grad_out", "with_grad_inplace"} else ""))
    if skipped:
        lines += _note(
            f"NumPy '-' = not timed at {', '.join(skipped)} (it still takes part in the warm-up check, on the first "
            "rows): one NumPy call takes ~1.3 s forward / ~3 s with-grad at 8192x32000 float32 and ~10 s / ~45 s "
            "in float16, so this run times NumPy " + _numpy_limit_text(opts["numpy_max_elements"], opts["dtypes"])
            + ("." if opts.get("preset") == "full" else
               "; --loss cross_entropy and --full time it at every float32 shape and in float16 up to 32768x1024."))
    method = report["environment"].get("memory_methods", {}).get("torch")
    text = (f"mem:* = peak extra memory during one call at {threads} thread{'s' if threads != 1 else ''}, its "
            "result included, / logits bytes; the caller's grad_out is not counted.  fastloss and NumPy: "
            "tracemalloc, in an untimed call (fastloss allocates its outputs through NumPy).")
    if has_torch:
        text += ("  torch (it keeps no CPU allocator statistics): growth of the peak RSS (VmHWM, reset via "
                 "/proc/self/clear_refs), in this process during its first timed call for logits >= 32 MiB "
                 "(glibc gives such arrays fresh pages), and for smaller logits in a helper process with "
                 f"MALLOC_MMAP_THRESHOLD_={SUBPROCESS_MMAP_THRESHOLD} after a warm-up call; page-granular."
                 if method else "  torch: not measured (needs /proc/self/clear_refs to reset the peak RSS).")
    lines += _note(text)
    return lines


def format_table(report: dict) -> str:
    recs = report["cases"]
    has_torch = any(r["torch"] for r in recs)
    first_isa = report["options"]["isas"][0]
    reg = [r for r in recs if r.get("family", "regression") == "regression"]
    ce = [r for r in recs if r.get("family") == "classification"]
    multi_isa = len({r["isa"] for r in recs}) > 1
    lines = ["", "times: median milliseconds; ratios > 1x: fastloss is faster"]
    if reg:
        lines += _regression_table(reg, first_isa, has_torch)
    if ce:
        lines += ["", "cross-entropy (shape = rows x classes; mem:* = peak extra memory / logits bytes):"]
        lines += _ce_table(ce, first_isa, has_torch)
    rb = report["read_bandwidth"]
    bw = ", ".join(f"{th} thread{'s' if th != '1' else ''} {v['gbps']:.1f} GB/s" for th, v in rb.items())
    counts = {}
    for r in recs:
        c = counts.setdefault(_size_label(r), set())
        c.update(p["count"] for p in (r["fastloss"], r["numpy"], r["torch"]) if p)
    counts = {k: (f"{min(v)}" if len(v) == 1 else f"{min(v)}-{max(v)}") for k, v in counts.items()}
    lines += [
        "",
        f"read bandwidth: {bw}",
        f"  (fastloss._core.read_sum_f32 on a 1 GiB float32 array; best of {2 * READ_BW_ROUNDS} reads, "
        "half before and half after the cases)",
    ]
    if reg:
        lines += [
            "GB/s = bytes of input + target read, plus gradient bytes written for with-grad, / fastloss median: the",
            "  minimum traffic, so an implementation that makes two passes (rmse with-grad) shows a lower GB/s;",
            "  %read = that rate / the read bandwidth at the same thread count; writes are slower than reads, and",
            "  small sizes run from cache between calls (and can pass 100%).",
            "NumPy = fastloss.reference.<loss>(x, t, dtype=None), computed in float32 (with-grad: + <loss>_grad);",
            "  single-threaded: timed once per loss/size/mode and shown on each thread row.",
        ]
        if has_torch:
            lines.append("torch = torch.nn.functional.<loss> (rmse: sqrt(mse_loss)), torch.set_num_threads(thr);")
            lines.append("  with-grad: forward + torch.autograd.grad with respect to the input.")
    if ce:
        lines += _ce_notes(ce, report, has_torch)
    if multi_isa:
        lines.append(f"vs {first_isa} = fastloss time with {first_isa} / time with this ISA (same run).")
    lines.append("calls timed per provider after a warm-up, providers interleaved: "
                 + ", ".join(f"{k}: {v}" for k, v in counts.items()) + "; quartiles in --json.")
    lines += _format_accuracy(reg, has_torch)
    lines += _format_accuracy(ce, has_torch)
    if any(r["agrees_with_numpy"] is False or r["torch_agrees"] is False for r in recs):
        lines.append("! = fastloss or torch disagrees with NumPy in the warm-up call (see stderr).")
    end = report.get("load_average_end")
    lines.append(f"wall time {report['wall_time_s']:.0f} s" + (f"; load average at end {end[0]:.2f}" if end else ""))
    return "\n".join(lines)
