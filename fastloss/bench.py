"""The benchmark behind ``python -m fastloss bench`` and ``benchmarks/`` (pytest-benchmark).

Design
------
* **One source of cases.**  :func:`cases` lists the cases (loss, size, dtype, mode,
  threads, ISA) from the registry (``fastloss._registry.REGISTRY``); the CLI and
  ``benchmarks/`` both call it, and both build their callables with
  :func:`fastloss_fn`, :func:`numpy_fn` and :func:`torch_fn`.
* **Competitors.**  NumPy: ``fastloss.reference.<loss>(x, t, dtype=None)``, i.e. the
  loss computed in the input dtype as a user writes it by hand (with-grad: the forward
  plus ``reference.<loss>_grad``).  NumPy's elementwise code is single-threaded, so it
  is timed once per (loss, size, dtype, mode) and shown on every thread row.  PyTorch
  CPU (when importable): ``torch.nn.functional.<loss>`` (rmse: ``sqrt(mse_loss)``);
  with-grad is the forward plus ``torch.autograd.grad`` with respect to the input (a
  backward into a fresh gradient, like ours); ``torch.set_num_threads`` follows the
  case.  Tensors come from ``torch.from_numpy``, outside the timed region.
* **Timing.**  The providers of one group (fastloss per thread count and ISA, NumPy,
  torch per thread count) run in interleaved rounds (fastloss, NumPy, torch,
  fastloss, ...) so that the noise of this shared machine hits all of them alike.
  One warm-up call each first (on a 2**20-element prefix for arrays above 32 MiB,
  which get fresh pages on every call anyway), then rounds until a minimum count and
  a minimum time are reached; fewer calls for large sizes, and slow competitors stop
  after 2 calls and 0.5 s (:class:`Policy`), which keeps the default run near a minute.
  Each sample is one call; results are released outside the timed region.
  Reported: the median (quartiles in JSON).  Only medians and ratios measured in
  the same run mean anything here; absolute times drift 20-30 % between runs.
* **Bandwidth.**  The plain read kernel ``fastloss._core.read_sum_f32`` on a 1 GiB
  float32 array, per thread count, before and after the cases (best of the pooled
  samples, as STREAM reports: contention only ever slows a read), is the yardstick
  for each fastloss case's GB/s (:meth:`Case.nbytes`).
* **Is it right?**  The warm-up results of fastloss and torch are compared with
  NumPy's (loss, and a strided sample of the gradient) and a mismatch is flagged,
  since a fast wrong answer is not a result; at one size (1e6 by default) the error
  of each provider against the float64 reference is printed (:func:`accuracy`).
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import fastloss
from fastloss import _core
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


def regression_losses() -> list[str]:
    return [name for name, spec in REGISTRY.items() if spec.family == "regression"]


def isa_order() -> list[str]:
    """The ISAs this CPU runs, best first."""
    return list(reversed(_core.isa_supported()))


# ---- cases ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One fastloss measurement: ``loss`` on ``n`` elements of ``dtype``."""

    loss: str
    n: int
    dtype: str
    mode: str          # "forward" or "with_grad"
    threads: int
    isa: str

    @property
    def group(self) -> tuple:
        """Cases that share inputs and competitors (they are timed together)."""
        return (self.loss, self.n, self.dtype, self.mode)

    def nbytes(self) -> int:
        """Minimum memory traffic: input and target read once, plus the gradient
        written once for with-grad."""
        arrays = REGISTRY[self.loss].arrays_read + (self.mode == "with_grad")
        return arrays * self.n * np.dtype(self.dtype).itemsize


def cases(losses=None, sizes=DEFAULT_SIZES, threads=DEFAULT_THREADS, modes=MODES, dtype=DEFAULT_DTYPE,
          isas=None) -> list[Case]:
    """The benchmark cases, in run order: size, loss, mode, threads, ISA.

    ``losses``: names from the registry (default: every regression loss);
    ``isas``: ISA names (default: the one fastloss selected at import).
    """
    known = regression_losses()
    losses = known if losses is None else list(dict.fromkeys(losses))
    for name in losses:
        if name not in known:
            raise ValueError(f"unknown loss {name!r} (known: {', '.join(known)})")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r} (known: {', '.join(MODES)})")
    isas = [_core.get_isa()] if isas is None else list(isas)
    return [Case(loss, int(n), np.dtype(dtype).name, mode, int(th), isa)
            for n in sizes for loss in losses for mode in modes for th in threads for isa in isas]


def make_inputs(loss: str, n: int, dtype: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """input and target for `loss`, from the registry's generator."""
    d = REGISTRY[loss].make_inputs(np.random.default_rng(seed), (n,), np.dtype(dtype))
    return d["input"], d["target"]


# ---- the three providers of a case ----------------------------------------------------------------

def fastloss_fn(case: Case, x, t) -> Callable[[], object]:
    """fastloss call of `case` (the ISA is selected by the caller: :func:`fastloss_setup`)."""
    spec = REGISTRY[case.loss]
    f = spec.func if case.mode == "forward" else spec.with_grad
    th = case.threads
    return lambda: f(x, t, num_threads=th)


def fastloss_setup(case: Case) -> Callable[[], None]:
    isa = case.isa
    return lambda: _core.set_isa(isa)


def numpy_fn(case: Case, x, t) -> Callable[[], object]:
    """The NumPy baseline in the input dtype (``dtype=None``)."""
    spec = REGISTRY[case.loss]
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
    """The PyTorch CPU call of `case` (tensors share memory with `x` and `t`)."""
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


# ---- timing --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Policy:
    """How long one group of providers is timed.

    Rounds (one call of each provider still running) continue until every provider has
    ``min_calls`` calls and the group has run ``min_time`` seconds.  A slow competitor
    (NumPy, torch; never fastloss, whose time every ratio divides by) stops early, once
    it has ``slow_calls`` calls totalling ``slow_time`` seconds: at 1e8 elements one
    round of NumPy and torch over the regression losses takes ~20 s (one NumPy Huber
    call ~2 s), so 3 calls each would take the default run far past its budget of about
    a minute.  ``warmup_prefix`` (elements, or None for the full arrays) is what the
    warm-up call runs on.
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
    """One timed callable of a group: fastloss (per threads and ISA), numpy, or torch."""

    name: str                 # "fastloss", "numpy", "torch"
    threads: int | None       # None: single-threaded by nature (numpy)
    isa: str | None
    make: Callable            # (x, t) -> zero-argument callable
    setup: Callable[[], None] | None = None
    samples: list = field(default_factory=list)

    @property
    def key(self) -> str:
        parts = [self.name] + ([self.isa] if self.isa else []) + ([f"{self.threads}t"] if self.threads else [])
        return "-".join(parts)


def time_call(fn, setup=None, clock=time.perf_counter) -> float:
    if setup is not None:
        setup()
    t0 = clock()
    r = fn()
    t1 = clock()
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


def agree(ref, got, rtol=1e-3) -> bool:
    """Loose agreement of two providers' results (float32 math on both sides)."""
    (l0, g0), (l1, g1) = _loss_grad(ref), _loss_grad(got)
    if not abs(l0 - l1) <= rtol * max(abs(l0), abs(l1)) + 1e-30:
        return False
    if g0 is None:
        return True
    step = max(1, g0.size // 4096)
    a, b = g0.ravel()[::step].astype(np.float64), g1.ravel()[::step].astype(np.float64)
    return bool(np.allclose(a, b, rtol=rtol, atol=rtol * float(np.max(np.abs(a), initial=0.0))))


def warm_up(providers: list[Provider], x, t, policy: Policy) -> dict[str, bool]:
    """One call of each provider (on a prefix for large sizes); returns agreement with numpy."""
    if policy.warmup_prefix is not None:
        x, t = x[:policy.warmup_prefix], t[:policy.warmup_prefix]
    results = {}
    for p in providers:
        if p.setup is not None:
            p.setup()
        results[p.key] = p.make(x, t)()
    ok = {}
    ref = next((results[p.key] for p in providers if p.name == "numpy"), None)
    if ref is not None:
        for p in providers:
            if p.name != "numpy":
                ok[p.key] = agree(ref, results[p.key])
    return ok


def accuracy(case: Case, providers: list[Provider], x, t) -> dict[str, float]:
    """Error of one call of each provider against ``fastloss.reference`` in float64.

    forward: |loss - exact| / |exact|;  with-grad: max |grad - exact| / max |exact|
    (the loss of with-grad is the forward's).  The first fastloss provider stands for
    all: results are bitwise identical for every thread count by design.
    """
    spec = REGISTRY[case.loss]
    exact = float(spec.reference(x, t)) if case.mode == "forward" else spec.reference_grad(x, t)
    out = {}
    for p in providers:
        if p.name in out:
            continue
        if p.setup is not None:
            p.setup()
        loss, grad = _loss_grad(p.make(x, t)())
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


def run_rounds(providers: list[Provider], x, t, policy: Policy) -> int:
    """Interleaved timed rounds; samples are appended to each provider.  Returns the rounds."""
    fns = [p.make(x, t) for p in providers]
    active = list(range(len(providers)))
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    rounds = 0
    start = time.perf_counter()
    try:
        while active and rounds < policy.max_rounds:
            for i in active:
                providers[i].samples.append(time_call(fns[i], providers[i].setup))
            rounds += 1
            elapsed = time.perf_counter() - start
            active = [i for i in active
                      if not policy.done(providers[i].samples, elapsed, providers[i].name != "fastloss")]
    finally:
        if gc_was_enabled:
            gc.enable()
    return rounds


def group_providers(group_cases: list[Case], with_numpy=True, with_torch=False) -> list[Provider]:
    """fastloss (per threads, ISA), numpy (once), torch (per threads), interleaved in that order."""
    out = []
    threads = list(dict.fromkeys(c.threads for c in group_cases))
    first = group_cases[0]
    for i, th in enumerate(threads):
        for c in group_cases:
            if c.threads == th:
                out.append(Provider("fastloss", th, c.isa, lambda x, t, c=c: fastloss_fn(c, x, t),
                                    fastloss_setup(c)))
        if i == 0 and with_numpy:
            out.append(Provider("numpy", None, None, lambda x, t: numpy_fn(first, x, t)))
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
    losses: list | None = None
    sizes: tuple = DEFAULT_SIZES
    threads: tuple = DEFAULT_THREADS
    isas: list | None = None
    quick: bool = False
    repeat: int | None = None
    json_path: str | None = None
    torch: bool = True


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


def run(opts: Options, out=None) -> dict:
    """Time every case of `opts`, print the header and table to `out`; return the report."""
    out = out or sys.stdout
    wall0 = time.perf_counter()
    isas = opts.isas or [_core.get_isa()]
    all_cases = cases(opts.losses, opts.sizes, opts.threads, MODES, DEFAULT_DTYPE, isas)
    use_torch = opts.torch and torch_available()
    env = environment(opts.threads, isas)
    print(format_header(env, use_torch, opts), file=out, flush=True)

    selected_isa = _core.get_isa()
    torch_threads = None
    if use_torch:
        import torch
        torch_threads = torch.get_num_threads()
    groups: dict[tuple, list[Case]] = {}
    for c in all_cases:
        groups.setdefault(c.group, []).append(c)

    records, bw = [], {th: [] for th in opts.threads}
    acc_n = accuracy_size(opts.sizes)
    progress = _Progress(len(groups))
    try:
        for th, s in measure_read_bandwidth(opts.threads).items():
            bw[th] += s
        inputs_key, x, t = None, None, None
        for (loss, n, dtype, mode), gcases in groups.items():
            key = (REGISTRY[loss].make_inputs, n, dtype)
            if key != inputs_key:  # one input pair per size, shared by the losses that use it
                x = t = None
                gc.collect()
                x, t = make_inputs(loss, n, dtype)
                inputs_key = key
            policy = policy_for(n, dtype, opts.quick, opts.repeat)
            provs = group_providers(gcases, with_numpy=True, with_torch=use_torch)
            title = f"{format_size(n)} {loss} {mode}"
            progress.start(title)
            ok = warm_up(provs, x, t, policy)
            run_rounds(provs, x, t, policy)
            acc = accuracy(gcases[0], provs, x, t) if n == acc_n else None
            progress.finish(f"{title}: " + _progress_summary(provs))
            records += _records(gcases, provs, ok, acc)
        x = t = None
        gc.collect()
        for th, s in measure_read_bandwidth(opts.threads).items():
            bw[th] += s
    finally:
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
    report = {
        "schema": "fastloss-bench/1",
        "environment": env,
        "options": {"sizes": list(opts.sizes), "threads": list(opts.threads), "isas": isas,
                    "quick": opts.quick, "repeat": opts.repeat, "torch": use_torch,
                    "losses": opts.losses or regression_losses()},
        "read_bandwidth": {str(th): {"gbps": read_gbps[th], "bytes": READ_BW_BYTES,
                                     **stats(bw[th])} for th in opts.threads},
        "cases": records,
        "wall_time_s": time.perf_counter() - wall0,
        "load_average_end": _loadavg(),
    }
    print(format_table(report), file=out)
    mismatches = [r for r in records if r["agrees_with_numpy"] is False or r.get("torch_agrees") is False]
    for r in mismatches:
        print(f"WARNING: results disagree with NumPy: {r['loss']} n={r['n']} {r['mode']} "
              f"{r['threads']}t {r['isa']}", file=sys.stderr)
    if opts.json_path:
        with open(opts.json_path, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return report


def _progress_summary(provs: list[Provider]) -> str:
    parts = []
    for p in provs:
        parts.append(f"{p.key} {format_ms(float(np.median(p.samples)))} ms ({len(p.samples)})")
    return ", ".join(parts)


def _records(gcases: list[Case], provs: list[Provider], ok: dict, acc: dict | None) -> list[dict]:
    numpy_p = next(p for p in provs if p.name == "numpy")
    np_stats = stats(numpy_p.samples)
    recs = []
    for c in gcases:
        fl = next(p for p in provs if p.name == "fastloss" and p.threads == c.threads and p.isa == c.isa)
        tp = next((p for p in provs if p.name == "torch" and p.threads == c.threads), None)
        fs = stats(fl.samples)
        ts = stats(tp.samples) if tp else None
        med = fs["median_s"]
        recs.append({
            "loss": c.loss, "n": c.n, "dtype": c.dtype, "mode": c.mode, "threads": c.threads, "isa": c.isa,
            "bytes": c.nbytes(), "gbps": c.nbytes() / med / 1e9,
            "fastloss": fs, "numpy": np_stats, "torch": ts,
            "speedup_numpy": np_stats["median_s"] / med,
            "speedup_torch": ts["median_s"] / med if ts else None,
            "agrees_with_numpy": ok.get(fl.key),
            "torch_agrees": ok.get(tp.key) if tp else None,
            "error_vs_float64": acc,
        })
    return recs


# ---- formatting ----------------------------------------------------------------------------------

def format_size(n: int) -> str:
    if n >= 1000:
        e = len(str(n)) - 1
        m, r = divmod(n, 10**e)
        if r == 0:
            return f"{m}e{e}"
    return str(n)


def parse_size(text: str) -> int:
    """'1e7', '10000000' or '1_000_000' -> int (ValueError if not a positive integer)."""
    s = text.strip().replace("_", "")
    v = float(s) if any(ch in s for ch in "eE.") else int(s)
    if v != int(v) or v < 1:
        raise ValueError(f"size must be a positive integer, got {text!r}")
    return int(v)


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


def format_header(env: dict, use_torch: bool, opts: Options) -> str:
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
        f"cases      {DEFAULT_DTYPE}, sizes {', '.join(format_size(n) for n in opts.sizes)}"
        + (", --quick" if opts.quick else ""),
    ]
    if env["load_average"]:
        lines.append(f"load       {env['load_average'][0]:.2f} (1-minute load average at start; "
                     f"{env['cores']} cores)")
    return "\n".join(lines)


def _format_accuracy(recs: list[dict], has_torch: bool) -> list[str]:
    names = ("fastloss", "numpy", "torch") if has_torch else ("fastloss", "numpy")
    rows, seen, n = [], set(), None
    for r in recs:
        acc = r.get("error_vs_float64")
        if not acc or (r["loss"], r["mode"]) in seen:
            continue
        seen.add((r["loss"], r["mode"]))
        n = r["n"]
        rows.append([r["loss"], r["mode"].replace("_", "-")] + [f"{acc[k]:.1e}" if k in acc else "-" for k in names])
    if not rows:
        return []
    head = ["loss", "mode", "fastloss", "NumPy"] + (["torch"] if has_torch else [])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return ["", f"error at n={format_size(n)} against fastloss.reference in float64 (one call each; forward: relative",
            "error of the loss; with-grad: max |gradient error| / max |gradient|; float32 results round at ~6e-8):",
            fmt(head)] + [fmt(row) for row in rows]


def format_table(report: dict) -> str:
    recs = report["cases"]
    has_torch = any(r["torch"] for r in recs)
    multi_isa = len({r["isa"] for r in recs}) > 1
    first_isa = report["options"]["isas"][0]
    head = ["loss", "n", "mode", "thr"] + (["isa"] if multi_isa else []) + ["fastloss", "NumPy"] \
        + (["torch"] if has_torch else []) + ["NumPy/fl"] + (["torch/fl"] if has_torch else []) \
        + ([f"vs {first_isa}"] if multi_isa else []) + ["GB/s", "%read"]
    left = {"loss", "mode", "isa"}
    base = {(r["loss"], r["n"], r["mode"], r["threads"]): r["fastloss"]["median_s"]
            for r in recs if r["isa"] == first_isa}
    rows, prev_n = [], None
    for r in recs:
        if prev_n is not None and r["n"] != prev_n:
            rows.append(None)
        prev_n = r["n"]
        med = r["fastloss"]["median_s"]
        row = [r["loss"], format_size(r["n"]), r["mode"].replace("_", "-"), str(r["threads"])]
        if multi_isa:
            row.append(r["isa"])
        row += [format_ms(med), format_ms(r["numpy"]["median_s"])]
        if has_torch:
            row.append(format_ms(r["torch"]["median_s"]) if r["torch"] else "-")
        row.append(_ratio(r["speedup_numpy"]))
        if has_torch:
            row.append(_ratio(r["speedup_torch"]))
        if multi_isa:
            b = base.get((r["loss"], r["n"], r["mode"], r["threads"]))
            row.append(_ratio(b / med) if b else "-")
        row += [f"{r['gbps']:.1f}", f"{r['pct_read_bw']:.0f}%"]
        if r["agrees_with_numpy"] is False or r["torch_agrees"] is False:
            row[-1] += " !"
        rows.append(row)
    widths = [max([len(h)] + [len(row[i]) for row in rows if row]) for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if h in left else c.rjust(w) for c, w, h in zip(cells, widths, head)).rstrip()

    acc_lines = _format_accuracy(recs, has_torch)
    rb = report["read_bandwidth"]
    bw = ", ".join(f"{th} thread{'s' if th != '1' else ''} {v['gbps']:.1f} GB/s" for th, v in rb.items())
    counts = {}
    for r in recs:
        c = counts.setdefault(format_size(r["n"]), set())
        c.update(p["count"] for p in (r["fastloss"], r["numpy"], r["torch"]) if p)
    counts = {k: (f"{min(v)}" if len(v) == 1 else f"{min(v)}-{max(v)}") for k, v in counts.items()}
    lines = ["", "times: median milliseconds; ratios > 1x: fastloss is faster", fmt(head)]
    lines += ["" if row is None else fmt(row) for row in rows]
    lines += [
        "",
        f"read bandwidth: {bw}",
        f"  (fastloss._core.read_sum_f32 on a 1 GiB float32 array; best of {2 * READ_BW_ROUNDS} reads, "
        "half before and half after the cases)",
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
    if multi_isa:
        lines.append(f"vs {first_isa} = fastloss time with {first_isa} / time with this ISA (same run).")
    lines.append("calls timed per provider after a warm-up, providers interleaved: "
                 + ", ".join(f"{k}: {v}" for k, v in counts.items()) + "; quartiles in --json.")
    lines += acc_lines
    if any(r["agrees_with_numpy"] is False or r["torch_agrees"] is False for r in recs):
        lines.append("! = fastloss or torch disagrees with NumPy in the warm-up call (see stderr).")
    end = report.get("load_average_end")
    lines.append(f"wall time {report['wall_time_s']:.0f} s" + (f"; load average at end {end[0]:.2f}" if end else ""))
    return "\n".join(lines)
