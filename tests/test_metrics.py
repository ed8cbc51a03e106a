"""fastloss.metrics: streaming accumulators against the one-shot functions, and the
cross-entropy kernel's per-row target rank (accuracy / top-k) against an np.argsort reference."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastloss
from fastloss import _core, metrics
from fl_testing import SUPPORTED_ISAS

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None


def assert_ulps(got, expected, n_ulp=2, what=""):
    """|got - expected| <= n_ulp ulps of the result dtype (NaN matches NaN), same dtype."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    g, e = got.astype(np.float64), expected.astype(np.float64)
    both_nan = np.isnan(g) & np.isnan(e)
    tol = n_ulp * np.spacing(np.abs(expected)).astype(np.float64)
    ok = both_nan | (g == e) | (np.abs(g - e) <= tol)
    assert ok.all(), f"{what}: got {got!r}, expected {expected!r} (> {n_ulp} ulp)"


def ulps_for(result, name: str = "") -> int:
    """2 ulp, float32 and float64 results alike.  float64: the accumulator's chunk sums are
    correctly rounded (fsum of the kernel's double element/row losses) and merge with Neumaier,
    within ~1 ulp of the exact value; the one-shot result is within ~1 ulp too: the pointwise
    kernel sums float64 in compensated lanes and blocks, and the row losses are summed by
    _core.sum_f64 (compensated), where plain double blocks and np.sum were up to 3 ulp off.
    perplexity = exp(mean nll) multiplies the mean's relative error by |mean nll|: 2 ulp of the
    mean become 2 |log(result)| ulp of the result (measured up to 7 ulp at mean nll ~ 3), so
    float64 perplexity gets 2 + 2 ceil(|log(result)|)."""
    r = np.asarray(result)
    if name == "perplexity" and r.dtype == np.float64 and np.isfinite(r).all() and (r > 0).all():
        return 2 + 2 * int(np.ceil(np.max(np.abs(np.log(r)))))
    return 2


def _cuts(n, rng, k):
    return sorted(set(int(c) for c in rng.integers(0, n + 1, size=k))) if n else []


def _pieces(n, cuts):
    b = [0] + list(cuts) + [n]
    return [(b[i], b[i + 1]) for i in range(len(b) - 1)]


# ---- one case per loss: operands, one-shot call, per-row data ---------------------------------

def _case(name, rng, n, dt):
    """(operands, one-shot function, options, per-row data kwargs) for `n` samples of dtype dt."""
    x = rng.normal(size=(n, 3)).astype(dt)
    t = rng.normal(size=(n, 3)).astype(dt)
    if name in ("mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss", "rmse", "mse", "mae"):
        opts = {"huber_loss": {"delta": 0.7}, "smooth_l1_loss": {"beta": 0.5}}.get(name, {})
        w = rng.uniform(0.1, 2.0, size=(n, 3)).astype(dt)
        return (x, t), getattr(fastloss, name), opts, {"weight": w}
    if name == "binary_cross_entropy":
        return ((rng.uniform(0.01, 0.99, size=(n, 3)).astype(dt), rng.uniform(size=(n, 3)).astype(dt)),
                fastloss.binary_cross_entropy, {}, {"weight": rng.uniform(size=(n, 3)).astype(dt)})
    if name == "binary_cross_entropy_with_logits":
        return ((x, rng.uniform(size=(n, 3)).astype(dt)), fastloss.binary_cross_entropy_with_logits, {},
                {"pos_weight": rng.uniform(0.5, 2, size=(n, 3)).astype(dt)})
    if name == "sigmoid_focal_loss":
        return (x, rng.uniform(size=(n, 3)).astype(dt)), fastloss.sigmoid_focal_loss, {"alpha": 0.3, "gamma": 1.5}, {}
    if name == "hinge_loss":
        return (x, np.where(t > 0, 1, -1).astype(dt)), fastloss.hinge_loss, {"margin": 0.5}, {}
    if name == "kl_div":
        return ((x, rng.uniform(size=(n, 3)).astype(dt)), fastloss.kl_div, {"reduction": "batchmean"}, {})
    if name in ("cross_entropy", "perplexity", "nll_loss", "multi_margin_loss"):
        V = 11
        logits = (rng.normal(size=(n, V)) * 3).astype(dt)
        tg = rng.integers(0, V, size=n)
        if name == "cross_entropy":
            tg[rng.uniform(size=n) < 0.2] = -100
            return ((logits, tg), fastloss.cross_entropy,
                    {"weight": rng.uniform(0.5, 2, V), "label_smoothing": 0.1, "z_loss": 1e-3},
                    {"sample_weight": rng.uniform(0.5, 2, n)})
        if name == "perplexity":
            tg[rng.uniform(size=n) < 0.2] = -100
            return (logits, tg), fastloss.perplexity, {}, {}
        if name == "nll_loss":
            lp = fastloss.log_softmax(logits.astype(np.float64)).astype(dt)
            tg[rng.uniform(size=n) < 0.2] = 3
            return (lp, tg), fastloss.nll_loss, {"weight": rng.uniform(0.5, 2, V), "ignore_index": 3}, {}
        return (logits, tg), fastloss.multi_margin_loss, {"p": 2, "margin": 0.7, "weight": rng.uniform(0.5, 2, V)}, {}
    if name == "triplet_margin_loss":
        return ((x, t, rng.normal(size=(n, 3)).astype(dt)), fastloss.triplet_margin_loss,
                {"margin": 0.5, "swap": True}, {})
    if name == "kl_div_logits":
        tg = rng.integers(0, 3, size=n)
        tg[rng.uniform(size=n) < 0.2] = -1
        return (x, t), fastloss.kl_div_logits, {"temperature": 2.0, "ignore_index": -1}, {"target": tg}
    raise AssertionError(name)


ALL = sorted(metrics.ACCUMULATORS)


def _stream(name, operands, opts, data, pieces, **kw):
    acc = metrics.accumulator(name, **opts)
    for a, b in pieces:
        acc.update(*(o[a:b] for o in operands), **{k: v[a:b] for k, v in data.items()}, **kw)
    return acc


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("name", ALL)
def test_every_loss_chunked_equals_one_shot(name, dt, rng):
    n = 257
    operands, f, opts, data = _case(name, rng, n, dt)
    expected = f(*operands, **opts, **data)
    for k in (1, 5):
        acc = _stream(name, operands, opts, data, _pieces(n, _cuts(n, rng, k)))
        assert_ulps(acc.result(), expected, ulps_for(expected, name), what=f"{name} {k} cuts")
        assert acc.loss == metrics.ACCUMULATORS[name].loss and isinstance(acc, metrics.Accumulator)
        assert name in repr(acc) or type(acc).__name__ in repr(acc)


@pytest.mark.parametrize("name", ["mse_loss", "cross_entropy", "binary_cross_entropy_with_logits",
                                  "multi_margin_loss", "kl_div_logits"])
@pytest.mark.parametrize("dt", ["float16", "bfloat16"])
def test_16_bit_inputs(name, dt, rng):
    if dt == "bfloat16" and BF16 is None:
        pytest.skip("ml_dtypes missing")
    d = BF16 if dt == "bfloat16" else np.dtype(np.float16)
    operands, f, opts, data = _case(name, rng, 64, np.float32)
    operands = tuple(o.astype(d) if o.dtype.kind == "f" else o for o in operands)
    data = {k: (v.astype(d) if k in ("weight", "pos_weight") and name != "cross_entropy" else v)
            for k, v in data.items()}
    expected = f(*operands, **opts, **data)
    acc = _stream(name, operands, opts, data, [(0, 10), (10, 10), (10, 64)])
    assert_ulps(acc.result(), expected, what=name)
    assert acc.result().dtype == np.float32


# ---- hypothesis: random chunkings, merges ------------------------------------------------------

_LOSSES_H = ["mse_loss", "huber_loss", "rmse", "binary_cross_entropy_with_logits", "cross_entropy", "kl_div",
             "triplet_margin_loss"]


@settings(max_examples=40)
@given(name=st.sampled_from(_LOSSES_H), f64=st.booleans(), n=st.integers(0, 100_000),
       seed=st.integers(0, 2 ** 32 - 1), ncuts=st.integers(0, 12))
def test_random_chunkings(name, f64, n, seed, ncuts):
    rng = np.random.default_rng(seed)
    dt = np.float64 if f64 else np.float32
    if name in ("cross_entropy", "triplet_margin_loss"):
        n = n // 20                      # rows of 11 classes / 3 features: keep the test fast
    operands, f, opts, data = _case(name, rng, n, dt)
    if n == 0 and name == "kl_div":
        opts = {}                        # batchmean of an empty batch divides by 0: both NaN anyway
    expected = f(*operands, **opts, **data)
    pieces = _pieces(n, _cuts(n, rng, ncuts))
    acc = _stream(name, operands, opts, data, pieces)
    u = ulps_for(expected)
    assert_ulps(acc.result(), expected, u, what=f"{name} n={n} pieces={pieces}")
    # merge: one accumulator per piece, merged in two orders
    parts = [_stream(name, operands, opts, data, [p]) for p in pieces]
    fwd = metrics.accumulator(name, **opts)
    for p in parts:
        fwd.merge(p)
    rev = metrics.accumulator(name, **opts)
    for p in reversed(parts):
        rev.merge(pickle.loads(pickle.dumps(p)))
    assert_ulps(fwd.result(), expected, u, what="merged")
    assert_ulps(rev.result(), expected, u, what="merged in reverse")
    assert_ulps(rev.result(), fwd.result(), 2, what="order")


def test_large_float32_mean_within_2ulp(rng):
    x = (rng.normal(size=100_000) * 10 + 100).astype(np.float32)
    t = np.zeros_like(x)
    expected = fastloss.mse_loss(x, t)
    for k in (3, 50):
        acc = _stream("mse_loss", (x, t), {}, {}, _pieces(x.size, _cuts(x.size, rng, k)))
        assert_ulps(acc.result(), expected)


# ---- state: pickle, reset, empty, repr ---------------------------------------------------------

def test_pickle_round_trip_continues(rng):
    operands, f, opts, data = _case("cross_entropy", rng, 90, np.float32)
    acc = _stream("cross_entropy", operands, opts, data, [(0, 40)])
    clone = pickle.loads(pickle.dumps(acc))
    for a in (acc, clone):
        a.update(operands[0][40:], operands[1][40:], sample_weight=data["sample_weight"][40:])
    assert acc.result() == clone.result()
    assert acc.summary() == clone.summary()
    assert_ulps(clone.result(), f(*operands, **opts, **data), 2)


def test_reset_and_empty():
    acc = metrics.accumulator("mse_loss")
    r = acc.result()
    assert np.isnan(r) and r.dtype == np.float64            # documented: mean of nothing
    assert metrics.accumulator("mse_loss", reduction="sum").result() == 0.0
    acc.update(np.ones(3, np.float32), np.zeros(3, np.float32))
    assert acc.result() == np.float32(1.0)
    assert acc.reset() is acc and np.isnan(acc.result()) and acc.n_updates == 0
    ce = metrics.CrossEntropy()
    assert np.isnan(ce.result()) and math.isnan(ce.accuracy())
    ce.update(np.zeros((2, 3), np.float32), np.array([-100, -100]))
    assert np.isnan(ce.result()) and ce.result().dtype == np.float32 and ce.n_tokens == 0
    assert np.isnan(fastloss.cross_entropy(np.zeros((2, 3), np.float32), np.array([-100, -100])))


def test_update_and_merge_return_self():
    a = metrics.MSELoss()
    b = metrics.MSELoss()
    assert a.update(np.ones(2), np.zeros(2)) is a
    assert a.merge(b) is a
    assert a.result() == 1.0


# ---- RMSE per output (scikit-learn semantics) -----------------------------------------------------

def _sklearn_rmse(y_true, y_pred, sample_weight=None, multioutput="raw_values"):
    """root_mean_squared_error as scikit-learn defines it: per output column
    sqrt(average((y_true - y_pred)**2, axis=0, weights=sample_weight)); uniform_average: their mean."""
    err = (np.asarray(y_true, np.float64) - np.asarray(y_pred, np.float64)) ** 2
    raw = np.sqrt(np.average(err, axis=0, weights=sample_weight))
    return raw if multioutput == "raw_values" else np.average(raw)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_rmse_multioutput(dt, weighted, rng):
    yt = rng.normal(size=(500, 4)).astype(dt)
    yp = rng.normal(size=(500, 4)).astype(dt)
    sw = rng.uniform(0.1, 3, size=500) if weighted else None
    for mo in ("raw_values", "uniform_average"):
        acc = metrics.RMSE(multioutput=mo)
        for a, b in [(0, 7), (7, 300), (300, 500)]:
            acc.update(yp[a:b], yt[a:b], **({"sample_weight": sw[a:b]} if weighted else {}))
        got = acc.result()
        exp = _sklearn_rmse(yt, yp, sw, mo)
        tol = 1e-6 if dt == np.float32 else 1e-13
        np.testing.assert_allclose(np.asarray(got, np.float64), exp, rtol=tol)
        # a float64 sample_weight promotes as everywhere in fastloss (NumPy's rules)
        assert np.asarray(got).dtype == (np.float64 if weighted else dt)
        if mo == "raw_values":
            assert got.shape == (4,)
            exp1 = fastloss.rmse(yp, yt, weight=None if sw is None else sw[:, None], axis=0)
            assert_ulps(got, exp1, ulps_for(exp1))


def test_rmse_multioutput_merge_and_errors(rng):
    y = rng.normal(size=(20, 2))
    a = metrics.RMSE(multioutput="raw_values").update(y[:10], 0 * y[:10])
    b = metrics.RMSE(multioutput="raw_values").update(y[10:], 0 * y[10:])
    assert_ulps(a.merge(b).result(), _sklearn_rmse(0 * y, y))
    with pytest.raises(ValueError, match="outputs of shape"):
        a.update(np.zeros((3, 5)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="sample_weight"):
        metrics.RMSE(multioutput="raw_values").update(y, y, sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="multioutput"):
        metrics.RMSE(multioutput="variance_weighted")
    with pytest.raises(ValueError, match="merge"):
        metrics.RMSE(multioutput="raw_values").merge(metrics.RMSE())


# ---- cross-entropy: perplexity, accuracy, top-k -------------------------------------------------

def _ref_rank(x, t, ignore_index=-100):
    """rank via a stable descending sort (NaN first, i.e. above every number; ties by index)."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    out = np.empty(len(t), np.int64)
    for r, (row, y) in enumerate(zip(x, t)):
        if y == ignore_index:
            out[r] = -1
            continue
        key = np.where(np.isnan(row), -np.inf, -row)           # ascending key: NaN and large first
        nan_first = np.where(np.isnan(row), 0, 1)
        order = np.lexsort((np.arange(len(row)), key, nan_first))
        out[r] = int(np.flatnonzero(order == y)[0])
    return out


@pytest.mark.parametrize("dt", ["float16", "bfloat16", "float32", "float64"])
def test_rank_kernel_vs_argsort(dt, isa, rng):
    if dt == "bfloat16" and BF16 is None:
        pytest.skip("ml_dtypes missing")
    d = BF16 if dt == "bfloat16" else np.dtype(dt)
    cases = [(9, 1), (9, 7), (13, 3000), (3, 70_000)]            # the last: few long rows (split path)
    for n, V in cases:
        x = rng.integers(-4, 4, size=(n, V)).astype(d)          # many ties
        t = rng.integers(0, V, size=n)
        t[-1] = -100
        if V > 3:
            x[0, 1] = np.nan                                    # NaN before a numeric target: a miss
            t[1] = 2
            x[1, 2] = np.nan                                    # NaN target
            x[1, 0] = np.nan
        expected = _ref_rank(x, t)
        results = []
        for nth in (1, 2, 3):
            ce = fastloss.classification._CE(x, t, None, None, -100, "mean", 0.0, 0.0, None, -1, nth)
            rank = np.full(n, -7, np.int64)
            _core.cross_entropy_rows(ce.x, None, "none", ce.t, None, float(V), None, -100, 0.0, 0.0, 0.0, 1.0,
                                     np.empty(n), None, nth, None, row_rank=rank)
            results.append(rank)
            np.testing.assert_array_equal(rank, expected, err_msg=f"{dt} V={V} threads={nth}")
        # rank 0 <=> np.argmax == target (first index on ties)
        act = t != -100
        np.testing.assert_array_equal((results[0] == 0)[act],
                                      (np.argmax(x.astype(np.float64), axis=1) == t)[act])


def test_rank_strided_and_softcap(rng):
    big = rng.integers(-3, 3, size=(8, 40)).astype(np.float32)
    x = big[::2, 1:30]                                          # strided rows, offset columns
    t = rng.integers(0, 29, size=4)
    acc = metrics.CrossEntropy(topk=(1, 3)).update(x, t)
    r = _ref_rank(x, t)
    assert acc.accuracy() == np.mean(r == 0) and acc.topk_accuracy(3) == np.mean(r < 3)
    # softcap: ties are kept (tanh is monotone), so the rank equals that of the raw logits here
    acc2 = metrics.CrossEntropy(softcap=5.0).update(x, t)
    assert acc2.accuracy() == acc.accuracy()
    assert_ulps(acc2.result(), fastloss.cross_entropy(x, t, softcap=5.0))


def test_rank_bad_modes():
    x = np.zeros((2, 3), np.float32)
    rank = np.empty(2, np.int64)
    with pytest.raises(ValueError, match="row_rank"):
        _core.cross_entropy_rows(x, x.copy(), "grad", np.array([0, 1]), None, 3.0, None, -100, 0.0, 0.0, 0.0, 1.0,
                                 None, None, 1, None, row_rank=rank)
    with pytest.raises(ValueError, match="row_rank"):
        _core.cross_entropy_rows(x, None, "none", None, None, 3.0, None, -100, 0.0, 0.0, 0.0, 1.0,
                                 None, np.empty(2), 1, None, row_rank=rank)


def test_accuracy_topk_perplexity_summary(rng):
    n, V = 600, 50
    x = rng.normal(size=(n, V)).astype(np.float32)
    t = rng.integers(0, V, size=n)
    t[::9] = -100
    acc = metrics.accumulator("cross_entropy", topk=(1, 5, 10))
    for a, b in _pieces(n, [100, 101, 450]):
        acc.update(x[a:b], t[a:b], num_threads=2)
    r = _ref_rank(x, t)
    act = r >= 0
    assert acc.n_tokens == act.sum() and acc.n_rows == n
    for k in (1, 5, 10):
        assert acc.topk_accuracy(k) == np.count_nonzero(act & (r < k)) / act.sum()
    assert acc.accuracy() == acc.topk_accuracy(1)
    assert_ulps(acc.perplexity(), fastloss.perplexity(x, t))
    s = acc.summary()
    assert s["top5_accuracy"] == acc.topk_accuracy(5) and s["tokens"] == acc.n_tokens
    assert s["cross_entropy"] == float(fastloss.cross_entropy(x, t)) or abs(
        s["cross_entropy"] - float(fastloss.cross_entropy(x, t))) <= 2 * np.spacing(np.float32(s["cross_entropy"]))
    with pytest.raises(ValueError, match="topk"):
        acc.topk_accuracy(3)
    p = metrics.accumulator("perplexity")
    p.update(x[:300], t[:300]).update(x[300:], t[300:])
    assert_ulps(p.result(), fastloss.perplexity(x, t))


def test_topk_none(rng):
    x = rng.normal(size=(20, 6)).astype(np.float32)
    t = rng.integers(0, 6, size=20)
    acc = metrics.CrossEntropy(topk=None).update(x, t)
    assert acc.options["topk"] == () and "accuracy" not in acc.summary()
    assert_ulps(acc.result(), fastloss.cross_entropy(x, t))
    with pytest.raises(ValueError, match="topk=None"):
        acc.accuracy()


def test_soft_targets_have_no_accuracy(rng):
    x = rng.normal(size=(6, 4))
    q = fastloss.softmax(rng.normal(size=(6, 4)))
    acc = metrics.CrossEntropy().update(x[:2], q[:2]).update(x[2:], q[2:])
    assert_ulps(acc.result(), fastloss.cross_entropy(x, q))
    assert math.isnan(acc.accuracy()) and acc.n_tokens == 0


def test_thread_counts_bitwise(rng):
    x = rng.normal(size=(300, 3000)).astype(np.float32)
    t = rng.integers(0, 3000, size=300)
    res = [metrics.CrossEntropy().update(x, t, num_threads=k).summary() for k in (1, 2, 3)]
    assert res[0] == res[1] == res[2]


# ---- bad input ----------------------------------------------------------------------------------

def test_bad_input():
    with pytest.raises(ValueError, match="unknown loss"):
        metrics.accumulator("nope")
    with pytest.raises(TypeError, match="loss must be a str"):
        metrics.accumulator(3)
    with pytest.raises(ValueError, match="dpo_loss"):
        metrics.accumulator("dpo_loss")
    with pytest.raises(ValueError, match="info_nce_loss"):
        metrics.accumulator("info_nce_loss")
    with pytest.raises(ValueError, match="reduction"):
        metrics.accumulator("mse_loss", reduction="none")
    with pytest.raises(TypeError, match="unknown option"):
        metrics.accumulator("mse_loss", delta=1.0)
    with pytest.raises(ValueError, match="delta"):
        metrics.accumulator("huber_loss", delta=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        metrics.accumulator("cross_entropy", label_smoothing=2.0)
    with pytest.raises(ValueError, match="topk"):
        metrics.accumulator("cross_entropy", topk=(0,))
    acc = metrics.accumulator("huber_loss", delta=0.5)
    with pytest.raises(ValueError, match="delta"):
        acc.update(np.ones(2), np.zeros(2), delta=0.7)
    acc.update(np.ones(2), np.zeros(2), delta=0.5)               # equal option: accepted
    with pytest.raises(TypeError, match="unexpected keyword"):
        acc.update(np.ones(2), np.zeros(2), sample_weight=np.ones(2))
    with pytest.raises(TypeError, match="input, target"):
        acc.update(np.ones(2))
    with pytest.raises(ValueError, match="different options"):
        acc.merge(metrics.accumulator("huber_loss", delta=0.6))
    with pytest.raises(ValueError, match="merge"):
        acc.merge(metrics.accumulator("mse_loss"))
    before = acc.result()
    with pytest.raises(ValueError, match="target"):
        acc.update(np.ones(3), np.zeros(4))
    with pytest.raises(ValueError, match="probabilities"):
        metrics.accumulator("binary_cross_entropy").update(np.full(2, 2.0), np.zeros(2))
    with pytest.raises(IndexError):
        metrics.accumulator("cross_entropy").update(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(TypeError, match="integer class indices"):
        metrics.accumulator("cross_entropy").update(np.zeros((2, 3)), np.array([0.0, 1.0]))
    assert acc.result() == before and acc.n_updates == 1          # failed updates changed nothing
