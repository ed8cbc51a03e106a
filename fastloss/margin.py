"""Margin losses over rows: multi-class margin (hinge) and triplet margin.

Semantics follow ``torch.nn.functional.multi_margin_loss`` and
``torch.nn.functional.triplet_margin_loss``; the kernels (src_c/rows_body.h) read each row
once for the loss, write the gradient in the same call, and spread rows over threads with
results bitwise identical for any thread count.  Documented differences from torch:

* rows may have any leading shape ``(..., C)`` (torch: ``(N, C)`` or ``(C,)``); the last axis
  should be contiguous (any strides on the others, e.g. ``x[:, :-1]``, are used in place;
  otherwise one copy is made);
* the loss is float64 for float64 input and float32 otherwise (float16/bfloat16 rows are
  computed in float32, never rounded to 16 bits), sums are accumulated in double;
* ``triplet_margin_loss`` does not broadcast: the three inputs must have one shape;
  ``p`` must be finite and > 0 (torch also takes p = inf);
* ``"mean"`` of an empty batch is nan, ``"sum"`` is 0 (as torch).
"""
from __future__ import annotations

import math

import numpy as np

from fastloss import _core
from fastloss._config import resolve_num_threads
from fastloss._validation import as_array, as_float_array, check_grad_out, check_reduction, result_float_dtype

__all__ = ["multi_margin_loss", "multi_margin_loss_with_grad", "triplet_margin_loss",
           "triplet_margin_loss_with_grad"]

_F32_OVERFLOW = (2.0 - 2.0 ** -24) * 2.0 ** 127     # the smallest double that rounds to float32 inf


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def _rows(x: np.ndarray) -> np.ndarray:
    """`x` with a unit-stride last axis (a view when it already has one)."""
    if x.shape[-1] <= 1 or x.strides[-1] == x.itemsize:
        return x
    return np.ascontiguousarray(x)


def _loss_dtype(dt: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)


def _reduce(row_loss: np.ndarray, reduction: str, denominator: float, rows_shape: tuple, loss_dtype: np.dtype):
    """Per-row float64 losses -> the result: rows' shape for "none", else a scalar (sum in fixed order)."""
    if reduction == "none":
        with np.errstate(over="ignore"):
            return row_loss.astype(loss_dtype).reshape(rows_shape)
    total = _core.sum_f64(row_loss)     # compensated: within ~1 ulp of the exact sum
    if reduction != "sum":
        total = total / denominator if denominator != 0 else math.nan
    if loss_dtype == np.float32 and math.isfinite(total) and abs(total) >= _F32_OVERFLOW:
        total = math.copysign(math.inf, total)
    return loss_dtype.type(total)


def _grad_dest(grad_out, like: np.ndarray, original, inputs: dict, name: str, inplace_name: str):
    """(array the kernel writes, array returned): a new array, or the checked `grad_out` (or a
    unit-stride temporary when grad_out's last axis is strided; copied back by _finish_grad)."""
    if grad_out is None:
        g = np.empty(like.shape, dtype=like.dtype)
        return g, g
    if grad_out is not original:
        inputs = dict(inputs, **{inplace_name: like})
    grad_out = check_grad_out(grad_out, like.shape, like.dtype, inputs, name=name, inplace_name=inplace_name)
    if like.shape[-1] <= 1 or grad_out.strides[-1] == grad_out.itemsize:
        return grad_out, grad_out
    return np.empty(like.shape, dtype=like.dtype), grad_out


def _finish_grad(work: np.ndarray, result: np.ndarray) -> np.ndarray:
    if work is not result:
        result[...] = work
    return result


# ---- multi-margin -------------------------------------------------------------------------------

class _MM:
    def __init__(self, input, target, p, margin, weight, reduction, num_threads):
        x0 = as_float_array(input, "input")
        if x0.ndim == 0:
            raise ValueError("input must have at least one dimension (the classes)")
        self.x0 = x0
        self.x = _rows(x0)
        self.C = self.x.shape[-1]
        if self.C == 0:
            raise ValueError("input has 0 classes")
        self.rows_shape = self.x.shape[:-1]
        if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
            raise TypeError(f"p must be 1 or 2, got {type(p).__name__}")
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        self.p = float(p)
        self.margin = _real(margin, "margin")
        self.reduction = check_reduction(reduction)
        self.w = None
        if weight is not None:
            w = as_float_array(weight, "weight")
            if w.shape != (self.C,):
                raise ValueError(f"weight must have shape ({self.C},) (one weight per class), got {w.shape}")
            self.w = np.ascontiguousarray(w, dtype=np.float64)
        self.t = _class_target(target, self.rows_shape, self.C, x0.shape)
        self.nthreads = resolve_num_threads(num_threads)
        self.n = math.prod(self.rows_shape)

    def run(self, grad=None):
        row_loss = np.empty(self.n, dtype=np.float64)
        scale = 1.0 / self.n if (self.reduction == "mean" and self.n) else 1.0
        if self.n:
            _core.row_loss("multi_margin", [self.x], None if grad is None else [grad], self.t, self.w, 0,
                           self.p, self.margin, 0.0, 1.0, False, scale, row_loss, self.nthreads)
        return _reduce(row_loss, self.reduction, float(self.n), self.rows_shape, _loss_dtype(self.x.dtype))


def _class_target(target, rows_shape: tuple, C: int, input_shape: tuple) -> np.ndarray:
    """Integer class indices of the rows' shape, as a C-contiguous int64 array; IndexError naming the
    first bad value and its row."""
    if target is None or isinstance(target, (str, bytes, dict, set)):
        raise TypeError(f"target must be an array of class indices, got {type(target).__name__}")
    try:
        t = target if isinstance(target, np.ndarray) else as_array(target, "target")
    except (ValueError, TypeError) as exc:
        raise TypeError(f"target could not be converted to an array: {exc}") from None
    if t.dtype.kind not in "iu":
        raise TypeError(f"target must hold integer class indices, got dtype {t.dtype}")
    if t.shape != rows_shape:
        raise ValueError(f"target has shape {t.shape}, expected {rows_shape} (the input's shape {input_shape} "
                         f"without the class axis)")
    flat = t.reshape(-1)
    if flat.size:
        bad = (flat < 0) | (flat >= C)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise IndexError(f"target {int(flat[r])} at row {r} is out of range for {C} classes")
    return np.ascontiguousarray(flat, dtype=np.int64)


def multi_margin_loss(input, target, *, p=1, margin=1.0, weight=None, reduction="mean", num_threads=None):
    """Multi-class margin (hinge) loss, ``torch.nn.functional.multi_margin_loss``.

    Per row x (C classes, on the last axis) with class index y and class weights w (1 if None)::

        loss = sum_{j != y} w[y] * max(0, margin - x[y] + x[j])**p / C

    ``"mean"`` averages over the rows (the weights do not enter the denominator, as torch),
    ``"sum"`` sums, ``"none"`` returns the per-row losses (the rows' shape).

    Parameters
    ----------
    input : array_like, shape (..., C)
        float16, float32, float64 or bfloat16; each row read once (x[y] first, then one
        vectorized pass), computed in float32 (float64 for float64), summed in double.
    target : integer array, shape (...)
        Class indices in [0, C); out of range -> IndexError naming the value and the row.
    p : {1, 2}
    margin : float
    weight : array_like (C,), optional
    reduction : {"mean", "sum", "none"}
    num_threads : int, optional

    Returns
    -------
    numpy.float32 / numpy.float64 scalar, or an array of the rows' shape for ``"none"``.

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> x = np.array([[0.1, 0.2, 0.4, 0.8]])
    >>> fastloss.multi_margin_loss(x, np.array([3]))
    np.float64(0.32499999999999996)
    """
    return _MM(input, target, p, margin, weight, reduction, num_threads).run()


def multi_margin_loss_with_grad(input, target, *, p=1, margin=1.0, weight=None, reduction="mean",
                                num_threads=None, grad_out=None):
    """:func:`multi_margin_loss` and its gradient with respect to ``input``: ``(loss, grad)``.

    ``grad`` (input's shape and dtype) is the gradient of ``loss.sum()``: with
    z_j = margin - x[y] + x[j], ``w[y] * p * z_j**(p-1) / C`` where z_j > 0 (j != y), and
    ``-sum_{j != y}`` of those at j = y; divided by the number of rows for ``"mean"``.  Written
    in the same pass as the loss.  ``grad_out``: an array of the input's shape and dtype to
    write into, or ``input`` itself (in place).

    >>> import numpy as np, fastloss
    >>> loss, grad = fastloss.multi_margin_loss_with_grad(np.array([[0.1, 0.2, 0.4, 0.8]]), np.array([3]))
    >>> grad
    array([[ 0.25,  0.25,  0.25, -0.75]])
    """
    mm = _MM(input, target, p, margin, weight, reduction, num_threads)
    inputs = {"target": as_array(target, "target"), "weight": None if weight is None else as_array(weight, "weight")}
    work, result = _grad_dest(grad_out, mm.x, input, inputs, "grad_out", "input")
    loss = mm.run(grad=work)
    return loss, _finish_grad(work, result)


# ---- triplet margin -----------------------------------------------------------------------------

class _Triplet:
    def __init__(self, anchor, positive, negative, margin, p, eps, swap, reduction, num_threads):
        arrs = [as_float_array(a, n) for a, n in ((anchor, "anchor"), (positive, "positive"),
                                                  (negative, "negative"))]
        if arrs[0].ndim == 0:
            raise ValueError("anchor must have at least one dimension (the features)")
        for a, n in zip(arrs[1:], ("positive", "negative")):
            if a.shape != arrs[0].shape:
                raise ValueError(f"{n} has shape {a.shape}, expected the anchor's shape {arrs[0].shape}")
        self.dtypes = [a.dtype for a in arrs]
        dt = result_float_dtype(*self.dtypes)
        self.xs = [_rows(a if a.dtype == dt else a.astype(dt)) for a in arrs]
        self.margin = _real(margin, "margin")
        if self.margin <= 0:                    # as torch
            raise ValueError(f"margin must be > 0, got {margin!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
            raise TypeError(f"p must be a real number, got {type(p).__name__}")
        self.p = float(p)
        if not (math.isfinite(self.p) and self.p > 0):
            raise ValueError(f"p must be finite and > 0, got {p!r}")
        self.eps = _real(eps, "eps")
        if not isinstance(swap, (bool, np.bool_)):
            raise TypeError(f"swap must be a bool, got {type(swap).__name__}")
        self.swap = bool(swap)
        self.reduction = check_reduction(reduction)
        self.nthreads = resolve_num_threads(num_threads)
        self.rows_shape = self.xs[0].shape[:-1]
        self.D = self.xs[0].shape[-1]
        self.n = math.prod(self.rows_shape)

    def run(self, grads=None):
        row_loss = np.empty(self.n, dtype=np.float64)
        scale = 1.0 / self.n if (self.reduction == "mean" and self.n) else 1.0
        if self.n and self.D:
            _core.row_loss("triplet_margin", self.xs, grads, None, None, 0, self.p, self.margin, self.eps, 1.0,
                           self.swap, scale, row_loss, self.nthreads)
        elif self.n:                            # D = 0: every distance is 0
            row_loss[:] = max(self.margin, 0.0)
            if grads is not None:
                for g in grads:
                    g[...] = 0
        return _reduce(row_loss, self.reduction, float(self.n), self.rows_shape, _loss_dtype(self.xs[0].dtype))


def triplet_margin_loss(anchor, positive, negative, *, margin=1.0, p=2.0, eps=1e-6, swap=False, reduction="mean",
                        num_threads=None):
    """Triplet margin loss, ``torch.nn.functional.triplet_margin_loss``.

    Per row (features on the last axis), with d(u, v) = ||u - v + eps||_p (torch's
    ``pairwise_distance``)::

        loss = max(0, margin + d(anchor, positive) - d_neg)

    d_neg = d(anchor, negative), or ``min(d(anchor, negative), d(positive, negative))`` with
    ``swap=True``.  ``"mean"`` averages over rows, ``"sum"`` sums, ``"none"`` returns the rows.

    Parameters
    ----------
    anchor, positive, negative : array_like, shape (..., D), one shape (no broadcasting)
        float16, float32, float64 or bfloat16 (different dtypes are converted to the common
        one); each row read once for the loss; computed in float32 (float64 for float64).
    margin : float > 0 (as torch)
    p : float > 0, finite (p = 2 and p = 1 are the vectorized paths)
    eps : float
    swap : bool
    reduction : {"mean", "sum", "none"}
    num_threads : int, optional

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> a, p, n = np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]]), np.array([[1.0, 0.0]])
    >>> float(fastloss.triplet_margin_loss(a, p, n, eps=0.0))
    5.0
    """
    return _Triplet(anchor, positive, negative, margin, p, eps, swap, reduction, num_threads).run()


def triplet_margin_loss_with_grad(anchor, positive, negative, *, margin=1.0, p=2.0, eps=1e-6, swap=False,
                                  reduction="mean", num_threads=None):
    """:func:`triplet_margin_loss` and its gradients: ``(loss, grad_anchor, grad_positive, grad_negative)``.

    The gradients of ``loss.sum()`` (each in its input's dtype), computed in the same call while
    the rows are in cache: with g(u) = d||u||_p/du (u / ||u|| for p = 2, 0 where ||u|| = 0, as
    torch), u = a - p + eps, v = a - n + eps, s = p - n + eps, on rows where
    margin + d_ap - d_neg >= 0: da = g(u) - g(v), dp = -g(u), dn = g(v) (with swap choosing
    d(p, n): da = g(u), dp = -g(u) - g(s), dn = g(s); a tie splits evenly, as torch's minimum).

    >>> import numpy as np, fastloss
    >>> a, p, n = np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]]), np.array([[1.0, 0.0]])
    >>> loss, ga, gp, gn = fastloss.triplet_margin_loss_with_grad(a, p, n, eps=0.0)
    >>> ga
    array([[ 0.4, -0.8]])
    """
    tr = _Triplet(anchor, positive, negative, margin, p, eps, swap, reduction, num_threads)
    grads = [np.empty(x.shape, dtype=x.dtype) for x in tr.xs]
    loss = tr.run(grads)
    out = [g if g.dtype == dt else g.astype(dt) for g, dt in zip(grads, tr.dtypes)]
    return (loss, *out)
