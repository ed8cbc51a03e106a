"""Parity with torch.nn.functional (torch 2.13 CPU), with the documented deviations made explicit:

* weighted huber, reduction="mean": fastloss divides by sum(w), torch by the element count;
* the loss of float16/bfloat16 input is float32 in fastloss, the input dtype in torch;
* the l1 gradient (and smooth_l1 with beta=0) where x - t is NaN: NaN in fastloss, 0 in torch;
* all-zero weights with huber "mean": nan (0/0) in fastloss, 0 in torch.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import fastloss
from fastloss._registry import REGISTRY
from fl_testing import assert_close, get_dtype, loss_cases, loss_kwargs

torch = pytest.importorskip("torch")
F = torch.nn.functional

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64,
                "bfloat16": torch.bfloat16}
#: torch computes in the input dtype (several roundings, its own summation order): tolerances
#: of a few roundings of that dtype.
RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2.0**-8, "bfloat16": 2.0**-5}
ATOL = {"float64": 0.0, "float32": 1e-30, "float16": 2.0**-22, "bfloat16": 1e-30}  # float16: a few subnormal ulps
#: torch losses with a weight= argument (smooth_l1_loss has none)
TORCH_WEIGHTED = {"mse_loss", "l1_loss", "huber_loss"}


def _tensor(a, dtype_name, requires_grad=False):
    """numpy (incl. ml_dtypes bfloat16) -> torch tensor of the same values."""
    t = torch.from_numpy(np.asarray(a, dtype=np.float64)).to(TORCH_DTYPES[dtype_name])
    return t.requires_grad_(requires_grad)


def _torch_loss_and_grad(name, variant, x, t, w, reduction, dtype_name):
    """torch's loss and the gradient of loss.sum() with respect to input (rmse: sqrt of mse)."""
    xt = _tensor(x, dtype_name, requires_grad=True)
    tt = _tensor(t, dtype_name)
    kw = {} if w is None else {"weight": _tensor(w, dtype_name)}
    if name == "rmse":
        out = torch.sqrt(F.mse_loss(xt, tt, reduction="mean", **kw))
    else:
        out = getattr(F, name)(xt, tt, reduction=reduction, **variant, **kw)
    out.sum().backward()
    return out, xt.grad


def _to_np(t):
    return t.detach().to(torch.float64).numpy()


def _parity_rows():
    rows = []
    for p in loss_cases():
        name, variant, reduction = p.values
        if name not in TORCH_WEIGHTED | {"smooth_l1_loss", "rmse"}:
            continue
        for dt in TORCH_DTYPES:
            for weighted in ((False, True) if name in TORCH_WEIGHTED | {"rmse"} else (False,)):
                rows.append(pytest.param(name, variant, reduction, dt, weighted,
                                         id=f"{p.id}-{dt}-{'weighted' if weighted else 'unweighted'}"))
    return rows


@pytest.mark.parametrize("shape", [(1000,), (37, 29)], ids=str)
@pytest.mark.parametrize("name,variant,reduction,dtype_name,weighted", _parity_rows())
def test_matches_torch(name, variant, reduction, dtype_name, weighted, shape, rng):
    spec = REGISTRY[name]
    dt = get_dtype(dtype_name)
    x = rng.standard_normal(shape).astype(dt)
    t = rng.standard_normal(shape).astype(dt)
    w = rng.uniform(0.5, 2.0, shape).astype(dt) if weighted else None
    loss, grad = spec.with_grad(x, t, weight=w, **loss_kwargs(spec, reduction, variant))
    tloss, tgrad = _torch_loss_and_grad(name, variant, x, t, w, reduction, dtype_name)
    expected_loss, expected_grad = _to_np(tloss), _to_np(tgrad)
    if name == "huber_loss" and weighted and reduction == "mean":
        # documented deviation: fastloss divides by sum(w), torch by the element count
        scale = x.size / float(np.sum(w.astype(np.float64)))
        expected_loss, expected_grad = expected_loss * scale, expected_grad * scale
    what = f"{name} {variant} {reduction} {dtype_name} weighted={weighted}"
    assert_close(loss, expected_loss, rtol=RTOL[dtype_name], atol=ATOL[dtype_name], what=f"{what}: loss vs torch")
    assert_close(grad, expected_grad, rtol=RTOL[dtype_name], atol=ATOL[dtype_name], what=f"{what}: grad vs torch")
    # documented deviation: float32 loss for 16-bit input; the gradient has the input dtype in both
    assert np.asarray(loss).dtype == (np.float64 if dtype_name == "float64" else np.float32)
    assert tloss.dtype == TORCH_DTYPES[dtype_name] and tgrad.dtype == TORCH_DTYPES[dtype_name]
    assert grad.dtype == dt


@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss"])
def test_axis_mean_matches_torch_per_column(name, rng):
    """axis=0 is torch's elementwise loss averaged over dim 0."""
    x, t = rng.standard_normal((50, 7)), rng.standard_normal((50, 7))
    expected = getattr(F, name)(torch.from_numpy(x), torch.from_numpy(t), reduction="none").mean(dim=0)
    assert_close(getattr(fastloss, name)(x, t, axis=0), expected.numpy(), rtol=1e-12)


# x = [nan, 1, inf, -inf, .5, 2], t = [0, nan, 0, 0, .5, 0]
NAN_X = [math.nan, 1.0, math.inf, -math.inf, 0.5, 2.0]
NAN_T = [0.0, math.nan, 0.0, 0.0, 0.5, 0.0]
NAN_CASES = [("mse_loss", {}), ("l1_loss", {}), ("huber_loss", {"delta": 0.5}), ("smooth_l1_loss", {"beta": 0.5}),
             ("smooth_l1_loss", {"beta": 0.0})]


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("name,opts", NAN_CASES, ids=[f"{n}{o}" for n, o in NAN_CASES])
def test_nan_and_inf_match_torch_except_the_l1_gradient(name, opts, dtype_name):
    x = np.tile(NAN_X, 12).astype(dtype_name)          # 72 elements: vector paths in both libraries
    t = np.tile(NAN_T, 12).astype(dtype_name)
    for reduction in ("none", "sum", "mean"):
        loss, grad = getattr(fastloss, name + "_with_grad")(x, t, reduction=reduction, **opts)
        tloss, tgrad = _torch_loss_and_grad(name, opts, x, t, None, reduction, dtype_name)
        assert_close(loss, _to_np(tloss), rtol=1e-6, what=f"{name} {reduction}: loss")
        expected = _to_np(tgrad)
        l1_like = name == "l1_loss" or opts.get("beta") == 0.0
        nan_d = np.isnan(x.astype(np.float64) - t)
        if l1_like:
            # documented deviation: torch's sign(nan) is 0, fastloss propagates the NaN
            assert np.all(expected[nan_d] == 0.0)
            expected = np.where(nan_d, np.nan, expected)
        assert_close(grad, expected, rtol=1e-6, what=f"{name} {reduction}: grad")


def test_smooth_l1_threshold_branch_matches_torch():
    """At z == beta both take the linear branch (this beta makes the branches round differently)."""
    beta = 6.475423220626758
    x = torch.full((64,), beta, dtype=torch.float64, requires_grad=True)
    tl = F.smooth_l1_loss(x, torch.zeros(64, dtype=torch.float64), beta=beta, reduction="none")
    tl.sum().backward()
    loss, grad = fastloss.smooth_l1_loss_with_grad(np.full(64, beta), np.zeros(64), beta=beta, reduction="none")
    np.testing.assert_array_equal(loss, tl.detach().numpy())
    np.testing.assert_array_equal(grad, x.grad.numpy())


@pytest.mark.parametrize("name,opts", [("huber_loss", {"delta": 0.1}), ("smooth_l1_loss", {"beta": 0.1})])
def test_float32_threshold_given_as_double(name, opts):
    """float32 input with a double threshold 0.1: z = 0.1f counts as the threshold in both."""
    x = np.full(16, 0.1, np.float32)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    tl = getattr(F, name)(xt, torch.zeros(16), reduction="none", **opts)
    tl.sum().backward()
    loss, grad = getattr(fastloss, name + "_with_grad")(x, np.zeros(16, np.float32), reduction="none", **opts)
    np.testing.assert_array_equal(grad, xt.grad.numpy())
    assert_close(loss, tl.detach().numpy().astype(np.float64), rtol=2.0**-22)


def test_smooth_l1_with_beta_zero_is_l1_in_both(rng):
    x, t = rng.standard_normal(100), rng.standard_normal(100)
    expected = F.l1_loss(torch.from_numpy(x), torch.from_numpy(t)).item()
    assert F.smooth_l1_loss(torch.from_numpy(x), torch.from_numpy(t), beta=0.0).item() == expected
    assert fastloss.smooth_l1_loss(x, t, beta=0.0) == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "huber_loss"])
def test_zero_weights(name):
    """mse/l1: 0/0 = nan in both; huber: torch divides by numel (0), fastloss by sum(w) (nan)."""
    x, t, w = np.array([1.0, 2.0]), np.zeros(2), np.zeros(2)
    ours = getattr(fastloss, name)(x, t, weight=w)
    theirs = getattr(F, name)(torch.from_numpy(x), torch.from_numpy(t), weight=torch.from_numpy(w)).item()
    assert np.isnan(ours)
    assert theirs == 0.0 if name == "huber_loss" else math.isnan(theirs)
    # w = 0 times l = inf is nan in both (no masking)
    x = np.array([np.inf, 1.0])
    ours = getattr(fastloss, name)(x, t, weight=np.array([0.0, 1.0]), reduction="sum")
    theirs = getattr(F, name)(torch.from_numpy(x), torch.from_numpy(t), weight=torch.tensor([0.0, 1.0], dtype=torch.float64),
                              reduction="sum").item()
    assert np.isnan(ours) and math.isnan(theirs)


@pytest.mark.parametrize("shape", [(0,), (0, 3)], ids=str)
@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss"])
def test_empty_and_zero_dimensional_match_torch(name, shape):
    f, tf = getattr(fastloss, name), getattr(F, name)
    x = np.zeros(shape)
    assert np.isnan(f(x, x)) and math.isnan(tf(torch.from_numpy(x), torch.from_numpy(x)).item())
    assert f(x, x, reduction="sum") == tf(torch.from_numpy(x), torch.from_numpy(x), reduction="sum").item() == 0.0
    assert f(x, x, reduction="none").shape == tuple(tf(torch.from_numpy(x), torch.from_numpy(x), reduction="none").shape)
    x0, t0 = np.array(3.0), np.array(1.0)
    for reduction in ("mean", "sum", "none"):
        theirs = tf(torch.from_numpy(x0), torch.from_numpy(t0), reduction=reduction)
        ours = f(x0, t0, reduction=reduction)
        assert np.shape(ours) == tuple(theirs.shape) == () and float(ours) == theirs.item()


@pytest.mark.parametrize("xt,tt", [("float32", "float64"), ("float16", "float32"), ("float64", "float16")])
@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "smooth_l1_loss"])
def test_mixed_dtype_promotion_matches_torch(name, xt, tt, rng):
    """mse, l1, smooth_l1 promote like torch (torch's huber keeps the input dtype instead)."""
    x = rng.standard_normal(100).astype(xt)
    t = rng.standard_normal(100).astype(tt)
    theirs = getattr(F, name)(torch.from_numpy(x), torch.from_numpy(t))
    ours = getattr(fastloss, name)(x, t)
    assert str(theirs.dtype) == f"torch.{ours.dtype}"
    assert_close(ours, theirs.item(), rtol=1e-5)
