"""Thread safety and the GIL: concurrent Python threads, each with its own num_threads, get the
sequential results bit for bit; the kernels release the GIL (another thread keeps running
Python meanwhile); num_threads settings do not leak between threads; a target array written
by another thread while a kernel runs cannot make the kernel read out of bounds.

(tests/test_threads.py covers determinism across thread counts, num_threads validation and
OMP_NUM_THREADS / threadpoolctl in one thread.)

The semantics tested here (documented in fastloss._config):
* ``num_threads=`` of a call affects that call only and changes no state, ours or OpenMP's;
* ``set_num_threads`` is process-wide (as ``torch.set_num_threads``): every thread's calls
  with ``num_threads=None`` use it, threads already running included;
* without it, ``None`` is OpenMP's default of the calling thread (``omp_get_max_threads()``).
"""
from __future__ import annotations

import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import fastloss
from fastloss import _config, _core
from fastloss._registry import by_family, field_specs
from fl_testing import assert_identical, computing_functions, loss_kwargs, run_python

REPO_ROOT = Path(__file__).resolve().parent.parent
N_PY_THREADS = 8
#: How long a Barrier or a join may wait before the test fails instead of hanging.
WAIT = 300.0


# ---- the calls: every public function, inputs taking milliseconds ---------------------------

@dataclass(frozen=True)
class Case:
    id: str
    func: str                                  # the public function exercised
    call: Callable                             # call(num_threads) -> result


def _readonly(*arrays):
    """Inputs shared by all threads are made read-only: the kernels must never write them."""
    for a in arrays:
        a.setflags(write=False)
    return arrays


def _regression_cases(rng) -> list[Case]:
    """From the registry (its input generator, its last option variant): a loss added there is
    picked up here."""
    cases = []
    inputs = {}                                 # one set of arrays per input generator

    def arrays(spec, shape, dtype):
        key = (spec.make_inputs, shape, dtype)
        if key not in inputs:
            d = spec.make_inputs(rng, shape, dtype)
            inputs[key] = _readonly(d["input"], d["target"])
        return inputs[key]

    flat = (1 << 20,)
    w32, = _readonly(rng.uniform(0.5, 2.0, flat).astype(np.float32))
    for spec in by_family("regression").values():
        x32, t32 = arrays(spec, flat, np.float32)
        x16, t16 = arrays(spec, (600, 1000), np.float16)
        variant = spec.variants[-1]
        layouts = [("f32-weighted", x32, t32, "mean", dict(weight=w32 if spec.has_weight else None))]
        if spec.has_axis:
            layouts.append(("f16-axis1", x16, t16, "mean", dict(axis=1)))
        if "none" in spec.reductions:
            layouts.append(("f32-none", x32, t32, "none", {}))
        for fn in (spec.func, spec.with_grad):
            n = fn.__name__
            for label, x, t, reduction, extra in layouts:
                kw = loss_kwargs(spec, reduction, variant, **extra)
                cases.append(Case(f"{n}-{label}", n, lambda nt, fn=fn, kw=kw, x=x, t=t: fn(x, t, num_threads=nt, **kw)))
        n = spec.with_grad.__name__
        cases.append(Case(f"{n}-grad_out", n, lambda nt, fn=spec.with_grad, x=x32, t=t32:    # a buffer per call
                          fn(x, t, num_threads=nt, grad_out=np.empty_like(x))))
    return cases


def _classification_cases(rng) -> list[Case]:
    N, V = 256, 8192
    x, = _readonly(rng.standard_normal((N, V), dtype=np.float32) * 3)
    t = rng.integers(0, V, N)
    t[::7] = -100                                           # some ignored rows
    t, = _readonly(t)
    cw, = _readonly(rng.uniform(0.5, 2.0, V))
    sw, = _readonly(rng.uniform(0.5, 2.0, N))
    q = rng.random((N, V), dtype=np.float32)
    q, = _readonly(q / q.sum(axis=1, keepdims=True))
    x16, = _readonly(x.astype(np.float16))
    long_rows, = _readonly(rng.standard_normal((2, 300_000), dtype=np.float32))   # parts across threads
    t_long, = _readonly(np.array([5, 299_999]))
    logp, = _readonly(rng.standard_normal((4096, 1000)))
    t_nll, = _readonly(rng.integers(0, 1000, 4096))
    opts = dict(weight=cw, sample_weight=sw, label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
    F = fastloss
    cases = []
    for fn in (F.cross_entropy, F.cross_entropy_with_grad):
        n = fn.__name__
        cases += [
            Case(f"{n}-plain", n, lambda nt, fn=fn: fn(x, t, num_threads=nt)),
            Case(f"{n}-options", n, lambda nt, fn=fn: fn(x, t, num_threads=nt, **opts)),
            Case(f"{n}-soft", n, lambda nt, fn=fn: fn(x, q, num_threads=nt, label_smoothing=0.05)),
            Case(f"{n}-f16-none", n, lambda nt, fn=fn: fn(x16, t, reduction="none", num_threads=nt)),
            Case(f"{n}-axis0", n, lambda nt, fn=fn: fn(x.T, t, axis=0, num_threads=nt)),
            Case(f"{n}-long-rows", n, lambda nt, fn=fn: fn(long_rows, t_long, num_threads=nt)),
        ]
    cases.append(Case("cross_entropy_with_grad-grad_out", "cross_entropy_with_grad",
                      lambda nt: F.cross_entropy_with_grad(x, t, grad_out=np.empty_like(x), num_threads=nt)))
    for fn in (F.log_softmax, F.softmax):
        n = fn.__name__
        cases += [
            Case(f"{n}", n, lambda nt, fn=fn: fn(x, num_threads=nt)),
            Case(f"{n}-out", n, lambda nt, fn=fn: fn(x16, out=np.empty_like(x16), num_threads=nt)),
            Case(f"{n}-long-rows", n, lambda nt, fn=fn: fn(long_rows, num_threads=nt)),
        ]
    cases += [
        Case("logsumexp", "logsumexp", lambda nt: F.logsumexp(x, num_threads=nt)),
        Case("logsumexp-long-rows", "logsumexp", lambda nt: F.logsumexp(long_rows, num_threads=nt)),
        Case("nll_loss", "nll_loss", lambda nt: F.nll_loss(logp, t_nll, weight=np.ones(1000), num_threads=nt)),
        Case("nll_loss-none", "nll_loss", lambda nt: F.nll_loss(logp, t_nll, reduction="none", num_threads=nt)),
        Case("perplexity", "perplexity", lambda nt: F.perplexity(x, t, num_threads=nt)),
    ]
    return cases


def _field_cases(rng) -> list[Case]:
    """The losses of issue 6, from the registry: the last variant on inputs 256 times the
    registry's largest test shape along the first axis (rows and blocks over threads).
    dpo_loss takes no num_threads (NumPy on (B,) vectors): its calls ignore nt."""
    cases = []
    for spec in field_specs().values():
        shape = (spec.test_shapes[-1][0] * 256,) + tuple(spec.test_shapes[-1][1:])
        ins = spec.make_inputs(rng, shape, np.dtype(np.float32))
        for a in ins.values():
            a.setflags(write=False)
        pos = [ins[o.name] for o in spec.operands if o.required]
        kwo = {o.name: ins[o.name] for o in spec.operands if not o.required and o.name in ins}
        gpos = [ins[o.name] for o in spec.grad_operands]
        kw = dict(spec.variants[-1])
        threads = "num_threads" in spec.option_kinds
        for fn, extra in ((spec.func, []), (spec.with_grad, gpos)):
            n = fn.__name__
            cases.append(Case(f"{n}-registry", n,
                              lambda nt, fn=fn, a=pos + extra, k={**kwo, **kw}, th=threads:
                              fn(*a, **k, **({"num_threads": nt} if th else {}))))
    return cases


def _linear_cases(rng) -> list[Case]:
    """Fused linear + cross-entropy (issue 8) on small matrices: OpenBLAS runs GEMMs this small on
    one thread whatever its limit, so the results are bitwise those of the sequential calls.
    (Larger ones are not: the BLAS thread limit that num_threads sets is process-wide, and
    OpenBLAS's threaded GEMM adds in another order; see fastloss/linear.py.)"""
    x = rng.standard_normal((300, 16)).astype(np.float32)
    w = rng.standard_normal((40, 16)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    t = np.where(np.arange(300) % 7 == 0, -100, rng.integers(0, 40, 300))
    for a in (x, w, b, t):
        a.setflags(write=False)
    return [Case(f"{fn.__name__}-small", fn.__name__,
                 lambda nt, fn=fn: fn(x, w, t, linear_bias=b, chunk_size=64, num_threads=nt))
            for fn in (fastloss.linear_cross_entropy, fastloss.linear_cross_entropy_with_grad)]


@pytest.fixture(scope="module")
def cases():
    rng = np.random.default_rng(20240611)
    return _regression_cases(rng) + _classification_cases(rng) + _field_cases(rng) + _linear_cases(rng)


@pytest.fixture(scope="module")
def sequential(cases):
    """The reference: every case called once, one after the other, on one thread."""
    return [case.call(1) for case in cases]


def _parts(result):
    return result if isinstance(result, tuple) else (result,)


def assert_same_result(got, expected, what):
    g, e = _parts(got), _parts(expected)
    assert len(g) == len(e), f"{what}: {len(g)} results, expected {len(e)}"
    for k, (a, b) in enumerate(zip(g, e)):
        assert type(a) is type(b), f"{what}[{k}]: {type(a).__name__}, expected {type(b).__name__}"
        assert_identical(a, b, what=f"{what}[{k}]")


def test_every_public_function_has_cases(cases):
    """A new public function (or a new registry loss) must be exercised by the concurrent test."""
    covered = {c.func for c in cases}
    missing = sorted(set(computing_functions()) - covered)
    assert not missing, f"no concurrent-call case for {missing}: add one in {__file__}"
    assert len({c.id for c in cases}) == len(cases), "case ids must be unique"


# ---- 1. 8 Python threads, each with its own num_threads: bitwise the sequential results -----

def _run_in_threads(n, target, *args):
    """Run target(i, *args) in n threads; re-raise the first failure in the caller."""
    errors = [None] * n

    def run(i):
        try:
            target(i, *args)
        except BaseException as exc:          # noqa: BLE001 (reported below, with its thread)
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i,), name=f"fastloss-test-{i}") for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(WAIT)
        assert not th.is_alive(), f"{th.name} did not finish within {WAIT} s"
    for i, exc in enumerate(errors):
        if exc is not None:
            raise AssertionError(f"thread {i}: {type(exc).__name__}: {exc}") from exc


def test_eight_threads_bitwise_equal_to_sequential(cases, sequential):
    """8 threads (num_threads 1..8) call every case, each thread in its own order, twice; a
    Barrier starts each round together so the calls really overlap.  Every result must have
    the bits of the sequential one (results are independent of num_threads by design)."""
    rounds = 2
    barrier = threading.Barrier(N_PY_THREADS, timeout=WAIT)
    results = [[None] * (rounds * len(cases)) for _ in range(N_PY_THREADS)]

    def worker(i):
        nt = i + 1
        order = list(range(len(cases)))
        np.random.default_rng(i).shuffle(order)               # different functions overlap
        try:
            for r in range(rounds):
                barrier.wait()
                for k in order:
                    results[i][r * len(cases) + k] = cases[k].call(nt)
        except BaseException:
            barrier.abort()                                   # the others fail now, not after WAIT
            raise

    _run_in_threads(N_PY_THREADS, worker)
    for i in range(N_PY_THREADS):
        for r in range(rounds):
            for k, case in enumerate(cases):
                assert_same_result(results[i][r * len(cases) + k], sequential[k],
                                   f"{case.id} in thread {i} (num_threads={i + 1}), round {r}")


# ---- 2. the GIL is released around the kernels ---------------------------------------------

class _Counter:
    """A Python thread counting in a pure-Python loop.

    While it runs, the switch interval is set very long, so the GIL changes hands only when a
    thread gives it up: a kernel that holds the GIL lets the counter advance by at most one
    stretch of STRETCH increments (it sleeps briefly after each stretch, so that the other
    thread can take the GIL back promptly); a kernel that releases it lets the counter run
    all along.
    """
    STRETCH = 200

    def __init__(self):
        self.count = 0
        self._stop = False
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fastloss-test-counter")

    def _loop(self):
        self._running.set()
        while not self._stop:
            for _ in range(self.STRETCH):
                self.count += 1
            time.sleep(1e-5)

    def __enter__(self):
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(30.0)
        self._thread.start()
        self._running.wait(WAIT)
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join(WAIT)
        sys.setswitchinterval(self._interval)

    def progress_during(self, call, repeat):
        """Increments made while `call()` ran (summed over `repeat` calls), and the last result."""
        advanced = 0
        for _ in range(repeat):
            before = self.count
            result = call()
            advanced += self.count - before
        return advanced, result


#: The counter must advance by at least this much during the kernel calls (it makes 1e5-1e6
#: steps here, and 0 while a call holds the GIL: test_counter_stalls_while_the_gil_is_held).
MIN_PROGRESS = 10_000


def _gil_calls():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(1 << 24, dtype=np.float32)
    t = rng.standard_normal(1 << 24, dtype=np.float32)
    logits = rng.standard_normal((64, 1 << 18), dtype=np.float32)
    target = rng.integers(0, 1 << 18, 64)
    F = fastloss
    return {
        "mse_loss": lambda: F.mse_loss(x, t, num_threads=1),
        "mse_loss_with_grad": lambda: F.mse_loss_with_grad(x, t, num_threads=1),
        "cross_entropy": lambda: F.cross_entropy(logits, target, softcap=30.0, num_threads=1),
        "cross_entropy_with_grad": lambda: F.cross_entropy_with_grad(logits, target, softcap=30.0, num_threads=1),
    }


@pytest.fixture(scope="module")
def gil_calls():
    return _gil_calls()


@pytest.mark.parametrize("name", ["mse_loss", "mse_loss_with_grad", "cross_entropy", "cross_entropy_with_grad"])
def test_gil_released_during_kernel(name, gil_calls):
    """num_threads=1: the kernel runs on the calling thread, and the counter on the other core."""
    call = gil_calls[name]
    expected = call()
    with _Counter() as counter:
        advanced, result = counter.progress_during(call, repeat=4)
    assert_same_result(result, expected, name)
    assert advanced >= MIN_PROGRESS, (
        f"{name}: another Python thread advanced only {advanced} steps while the kernel ran 4 times "
        f"(>= {MIN_PROGRESS} expected if the GIL is released)")


def test_counter_stalls_while_the_gil_is_held():
    """The harness itself: a call that holds the GIL (a builtin summing in C) stalls the counter
    (0 steps; at most a stretch per call allowed), far below MIN_PROGRESS."""
    with _Counter() as counter:
        advanced, _ = counter.progress_during(lambda: sum(range(3_000_000)), repeat=4)
    assert advanced <= 4 * _Counter.STRETCH < MIN_PROGRESS, advanced


# ---- 3. num_threads does not leak between threads -------------------------------------------

def test_sources_never_call_omp_setters():
    """The kernels pass their count to each parallel region (num_threads clause); they never
    change OpenMP's state, which would leak into later calls of the thread."""
    roots = [REPO_ROOT / "src_c", REPO_ROOT / "fastloss"]
    if not roots[0].is_dir():
        pytest.skip("no source tree next to the tests")
    setter = re.compile(r"\b(omp|kmp)_set_\w+\s*\(")              # a call (or a declaration)
    hits = [f"{p}:{i}: {line.strip()}"
            for root in roots for p in sorted(root.rglob("*")) if p.suffix in (".c", ".h", ".pyx", ".pxd")
            for i, line in enumerate(p.read_text().splitlines(), 1) if setter.search(line)]
    assert not hits, "OpenMP state changed by fastloss:\n" + "\n".join(hits)


def test_calls_leave_openmp_default_unchanged(cases):
    """In the calling thread: after calls with other counts, num_threads=None resolves as before."""
    before = (_core.omp_max_threads(), fastloss.get_num_threads(), _config.resolve_num_threads(None))
    for nt in (1, 3, 7, -1):
        for case in cases[::3]:
            case.call(nt)
        assert (_core.omp_max_threads(), fastloss.get_num_threads(),
                _config.resolve_num_threads(None)) == before, f"after calls with num_threads={nt}"


def test_per_call_num_threads_does_not_leak_into_other_threads(cases):
    """Three threads call with num_threads 3, 5, 7 while an observer thread resolves its
    default over and over: it only ever sees its own; the callers' defaults are unchanged too."""
    stop = threading.Event()
    seen = set()
    baselines = {}
    after = {}
    started = threading.Barrier(4, timeout=WAIT)

    def observer():
        baselines["observer"] = (_core.omp_max_threads(), fastloss.get_num_threads())
        started.wait()
        while not stop.is_set():
            seen.add((_core.omp_max_threads(), fastloss.get_num_threads(), _config.resolve_num_threads(None)))
            time.sleep(1e-4)

    def caller(i):
        nt = (3, 5, 7)[i]
        baselines[i] = (_core.omp_max_threads(), fastloss.get_num_threads())
        started.wait()
        for case in cases[i::3]:
            case.call(nt)
        after[i] = (_core.omp_max_threads(), fastloss.get_num_threads())

    obs = threading.Thread(target=observer)
    obs.start()
    try:
        _run_in_threads(3, caller)
    finally:
        stop.set()
        obs.join(WAIT)
    omp, n = baselines["observer"]
    assert seen == {(omp, n, n)}, f"the observer's default changed while others called: {seen}"
    for i in range(3):
        assert after[i] == baselines[i], f"caller {i}: {baselines[i]} -> {after[i]}"


def test_set_num_threads_is_process_wide(threads_restored):
    """set_num_threads in one thread applies to the calls of a thread already running and of a
    new one; a per-call num_threads still overrides it there; None restores each thread's
    OpenMP default."""
    ask = threading.Event()
    answered = threading.Event()
    done = threading.Event()
    log = []

    def other():
        log.append(("start", fastloss.get_num_threads()))
        while not done.is_set():
            if ask.wait(0.01):
                ask.clear()
                log.append(("asked", fastloss.get_num_threads(), _config.resolve_num_threads(None),
                            _config.resolve_num_threads(2)))
                answered.set()

    def query():
        answered.clear()
        ask.set()
        assert answered.wait(WAIT)
        return log[-1][1:]

    fresh = []

    def new_thread():
        th = threading.Thread(target=lambda: fresh.append(fastloss.get_num_threads()))
        th.start()
        th.join(WAIT)
        return fresh[-1]

    omp_default = new_thread()
    th = threading.Thread(target=other)
    th.start()
    try:
        fastloss.set_num_threads(3)
        assert fastloss.get_num_threads() == 3
        assert query() == (3, 3, 2)                 # running thread: set value; per-call 2 wins
        assert new_thread() == 3
        fastloss.set_num_threads(None)
        assert query() == (omp_default, omp_default, 2)
        assert new_thread() == omp_default
    finally:
        done.set()
        th.join(WAIT)


def test_threadpool_limits_apply_to_the_thread_that_set_them(threads_restored):
    """As for any OpenMP code: a threadpoolctl limit changes OpenMP's default of the thread that
    entered it (fastloss follows it there), not the other threads' (use set_num_threads or
    num_threads= for those)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not _core.have_openmp():
        pytest.skip("built without OpenMP")
    main_default = fastloss.get_num_threads()
    inside = threading.Event()
    release = threading.Event()
    got = {}

    def limited():
        with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
            got["limited"] = fastloss.get_num_threads()
            inside.set()
            release.wait(WAIT)

    th = threading.Thread(target=limited)
    th.start()
    try:
        assert inside.wait(WAIT)
        assert got["limited"] == 1
        assert fastloss.get_num_threads() == main_default
    finally:
        release.set()
        th.join(WAIT)


def test_set_num_threads_races_with_callers(threads_restored):
    """One thread switches the default between 2 and None as fast as it can (with a tiny switch
    interval) while others resolve it and call kernels: every call sees one of the two values
    (an int, never a half-updated state) and computes the same result."""
    omp_default = fastloss.get_num_threads()
    rng = np.random.default_rng(1)
    x = rng.standard_normal(300_000).astype(np.float32)
    t = rng.standard_normal(300_000).astype(np.float32)
    expected = fastloss.mse_loss_with_grad(x, t)
    stop = threading.Event()
    bad = []

    def toggler(_):
        while not stop.is_set():
            fastloss.set_num_threads(2)
            fastloss.set_num_threads(None)

    def caller(_):
        for _ in range(3000):
            n = fastloss.get_num_threads()
            if type(n) is not int or n not in (2, omp_default):
                bad.append(n)
        for _ in range(30):
            assert_same_result(fastloss.mse_loss_with_grad(x, t), expected, "mse_loss_with_grad")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    tog = threading.Thread(target=toggler, args=(0,))
    tog.start()
    try:
        _run_in_threads(3, caller)
    finally:
        stop.set()
        tog.join(WAIT)
        sys.setswitchinterval(interval)
    assert not bad, f"get_num_threads returned {bad[:5]}"


# ---- 4. inputs written by another thread while a kernel runs ----------------------------------

_MUTATION_SCRIPT = r"""
import os, threading, time, numpy as np, fastloss
cpus = sorted(os.sched_getaffinity(0))
def pin(k):                     # caller and writer on different CPUs, so that they overlap
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[k % len(cpus)]})
rng = np.random.default_rng(0)
N, V = 256, 16384
x = rng.standard_normal((N, V)).astype(np.float32)
w = rng.uniform(0.5, 2.0, V)
good = rng.integers(0, V, N)
t = good.copy()
calls = {
    "cross_entropy": lambda: fastloss.cross_entropy(x, t, weight=w, num_threads=1),
    "cross_entropy_with_grad": lambda: fastloss.cross_entropy_with_grad(x, t, weight=w, label_smoothing=0.1,
                                                                        num_threads=1),
    "perplexity": lambda: fastloss.perplexity(x, t, num_threads=2),
    "nll_loss": lambda: fastloss.nll_loss(x, t, weight=w),
}
expected = {k: f() for k, f in calls.items()}
stop = False
def flip():
    pin(1)
    bad = np.full(N, 1 << 40, np.int64)
    while not stop:
        t[:] = bad
        for _ in range(300):    # out of range while the kernel runs (it does not need the GIL) ...
            pass
        t[:] = good
        time.sleep(0)           # ... valid when the caller takes the GIL back
pin(0)
th = threading.Thread(target=flip)
th.start()
outcomes = {"same": 0, "IndexError": 0}
try:
    for i in range(30):
        for k, f in calls.items():
            try:
                r = f()
            except IndexError:
                outcomes["IndexError"] += 1
                continue
            got, want = (r, expected[k]) if isinstance(r, tuple) else ((r,), (expected[k],))
            for a, b in zip(got, want):
                assert np.array_equal(a, b), (k, a, b)
            outcomes["same"] += 1
finally:
    stop = True
    th.join()
print(outcomes)
"""


def test_target_written_by_another_thread_during_the_kernel(tmp_path):
    """Another thread flips the class-index target between valid indices and 2**40 while the
    kernels run (a data race of the caller's): each call gives the result for the valid
    targets or an IndexError, never a wrong number or an out-of-bounds read.  (The kernel
    used to check the caller's array, then read it again: a crash in class_weight[t] or a
    wrong loss, in 8 runs of 8 with the two threads on two CPUs; fixed by a snapshot in
    _core.cross_entropy_rows.)  In a child process, so that a crash fails this test only."""
    r = run_python(["-c", _MUTATION_SCRIPT], cwd=tmp_path, timeout=WAIT)
    assert r.returncode == 0, f"exit status {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
