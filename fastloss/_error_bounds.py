"""Error bounds of every public function against the float64 reference (``fastloss.reference``).

Used through the registry (``LossSpec.tolerance`` / ``FunctionSpec.tolerance``): the tests
call ``spec.tolerance(dtype_name, args, kwargs)`` for one call and get a :class:`Tolerance`,
i.e. ``|got - expected| <= atol + rtol * |expected|`` elementwise for the value and the
gradient (``atol`` may be an array: a bound per element).

Regression losses (``TOLERANCES``, by the input dtype)
    loss: sums accumulated in double and rounded once (a few float32 ulp);
    elem: elementwise outputs are one rounding of a double;
    grad: one rounding into the input dtype, plus the double summation error of the divisor
    where the gradient is divided by a reduced quantity (weighted mean, rmse).

Cross-entropy family (``CE_TOLERANCES``; the model of tests/test_cross_entropy.py)
    float64 logits are computed in double; float32, float16 and bfloat16 logits in float32
    (u = 2**-24) with an exp within a few ulp and lse in double.
    * loss: ``loss`` relative, plus per row ``loss`` (and 4u |lse|, the rounding of
      m + log(sum)) times the row's factor of lse, s ((1 - ls) w_y + ls W / V + 2 z w_y |lse|)
      for class indices, s (sum |t| + 2 z |lse|) for probabilities: the error of lse is
      absolute, which bounds rows whose loss is ~0.
    * gradient element j of a row, s (coef q_j - t_j) f_j, is bounded by
      ``compute`` P_j f_j + u (|x_j| + 2 |lse|) P_j f_j + flush s |coef| (+ 8u P_j with softcap)
      with P_j = s (|coef| q_j + |t_j|), plus one rounding into the logits' dtype.
    * log_softmax / softmax: the gradient model with P = |x - lse| + |lse| / the probability
      (log_softmax: plus a few u absolute, the error of log of the sum; softmax: probabilities
      below ``flush`` may be 0);
      logsumexp: the loss model of one row with unit factor; nll_loss: exact gathers summed in
      double; perplexity: exp turns the absolute error of the mean cross-entropy into a
      relative one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

F32_ULP = 2.0 ** -23
#: Relative tolerances vs. the float64 reference, by the dtype of the INPUT (regression losses).
#: grad_atol: an absolute floor in the dtype's subnormal range (float64: 4 subnormals, since
#: the reference rounds twice there: w * d, then / sum(w)).
TOLERANCES = {
    "float64": {"loss": 1e-12, "elem": 1e-15, "grad": 1e-15, "grad_atol": 4 * 2.0 ** -1074},
    "float32": {"loss": 4 * F32_ULP, "elem": F32_ULP, "grad": F32_ULP, "grad_atol": 1e-45},
    "float16": {"loss": 4 * F32_ULP, "elem": F32_ULP, "grad": 2.0 ** -11, "grad_atol": 2.0 ** -24},
    "bfloat16": {"loss": 4 * F32_ULP, "elem": F32_ULP, "grad": 2.0 ** -8, "grad_atol": 1e-38},
}
#: Sums are accumulated in double for every input dtype: a quantity derived from a sum (the
#: divisor of a weighted mean, the root of rmse) carries the float64 summation error.
DOUBLE_SUM_RTOL = TOLERANCES["float64"]["loss"]

_F32_U = 2.0 ** -24
#: Cross-entropy family, by the dtype of the logits: "loss" and "compute" are the relative
#: errors of the float32 (float64) computation, "u" its unit roundoff, "flush" where exp
#: flushes to 0; "grad" / "grad_atol": one rounding into the logits' dtype (as TOLERANCES).
CE_TOLERANCES = {
    name: {"loss": 1e-12 if name == "float64" else 1e-5, "compute": 1e-12 if name == "float64" else 1e-5,
           "u": 2.0 ** -53 if name == "float64" else _F32_U,
           "flush": 2.0 ** -1022 if name == "float64" else 2.0 ** -126,
           "grad": TOLERANCES[name]["grad"], "grad_atol": TOLERANCES[name]["grad_atol"]}
    for name in TOLERANCES
}


@dataclass(frozen=True)
class Tolerance:
    """|got - expected| <= atol + rtol * |expected| for the value ("loss": the loss, or the
    function's result) and for the gradient of the ``_with_grad`` twin."""
    loss_rtol: float
    loss_atol: object        # float or an array of the result's shape
    grad_rtol: float = 0.0
    grad_atol: object = 0.0


def _loss_dtype(dtype_name: str) -> np.dtype:
    return np.dtype(np.float64) if dtype_name == "float64" else np.dtype(np.float32)


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _clean(a):
    """Bounds computed from inf/nan inputs: where the expected value is inf or nan the
    comparison is exact (assert_close matches nan with nan and inf with the same inf)."""
    return np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)


# ---- regression -------------------------------------------------------------------------------

def regression_tolerance(spec, dtype_name, args, kw) -> Tolerance:
    t = TOLERANCES[dtype_name]
    reduction = kw.get("reduction", "mean")
    weighted = args.get("weight") is not None
    mean_divides_by_a_sum = reduction == "mean" and (weighted or "reduction" not in spec.option_kinds)  # rmse
    return Tolerance(
        loss_rtol=t["elem"] if reduction == "none" else t["loss"],
        # a float32 result of a tiny double underflows
        loss_atol=float(np.finfo(_loss_dtype(dtype_name)).smallest_subnormal),
        grad_rtol=t["grad"] + (DOUBLE_SUM_RTOL if mean_divides_by_a_sum else 0.0),
        grad_atol=t["grad_atol"])


# ---- cross-entropy family ---------------------------------------------------------------------

def _rows_last(a, axis):
    return np.moveaxis(_f64(a), axis, -1)


def _is_soft(logits, target) -> bool:
    t = np.asarray(target)
    return t.shape == np.shape(logits) and (t.dtype.kind == "f" or t.dtype.name == "bfloat16")


def _ce_terms(logits, target, *, weight=None, sample_weight=None, ignore_index=-100, reduction="mean",
              label_smoothing=0.0, z_loss=0.0, softcap=None, axis=-1):
    """float64 quantities of the error model, class axis last: the row factor s (incl. 1 / the
    mean's denominator), the row's target distribution tgt (rows..., V), coef = sum(tgt) + 2 z
    w_y lse, the capped logits xc, f = 1 - tanh**2 (or None), p = softmax(xc), lse, and the
    loss factor of lse per row."""
    from fastloss import reference

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        x = _rows_last(logits, axis)
        V, rows = x.shape[-1], x.shape[:-1]
        w = np.ones(V) if weight is None else _f64(weight)
        s = np.ones(rows) if sample_weight is None else np.broadcast_to(_f64(sample_weight), rows).copy()
        ls, z = float(label_smoothing), float(z_loss)
        if softcap is None:
            xc, f = x, None
        else:
            th = np.tanh(x / softcap)
            xc, f = softcap * th, 1.0 - th * th
        p = reference.softmax(xc) if x.size else np.zeros(x.shape)
        lse = reference.logsumexp(xc) if x.size else np.zeros(rows)
        xa = np.abs(xc)
        lse_bound = np.max(xa, axis=-1, initial=0.0, where=np.isfinite(xa)) + math.log(max(V, 1))
        if _is_soft(logits, target):
            q = _rows_last(target, axis)
            tgt = w * ((1 - ls) * q + ls / V)
            den = float(np.sum(s))
            wy = np.ones(rows)
            lse_factor = s * (np.sum(np.abs(tgt), axis=-1) + 2 * z * lse_bound)
        else:
            t = np.asarray(target).reshape(rows)
            valid = t != ignore_index
            y = np.where(valid, t, 0).astype(np.int64)
            s = np.where(valid, s, 0.0)
            wy = w[y]
            den = float(np.sum(s * wy))
            tgt = (1 - ls) * wy[..., None] * (np.arange(V) == y[..., None]) + ls / V * w
            lse_factor = s * ((1 - ls) * wy + ls * np.sum(w) / V + 2 * z * wy * lse_bound)
        if reduction == "mean":
            scale = 1.0 / den if den != 0 else 0.0
            s, lse_factor = s * scale, lse_factor * scale
        coef = np.sum(tgt, axis=-1) + 2 * z * wy * lse
    return {"s": s, "tgt": tgt, "coef": coef, "xc": xc, "f": f, "p": p, "lse": lse, "lse_factor": lse_factor,
            "lse_bound": lse_bound}


def _ce_loss_atol(T, c, reduction):
    per_row = T["lse_factor"] * (c["loss"] + 4 * c["u"] * T["lse_bound"])
    return _clean(per_row) if reduction == "none" else float(np.sum(_clean(per_row)))


def _ce_grad_atol(T, c, axis, softcap):
    with np.errstate(invalid="ignore", over="ignore"):
        s = T["s"][..., None]
        coef = np.abs(T["coef"])[..., None]
        P = s * (coef * T["p"] + np.abs(T["tgt"]))
        f = 1.0 if T["f"] is None else T["f"]
        rel = c["compute"] + c["u"] * (np.abs(T["xc"]) + 2 * np.abs(T["lse"])[..., None])
        tol = rel * P * f + c["flush"] * s * coef
        if softcap is not None:
            tol = tol + 8 * c["u"] * P
    return np.moveaxis(_clean(tol), -1, axis) + c["grad_atol"]


def cross_entropy_tolerance(spec, dtype_name, args, kw) -> Tolerance:
    c = CE_TOLERANCES[dtype_name]
    opts = {k: v for k, v in kw.items() if k != "num_threads"}
    opts.update({k: args[k] for k in ("weight", "sample_weight") if args.get(k) is not None})
    reduction = opts.get("reduction", "mean")
    T = _ce_terms(args["logits"], args["target"], **opts)
    return Tolerance(loss_rtol=c["loss"], loss_atol=_ce_loss_atol(T, c, reduction),
                     grad_rtol=c["grad"], grad_atol=_ce_grad_atol(T, c, opts.get("axis", -1), opts.get("softcap")))


def perplexity_tolerance(spec, dtype_name, args, kw) -> Tolerance:
    """exp(mean CE): the absolute error e of the mean cross-entropy becomes the relative error
    e of the perplexity, plus the rounding of the result."""
    from fastloss import reference

    c = CE_TOLERANCES[dtype_name]
    opts = {k: v for k, v in kw.items() if k != "num_threads"}
    T = _ce_terms(args["logits"], args["target"], **opts)
    with np.errstate(invalid="ignore", over="ignore"):
        ce = abs(float(reference.cross_entropy(args["logits"], args["target"], **opts)))
    err = _ce_loss_atol(T, c, "mean") + c["loss"] * (ce if math.isfinite(ce) else 0.0)
    return Tolerance(loss_rtol=err + 2 * F32_ULP if dtype_name != "float64" else err + 1e-15, loss_atol=0.0)


def nll_tolerance(spec, dtype_name, args, kw) -> Tolerance:
    """Gathered elements summed in double: one rounding per row ("none"), the double summation
    error of the sum (mixed signs: relative to the sum of magnitudes) and the result's rounding."""
    t = TOLERANCES[dtype_name]
    reduction = kw.get("reduction", "mean")
    if reduction == "none":
        return Tolerance(loss_rtol=t["elem"], loss_atol=float(np.finfo(_loss_dtype(dtype_name)).smallest_subnormal))
    x = _f64(args["log_probs"])
    tgt = np.asarray(args["target"]).reshape(-1)
    ii = kw.get("ignore_index", -100)
    V = x.shape[-1] if x.ndim else 1
    valid = tgt != ii
    y = np.where(valid, tgt, 0)
    w = np.ones(V) if args.get("weight") is None else _f64(args["weight"])
    with np.errstate(invalid="ignore", over="ignore"):
        picked = np.take_along_axis(x.reshape(-1, V), y[:, None], axis=1)[:, 0] if x.size else np.zeros(0)
        mag = float(np.sum(np.where(valid, np.abs(w[y] * picked), 0.0)))
        den = float(np.sum(np.where(valid, w[y], 0.0)))
    if reduction == "mean":
        mag = mag / den if den else 0.0
    atol = _clean(1e-15 * max(1, tgt.size) * mag) + float(np.finfo(_loss_dtype(dtype_name)).smallest_subnormal)
    return Tolerance(loss_rtol=t["loss"], loss_atol=atol)


def _softmax_terms(x, axis):
    from fastloss import reference

    with np.errstate(invalid="ignore", over="ignore"):
        xr = _rows_last(x, axis)
        lse = reference.logsumexp(xr) if xr.size else np.zeros(xr.shape[:-1])
        return xr, lse[..., None]


def softmax_tolerance(spec, dtype_name, args, kw) -> Tolerance:
    """log_softmax and softmax: relative error compute + u (|x| + 2 |lse|) of the scale of the
    result (|x| + |lse| for log_softmax, the probability for softmax), plus one rounding into
    the input dtype."""
    from fastloss import reference

    c = CE_TOLERANCES[dtype_name]
    axis = kw.get("axis", -1)
    xr, lse = _softmax_terms(args["x"], axis)
    with np.errstate(invalid="ignore", over="ignore"):
        rel = c["compute"] + c["u"] * (np.abs(xr) + 2 * np.abs(lse))
        if spec.name == "log_softmax":
            scale = np.abs(xr) + np.abs(lse)
        else:
            scale = _rows_last(reference.softmax(args["x"], axis=axis), axis) if xr.size else np.zeros(xr.shape)
        atol = np.moveaxis(_clean(rel * scale), -1, axis) + c["grad_atol"]
        if spec.name == "log_softmax":
            # log S of the compute-type sum S >= 1 has an absolute error of a few u
            # (x = [0, -6] in float32: -log(1 + e^-6) is off by 3.3e-8, as in torch)
            atol = atol + 8 * c["u"]
        if spec.name == "softmax":
            atol = atol + c["flush"]               # probabilities below it are flushed to 0
    return Tolerance(loss_rtol=c["grad"], loss_atol=atol)


def logsumexp_tolerance(spec, dtype_name, args, kw) -> Tolerance:
    """lse = m + log(sum exp(x - m)): an absolute error of `loss` plus the rounding of m + log
    (4u |lse|), and the rounding of the float32 result."""
    c = CE_TOLERANCES[dtype_name]
    xr, lse = _softmax_terms(args["x"], kw.get("axis", -1))
    with np.errstate(invalid="ignore", over="ignore"):
        atol = _clean(c["loss"] + 4 * c["u"] * np.abs(lse[..., 0]))
    return Tolerance(loss_rtol=F32_ULP if dtype_name != "float64" else 1e-15, loss_atol=atol)


# ---- the other losses of the field (issue 6) ---------------------------------------------------

#: Normwise bounds of the losses of issue 6 (elementwise, margin, distillation, sequence), by the
#: dtype of the first operand.  Those computed in float32 (float16/bfloat16/float32 inputs; exp,
#: log and log1p of our own within a few ulp, sums in double) get a relative "compute" error of
#: the value; float64 inputs are computed in double.  Gradients: "compute" relative to the largest
#: |gradient| of the call (normwise: elementwise relative errors of gradients that cancel to ~0
#: mean nothing), plus one rounding into the input's dtype.  Per-loss modules test tighter
#: elementwise bounds where the loss has a model (tests/test_elementwise_losses.py, ...).
FIELD_TOLERANCES = {
    "float64": {"compute": 1e-10, "round": 2.0 ** -53},
    "float32": {"compute": 2e-5, "round": 2.0 ** -24},
    "float16": {"compute": 2e-5, "round": 2.0 ** -11},
    "bfloat16": {"compute": 2e-5, "round": 2.0 ** -8},
}


def field_tolerance(spec, dtype_name, args, kw, expected_grads=()) -> Tolerance:
    """|value - expected| <= compute |expected| + compute max|expected| (the value of a
    reduction="none" call is an array); each gradient within (compute + round) |expected| +
    compute max |expected| of that gradient (the max is taken by the caller: grad_atol is a
    factor here, multiplied by max |expected gradient| in tests/test_field_losses.py)."""
    t = FIELD_TOLERANCES[dtype_name]
    return Tolerance(loss_rtol=t["compute"], loss_atol=t["compute"],
                     grad_rtol=t["compute"] + t["round"], grad_atol=t["compute"])
