"""Elementwise losses on probabilities and scores: binary cross-entropy (on probabilities and
on logits), sigmoid focal loss, binary hinge loss and KL divergence, with their gradients.

Semantics follow ``torch.nn.functional`` (``binary_cross_entropy``,
``binary_cross_entropy_with_logits``, ``kl_div``) and ``torchvision.ops.sigmoid_focal_loss``,
with these documented choices:

* ``target``, ``weight`` and ``pos_weight`` are broadcast to the shape of ``input`` (torch
  requires ``target`` to have ``input``'s size for the BCE losses; we allow broadcasting, as
  our regression losses do).  ``pos_weight`` broadcasts against the last axis, as in torch.
* ``reduction="mean"`` with ``weight`` divides by the number of elements, NOT by the sum of
  the weights (torch's rule for these losses; our regression losses use a weighted mean).
* the loss is float64 for float64 input and float32 otherwise; float16/bfloat16/float32 are
  computed in float32 (float64 in double), sums are accumulated in double; the gradient has
  ``input``'s dtype.
* the gradient returned by ``*_with_grad`` is that of ``loss.sum()`` with respect to
  ``input``; ``grad_out`` receives it and may be ``input`` itself (in place).
* the math runs in C (src_c/elem_ops.h) with our own vectorized exp/log/log1p (within
  2.5 ulp, see src_c/fl_math.h), so values differ from torch's in the last bits.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from fastloss import _core
from fastloss._config import resolve_num_threads
from fastloss._validation import (as_float_array, broadcast_operand, check_grad_out, is_python_scalar,
                                  result_float_dtype)

__all__ = [
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "sigmoid_focal_loss", "hinge_loss", "kl_div",
    "binary_cross_entropy_with_grad", "binary_cross_entropy_with_logits_with_grad",
    "sigmoid_focal_loss_with_grad", "hinge_loss_with_grad", "kl_div_with_grad",
]


def _check_real(value, name: str, *, minimum: float | None = None) -> float:
    """A finite real number (bool excluded), >= minimum when given."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or (minimum is not None and v < minimum):
        bound = "" if minimum is None else f" and >= {minimum:g}"
        raise ValueError(f"{name} must be finite{bound}, got {value!r}")
    return v


def _check_reduction(reduction, allowed=("mean", "sum", "none")) -> str:
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(f"reduction must be one of {', '.join(repr(a) for a in allowed)}; got {reduction!r}")
    return reduction


class _Prepared:
    __slots__ = ("x", "t", "w", "pw", "arrays", "shape", "grad_dtype", "loss_dtype", "reduction", "nthreads")


def _prepare(input, target, weight, pos_weight, reduction, num_threads, allowed=("mean", "sum", "none")):
    p = _Prepared()
    x = as_float_array(input, "input")
    t = as_float_array(target, "target")
    w = None if weight is None else as_float_array(weight, "weight")
    pw = None if pos_weight is None else as_float_array(pos_weight, "pos_weight")
    p.arrays = {"input": x, "target": t, "weight": w, "pos_weight": pw}
    p.reduction = _check_reduction(reduction, allowed)
    p.grad_dtype = x.dtype
    # NumPy 2 promotion: Python scalars are weak (they take the arrays' dtype)
    strong = [a.dtype for a, v in ((t, target), (w, weight), (pw, pos_weight))
              if a is not None and not is_python_scalar(v)]
    dt = result_float_dtype(x.dtype, *strong)
    with np.errstate(over="ignore"):
        x, t = x.astype(dt, copy=False), t.astype(dt, copy=False)
        w = None if w is None else w.astype(dt, copy=False)
        pw = None if pw is None else pw.astype(dt, copy=False)
    p.shape = x.shape
    p.x = x
    p.t = broadcast_operand(t, p.shape, "target")
    p.w = None if w is None else broadcast_operand(w, p.shape, "weight")
    p.pw = None if pw is None else broadcast_operand(pw, p.shape, "pos_weight")
    p.loss_dtype = np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)
    p.nthreads = resolve_num_threads(num_threads)
    return p


# ---- domain checks (BCE: probabilities in [0, 1]; hinge: targets -1 or +1) --------------------

def _first_bad(a: np.ndarray, ok) -> float | None:
    """The first value of `a` (in C order) for which ok() is False, or None."""
    v = np.asarray(a, dtype=np.float64)
    bad = ~ok(v)
    return float(v[bad].flat[0]) if bad.any() else None


def _in_unit(a):
    return (a >= 0) & (a <= 1)


def _is_sign(a):
    return (a == 1) | (a == -1)


def _domain_error(op: str, p: _Prepared):
    """The ValueError for an element outside the loss's domain (raised after the kernel counted it)."""
    if op == "bce":
        for name, arr in (("input", p.x), ("target", p.t)):
            v = _first_bad(arr, _in_unit)
            if v is not None:
                what = "probabilities" if name == "input" else "targets"
                return ValueError(f"{name} must hold {what} in [0, 1] (as torch); found {v!r}")
    if op == "hinge":
        v = _first_bad(p.t, _is_sign)
        if v is not None:
            return ValueError(f"target of hinge_loss must be exactly -1 or +1; found {v!r}")
    return RuntimeError(f"{op} kernel reported elements outside the domain; please report this as a bug")


def _precheck(op: str, p: _Prepared):
    """Before writing into a caller's buffer: the same domain checks, in NumPy."""
    if op in ("bce", "hinge"):
        bad = (_first_bad(p.x, _in_unit) is not None or _first_bad(p.t, _in_unit) is not None) if op == "bce" \
            else _first_bad(p.t, _is_sign) is not None
        if bad:
            raise _domain_error(op, p)


# ---- the driver ---------------------------------------------------------------------------------

def _divisor(p: _Prepared) -> float:
    if p.reduction == "sum":
        return 1.0
    if p.reduction == "batchmean":
        return float(p.shape[0]) if len(p.shape) else 1.0
    return float(math.prod(p.shape))  # "mean": torch divides by numel, also with weights


def _run(op, param, param2, p: _Prepared, with_grad: bool, grad_out=None):
    n = math.prod(p.shape)
    g = None
    result = None
    if with_grad:
        if grad_out is not None:
            inputs = {k: v for k, v in p.arrays.items() if v is not None}
            result = check_grad_out(grad_out, p.shape, p.grad_dtype, inputs)
            _precheck(op, p)
        else:
            result = np.empty(p.shape, dtype=p.grad_dtype)
        g = result if result.dtype == p.x.dtype else np.empty(p.shape, dtype=p.x.dtype)
    nred = p.x.ndim
    if p.reduction == "none":
        e = np.empty(p.shape, dtype=p.loss_dtype)
        nbad = 0
        if n:
            nbad = _core.pointwise(op, param, p.x, p.t, p.w, g, e, nred, None, None, np.ones(1), p.nthreads,
                                   param2, p.pw)
        loss = e
    else:
        div = _divisor(p)
        swl, sw = np.zeros(1), np.zeros(1)
        nbad = 0
        if n:
            scale = np.array([1.0 / div]) if div else np.array([math.inf])
            nbad = _core.pointwise(op, param, p.x, p.t, p.w, g, None, nred, swl, sw, scale, p.nthreads,
                                   param2, p.pw)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            loss = p.loss_dtype.type(np.float64(swl[0]) / div)
    if nbad:
        raise _domain_error(op, p)
    if not with_grad:
        return loss
    if g is not result:
        np.copyto(result, g, casting="unsafe")
    return loss, result


# ---- public API ---------------------------------------------------------------------------------

def binary_cross_entropy(input, target, *, weight=None, reduction="mean", num_threads=None):
    p = _prepare(input, target, weight, None, reduction, num_threads)
    return _run("bce", 0.0, 0.0, p, False)


def binary_cross_entropy_with_grad(input, target, *, weight=None, reduction="mean", num_threads=None,
                                   grad_out=None):
    p = _prepare(input, target, weight, None, reduction, num_threads)
    return _run("bce", 0.0, 0.0, p, True, grad_out)


def binary_cross_entropy_with_logits(input, target, *, weight=None, pos_weight=None, reduction="mean",
                                     num_threads=None):
    p = _prepare(input, target, weight, pos_weight, reduction, num_threads)
    return _run("bce_logits", 0.0, 0.0, p, False)


def binary_cross_entropy_with_logits_with_grad(input, target, *, weight=None, pos_weight=None, reduction="mean",
                                               num_threads=None, grad_out=None):
    p = _prepare(input, target, weight, pos_weight, reduction, num_threads)
    return _run("bce_logits", 0.0, 0.0, p, True, grad_out)


def sigmoid_focal_loss(input, target, *, alpha=0.25, gamma=2.0, reduction="mean", num_threads=None):
    alpha = _check_real(alpha, "alpha")
    gamma = _check_real(gamma, "gamma", minimum=0.0)
    p = _prepare(input, target, None, None, reduction, num_threads)
    return _run("focal", gamma, alpha, p, False)


def sigmoid_focal_loss_with_grad(input, target, *, alpha=0.25, gamma=2.0, reduction="mean", num_threads=None,
                                 grad_out=None):
    alpha = _check_real(alpha, "alpha")
    gamma = _check_real(gamma, "gamma", minimum=0.0)
    p = _prepare(input, target, None, None, reduction, num_threads)
    return _run("focal", gamma, alpha, p, True, grad_out)


def hinge_loss(input, target, *, margin=1.0, reduction="mean", num_threads=None):
    margin = _check_real(margin, "margin")
    p = _prepare(input, target, None, None, reduction, num_threads)
    return _run("hinge", margin, 0.0, p, False)


def hinge_loss_with_grad(input, target, *, margin=1.0, reduction="mean", num_threads=None, grad_out=None):
    margin = _check_real(margin, "margin")
    p = _prepare(input, target, None, None, reduction, num_threads)
    return _run("hinge", margin, 0.0, p, True, grad_out)


def _kl_op(log_target) -> str:
    if not isinstance(log_target, (bool, np.bool_)):
        raise TypeError(f"log_target must be a bool, got {type(log_target).__name__}")
    return "kl_log_target" if log_target else "kl"


_KL_REDUCTIONS = ("mean", "batchmean", "sum", "none")


def kl_div(input, target, *, reduction="mean", log_target=False, num_threads=None):
    op = _kl_op(log_target)
    p = _prepare(input, target, None, None, reduction, num_threads, _KL_REDUCTIONS)
    return _run(op, 0.0, 0.0, p, False)


def kl_div_with_grad(input, target, *, reduction="mean", log_target=False, num_threads=None, grad_out=None):
    op = _kl_op(log_target)
    p = _prepare(input, target, None, None, reduction, num_threads, _KL_REDUCTIONS)
    return _run(op, 0.0, 0.0, p, True, grad_out)


# ---- docstrings ---------------------------------------------------------------------------------

_COMMON = """
    Parameters
    ----------
    input : array_like
        {input}; float16, float32, float64 or bfloat16 (``ml_dtypes``).  Any strides,
        read-only arrays and memmaps are used without a copy.
    target : array_like
        {target}  Broadcastable to ``input.shape``.
{extra}    reduction : {reductions}
        ``"mean"`` divides the sum by ``input.size`` (with ``weight`` too, as torch){batchmean};
        ``"none"`` returns the elementwise loss with ``input``'s shape.  Empty input: ``"mean"``
        gives nan, ``"sum"`` 0, ``"none"`` an empty array (as torch).
    num_threads : int, optional
        OpenMP threads (None: :func:`fastloss.get_num_threads`; -1: all cores).  The result
        is bitwise identical for every thread count.

    Returns
    -------
    loss : numpy.float32 or numpy.float64 scalar (array for ``"none"``)
        float64 for float64 input, float32 otherwise; summed in float64.

    The ``_with_grad`` variant returns ``(loss, grad)``, ``grad`` being the gradient of
    ``loss.sum()`` with respect to ``input`` (``input``'s shape and dtype), computed in the
    same pass.  ``grad_out`` (an array of that shape and dtype) receives it instead of a new
    array; it may be ``input`` itself (in place) but must not overlap the other operands.
"""

_WEIGHT = """    weight : array_like, optional
        Per-element weights broadcastable to ``input.shape``; multiplies the loss of each
        element (and its gradient).
"""


def _document(func, grad_func, title, formula, notes, example, *, input, target, extra="",
              reductions='{"mean", "sum", "none"}', batchmean=""):
    common = _COMMON.format(input=input, target=target, extra=extra, reductions=reductions, batchmean=batchmean)
    func.__doc__ = f"""{title}

    {formula}
{notes}{common}
    Examples
    --------
{example}
    """
    grad_func.__doc__ = (f"``{func.__name__}`` and its gradient in one pass: returns ``(loss, grad)``.\n\n"
                         f"    See :func:`fastloss.{func.__name__}` for the formula and arguments.\n")


_document(
    binary_cross_entropy, binary_cross_entropy_with_grad,
    "Binary cross-entropy on probabilities, ``torch.nn.functional.binary_cross_entropy``.",
    "loss_i = -w_i (t_i max(log x_i, -100) + (1 - t_i) max(log(1 - x_i), -100));\n"
    "    gradient w_i (x_i - t_i) / max(x_i (1 - x_i), 1e-12)",
    "\n    Each log is clamped at -100 as in torch, so probabilities of exactly 0 and 1 give finite\n"
    "    losses (100 per confidently wrong element) and finite gradients (+-1e12).  Input or target\n"
    "    outside [0, 1], or NaN, raises ValueError (torch raises too); with ``grad_out`` this is\n"
    "    checked before anything is written, otherwise in the same pass as the loss.\n",
    "    >>> import numpy as np, fastloss\n"
    "    >>> fastloss.binary_cross_entropy(np.array([0.9, 0.2]), np.array([1.0, 0.0]))\n"
    "    np.float64(0.16425203348601802)",
    input="Probabilities in [0, 1]", target="Probabilities in [0, 1] (usually 0 or 1).", extra=_WEIGHT)
_document(
    binary_cross_entropy_with_logits, binary_cross_entropy_with_logits_with_grad,
    "Binary cross-entropy on logits, ``torch.nn.functional.binary_cross_entropy_with_logits``.",
    "loss_i = w_i ((1 - t_i) softplus(x_i) + pw_i t_i softplus(-x_i));\n"
    "    gradient w_i ((1 - t_i) sigmoid(x_i) - pw_i t_i sigmoid(-x_i))",
    "\n    This is torch's ``(1 - t) x - (1 + (pw - 1) t) log sigmoid(x)`` written without\n"
    "    cancellation (softplus(z) = max(z, 0) + log1p(exp(-|z|))): exact at logits of +-1e4.\n",
    "    >>> import numpy as np, fastloss\n"
    "    >>> fastloss.binary_cross_entropy_with_logits(np.array([2.0, -1.0]), np.array([1.0, 0.0]))\n"
    "    np.float64(0.2200948492805977)",
    input="Logits (any real)", target="Targets in [0, 1] (not checked, as torch).",
    extra=_WEIGHT + """    pos_weight : array_like, optional
        Weight pw of the positive term, broadcast against the last axis of ``input`` (e.g.
        one per class, shape ``(C,)``), as in torch.
""")
_document(
    sigmoid_focal_loss, sigmoid_focal_loss_with_grad,
    "Sigmoid focal loss (Lin et al. 2017), ``torchvision.ops.sigmoid_focal_loss``.",
    "p = sigmoid(x), ce = bce_with_logits(x, t), p_t = p t + (1 - p)(1 - t),\n"
    "    loss = alpha_t ce (1 - p_t)^gamma,  alpha_t = alpha t + (1 - alpha)(1 - t) (1 if alpha < 0)",
    "\n    Unlike torchvision, whose default is ``reduction=\"none\"``, the default here is ``\"mean\"``\n"
    "    (as the other losses).  Where 1 - p_t is exactly 0 the gradient's (1 - p_t)^(gamma - 1)\n"
    "    term is taken as its limit 0 (torch's autograd gives NaN there for gamma < 1).\n"
    "    alpha : float\n        Weight of the positive class, usually in [0, 1] (not checked, as torchvision:\n"
    "        alpha_t = alpha t + (1 - alpha)(1 - t)); negative: no weighting.\n"
    "    gamma : float >= 0\n        Focusing exponent.\n",
    "    >>> import numpy as np, fastloss\n"
    "    >>> fastloss.sigmoid_focal_loss(np.array([2.0, -1.0]), np.array([1.0, 0.0]))\n"
    "    np.float64(0.0087222169200803)",
    input="Logits (any real)", target="Targets in [0, 1] (binary labels; not checked, as torchvision).")
_document(
    hinge_loss, hinge_loss_with_grad,
    "Binary hinge loss (SVM): ``max(0, margin - y s)`` for labels y in {-1, +1}.",
    "loss_i = max(0, margin - t_i x_i);  gradient -t_i where margin - t_i x_i > 0, else 0",
    "\n    torch has no binary hinge loss (``hinge_embedding_loss`` is a different loss); this is\n"
    "    scikit-learn's ``hinge_loss`` per element.  Targets other than exactly -1 or +1 raise\n"
    "    ValueError.\n"
    "    margin : float\n        The margin (finite).\n",
    "    >>> import numpy as np, fastloss\n"
    "    >>> fastloss.hinge_loss(np.array([2.0, 0.5, -0.5]), np.array([1.0, 1.0, 1.0]))\n"
    "    np.float64(0.6666666666666666)",
    input="Scores (any real)", target="Labels, exactly -1 or +1.")
_document(
    kl_div, kl_div_with_grad,
    "Kullback-Leibler divergence, ``torch.nn.functional.kl_div`` (input = log-probabilities).",
    "loss_i = xlogy(t_i, t_i) - t_i x_i  (0 where t_i == 0);  log_target: exp(t_i) (t_i - x_i);\n"
    "    gradient -t_i  (log_target: -exp(t_i))",
    "\n    log_target : bool\n        ``target`` holds log-probabilities.\n",
    "    >>> import numpy as np, fastloss\n"
    "    >>> fastloss.kl_div(np.log(np.array([[0.5, 0.5]])), np.array([[0.9, 0.1]]), reduction='batchmean')\n"
    "    np.float64(0.368064207168497)",
    input="Log-probabilities", target="Probabilities (log-probabilities with ``log_target=True``).",
    reductions='{"mean", "batchmean", "sum", "none"}',
    batchmean=';\n        ``"batchmean"`` divides it by ``input.shape[0]`` (the KL divergence per sample)')
