"""Tests of the elementwise losses on probabilities and scores (fastloss.elementwise):
binary_cross_entropy, binary_cross_entropy_with_logits, sigmoid_focal_loss, hinge_loss, kl_div.

* torch parity (value and autograd gradient) for every option, in float64 (tight) and
  float32; the focal loss against torchvision's formula written here in torch ops
  (torchvision is not installed), the hinge loss against relu(margin - t x) in torch ops;
* conformance with fastloss.reference over float16/float32/float64/bfloat16 and every ISA;
* 4th-order finite-difference gradients in float64;
* extremes (logits of +-1e4, KL with target 0, probabilities of exactly 0 and 1), the
  accuracy of the vectorized exp/log/log1p (src_c/fl_math.h) seen through the losses;
* in-place grad_out, strided and negative-stride views, broadcasting, empty arrays,
  bitwise equality for 1/2/3 threads, bad input.

Tolerances (relative, against the float64 reference computed from the same rounded inputs):
float64 1e-12; float32/float16/bfloat16 (computed in float32) 2e-5 for the loss, and for the
gradient 2e-5 plus one rounding into the input dtype (float16 2^-11, bfloat16 2^-8).  Losses
that are a difference of terms (kl_div, hinge) get an absolute allowance of the same relative
size times the terms' magnitude; so do the gradients of BCE with logits and focal (which cancel
for soft targets), 2^-21 times the largest gradient.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastloss
from fastloss import reference as ref
from fl_testing import SUPPORTED_ISAS, assert_close, assert_identical, fd_gradient, get_dtype

DTYPES = ("float16", "float32", "float64", "bfloat16")
LOSS_RTOL = {"float64": 1e-12, "float32": 2e-5, "float16": 2e-5, "bfloat16": 2e-5}
#: gradients of float16 inputs may be subnormal in float16: its spacing there, 2^-24
GRAD_ATOL = {"float64": 0.0, "float32": 2.0 ** -149, "float16": 2.0 ** -24, "bfloat16": 2.0 ** -133}
GRAD_RTOL = {"float64": 1e-12, "float32": 2e-5, "float16": 2e-5 + 2.0 ** -11, "bfloat16": 2e-5 + 2.0 ** -8}


# ---- the cases: (name, fastloss function, its _with_grad, reference, grad reference, data, options) --

def _data(name, rng, shape):
    """(input, target, extra operands) typical for each loss, float64."""
    if name == "bce":
        x = rng.uniform(0.02, 0.98, shape)
        t = rng.uniform(0.0, 1.0, shape)
        t[..., ::3] = np.round(t[..., ::3])
        return x, t
    if name in ("bce_logits", "focal"):
        x = rng.normal(0, 3, shape)
        t = (rng.uniform(size=shape) < 0.4).astype(np.float64)
        t[..., ::5] = rng.uniform(size=t[..., ::5].shape)   # some soft targets
        return x, t
    if name == "hinge":
        x = rng.normal(0, 2, shape)
        t = np.where(rng.uniform(size=shape) < 0.5, -1.0, 1.0)
        return x, t
    if name in ("kl", "kl_log_target"):
        x = np.log(rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]))
        q = rng.dirichlet(np.ones(shape[-1]) * 0.5, size=shape[:-1])
        q[..., 0] = 0.0                                     # xlogy(0, 0) = 0
        return x, (np.log(q + 1e-30) if name == "kl_log_target" else q)
    raise KeyError(name)


FUNCS = {
    "bce": (fastloss.binary_cross_entropy, fastloss.binary_cross_entropy_with_grad,
            ref.binary_cross_entropy, ref.binary_cross_entropy_grad),
    "bce_logits": (fastloss.binary_cross_entropy_with_logits, fastloss.binary_cross_entropy_with_logits_with_grad,
                   ref.binary_cross_entropy_with_logits, ref.binary_cross_entropy_with_logits_grad),
    "focal": (fastloss.sigmoid_focal_loss, fastloss.sigmoid_focal_loss_with_grad,
              ref.sigmoid_focal_loss, ref.sigmoid_focal_loss_grad),
    "hinge": (fastloss.hinge_loss, fastloss.hinge_loss_with_grad, ref.hinge_loss, ref.hinge_loss_grad),
    "kl": (fastloss.kl_div, fastloss.kl_div_with_grad, ref.kl_div, ref.kl_div_grad),
    "kl_log_target": (fastloss.kl_div, fastloss.kl_div_with_grad, ref.kl_div, ref.kl_div_grad),
}

#: (name, options) pairs covering every option; "W" / "PW" ask for a weight / pos_weight array.
OPTION_CASES = [
    ("bce", {}), ("bce", {"weight": "W"}),
    ("bce_logits", {}), ("bce_logits", {"weight": "W"}), ("bce_logits", {"pos_weight": "PW"}),
    ("bce_logits", {"weight": "W", "pos_weight": "PW"}),
    ("focal", {}), ("focal", {"alpha": -1.0}), ("focal", {"alpha": 0.75, "gamma": 0.0}),
    ("focal", {"gamma": 1.0}), ("focal", {"gamma": 0.5}), ("focal", {"alpha": 0.5, "gamma": 3.5}),
    ("hinge", {}), ("hinge", {"margin": 0.5}), ("hinge", {"margin": -0.3}),
    ("kl", {}), ("kl_log_target", {"log_target": True}),
]


def _case_id(c):
    return c[0] + ("-" + ",".join(f"{k}={v}" for k, v in c[1].items()) if c[1] else "")


def _options(name, opts, rng, shape, dtype=np.float64):
    """The options with W / PW replaced by arrays (weight: broadcast (1, C); pos_weight: (C,))."""
    out = {}
    for k, v in opts.items():
        if v == "W":
            out[k] = rng.uniform(0.2, 2.0, (1, shape[-1])).astype(dtype)
        elif v == "PW":
            out[k] = rng.uniform(0.5, 3.0, shape[-1]).astype(dtype)
        else:
            out[k] = v
    return out


def _reductions(name):
    return ("mean", "sum", "none", "batchmean") if name.startswith("kl") else ("mean", "sum", "none")


def _magnitude(name, x, t, opts):
    """|terms| of losses that are differences (see the module docstring), else 0."""
    if name == "kl":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.abs(np.where(t == 0, 0.0, t * np.log(np.where(t == 0, 1.0, t)))) + np.abs(t * x)
    if name == "kl_log_target":
        return np.exp(t) * (np.abs(t) + np.abs(x))
    if name == "hinge":
        return abs(opts.get("margin", 1.0)) + np.abs(x)
    return 0.0


# ---- torch parity ---------------------------------------------------------------------------------

def _torch_loss(name, x, t, opts, reduction):
    """The loss in torch (functional or, for focal and hinge, the published formula in torch ops)."""
    import torch
    import torch.nn.functional as F
    kw = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in opts.items()}
    if name == "bce":
        return F.binary_cross_entropy(x, t, reduction=reduction, **kw)
    if name == "bce_logits":
        return F.binary_cross_entropy_with_logits(x, t, reduction=reduction, **kw)
    if name in ("kl", "kl_log_target"):
        return F.kl_div(x, t, reduction=reduction, **kw)
    if name == "focal":   # torchvision.ops.sigmoid_focal_loss, step by step
        alpha, gamma = kw.get("alpha", 0.25), kw.get("gamma", 2.0)
        p = torch.sigmoid(x)
        ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        p_t = p * t + (1 - p) * (1 - t)
        loss = ce * ((1 - p_t) ** gamma)
        if alpha >= 0:
            loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    else:                 # hinge
        loss = torch.relu(kw.get("margin", 1.0) - t * x)
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
@pytest.mark.parametrize("case", OPTION_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_parity(case, dtype, rng):
    torch = pytest.importorskip("torch")
    name, opts = case
    shape = (6, 10)
    x, t = _data(name, rng, shape)
    x, t = x.astype(dtype), t.astype(dtype)
    options = _options(name, opts, rng, shape, dtype)
    f, fg = FUNCS[name][:2]
    # float32: torch's own float32 formulas round differently (focal's 1 - p_t cancels): the
    # tolerance covers both sides' float32 error.
    rtol = 1e-12 if dtype == "float64" else 3e-5
    for reduction in _reductions(name):
        xt = torch.tensor(x, requires_grad=True)
        lt = _torch_loss(name, xt, torch.tensor(t), options, reduction)
        lt.sum().backward()
        loss = f(x, t, reduction=reduction, **options)
        loss2, grad = fg(x, t, reduction=reduction, **options)
        expected = lt.detach().numpy()
        atol = rtol * np.max(np.abs(expected)) if name in ("kl", "kl_log_target", "focal") else 0.0
        assert_close(loss, expected, rtol=rtol, atol=atol, what=f"{name} {reduction} loss")
        assert_identical(loss2, loss, what=f"{name} {reduction}: loss of _with_grad")
        gt = xt.grad.numpy()
        assert grad.dtype == x.dtype
        assert_close(grad, gt, rtol=rtol, atol=rtol * np.max(np.abs(gt)) if dtype == "float32" else 0.0,
                     what=f"{name} {reduction} grad")


# ---- reference conformance, dtypes and ISAs -----------------------------------------------------

def _check_against_reference(name, opts, dtype_name, rng, shape=(5, 37), num_threads=None):
    dt = get_dtype(dtype_name)
    x, t = _data(name, rng, shape)
    x, t = x.astype(dt), t.astype(dt)
    options = _options(name, opts, rng, shape, dt)
    f, fg, rf, rg = FUNCS[name]
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    ropts = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v) for k, v in options.items()}
    mag = _magnitude(name, x64, t64, ropts)
    for reduction in _reductions(name):
        loss, grad = fg(x, t, reduction=reduction, num_threads=num_threads, **options)
        expected = rf(x64, t64, reduction=reduction, **ropts)
        emag = mag if reduction == "none" else (np.sum(mag) if reduction == "sum" else np.sum(mag) / (
            shape[0] if reduction == "batchmean" else x.size))
        assert_close(loss, expected, rtol=LOSS_RTOL[dtype_name], atol=LOSS_RTOL[dtype_name] * emag + 1e-30,
                     what=f"{name} {dtype_name} {reduction} loss")
        assert_identical(f(x, t, reduction=reduction, num_threads=num_threads, **options), loss,
                         what=f"{name} {dtype_name} {reduction}: loss without gradient")
        assert grad.dtype == dt and grad.shape == x.shape
        g_expected = rg(x64, t64, reduction=reduction, **ropts)
        gatol = GRAD_ATOL[dtype_name]
        if name in ("bce_logits", "focal") and dtype_name != "float64" and g_expected.size:
            # (1 - t) s - pw t (1 - s) cancels for soft targets: float32 rounding of the terms
            gatol += 2.0 ** -21 * float(np.max(np.abs(g_expected)))
        assert_close(grad, g_expected, rtol=GRAD_RTOL[dtype_name], atol=gatol,
                     what=f"{name} {dtype_name} {reduction} grad")


@pytest.mark.parametrize("case", OPTION_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_reference_conformance(case, dtype_name, rng):
    _check_against_reference(case[0], case[1], dtype_name, rng)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS, indirect=True)
@pytest.mark.parametrize("name", list(FUNCS))
@pytest.mark.parametrize("dtype_name", ["float32", "float64", "float16"])
def test_every_isa(isa, name, dtype_name, rng):
    opts = {"weight": "W", "pos_weight": "PW"} if name == "bce_logits" else (
        {"log_target": True} if name == "kl_log_target" else {})
    # 4099 elements per row: full 16-lane groups, chunks and a tail, across two blocks
    _check_against_reference(name, opts, dtype_name, rng, shape=(3, 4099))


# ---- finite differences ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", OPTION_CASES, ids=_case_id)
def test_finite_differences(case, rng):
    name, opts = case
    shape = (3, 4)
    x, t = _data(name, rng, shape)
    if name == "hinge":   # stay away from the kink margin - t x = 0
        m = opts.get("margin", 1.0)
        x = np.where(np.abs(m - t * x) < 0.05, x + 0.2, x)
    if name == "focal" and opts.get("gamma") == 0.5:
        t = np.round(t)
    options = _options(name, opts, rng, shape)
    f, fg = FUNCS[name][:2]
    _, grad = fg(x, t, reduction="sum", **options)
    fd = fd_gradient(lambda z: f(z, t, reduction="sum", **options), x, 1e-4)
    assert_close(grad, fd, rtol=1e-6, atol=1e-9, what=f"{name} gradient vs finite differences")


# ---- extremes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bce_with_logits_extreme_logits(dtype):
    x = np.array([1e4, -1e4, 1e4, -1e4, 0.0], dtype)
    t = np.array([1.0, 0.0, 0.0, 1.0, 1.0], dtype)
    loss, grad = fastloss.binary_cross_entropy_with_logits_with_grad(x, t, reduction="none")
    assert_close(loss, np.array([0.0, 0.0, 1e4, 1e4, np.log(2.0)]), rtol=1e-7, what="loss")
    assert_close(grad, np.array([0.0, 0.0, 1.0, -1.0, -0.5]), rtol=0, what="grad")
    fl, fgr = fastloss.sigmoid_focal_loss_with_grad(x, t, reduction="none", alpha=-1)
    assert np.all(np.isfinite(fl)) and np.all(np.isfinite(fgr))
    assert_close(fl[:4], np.array([0.0, 0.0, 1e4, 1e4]), rtol=1e-7, what="focal loss")
    assert_close(fgr[:4], np.array([0.0, 0.0, 1.0, -1.0]), rtol=1e-7, what="focal grad")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kl_extremes(dtype):
    torch = pytest.importorskip("torch")
    x = np.array([1e4, -1e4, -1e4, 1e4, -3.0], dtype)
    t = np.array([0.0, 0.0, 0.5, 0.25, 1.0], dtype)
    loss, grad = fastloss.kl_div_with_grad(x, t, reduction="none")
    xt = torch.tensor(x, requires_grad=True)
    lt = torch.nn.functional.kl_div(xt, torch.tensor(t), reduction="none")
    lt.sum().backward()
    assert_close(loss, lt.detach().numpy(), rtol=1e-6, what="kl loss")
    assert_close(grad, xt.grad.numpy(), rtol=0, what="kl grad")
    # log_target: log-probabilities of +-1e4 in the target (exp overflows / underflows)
    tl = np.array([-1e4, -1e4, 0.0, -2.0, 5.0], dtype)
    loss, grad = fastloss.kl_div_with_grad(x, tl, reduction="none", log_target=True)
    lt = torch.nn.functional.kl_div(torch.tensor(x), torch.tensor(tl), reduction="none", log_target=True)
    assert_close(loss, lt.numpy(), rtol=1e-6, what="kl log_target loss")
    assert_close(grad, -np.exp(tl.astype(np.float64)), rtol=1e-6, what="kl log_target grad")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bce_probabilities_zero_and_one(dtype):
    torch = pytest.importorskip("torch")
    x = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0], dtype)
    t = np.array([0.0, 1.0, 1.0, 0.0, 0.5, 0.5], dtype)
    w = np.array([1.0, 2.0, 3.0, 0.5, 1.0, 1.0], dtype)
    for reduction in ("none", "sum", "mean"):
        loss, grad = fastloss.binary_cross_entropy_with_grad(x, t, weight=w, reduction=reduction)
        xt = torch.tensor(x, requires_grad=True)
        lt = torch.nn.functional.binary_cross_entropy(xt, torch.tensor(t), weight=torch.tensor(w),
                                                      reduction=reduction)
        lt.sum().backward()
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
        assert_close(loss, lt.detach().numpy(), rtol=1e-7, what=f"{reduction} loss")
        assert_close(grad, xt.grad.numpy(), rtol=1e-7, what=f"{reduction} grad")


def test_math_accuracy_through_the_losses(rng):
    """exp, log and log1p of src_c/fl_math.h, seen through losses that expose them:
    kl_div(log_target) at x = t - 1 is exp(t); kl_div at x = 0 is t log t; BCE at t = 1 is
    -log x and at t = 0 is -log1p(-x).  Within 3 ulp of the correctly rounded value."""
    for dtype, eps in ((np.float64, 2.0 ** -52), (np.float32, 2.0 ** -23)):
        tiny = np.finfo(dtype).tiny
        t = rng.uniform(-80 if dtype == np.float32 else -700, 80 if dtype == np.float32 else 700, 20000)
        t = t.astype(dtype)
        x = (t.astype(np.float64) - 1).astype(dtype)
        keep = (t.astype(np.float64) - x.astype(np.float64)) == 1
        got = fastloss.kl_div(x[keep], t[keep], reduction="none", log_target=True)
        assert_close(got, np.exp(t[keep].astype(np.float64)), rtol=3 * eps, what=f"exp {dtype.__name__}")
        p = np.exp(rng.uniform(np.log(tiny), 0, 20000)).astype(dtype)
        p = p[p > 0]
        got = fastloss.binary_cross_entropy(p, np.ones_like(p), reduction="none")
        want = -np.maximum(np.log(p.astype(np.float64)), -100)
        assert_close(got, want, rtol=3 * eps, what=f"log {dtype.__name__}")
        q = np.exp(rng.uniform(-60, 0, 20000)).astype(dtype)
        q = q[q < 1]
        got = fastloss.binary_cross_entropy(q, np.zeros_like(q), reduction="none")
        want = -np.maximum(np.log1p(-q.astype(np.float64)), -100)
        assert_close(got, want, rtol=3 * eps, what=f"log1p {dtype.__name__}")


# ---- layouts, in place, empty, threads ------------------------------------------------------------

@pytest.mark.parametrize("name", list(FUNCS))
def test_in_place_and_strided(name, rng):
    opts = {"log_target": True} if name == "kl_log_target" else {}
    f, fg = FUNCS[name][:2]
    x, t = _data(name, rng, (8, 40))
    x = x.astype(np.float32)
    t = t.astype(np.float32)
    loss, grad = fg(x, t, **opts)
    # in place: grad_out is the input itself
    xc = x.copy()
    loss2, g2 = fg(xc, t, grad_out=xc, **opts)
    assert g2 is xc
    assert_identical(loss2, loss, what="in-place loss")
    assert_identical(g2, grad, what="in-place grad")
    # strided and negative-stride views (the generic-stride loop): the bits of contiguous copies
    for sl in (np.s_[:, ::2], np.s_[::-1, ::-3], np.s_[1:7, 3:]):
        xv, tv = x[sl], t[sl]
        lv, gv = fg(xv, tv, reduction="sum", **opts)
        lc, gc = fg(np.ascontiguousarray(xv), np.ascontiguousarray(tv), reduction="sum", **opts)
        assert_identical(lv, lc, what=f"loss of view {sl}")
        assert_identical(gv, gc, what=f"grad of view {sl}")
        ev = f(xv, tv, reduction="none", **opts)
        assert_identical(ev, f(np.ascontiguousarray(xv), np.ascontiguousarray(tv), reduction="none", **opts),
                         what=f"elementwise loss of view {sl}")
    # a target broadcast along the rows (stride 0) equals the materialized one
    tb = t[:1]
    lb = f(x, tb, reduction="none", **opts)
    assert_close(lb, f(x, np.repeat(tb, x.shape[0], 0), reduction="none", **opts), rtol=0, what="broadcast")
    # grad_out overlapping the target is refused
    with pytest.raises(ValueError, match="overlaps target"):
        fg(x, t, grad_out=t, **opts)


@pytest.mark.parametrize("name", list(FUNCS))
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_row_strided_views_are_bitwise_identical(name, dtype, rng, isa):
    """Rows with a stride (last axis contiguous) give the bits of the contiguous array: the sum
    lanes follow the flat position, not the segment (pointwise_body.h, section 3b)."""
    dt = get_dtype(dtype)
    opts = {"log_target": True} if name == "kl_log_target" else {}
    f, fg = FUNCS[name][:2]
    x, t = _data(name, rng, (37, 45))
    x, t = x.astype(dt), t.astype(dt)
    if name in ("bce", "bce_logits"):
        opts["weight"] = rng.uniform(0.5, 2.0, (37, 1)).astype(dt)      # constant along each row
    big_x, big_t = np.zeros((74, 45), dt), np.zeros((74, 45), dt)
    big_x[::2], big_t[::2] = x, t
    xv, tv = big_x[::2], big_t[::2]
    for reduction in ("mean", "sum"):
        assert_identical(f(xv, tv, reduction=reduction, **opts), f(x, t, reduction=reduction, **opts),
                         what=f"{reduction} of a row-strided view")
        lv, gv = fg(xv, tv, reduction=reduction, **opts)
        lc, gc = fg(x, t, reduction=reduction, **opts)
        assert_identical(lv, lc, what=f"{reduction} loss of _with_grad, row-strided view")
        assert_identical(gv, gc, what=f"{reduction} gradient, row-strided view")


@pytest.mark.parametrize("name", list(FUNCS))
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_isas_give_identical_bits(name, dtype, rng):
    """Summed in a fixed lane order, with contraction off and the polynomial steps of fl_math.h
    written as explicit fused multiply-adds where the ISA has FMA: AVX2 and AVX-512 give the
    same bits; the baseline (SSE2, no FMA) multiplies and adds, so it may differ in the last
    bits of a result: within a few float32 (float64) ulp of the others."""
    from fastloss import _core
    opts = {"log_target": True} if name == "kl_log_target" else {}
    f, fg = FUNCS[name][:2]
    x, t = _data(name, rng, (5, 1000))
    x, t = x.astype(dtype), t.astype(dtype)
    previous = _core.get_isa()
    results = {}
    try:
        for isa in SUPPORTED_ISAS:
            _core.set_isa(isa)
            results[isa] = (fg(x, t, **opts), f(x, t, reduction="none", **opts))
    finally:
        _core.set_isa(previous)
    if len(results) < 2:
        pytest.skip("this machine runs one ISA only: nothing to compare")
    fma = [isa for isa in SUPPORTED_ISAS if isa != "baseline"]
    (l0, g0), e0 = results[fma[0]] if fma else results["baseline"]
    for isa in fma:
        (l, g), e = results[isa]
        assert_identical(l, l0, what=f"loss on {isa}")
        assert_identical(g, g0, what=f"gradient on {isa}")
        assert_identical(e, e0, what=f"elementwise loss on {isa}")
    if "baseline" in results and fma:
        (l, g), e = results["baseline"]
        u = 2.0 ** -52 if dtype == "float64" else 2.0 ** -23
        gu = {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "float16": 2.0 ** -10}[dtype]
        scale = float(np.max(np.abs(np.asarray(g0, dtype=np.float64)), initial=0.0))
        assert_close(l, l0, rtol=8 * u, what="baseline loss vs FMA ISAs")
        assert_close(e, e0, rtol=8 * u, atol=8 * u * float(np.max(np.abs(e0))), what="baseline elementwise loss")
        assert_close(g, g0, rtol=8 * gu, atol=8 * gu * scale, what="baseline gradient vs FMA ISAs")


def test_pos_weight_constant_and_float16_grad_out(rng):
    x, t = _data("bce_logits", rng, (4, 9))
    pw = np.full((4, 1), 2.5)                                # constant along the last axis
    got = fastloss.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction="none")
    want = ref.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction="none")
    assert_close(got, want, rtol=1e-12, what="pos_weight (4, 1)")
    xh = x.astype(np.float16)
    out = np.empty_like(xh)
    _, g = fastloss.binary_cross_entropy_with_logits_with_grad(xh, t.astype(np.float16), grad_out=out)
    assert g is out and g.dtype == np.float16


@pytest.mark.parametrize("name", list(FUNCS))
def test_empty(name):
    f, fg = FUNCS[name][:2]
    opts = {"log_target": True} if name == "kl_log_target" else {}
    x = np.empty((0, 3), np.float32)
    assert np.isnan(f(x, x, reduction="mean", **opts))
    assert f(x, x, reduction="sum", **opts) == 0
    e = f(x, x, reduction="none", **opts)
    assert e.shape == (0, 3) and e.dtype == np.float32
    loss, g = fg(x, x, reduction="mean", **opts)
    assert np.isnan(loss) and g.shape == (0, 3) and g.dtype == np.float32
    if name.startswith("kl"):
        assert np.isnan(f(x, x, reduction="batchmean", **opts))


@pytest.mark.parametrize("name", list(FUNCS))
def test_threads_bitwise(name, rng, threads_restored):
    opts = {"log_target": True} if name == "kl_log_target" else {}
    if name == "bce_logits":
        opts = {"pos_weight": rng.uniform(0.5, 2, 300).astype(np.float32),
                "weight": rng.uniform(0.5, 2, 300).astype(np.float32)}
    f, fg = FUNCS[name][:2]
    x, t = _data(name, rng, (500, 300))                      # 150k elements: > 2 blocks per thread
    x, t = x.astype(np.float32), t.astype(np.float32)
    results = [fg(x, t, num_threads=n, **opts) for n in (1, 2, 3)]
    for n, (loss, grad) in zip((2, 3), results[1:]):
        assert_identical(loss, results[0][0], what=f"loss with {n} threads")
        assert_identical(grad, results[0][1], what=f"grad with {n} threads")
    e1 = f(x, t, reduction="none", num_threads=1, **opts)
    assert_identical(f(x, t, reduction="none", num_threads=2, **opts), e1, what="none, 2 threads")


# ---- bad input ----------------------------------------------------------------------------------

X = np.full((2, 4), 0.5)
T = np.ones((2, 4))

BAD = [
    (fastloss.binary_cross_entropy, (X, np.ones(3)), {}, ValueError, "target"),
    (fastloss.binary_cross_entropy, (X, T), {"weight": np.ones(3)}, ValueError, "weight"),
    (fastloss.binary_cross_entropy_with_logits, (X, T), {"pos_weight": np.ones(3)}, ValueError, "pos_weight"),
    (fastloss.binary_cross_entropy, (np.ones((2, 4), np.int64), T), {}, TypeError, "input"),
    (fastloss.binary_cross_entropy_with_logits, (X.astype(complex), T), {}, TypeError, "input"),
    (fastloss.hinge_loss, (None, T), {}, TypeError, "input"),
    (fastloss.kl_div, (X, "abc"), {}, TypeError, "target"),
    (fastloss.binary_cross_entropy, (X, T), {"reduction": "batchmean"}, ValueError, "reduction"),
    (fastloss.kl_div, (X, T), {"reduction": "avg"}, ValueError, "reduction"),
    (fastloss.kl_div, (X, T), {"log_target": 1}, TypeError, "log_target"),
    (fastloss.hinge_loss, (X, T), {"margin": "1"}, TypeError, "margin"),
    (fastloss.hinge_loss, (X, T), {"margin": float("nan")}, ValueError, "margin"),
    (fastloss.sigmoid_focal_loss, (X, T), {"gamma": -1.0}, ValueError, "gamma"),
    (fastloss.sigmoid_focal_loss, (X, T), {"gamma": None}, TypeError, "gamma"),
    (fastloss.sigmoid_focal_loss, (X, T), {"alpha": float("inf")}, ValueError, "alpha"),
    (fastloss.sigmoid_focal_loss, (X, T), {"alpha": True}, TypeError, "alpha"),
    (fastloss.hinge_loss, (X, np.array([1.0, -1.0, 0.0, 1.0])), {}, ValueError, r"target.*0\.0"),
    (fastloss.hinge_loss_with_grad, (X, np.array([1.0, -1.0, 0.5, 1.0])), {}, ValueError, r"target.*0\.5"),
    (fastloss.binary_cross_entropy, (np.array([0.5, 1.5]), np.ones(2)), {}, ValueError, r"input.*1\.5"),
    (fastloss.binary_cross_entropy, (np.array([0.5, -0.25]), np.ones(2)), {}, ValueError, r"input.*-0\.25"),
    (fastloss.binary_cross_entropy, (np.array([0.5, np.nan]), np.ones(2)), {}, ValueError, "input.*nan"),
    (fastloss.binary_cross_entropy_with_grad, (np.array([0.5, 0.5]), np.array([0.0, 2.0])), {}, ValueError,
     r"target.*2\.0"),
    (fastloss.binary_cross_entropy_with_grad, (X, T), {"grad_out": np.empty((2, 4), np.float32)}, TypeError,
     "grad_out"),
    (fastloss.kl_div_with_grad, (X, T), {"grad_out": np.empty((4, 2))}, ValueError, "grad_out"),
]


@pytest.mark.parametrize("func,args,kwargs,exc,match", BAD,
                         ids=[f"{b[0].__name__}-{b[4]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(func, args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        func(*args, **kwargs)


def test_domain_error_leaves_grad_out_untouched():
    x = np.array([0.5, 1.5, 0.25])
    with pytest.raises(ValueError, match="input"):
        fastloss.binary_cross_entropy_with_grad(x, np.ones(3), grad_out=x)
    assert_identical(x, np.array([0.5, 1.5, 0.25]), what="input after a refused in-place call")


def test_docstring_examples():
    import doctest
    from fastloss import elementwise
    res = doctest.testmod(elementwise, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 5 and res.failed == 0
