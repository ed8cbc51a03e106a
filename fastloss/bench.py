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
  ~45 s a call), so NumPy is timed only up to a number of elements per family and
  dtype (:func:`numpy_timed`; it still takes part in the warm-up check).  PyTorch
  CPU (when importable): ``torch.nn.functional.<loss>`` (rmse: ``sqrt(mse_loss)``);
  with-grad is the forward plus ``torch.autograd.grad`` with respect to the input (a
  backward into a fresh gradient, like ours); ``torch.set_num_threads`` follows the
  case.  Tensors come from ``torch.from_numpy``, outside the timed region.
* **Timing.**  The providers of one group (fastloss per mode, thread count and ISA,
  NumPy, torch per thread count) run in interleaved rounds (fastloss, NumPy, torch,
  fastloss, ...) so that the noise of this shared machine hits all of them alike.
  One warm-up call each first (on a 2**20-element prefix -- whole rows for
  cross-entropy -- for arrays above 2**22 elements, which get fresh pages on every call
  anyway), then rounds until a minimum count and a minimum time are reached; fewer
  calls for large sizes, and slow competitors stop after 2 calls and 0.5 s
  (:class:`Policy`), which keeps the default run to about three minutes.  Each sample is
  one call; results are released outside the timed region, and so is the ``prepare``
  step of the in-place variant.  Reported: the median (quartiles in JSON).  Only
  medians and ratios measured in the same run mean anything here; absolute times drift
  20-30 % between runs.
* **Memory** (every family).  Peak extra memory during one call, the result included,
  per provider and mode at the largest thread count, measured the same way for all
  three: for inputs of 32 MiB or more during the provider's first timed call, for
  smaller ones in one more, untimed call.  fastloss and NumPy with ``tracemalloc``
  (NumPy reports its allocations to it, and fastloss allocates its outputs and scratch
  through NumPy); torch, which keeps no allocator statistics on CPU, by the growth of
  the peak RSS (``VmHWM`` reset through ``/proc/self/clear_refs``; glibc gives arrays
  of 32 MiB or more fresh pages), and for smaller inputs in a helper process with a low
  glibc mmap threshold (:class:`TorchMemoryHelper`).
* **Bandwidth.**  The plain read kernel ``fastloss._core.read_sum_f32`` on a 1 GiB
  float32 array, per thread count, before and after the cases (best of the pooled
  samples, as STREAM reports: contention only ever slows a read), is the yardstick
  for each fastloss case's GB/s (:meth:`Case.nbytes`).
* **Is it right?**  The warm-up result of every provider is compared with the float64
  ``fastloss.reference`` on the same input (:func:`relative_error`; the whole input up
  to 2**22 elements, the warm-up prefix above), which gives each row its error
  columns; and fastloss and torch are compared with NumPy, a mismatch being flagged,
  since a fast wrong answer is not a result.
* **Fused linear + cross-entropy** (``--loss linear_cross_entropy`` or ``--full``; not in
  the default run).  :data:`LINEAR_PRESETS` holds the (N, H, V) cases and thread counts;
  every run is one call in a fresh process (``fastloss._bench_linear``: time and peak
  extra memory from the child's own ``VmHWM``), providers interleaved: ``fastloss`` (the NumPy API, the
  only one without torch), ``fastloss_torch``, ``torch`` (skipped when memory is short) and
  ``torch_chunked``.  :func:`finish_linear` adds the medians, the ratios against both
  fastloss providers, issue 8's targets and the agreement of the providers' losses.
* **Output.**  Progress on stderr (:class:`Progress`), the report on stdout; the text,
  the ``--markdown`` file, the ``--plot`` and the ``--compare`` table are rendered from
  the report dict (what ``--json`` writes) by :mod:`fastloss._bench_report`.  Ctrl-C
  ends the timing and reports the cases that finished.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import fastloss
from fastloss import _core, reference
from fastloss._bench_field import FIELD_LOSSES
from fastloss._peakmem import reset_peak_rss, status_bytes
from fastloss._registry import REGISTRY

MODES = ("forward", "with_grad")
DEFAULT_SIZES = (10**6, 10**7, 10**8)
QUICK_SIZES = (10**6, 10**7)
#: pytest-benchmark's default sizes (FASTLOSS_BENCH_SIZES=1e6,1e7,1e8 adds 1e8).
PYTEST_SIZES = (10**6, 10**7)
#: The hidden ``--smoke`` run of the CLI tests: tiny cases, seconds in all.
SMOKE_SIZES = (1000, 10_000)
DEFAULT_THREADS = (1, 2)   # the pytest-benchmark suite's; the CLI's: default_threads()
DEFAULT_DTYPE = "float32"
#: The dtypes a case can have (both families).
BENCH_DTYPES = ("float16", "float32", "float64")
CE_BENCH_DTYPES = BENCH_DTYPES
#: Elements of the warm-up call for large arrays (see policy_for).
WARMUP_PREFIX = 1 << 20
#: Arrays up to this many elements are warmed up whole, so that the error against the
#: float64 reference (computed on the warm-up input) is that of the timed input itself;
#: larger ones on their first WARMUP_PREFIX elements (whole rows): the float64 reference and
#: a whole warm-up call of each provider cost ~1 s per group at 1e7 elements and seconds at
#: 1e8, against a budget of about three minutes for the default run.
ACCURACY_FULL_MAX = 1 << 22
#: The array read by the bandwidth probe.
READ_BW_BYTES = 1 << 30
READ_BW_ROUNDS = 5
QUICK_READ_BW_ROUNDS = 2
SMOKE_READ_BW_BYTES = 8 << 20
#: The regression NumPy reference is timed up to this many elements per dtype (None:
#: always; NumPy's float16 ufuncs are ~8x slower than its float32 ones).
REGRESSION_NUMPY_MAX = {"float32": None, "float16": 10**7, "float64": None}

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
#: NumPy is timed up to this many elements per dtype (None: always); above it, it only
#: takes part in the warm-up check.  Default run: float32 up to 2048x32000, float16 at the
#: small shape only (NumPy takes ~1.3 s / ~3 s per forward / with-grad call at 8192x32000
#: float32, ~10 s / ~45 s in float16).
NUMPY_MAX_DEFAULT = {"float32": 1 << 26, "float16": 1 << 21, "float64": 1 << 21}
#: --quick: the small shape only.
NUMPY_MAX_QUICK = {"float32": 1 << 21, "float16": 1 << 21, "float64": 1 << 21}
#: --full / --loss cross_entropy: every float32 shape; float16 up to (32768, 1024).
NUMPY_MAX_FULL = {"float32": None, "float16": 1 << 25, "float64": None}


@dataclass(frozen=True)
class Preset:
    """The cross-entropy cases of one kind of run."""

    shapes: tuple
    dtypes: tuple
    modes: tuple
    numpy_max: dict
    regression_dtypes: tuple = (DEFAULT_DTYPE,)


CE_PRESETS = {
    # default `python -m fastloss bench` (with the regression losses, ~90 s of the ~3-minute run): a Llama 2
    # vocabulary at 2048 tokens (8192 tokens would take ~40 s more, mostly torch's with-grad)
    "default": Preset(((2048, 32000), (1, 262144)), CE_DTYPES, ("forward", "with_grad"), NUMPY_MAX_DEFAULT),
    "quick": Preset(((1, 262144), (32768, 1024)), CE_DTYPES, ("forward", "with_grad"), NUMPY_MAX_QUICK),
    # --full, --loss cross_entropy
    "full": Preset(CE_SHAPES, CE_DTYPES, CE_MODES, NUMPY_MAX_FULL, CE_DTYPES),
    # pytest benchmarks/ (CI runs it with --benchmark-disable: small shapes, every mode)
    "pytest": Preset(((1, 262144), (64, 32000)), CE_DTYPES, CE_MODES, NUMPY_MAX_FULL),
    # --smoke (the CLI tests)
    "smoke": Preset(((4, 1000), (2, 5000)), CE_DTYPES, ("forward", "with_grad"), NUMPY_MAX_FULL),
}


# ---- the losses ----------------------------------------------------------------------------------

def standard_normal_f32(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` standard normal float32 values by the Box-Muller transform: ~2x faster than
    ``Generator.standard_normal(dtype=np.float32)`` (2.6 s instead of 4.7 s for 262M values
    here), which matters for a default run with a budget of a few minutes."""
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
    family: str               # "regression", "classification", "elementwise" or "rows" (SIZE_FAMILIES: sized by n)
    func: Callable            # fastloss forward: func(x, t, num_threads=)
    with_grad: Callable       # (loss, grad) = with_grad(x, t, num_threads=[, grad_out=])
    reference: Callable       # NumPy: reference(x, t, dtype=None)
    reference_grad: Callable
    make_inputs: Callable     # (rng, shape, dtype) -> {"input": x, "target": t}
    modes: tuple              # the modes the loss is timed in
    arrays_read: int          # arrays of the input's size the forward reads (GB/s)
    torch_loss: Callable | None = None   # (x tensor, t tensor) -> scalar; None: torch.nn.functional.<name>
    presets: dict | None = None          # preset -> sizes (elementwise) or shapes (rows); None: the family's


def _bench_losses() -> dict[str, BenchLoss]:
    out = {name: BenchLoss(name, "regression", spec.func, spec.with_grad, spec.reference, spec.reference_grad,
                           spec.make_inputs, MODES, spec.arrays_read)
           for name, spec in REGISTRY.items() if spec.family == "regression"}
    # Not (yet) in the registry: the benchmark's own entry.  The target (8 bytes a row) is not
    # counted in GB/s: the logits are the traffic.
    out[CE_LOSS] = BenchLoss(CE_LOSS, "classification", fastloss.cross_entropy, fastloss.cross_entropy_with_grad,
                             reference.cross_entropy, reference.cross_entropy_grad, cross_entropy_inputs,
                             CE_MODES, 1)
    # The losses of issue 6: their adapters, inputs and sizes are in fastloss._bench_field.
    for name, (family, fl, gen, presets, arrays) in FIELD_LOSSES.items():
        out[name] = BenchLoss(name, family, fl.fwd, fl.grad, fl.ref, fl.ref_grad, gen, MODES, arrays,
                              fl.torch_loss, presets)
    return out


BENCH_LOSSES: dict[str, BenchLoss] = _bench_losses()
#: --loss aliases.
FAMILIES = {f: tuple(n for n, s in BENCH_LOSSES.items() if s.family == f)
            for f in ("regression", "classification", "elementwise", "rows")}
#: Families whose cases are sized by an element count (the others by a shape, rows x classes).
SIZE_FAMILIES = ("regression", "elementwise")


def default_threads() -> tuple:
    """1 and all: one thread, and fastloss's default thread count (OpenMP's, i.e. the cores
    unless OMP_NUM_THREADS or fastloss.set_num_threads says otherwise)."""
    return tuple(dict.fromkeys((1, max(1, fastloss.get_num_threads()))))


def regression_losses() -> list[str]:
    return list(FAMILIES["regression"])


def known_losses() -> list[str]:
    return list(BENCH_LOSSES)


def resolve_losses(names) -> list[str]:
    """Loss names and family aliases ("regression", "classification", "elementwise", "rows") -> loss
    names, in order."""
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


def cases(losses=None, sizes=DEFAULT_SIZES, threads=DEFAULT_THREADS, modes=None, dtype=None,
          isas=None, shapes=None, dtypes=None, preset="default", sizes_given=False) -> list[Case]:
    """The benchmark cases, in run order: the regression losses by dtype, size, loss, mode,
    threads, ISA; then cross-entropy by shape, dtype, mode, threads, ISA.

    ``losses``: loss names or family aliases (default: every loss); ``isas``: ISA names
    (default: the one fastloss selected at import).  Regression: ``sizes``, in ``dtypes``
    if given, else in ``dtype`` if given, else in the preset's regression dtypes (float32;
    --full: float32 and float16).  Cross-entropy: ``shapes`` (rows, classes) in ``dtypes``
    (default: those of ``CE_PRESETS[preset]``).  ``modes``: applied to each family (a family
    takes the modes it has; default: the regression MODES, and the preset's modes for
    cross-entropy).  The other losses (families "elementwise" and "rows", :mod:`fastloss._bench_field`)
    run in float32 (or ``dtypes``) at their own per-preset sizes or shapes, replaced by ``sizes``
    when ``sizes_given`` and by ``shapes`` when given.
    """
    names = known_losses() if losses is None else resolve_losses(losses)
    pre = CE_PRESETS[preset]
    if modes is not None:
        modes = [normalize_mode(m) for m in modes]
    shapes_given = shapes is not None
    shapes = pre.shapes if shapes is None else tuple(tuple(int(v) for v in s) for s in shapes)
    given = None if dtypes is None else tuple(np.dtype(d).name for d in dtypes)
    for d in given or ():
        if d not in BENCH_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(BENCH_DTYPES)}, got {d!r}")
    for s in shapes:
        if len(s) != 2 or min(s) < 1:
            raise ValueError(f"a cross-entropy shape is ROWSxCLASSES with both >= 1, got {s!r}")
    isas = [_core.get_isa()] if isas is None else list(isas)
    threads = [int(th) for th in threads]
    out = []
    reg = [n for n in names if BENCH_LOSSES[n].family == "regression"]
    reg_modes = MODES if modes is None else [m for m in modes if m in MODES]
    reg_dtypes = given or ((np.dtype(dtype).name,) if dtype is not None else pre.regression_dtypes)
    out += [Case(loss, int(n), dt, mode, th, isa)
            for dt in reg_dtypes for n in sizes for loss in reg for mode in reg_modes for th in threads
            for isa in isas]
    for loss in (n for n in names if BENCH_LOSSES[n].family == "classification"):
        ce_modes = pre.modes if modes is None else [m for m in modes if m in BENCH_LOSSES[loss].modes]
        out += [Case(loss, s[0] * s[1], d, mode, th, isa, s)
                for s in shapes for d in (given or pre.dtypes) for mode in ce_modes for th in threads
                for isa in isas]
    for loss in (n for n in names if BENCH_LOSSES[n].family == "elementwise"):
        own = sizes if sizes_given else BENCH_LOSSES[loss].presets[preset]
        out += [Case(loss, int(n), dt, mode, th, isa)
                for dt in reg_dtypes for n in own for mode in reg_modes for th in threads for isa in isas]
    for loss in (n for n in names if BENCH_LOSSES[n].family == "rows"):
        own = shapes if shapes_given else BENCH_LOSSES[loss].presets[preset]
        out += [Case(loss, s[0] * s[1], d, mode, th, isa, s)
                for s in own for d in (given or (DEFAULT_DTYPE,)) for mode in reg_modes for th in threads
                for isa in isas]
    if not out:
        raise ValueError(f"no cases: none of the modes {', '.join(modes or ())} applies to the losses "
                         f"{', '.join(names)}")
    return out


def numpy_timed(case: Case, numpy_max: dict | None = None) -> bool:
    """Whether the NumPy reference is timed in `case`'s group: cross-entropy up to
    ``numpy_max[dtype]`` elements (None: always), regression up to
    ``REGRESSION_NUMPY_MAX[dtype]``."""
    if case.family in SIZE_FAMILIES:
        numpy_max = REGRESSION_NUMPY_MAX
    if numpy_max is None:
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
    f = BENCH_LOSSES[case.loss].torch_loss or _torch_loss(case.loss)
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


def rss_peak_available() -> bool:
    return status_bytes("VmHWM") is not None and reset_peak_rss()


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
        if not reset_peak_rss():
            return None
        rss0 = status_bytes("VmRSS")
        r = fn()
        hwm = status_bytes("VmHWM")
        del r
        if rss0 is None or hwm is None:
            return None
        return max(0, hwm - rss0)
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
    so 3 calls each would take the default run far past its budget.
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


def policy_for(n: int, dtype=DEFAULT_DTYPE, quick: bool = False, repeat: int | None = None,
               smoke: bool = False) -> Policy:
    """The timing policy of arrays of `n` elements (fewer calls for large sizes).

    ``repeat`` forces exactly that minimum number of calls for every provider; ``smoke``
    (the CLI tests) makes 2 calls each and no more.
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
    if smoke:
        calls, min_time, slow_calls, slow_time = 2, 0.0, 2, 0.0
    if repeat is not None:
        calls = slow_calls = repeat
    # Large arrays get fresh pages on every call (glibc's mmap threshold is 32 MiB at most), cache
    # and allocator hold no state across calls: a warm-up on a prefix is enough, and spares the
    # float64 reference of the whole array (see ACCURACY_FULL_MAX).
    prefix = WARMUP_PREFIX if n > ACCURACY_FULL_MAX else None
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
    memory: str | None = None  # measure the peak extra memory of the first timed call by this method
    peak: int | None = None   # ... the bytes measured

    @property
    def key(self) -> str:
        variant = {"with_grad_out": "out", "with_grad_inplace": "inplace"}.get(self.mode)
        parts = [self.name] + ([variant] if variant else []) + ([self.isa] if self.isa else []) \
            + ([f"{self.threads}t"] if self.threads else [])
        return "-".join(parts)


def time_call(fn, setup=None, clock=time.perf_counter, peak: list | None = None, memory: str = "rss") -> float:
    """Seconds of one call of `fn`; `setup` and `fn.prepare` run before the timed region and the
    result is released after it.  `peak` (a list): append the call's peak extra memory in bytes,
    the result included, by `memory` (:func:`peak_extra_memory`'s methods): ``"rss"`` resets and
    reads the peak RSS outside the timed region (the kernel tracks the peak anyway, so the call
    is not slowed); ``"tracemalloc"`` traces the call's allocations (a few, of large arrays:
    microseconds against the milliseconds of a call of an array of 32 MiB or more)."""
    if setup is not None:
        setup()
    prepare = getattr(fn, "prepare", None)
    if prepare is not None:
        prepare()
    rss0 = base = None
    if peak is not None:
        if memory == "tracemalloc":
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
        elif reset_peak_rss():
            rss0 = status_bytes("VmRSS")
    t0 = clock()
    r = fn()
    t1 = clock()
    if base is not None:
        peak.append(max(0, tracemalloc.get_traced_memory()[1] - base))
        tracemalloc.stop()
    elif rss0 is not None:
        hwm = status_bytes("VmHWM")
        peak.append(None if hwm is None else max(0, hwm - rss0))
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


def exact_result(case: Case, x, t) -> tuple:
    """(loss, gradient or None) of ``fastloss.reference`` in float64: what :func:`relative_error`
    compares with (the gradient for the with-grad modes)."""
    spec = BENCH_LOSSES[case.loss]
    loss = float(spec.reference(x, t))
    return loss, (spec.reference_grad(x, t) if case.group_mode != "forward" else None)


def relative_error(result, exact) -> float:
    """Max relative error of a provider's result against :func:`exact_result`: forward,
    |loss - exact| / |exact|; with-grad, the larger of that and max |grad - exact| / max |exact|
    (normwise: elementwise relative errors of gradients near zero mean nothing).  NaN if any
    is NaN."""
    loss, grad = _loss_grad(result)
    e_loss, e_grad = exact
    with np.errstate(all="ignore"):
        errs = [abs(loss - e_loss) / abs(e_loss) if e_loss != 0 else abs(loss)]
        if e_grad is not None and grad is not None:
            scale = float(np.max(np.abs(e_grad), initial=0.0))
            diff = float(np.max(np.abs(np.subtract(grad, e_grad, dtype=np.float64)), initial=0.0))
            errs.append(diff / scale if scale > 0 else diff)
    return float("nan") if any(math.isnan(e) for e in errs) else float(max(errs))


def warm_up(providers: list[Provider], x, t, policy: Policy, case: Case | None = None):
    """One untimed call of each provider (on a prefix for large sizes: ``policy.warmup_prefix``).

    Returns (agreement of each non-NumPy provider with NumPy, {provider key: error against the
    float64 reference on that same input} -- empty without `case` --, elements of that input).
    """
    if policy.warmup_prefix is not None:
        x, t = _prefix(x, t, policy.warmup_prefix)
    exact = exact_result(case, x, t) if case is not None else None
    results, errors = {}, {}
    for p in providers:
        if p.setup is not None:
            p.setup()
        r = call_once(p.make(x, t))
        results[p.key] = summary(r)
        if exact is not None:
            errors[p.key] = relative_error(r, exact)
        r = None
    ok = {}
    rtol = agreement_rtol(x.dtype)
    ref = next((results[p.key] for p in providers if p.name == "numpy"), None)
    if ref is not None:
        for p in providers:
            if p.name != "numpy":
                ok[p.key] = agree(ref, results[p.key], rtol)
    return ok, errors, int(x.size)


def memory_providers(providers: list[Provider]) -> dict[tuple, Provider]:
    """The provider whose peak extra memory stands for each (name, mode): the timed one with
    the most threads.  Keys ("fastloss", mode), ("numpy", None), ("torch", None)."""
    chosen = {}
    for p in providers:
        if p.timed:
            chosen[(p.name, p.mode)] = p  # the last one: the most threads
    return chosen


def run_rounds(providers: list[Provider], x, t, policy: Policy, tick: Callable[[], None] | None = None) -> int:
    """Interleaved timed rounds; samples are appended to each timed provider (and the peak
    memory of the first call of those with ``memory`` set); `tick` runs after each round.
    Returns the rounds."""
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
                peak = [] if p.memory and not p.samples else None
                p.samples.append(time_call(fns[i], p.setup, peak=peak, memory=p.memory))
                if peak:
                    p.peak = peak[0]
            rounds += 1
            if tick is not None:
                tick()
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

def measure_read_bandwidth(threads, nbytes=READ_BW_BYTES, rounds=READ_BW_ROUNDS,
                           into: dict | None = None) -> dict[int, list[float]]:
    """Seconds per full read of an `nbytes` float32 array by ``_core.read_sum_f32``,
    per thread count (one warm-up round, then `rounds` interleaved rounds), appended to
    `into` (so that an interrupted measurement keeps its samples)."""
    a = np.ones(nbytes // 4, dtype=np.float32)  # written, so its pages are mapped
    samples = {th: [] for th in threads} if into is None else into
    for r in range(rounds + 1):
        for th in threads:
            dt = time_call(lambda: _core.read_sum_f32(a, th))
            if r:
                samples.setdefault(th, []).append(dt)
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
    preset: str = "default"        # the cross-entropy set (CE_PRESETS): default, quick, full, smoke
    shapes: tuple | None = None    # cross-entropy (rows, classes); None: the preset's
    dtypes: tuple | None = None    # both families; None: float32 (regression) and the preset's (cross-entropy)
    modes: tuple | None = None     # None: the regression MODES and the preset's cross-entropy modes
    markdown_path: str | None = None
    plot_path: str | None = None
    compare: tuple | None = None   # (path, the report read from it): --compare
    smoke: bool = False            # tiny cases, 2 calls each, a small read-bandwidth probe (the tests)
    sizes_given: bool = False      # --sizes given: it also replaces the elementwise losses' own sizes
    training: str | None = None    # the PyTorch training step (TRAINING_PRESETS key), or None: not timed
    linear: str | None = None      # the fused linear + cross-entropy (LINEAR_PRESETS key), or None: not timed
    linear_threads: tuple | None = None  # its thread counts (--threads); None: the preset's

    def cases(self) -> list[Case]:
        if self.losses == []:      # only the training step was asked for
            return []
        return cases(self.losses, self.sizes, self.threads, self.modes, None, self.isas, self.shapes,
                     self.dtypes, self.preset, self.sizes_given)


@dataclasses.dataclass(frozen=True)
class TrainingPreset:
    """The PyTorch training step of one kind of run (``fastloss._bench_torch``): logits (a leaf that
    requires grad) -> ``fastloss.torch.cross_entropy`` or ``F.cross_entropy`` -> backward, timed
    interleaved at each thread count; ``memory``: (shape, dtype) pairs whose peak extra memory is
    measured per provider in a fresh process."""
    shapes: tuple
    dtypes: tuple
    repeats: int
    memory: tuple = ()


#: ``--loss training_step`` (or ``--full``) runs "full": the targets of issue 7 (float32 and bfloat16
#: at 8192x32000, peak memory at 8192x128256: torch needs ~16 GiB there).
TRAINING_PRESETS = {
    "default": TrainingPreset(((8192, 32000),), ("float32",), 3),
    "quick": TrainingPreset(((2048, 32000),), ("float32",), 3),
    "full": TrainingPreset(((8192, 32000),), ("float32", "bfloat16"), 5,
                           (((8192, 128256), "float32"), ((8192, 128256), "bfloat16"))),
    "smoke": TrainingPreset(((16, 1000),), ("float32",), 1, (((16, 1000), "float32"),)),
}
TRAINING_NAMES = ("training_step", "training")


def run_training(opts: Options, status: Callable[[str], None] | None = None) -> dict:
    """The training-step section of the report: ``{"speed": [...], "memory": [...]}``."""
    from fastloss import _bench_torch

    pre = TRAINING_PRESETS[opts.training]
    shapes = opts.shapes or pre.shapes
    dtypes = tuple(d for d in (opts.dtypes or pre.dtypes) if d in ("float32", "float64", "float16", "bfloat16"))
    repeats = opts.repeat or pre.repeats
    if status:
        status("timing the PyTorch training step")
    speed = _bench_torch.training_step_cases(shapes, dtypes, opts.threads, repeats)
    memory = []
    for shape, dtype in pre.memory:
        for provider in _bench_torch.PROVIDERS:
            if status:
                status(f"peak memory of the training step: {format_shape(shape)} {dtype} {provider}")
            memory.append({"shape": format_shape(shape), "dtype": dtype, "provider": provider,
                           "peak_bytes": _bench_torch.peak_memory(shape, dtype, provider, max(opts.threads))})
    return {"speed": speed, "memory": memory}


@dataclasses.dataclass(frozen=True)
class LinearPreset:
    """The fused linear + cross-entropy of one kind of run (``fastloss._bench_linear``): each
    (N, H, V) case at each thread count, every provider, each run one call (the loss and the
    gradients of input and weight, float32) in a fresh process; ``repeats`` None: 3 runs per
    provider below 2e12 flops, 1 above (``_bench_linear.default_repeats``)."""
    cases: tuple
    threads: tuple
    repeats: int | None = None


#: ``--loss linear_cross_entropy`` (or ``--full``) runs "full": the two cases of issue 8 (about 15
#: minutes on 2 cores); not part of the default run.
LINEAR_PRESETS = {
    "full": LinearPreset(((4096, 1024, 32000), (8192, 2048, 128256)), (1, 2)),
    "quick": LinearPreset(((1024, 512, 8000),), (1, 2), 3),
    "smoke": LinearPreset(((64, 32, 500),), (1,), 1),
}
LINEAR_NAMES = ("linear_cross_entropy", "linear")
#: Issue 8's targets, per case and thread count, for each fastloss provider: at least this many
#: times faster than torch's chunked path at no more peak extra memory; no slower than torch's
#: reference path at most this fraction of its peak extra memory; the big case within this budget.
LINEAR_TARGET_CHUNKED_SPEEDUP = 1.3
LINEAR_TARGET_PLAIN_MEMORY = 0.25
LINEAR_TARGET_BUDGET_CASE = (8192, 2048, 128256)
LINEAR_TARGET_BUDGET_GIB = 2.0
#: Providers whose losses differ from the others' by more than this (relative) are flagged.
LINEAR_LOSS_RTOL = 1e-4


def linear_plan(opts: Options) -> dict | None:
    """What the linear + cross-entropy section of `opts` runs (None: not asked for)."""
    if not opts.linear:
        return None
    from fastloss import _bench_linear
    pre = LINEAR_PRESETS[opts.linear]
    use_torch = opts.torch and torch_available()
    return {"preset": opts.linear, "cases": [list(c) for c in pre.cases],
            "threads": list(opts.linear_threads or pre.threads),
            "repeats": [opts.repeat or pre.repeats or _bench_linear.default_repeats(*c) for c in pre.cases],
            "providers": list(_bench_linear.PROVIDERS if use_torch else ("fastloss",)),
            "torch": use_torch,
            "torch_missing_reason": None if use_torch else ("--no-torch" if not opts.torch else
                                                            "PyTorch is not installed")}


def run_linear(opts: Options, section: dict, progress: "Progress | None" = None) -> dict:
    """The linear + cross-entropy section of the report, filled into `section` as the runs finish
    (so that Ctrl-C keeps them): the plan (:func:`linear_plan`), ``records`` (one per fresh-process
    run, ``fastloss._bench_linear.worker``'s), ``skipped`` (messages: torch's reference path left
    out for lack of memory); :func:`finish_linear` adds the summary and the targets."""
    from fastloss import _bench_linear

    section.update(linear_plan(opts))
    section.setdefault("records", [])
    section.setdefault("skipped", [])
    for (N, H, V), repeats in zip(section["cases"], section["repeats"]):
        for th in section["threads"]:
            what = f"linear_cross_entropy {N}x{H}x{V}, {th} thread{'s' if th != 1 else ''}"

            def log(text, what=what):
                if text.startswith("#"):
                    section["skipped"].append(text.lstrip("# "))
                    return
                rec = json.loads(text)
                line = (f"{what}, {rec['provider']}: " + (f"error: {rec['error']}" if "error" in rec else
                                                          f"{rec['seconds']:.3g} s, "
                                                          f"{rec['peak_extra_bytes'] / 2 ** 30:.3f} GiB"))
                if progress is not None:
                    progress.line(line)
            if progress is not None:
                progress.status(f"{what}: {repeats} run{'s' if repeats != 1 else ''} per provider, fresh processes")
            _bench_linear.run_case(N, H, V, th, repeats, tuple(section["providers"]), None, log=log,
                                   records=section["records"])
    return section


def _target(speedup, ours, theirs, min_speedup: float, max_memory: float) -> dict:
    """One target: time(theirs) / time(ours) >= min_speedup and peak(ours) <= max_memory * peak(theirs)."""
    if theirs is None:
        return {"holds": None, "speedup": None, "memory_ratio": None}
    a, b = ours["peak_extra_gib"], theirs["peak_extra_gib"]
    return {"holds": bool(speedup >= min_speedup and a <= max_memory * b), "speedup": speedup,
            "memory_ratio": a / b if b else None}


def finish_linear(section: dict) -> dict:
    """Add ``summary`` (``_bench_linear.summarize``), ``targets`` (issue 8's, per case, thread count
    and fastloss provider), ``loss_agreement`` (per case and thread count: the largest relative
    difference between the providers' losses) and ``errors`` to the section."""
    from fastloss import _bench_linear

    rows = _bench_linear.summarize(section.get("records", []))
    section["summary"] = rows
    section["errors"] = [f"{r['N']}x{r['H']}x{r['V']} {r['threads']} thread(s) {r['provider']}: {r['error']}"
                         for r in section.get("records", []) if "error" in r]
    by: dict = {}
    for r in rows:
        by.setdefault((r["N"], r["H"], r["V"], r["threads"]), {})[r["provider"]] = r
    targets, agreement = [], []
    for (N, H, V, th), provs in by.items():
        losses = [p["loss"] for p in provs.values()]
        ref = provs.get("fastloss", next(iter(provs.values())))["loss"]
        diff = max(abs(v - ref) for v in losses) / abs(ref) if ref else max(abs(v) for v in losses)
        agreement.append({"N": N, "H": H, "V": V, "threads": th, "providers": list(provs),
                          "max_rel_diff": diff, "agree": diff <= LINEAR_LOSS_RTOL})
        for base in _bench_linear.BASES:
            f = provs.get(base)
            if f is None:
                continue
            t = {"N": N, "H": H, "V": V, "threads": th, "provider": base}
            tc, tp = provs.get("torch_chunked"), provs.get("torch")
            t["vs_torch_chunked"] = _target(tc and tc["ratios"][base]["time"], f, tc,
                                            LINEAR_TARGET_CHUNKED_SPEEDUP, 1.0)
            t["vs_torch"] = _target(tp and tp["ratios"][base]["time"], f, tp, 1.0, LINEAR_TARGET_PLAIN_MEMORY)
            if (N, H, V) == LINEAR_TARGET_BUDGET_CASE:
                t["budget"] = {"holds": f["peak_extra_gib"] <= LINEAR_TARGET_BUDGET_GIB,
                               "peak_extra_gib": f["peak_extra_gib"], "budget_gib": LINEAR_TARGET_BUDGET_GIB}
            else:
                t["budget"] = None
            targets.append(t)
    section["targets"] = targets
    section["loss_agreement"] = agreement
    return section


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _clock_text(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Progress of the run on `stream` (stderr).

    On a terminal: one line, rewritten in place -- the group of cases being timed, cases
    done / total, the time elapsed and an estimate of the time left (each group's rough cost,
    :func:`group_weight`, scaled by the rate observed so far).  Otherwise (CI, a pipe, a
    file): one plain line per finished case and no control characters.
    """

    def __init__(self, total_cases: int, total_weight: float, stream=None, clock=time.perf_counter):
        self.stream = stream or sys.stderr
        self.tty = _isatty(self.stream)
        self.clock = clock
        self.total_cases, self.total_weight = total_cases, total_weight
        self.done_cases, self.done_weight = 0, 0.0
        self.t0 = clock()
        self.first_t0 = None  # the start of the first group (the rate leaves out the bandwidth probe)
        self.title, self.weight, self.group_t0, self.last_draw = "", 0.0, self.t0, -1.0

    def eta(self) -> float | None:
        """Seconds left: the remaining weight at the rate of the finished groups, less the
        time already spent in the current one; None before any group finished."""
        if self.done_weight <= 0:
            return None
        now = self.clock()
        rate = (self.group_t0 - self.first_t0) / self.done_weight
        return max(0.0, rate * (self.total_weight - self.done_weight) - (now - self.group_t0))

    def _draw(self):
        now = self.clock()
        eta = self.eta()
        text = (f"[{self.done_cases}/{self.total_cases} cases] {self.title}  {_clock_text(now - self.t0)} elapsed"
                + (f", ~{_clock_text(eta)} left" if eta is not None else ""))
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r\x1b[K" + text[:max(10, width)])
        self.stream.flush()
        self.last_draw = now

    def begin(self, title: str, weight: float):
        self.title, self.weight, self.group_t0 = title, weight, self.clock()
        if self.first_t0 is None:
            self.first_t0 = self.group_t0
        if self.tty:
            self._draw()

    def status(self, text: str):
        """A step that is not a case (terminal only), e.g. the read-bandwidth probe."""
        self.title = text
        if self.tty:
            self._draw()

    def line(self, text: str):
        """A finished step that is not a case: the status line on a terminal, a plain line otherwise."""
        if self.tty:
            self.status(text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def tick(self):
        if self.tty and self.clock() - self.last_draw >= 0.25:
            self._draw()

    def case_done(self, text: str):
        self.done_cases += 1
        if not self.tty:
            self.stream.write(f"[{self.done_cases}/{self.total_cases}] {text}\n")
            self.stream.flush()

    def group_done(self):
        self.done_weight += self.weight
        self.group_t0 = self.clock()
        if self.tty:
            self._draw()

    def close(self):
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def group_weight(gcases: list[Case], numpy_is_timed: bool, with_torch: bool) -> float:
    """A rough cost of a group in seconds (for the ETA, which rescales it by the observed rate):
    a fixed part (warm-up, the policy's minimum time) plus the bytes of one call of each
    provider times the few calls each makes."""
    c = gcases[0]
    nbytes = c.n * np.dtype(c.dtype).itemsize
    calls = len(gcases) + numpy_is_timed + (len({g.threads for g in gcases}) if with_torch else 0)
    return 0.25 + calls * nbytes / 4e8 * (1 if c.group_mode == "forward" else 2)


def _group_title(c: Case) -> str:
    return f"{c.size_label} {c.dtype} {c.loss} {MODE_LABELS[c.group_mode]}"


def _case_line(r: dict, multi_isa: bool) -> str:
    """The progress line of a finished case (non-terminal output)."""
    times = [f"fastloss {format_ms(r['fastloss']['median_s'])} ms"]
    for who, name in (("numpy", "NumPy"), ("torch", "torch")):
        if r[who]:
            times.append(f"{name} {format_ms(r[who]['median_s'])} ms")
    return (f"{record_label(r)} {r['dtype']} {r['loss']} {MODE_LABELS[r['mode']]}, {r['threads']} thread"
            f"{'s' if r['threads'] != 1 else ''}{' ' + r['isa'] if multi_isa else ''}: " + ", ".join(times))


def _report_options(opts: Options, all_cases: list[Case], isas: list, use_torch: bool) -> dict:
    reg = [c for c in all_cases if c.family == "regression"]
    ce = [c for c in all_cases if c.family == "classification"]
    field = [c for c in all_cases if c.family in ("elementwise", "rows")]
    return {"sizes": list(dict.fromkeys(c.n for c in reg)),
            "regression_dtypes": list(dict.fromkeys(c.dtype for c in reg)),
            "threads": list(opts.threads), "isas": isas,
            "quick": opts.quick, "smoke": opts.smoke, "repeat": opts.repeat, "torch": use_torch,
            "losses": list(dict.fromkeys(c.loss for c in all_cases)),
            "preset": opts.preset,
            "shapes": [list(s) for s in dict.fromkeys(c.shape for c in ce)],
            "dtypes": list(dict.fromkeys(c.dtype for c in ce)),
            "modes": list(dict.fromkeys(c.mode for c in all_cases)),
            "ce_modes": list(dict.fromkeys(c.mode for c in ce)),
            "other_losses": list(dict.fromkeys(c.loss for c in field)),
            "numpy_max_elements": CE_PRESETS[opts.preset].numpy_max,
            "regression_numpy_max_elements": REGRESSION_NUMPY_MAX,
            "total_cases": len(all_cases),
            "training": opts.training if use_torch else None,
            "training_only": opts.losses == [],
            "linear": linear_plan(opts)}


def run(opts: Options, out=None, err=None) -> dict:
    """Time every case of `opts`; print the header and then the report to `out`, progress to
    `err` (stderr); write the files `opts` asks for (--json, --markdown, --plot); return the
    report (what --json writes).

    Ctrl-C (KeyboardInterrupt) ends the timing early: the report then holds the cases that
    finished, ``report["interrupted"]`` is True, and it is printed and written all the same.
    """
    from fastloss import _bench_report

    out = out or sys.stdout
    err = err or sys.stderr
    wall0 = time.perf_counter()
    isas = opts.isas or [_core.get_isa()]
    all_cases = [] if opts.losses == [] else cases(opts.losses, opts.sizes, opts.threads, opts.modes, None, isas,
                                                   opts.shapes, opts.dtypes, opts.preset, opts.sizes_given)
    numpy_max = CE_PRESETS[opts.preset].numpy_max
    use_torch = opts.torch and torch_available()
    env = environment(opts.threads, isas)
    rss_ok = rss_peak_available()
    env["memory_methods"] = {"fastloss": "tracemalloc", "numpy": "tracemalloc",
                             "torch": "peak RSS growth (VmHWM reset via /proc/self/clear_refs)" if rss_ok else None}
    report = {"schema": "fastloss-bench/3", "environment": env,
              "options": _report_options(opts, all_cases, isas, use_torch)}
    print(_bench_report.format_header(report), file=out, flush=True)

    selected_isa = _core.get_isa()
    torch_threads = None
    if use_torch:
        import torch
        torch_threads = torch.get_num_threads()
    groups: dict[tuple, list[Case]] = {}
    for c in all_cases:
        groups.setdefault(c.group, []).append(c)
    multi_isa = len(isas) > 1
    timed_numpy = {g: numpy_timed(gc[0], numpy_max) for g, gc in groups.items()}
    weights = {g: group_weight(gc, timed_numpy[g], use_torch) for g, gc in groups.items()}

    # torch's memory for inputs under 32 MiB is measured by a helper process (see
    # TorchMemoryHelper).  It runs while the largest inputs are made (untimed, one core) and is
    # waited for before their group is timed; its values are filled in at the end.
    torch_small = [dataclasses.replace(g[0], threads=max(c.threads for c in g)) for g in groups.values()
                   if g[0].n * np.dtype(g[0].dtype).itemsize < RSS_IN_PROCESS_MIN_BYTES]
    if not (use_torch and rss_ok):
        torch_small = []
    helper_group = max(groups, key=lambda g: groups[g][0].n * np.dtype(groups[g][0].dtype).itemsize, default=None)
    helper, torch_sub, pending = None, {}, []

    records, bw = [], {}
    bw_bytes = SMOKE_READ_BW_BYTES if opts.smoke else READ_BW_BYTES
    bw_rounds = 1 if opts.smoke else QUICK_READ_BW_ROUNDS if opts.quick else READ_BW_ROUNDS
    progress = Progress(len(all_cases), sum(weights.values()), err)
    inputs = InputCache()
    interrupted = False
    try:
        progress.status("measuring the read bandwidth")
        measure_read_bandwidth(opts.threads, bw_bytes, bw_rounds, into=bw)
        for gkey, gcases in groups.items():
            first = gcases[0]
            progress.begin(_group_title(first), weights[gkey])
            g0 = time.perf_counter()  # the group's wall time, making its inputs included
            if torch_small and gkey == helper_group:
                helper = TorchMemoryHelper(torch_small)
            x, t = inputs.get(first)
            if helper is not None:
                torch_sub = helper.result()
                helper = None
            policy = policy_for(first.n, first.dtype, opts.quick, opts.repeat, opts.smoke)
            provs = group_providers(gcases, with_numpy=True, with_torch=use_torch,
                                    numpy_is_timed=timed_numpy[gkey])
            ok, errors, err_elements = warm_up(provs, x, t, policy, first)
            # Peak extra memory of each provider (and mode) at its largest thread count: arrays of
            # 32 MiB or more during the first timed call (tracemalloc; torch: peak RSS), smaller
            # ones in one more, untimed call (torch: in the helper process).
            mem, how = {}, {}
            big = x.nbytes >= RSS_IN_PROCESS_MIN_BYTES
            for key, p in memory_providers(provs).items():
                if big:
                    if p.name != "torch" or rss_ok:
                        p.memory = MEMORY_METHODS[p.name]
                        how[key] = "first timed call"
                elif p.name != "torch":
                    if p.setup is not None:
                        p.setup()
                    mem[key] = peak_extra_memory(p.make(x, t), MEMORY_METHODS[p.name])
                    how[key] = "one untimed call"
                elif torch_small:
                    how[key] = "helper process"
            run_rounds(provs, x, t, policy, progress.tick)
            for key, p in memory_providers(provs).items():
                if p.memory:
                    mem[key] = p.peak
            recs = _records(gcases, provs, ok, errors, err_elements, mem, how)
            records += recs  # before the progress lines: a Ctrl-C after a case's line keeps that case
            for r in recs:
                r["group_wall_s"] = time.perf_counter() - g0
                if how.get(("torch", None)) == "helper process":
                    pending.append((r, torch_memory_key(dataclasses.replace(first, threads=r["memory_threads"]))))
            for r in recs:
                progress.case_done(_case_line(r, multi_isa))
            progress.group_done()
            provs = x = t = None  # the providers hold the group's scratch buffer
        inputs.clear()
        if opts.training and use_torch:
            report["training_step"] = run_training(opts, progress.status)
        if opts.linear:
            report["linear_cross_entropy"] = linear_plan(opts)
            run_linear(opts, report["linear_cross_entropy"], progress)
        progress.status("measuring the read bandwidth again")
        measure_read_bandwidth(opts.threads, bw_bytes, bw_rounds, into=bw)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if helper is not None:
            helper.close()
        if tracemalloc.is_tracing():  # interrupted inside a measured call
            tracemalloc.stop()
        inputs.clear()
        progress.close()
        _core.set_isa(selected_isa)
        if torch_threads is not None:
            import torch
            torch.set_num_threads(torch_threads)
    for r, key in pending:
        r["peak_extra_bytes"]["torch"] = torch_sub.get(key)
    if "linear_cross_entropy" in report:
        finish_linear(report["linear_cross_entropy"])

    # The yardstick is the best read (as STREAM reports): contention only ever slows a read.
    read_gbps = {th: bw_bytes / min(s) / 1e9 for th, s in bw.items() if s}
    for r in records:
        r["read_bw_gbps"] = read_gbps.get(r["threads"])
        r["pct_read_bw"] = 100.0 * r["gbps"] / read_gbps[r["threads"]] if r["threads"] in read_gbps else None
    report.update({
        "read_bandwidth": {str(th): {"gbps": read_gbps[th], "bytes": bw_bytes, **stats(bw[th])}
                           for th in opts.threads if th in read_gbps},
        "cases": records,
        "interrupted": interrupted,
        "wall_time_s": time.perf_counter() - wall0,
        "load_average_end": _loadavg(),
    })
    if opts.compare is not None:
        report["comparison"] = _bench_report.compare(report, opts.compare[1], opts.compare[0])
    print(_bench_report.format_text(report), file=out, flush=True)
    for r in records:
        if r["agrees_with_numpy"] is False or r.get("torch_agrees") is False:
            print(f"WARNING: results disagree with NumPy: {r['loss']} {record_label(r)} {r['dtype']} {r['mode']} "
                  f"{r['threads']}t {r['isa']}", file=err)
    if opts.json_path:
        with open(opts.json_path, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    if opts.markdown_path:
        with open(opts.markdown_path, "w") as f:
            f.write(_bench_report.format_markdown(report))
    if opts.plot_path:
        if records:
            _bench_report.write_plot(report, opts.plot_path)
        else:
            print(f"fastloss bench: no finished case, no plot written to {opts.plot_path}", file=err)
    return report


def _records(gcases: list[Case], provs: list[Provider], ok: dict, errors: dict, err_elements: int,
             mem: dict, how: dict) -> list[dict]:
    numpy_p = next(p for p in provs if p.name == "numpy")
    np_stats = stats(numpy_p.samples) if numpy_p.timed and numpy_p.samples else None
    mem_threads = max(p.threads for p in provs if p.name == "fastloss")
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
            "error_vs_float64": {"fastloss": errors.get(fl.key), "numpy": errors.get(numpy_p.key),
                                 "torch": errors.get(tp.key) if tp else None},
            "error_elements": err_elements,
            "input_bytes": c.n * np.dtype(c.dtype).itemsize,
            "peak_extra_bytes": {"fastloss": mem.get(("fastloss", c.mode)), "numpy": mem.get(("numpy", None)),
                                 "torch": mem.get(("torch", None))},
            "memory_threads": mem_threads,
            "memory_method": {"fastloss": f"tracemalloc, {how.get(('fastloss', c.mode), 'not measured')}",
                              "numpy": (f"tracemalloc, {how[('numpy', None)]}" if ("numpy", None) in how
                                        else "not measured (not timed)"),
                              "torch": (f"peak RSS growth, {how[('torch', None)]}" if ("torch", None) in how
                                        else "not measured") if tp else None},
        }
        if c.shape is not None:
            rec["shape"] = list(c.shape)
        recs.append(rec)
    return recs

# ---- formatting helpers ----------------------------------------------------------------------------

def format_size(n: int) -> str:
    if n >= 1000:
        e = len(str(n)) - 1
        m, r = divmod(n, 10**e)
        if r == 0:
            return f"{m}e{e}"
    return str(n)


def format_shape(shape) -> str:
    return "x".join(str(int(v)) for v in shape)


def record_label(r: dict) -> str:
    """The size of a record of the report: its shape (cross-entropy) or element count."""
    return format_shape(r["shape"]) if r.get("shape") else format_size(r["n"])


def parse_size(text: str) -> int:
    """'1e7', '10000000' or '1_000_000' -> int (ValueError if not a positive integer)."""
    s = text.strip().replace("_", "")
    try:
        v = float(s) if any(ch in s for ch in "eE.") else int(s)
    except ValueError:
        v = None
    if v is None or not math.isfinite(v) or v != int(v) or v < 1:
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
