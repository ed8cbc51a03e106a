"""sequence_log_probs, dpo_loss and info_nce_loss (fastloss/sequence.py).

Oracles: torch autograd where it applies (log_softmax + gather + masked sum for the sequence
log-probs; the TRL DPOTrainer formulas written in torch; F.cross_entropy over q @ k.T / tau),
``fastloss.reference`` (float64 NumPy) for every option, and 4th-order finite differences in
float64.  Plus: dtypes, extremes, all-ignored sequences, strided (shifted) logits, in-place
gradients, memory (tracemalloc: no N x V temporary), thread counts and ISAs bitwise equal,
and bad input.
"""
from __future__ import annotations

import doctest
import io
import math
import tracemalloc

import numpy as np
import pytest

import fastloss
from fastloss import reference
from fl_testing import DTYPE_NAMES, assert_close, assert_identical, fd_gradient, get_dtype, loss_dtype_for

IGN = -100


def _rtol(dtype_name: str) -> float:
    """Kernel results for inputs of this dtype, against float64 maths on the same values:
    float32 arithmetic (exp, sums of V terms) for every dtype but float64."""
    return 1e-12 if dtype_name == "float64" else 2e-5


def _grad_rtol(dtype_name: str) -> float:
    """The gradient is rounded to the logits' dtype."""
    return {"float64": 1e-12, "float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype_name]


def _seq_case(rng, shape, V, dtype, *, ignore_frac=0.2, scale=2.0):
    logits = (scale * rng.standard_normal(shape + (V,))).astype(dtype)
    target = rng.integers(0, V, shape)
    target[rng.random(shape) < ignore_frac] = IGN
    return logits, target


def _torch_seq(torch, logits, target, average, grad_seq=None):
    """TRL-style: log_softmax + gather + masked sum, in float64 from the same values."""
    x = torch.tensor(np.asarray(logits, dtype=np.float64), requires_grad=True)
    t = torch.tensor(target)
    mask = t != IGN
    lp = torch.log_softmax(x, -1).gather(-1, torch.where(mask, t, 0)[..., None]).squeeze(-1)
    lp = lp.masked_fill(~mask, 0.0).sum(-1)
    if average:
        lp = lp / mask.sum(-1)
    if grad_seq is None:
        return lp.detach().numpy(), None
    (lp * torch.tensor(np.asarray(grad_seq, dtype=np.float64))).sum().backward()
    return lp.detach().numpy(), x.grad.numpy()


# ---- sequence_log_probs: values and gradients ------------------------------------------------

@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("average", [False, True])
def test_sequence_log_probs_matches_torch_and_reference(dtype_name, average, isa, rng):
    torch = pytest.importorskip("torch")
    dt = get_dtype(dtype_name)
    logits, target = _seq_case(rng, (3, 9), 37, dt)
    target[1] = IGN                                          # an all-ignored sequence
    g = rng.standard_normal(3)
    want, want_grad = _torch_seq(torch, logits, target, average, g)
    got = fastloss.sequence_log_probs(logits, target, average=average)
    assert got.dtype == loss_dtype_for(dt) and got.shape == (3,)
    assert_close(got, want, rtol=_rtol(dtype_name), atol=1e-5 if dtype_name != "float64" else 0.0,
                 what=f"logp {dtype_name} isa={isa}")
    assert_close(got, reference.sequence_log_probs(logits, target, average=average), rtol=_rtol(dtype_name),
                 atol=1e-5 if dtype_name != "float64" else 0.0, what="logp vs reference")
    if average:
        assert math.isnan(got[1])
    else:
        assert got[1] == 0.0 and not np.signbit(got[1])
    logp, grad = fastloss.sequence_log_probs_with_grad(logits, target, g, average=average)
    assert_identical(logp, got, what="logp of _with_grad")
    assert grad.dtype == dt and grad.shape == logits.shape
    assert_close(grad, want_grad, rtol=_grad_rtol(dtype_name), atol=_grad_rtol(dtype_name) * 0.05,
                 what=f"grad {dtype_name} isa={isa}")
    assert_close(grad, reference.sequence_log_probs_grad(logits, target, g, average=average),
                 rtol=_grad_rtol(dtype_name), atol=_grad_rtol(dtype_name) * 0.05, what="grad vs reference")
    assert not np.any(grad[1]), "an all-ignored sequence has zero gradient"


@pytest.mark.parametrize("average", [False, True])
def test_sequence_log_probs_gradient_finite_differences(average, rng):
    logits, target = _seq_case(rng, (2, 4), 5, np.float64)
    target[0, 0] = IGN
    g = np.array([0.7, -1.3])
    _, grad = fastloss.sequence_log_probs_with_grad(logits, target, g, average=average)
    fd = fd_gradient(lambda x: np.dot(g, fastloss.sequence_log_probs(x, target, average=average)), logits, 1e-3)
    assert_close(grad, fd, rtol=1e-7, atol=1e-9, what="grad vs finite differences")


def test_leading_dims_and_single_sequence(rng):
    logits, target = _seq_case(rng, (2, 3, 5), 7, np.float32)
    got = fastloss.sequence_log_probs(logits, target)
    assert got.shape == (2, 3)
    assert_close(got, reference.sequence_log_probs(logits, target), rtol=2e-5, atol=1e-5)
    one = fastloss.sequence_log_probs(logits[0, 0], target[0, 0])         # (T, V) -> 0-d
    assert one.shape == () and one.dtype == np.float32
    assert_identical(one, got[0, 0])
    lp, grad = fastloss.sequence_log_probs_with_grad(logits[0, 0], target[0, 0], np.float64(2.0))
    assert lp.shape == () and grad.shape == (5, 7)
    assert_close(grad, reference.sequence_log_probs_grad(logits[0, 0], target[0, 0], 2.0), rtol=2e-5, atol=1e-6)
    g = rng.standard_normal((2, 3))
    _, grad = fastloss.sequence_log_probs_with_grad(logits, target, g)
    assert_close(grad, reference.sequence_log_probs_grad(logits, target, g), rtol=2e-5, atol=1e-6)


def test_empty_shapes():
    lp = fastloss.sequence_log_probs(np.zeros((3, 0, 4), np.float32), np.zeros((3, 0), np.int64))
    assert_identical(lp, np.zeros(3, np.float32))
    lp = fastloss.sequence_log_probs(np.zeros((3, 0, 4)), np.zeros((3, 0), np.int64), average=True)
    assert np.isnan(lp).all()
    lp, grad = fastloss.sequence_log_probs_with_grad(np.zeros((0, 5, 4)), np.zeros((0, 5), np.int64), np.zeros(0))
    assert lp.shape == (0,) and grad.shape == (0, 5, 4)


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_extreme_logits(dtype_name, isa, rng):
    dt = get_dtype(dtype_name)
    logits = (1e4 * rng.choice([-1.0, 1.0], (2, 6, 11)) * rng.random((2, 6, 11))).astype(dt)
    logits[0, 0] = 1e4
    logits[0, 1] = -1e4
    logits[0, 1, 3] = 1e4
    target = rng.integers(0, 11, (2, 6))
    target[0, 1] = 3
    g = np.array([1.0, -0.5])
    got, grad = fastloss.sequence_log_probs_with_grad(logits, target, g)
    assert np.isfinite(got).all() and np.isfinite(grad).all()
    rtol = 1e-12 if dtype_name == "float64" else 1e-6
    assert_close(got, reference.sequence_log_probs(logits, target), rtol=rtol, atol=1e-2 if rtol > 1e-10 else 1e-8)
    assert_close(grad, reference.sequence_log_probs_grad(logits, target, g), rtol=1e-5, atol=1e-6)


def test_infinite_and_nan_rows_agree_between_forward_and_grad():
    logits = np.zeros((1, 5, 4), np.float32)
    logits[0, 0, 1] = np.inf                   # +inf logit: nan (as torch's log_softmax)
    logits[0, 1, :] = -np.inf                  # all -inf: nan
    logits[0, 2, 0] = -np.inf                  # the target at -inf: -inf
    logits[0, 3, 2] = np.nan                   # nan, but the row is ignored: no contribution
    for rows, want in (([0], np.nan), ([1], np.nan), ([2], -np.inf), ([3], 0.0)):
        t = np.full((1, 5), IGN)
        t[0, rows] = 0
        if rows == [3]:
            t[0, 3] = IGN
        got = fastloss.sequence_log_probs(logits, t)
        lp, _ = fastloss.sequence_log_probs_with_grad(logits, t, np.ones(1))
        assert_identical(lp, got)
        assert (np.isnan(got[0]) and np.isnan(want)) or got[0] == want, (rows, got)


def test_all_ignored_gradient_and_average():
    logits = np.random.default_rng(3).standard_normal((2, 4, 6))
    target = np.full((2, 4), IGN)
    target[1, 2] = 5
    lp, grad = fastloss.sequence_log_probs_with_grad(logits, target, np.array([3.0, 2.0]), average=True)
    assert np.isnan(lp[0]) and np.isfinite(lp[1])
    assert not grad[0].any() and not grad[1, [0, 1, 3]].any()
    assert_close(grad, reference.sequence_log_probs_grad(np.nan_to_num(logits), target, [0.0, 2.0], average=True),
                 rtol=1e-12, atol=1e-15)


# ---- layouts, memory, threads ---------------------------------------------------------------

def test_shifted_strided_logits_without_copy(rng):
    B, T, V = 2, 64, 2048
    full, tokens = _seq_case(rng, (B, T + 1), V, np.float32, ignore_frac=0.1)
    logits, target = full[:, :-1], tokens[:, 1:]               # the usual shift: a strided view
    assert not logits.flags.c_contiguous
    want = fastloss.sequence_log_probs(np.ascontiguousarray(logits), target)
    tracemalloc.start()
    try:
        got = fastloss.sequence_log_probs(logits, target)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_identical(got, want)
    nv_bytes = logits.size * logits.itemsize
    assert peak < 200 * B * T + 16384, f"peak {peak} B: O(B*T) expected (N x V is {nv_bytes} B)"

    g = rng.standard_normal(B)
    _, want_grad = fastloss.sequence_log_probs_with_grad(np.ascontiguousarray(logits), target, g)
    tracemalloc.start()
    try:
        lp, grad = fastloss.sequence_log_probs_with_grad(logits, target, g)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_identical(lp, want)
    assert_identical(grad, want_grad)
    assert nv_bytes <= peak < nv_bytes + 200 * B * T + 16384, f"peak {peak} B: the gradient ({nv_bytes} B) only"

    work = full.copy()
    view = work[:, :-1]
    tracemalloc.start()
    try:
        lp2, grad2 = fastloss.sequence_log_probs_with_grad(view, target, g, grad_out=view)     # in place
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grad2 is view
    assert_identical(lp2, want)
    assert_identical(grad2, want_grad)
    assert_identical(work[:, -1], full[:, -1], what="the column outside the view")
    assert peak < 200 * B * T + 16384, f"in place: peak {peak} B"


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_grad_out_in_place_and_separate_buffer(dtype_name, isa, rng):
    dt = get_dtype(dtype_name)
    logits, target = _seq_case(rng, (3, 5), 300, dt)
    g = rng.standard_normal(3)
    lp, grad = fastloss.sequence_log_probs_with_grad(logits, target, g)
    buf = np.full(logits.shape, 7, dtype=dt)
    lp1, g1 = fastloss.sequence_log_probs_with_grad(logits, target, g, grad_out=buf)
    assert g1 is buf
    assert_identical(g1, grad)
    x = logits.copy()
    lp2, g2 = fastloss.sequence_log_probs_with_grad(x, target, g, grad_out=x)
    assert g2 is x
    assert_identical(g2, grad)
    assert_identical(lp1, lp)
    assert_identical(lp2, lp)
    # a grad_out whose class axis is strided: written through a temporary
    big = np.zeros(logits.shape[:-1] + (2 * logits.shape[-1],), dtype=dt)
    lp3, g3 = fastloss.sequence_log_probs_with_grad(logits, target, g, grad_out=big[..., ::2])
    assert_identical(g3, grad)


def test_threads_bitwise_equal(isa, rng):
    logits, target = _seq_case(rng, (3, 40), 1500, np.float32)
    long_rows, long_t = _seq_case(rng, (1, 2), 70000, np.float32)      # several parts per row
    g = rng.standard_normal(3)
    for x, t, gs in ((logits, target, g), (long_rows, long_t, np.array([0.5]))):
        base = fastloss.sequence_log_probs_with_grad(x, t, gs, num_threads=1)
        base_f = fastloss.sequence_log_probs(x, t, num_threads=1, average=True)
        assert_close(base[1], reference.sequence_log_probs_grad(x, t, gs), rtol=2e-5, atol=1e-8)
        for n in (2, 3):
            lp, grad = fastloss.sequence_log_probs_with_grad(x, t, gs, num_threads=n)
            assert_identical(lp, base[0], what=f"logp threads={n}")
            assert_identical(grad, base[1], what=f"grad threads={n}")
            assert_identical(fastloss.sequence_log_probs(x, t, num_threads=n, average=True), base_f)


# ---- bad input -------------------------------------------------------------------------------

def test_sequence_bad_input():
    x = np.zeros((2, 3, 5), np.float32)
    t = np.zeros((2, 3), np.int64)
    with pytest.raises(IndexError, match="out of range"):
        fastloss.sequence_log_probs(x, np.array([[0, 5, 0], [0, 0, 0]]))
    with pytest.raises(IndexError, match="out of range"):
        fastloss.sequence_log_probs_with_grad(x, np.array([[0, -1, 0], [0, 0, 0]]), np.ones(2))
    with pytest.raises(ValueError, match="target has shape"):
        fastloss.sequence_log_probs(x, np.zeros((2, 4), np.int64))
    with pytest.raises(ValueError, match="logits must have shape"):
        fastloss.sequence_log_probs(np.zeros(5), np.zeros((), np.int64))
    with pytest.raises(ValueError, match="0 classes"):
        fastloss.sequence_log_probs(np.zeros((2, 3, 0)), t)
    with pytest.raises(TypeError, match="target"):
        fastloss.sequence_log_probs(x, t.astype(np.float32))
    with pytest.raises(TypeError, match="logits"):
        fastloss.sequence_log_probs(x.astype(np.int32), t)
    with pytest.raises(TypeError, match="average"):
        fastloss.sequence_log_probs(x, t, average=1)
    with pytest.raises(TypeError, match="ignore_index"):
        fastloss.sequence_log_probs(x, t, ignore_index=1.5)
    with pytest.raises(ValueError, match="grad_seq has shape"):
        fastloss.sequence_log_probs_with_grad(x, t, np.ones(3))
    with pytest.raises(ValueError, match="grad_seq has shape"):
        fastloss.sequence_log_probs_with_grad(x, t, np.ones((2, 1)))
    with pytest.raises(ValueError, match="grad_seq must be finite"):
        fastloss.sequence_log_probs_with_grad(x, t, np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="grad_seq must be finite"):
        fastloss.sequence_log_probs_with_grad(x, t, np.array([np.inf, 1.0]))
    with pytest.raises(TypeError, match="grad_seq"):
        fastloss.sequence_log_probs_with_grad(x, t, None)
    with pytest.raises(TypeError, match="grad_out"):
        fastloss.sequence_log_probs_with_grad(x, t, np.ones(2), grad_out=np.zeros(x.shape, np.float64))
    with pytest.raises(ValueError, match="grad_out has shape"):
        fastloss.sequence_log_probs_with_grad(x, t, np.ones(2), grad_out=np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="overlaps logits"):
        fastloss.sequence_log_probs_with_grad(x, t, np.ones(2), grad_out=x[::-1])
    with pytest.raises(ValueError, match="num_threads|threads"):
        fastloss.sequence_log_probs(x, t, num_threads=0)


# ---- DPO -------------------------------------------------------------------------------------

def _torch_dpo(torch, pc, pr, rc, rr, beta, loss_type, eps, reduction):
    """TRL DPOTrainer.dpo_loss, written out in torch (float64), with autograd."""
    F = torch.nn.functional
    c = torch.tensor(pc, dtype=torch.float64, requires_grad=True)
    r = torch.tensor(pr, dtype=torch.float64, requires_grad=True)
    ref_c = torch.zeros_like(c) if rc is None else torch.tensor(rc, dtype=torch.float64)
    ref_r = torch.zeros_like(r) if rr is None else torch.tensor(rr, dtype=torch.float64)
    logits = (c - r) - (ref_c - ref_r)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * logits)
    out = {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]
    out.sum().backward()
    rew_c = (beta * (c - ref_c)).detach().numpy()
    rew_r = (beta * (r - ref_r)).detach().numpy()
    return out.detach().numpy(), c.grad.numpy(), r.grad.numpy(), rew_c, rew_r


_DPO_OPTIONS = [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.0), ("robust", 0.3), ("ipo", 0.0),
                ("hinge", 0.0)]


@pytest.mark.parametrize("loss_type,eps", _DPO_OPTIONS)
@pytest.mark.parametrize("with_ref", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dpo_matches_trl_formulas_in_torch(loss_type, eps, with_ref, reduction, rng):
    torch = pytest.importorskip("torch")
    B = 9
    pc, pr = -20 + 5 * rng.standard_normal(B), -20 + 5 * rng.standard_normal(B)
    rc, rr = (-20 + 5 * rng.standard_normal(B), -20 + 5 * rng.standard_normal(B)) if with_ref else (None, None)
    beta = 0.3
    want, want_gc, want_gr, want_rc, want_rr = _torch_dpo(torch, pc, pr, rc, rr, beta, loss_type, eps, reduction)
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps, reduction=reduction)
    loss, gc, gr, rew_c, rew_r = fastloss.dpo_loss_with_grad(pc, pr, rc, rr, return_rewards=True, **kw)
    assert_close(loss, want, rtol=1e-13, atol=1e-15, what="dpo loss")
    assert_close(gc, want_gc, rtol=1e-12, atol=1e-15, what="grad chosen")
    assert_close(gr, want_gr, rtol=1e-12, atol=1e-15, what="grad rejected")
    assert_close(rew_c, want_rc, rtol=1e-15, what="chosen rewards")
    assert_close(rew_r, want_rr, rtol=1e-15, what="rejected rewards")
    assert_identical(fastloss.dpo_loss(pc, pr, rc, rr, **kw), loss)
    ref_loss, ref_rc, ref_rr = reference.dpo_loss(pc, pr, rc, rr, return_rewards=True, **kw)
    assert_close(loss, ref_loss, rtol=1e-13, atol=1e-15, what="dpo loss vs reference")
    assert_close(rew_c, ref_rc, rtol=1e-15)
    ref_gc, ref_gr = reference.dpo_loss_grad(pc, pr, rc, rr, **kw)
    assert_close(gc, ref_gc, rtol=1e-12, atol=1e-15)
    assert_close(gr, ref_gr, rtol=1e-12, atol=1e-15)
    if reduction == "none":
        assert isinstance(loss, np.ndarray) and loss.shape == (B,)
    else:
        assert isinstance(loss, np.float64)


@pytest.mark.parametrize("loss_type,eps", _DPO_OPTIONS)
def test_dpo_finite_differences(loss_type, eps, rng):
    pc, pr, rc, rr = (rng.standard_normal(5) for _ in range(4))
    kw = dict(beta=0.7, loss_type=loss_type, label_smoothing=eps)
    _, gc, gr = fastloss.dpo_loss_with_grad(pc, pr, rc, rr, **kw)
    fd_c = fd_gradient(lambda v: fastloss.dpo_loss(v, pr, rc, rr, **kw), pc, 1e-4)
    fd_r = fd_gradient(lambda v: fastloss.dpo_loss(pc, v, rc, rr, **kw), pr, 1e-4)
    assert_close(gc, fd_c, rtol=1e-7, atol=1e-9, what="grad chosen vs finite differences")
    assert_close(gr, fd_r, rtol=1e-7, atol=1e-9, what="grad rejected vs finite differences")


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_dpo_dtypes(dtype_name, rng):
    dt = get_dtype(dtype_name)
    pc, pr, rc, rr = ((-10 + rng.standard_normal(6)).astype(dt) for _ in range(4))
    loss, gc, gr, rw_c, rw_r = fastloss.dpo_loss_with_grad(pc, pr, rc, rr, return_rewards=True)
    want_dt = loss_dtype_for(dt)
    assert loss.dtype == want_dt and rw_c.dtype == want_dt and rw_r.dtype == want_dt
    assert gc.dtype == dt and gr.dtype == dt
    rtol = 1e-13 if dtype_name == "float64" else 1e-6
    assert_close(loss, reference.dpo_loss(pc, pr, rc, rr), rtol=rtol)
    ref_gc, ref_gr = reference.dpo_loss_grad(pc, pr, rc, rr)
    assert_close(gc, ref_gc, rtol=_grad_rtol(dtype_name))
    assert_close(gr, ref_gr, rtol=_grad_rtol(dtype_name))
    # mixed: a float64 reference makes the result float64
    assert fastloss.dpo_loss(pc, pr, rc.astype(np.float64), rr).dtype == np.float64


@pytest.mark.parametrize("loss_type,eps", _DPO_OPTIONS)
def test_dpo_extreme_margins(loss_type, eps):
    beta = 1.0
    pc = np.array([1e4, -1e4, 0.0, 0.0])
    pr = np.zeros(4)
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps, reduction="none")
    loss, gc, gr = fastloss.dpo_loss_with_grad(pc, pr, **kw)
    assert np.isfinite(loss).all() and np.isfinite(gc).all() and np.isfinite(gr).all()
    assert_close(loss, reference.dpo_loss(pc, pr, **kw), rtol=1e-14, atol=1e-300)
    ref_gc, _ = reference.dpo_loss_grad(pc, pr, **kw)
    assert_close(gc, ref_gc, rtol=1e-14, atol=1e-300)
    if loss_type == "sigmoid" and eps == 0.0:
        assert loss[0] == 0.0 and loss[1] == 1e4 and loss[2] == math.log(2.0)
        assert gc[0] == 0.0 and gc[1] == -1.0


def test_dpo_empty_batch():
    e = np.zeros(0)
    assert math.isnan(fastloss.dpo_loss(e, e))
    assert fastloss.dpo_loss(e, e, reduction="sum") == 0.0
    loss, gc, gr = fastloss.dpo_loss_with_grad(e, e, reduction="none")
    assert loss.shape == gc.shape == gr.shape == (0,)


def test_dpo_bad_input():
    v = np.zeros(3)
    with pytest.raises(ValueError, match="ref_rejected_logps is None"):
        fastloss.dpo_loss(v, v, v, None)
    with pytest.raises(ValueError, match="ref_chosen_logps is None"):
        fastloss.dpo_loss_with_grad(v, v, None, v)
    with pytest.raises(ValueError, match="'sigmoid', 'robust', 'ipo', 'hinge'"):
        fastloss.dpo_loss(v, v, loss_type="kto")
    with pytest.raises(ValueError, match="loss_type"):
        fastloss.dpo_loss(v, v, loss_type=None)
    for beta in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="beta"):
            fastloss.dpo_loss(v, v, beta=beta)
    with pytest.raises(TypeError, match="beta"):
        fastloss.dpo_loss(v, v, beta="0.1")
    for eps in (0.5, -0.1, math.nan):
        with pytest.raises(ValueError, match="label_smoothing"):
            fastloss.dpo_loss(v, v, loss_type="robust", label_smoothing=eps)
    for eps in (1.5, -0.1):
        with pytest.raises(ValueError, match="label_smoothing"):
            fastloss.dpo_loss(v, v, label_smoothing=eps)
    with pytest.raises(ValueError, match="label_smoothing"):
        fastloss.dpo_loss(v, v, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(TypeError, match="label_smoothing"):
        fastloss.dpo_loss(v, v, label_smoothing=None)
    with pytest.raises(ValueError, match="policy_rejected_logps has shape"):
        fastloss.dpo_loss(v, np.zeros(4))
    with pytest.raises(ValueError, match="ref_rejected_logps has shape"):
        fastloss.dpo_loss(v, v, v, np.zeros(2))
    with pytest.raises(ValueError, match="policy_chosen_logps must be 1-D"):
        fastloss.dpo_loss(np.zeros((3, 1)), np.zeros((3, 1)))
    with pytest.raises(TypeError, match="policy_chosen_logps"):
        fastloss.dpo_loss(np.zeros(3, np.int64), v)
    with pytest.raises(ValueError, match="reduction"):
        fastloss.dpo_loss(v, v, reduction="batchmean")


# ---- end-to-end DPO step ---------------------------------------------------------------------

@pytest.mark.parametrize("average", [False, True])
def test_end_to_end_dpo_step_matches_torch_autograd(average, rng):
    torch = pytest.importorskip("torch")
    B, T, V = 2, 7, 23                                       # 2 pairs: rows 0..1 chosen, 2..3 rejected
    tokens = rng.integers(0, V, (2 * B, T + 1))
    tokens[:, :3] = IGN                                       # prompt positions, ignored
    full = rng.standard_normal((2 * B, T + 1, V))
    ref_full = rng.standard_normal((2 * B, T + 1, V))
    logits, target = full[:, :-1], tokens[:, 1:]
    kw = dict(beta=0.2, loss_type="sigmoid", label_smoothing=0.1)

    ref = fastloss.sequence_log_probs(ref_full[:, :-1], target, average=average)
    logp = fastloss.sequence_log_probs(logits, target, average=average)
    loss, g_c, g_r = fastloss.dpo_loss_with_grad(logp[:B], logp[B:], ref[:B], ref[B:], **kw)
    work = full.copy()
    _, grad = fastloss.sequence_log_probs_with_grad(work[:, :-1], target, np.concatenate([g_c, g_r]),
                                                    average=average, grad_out=work[:, :-1])

    x = torch.tensor(full, requires_grad=True)
    t = torch.tensor(target)
    mask = t != IGN

    def seq(z):
        lp = torch.log_softmax(z[:, :-1], -1).gather(-1, torch.where(mask, t, 0)[..., None]).squeeze(-1)
        s = lp.masked_fill(~mask, 0.0).sum(-1)
        return s / mask.sum(-1) if average else s

    lp_t = seq(x)
    with torch.no_grad():
        ref_t = seq(torch.tensor(ref_full))
    F = torch.nn.functional
    h = (lp_t[:B] - lp_t[B:]) - (ref_t[:B] - ref_t[B:])
    loss_t = (-F.logsigmoid(0.2 * h) * 0.9 - F.logsigmoid(-0.2 * h) * 0.1).mean()
    loss_t.backward()
    assert_close(loss, loss_t.item(), rtol=1e-12, what="DPO loss")
    assert_close(grad, x.grad.numpy()[:, :-1], rtol=1e-10, atol=1e-15, what="d loss / d logits")
    assert not x.grad.numpy()[:, -1].any()


# ---- InfoNCE ---------------------------------------------------------------------------------

def _torch_info_nce(torch, q, k, tau, symmetric, reduction):
    F = torch.nn.functional
    tq = torch.tensor(np.asarray(q, np.float64), requires_grad=True)
    tk = torch.tensor(np.asarray(k, np.float64), requires_grad=True)
    s = tq @ tk.T / tau
    labels = torch.arange(q.shape[0])
    loss = F.cross_entropy(s, labels, reduction=reduction)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(s.T, labels, reduction=reduction))
    loss.sum().backward()
    return loss.detach().numpy(), tq.grad.numpy(), tk.grad.numpy()


@pytest.mark.parametrize("symmetric,M", [(False, 6), (False, 11), (True, 6)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tau", [0.07, 1.0])
def test_info_nce_matches_torch_and_reference(symmetric, M, reduction, tau, rng):
    torch = pytest.importorskip("torch")
    N, D = 6, 5
    q = rng.standard_normal((N, D))
    k = rng.standard_normal((M, D))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    want, want_gq, want_gk = _torch_info_nce(torch, q, k, tau, symmetric, reduction)
    kw = dict(temperature=tau, symmetric=symmetric, reduction=reduction)
    loss, gq, gk = fastloss.info_nce_loss_with_grad(q, k, **kw)
    assert_close(loss, want, rtol=1e-12, what="loss")
    assert_close(gq, want_gq, rtol=1e-10, atol=1e-13, what="grad query")
    assert_close(gk, want_gk, rtol=1e-10, atol=1e-13, what="grad keys")
    assert_identical(fastloss.info_nce_loss(q, k, **kw), loss)
    assert_close(loss, reference.info_nce_loss(q, k, **kw), rtol=1e-12)
    ref_gq, ref_gk = reference.info_nce_loss_grad(q, k, **kw)
    assert_close(gq, ref_gq, rtol=1e-10, atol=1e-13)
    assert_close(gk, ref_gk, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_finite_differences(symmetric, rng):
    q, k = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    kw = dict(temperature=0.5, symmetric=symmetric)
    _, gq, gk = fastloss.info_nce_loss_with_grad(q, k, **kw)
    assert_close(gq, fd_gradient(lambda v: fastloss.info_nce_loss(v, k, **kw), q, 1e-4), rtol=1e-7, atol=1e-9)
    assert_close(gk, fd_gradient(lambda v: fastloss.info_nce_loss(q, v, **kw), k, 1e-4), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_info_nce_dtypes(dtype_name, isa, rng):
    dt = get_dtype(dtype_name)
    q = rng.standard_normal((8, 16)).astype(dt)
    k = rng.standard_normal((12, 16)).astype(dt)
    loss, gq, gk = fastloss.info_nce_loss_with_grad(q, k, temperature=0.5)
    assert loss.dtype == loss_dtype_for(dt) and gq.dtype == dt and gk.dtype == dt
    rtol = 1e-12 if dtype_name == "float64" else 1e-5
    assert_close(loss, reference.info_nce_loss(q, k, temperature=0.5), rtol=rtol)
    ref_gq, ref_gk = reference.info_nce_loss_grad(q, k, temperature=0.5)
    grtol = max(_grad_rtol(dtype_name), 1e-4 if dtype_name != "float64" else 0.0)
    assert_close(gq, ref_gq, rtol=grtol, atol=grtol * 0.1)
    assert_close(gk, ref_gk, rtol=grtol, atol=grtol * 0.1)


def test_info_nce_extreme_and_threads(rng):
    q = rng.standard_normal((64, 8)).astype(np.float32)
    k = rng.standard_normal((64, 8)).astype(np.float32)
    loss, gq, gk = fastloss.info_nce_loss_with_grad(q, k, temperature=1e-4, symmetric=True)   # |S| ~ 1e4
    assert np.isfinite(loss) and np.isfinite(gq).all() and np.isfinite(gk).all()
    assert_close(loss, reference.info_nce_loss(q, k, temperature=1e-4, symmetric=True), rtol=1e-5)
    base = fastloss.info_nce_loss_with_grad(q, k, num_threads=1)
    for n in (2, 3):
        got = fastloss.info_nce_loss_with_grad(q, k, num_threads=n)
        for a, b in zip(got, base):
            assert_identical(a, b, what=f"threads={n}")


def test_info_nce_bad_input():
    q, k = np.zeros((3, 4)), np.zeros((5, 4))
    with pytest.raises(ValueError, match="keys have dimension D = 3"):
        fastloss.info_nce_loss(q, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least as many rows"):
        fastloss.info_nce_loss(q, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="symmetric=True needs"):
        fastloss.info_nce_loss(q, k, symmetric=True)
    with pytest.raises(ValueError, match="query must have shape"):
        fastloss.info_nce_loss(np.zeros(4), k)
    with pytest.raises(ValueError, match="keys must have shape"):
        fastloss.info_nce_loss_with_grad(q, np.zeros((1, 5, 4)))
    for tau in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            fastloss.info_nce_loss(q, k, temperature=tau)
    with pytest.raises(TypeError, match="temperature"):
        fastloss.info_nce_loss(q, k, temperature=None)
    with pytest.raises(TypeError, match="symmetric"):
        fastloss.info_nce_loss(q, q, symmetric="yes")
    with pytest.raises(TypeError, match="query"):
        fastloss.info_nce_loss(np.zeros((3, 4), np.int32), k)
    with pytest.raises(ValueError, match="reduction"):
        fastloss.info_nce_loss(q, k, reduction="batchmean")


def test_docstring_examples_run_standalone():
    """Every example in fastloss.sequence gives the printed output in a fresh namespace."""
    out = io.StringIO()
    runner = doctest.DocTestRunner()
    attempted, failed = 0, []
    for test in doctest.DocTestFinder().find(fastloss.sequence):
        test.globs = {}
        if test.examples:
            r = runner.run(test, out=out.write)
            attempted += r.attempted
            if r.failed:
                failed.append(test.name)
    assert attempted >= 10 and not failed, f"{failed}\n{out.getvalue()[:2000]}"
