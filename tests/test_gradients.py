"""Gradients: 4th-order central finite differences in float64 and the reference gradient, the
documented values at the kinks, and the grad_out buffer (preallocated, strided, in place)."""
from __future__ import annotations

import numpy as np
import pytest

import fastloss
from fastloss._registry import REGISTRY, TOLERANCES
from fl_testing import (DTYPE_NAMES, REGRESSION, SUPPORTED_ISAS, assert_close, assert_identical, get_dtype, grad_rtol,
                        loss_cases, loss_kwargs)

H = 1e-3


def _kinks(variant):
    """Where the losses are not twice differentiable: |d| = 0 and |d| = delta/beta."""
    return [0.0] + [float(v) for v in variant.values()]


def _smooth_point(rng, shape, variant, margin=50 * H):
    """(x, t) in float64 with every |x - t| at least `margin` away from a kink."""
    kinks = np.array(_kinks(variant))
    mags = rng.uniform(0.1, 3.0, size=4 * int(np.prod(shape)) + 16)
    mags = mags[np.min(np.abs(mags[:, None] - kinks[None, :]), axis=1) > margin]
    d = mags[:int(np.prod(shape))].reshape(shape) * rng.choice([-1.0, 1.0], size=shape)
    t = rng.standard_normal(shape)
    return t + d, t


def _fd_gradient(f, x, h=H):
    """d f / d x_i by the 4th-order central difference (f(x-2h) - 8f(x-h) + 8f(x+h) - f(x+2h)) / 12h."""
    g = np.empty_like(x)
    for i in np.ndindex(x.shape):
        vals = []
        for k in (-2, -1, 1, 2):
            xp = x.copy()
            xp[i] += k * h
            vals.append(f(xp))
        g[i] = (vals[0] - 8.0 * vals[1] + 8.0 * vals[2] - vals[3]) / (12.0 * h)
    return g


def _fd_rows():
    rows = []
    for p in loss_cases():
        name, variant, reduction = p.values
        for weighted in ((False, True) if REGISTRY[name].has_weight else (False,)):
            for axis in ((None, 0, -1) if reduction != "none" else (None,)):
                rows.append(pytest.param(name, variant, reduction, weighted, axis,
                                         id=f"{p.id}-{'weighted' if weighted else 'unweighted'}-axis={axis}"))
    return rows


@pytest.mark.parametrize("name,variant,reduction,weighted,axis", _fd_rows())
def test_gradient_matches_finite_differences(name, variant, reduction, weighted, axis, rng):
    spec = REGISTRY[name]
    x, t = _smooth_point(rng, (3, 4), variant)
    w = rng.uniform(0.5, 2.0, (3, 4)) if weighted else None
    kw = loss_kwargs(spec, reduction, variant, axis=axis)

    def total(xv):      # the gradient is documented as that of loss.sum()
        return float(np.sum(spec.func(xv, t, weight=w, **kw)))

    loss, grad = spec.with_grad(x, t, weight=w, **kw)
    assert_close(grad, _fd_gradient(total, x), rtol=1e-7, atol=1e-9,
                 what=f"{name} {variant} {reduction} weighted={weighted} axis={axis}: grad vs finite differences")
    assert_close(grad, spec.reference_grad(x, t, weight=w, **kw),
                 rtol=grad_rtol(spec, "float64", reduction, weighted), what="grad vs reference gradient")
    assert_close(loss, spec.func(x, t, weight=w, **kw), rtol=TOLERANCES["float64"]["loss"],
                 what="loss of _with_grad vs loss")


# ---- documented values at the kinks ---------------------------------------------------------

@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_gradient_is_zero_where_input_equals_target(dtype_name, isa):
    """sign(0) = 0: l1 (and smooth_l1 with beta=0) have gradient 0 at x == t, also for x = -0.0."""
    dt = get_dtype(dtype_name)
    x = np.array([0.0, -0.0, 1.5, -2.0], dtype=dt)
    t = np.array([0.0, 0.0, 1.5, -2.0], dtype=dt)
    for f, kw in [(fastloss.l1_loss_with_grad, {}), (fastloss.smooth_l1_loss_with_grad, {"beta": 0.0}),
                  (fastloss.smooth_l1_loss_with_grad, {}), (fastloss.huber_loss_with_grad, {}),
                  (fastloss.mse_loss_with_grad, {}), (fastloss.rmse_with_grad, {})]:
        loss, grad = f(x, t, **kw)
        assert float(loss) == 0.0 and not np.any(grad.astype(np.float64)), f"{f.__name__} {kw}: {loss}, {grad}"


@pytest.mark.parametrize("delta", [0.5, 1.0, 2.5])
def test_huber_at_the_threshold(delta, isa):
    """|d| == delta: loss 0.5 delta^2 (both branches agree) and gradient +-delta (the clip)."""
    x = np.array([delta, -delta, 0.0])
    loss, grad = fastloss.huber_loss_with_grad(x, np.zeros(3), delta=delta, reduction="none")
    assert loss.tolist() == [0.5 * delta * delta, 0.5 * delta * delta, 0.0]
    assert grad.tolist() == [delta, -delta, 0.0]


def test_smooth_l1_at_the_threshold_takes_the_linear_branch(isa):
    """z == beta uses the linear branch z - beta/2, like torch.  For this beta the two branches
    round to different doubles (quadratic 3.2377116103133794, linear 3.237711610313379)."""
    beta = 6.475423220626758
    quadratic, linear = 0.5 * beta * beta / beta, beta - 0.5 * beta
    assert quadratic != linear          # the test data does tell the branches apart
    x = np.full(64, beta)               # 64 elements: the vectorized path, not only a scalar tail
    loss, grad = fastloss.smooth_l1_loss_with_grad(x, np.zeros(64), beta=beta, reduction="none")
    assert set(loss.tolist()) == {linear}
    assert set(grad.tolist()) == {1.0}
    loss, grad = fastloss.smooth_l1_loss_with_grad(-x[:3], np.zeros(3), beta=beta, reduction="none")
    assert loss.tolist() == [linear] * 3 and grad.tolist() == [-1.0] * 3


# ---- grad_out -------------------------------------------------------------------------------

def _operands(rng, dtype, shape=(37, 29)):
    x = rng.standard_normal(shape).astype(dtype)
    t = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2.0, shape).astype(dtype)
    return x, t, w


@pytest.mark.parametrize("layout", ["C", "F", "strided", "negative"])
@pytest.mark.parametrize("name,variant,reduction", loss_cases(variants=False))
def test_grad_out_preallocated(name, variant, reduction, layout, rng):
    """grad_out receives the gradient (and is what is returned), whatever its memory layout."""
    spec = REGISTRY[name]
    x, t, w = _operands(rng, np.float32)
    kw = loss_kwargs(spec, reduction, variant)
    loss_ref, grad_ref = spec.with_grad(x, t, weight=w, **kw)
    buf = {"C": np.empty(x.shape, np.float32),
           "F": np.empty(x.shape, np.float32, order="F"),
           "strided": np.empty((x.shape[0], 3 * x.shape[1]), np.float32)[:, 1::3],
           "negative": np.empty(x.shape, np.float32)[::-1, ::-1]}[layout]
    buf[...] = np.nan
    loss, grad = spec.with_grad(x, t, weight=w, grad_out=buf, **kw)
    assert grad is buf
    assert_identical(grad, grad_ref, what=f"{name} grad_out ({layout})")
    assert_identical(loss, loss_ref, what=f"{name} loss with grad_out ({layout})")


def _copy_same_layout(x, layout):
    """A copy with the same strides (so that the kernel takes the same path: bitwise comparable)."""
    if layout == "negative":
        return np.copy(x[::-1, ::-1])[::-1, ::-1]
    return x.copy(order="K")


@pytest.mark.parametrize("layout", ["C", "F", "negative"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("name,variant,reduction", loss_cases(variants=False))
def test_grad_out_in_place(name, variant, reduction, dtype_name, layout, rng):
    """grad_out=input overwrites the input with the gradient; loss and gradient are exactly those
    of the out-of-place call (the kernel must read each x before writing its gradient)."""
    spec = REGISTRY[name]
    x, t, w = _operands(rng, get_dtype(dtype_name))
    if layout == "F":
        x = np.asfortranarray(x)
    elif layout == "negative":
        x = x[::-1, ::-1]
    for weight in (None, w):
        kw = loss_kwargs(spec, reduction, variant, weight=weight)
        loss_ref, grad_ref = spec.with_grad(_copy_same_layout(x, layout), t, **kw)
        xi = _copy_same_layout(x, layout)
        loss, grad = spec.with_grad(xi, t, grad_out=xi, **kw)
        assert grad is xi
        what = f"{name} {reduction} {dtype_name} {layout} weighted={weight is not None}"
        assert_identical(grad, grad_ref, what=f"{what}: in-place grad")
        assert_identical(loss, loss_ref, what=f"{what}: in-place loss")


def test_grad_out_in_place_with_promoted_target(rng):
    """float32 input with a float64 target computes in float64; the in-place gradient is still
    written into the float32 input."""
    x = rng.standard_normal(1000).astype(np.float32)
    t = rng.standard_normal(1000)
    expected = fastloss.reference.mse_loss_grad(x, t)
    loss, grad = fastloss.mse_loss_with_grad(x, t, grad_out=x)
    assert grad is x and grad.dtype == np.float32
    assert_close(grad, expected, rtol=TOLERANCES["float32"]["grad"], what="in-place promoted grad")
    assert loss.dtype == np.float64


@pytest.mark.parametrize("which", ["scalar target", "list target", "list weight", "list input"])
def test_grad_out_with_non_array_operands(which):
    """Python scalars and lists are valid operands (anything np.asarray accepts); a grad_out
    buffer must not change that."""
    x = np.array([0.5, 3.0, -2.0])
    args = {"input": x, "target": np.zeros(3), "weight": None}
    if which == "scalar target":
        args["target"] = 0.0
    elif which == "list target":
        args["target"] = [0.0, 0.0, 0.0]
    elif which == "list weight":
        args["weight"] = [1.0, 1.0, 1.0]
    else:
        args["input"] = x.tolist()
    buf = np.empty(3)
    loss, grad = fastloss.mse_loss_with_grad(args["input"], args["target"], weight=args["weight"],
                                             reduction="sum", grad_out=buf)
    assert grad is buf
    assert float(loss) == 0.25 + 9.0 + 4.0
    assert grad.tolist() == [1.0, 6.0, -4.0]


@pytest.mark.parametrize("isa_name", SUPPORTED_ISAS)
def test_in_place_gradient_large_every_isa(isa_name, rng):
    """In place on 1e5 elements with every ISA (the vector loops, not only the scalar tail)."""
    previous = fastloss._core.get_isa()
    fastloss._core.set_isa(isa_name)
    try:
        x, t, w = _operands(rng, np.float32, shape=(100_003,))
        for name, spec in REGRESSION.items():
            kw = loss_kwargs(spec, "mean", spec.variants[-1], weight=w if spec.has_weight else None)
            _, grad_ref = spec.with_grad(x, t, **kw)
            xi = x.copy()
            spec.with_grad(xi, t, grad_out=xi, **kw)
            assert_identical(xi, grad_ref, what=f"{name} in place, isa={isa_name}")
    finally:
        fastloss._core.set_isa(previous)
