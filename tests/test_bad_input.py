"""Bad input raises TypeError/ValueError with a message that names the argument, before any work."""
from __future__ import annotations

import numpy as np
import pytest

from fastloss._registry import REGISTRY
from fl_testing import loss_kwargs, takes_reduction

NAMES = list(REGISTRY)
OPERANDS = ("input", "target", "weight")


def _call(spec, with_grad, input, target, **kw):
    return (spec.with_grad if with_grad else spec.func)(input, target, **kw)


def _operands(**override):
    args = {"input": np.linspace(-1.0, 1.0, 6).reshape(2, 3), "target": np.zeros((2, 3)), "weight": None}
    args.update(override)
    return args


def _run(spec, with_grad, args, **kw):
    return _call(spec, with_grad, args["input"], args["target"], weight=args["weight"], **kw)


BAD_VALUES = [
    # wrong type
    ("str", "abc"), ("bytes", b"ab"), ("dict", {"a": 1.0}), ("set", {1.0, 2.0}), ("object", object()),
    # int, bool, complex and extended-precision dtypes
    ("int64", np.ones((2, 3), np.int64)), ("int32", np.ones((2, 3), np.int32)),
    ("uint8", np.ones((2, 3), np.uint8)), ("bool", np.ones((2, 3), bool)),
    ("complex128", np.ones((2, 3), np.complex128)), ("complex64", np.ones((2, 3), np.complex64)),
    ("complex list", [[1j, 0, 0], [0, 0, 0]]), ("longdouble", np.ones((2, 3), np.longdouble)),
    ("object array", np.array([[1.0, "a", None]] * 2, dtype=object)),
    ("ragged list", [[1.0, 2.0, 3.0], [1.0]]),
]


@pytest.mark.parametrize("with_grad", [False, True], ids=["loss", "with_grad"])
@pytest.mark.parametrize("label,value", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
@pytest.mark.parametrize("operand", OPERANDS)
@pytest.mark.parametrize("name", NAMES)
def test_bad_operand_raises_type_error(name, operand, label, value, with_grad):
    spec = REGISTRY[name]
    if operand == "weight" and not spec.has_weight:
        return _assert_no_weight_argument(spec)
    with pytest.raises(TypeError, match=operand):
        _run(spec, with_grad, _operands(**{operand: value}))


def _assert_no_weight_argument(spec):
    with pytest.raises(TypeError, match="weight"):
        spec.func(np.ones(3), np.ones(3), weight=np.ones(3))


@pytest.mark.parametrize("operand", ["input", "target"])
@pytest.mark.parametrize("name", NAMES)
def test_none_operand_raises_type_error(name, operand):
    with pytest.raises(TypeError, match=operand):
        _run(REGISTRY[name], False, _operands(**{operand: None}))


SHAPE_MISMATCHES = [
    ("target", (2, 3), (4,)),
    ("target", (2, 3), (3, 2)),
    ("target", (2, 1), (3,)),        # torch would broadcast input up to (2, 3): fastloss never does
    ("target", (3,), (2, 3)),
    ("weight", (2, 3), (2,)),
    ("weight", (2, 3), (4, 3)),
    ("weight", (3,), (2, 3)),
]


@pytest.mark.parametrize("with_grad", [False, True], ids=["loss", "with_grad"])
@pytest.mark.parametrize("operand,input_shape,bad_shape", SHAPE_MISMATCHES,
                         ids=[f"{o}{b}-vs-input{i}" for o, i, b in SHAPE_MISMATCHES])
@pytest.mark.parametrize("name", NAMES)
def test_shape_mismatch_raises_value_error(name, operand, input_shape, bad_shape, with_grad):
    spec = REGISTRY[name]
    if operand == "weight" and not spec.has_weight:
        return _assert_no_weight_argument(spec)
    args = {"input": np.ones(input_shape), "target": np.ones(input_shape), "weight": None}
    args[operand] = np.ones(bad_shape)
    with pytest.raises(ValueError, match=operand):
        _run(spec, with_grad, args)


@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", None, 1, ("mean",)], ids=repr)
@pytest.mark.parametrize("name", NAMES)
def test_bad_reduction_raises_value_error(name, reduction):
    spec = REGISTRY[name]
    if not takes_reduction(spec):
        with pytest.raises(TypeError, match="reduction"):
            spec.func(np.ones(3), np.ones(3), reduction="mean")
        return
    for f in (spec.func, spec.with_grad):
        with pytest.raises(ValueError, match="reduction"):
            f(np.ones(3), np.ones(3), reduction=reduction)


def _bad_option_rows():
    rows = []
    for name, spec in REGISTRY.items():
        for kwargs, exc, word in spec.bad_options:
            rows.append(pytest.param(name, kwargs, exc, word, id=f"{name}-{kwargs}"))
    # beyond the registry's list: infinities, bools and arrays are not a threshold either
    rows += [pytest.param("huber_loss", {"delta": float("inf")}, ValueError, "delta", id="huber-delta=inf"),
             pytest.param("huber_loss", {"delta": -0.0}, ValueError, "delta", id="huber-delta=-0.0"),
             pytest.param("huber_loss", {"delta": True}, TypeError, "delta", id="huber-delta=True"),
             pytest.param("huber_loss", {"delta": None}, TypeError, "delta", id="huber-delta=None"),
             pytest.param("smooth_l1_loss", {"beta": float("nan")}, ValueError, "beta", id="sl1-beta=nan"),
             pytest.param("smooth_l1_loss", {"beta": -1}, ValueError, "beta", id="sl1-beta=-1"),
             pytest.param("smooth_l1_loss", {"beta": "0.5"}, TypeError, "beta", id="sl1-beta=str")]
    return rows


@pytest.mark.parametrize("name,kwargs,exc,word", _bad_option_rows())
def test_bad_options_raise(name, kwargs, exc, word):
    spec = REGISTRY[name]
    for f in (spec.func, spec.with_grad):
        with pytest.raises(exc, match=word):
            f(np.ones(3), np.zeros(3), **kwargs)


BAD_AXES = [(2, np.exceptions.AxisError), (-3, np.exceptions.AxisError), ((0, 5), np.exceptions.AxisError),
            (1.0, TypeError), ("0", TypeError), (True, TypeError), ((0, 0), ValueError), ((1, -1), ValueError)]


@pytest.mark.parametrize("axis,exc", BAD_AXES, ids=[repr(a) for a, _ in BAD_AXES])
@pytest.mark.parametrize("name", [n for n, s in REGISTRY.items() if s.has_axis])
def test_bad_axis_raises(name, axis, exc):
    spec = REGISTRY[name]
    x = np.ones((2, 3))
    for f in (spec.func, spec.with_grad):
        with pytest.raises(exc, match="axis"):
            f(x, x, axis=axis)
    assert issubclass(np.exceptions.AxisError, ValueError)


@pytest.mark.parametrize("name", [n for n, s in REGISTRY.items() if "none" in s.reductions])
def test_axis_with_reduction_none_raises(name):
    spec = REGISTRY[name]
    x = np.ones((2, 3))
    for f in (spec.func, spec.with_grad):
        with pytest.raises(ValueError, match="axis"):
            f(x, x, reduction="none", axis=0)


@pytest.mark.parametrize("name", NAMES)
def test_options_are_keyword_only(name):
    spec = REGISTRY[name]
    x = np.ones(3)
    with pytest.raises(TypeError):
        spec.func(x, x, None)
    with pytest.raises(TypeError):
        spec.with_grad(x, x, None)


# ---- grad_out -------------------------------------------------------------------------------

def _unaligned(shape):
    buf = np.zeros(int(np.prod(shape)) * 8 + 1, np.uint8)
    a = buf[1:].view(np.float64).reshape(shape)
    assert not a.flags.aligned
    return a


def _read_only(shape):
    a = np.zeros(shape)
    a.flags.writeable = False
    return a


BAD_GRAD_OUT = [
    ("list", lambda x, t, w: [[0.0] * 3] * 2, TypeError, "grad_out"),
    ("tuple", lambda x, t, w: ((0.0,) * 3,) * 2, TypeError, "grad_out"),
    ("shape (3,)", lambda x, t, w: np.zeros(3), ValueError, "grad_out"),
    ("shape (3, 2)", lambda x, t, w: np.zeros((3, 2)), ValueError, "grad_out"),
    ("shape (2, 3, 1)", lambda x, t, w: np.zeros((2, 3, 1)), ValueError, "grad_out"),
    ("float32", lambda x, t, w: np.zeros((2, 3), np.float32), TypeError, "grad_out"),
    ("int64", lambda x, t, w: np.zeros((2, 3), np.int64), TypeError, "grad_out"),
    ("byteswapped", lambda x, t, w: np.zeros((2, 3), ">f8" if np.little_endian else "<f8"), TypeError,
     "grad_out"),
    ("read-only", lambda x, t, w: _read_only((2, 3)), ValueError, "grad_out"),
    ("unaligned", lambda x, t, w: _unaligned((2, 3)), ValueError, "grad_out"),
    ("is target", lambda x, t, w: t, ValueError, "grad_out overlaps target"),
    ("is weight", lambda x, t, w: w, ValueError, "grad_out overlaps weight"),
    ("overlaps input, shifted", lambda x, t, w: x.base[1:7].reshape(2, 3), ValueError, "grad_out overlaps input"),
    ("input reversed", lambda x, t, w: x[::-1], ValueError, "grad_out overlaps input"),
    ("input transposed view", lambda x, t, w: x.base[:6].reshape(3, 2).T, ValueError, "grad_out overlaps input"),
]


@pytest.mark.parametrize("label,make,exc,pattern", BAD_GRAD_OUT, ids=[b[0] for b in BAD_GRAD_OUT])
@pytest.mark.parametrize("name", NAMES)
def test_bad_grad_out_raises(name, label, make, exc, pattern):
    spec = REGISTRY[name]
    base = np.linspace(-1.0, 1.0, 8)
    x = base[:6].reshape(2, 3)                   # a view, so tests can build overlapping buffers
    t = np.full((2, 3), 0.25)
    w = np.full((2, 3), 2.0) if spec.has_weight else None
    if label == "is weight" and w is None:
        return _assert_no_weight_argument(spec)
    out = make(x, t, w)
    snapshots = [None if a is None else np.array(a, copy=True) for a in (x, t, w)]
    with pytest.raises(exc, match=pattern):
        spec.with_grad(x, t, weight=w, grad_out=out, **loss_kwargs(spec, "mean"))
    # raised before any work: nothing was written
    for a, before in zip((x, t, w), snapshots):
        if a is not None:
            np.testing.assert_array_equal(a, before)


@pytest.mark.parametrize("name", NAMES)
def test_in_place_call_with_bad_argument_leaves_input_untouched(name):
    spec = REGISTRY[name]
    x = np.linspace(-1.0, 1.0, 6)
    before = x.copy()
    with pytest.raises(ValueError, match="target"):
        spec.with_grad(x, np.zeros(5), grad_out=x)
    if takes_reduction(spec):
        with pytest.raises(ValueError, match="reduction"):
            spec.with_grad(x, np.zeros(6), grad_out=x, reduction="avg")
    np.testing.assert_array_equal(x, before)
