"""Knowledge distillation: KL divergence between the softened teacher and student distributions.

``kl_div_logits`` takes raw logits of both models and computes, per row (classes on the last
axis), ``T**2 * KL(softmax(teacher / T) || softmax(student / T))`` in one fused pass over both
rows (online max / sum-exp for the two rows and the cross term; src_c/rows_body.h): no
log-softmax or probability array is made.  The gradient with respect to the student logits is
written in a second pass while the rows are in cache, optionally over the student logits
themselves (in place).
"""
from __future__ import annotations

import math

import numpy as np

from fastloss import _core
from fastloss._config import resolve_num_threads
from fastloss._validation import as_array, as_float_array, check_positive
from fastloss.margin import _finish_grad, _grad_dest, _reduce, _rows

__all__ = ["kl_div_logits", "kl_div_logits_with_grad"]

_REDUCTIONS = ("batchmean", "sum", "mean", "none")


class _KL:
    def __init__(self, student_logits, teacher_logits, temperature, reduction, ignore_index, target,
                 num_threads):
        s0 = as_float_array(student_logits, "student_logits")
        t0 = as_float_array(teacher_logits, "teacher_logits")
        if s0.ndim == 0:
            raise ValueError("student_logits must have at least one dimension (the classes)")
        if t0.shape != s0.shape:
            raise ValueError(f"teacher_logits has shape {t0.shape}, expected the student_logits' shape {s0.shape}")
        if s0.shape[-1] == 0:
            raise ValueError("student_logits have 0 classes")
        self.T = check_positive(temperature, "temperature")
        if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of 'batchmean', 'sum', 'mean', 'none'; got {reduction!r}")
        self.reduction = reduction
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.ignore_index = int(ignore_index)
        if not -2 ** 63 <= self.ignore_index < 2 ** 63:
            raise ValueError(f"ignore_index must fit in int64, got {self.ignore_index}")
        self.s0 = s0
        self.s = _rows(s0)
        # The teacher is read in its own dtype, except that float64 meets float64 only: a float64
        # teacher for 16/32-bit students is converted once to float32 (their compute type), a
        # 16/32-bit teacher for a float64 student to float64 (exact).
        if (s0.dtype == np.float64) != (t0.dtype == np.float64):
            t0 = t0.astype(np.float64 if s0.dtype == np.float64 else np.float32)
        self.t = _rows(t0)
        self.V = self.s.shape[-1]
        self.rows_shape = self.s.shape[:-1]
        self.n = math.prod(self.rows_shape)
        self.target = None
        n_active = self.n
        if target is not None:
            if isinstance(target, (str, bytes, dict, set)):
                raise TypeError(f"target must be an integer array of the rows' shape, got {type(target).__name__}")
            tg = target if isinstance(target, np.ndarray) else as_array(target, "target")
            if tg.dtype.kind not in "iu":
                raise TypeError(f"target must be an integer array, got dtype {tg.dtype}")
            if tg.shape != self.rows_shape:
                raise ValueError(f"target has shape {tg.shape}, expected the rows' shape {self.rows_shape}")
            self.target = np.ascontiguousarray(tg.reshape(-1), dtype=np.int64)
            n_active = int(np.count_nonzero(self.target != self.ignore_index))
        self.denominator = {"batchmean": float(n_active), "mean": float(n_active) * self.V,
                            "sum": 1.0, "none": 1.0}[reduction]
        self.nthreads = resolve_num_threads(num_threads)

    def run(self, grad=None):
        row_loss = np.empty(self.n, dtype=np.float64)
        scale = 1.0
        if self.reduction in ("batchmean", "mean") and self.denominator:
            scale = 1.0 / self.denominator
        if self.n:
            _core.row_loss("kl_div_logits", [self.s, self.t], None if grad is None else [grad], self.target, None,
                           self.ignore_index, 0.0, 0.0, 0.0, self.T, False, scale, row_loss, self.nthreads)
        loss_dtype = np.dtype(np.float64) if self.s.dtype == np.float64 else np.dtype(np.float32)
        red = "none" if self.reduction == "none" else ("sum" if self.reduction == "sum" else "mean")
        return _reduce(row_loss, red, self.denominator, self.rows_shape, loss_dtype)


def kl_div_logits(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", ignore_index=-100,
                  target=None, num_threads=None):
    """Distillation loss: ``T**2 * KL(softmax(teacher / T) || softmax(student / T))`` per row.

    With a = teacher_logits / T, b = student_logits / T (classes on the last axis)::

        loss_row = T**2 * sum_j softmax(a)_j * (log_softmax(a)_j - log_softmax(b)_j)

    the same as ``F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
    reduction=...) * T**2`` in torch, with these differences: teacher entries of -inf (a masked
    vocabulary) have probability 0 and add 0 (torch's ``log_target=True`` form gives nan there;
    its probability form gives 0, as here), and ``"none"`` returns per-row losses (the rows'
    shape), not torch's elementwise (N, V) array.

    ``reduction``: ``"batchmean"`` (default) = sum over rows / number of non-ignored rows;
    ``"sum"``; ``"mean"`` = sum / (non-ignored rows x V) (torch's kl_div "mean"); ``"none"``.
    With no row to average, "batchmean" and "mean" are nan and "sum" is 0.

    Parameters
    ----------
    student_logits, teacher_logits : array_like, one shape (..., V)
        float16, float32, float64 or bfloat16; the class axis should be contiguous (any row
        strides, e.g. ``logits[:, :-1]``, are read in place; otherwise one copy).  Each is read
        in its own dtype and computed in float32 -- except float64: with a float64 student both
        are computed in float64 (a narrower teacher converted exactly), and a float64 teacher
        for a narrower student is converted once to float32.
    temperature : float, finite and > 0
    reduction : {"batchmean", "sum", "mean", "none"}
    ignore_index : int
    target : integer array of the rows' shape, optional
        Rows whose target equals ``ignore_index`` have loss 0 (gradient 0) and are left out of
        the denominators.  No other use is made of it.
    num_threads : int, optional
        Rows over threads (long rows split into parts when there are few); bitwise identical
        results for any thread count.

    Returns
    -------
    numpy.float32 (numpy.float64 for a float64 student) scalar, or per-row losses for "none".

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> s = np.array([[0.0, 1.0, 2.0]]); t = np.array([[0.0, 1.0, 4.0]])
    >>> round(float(fastloss.kl_div_logits(s, t, temperature=2.0)), 6)
    0.440155
    """
    return _KL(student_logits, teacher_logits, temperature, reduction, ignore_index, target, num_threads).run()


def kl_div_logits_with_grad(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean",
                            ignore_index=-100, target=None, num_threads=None, grad_out=None):
    """:func:`kl_div_logits` and its gradient with respect to the student logits: ``(loss, grad)``.

    ``grad`` (the student's shape and dtype) is the gradient of ``loss.sum()``:
    ``T * (softmax(student / T) - softmax(teacher / T))`` per row, divided by the reduction's
    denominator, 0 on ignored rows.  ``grad_out``: an array of the student's shape and dtype to
    write into, or ``student_logits`` itself (in place: no other N x V memory is used).

    >>> import numpy as np, fastloss
    >>> loss, grad = fastloss.kl_div_logits_with_grad(np.zeros((1, 2)), np.array([[0.0, np.log(3.0)]]))
    >>> grad
    array([[ 0.25, -0.25]])
    """
    kl = _KL(student_logits, teacher_logits, temperature, reduction, ignore_index, target, num_threads)
    inputs = {"teacher_logits": kl.t, "target": None if target is None else as_array(target, "target")}
    work, result = _grad_dest(grad_out, kl.s, student_logits, inputs, "grad_out", "student_logits")
    loss = kl.run(grad=work)
    return loss, _finish_grad(work, result)
