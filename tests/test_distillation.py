"""kl_div_logits (distillation): torch parity (value and autograd gradient), the float64 reference
over every dtype, finite differences, extremes and masked teachers, layouts, in place, threads,
ISAs, long rows split over threads, bad input."""
from __future__ import annotations

import numpy as np
import pytest

import fastloss
from fastloss import reference
from fl_testing import assert_close, assert_identical, get_dtype, loss_dtype_for

DTYPES = ("float16", "float32", "float64", "bfloat16")
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _torch_kl(torch, s, t, T, reduction, target=None, ignore_index=-100, log_target=True):
    """The torch formula of the brief (per-row sums for "none"), with ignored rows dropped."""
    F = torch.nn.functional
    ls = F.log_softmax(s / T, -1)
    lt = F.log_softmax(t / T, -1)
    if log_target:
        el = F.kl_div(ls, lt, log_target=True, reduction="none")
    else:
        el = F.kl_div(ls, lt.exp(), reduction="none")
    rows = el.sum(-1) * T ** 2
    if target is not None:
        keep = torch.tensor(target != ignore_index)
        rows = torch.where(keep, rows, torch.zeros_like(rows))
        n = int(keep.sum())
    else:
        n = rows.numel()
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (n if reduction == "batchmean" else n * s.shape[-1])


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")   # torch's kl_div "mean" notice
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("T", [1.0, 0.5, 4.0])
def test_matches_torch_batchmean_formula(T, reduction, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    s, t = rng.standard_normal((6, 29)) * 3, rng.standard_normal((6, 29)) * 3
    st = torch.tensor(s, requires_grad=True)
    ref = _torch_kl(torch, st, torch.tensor(t), T, reduction)
    if reduction in ("batchmean", "sum", "mean"):      # the brief's literal torch code agrees
        lit = F.kl_div(F.log_softmax(st / T, -1), F.log_softmax(torch.tensor(t) / T, -1), log_target=True,
                       reduction=reduction) * T ** 2
        assert_close(lit.detach().numpy(), ref.detach().numpy(), rtol=1e-12)
    ref.sum().backward()
    loss, grad = fastloss.kl_div_logits_with_grad(s, t, temperature=T, reduction=reduction)
    assert_close(np.asarray(loss), ref.detach().numpy(), rtol=1e-11, atol=1e-14, what="loss")
    assert_close(grad, st.grad.numpy(), rtol=1e-10, atol=1e-15, what="grad")
    assert_close(np.asarray(fastloss.kl_div_logits(s, t, temperature=T, reduction=reduction)),
                 ref.detach().numpy(), rtol=1e-11, atol=1e-14, what="loss without grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_ignore_index_matches_torch(reduction, ignore_index, rng):
    torch = pytest.importorskip("torch")
    s, t = rng.standard_normal((3, 4, 17)), rng.standard_normal((3, 4, 17))
    target = rng.integers(0, 5, (3, 4))
    target[0, 0] = ignore_index
    target[2, 1] = ignore_index
    st = torch.tensor(s, requires_grad=True)
    ref = _torch_kl(torch, st, torch.tensor(t), 2.0, reduction, target, ignore_index)
    ref.sum().backward()
    loss, grad = fastloss.kl_div_logits_with_grad(s, t, temperature=2.0, reduction=reduction, target=target,
                                                  ignore_index=ignore_index)
    assert_close(np.asarray(loss), ref.detach().numpy(), rtol=1e-11, atol=1e-14, what="loss")
    assert_close(grad, st.grad.numpy(), rtol=1e-10, atol=1e-15, what="grad")
    assert np.all(grad[0, 0] == 0) and np.all(grad[2, 1] == 0)
    assert_close(np.asarray(loss), reference.kl_div_logits(s, t, temperature=2.0, reduction=reduction,
                                                           target=target, ignore_index=ignore_index), rtol=1e-11)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_matches_reference(dtype_name, isa, rng):
    dt = get_dtype(dtype_name)
    s = (rng.standard_normal((5, 3001)) * 2).astype(dt)     # 2 blocks per row
    t = (rng.standard_normal((5, 3001)) * 2).astype(dt)
    s64, t64 = _f64(s), _f64(t)
    for T in (1.0, 2.5):
        for red in REDUCTIONS:
            loss, grad = fastloss.kl_div_logits_with_grad(s, t, temperature=T, reduction=red)
            assert np.asarray(loss).dtype == loss_dtype_for(dt) and grad.dtype == dt
            ref = reference.kl_div_logits(s64, t64, temperature=T, reduction=red)
            # KL is a difference of terms of the size of the logits: error relative to them
            atol = 1e-13 if dtype_name == "float64" else 2e-6 * (1 if red != "sum" else 5)
            assert_close(np.asarray(loss), ref, rtol=1e-11 if dtype_name == "float64" else 1e-5, atol=atol,
                         what=f"loss T={T} {red}")
            gref = reference.kl_div_logits_grad(s64, t64, temperature=T, reduction=red)
            gtol = {"float64": 1e-10, "float32": 1e-5, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}[dtype_name]
            # a difference of two probabilities rounded to the gradient's dtype: error relative to the terms
            atol = (gtol if dtype_name in ("float16", "bfloat16") else 1e-6) * np.abs(gref).max()
            if dtype_name == "float16":
                atol += 2.0 ** -24                            # float16's subnormal spacing
            assert_close(_f64(grad), gref, rtol=gtol, atol=atol, what=f"grad T={T} {red}")


def test_mixed_dtypes(rng):
    ml = pytest.importorskip("ml_dtypes")
    s = rng.standard_normal((4, 50)).astype(np.float32)
    t = rng.standard_normal((4, 50)).astype(ml.bfloat16)        # read in its own dtype
    loss, grad = fastloss.kl_div_logits_with_grad(s, t)
    assert grad.dtype == np.float32 and np.asarray(loss).dtype == np.float32
    assert_close(np.asarray(loss), reference.kl_div_logits(s, t), rtol=1e-5)
    s64 = _f64(s)
    loss64 = fastloss.kl_div_logits(s64, t)                      # teacher converted to float64 (exact)
    assert np.asarray(loss64).dtype == np.float64
    assert_close(np.asarray(loss64), reference.kl_div_logits(s64, t), rtol=1e-12)
    loss16 = fastloss.kl_div_logits(s.astype(np.float16), _f64(t))  # float64 teacher -> float32
    assert_close(np.asarray(loss16), reference.kl_div_logits(s.astype(np.float16), t), rtol=1e-5)


@pytest.mark.parametrize("T", [1.0, 0.7])
def test_finite_differences(T, rng):
    s, t = rng.standard_normal((3, 6)), rng.standard_normal((3, 6))
    _, g = fastloss.kl_div_logits_with_grad(s, t, temperature=T)
    h = 1e-5
    fd = np.zeros_like(s)
    for idx in np.ndindex(s.shape):
        def f(d):
            y = s.copy()
            y[idx] += d
            return float(fastloss.kl_div_logits(y, t, temperature=T))
        fd[idx] = (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * h)
    assert_close(g, fd, rtol=1e-7, atol=1e-10, what="fd grad")


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("T", [0.5, 4.0])
def test_extreme_logits_and_masked_teacher(dtype_name, T, isa, rng):
    torch = pytest.importorskip("torch")
    s = (rng.standard_normal((6, 300)) * 1e4).astype(dtype_name)
    t = (rng.standard_normal((6, 300)) * 1e4).astype(dtype_name)
    t[1] = s[1] + 3.0                                  # KL 0 up to rounding at the size of the logits
    t[2, ::3] = -np.inf                                # masked vocabulary
    t[3, 1:] = -np.inf                                 # one allowed class
    s[4, 5] = -1e4
    loss, grad = fastloss.kl_div_logits_with_grad(s, t, temperature=T, reduction="none")
    st = torch.tensor(s, requires_grad=True)
    ref = _torch_kl(torch, st, torch.tensor(t), T, "none", log_target=False)   # xlogy form: 0 at q = 0
    ref.sum().backward()
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    # absolute error relative to the logits' size / T times T^2 (rounding of the exponents)
    eps = 1e-6 if dtype_name == "float32" else 1e-13
    assert_close(loss, ref.detach().numpy().astype(np.float64), rtol=1e-5, atol=eps * 1e4 * T * 30,
                 what="loss")
    assert_close(_f64(grad), st.grad.numpy().astype(np.float64), rtol=0, atol=T * (1e-3 if dtype_name == "float32"
                                                                                     else 1e-9), what="grad")
    ref64 = reference.kl_div_logits(_f64(s), _f64(t), temperature=T, reduction="none")
    assert_close(loss, ref64, rtol=1e-5, atol=eps * 1e4 * T * 30, what="loss vs reference")


def test_special_rows():
    s = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
    t = np.array([[-np.inf, -np.inf, -np.inf], [np.nan, 0.0, 0.0], [0.0, -np.inf, 0.0]])
    loss = fastloss.kl_div_logits(s, t, reduction="none")
    assert np.isnan(loss[0]) and np.isnan(loss[1])            # softmax of an all -inf row: nan (torch)
    assert_close(loss[2], np.log(1.5), rtol=1e-14)            # q = (1/2, 0, 1/2), r = 1/3 each
    s2 = np.array([[0.0, -np.inf, 0.0]])                       # student -inf where q > 0: +inf
    assert fastloss.kl_div_logits(s2, np.zeros((1, 3))) == np.inf


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float64"])
def test_strided_and_in_place(dtype_name, isa, rng):
    dt = get_dtype(dtype_name)
    base_s = rng.standard_normal((8, 41)).astype(dt)
    base_t = rng.standard_normal((8, 41)).astype(dt)
    cases = [(base_s[:, :-1], base_t[:, :-1]), (base_s[::-1, 1:], base_t[::2][:, 1:].repeat(2, 0))]
    for sv, tv in cases:
        exp_loss, exp_grad = fastloss.kl_div_logits_with_grad(np.ascontiguousarray(sv), np.ascontiguousarray(tv),
                                                              temperature=1.5)
        loss, grad = fastloss.kl_div_logits_with_grad(sv, tv, temperature=1.5)
        assert_identical(np.asarray(loss), np.asarray(exp_loss), what="strided loss")
        assert_identical(grad, exp_grad, what="strided grad")
        work = sv.copy()
        loss2, g2 = fastloss.kl_div_logits_with_grad(work, tv, temperature=1.5, grad_out=work)
        assert g2 is work
        assert_identical(np.asarray(loss2), np.asarray(exp_loss), what="in-place loss")
        assert_identical(work, exp_grad, what="in-place grad")
    # temperature 1, float32: the student is read in place and overwritten block by block
    s = rng.standard_normal((3, 5000)).astype(np.float32)
    t = rng.standard_normal((3, 5000)).astype(np.float32)
    _, exp_grad = fastloss.kl_div_logits_with_grad(s, t)
    work = s.copy()
    fastloss.kl_div_logits_with_grad(work, t, grad_out=work)
    assert_identical(work, exp_grad, what="in place, T = 1")
    # a grad_out with a strided class axis: written through a temporary
    out = np.empty((3, 10000), np.float32)[:, ::2]
    _, g3 = fastloss.kl_div_logits_with_grad(s, t, grad_out=out)
    assert g3 is out
    assert_identical(out, exp_grad, what="strided grad_out")


def test_v1_and_empty():
    loss, grad = fastloss.kl_div_logits_with_grad(np.array([[3.0], [-2.0]]), np.array([[1.0], [5.0]]))
    assert loss == 0.0 and np.all(grad == 0)
    e = np.zeros((0, 7), np.float32)
    assert np.isnan(fastloss.kl_div_logits(e, e))
    assert np.isnan(fastloss.kl_div_logits(e, e, reduction="mean"))
    assert fastloss.kl_div_logits(e, e, reduction="sum") == 0.0
    assert fastloss.kl_div_logits(e, e, reduction="none").shape == (0,)
    x = np.zeros((2, 3))
    all_ignored = np.array([-100, -100])
    assert np.isnan(fastloss.kl_div_logits(x, x, target=all_ignored))
    assert fastloss.kl_div_logits(x, x, target=all_ignored, reduction="sum") == 0.0


def test_threads_bitwise_and_long_rows(isa, rng):
    # V = 128256 with 2 rows (parts over threads), one 40000-class row, and many short rows
    for shape in ((2, 128256), (1, 40000), (300, 257)):
        s = rng.standard_normal(shape).astype(np.float32)
        t = (rng.standard_normal(shape) * 2).astype(np.float32)
        target = np.zeros(shape[:-1], np.int64)
        if shape[0] > 1:
            target[1] = -100
        res = [fastloss.kl_div_logits_with_grad(s, t, temperature=2.0, target=target, num_threads=n)
               for n in (1, 2, 3)]
        for loss, grad in res[1:]:
            assert_identical(np.asarray(loss), np.asarray(res[0][0]), what=f"{shape} loss")
            assert_identical(grad, res[0][1], what=f"{shape} grad")
        ref = reference.kl_div_logits(s, t, temperature=2.0, target=target)
        assert_close(np.asarray(res[0][0]), ref, rtol=1e-5, atol=1e-6, what=f"{shape} loss vs reference")
        work = s.copy()
        fastloss.kl_div_logits_with_grad(work, t, temperature=2.0, target=target, num_threads=2, grad_out=work)
        assert_identical(work, res[0][1], what=f"{shape} in place, 2 threads")


@pytest.mark.parametrize("kw,exc,match", [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature="2"), TypeError, "temperature"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(target=np.zeros(3, np.int64)), ValueError, "target has shape"),
    (dict(target=np.zeros(2)), TypeError, "target"),
    (dict(target="x"), TypeError, "target"),
])
def test_bad_options(kw, exc, match):
    x = np.zeros((2, 4))
    with pytest.raises(exc, match=match):
        fastloss.kl_div_logits(x, x, **kw)


def test_bad_arrays():
    x = np.zeros((2, 4))
    with pytest.raises(ValueError, match="teacher_logits has shape"):
        fastloss.kl_div_logits(x, np.zeros((2, 5)))
    with pytest.raises(TypeError, match="student_logits"):
        fastloss.kl_div_logits(x.astype(int), x)
    with pytest.raises(TypeError, match="teacher_logits"):
        fastloss.kl_div_logits(x, None)
    with pytest.raises(ValueError, match="student_logits"):
        fastloss.kl_div_logits(np.float64(1.0), np.float64(1.0))
    with pytest.raises(ValueError, match="0 classes"):
        fastloss.kl_div_logits(np.zeros((2, 0)), np.zeros((2, 0)))
    t = np.zeros((2, 4))
    with pytest.raises(ValueError, match="grad_out overlaps teacher_logits"):
        fastloss.kl_div_logits_with_grad(x, t, grad_out=t)
    with pytest.raises(TypeError, match="grad_out"):
        fastloss.kl_div_logits_with_grad(x, t, grad_out=np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="grad_out"):
        fastloss.kl_div_logits_with_grad(x, t, grad_out=np.zeros((2, 3)))
