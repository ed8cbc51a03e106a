"""Cross-entropy over large vocabularies and the log-softmax family.

Semantics follow ``torch.nn.functional.cross_entropy`` (class weights, ``ignore_index``,
``reduction``, ``label_smoothing`` and its interaction with weights and ignored rows),
with NumPy arrays and these documented choices and extensions:

* classes are on ``axis`` (default: the last); the class axis should be contiguous for
  the fast path (any strides on the other axes, e.g. ``logits[:, :-1]``, are used without
  a copy); another ``axis`` or a strided class axis costs one copy of the logits.
* ``sample_weight``: per-row weights (broadcast to the rows' shape), multiplying the class
  weight of the row in the loss and in the denominator of the mean.
* ``z_loss=s`` adds ``s * logsumexp(row)**2`` per non-ignored row, weighted like the row's
  cross-entropy term (class weight x sample weight): the mean then divides both by the same
  sum of weights.  (Liger-Kernel adds it unweighted; without weights the two agree.)
* ``softcap=c`` replaces the logits by ``c * tanh(logits / c)`` inside the kernel, in the
  loss and the gradient (Gemma 2).
* the loss is float64 for float64 logits and float32 otherwise (never rounded to
  float16/bfloat16); the gradient has the logits' dtype.
* rows whose target is ``ignore_index`` have loss 0 and gradient 0 (whatever their logits).
* soft targets: a float ``target`` of the logits' shape holds class probabilities (torch's
  "probabilities" form; label smoothing mixes them with the uniform distribution).  Rows are
  used as given: negative entries or rows that do not sum to 1 are not checked (as torch);
  a NaN in a row makes that row's loss and gradient NaN.  ``"mean"`` divides by the number
  of rows (the sum of the sample weights), as torch, not by a sum of class weights;
  ``z_loss`` is weighted by the sample weight only; ``ignore_index >= 0`` is a ValueError
  (as torch).  A target in the logits' dtype is read in place (any row strides, class axis
  contiguous); another dtype is converted once to float32 (float64 for float64 logits).
  ``nll_loss`` and ``perplexity`` take class indices only.
"""
from __future__ import annotations

import math

import numpy as np

from fastloss import _core
from fastloss._config import resolve_num_threads
from fastloss._validation import as_array, as_float_array, check_grad_out, check_reduction

_F32_OVERFLOW = (2.0 - 2.0 ** -24) * 2.0 ** 127     # the smallest double that rounds to float32 inf

__all__ = ["cross_entropy", "cross_entropy_with_grad", "log_softmax", "softmax", "logsumexp", "nll_loss",
           "perplexity"]


def _class_axis(ndim: int, axis) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise np.exceptions.AxisError(int(axis), ndim, "axis")
    return int(axis) % ndim


def _rows_layout(x: np.ndarray, axis: int) -> np.ndarray:
    """`x` with the class axis last and of unit stride (a view when possible)."""
    if axis == x.ndim - 1:
        if x.shape[-1] <= 1 or x.strides[-1] == x.itemsize:
            return x
        return np.ascontiguousarray(x)
    v = np.moveaxis(x, axis, -1)
    if v.shape[-1] > 1 and v.strides[-1] != v.itemsize:
        v = np.ascontiguousarray(v)
    return v


def _loss_dtype(x: np.ndarray) -> np.dtype:
    return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


def _check_options(label_smoothing, z_loss, softcap):
    for name, v in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    ls, z = float(label_smoothing), float(z_loss)
    if not 0.0 <= ls <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not (math.isfinite(z) and z >= 0.0):
        raise ValueError(f"z_loss must be finite and >= 0, got {z_loss!r}")
    cap = 0.0
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float, np.integer, np.floating)):
            raise TypeError(f"softcap must be None or a real number, got {type(softcap).__name__}")
        cap = float(softcap)
        if not (math.isfinite(cap) and cap > 0.0):
            raise ValueError(f"softcap must be None or finite and > 0, got {softcap!r}")
    return ls, z, cap


def _is_float_dtype(dt: np.dtype) -> bool:
    return dt.kind == "f" or (dt.kind == "V" and dt.itemsize == 2 and dt.name == "bfloat16")


def _sum(a) -> float:
    """The sum of a (as float64), compensated: within ~1 ulp of the exact sum (np.sum's pairwise
    sum was measured several ulp off, which the chunked sums of fastloss.metrics/fastloss.dask
    could not match within 2 ulp).  inf/nan as np.sum (+inf + -inf is nan), no warning."""
    return _core.sum_f64(a)


def _int64(value, name: str) -> int:
    """An int option compared with int64 class indices (and passed to C as int64)."""
    v = int(value)
    if not -2 ** 63 <= v < 2 ** 63:
        raise ValueError(f"{name} must fit in int64, got {v}")
    return v


def _target_array(target) -> np.ndarray:
    if isinstance(target, np.ndarray):
        return target
    return as_array(target, "target")


def _soft_target(target, x0: np.ndarray, x: np.ndarray, axis: int, ignore_index: int):
    """Class probabilities laid out like the rows `x` (class axis last, unit stride), or None
    if `target` is not a float array of the logits' shape (then it holds class indices).

    Kept without a copy when its dtype is the logits' (any strides on the other axes); else
    converted to the kernel's compute type, float32 (float64 for float64 logits)."""
    if target is None or isinstance(target, (str, bytes, dict, set)):
        return None
    t = _target_array(target)
    if t.shape != x0.shape or not _is_float_dtype(t.dtype):
        return None
    t = as_float_array(t, "target")
    if ignore_index >= 0:
        raise ValueError(f"ignore_index={ignore_index} is not supported with class-probability targets (a float "
                         f"target of the logits' shape); use a negative ignore_index")
    q = np.moveaxis(t, axis, -1)
    compute = np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)
    if q.dtype != x.dtype and q.dtype != compute:
        return np.ascontiguousarray(q, dtype=compute)
    if q.shape[-1] > 1 and q.strides[-1] != q.itemsize:
        q = np.ascontiguousarray(q)
    return q


def _hard_target(target, logits_shape: tuple, axis: int, rows_shape: tuple, V: int, ignore_index: int,
                 func: str = "cross_entropy"):
    """The class-index target as a C-contiguous int64 array in row order, validated."""
    if target is None or isinstance(target, (str, bytes, dict)):
        raise TypeError(f"target must be an array of class indices, got {type(target).__name__}")
    t = _target_array(target)
    if _is_float_dtype(t.dtype) and t.shape == logits_shape:   # cross_entropy takes these before
        raise ValueError(f"{func} takes class indices (an integer target of shape {rows_shape}); class "
                         f"probabilities (a float target of the logits' shape {logits_shape}) are supported by "
                         f"cross_entropy only")
    if t.dtype.kind not in "iuf":
        raise TypeError(f"target must hold integer class indices (or be soft probabilities of the logits' "
                        f"shape), got dtype {t.dtype}")
    if t.dtype.kind in "iu" and t.shape == logits_shape and t.shape != rows_shape:
        raise TypeError(f"target has the logits' shape {t.shape} but integer dtype {t.dtype}: class indices "
                        f"have the shape {rows_shape}; probabilities must be floats")
    if t.shape != rows_shape:
        hint = ""
        nd = len(logits_shape)
        if axis == nd - 1 and nd >= 3 and t.shape == logits_shape[:1] + logits_shape[2:]:
            hint = f"; for (N, C, d1, ...) logits pass axis=1"
        raise ValueError(f"target has shape {t.shape}, expected {rows_shape} (the logits' shape "
                         f"{logits_shape} without the class axis){hint}")
    if t.dtype.kind == "f":
        raise TypeError(f"target must hold integer class indices, got dtype {t.dtype} (soft targets must have "
                        f"the logits' shape {logits_shape})")
    if t.dtype == np.uint64 and t.size and int(t.max()) > np.iinfo(np.int64).max:
        r = int(np.argmax(t.reshape(-1)))
        raise IndexError(f"target {int(t.reshape(-1)[r])} at row {r} is out of range for {V} classes")
    t64 = np.require(t, np.int64, ("C", "A")).reshape(-1)     # aligned too: C reads it as int64_t
    if t64.size == 0 or (0 <= int(t64.min()) and int(t64.max()) < V):
        return t64                                  # every target a class (the common case)
    bad = (t64 != ignore_index) & ((t64 < 0) | (t64 >= V))
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        where = np.unravel_index(r, rows_shape) if rows_shape else ()
        raise IndexError(f"target {int(t64[r])} at row {r} (target index {tuple(int(i) for i in where)}) is out "
                         f"of range for {V} classes (and is not ignore_index={ignore_index})")
    return t64


def _weights(weight, sample_weight, V: int, rows_shape: tuple):
    cw = None
    if weight is not None:
        cw = np.ascontiguousarray(as_float_array(weight, "weight"), dtype=np.float64)
        if cw.shape != (V,):
            raise ValueError(f"weight must have shape ({V},) (one weight per class), got {cw.shape}")
    sw = None
    if sample_weight is not None:
        s = as_float_array(sample_weight, "sample_weight")
        try:
            s = np.broadcast_to(s, rows_shape)
        except ValueError:
            raise ValueError(f"sample_weight of shape {s.shape} cannot be broadcast to the rows' shape "
                             f"{rows_shape}") from None
        sw = np.ascontiguousarray(s, dtype=np.float64).reshape(-1)
    return cw, sw


class _CE:
    """A cross-entropy call, checked and laid out for the kernel."""

    def __init__(self, logits, target, weight, sample_weight, ignore_index, reduction, label_smoothing, z_loss,
                 softcap, axis, num_threads):
        x0 = as_float_array(logits, "logits")
        if x0.ndim == 0:
            raise ValueError("logits must have at least one dimension (the classes)")
        self.logits = x0
        self.axis = _class_axis(x0.ndim, axis)
        self.x = _rows_layout(x0, self.axis)
        self.V = self.x.shape[-1]
        if self.V == 0:
            raise ValueError("logits have 0 classes")
        self.rows_shape = self.x.shape[:-1]
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.ignore_index = _int64(ignore_index, "ignore_index")
        self.reduction = check_reduction(reduction)
        self.ls, self.z, self.cap = _check_options(label_smoothing, z_loss, softcap)
        self.q = _soft_target(target, x0, self.x, self.axis, self.ignore_index)
        self.t = None if self.q is not None else _hard_target(target, x0.shape, self.axis, self.rows_shape, self.V,
                                                              self.ignore_index)
        self.cw, self.sw = _weights(weight, sample_weight, self.V, self.rows_shape)
        self.nthreads = resolve_num_threads(num_threads)
        if self.q is not None:          # torch: the mean over rows (here: over sample weights)
            self.denominator = _sum(self.sw) if self.sw is not None else float(math.prod(self.rows_shape))
        else:
            n = self.t.size
            if self.cw is None and self.sw is None:
                ignored = np.count_nonzero(self.t == self.ignore_index) if 0 <= self.ignore_index < self.V or (
                    n and int(self.t.min()) < 0) else 0
                self.denominator = float(n - ignored)
                self.loss_dtype = _loss_dtype(self.x)
                return
            active = self.t != self.ignore_index
            w_rows = np.where(active, self.cw[np.where(active, self.t, 0)] if self.cw is not None else 1.0, 0.0)
            if self.sw is not None:                 # ignored rows: 0 whatever their sample weight
                with np.errstate(invalid="ignore"):   # 0 * inf: nan, silently
                    w_rows = w_rows * np.where(active, self.sw, 0.0)
            self.denominator = _sum(w_rows)
        self.loss_dtype = _loss_dtype(self.x)

    def run(self, out=None):
        row_loss = np.empty(math.prod(self.rows_shape), dtype=np.float64)
        scale = 1.0
        if self.reduction == "mean":
            scale = 1.0 / self.denominator if self.denominator != 0 else math.inf
        if self.x.size:
            _core.cross_entropy_rows(
                self.x, out, "none" if out is None else "grad", self.t, self.cw,
                _sum(self.cw) if self.cw is not None else float(self.V), self.sw, self.ignore_index,
                self.ls, self.z, self.cap, scale, row_loss, None, self.nthreads, self.q)
        return self._reduce(row_loss)

    def _reduce(self, row_loss):
        if self.reduction == "none":
            return row_loss.astype(self.loss_dtype).reshape(self.rows_shape)
        total = _sum(row_loss)
        if self.reduction == "mean":
            total = total / self.denominator if self.denominator != 0 else math.nan
        if self.loss_dtype == np.float32 and math.isfinite(total) and abs(total) >= _F32_OVERFLOW:
            total = math.copysign(math.inf, total)      # as the cast would, without its warning
        return self.loss_dtype.type(total)


def cross_entropy(logits, target, *, weight=None, sample_weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None, axis=-1, num_threads=None):
    """Cross-entropy of logits against class indices or class probabilities,
    ``torch.nn.functional.cross_entropy``.

    Per row (classes on ``axis``), with x the logits (``softcap * tanh(logits / softcap)`` with
    a softcap), lse = log sum_j exp(x_j), eps = label_smoothing, w = class weights (W their sum),
    s = sample weight, and a class index t::

        loss = s * ((1 - eps) * w[t] * (lse - x[t]) + eps * (W * lse - sum_j w[j] x[j]) / V)
               + z_loss * s * w[t] * lse**2

    ``"mean"`` divides the sum over non-ignored rows by sum(s * w[t]) over those rows (nan if
    there are none); ``"sum"`` sums; ``"none"`` returns the per-row losses (0 for ignored rows).

    With class probabilities q (a float target of the logits' shape; q' = (1 - eps) q + eps / V)::

        loss = s * (sum_j w[j] q'[j] (lse - x[j]) + z_loss * lse**2)

    and ``"mean"`` divides by sum(s) (the number of rows without sample weights), as torch.

    Parameters
    ----------
    logits : array_like, shape (..., V) (classes on ``axis``)
        float16, float32, float64 or bfloat16; computed in float32 (float64 for float64)
        without an upcast copy, one read of each row.
    target : integer array of the logits' shape without the class axis, or float array of the
        logits' shape
        Class indices in [0, V), or ``ignore_index`` (out of range -> IndexError); or class
        probabilities (float16, float32, float64 or bfloat16; read in place in the logits'
        dtype, else converted once to float32, float64 for float64 logits).  Probabilities are
        not checked (negative entries or rows not summing to 1 are used as given, as torch);
        a NaN makes its row NaN.  ``ignore_index >= 0`` with probabilities -> ValueError.
    weight : array_like (V,), optional
        Per-class weights.
    sample_weight : array_like, broadcastable to the rows' shape, optional
    ignore_index : int
    reduction : {"mean", "sum", "none"}
    label_smoothing : float in [0, 1]
    z_loss : float >= 0
    softcap : float > 0, optional
    axis : int
        The class axis (default -1; for (N, C, d1, ...) layouts pass ``axis=1``).
    num_threads : int, optional
        Rows are spread over threads (long rows are split when there are few); the result
        is bitwise identical for every thread count.

    Returns
    -------
    numpy.float32 / numpy.float64 scalar, or an array of the rows' shape for ``"none"``.

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    >>> fastloss.cross_entropy(logits, np.array([0, 2]))
    np.float64(0.6699617926626334)
    >>> fastloss.cross_entropy(logits, np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]), reduction="none")
    array([0.2413113 , 1.09861229])
    """
    return _CE(logits, target, weight, sample_weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
               axis, num_threads).run()


def cross_entropy_with_grad(logits, target, *, weight=None, sample_weight=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None, axis=-1,
                            num_threads=None, grad_out=None):
    """:func:`cross_entropy` and its gradient with respect to the logits: ``(loss, grad)``.

    ``grad`` (the logits' shape and dtype) is the gradient of ``loss.sum()``: per row
    ``s * (p * ((1 - eps) w[t] + eps W / V + 2 z w[t] lse) - eps w / V - (1 - eps) w[t] onehot(t))``
    for a class index t, ``s * (p * (sum_j w[j] q'[j] + 2 z lse) - w q')`` for class
    probabilities q (q' = (1 - eps) q + eps / V), with p = softmax(x) (times
    ``1 - tanh(logits / c)**2`` with softcap), divided by the mean's denominator for
    ``"mean"``; 0 for ignored rows.  Each row is read for its statistics and then read and
    written for the gradient while it is still in cache; no other N x V array is made.

    ``grad_out``: an array of the logits' shape and dtype to write into, or ``logits`` itself
    (in place: the gradient overwrites the logits, no extra memory).

    >>> import numpy as np, fastloss
    >>> loss, grad = fastloss.cross_entropy_with_grad(np.zeros((1, 4)), np.array([1]))
    >>> grad
    array([[ 0.25, -0.75,  0.25,  0.25]])
    >>> loss, grad = fastloss.cross_entropy_with_grad(np.zeros((1, 4)), np.array([[0.0, 0.5, 0.5, 0.0]]))
    >>> grad
    array([[ 0.25, -0.25, -0.25,  0.25]])
    """
    ce = _CE(logits, target, weight, sample_weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
             axis, num_threads)
    x0 = ce.logits
    if grad_out is None:
        result = np.empty(ce.x.shape, dtype=x0.dtype)            # rows layout, class axis last
        loss = ce.run(out=result)
        return loss, np.moveaxis(result, -1, ce.axis)
    inputs = {"target": as_array(target, "target"),
              "weight": None if weight is None else as_array(weight, "weight"),
              "sample_weight": None if sample_weight is None else as_array(sample_weight, "sample_weight")}
    if grad_out is not logits:
        inputs["logits"] = x0
    result = check_grad_out(grad_out, x0.shape, x0.dtype, inputs, inplace_name="logits")
    loss = _into(result, ce.axis, ce.x.shape, lambda buf: ce.run(out=buf))
    return loss, result


def _into(out: np.ndarray, axis: int, rows_layout_shape: tuple, fill):
    """``fill(buf)`` where buf is `out` with the class axis moved last, if that axis has unit
    stride (the kernel's requirement), else a temporary copied into `out` afterwards."""
    work = np.moveaxis(out, axis, -1)
    if rows_layout_shape[-1] <= 1 or work.strides[-1] == work.itemsize:
        return fill(work)
    tmp = np.empty(rows_layout_shape, dtype=out.dtype)
    ret = fill(tmp)
    work[...] = tmp
    return ret


def _softmax_family(x, axis, out, num_threads, mode, name):
    x0 = as_float_array(x, "x")
    if x0.ndim == 0:
        raise ValueError(f"x must have at least one dimension (the class axis) for {name}")
    ax = _class_axis(x0.ndim, axis)
    v = _rows_layout(x0, ax)
    nthreads = resolve_num_threads(num_threads)

    def fill(buf):
        if v.size:
            _core.cross_entropy_rows(v, buf, mode, None, None, float(v.shape[-1]), None, -100, 0.0, 0.0, 0.0, 1.0,
                                     None, None, nthreads)

    if out is None:
        res = np.empty(v.shape, dtype=x0.dtype)
        fill(res)
        return np.moveaxis(res, -1, ax)
    inputs = {} if out is x else {"x": x0}
    out = check_grad_out(out, x0.shape, x0.dtype, inputs, name="out", inplace_name="x")
    _into(out, ax, v.shape, fill)
    return out


def log_softmax(x, axis=-1, *, out=None, num_threads=None):
    """``x - logsumexp(x, axis)``, stable for any finite logits (and -inf entries).

    Same shape and dtype as ``x``; ``out`` (same shape and dtype) may be ``x`` itself.

    >>> import numpy as np, fastloss
    >>> fastloss.log_softmax(np.array([0.0, np.log(3.0)]))
    array([-1.38629436, -0.28768207])
    """
    return _softmax_family(x, axis, out, num_threads, "log_softmax", "log_softmax")


def softmax(x, axis=-1, *, out=None, num_threads=None):
    """``exp(x - logsumexp(x, axis))``: rows that sum to 1.

    Same shape and dtype as ``x``; ``out`` may be ``x`` itself.

    >>> import numpy as np, fastloss
    >>> fastloss.softmax(np.array([0.0, np.log(3.0)]))
    array([0.25, 0.75])
    """
    return _softmax_family(x, axis, out, num_threads, "softmax", "softmax")


def logsumexp(x, axis=-1, *, num_threads=None):
    """``log(sum(exp(x), axis))`` computed stably in one read of each row.

    Returns an array of ``x``'s shape without ``axis`` (float64 for float64 input, float32
    otherwise); all ``-inf`` rows give ``-inf``, NaN gives NaN.

    >>> import numpy as np, fastloss
    >>> fastloss.logsumexp(np.array([[0.0, 0.0], [10.0, 11.0]]))
    array([ 0.69314718, 11.31326169])
    """
    x0 = as_float_array(x, "x")
    if x0.ndim == 0:
        raise ValueError("x must have at least one dimension (the class axis) for logsumexp")
    ax = _class_axis(x0.ndim, axis)
    v = _rows_layout(x0, ax)
    lse = np.empty(math.prod(v.shape[:-1]), dtype=np.float64)
    if v.shape[-1] == 0:
        lse[:] = -np.inf
    elif v.size:
        _core.cross_entropy_rows(v, None, "none", None, None, float(v.shape[-1]), None, -100, 0.0, 0.0, 0.0, 1.0,
                                 None, lse, resolve_num_threads(num_threads))
    return lse.astype(_loss_dtype(v)).reshape(v.shape[:-1])


def _log_probs_array(log_probs) -> np.ndarray:
    """``log_probs`` as a float array with a non-empty class axis (last), else the error."""
    x0 = as_float_array(log_probs, "log_probs")
    if x0.ndim == 0:
        raise ValueError("log_probs must have at least one dimension (the classes)")
    if x0.shape[-1] == 0:
        raise ValueError("log_probs have 0 classes")
    return x0


def _nll_rows(x0: np.ndarray, target, weight, ignore_index: int):
    """Per row (flattened, float64): the loss -w[t] x[t] and the weight w[t], both 0 on ignored
    rows (w = class weights, 1 without).  Used by nll_loss and its streaming accumulator."""
    V = x0.shape[-1]
    rows_shape = x0.shape[:-1]
    t = _hard_target(target, x0.shape, x0.ndim - 1, rows_shape, V, ignore_index, func="nll_loss")
    cw, _ = _weights(weight, None, V, rows_shape)
    active = t != ignore_index
    safe_t = np.where(active, t, 0)
    picked = np.take_along_axis(x0.reshape(-1, V), safe_t[:, None], axis=1)[:, 0].astype(np.float64)
    w = np.where(active, cw[safe_t] if cw is not None else 1.0, 0.0)
    with np.errstate(invalid="ignore"):
        per_row = np.where(active, -w * picked, 0.0)
    return per_row, w


def nll_loss(log_probs, target, *, weight=None, ignore_index=-100, reduction="mean", num_threads=None):
    """Negative log-likelihood of log-probabilities, ``torch.nn.functional.nll_loss``.

    loss_i = -w[t_i] * log_probs[i, t_i] (0 for ignored rows); ``"mean"`` divides by the sum
    of w[t_i] over non-ignored rows.  ``log_probs``: (..., V), classes on the last axis;
    ``target``: integer array of the rows' shape.  Reads one element per row.

    >>> import numpy as np, fastloss
    >>> fastloss.nll_loss(np.log(np.array([[0.5, 0.5], [0.25, 0.75]])), np.array([0, 1]))
    np.float64(0.4904146265058631)
    """
    x0 = _log_probs_array(log_probs)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    _int64(ignore_index, "ignore_index")
    reduction = check_reduction(reduction)
    resolve_num_threads(num_threads)          # validated; the gather is O(rows)
    rows_shape = x0.shape[:-1]
    per_row, w = _nll_rows(x0, target, weight, int(ignore_index))
    dt = _loss_dtype(x0)
    if reduction == "none":
        return per_row.astype(dt).reshape(rows_shape)
    total = _sum(per_row)
    if reduction == "mean":
        den = _sum(w)
        total = total / den if den != 0 else math.nan
    return dt.type(total)


def perplexity(logits, target, *, ignore_index=-100, num_threads=None):
    """``exp`` of the mean cross-entropy over the non-ignored tokens (class-index targets only).

    >>> import numpy as np, fastloss
    >>> fastloss.perplexity(np.zeros((3, 10)), np.array([1, 2, 3]))
    np.float64(10.000000000000002)
    """
    if target is not None and not isinstance(target, (str, bytes, dict, set)):
        t = _target_array(target)
        if _is_float_dtype(t.dtype) and t.shape == np.shape(logits):
            raise ValueError(f"perplexity takes class indices (an integer target of the logits' shape without the "
                             f"class axis); class probabilities (a float target of the logits' shape {t.shape}) are "
                             f"supported by cross_entropy only")
    ce = cross_entropy(logits, target, ignore_index=ignore_index, reduction="mean", num_threads=num_threads)
    with np.errstate(over="ignore"):
        return type(ce)(np.exp(np.float64(ce)))
