"""The cross-entropy family (fastloss.classification): cross_entropy, cross_entropy_with_grad,
log_softmax, softmax, logsumexp, nll_loss and perplexity.

* conformance with the float64 oracle (fastloss.reference): option sets x dtype x shape x ISA x
  threads, loss and gradient;
* bitwise identity across thread counts, on the rows path and on the few-long-rows path (a row
  cut into parts that the threads share);
* parity with torch.nn.functional (values, and gradients through autograd) and the documented
  deviations;
* 4th-order finite differences in float64; grad_out / out buffers and in-place use;
* special values (huge logits, -inf masks, V = 1, NaN) and bad input.

Error model (every tolerance in this file comes from it)
---------------------------------------------------------
float64 logits are computed in double; float32, float16 and bfloat16 logits in float32 (u = 2**-24),
with exp within 2 ulp (4u), exp sums per L1 block in float32 merged in double, and lse and the
row's loss formula in double (see src_c/ce_body.h).

* loss: LOSS_RTOL relative, per row ("none") and reduced, plus LOSS_RTOL times the row's factor
  of lse (loss_atol), since the error of lse is absolute.  float32 compute: a row's lse is off
  by a few 1e-7 (exp and the float32 block sums; measured <= 3e-7 for V up to 262144), so a
  row loss of 1 is within 1e-6; 1e-5 leaves room for the summation over blocks of other ISAs
  and for the float32 result's rounding.  float16/bfloat16 logits: the same, against the
  reference computed on the float16/bfloat16 values.  float64: 1e-12.
* gradient: element j of a row is  s (coef q_j - t_j) f_j  (q = softmax, t = the row's target
  distribution, s = the row factor incl. 1/denominator for "mean", f = 1 - tanh(x/c)**2 with
  softcap, else 1), a difference of two non-negative terms whose magnitude is
  P_j = s (|coef| q_j + t_j).  The bound is
      COMPUTE_RTOL * P_j f_j                 exp, lse and x_j - lse in float32 (float64): 1e-5 (1e-12)
    + 8u P_j                                 softcap only: 1 - th**2 from the float32 capped logit
    + FLUSH * s |coef|                       exp below 2**-126 (2**-1022) is flushed to 0
    + TOLERANCES[dtype]["grad"] |g| + TOLERANCES[dtype]["grad_atol"]
                                             one rounding into the logits' dtype (registry table)
  The 1e-5 covers logits up to ~100 in size (measured 1.6e-6 near 0, 4.5e-6 near 100): the
  output pass computes exp(x_j - float32(lse)), whose error grows like u (|x_j| + 2 |lse|); the
  huge-logit tests add that term explicitly, and test_gradient_accuracy_is_shift_invariant
  shows what it costs.
The shared inputs of the conformance cases are read-only arrays (as the reference's are).
"""
from __future__ import annotations

import functools
import math
import zlib

import numpy as np
import pytest

import fastloss
from fastloss import reference
from fastloss._registry import TOLERANCES
from fl_testing import (DTYPE_NAMES, SUPPORTED_ISAS, assert_close, assert_identical, assert_loss_type, fd_gradient,
                        get_dtype, loss_dtype_for)

THREADS = (1, 2, 3)
REDUCTIONS = ("mean", "sum", "none")
F32_U = 2.0 ** -24
LOSS_RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5}
COMPUTE_RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5}
COMPUTE_U = {"float64": 2.0 ** -53, "float32": F32_U, "float16": F32_U, "bfloat16": F32_U}
FLUSH = {"float64": 2.0 ** -1022, "float32": 2.0 ** -126, "float16": 2.0 ** -126, "bfloat16": 2.0 ** -126}
LOGIT_SCALE = 2.5          # logits ~ N(0, 2.5**2): peaked rows (target probabilities from ~1e-9 to ~1)


# ---- option sets and shapes ------------------------------------------------------------------

#: "weight": per-class weights; "sample_weight": "rows" (the rows' shape) or "broadcast" (the last
#: row axis only); "ignore_index": every 4th row gets it as target (a valid class id ignores more).
OPTION_SETS = {
    "plain": {},
    "weight": {"weight": True},
    "sample_weight": {"sample_weight": "rows"},
    "ignore": {"ignore_index": -100},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 5.0},
    "torch_mix": {"weight": True, "ignore_index": 0, "label_smoothing": 0.2},
    "all": {"weight": True, "sample_weight": "broadcast", "ignore_index": -1, "label_smoothing": 0.1,
            "z_loss": 1e-3, "softcap": 8.0},
}

#: shape id -> (base array shape, view of the base, class axis)
SHAPES = {
    "1x1": ((1, 1), None, -1),
    "9x7x41": ((9, 7, 41), None, -1),
    "strided_rows": ((3, 7, 50), (slice(None), slice(None, -1)), -1),      # logits[:, :-1] of (B, T, V)
    "class_strided": ((10, 46), (slice(None, None, 2), slice(None, None, -2)), -1),   # copied for the kernel
    "NCd1": ((4, 13, 6), None, 1),                                           # torch's (N, C, d1), axis=1
    "empty": ((0, 17), None, -1),
    "4x262144": ((4, 262144), None, -1),                                     # 8 parts per row
    "3x423x32000": ((3, 423, 32000), None, -1),                              # 163 MB of float32
}
SMALL_SHAPES = ("1x1", "9x7x41", "strided_rows", "class_strided", "NCd1", "empty")


def _logits(rng, shape, dtype):
    if dtype in (np.float32, np.float64):
        x = rng.standard_normal(shape, dtype=dtype)
        x *= LOGIT_SCALE
        return x
    return (rng.standard_normal(shape) * LOGIT_SCALE).astype(dtype)


def _targets(rng, rows_shape, V, ignore_index=None):
    t = rng.integers(0, V, size=rows_shape)
    if ignore_index is not None:
        t.reshape(-1)[1::4] = ignore_index
    return t


def _kwargs(rng, opts, rows_shape, V):
    """fastloss / reference keyword arguments of an option set (arrays drawn from rng)."""
    kw = {k: v for k, v in opts.items() if k not in ("weight", "sample_weight")}
    if opts.get("weight"):
        kw["weight"] = rng.uniform(0.5, 2.0, V)
    if opts.get("sample_weight") == "rows":
        kw["sample_weight"] = rng.uniform(0.5, 2.0, rows_shape)
    elif opts.get("sample_weight") == "broadcast":
        kw["sample_weight"] = rng.uniform(0.5, 2.0, rows_shape[-1:])
    return kw


@functools.lru_cache(maxsize=4)
def _problem(opts_name, dtype_name, shape_id):
    """(logits, target, kwargs incl. axis), read-only: shared by the tests of one case."""
    base_shape, view, axis = SHAPES[shape_id]
    dtype = get_dtype(dtype_name)
    rng = np.random.default_rng(zlib.crc32(f"{opts_name}/{dtype_name}/{shape_id}".encode()))
    base = _logits(rng, base_shape, dtype)
    x = base if view is None else base[view]
    V = x.shape[axis]
    rows_shape = tuple(n for i, n in enumerate(x.shape) if i != axis % x.ndim)
    opts = OPTION_SETS[opts_name]
    t = _targets(rng, rows_shape, V, opts.get("ignore_index"))
    kw = _kwargs(rng, opts, rows_shape, V)
    kw["axis"] = axis
    for a in (base, x, t, *(v for v in kw.values() if isinstance(v, np.ndarray))):
        a.flags.writeable = False
    return x, t, kw


# ---- error bounds -------------------------------------------------------------------------------

def _row_factors(rows, V, target, weight, sample_weight, ignore_index, reduction):
    """(s, y, w): the rows' factor s (sample weight, 0 where ignored, divided by the mean's
    denominator for "mean"), the class index y (0 where ignored) and the class weights w."""
    t = np.asarray(target).reshape(rows)
    valid = t != ignore_index
    y = np.where(valid, t, 0)
    w = np.ones(V) if weight is None else np.asarray(weight, dtype=np.float64)
    s = np.ones(rows) if sample_weight is None else np.broadcast_to(np.asarray(sample_weight, dtype=np.float64), rows)
    s = np.where(valid, s, 0.0)
    if reduction == "mean":
        den = float(np.sum(s * w[y]))
        s = s / den if den != 0 else np.zeros_like(s)
    return s, y, w


def loss_atol(logits, target, dtype_name, *, reduction, weight=None, sample_weight=None, ignore_index=-100,
              label_smoothing=0.0, z_loss=0.0, softcap=None, axis=-1):
    """LOSS_RTOL times the factor of lse in each row's loss, s ((1 - ls) w_y + ls W / V + 2 z w_y |lse|)
    with |lse| <= max |x| + log V: the lse error is absolute, so this bounds rows whose loss is ~0
    (a dominant target logit), where a relative bound means nothing.  Per row, or summed."""
    x = np.moveaxis(np.asarray(logits), axis, -1)
    V, rows = x.shape[-1], x.shape[:-1]
    s, y, w = _row_factors(rows, V, target, weight, sample_weight, ignore_index, reduction)
    xa = np.abs(np.asarray(x, dtype=np.float64))
    lse_bound = (np.max(xa, axis=-1, initial=0.0, where=np.isfinite(xa)) if softcap is None
                 else np.full(rows, float(softcap))) + math.log(V)         # (-inf entries only lower lse)
    ls = label_smoothing
    per_row = LOSS_RTOL[dtype_name] * s * ((1 - ls) * w[y] + ls * np.sum(w) / V + 2 * z_loss * w[y] * lse_bound)
    return per_row if reduction == "none" else float(np.sum(per_row))


def _grad_terms(logits, target, *, weight=None, sample_weight=None, ignore_index=-100, reduction="mean",
                label_smoothing=0.0, z_loss=0.0, softcap=None, axis=-1, lse_term=False):
    """float64 magnitudes behind each gradient element, in the logits' layout (see the module
    docstring): P = s (|coef| q + t), f = 1 - tanh(x/c)**2 (None without softcap), C = s |coef|,
    and with lse_term A = |capped x| + 2 |lse| (the size of the float32 arguments of exp in the
    output pass)."""
    x = np.moveaxis(np.asarray(logits, dtype=np.float64), axis, -1)
    V, rows = x.shape[-1], x.shape[:-1]
    s, y, w = _row_factors(rows, V, target, weight, sample_weight, ignore_index, reduction)
    with np.errstate(invalid="ignore", over="ignore"):
        if softcap is None:
            xc, f = x, None
        else:
            th = np.tanh(x / softcap)
            xc, f = softcap * th, 1.0 - th * th
        q = reference.softmax(xc)
        lse = reference.logsumexp(xc)[..., None]
        s, wy = s[..., None], w[y][..., None]
        ls = label_smoothing
        coef = np.abs((1 - ls) * wy + ls * np.sum(w) / V + 2 * z_loss * wy * lse)
        tgt = (1 - ls) * wy * (np.arange(V) == y[..., None]) + ls / V * w
        P = np.where(s != 0, s * (coef * q + tgt), 0.0)
        C = np.broadcast_to(np.where(s != 0, s * coef, 0.0), x.shape)
        terms = {"P": P, "f": f, "C": C}
        if lse_term:
            terms["A"] = np.abs(xc) + 2 * np.abs(lse)
    return {k: (v if v is None else np.moveaxis(v, -1, axis)) for k, v in terms.items()}


def grad_tolerance(expected, terms, dtype_name, *, softcap=None, lse_term=False, scale=1.0):
    """The per-element gradient bound of the module docstring (the compute part times `scale`);
    lse_term adds u (|x| + 2 |lse|) P f: the float32 rounding of lse and of x - lse in the output
    pass, which only matters for huge logits."""
    u = COMPUTE_U[dtype_name]
    P, f = terms["P"], (1.0 if terms["f"] is None else terms["f"])
    rel = COMPUTE_RTOL[dtype_name] + (u * terms["A"] if lse_term else 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        tol = rel * P * f + FLUSH[dtype_name] * terms["C"]
        if softcap is not None:
            tol += 8 * u * P
        tol *= scale
        tol += TOLERANCES[dtype_name]["grad"] * np.abs(np.asarray(expected, dtype=np.float64))
        tol += TOLERANCES[dtype_name]["grad_atol"]
    return np.nan_to_num(tol, nan=0.0, posinf=0.0, copy=False)


def assert_grad_close(got, expected, tol_or_terms, dtype_name=None, *, what="grad", **kw):
    """`got` within grad_tolerance (pass the terms and the dtype, or a precomputed tolerance)."""
    tol = tol_or_terms if dtype_name is None else grad_tolerance(expected, tol_or_terms, dtype_name, **kw)
    assert isinstance(got, np.ndarray) and got.shape == np.shape(expected), (
        f"{what}: got {type(got).__name__} of shape {getattr(got, 'shape', None)}, expected {np.shape(expected)}")
    assert_close(got, expected, rtol=0.0, atol=tol, what=what)


# ---- conformance with the reference -------------------------------------------------------------

class Case:
    """One conformance case (hashable: the reference results are cached per case)."""

    def __init__(self, opts, dtype, shape_id, loss_reductions=REDUCTIONS, grad_reductions=REDUCTIONS):
        self.opts, self.dtype, self.shape_id = opts, dtype, shape_id
        self.loss_reductions, self.grad_reductions = loss_reductions, grad_reductions

    def key(self):
        return self.opts, self.dtype, self.shape_id

    def __hash__(self):
        return hash(self.key())

    def __eq__(self, other):
        return self.key() == other.key()

    def __repr__(self):
        return f"{self.opts}-{self.dtype}-{self.shape_id}"


@functools.lru_cache(maxsize=8)
def _ref_loss(case, reduction):
    """The reference loss and its absolute tolerance."""
    x, t, kw = _problem(*case.key())
    return reference.cross_entropy(x, t, reduction=reduction, **kw), loss_atol(x, t, case.dtype, reduction=reduction,
                                                                               **kw)


@functools.lru_cache(maxsize=2)
def _ref_grad(case, reduction):
    """The reference gradient and its tolerance ("none" and "sum" have the same gradient)."""
    x, t, kw = _problem(*case.key())
    expected = reference.cross_entropy_grad(x, t, reduction=reduction, **kw)
    tol = grad_tolerance(expected, _grad_terms(x, t, reduction=reduction, **kw), case.dtype, softcap=kw.get("softcap"))
    return expected, tol


def _conformance_rows():
    rows = []

    def add(case, isas, marks=()):
        for isa in isas:
            rows.append(pytest.param(case, isa, id=f"{case}-{isa}", marks=marks))

    for shape_id in SMALL_SHAPES:
        for opts in OPTION_SETS:
            for dt in DTYPE_NAMES:
                add(Case(opts, dt, shape_id), SUPPORTED_ISAS)
    # 8 parts per row (class weights and the target fall in different parts): the option sets
    # that touch every per-part quantity (x_t, sum w x, class weights at an offset, softcap).
    for opts in ("plain", "torch_mix", "all"):
        for dt in DTYPE_NAMES:
            add(Case(opts, dt, "4x262144"), SUPPORTED_ISAS)
    # Liger-Kernel's "weird" shape, 1269 rows of 32000 (the reductions' logic is covered above):
    # float32 on every ISA, bfloat16 on the best one.
    for dt in ("float32", "bfloat16"):
        add(Case("all", dt, "3x423x32000", loss_reductions=("none", "mean"), grad_reductions=("mean",)),
            SUPPORTED_ISAS if dt == "float32" else SUPPORTED_ISAS[-1:], marks=pytest.mark.slow)
    return rows


@pytest.mark.parametrize("case,isa", _conformance_rows(), indirect=["isa"])
def test_matches_reference(case, isa):
    """Loss (every reduction) and gradient against the float64 reference; the thread counts
    1, 2, 3 must give bitwise the same results, so the reference is compared once."""
    x, t, kw = _problem(*case.key())
    for reduction in case.loss_reductions:
        label = f"{case} isa={isa} reduction={reduction}"
        expected, atol = _ref_loss(case, reduction)
        rtol = LOSS_RTOL[case.dtype]
        first = None
        for n in THREADS:
            loss = fastloss.cross_entropy(x, t, reduction=reduction, num_threads=n, **kw)
            if first is None:
                assert_loss_type(loss, x.dtype, scalar=reduction != "none")
                assert_close(loss, expected, rtol=rtol, atol=atol, what=f"{label}: loss")
                first = loss
            else:
                assert_identical(loss, first, what=f"{label}: loss, {n} threads vs 1")
        if reduction not in case.grad_reductions:
            continue
        exp_grad, tol = _ref_grad(case, "mean" if reduction == "mean" else "sum")
        first = None
        for n in THREADS:
            loss, grad = fastloss.cross_entropy_with_grad(x, t, reduction=reduction, num_threads=n, **kw)
            if first is None:
                assert_close(loss, expected, rtol=rtol, atol=atol, what=f"{label}: loss of _with_grad")
                assert grad.dtype == x.dtype and grad.shape == x.shape, f"{label}: grad {grad.dtype}{grad.shape}"
                assert_grad_close(grad, exp_grad, tol, what=f"{label}: grad")
                first = (loss, grad)
            else:
                assert_identical(loss, first[0], what=f"{label}: loss of _with_grad, {n} threads vs 1")
                assert_identical(grad, first[1], what=f"{label}: grad, {n} threads vs 1")


# ---- bitwise identical across thread counts ----------------------------------------------------

#: (rows, V): with more threads than rows, the rows' parts (32768 classes) are shared between
#: threads (1x262144 with 2 and 3 threads, 2x100000 with 3); (1, 2_200_000) has more parts (68)
#: than the kernel keeps on the stack, so it always takes that path; 3x40000 splits by rows.
LONG_ROWS = {"1x262144": (1, 262144), "2x100000": (2, 100000), "3x40000": (3, 40000),
             "1x2200000": (1, 2_200_000)}


@pytest.mark.parametrize("opts", ["plain", "all"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_id", list(LONG_ROWS))
def test_bitwise_identical_across_thread_counts(shape_id, dtype_name, opts, threads_restored):
    rng = np.random.default_rng(zlib.crc32(f"{shape_id}/{dtype_name}/{opts}".encode()))
    shape = LONG_ROWS[shape_id]
    x = _logits(rng, shape, get_dtype(dtype_name))
    t = _targets(rng, shape[:1], shape[1])
    kw = _kwargs(rng, OPTION_SETS[opts], shape[:1], shape[1])
    kw.update({k: v for k, v in OPTION_SETS[opts].items() if k in ("label_smoothing", "z_loss", "softcap")})

    def results(n):
        return (fastloss.cross_entropy(x, t, reduction="none", num_threads=n, **kw),
                *fastloss.cross_entropy_with_grad(x, t, reduction="mean", num_threads=n, **kw),
                fastloss.log_softmax(x, num_threads=n), fastloss.softmax(x, num_threads=n),
                fastloss.logsumexp(x, num_threads=n))

    names = ("loss (none)", "loss (mean)", "grad (mean)", "log_softmax", "softmax", "logsumexp")
    one = results(1)
    fastloss.set_num_threads(3)
    for n in (2, 3, None):
        for name, got, want in zip(names, results(n), one):
            assert_identical(got, want, what=f"{shape_id} {dtype_name} {opts}: {name}, num_threads={n} vs 1")
    # ... and right (the path of one thread is also checked against the reference here)
    assert_close(one[0], reference.cross_entropy(x, t, reduction="none", **kw), rtol=LOSS_RTOL[dtype_name],
                 atol=loss_atol(x, t, dtype_name, reduction="none", **kw), what=f"{shape_id} {dtype_name} {opts}: loss")
    assert_grad_close(one[2], reference.cross_entropy_grad(x, t, **kw), _grad_terms(x, t, **kw), dtype_name,
                      softcap=kw.get("softcap"), what=f"{shape_id} {dtype_name} {opts}: grad")


# ---- torch ------------------------------------------------------------------------------------

def _torch():
    return pytest.importorskip("torch")


#: every cross_entropy option torch has; "ignore" puts ignore_index in every 4th row
TORCH_OPTIONS = {
    "default": {},
    "weight": {"weight": True},
    "ignore": {"ignore_index": -100},
    "ignore_valid_class": {"ignore_index": 2},
    "smoothing": {"label_smoothing": 0.15},
    "smoothing_1": {"label_smoothing": 1.0},
    "smoothing_weight": {"weight": True, "label_smoothing": 0.15},
    "smoothing_ignore": {"ignore_index": -100, "label_smoothing": 0.15},
    "smoothing_weight_ignore": {"weight": True, "ignore_index": 2, "label_smoothing": 0.3},
}
TORCH_LAYOUTS = {"NC": ((23, 11), -1), "NCd1d2": ((3, 11, 4, 2), 1)}


def _torch_tensor(a, dtype_name, requires_grad=False):
    torch = _torch()
    t = torch.from_numpy(np.asarray(a, dtype=np.float64)).to(getattr(torch, dtype_name))
    return t.requires_grad_(requires_grad)


@pytest.mark.parametrize("layout", list(TORCH_LAYOUTS))
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", list(TORCH_OPTIONS))
def test_cross_entropy_matches_torch(opts, reduction, dtype_name, layout):
    torch = _torch()
    shape, axis = TORCH_LAYOUTS[layout]
    rng = np.random.default_rng(zlib.crc32(f"torch/{opts}/{dtype_name}/{layout}".encode()))
    x = _logits(rng, shape, np.dtype(dtype_name))
    rows = shape[:1] + shape[2:] if axis == 1 else shape[:-1]
    V = shape[axis]
    o = TORCH_OPTIONS[opts]
    t = _targets(rng, rows, V, o.get("ignore_index"))
    kw = _kwargs(rng, o, rows, V)
    tkw = {k: (_torch_tensor(v, dtype_name) if k == "weight" else v) for k, v in kw.items()}
    xt = _torch_tensor(x, dtype_name, requires_grad=True)
    out = torch.nn.functional.cross_entropy(xt, torch.from_numpy(t), reduction=reduction, **tkw)
    out.sum().backward()
    loss, grad = fastloss.cross_entropy_with_grad(x, t, reduction=reduction, axis=axis, **kw)
    label = f"{opts} {reduction} {dtype_name} {layout}"
    atol = 2 * loss_atol(x, t, dtype_name, reduction=reduction, axis=axis, **kw)
    assert_close(loss, out.detach().numpy(), rtol=2 * LOSS_RTOL[dtype_name], atol=atol, what=f"{label}: loss vs torch")
    assert_close(fastloss.cross_entropy(x, t, reduction=reduction, axis=axis, **kw), out.detach().numpy(),
                 rtol=2 * LOSS_RTOL[dtype_name], atol=atol, what=f"{label}: cross_entropy vs torch")
    # torch and fastloss both carry the compute error of the model: twice the bound
    assert_grad_close(grad, xt.grad.numpy(), _grad_terms(x, t, reduction=reduction, axis=axis, **kw), dtype_name,
                      scale=2.0, what=f"{label}: grad vs torch autograd")


def test_float16_logits_give_a_float32_loss_unlike_torch(rng):
    """Documented deviation: torch returns a float16 loss for float16 logits, fastloss float32
    (never rounded to float16); the values agree to float16 precision."""
    torch = _torch()
    x = _logits(rng, (64, 50), np.float16)
    t = _targets(rng, (64,), 50)
    for reduction in REDUCTIONS:
        ours = fastloss.cross_entropy(x, t, reduction=reduction)
        theirs = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), reduction=reduction)
        assert theirs.dtype == torch.float16
        assert_loss_type(ours, np.float16, scalar=reduction != "none")
        assert_close(ours, theirs.float().numpy(), rtol=2.0 ** -10, what=f"float16 {reduction} vs torch")
        assert_close(ours, reference.cross_entropy(x, t, reduction=reduction), rtol=LOSS_RTOL["float16"],
                     atol=loss_atol(x, t, "float16", reduction=reduction), what=f"float16 {reduction} vs reference")


@pytest.mark.parametrize("bad_row", ["nan", "all_-inf"])
def test_ignored_row_has_zero_gradient_where_torch_has_nan(bad_row, rng):
    """Documented deviation: a row whose target is ignore_index has loss 0 and gradient 0
    whatever its logits; torch's gradient there is nan (0 * nan)."""
    torch = _torch()
    x = _logits(rng, (4, 9), np.float64)
    x[2] = np.nan if bad_row == "nan" else -np.inf
    x[2, 0] = 0.5 if bad_row == "nan" else x[2, 0]
    t = np.array([1, 3, -100, 8])
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    out = torch.nn.functional.cross_entropy(xt, torch.from_numpy(t))
    out.backward()
    assert torch.isnan(xt.grad[2]).all() and torch.isfinite(xt.grad[[0, 1, 3]]).all()   # torch: nan
    loss, grad = fastloss.cross_entropy_with_grad(x, t)
    assert_close(loss, out.item(), rtol=1e-12, what="loss vs torch")
    assert_identical(grad[2], np.zeros(9), what="gradient of the ignored row")
    assert_close(grad[[0, 1, 3]], xt.grad[[0, 1, 3]].numpy(), rtol=1e-12, atol=1e-15, what="other rows vs torch")
    assert_identical(fastloss.cross_entropy(x, t, reduction="none")[2], np.float64(0.0), what="ignored row's loss")


def _softmax_family_cases():
    out = []
    for dt in ("float32", "float64"):
        for case in ("random", "masked", "axis0"):
            out.append(pytest.param(dt, case, id=f"{dt}-{case}"))
    return out


@pytest.mark.parametrize("dtype_name,case", _softmax_family_cases())
def test_softmax_family_matches_torch(dtype_name, case, rng):
    """log_softmax, softmax and logsumexp against torch (and the reference), with -inf entries,
    an all -inf row (softmax: nan, logsumexp: -inf, as torch) and axis=0."""
    torch = _torch()
    x = _logits(rng, (12, 37), np.dtype(dtype_name))
    axis = 0 if case == "axis0" else -1
    if case == "masked":
        x[rng.random(x.shape) < 0.3] = -np.inf
        x[5] = -np.inf
    xt = torch.from_numpy(x)
    label = f"{dtype_name} {case}"
    lse = fastloss.logsumexp(x, axis=axis)
    assert lse.dtype == x.dtype and lse.shape == ((37,) if axis == 0 else (12,))
    assert_close(lse, torch.logsumexp(xt, dim=axis).numpy(), rtol=2 * LOSS_RTOL[dtype_name], what=f"{label}: lse")
    assert_close(lse, reference.logsumexp(x, axis=axis), rtol=LOSS_RTOL[dtype_name], what=f"{label}: lse vs ref")
    # log_softmax / softmax: |error| <= (compute + u (|x| + 2 |lse|)) (|x| + |lse|) resp. * p
    u = COMPUTE_U[dtype_name]
    with np.errstate(invalid="ignore"):
        lse_b = np.expand_dims(np.where(np.isfinite(lse), lse, 0.0), axis)
        xa = np.where(np.isfinite(x), np.abs(x), 0.0)
        rel = 2 * COMPUTE_RTOL[dtype_name] + 2 * u * (xa + 2 * np.abs(lse_b))
    for name, ours, theirs, ref in (
            ("log_softmax", fastloss.log_softmax(x, axis=axis), torch.log_softmax(xt, dim=axis).numpy(),
             reference.log_softmax(x, axis=axis)),
            ("softmax", fastloss.softmax(x, axis=axis), torch.softmax(xt, dim=axis).numpy(),
             reference.softmax(x, axis=axis))):
        assert ours.dtype == x.dtype and ours.shape == x.shape, f"{label}: {name} {ours.dtype}{ours.shape}"
        scale = (xa + np.abs(lse_b)) if name == "log_softmax" else np.nan_to_num(np.abs(ref))
        assert_close(ours, theirs, rtol=0.0, atol=np.nan_to_num(rel * scale), what=f"{label}: {name} vs torch")
        assert_close(ours, ref, rtol=0.0, atol=np.nan_to_num(rel * scale), what=f"{label}: {name} vs reference")
    if case == "masked":
        assert np.isneginf(lse[5]) and np.isnan(fastloss.softmax(x)[5]).all()


@pytest.mark.parametrize("row", [[np.inf, 0.0, 1.0], [np.inf, -np.inf, 2.0], [np.inf, np.inf, 0.0]],
                         ids=["inf_and_finite", "inf_and_-inf", "two_inf"])
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_logsumexp_of_a_row_holding_inf_is_inf_as_in_torch(dtype_name, row):
    """reference.logsumexp (and torch.logsumexp) give +inf for a row holding +inf; the
    cross-entropy of such a row is nan in all three."""
    torch = _torch()
    x = np.array([row, [0.0, 1.0, 2.0]], dtype=dtype_name)
    want = torch.logsumexp(torch.from_numpy(x), dim=-1).numpy()
    assert np.isposinf(want[0]) and np.isposinf(reference.logsumexp(x)[0])
    assert np.isnan(fastloss.cross_entropy(x, np.array([1, 1]), reduction="none")[0])
    assert_close(fastloss.logsumexp(x), want, rtol=LOSS_RTOL[dtype_name], what=f"logsumexp {row}")


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_nll_loss_matches_torch(ignore_index, weighted, reduction, dtype_name, rng):
    torch = _torch()
    logp = fastloss.log_softmax(_logits(rng, (30, 8), np.dtype(dtype_name)))
    t = _targets(rng, (30,), 8, ignore_index)
    w = rng.uniform(0.5, 2.0, 8) if weighted else None
    want = torch.nn.functional.nll_loss(torch.from_numpy(logp), torch.from_numpy(t), reduction=reduction,
                                        ignore_index=ignore_index,
                                        weight=None if w is None else _torch_tensor(w, dtype_name))
    got = fastloss.nll_loss(logp, t, weight=w, ignore_index=ignore_index, reduction=reduction)
    assert_loss_type(got, logp.dtype, scalar=reduction != "none")
    assert_close(got, want.numpy(), rtol=LOSS_RTOL[dtype_name], what=f"nll_loss {reduction} vs torch")
    assert_close(got, reference.nll_loss(logp, t, weight=w, ignore_index=ignore_index, reduction=reduction),
                 rtol=LOSS_RTOL[dtype_name], what=f"nll_loss {reduction} vs reference")


# ---- finite differences --------------------------------------------------------------------------

FD_H = 1e-3


@pytest.mark.parametrize("layout", ["rows", "NCd1"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradient_matches_finite_differences(reduction, layout, rng):
    """float64, every option on (class and sample weights, an ignored row, label smoothing,
    z-loss, softcap): d sum(loss) / d logits by 4th-order central differences (truncation
    ~h**4 = 1e-12 times the 5th derivative, rounding ~1e-16 |loss| / h)."""
    shape, axis = ((4, 6), -1) if layout == "rows" else ((2, 5, 3), 1)
    x = rng.standard_normal(shape) * 2.0
    V = shape[axis]
    rows = shape[:-1] if axis == -1 else shape[:1] + shape[2:]
    t = rng.integers(0, V, rows)
    t.reshape(-1)[1] = -7
    kw = dict(weight=rng.uniform(0.5, 2.0, V), sample_weight=rng.uniform(0.5, 2.0, rows), ignore_index=-7,
              label_smoothing=0.15, z_loss=0.05, softcap=3.0, axis=axis, reduction=reduction)
    loss, grad = fastloss.cross_entropy_with_grad(x, t, **kw)
    fd = fd_gradient(lambda xp: np.sum(fastloss.cross_entropy(xp, t, **kw)), x, FD_H)
    assert_close(grad, fd, rtol=1e-7, atol=1e-9, what=f"{reduction} {layout}: grad vs finite differences")
    assert np.all(np.moveaxis(grad, axis, -1).reshape(-1, V)[1] == 0.0), "the ignored row's gradient"
    assert_grad_close(grad, reference.cross_entropy_grad(x, t, **kw), _grad_terms(x, t, **kw), "float64",
                      softcap=kw["softcap"], what=f"{reduction} {layout}: grad vs reference")


# ---- grad_out and out= -------------------------------------------------------------------------

INPLACE_LAYOUTS = ("9x7x41", "strided_rows", "class_strided", "NCd1", "1x1")


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_id", INPLACE_LAYOUTS)
def test_grad_out_is_logits_in_place(shape_id, dtype_name, isa):
    """grad_out=logits overwrites the logits with the gradient: bitwise the out-of-place one,
    and only the view's elements are written (strided views of a larger base)."""
    x0, t, kw = _problem("all", dtype_name, shape_id)
    want_loss, want = fastloss.cross_entropy_with_grad(x0, t, **kw)
    base_shape, view, _ = SHAPES[shape_id]
    base = np.array(x0.base if view is not None else x0)      # a writeable copy of the whole base
    x = base if view is None else base[view]
    outside = np.ones(base.shape, dtype=bool)
    outside[view if view is not None else ...] = False
    before = base[outside].copy()
    loss, grad = fastloss.cross_entropy_with_grad(x, t, grad_out=x, **kw)
    assert grad is x
    assert_identical(loss, want_loss, what=f"{shape_id} {dtype_name}: loss in place")
    assert_identical(x, want, what=f"{shape_id} {dtype_name}: gradient in place")
    assert_identical(base[outside], before, what=f"{shape_id} {dtype_name}: elements outside the view")


def test_grad_out_in_place_on_the_long_rows_path(threads_restored):
    """In place while threads share the parts of one long row (all statistics are taken before
    any part is overwritten)."""
    rng = np.random.default_rng(7)
    x = _logits(rng, (1, 262144), np.float32)
    t = np.array([123456])
    kw = dict(label_smoothing=0.1, weight=rng.uniform(0.5, 2.0, 262144), z_loss=1e-3)
    want_loss, want = fastloss.cross_entropy_with_grad(x, t, num_threads=1, **kw)
    for n in (1, 2, 3):
        xi = x.copy()
        loss, grad = fastloss.cross_entropy_with_grad(xi, t, grad_out=xi, num_threads=n, **kw)
        assert grad is xi
        assert_identical(loss, want_loss, what=f"loss in place, {n} threads")
        assert_identical(xi, want, what=f"gradient in place, {n} threads")


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided_buffer"])
def test_preallocated_grad_out(dtype_name, strided):
    x, t, kw = _problem("all", dtype_name, "NCd1")
    want_loss, want = fastloss.cross_entropy_with_grad(x, t, **kw)
    buf = np.full(x.shape[:-1] + (2 * x.shape[-1],), 7, dtype=x.dtype)
    out = buf[..., ::2] if strided else np.empty_like(x)
    loss, grad = fastloss.cross_entropy_with_grad(x, t, grad_out=out, **kw)
    assert grad is out
    assert_identical(loss, want_loss, what="loss")
    assert_identical(out, want, what="gradient written into grad_out")
    if strided:
        assert np.all(buf[..., 1::2] == 7), "elements of the buffer outside grad_out were written"


def _bad_grad_outs(x):
    ro = np.empty_like(x)
    ro.flags.writeable = False
    return [("shape", np.empty(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype), ValueError, "grad_out has shape"),
            ("shape_transposed", np.empty(x.shape[::-1], x.dtype), ValueError, "grad_out has shape"),
            ("dtype", np.empty(x.shape, np.float64 if x.dtype == np.float32 else np.float32), TypeError,
             "grad_out has dtype"),
            ("read_only", ro, ValueError, "read-only"),
            ("list", x.tolist(), TypeError, "grad_out"),
            ("view_of_logits", x[::-1], ValueError, "overlaps")]     # same memory, rows in another order


@pytest.mark.parametrize("which", ["shape", "shape_transposed", "dtype", "read_only", "list", "view_of_logits"])
def test_bad_grad_out_raises(which, rng):
    x = _logits(rng, (5, 8), np.float32)
    t = np.arange(5)
    (_, out, exc, match), = [b for b in _bad_grad_outs(x) if b[0] == which]
    before = x.copy()
    with pytest.raises(exc, match=match):
        fastloss.cross_entropy_with_grad(x, t, grad_out=out)
    assert_identical(x, before, what="logits after a rejected call")


def test_a_view_of_exactly_the_logits_is_in_place(rng):
    """grad_out = logits[:] (another object, the same elements in the same layout) is the in-place
    case, as for every other loss (only a different layout of the same memory is an overlap)."""
    x = _logits(rng, (5, 8), np.float32)
    t = np.arange(5)
    want_loss, want = fastloss.cross_entropy_with_grad(x, t)
    loss, grad = fastloss.cross_entropy_with_grad(x, t, grad_out=x[:])
    assert_identical(loss, want_loss, what="loss")
    assert_identical(x, want, what="gradient written over the logits")


def test_bad_target_with_grad_out_leaves_it_untouched(rng):
    """Errors are raised before any work: an out-of-range target in the last row must not
    leave a half-written gradient in grad_out=logits."""
    x = _logits(rng, (6, 8), np.float32)
    before = x.copy()
    with pytest.raises(IndexError, match="target 8 at row 5"):
        fastloss.cross_entropy_with_grad(x, np.array([0, 1, 2, 3, 4, 8]), grad_out=x)
    assert_identical(x, before, what="logits after a rejected in-place call")


def test_read_only_logits_cannot_be_their_own_grad_out(rng):
    x = _logits(rng, (5, 8), np.float32)
    x.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastloss.cross_entropy_with_grad(x, np.arange(5), grad_out=x)


@pytest.mark.parametrize("func", ["log_softmax", "softmax"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("layout", ["axis-1", "axis0", "long_row"])
def test_softmax_out_in_place(layout, dtype_name, func, threads_restored):
    """out=x overwrites x with the result (bitwise the out-of-place one); axis=0 (class axis
    strided: computed on a copy) matches the reference along axis 0."""
    rng = np.random.default_rng(zlib.crc32(f"{layout}/{dtype_name}/{func}".encode()))
    shape, axis = {"axis-1": ((6, 7, 33), -1), "axis0": ((33, 6), 0), "long_row": ((1, 262144), -1)}[layout]
    x = _logits(rng, shape, get_dtype(dtype_name))
    f = getattr(fastloss, func)
    want = f(x, axis=axis, num_threads=1)
    ref = getattr(reference, func)(x, axis=axis)
    xi = x.copy()
    got = f(xi, axis=axis, out=xi, num_threads=3)
    assert got is xi
    assert_identical(xi, want, what=f"{func} {layout} {dtype_name}: in place")
    out = np.empty_like(x)
    assert f(x, axis=axis, out=out) is out
    assert_identical(out, want, what=f"{func} {layout} {dtype_name}: out=")
    lse = np.expand_dims(reference.logsumexp(x, axis=axis), axis)
    u = COMPUTE_U[dtype_name]
    rel = COMPUTE_RTOL[dtype_name] + u * (np.abs(np.asarray(x, np.float64)) + 2 * np.abs(lse))
    scale = np.abs(np.asarray(x, np.float64)) + np.abs(lse) if func == "log_softmax" else ref
    atol = rel * scale + TOLERANCES[dtype_name]["grad"] * np.abs(ref) + TOLERANCES[dtype_name]["grad_atol"]
    assert_close(want, ref, rtol=0.0, atol=atol, what=f"{func} {layout} {dtype_name} vs reference")


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_logsumexp_of_all_minus_inf_rows_is_minus_inf(dtype_name):
    x = np.full((3, 5), -np.inf).astype(get_dtype(dtype_name))
    x[1] = np.arange(5)
    got = fastloss.logsumexp(x)
    assert got.dtype == loss_dtype_for(x.dtype)
    assert np.isneginf(got[0]) and np.isneginf(got[2])
    assert_close(got[1], reference.logsumexp(x)[1], rtol=LOSS_RTOL[dtype_name])
    assert np.isneginf(fastloss.logsumexp(x, axis=0)).tolist() == [False] * 5


# ---- special values ----------------------------------------------------------------------------

def _huge_logits(rng, dtype, big):
    """Rows of uniform(-big, big), rows of values all near +big, rows all at or below -big (a
    -10000 max sentinel, as in llm.c, would break them), rows mixing exactly +-big, and a row
    that is all -big."""
    R, V = 12, 41
    x = rng.uniform(-big, big, (R, V))
    x[3:6] = big - rng.uniform(0, 5, (3, V))
    x[6:9] = -big - rng.uniform(0, 5, (3, V))
    x[9:11] = rng.choice([-big, big], (2, V))
    x[11] = -big
    return x.astype(dtype)


@pytest.mark.parametrize("opts", ["plain", "all"])
@pytest.mark.parametrize("dtype_name,big", [("float32", 1e4), ("float16", 6e4), ("bfloat16", 1e4),
                                             ("float64", 1e4)])
def test_huge_logits_give_finite_results_matching_the_reference(dtype_name, big, opts, isa, rng):
    x = _huge_logits(rng, get_dtype(dtype_name), big)
    t = _targets(rng, (12,), 41)
    kw = _kwargs(rng, OPTION_SETS[opts], (12,), 41)
    kw.update({k: v for k, v in OPTION_SETS[opts].items() if k in ("label_smoothing", "z_loss", "softcap")})
    kw.pop("ignore_index", None)
    label = f"{dtype_name} +-{big:g} {opts} isa={isa}"
    for reduction in REDUCTIONS:
        loss, grad = fastloss.cross_entropy_with_grad(x, t, reduction=reduction, **kw)
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(np.asarray(grad, np.float64))), f"{label} {reduction}"
        assert_close(loss, reference.cross_entropy(x, t, reduction=reduction, **kw), rtol=LOSS_RTOL[dtype_name],
                     atol=loss_atol(x, t, dtype_name, reduction=reduction, **kw), what=f"{label}: {reduction} loss")
        assert_grad_close(grad, reference.cross_entropy_grad(x, t, reduction=reduction, **kw),
                          _grad_terms(x, t, reduction=reduction, lse_term=True, **kw), dtype_name,
                          softcap=kw.get("softcap"), lse_term=True, what=f"{label}: {reduction} grad")
    lse = fastloss.logsumexp(x)
    assert_close(lse, reference.logsumexp(x), rtol=LOSS_RTOL[dtype_name], what=f"{label}: logsumexp")


@pytest.mark.parametrize("offset", [0.0, 1e2, 1e3, 1e4])
def test_gradient_accuracy_is_shift_invariant(offset, rng):
    """softmax(x + c) = softmax(x): the float32 gradient of logits near c must be as accurate
    as near 0 (COMPUTE_RTOL of the terms' magnitude; torch: ~1e-6 for every c here).  Logits
    within a few units of each other, where lse is not a float32 number near c."""
    torch = _torch()
    x = (offset + rng.standard_normal((64, 41)) * 3.0).astype(np.float32)
    t = _targets(rng, (64,), 41)
    loss, grad = fastloss.cross_entropy_with_grad(x, t, reduction="sum")
    xt = torch.from_numpy(x).requires_grad_(True)
    torch.nn.functional.cross_entropy(xt, torch.from_numpy(t), reduction="sum").backward()
    ref = reference.cross_entropy_grad(x, t, reduction="sum")
    terms = _grad_terms(x, t, reduction="sum")
    assert_grad_close(xt.grad.numpy(), ref, terms, "float32", what=f"torch's gradient at logits ~ {offset:g}")
    assert_grad_close(grad, ref, terms, "float32", what=f"gradient at logits ~ {offset:g}")
    assert_close(loss, reference.cross_entropy(x, t, reduction="sum"), rtol=LOSS_RTOL["float32"],
                 atol=loss_atol(x, t, "float32", reduction="sum"), what=f"loss at logits ~ {offset:g}")


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_minus_inf_logits_mask_the_vocabulary(dtype_name, rng):
    """-inf logits (masked classes) have probability 0: finite loss and zero gradient there;
    a -inf target (or label smoothing over -inf classes) gives an infinite loss, as in torch."""
    x = _logits(rng, (20, 30), get_dtype(dtype_name))
    mask = rng.random(x.shape) < 0.4
    t = _targets(rng, (20,), 30)
    mask[np.arange(20), t] = False
    mask[3, t[3]] = True                  # row 3: the target itself is masked
    x[mask] = -np.inf
    label = dtype_name
    for reduction in REDUCTIONS:
        loss, grad = fastloss.cross_entropy_with_grad(x, t, reduction=reduction)
        assert_close(loss, reference.cross_entropy(x, t, reduction=reduction), rtol=LOSS_RTOL[dtype_name],
                     atol=loss_atol(x, t, dtype_name, reduction=reduction), what=f"{label}: {reduction} loss")
        assert_grad_close(grad, reference.cross_entropy_grad(x, t, reduction=reduction),
                          _grad_terms(x, t, reduction=reduction), dtype_name, what=f"{label}: {reduction} grad")
    rows = fastloss.cross_entropy(x, t, reduction="none")
    assert np.isposinf(rows[3]) and np.all(np.isfinite(np.delete(rows, 3)))
    _, grad = fastloss.cross_entropy_with_grad(np.delete(x, 3, axis=0), np.delete(t, 3))
    assert np.all(grad[np.delete(mask, 3, axis=0)] == 0), "gradient at masked classes"
    smoothed = fastloss.cross_entropy(np.delete(x, 3, axis=0), np.delete(t, 3), label_smoothing=0.1, reduction="none")
    assert np.all(np.isposinf(smoothed[np.delete(mask, 3, axis=0).any(axis=1)])), "smoothing over -inf classes"


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_rows_all_minus_inf_except_the_target(dtype_name, isa):
    V = 300
    x = np.full((4, V), -np.inf)
    t = np.array([0, 17, 299, 150])
    x[np.arange(4), t] = [0.0, -5.0, 3.0, 100.0]
    x = x.astype(get_dtype(dtype_name))
    for reduction in REDUCTIONS:
        loss, grad = fastloss.cross_entropy_with_grad(x, t, reduction=reduction)
        assert np.all(np.asarray(loss) == 0), f"{dtype_name} {reduction}: loss {loss}"
        assert_identical(grad, np.zeros_like(x), what=f"{dtype_name} {reduction}: grad")
    assert_close(fastloss.logsumexp(x), x[np.arange(4), t].astype(np.float64), rtol=0.0)


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_one_class(dtype_name, rng):
    """V = 1: log_softmax = 0, softmax = 1, loss 0 and gradient 0; z-loss alone leaves z x**2."""
    x = _logits(rng, (7, 1), get_dtype(dtype_name))
    t = np.zeros(7, dtype=np.int64)
    loss, grad = fastloss.cross_entropy_with_grad(x, t, reduction="none", label_smoothing=0.3)
    assert np.all(loss == 0), f"loss {loss}"
    assert_grad_close(grad, np.zeros(x.shape), _grad_terms(x, t, reduction="none", label_smoothing=0.3), dtype_name,
                      what="V = 1 gradient")
    assert np.all(np.asarray(fastloss.log_softmax(x), np.float64) == 0)
    assert np.all(np.asarray(fastloss.softmax(x), np.float64) == 1)
    for reduction in REDUCTIONS:
        loss, grad = fastloss.cross_entropy_with_grad(x, t, reduction=reduction, z_loss=0.1)
        assert_close(loss, reference.cross_entropy(x, t, reduction=reduction, z_loss=0.1), rtol=LOSS_RTOL[dtype_name])
        assert_grad_close(grad, reference.cross_entropy_grad(x, t, reduction=reduction, z_loss=0.1),
                          _grad_terms(x, t, reduction=reduction, z_loss=0.1), dtype_name, what=f"z-loss {reduction}")


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_nan_in_a_row_gives_nan_for_that_row(dtype_name, rng):
    x = _logits(rng, (6, 40), get_dtype(dtype_name))
    x[2, 7] = np.nan
    x[4, 0] = np.nan                     # row 4 is ignored: loss 0 and gradient 0
    t = np.array([1, 2, 3, 4, -100, 5])
    rows = fastloss.cross_entropy(x, t, reduction="none")
    assert np.isnan(rows[2]) and rows[4] == 0 and np.all(np.isfinite(np.delete(rows, 2)))
    assert_close(np.delete(rows, 2), np.delete(reference.cross_entropy(x, t, reduction="none"), 2),
                 rtol=LOSS_RTOL[dtype_name], atol=np.delete(loss_atol(x, t, dtype_name, reduction="none"), 2),
                 what="the other rows")
    assert np.isnan(fastloss.cross_entropy(x, t)) and np.isnan(fastloss.cross_entropy(x, t, reduction="sum"))
    _, grad = fastloss.cross_entropy_with_grad(x, t)
    g = np.asarray(grad, np.float64)
    assert np.isnan(g[2]).all() and np.all(g[4] == 0) and np.isfinite(np.delete(g, 2, axis=0)).all()
    assert np.isnan(fastloss.logsumexp(x)[2]) and np.isnan(np.asarray(fastloss.softmax(x)[2], np.float64)).all()


#: NaNs with payload bits set -- float32 0x7fc00001 (quiet), 0x7f800001 (signalling), float64
#: 0x7ff8000000000001 -- and, as controls, the default NaNs 0xffc00000 and 0x7ff8000000000000.
NAN_PAYLOADS = [("float32", 0x7FC00001), ("float32", 0x7F800001), ("float32", 0xFFC00000),
                ("float64", 0x7FF8000000000001), ("float64", 0x7FF8000000000000)]


@pytest.mark.parametrize("dtype_name,bits", NAN_PAYLOADS, ids=[f"{d}-{b:#x}" for d, b in NAN_PAYLOADS])
def test_any_nan_gives_nan(dtype_name, bits, isa):
    """Every NaN bit pattern is NaN: the loss, logsumexp, softmax and gradient of its row are
    nan, whatever the payload (NaNs from other libraries or file formats carry payloads)."""
    x = np.zeros((2, 8), dtype=dtype_name)
    x.view(f"u{x.itemsize}")[0, 3] = bits
    assert np.isnan(x[0, 3])
    t = np.array([0, 0])
    label = f"{dtype_name} NaN bits {bits:#x} isa={isa}"
    assert np.isnan(fastloss.cross_entropy(x, t, reduction="none")[0]), f"{label}: loss"
    assert np.isnan(fastloss.logsumexp(x)[0]), f"{label}: logsumexp"
    assert np.isnan(fastloss.softmax(x)[0]).all(), f"{label}: softmax {fastloss.softmax(x)[0]}"
    assert np.isnan(fastloss.cross_entropy_with_grad(x, t, reduction="sum")[1][0]).all(), f"{label}: grad"


# ---- perplexity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("ignore", [False, True], ids=["all_rows", "ignored_rows"])
def test_perplexity_is_exp_of_the_mean_cross_entropy(ignore, dtype_name, rng):
    x = _logits(rng, (5, 9, 100), get_dtype(dtype_name))
    t = _targets(rng, (5, 9), 100, -100 if ignore else None)
    got = fastloss.perplexity(x, t)
    want = reference.perplexity(x, t)
    assert_loss_type(got, x.dtype, scalar=True)
    # exp turns the absolute error of the mean CE (LOSS_RTOL * CE) into a relative one
    assert_close(got, want, rtol=LOSS_RTOL[dtype_name] * max(1.0, math.log(want)) + F32_U, what="perplexity")
    assert_close(got, np.exp(np.float64(fastloss.cross_entropy(x, t))), rtol=F32_U, what="exp(cross_entropy)")
    assert np.isnan(fastloss.perplexity(x, np.full((5, 9), -100)))


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    assert_close(fastloss.perplexity(np.zeros((4, 32000), np.float32), np.arange(4)), 32000.0, rtol=1e-6)


# ---- bad input -----------------------------------------------------------------------------------

def _bad_calls():
    x = np.zeros((5, 4))
    t = np.array([0, 1, 2, 3, 0])
    x3 = np.zeros((2, 5, 3))
    ce = fastloss.cross_entropy
    return {
        # float class indices (the rows' shape) and a float target of neither shape
        "float_target_rows_shape": (lambda: ce(x, t.astype(np.float64)), TypeError, "target"),
        "float_target_wrong_shape": (lambda: ce(x, np.zeros((5, 3))), ValueError, "target"),
        "int_target_wrong_shape": (lambda: ce(x, t[:4]), ValueError, r"target has shape \(4,\)"),
        "int_logits": (lambda: ce(x.astype(np.int64), t), TypeError, "logits"),
        "int32_logits": (lambda: ce(np.zeros((5, 4), np.int32), t), TypeError, "logits"),
        "bool_logits": (lambda: ce(np.zeros((5, 4), bool), t), TypeError, "logits"),
        "target_too_large": (lambda: ce(x, np.array([0, 1, 4, 3, 0])), IndexError,
                             r"target 4 at row 2 .*out of range for 4 classes"),
        "target_too_large_3d": (lambda: ce(np.zeros((2, 3, 4)), np.array([[0, 1, 2], [3, 9, 0]])), IndexError,
                                r"target 9 at row 4 \(target index \(1, 1\)\)"),
        "negative_target": (lambda: ce(x, np.array([0, -1, 2, 3, 0])), IndexError, "target -1 at row 1"),
        "negative_target_not_ignore_index": (lambda: ce(x, np.array([0, -100, 2, 3, 0]), ignore_index=-1),
                                             IndexError, "target -100 at row 1"),
        "target_too_large_with_grad": (lambda: fastloss.cross_entropy_with_grad(x, np.array([0, 1, 2, 3, 5])),
                                       IndexError, "target 5 at row 4"),
        "weight_too_short": (lambda: ce(x, t, weight=np.ones(3)), ValueError, "weight"),
        "weight_too_long": (lambda: ce(x, t, weight=np.ones(5)), ValueError, "weight"),
        "weight_2d": (lambda: ce(x, t, weight=np.ones((1, 4))), ValueError, "weight"),
        "sample_weight_shape": (lambda: ce(x, t, sample_weight=np.ones(4)), ValueError, "sample_weight"),
        "label_smoothing_above_1": (lambda: ce(x, t, label_smoothing=1.5), ValueError, "label_smoothing"),
        "label_smoothing_negative": (lambda: ce(x, t, label_smoothing=-0.1), ValueError, "label_smoothing"),
        "label_smoothing_nan": (lambda: ce(x, t, label_smoothing=float("nan")), ValueError, "label_smoothing"),
        "softcap_zero": (lambda: ce(x, t, softcap=0.0), ValueError, "softcap"),
        "softcap_negative": (lambda: ce(x, t, softcap=-30.0), ValueError, "softcap"),
        "softcap_inf": (lambda: ce(x, t, softcap=float("inf")), ValueError, "softcap"),
        "z_loss_negative": (lambda: ce(x, t, z_loss=-1e-4), ValueError, "z_loss"),
        "z_loss_nan": (lambda: ce(x, t, z_loss=float("nan")), ValueError, "z_loss"),
        "reduction_unknown": (lambda: ce(x, t, reduction="avg"), ValueError, "reduction"),
        "reduction_none_object": (lambda: ce(x, t, reduction=None), ValueError, "reduction"),
        "NCd1_default_axis": (lambda: ce(x3, np.zeros((2, 3), np.int64)), ValueError, "axis=1"),
        "zero_classes": (lambda: ce(np.zeros((3, 0)), np.zeros(3, np.int64)), ValueError, "0 classes"),
        # soft targets (class probabilities): tests/test_soft_targets.py
        "nll_target_out_of_range": (lambda: fastloss.nll_loss(x, np.array([0, 1, 2, 3, 4])), IndexError,
                                    "target 4 at row 4"),
        "nll_weight_length": (lambda: fastloss.nll_loss(x, t, weight=np.ones(2)), ValueError, "weight"),
        "perplexity_target_out_of_range": (lambda: fastloss.perplexity(x, np.array([0, 1, 2, 3, -2])), IndexError,
                                           "target -2 at row 4"),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_input_raises(name):
    call, exc, match = _bad_calls()[name]
    with pytest.raises(exc, match=match):
        call()


# ---- empty and degenerate reductions -------------------------------------------------------------

@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_empty_and_all_ignored(dtype_name):
    """(0, V): mean nan, sum 0, none (0,), gradient (0, V); every row ignored: mean nan (0/0),
    sum 0, gradient 0 -- as the reference."""
    x = np.zeros((0, 6), dtype=get_dtype(dtype_name))
    t = np.zeros(0, dtype=np.int64)
    assert np.isnan(fastloss.cross_entropy(x, t))
    assert fastloss.cross_entropy(x, t, reduction="sum") == 0
    none = fastloss.cross_entropy(x, t, reduction="none")
    assert none.shape == (0,) and none.dtype == loss_dtype_for(x.dtype)
    loss, grad = fastloss.cross_entropy_with_grad(x, t)
    assert np.isnan(loss) and grad.shape == (0, 6) and grad.dtype == x.dtype
    assert fastloss.logsumexp(x).shape == (0,) and fastloss.softmax(x).shape == (0, 6)
    y = np.ones((3, 6), dtype=get_dtype(dtype_name))
    ign = np.full(3, -100)
    assert np.isnan(fastloss.cross_entropy(y, ign)) and np.isnan(reference.cross_entropy(y, ign))
    assert fastloss.cross_entropy(y, ign, reduction="sum") == 0
    loss, grad = fastloss.cross_entropy_with_grad(y, ign)
    assert np.isnan(loss) and np.all(np.asarray(grad, np.float64) == 0)


# The AVX-512 forward sums a part's later blocks against the running max of its earlier ones and
# re-reads a block exactly only when an entry exceeds that max by more than ln 256 (or is +inf /
# NaN); float outputs are then formed from the largest float <= lse.  Rows whose maximum sits in
# a later block, at every distance from the earlier maxima around that threshold, on every ISA.
@pytest.mark.parametrize("jump", [0.5, 3.0, 5.4, 5.6, 8.0, 50.0, 1e4])
def test_max_in_a_later_block(isa, jump):
    rng = np.random.default_rng(int(jump * 10) + 7)
    V = 3 * 2048 + 77                          # four blocks of one part
    x = rng.standard_normal((6, V)).astype(np.float32)
    x[:, :2048] += 2.0                          # the first block holds the running max ...
    top = x[:, :2048].max(axis=1)
    cols = [2048 + 5, 2 * 2048 + 100, V - 1, V - 1, 4096, 2048]
    for r, c in enumerate(cols):                # ... a later block exceeds it by `jump`
        x[r, c] = top[r] + np.float32(jump)
    t = np.array(cols[:3] + [0, 17, V - 2])
    x64 = x.astype(np.float64)
    assert_close(fastloss.logsumexp(x), reference.logsumexp(x64), rtol=1e-6, what="logsumexp")
    # a loss lse - x[t] near 0 cancels: its error is that of lse (float32 rounding of ~|lse|)
    lse = reference.logsumexp(x64)
    assert_close(fastloss.cross_entropy(x, t, reduction="none"),
                 reference.cross_entropy(x64, t, reduction="none"), rtol=1e-6, atol=1e-6 * (np.abs(lse) + 1),
                 what="loss")
    p = reference.softmax(x64)
    assert_close(fastloss.softmax(x), p, rtol=2e-5, atol=1e-12, what="softmax")
    assert_close(fastloss.log_softmax(x), reference.log_softmax(x64), rtol=1e-6, atol=2e-6, what="log_softmax")
    _, g = fastloss.cross_entropy_with_grad(x, t, reduction="sum")
    # the target's entry p - 1 cancels: its error is that of p (terms of size 1), hence the atol
    assert_close(g, reference.cross_entropy_grad(x64, t, reduction="sum"), rtol=2e-5, atol=1e-6, what="grad")
    assert np.all(fastloss.softmax(x) <= 1.0)
