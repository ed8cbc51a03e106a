"""Soft targets (class probabilities) of fastloss.cross_entropy and cross_entropy_with_grad.

A float target of the logits' shape holds one distribution q per row (torch's "probabilities"
form).  With x the (softcapped) logits, q' = (1 - ls) q + ls / V, w the class weights, s the
sample weight and t = w q' the row's target distribution:

    loss_row = s (sum_j t_j (lse - x_j) + z lse**2),   grad_j = s ((sum t + 2 z lse) p_j - t_j) f_j

("mean" divides by sum(s), the number of rows without sample weights; f = 1 - tanh(x/c)**2
with softcap).  Covered here:

* conformance with the float64 oracle (fastloss.reference) for every option x reduction x
  shape (incl. strided views of logits and target, axis=1, empty, rows of several 32768-class
  parts) x dtype x target dtype x ISA, and bitwise identity for 1 and 2 threads;
* bitwise identity across thread counts on the few-long-rows path (parts shared by threads);
* parity with torch.nn.functional.cross_entropy (values and autograd gradients);
* 4th-order finite differences in float64 (with z_loss and softcap);
* grad_out (preallocated, strided, in place over the logits, also on the parts path);
* special values (NaN in a target row, unnormalized / negative probabilities, -inf logits) and
  bad input; the target read in place when it has the logits' dtype.

Error model: that of tests/test_cross_entropy.py (see its docstring), with the row's target
distribution t = w q' in place of the one-hot one:
* loss: LOSS_RTOL relative plus LOSS_RTOL times the row's factor of lse, s (sum |t| + 2 z |lse|)
  (the lse error is absolute); the sums sum t and sum t x are accumulated in double.
* gradient: COMPUTE_RTOL P_j f_j + FLUSH s |coef| (+ 8u P_j with softcap) + one rounding into the
  logits' dtype (TOLERANCES), with P_j = s (|coef| p_j + |t_j|), coef = sum t + 2 z lse.
A target converted to float32 (float64 -> float32 for float32 logits) adds u |t_j| to the
gradient and u sum |t_j (lse - x_j)| to the loss: inside those bounds.
"""
from __future__ import annotations

import functools
import math
import tracemalloc
import zlib

import numpy as np
import pytest

import fastloss
from fastloss import reference
from fastloss._registry import TOLERANCES
from fl_testing import (DTYPE_NAMES, SUPPORTED_ISAS, assert_close, assert_identical, assert_loss_type, fd_gradient,
                        get_dtype, loss_dtype_for)

REDUCTIONS = ("mean", "sum", "none")
F32_U = 2.0 ** -24
LOSS_RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5}
COMPUTE_RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5}
COMPUTE_U = {"float64": 2.0 ** -53, "float32": F32_U, "float16": F32_U, "bfloat16": F32_U}
FLUSH = {"float64": 2.0 ** -1022, "float32": 2.0 ** -126, "float16": 2.0 ** -126, "bfloat16": 2.0 ** -126}
LOGIT_SCALE = 2.5          # logits ~ N(0, 2.5**2), as in test_cross_entropy.py


# ---- option sets, shapes and inputs ---------------------------------------------------------------

#: "weight": per-class weights; "sample_weight": "rows" (the rows' shape) or "broadcast" (the last
#: row axis only); "target": "unnormalized" draws entries in [-0.2, 1) that do not sum to 1.
OPTION_SETS = {
    "plain": {},
    "weight": {"weight": True},
    "sample_weight": {"sample_weight": "rows"},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 5.0},
    "unnormalized": {"target": "unnormalized", "weight": True},
    "all": {"weight": True, "sample_weight": "broadcast", "ignore_index": -1, "label_smoothing": 0.1,
            "z_loss": 1e-3, "softcap": 8.0},
}

#: shape id -> (base shape, view of the logits' base, view of the target's base, class axis)
SHAPES = {
    "1x1": ((1, 1), None, None, -1),
    "9x7x41": ((9, 7, 41), None, None, -1),
    "strided_rows": ((3, 7, 50), np.s_[:, :-1], np.s_[:, 1:], -1),           # logits[:, :-1], target[:, 1:]
    "class_strided": ((10, 46), np.s_[::2, ::-2], np.s_[1::2, ::2], -1),     # copied for the kernel
    "NCd1": ((4, 13, 6), None, None, 1),                                     # torch's (N, C, d1), axis=1
    "empty": ((0, 17), None, None, -1),
    "2x70000": ((2, 70000), None, None, -1),                                 # 3 parts of <= 32768 classes
    "3x423x32000": ((3, 423, 32000), None, None, -1),                        # 1269 rows of 32000
}
SMALL_SHAPES = ("1x1", "9x7x41", "strided_rows", "class_strided", "NCd1", "empty")


def _logits(rng, shape, dtype):
    dtype = np.dtype(dtype)
    if dtype in (np.float32, np.float64):
        x = rng.standard_normal(shape, dtype=dtype)
        x *= LOGIT_SCALE
        return x
    return (rng.standard_normal(shape) * LOGIT_SCALE).astype(dtype)


def _probs(rng, shape, dtype, axis=-1, kind="normalized"):
    """Rows of class probabilities along `axis`: peaked, with ~30 % exact zeros (a row of zeros
    becomes uniform); kind="unnormalized": entries in [-0.2, 1) as they come."""
    dtype = np.dtype(dtype)
    if kind == "unnormalized":
        return rng.uniform(-0.2, 1.0, shape).astype(dtype)
    u = rng.random(shape, dtype=np.float32 if dtype != np.float64 else np.float64)
    u *= u
    u *= u
    u[rng.random(shape, dtype=np.float32) < 0.3] = 0
    total = np.sum(u, axis=axis, keepdims=True, dtype=np.float64)
    V = shape[axis]
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(total > 0, u / np.where(total > 0, total, 1.0), 1.0 / max(V, 1))
    return q.astype(dtype)


def _kwargs(rng, opts, rows_shape, V):
    """fastloss / reference keyword arguments of an option set (arrays drawn from rng)."""
    kw = {k: v for k, v in opts.items() if k not in ("weight", "sample_weight", "target")}
    if opts.get("weight"):
        kw["weight"] = rng.uniform(0.5, 2.0, V)
    if opts.get("sample_weight") == "rows":
        kw["sample_weight"] = rng.uniform(0.5, 2.0, rows_shape)
    elif opts.get("sample_weight") == "broadcast":
        kw["sample_weight"] = rng.uniform(0.5, 2.0, rows_shape[-1:])
    return kw


def _target_dtype(dtype_name, qdt):
    return get_dtype(dtype_name) if qdt == "same" else np.dtype(qdt)


@functools.lru_cache(maxsize=4)
def _problem(opts_name, dtype_name, qdt, shape_id):
    """(logits, probabilities, kwargs incl. axis), read-only: shared by the tests of one case."""
    base_shape, xview, qview, axis = SHAPES[shape_id]
    rng = np.random.default_rng(zlib.crc32(f"soft/{opts_name}/{dtype_name}/{qdt}/{shape_id}".encode()))
    opts = OPTION_SETS[opts_name]
    xbase = _logits(rng, base_shape, get_dtype(dtype_name))
    qbase = _probs(rng, base_shape, _target_dtype(dtype_name, qdt), axis, opts.get("target", "normalized"))
    x = xbase if xview is None else xbase[xview]
    q = qbase if qview is None else qbase[qview]
    V = x.shape[axis]
    rows_shape = tuple(n for i, n in enumerate(x.shape) if i != axis % x.ndim)
    kw = _kwargs(rng, opts, rows_shape, V)
    kw["axis"] = axis
    for a in (xbase, qbase, x, q, *(v for v in kw.values() if isinstance(v, np.ndarray))):
        a.flags.writeable = False
    return x, q, kw


# ---- error bounds ---------------------------------------------------------------------------------

def _terms(x, q, *, weight=None, sample_weight=None, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
           axis=-1, ignore_index=-100):
    """float64 quantities of the error model, class axis last: s (row factor incl. 1/denominator
    for "mean"), t = w q', p = softmax, lse, f (softcap factor or None) and the capped logits."""
    x64 = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    q64 = np.moveaxis(np.asarray(q, dtype=np.float64), axis, -1)
    V, rows = x64.shape[-1], x64.shape[:-1]
    s = np.ones(rows) if sample_weight is None else np.broadcast_to(np.asarray(sample_weight, np.float64), rows)
    if reduction == "mean":
        den = float(np.sum(s))
        s = s / den if den != 0 else np.zeros(rows)
    w = np.ones(V) if weight is None else np.asarray(weight, dtype=np.float64)
    t = w * ((1 - label_smoothing) * q64 + label_smoothing / V)
    with np.errstate(invalid="ignore", over="ignore"):
        if softcap is None:
            xc, f = x64, None
        else:
            th = np.tanh(x64 / softcap)
            xc, f = softcap * th, 1.0 - th * th
        p = reference.softmax(xc)
        lse = reference.logsumexp(xc)
    return {"s": s, "t": t, "p": p, "lse": lse, "f": f, "xc": xc, "z": z_loss}


def loss_atol(x, q, dtype_name, **kw):
    """LOSS_RTOL times the factor of lse in each row's loss, s (sum |t| + 2 z |lse|), with
    |lse| <= max |x| + log V; per row ("none") or summed."""
    T = _terms(x, q, **kw)
    xa = np.abs(T["xc"])
    V = xa.shape[-1]
    lse_bound = np.max(xa, axis=-1, initial=0.0, where=np.isfinite(xa)) + math.log(V)
    per_row = LOSS_RTOL[dtype_name] * T["s"] * (np.sum(np.abs(T["t"]), axis=-1) + 2 * T["z"] * lse_bound)
    return per_row if kw.get("reduction", "mean") == "none" else float(np.sum(per_row))


def grad_tolerance(x, q, expected, dtype_name, *, scale=1.0, **kw):
    """The per-element gradient bound of the module docstring, in the logits' layout."""
    T = _terms(x, q, **kw)
    u = COMPUTE_U[dtype_name]
    s = T["s"][..., None]
    with np.errstate(invalid="ignore", over="ignore"):
        coef = np.abs(np.sum(T["t"], axis=-1, keepdims=True) + 2 * T["z"] * T["lse"][..., None])
        P = s * (coef * T["p"] + np.abs(T["t"]))
        f = 1.0 if T["f"] is None else T["f"]
        tol = COMPUTE_RTOL[dtype_name] * P * f + FLUSH[dtype_name] * s * coef
        if T["f"] is not None:
            tol = tol + 8 * u * P
        tol = np.moveaxis(tol * scale, -1, kw.get("axis", -1))
        tol = tol + TOLERANCES[dtype_name]["grad"] * np.abs(np.asarray(expected, dtype=np.float64))
        tol = tol + TOLERANCES[dtype_name]["grad_atol"]
    return np.nan_to_num(tol, nan=0.0, posinf=0.0)


def check_loss(got, x, q, dtype_name, what, **kw):
    """`got` against reference.cross_entropy within the loss bound."""
    want = reference.cross_entropy(x, q, **kw)
    assert_close(got, want, rtol=LOSS_RTOL[dtype_name], atol=loss_atol(x, q, dtype_name, **kw), what=what)


def check_grad(got, x, q, dtype_name, what, **kw):
    want = reference.cross_entropy_grad(x, q, **kw)
    assert isinstance(got, np.ndarray) and got.shape == want.shape and got.dtype == np.asarray(x).dtype, (
        f"{what}: got {type(got).__name__} {getattr(got, 'dtype', '')}{getattr(got, 'shape', '')}")
    assert_close(got, want, rtol=0.0, atol=grad_tolerance(x, q, want, dtype_name, **kw), what=what)


# ---- conformance with the reference ----------------------------------------------------------------

class Case:
    """One conformance case (hashable: the reference results are cached per case)."""

    def __init__(self, opts, dtype, qdt, shape_id, reductions=REDUCTIONS, grad_reductions=REDUCTIONS):
        self.opts, self.dtype, self.qdt, self.shape_id = opts, dtype, qdt, shape_id
        self.reductions, self.grad_reductions = reductions, grad_reductions

    def key(self):
        return self.opts, self.dtype, self.qdt, self.shape_id

    def __hash__(self):
        return hash(self.key())

    def __eq__(self, other):
        return self.key() == other.key()

    def __repr__(self):
        return f"{self.opts}-{self.dtype}-target_{self.qdt}-{self.shape_id}"


def _conformance_rows():
    rows = []

    def add(case, isas, marks=()):
        for isa in isas:
            rows.append(pytest.param(case, isa, id=f"{case}-{isa}", marks=marks))

    for shape_id in SMALL_SHAPES:
        for opts in OPTION_SETS:
            for dt in DTYPE_NAMES:
                add(Case(opts, dt, "same", shape_id), SUPPORTED_ISAS)
        # a target of another dtype (converted to float32) and, for 16-bit logits, a float32
        # target (the compute type, read in place)
        for opts in ("plain", "all"):
            for dt, qdt in (("float32", "float64"), ("float16", "float32"), ("bfloat16", "float64"),
                            ("float16", "bfloat16")):
                add(Case(opts, dt, qdt, shape_id), SUPPORTED_ISAS)
    for opts in ("plain", "weight", "all"):
        for dt in DTYPE_NAMES:
            add(Case(opts, dt, "same", "2x70000"), SUPPORTED_ISAS)
    for dt, qdt in (("float16", "float32"), ("bfloat16", "float64"), ("float32", "float16")):
        add(Case("all", dt, qdt, "2x70000"), SUPPORTED_ISAS)     # converted / compute-type target, 3 parts
    for dt in ("float32", "bfloat16"):
        add(Case("all", dt, "same", "3x423x32000", reductions=("none", "mean"), grad_reductions=("mean",)),
            SUPPORTED_ISAS if dt == "float32" else SUPPORTED_ISAS[-1:], marks=pytest.mark.slow)
    return rows


@functools.lru_cache(maxsize=4)
def _ref_loss(case, reduction):
    x, q, kw = _problem(*case.key())
    return reference.cross_entropy(x, q, reduction=reduction, **kw), loss_atol(x, q, case.dtype, reduction=reduction,
                                                                               **kw)


@functools.lru_cache(maxsize=2)
def _ref_grad(case, reduction):
    x, q, kw = _problem(*case.key())
    want = reference.cross_entropy_grad(x, q, reduction=reduction, **kw)
    return want, grad_tolerance(x, q, want, case.dtype, reduction=reduction, **kw)


@pytest.mark.parametrize("case,isa", _conformance_rows(), indirect=["isa"])
def test_matches_reference(case, isa):
    """Loss and gradient (every reduction; "none" and "sum" have the same gradient) against the
    float64 reference; 2 threads must give bitwise the result of 1."""
    x, q, kw = _problem(*case.key())
    for reduction in case.reductions:
        label = f"{case} isa={isa} reduction={reduction}"
        expected, atol = _ref_loss(case, reduction)
        one = fastloss.cross_entropy(x, q, reduction=reduction, num_threads=1, **kw)
        assert_loss_type(one, x.dtype, scalar=reduction != "none")
        assert_close(one, expected, rtol=LOSS_RTOL[case.dtype], atol=atol, what=f"{label}: loss")
        assert_identical(fastloss.cross_entropy(x, q, reduction=reduction, num_threads=2, **kw), one,
                         what=f"{label}: loss, 2 threads vs 1")
        if reduction not in case.grad_reductions:
            continue
        want, tol = _ref_grad(case, "mean" if reduction == "mean" else "sum")
        loss, grad = fastloss.cross_entropy_with_grad(x, q, reduction=reduction, num_threads=1, **kw)
        assert_close(loss, expected, rtol=LOSS_RTOL[case.dtype], atol=atol, what=f"{label}: loss of _with_grad")
        assert grad.dtype == x.dtype and grad.shape == x.shape, f"{label}: grad {grad.dtype}{grad.shape}"
        assert_close(grad, want, rtol=0.0, atol=tol, what=f"{label}: grad")
        loss2, grad2 = fastloss.cross_entropy_with_grad(x, q, reduction=reduction, num_threads=2, **kw)
        assert_identical(loss2, loss, what=f"{label}: loss of _with_grad, 2 threads vs 1")
        assert_identical(grad2, grad, what=f"{label}: grad, 2 threads vs 1")


# ---- bitwise identical across thread counts (few long rows: parts shared by threads) -------------

#: (rows, V): 1x262144 (8 parts) and 2x70000 (3 parts) take the parts path with more threads
#: than rows; 1x2200000 has more parts (68) than the kernel keeps on the stack: always that path.
LONG_ROWS = {"1x262144": (1, 262144), "2x70000": (2, 70000), "1x2200000": (1, 2_200_000)}


def _long_row_cases():
    out = []
    for shape_id in LONG_ROWS:
        for dt in (DTYPE_NAMES if shape_id != "1x2200000" else ("float32",)):
            for opts in ("plain", "all"):
                out.append(pytest.param(shape_id, dt, opts, id=f"{shape_id}-{dt}-{opts}"))
    return out


@pytest.mark.parametrize("shape_id,dtype_name,opts", _long_row_cases())
def test_bitwise_identical_across_thread_counts(shape_id, dtype_name, opts, threads_restored):
    rng = np.random.default_rng(zlib.crc32(f"soft-threads/{shape_id}/{dtype_name}/{opts}".encode()))
    shape = LONG_ROWS[shape_id]
    x = _logits(rng, shape, get_dtype(dtype_name))
    q = _probs(rng, shape, get_dtype(dtype_name))
    kw = _kwargs(rng, OPTION_SETS[opts], shape[:1], shape[1])

    def results(n):
        return (fastloss.cross_entropy(x, q, reduction="none", num_threads=n, **kw),
                *fastloss.cross_entropy_with_grad(x, q, reduction="mean", num_threads=n, **kw))

    names = ("loss (none)", "loss (mean)", "grad (mean)")
    one = results(1)
    fastloss.set_num_threads(3)
    for n in (2, 3, None):
        for name, got, want in zip(names, results(n), one):
            assert_identical(got, want, what=f"{shape_id} {dtype_name} {opts}: {name}, num_threads={n} vs 1")
    label = f"{shape_id} {dtype_name} {opts}"
    check_loss(one[0], x, q, dtype_name, f"{label}: loss", reduction="none", **kw)
    check_grad(one[2], x, q, dtype_name, f"{label}: grad", reduction="mean", **kw)


# ---- torch ------------------------------------------------------------------------------------------

TORCH_OPTIONS = {
    "default": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.15},
    "smoothing_weight": {"weight": True, "label_smoothing": 0.3},
}
TORCH_LAYOUTS = {"NC": ((23, 11), -1), "NCd1d2": ((3, 11, 4, 2), 1)}


@pytest.mark.parametrize("layout", list(TORCH_LAYOUTS))
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", list(TORCH_OPTIONS))
def test_matches_torch(opts, reduction, dtype_name, layout):
    """torch.nn.functional.cross_entropy with probability targets: the loss and the gradient of
    its sum through autograd (both carry the compute error: twice the bounds)."""
    torch = pytest.importorskip("torch")
    shape, axis = TORCH_LAYOUTS[layout]
    rng = np.random.default_rng(zlib.crc32(f"soft-torch/{opts}/{dtype_name}/{layout}".encode()))
    x = _logits(rng, shape, dtype_name)
    q = _probs(rng, shape, dtype_name, axis)
    rows = shape[:1] + shape[2:] if axis == 1 else shape[:-1]
    kw = _kwargs(rng, TORCH_OPTIONS[opts], rows, shape[axis])
    tdt = getattr(torch, dtype_name)
    tkw = {k: (torch.from_numpy(v).to(tdt) if k == "weight" else v) for k, v in kw.items()}
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    out = torch.nn.functional.cross_entropy(xt, torch.from_numpy(q), reduction=reduction, **tkw)
    out.sum().backward()
    label = f"{opts} {reduction} {dtype_name} {layout}"
    loss, grad = fastloss.cross_entropy_with_grad(x, q, reduction=reduction, axis=axis, **kw)
    atol = 2 * loss_atol(x, q, dtype_name, reduction=reduction, axis=axis, **kw)
    assert_close(loss, out.detach().numpy(), rtol=2 * LOSS_RTOL[dtype_name], atol=atol, what=f"{label}: loss vs torch")
    assert_close(fastloss.cross_entropy(x, q, reduction=reduction, axis=axis, **kw), out.detach().numpy(),
                 rtol=2 * LOSS_RTOL[dtype_name], atol=atol, what=f"{label}: cross_entropy vs torch")
    want = xt.grad.numpy()
    tol = grad_tolerance(x, q, want, dtype_name, scale=2.0, reduction=reduction, axis=axis, **kw)
    assert_close(grad, want, rtol=0.0, atol=tol, what=f"{label}: grad vs torch autograd")


def test_minus_inf_logits_give_nan_where_the_probability_is_zero_as_torch(rng):
    """A -inf logit whose probability is 0 makes the row's loss nan (0 * -inf), in torch, the
    reference and fastloss; the gradient stays finite (0 at the masked class)."""
    torch = pytest.importorskip("torch")
    x = _logits(rng, (6, 10), np.float64)
    q = _probs(rng, (6, 10), np.float64)
    x[1, 3] = -np.inf
    q[1, 3] = 0.0
    x[4, 0] = -np.inf                    # row 4: masked where q = 0 too
    q[4, 0] = 0.0
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    out = torch.nn.functional.cross_entropy(xt, torch.from_numpy(q), reduction="none")
    out.sum().backward()
    loss, grad = fastloss.cross_entropy_with_grad(x, q, reduction="none")
    want = out.detach().numpy()
    assert np.isnan(want[[1, 4]]).all() and np.isfinite(np.delete(want, [1, 4])).all()   # torch
    check_loss(loss, x, q, "float64", "loss vs reference", reduction="none")
    assert_close(loss, want, rtol=2e-12, atol=loss_atol(x, q, "float64", reduction="none"), what="loss vs torch")
    check_grad(grad, x, q, "float64", "grad vs reference", reduction="none")
    assert grad[1, 3] == 0 and grad[4, 0] == 0 and np.isfinite(grad).all()
    assert_close(grad, xt.grad.numpy(), rtol=1e-12, atol=1e-15, what="grad vs torch")


# ---- finite differences -----------------------------------------------------------------------------

FD_H = 1e-3
FD_OPTIONS = {
    "z_loss": dict(z_loss=0.05),
    "softcap": dict(softcap=3.0),
    "all": dict(label_smoothing=0.15, z_loss=0.05, softcap=3.0),
}


@pytest.mark.parametrize("opts", list(FD_OPTIONS))
@pytest.mark.parametrize("layout", ["rows", "NCd1"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradient_matches_finite_differences(reduction, layout, opts, rng):
    """float64, with class and sample weights: d sum(loss) / d logits by 4th-order central
    differences (truncation ~h**4 times the 5th derivative, rounding ~1e-16 |loss| / h)."""
    shape, axis = ((4, 6), -1) if layout == "rows" else ((2, 5, 3), 1)
    x = rng.standard_normal(shape) * 2.0
    q = _probs(rng, shape, np.float64, axis)
    V = shape[axis]
    rows = shape[:-1] if axis == -1 else shape[:1] + shape[2:]
    kw = dict(weight=rng.uniform(0.5, 2.0, V), sample_weight=rng.uniform(0.5, 2.0, rows), axis=axis,
              reduction=reduction, **FD_OPTIONS[opts])
    _, grad = fastloss.cross_entropy_with_grad(x, q, **kw)
    fd = fd_gradient(lambda xp: np.sum(fastloss.cross_entropy(xp, q, **kw)), x, FD_H)
    assert_close(grad, fd, rtol=1e-7, atol=1e-9, what=f"{reduction} {layout} {opts}: grad vs finite differences")
    fd_ref = fd_gradient(lambda xp: np.sum(reference.cross_entropy(xp, q, **kw)), x, FD_H)
    assert_close(grad, fd_ref, rtol=1e-7, atol=1e-9, what=f"{reduction} {layout} {opts}: grad vs FD of the reference")


# ---- grad_out ------------------------------------------------------------------------------------------

INPLACE_LAYOUTS = ("9x7x41", "strided_rows", "class_strided", "NCd1", "1x1")


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_id", INPLACE_LAYOUTS)
def test_grad_out_is_logits_in_place(shape_id, dtype_name, isa):
    """grad_out=logits overwrites the logits with the gradient: bitwise the out-of-place one,
    and only the view's elements are written."""
    x0, q, kw = _problem("all", dtype_name, "same", shape_id)
    want_loss, want = fastloss.cross_entropy_with_grad(x0, q, **kw)
    check_grad(want, x0, q, dtype_name, f"{shape_id} {dtype_name}: out-of-place grad", **kw)
    _, view, _, _ = SHAPES[shape_id]
    base = np.array(x0.base if view is not None else x0)      # a writeable copy of the whole base
    x = base if view is None else base[view]
    outside = np.ones(base.shape, dtype=bool)
    outside[view if view is not None else ...] = False
    before = base[outside].copy()
    loss, grad = fastloss.cross_entropy_with_grad(x, q, grad_out=x, **kw)
    assert grad is x
    assert_identical(loss, want_loss, what=f"{shape_id} {dtype_name}: loss in place")
    assert_identical(x, want, what=f"{shape_id} {dtype_name}: gradient in place")
    assert_identical(base[outside], before, what=f"{shape_id} {dtype_name}: elements outside the view")


def test_grad_out_in_place_on_the_long_rows_path(threads_restored):
    """In place while threads share the parts of one long row (statistics first, then output)."""
    rng = np.random.default_rng(11)
    x = _logits(rng, (1, 262144), np.float32)
    q = _probs(rng, (1, 262144), np.float32)
    kw = dict(label_smoothing=0.1, weight=rng.uniform(0.5, 2.0, 262144), z_loss=1e-3)
    want_loss, want = fastloss.cross_entropy_with_grad(x, q, num_threads=1, **kw)
    check_grad(want, x, q, "float32", "long row: grad", **kw)
    for n in (1, 2, 3):
        xi = x.copy()
        loss, grad = fastloss.cross_entropy_with_grad(xi, q, grad_out=xi, num_threads=n, **kw)
        assert grad is xi
        assert_identical(loss, want_loss, what=f"loss in place, {n} threads")
        assert_identical(xi, want, what=f"gradient in place, {n} threads")


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided_buffer"])
def test_preallocated_grad_out(dtype_name, strided):
    x, q, kw = _problem("all", dtype_name, "same", "NCd1")
    want_loss, want = fastloss.cross_entropy_with_grad(x, q, **kw)
    buf = np.full(x.shape[:-1] + (2 * x.shape[-1],), 7, dtype=x.dtype)
    out = buf[..., ::2] if strided else np.empty_like(x)
    loss, grad = fastloss.cross_entropy_with_grad(x, q, grad_out=out, **kw)
    assert grad is out
    assert_identical(loss, want_loss, what="loss")
    assert_identical(out, want, what="gradient written into grad_out")
    check_grad(out, x, q, dtype_name, "grad_out vs reference", **kw)
    if strided:
        assert np.all(buf[..., 1::2] == 7), "elements of the buffer outside grad_out were written"


def test_grad_out_must_not_overlap_the_target(rng):
    x = _logits(rng, (5, 8), np.float32)
    q = _probs(rng, (5, 8), np.float32)
    before = q.copy()
    with pytest.raises(ValueError, match="grad_out overlaps target"):
        fastloss.cross_entropy_with_grad(x, q, grad_out=q)
    assert_identical(q, before, what="target after a rejected call")


# ---- special values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_nan_in_a_target_row_gives_nan_for_that_row(dtype_name, isa, rng):
    x = _logits(rng, (6, 40), get_dtype(dtype_name))
    q = _probs(rng, (6, 40), get_dtype(dtype_name))
    q[2, 7] = np.nan
    rows = fastloss.cross_entropy(x, q, reduction="none")
    assert np.isnan(rows[2]) and np.isfinite(np.delete(rows, 2)).all(), f"{dtype_name}: {rows}"
    assert_close(np.delete(rows, 2), np.delete(reference.cross_entropy(x, q, reduction="none"), 2),
                 rtol=LOSS_RTOL[dtype_name], atol=np.delete(loss_atol(x, q, dtype_name, reduction="none"), 2),
                 what="the other rows")
    assert np.isnan(fastloss.cross_entropy(x, q)) and np.isnan(fastloss.cross_entropy(x, q, reduction="sum"))
    _, grad = fastloss.cross_entropy_with_grad(x, q, reduction="sum")
    g = np.asarray(grad, np.float64)
    assert np.isnan(g[2]).all() and np.isfinite(np.delete(g, 2, axis=0)).all()
    want = reference.cross_entropy_grad(x, q, reduction="sum")
    assert_close(np.delete(grad, 2, axis=0), np.delete(want, 2, axis=0), rtol=0.0,
                 atol=np.delete(grad_tolerance(x, q, want, dtype_name, reduction="sum"), 2, axis=0),
                 what="the other rows' gradient")


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_probabilities_are_used_as_given(dtype_name, rng):
    """Documented: no check that rows sum to 1 or are >= 0 (torch does not check either); the
    results are the formula's, as the reference's.  A row of zeros has loss z lse**2 only."""
    x = _logits(rng, (8, 30), get_dtype(dtype_name))
    q = (rng.uniform(-0.5, 1.5, (8, 30))).astype(get_dtype(dtype_name))
    q[5] = 0
    kw = dict(weight=rng.uniform(0.5, 2.0, 30), z_loss=0.01)
    for reduction in REDUCTIONS:
        loss, grad = fastloss.cross_entropy_with_grad(x, q, reduction=reduction, **kw)
        check_loss(loss, x, q, dtype_name, f"{dtype_name} {reduction}: loss", reduction=reduction, **kw)
        check_grad(grad, x, q, dtype_name, f"{dtype_name} {reduction}: grad", reduction=reduction, **kw)
    lse = reference.logsumexp(x)[5]
    assert_close(fastloss.cross_entropy(x, q, reduction="none", **kw)[5], 0.01 * lse * lse,
                 rtol=LOSS_RTOL[dtype_name], what="row of zeros")


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4])
def test_float32_accuracy_is_shift_invariant(offset, rng):
    """softmax(x + c) = softmax(x): the loss lse sum t - sum t x subtracts two sums of size c;
    accumulated in double, the float32 loss and gradient near c are as accurate as near 0."""
    x = (offset + rng.standard_normal((64, 41)) * 3.0).astype(np.float32)
    q = _probs(rng, (64, 41), np.float32)
    for reduction in ("sum", "none"):
        loss, grad = fastloss.cross_entropy_with_grad(x, q, reduction=reduction, label_smoothing=0.1)
        check_loss(loss, x, q, "float32", f"loss at logits ~ {offset:g} ({reduction})", reduction=reduction,
                   label_smoothing=0.1)
        check_grad(grad, x, q, "float32", f"grad at logits ~ {offset:g}", reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_empty_rows(dtype_name):
    """(0, V): mean nan (0 / 0 rows), sum 0, none (0,), gradient (0, V), as the reference."""
    x = np.zeros((0, 6), dtype=get_dtype(dtype_name))
    q = np.zeros((0, 6), dtype=get_dtype(dtype_name))
    assert np.isnan(fastloss.cross_entropy(x, q)) and np.isnan(reference.cross_entropy(x, q))
    assert fastloss.cross_entropy(x, q, reduction="sum") == 0
    none = fastloss.cross_entropy(x, q, reduction="none")
    assert none.shape == (0,) and none.dtype == loss_dtype_for(x.dtype)
    loss, grad = fastloss.cross_entropy_with_grad(x, q)
    assert np.isnan(loss) and grad.shape == (0, 6) and grad.dtype == x.dtype


@pytest.mark.parametrize("soft", [True, False], ids=["probabilities", "class_indices"])
def test_one_class_on_a_leading_axis(soft, rng):
    """V = 1 on axis 0 (its stride is not the itemsize: the kernel never steps along it):
    loss z lse**2 = z x**2 with probabilities 1, gradient 2 z x; was an internal error."""
    x = _logits(rng, (1, 5), np.float64)
    t = np.ones((1, 5)) if soft else np.zeros(5, np.int64)
    loss, grad = fastloss.cross_entropy_with_grad(x, t, axis=0, z_loss=0.1, reduction="none")
    assert_close(loss, reference.cross_entropy(x, t, axis=0, z_loss=0.1, reduction="none"), rtol=1e-12)
    assert_close(grad, reference.cross_entropy_grad(x, t, axis=0, z_loss=0.1, reduction="none"), rtol=1e-12)
    assert_close(loss, 0.1 * x[0] ** 2, rtol=1e-12, what="z x**2")
    out = np.empty_like(x)
    fastloss.cross_entropy_with_grad(x, t, axis=0, z_loss=0.1, grad_out=out)
    assert_close(out, reference.cross_entropy_grad(x, t, axis=0, z_loss=0.1), rtol=1e-12, what="grad_out")


def test_mean_divides_by_the_rows_not_the_class_weights(rng):
    """torch's rule for probabilities: "mean" = sum of the rows / number of rows (here: / sum of
    the sample weights), whatever the class weights."""
    x = _logits(rng, (7, 5), np.float64)
    q = _probs(rng, (7, 5), np.float64)
    w = rng.uniform(0.1, 3.0, 5)
    sw = rng.uniform(0.5, 2.0, 7)
    rows = reference.cross_entropy(x, q, weight=w, sample_weight=sw, reduction="none")
    assert_close(fastloss.cross_entropy(x, q, weight=w, sample_weight=sw), np.sum(rows) / np.sum(sw), rtol=1e-12)
    rows = reference.cross_entropy(x, q, weight=w, reduction="none")
    assert_close(fastloss.cross_entropy(x, q, weight=w), np.sum(rows) / 7, rtol=1e-12)


def test_a_list_target_is_taken_as_probabilities(rng):
    x = _logits(rng, (3, 4), np.float64)
    q = _probs(rng, (3, 4), np.float64)
    got = fastloss.cross_entropy(x, q.tolist(), reduction="none")
    assert_close(got, reference.cross_entropy(x, q, reduction="none"), rtol=1e-12,
                 atol=loss_atol(x, q, "float64", reduction="none"), what="list target")


@pytest.mark.parametrize("layout", ["contiguous", "row_strided_view"])
def test_target_in_the_logits_dtype_is_not_copied(layout, rng):
    """The probabilities are read in place when they have the logits' dtype (also a view with
    strided rows): the call allocates far less than the target's size.  Another dtype is
    converted once (documented): about one float32 copy."""
    x = _logits(rng, (256, 2048), np.float32)
    base = _probs(rng, (512, 2048), np.float32)
    q = base[:256] if layout == "contiguous" else base[::2]
    expected = reference.cross_entropy(x, q, reduction="sum")
    tracemalloc.start()
    try:
        got = fastloss.cross_entropy(x, q, reduction="sum")
        _, peak_same = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        q64 = np.asarray(q, np.float64)
        tracemalloc.reset_peak()
        fastloss.cross_entropy(x, q64, reduction="sum")
        _, peak_converted = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_close(got, expected, rtol=LOSS_RTOL["float32"], atol=loss_atol(x, q, "float32", reduction="sum"))
    assert peak_same < q.nbytes // 8, f"peak {peak_same} bytes for a {q.nbytes}-byte target of the logits' dtype"
    assert peak_converted >= q.nbytes, f"peak {peak_converted}: a float64 target must be converted to float32"


# ---- bad input -----------------------------------------------------------------------------------------

def _bad_calls():
    x = np.zeros((5, 4))
    q = np.full((5, 4), 0.25)
    x3 = np.zeros((2, 5, 3))
    ce = fastloss.cross_entropy
    return {
        "probabilities_wrong_shape": (lambda: ce(x, np.full((5, 3), 1 / 3)), ValueError, "target"),
        "probabilities_transposed": (lambda: ce(x, q.T), ValueError, "target"),
        "probabilities_other_axis": (lambda: ce(x3, np.full((2, 3, 5), 0.2), axis=1), ValueError, "target"),
        "integer_probabilities": (lambda: ce(x, np.ones((5, 4), np.int64)), TypeError, "integer dtype"),
        "ignore_index_0": (lambda: ce(x, q, ignore_index=0), ValueError, "ignore_index"),
        "ignore_index_3_with_grad": (lambda: fastloss.cross_entropy_with_grad(x, q, ignore_index=3), ValueError,
                                     "ignore_index"),
        "weight_shape": (lambda: ce(x, q, weight=np.ones(5)), ValueError, "weight"),
        "sample_weight_shape": (lambda: ce(x, q, sample_weight=np.ones(4)), ValueError, "sample_weight"),
        "label_smoothing": (lambda: ce(x, q, label_smoothing=1.5), ValueError, "label_smoothing"),
        "nll_loss_probabilities": (lambda: fastloss.nll_loss(x, q), ValueError, "class indices"),
        "perplexity_probabilities": (lambda: fastloss.perplexity(x, q), ValueError, "class indices"),
        "complex_probabilities": (lambda: ce(x, q.astype(np.complex128)), TypeError, "target"),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_input_raises(name):
    call, exc, match = _bad_calls()[name]
    with pytest.raises(exc, match=match):
        call()


def test_negative_ignore_index_is_accepted_with_probabilities(rng):
    """torch accepts the default -100 (and any negative ignore_index) with probabilities."""
    x = _logits(rng, (5, 4), np.float64)
    q = _probs(rng, (5, 4), np.float64)
    want = reference.cross_entropy(x, q, reduction="none")
    for ii in (-100, -1):
        assert_close(fastloss.cross_entropy(x, q, ignore_index=ii, reduction="none"), want, rtol=1e-12,
                     atol=loss_atol(x, q, "float64", reduction="none"), what=f"ignore_index={ii}")
