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

Every regression loss is an elementwise loss ``l(x, t)`` followed by a
reduction (the cross-entropy family is described further down):

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

Cross-entropy family
--------------------
``logsumexp``, ``log_softmax``, ``softmax``, ``nll_loss``, ``cross_entropy``
and ``perplexity`` work on rows: ``axis`` (an int, default -1; torch's layout
``(N, C, d1, ...)`` is ``axis=1``) is the class axis of length ``V``, and the
other axes are the rows.  ``target`` is either an integer array of the rows'
shape (class indices; any integer dtype) or a float array of the logits' shape
(class probabilities).  With ``x = softcap * tanh(logits / softcap)`` (or the
logits), ``logp = log_softmax(x)``, ``lse = logsumexp(x)``, class weights
``w`` and per-row ``sample_weight`` ``s`` (missing weights are 1), a row's
loss is::

    class index y:   s * ((1 - ls) * w[y] * -logp[y]
                          + ls / V * sum_c w[c] * -logp[c]
                          + z * w[y] * lse**2)
    probabilities p: s * (sum_c w[c] * ((1 - ls) * p[c] + ls / V) * -logp[c]
                          + z * lse**2)

(``ls = label_smoothing``, ``z = z_loss``), 0 for a row whose target is
``ignore_index``.  ``"mean"`` divides the sum of the rows by ``sum(s * w[y])``
over the non-ignored rows (class indices) or by ``sum(s)`` (probabilities);
nan when that is 0 (every row ignored, or no rows).  ``"none"`` returns the
rows' losses.  Without ``s``, ``z`` and ``softcap`` this is exactly
``torch.nn.functional.cross_entropy``, including the smoothing term and its
denominator with ``weight``.  ``cross_entropy_grad`` is the gradient of
``cross_entropy(...).sum()``: ``s * (sum(t) * q - t + 2 * z * w[y] * lse * q)``
per row with ``q = softmax(x)`` and ``t`` the row's target distribution above
(``t[c] = (1 - ls) * w[y] * [c == y] + ls / V * w[c]``, or
``w[c] * ((1 - ls) * p[c] + ls / V)``), times
``1 - tanh(logits / softcap)**2``.  ``perplexity`` is ``exp`` of the mean
cross-entropy (no weights).

Choices beyond torch:

* ``z_loss`` (PaLM's auxiliary loss, Liger-Kernel's ``lse_square_scale``) is
  weighted like the row's cross-entropy term, by ``s * w[y]`` (by ``s`` for
  class probabilities), so ``"mean"`` is one weighted average of
  ``CE + z * lse**2``.  Without weights this equals Liger-Kernel (``z`` times
  the mean of ``lse**2`` over the non-ignored rows); with class weights
  Liger-Kernel leaves the z-loss unweighted and divides it by the count of
  non-ignored rows (its code marks weighting as a TODO).
* ``sample_weight`` multiplies the whole row (numerator and denominator); it
  may be anything that broadcasts to the rows' shape.
* A row whose target is ``ignore_index`` contributes exactly 0 to the loss and
  the gradient whatever its logits (torch's gradient there is nan when the row
  holds nan or is all -inf).

Errors: IndexError for a class index outside ``[0, V)`` that is not
``ignore_index`` (naming the value and its flat row index); TypeError for a
target whose dtype does not match its shape (float class indices, integer
probabilities) and for a non-int ``axis`` or ``ignore_index``; ValueError for a
target of neither shape, ``ignore_index >= 0`` with probabilities, a ``weight``
not of shape ``(V,)``, a ``sample_weight`` that does not broadcast to the rows,
``label_smoothing`` outside ``[0, 1]``, ``z_loss`` not finite and >= 0,
``softcap`` not None or finite and > 0, ``V == 0``, and 0-d logits.  torch
differs here: it accepts only int64/uint8 class indices, silently treats a
negative (or nan) ``label_smoothing`` as 0, and returns a result for ``V == 0``
when every row is ignored.

Non-finite logits behave as in torch: a -inf logit has probability 0 (the
loss is inf if it is the target, or with label smoothing; ``0 * inf = nan``
where its class weight or target probability is 0); a row that is all -inf
or holds +inf gives nan (``logsumexp`` alone gives -inf or +inf for such
rows, as ``torch.logsumexp`` does).
"""

import functools
import math
import operator
from typing import NamedTuple

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
    "logsumexp",
    "log_softmax",
    "softmax",
    "nll_loss",
    "nll_loss_grad",
    "cross_entropy",
    "cross_entropy_grad",
    "perplexity",
    "perplexity_grad",
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


# ---------------------------------------------------------------------------
# Cross-entropy family
# ---------------------------------------------------------------------------
#
# The class axis ``axis`` is moved last (``np.moveaxis``, a view), so that
# ``x[..., c]`` is class ``c`` of a row; gradients are moved back at the end.
# Per-row quantities are kept as "columns" of shape ``rows + (1,)`` so that
# they broadcast against ``(rows..., V)`` without further reshaping.


def _quiet(func):
    """Run ``func`` without NumPy floating-point warnings.

    -inf logits, all -inf rows (``log(0)``, ``-inf - -inf``), ``0 * inf`` and
    ``0 / 0`` means give inf or nan as in torch, silently.
    """
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return func(*args, **kwargs)
    return wrapper


def _class_axis(x, axis, name):
    """``(x with the class axis moved last, that axis as an int >= 0)``."""
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an int, got {axis!r}") from None
    if x.ndim == 0:
        raise ValueError(
            f"{name} must have at least one dimension (the class axis)")
    (ax,) = normalize_axis_tuple(axis, x.ndim)
    return np.moveaxis(x, ax, -1), ax


def _sum_last(a):
    """Sum over the last (class) axis, kept with length 1 (accumulated as in
    ``_reduce``)."""
    total = np.sum(a, axis=-1, dtype=_accumulator(a.dtype), keepdims=True)
    return _round_back(total, a.dtype)


def _shifted_rows(x):
    """``(x - m, log(sum(exp(x - m))), m)`` over the last axis (kept).

    The straightforward way: ``m`` is the row maximum, so every ``exp`` is at
    most 1 and the sum is at least 1.  As in torch's ``log_softmax``, a row
    that is all -inf or holds +inf (or nan) gives nan throughout.
    """
    m = np.max(x, axis=-1, keepdims=True, initial=-np.inf)
    shifted = np.asarray(x - m)
    log_s = np.log(_sum_last(np.exp(shifted)))
    return shifted, log_s, m


def _check_option(name, value, ok, requirement):
    if not ok:  # the comparisons in ``ok`` are False for nan
        raise ValueError(f"{name} must be {requirement}, got {value!r}")


class _CEInputs(NamedTuple):
    """Validated arguments of a cross-entropy-family call (class axis last)."""

    x: np.ndarray            # (rows..., V) logits or log-probabilities
    axis: int                # where the class axis was
    probs: np.ndarray | None  # (rows..., V) soft targets, else None
    y: np.ndarray | None     # (rows...) class indices (0 where ignored)
    valid: np.ndarray | None  # (rows...) True where not ignore_index
    weight: np.ndarray | None         # (V,)
    sample_weight: np.ndarray | None  # (rows...)


def _ce_inputs(logits, target, weight, sample_weight, ignore_index, axis,
               dtype, name="logits", soft_ok=True):
    """Convert and check the arguments; raise before any computation."""
    x0 = _as_float_array(logits, dtype)
    x, ax = _class_axis(x0, axis, name)
    n_classes, rows = x.shape[-1], x.shape[:-1]
    if n_classes == 0:
        raise ValueError(
            f"{name} of shape {x0.shape} has no classes (axis {ax} is empty)")
    try:
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(
            f"ignore_index must be an int, got {ignore_index!r}") from None

    t = np.asarray(target)
    probs = y = valid = None
    if t.shape == x0.shape and soft_ok:        # class probabilities
        # floating, including ml_dtypes' bfloat16 (not an np.floating subtype)
        if not (np.issubdtype(t.dtype, np.floating) or t.dtype.name == "bfloat16"):
            raise TypeError(
                f"target has the shape of {name} {x0.shape}, so it holds "
                f"class probabilities and must be floating point, got "
                f"{t.dtype}")
        if ignore_index >= 0:
            raise ValueError(
                f"ignore_index={ignore_index} is not supported with "
                f"class-probability targets (use a negative ignore_index)")
        probs = np.moveaxis(_as_float_array(t, dtype), ax, -1)
    elif t.shape == rows:                       # class indices
        if not np.issubdtype(t.dtype, np.integer):
            raise TypeError(
                f"target of shape {t.shape} holds class indices and must have "
                f"an integer dtype, got {t.dtype}")
        valid = np.asarray(t != ignore_index)
        bad = valid & ((t < 0) | (t >= n_classes))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            index = np.unravel_index(row, t.shape)
            raise IndexError(
                f"target {t.reshape(-1)[row]} at row {row} (target index "
                f"{tuple(int(i) for i in index)}) is out of range for "
                f"{n_classes} classes (and is not "
                f"ignore_index={ignore_index})")
        y = np.where(valid, t, 0).astype(np.intp)
    else:
        allowed = f"{rows} (class indices)"
        if soft_ok:
            allowed += f" or {x0.shape} (class probabilities)"
        raise ValueError(
            f"target of shape {t.shape} does not fit {name} of shape "
            f"{x0.shape} with class axis {ax}: expected {allowed}")

    w = None
    if weight is not None:
        w = _as_float_array(weight, dtype)
        if w.shape != (n_classes,):
            raise ValueError(
                f"weight must have shape ({n_classes},) (one weight per "
                f"class), got {w.shape}")
    sw = None
    if sample_weight is not None:
        sw = _as_float_array(sample_weight, dtype)
        try:
            shape = np.broadcast_shapes(rows, sw.shape)
        except ValueError:
            shape = None
        if shape != rows:
            raise ValueError(
                f"sample_weight of shape {sw.shape} cannot be broadcast to "
                f"the shape of the rows {rows}")
        sw = np.broadcast_to(sw, rows)
    return _CEInputs(x, ax, probs, y, valid, w, sw)


def _row_weights(a):
    """Per-row weights as columns (rows..., 1), and the mean's denominator.

    ``s``: the sample weight (1 without it), 0 where the target is ignored.
    ``r``: the weight of the row's loss, ``s * weight[y]`` for class indices
    (0 where ignored, whatever the weights) and ``s`` for class probabilities.
    The denominator is ``sum(r)``.
    """
    s = (np.ones(a.x.shape[:-1], a.x.dtype) if a.sample_weight is None
         else a.sample_weight)
    if a.valid is not None:
        s = np.where(a.valid, s, 0)
    r = s if a.weight is None or a.valid is None else np.where(a.valid, s * a.weight[a.y], 0)
    acc = _accumulator(np.result_type(a.x.dtype, r.dtype))
    return s[..., None], r[..., None], np.sum(r, dtype=acc)


def _ce_check_options(reduction, label_smoothing, z_loss, softcap):
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check_option("label_smoothing", label_smoothing,
                  0 <= label_smoothing <= 1, "in [0, 1]")
    _check_option("z_loss", z_loss, 0 <= z_loss < math.inf,
                  "finite and >= 0")
    if softcap is not None:
        _check_option("softcap", softcap, 0 < softcap < math.inf,
                      "None or finite and > 0")


def _capped(x, softcap):
    """``(softcap * tanh(x / softcap), tanh(x / softcap))``; ``(x, None)``
    without a softcap."""
    if softcap is None:
        return x, None
    th = np.tanh(x / softcap)
    return softcap * th, th


def _smoothed_target(a, label_smoothing):
    """Soft targets: ``weight * ((1 - ls) * p + ls / V)`` (rows..., V)."""
    p = a.probs
    if label_smoothing > 0:
        p = (1 - label_smoothing) * p + label_smoothing / a.x.shape[-1]
    return p if a.weight is None else p * a.weight


@_quiet
def logsumexp(x, axis=-1, *, dtype=np.float64):
    """``log(sum(exp(x)))`` over ``axis`` (which is removed).

    Computed as ``m + log(sum(exp(x - m)))`` with ``m`` the row maximum, or 0
    if that is infinite (as torch.logsumexp does): a row of -inf gives -inf,
    a row holding +inf gives +inf, an empty axis gives -inf.
    """
    x, _ = _class_axis(_as_float_array(x, dtype), axis, "x")
    m = np.max(x, axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isinf(m), 0, m)
    return (m + np.log(_sum_last(np.exp(np.asarray(x - m)))))[..., 0]


@_quiet
def log_softmax(x, axis=-1, *, dtype=np.float64):
    """``(x - m) - log(sum(exp(x - m)))`` over ``axis``, ``m`` the row maximum
    (nan for a row of all -inf or holding +inf, as in torch)."""
    x, ax = _class_axis(_as_float_array(x, dtype), axis, "x")
    shifted, log_s, _ = _shifted_rows(x)
    return np.moveaxis(np.subtract(shifted, log_s, out=shifted), -1, ax)


@_quiet
def softmax(x, axis=-1, *, dtype=np.float64):
    """``exp(x - m) / sum(exp(x - m))`` over ``axis``, ``m`` the row maximum
    (nan for a row of all -inf or holding +inf, as in torch)."""
    x, ax = _class_axis(_as_float_array(x, dtype), axis, "x")
    m = np.max(x, axis=-1, keepdims=True, initial=-np.inf)
    e = np.exp(np.asarray(x - m))
    e = np.divide(e, _sum_last(e), out=e)
    return np.moveaxis(e, -1, ax)


def _reduce_rows(loss, denominator, reduction):
    """Reduce per-row losses (rows..., 1) that are already weighted."""
    loss = loss[..., 0]
    if reduction == "none":
        return loss
    total = np.sum(loss, dtype=_accumulator(loss.dtype))
    if reduction == "mean":
        # nan if nothing is counted (0 / 0), and also, as torch, if the counted rows' weights
        # sum to 0 while label smoothing makes their loss nonzero (x / 0)
        total = total / denominator if denominator != 0 else type(total)(np.nan)
    return _round_back(total, loss.dtype)


def _grad_scale(r, denominator, reduction):
    """The factor ``d loss / d (row loss)`` of each row, times its weight."""
    return r / denominator if reduction == "mean" else r


@_quiet
def nll_loss(log_probs, target, *, weight=None, ignore_index=-100,
             reduction="mean", axis=-1, dtype=np.float64):
    """Negative log-likelihood: ``-weight[y] * log_probs[..., y]`` per row.

    Rows whose target is ``ignore_index`` give 0 (whatever their values);
    ``"mean"`` divides by ``sum(weight[y])`` over the other rows.
    """
    _ce_check_options(reduction, 0.0, 0.0, None)
    a = _ce_inputs(log_probs, target, weight, None, ignore_index, axis, dtype,
                   name="log_probs", soft_ok=False)
    _, r, denominator = _row_weights(a)
    lp_y = np.take_along_axis(a.x, a.y[..., None], axis=-1)
    loss = np.where(a.valid[..., None], -r * lp_y, 0)
    return _reduce_rows(loss, denominator, reduction)


@_quiet
def nll_loss_grad(log_probs, target, *, weight=None, ignore_index=-100,
                  reduction="mean", axis=-1, dtype=np.float64):
    """Gradient of ``nll_loss(...).sum()``: ``-weight[y]`` at ``y``, else 0
    (divided by ``sum(weight[y])`` for ``"mean"``)."""
    _ce_check_options(reduction, 0.0, 0.0, None)
    a = _ce_inputs(log_probs, target, weight, None, ignore_index, axis, dtype,
                   name="log_probs", soft_ok=False)
    _, r, denominator = _row_weights(a)
    r = _grad_scale(r, denominator, reduction)
    g = np.zeros(a.x.shape, np.result_type(a.x, r))
    np.put_along_axis(g, a.y[..., None], -r, axis=-1)
    return np.moveaxis(_round_back(g, a.x.dtype), -1, a.axis)


@_quiet
def cross_entropy(logits, target, *, weight=None, sample_weight=None,
                  ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, softcap=None, axis=-1, dtype=np.float64):
    """Cross-entropy of ``softmax(logits)`` against ``target`` per row.

    With ``x = softcap * tanh(logits / softcap)`` (or the logits),
    ``logp = log_softmax(x)``, ``lse = logsumexp(x)``, ``V`` classes,
    ``ls = label_smoothing``, ``w`` the class weights and ``s`` the row's
    sample weight (missing weights are 1), the loss of a row is, for a class
    index ``y`` (0 if ``y == ignore_index``)::

        s * ((1 - ls) * w[y] * -logp[y]  +  ls / V * sum_c w[c] * -logp[c]
             + z_loss * w[y] * lse**2)

    and for class probabilities ``p`` (a float target of the logits' shape)::

        s * (sum_c w[c] * ((1 - ls) * p[c] + ls / V) * -logp[c]
             + z_loss * lse**2)

    ``"mean"`` divides the sum by ``sum(s * w[y])`` over the non-ignored rows
    (class indices) or by ``sum(s)`` (class probabilities).  See the module
    docstring for the choices made and the differences from torch.
    """
    _ce_check_options(reduction, label_smoothing, z_loss, softcap)
    a = _ce_inputs(logits, target, weight, sample_weight, ignore_index, axis,
                   dtype)
    s, r, denominator = _row_weights(a)
    x, _ = _capped(a.x, softcap)
    shifted, log_s, m = _shifted_rows(x)
    logp = np.subtract(shifted, log_s, out=shifted)
    lse = m + log_s
    ls, n_classes = label_smoothing, x.shape[-1]

    if a.probs is not None:
        loss = -_sum_last(_smoothed_target(a, ls) * logp)
        if z_loss > 0:
            loss = loss + z_loss * lse * lse
        return _reduce_rows(loss * r, denominator, reduction)

    # Class indices: the terms are weighted by r = s * w[y], except the
    # smoothing term, whose class weights w[c] are inside its sum.
    nll = -np.take_along_axis(logp, a.y[..., None], axis=-1)
    loss = (1 - ls) * r * nll
    if ls > 0:
        smooth = -_sum_last(logp if a.weight is None else logp * a.weight)
        loss = loss + ls / n_classes * s * smooth
    if z_loss > 0:
        loss = loss + z_loss * r * lse * lse
    loss = np.where(a.valid[..., None], loss, 0)
    return _reduce_rows(loss, denominator, reduction)


@_quiet
def cross_entropy_grad(logits, target, *, weight=None, sample_weight=None,
                       ignore_index=-100, reduction="mean",
                       label_smoothing=0.0, z_loss=0.0, softcap=None, axis=-1,
                       dtype=np.float64):
    """Gradient of ``cross_entropy(...).sum()`` with respect to ``logits``.

    With ``q = softmax(x)`` and the row's target distribution ``t`` (class
    indices: ``t[c] = (1 - ls) * w[y] * [c == y] + ls / V * w[c]``; class
    probabilities: ``t[c] = w[c] * ((1 - ls) * p[c] + ls / V)``), the
    gradient of a row's loss with respect to ``x`` is::

        s * (sum(t) * q - t + 2 * z_loss * w[y] * lse * q)

    (``w[y]`` is 1 for class probabilities), 0 for ignored rows, divided by
    the mean's denominator for ``"mean"``, and times
    ``1 - tanh(logits / softcap)**2`` with ``softcap``.
    """
    _ce_check_options(reduction, label_smoothing, z_loss, softcap)
    a = _ce_inputs(logits, target, weight, sample_weight, ignore_index, axis,
                   dtype)
    s, r, denominator = _row_weights(a)
    s = _grad_scale(s, denominator, reduction)
    r = _grad_scale(r, denominator, reduction)
    x, th = _capped(a.x, softcap)
    shifted, log_s, m = _shifted_rows(x)
    lse = m + log_s
    q = np.exp(np.subtract(shifted, log_s, out=shifted), out=shifted)
    ls, n_classes = label_smoothing, x.shape[-1]

    if a.probs is not None:
        t = _smoothed_target(a, ls)
        coef = _sum_last(t)
        if z_loss > 0:
            coef = coef + 2 * z_loss * lse
        g = (q * coef - t) * r
    else:
        # sum(t) = (1 - ls) * w[y] + ls / V * sum(w)
        w_total = (n_classes if a.weight is None
                   else np.sum(a.weight, dtype=_accumulator(a.weight.dtype)))
        coef = (1 - ls) * r + ls / n_classes * w_total * s
        if z_loss > 0:
            coef = coef + 2 * z_loss * lse * r
        g = _inplace(np.multiply, q, coef)
        if ls > 0:
            g -= ls / n_classes * s * (1 if a.weight is None else a.weight)
        g_y = np.take_along_axis(g, a.y[..., None], axis=-1) - (1 - ls) * r
        np.put_along_axis(g, a.y[..., None], g_y, axis=-1)
        g = np.where(a.valid[..., None], g, 0)  # also where logits are nan
    if th is not None:
        del x                                      # the capped logits
        g = np.multiply(g, np.subtract(1, th * th, out=th), out=g)
        if a.valid is not None:                    # ignored rows: 0 even where tanh is nan
            g = np.where(a.valid[..., None], g, 0)
    return np.moveaxis(_round_back(g, a.x.dtype), -1, a.axis)


@_quiet
def perplexity(logits, target, *, ignore_index=-100, axis=-1,
               dtype=np.float64):
    """``exp`` of the mean cross-entropy over the non-ignored rows (nan if
    every row is ignored)."""
    return np.exp(cross_entropy(logits, target, ignore_index=ignore_index,
                                reduction="mean", axis=axis, dtype=dtype))


@_quiet
def perplexity_grad(logits, target, *, ignore_index=-100, axis=-1,
                    dtype=np.float64):
    """Gradient of ``perplexity``: ``perplexity * d(mean CE)/d logits``."""
    kwargs = dict(ignore_index=ignore_index, reduction="mean", axis=axis,
                  dtype=dtype)
    return (np.exp(cross_entropy(logits, target, **kwargs))
            * cross_entropy_grad(logits, target, **kwargs))


# ---- margin losses and distillation
#
# Rows on the last axis, computed in float64 (``dtype``) from the published formulas:
#   multi_margin_loss (torch): sum_{j != y} w[y] max(0, margin - x[y] + x[j])**p / C per row;
#   triplet_margin_loss (torch): max(0, margin + ||a - p + eps||_p - d_neg), d_neg = ||a - n + eps||_p
#     or min(that, ||p - n + eps||_p) with swap;
#   kl_div_logits: T**2 sum_j q_j (log q_j - log r_j), q = softmax(teacher / T), r = softmax(student / T),
#     q_j = 0 terms are 0; rows with target == ignore_index are dropped.
# Reductions: "mean" over rows (multi-margin, triplet); kl_div_logits: "batchmean" = sum / active rows,
# "mean" = sum / (active rows * V), "sum", "none" (per row).  Empty means are nan.

def _row_reduce(rows, reduction, denominator):
    if reduction == "none":
        return rows
    total = np.sum(rows)
    if reduction == "sum":
        return total
    return total / denominator if denominator else np.float64(np.nan)


@_quiet
def multi_margin_loss(input, target, *, p=1, margin=1.0, weight=None, reduction="mean", dtype=np.float64):
    x = _as_float_array(input, dtype)
    y = np.asarray(target)[..., None]
    C = x.shape[-1]
    w = 1.0 if weight is None else _as_float_array(weight, dtype)[y[..., 0]]
    z = margin - np.take_along_axis(x, y, -1) + x
    h = np.where(z > 0, z, 0.0) ** p
    np.put_along_axis(h, y, 0.0, -1)
    rows = w * h.sum(-1) / C
    return _row_reduce(rows, reduction, rows.size)


@_quiet
def multi_margin_loss_grad(input, target, *, p=1, margin=1.0, weight=None, reduction="mean", dtype=np.float64):
    x = _as_float_array(input, dtype)
    y = np.asarray(target)[..., None]
    C = x.shape[-1]
    w = 1.0 if weight is None else _as_float_array(weight, dtype)[y[..., 0]]
    z = margin - np.take_along_axis(x, y, -1) + x
    g = np.where(z > 0, 1.0 if p == 1 else 2.0 * z, 0.0)
    np.put_along_axis(g, y, 0.0, -1)
    np.put_along_axis(g, y, -g.sum(-1, keepdims=True), -1)
    g = g * (np.asarray(w)[..., None] if weight is not None else 1.0) / C
    if reduction == "mean":
        g = g / max(int(np.prod(x.shape[:-1])), 1)
    return g


def _pnorm(u, p):
    return np.sum(np.abs(u) ** p, axis=-1) ** (1.0 / p)


def _pnorm_grad(u, d, p):
    """d||u||_p / du (0 where ||u|| = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.sign(u) * np.abs(u) ** (p - 1) / d[..., None] ** (p - 1)
    return np.where(d[..., None] == 0, 0.0, g) if p != 1 else np.sign(u)


def _triplet_parts(anchor, positive, negative, p, eps, swap, dtype):
    a, pp, n = (_as_float_array(v, dtype) for v in (anchor, positive, negative))
    u, v, s = a - pp + eps, a - n + eps, pp - n + eps
    dap, dan, dpn = _pnorm(u, p), _pnorm(v, p), _pnorm(s, p)
    dneg = np.minimum(dan, dpn) if swap else dan
    return u, v, s, dap, dan, dpn, dneg


@_quiet
def triplet_margin_loss(anchor, positive, negative, *, margin=1.0, p=2.0, eps=1e-6, swap=False, reduction="mean",
                        dtype=np.float64):
    _, _, _, dap, _, _, dneg = _triplet_parts(anchor, positive, negative, p, eps, swap, dtype)
    rows = np.maximum(margin + dap - dneg, 0.0)
    return _row_reduce(rows, reduction, rows.size)


@_quiet
def triplet_margin_loss_grad(anchor, positive, negative, *, margin=1.0, p=2.0, eps=1e-6, swap=False,
                             reduction="mean", dtype=np.float64):
    """(grad_anchor, grad_positive, grad_negative) of ``triplet_margin_loss(...).sum()``."""
    u, v, s, dap, dan, dpn, dneg = _triplet_parts(anchor, positive, negative, p, eps, swap, dtype)
    active = (margin + dap - dneg >= 0).astype(np.float64)
    if swap:
        e_an = np.where(dan < dpn, 1.0, np.where(dan == dpn, 0.5, 0.0))
    else:
        e_an = np.ones_like(dan)
    e_pn = 1.0 - e_an if swap else np.zeros_like(dan)
    gu, gv, gs = _pnorm_grad(u, dap, p), _pnorm_grad(v, dan, p), _pnorm_grad(s, dpn, p)
    k = active / (max(active.size, 1) if reduction == "mean" else 1.0)
    ga = k[..., None] * (gu - e_an[..., None] * gv)
    gp = k[..., None] * (-gu - e_pn[..., None] * gs)
    gn = k[..., None] * (e_an[..., None] * gv + e_pn[..., None] * gs)
    return ga, gp, gn


def _kl_rows(student_logits, teacher_logits, temperature, dtype):
    T = float(temperature)
    b = _as_float_array(student_logits, dtype) / T
    a = _as_float_array(teacher_logits, dtype) / T
    lq = a - a.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    lr = b - b.max(-1, keepdims=True)
    lr = lr - np.log(np.exp(lr).sum(-1, keepdims=True))
    q = np.exp(lq)
    return T, q, lq, lr


def _kl_active(target, ignore_index, rows_shape):
    if target is None:
        return np.ones(rows_shape, dtype=bool)
    return np.asarray(target) != ignore_index


@_quiet
def kl_div_logits(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", ignore_index=-100,
                  target=None, dtype=np.float64):
    T, q, lq, lr = _kl_rows(student_logits, teacher_logits, temperature, dtype)
    rows = T * T * np.sum(np.where(q > 0, q * (lq - lr), 0.0), axis=-1)
    active = _kl_active(target, ignore_index, rows.shape)
    rows = np.where(active, rows, 0.0)
    n = int(np.count_nonzero(active))
    if reduction == "none":
        return rows
    return _row_reduce(rows, "sum" if reduction == "sum" else "mean", n * (q.shape[-1] if reduction == "mean" else 1))


@_quiet
def kl_div_logits_grad(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", ignore_index=-100,
                       target=None, dtype=np.float64):
    """Gradient of ``kl_div_logits(...).sum()`` with respect to the student logits."""
    T, q, lq, lr = _kl_rows(student_logits, teacher_logits, temperature, dtype)
    active = _kl_active(target, ignore_index, q.shape[:-1])
    g = np.where(active[..., None], T * (np.exp(lr) - q), 0.0)
    n = int(np.count_nonzero(active))
    if reduction == "batchmean":
        g = g / n if n else g * np.nan
    elif reduction == "mean":
        g = g / (n * q.shape[-1]) if n else g * np.nan
    return g


# ---- sequence log-probs, DPO and InfoNCE
#
# Written from the formulas: log_softmax materialized in float64 and gathered (what TRL
# does), the DPO paper / TRL DPOTrainer losses on float64 vectors, and InfoNCE as a plain
# softmax over q @ k.T / temperature.  Ignored positions contribute 0; ``average`` divides
# by the number of non-ignored positions (0 of them: nan).

def _log_softmax64(x):
    x = np.asarray(x, dtype=np.float64)
    shifted, log_s, _ = _shifted_rows(x)
    return shifted - log_s


def _sequence_parts(logits, target, ignore_index):
    x = np.asarray(logits, dtype=np.float64)
    t = np.asarray(target).astype(np.int64)
    valid = t != ignore_index
    safe = np.where(valid, t, 0)
    return x, safe, valid


@_quiet
def sequence_log_probs(logits, target, *, ignore_index=-100, average=False):
    """``sum_t log_softmax(logits)[..., t, target_t]`` over non-ignored positions, shape
    ``logits.shape[:-2]``; divided by their count with ``average``."""
    x, safe, valid = _sequence_parts(logits, target, ignore_index)
    lp = np.take_along_axis(_log_softmax64(x), safe[..., None], axis=-1)[..., 0]
    total = np.sum(np.where(valid, lp, 0.0), axis=-1)
    if average:
        total = total / np.sum(valid, axis=-1)
    return total


@_quiet
def sequence_log_probs_grad(logits, target, grad_seq, *, ignore_index=-100, average=False):
    """Gradient of ``sum(grad_seq * sequence_log_probs(...))`` with respect to the logits:
    ``grad_seq[b] (/ count_b) * (onehot(target) - softmax(logits))`` per non-ignored row."""
    x, safe, valid = _sequence_parts(logits, target, ignore_index)
    g = np.asarray(grad_seq, dtype=np.float64)
    if average:
        g = g / np.sum(valid, axis=-1)
    p = np.exp(_log_softmax64(x))
    onehot = np.zeros_like(p)
    np.put_along_axis(onehot, safe[..., None], 1.0, axis=-1)
    w = np.where(valid, g[..., None], 0.0)[..., None]
    return np.where(valid[..., None], w * (onehot - p), 0.0)


def _dpo_h(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    c = np.asarray(policy_chosen_logps, dtype=np.float64)
    r = np.asarray(policy_rejected_logps, dtype=np.float64)
    if ref_chosen_logps is None:
        rc = rr = np.zeros_like(c)
    else:
        rc = np.asarray(ref_chosen_logps, dtype=np.float64)
        rr = np.asarray(ref_rejected_logps, dtype=np.float64)
    return (c - r) - (rc - rr), c - rc, r - rr


def _log_sigmoid(z):
    # log(1 / (1 + exp(-z))), written so that exp never overflows
    return np.where(z >= 0, -np.log1p(np.exp(-np.abs(z))), z - np.log1p(np.exp(-np.abs(z))))


def _dpo_reduce(values, reduction):
    if reduction == "none":
        return values
    total = np.sum(values)
    return total / values.size if reduction == "mean" else total


@_quiet
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0, reduction="mean", return_rewards=False):
    """DPO (Rafailov et al. 2023) with TRL's loss types; h = (pi_c - pi_r) - (ref_c - ref_r):
    sigmoid ``-(1-e) logsig(b h) - e logsig(-b h)``; robust
    ``(-(1-e) logsig(b h) + e logsig(-b h)) / (1 - 2e)``; ipo ``(h - 1/(2b))**2``; hinge
    ``max(0, 1 - b h)``.  Rewards ``b (pi - ref)``."""
    h, dc, dr = _dpo_h(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    b, e = float(beta), float(label_smoothing)
    if loss_type == "sigmoid":
        lv = -(1 - e) * _log_sigmoid(b * h) - e * _log_sigmoid(-b * h)
    elif loss_type == "robust":
        lv = (-(1 - e) * _log_sigmoid(b * h) + e * _log_sigmoid(-b * h)) / (1 - 2 * e)
    elif loss_type == "ipo":
        lv = (h - 1 / (2 * b)) ** 2
    elif loss_type == "hinge":
        lv = np.maximum(0.0, 1 - b * h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    loss = _dpo_reduce(lv, reduction)
    if return_rewards:
        return loss, b * dc, b * dr
    return loss


@_quiet
def dpo_loss_grad(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                  beta=0.1, loss_type="sigmoid", label_smoothing=0.0, reduction="mean"):
    """``(d loss.sum() / d policy_chosen_logps, d loss.sum() / d policy_rejected_logps)``."""
    h, _, _ = _dpo_h(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    b, e = float(beta), float(label_smoothing)
    sig = lambda z: np.exp(_log_sigmoid(z))  # noqa: E731
    if loss_type == "sigmoid":
        dh = -(1 - e) * b * sig(-b * h) + e * b * sig(b * h)
    elif loss_type == "robust":
        dh = (-(1 - e) * b * sig(-b * h) - e * b * sig(b * h)) / (1 - 2 * e)
    elif loss_type == "ipo":
        dh = 2 * (h - 1 / (2 * b))
    elif loss_type == "hinge":
        dh = np.where(1 - b * h > 0, -b, 0.0)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    if reduction == "mean":
        dh = dh / h.size
    return dh, -dh


def _info_nce_rows(s):
    """Per-row cross-entropy of similarity rows against the diagonal, and its gradient."""
    lsm = _log_softmax64(s)
    n = s.shape[0]
    idx = np.arange(n)
    rows = -lsm[idx, idx]
    g = np.exp(lsm)
    g[idx, idx] -= 1.0
    return rows, g


@_quiet
def info_nce_loss(query, keys, *, temperature=0.07, symmetric=False, reduction="mean"):
    """Cross-entropy of ``q @ k.T / temperature`` with labels ``arange(N)``; symmetric: the
    mean of both directions (CLIP)."""
    q = np.asarray(query, dtype=np.float64)
    k = np.asarray(keys, dtype=np.float64)
    s = q @ k.T / float(temperature)
    rows, _ = _info_nce_rows(s)
    if symmetric:
        rows = 0.5 * (rows + _info_nce_rows(s.T)[0])
    return _dpo_reduce(rows, reduction)


@_quiet
def info_nce_loss_grad(query, keys, *, temperature=0.07, symmetric=False, reduction="mean"):
    """``(d loss.sum() / d query, d loss.sum() / d keys)``."""
    q = np.asarray(query, dtype=np.float64)
    k = np.asarray(keys, dtype=np.float64)
    tau = float(temperature)
    s = q @ k.T / tau
    _, g = _info_nce_rows(s)
    if symmetric:
        g = 0.5 * (g + _info_nce_rows(s.T)[1].T)
    if reduction == "mean":
        g = g / q.shape[0]
    return g @ k / tau, g.T @ q / tau


# ---- elementwise losses on probabilities and scores
# Plain float64 NumPy, written from the published formulas (torch's Loss.cpp for the BCE
# losses and kl_div, torchvision's sigmoid_focal_loss, the SVM hinge loss).  Every
# function broadcasts ``target`` (and ``weight``, ``pos_weight``) to ``input``'s shape;
# ``reduction="mean"`` divides by the number of elements (with ``weight`` too, as torch);
# the ``_grad`` twins return the gradient of ``loss.sum()`` with respect to ``input``.


def _elem_prepare(input, target, dtype, *others):
    x = _as_float_array(input, dtype)
    t = np.broadcast_to(_as_float_array(target, dtype), x.shape)
    rest = [None if o is None else np.broadcast_to(_as_float_array(o, dtype), x.shape) for o in others]
    return (x, t, *rest)


def _elem_reduce(l, reduction):
    if reduction == "none":
        return l
    total = np.sum(l, dtype=np.float64)
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / (l.shape[0] if l.ndim else 1)
    return total / l.size if l.size else np.float64(np.nan)


def _elem_grad_scale(shape, reduction):
    n = math.prod(shape)
    if reduction == "mean":
        return 1.0 / n if n else np.nan
    if reduction == "batchmean":
        return 1.0 / shape[0] if len(shape) else 1.0
    return 1.0


def _softplus(z):
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


def _sigmoid(z):
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


@_quiet
def binary_cross_entropy(input, target, *, weight=None, reduction="mean", dtype=np.float64):
    """``-w (t max(log x, -100) + (1 - t) max(log(1 - x), -100))``; input and target in [0, 1]."""
    x, t, w = _elem_prepare(input, target, dtype, weight)
    if not (np.all((x >= 0) & (x <= 1)) and np.all((t >= 0) & (t <= 1))):
        raise ValueError("binary_cross_entropy needs input and target in [0, 1]")
    l = -(t * np.maximum(np.log(x), -100) + (1 - t) * np.maximum(np.log1p(-x), -100))
    return _elem_reduce(l if w is None else w * l, reduction)


@_quiet
def binary_cross_entropy_grad(input, target, *, weight=None, reduction="mean", dtype=np.float64):
    """``w (x - t) / max(x (1 - x), 1e-12)`` (torch's clamp of the denominator)."""
    x, t, w = _elem_prepare(input, target, dtype, weight)
    g = (x - t) / np.maximum(x * (1 - x), 1e-12)
    g = g if w is None else w * g
    return g * _elem_grad_scale(x.shape, reduction)


@_quiet
def binary_cross_entropy_with_logits(input, target, *, weight=None, pos_weight=None, reduction="mean",
                                     dtype=np.float64):
    """``w ((1 - t) x - (1 + (pw - 1) t) log sigmoid(x))`` = ``w ((1 - t) sp(x) + pw t sp(-x))``."""
    x, t, w, pw = _elem_prepare(input, target, dtype, weight, pos_weight)
    pw = 1.0 if pw is None else pw
    l = (1 - t) * _softplus(x) + pw * t * _softplus(-x)
    return _elem_reduce(l if w is None else w * l, reduction)


@_quiet
def binary_cross_entropy_with_logits_grad(input, target, *, weight=None, pos_weight=None, reduction="mean",
                                          dtype=np.float64):
    """``w ((1 - t) sigmoid(x) - pw t sigmoid(-x))``."""
    x, t, w, pw = _elem_prepare(input, target, dtype, weight, pos_weight)
    pw = 1.0 if pw is None else pw
    g = (1 - t) * _sigmoid(x) - pw * t * _sigmoid(-x)
    g = g if w is None else w * g
    return g * _elem_grad_scale(x.shape, reduction)


def _focal_parts(x, t, alpha, gamma):
    p, q = _sigmoid(x), _sigmoid(-x)
    ce = (1 - t) * _softplus(x) + t * _softplus(-x)
    u = p * (1 - t) + q * t                    # 1 - p_t
    a = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else 1.0
    return p, q, ce, u, a


@_quiet
def sigmoid_focal_loss(input, target, *, alpha=0.25, gamma=2.0, reduction="mean", dtype=np.float64):
    """torchvision: ``alpha_t ce (1 - p_t)^gamma`` (``alpha < 0``: ``alpha_t = 1``)."""
    x, t = _elem_prepare(input, target, dtype)
    _, _, ce, u, a = _focal_parts(x, t, alpha, gamma)
    return _elem_reduce(a * ce * u ** gamma, reduction)


@_quiet
def sigmoid_focal_loss_grad(input, target, *, alpha=0.25, gamma=2.0, reduction="mean", dtype=np.float64):
    """``alpha_t (ce' u^gamma + ce gamma u^(gamma-1) u')``, ``u = 1 - p_t``, ``ce' = p - t``,
    ``u' = p (1 - p)(1 - 2t)``; the second term is 0 where ``u == 0``."""
    x, t = _elem_prepare(input, target, dtype)
    p, q, ce, u, a = _focal_parts(x, t, alpha, gamma)
    dce = (1 - t) * p - t * q
    du = p * q * (1 - 2 * t)
    second = np.where(u > 0, ce * gamma * u ** (gamma - 1) * du, 0.0)
    g = a * (dce * u ** gamma + second)
    return g * _elem_grad_scale(x.shape, reduction)


@_quiet
def hinge_loss(input, target, *, margin=1.0, reduction="mean", dtype=np.float64):
    """``max(0, margin - t x)`` with ``t`` in {-1, +1}."""
    x, t = _elem_prepare(input, target, dtype)
    if not np.all((t == 1) | (t == -1)):
        raise ValueError("hinge_loss needs targets of -1 or +1")
    return _elem_reduce(np.maximum(margin - t * x, 0), reduction)


@_quiet
def hinge_loss_grad(input, target, *, margin=1.0, reduction="mean", dtype=np.float64):
    """``-t`` where ``margin - t x > 0``, else 0."""
    x, t = _elem_prepare(input, target, dtype)
    g = np.where(margin - t * x > 0, -t, 0.0)
    return g * _elem_grad_scale(x.shape, reduction)


@_quiet
def kl_div(input, target, *, reduction="mean", log_target=False, dtype=np.float64):
    """torch's ``kl_div``: ``xlogy(t, t) - t x`` (``log_target``: ``exp(t) (t - x)``);
    ``"batchmean"`` divides the sum by ``input.shape[0]``."""
    x, t = _elem_prepare(input, target, dtype)
    if log_target:
        l = np.exp(t) * (t - x)
    else:
        l = np.where(t == 0, 0.0, t * np.log(np.where(t == 0, 1.0, t))) - t * x
        l = np.where(np.isnan(t), np.nan, l)
    return _elem_reduce(l, reduction)


@_quiet
def kl_div_grad(input, target, *, reduction="mean", log_target=False, dtype=np.float64):
    """``-t`` (``log_target``: ``-exp(t)``)."""
    x, t = _elem_prepare(input, target, dtype)
    g = -np.exp(t) if log_target else -t
    return np.broadcast_to(g, x.shape) * _elem_grad_scale(x.shape, reduction)


# ---------------------------------------------------------------------------
# Fused linear + cross-entropy (the oracle of fastloss.linear)
# ---------------------------------------------------------------------------


def _linear_logits(input, linear_weight, linear_bias, dtype):
    x = _as_float_array(input, dtype)
    w = _as_float_array(linear_weight, dtype)
    logits = x @ w.T
    if linear_bias is not None:
        logits = logits + _as_float_array(linear_bias, dtype)
    return x, w, logits


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None,
                         dtype=np.float64, **ce_options):
    """``cross_entropy(input @ linear_weight.T + linear_bias, target, **ce_options)``
    with the (..., V) logits materialized (the plain formula)."""
    _, _, logits = _linear_logits(input, linear_weight, linear_bias, dtype)
    return cross_entropy(logits, target, dtype=dtype, **ce_options)


def linear_cross_entropy_grad(input, linear_weight, target, *, linear_bias=None,
                              dtype=np.float64, **ce_options):
    """Gradients of ``linear_cross_entropy(...).sum()``:
    ``(grad_input, grad_linear_weight, grad_linear_bias or None)``, from the
    logits' gradient ``G`` (``cross_entropy_grad``): ``G @ W``, ``G.T @ input``
    (over all row axes) and ``G.sum(rows)``."""
    x, w, logits = _linear_logits(input, linear_weight, linear_bias, dtype)
    g = cross_entropy_grad(logits, target, dtype=dtype, **ce_options)
    g2 = g.reshape(-1, w.shape[0])
    gx = (g2 @ w).reshape(x.shape)
    gw = g2.T @ x.reshape(g2.shape[0], w.shape[1])
    gb = None if linear_bias is None else g2.sum(axis=0)
    return gx, gw, gb


__all__ += ["linear_cross_entropy", "linear_cross_entropy_grad"]
