"""One registry-driven suite over the losses of issue 6 (``fastloss._registry.field_specs()``:
binary cross-entropy with probabilities and logits, sigmoid focal, hinge, KL divergence,
multi-margin, triplet margin, distillation KL, sequence log-probs, DPO, InfoNCE).

Every loss gets the same checks from its registry entry (operands, options, input generator,
variants, reductions, error bound):

* value and gradients against ``fastloss.reference`` (float64) for every dtype, reduction and
  variant, within ``_error_bounds.field_tolerance`` (normwise);
* the ``_with_grad`` twin's value is the forward's, and each gradient has its operand's shape
  and dtype;
* read-only operands are accepted and never written;
* 1, 2 and 3 threads give bitwise identical results;
* views with strided leading axes give the contiguous result bitwise;
* ``grad_out`` (where the loss has one) is filled, or written in place over its operand, with
  the same values as a new gradient array;
* generic bad input: a missing (None) or complex operand -> TypeError naming it; an unknown
  reduction, num_threads=0 -> ValueError;
* each function is exported and documented with an example.

Torch parity, finite differences, extreme values and the loss-specific bad input live in the
per-module tests (test_elementwise_losses.py, test_margin_losses.py, test_distillation.py,
test_sequence_losses.py).
"""
from __future__ import annotations

import inspect
import zlib

import numpy as np
import pytest

import fastloss
from fastloss._registry import field_specs
from fl_testing import DTYPE_NAMES, get_dtype

FIELD = field_specs()


def _rng(*key):
    return np.random.default_rng(zlib.crc32("/".join(map(str, key)).encode()))


def _id(v: dict) -> str:
    return ",".join(f"{k}={v[k]}" for k in sorted(v)) or "default"


def _has_reduction(spec) -> bool:
    return "reduction" in spec.option_kinds


def make(spec, shape, dtype, seed=()):
    """The operands of a call (and the gradient-only ones) for `shape` in `dtype`, read-only."""
    ins = spec.make_inputs(_rng(spec.name, shape, *seed), shape, get_dtype(dtype))
    for a in ins.values():
        if isinstance(a, np.ndarray):
            a.setflags(write=False)
    return ins


def split(spec, ins):
    """(positional operands, keyword operands, gradient-only operands) of `ins`."""
    pos = [ins[o.name] for o in spec.operands if o.required]
    kw_ops = {o.name: ins[o.name] for o in spec.operands if not o.required and o.name in ins}
    grad_pos = [ins[o.name] for o in spec.grad_operands]
    return pos, kw_ops, grad_pos


def options(spec, reduction, variant):
    kw = dict(variant)
    if _has_reduction(spec):
        kw["reduction"] = reduction
    return kw


def call(spec, ins, kw, with_grad=False, **extra):
    pos, kw_ops, grad_pos = split(spec, ins)
    if with_grad:
        return spec.with_grad(*pos, *grad_pos, **kw_ops, **kw, **extra)
    return spec.func(*pos, **kw_ops, **kw, **extra)


def ref(spec, ins, kw, with_grad=False):
    pos, kw_ops, grad_pos = split(spec, ins)
    if with_grad:
        g = spec.reference_grad(*pos, *grad_pos, **kw_ops, **kw)
        return g if isinstance(g, tuple) else (g,)
    return spec.reference(*pos, **kw_ops, **kw)


def grad_operand_names(spec):
    """The operands the ``_with_grad`` twin returns gradients for, in order."""
    return {"triplet_margin_loss": ["anchor", "positive", "negative"],
            "dpo_loss": ["policy_chosen_logps", "policy_rejected_logps"],
            "info_nce_loss": ["query", "keys"]}.get(spec.name, [spec.operands[0].name])


def _subnormal(dtype) -> float:
    """The smallest subnormal of `dtype`: the absolute rounding floor of a result stored in it."""
    try:
        return float(np.finfo(dtype).smallest_subnormal)
    except ValueError:                      # bfloat16
        import ml_dtypes
        return float(ml_dtypes.finfo(dtype).smallest_subnormal)


def assert_within(got, exp, rtol, atol_factor, what, floor=0.0):
    """|got - exp| <= rtol |exp| + atol_factor max |exp| + floor (normwise), nan where exp is nan."""
    g = np.asarray(got, dtype=np.float64)
    e = np.asarray(exp, dtype=np.float64)
    assert g.shape == e.shape, f"{what}: shape {g.shape}, expected {e.shape}"
    assert np.array_equal(np.isnan(g), np.isnan(e)), f"{what}: nan pattern differs"
    finite = np.isfinite(e)
    assert np.array_equal(g[~finite & ~np.isnan(e)], e[~finite & ~np.isnan(e)]), f"{what}: infinities differ"
    scale = float(np.max(np.abs(e[finite]), initial=0.0))
    err = np.abs(g[finite] - e[finite])
    bound = rtol * np.abs(e[finite]) + atol_factor * scale + floor + 1e-300
    bad = err > bound
    assert not bad.any(), (f"{what}: max error {float(np.max(err)):.3g} (bound {float(np.max(bound)):.3g}) at "
                           f"{int(np.count_nonzero(bad))} of {err.size} elements; scale {scale:.3g}")


def conformance_cases():
    for name, spec in FIELD.items():
        for dt in DTYPE_NAMES:
            for shape in spec.test_shapes:
                for red in spec.reductions:
                    for v in spec.variants:
                        yield pytest.param(name, dt, shape, red, v,
                                           id=f"{name}-{dt}-{'x'.join(map(str, shape))}-{red}-{_id(v)}")


@pytest.mark.parametrize("name,dtype,shape,reduction,variant", list(conformance_cases()))
def test_matches_reference(name, dtype, shape, reduction, variant):
    spec = FIELD[name]
    ins = make(spec, shape, dtype)
    kw = options(spec, reduction, variant)
    tol = spec.tolerance(spec, dtype, ins, kw)
    got = call(spec, ins, kw)
    exp = ref(spec, ins, kw)
    assert_within(got, exp, tol.loss_rtol, tol.loss_atol, f"{name} value")
    res = call(spec, ins, kw, with_grad=True)
    assert_within(res[0], got, tol.loss_rtol, tol.loss_atol, f"{name} value of the _with_grad twin")
    exp_grads = ref(spec, ins, kw, with_grad=True)
    names = grad_operand_names(spec)
    assert len(exp_grads) == len(names)
    for g, e, op in zip(res[1:1 + len(names)], exp_grads, names):
        assert g.shape == np.shape(ins[op]) and g.dtype == ins[op].dtype, f"{name}: gradient of {op}"
        assert_within(g, e, tol.grad_rtol, tol.grad_atol, f"{name} gradient of {op}", floor=_subnormal(g.dtype))


def _bigger(shape):
    return (shape[0] * 64,) + tuple(shape[1:])


def _same(a, b, what):
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{what}[{i}]")
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, what
    assert np.array_equal(a.view(np.uint8) if a.dtype.itemsize == 2 and a.dtype.kind == "V" else a,
                          b.view(np.uint8) if b.dtype.itemsize == 2 and b.dtype.kind == "V" else b,
                          equal_nan=True), what


@pytest.mark.parametrize("name", [n for n, s in FIELD.items() if "num_threads" in s.option_kinds])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_thread_count_does_not_change_the_result(name, dtype):
    """(dpo_loss takes no num_threads: NumPy on (B,) vectors.)"""
    spec = FIELD[name]
    ins = make(spec, _bigger(spec.test_shapes[-1]), dtype)
    kw = options(spec, spec.reductions[0], spec.variants[-1])
    base = call(spec, ins, kw, num_threads=1)
    base_g = call(spec, ins, kw, with_grad=True, num_threads=1)
    for th in (2, 3):
        _same(call(spec, ins, kw, num_threads=th), base, f"{name} value, {th} threads")
        _same(call(spec, ins, kw, with_grad=True, num_threads=th), base_g, f"{name} with_grad, {th} threads")


def _strided(a):
    """A view of `a`'s values whose first axis has a stride of 2 rows (last axis contiguous)."""
    if not isinstance(a, np.ndarray) or a.ndim == 0:
        return a
    big = np.zeros((2 * a.shape[0],) + a.shape[1:], dtype=a.dtype)
    big[::2] = a
    v = big[::2]
    v.setflags(write=False)
    return v


@pytest.mark.parametrize("name", list(FIELD))
def test_strided_views_give_the_contiguous_result(name):
    spec = FIELD[name]
    ins = make(spec, spec.test_shapes[-1], "float32")
    kw = options(spec, spec.reductions[0], spec.variants[0])
    views = {k: _strided(v) if k != "grad_seq" else v for k, v in ins.items()}
    assert not views[spec.operands[0].name].flags.c_contiguous
    _same(call(spec, views, kw), call(spec, ins, kw), f"{name} value")
    _same(call(spec, views, kw, with_grad=True), call(spec, ins, kw, with_grad=True), f"{name} with_grad")


@pytest.mark.parametrize("name", [n for n, s in FIELD.items() if s.out])
@pytest.mark.parametrize("in_place", [False, True], ids=["grad_out", "in_place"])
def test_grad_out(name, in_place):
    spec = FIELD[name]
    ins = make(spec, spec.test_shapes[-1], "float32")
    kw = options(spec, spec.reductions[0], spec.variants[0])
    loss, grad = call(spec, ins, kw, with_grad=True)[:2]
    op = spec.inplace
    x = ins[op].copy()
    buf = x if in_place else np.full_like(x, np.nan)
    args = dict(ins, **{op: x})
    res = call(spec, args, kw, with_grad=True, grad_out=buf)
    assert res[1] is buf
    _same(res[0], loss, f"{name} loss")
    _same(buf, grad, f"{name} gradient in grad_out")


@pytest.mark.parametrize("name", list(FIELD))
def test_generic_bad_input(name):
    spec = FIELD[name]
    ins = make(spec, spec.test_shapes[0], "float64")
    kw = options(spec, spec.reductions[0], {})
    for op in spec.operands:
        if op.required:
            with pytest.raises(TypeError, match=op.name):
                call(spec, dict(ins, **{op.name: None}), kw)
        if op.kind == "float" and op.name in ins:
            with pytest.raises(TypeError, match=op.name):
                call(spec, dict(ins, **{op.name: ins[op.name].astype(np.complex128)}), kw)
    if _has_reduction(spec):
        with pytest.raises(ValueError, match="reduction"):
            call(spec, ins, dict(kw, reduction="avg"))
    if "num_threads" in spec.option_kinds:
        with pytest.raises(ValueError, match="num_threads"):
            call(spec, ins, kw, num_threads=0)


@pytest.mark.parametrize("name", list(FIELD))
def test_exported_and_documented(name):
    spec = FIELD[name]
    for f in (spec.func, spec.with_grad):
        assert getattr(fastloss, f.__name__) is f and f.__name__ in fastloss.__all__
    assert ">>>" in spec.func.__doc__, f"{name}: no example in the docstring"
    params = inspect.signature(spec.func).parameters
    declared = [o.name for o in spec.operands] + [o for o, _ in spec.options]
    assert sorted(params) == sorted(declared), f"{name}: signature {list(params)}, registry {declared}"
    gparams = inspect.signature(spec.with_grad).parameters
    gdeclared = declared + [o.name for o in spec.grad_operands] + ([spec.out] if spec.out else [])
    assert sorted(gparams) == sorted(gdeclared), f"{name}_with_grad: signature {list(gparams)}, registry {gdeclared}"


@pytest.mark.parametrize("name", [n for n, s in FIELD.items() if s.out] + ["mse_loss", "cross_entropy"])
def test_grad_out_with_a_zero_stride_is_rejected(name):
    """A writeable as_strided view whose rows are one memory location: threads would write it at
    once; ValueError before any work."""
    from fastloss._registry import REGISTRY
    spec = REGISTRY[name]
    shape = spec.test_shapes[-1] if spec.test_shapes else (6, 5)
    ins = spec.make_inputs(_rng(name, "zero-stride"), shape, np.dtype(np.float32))
    op = spec.inplace
    x = ins[op]
    row = np.empty(x.shape[1:], dtype=x.dtype)
    g = np.lib.stride_tricks.as_strided(row, shape=x.shape, strides=(0,) + row.strides)
    pos, kw_ops, grad_pos = split(spec, ins)
    with pytest.raises(ValueError, match="overlaps itself"):
        spec.with_grad(*pos, *grad_pos, **kw_ops, grad_out=g)
