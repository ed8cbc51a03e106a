"""Property-based tests: random problems for every public function, against fastloss.reference.

Hypothesis draws shapes (including empty and size-1 axes), dtypes (float16, float32, float64,
bfloat16), memory layouts (C, Fortran, negative strides, strided views), values from three
profiles -- ``normal`` (|v| <= 8), ``wide`` (|v| <= 1e4) and ``special`` (mixing in 0, -0,
subnormals of the dtype, +-1e4, +-inf and NaN) -- options and thread counts, and compares
the value and the gradient with the float64 reference within the registry's tolerance for
that call (``spec.tolerance``); NaN must match NaN and inf the same inf, and come without a
NumPy warning.  A gradient that
overflows the input dtype (float16) is compared with the reference rounded to that dtype.

The profile is the derandomized one of tests/conftest.py (reproducible in CI), with the example
counts set here.
Families come from the registry: a new loss of an existing family is drawn automatically.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fastloss._registry import FUNCTIONS, by_family
from fl_testing import DTYPE_NAMES, assert_close, get_dtype

THREADS = (1, 2, 3)
PROFILES = ("normal", "wide", "special")
REGRESSION = by_family("regression")
CLASSIFICATION = by_family("classification")
#: Examples per test (x3 for the regression and cross-entropy tests, x2 for the others): about
#: 15 s in all on 2 cores.  FASTLOSS_PROPERTY_EXAMPLES=2000 for a longer local run.
EXAMPLES = int(os.environ.get("FASTLOSS_PROPERTY_EXAMPLES", "200"))


# ---- strategies ---------------------------------------------------------------------------------

def _tiny(dtype) -> float:
    if dtype.name == "bfloat16":
        import ml_dtypes
        return float(ml_dtypes.finfo(dtype).smallest_subnormal)
    return float(np.finfo(dtype).smallest_subnormal)


def _elements(profile, dtype, *, special=True):
    if profile == "normal":
        return st.floats(-8.0, 8.0)
    if profile == "wide":
        return st.floats(-1e4, 1e4)
    extra = [0.0, -0.0, 1e4, -1e4, 1.0, -2.5] + ([np.inf, -np.inf, np.nan] if special else [])
    return st.one_of(st.floats(-8.0, 8.0), st.sampled_from(extra),
                     st.integers(-7, 7).map(lambda k: k * _tiny(dtype)))


def _in_layout(a, layout):
    """`a`'s values in a C, Fortran, negatively strided or strided (every 2nd element) array."""
    if a.ndim == 0 or layout == "C":
        return np.array(a, order="C")                 # (np.ascontiguousarray makes 0-d arrays 1-d)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "reversed":
        flip = (slice(None, None, -1),) * a.ndim
        return np.ascontiguousarray(a[flip])[flip]
    big = np.zeros(tuple(2 * n for n in a.shape), a.dtype)
    v = big[(slice(None, None, 2),) * a.ndim]
    v[...] = a
    return v


@st.composite
def float_arrays(draw, shape, dtype, profile, *, special=True, layout=None):
    values = draw(hnp.arrays(np.float64, shape, elements=_elements(profile, dtype, special=special)))
    with np.errstate(over="ignore"):
        a = values.astype(dtype)
    return _in_layout(a, layout or draw(st.sampled_from(["C", "F", "reversed", "strided"])))


@st.composite
def weights(draw, shape, dtype, profile):
    """Positive weights; the special profile adds zeros (and a NaN)."""
    el = st.floats(0.25, 4.0)
    if profile == "special":
        el = st.one_of(el, st.sampled_from([0.0, np.nan]))
    a = draw(hnp.arrays(np.float64, shape, elements=el)).astype(dtype)
    return _in_layout(a, draw(st.sampled_from(["C", "F", "reversed", "strided"])))


# ---- checking -------------------------------------------------------------------------------------

def _round_like(expected, got):
    """The reference rounded to the result's dtype where that overflows (float16: |g| > 65504)."""
    e = np.asarray(expected, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        r = e.astype(np.asarray(got).dtype).astype(np.float64)
    return np.where(np.isinf(r) & np.isfinite(e), r, e)


def _quiet_reference(f, *args, **kw):
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return f(*args, **kw)


def _split(spec, args):
    pos = [args[o.name] for o in spec.operands if o.required]
    opt = {o.name: args[o.name] for o in spec.operands if not o.required and args.get(o.name) is not None}
    return pos, opt


def check(spec, dtype_name, args, kw, label, *, with_grad, ref_args=None):
    """spec.func (and spec.with_grad) against the reference (on `ref_args`, default `args`)
    within spec.tolerance."""
    ref_args = args if ref_args is None else ref_args
    pos, opt = _split(spec, args)
    rpos, ropt = _split(spec, ref_args)
    rkw = {k: v for k, v in kw.items() if k != "num_threads"}
    expected = _quiet_reference(spec.reference, *rpos, **ropt, **rkw)
    tol = spec.tolerance(spec, dtype_name, {**ref_args}, rkw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # nan and inf results come silently
        got = spec.func(*pos, **opt, **kw)
        if with_grad:
            loss, grad = spec.with_grad(*pos, **opt, **kw)
    event(f"{dtype_name}")
    g = np.asarray(got, np.float64)
    event("empty result" if g.size == 0 else "nan in result" if np.isnan(g).any()
          else "inf in result" if np.isinf(g).any() else "finite result")
    assert_close(got, _round_like(expected, got), rtol=tol.loss_rtol, atol=tol.loss_atol, what=f"{label}: value")
    if with_grad:
        exp_grad = _quiet_reference(spec.reference_grad, *rpos, **ropt, **rkw)
        x = pos[0]
        assert grad.shape == x.shape and grad.dtype == x.dtype, f"{label}: grad {grad.dtype}{grad.shape}"
        assert_close(loss, _round_like(expected, loss), rtol=tol.loss_rtol, atol=tol.loss_atol,
                     what=f"{label}: loss of _with_grad")
        assert_close(grad, _round_like(exp_grad, grad), rtol=tol.grad_rtol, atol=tol.grad_atol,
                     what=f"{label}: grad")
    return got


def _shape_label(args):
    return " ".join(f"{k}{getattr(v, 'shape', '')}{getattr(v, 'dtype', '')}/{_strides(v)}" for k, v in args.items()
                    if v is not None)


def _strides(a):
    return getattr(a, "strides", None)


# ---- regression -----------------------------------------------------------------------------------

@st.composite
def regression_problems(draw):
    name = draw(st.sampled_from(sorted(REGRESSION)))
    spec = REGRESSION[name]
    variant = draw(st.sampled_from(spec.variants))
    reduction = draw(st.sampled_from(spec.reductions))
    dtype_name = draw(st.sampled_from(DTYPE_NAMES))
    dtype = get_dtype(dtype_name)
    profile = draw(st.sampled_from(PROFILES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    x = draw(float_arrays(shape, dtype, profile))

    def operand_shape():        # broadcastable to `shape`: some dims set to 1, leading dims dropped
        s = tuple(1 if draw(st.booleans()) else n for n in shape)
        return s[draw(st.integers(0, len(s))):]

    args = {"input": x, "target": draw(float_arrays(operand_shape(), dtype, profile)), "weight": None}
    if draw(st.booleans()):
        args["weight"] = draw(weights(operand_shape(), dtype, profile))
    kw = dict(variant)
    if "reduction" in spec.option_kinds:
        kw["reduction"] = reduction
    if reduction != "none" and spec.has_axis and shape and draw(st.booleans()):
        axes = draw(st.lists(st.integers(-len(shape), len(shape) - 1), min_size=1, max_size=len(shape),
                             unique_by=lambda a: a % len(shape)))
        kw["axis"] = axes[0] if len(axes) == 1 and draw(st.booleans()) else tuple(axes)
    kw["num_threads"] = draw(st.sampled_from(THREADS))
    return spec.name, dtype_name, profile, args, kw


@settings(max_examples=3 * EXAMPLES)
@given(regression_problems())
def test_regression_losses_match_reference(problem):
    name, dtype_name, profile, args, kw = problem
    spec = REGRESSION[name]
    label = f"{spec.name} {dtype_name} {profile} {kw} {_shape_label(args)}"
    event(f"profile {profile}")
    got = check(spec, dtype_name, args, kw, label, with_grad=True)
    x = args["input"]
    assert np.asarray(got).dtype == (np.float64 if dtype_name == "float64" else np.float32)
    if kw.get("reduction", "mean") != "none":
        assert np.shape(got) == np.shape(np.sum(np.zeros(x.shape), axis=kw.get("axis")))


# ---- classification: rows of classes on `axis` --------------------------------------------------------

@st.composite
def class_layout(draw, *, axis_free=True):
    """(rows shape, V, class-axis position in the operand, ndim)."""
    rows = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4))
    V = draw(st.sampled_from([1, 2, 3, 5, 8, 33]))
    pos = draw(st.integers(0, len(rows))) if axis_free else len(rows)
    return rows, V, pos


def _with_class_axis(draw, rows, V, pos, dtype, profile, *, special=True):
    """An array of rows + (V,) in a random layout, with the class axis moved to `pos`."""
    a = draw(float_arrays(rows + (V,), dtype, profile, special=special, layout="C"))
    a = np.moveaxis(a, -1, pos)
    return _in_layout(a, draw(st.sampled_from(["C", "F", "reversed", "strided"])))


def _targets(draw, rows, V, ignore_index):
    t = draw(hnp.arrays(np.int64, rows, elements=st.integers(0, V - 1)))
    if ignore_index is not None and t.size and draw(st.booleans()):
        mask = draw(hnp.arrays(bool, rows))
        t = np.where(mask, ignore_index, t)
    return t


@st.composite
def cross_entropy_problems(draw):
    spec = CLASSIFICATION["cross_entropy"]
    dtype_name = draw(st.sampled_from(DTYPE_NAMES))
    dtype = get_dtype(dtype_name)
    profile = draw(st.sampled_from(PROFILES))
    rows, V, pos = draw(class_layout())
    x = _with_class_axis(draw, rows, V, pos, dtype, profile)
    soft = draw(st.booleans())
    kw = {"axis": pos if draw(st.booleans()) else pos - len(rows) - 1,
          "reduction": draw(st.sampled_from(spec.reductions)),
          "label_smoothing": draw(st.sampled_from([0.0, 0.1, 1.0])),
          "z_loss": draw(st.sampled_from([0.0, 1e-3])),
          "softcap": draw(st.sampled_from([None, 5.0, 1e3])),
          "num_threads": draw(st.sampled_from(THREADS))}
    if soft:
        # class probabilities (not checked, as torch): non-negative; the special profile adds NaN and 0
        tdt = get_dtype(draw(st.sampled_from(DTYPE_NAMES)))
        q = draw(float_arrays(rows + (V,), np.float64, "normal", layout="C"))
        q = np.abs(q) / np.maximum(np.sum(np.abs(q), axis=-1, keepdims=True), 1e-300)
        if profile == "special" and q.size and draw(st.booleans()):
            q.reshape(-1)[draw(st.integers(0, q.size - 1))] = draw(st.sampled_from([np.nan, 0.0, 2.0]))
        t = _in_layout(np.moveaxis(q.astype(tdt), -1, pos), draw(st.sampled_from(["C", "F", "reversed", "strided"])))
        kw["ignore_index"] = draw(st.sampled_from([-100, -1]))
    else:
        ii = draw(st.sampled_from([-100, -1, 0, V - 1]))
        t = _targets(draw, rows, V, ii)
        kw["ignore_index"] = ii
    args = {"logits": x, "target": t, "weight": None, "sample_weight": None}
    if draw(st.booleans()):
        args["weight"] = draw(weights((V,), np.float64, profile))
    if draw(st.booleans()):
        sw_shape = rows[draw(st.integers(0, len(rows))):]
        args["sample_weight"] = draw(weights(sw_shape, np.float64, profile))
    return spec.name, dtype_name, profile, args, kw


@settings(max_examples=3 * EXAMPLES)
@given(cross_entropy_problems())
def test_cross_entropy_matches_reference(problem):
    name, dtype_name, profile, args, kw = problem
    spec = CLASSIFICATION[name]
    label = f"cross_entropy {dtype_name} {profile} {kw} {_shape_label(args)}"
    event(f"profile {profile}")
    x, t = args["logits"], args["target"]
    soft = np.shape(t) == np.shape(x)
    event("class probabilities" if soft else "class indices")
    ref_args = args
    if soft and t.dtype != x.dtype and x.dtype != np.float64:
        # documented: probabilities of another dtype are converted once to float32 (the compute
        # type of non-float64 logits); a tiny float64 probability may become 0 there
        ref_args = dict(args, target=t.astype(np.float32))
    check(spec, dtype_name, args, kw, label, with_grad=True, ref_args=ref_args)


@st.composite
def index_target_problems(draw):
    """nll_loss and perplexity: classes on the last axis, class-index targets."""
    name = draw(st.sampled_from(sorted(n for n, s in CLASSIFICATION.items() if s.with_grad is None)))
    spec = CLASSIFICATION[name]
    dtype_name = draw(st.sampled_from(DTYPE_NAMES))
    dtype = get_dtype(dtype_name)
    profile = draw(st.sampled_from(PROFILES))
    rows, V, _ = draw(class_layout(axis_free=False))
    x = _with_class_axis(draw, rows, V, len(rows), dtype, profile)
    ii = draw(st.sampled_from([-100, -1, 0]))
    args = {spec.operands[0].name: x, "target": _targets(draw, rows, V, ii)}
    kw = {"ignore_index": ii, "num_threads": draw(st.sampled_from(THREADS))}
    if "reduction" in spec.option_kinds:
        kw["reduction"] = draw(st.sampled_from(spec.reductions))
    if any(o.name == "weight" for o in spec.operands):
        args["weight"] = draw(weights((V,), np.float64, profile)) if draw(st.booleans()) else None
    return spec.name, dtype_name, profile, args, kw


@settings(max_examples=2 * EXAMPLES)
@given(index_target_problems())
def test_nll_loss_and_perplexity_match_reference(problem):
    name, dtype_name, profile, args, kw = problem
    spec = CLASSIFICATION[name]
    check(spec, dtype_name, args, kw, f"{spec.name} {dtype_name} {profile} {kw} {_shape_label(args)}",
          with_grad=False)


@st.composite
def softmax_problems(draw):
    spec = FUNCTIONS[draw(st.sampled_from(sorted(FUNCTIONS)))]
    dtype_name = draw(st.sampled_from(DTYPE_NAMES))
    dtype = get_dtype(dtype_name)
    profile = draw(st.sampled_from(PROFILES))
    rows, V, pos = draw(class_layout())
    x = _with_class_axis(draw, rows, V, pos, dtype, profile)
    kw = {"axis": pos if draw(st.booleans()) else pos - len(rows) - 1, "num_threads": draw(st.sampled_from(THREADS))}
    return spec.name, dtype_name, profile, {"x": x}, kw


@settings(max_examples=2 * EXAMPLES)
@given(softmax_problems())
def test_softmax_family_matches_reference(problem):
    name, dtype_name, profile, args, kw = problem
    spec = FUNCTIONS[name]
    got = check(spec, dtype_name, args, kw, f"{spec.name} {dtype_name} {profile} {kw} {_shape_label(args)}",
                with_grad=False)
    x = args["x"]
    if spec.name == "logsumexp":
        assert got.dtype == (np.float64 if dtype_name == "float64" else np.float32)
    else:
        assert got.shape == x.shape and got.dtype == x.dtype
