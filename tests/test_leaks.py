"""Leak check: many calls of every public function on small inputs, about half of them raising
(bad shape, bad dtype, out-of-range target, bad option, bad grad_out/out), leave memory flat.

Three measures, after a warm-up (caches, free lists, lazy imports):
* references: ``sys.getrefcount`` of every input array, of the dtypes and of the function is
  unchanged (a leaked reference keeps an object alive and allocates nothing per call, so the
  other two cannot see it);
* tracemalloc: the memory traced by Python's allocators (NumPy reports its array buffers to
  it too) does not grow in two consecutive runs of TRACED_CALLS calls: a leaked object of
  any size shows;
* RSS (``/proc/self/statm``, after gc and ``malloc_trim``) grows less than RSS_LIMIT over the
  run: leaks outside Python's allocators (C ``malloc`` in the kernels or the Cython glue).
  Not under AddressSanitizer (tools/sanitize.sh), whose quarantine holds freed memory back on
  purpose; LeakSanitizer covers that run instead.
test_leak_check_catches_a_leak shows that each measure catches a leak of its kind.

The default run makes CALLS calls per function (its RSS check is coarse: ~1.5 kB per call);
the ``slow`` one (CI runs it) makes two windows of WINDOW_CALLS = 10,000 calls per function,
references and RSS only, and fails if RSS grew by RSS_WINDOW_LIMIT in BOTH windows (~26 bytes
per call, below the smallest glibc block of 32; a one-off growth -- a new arena of Python's
allocator -- shows in one window only).  tracemalloc makes a call ~10x slower and is already
exact on the short run.
"""
from __future__ import annotations

import ctypes
import gc
import os
import sys
import tracemalloc
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

import fastloss
from fastloss._registry import by_family, field_specs
from fl_testing import computing_functions, loss_kwargs

CALLS = 2_000
WINDOW_CALLS = 10_000
TRACED_CALLS = 300
#: RSS growth allowed over a run: allocator noise is 0-16 kB, and once in a while a new 1 MiB
#: arena of Python's allocator.
RSS_LIMIT = 3 * 2**20
#: RSS growth that fails the slow run when BOTH windows of WINDOW_CALLS calls show it.
RSS_WINDOW_LIMIT = 256 * 2**10
#: tracemalloc growth allowed over TRACED_CALLS calls (noise: below 1 kB, a few kB once; one
#: leaked float object per call would be 7 kB, one NumPy scalar 10 kB, one small array 30 kB).
TRACED_LIMIT = 6 * 2**10

ERRORS = (TypeError, ValueError, IndexError)      # the exact types are tests/test_bad_input.py's


@dataclass(frozen=True)
class Call:
    what: str
    call: Callable[[], object]
    raises: bool


class Cases:
    """Calls per public function, and every object they hold (for the reference counts)."""

    def __init__(self):
        self.calls: dict[str, list[Call]] = {}
        self.objects: list = []

    def keep(self, *objs):
        self.objects.extend(objs)
        return objs if len(objs) > 1 else objs[0]

    def ok(self, fn, what, call):
        self.calls.setdefault(fn.__name__, []).append(Call(what, call, False))

    def bad(self, fn, what, call):
        self.calls.setdefault(fn.__name__, []).append(Call(what, call, True))


def _regression(c: Cases, rng):
    """From the registry: a loss added there is checked without an edit here."""
    w = c.keep(rng.uniform(0.5, 2.0, (4, 5)).astype(np.float32))
    x_int = c.keep(np.arange(20).reshape(4, 5))
    for spec in by_family("regression").values():
        d = spec.make_inputs(rng, (4, 5), np.float32)
        x, t = c.keep(d["input"], d["target"])
        d16 = spec.make_inputs(rng, (3, 7), np.float16)
        x16, t16 = c.keep(d16["input"], d16["target"])
        variant = spec.variants[-1]
        kw = c.keep(loss_kwargs(spec, "mean", variant))
        for fn in (spec.func, spec.with_grad):
            c.ok(fn, "plain", lambda fn=fn, x=x, t=t, kw=kw: fn(x, t, **kw))
            c.ok(fn, "float16", lambda fn=fn, x=x16, t=t16, kw=kw: fn(x, t, **kw))
            c.ok(fn, "lists", lambda fn=fn, kw=kw: fn([[1.0, 2.0], [3.0, 4.0]], [0.5, 0.25], **kw))
            if spec.has_weight:
                c.ok(fn, "weight", lambda fn=fn, x=x, t=t, kw=kw: fn(x, t, weight=w, num_threads=1, **kw))
            if spec.has_axis:
                c.ok(fn, "axis", lambda fn=fn, x=x, t=t, kw=kw: fn(x, t, axis=1, **kw))
            if "none" in spec.reductions:
                kn = c.keep(loss_kwargs(spec, "none", variant))
                c.ok(fn, "none", lambda fn=fn, x=x, t=t, kn=kn: fn(x, t, **kn))
            c.bad(fn, "shape", lambda fn=fn, x=x, t=t, kw=kw: fn(x, t[:, :3], **kw))
            c.bad(fn, "int dtype", lambda fn=fn, t=t, kw=kw: fn(x_int, t, **kw))
            c.bad(fn, "None", lambda fn=fn, x=x, kw=kw: fn(x, None, **kw))
            c.bad(fn, "num_threads", lambda fn=fn, x=x, t=t, kw=kw: fn(x, t, num_threads=0, **kw))
            if "reduction" in kw:
                c.bad(fn, "reduction", lambda fn=fn, x=x, t=t, kw=kw: fn(x, t, **{**kw, "reduction": "avg"}))
            for opts, _exc, _word in spec.bad_options:
                c.bad(fn, f"option {opts}", lambda fn=fn, x=x, t=t, opts=c.keep(opts): fn(x, t, **opts))
        g = spec.with_grad
        buf, buf64, ro = c.keep(np.empty_like(x), np.empty(x.shape), np.empty_like(x))
        ro.setflags(write=False)
        inplace = c.keep(x.copy())
        c.ok(g, "grad_out", lambda g=g, x=x, t=t, buf=buf, kw=kw: g(x, t, grad_out=buf, **kw))
        c.ok(g, "in place", lambda g=g, t=t, a=inplace, kw=kw: g(a, t, grad_out=a, **kw))
        c.bad(g, "grad_out dtype", lambda g=g, x=x, t=t, b=buf64, kw=kw: g(x, t, grad_out=b, **kw))
        c.bad(g, "grad_out read-only", lambda g=g, x=x, t=t, b=ro, kw=kw: g(x, t, grad_out=b, **kw))
        c.bad(g, "grad_out overlaps target", lambda g=g, x=x, b=buf, kw=kw: g(x, b, grad_out=b, **kw))


def _classification(c: Cases, rng):
    F = fastloss
    N, V = 6, 9
    x = c.keep(rng.standard_normal((N, V)).astype(np.float32))
    x16 = c.keep(x.astype(np.float16))
    t = c.keep(rng.integers(0, V, N))
    t[1] = -100
    t_bad = c.keep(np.where(np.arange(N) == 3, V, t))           # one target == V: out of range
    q = c.keep(rng.dirichlet(np.ones(V), N).astype(np.float32))
    cw, sw = c.keep(rng.uniform(0.5, 2.0, V), rng.uniform(0.5, 2.0, N))
    x_int = c.keep(np.arange(N * V).reshape(N, V))
    opts = c.keep(dict(weight=cw, sample_weight=sw, label_smoothing=0.1, z_loss=1e-3, softcap=5.0))
    for fn in (F.cross_entropy, F.cross_entropy_with_grad):
        c.ok(fn, "plain", lambda fn=fn: fn(x, t))
        c.ok(fn, "options", lambda fn=fn: fn(x, t, **opts))
        c.ok(fn, "soft", lambda fn=fn: fn(x, q, label_smoothing=0.2))
        c.ok(fn, "float16 none", lambda fn=fn: fn(x16, t, reduction="none"))
        c.ok(fn, "axis 0", lambda fn=fn: fn(x.T, t, axis=0, num_threads=2))
        c.ok(fn, "lists", lambda fn=fn: fn([[0.0, 1.0], [2.0, 0.5]], [1, 0]))
        c.bad(fn, "target out of range", lambda fn=fn: fn(x, t_bad, weight=cw))
        c.bad(fn, "target shape", lambda fn=fn: fn(x, t[:4]))
        c.bad(fn, "int logits", lambda fn=fn: fn(x_int, t))
        c.bad(fn, "float target of the row shape", lambda fn=fn: fn(x, t.astype(np.float32)))
        c.bad(fn, "weight shape", lambda fn=fn: fn(x, t, weight=cw[:4]))
        c.bad(fn, "label_smoothing", lambda fn=fn: fn(x, t, label_smoothing=2.0))
        c.bad(fn, "soft with ignore_index >= 0", lambda fn=fn: fn(x, q, ignore_index=0))
    g = F.cross_entropy_with_grad
    buf, buf64, ro, inplace = c.keep(np.empty_like(x), np.empty(x.shape), np.empty_like(x), x.copy())
    ro.setflags(write=False)
    c.ok(g, "grad_out", lambda: g(x, t, grad_out=buf))
    c.ok(g, "in place", lambda: g(inplace, t, grad_out=inplace))
    c.bad(g, "grad_out dtype", lambda: g(x, t, grad_out=buf64))
    c.bad(g, "grad_out read-only", lambda: g(x, t, grad_out=ro))
    for fn in (F.log_softmax, F.softmax):
        out, out_ro, own = c.keep(np.empty_like(x), np.empty_like(x), x.copy())
        out_ro.setflags(write=False)
        c.ok(fn, "plain", lambda fn=fn: fn(x))
        c.ok(fn, "float16 axis 0", lambda fn=fn: fn(x16, axis=0))
        c.ok(fn, "out", lambda fn=fn, out=out: fn(x, out=out))
        c.ok(fn, "in place", lambda fn=fn, a=own: fn(a, out=a))
        c.bad(fn, "0-d", lambda fn=fn: fn(np.float32(1.0)))
        c.bad(fn, "int", lambda fn=fn: fn(x_int))
        c.bad(fn, "axis", lambda fn=fn: fn(x, axis=2))
        c.bad(fn, "out dtype", lambda fn=fn: fn(x, out=buf64))
        c.bad(fn, "out read-only", lambda fn=fn, o=out_ro: fn(x, out=o))
    lse = F.logsumexp
    c.ok(lse, "plain", lambda: lse(x))
    c.ok(lse, "axis 0", lambda: lse(x16, axis=0))
    c.ok(lse, "no classes", lambda: lse(np.empty((3, 0), np.float32)))
    c.bad(lse, "0-d", lambda: lse(np.float64(1.0)))
    c.bad(lse, "None", lambda: lse(None))
    c.bad(lse, "axis", lambda: lse(x, axis=-3))
    nll = F.nll_loss
    logp = c.keep(F.log_softmax(x.astype(np.float64)))
    c.ok(nll, "plain", lambda: nll(logp, t))
    c.ok(nll, "weight none", lambda: nll(logp, t, weight=cw, reduction="none"))
    c.bad(nll, "target out of range", lambda: nll(logp, t_bad))
    c.bad(nll, "target shape", lambda: nll(logp, t[:2]))
    c.bad(nll, "float target", lambda: nll(logp, t.astype(np.float64)))
    c.bad(nll, "soft target", lambda: nll(logp, np.exp(logp)))
    ppl = F.perplexity
    c.ok(ppl, "plain", lambda: ppl(x, t))
    c.ok(ppl, "float16", lambda: ppl(x16, t, num_threads=1))
    c.bad(ppl, "target out of range", lambda: ppl(x, t_bad))
    c.bad(ppl, "soft target", lambda: ppl(x, q))
    c.bad(ppl, "int logits", lambda: ppl(x_int, t))


def _field(c: Cases, rng):
    """The losses of issue 6, from the registry: calls that succeed (default options, "none",
    float16, the last variant, grad_out where there is one) and calls that raise (a missing or
    complex first operand, an unknown reduction, num_threads=0)."""
    for spec in field_specs().values():
        shape = spec.test_shapes[0]
        ins32 = c.keep(spec.make_inputs(rng, shape, np.dtype(np.float32)))
        ins16 = c.keep(spec.make_inputs(rng, shape, np.dtype(np.float16)))
        first = spec.operands[0].name
        req = [o.name for o in spec.operands if o.required]
        opt = [o.name for o in spec.operands if not o.required]
        gonly = [o.name for o in spec.grad_operands]

        def args(ins, grad, bad=None, value=None, req=req, opt=opt, gonly=gonly):   # bound now, not at call time
            pos = [value if n == bad else ins[n] for n in req] + ([ins[n] for n in gonly] if grad else [])
            return pos, {n: ins[n] for n in opt if n in ins}

        red = "reduction" in spec.option_kinds
        variant = c.keep(dict(spec.variants[-1]))
        for fn, grad in ((spec.func, False), (spec.with_grad, True)):
            def call(fn=fn, grad=grad, ins=ins32, bad=None, value=None, args=args, **kw):
                pos, kwo = args(ins, grad, bad, value)
                return fn(*pos, **kwo, **kw)
            c.ok(fn, "plain", lambda call=call: call())
            c.ok(fn, "float16", lambda call=call, ins=ins16: call(ins=ins))
            c.ok(fn, "variant", lambda call=call, v=variant: call(**v))
            if red and "none" in spec.reductions:
                c.ok(fn, "none", lambda call=call: call(reduction="none"))
            c.bad(fn, "None", lambda call=call, first=first: call(bad=first, value=None))
            cx = c.keep(ins32[first].astype(np.complex64))
            c.bad(fn, "complex", lambda call=call, cx=cx, first=first: call(bad=first, value=cx))
            if red:
                c.bad(fn, "reduction", lambda call=call: call(reduction="avg"))
            if "num_threads" in spec.option_kinds:
                c.bad(fn, "num_threads", lambda call=call: call(num_threads=0))
        if spec.out:
            g = spec.with_grad
            buf, buf64 = c.keep(np.empty_like(ins32[spec.inplace]), np.empty(ins32[spec.inplace].shape))

            def gcall(g=g, args=args, ins=ins32, **kw):
                pos, kwo = args(ins, True)
                return g(*pos, **kwo, **kw)
            c.ok(g, "grad_out", lambda gcall=gcall, b=buf: gcall(grad_out=b))
            c.bad(g, "grad_out dtype", lambda gcall=gcall, b=buf64: gcall(grad_out=b))


def _linear(c: Cases, rng):
    """Fused linear + cross-entropy (issue 8): chunks, bias, ignored rows, float16; bad shapes and dtypes."""
    x, w, b = c.keep(rng.standard_normal((37, 8)).astype(np.float32), rng.standard_normal((11, 8)).astype(np.float32),
                     rng.standard_normal(11).astype(np.float32))
    t = c.keep(rng.integers(0, 11, 37))
    t_ign = c.keep(np.where(np.arange(37) % 3 == 0, -100, t))
    x16 = c.keep(x.astype(np.float16))
    for fn in (fastloss.linear_cross_entropy, fastloss.linear_cross_entropy_with_grad):
        c.ok(fn, "plain", lambda fn=fn: fn(x, w, t))
        c.ok(fn, "bias, chunks, ignored", lambda fn=fn: fn(x, w, t_ign, linear_bias=b, chunk_size=5))
        c.ok(fn, "float16 none", lambda fn=fn: fn(x16, w, t, reduction="none", num_threads=1))
        c.bad(fn, "H mismatch", lambda fn=fn: fn(x, w[:, :5], t))
        c.bad(fn, "bias length", lambda fn=fn: fn(x, w, t, linear_bias=b[:4]))
        c.bad(fn, "int input", lambda fn=fn: fn(x.astype(np.int32), w, t))
        c.bad(fn, "target out of range", lambda fn=fn: fn(x, w, t + 11))


@pytest.fixture(scope="module")
def cases() -> Cases:
    c = Cases()
    rng = np.random.default_rng(7)
    _regression(c, rng)
    _classification(c, rng)
    _field(c, rng)
    _linear(c, rng)
    return c


def _run(calls: list[Call], n: int) -> None:
    """n calls, cycling through `calls`; each must succeed or raise as its case says."""
    k = len(calls)
    for i in range(n):
        c = calls[i % k]
        try:
            c.call()
        except ERRORS:
            if not c.raises:
                raise
        else:
            if c.raises:
                raise AssertionError(f"{c.what}: expected an exception, the call returned")


_LIBC = ctypes.CDLL(None)


def _rss() -> int:
    """Resident memory after a full collection and (glibc) malloc_trim: freed memory that the
    allocator keeps resident would otherwise absorb a leak (new blocks reuse it, RSS stays)."""
    gc.collect()
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _traced_snapshot():
    """A tracemalloc snapshot after a full collection and with CPython's type attribute cache
    emptied: the cache keeps a reference to each attribute name it saw (up to 4096), among
    them the short strings made by ``dtype.name``, so it fills slowly over thousands of calls
    and would look like a leak (bounded; seen at ~60 strings per 300 calls)."""
    gc.collect()
    getattr(sys, "_clear_type_cache", lambda: None)()
    return tracemalloc.take_snapshot()


def _under_asan() -> bool:
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()


def _numpy_leaks_default_dtype() -> bool:
    """NumPy 2.4 (CPython 3.11) leaks a reference to the float64 descriptor in each
    np.zeros(n) / np.empty(n) / np.ones(n) without a dtype (harmless: a static object)."""
    d = np.dtype(np.float64)
    np.zeros(1)
    before = sys.getrefcount(d)
    for _ in range(10):
        np.zeros(1)
    return sys.getrefcount(d) != before


#: Descriptors whose reference count is checked: a Cython-side dtype leak would show on all of
#: them (the same code handles every dtype); float64 is left out if NumPy itself leaks it.
CHECKED_DTYPES = [np.dtype(d) for d in ("float16", "float32", "int64")] + (
    [] if _numpy_leaks_default_dtype() else [np.dtype("float64")])


def _refcounts(objects) -> list[int]:
    return [sys.getrefcount(o) for o in objects]


def _leak_check(name: str, calls: list[Call], objects: list, n_calls: int, traced: bool, windows: int = 1):
    """Run `calls` n_calls times after a warm-up; fail if the reference counts of `objects`
    (and of CHECKED_DTYPES) changed, RSS grew by RSS_LIMIT or more (with ``windows`` > 1: by
    RSS_WINDOW_LIMIT in each of `windows` runs of n_calls), or (traced) tracemalloc saw growth
    in two consecutive windows of TRACED_CALLS calls."""
    if sys.platform != "linux":
        pytest.skip("RSS from /proc/self/statm")
    objects = objects + CHECKED_DTYPES
    _run(calls, 20 * len(calls))                            # warm-up
    rss = [_rss()]
    refs = _refcounts(objects)
    for _ in range(windows):
        _run(calls, n_calls)
        rss.append(_rss())
    refs_after = _refcounts(objects)
    n_calls *= windows
    if windows > 1:
        steps = [b - a for a, b in zip(rss, rss[1:])]
        if not _under_asan():
            assert min(steps) < RSS_WINDOW_LIMIT, (
                f"{name}: RSS grew in each of {windows} windows of {n_calls // windows} calls: {steps} bytes "
                f"({min(steps) * windows / n_calls:.0f} bytes per call at least)")
    grown = rss[-1] - rss[0]
    if refs_after != refs:
        diff = [(repr(o)[:60], r0, r1) for o, r0, r1 in zip(objects, refs, refs_after) if r0 != r1]
        raise AssertionError(f"{name}: reference counts changed over {n_calls} calls (object, before, after): "
                             f"{diff[:10]}")
    if not _under_asan():
        assert grown < RSS_LIMIT, (f"{name}: RSS grew by {grown / 2**20:.2f} MiB over {n_calls} calls "
                                   f"({grown / n_calls:.0f} bytes per call)")
    if traced:
        # Two windows: a real leak grows both; a cache filled once (NumPy's small-block cache,
        # a free list) grows the first only.
        tracemalloc.start()
        try:
            _run(calls, 2 * len(calls))
            snaps = [_traced_snapshot()]
            for _ in range(2):
                _run(calls, TRACED_CALLS)
                snaps.append(_traced_snapshot())
        finally:
            tracemalloc.stop()
        growth = [sum(st.size_diff for st in s1.compare_to(s0, "filename")) for s0, s1 in zip(snaps, snaps[1:])]
        if min(growth) >= TRACED_LIMIT:
            top = "\n".join(str(st) for st in snaps[2].compare_to(snaps[1], "lineno")[:5])
            raise AssertionError(f"{name}: traced memory grew by {growth} bytes over two runs of {TRACED_CALLS} "
                                 f"calls; largest growth by line:\n{top}")


def test_every_public_function_has_cases(cases):
    """A new public function must be leak-checked: successful calls and calls that raise."""
    missing = [n for n in computing_functions() if not any(c.raises for c in cases.calls.get(n, ()))
               or all(c.raises for c in cases.calls.get(n, ()))]
    assert not missing, f"no leak-check calls (both succeeding and raising) for {missing}: add them in {__file__}"


@pytest.mark.parametrize("name", sorted(computing_functions()))
def test_no_leak(name, cases):
    fn = computing_functions()[name]
    _leak_check(name, cases.calls[name], cases.objects + [fn], CALLS, traced=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(computing_functions()))
def test_no_leak_long_run(name, cases):
    fn = computing_functions()[name]
    _leak_check(name, cases.calls[name], cases.objects + [fn], WINDOW_CALLS, traced=False, windows=2)


# ---- the checks themselves: each catches a leak of its kind --------------------------------------

@pytest.mark.parametrize("kind,message", [("reference", "reference counts changed"),
                                          ("object", "traced memory grew"),
                                          ("malloc", "RSS grew"),
                                          ("small malloc", "RSS grew in each of 2 windows")])
def test_leak_check_catches_a_leak(kind, message):
    """A real call plus one injected leak per call: a reference kept to the input (no memory),
    a small Python object kept (tracemalloc: a float is 24 bytes), 4 kB of C memory never
    freed (RSS); 40 bytes of C memory (the smallest glibc blocks but one) in the long run's
    windows.  Each is undone afterwards."""
    if "malloc" in kind and _under_asan():
        pytest.skip("RSS is not checked under AddressSanitizer")
    libc = _LIBC
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    x = np.linspace(-1.0, 1.0, 20, dtype=np.float32)
    kept, blocks = [], []
    increfs = [0]

    def leaky():
        loss = fastloss.mse_loss(x, 0.5)
        if kind == "reference":
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(x))
            increfs[0] += 1
        elif kind == "object":
            kept.append(float(loss) + 0.5)
        else:
            size = 4096 if kind == "malloc" else 40
            p = libc.malloc(size)
            ctypes.memset(p, 1, size)                       # touched: resident
            blocks.append(p)
        return loss

    try:
        with pytest.raises(AssertionError, match=message):
            if kind == "small malloc":
                _leak_check(f"leaky {kind}", [Call(kind, leaky, False)], [x], WINDOW_CALLS, traced=False, windows=2)
            else:
                _leak_check(f"leaky {kind}", [Call(kind, leaky, False)], [x], CALLS, traced=True)
    finally:
        for _ in range(increfs[0]):
            ctypes.pythonapi.Py_DecRef(ctypes.py_object(x))
        for p in blocks:
            libc.free(p)
