"""fastloss.dask: losses over Dask arrays equal the NumPy one-shot functions.

Oracle: the in-process NumPy function (``fastloss.<loss>``) on the whole arrays.  Reduced
float32 results must agree within 2 ulp (the per-block float64 sums merge in a different order
from the one-shot kernel's blocks, the difference is far below a float32 ulp); float64 results
within 2 ulp too: the per-block sums (fastloss.metrics accumulators) and the one-shot result
(compensated double sums in the pointwise kernel and in _core.sum_f64 for row losses) are
each within ~1 ulp of the exact sum; ``reduction="none"`` must be bitwise equal
(the same elementwise kernel on each block).  Schedulers: synchronous, threaded and a
2-process ``distributed.LocalCluster`` on loopback.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import fastloss  # noqa: E402
import fastloss.dask as fd  # noqa: E402

SCHEDULERS = ("sync", "threads")


def assert_ulp(got, expected, n=2, what="loss"):
    """got and expected: NumPy scalars (or arrays) of one dtype, within n ulp of expected (float32
    and float64 alike, see the module docstring)."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    g, e = got.astype(np.float64), expected.astype(np.float64)
    same_nan = np.isnan(g) & np.isnan(e)
    tol = n * np.spacing(np.abs(expected)).astype(np.float64)
    bad = ~same_nan & ~(np.abs(g - e) <= tol) & ~(g == e)
    assert not bad.any(), (f"{what}: first mismatches (got, expected, ulp tolerance): "
                           f"{list(zip(g[bad].ravel()[:5], e[bad].ravel()[:5], tol[bad].ravel()[:5]))}")


def compute(x, scheduler):
    return x.compute(scheduler=scheduler)


# ---- regression and elementwise losses -----------------------------------------------------------

REGRESSION = [
    ("mse_loss", {}),
    ("l1_loss", {}),
    ("huber_loss", {"delta": 0.7}),
    ("smooth_l1_loss", {"beta": 0.4}),
    ("rmse", {}),
]

# (shape, chunks): even, uneven, several axes, one block
CHUNKINGS = [
    ((1000,), (100,)),
    ((1003,), ((500, 3, 250, 250),)),
    ((61, 47), (13, 10)),
    ((5, 31, 29), (2, (3, 28), 7)),
    ((64,), (64,)),
]


def _data(rng, shape, dtype):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    t = rng.standard_normal(shape).astype(dtype)
    return x, t


@pytest.mark.parametrize("shape,chunks", CHUNKINGS, ids=[str(c[1]) for c in CHUNKINGS])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_regression_matches_numpy(shape, chunks, dtype):
    rng = np.random.default_rng(1)
    x, t = _data(rng, shape, dtype)
    w = rng.random(shape[-1:]).astype(dtype)          # broadcast along the leading axes
    X, T = da.from_array(x, chunks=chunks), da.from_array(t, chunks=17)   # T rechunked to X's chunks
    lazy, expected, what = [], [], []
    for name, opts in REGRESSION:
        for red in ({"reduction": "mean"}, {"reduction": "sum"}) if name != "rmse" else ({},):
            for weight in (None, w):
                lazy.append(getattr(fd, name)(X, T, weight=weight, **opts, **red))
                expected.append(getattr(fastloss, name)(x, t, weight=weight, **opts, **red))
                what.append(f"{name} {red} weighted={weight is not None}")
    for scheduler in SCHEDULERS:
        for got, exp, w_ in zip(dask.compute(*lazy, scheduler=scheduler), expected, what):
            assert_ulp(got, exp, what=f"{w_} {scheduler}")


@pytest.mark.parametrize("name,opts", REGRESSION[:4])
def test_regression_none_is_bitwise(name, opts):
    rng = np.random.default_rng(2)
    x, t = _data(rng, (37, 23), np.float32)
    w = rng.random((37, 1)).astype(np.float32)
    r = getattr(fd, name)(da.from_array(x, chunks=(10, 7)), t, weight=w, reduction="none", **opts)
    assert r.shape == x.shape and r.dtype == np.float32 and r.chunks == da.from_array(x, chunks=(10, 7)).chunks
    np.testing.assert_array_equal(r.compute(), getattr(fastloss, name)(x, t, weight=w, reduction="none", **opts))


def test_float16_and_bfloat16_inputs():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(3)
    for dt in (np.float16, ml_dtypes.bfloat16):
        x, t = _data(rng, (300,), np.float32)
        x, t = x.astype(dt), t.astype(dt)
        got = fd.huber_loss(da.from_array(x, chunks=70), da.from_array(t, chunks=70)).compute()
        assert_ulp(got, fastloss.huber_loss(x, t), what=str(dt))


ELEMENTWISE = [
    ("binary_cross_entropy", lambda r, s: (r.random(s), (r.random(s) > 0.5) * 1.0), {}),
    ("binary_cross_entropy_with_logits", lambda r, s: (r.standard_normal(s), r.random(s)),
     {"pos_weight": np.array([0.5, 2.0, 1.0])}),
    ("sigmoid_focal_loss", lambda r, s: (r.standard_normal(s), (r.random(s) > 0.5) * 1.0), {"gamma": 1.5}),
    ("hinge_loss", lambda r, s: (r.standard_normal(s), np.where(r.random(s) > 0.5, 1.0, -1.0)), {"margin": 0.5}),
    ("kl_div", lambda r, s: (np.log(r.random(s)), r.random(s)), {}),
]


@pytest.mark.parametrize("name,make,opts", ELEMENTWISE, ids=[e[0] for e in ELEMENTWISE])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_elementwise_family(name, make, opts, reduction):
    rng = np.random.default_rng(4)
    x, t = (a.astype(np.float32) for a in make(rng, (40, 3)))
    X = da.from_array(x, chunks=(9, 3))          # kl_div "batchmean" needs whole rows; others any chunks
    got = getattr(fd, name)(X, t, reduction=reduction, **opts).compute(scheduler="threads")
    expected = getattr(fastloss, name)(x, t, reduction=reduction, **opts)
    if reduction == "none":
        np.testing.assert_array_equal(got, expected)
    else:
        assert_ulp(got, expected, what=name)


def test_kl_div_batchmean():
    rng = np.random.default_rng(5)
    x, t = np.log(rng.random((50, 8))), rng.random((50, 8))
    got = fd.kl_div(da.from_array(x, chunks=(7, 8)), t, reduction="batchmean").compute()
    assert_ulp(got, fastloss.kl_div(x, t, reduction="batchmean"))


# ---- row losses --------------------------------------------------------------------------------

def _ce_data(rng, rows, V, dtype=np.float32, ignore_index=-100):
    logits = (rng.standard_normal((*rows, V)) * 2).astype(dtype)
    target = rng.integers(0, V, rows)
    target.ravel()[::5] = ignore_index
    return logits, target


CE_OPTIONS = [
    {},
    {"ignore_index": 3},
    {"label_smoothing": 0.1},
    {"weight": "class", "sample_weight": "rows"},
    {"weight": "class", "label_smoothing": 0.2, "z_loss": 1e-3},
]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("opts", CE_OPTIONS, ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_entropy_rows_chunked(scheduler, opts, dtype):
    rng = np.random.default_rng(6)
    N, V = 203, 67
    logits, target = _ce_data(rng, (N,), V, dtype, opts.get("ignore_index", -100))
    kw = dict(opts)
    if kw.get("weight") == "class":
        kw["weight"] = rng.random(V) + 0.5
    if kw.get("sample_weight") == "rows":
        kw["sample_weight"] = rng.random(N)
    L = da.from_array(logits, chunks=((50, 50, 3, 100), V))
    T = da.from_array(target, chunks=31)
    none = fd.cross_entropy(L, target, reduction="none", **kw)
    assert none.shape == (N,) and none.chunks == ((50, 50, 3, 100),)
    got = dask.compute(fd.cross_entropy(L, T, **kw), fd.cross_entropy(L, T, reduction="sum", **kw), none,
                       scheduler=scheduler)
    assert_ulp(got[0], fastloss.cross_entropy(logits, target, **kw), what="mean")
    assert_ulp(got[1], fastloss.cross_entropy(logits, target, reduction="sum", **kw), what="sum")
    np.testing.assert_array_equal(got[2], fastloss.cross_entropy(logits, target, reduction="none", **kw))


def test_cross_entropy_3d_rows_and_soft_targets():
    rng = np.random.default_rng(7)
    logits, target = _ce_data(rng, (6, 11), 19)
    L = da.from_array(logits, chunks=(2, 4, 19))
    assert_ulp(fd.cross_entropy(L, target).compute(), fastloss.cross_entropy(logits, target))
    q = rng.random(logits.shape).astype(np.float32)
    q /= q.sum(-1, keepdims=True)
    sw = rng.random((6, 1))
    assert_ulp(fd.cross_entropy(L, q, sample_weight=sw, label_smoothing=0.05).compute(),
               fastloss.cross_entropy(logits, q, sample_weight=sw, label_smoothing=0.05))
    none = fd.cross_entropy(L, q, reduction="none").compute()
    np.testing.assert_array_equal(none, fastloss.cross_entropy(logits, q, reduction="none"))


def test_cross_entropy_dask_class_weight_and_numpy_logits():
    rng = np.random.default_rng(8)
    logits, target = _ce_data(rng, (90,), 12)
    w = rng.random(12) + 0.1
    got = fd.cross_entropy(logits, target, weight=da.from_array(w, chunks=5)).compute()   # NumPy logits: wrapped
    assert_ulp(got, fastloss.cross_entropy(logits, target, weight=w))


def test_nll_perplexity_and_other_row_losses():
    rng = np.random.default_rng(9)
    logits, target = _ce_data(rng, (120,), 10, np.float64)
    L = da.from_array(logits, chunks=(25, 10))
    logp = fastloss.log_softmax(logits)
    w = rng.random(10) + 0.5
    assert_ulp(fd.nll_loss(da.from_array(logp, chunks=(25, 10)), target, weight=w).compute(),
               fastloss.nll_loss(logp, target, weight=w))
    assert_ulp(fd.perplexity(L, target).compute(), fastloss.perplexity(logits, target))
    t2 = np.where(target < 0, 0, target)
    assert_ulp(fd.multi_margin_loss(L, t2, weight=w, margin=0.5).compute(),
               fastloss.multi_margin_loss(logits, t2, weight=w, margin=0.5))
    a, p, n = (rng.standard_normal((120, 6)) for _ in range(3))
    A = da.from_array(a, chunks=(33, 6))
    assert_ulp(fd.triplet_margin_loss(A, p, n, swap=True).compute(), fastloss.triplet_margin_loss(a, p, n, swap=True))
    teacher = rng.standard_normal(logits.shape)
    assert_ulp(fd.kl_div_logits(L, teacher, temperature=2.0, target=target).compute(),
               fastloss.kl_div_logits(logits, teacher, temperature=2.0, target=target))
    np.testing.assert_array_equal(fd.kl_div_logits(L, teacher, reduction="none").compute(),
                                  fastloss.kl_div_logits(logits, teacher, reduction="none"))


# ---- determinism, threads, ISAs, laziness, the tree ---------------------------------------------

def test_bitwise_equal_across_schedulers_threads_and_isas(isa):
    rng = np.random.default_rng(10)
    x, t = _data(rng, (4000,), np.float32)
    logits, target = _ce_data(rng, (300,), 40)
    X, L = da.from_array(x, chunks=700), da.from_array(logits, chunks=(64, 40))
    results = set()
    for scheduler in SCHEDULERS:
        for nt in (None, 1, 2, 3):
            results.add((compute(fd.mse_loss(X, t, num_threads=nt), scheduler).tobytes(),
                         compute(fd.cross_entropy(L, target, num_threads=nt), scheduler).tobytes()))
    assert len(results) == 1, results
    assert_ulp(np.frombuffer(results.pop()[0], np.float32)[0], fastloss.mse_loss(x, t))


def test_lazy_until_compute():
    calls = []

    def make(block, block_info=None):
        calls.append(block_info[None]["chunk-location"])
        return np.full(block.shape, float(block_info[None]["chunk-location"][0]), np.float32)

    X = da.map_blocks(make, da.zeros(100, chunks=10, dtype=np.float32), dtype=np.float32)
    r = fd.mse_loss(X, np.zeros(100, np.float32))
    ce = fd.cross_entropy(X.reshape(10, 10).rechunk((2, 10)), np.zeros(10, np.int64), reduction="none")
    assert calls == [] and isinstance(r, da.Array) and r.shape == () and isinstance(ce, da.Array)
    expected = np.mean(np.repeat(np.arange(10.0), 10) ** 2)
    assert_ulp(r.compute(), np.float32(expected))
    assert len(calls) == 10


def test_tree_depth_and_split_every():
    x = np.arange(1000, dtype=np.float64)
    X = da.from_array(x, chunks=10)                 # 100 blocks
    for split_every, depth in ((None, 3), (4, 4), (10, 2), (100, 1), (1000, 1)):
        r = fd.l1_loss(X, 0.0, reduction="sum", split_every=split_every)
        merges = [name for name in r.dask.layers if name.startswith("fastloss-merge-")]
        assert len(merges) == depth, (split_every, merges)
        assert r.compute() == fastloss.l1_loss(x, 0.0, reduction="sum") == 499500.0
    one = fd.l1_loss(da.from_array(x, chunks=-1), 0.0)
    assert not [n for n in one.dask.layers if n.startswith("fastloss-merge-")]
    assert one.compute() == np.float64(499.5)


def test_zero_d_and_empty():
    assert fd.mse_loss(np.float32(3.0), np.float32(1.0)).compute() == np.float32(4.0)
    e = fd.mse_loss(da.zeros((0, 4), chunks=2, dtype=np.float32), 0.0)
    assert np.isnan(e.compute()) and e.dtype == np.float32
    assert fd.mse_loss(da.zeros((0, 4), chunks=2), 0.0, reduction="sum").compute() == 0.0
    row = np.array([1.0, 2.0, 0.5])                # one row, no row axis: a 0-d target
    assert fd.cross_entropy(da.from_array(row), np.int64(1)).compute() == fastloss.cross_entropy(row, np.int64(1))


# ---- distributed -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                                       dashboard_address=None, silence_logs=50)
    client = distributed.Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.mark.slow
def test_distributed_local_cluster(cluster_client):
    rng = np.random.default_rng(11)
    x, t = _data(rng, (3001, 7), np.float32)
    w = rng.random(7).astype(np.float32)
    X = da.from_array(x, chunks=(250, 4))
    for fn, kw in ((fd.mse_loss, {"weight": w}), (fd.huber_loss, {"delta": 0.5, "reduction": "sum"})):
        r = fn(X, t, **kw)
        got = cluster_client.compute(r).result()
        assert_ulp(got, getattr(fastloss, fn.__name__)(x, t, **kw), what=fn.__name__)
        assert got.tobytes() == r.compute(scheduler="threads").tobytes()      # same graph, same bits
    logits, target = _ce_data(rng, (900,), 101)
    cw = rng.random(101) + 0.5
    L = da.from_array(logits, chunks=(128, 101))
    for reduction in ("mean", "sum"):
        r = fd.cross_entropy(L, target, weight=cw, label_smoothing=0.1, reduction=reduction)
        got = cluster_client.compute(r).result()
        assert_ulp(got, fastloss.cross_entropy(logits, target, weight=cw, label_smoothing=0.1, reduction=reduction))
    none = cluster_client.compute(fd.cross_entropy(L, target, reduction="none")).result()
    np.testing.assert_array_equal(none, fastloss.cross_entropy(logits, target, reduction="none"))
    # data generated in the workers, never on the client
    G = da.random.default_rng(0).random(200_000, chunks=20_000, dtype=np.float32)
    got = cluster_client.compute(fd.mse_loss(G, 0.5)).result()
    assert_ulp(got, fastloss.mse_loss(G.compute(), np.float32(0.5)))


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_input():
    X = da.zeros((20, 6), chunks=(5, 6), dtype=np.float32)
    with pytest.raises(ValueError, match="target of shape \\(7,\\) cannot be broadcast"):
        fd.mse_loss(X, np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="weight of shape \\(20, 2\\)"):
        fd.l1_loss(X, 0.0, weight=np.ones((20, 2)))
    with pytest.raises(ValueError, match="class axis .* logits must be a single chunk"):
        fd.cross_entropy(X.rechunk((5, 3)), np.zeros(20, np.int64))
    with pytest.raises(ValueError, match="target must have the shape of logits without the class axis"):
        fd.cross_entropy(X, np.zeros(19, np.int64))
    with pytest.raises(ValueError, match="weight must have shape \\(6,\\)"):
        fd.cross_entropy(X, np.zeros(20, np.int64), weight=np.ones(5))
    with pytest.raises(ValueError, match="sample_weight"):
        fd.cross_entropy(X, np.zeros(20, np.int64), sample_weight=np.ones(3))
    with pytest.raises(TypeError, match="logits"):
        fd.cross_entropy(X.astype(np.int32), np.zeros(20, np.int64))
    with pytest.raises(TypeError, match="input"):
        fd.mse_loss("abc", X)
    with pytest.raises(TypeError, match="unexpected keyword"):
        fd.mse_loss(X, X, delta=1.0)
    with pytest.raises(ValueError, match="reduction"):
        fd.mse_loss(X, X, reduction="max")
    with pytest.raises(ValueError, match="delta"):
        fd.huber_loss(X, X, delta=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        fd.cross_entropy(X, np.zeros(20, np.int64), label_smoothing=2.0)
    with pytest.raises(ValueError, match="split_every"):
        fd.mse_loss(X, X, split_every=1)
    with pytest.raises(ValueError, match="num_threads"):
        fd.mse_loss(X, X, num_threads=0)
    with pytest.raises(NotImplementedError, match="axis"):
        fd.mse_loss(X, X, axis=0)
    with pytest.raises(ValueError, match="axis"):
        fd.cross_entropy(X, np.zeros(6, np.int64), axis=0)
    with pytest.raises(ValueError, match="batchmean.*first axis"):
        fd.kl_div(X.rechunk((5, 3)), X, reduction="batchmean")
    with pytest.raises(ValueError, match="perplexity takes class indices"):
        fd.perplexity(X, X)
    # data-dependent errors surface at compute time, as the NumPy function's
    bad = fd.cross_entropy(X, np.full(20, 6, np.int64))
    with pytest.raises(IndexError):
        bad.compute()


def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask", None)
    monkeypatch.delitem(sys.modules, "fastloss.dask")
    with pytest.raises(ImportError, match="fastloss\\[dask\\]"):
        import fastloss.dask  # noqa: F401
    monkeypatch.undo()
    assert sys.modules["fastloss.dask"] is fd


def test_docstrings_mention_compute():
    for name in fd.__all__:
        doc = getattr(fd, name).__doc__
        assert doc and ".compute()" in doc and f"fastloss.{name}" in doc, name
    assert math.isfinite(fd.mse_loss(np.ones(3), np.zeros(3)).compute())
