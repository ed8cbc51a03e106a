"""Streaming accumulators: every loss of fastloss over data that arrives in chunks.

``accumulator(name, **options)`` returns an :class:`Accumulator` for the public loss
function ``name`` (e.g. ``"mse_loss"``, ``"cross_entropy"``); ``update(input, target, ...)``
adds a chunk, ``merge(other)`` adds another accumulator's data (e.g. from another worker),
``result()`` is what the one-shot function with the same options returns on the
concatenation of every chunk, ``reset()`` forgets the data.

Design
------
Every reducible loss is ``num / den``: a sum of (weighted) per-element or per-row losses
divided by a denominator that is also a sum (the sum of weights, the element count, the
number of non-ignored rows, ...), or ``num`` alone for ``reduction="sum"``.  Each chunk's
``num`` and ``den`` come out of the C kernels in float64 (``_core.pointwise`` returns the
double sums of its fixed blocks; for float64 input, and for the row kernels' double row
losses, ``_core.sum_f64`` gives each chunk's sum as a (sum, compensation) pair), never
rounded to float32; the accumulator adds them with Neumaier's compensated summation (a
running sum and its error term).  So the result over any chunking, in any merge order,
equals the one-shot result within 2 ulp of the result dtype (the one-shot result's own
rounding included); a perplexity, exp of such a mean, multiplies the mean's error by
|log ppl| (float64: 2 + 2 ceil|log ppl| ulp).  The state is plain float64 (Python floats,
small NumPy arrays, ints): accumulators pickle.

The result dtype follows the one-shot function on the concatenated data: float64 if any
chunk was float64, else float32.  Empty accumulator (no update, or only empty chunks):
``reduction="mean"`` gives NaN (like the one-shot mean of nothing), ``"sum"`` gives 0; the
dtype is float64 when no chunk was seen at all.

Classes (``loss`` name -> class): ``mse_loss``/``mse`` :class:`MSELoss`, ``l1_loss``/``mae``
:class:`L1Loss`, ``huber_loss`` :class:`HuberLoss`, ``smooth_l1_loss`` :class:`SmoothL1Loss`,
``rmse`` :class:`RMSE`, ``binary_cross_entropy`` :class:`BCELoss`,
``binary_cross_entropy_with_logits`` :class:`BCEWithLogitsLoss`, ``sigmoid_focal_loss``
:class:`SigmoidFocalLoss`, ``hinge_loss`` :class:`HingeLoss`, ``kl_div`` :class:`KLDivLoss`,
``cross_entropy`` :class:`CrossEntropy`, ``perplexity`` :class:`Perplexity`, ``nll_loss``
:class:`NLLLoss`, ``multi_margin_loss`` :class:`MultiMarginLoss`, ``triplet_margin_loss``
:class:`TripletMarginLoss` (``update(anchor, positive, negative)``), ``kl_div_logits``
:class:`KLDivLogits` (``update(student_logits, teacher_logits, target=None)``).

Not covered: ``dpo_loss``, ``info_nce_loss`` and ``sequence_log_probs``.  DPO's per-pair loss
does stream, but the function's options (reference-free, label smoothing, ...) make it a
pairwise-batch objective rather than a metric; InfoNCE's rows are contrastive against the
other rows of the same batch, so its value depends on the batching and no chunked result can
equal a one-shot one; sequence_log_probs returns per-sequence values, not a reduced loss.

Options: the loss's keyword options, fixed at construction (``reduction`` in {"mean", "sum"},
plus ``"batchmean"`` for the KL losses; ``axis`` is not an option: reductions are over
everything, or over the samples for :class:`RMSE`); per-chunk data operands (``weight`` for
the regression and binary losses, ``pos_weight``, ``sample_weight``, ``target`` of
kl_div_logits) are keywords of ``update``.  ``update`` also accepts the options themselves
(ValueError unless equal to the constructor's) and ``num_threads``.

>>> import numpy as np
>>> from fastloss import metrics
>>> acc = metrics.accumulator("mse_loss")
>>> acc.update(np.array([1.0, 2.0]), np.zeros(2)).update(np.array([3.0]), np.zeros(1)).result()
np.float64(4.666666666666667)
"""
from __future__ import annotations

import math

import numpy as np

from fastloss import _core, classification, distillation, elementwise, margin, regression
from fastloss._config import resolve_num_threads
from fastloss._validation import as_float_array, check_positive, check_reduction, result_float_dtype

__all__ = ["accumulator", "Accumulator", "MSELoss", "L1Loss", "HuberLoss", "SmoothL1Loss", "RMSE", "BCELoss",
           "BCEWithLogitsLoss", "SigmoidFocalLoss", "HingeLoss", "KLDivLoss", "CrossEntropy", "Perplexity",
           "NLLLoss", "MultiMarginLoss", "TripletMarginLoss", "KLDivLogits", "ACCUMULATORS"]

_F32_OVERFLOW = margin._F32_OVERFLOW     # the smallest double that rounds to float32 inf


# ---- compensated sums -----------------------------------------------------------------------

def _add(acc: list, x) -> None:
    """Neumaier's compensated addition of x into acc = [sum, error]; x may be a (sum, compensation)
    pair (:func:`_psum`): both parts are added."""
    if isinstance(x, tuple):
        _add(acc, x[0])
        _add(acc, x[1])
        return
    s = acc[0]
    t = s + x
    if not math.isfinite(t):            # inf / nan: the error term would become nan
        acc[0] = t
        return
    if abs(s) >= abs(x):
        acc[1] += (s - t) + x
    else:
        acc[1] += (x - t) + s
    acc[0] = t


def _add_vec(acc: list, x: np.ndarray) -> None:
    """The elementwise Neumaier addition of the float64 array x into acc = [sums, errors]."""
    s, c = acc
    with np.errstate(invalid="ignore", over="ignore"):
        t = s + x
        err = np.where(np.abs(s) >= np.abs(x), (s - t) + x, (x - t) + s)
        fin = np.isfinite(t)
        acc[1] = np.where(fin, c + err, c)
    acc[0] = t


def _value(acc) -> float:
    return acc[0] + acc[1] if math.isfinite(acc[0]) else acc[0]


def _value_vec(acc) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(np.isfinite(acc[0]), acc[0] + acc[1], acc[0])


def _fsum(a: np.ndarray) -> float:
    """The correctly rounded sum of float64 values (np.sum where fsum cannot: inf - inf, overflow)."""
    if a.size == 0:
        return 0.0
    try:
        return math.fsum(a.tolist())
    except (ValueError, OverflowError):
        with np.errstate(invalid="ignore", over="ignore"):
            return float(np.sum(a))


def _psum(a: np.ndarray):
    """The sum of float64 values as a (sum, compensation) pair whose exact sum is within a few
    units of 2^-106 of the exact one (``_core.sum_f64``, compensated lanes): merged into an
    accumulator as both parts, a chunk's sum is not rounded to one double first."""
    a = np.ravel(a)
    if a.size == 0:
        return (0.0, 0.0)
    s, c = _core.sum_f64(a, with_comp=True)
    return (s, c) if math.isfinite(s) and math.isfinite(c) else (s, 0.0)


def _divide(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


def _cast(value: float, f64: bool | None):
    """A float64 value -> the result scalar: float64, or float32 (inf beyond its range, no warning)."""
    if f64 is None or f64:
        return np.float64(value)
    if math.isfinite(value) and abs(value) >= _F32_OVERFLOW:
        value = math.copysign(math.inf, value)
    return np.float32(value)


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if a is None or b is None:
            return False
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))
    if isinstance(a, tuple) or isinstance(b, tuple):
        return tuple(a) == tuple(b) if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) else False
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _index(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    v = int(value)
    if not -2 ** 63 <= v < 2 ** 63:
        raise ValueError(f"{name} must fit in int64, got {v}")
    return v


def _pointwise_sums(op, param, param2, p, pw=None):
    """(sum of w*l, sum of w, number outside the domain) of a prepared pointwise call (all axes).

    float64 input: the elementwise double losses from the kernel, summed by ``_core.sum_f64``
    as a (sum, compensation) pair (the float64 result is then within an ulp of exact over any
    chunking); otherwise the kernel's double block sums (error far below a float32 ulp)."""
    n = p.x.size
    if n == 0:
        return 0.0, 0.0, 0
    if p.x.dtype == np.float64:
        e = np.empty(p.x.shape, np.float64)
        nbad = _core.pointwise(op, param, p.x, p.t, p.w, None, e, p.x.ndim, None, None, None, p.nthreads, param2, pw)
        den = _psum(p.w) if p.w is not None else float(n)
        return _psum(e), den, nbad
    swl, sw = np.zeros(1), np.zeros(1)
    nbad = _core.pointwise(op, param, p.x, p.t, p.w, None, None, p.x.ndim, swl, sw, None, p.nthreads, param2, pw)
    return float(swl[0]), float(sw[0]), nbad


# ---- the base class ---------------------------------------------------------------------------

class Accumulator:
    """Streaming state of one loss: ``update``, ``merge``, ``result``, ``reset``; picklable.

    Subclasses define ``loss`` (the function name), ``_DEFAULTS`` (its options and their
    defaults), ``_DATA`` (the per-chunk keyword operands of ``update``), ``_check`` (options
    -> validated options) and ``_chunk`` (one chunk -> float64 ``(num, den, is_float64)``).
    """

    loss: str = ""
    _DEFAULTS: dict = {}
    _DATA: tuple = ()
    _REDUCTIONS: tuple = ("mean", "sum")

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self._DEFAULTS))
        if unknown:
            raise TypeError(f"{self.loss} accumulator: unknown option(s) {', '.join(unknown)} (options: "
                            f"{', '.join(self._DEFAULTS) or 'none'}; per-chunk data such as "
                            f"{', '.join(self._DATA) or 'nothing'} goes to update())")
        opts = dict(self._DEFAULTS)
        opts.update(options)
        if "reduction" in opts:
            r = opts["reduction"]
            if not isinstance(r, str) or r not in self._REDUCTIONS:
                raise ValueError(f"reduction must be one of {', '.join(map(repr, self._REDUCTIONS))} for a streaming "
                                 f"accumulator, got {r!r}")
        self.options = self._check(opts)
        self.reset()

    # -- to define in subclasses --
    def _check(self, opts: dict) -> dict:
        return opts

    def _chunk(self, operands, data, nthreads):
        raise NotImplementedError

    # -- the state --
    def reset(self) -> "Accumulator":
        """Forget every chunk (the options stay)."""
        self._num = [0.0, 0.0]
        self._den = [0.0, 0.0]
        self._f64 = None            # None: no chunk seen; else whether the result is float64
        self.n_updates = 0
        return self

    def _split_kw(self, kw: dict):
        nthreads = resolve_num_threads(kw.pop("num_threads", None))
        data = {}
        for k, v in kw.items():
            if k in self._DATA:
                data[k] = v
            elif k in self.options:
                if not _same(self._check({**self.options, k: v})[k], self.options[k]):
                    raise ValueError(f"{k}={v!r} differs from this accumulator's {k}={self.options[k]!r} (options "
                                     f"are fixed at construction)")
            else:
                raise TypeError(f"{self.loss} accumulator: update() got an unexpected keyword {k!r}")
        return data, nthreads

    def update(self, *operands, **kw) -> "Accumulator":
        """Add one chunk: the same operands and keywords as the one-shot function (options must
        equal the constructor's).  Returns self.  Bad input raises before the state changes."""
        data, nthreads = self._split_kw(dict(kw))
        num, den, f64 = self._chunk(operands, data, nthreads)
        self._absorb(num, den, f64)
        self.n_updates += 1
        return self

    def _absorb(self, num, den, f64):
        _add(self._num, num)
        _add(self._den, den)
        self._f64 = f64 if self._f64 is None else (self._f64 or f64)

    def _check_other(self, other):
        if type(other) is not type(self) or other.loss != self.loss:
            raise ValueError(f"cannot merge a {type(other).__name__}({getattr(other, 'loss', '?')!r}) accumulator "
                             f"into a {type(self).__name__}({self.loss!r}) one")
        for k in self.options:
            if not _same(self.options[k], other.options[k]):
                raise ValueError(f"cannot merge accumulators with different options: {k}={other.options[k]!r} vs "
                                 f"{self.options[k]!r}")

    def merge(self, other: "Accumulator") -> "Accumulator":
        """Add the data of `other` (same loss and options, else ValueError) in place; returns self."""
        self._check_other(other)
        for mine, theirs in ((self._num, other._num), (self._den, other._den)):
            _add(mine, theirs[0])
            _add(mine, theirs[1])
        if other._f64 is not None:
            self._f64 = other._f64 if self._f64 is None else (self._f64 or other._f64)
        self.n_updates += other.n_updates
        return self

    def _mean_or_sum(self) -> float:
        num = _value(self._num)
        if self.options.get("reduction", "mean") == "sum":
            return num
        return _divide(num, _value(self._den))

    def result(self):
        """The one-shot function's result on all the data seen (NumPy scalar)."""
        return _cast(self._mean_or_sum(), self._f64)

    def __repr__(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return (f"{type(self).__name__}({opts})<loss={self.loss!r}, updates={self.n_updates}, "
                f"sum={_value(self._num)!r}, denominator={_value(self._den)!r}>")


# ---- regression -------------------------------------------------------------------------------

class _Regression(Accumulator):
    _DEFAULTS = {"reduction": "mean"}
    _DATA = ("weight",)
    _op = ""

    def _param(self) -> float:
        return 0.0

    def _chunk(self, operands, data, nthreads):
        if len(operands) != 2:
            raise TypeError(f"{self.loss} update() takes (input, target), got {len(operands)} positional arguments")
        p = regression._prepare(operands[0], operands[1], data.get("weight"), "mean", None, nthreads)
        num, den, _ = _pointwise_sums(self._op, self._param(), 0.0, p)
        return num, den, p.loss_dtype == np.float64


class MSELoss(_Regression):
    """Streaming :func:`fastloss.mse_loss`: sum w (x - t)^2 / sum w (``"mean"``) or the sum.

    >>> import numpy as np
    >>> MSELoss().update(np.ones(3, np.float32), np.zeros(3, np.float32)).result()
    np.float32(1.0)
    """
    loss = "mse_loss"
    _op = "mse"


class L1Loss(_Regression):
    """Streaming :func:`fastloss.l1_loss` (mean absolute error)."""
    loss = "l1_loss"
    _op = "l1"


class HuberLoss(_Regression):
    """Streaming :func:`fastloss.huber_loss` (option ``delta``)."""
    loss = "huber_loss"
    _DEFAULTS = {"reduction": "mean", "delta": 1.0}
    _op = "huber"

    def _check(self, opts):
        opts["delta"] = check_positive(opts["delta"], "delta")
        return opts

    def _param(self):
        return self.options["delta"]


class SmoothL1Loss(_Regression):
    """Streaming :func:`fastloss.smooth_l1_loss` (option ``beta``; beta = 0 is L1)."""
    loss = "smooth_l1_loss"
    _DEFAULTS = {"reduction": "mean", "beta": 1.0}

    def _check(self, opts):
        opts["beta"] = check_positive(opts["beta"], "beta", allow_zero=True)
        return opts

    @property
    def _op(self):
        return "smooth_l1" if self.options["beta"] > 0 else "l1"

    def _param(self):
        return self.options["beta"] if self.options["beta"] > 0 else 0.0


class RMSE(Accumulator):
    """Streaming root-mean-squared error.

    ``multioutput=None`` (default): :func:`fastloss.rmse` over all elements,
    sqrt(sum w (x - t)^2 / sum w), with per-element ``weight`` in ``update``.

    ``multioutput="raw_values"``: one RMSE per output column, reducing over the first axis
    (the samples) as scikit-learn's ``root_mean_squared_error(y_true, y_pred,
    multioutput="raw_values")``: out_j = sqrt(sum_i s_i (x_ij - t_ij)^2 / sum_i s_i) with
    per-sample weights ``sample_weight`` (shape (n,)) in ``update``; the result is an array
    of ``input.shape[1:]``.  ``"uniform_average"``: the plain mean of those values (a scalar;
    not the RMSE over all elements).  Note the argument order: ``update(input=y_pred,
    target=y_true)`` (the squared error is symmetric).  No sample yet: NaN values.

    >>> import numpy as np
    >>> acc = RMSE(multioutput="raw_values")
    >>> acc.update(np.array([[1.0, 2.0], [3.0, 2.0]]), np.zeros((2, 2))).result()
    array([2.23606798, 2.        ])
    """
    loss = "rmse"
    _DEFAULTS = {"multioutput": None}
    _DATA = ("weight", "sample_weight")

    def _check(self, opts):
        mo = opts["multioutput"]
        if mo is not None and (not isinstance(mo, str) or mo not in ("raw_values", "uniform_average")):
            raise ValueError(f"multioutput must be None, 'raw_values' or 'uniform_average', got {mo!r}")
        return opts

    def reset(self):
        super().reset()
        self._out_shape = None
        return self

    def _chunk(self, operands, data, nthreads):
        if len(operands) != 2:
            raise TypeError(f"rmse update() takes (input, target), got {len(operands)} positional arguments")
        x, t = operands
        if self.options["multioutput"] is None:
            if data.get("sample_weight") is not None:
                raise TypeError("sample_weight needs multioutput='raw_values' or 'uniform_average'; use weight")
            p = regression._prepare(x, t, data.get("weight"), "mean", None, nthreads)
            num, den, _ = _pointwise_sums("mse", 0.0, 0.0, p)
            return num, den, p.loss_dtype == np.float64
        if data.get("weight") is not None:
            raise TypeError("with multioutput, per-sample weights are sample_weight (shape (n,)), not weight")
        xa = as_float_array(x, "input")
        if xa.ndim == 0:
            raise ValueError("input must have at least one dimension (the samples) with multioutput")
        w = data.get("sample_weight")
        if w is not None:
            w = as_float_array(w, "sample_weight")
            if w.shape != xa.shape[:1]:
                raise ValueError(f"sample_weight must have shape {xa.shape[:1]} (one weight per sample), got "
                                 f"{w.shape}")
            w = w.reshape(w.shape + (1,) * (xa.ndim - 1))
        if self._out_shape is not None and xa.shape[1:] != self._out_shape:
            raise ValueError(f"input has outputs of shape {xa.shape[1:]}, earlier chunks had {self._out_shape}")
        p = regression._prepare(xa, t, w, "mean", 0, nthreads)
        if p.x.dtype == np.float64 and p.x.size:     # per output: fsum of the elementwise losses (see above)
            e = np.empty(p.x.shape, np.float64)
            _core.pointwise("mse", 0.0, p.x, p.t, p.w, None, e, p.x.ndim, None, None, None, p.nthreads)
            e = e.reshape(p.n_out, -1)
            wv = None if p.w is None else np.broadcast_to(p.w, p.x.shape).reshape(p.n_out, -1)
            swl = np.array([_fsum(row) for row in e])
            sw = np.full(p.n_out, float(e.shape[1])) if wv is None else np.array([_fsum(row) for row in wv])
        else:
            swl, sw = regression._sums(p, "mse", 0.0)
        return swl.reshape(p.out_shape), sw.reshape(p.out_shape), p.loss_dtype == np.float64

    def _absorb(self, num, den, f64):
        if self.options["multioutput"] is None:
            return super()._absorb(num, den, f64)
        if self._out_shape is None:
            self._out_shape = num.shape
            self._num = [np.zeros(num.shape), np.zeros(num.shape)]
            self._den = [np.zeros(num.shape), np.zeros(num.shape)]
        _add_vec(self._num, num)
        _add_vec(self._den, den)
        self._f64 = f64 if self._f64 is None else (self._f64 or f64)

    def merge(self, other):
        if self.options["multioutput"] is None:
            return super().merge(other)
        self._check_other(other)
        if other._out_shape is None:
            return self
        if self._out_shape is not None and self._out_shape != other._out_shape:
            raise ValueError(f"cannot merge RMSE accumulators over outputs of shapes {other._out_shape} and "
                             f"{self._out_shape}")
        self._absorb(other._num[0], other._den[0], other._f64)
        _add_vec(self._num, other._num[1])
        _add_vec(self._den, other._den[1])
        self.n_updates += other.n_updates
        return self

    def result(self):
        mo = self.options["multioutput"]
        if mo is None:
            return _cast(math.sqrt(_divide(_value(self._num), _value(self._den))), self._f64)
        if self._out_shape is None:
            raw = np.full((), np.nan)   # nothing seen: NaN (its shape is not known yet)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                raw = np.sqrt(_value_vec(self._num) / _value_vec(self._den))
        if mo == "uniform_average":
            return _cast(float(np.mean(raw)), self._f64)
        dt = np.float32 if self._f64 is False else np.float64
        with np.errstate(over="ignore"):
            return raw.astype(dt)

    def __repr__(self):
        return f"RMSE(multioutput={self.options['multioutput']!r})<updates={self.n_updates}>"


# ---- elementwise (probabilities, scores) ------------------------------------------------------

class _Elementwise(Accumulator):
    """torch's "mean" of these losses divides by the element count, also with weights."""
    _DEFAULTS = {"reduction": "mean"}
    _DATA = ()

    def _op_params(self):
        raise NotImplementedError

    def _chunk(self, operands, data, nthreads):
        if len(operands) != 2:
            raise TypeError(f"{self.loss} update() takes (input, target), got {len(operands)} positional arguments")
        op, param, param2 = self._op_params()
        allowed = ("mean", "batchmean", "sum", "none")
        p = elementwise._prepare(operands[0], operands[1], data.get("weight"), data.get("pos_weight"), "sum",
                                 nthreads, allowed)
        n = math.prod(p.shape)
        num, _, nbad = _pointwise_sums(op, param, param2, p, p.pw)
        if nbad:
            raise elementwise._domain_error(op, p)
        if self.options["reduction"] == "batchmean":
            den = float(p.shape[0]) if len(p.shape) else 1.0
        else:
            den = float(n)
        return num, den, p.loss_dtype == np.float64


class BCELoss(_Elementwise):
    """Streaming :func:`fastloss.binary_cross_entropy` (``weight`` per chunk in ``update``)."""
    loss = "binary_cross_entropy"
    _DATA = ("weight",)

    def _op_params(self):
        return "bce", 0.0, 0.0


class BCEWithLogitsLoss(_Elementwise):
    """Streaming :func:`fastloss.binary_cross_entropy_with_logits` (``weight``, ``pos_weight`` in ``update``)."""
    loss = "binary_cross_entropy_with_logits"
    _DATA = ("weight", "pos_weight")

    def _op_params(self):
        return "bce_logits", 0.0, 0.0


class SigmoidFocalLoss(_Elementwise):
    """Streaming :func:`fastloss.sigmoid_focal_loss` (options ``alpha``, ``gamma``)."""
    loss = "sigmoid_focal_loss"
    _DEFAULTS = {"reduction": "mean", "alpha": 0.25, "gamma": 2.0}

    def _check(self, opts):
        opts["alpha"] = elementwise._check_real(opts["alpha"], "alpha")
        opts["gamma"] = elementwise._check_real(opts["gamma"], "gamma", minimum=0.0)
        return opts

    def _op_params(self):
        return "focal", self.options["gamma"], self.options["alpha"]


class HingeLoss(_Elementwise):
    """Streaming :func:`fastloss.hinge_loss` (option ``margin``)."""
    loss = "hinge_loss"
    _DEFAULTS = {"reduction": "mean", "margin": 1.0}

    def _check(self, opts):
        opts["margin"] = elementwise._check_real(opts["margin"], "margin")
        return opts

    def _op_params(self):
        return "hinge", self.options["margin"], 0.0


class KLDivLoss(_Elementwise):
    """Streaming :func:`fastloss.kl_div` (options ``log_target``; reduction also ``"batchmean"``:
    the sum divided by the total number of samples, the first axis of every chunk)."""
    loss = "kl_div"
    _DEFAULTS = {"reduction": "mean", "log_target": False}
    _REDUCTIONS = ("mean", "batchmean", "sum")

    def _check(self, opts):
        elementwise._kl_op(opts["log_target"])
        opts["log_target"] = bool(opts["log_target"])
        return opts

    def _op_params(self):
        return elementwise._kl_op(self.options["log_target"]), 0.0, 0.0


# ---- cross-entropy family ---------------------------------------------------------------------

def _check_topk(topk) -> tuple:
    """() (None or empty: no accuracy, no rank counted) or the sorted distinct positive ks."""
    if topk is None or (isinstance(topk, (tuple, list)) and not topk):
        return ()
    if isinstance(topk, (int, np.integer)) and not isinstance(topk, bool):
        topk = (topk,)
    if not isinstance(topk, (tuple, list)) or not topk:
        raise TypeError(f"topk must be a tuple of positive ints, got {topk!r}")
    out = []
    for k in topk:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"topk must hold positive ints, got {k!r}")
        out.append(int(k))
    return tuple(sorted(set(out)))


def _ce_rows(ce, want_rank: bool):
    """Row losses (float64) and, for a hard target, each row's rank of its target (-1: ignored),
    counted by the kernel in the pass that reads the row (``fl_ce_job.row_rank``)."""
    n = math.prod(ce.rows_shape)
    row_loss = np.empty(n, dtype=np.float64)
    rank = np.empty(n, dtype=np.int64) if (want_rank and ce.t is not None) else None
    if ce.x.size:
        _core.cross_entropy_rows(ce.x, None, "none", ce.t, ce.cw,
                                 classification._sum(ce.cw) if ce.cw is not None else float(ce.V),
                                 ce.sw, ce.ignore_index, ce.ls, ce.z, ce.cap, 1.0, row_loss, None, ce.nthreads, ce.q,
                                 row_rank=rank)
    elif rank is not None:
        rank[:] = np.where(ce.t == ce.ignore_index, -1, 0)
    return row_loss, rank


def _ce_denominator(ce) -> float:
    """The denominator of the one-shot mean (classification._CE.denominator), as a compensated
    (sum, compensation) pair from ``_core.sum_f64`` where it is a sum of weights."""
    n = math.prod(ce.rows_shape)
    if ce.q is not None:
        return _psum(ce.sw) if ce.sw is not None else float(n)
    active = ce.t != ce.ignore_index
    if ce.cw is None and ce.sw is None:
        return float(np.count_nonzero(active))
    w_rows = np.where(active, ce.cw[np.where(active, ce.t, 0)] if ce.cw is not None else 1.0, 0.0)
    if ce.sw is not None:
        with np.errstate(invalid="ignore"):
            w_rows = w_rows * np.where(active, ce.sw, 0.0)
    return _psum(w_rows)


class CrossEntropy(Accumulator):
    """Streaming :func:`fastloss.cross_entropy`, with perplexity and (top-k) accuracy.

    Options: ``weight`` (class weights, (V,)), ``ignore_index``, ``reduction``,
    ``label_smoothing``, ``z_loss``, ``softcap``, ``axis`` and ``topk`` (default (1, 5);
    None: no accuracy, and the kernel skips the rank count, ~5-15 % of its time).
    ``update(logits, target, sample_weight=None)``: class indices or class probabilities.

    * :meth:`result`: the one-shot ``cross_entropy`` on all rows: sum of row losses divided
      by the sum of (class weight x sample weight) over non-ignored rows (the token count
      without weights) for ``"mean"``.
    * :meth:`perplexity`: ``exp`` of that mean (= :func:`fastloss.perplexity` without
      weights, label smoothing or z-loss); reported for ``reduction="sum"`` too.
    * :meth:`accuracy`, :meth:`topk_accuracy`: the fraction of non-ignored rows whose target
      is the argmax (first index on ties, as ``np.argmax``) / among the k largest logits
      (ties ranked by index), unweighted, from the kernel's per-row rank of the target,
      computed in the same pass.  NaN logits are ordered above every number (as ``np.argmax``):
      a NaN elsewhere in the row makes it a miss, a NaN target logit ranks after the NaN before it.
      Class-probability targets have no accuracy (NaN).  With ``softcap`` the ranks are of the
      capped logits (what the loss sees): logits that saturate the cap tie and are then ordered
      by index, so a raw argmax can count as a miss.
    * :meth:`summary`: a dict of all of them.

    >>> import numpy as np
    >>> acc = CrossEntropy(topk=(1, 2))
    >>> _ = acc.update(np.array([[2.0, 1.0, 0.0]]), np.array([0]))
    >>> _ = acc.update(np.array([[2.0, 1.0, 0.0]]), np.array([1]))
    >>> acc.result(), acc.accuracy(), acc.topk_accuracy(2)
    (np.float64(0.9076059644443806), 0.5, 1.0)
    """
    loss = "cross_entropy"
    _DEFAULTS = {"weight": None, "ignore_index": -100, "reduction": "mean", "label_smoothing": 0.0, "z_loss": 0.0,
                 "softcap": None, "axis": -1, "topk": (1, 5)}
    _DATA = ("sample_weight",)

    def _check(self, opts):
        opts["ignore_index"] = _index(opts["ignore_index"], "ignore_index")
        ls, z, cap = classification._check_options(opts["label_smoothing"], opts["z_loss"], opts["softcap"])
        opts["label_smoothing"], opts["z_loss"] = ls, z
        opts["softcap"] = None if opts["softcap"] is None else cap
        if isinstance(opts["axis"], bool) or not isinstance(opts["axis"], (int, np.integer)):
            raise TypeError(f"axis must be an int, got {type(opts['axis']).__name__}")
        opts["axis"] = int(opts["axis"])
        if opts["weight"] is not None:
            w = np.ascontiguousarray(as_float_array(opts["weight"], "weight"), dtype=np.float64)
            if w.ndim != 1:
                raise ValueError(f"weight must have shape (V,) (one weight per class), got {w.shape}")
            opts["weight"] = w
        opts["topk"] = _check_topk(opts["topk"])
        return opts

    def reset(self):
        super().reset()
        self.n_rows = 0
        self.n_tokens = 0           # non-ignored rows with a class-index target
        self._hits = {k: 0 for k in self._ks()}
        return self

    def _ks(self):
        return tuple(sorted(set(self.options["topk"]) | {1})) if self.options["topk"] else ()

    def _make(self, operands, data, nthreads):
        if len(operands) != 2:
            raise TypeError(f"{self.loss} update() takes (logits, target), got {len(operands)} positional arguments")
        o = self.options
        return classification._CE(operands[0], operands[1], o["weight"], data.get("sample_weight"), o["ignore_index"],
                                  "mean", o["label_smoothing"], o["z_loss"], o["softcap"], o["axis"], nthreads)

    def _chunk(self, operands, data, nthreads):
        ce = self._make(operands, data, nthreads)
        row_loss, rank = _ce_rows(ce, bool(self.options["topk"]))
        self._pending = (ce, rank)
        return _psum(row_loss), _ce_denominator(ce), ce.loss_dtype == np.float64

    def update(self, *operands, **kw):
        super().update(*operands, **kw)
        ce, rank = self._pending
        self._pending = None
        self.n_rows += math.prod(ce.rows_shape)
        if rank is not None:
            active = rank >= 0
            self.n_tokens += int(np.count_nonzero(active))
            for k in self._hits:
                self._hits[k] += int(np.count_nonzero(active & (rank < k)))
        elif ce.t is not None:          # topk=None: no rank, but the tokens are still counted
            self.n_tokens += int(np.count_nonzero(ce.t != ce.ignore_index))
        return self

    def merge(self, other):
        super().merge(other)
        self.n_rows += other.n_rows
        self.n_tokens += other.n_tokens
        for k in self._hits:
            self._hits[k] += other._hits[k]
        return self

    def perplexity(self):
        """exp of the mean cross-entropy (sum of row losses / the mean's denominator), in the
        result dtype; as :func:`fastloss.perplexity`, the exp of the mean rounded to that dtype."""
        mean = _cast(_divide(_value(self._num), _value(self._den)), self._f64)
        with np.errstate(over="ignore"):
            return _cast(float(np.exp(np.float64(mean))), self._f64)

    def topk_accuracy(self, k: int) -> float:
        """Fraction of non-ignored rows whose target is among the k largest logits (NaN if none)."""
        if not self._hits:
            raise ValueError("no accuracy: this accumulator was made with topk=None (no rank counted)")
        if k not in self._hits:
            raise ValueError(f"k={k!r} is not in this accumulator's topk={self.options['topk']}")
        return self._hits[k] / self.n_tokens if self.n_tokens else math.nan

    def accuracy(self) -> float:
        """Fraction of non-ignored rows whose target is the argmax (NaN if none)."""
        return self.topk_accuracy(1)

    def summary(self) -> dict:
        """Every statistic: loss, cross_entropy (the result), perplexity, accuracies, counts."""
        out = {"loss": self.loss, "reduction": self.options.get("reduction", "mean"),
               "cross_entropy": float(_cast(self._mean_or_sum(), self._f64)),
               "perplexity": float(self.perplexity())}
        if self._hits:
            out["accuracy"] = self.accuracy()
        for k in self.options["topk"]:
            if k != 1:
                out[f"top{k}_accuracy"] = self.topk_accuracy(k)
        out.update(rows=self.n_rows, tokens=self.n_tokens, weight_sum=_value(self._den), loss_sum=_value(self._num))
        return out

    def __repr__(self):
        return (f"{type(self).__name__}(reduction={self.options.get('reduction', 'mean')!r}, ignore_index="
                f"{self.options['ignore_index']!r}, topk={self.options['topk']!r})<rows={self.n_rows}, "
                f"tokens={self.n_tokens}, loss_sum={_value(self._num)!r}, denominator={_value(self._den)!r}>")


class Perplexity(CrossEntropy):
    """Streaming :func:`fastloss.perplexity`: exp(sum NLL / number of non-ignored tokens).

    Options ``ignore_index`` and ``topk``; :meth:`result` is the perplexity, the other
    statistics of :class:`CrossEntropy` are there too.
    """
    loss = "perplexity"
    _DEFAULTS = {"ignore_index": -100, "topk": (1, 5)}
    _DATA = ()

    def _check(self, opts):
        full = CrossEntropy._check(self, {**CrossEntropy._DEFAULTS, **opts})
        self._ce_opts = full
        return {"ignore_index": full["ignore_index"], "topk": full["topk"]}

    def _make(self, operands, data, nthreads):
        if len(operands) == 2:
            t = classification._target_array(operands[1]) if operands[1] is not None else None
            if t is not None and classification._is_float_dtype(t.dtype) and t.shape == np.shape(operands[0]):
                raise ValueError("perplexity takes class indices (an integer target of the logits' shape without the "
                                 "class axis); class probabilities are supported by cross_entropy only")
        saved = self.options
        self.options = {**CrossEntropy._DEFAULTS, **saved}
        try:
            return CrossEntropy._make(self, operands, data, nthreads)
        finally:
            self.options = saved

    def result(self):
        return self.perplexity()


class NLLLoss(Accumulator):
    """Streaming :func:`fastloss.nll_loss` on log-probabilities (options ``weight``, ``ignore_index``)."""
    loss = "nll_loss"
    _DEFAULTS = {"weight": None, "ignore_index": -100, "reduction": "mean"}

    def _check(self, opts):
        opts["ignore_index"] = _index(opts["ignore_index"], "ignore_index")
        if opts["weight"] is not None:
            opts["weight"] = np.ascontiguousarray(as_float_array(opts["weight"], "weight"), dtype=np.float64)
        return opts

    def _chunk(self, operands, data, nthreads):
        if len(operands) != 2:
            raise TypeError(f"nll_loss update() takes (log_probs, target), got {len(operands)} positional arguments")
        x0 = classification._log_probs_array(operands[0])
        per_row, w = classification._nll_rows(x0, operands[1], self.options["weight"], self.options["ignore_index"])
        return _psum(per_row), _psum(w), x0.dtype == np.float64


# ---- row losses -------------------------------------------------------------------------------

class MultiMarginLoss(Accumulator):
    """Streaming :func:`fastloss.multi_margin_loss` (options ``p``, ``margin``, ``weight``; mean over rows)."""
    loss = "multi_margin_loss"
    _DEFAULTS = {"p": 1, "margin": 1.0, "weight": None, "reduction": "mean"}

    def _check(self, opts):
        margin._MM(np.zeros((0, 1)), np.zeros(0, np.int64), opts["p"], opts["margin"], None, opts["reduction"], None)
        if opts["weight"] is not None:
            opts["weight"] = np.ascontiguousarray(as_float_array(opts["weight"], "weight"), dtype=np.float64)
        return opts

    def _chunk(self, operands, data, nthreads):
        if len(operands) != 2:
            raise TypeError(f"multi_margin_loss update() takes (input, target), got {len(operands)} positional "
                            f"arguments")
        o = self.options
        mm = margin._MM(operands[0], operands[1], o["p"], o["margin"], o["weight"], "sum", nthreads)
        row_loss = np.empty(mm.n, dtype=np.float64)
        if mm.n:
            _core.row_loss("multi_margin", [mm.x], None, mm.t, mm.w, 0, mm.p, mm.margin, 0.0, 1.0, False, 1.0,
                           row_loss, mm.nthreads)
        return _psum(row_loss), float(mm.n), mm.x.dtype == np.float64


class TripletMarginLoss(Accumulator):
    """Streaming :func:`fastloss.triplet_margin_loss`: ``update(anchor, positive, negative)``."""
    loss = "triplet_margin_loss"
    _DEFAULTS = {"margin": 1.0, "p": 2.0, "eps": 1e-6, "swap": False, "reduction": "mean"}

    def _check(self, opts):
        z = np.zeros((0, 1))
        margin._Triplet(z, z, z, opts["margin"], opts["p"], opts["eps"], opts["swap"], opts["reduction"], None)
        return opts

    def _chunk(self, operands, data, nthreads):
        if len(operands) != 3:
            raise TypeError(f"triplet_margin_loss update() takes (anchor, positive, negative), got {len(operands)} "
                            f"positional arguments")
        o = self.options
        tr = margin._Triplet(*operands, o["margin"], o["p"], o["eps"], o["swap"], "sum", nthreads)
        row_loss = np.empty(tr.n, dtype=np.float64)
        if tr.n and tr.D:
            _core.row_loss("triplet_margin", tr.xs, None, None, None, 0, tr.p, tr.margin, tr.eps, 1.0, tr.swap, 1.0,
                           row_loss, tr.nthreads)
        elif tr.n:
            row_loss[:] = max(tr.margin, 0.0)
        return _psum(row_loss), float(tr.n), tr.xs[0].dtype == np.float64


class KLDivLogits(Accumulator):
    """Streaming :func:`fastloss.kl_div_logits`: ``update(student_logits, teacher_logits, target=None)``
    (option ``temperature``, ``ignore_index``; reduction ``"batchmean"`` (default), ``"mean"``, ``"sum"``)."""
    loss = "kl_div_logits"
    _DEFAULTS = {"temperature": 1.0, "reduction": "batchmean", "ignore_index": -100}
    _DATA = ("target",)
    _REDUCTIONS = ("batchmean", "mean", "sum")

    def _check(self, opts):
        opts["temperature"] = check_positive(opts["temperature"], "temperature")
        opts["ignore_index"] = _index(opts["ignore_index"], "ignore_index")
        return opts

    def _chunk(self, operands, data, nthreads):
        if len(operands) != 2:
            raise TypeError(f"kl_div_logits update() takes (student_logits, teacher_logits), got {len(operands)} "
                            f"positional arguments")
        o = self.options
        kl = distillation._KL(operands[0], operands[1], o["temperature"], o["reduction"], o["ignore_index"],
                              data.get("target"), nthreads)
        row_loss = np.empty(kl.n, dtype=np.float64)
        if kl.n:
            _core.row_loss("kl_div_logits", [kl.s, kl.t], None, kl.target, None, kl.ignore_index, 0.0, 0.0, 0.0,
                           kl.T, False, 1.0, row_loss, kl.nthreads)
        return _psum(row_loss), kl.denominator, kl.s.dtype == np.float64


# ---- the factory ------------------------------------------------------------------------------

ACCUMULATORS = {c.loss: c for c in (MSELoss, L1Loss, HuberLoss, SmoothL1Loss, RMSE, BCELoss, BCEWithLogitsLoss,
                                    SigmoidFocalLoss, HingeLoss, KLDivLoss, CrossEntropy, Perplexity, NLLLoss,
                                    MultiMarginLoss, TripletMarginLoss, KLDivLogits)}
ACCUMULATORS["mse"] = MSELoss
ACCUMULATORS["mae"] = L1Loss

_NOT_STREAMED = {"dpo_loss": "a pairwise-batch objective", "info_nce_loss": "its rows contrast with the other rows "
                 "of the same batch, so it depends on the batching", "sequence_log_probs": "not a reduced loss"}


def accumulator(loss: str, **options) -> Accumulator:
    """A streaming accumulator for the public loss function named `loss`, with its options.

    >>> import numpy as np
    >>> acc = accumulator("cross_entropy", ignore_index=-1)
    >>> _ = acc.update(np.zeros((2, 4)), np.array([1, -1]))
    >>> acc.result(), acc.n_tokens
    (np.float64(1.3862943611198906), 1)
    """
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a str (a function name), got {type(loss).__name__}")
    base = loss[:-len("_with_grad")] if loss.endswith("_with_grad") else loss
    if base in _NOT_STREAMED:
        raise ValueError(f"{base} has no streaming accumulator: {_NOT_STREAMED[base]}")
    cls = ACCUMULATORS.get(base)
    if cls is None:
        raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(sorted(ACCUMULATORS))}")
    return cls(**options)
