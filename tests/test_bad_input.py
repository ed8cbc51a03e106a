"""Bad input, for every public function: one table, driven by the registry.

Every public function (each loss, its ``_with_grad`` twin, and log_softmax / softmax /
logsumexp: ``fastloss._registry.public_calls()``) is fed each kind of bad input of issue 5.
A case either raises -- the exact exception type, with a message that names the argument,
before any work (operands and output buffers are left untouched) -- or returns the
documented value, checked against ``fastloss.reference`` within the registry's tolerance
(NaN matching NaN, inf the same inf) and without a NumPy warning.  The rules are those of the
README, "Errors and special values"; a new function gets the whole table by declaring its
operands (kind and shape) and option kinds in the registry.

Categories (one test function each): not an array / wrong dtype; lists accepted; shape
mismatches; 0-d; empty; one class; class-index targets; NaN / inf / all -inf rows / zero
weights; memory layouts of every operand; output buffers (grad_out / out); options; the
registry covers the public API.  Indexing past 2**31 elements: tests/test_huge.py.
"""
from __future__ import annotations

import re
import warnings
import zlib

import numpy as np
import pytest

import fastloss
from fastloss._registry import FIELD_FAMILIES, FUNCTIONS, OPTION_KINDS, REGISTRY, public_calls
from fl_testing import assert_close, assert_identical

#: Every public function; the table below covers the families whose operands it models (the
#: losses of issue 6, FIELD_FAMILIES, have tests/test_field_losses.py and their own modules).
ALL_CALLS = {c.name: c for c in public_calls()}
CALLS = {n: c for n, c in ALL_CALLS.items() if c.spec.family not in FIELD_FAMILIES}
#: The first operand's shape (classes on the last axis) for each family.
BASE_SHAPE = {"regression": (2, 3), "classification": (4, 5), "softmax": (4, 5)}


# ---- building and checking calls ------------------------------------------------------------

def _rng(*key):
    return np.random.default_rng(zlib.crc32("/".join(map(str, key)).encode()))


def operand_shape(spec, op, first_shape):
    """The shape an operand has in a valid call whose first operand has `first_shape`
    (classes on the last axis)."""
    return {"first": first_shape, "rows": first_shape[:-1], "classes": first_shape[-1:]}[op.shape]


def valid_operand(spec, op, first_shape, rng, dtype=np.float64):
    """A valid value of `op` (weights uniform in [0.5, 2], class indices in range)."""
    shape = operand_shape(spec, op, first_shape)
    if op.kind in ("index", "index_or_probs"):
        return rng.integers(0, max(first_shape[-1], 1), size=shape)
    if op.kind == "weight":
        return rng.uniform(0.5, 2.0, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def base_args(spec, *, shape=None, dtype=np.float64, optional=(), soft=False):
    """A valid call's operands: the required ones from spec.make_inputs, plus the optional
    operands named in `optional` ("all": every one); soft=True: class probabilities as target."""
    shape = BASE_SHAPE[spec.family] if shape is None else shape
    rng = _rng(spec.name, shape, np.dtype(dtype).name, soft)
    args = dict(spec.make_inputs(rng, shape, dtype))
    for op in spec.operands:
        if not op.required and (optional == "all" or op.name in optional):
            args[op.name] = valid_operand(spec, op, shape, rng, dtype)
    if soft:
        p = rng.uniform(0.0, 1.0, shape)
        args["target"] = (p / p.sum(axis=-1, keepdims=True)).astype(dtype)
    return args


def first(spec):
    return spec.operands[0].name


def invoke(call, args, **kw):
    spec = call.spec
    pos = [args[o.name] for o in spec.operands if o.required]
    opt = {o.name: args[o.name] for o in spec.operands if not o.required and o.name in args}
    return call.func(*pos, **opt, **kw)


def reference_result(call, args, kw):
    spec = call.spec
    pos = [np.asarray(args[o.name]) for o in spec.operands if o.required]
    opt = {o.name: np.asarray(args[o.name]) for o in spec.operands if not o.required and args.get(o.name) is not None}
    # options as Python numbers: the reference would compute in float32 with a np.float32 option
    rkw = {k: (float(v) if isinstance(v, np.floating) else v) for k, v in kw.items()
           if k not in ("num_threads", "out", "grad_out")}
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = spec.reference(*pos, **opt, **rkw)
        return (value, spec.reference_grad(*pos, **opt, **rkw)) if call.with_grad else value


def _dtype_name(a) -> str:
    return np.asarray(a).dtype.newbyteorder("=").name


def _nan_for_inf(got, expected):
    """The documented deviation: where the exact value is +-inf, NaN (cross_entropy with an
    infinite class weight and label smoothing, or an infinite probability: W lse - sum w_j x_j
    is inf - inf)."""
    g, e = np.asarray(got, np.float64), np.array(expected, np.float64)
    e[np.isinf(e) & np.isnan(g)] = np.nan
    return e


def check_value(call, args, kw=None, *, ref_args=None, what="", nan_for_inf=False):
    """Call, then compare with the reference on `ref_args` (default: `args`) within the
    registry's tolerance; a NaN or inf result must come without a NumPy warning."""
    kw = dict(kw or {})
    ref_args = args if ref_args is None else ref_args
    spec = call.spec
    label = f"{call.name}({what}) {kw}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = invoke(call, args, **kw)
    expected = reference_result(call, ref_args, kw)
    rkw = {k: v for k, v in kw.items() if k not in ("out", "grad_out")}
    x = ref_args[first(spec)]
    tol = spec.tolerance(spec, _dtype_name(x), {k: np.asarray(v) for k, v in ref_args.items()}, rkw)
    if call.with_grad:
        (loss, grad), (exp_loss, exp_grad) = got, expected
        if nan_for_inf:
            exp_loss, exp_grad = _nan_for_inf(loss, exp_loss), _nan_for_inf(grad, exp_grad)
        assert isinstance(grad, np.ndarray) and grad.shape == np.shape(x) and grad.dtype == np.asarray(x).dtype, (
            f"{label}: grad {type(grad).__name__} {getattr(grad, 'dtype', '')}{getattr(grad, 'shape', '')}")
        assert_close(loss, exp_loss, rtol=tol.loss_rtol, atol=tol.loss_atol, what=f"{label}: loss")
        assert_close(grad, exp_grad, rtol=tol.grad_rtol, atol=tol.grad_atol, what=f"{label}: grad")
    else:
        if nan_for_inf:
            expected = _nan_for_inf(got, expected)
        assert_close(got, expected, rtol=tol.loss_rtol, atol=tol.loss_atol, what=f"{label}: value")
    return got


def _names_pattern(name):
    return rf"(?<![\w]){re.escape(name)}(?![\w])"


def check_raises(exc, names, call, args, kw=None):
    """The call raises exactly `exc`, with a message naming each of `names`, and leaves every
    array operand (and an output buffer) as it was."""
    kw = dict(kw or {})
    arrays = [a for a in list(args.values()) + [kw.get("out"), kw.get("grad_out")]
              if isinstance(a, np.ndarray) and a.dtype.kind in "fiub" and a.dtype.itemsize <= 8]
    before = [a.copy() for a in arrays]
    with pytest.raises(Exception) as info:
        invoke(call, args, **kw)
    e = info.value
    assert type(e) is exc, f"{call.name}: expected {exc.__name__}, got {type(e).__name__}: {e}"
    for name in ([names] if isinstance(names, str) else names):
        assert re.search(_names_pattern(name), str(e)), f"{call.name}: message {str(e)!r} does not name {name!r}"
    for a, b in zip(arrays, before):
        assert_identical(a, b, what=f"{call.name}: an operand after the rejected call")


def reductions_of(call):
    if "reduction" in call.spec.option_kinds:
        return [{"reduction": r} for r in call.spec.reductions]
    return [{}]


def rows(select, make):
    """pytest params: make(call) -> [(id, *values)] for every call that `select`s."""
    out = []
    for call in CALLS.values():
        if not select(call):
            continue
        for row in make(call):
            out.append(pytest.param(call.name, *row[1:], id=f"{call.name}-{row[0]}"))
    return out


def everything(call):
    return True


def class_family(call):
    return call.spec.family != "regression"


# ---- not an array, wrong dtype --------------------------------------------------------------------

NOT_ARRAYS = [("str", "abc"), ("bytes", b"ab"), ("dict", {"a": 1.0}), ("set", {1.0, 2.0}), ("object", object()),
              ("ragged list", [[1.0, 2.0, 3.0], [1.0]])]
#: (label, dtype) of arrays of the operand's shape that are not floats
NOT_FLOATS = [("int64", np.int64), ("int32", np.int32), ("uint8", np.uint8), ("bool", bool),
              ("complex128", np.complex128), ("complex64", np.complex64), ("longdouble", np.longdouble),
              ("object array", object), ("complex list", "complex list")]
#: ... and of class-index targets (floats of the rows' shape are not class indices)
NOT_INDICES = [("bool", bool), ("complex128", np.complex128), ("object array", object),
               ("complex list", "complex list"), ("float64", np.float64), ("float32", np.float32),
               ("float16", np.float16), ("longdouble", np.longdouble)]


def _bad_value(label, shape, index_kind):
    if label == "None":
        return None
    if label in dict(NOT_ARRAYS):
        return dict(NOT_ARRAYS)[label]
    return _bad_array(shape, dict(NOT_INDICES if index_kind else NOT_FLOATS)[label])


def _bad_array(shape, dtype):
    if dtype == "complex list":
        return (np.ones(shape) * 1j).tolist() if shape else 1j
    if dtype is object:
        a = np.empty(shape, dtype=object)
        a[...] = 1.0
        if a.size:
            a.reshape(-1)[0] = "a"
        return a
    return np.ones(shape, dtype=dtype)


def _type_rows(call):
    spec = call.spec
    for op in spec.operands:
        if op.required:
            yield (f"{op.name}-None", op.name, "None")
        for label, _ in NOT_ARRAYS:
            yield (f"{op.name}-{label}", op.name, label)
        for label, _ in (NOT_INDICES if op.kind.startswith("index") else NOT_FLOATS):
            yield (f"{op.name}-{label}", op.name, label)


@pytest.mark.parametrize("name,operand,label", rows(everything, _type_rows))
def test_not_an_array_or_wrong_dtype_raises_type_error(name, operand, label):
    """None, str, bytes, dict, set, objects, ragged lists; int/bool/complex/object/longdouble
    arrays where floats are required; bool/complex/object/float arrays where class indices
    are required: TypeError naming the argument."""
    call = CALLS[name]
    spec = call.spec
    args = base_args(spec, optional="all")
    op = spec.operand(operand)
    args[operand] = _bad_value(label, operand_shape(spec, op, BASE_SHAPE[spec.family]), op.kind.startswith("index"))
    check_raises(TypeError, operand, call, args)


def _list_rows(call):
    for op in call.spec.operands:
        yield (f"{op.name}-list", op.name, "list")
        if not op.kind.startswith("index"):
            yield (f"{op.name}-int-list", op.name, "int list")
    if any(o.kind == "index_or_probs" for o in call.spec.operands):
        yield ("target-probabilities-list", "target", "probabilities list")


@pytest.mark.parametrize("name,operand,label", rows(everything, _list_rows))
def test_lists_are_accepted(name, operand, label):
    """Nested Python lists are converted (ints to float64 where floats are required; class
    indices to int64) and give the result of the equivalent array."""
    call = CALLS[name]
    spec = call.spec
    soft = label == "probabilities list"
    args = base_args(spec, optional="all", soft=soft)
    if label == "int list":
        args[operand] = np.round(args[operand] * 3).astype(np.int64)
        ref = dict(args, **{operand: args[operand].astype(np.float64)})
    else:
        ref = args
    listed = dict(args, **{operand: args[operand].tolist()})
    got = check_value(call, listed, ref_args=ref, what=f"{operand} as a list")
    same = invoke(call, ref)
    for g, s in zip(*((got, same) if call.with_grad else ((got,), (same,)))):
        assert_identical(g, s, what=f"{name}: {operand} as a list vs as an array")


# ---- shapes ----------------------------------------------------------------------------------------

#: (first operand's shape or None for the family's base shape, the operand's bad shape, exception)
SHAPE_MISMATCHES = {
    # target / weight broadcast to input (regression), never the other way round
    ("first", True): [((2, 3), (4,)), ((2, 3), (3, 2)), ((2, 1), (3,)), ((3,), (2, 3)), ((2, 3), (2,)),
                      ((2, 3), (4, 3)), ((2, 3), (2, 3, 1))],
    # class indices: exactly the rows' shape
    ("rows", False): [(None, (5,)), (None, (3,)), (None, (4, 1)), (None, (2, 2)), (None, ()),
                      ((2, 3, 5), (3, 2)), ((2, 3, 5), (2,))],
    # sample_weight: broadcast to the rows' shape
    ("rows", True): [(None, (5,)), (None, (3,)), (None, (4, 2)), ((2, 3, 5), (2,)), ((2, 3, 5), (3, 2))],
    # class weights: exactly (V,)
    ("classes", False): [(None, (4,)), (None, (6,)), (None, (1, 5)), (None, (5, 1)), (None, (1,)), (None, ())],
}


def _shape_rows(call):
    for op in call.spec.operands[1:]:
        for first_shape, bad in SHAPE_MISMATCHES[(op.shape, op.broadcast)]:
            yield (f"{op.name}{bad}-vs-{first(call.spec)}{first_shape or 'base'}", op.name, first_shape, bad)
    if any(o.kind.startswith("index") for o in call.spec.operands):
        # an integer target of the logits' shape is neither class indices nor probabilities
        yield ("target-ints-of-the-first-operand's-shape", "target", None, "first")
    if any(o.kind == "index_or_probs" for o in call.spec.operands):
        yield ("target-probabilities(4,4)", "target", None, "probs (4, 4)")
        yield ("target-probabilities-transposed", "target", None, "probs (5, 4)")


@pytest.mark.parametrize("name,operand,first_shape,bad", rows(everything, _shape_rows))
def test_shape_mismatch_raises(name, operand, first_shape, bad):
    """Shapes that do not fit: ValueError naming the argument (an integer target of the
    logits' shape: TypeError, it is neither class indices nor probabilities)."""
    call = CALLS[name]
    spec = call.spec
    shape = first_shape or BASE_SHAPE[spec.family]
    args = base_args(spec, shape=shape, optional="all")
    exc = ValueError
    if bad == "first":
        args[operand] = np.zeros(shape, np.int64)
        exc = TypeError
    elif isinstance(bad, str):
        args[operand] = np.full(tuple(int(n) for n in re.findall(r"\d+", bad)), 0.25)
    else:
        args[operand] = np.zeros(bad, np.int64) if spec.operand(operand).kind.startswith("index") else np.ones(bad)
    check_raises(exc, operand, call, args)


def _axis_rows(call):
    kind = call.spec.option_kinds.get("axis")
    if kind == "reduce_axes":
        bad = [(2, "AxisError"), (-3, "AxisError"), ((0, 5), "AxisError"), (1.0, "TypeError"), ("0", "TypeError"),
               (True, "TypeError"), ((0, 0), "ValueError"), ((1, -1), "ValueError")]
    elif kind == "class_axis":
        bad = [(2, "AxisError"), (-3, "AxisError"), (2 ** 70, "AxisError"), (1.0, "TypeError"), ("0", "TypeError"),
               (True, "TypeError"), (None, "TypeError"), ((1,), "TypeError"), ([0], "TypeError")]
    else:
        bad = []
    for axis, exc in bad:
        yield (f"axis={axis!r}", axis, exc)
    if kind == "reduce_axes" and "reduction" in call.spec.option_kinds:
        yield ("axis=0-with-reduction=none", 0, "ValueError")


EXCEPTIONS = {"AxisError": np.exceptions.AxisError, "TypeError": TypeError, "ValueError": ValueError,
              "IndexError": IndexError}


@pytest.mark.parametrize("name,axis,exc", rows(everything, _axis_rows))
def test_wrong_axis_raises(name, axis, exc):
    """An axis out of range: numpy.AxisError (a ValueError and IndexError); not an int (or, for
    the regression losses, a tuple of ints): TypeError; repeated axes, or axis with
    reduction='none': ValueError."""
    call = CALLS[name]
    kw = {"axis": axis}
    if exc == "ValueError" and axis == 0:
        kw["reduction"] = "none"
    check_raises(EXCEPTIONS[exc], "axis", call, base_args(call.spec), kw)


@pytest.mark.parametrize("name", list(CALLS))
def test_zero_dimensional(name):
    """0-d operands: the regression losses take them (a loss of one element); the functions
    with a class axis need at least one dimension: ValueError naming the operand."""
    call = CALLS[name]
    spec = call.spec
    if spec.family == "regression":
        args = {"input": np.array(3.0), "target": np.array(1.5), "weight": np.array(0.5)}
        for kw in reductions_of(call):
            check_value(call, args, kw, what="0-d")
        return
    args = base_args(spec)
    args[first(spec)] = np.array(1.0)
    if "target" in args:
        args["target"] = np.array(0)
    check_raises(ValueError, first(spec), call, args)


def _empty_rows(call):
    shapes = {"regression": [(0,), (0, 3), (3, 0), (2, 0, 4)],
              "classification": [(0, 5), (2, 0, 5), (0, 1)],
              "softmax": [(0, 5), (2, 0, 5), (4, 0), (0, 0)]}[call.spec.family]
    for s in shapes:
        yield (f"shape{s}", s)
    if call.spec.family == "classification":
        yield ("zero-classes(4,0)", (4, 0))


@pytest.mark.parametrize("name,shape", rows(everything, _empty_rows))
def test_empty(name, shape):
    """Empty arrays: 'mean' is nan (0/0), 'sum' 0, 'none' an empty array, the gradient an
    empty array; zero classes: ValueError for the losses, an empty result for (log_)softmax
    and -inf for logsumexp (as the reference)."""
    call = CALLS[name]
    spec = call.spec
    if spec.family == "classification" and shape[-1] == 0:
        check_raises(ValueError, first(spec), call, base_args(spec, shape=shape))
        return
    args = base_args(spec, shape=shape, optional="all")
    for kw in reductions_of(call):
        check_value(call, args, kw, what=f"empty {shape}")


@pytest.mark.parametrize("name", [n for n, c in CALLS.items() if class_family(c)])
def test_one_class(name):
    """V = 1: log_softmax 0, softmax 1, cross-entropy 0 (plus z-loss), with every option."""
    call = CALLS[name]
    spec = call.spec
    args = base_args(spec, shape=(7, 1), optional="all")
    variants = getattr(spec, "variants", ({},))
    for variant in variants:
        for kw in reductions_of(call):
            check_value(call, args, {**variant, **kw}, what="V = 1")


# ---- class-index targets ---------------------------------------------------------------------------

def _target_rows(call):
    if not any(o.kind.startswith("index") for o in call.spec.operands):
        return
    for label, value, ii, exc in [
            ("V", 5, None, "IndexError"), ("V+7", 12, None, "IndexError"), ("2**40", 2 ** 40, None, "IndexError"),
            ("-1", -1, None, "IndexError"), ("-2", -2, None, "IndexError"),
            ("-100-with-ignore_index=-1", -100, -1, "IndexError"),
            ("uint64-max", np.uint64(2 ** 64 - 1), None, "IndexError"),
            ("ignore_index=2-a-valid-class", 2, 2, None), ("ignore_index=-1", -1, -1, None),
            ("ignore_index=0", 0, 0, None), ("all-ignored", "all", -100, None),
            ("int8", "int8", None, None), ("uint8", "uint8", None, None), ("int32", "int32", None, None),
            ("big-endian-int64", ">i8", None, None)]:
        yield (label, value, ii, exc)


@pytest.mark.parametrize("name,value,ignore_index,exc", rows(everything, _target_rows))
def test_class_index_targets(name, value, ignore_index, exc):
    """Out of range, or negative and not ignore_index: IndexError naming target (the value and
    the row); ignore_index equal to a valid class ignores those rows (as torch); every row
    ignored: 'mean' is nan; any integer dtype and byte order is taken."""
    call = CALLS[name]
    spec = call.spec
    args = base_args(spec, optional="all")
    kw = {} if ignore_index is None else {"ignore_index": ignore_index}
    t = args["target"].copy()
    if isinstance(value, str):
        t = np.full_like(t, -100) if value == "all" else t.astype(value)
    else:
        t = t.astype(np.uint64) if isinstance(value, np.uint64) else t
        t[1] = value
        t[3] = value
    args["target"] = t
    if exc is not None:
        check_raises(EXCEPTIONS[exc], "target", call, args, kw)
        return
    for rk in reductions_of(call):
        check_value(call, args, {**kw, **rk}, what=f"target {t.tolist()}")


# ---- special values -----------------------------------------------------------------------------------

def _special_rows(call):
    spec = call.spec
    for op in spec.operands:
        if op.kind.startswith("index"):
            continue
        for label in ("nan", "+inf", "-inf"):
            yield (f"{op.name}-{label}", op.name, label, False)
        if op.kind == "weight":
            yield (f"{op.name}-all-zero", op.name, "zeros", False)
            yield (f"{op.name}-one-zero", op.name, "one zero", False)
    if spec.family != "regression":
        yield (f"{first(spec)}-all--inf-row", first(spec), "-inf row", False)
        yield (f"{first(spec)}-all--inf", first(spec), "all -inf", False)
        yield (f"{first(spec)}-+-1e4", first(spec), "1e4", False)
    else:
        yield ("input-and-target-inf", "target", "inf-inf", False)
        yield ("input-1e300", "input", "1e300", False)
    if any(o.kind == "index_or_probs" for o in spec.operands):
        for label in ("nan", "+inf", "-inf", "negative", "zeros row"):
            yield (f"probabilities-{label}", "target", label, True)
        yield ("probabilities-logits-all--inf-row", first(spec), "-inf row", True)


def _inject(a, label, rng):
    a = np.array(a, dtype=np.float64, copy=True)
    flat = a.reshape(-1)
    if label in ("nan", "+inf", "-inf", "1e300"):
        flat[min(2, flat.size - 1)] = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf, "1e300": 1e300}[label]
    elif label == "zeros":
        a[...] = 0.0
    elif label == "one zero":
        flat[0] = 0.0
    elif label == "negative":
        flat[1] = -0.5
    elif label in ("-inf row", "zeros row"):
        a[1] = -np.inf if label == "-inf row" else 0.0
    elif label == "all -inf":
        a[...] = -np.inf
    elif label == "1e4":
        a[...] = rng.choice([-1e4, 1e4], a.shape) + rng.standard_normal(a.shape)
    return a


@pytest.mark.parametrize("name,operand,label,soft", rows(everything, _special_rows))
def test_special_values(name, operand, label, soft):
    """NaN and +-inf in inputs, targets (soft) and weights, rows of -inf, logits of +-1e4 and
    weights summing to zero give the reference's value (nan where it is nan), silently."""
    call = CALLS[name]
    spec = call.spec
    args = base_args(spec, optional="all", soft=soft)
    rng = _rng(name, operand, label)
    if label == "inf-inf":
        args["input"] = _inject(args["input"], "+inf", rng)
        args["target"] = _inject(args["target"], "+inf", rng)
    else:
        args[operand] = _inject(args[operand], label, rng)
    # documented (README): an infinite class weight or probability may give NaN where the
    # exact cross-entropy is +-inf
    nan_for_inf = spec.name == "cross_entropy" and label in ("+inf", "-inf") and operand in ("weight", "target")
    for kw in reductions_of(call):
        check_value(call, args, kw, what=f"{operand} {label}", nan_for_inf=nan_for_inf)
        for variant in getattr(spec, "variants", ({},))[1:]:
            if soft and variant.get("ignore_index", -1) >= 0:
                continue
            check_value(call, args, {**variant, **kw}, what=f"{operand} {label}", nan_for_inf=nan_for_inf)


# ---- memory layouts ------------------------------------------------------------------------------------

def _layout(a, layout, tmp_path):
    a = np.asarray(a)
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "negative-strides":
        return np.ascontiguousarray(a[(slice(None, None, -1),) * a.ndim])[(slice(None, None, -1),) * a.ndim]
    if layout == "non-contiguous":
        big = np.zeros(tuple(2 * n for n in a.shape), a.dtype)
        v = big[(slice(1, None, 2),) * a.ndim]
        v[...] = a
        return v
    if layout == "unaligned":
        buf = np.zeros(a.nbytes + 1, np.uint8)
        u = buf[1:].view(a.dtype).reshape(a.shape)
        u[...] = a
        assert not u.flags.aligned or a.itemsize == 1
        return u
    if layout == "read-only":
        r = a.copy()
        r.flags.writeable = False
        return r
    if layout == "memmap":
        path = tmp_path / f"{zlib.crc32(a.tobytes())}-{a.dtype.str}.npy"
        np.save(path, a)
        return np.load(path, mmap_mode="r")
    if layout == "byteswapped":
        return a.astype(a.dtype.newbyteorder())
    if layout == "zero-stride":
        return np.broadcast_to(a[(slice(0, 1),) * a.ndim], a.shape)
    raise ValueError(layout)


LAYOUTS = ["fortran", "negative-strides", "non-contiguous", "unaligned", "read-only", "memmap", "byteswapped",
           "zero-stride"]


def _layout_rows(call):
    for op in call.spec.operands:
        for layout in LAYOUTS:
            yield (f"{op.name}-{layout}", op.name, layout, False)
    for layout in LAYOUTS:
        yield (f"all-operands-{layout}", "all", layout, False)
    if any(o.kind == "index_or_probs" for o in call.spec.operands):
        for layout in LAYOUTS:
            yield (f"probabilities-{layout}", "target", layout, True)


@pytest.mark.parametrize("name,operand,layout,soft", rows(everything, _layout_rows))
def test_memory_layouts(name, operand, layout, soft, tmp_path):
    """Non-contiguous, negatively strided, Fortran-ordered, unaligned (a view at a byte offset
    into a uint8 buffer), read-only, memory-mapped, byte-swapped and zero-stride operands give
    the values of plain C arrays (3-D first operands, so that the class axis may be strided
    too); the operands are never written."""
    call = CALLS[name]
    spec = call.spec
    shape = {"regression": (3, 4, 5), "classification": (3, 4, 6), "softmax": (3, 4, 6)}[spec.family]
    plain = base_args(spec, shape=shape, optional="all", soft=soft)
    names = [o.name for o in spec.operands] if operand == "all" else [operand]
    args = dict(plain)
    for n in names:
        args[n] = _layout(plain[n], layout, tmp_path)
    if layout == "zero-stride":
        plain = {k: np.array(v) for k, v in args.items()}
    snapshots = {n: np.array(args[n]) for n in names}
    for kw in reductions_of(call):
        check_value(call, args, kw, ref_args=plain, what=f"{operand} {layout}")
        if spec.option_kinds.get("axis") == "class_axis":
            moved = {k: (np.moveaxis(v, -1, 1) if k == first(spec) or (soft and k == "target") else v)
                     for k, v in args.items()}
            moved_plain = {k: (np.moveaxis(v, -1, 1) if k == first(spec) or (soft and k == "target") else v)
                           for k, v in plain.items()}
            check_value(call, moved, {**kw, "axis": 1}, ref_args=moved_plain, what=f"{operand} {layout} axis=1")
    for n in names:
        assert_identical(np.array(args[n]), snapshots[n], what=f"{name}: {n} after the call")


# ---- output buffers (grad_out, out) ----------------------------------------------------------------

def _read_only(shape):
    a = np.zeros(shape)
    a.flags.writeable = False
    return a


def _unaligned(shape):
    buf = np.zeros(int(np.prod(shape)) * 8 + 1, np.uint8)
    return buf[1:].view(np.float64).reshape(shape)


BAD_OUT = [  # (label, make(shape), exception)
    ("list", lambda s: np.zeros(s).tolist(), TypeError),
    ("tuple", lambda s: tuple(np.zeros(s).tolist()), TypeError),
    ("shape-one-more-class", lambda s: np.zeros(s[:-1] + (s[-1] + 1,)), ValueError),
    ("shape-reversed", lambda s: np.zeros(s[::-1]), ValueError),
    ("shape-extra-axis", lambda s: np.zeros(s + (1,)), ValueError),
    ("shape-flat", lambda s: np.zeros(int(np.prod(s))), ValueError),
    ("float32", lambda s: np.zeros(s, np.float32), TypeError),
    ("int64", lambda s: np.zeros(s, np.int64), TypeError),
    ("byteswapped", lambda s: np.zeros(s, ">f8" if np.little_endian else "<f8"), TypeError),
    ("read-only", _read_only, ValueError),
    ("unaligned", _unaligned, ValueError),
]
GOOD_OUT = ["fortran", "negative-strides", "non-contiguous", "memmap"]


def _out_rows(call):
    if call.out is None:
        return
    for label, _, exc in BAD_OUT:
        yield (label, label, False)
    for op in call.spec.operands:
        if not op.kind.startswith("index"):
            yield (f"overlaps-{op.name}", f"overlaps {op.name}", False)
    if any(o.kind == "index_or_probs" for o in call.spec.operands):
        yield ("overlaps-probabilities", "overlaps target", True)
    for label in ("inplace-shifted", "inplace-reversed", "inplace-transposed", "inplace-read-only",
                  "inplace-with-a-bad-argument"):
        yield (label, label, False)
    for label in GOOD_OUT + ["in-place"]:
        yield (f"good-{label}", label, False)


def _overlapping(target_shape, other_shape):
    """Two float64 arrays of these shapes sharing (part of) one buffer."""
    n = max(int(np.prod(target_shape)), int(np.prod(other_shape)))
    buf = np.linspace(0.1, 0.9, n + 1)
    return buf[1:1 + int(np.prod(target_shape))].reshape(target_shape), buf[:int(np.prod(other_shape))].reshape(
        other_shape)


@pytest.mark.parametrize("name,label,soft", rows(everything, _out_rows))
def test_output_buffer(name, label, soft, tmp_path):
    """grad_out / out: not an ndarray or the wrong dtype (byte order included): TypeError; the
    wrong shape, read-only, unaligned, or overlapping an operand other than the documented
    in-place case: ValueError naming the buffer (and the operand); nothing is written.  Any
    strides or a writeable memmap are fine, and the in-place operand itself is in place."""
    call = CALLS[name]
    spec = call.spec
    out = call.out
    args = base_args(spec, optional="all", soft=soft)
    x = args[call.inplace]
    shape = x.shape
    kw = dict(reductions_of(call)[0])
    bad = dict((b[0], b) for b in BAD_OUT)
    if label in bad:
        kw[out] = bad[label][1](shape)
        check_raises(bad[label][2], out, call, args, kw)
    elif label.startswith("overlaps "):
        operand = label.split()[1]
        kw[out], args[operand] = _overlapping(shape, np.shape(args[operand]))
        check_raises(ValueError, [out, operand], call, args, kw)
    elif label.startswith("inplace-") and label != "inplace-with-a-bad-argument":
        base = np.linspace(-1.0, 1.0, 2 * x.size + 7)
        x = base[:x.size].reshape(shape)
        x[...] = args[call.inplace]
        args[call.inplace] = x
        if label == "inplace-shifted":
            kw[out] = base[1:1 + x.size].reshape(shape)
        elif label == "inplace-reversed":
            kw[out] = x[::-1]
        elif label == "inplace-transposed":
            kw[out] = base[:x.size].reshape(shape[::-1]).T
        else:
            x.flags.writeable = False
            kw[out] = x
        check_raises(ValueError, [out, call.inplace] if label != "inplace-read-only" else [out], call, args, kw)
    elif label == "inplace-with-a-bad-argument":
        xi = x.copy()
        args[call.inplace] = xi
        bad_kw = {"reduction": "avg"} if "reduction" in spec.option_kinds else {"num_threads": 0}
        check_raises(ValueError, list(bad_kw), call, args, {**kw, **bad_kw, out: xi})
        if "target" in args:
            check_raises(ValueError, "target", call, dict(args, target=args["target"][..., :-1]), {**kw, out: xi})
    else:                       # valid: in place, or a buffer with any strides, or a writeable memmap
        if label == "in-place":
            buf = x.copy()
        elif label == "memmap":
            buf = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float64, shape=shape)
        else:
            buf = _layout(np.zeros(shape), label, tmp_path)
        got = invoke(call, dict(args, **{call.inplace: buf}) if label == "in-place" else args, **kw, **{out: buf})
        result = got[1] if call.with_grad else got
        assert result is buf
        ref = check_value(call, args, kw, what=f"{out} {label}")           # x untouched: a new result array
        # elementwise results are bitwise those of a new array; a loss may differ in the last
        # bits (the kernel follows the buffer's layout, which may change the summation order)
        assert_identical(buf, ref[1] if call.with_grad else ref, what=f"{name}: {out} {label}")
        if call.with_grad:
            tol = spec.tolerance(spec, "float64", args, kw)
            assert_close(got[0], ref[0], rtol=tol.loss_rtol, atol=tol.loss_atol, what=f"{name}: loss, {out} {label}")


# ---- options -------------------------------------------------------------------------------------------

#: Invalid values of each option kind: (value, exception)
BAD_OPTION_VALUES = {
    "reduction": [("avg", ValueError), ("MEAN", ValueError), ("", ValueError), (None, ValueError), (1, ValueError),
                  (("mean",), ValueError)],
    "num_threads": [(0, ValueError), (-2, ValueError), (10 ** 6, ValueError), (2 ** 70, ValueError),
                    (1.5, TypeError), (2.0, TypeError), (np.float64(2.0), TypeError), (True, TypeError),
                    ("2", TypeError)],
    "positive": [(0.0, ValueError), (-0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                 (float("inf"), ValueError), ("1", TypeError), (None, TypeError), (True, TypeError),
                 ([1.0], TypeError)],
    "nonnegative": [(-0.5, ValueError), (-1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                    ("0.5", TypeError), (None, TypeError), (True, TypeError)],
    "unit_interval": [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                      ("0.1", TypeError), (None, TypeError), (True, TypeError)],
    "positive_or_none": [(0.0, ValueError), (-30.0, ValueError), (float("inf"), ValueError),
                         (float("nan"), ValueError), ("1", TypeError), (True, TypeError)],
    "index": [(1.0, TypeError), ("x", TypeError), (None, TypeError), (True, TypeError), (2 ** 63, ValueError),
              (-2 ** 63 - 1, ValueError)],
    "reduce_axes": [], "class_axis": [],      # test_wrong_axis_raises
}
#: Valid edge values: the result must match the reference
GOOD_OPTION_VALUES = {
    "reduction": [], "reduce_axes": [], "class_axis": [np.int64(-1), 1, np.int32(1)],
    "num_threads": [None, -1, 1, 3, 4096, np.int64(2), np.int32(3)],
    "positive": [1e-300, 1e300, np.float32(0.5), 2],
    "nonnegative": [0.0, 0, np.float16(0.25), 1e3],
    "unit_interval": [0.0, 1.0, 1, np.float32(0.5)],
    "positive_or_none": [None, 1e-3, 1e6],
    "index": [np.int64(-1), np.int8(2), -(2 ** 63), 2 ** 63 - 1],
}


def _option_rows(call):
    for opt, kind in call.spec.options:
        for value, exc in BAD_OPTION_VALUES[kind]:
            yield (f"{opt}={value!r}", opt, value, exc.__name__)
    for kwargs, exc, word in getattr(call.spec, "bad_options", ()):      # the registry's own list
        (opt, value), = kwargs.items()
        yield (f"registry-{opt}={value!r}", opt, value, exc.__name__)
    yield ("unknown-keyword", "no_such_option", 1, "TypeError")
    yield ("extra-positional", "positional", None, "TypeError")


@pytest.mark.parametrize("name,option,value,exc", rows(everything, _option_rows))
def test_invalid_option_raises(name, option, value, exc):
    """A bad type: TypeError; a bad value: ValueError; both naming the option.  Options are
    keyword-only after the operands (log_softmax/softmax/logsumexp: after x and axis)."""
    call = CALLS[name]
    args = base_args(call.spec, optional="all")
    if option == "positional":
        n_pos = sum(o.required for o in call.spec.operands)
        with pytest.raises(TypeError, match="positional"):
            call.func(*[args[o.name] for o in call.spec.operands[:n_pos]], -1, None, None)
        return
    if option == "no_such_option":
        with pytest.raises(TypeError, match="no_such_option"):
            invoke(call, args, no_such_option=1)
        return
    check_raises(EXCEPTIONS[exc], option, call, args, {option: value})


def _good_option_rows(call):
    for opt, kind in call.spec.options:
        for value in GOOD_OPTION_VALUES[kind]:
            yield (f"{opt}={value!r}", opt, value)


@pytest.mark.parametrize("name,option,value", rows(everything, _good_option_rows))
def test_valid_option_edge_values(name, option, value):
    """Edge values that are valid (label_smoothing 0 and 1, num_threads -1 and 4096, NumPy
    integer and float scalars, tiny and huge thresholds, ignore_index at the int64 limits)."""
    call = CALLS[name]
    args = base_args(call.spec, optional="all")
    if option == "ignore_index":
        args["target"] = args["target"].copy()
        if 0 <= int(value) < BASE_SHAPE[call.spec.family][-1] or int(value) == -1:
            args["target"][0] = value
    for kw in reductions_of(call):
        check_value(call, args, {**kw, option: value}, what=f"{option}={value!r}")


# ---- the registry covers the public API ---------------------------------------------------------------

NOT_KERNELS = {"show_config", "config", "set_num_threads", "get_num_threads", "mse", "mae",
               # the C API's paths (fastloss/_capi.py, tests/test_capi.py)
               "get_include", "get_library", "get_library_dir", "get_cflags", "get_ldflags",
               # issue 8, not in the registry yet: its bad input (H mismatch, bias length, integer input,
               # targets, chunk_size, ...) is tested in tests/test_linear_cross_entropy.py
               "linear_cross_entropy", "linear_cross_entropy_with_grad"}


def test_every_public_function_is_in_the_table():
    public = {n for n in fastloss.__all__ if callable(getattr(fastloss, n)) and n not in NOT_KERNELS
              and not isinstance(getattr(fastloss, n), type(fastloss))}
    assert public == set(ALL_CALLS), (f"not in the registry: {public - set(ALL_CALLS)}; "
                                      f"stale: {set(ALL_CALLS) - public}")
    for name, call in ALL_CALLS.items():
        assert getattr(fastloss, name) is call.func


@pytest.mark.parametrize("name", list(CALLS))
def test_registry_describes_the_signature(name):
    """The operands and options declared in the registry are exactly the function's
    arguments (so the table above tests every argument)."""
    import inspect

    call = CALLS[name]
    params = inspect.signature(call.func).parameters
    declared = [o.name for o in call.spec.operands] + [o for o, _ in call.spec.options]
    if call.out:
        declared.append(call.out)
    assert sorted(params) == sorted(declared), f"{name}: signature {list(params)}, registry {declared}"
    for o in call.spec.operands:
        assert (params[o.name].default is inspect.Parameter.empty) == o.required, f"{name}: {o.name}"
    assert set(k for _, k in call.spec.options) <= set(OPTION_KINDS)
    assert name in REGISTRY or name in FUNCTIONS or call.with_grad
