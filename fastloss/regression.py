"""Regression losses: MSE, L1 (MAE), Huber, smooth L1 and RMSE, with their gradients.

Semantics follow ``torch.nn.functional`` (same names, same formulas, same
``reduction`` values) with NumPy conventions for arrays (``axis=``) and these
documented choices:

* ``target`` and ``weight`` are broadcast to the shape of ``input`` (never the
  other way round: the gradient has the shape of ``input``).
* ``weight`` multiplies the elementwise loss; ``reduction="mean"`` divides by the
  sum of the weights (a weighted mean), not by the element count as torch's
  ``weight=`` does.
* mixed float dtypes are promoted as NumPy does (one copy of the narrower array);
  the gradient is returned in ``input``'s dtype.
* the loss is float64 for float64 input and float32 otherwise (float16/bfloat16/
  float32 are computed in double internally); the gradient has ``input``'s dtype.
* the gradient returned by ``*_with_grad`` is that of ``loss.sum()``: for a scalar
  loss, the gradient of the loss itself; for ``reduction="none"`` or an ``axis``
  reduction, each output contributes with unit weight.
"""
from __future__ import annotations

import math

import numpy as np

from fastloss import _core
from fastloss._config import resolve_num_threads
from fastloss._validation import (as_float_array, broadcast_operand, check_grad_out, check_positive,
                                  check_reduction, is_python_scalar, normalize_axis, result_float_dtype)

__all__ = [
    "mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss", "rmse", "mse", "mae",
    "mse_loss_with_grad", "l1_loss_with_grad", "huber_loss_with_grad", "smooth_l1_loss_with_grad",
    "rmse_with_grad",
]


class _Prepared:
    """Arguments of one call, checked, broadcast and transposed (reduced axes last)."""

    __slots__ = ("x", "t", "w", "arrays", "shape", "grad_dtype", "loss_dtype", "perm", "nred", "out_shape",
                 "n_out", "scalar", "reduction", "nthreads")


def _prepare(input, target, weight, reduction, axis, num_threads) -> _Prepared:
    p = _Prepared()
    x = as_float_array(input, "input")
    t = as_float_array(target, "target")
    w = None if weight is None else as_float_array(weight, "weight")
    p.arrays = {"input": x, "target": t, "weight": w}
    p.reduction = check_reduction(reduction)
    p.grad_dtype = x.dtype
    # NumPy 2 promotion: Python scalars are weak (they take the arrays' dtype)
    strong = [a.dtype for a, v in ((t, target), (w, weight)) if a is not None and not is_python_scalar(v)]
    dt = result_float_dtype(x.dtype, *strong)
    with np.errstate(over="ignore"):
        x, t = x.astype(dt, copy=False), t.astype(dt, copy=False)
        w = None if w is None else w.astype(dt, copy=False)
    p.shape = x.shape
    t = broadcast_operand(t, p.shape, "target")
    w = None if w is None else broadcast_operand(w, p.shape, "weight")
    if p.reduction == "none" and axis is not None:
        raise ValueError("axis cannot be combined with reduction='none'")
    axes = normalize_axis(axis, x.ndim)
    keep = tuple(d for d in range(x.ndim) if d not in axes)
    p.perm = keep + axes
    p.nred = len(axes)
    p.out_shape = tuple(p.shape[d] for d in keep)
    p.n_out = math.prod(p.out_shape)
    p.scalar = axis is None
    p.x, p.t, p.w = (a if a is None else a.transpose(p.perm) for a in (x, t, w))
    p.loss_dtype = np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)
    p.nthreads = resolve_num_threads(num_threads)
    return p


def _sums(p: _Prepared, op: str, param: float, g=None, grad_scale=None):
    """One reducing pass: (sum of w*l, sum of w) per output, optionally writing the gradient."""
    swl = np.zeros(p.n_out)
    sw = np.zeros(p.n_out)
    if p.x.size:
        _core.pointwise(op, param, p.x, p.t, p.w, g, None, p.nred, swl, sw, grad_scale, p.nthreads)
    return swl, sw


def _divide(num, den):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.divide(num, den)


def _finish(p: _Prepared, values: np.ndarray):
    """Per-output float64 values -> NumPy scalar or array of the loss dtype."""
    with np.errstate(over="ignore"):  # a float32 loss beyond 3.4e38 is inf, as in torch
        if p.scalar:
            return p.loss_dtype.type(values[0])
        return values.astype(p.loss_dtype).reshape(p.out_shape)


def _new_grad(p: _Prepared, grad_out):
    """The gradient buffer for the kernel (in the compute dtype, transposed like the inputs)
    and the array returned to the caller."""
    if grad_out is not None:
        result = check_grad_out(grad_out, p.shape, p.grad_dtype, p.arrays)
    else:
        result = np.empty(p.shape, dtype=p.grad_dtype)
    work = result if result.dtype == p.x.dtype else np.empty(p.shape, dtype=p.x.dtype)
    return work, result


def _copy_back(work, result):
    if work is not result:
        np.copyto(result, work, casting="unsafe")
    return result


def _pointwise(op, param, input, target, weight, reduction, axis, num_threads):
    p = _prepare(input, target, weight, reduction, axis, num_threads)
    if p.reduction == "none":
        e = np.empty(p.shape, dtype=p.loss_dtype)
        if e.size:
            _core.pointwise(op, param, p.x, p.t, p.w, None, e, p.nred, None, None, None, p.nthreads)
        return e
    swl, sw = _sums(p, op, param)
    return _finish(p, swl if p.reduction == "sum" else _divide(swl, sw))


def _pointwise_with_grad(op, param, input, target, weight, reduction, axis, num_threads, grad_out):
    p = _prepare(input, target, weight, reduction, axis, num_threads)
    work, result = _new_grad(p, grad_out)
    g = work.transpose(p.perm)
    if p.reduction == "none":
        e = np.empty(p.shape, dtype=p.loss_dtype)
        if e.size:
            _core.pointwise(op, param, p.x, p.t, p.w, g, e, p.nred, None, None, np.ones(1), p.nthreads)
        return e, _copy_back(work, result)
    if p.reduction == "sum":
        scale = np.ones(p.n_out)
    elif p.w is None:
        n_red = math.prod(p.x.shape[p.x.ndim - p.nred:])
        scale = np.full(p.n_out, _divide(1.0, float(n_red)))
    else:  # weighted mean: the weights' sum is needed before the gradient can be written
        _, sw = _sums(p, "one", 0.0)
        scale = _divide(1.0, sw)
    swl, sw = _sums(p, op, param, g, scale)
    loss = _finish(p, swl if p.reduction == "sum" else _divide(swl, sw))
    return loss, _copy_back(work, result)


# ---- public API -------------------------------------------------------------------------------

_COMMON_DOC = """
    Parameters
    ----------
    input : array_like, shape (...)
        Predictions; float16, float32, float64 or bfloat16 (``ml_dtypes``).  Any
        strides, read-only arrays and memmaps are used without a copy.
    target : array_like
        Broadcastable to ``input.shape``.
    weight : array_like, optional
        Per-element weights broadcastable to ``input.shape``; the loss of each element
        is multiplied by its weight and ``"mean"`` divides by the sum of weights.
{reduction}    axis : None, int or tuple of ints
        Axes reduced by ``"mean"``/``"sum"`` (default: all), e.g. ``axis=0`` gives one
        loss per output column (scikit-learn's ``multioutput="raw_values"``).
    num_threads : int, optional
        OpenMP threads (None: :func:`fastloss.get_num_threads`; -1: all cores).
        The result is bitwise identical for every thread count.

    Returns
    -------
    loss : numpy.float32 or numpy.float64 scalar (array for ``axis`` or ``"none"``)
        float64 for float64 input, float32 otherwise; accumulated in float64.
"""

_GRAD_DOC = """
    The ``_with_grad`` variant returns ``(loss, grad)`` where ``grad`` is the gradient of
    ``loss.sum()`` with respect to ``input`` (same shape, ``input``'s dtype), computed in
    the same pass.  ``grad_out`` (an array of that shape and dtype) receives it instead of
    a new array; it may be ``input`` itself (in place) but must not overlap other inputs.
"""


_REDUCTION_DOC = """    reduction : {"mean", "sum", "none"}
        ``"none"`` returns the elementwise (weighted) loss with ``input``'s shape.
"""


def _document(func, title, formula, params, example, reduction=True):
    common = _COMMON_DOC.format(reduction=_REDUCTION_DOC if reduction else "")
    func.__doc__ = f"""{title}

    {formula}
{params}{common}{_GRAD_DOC}
    Examples
    --------
{example}
    """
    return func


def mse_loss(input, target, *, weight=None, reduction="mean", axis=None, num_threads=None):
    return _pointwise("mse", 0.0, input, target, weight, reduction, axis, num_threads)


def mse_loss_with_grad(input, target, *, weight=None, reduction="mean", axis=None, num_threads=None,
                       grad_out=None):
    return _pointwise_with_grad("mse", 0.0, input, target, weight, reduction, axis, num_threads, grad_out)


def l1_loss(input, target, *, weight=None, reduction="mean", axis=None, num_threads=None):
    return _pointwise("l1", 0.0, input, target, weight, reduction, axis, num_threads)


def l1_loss_with_grad(input, target, *, weight=None, reduction="mean", axis=None, num_threads=None,
                      grad_out=None):
    return _pointwise_with_grad("l1", 0.0, input, target, weight, reduction, axis, num_threads, grad_out)


def huber_loss(input, target, *, delta=1.0, weight=None, reduction="mean", axis=None, num_threads=None):
    delta = check_positive(delta, "delta")
    return _pointwise("huber", delta, input, target, weight, reduction, axis, num_threads)


def huber_loss_with_grad(input, target, *, delta=1.0, weight=None, reduction="mean", axis=None,
                         num_threads=None, grad_out=None):
    delta = check_positive(delta, "delta")
    return _pointwise_with_grad("huber", delta, input, target, weight, reduction, axis, num_threads, grad_out)


def smooth_l1_loss(input, target, *, beta=1.0, weight=None, reduction="mean", axis=None, num_threads=None):
    beta = check_positive(beta, "beta", allow_zero=True)
    return _pointwise(*_smooth_l1_op(beta), input, target, weight, reduction, axis, num_threads)


def smooth_l1_loss_with_grad(input, target, *, beta=1.0, weight=None, reduction="mean", axis=None,
                             num_threads=None, grad_out=None):
    beta = check_positive(beta, "beta", allow_zero=True)
    return _pointwise_with_grad(*_smooth_l1_op(beta), input, target, weight, reduction, axis, num_threads,
                                grad_out)


def _smooth_l1_op(beta):
    """smooth L1 with beta == 0 is exactly L1 (torch dispatches it to l1_loss too)."""
    return ("smooth_l1", beta) if beta > 0 else ("l1", 0.0)


def rmse(input, target, *, weight=None, axis=None, num_threads=None):
    p = _prepare(input, target, weight, "mean", axis, num_threads)
    swl, sw = _sums(p, "mse", 0.0)
    return _finish(p, np.sqrt(_divide(swl, sw)))


def rmse_with_grad(input, target, *, weight=None, axis=None, num_threads=None, grad_out=None):
    p = _prepare(input, target, weight, "mean", axis, num_threads)
    work, result = _new_grad(p, grad_out)
    swl, sw = _sums(p, "mse", 0.0)
    r = np.sqrt(_divide(swl, sw))
    # d sqrt(M)/dx = M'/(2 sqrt(M)); at M == 0 (a minimum) the subgradient 0 is returned.
    scale = np.where(r == 0, 0.0, _divide(1.0, 2.0 * r * sw))
    if p.x.size:
        _core.pointwise("mse", 0.0, p.x, p.t, p.w, work.transpose(p.perm), None, p.nred, None, None,
                        np.ascontiguousarray(scale, dtype=np.float64), p.nthreads)
    return _finish(p, r), _copy_back(work, result)


_document(mse_loss, "Mean squared error, ``torch.nn.functional.mse_loss``.",
          "loss_i = w_i * (input_i - target_i)**2;  gradient 2 * w_i * (input_i - target_i)", "",
          "    >>> import numpy as np, fastloss\n"
          "    >>> fastloss.mse_loss(np.array([1.0, 2.0, 4.0]), np.array([1.0, 1.0, 1.0]))\n"
          "    np.float64(3.3333333333333335)")
_document(l1_loss, "Mean absolute error (L1), ``torch.nn.functional.l1_loss``.",
          "loss_i = w_i * |input_i - target_i|;  gradient w_i * sign(input_i - target_i) (0 at 0)", "",
          "    >>> import numpy as np, fastloss\n"
          "    >>> fastloss.l1_loss(np.array([1.0, 2.0, 4.0]), np.array([1.0, 1.0, 1.0]), reduction='sum')\n"
          "    np.float64(4.0)")
_document(huber_loss, "Huber loss, ``torch.nn.functional.huber_loss``.",
          "z = |input - target|:  loss = 0.5 z**2 if z < delta else delta (z - 0.5 delta);"
          "  gradient clip(input - target, -delta, delta)",
          "    delta : float > 0\n        Where the loss changes from quadratic to linear (ValueError if <= 0).\n",
          "    >>> import numpy as np, fastloss\n"
          "    >>> fastloss.huber_loss(np.array([0.5, 3.0]), np.zeros(2), delta=1.0)\n"
          "    np.float64(1.3125)")
_document(smooth_l1_loss, "Smooth L1 loss, ``torch.nn.functional.smooth_l1_loss``.",
          "z = |input - target|:  loss = 0.5 z**2 / beta if z < beta else z - 0.5 beta  (beta = 0: L1);"
          "  gradient (input - target)/beta if z < beta else sign(input - target)",
          "    beta : float >= 0\n        Where the loss changes from quadratic to linear (ValueError if < 0).\n",
          "    >>> import numpy as np, fastloss\n"
          "    >>> fastloss.smooth_l1_loss(np.array([0.5, 3.0]), np.zeros(2), beta=1.0)\n"
          "    np.float64(1.3125)")
_document(rmse, "Root mean squared error: ``sqrt(mse_loss(..., reduction='mean'))``.",
          "loss = sqrt(sum_i w_i (input_i - target_i)**2 / sum_i w_i);"
          "  gradient w_i (input_i - target_i) / (loss * sum_i w_i), 0 where loss == 0",
          "    (no ``reduction``: RMSE is always a mean; use ``axis`` for per-column values)\n",
          "    >>> import numpy as np, fastloss\n"
          "    >>> fastloss.rmse(np.array([[1.0, 2.0], [3.0, 6.0]]), np.zeros((2, 2)), axis=0)\n"
          "    array([2.23606798, 4.47213595])", reduction=False)
for _f, _base in ((mse_loss_with_grad, mse_loss), (l1_loss_with_grad, l1_loss),
                  (huber_loss_with_grad, huber_loss), (smooth_l1_loss_with_grad, smooth_l1_loss),
                  (rmse_with_grad, rmse)):
    _f.__doc__ = (f"``{_base.__name__}`` and its gradient in one pass: returns ``(loss, grad)``.\n\n"
                  f"    See :func:`fastloss.{_base.__name__}` for the formula and arguments.\n{_GRAD_DOC}")

#: Short aliases.
mse = mse_loss
mae = l1_loss
