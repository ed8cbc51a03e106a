"""multi_margin_loss and triplet_margin_loss: torch parity (value and autograd gradient), the
float64 reference over every dtype, finite differences, extremes, layouts, threads, ISAs, bad input."""
from __future__ import annotations

import numpy as np
import pytest

import fastloss
from fastloss import reference
from fl_testing import assert_close, assert_identical, get_dtype, loss_dtype_for

DTYPES = ("float16", "float32", "float64", "bfloat16")
# relative tolerance of the loss / gradient against the float64 reference, per input dtype
# (16-bit inputs are exact in float32, so they get float32 tolerances on the same values)
RTOL = {"float16": 2e-5, "float32": 2e-5, "float64": 1e-12, "bfloat16": 2e-5}


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _rounded(rng, shape, dtype_name, scale=1.0):
    """Random values representable in the dtype, plus their float64 copy."""
    x = (rng.standard_normal(shape) * scale).astype(get_dtype(dtype_name))
    return x, _f64(x)


# ---- multi-margin ------------------------------------------------------------------------------

MM_OPTIONS = [dict(), dict(p=2), dict(margin=0.3), dict(p=2, margin=2.5, weight="w"), dict(weight="w")]


def _mm_kwargs(opts, C, rng):
    kw = dict(opts)
    if kw.get("weight") == "w":
        kw["weight"] = rng.random(C) + 0.25
    return kw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", MM_OPTIONS, ids=str)
@pytest.mark.parametrize("shape", [(6, 11), (11,), (3, 40)])
def test_mm_matches_torch(shape, opts, reduction, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = rng.standard_normal(shape)
    t = rng.integers(0, shape[-1], shape[:-1])
    kw = _mm_kwargs(opts, shape[-1], rng)
    xt = torch.tensor(x, requires_grad=True)
    tkw = dict(kw)
    if "weight" in tkw:
        tkw["weight"] = torch.tensor(tkw["weight"])
    ref = F.multi_margin_loss(xt, torch.tensor(t), reduction=reduction, **tkw)
    ref.sum().backward()
    loss, grad = fastloss.multi_margin_loss_with_grad(x, t, reduction=reduction, **kw)
    assert_close(np.asarray(loss), ref.detach().numpy(), rtol=1e-12, atol=1e-15, what="loss")
    assert_close(grad, xt.grad.numpy(), rtol=1e-12, atol=1e-15, what="grad")
    assert_close(np.asarray(fastloss.multi_margin_loss(x, t, reduction=reduction, **kw)),
                 ref.detach().numpy(), rtol=1e-12, atol=1e-15, what="loss without grad")


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("opts", MM_OPTIONS[:4], ids=str)
def test_mm_matches_reference(dtype_name, opts, isa, rng):
    x, x64 = _rounded(rng, (9, 37), dtype_name, 2.0)
    t = rng.integers(0, 37, 9)
    kw = _mm_kwargs(opts, 37, rng)
    for red in ("mean", "sum", "none"):
        loss, grad = fastloss.multi_margin_loss_with_grad(x, t, reduction=red, **kw)
        assert np.asarray(loss).dtype == loss_dtype_for(x.dtype) and grad.dtype == x.dtype
        assert_close(np.asarray(loss), reference.multi_margin_loss(x64, t, reduction=red, **kw),
                     rtol=RTOL[dtype_name], atol=1e-6, what=f"loss {red}")
        gref = reference.multi_margin_loss_grad(x64, t, reduction=red, **kw)
        gtol = 1e-12 if dtype_name == "float64" else float(np.finfo(np.float32).eps) * 4
        if dtype_name in ("float16", "bfloat16"):          # the gradient is rounded to the 16-bit dtype
            gtol = 2.0 ** -7 if dtype_name == "bfloat16" else 2.0 ** -10
        assert_close(_f64(grad), gref, rtol=gtol, atol=1e-7, what=f"grad {red}")


@pytest.mark.parametrize("p", [1, 2])
def test_mm_finite_differences(p, rng):
    x = rng.standard_normal((4, 7))
    t = rng.integers(0, 7, 4)
    w = rng.random(7) + 0.5
    _, g = fastloss.multi_margin_loss_with_grad(x, t, p=p, weight=w, margin=0.8)
    h = 1e-6
    fd = np.zeros_like(x)
    for idx in np.ndindex(x.shape):           # 4th-order central differences
        def f(d):
            y = x.copy()
            y[idx] += d
            return float(fastloss.multi_margin_loss(y, t, p=p, weight=w, margin=0.8))
        fd[idx] = (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * h)
    assert_close(g, fd, rtol=1e-6, atol=1e-8, what="fd grad")


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_mm_extremes(dtype_name, rng):
    x = (rng.standard_normal((5, 33)) * 1e4).astype(dtype_name)
    x[0, 3] = 1e4
    x[1] = -1e4
    t = rng.integers(0, 33, 5)
    for p in (1, 2):
        loss, grad = fastloss.multi_margin_loss_with_grad(x, t, p=p, reduction="none")
        assert_close(loss, reference.multi_margin_loss(_f64(x), t, p=p, reduction="none"),
                     rtol=1e-5 if dtype_name == "float32" else 1e-12, what=f"loss p={p}")
        assert np.all(np.isfinite(grad))
        assert_close(_f64(grad), reference.multi_margin_loss_grad(_f64(x), t, p=p, reduction="none"),
                     rtol=1e-5 if dtype_name == "float32" else 1e-12, atol=1e-3 / 33, what=f"grad p={p}")


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float64"])
def test_mm_grad_in_place_and_strided(dtype_name, isa, rng):
    base, _ = _rounded(rng, (6, 50), dtype_name)
    x = base[:, :-1]                          # row stride 50, C = 49: no copy
    xr = base[::-1, :49]                      # negative row stride
    t = rng.integers(0, 49, 6)
    for view in (x, xr):
        expect_loss, expect_grad = fastloss.multi_margin_loss_with_grad(np.ascontiguousarray(view), t, p=2)
        loss, grad = fastloss.multi_margin_loss_with_grad(view, t, p=2)
        assert_identical(np.asarray(loss), np.asarray(expect_loss), what="strided loss")
        assert_identical(grad, expect_grad, what="strided grad")
        work = view.copy()
        loss2, g2 = fastloss.multi_margin_loss_with_grad(work, t, p=2, grad_out=work)
        assert g2 is work
        assert_identical(np.asarray(loss2), np.asarray(expect_loss), what="in-place loss")
        assert_identical(work, expect_grad, what="in-place grad")


def test_mm_long_rows_threads_bitwise(isa, rng):
    # one row of 70001 classes (3 parts) and three rows of 40000: parts spread over threads
    for shape in ((1, 70001), (3, 40000), (64, 600)):
        x = rng.standard_normal(shape).astype(np.float32)
        t = rng.integers(0, shape[-1], shape[:-1])
        t[0] = shape[-1] - 1
        res = [fastloss.multi_margin_loss_with_grad(x, t, p=2, num_threads=n) for n in (1, 2, 3)]
        for loss, grad in res[1:]:
            assert_identical(np.asarray(loss), np.asarray(res[0][0]), what=f"{shape} loss")
            assert_identical(grad, res[0][1], what=f"{shape} grad")
        assert_close(np.asarray(res[0][0]), reference.multi_margin_loss(_f64(x), t, p=2), rtol=1e-5, what="loss")
        work = x.copy()                       # in place with parts on different threads
        fastloss.multi_margin_loss_with_grad(work, t, p=2, num_threads=2, grad_out=work)
        assert_identical(work, res[0][1], what=f"{shape} in place")


def test_mm_c1_and_empty():
    loss, grad = fastloss.multi_margin_loss_with_grad(np.array([[3.0], [1.0]]), np.array([0, 0]))
    assert loss == 0.0 and np.all(grad == 0)
    e = np.zeros((0, 5), np.float32)
    assert np.isnan(fastloss.multi_margin_loss(e, np.zeros(0, np.int64)))
    assert fastloss.multi_margin_loss(e, np.zeros(0, np.int64), reduction="sum") == 0.0
    assert fastloss.multi_margin_loss(e, np.zeros(0, np.int64), reduction="none").shape == (0,)


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, t: fastloss.multi_margin_loss(x, t, p=3), ValueError, "p must be 1 or 2"),
    (lambda x, t: fastloss.multi_margin_loss(x, t, p=1.5), ValueError, "p must be 1 or 2"),
    (lambda x, t: fastloss.multi_margin_loss(x, t, p="1"), TypeError, "p must be"),
    (lambda x, t: fastloss.multi_margin_loss(x, t, margin=float("nan")), ValueError, "margin"),
    (lambda x, t: fastloss.multi_margin_loss(x, t, margin=None), TypeError, "margin"),
    (lambda x, t: fastloss.multi_margin_loss(x, t, reduction="batchmean"), ValueError, "reduction"),
    (lambda x, t: fastloss.multi_margin_loss(x, t, weight=np.ones(4)), ValueError, "weight"),
    (lambda x, t: fastloss.multi_margin_loss(x, t[:2]), ValueError, "target has shape"),
    (lambda x, t: fastloss.multi_margin_loss(x, t.astype(float)), TypeError, "target"),
    (lambda x, t: fastloss.multi_margin_loss(x, None), TypeError, "target"),
    (lambda x, t: fastloss.multi_margin_loss(x, np.array([0, 5, 1])), IndexError, "target 5 at row 1"),
    (lambda x, t: fastloss.multi_margin_loss(x, np.array([0, 1, -1])), IndexError, "target -1 at row 2"),
    (lambda x, t: fastloss.multi_margin_loss(x.astype(int), t), TypeError, "input"),
    (lambda x, t: fastloss.multi_margin_loss(np.float64(1.0), t), ValueError, "input"),
    (lambda x, t: fastloss.multi_margin_loss_with_grad(x, t, grad_out=np.empty((3, 5), np.float32)), TypeError,
     "grad_out"),
    (lambda x, t: fastloss.multi_margin_loss_with_grad(x, t, grad_out=np.empty((3, 4))), ValueError, "grad_out"),
])
def test_mm_bad_input(call, exc, match):
    x = np.zeros((3, 5))
    t = np.array([0, 1, 2])
    with pytest.raises(exc, match=match):
        call(x, t)


# ---- triplet margin ----------------------------------------------------------------------------

TRI_OPTIONS = [dict(), dict(swap=True), dict(p=1.0), dict(p=1.0, swap=True), dict(p=3.0, margin=0.2),
               dict(p=0.7, swap=True), dict(eps=0.0, margin=2.0), dict(eps=0.1, margin=0.05)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", TRI_OPTIONS, ids=str)
def test_triplet_matches_torch(opts, reduction, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    arrs = [rng.standard_normal((8, 13)) for _ in range(3)]
    arrs[2][0] = arrs[1][0]                          # a tie d(a, n) == d(p, n)... and more
    arrs[1][1] = arrs[0][1]                          # a zero difference (u = eps)
    ts = [torch.tensor(a, requires_grad=True) for a in arrs]
    ref = F.triplet_margin_loss(*ts, reduction=reduction, **opts)
    ref.sum().backward()
    loss, *grads = fastloss.triplet_margin_loss_with_grad(*arrs, reduction=reduction, **opts)
    assert_close(np.asarray(loss), ref.detach().numpy(), rtol=1e-12, atol=1e-14, what="loss")
    for g, tt, n in zip(grads, ts, ("anchor", "positive", "negative")):
        assert_close(g, tt.grad.numpy(), rtol=1e-10, atol=1e-13, what=f"grad {n}")
    assert_close(np.asarray(fastloss.triplet_margin_loss(*arrs, reduction=reduction, **opts)),
                 ref.detach().numpy(), rtol=1e-12, atol=1e-14, what="loss without grad")


def test_triplet_1d_matches_torch(rng):
    torch = pytest.importorskip("torch")
    arrs = [rng.standard_normal(9) for _ in range(3)]
    ref = torch.nn.functional.triplet_margin_loss(*[torch.tensor(a) for a in arrs], reduction="none")
    got = fastloss.triplet_margin_loss(*arrs, reduction="none")
    assert got.shape == tuple(ref.shape)
    assert_close(got, ref.numpy(), rtol=1e-12)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("opts", [dict(), dict(swap=True, p=1.0), dict(p=1.5)], ids=str)
def test_triplet_matches_reference(dtype_name, opts, isa, rng):
    arrs = [_rounded(rng, (7, 3000), dtype_name)[0] for _ in range(3)]    # 2 blocks per row
    a64 = [_f64(a) for a in arrs]
    for red in ("mean", "sum", "none"):
        loss, *grads = fastloss.triplet_margin_loss_with_grad(*arrs, reduction=red, **opts)
        assert np.asarray(loss).dtype == loss_dtype_for(arrs[0].dtype)
        # the loss is a difference of two distances: its error is relative to their size
        pn = opts.get("p", 2.0)
        dist = np.sum(np.abs(a64[0] - a64[1]) ** pn + np.abs(a64[0] - a64[2]) ** pn, -1) ** (1 / pn)
        scale = dist.sum() if red == "sum" else (dist.mean() if red == "mean" else dist)
        assert_close(np.asarray(loss), reference.triplet_margin_loss(*a64, reduction=red, **opts),
                     rtol=1e-12 if dtype_name == "float64" else 1e-5,
                     atol=(1e-13 if dtype_name == "float64" else 1e-6) * scale, what=f"loss {red}")
        grefs = reference.triplet_margin_loss_grad(*a64, reduction=red, **opts)
        gtol = {"float64": 1e-10, "float32": 1e-4, "float16": 2.0 ** -9, "bfloat16": 2.0 ** -6}[dtype_name]
        for g, gr in zip(grads, grefs):
            assert g.dtype == arrs[0].dtype
            assert_close(_f64(g), gr, rtol=gtol, atol=gtol * np.abs(gr).max(), what=f"grad {red}")


@pytest.mark.parametrize("opts", [dict(), dict(p=1.5, swap=True)], ids=str)
def test_triplet_finite_differences(opts, rng):
    arrs = [rng.standard_normal((3, 5)) for _ in range(3)]
    _, *grads = fastloss.triplet_margin_loss_with_grad(*arrs, margin=3.0, **opts)
    h = 1e-6
    for k in range(3):
        fd = np.zeros_like(arrs[k])
        for idx in np.ndindex(fd.shape):
            def f(d):
                ys = [a.copy() for a in arrs]
                ys[k][idx] += d
                return float(fastloss.triplet_margin_loss(*ys, margin=3.0, **opts))
            fd[idx] = (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * h)
        assert_close(grads[k], fd, rtol=1e-6, atol=1e-8, what=f"fd grad {k}")


def test_triplet_threads_strided_extremes(isa, rng):
    base = [rng.standard_normal((300, 130)).astype(np.float32) * 1e4 for _ in range(3)]
    views = [b[::-1, :-2] for b in base]                      # negative row strides, D = 128
    dense = [np.ascontiguousarray(v) for v in views]
    res = [fastloss.triplet_margin_loss_with_grad(*views, swap=True, num_threads=n) for n in (1, 2, 3)]
    expect = fastloss.triplet_margin_loss_with_grad(*dense, swap=True, num_threads=1)
    for r in res:
        for got, exp in zip(r, expect):
            assert_identical(np.asarray(got), np.asarray(exp), what="threads/strided")
    assert_close(np.asarray(res[0][0]), reference.triplet_margin_loss(*[_f64(v) for v in views], swap=True),
                 rtol=1e-5, what="loss at 1e4")


def test_triplet_empty_and_zero_features():
    e = [np.zeros((0, 4))] * 3
    assert np.isnan(fastloss.triplet_margin_loss(*e))
    assert fastloss.triplet_margin_loss(*e, reduction="sum") == 0.0
    z = [np.zeros((2, 0))] * 3
    assert fastloss.triplet_margin_loss(*z, margin=0.5) == 0.5


@pytest.mark.parametrize("kw,exc,match", [
    (dict(p=0.0), ValueError, "p must be"),
    (dict(p=float("inf")), ValueError, "p must be"),
    (dict(p="2"), TypeError, "p must be"),
    (dict(margin=float("inf")), ValueError, "margin"),
    (dict(margin=0.0), ValueError, "margin must be > 0"),
    (dict(eps=None), TypeError, "eps"),
    (dict(swap=1), TypeError, "swap"),
    (dict(reduction="avg"), ValueError, "reduction"),
])
def test_triplet_bad_options(kw, exc, match):
    a = np.zeros((2, 3))
    with pytest.raises(exc, match=match):
        fastloss.triplet_margin_loss(a, a, a, **kw)


def test_triplet_bad_arrays():
    a = np.zeros((2, 3))
    with pytest.raises(ValueError, match="positive has shape"):
        fastloss.triplet_margin_loss(a, np.zeros((2, 4)), a)
    with pytest.raises(ValueError, match="negative has shape"):
        fastloss.triplet_margin_loss(a, a, np.zeros((3,)))
    with pytest.raises(TypeError, match="negative"):
        fastloss.triplet_margin_loss(a, a, np.zeros((2, 3), int))
    with pytest.raises(TypeError, match="anchor"):
        fastloss.triplet_margin_loss(None, a, a)
    with pytest.raises(ValueError, match="anchor"):
        fastloss.triplet_margin_loss(np.float64(1), np.float64(1), np.float64(1))


def test_triplet_mixed_dtypes_give_grads_in_each_dtype(rng):
    a = rng.standard_normal((4, 6)).astype(np.float32)
    p = rng.standard_normal((4, 6))
    n = rng.standard_normal((4, 6)).astype(np.float16)
    loss, ga, gp, gn = fastloss.triplet_margin_loss_with_grad(a, p, n)
    assert (ga.dtype, gp.dtype, gn.dtype) == (np.float32, np.float64, np.float16)
    assert np.asarray(loss).dtype == np.float64       # computed in the common dtype, float64
    assert_close(np.asarray(loss), reference.triplet_margin_loss(a, p, n), rtol=1e-12)
