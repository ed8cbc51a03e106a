"""Documented semantics, checked against values worked out by hand (not by fastloss.reference):
formulas and reductions, broadcasting of target and weight, weighted means, axis, empty and
0-d inputs, NaN/inf propagation, result dtypes and mixed-dtype promotion."""
from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest

import fastloss
from fastloss._registry import REGISTRY, TOLERANCES
from fl_testing import (DTYPE_NAMES, REGRESSION, assert_close, assert_identical, assert_loss_type, get_dtype, grad_rtol,
                        loss_cases, loss_kwargs, loss_dtype_for)

# ---- formulas, worked by hand ---------------------------------------------------------------
# d = x - t = [0.5, 3.0, -2.0]; w = [1.0, 2.0, 0.5] (sum 3.5)
X = [0.5, 3.0, -2.0]
W = [1.0, 2.0, 0.5]
#        function                      options          elementwise loss      elementwise derivative
FORMULAS = [
    ("mse_loss", {}, [0.25, 9.0, 4.0], [1.0, 6.0, -4.0]),
    ("l1_loss", {}, [0.5, 3.0, 2.0], [1.0, 1.0, -1.0]),
    ("huber_loss", {}, [0.125, 2.5, 1.5], [0.5, 1.0, -1.0]),                  # delta = 1
    ("huber_loss", {"delta": 2.0}, [0.125, 4.0, 2.0], [0.5, 2.0, -2.0]),      # 2 (3 - 1); 2 (2 - 1) at z == delta
    ("smooth_l1_loss", {}, [0.125, 2.5, 1.5], [0.5, 1.0, -1.0]),              # beta = 1
    ("smooth_l1_loss", {"beta": 2.0}, [0.0625, 2.0, 1.0], [0.25, 1.0, -1.0]),  # 0.25/4; 3 - 1; 2 - 1 at z == beta
    ("smooth_l1_loss", {"beta": 0.0}, [0.5, 3.0, 2.0], [1.0, 1.0, -1.0]),     # beta = 0 is l1
]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("name,opts,elem,deriv", FORMULAS, ids=[f"{f[0]}{f[1]}" for f in FORMULAS])
def test_formulas_and_reductions(name, opts, elem, deriv, weighted, isa):
    f, fg = getattr(fastloss, name), getattr(fastloss, name + "_with_grad")
    x, t = np.array(X), np.zeros(3)
    w = np.array(W) if weighted else None
    ww = W if weighted else [1.0, 1.0, 1.0]
    wl = [a * b for a, b in zip(ww, elem)]
    wd = [a * b for a, b in zip(ww, deriv)]
    total, wsum = sum(wl), sum(ww)
    expected = {"none": (wl, wd), "sum": (total, wd), "mean": (total / wsum, [g / wsum for g in wd])}
    for reduction, (loss_exp, grad_exp) in expected.items():
        what = f"{name}{opts} {reduction} weighted={weighted}"
        assert_close(f(x, t, weight=w, reduction=reduction, **opts), loss_exp, rtol=1e-15, what=what)
        loss, grad = fg(x, t, weight=w, reduction=reduction, **opts)
        assert_close(loss, loss_exp, rtol=1e-15, what=f"{what}: loss of _with_grad")
        assert_close(grad, grad_exp, rtol=1e-15, what=f"{what}: grad")


def test_rmse_by_hand(isa):
    x, t = np.array(X), np.zeros(3)
    r = math.sqrt((0.25 + 9.0 + 4.0) / 3)
    loss, grad = fastloss.rmse_with_grad(x, t)
    assert_close(fastloss.rmse(x, t), r, rtol=1e-15)
    assert_close(loss, r, rtol=1e-15)
    assert_close(grad, [d / (3 * r) for d in X], rtol=1e-15, what="rmse grad = d / (n rmse)")
    rw = math.sqrt((0.25 * 1.0 + 9.0 * 2.0 + 4.0 * 0.5) / 3.5)
    loss, grad = fastloss.rmse_with_grad(x, t, weight=np.array(W))
    assert_close(loss, rw, rtol=1e-15)
    assert_close(grad, [wi * d / (3.5 * rw) for wi, d in zip(W, X)], rtol=1e-15, what="weighted rmse grad")
    # per column: sqrt((1 + 9) / 2) and sqrt((4 + 36) / 2), the documented example
    assert_close(fastloss.rmse(np.array([[1.0, 2.0], [3.0, 6.0]]), np.zeros((2, 2)), axis=0),
                 [math.sqrt(5.0), math.sqrt(20.0)], rtol=1e-15)
    # a slice where rmse == 0 has gradient 0 (subgradient at the minimum), not nan
    loss, grad = fastloss.rmse_with_grad(np.array([[1.0, 2.0], [1.0, 6.0]]), np.array([[1.0, 0.0], [1.0, 0.0]]),
                                         axis=0)
    assert loss.tolist() == [0.0, math.sqrt(20.0)]
    assert grad[:, 0].tolist() == [0.0, 0.0] and np.all(np.isfinite(grad))


def test_aliases():
    assert fastloss.mse is fastloss.mse_loss
    assert fastloss.mae is fastloss.l1_loss
    assert fastloss.mae(np.array(X), np.zeros(3), reduction="sum") == 5.5


def test_weighted_mean_divides_by_sum_of_weights():
    """Documented choice (torch's weighted huber divides by the element count instead)."""
    x, t, w = np.array([1.0, 2.0, 3.0, 4.0]), np.zeros(4), np.array([1.0, 0.0, 3.0, 0.0])
    assert fastloss.mse_loss(x, t, weight=w) == (1.0 + 27.0) / 4.0
    assert fastloss.l1_loss(x, t, weight=w) == (1.0 + 9.0) / 4.0
    assert fastloss.huber_loss(x, t, weight=w) == (0.5 + 3 * 2.5) / 4.0
    assert fastloss.smooth_l1_loss(x, t, weight=w) == (0.5 + 3 * 2.5) / 4.0
    # all weights zero: 0 / 0 = nan, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss"):
            assert np.isnan(getattr(fastloss, name)(x, t, weight=np.zeros(4)))
            assert getattr(fastloss, name)(x, t, weight=np.zeros(4), reduction="sum") == 0.0


# ---- broadcasting of target and weight ------------------------------------------------------

N, K = 5, 37        # K: long enough rows for the vector loops
BROADCAST_SHAPES = {"python float": None, "0-d": (), "(1,)": (1,), "per-column (K,)": (K,),
                    "per-row (N,1)": (N, 1), "(1,K)": (1, K), "(1,1)": (1, 1), "full": (N, K)}


def _broadcast_rows():
    rows = []
    for p in loss_cases(variants=False, reductions=("mean",)):
        name = p.values[0]
        for operand in ("target", "weight"):
            if operand == "weight" and not REGISTRY[name].has_weight:
                continue
            for label in BROADCAST_SHAPES:
                rows.append(pytest.param(name, operand, label, id=f"{name}-{operand}-{label}"))
    return rows


@pytest.mark.parametrize("axis", [None, 0, -1, (0, 1)], ids=lambda a: f"axis={a}")
@pytest.mark.parametrize("name,operand,label", _broadcast_rows())
def test_broadcasting_target_and_weight(name, operand, label, axis, rng):
    """target and weight broadcast to input's shape: the result equals that of explicitly
    broadcast (materialized) operands."""
    spec = REGISTRY[name]
    dt = np.float64
    x = rng.standard_normal((N, K))
    t = rng.standard_normal((N, K))
    w = rng.uniform(0.5, 2.0, (N, K)) if spec.has_weight else None
    shape = BROADCAST_SHAPES[label]
    small = 0.75 if shape is None else (rng.standard_normal(shape) if operand == "target"
                                        else rng.uniform(0.5, 2.0, shape))
    full = np.broadcast_to(np.asarray(small, dt), (N, K)).copy()
    args_b = {"target": t, "weight": w, operand: small}
    args_f = {"target": t, "weight": w, operand: full}
    for reduction in spec.reductions:
        if reduction == "none" and axis is not None:
            continue
        kw = loss_kwargs(spec, reduction, axis=axis)
        what = f"{name} {operand}={label} {reduction} axis={axis}"
        exp = spec.func(x, args_f["target"], weight=args_f["weight"], **kw)
        ref = spec.reference(x, args_f["target"], weight=args_f["weight"], **kw)
        got = spec.func(x, args_b["target"], weight=args_b["weight"], **kw)
        tol = TOLERANCES["float64"]["loss" if reduction != "none" else "elem"]
        assert_close(got, exp, rtol=tol, what=what)
        assert_close(got, ref, rtol=tol, what=f"{what} vs reference")
        loss, grad = spec.with_grad(x, args_b["target"], weight=args_b["weight"], **kw)
        _, grad_f = spec.with_grad(x, args_f["target"], weight=args_f["weight"], **kw)
        assert grad.shape == x.shape
        assert_close(grad, grad_f, rtol=2 * grad_rtol(spec, "float64", reduction, args_b["weight"] is not None),
                     what=f"{what}: grad")


def test_input_is_never_broadcast_up():
    """The result and the gradient have input's shape: a larger target is an error."""
    with pytest.raises(ValueError, match="target"):
        fastloss.mse_loss(np.ones(3), np.ones((2, 3)))
    with pytest.raises(ValueError, match="weight"):
        fastloss.mse_loss(np.ones(3), np.ones(3), weight=np.ones((2, 3)))


# ---- axis -----------------------------------------------------------------------------------

AXES = [None, 0, 1, 2, -1, -2, -3, (0, 1), (0, 2), (1, 2), (2, 0), (-1, 0), (0, 1, 2), [0, 2], np.int64(1), ()]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("axis", AXES, ids=lambda a: f"axis={a!r}")
@pytest.mark.parametrize("name,variant,reduction", loss_cases(variants=False, reductions=("mean", "sum")))
def test_axis(name, variant, reduction, axis, weighted, rng):
    spec = REGISTRY[name]
    shape = (4, 5, 6)
    x, t = rng.standard_normal(shape), rng.standard_normal(shape)
    w = rng.uniform(0.5, 2.0, shape) if weighted else None
    kw = loss_kwargs(spec, reduction, variant, axis=axis, weight=w)
    got = spec.func(x, t, **kw)
    assert np.shape(got) == np.sum(x, axis=tuple(axis) if isinstance(axis, list) else axis).shape
    assert_close(got, spec.reference(x, t, **kw), rtol=TOLERANCES["float64"]["loss"],
                 what=f"{name} {reduction} axis={axis!r}")
    loss, grad = spec.with_grad(x, t, **kw)
    assert_close(grad, spec.reference_grad(x, t, **kw), rtol=grad_rtol(spec, "float64", reduction, weighted),
                 what=f"{name} {reduction} axis={axis!r}: grad")
    if isinstance(axis, (int, np.integer)) and axis < 0:        # negative axes are the same axes
        assert_identical(got, spec.func(x, t, **{**kw, "axis": int(axis) % 3}), what="negative axis")


def test_weighted_mean_per_column():
    """axis=0 with weights: sum(w * l, axis=0) / sum(w, axis=0) for each column, worked by hand."""
    x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    w = np.array([[1.0, 0.0], [2.0, 1.0], [1.0, 3.0]])
    # column 0: (1 + 2*9 + 25) / 4 = 11; column 1: (0 + 16 + 3*36) / 4 = 31
    assert fastloss.mse_loss(x, 0.0, weight=w, axis=0).tolist() == [11.0, 31.0]
    # per-row weight broadcast over the columns, reduced along the rows: (1 + 2*9 + 25)/4 and (4 + 2*16 + 36)/4
    wr = np.array([[1.0], [2.0], [1.0]])
    assert fastloss.mse_loss(x, 0.0, weight=wr, axis=0).tolist() == [11.0, 18.0]
    # per-column weight, reduced along the columns: rows (1*1 + 3*4)/4 ... = [13/4, 57/4, 133/4]
    wc = np.array([1.0, 3.0])
    assert fastloss.mse_loss(x, 0.0, weight=wc, axis=1).tolist() == [13 / 4, 57 / 4, 133 / 4]


# ---- empty and 0-d --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 4)], ids=str)
@pytest.mark.parametrize("dtype_name", ["float16", "float32", "float64"])
@pytest.mark.parametrize("name", list(REGRESSION))
def test_empty(name, dtype_name, shape):
    """mean of nothing is nan, sum is 0, 'none' is an empty array; no warnings."""
    spec = REGISTRY[name]
    dt = get_dtype(dtype_name)
    x = np.zeros(shape, dt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for reduction in spec.reductions:
            kw = loss_kwargs(spec, reduction)
            for w in ((None, np.ones(shape, dt)) if spec.has_weight else (None,)):
                loss = spec.func(x, x, weight=w, **kw)
                wl, grad = spec.with_grad(x, x, weight=w, **kw)
                assert grad.shape == shape and grad.dtype == dt
                for got in (loss, wl):
                    if reduction == "none":
                        assert_loss_type(got, dt, scalar=False)
                        assert got.shape == shape
                    else:
                        assert_loss_type(got, dt, scalar=True)
                        assert (np.isnan(got) if reduction == "mean" else got == 0.0), f"{reduction}: {got}"
        if spec.has_axis and len(shape) > 1:
            for axis in range(len(shape)):
                out_shape = np.sum(x, axis=axis).shape
                empty_slice = shape[axis] == 0
                kw = loss_kwargs(spec, "mean", axis=axis)
                got = spec.func(x, x, **kw)
                assert got.shape == out_shape
                assert np.all(np.isnan(got)) if empty_slice else got.size == 0
                if "sum" in spec.reductions:
                    got = spec.func(x, x, **loss_kwargs(spec, "sum", axis=axis))
                    assert got.shape == out_shape and np.all(got == 0.0)


# every loss at x = 3, t = 1 (d = 2): (loss, gradient)
ZERO_D = {"mse_loss": (4.0, 4.0), "l1_loss": (2.0, 1.0), "huber_loss": (1.5, 1.0),
          "smooth_l1_loss": (1.5, 1.0), "rmse": (2.0, 1.0)}


@pytest.mark.parametrize("name", list(ZERO_D))
def test_zero_dimensional(name):
    spec = REGISTRY[name]
    x, t = np.array(3.0), np.array(1.0)
    loss_exp, grad_exp = ZERO_D[name]
    for reduction in spec.reductions:
        kw = loss_kwargs(spec, reduction)
        got = spec.func(x, t, **kw)
        loss, grad = spec.with_grad(x, t, **kw)
        assert_loss_type(got, x.dtype, scalar=reduction != "none")
        assert got == loss_exp and loss == loss_exp
        assert isinstance(grad, np.ndarray) and grad.shape == () and grad == grad_exp
        if spec.has_weight:
            # a single weighted element: mean is the loss itself, sum is w * loss
            got = spec.func(x, t, weight=np.array(0.5), **kw)
            assert got == (loss_exp if reduction == "mean" else 0.5 * loss_exp)
    # Python floats are 0-d inputs
    assert spec.func(3.0, 1.0) == loss_exp


def test_python_sequences_are_float64():
    assert fastloss.mse_loss([1, 2], [0, 0]) == 2.5
    assert isinstance(fastloss.mse_loss([1, 2], [0, 0]), np.float64)
    assert fastloss.l1_loss((1.0, -3.0), 0, reduction="sum") == 4.0


# ---- NaN and inf ----------------------------------------------------------------------------
# x = [nan, 1, inf, -inf, .5], t = [0, nan, 0, 0, .5]: d = [nan, nan, inf, -inf, 0]
NAN_X = [np.nan, 1.0, np.inf, -np.inf, 0.5]
NAN_T = [0.0, np.nan, 0.0, 0.0, 0.5]
NAN, INF = float("nan"), float("inf")
NAN_CASES = [  # documented: l1's gradient at NaN is NaN (torch gives 0)
    ("mse_loss", {}, [NAN, NAN, INF, INF, 0.0], [NAN, NAN, INF, -INF, 0.0]),
    ("l1_loss", {}, [NAN, NAN, INF, INF, 0.0], [NAN, NAN, 1.0, -1.0, 0.0]),
    ("huber_loss", {"delta": 0.5}, [NAN, NAN, INF, INF, 0.0], [NAN, NAN, 0.5, -0.5, 0.0]),
    ("smooth_l1_loss", {"beta": 0.5}, [NAN, NAN, INF, INF, 0.0], [NAN, NAN, 1.0, -1.0, 0.0]),
    ("smooth_l1_loss", {"beta": 0.0}, [NAN, NAN, INF, INF, 0.0], [NAN, NAN, 1.0, -1.0, 0.0]),
]


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("name,opts,elem,deriv", NAN_CASES, ids=[f"{c[0]}{c[1]}" for c in NAN_CASES])
def test_nan_and_inf_propagate(name, opts, elem, deriv, dtype_name, isa):
    dt = get_dtype(dtype_name)
    f, fg = getattr(fastloss, name), getattr(fastloss, name + "_with_grad")
    # tiled to 80 elements so that the vector loops see the special values too
    x = np.tile(np.array(NAN_X), 16).astype(dt)
    t = np.tile(np.array(NAN_T), 16).astype(dt)
    loss, grad = fg(x, t, reduction="none", **opts)
    assert_close(loss, np.tile(elem, 16), rtol=0, what=f"{name}: elementwise loss")
    assert_close(grad, np.tile(deriv, 16), rtol=0, what=f"{name}: grad")
    assert np.isnan(f(x, t, **opts)) and np.isnan(f(x, t, reduction="sum", **opts))
    # inf without nan: the sum is inf
    assert f(x[2:5], t[2:5], reduction="sum", **opts) == INF


def test_nan_in_one_slice_stays_in_that_slice(isa):
    x = np.zeros((3, 1000))
    x[1, 500] = np.nan
    loss, grad = fastloss.mse_loss_with_grad(x, 0.0, axis=1)
    assert np.isnan(loss[1]) and loss[0] == 0.0 and loss[2] == 0.0
    assert np.isnan(grad[1, 500]) and np.count_nonzero(np.isnan(grad)) == 1
    assert np.isnan(fastloss.rmse(x, 0.0))


# ---- result dtypes and promotion ------------------------------------------------------------

PROMOTIONS = [  # input, target, weight -> loss dtype (the gradient always has input's dtype)
    ("float32", "float64", None, "float64"),
    ("float64", "float32", None, "float64"),
    ("float16", "float32", None, "float32"),
    ("float16", "float64", None, "float64"),
    ("float32", "float16", None, "float32"),
    ("bfloat16", "float16", None, "float32"),
    ("bfloat16", "float32", None, "float32"),
    ("float16", "bfloat16", None, "float32"),
    ("bfloat16", "float64", None, "float64"),
    ("float32", "float32", "float64", "float64"),
    ("float16", "float16", "float32", "float32"),
]


@pytest.mark.parametrize("xt,tt,wt,lt", PROMOTIONS, ids=[f"{a}-{b}-{c}" for a, b, c, _ in PROMOTIONS])
def test_mixed_dtypes_promote(xt, tt, wt, lt, rng):
    xd, td = get_dtype(xt), get_dtype(tt)
    wd = None if wt is None else get_dtype(wt)
    x = rng.standard_normal(300).astype(xd)
    t = rng.standard_normal(300).astype(td)
    w = None if wd is None else rng.uniform(0.5, 2.0, 300).astype(wd)
    for name, spec in REGRESSION.items():
        kw = loss_kwargs(spec, "mean", weight=w)
        loss, grad = spec.with_grad(x, t, **kw)
        assert np.asarray(loss).dtype == np.dtype(lt), f"{name}: loss dtype {np.asarray(loss).dtype}"
        assert grad.dtype == xd, f"{name}: grad dtype {grad.dtype}"
        assert_close(loss, spec.reference(x, t, **kw), rtol=TOLERANCES["float32"]["loss"], what=f"{name} loss")
        assert_close(grad, spec.reference_grad(x, t, **kw), rtol=TOLERANCES[xt]["grad"] + 1e-12,
                     atol=TOLERANCES[xt]["grad_atol"], what=f"{name} grad")


@pytest.mark.parametrize("dtype_name", ["float16", "float32", "bfloat16"])
def test_python_scalar_target_keeps_the_input_dtype(dtype_name):
    """A Python float is a 'weak' scalar in NumPy 2 (NEP 50): np.float32 array - 0.5 is float32.
    fastloss documents NumPy promotion and 'float32 otherwise', so a float32/float16/bfloat16
    input with target=0.5 must give a float32 loss (and no float64 copy of the input)."""
    dt = get_dtype(dtype_name)
    x = np.arange(8).astype(dt)
    if dtype_name != "bfloat16":
        assert (x - 0.5).dtype == dt                   # NumPy's rule (ml_dtypes gives float32 here)
    assert fastloss.mse_loss(x, 0.5).dtype == loss_dtype_for(dt)
    assert fastloss.l1_loss(x, 0, reduction="none").dtype == loss_dtype_for(dt)
    assert fastloss.huber_loss(np.float32(3.0), 1.0).dtype == np.float32


def test_loss_dtype_is_float32_for_half_precision_inputs(rng):
    """Documented deviation from torch (which returns float16): the loss of float16 input is
    float32, so a sum far above float16's maximum (65504) is still finite and exact."""
    x = np.ones(100_000, np.float16)
    assert fastloss.mse_loss(x, np.zeros_like(x), reduction="sum") == np.float32(100_000.0)
    assert fastloss.mse_loss(x, np.zeros_like(x), weight=np.full_like(x, 1.25)) == 1.0
    assert fastloss.mse_loss(x, np.zeros_like(x), weight=np.full_like(x, 1.25), reduction="sum") == 125_000.0


def test_all_registry_losses_are_public():
    for name, spec in REGISTRY.items():
        assert getattr(fastloss, name) is spec.func
        assert name in fastloss.__all__ and spec.func.__doc__
        if spec.with_grad is not None:
            assert getattr(fastloss, name + "_with_grad") is spec.with_grad
            assert name + "_with_grad" in fastloss.__all__ and spec.with_grad.__doc__


def test_gradient_is_that_of_the_sum_of_outputs(rng):
    """reduction='none' and axis reductions: every output contributes with unit weight."""
    x, t = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    _, g_none = fastloss.mse_loss_with_grad(x, t, reduction="none")
    _, g_sum = fastloss.mse_loss_with_grad(x, t, reduction="sum")
    _, g_axis = fastloss.mse_loss_with_grad(x, t, reduction="sum", axis=1)
    assert_identical(g_none, g_sum)
    assert_identical(g_axis, g_sum)
    _, g_mean_axis = fastloss.mse_loss_with_grad(x, t, axis=0)       # each column is a mean over 4 rows
    assert_close(g_mean_axis, 2 * (x - t) / 4, rtol=1e-15)
    _, g_mean_tuple = fastloss.mse_loss_with_grad(x, t, axis=(0, 1))
    assert_close(g_mean_tuple, 2 * (x - t) / 24, rtol=1e-15)


def test_every_combination_of_size_one_dims(rng):
    """Size-1 dimensions anywhere, reduced or kept (the kernel drops and merges dimensions)."""
    base = rng.standard_normal((1, 5, 1, 7, 1))
    t = rng.standard_normal((5, 1, 7, 1))
    for r in range(0, 6):
        for axis in itertools.combinations(range(5), r):
            got = fastloss.mse_loss(base, t, axis=axis, reduction="sum")
            assert_close(got, fastloss.reference.mse_loss(base, t, axis=axis, reduction="sum"), rtol=1e-12,
                         what=f"axis={axis}")


def test_float32_overflow_gives_inf():
    """A float32 loss beyond float32's range is inf (the double accumulator itself is finite);
    the gradient, 2 * 1e30, is still finite."""
    x = np.full((4, 3), 1e30, np.float32)
    with np.errstate(over="ignore"):            # NumPy's cast of the double result may warn
        for kw in ({}, {"reduction": "sum"}, {"axis": 0}, {"reduction": "none"}):
            assert np.all(np.isposinf(fastloss.mse_loss(x, np.zeros_like(x), **kw))), kw
        _, grad = fastloss.mse_loss_with_grad(x, np.zeros_like(x), reduction="sum")
    assert np.all(grad == np.float32(2e30))
