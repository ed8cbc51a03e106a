"""Plain-NumPy reference implementations of the fastloss losses.

This module has two jobs:

* It is the **oracle** for the tests.  With the default ``dtype=np.float64``
  every function converts its inputs to float64 and computes the loss (or its
  gradient) with straightforward NumPy, so the compiled kernels can be checked
  against it.
* It is the **baseline** for the benchmarks.  With ``dtype=None`` the inputs
  are used in their own dtype, which is what a user who writes the loss in
  NumPy by hand would get.  The code therefore avoids copies that such a user
  would not make (differences are computed once and then updated in place).

Clarity comes before speed here: nothing in this module is meant to be clever.

Every loss is an elementwise loss ``l(x, t)`` followed by a reduction:

=================  ==========================================================
``mse_loss``       ``l = (x - t)**2``
``l1_loss``        ``l = |x - t|``
``huber_loss``     with ``z = |x - t|``: ``0.5 * z**2`` if ``z < delta``,
                   else ``delta * (z - 0.5 * delta)``
``smooth_l1_loss`` with ``z = |x - t|``: ``0.5 * z**2 / beta`` if ``z < beta``,
                   else ``z - 0.5 * beta``; ``beta == 0`` gives ``|x - t|``
``rmse``           ``sqrt`` of the weighted mean of ``(x - t)**2``
=================  ==========================================================

Common options
--------------
target, weight
    Same shape as ``input`` or broadcastable to it (the result never has a
    larger shape than ``input``).  The weighted elementwise loss is ``w * l``.
reduction
    ``"mean"``: ``sum(w * l) / sum(w)`` over the reduced axes, where
    ``sum(w)`` is the element count when ``weight`` is None;
    ``"sum"``: ``sum(w * l)``; ``"none"``: ``w * l`` (``axis`` must be None).
    The mean of an empty selection is nan and its sum is 0, without warnings.
axis
    None (all axes), an int, or a tuple of ints; negative values count from
    the end.
dtype
    The dtype to compute in (default float64).  ``None`` computes in the
    input's own dtype (NumPy's usual type promotion applies; integer and
    bool inputs are converted to float64).  Sums of float16 values are
    accumulated in float32 and rounded back to float16, as ``np.mean`` does.

Each loss has a ``<name>_grad`` function with the same arguments that returns
the gradient of ``loss(...).sum()`` with respect to ``input`` (same shape as
``input``).  The elementwise derivatives are

* mse: ``2 * (x - t)``
* l1: ``sign(x - t)`` (0 where ``x == t``; nan propagates)
* huber: ``clip(x - t, -delta, delta)``
* smooth_l1: ``(x - t) / beta`` if ``|x - t| < beta`` else ``sign(x - t)``;
  ``beta == 0`` gives ``sign(x - t)``

times the weight, and for ``reduction="mean"`` divided by ``sum(w)`` (or the
element count) of the slice that was reduced.  For ``rmse`` the gradient is
``dMSE/dx / (2 * rmse)``, and 0 where ``rmse == 0``.

Invalid arguments raise ValueError (``delta <= 0``, ``beta < 0``, an unknown
reduction, a shape that does not broadcast to ``input``); a bad axis raises
NumPy's AxisError.

Known differences from torch 2.13 (``torch.nn.functional``): torch's weighted
``huber_loss`` mean divides by the element count instead of ``sum(w)``; torch
accepts only a weight of exactly the input's shape and has no weight for
``smooth_l1_loss``; torch's l1 gradient (and smooth_l1 with ``beta == 0``) is 0
rather than nan where ``x - t`` is nan.
"""

import math

import numpy as np

try:  # NumPy >= 2.0
    from numpy.lib.array_utils import normalize_axis_tuple
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.numeric import normalize_axis_tuple

__all__ = [
    "mse_loss",
    "mse_loss_grad",
    "l1_loss",
    "l1_loss_grad",
    "huber_loss",
    "huber_loss_grad",
    "smooth_l1_loss",
    "smooth_l1_loss_grad",
    "rmse",
    "rmse_grad",
    "read_sum",
]

_REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------
# Helpers shared by all losses
# ---------------------------------------------------------------------------


def _as_float_array(a, dtype):
    """``np.asarray(a, dtype=dtype)``; int/bool arrays become float64."""
    a = np.asarray(a, dtype=dtype)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    return a


def _prepare(input, target, weight, dtype):
    """Convert the arguments to arrays and check that they fit ``input``."""
    x = _as_float_array(input, dtype)
    t = _as_float_array(target, dtype)
    w = None if weight is None else _as_float_array(weight, dtype)
    for name, other in (("target", t), ("weight", w)):
        if other is None:
            continue
        try:
            shape = np.broadcast_shapes(x.shape, other.shape)
        except ValueError:
            shape = None
        if shape != x.shape:
            raise ValueError(
                f"{name} of shape {other.shape} cannot be broadcast to the "
                f"input shape {x.shape}"
            )
    return x, t, w


def _check_reduction(reduction, axis, ndim):
    """Validate ``reduction`` and return ``axis`` as a tuple (or None)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {_REDUCTIONS}, got {reduction!r}"
        )
    if axis is None:
        return None
    if reduction == "none":
        raise ValueError('axis must be None when reduction="none"')
    return normalize_axis_tuple(axis, ndim)


def _difference(x, t):
    """``x - t`` as a fresh array that may be modified in place.

    (For 0-d inputs ``x - t`` is a NumPy scalar; ``np.asarray`` turns it into
    a 0-d array so that the in-place operations below work for every shape.)
    """
    return np.asarray(x - t)


def _inplace(ufunc, a, b):
    """``ufunc(a, b)``, written into the temporary ``a`` when possible."""
    if isinstance(a, np.ndarray) and np.result_type(a, b) == a.dtype:
        return ufunc(a, b, out=a)
    return ufunc(a, b)


def _apply_weight(values, w):
    """``w * values`` (``values`` is a temporary that may be overwritten)."""
    if w is None:
        return values
    return _inplace(np.multiply, values, w)


def _accumulator(dtype):
    """The dtype in which sums of ``dtype`` values are accumulated.

    float16 is accumulated in float32 and the result rounded back to float16,
    as ``np.mean`` does: float16 cannot even hold an element count above
    65504.  Every other dtype is accumulated in itself.
    """
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def _round_back(value, dtype):
    """Cast a float32 accumulator result back to float16 (no-op otherwise)."""
    if dtype != np.float16 or value.dtype == dtype:
        return value
    with np.errstate(over="ignore"):  # a float16 overflow is inf, as in torch
        return value.astype(dtype)


def _weight_total(w, shape, axes, acc, keepdims=False):
    """``sum(w)`` over ``axes`` (element count if no weight)."""
    if w is None:
        if axes is None:
            return acc.type(math.prod(shape))
        return acc.type(math.prod(shape[a] for a in axes))
    return np.sum(np.broadcast_to(w, shape), axis=axes, dtype=acc,
                  keepdims=keepdims)


def _reduce(l, w, reduction, axes):
    """Reduce the (already weighted) elementwise loss ``l``."""
    if reduction == "none":
        return l
    acc = _accumulator(l.dtype)
    total = np.sum(l, axis=axes, dtype=acc)
    if reduction == "mean":
        # 0 / 0 (an empty selection, or weights summing to 0) gives nan.
        with np.errstate(invalid="ignore", divide="ignore"):
            total = total / _weight_total(w, l.shape, axes, acc)
    return _round_back(total, l.dtype)


def _scale_grad(g, w, reduction, axes):
    """Turn the elementwise derivative ``g`` into the gradient of the loss."""
    g = _apply_weight(g, w)
    if reduction == "mean":
        total = _weight_total(w, g.shape, axes, _accumulator(g.dtype),
                              keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            g = _round_back(_inplace(np.true_divide, g, total), g.dtype)
    return g


def _check_delta(delta):
    if not delta > 0:  # also rejects nan
        raise ValueError(f"huber_loss requires delta > 0, got {delta!r}")


def _check_beta(beta):
    if not beta >= 0:  # also rejects nan
        raise ValueError(f"smooth_l1_loss requires beta >= 0, got {beta!r}")


# ---------------------------------------------------------------------------
# Mean squared error
# ---------------------------------------------------------------------------


def mse_loss(input, target, *, weight=None, reduction="mean", axis=None,
             dtype=np.float64):
    """Mean squared error: ``l = (x - t)**2``."""
    x, t, w = _prepare(input, target, weight, dtype)
    axes = _check_reduction(reduction, axis, x.ndim)
    d = _difference(x, t)
    l = np.multiply(d, d, out=d)
    return _reduce(_apply_weight(l, w), w, reduction, axes)


def mse_loss_grad(input, target, *, weight=None, reduction="mean", axis=None,
                  dtype=np.float64):
    """Gradient of ``mse_loss(...).sum()`` with respect to ``input``."""
    x, t, w = _prepare(input, target, weight, dtype)
    axes = _check_reduction(reduction, axis, x.ndim)
    d = _difference(x, t)
    g = _inplace(np.multiply, d, 2)
    return _scale_grad(g, w, reduction, axes)


# ---------------------------------------------------------------------------
# L1 (mean absolute error)
# ---------------------------------------------------------------------------


def l1_loss(input, target, *, weight=None, reduction="mean", axis=None,
            dtype=np.float64):
    """L1 loss: ``l = |x - t|``."""
    x, t, w = _prepare(input, target, weight, dtype)
    axes = _check_reduction(reduction, axis, x.ndim)
    d = _difference(x, t)
    l = np.abs(d, out=d)
    return _reduce(_apply_weight(l, w), w, reduction, axes)


def l1_loss_grad(input, target, *, weight=None, reduction="mean", axis=None,
                 dtype=np.float64):
    """Gradient of ``l1_loss(...).sum()``: ``sign(x - t)`` (0 at 0)."""
    x, t, w = _prepare(input, target, weight, dtype)
    axes = _check_reduction(reduction, axis, x.ndim)
    d = _difference(x, t)
    g = np.sign(d, out=d)
    return _scale_grad(g, w, reduction, axes)


# ---------------------------------------------------------------------------
# Huber
# ---------------------------------------------------------------------------


def huber_loss(input, target, *, delta=1.0, weight=None, reduction="mean",
               axis=None, dtype=np.float64):
    """Huber loss with threshold ``delta > 0``.

    With ``z = |x - t|``: ``0.5 * z**2`` if ``z < delta`` else
    ``delta * (z - 0.5 * delta)``.
    """
    _check_delta(delta)
    x, t, w = _prepare(input, target, weight, dtype)
    axes = _check_reduction(reduction, axis, x.ndim)
    d = _difference(x, t)
    z = np.abs(d, out=d)
    l = np.where(z < delta, 0.5 * z * z, delta * (z - 0.5 * delta))
    return _reduce(_apply_weight(l, w), w, reduction, axes)


def huber_loss_grad(input, target, *, delta=1.0, weight=None,
                    reduction="mean", axis=None, dtype=np.float64):
    """Gradient of huber_loss(...).sum(): ``clip(x - t, -delta, delta)``."""
    _check_delta(delta)
    x, t, w = _prepare(input, target, weight, dtype)
    axes = _check_reduction(reduction, axis, x.ndim)
    d = _difference(x, t)
    g = np.clip(d, -delta, delta, out=d)
    return _scale_grad(g, w, reduction, axes)


# ---------------------------------------------------------------------------
# Smooth L1
# ---------------------------------------------------------------------------


def smooth_l1_loss(input, target, *, beta=1.0, weight=None, reduction="mean",
                   axis=None, dtype=np.float64):
    """Smooth L1 loss with threshold ``beta >= 0``.

    With ``z = |x - t|``: ``0.5 * z**2 / beta`` if ``z < beta`` else
    ``z - 0.5 * beta``.  ``beta == 0`` is the plain L1 loss.
    """
    _check_beta(beta)
    x, t, w = _prepare(input, target, weight, dtype)
    axes = _check_reduction(reduction, axis, x.ndim)
    d = _difference(x, t)
    z = np.abs(d, out=d)
    if beta == 0:
        l = z
    else:
        l = np.where(z < beta, 0.5 * z * z / beta, z - 0.5 * beta)
    return _reduce(_apply_weight(l, w), w, reduction, axes)


def smooth_l1_loss_grad(input, target, *, beta=1.0, weight=None,
                        reduction="mean", axis=None, dtype=np.float64):
    """Gradient of ``smooth_l1_loss(...).sum()`` with respect to ``input``.

    ``(x - t) / beta`` if ``|x - t| < beta`` else ``sign(x - t)``;
    ``beta == 0`` gives ``sign(x - t)``.
    """
    _check_beta(beta)
    x, t, w = _prepare(input, target, weight, dtype)
    axes = _check_reduction(reduction, axis, x.ndim)
    d = _difference(x, t)
    if beta == 0:
        g = np.sign(d, out=d)
    else:
        g = np.where(np.abs(d) < beta, d / beta, np.sign(d))
    return _scale_grad(g, w, reduction, axes)


# ---------------------------------------------------------------------------
# Root mean squared error
# ---------------------------------------------------------------------------


def rmse(input, target, *, weight=None, axis=None, dtype=np.float64):
    """Root of the (weighted) mean squared error over ``axis``."""
    return np.sqrt(mse_loss(input, target, weight=weight, reduction="mean",
                            axis=axis, dtype=dtype))


def rmse_grad(input, target, *, weight=None, axis=None, dtype=np.float64):
    """Gradient of ``rmse(...).sum()`` with respect to ``input``.

    ``dMSE/dx / (2 * rmse) = w * (x - t) / (sum(w) * rmse)`` for the slice
    that was reduced, and 0 where that slice's rmse is 0.
    """
    x, t, w = _prepare(input, target, weight, dtype)
    axes = _check_reduction("mean", axis, x.ndim)
    d = _difference(x, t)
    wd = d if w is None else d * w                     # w * (x - t)
    acc = _accumulator(wd.dtype)
    total = _weight_total(w, d.shape, axes, acc, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_sq = np.sum(wd * d, axis=axes, dtype=acc, keepdims=True) / total
        root = np.sqrt(mean_sq)
        g = _round_back(_inplace(np.true_divide, wd, total * root), wd.dtype)
    return np.where(root == 0, 0, g)


# ---------------------------------------------------------------------------
# Bandwidth baseline
# ---------------------------------------------------------------------------


def read_sum(x):
    """``np.sum(x)``: reads the data once (memory-bandwidth baseline)."""
    return np.sum(x)
