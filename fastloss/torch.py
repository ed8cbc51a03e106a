"""PyTorch autograd drop-ins for ``torch.nn.functional`` losses, backed by fastloss's fused C kernels.

Design
------
Each loss is a :class:`torch.autograd.Function` whose ``forward`` hands the CPU tensors to the
NumPy API of fastloss *without a copy* (``tensor.detach().numpy()`` shares memory, any strides;
bfloat16 storage is passed as raw 16-bit data through ``ml_dtypes.bfloat16``) and calls the
``*_with_grad`` kernel once: the loss and the gradient of ``loss.sum()`` come out of one pass
over the data.  The gradient (a NumPy array, wrapped back into a tensor without a copy) is kept
on the context; ``backward`` only multiplies it, in place, by the upstream gradient (nothing at
all when that is 1) and hands it to autograd.  So a ``loss.backward()`` step keeps exactly one
N x V buffer besides the logits (torch keeps the log-softmax *and* its gradient).

* Under ``torch.no_grad()``, or when ``input`` does not require grad, the forward-only kernel
  runs: no gradient is computed or allocated.
* A second ``backward`` through the same graph (``retain_graph=True``) cannot reuse the buffer
  (autograd owns it after the first), so the gradient is recomputed from the saved inputs
  (saved with ``ctx.save_for_backward``: torch's in-place modification check applies).
* The functions are ``once_differentiable``: double backward raises a clear error.
* With grad enabled and ``input.requires_grad``, the gradient is computed in the forward call
  even if ``backward`` never runs (as torch keeps its log-softmax for backward); use
  ``torch.no_grad()`` for evaluation.
* Returned losses have torch's dtype (the input's; the kernels compute 16-bit inputs in float32
  and the result is rounded once).
* ``num_threads=None`` uses ``torch.get_num_threads()``, so a script's thread setting applies to
  both libraries; results are bitwise identical for every thread count.
* Fallback: non-CPU tensors, dtypes other than float16/32/64 and bfloat16, the deprecated
  ``size_average``/``reduce`` arguments, a ``target`` (or ``weight``) that requires grad, and
  argument combinations our kernels do not implement (listed per function) call the torch
  function instead, with one :class:`FallbackWarning` per (function, reason).

Layouts: for inputs of rank >= 2 the classes are on dim 1, as in torch.  (N, C) and (C,) logits
whose class axis is contiguous are read in place (any row stride); (N, C, d1, ...) logits, or
(N, C) logits with a strided class axis (e.g. a transposed tensor), cannot be read by the row
kernel, so they cost one copy of the logits (the gradient is then returned as a strided
view of a (N, d1, ..., C) buffer).

``linear_cross_entropy`` (an LM head: ``input @ linear_weight.T + linear_bias`` and its
cross-entropy) has three differentiable tensors: its forward streams the rows through
:mod:`fastloss.linear`'s chunk buffer with torch's own BLAS doing the GEMMs (:class:`_TorchGemm`)
and keeps the gradients of the tensors that require grad; backward scales them like the others.

Module classes subclass the corresponding ``torch.nn`` loss classes (``isinstance`` checks,
``state_dict`` buffers and the legacy ``size_average``/``reduce`` handling of ``torch.nn`` keep
working) and override ``forward``.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import fastloss as _fl

__all__ = ["FallbackWarning", "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss",
           "binary_cross_entropy_with_logits", "kl_div_logits", "linear_cross_entropy", "CrossEntropyLoss", "NLLLoss",
           "MSELoss", "L1Loss", "HuberLoss", "SmoothL1Loss", "BCEWithLogitsLoss", "KLDivLogitsLoss",
           "LinearCrossEntropyLoss"]

_FLOAT_DTYPES = (torch.float16, torch.float32, torch.float64, torch.bfloat16)


class FallbackWarning(UserWarning):
    """A fastloss.torch function ran the torch implementation instead of a fastloss kernel."""


_warned: set = set()


def _fallback(name: str, reason: str, fn, *args, **kwargs):
    if (name, reason) not in _warned:
        _warned.add((name, reason))
        warnings.warn(f"fastloss.torch.{name}: {reason}; falling back to the torch implementation "
                      f"(warned once)", FallbackWarning, stacklevel=3)
    return fn(*args, **kwargs)


# ---- tensors <-> NumPy, zero-copy ---------------------------------------------------------------

def _bfloat16():
    import ml_dtypes    # in the `torch` extra; only needed for bfloat16 tensors
    return np.dtype(ml_dtypes.bfloat16)


def _numpy(t):
    """A NumPy view of a CPU tensor's memory (any strides); bfloat16 as ml_dtypes.bfloat16."""
    if not isinstance(t, torch.Tensor):
        return t
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_bfloat16())
    return t.resolve_neg().resolve_conj().numpy()


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing the memory of a NumPy array (bfloat16 through its int16 view)."""
    if a.dtype.itemsize == 2 and a.dtype.kind == "V":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _loss_tensor(loss, dtype: torch.dtype) -> torch.Tensor:
    """The kernels' float32/float64 loss (NumPy scalar or array) in torch's dtype (the input's)."""
    if isinstance(loss, np.ndarray):
        return torch.from_numpy(loss).to(dtype)
    return torch.tensor(float(loss), dtype=dtype)


def _threads(num_threads):
    return torch.get_num_threads() if num_threads is None else num_threads


def _unsupported(name: str, input, others=(), no_grad=(), differentiates="input only"):
    """The reason to fall back to torch, or None.  `others`: tensors that must be CPU; `no_grad`:
    (argument name, tensor) pairs that must not require grad."""
    if not isinstance(input, torch.Tensor):
        arg = "student_logits" if name == "kl_div_logits" else "input"
        raise TypeError(f"fastloss.torch.{name}: {arg} must be a torch.Tensor, got {type(input).__name__} "
                        f"(use fastloss.{name} for NumPy arrays)")
    for t in (input, *others):
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            return f"{t.device.type} tensors (fastloss runs on CPU)"
    if input.dtype not in _FLOAT_DTYPES:
        return f"input dtype {input.dtype} (fastloss takes float16/float32/float64/bfloat16)"
    for arg, t in no_grad:
        if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
            return f"{arg} requires grad (fastloss differentiates {differentiates})"
    return None


# ---- the autograd Function ------------------------------------------------------------------------

class _Call:
    """One loss call: the NumPy functions, their keyword arguments and how to scale the gradient.

    ``tensor_names``: the keyword names of the extra tensors passed to ``apply`` (after input);
    ``grad_dim``: where a per-row upstream gradient ('none') is unsqueezed to broadcast over the
    classes (None: elementwise losses, the upstream gradient has the input's shape);
    ``scale``: a constant factor of the loss and the gradient applied here (huber with weight)."""

    __slots__ = ("fwd", "fwd_grad", "kwargs", "tensor_names", "grad_dim", "scale", "prepare")

    def __init__(self, fwd, fwd_grad, kwargs, tensor_names=(), grad_dim=None, scale=1.0, prepare=None):
        self.fwd, self.fwd_grad, self.kwargs = fwd, fwd_grad, kwargs
        self.tensor_names, self.grad_dim, self.scale = tuple(tensor_names), grad_dim, scale
        self.prepare = prepare      # optional: (numpy input) -> numpy input (a layout change)

    def _args(self, input, tensors):
        kw = dict(self.kwargs)
        for name, t in zip(self.tensor_names, tensors):
            kw[name] = _numpy(t)
        x = _numpy(input)
        return x, kw

    def forward(self, input, tensors):
        x, kw = self._args(input, tensors)
        loss = self.fwd(x, **kw)
        return _loss_tensor(loss * self.scale if self.scale != 1.0 else loss, input.dtype)

    def forward_with_grad(self, input, tensors):
        x, kw = self._args(input, tensors)
        loss, g = self.fwd_grad(x, **kw)
        if self.scale != 1.0:
            loss = loss * self.scale
        return _loss_tensor(loss, input.dtype), _tensor(g)


class _FusedLoss(torch.autograd.Function):
    """forward: loss and gradient in one kernel call; backward: gradient x upstream gradient."""

    @staticmethod
    def forward(ctx, call, input, *tensors):
        loss, grad = call.forward_with_grad(input, tensors)
        ctx.call = call
        ctx.grad = grad
        # save_for_backward takes tensors (or None) only: other operands (a float sample_weight, a NumPy
        # target) are kept on ctx as they are
        ctx.others = tuple(None if t is None or isinstance(t, torch.Tensor) else t for t in tensors)
        ctx.save_for_backward(input, *(t if t is None or isinstance(t, torch.Tensor) else None for t in tensors))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        call = ctx.call
        grad, ctx.grad = ctx.grad, None     # from now on autograd may own (and accumulate into) it
        if grad is None:                    # a second backward (retain_graph=True): recompute
            input, *saved = ctx.saved_tensors
            tensors = tuple(o if o is not None else t for t, o in zip(saved, ctx.others))
            grad = call.forward_with_grad(input, tensors)[1]
        go = grad_output
        if call.scale != 1.0:
            go = go * call.scale
        if go.dim() == 0:
            if go.item() != 1.0:
                grad.mul_(go.to(grad.dtype))
        else:
            if call.grad_dim is not None:
                go = go.unsqueeze(call.grad_dim)
            grad.mul_(go.to(grad.dtype))
        return (None, grad) + (None,) * (len(ctx.needs_input_grad) - 2)


class CrossEntropyFunction(_FusedLoss):
    """Fused cross-entropy (fastloss.cross_entropy_with_grad) as an autograd Function."""


class MSELossFunction(_FusedLoss):
    """Fused mean squared error (fastloss.mse_loss_with_grad) as an autograd Function."""


class L1LossFunction(_FusedLoss):
    """Fused L1 loss (fastloss.l1_loss_with_grad) as an autograd Function."""


class HuberLossFunction(_FusedLoss):
    """Fused Huber loss (fastloss.huber_loss_with_grad) as an autograd Function."""


class SmoothL1LossFunction(_FusedLoss):
    """Fused smooth L1 loss (fastloss.smooth_l1_loss_with_grad) as an autograd Function."""


class BCEWithLogitsFunction(_FusedLoss):
    """Fused BCE on logits (fastloss.binary_cross_entropy_with_logits_with_grad) as an autograd Function."""


class KLDivLogitsFunction(_FusedLoss):
    """Fused distillation KL (fastloss.kl_div_logits_with_grad) as an autograd Function."""


def _apply(function, call: _Call, input, *tensors):
    if torch.is_grad_enabled() and input.requires_grad:
        return function.apply(call, input, *tensors)
    return call.forward(input, tensors)     # forward-only kernel: no gradient computed


# ---- classification -------------------------------------------------------------------------------

def _class_axis(input) -> int:
    return 1 if input.dim() >= 2 else 0


def _torch_cross_entropy_ext(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                             sample_weight):
    """torch implementation of fastloss's cross_entropy extensions (for the fallback path)."""
    x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    cd = _class_axis(x)
    V = x.shape[cd]
    lse = torch.logsumexp(x, cd)
    logp = x - lse.unsqueeze(cd)
    shape = [1] * x.dim()
    shape[cd] = V
    w = torch.ones(V, dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)
    eps = float(label_smoothing)
    s = 1.0 if sample_weight is None else torch.as_tensor(sample_weight, dtype=x.dtype, device=x.device)
    if target.is_floating_point():
        q = target.to(x.dtype) * (1 - eps) + eps / V
        rows = (-(w.view(shape) * q * logp).sum(cd) + z_loss * lse ** 2) * s
        den = (torch.ones_like(lse) * s).sum()
    else:
        active = target != ignore_index
        t = torch.where(active, target, torch.zeros_like(target))
        wt = w[t] * active
        nll = -logp.gather(cd, t.unsqueeze(cd)).squeeze(cd)
        smooth = -(w.view(shape) * logp).sum(cd) / V
        rows = ((1 - eps) * wt * nll + eps * smooth * active + z_loss * wt * lse ** 2) * s
        den = (wt * s).sum()
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows.sum() / den
    return out.to(input.dtype)


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                  label_smoothing=0.0, *, z_loss=0.0, softcap=None, sample_weight=None, num_threads=None):
    """``torch.nn.functional.cross_entropy`` with fastloss's fused kernel (and its extensions).

    Per row (classes on dim 1, or dim 0 for (C,) input), with x the logits
    (``softcap * tanh(input / softcap)`` with a softcap), lse = logsumexp(x), eps =
    label_smoothing, w the class weights (W their sum), s the sample weight, t the target::

        loss = s * ((1 - eps) * w[t] * (lse - x[t]) + eps * (W * lse - sum_j w[j] x[j]) / V)
               + z_loss * s * w[t] * lse**2

    ``"mean"`` divides by sum(s * w[t]) over non-ignored rows; with class probabilities as
    target (a float tensor of the input's shape) by the number of rows (sum(s)), as torch.
    The gradient of the loss is computed in the forward call (one pass over the logits) and
    only scaled by the upstream gradient in backward.

    Shapes: input (C,), (N, C) or (N, C, d1, ...); target () / (N,) / (N, d1, ...) int64
    class indices, or probabilities of the input's shape.  dtypes float16, float32, float64,
    bfloat16 (computed in float32, float64 for float64); the loss has the input's dtype.
    (N, C, d1, ...), or a class axis with a stride (a transposed tensor), costs one copy of the logits.

    Extensions (keyword-only): ``z_loss`` (>= 0), ``softcap`` (> 0), ``sample_weight`` (per
    row, broadcastable to the target's shape), ``num_threads`` (default
    ``torch.get_num_threads()``).  They match :func:`fastloss.cross_entropy`; z_loss is weighted
    like the row (w[t] x s), unlike Liger-Kernel's unweighted z-loss (equal without weights).

    Falls back to torch (FallbackWarning) for non-CPU tensors, other dtypes, ``size_average`` /
    ``reduce``, a target or weight that requires grad, or a non-int64 integer target.

    >>> import torch, fastloss.torch as flt
    >>> x = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]], requires_grad=True)
    >>> loss = flt.cross_entropy(x, torch.tensor([0, 2]))
    >>> loss
    tensor(0.6700, grad_fn=<CrossEntropyFunctionBackward>)
    >>> loss.backward(); x.grad
    tensor([[-0.1072,  0.0876,  0.0196],
            [ 0.1667,  0.1667, -0.3333]])
    """
    ext = z_loss != 0.0 or softcap is not None or sample_weight is not None
    reason = None
    if size_average is not None or reduce is not None:
        reason = "the deprecated size_average/reduce arguments"
    if reason is None:
        reason = _unsupported("cross_entropy", input, (target, weight, sample_weight),
                              (("target", target), ("weight", weight), ("sample_weight", sample_weight)))
    if reason is None and isinstance(target, torch.Tensor) and not target.is_floating_point() \
            and target.dtype != torch.int64:
        reason = f"target dtype {target.dtype} (class indices must be int64)"
    if reason is None and isinstance(target, torch.Tensor) and target.is_floating_point() \
            and target.dtype not in _FLOAT_DTYPES:
        reason = f"target dtype {target.dtype}"
    if reason is not None:
        if ext:
            if size_average is not None or reduce is not None:
                from torch.nn import _reduction
                reduction = _reduction.legacy_get_string(size_average, reduce)
            return _fallback("cross_entropy", reason, _torch_cross_entropy_ext, input, target, weight, ignore_index,
                             reduction, label_smoothing, z_loss, softcap, sample_weight)
        return _fallback("cross_entropy", reason, F.cross_entropy, input, target, weight, size_average, ignore_index,
                         reduce, reduction, label_smoothing)
    axis = _class_axis(input) if isinstance(input, torch.Tensor) else -1
    call = _Call(_fl.cross_entropy, _fl.cross_entropy_with_grad,
                 dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                      z_loss=z_loss, softcap=softcap, axis=axis, num_threads=_threads(num_threads)),
                 ("target", "weight", "sample_weight"), grad_dim=axis)
    return _apply(CrossEntropyFunction, call, input, target, weight, sample_weight)


class _NLLFunction(torch.autograd.Function):
    """nll_loss: the loss is a gather; the gradient -w[t] / den at the target (zeros elsewhere) is
    made in backward from per-row coefficients computed in forward (an N x C zero tensor, as torch)."""

    @staticmethod
    def forward(ctx, payload, input, target):
        ctx.coef, loss = payload
        ctx.save_for_backward(target)
        ctx.shape, ctx.dtype = input.shape, input.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (target,) = ctx.saved_tensors
        cd = 1 if len(ctx.shape) >= 2 else 0
        c = ctx.coef * grad_output.to(ctx.coef.dtype)
        g = torch.zeros(ctx.shape, dtype=ctx.dtype)
        g.scatter_(cd, target.clamp(0, ctx.shape[cd] - 1).unsqueeze(cd), c.to(ctx.dtype).unsqueeze(cd))
        return None, g, None


NLLLossFunction = _NLLFunction


def nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean", *,
             num_threads=None):
    """``torch.nn.functional.nll_loss``: loss_i = -w[t_i] * input[i, t_i] (0 for ignored rows).

    ``"mean"`` divides by sum(w[t_i]) over non-ignored rows.  input (C,), (N, C) or
    (N, C, d1, ...) log-probabilities (classes on dim 1; (N, C, d...) costs a copy); target int64
    of the rows' shape.  Reads one element per row (:func:`fastloss.nll_loss`); the gradient
    (non-zero at the targets only) is scattered into a zero tensor in backward, as torch does.

    >>> import torch, fastloss.torch as flt
    >>> lp = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75]]))
    >>> flt.nll_loss(lp, torch.tensor([0, 1]))
    tensor(0.4904)
    """
    reason = None
    if size_average is not None or reduce is not None:
        reason = "the deprecated size_average/reduce arguments"
    if reason is None:
        reason = _unsupported("nll_loss", input, (target, weight), (("weight", weight),))
    if reason is None and isinstance(target, torch.Tensor) and target.dtype != torch.int64:
        reason = f"target dtype {target.dtype} (class indices must be int64)"
    if reason is not None:
        return _fallback("nll_loss", reason, F.nll_loss, input, target, weight, size_average, ignore_index, reduce,
                         reduction)
    x = _numpy(input)
    if isinstance(input, torch.Tensor) and input.dim() >= 2:
        x = np.moveaxis(x, 1, -1)
    t, w = _numpy(target), _numpy(weight)
    loss = _fl.nll_loss(x, t, weight=w, ignore_index=ignore_index, reduction=reduction,
                        num_threads=_threads(num_threads))
    out = _loss_tensor(loss, input.dtype)
    if not (torch.is_grad_enabled() and input.requires_grad):
        return out
    t_np = np.asarray(t)
    active = t_np != ignore_index
    wt = np.where(active, 1.0 if w is None else np.asarray(w, dtype=np.float64)[np.where(active, t_np, 0)], 0.0)
    if reduction == "mean":
        den = float(wt.sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            # ignored rows get 0 even when every row is ignored (den = 0), as in torch
            wt = np.where(active, wt / den, 0.0)
    coef = torch.from_numpy(np.array(-wt, dtype=np.float64).reshape(t_np.shape))
    return _NLLFunction.apply((coef, out), input, target)


# ---- regression and BCE -----------------------------------------------------------------------------

def _check_target(name, input, target):
    """None if target broadcasts to input's shape (no broadcasting of input) in input's dtype."""
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        return None
    try:
        shape = torch.broadcast_shapes(input.shape, target.shape)
    except RuntimeError:
        return "shapes that do not broadcast"
    if shape != input.shape:
        return "a target that broadcasts input to a larger shape"
    if target.dtype != input.dtype:
        return f"target dtype {target.dtype} != input dtype {input.dtype}"
    return None


def _size_warning(input, target):
    if isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor) and target.size() != input.size():
        warnings.warn(f"Using a target size ({target.size()}) that is different to the input size "
                      f"({input.size()}). This will likely lead to incorrect results due to broadcasting. "
                      f"Please ensure they have the same size.", stacklevel=3)


def _pointwise(name, function, fwd, fwd_grad, torch_fn, torch_args, input, target, weight, reduction, legacy,
               num_threads, extra=None, weighted_mean_is_numel=False):
    reason = "the deprecated size_average/reduce arguments" if legacy else None
    if reason is None:
        reason = _unsupported(name, input, (target, weight), (("target", target), ("weight", weight)))
    if reason is None:
        reason = _check_target(name, input, target)
    if reason is None and weight is not None and isinstance(weight, torch.Tensor) and (
            weight.size() != input.size() or weight.dtype != input.dtype):
        reason = "a weight of another size or dtype than input"
    if reason is not None:
        return _fallback(name, reason, torch_fn, *torch_args)
    _size_warning(input, target)
    scale = 1.0
    red = reduction
    if weight is not None and weighted_mean_is_numel and reduction == "mean":
        red, scale = "sum", 1.0 / input.numel() if input.numel() else math.nan
    kw = dict(reduction=red, num_threads=_threads(num_threads), **(extra or {}))
    call = _Call(fwd, fwd_grad, kw, ("target", "weight"), scale=scale)
    return _apply(function, call, input, target, weight)


def mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None, *, num_threads=None):
    """``torch.nn.functional.mse_loss``: loss_i = w_i * (input_i - target_i)**2, gradient 2 w_i (input_i - target_i).

    ``"mean"`` with ``weight`` divides by sum(w) (as torch 2.13).  target broadcasts to
    input's shape (torch's size warning is kept); weight must have input's size.  float16/
    bfloat16 are computed in double and the loss is returned in the input's dtype.

    >>> import torch, fastloss.torch as flt
    >>> flt.mse_loss(torch.tensor([1.0, 2.0, 4.0]), torch.ones(3))
    tensor(3.3333)
    """
    return _pointwise("mse_loss", MSELossFunction, _fl.mse_loss, _fl.mse_loss_with_grad, F.mse_loss,
                      (input, target, size_average, reduce, reduction, weight), input, target, weight, reduction,
                      size_average is not None or reduce is not None, num_threads)


def l1_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None, *, num_threads=None):
    """``torch.nn.functional.l1_loss``: loss_i = w_i * |input_i - target_i|, gradient w_i sign(input_i - target_i).

    ``"mean"`` with ``weight`` divides by sum(w) (as torch 2.13).  Differs from torch where
    input - target is NaN: the gradient is NaN here, 0 in torch.

    >>> import torch, fastloss.torch as flt
    >>> flt.l1_loss(torch.tensor([1.0, 2.0, 4.0]), torch.ones(3), reduction="sum")
    tensor(4.)
    """
    return _pointwise("l1_loss", L1LossFunction, _fl.l1_loss, _fl.l1_loss_with_grad, F.l1_loss,
                      (input, target, size_average, reduce, reduction, weight), input, target, weight, reduction,
                      size_average is not None or reduce is not None, num_threads)


def huber_loss(input, target, reduction="mean", delta=1.0, weight=None, *, num_threads=None):
    """``torch.nn.functional.huber_loss``: z = |input - target|, loss = 0.5 z**2 if z < delta else
    delta (z - 0.5 delta), times w; gradient w clip(input - target, -delta, delta).

    ``"mean"`` divides by the element count, also with ``weight`` (as torch; fastloss's NumPy
    ``huber_loss`` divides by sum(w): here the sum is scaled by 1/numel).

    >>> import torch, fastloss.torch as flt
    >>> flt.huber_loss(torch.tensor([0.5, 3.0]), torch.zeros(2))
    tensor(1.3125)
    """
    return _pointwise("huber_loss", HuberLossFunction, _fl.huber_loss, _fl.huber_loss_with_grad, F.huber_loss,
                      (input, target, reduction, delta, weight), input, target, weight, reduction, False,
                      num_threads, extra=dict(delta=delta), weighted_mean_is_numel=True)


def smooth_l1_loss(input, target, size_average=None, reduce=None, reduction="mean", beta=1.0, *,
                   num_threads=None):
    """``torch.nn.functional.smooth_l1_loss``: z = |input - target|, loss = 0.5 z**2 / beta if
    z < beta else z - 0.5 beta (beta = 0: L1); gradient (input - target) / beta or sign.

    >>> import torch, fastloss.torch as flt
    >>> flt.smooth_l1_loss(torch.tensor([0.5, 3.0]), torch.zeros(2))
    tensor(1.3125)
    """
    return _pointwise("smooth_l1_loss", SmoothL1LossFunction, _fl.smooth_l1_loss, _fl.smooth_l1_loss_with_grad,
                      F.smooth_l1_loss, (input, target, size_average, reduce, reduction, beta), input, target, None,
                      reduction, size_average is not None or reduce is not None, num_threads,
                      extra=dict(beta=beta))


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None, reduction="mean",
                                     pos_weight=None, *, num_threads=None):
    """``torch.nn.functional.binary_cross_entropy_with_logits``.

    loss_i = w_i * (p_i * y_i * softplus(-x_i) + (1 - y_i) * softplus(x_i)) with p the
    pos_weight (broadcast over the last dim), w the weight (broadcastable to input); gradient
    w_i * ((p_i y_i + 1 - y_i) sigmoid(x_i) - p_i y_i).  ``"mean"`` divides by the element
    count.  target must have input's shape (as torch).

    >>> import torch, fastloss.torch as flt
    >>> flt.binary_cross_entropy_with_logits(torch.zeros(2), torch.tensor([0.0, 1.0]))
    tensor(0.6931)
    """
    name = "binary_cross_entropy_with_logits"
    torch_args = (input, target, weight, size_average, reduce, reduction, pos_weight)
    reason = "the deprecated size_average/reduce arguments" if size_average is not None or reduce is not None \
        else None
    if reason is None:
        reason = _unsupported(name, input, (target, weight, pos_weight),
                              (("target", target), ("weight", weight), ("pos_weight", pos_weight)))
    if reason is None and isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor):
        if target.shape != input.shape:
            reason = "a target of another shape than input"
        elif target.dtype != input.dtype:
            reason = f"target dtype {target.dtype} != input dtype {input.dtype}"
        else:
            for arg, t in (("weight", weight), ("pos_weight", pos_weight)):
                if isinstance(t, torch.Tensor):
                    try:
                        ok = torch.broadcast_shapes(t.shape, input.shape) == input.shape
                    except RuntimeError:
                        ok = False
                    if not ok or t.dtype != input.dtype:
                        reason = f"a {arg} that does not broadcast to input in its dtype"
    if reason is not None:
        return _fallback(name, reason, F.binary_cross_entropy_with_logits, *torch_args)
    call = _Call(_fl.binary_cross_entropy_with_logits, _fl.binary_cross_entropy_with_logits_with_grad,
                 dict(reduction=reduction, num_threads=_threads(num_threads)), ("target", "weight", "pos_weight"))
    return _apply(BCEWithLogitsFunction, call, input, target, weight, pos_weight)


# ---- distillation -------------------------------------------------------------------------------------

def _torch_kl_div_logits(student_logits, teacher_logits, temperature, reduction, ignore_index, target):
    s = student_logits.double() if student_logits.dtype == torch.float64 else student_logits.float()
    t = teacher_logits.to(s.dtype)
    T = float(temperature)
    p = torch.softmax(t / T, -1)
    rows = T * T * (p * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).where(p > 0, 0).sum(-1)
    n = rows.numel()
    if target is not None:
        active = target != ignore_index
        rows = rows * active
        n = int(active.sum())
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows.sum() / (n * (student_logits.shape[-1] if reduction == "mean" else 1))
    return out.to(student_logits.dtype)


def kl_div_logits(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", ignore_index=-100,
                  target=None, num_threads=None):
    """Distillation loss ``T**2 * KL(softmax(teacher / T) || softmax(student / T))`` per row, with
    the gradient with respect to ``student_logits`` computed in the forward call.

    Mirrors :func:`fastloss.kl_div_logits` (no torch twin): classes on the LAST dim (any rank),
    ``reduction`` in {"batchmean", "sum", "mean", "none"} ("none": per-row losses), rows whose
    ``target`` equals ``ignore_index`` are left out.  The teacher gets no gradient: a teacher
    that requires grad falls back to a torch implementation (FallbackWarning).  Same as
    ``F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
    reduction="batchmean") * T**2`` in torch.

    >>> import torch, fastloss.torch as flt
    >>> s = torch.tensor([[0.0, 1.0, 2.0]]); t = torch.tensor([[0.0, 1.0, 4.0]])
    >>> flt.kl_div_logits(s, t, temperature=2.0)
    tensor(0.4402)
    """
    reason = _unsupported("kl_div_logits", student_logits, (teacher_logits, target),
                          (("teacher_logits", teacher_logits),))
    if reason is None and isinstance(teacher_logits, torch.Tensor) and teacher_logits.dtype not in _FLOAT_DTYPES:
        reason = f"teacher_logits dtype {teacher_logits.dtype}"
    if reason is not None:
        return _fallback("kl_div_logits", reason, _torch_kl_div_logits, student_logits, teacher_logits,
                         temperature, reduction, ignore_index, target)
    call = _Call(_fl.kl_div_logits, _fl.kl_div_logits_with_grad,
                 dict(temperature=temperature, reduction=reduction, ignore_index=ignore_index,
                      num_threads=_threads(num_threads)), ("teacher_logits", "target"), grad_dim=-1)
    return _apply(KLDivLogitsFunction, call, student_logits, teacher_logits, target)


# ---- fused linear + cross-entropy ------------------------------------------------------------------

class _TorchGemm:
    """The three products of a chunk of :mod:`fastloss.linear` run by torch's BLAS (MKL in the
    x86 CPU wheels), on tensor views of the NumPy buffers (no copies).  ``threads()`` sets
    torch's intra-op thread count to ``nthreads`` for the call (process-wide, as
    ``torch.set_num_threads``) and restores it."""

    def __init__(self, nthreads: int):
        self.nthreads = nthreads

    @contextlib.contextmanager
    def threads(self):
        from fastloss.linear import _blas_threads
        old = torch.get_num_threads()
        if old != self.nthreads:
            torch.set_num_threads(self.nthreads)
        try:
            # NumPy's BLAS (the bias gradient's matrix-vector product) at one thread: its own
            # pool would otherwise wake on every chunk next to torch's threads (2x slower with a bias)
            with _blas_threads(1):
                yield
        finally:
            if torch.get_num_threads() != old:
                torch.set_num_threads(old)

    @staticmethod
    def logits(out, x, w):
        torch.mm(torch.from_numpy(x), torch.from_numpy(w).t(), out=torch.from_numpy(out))

    @staticmethod
    def accumulate(acc, g, x):
        torch.from_numpy(acc).addmm_(torch.from_numpy(g).t(), torch.from_numpy(x))

    @staticmethod
    def gx(out, g, w):
        torch.mm(torch.from_numpy(g), torch.from_numpy(w), out=torch.from_numpy(out))


class _LinearSpec:
    """The non-differentiable arguments of one linear_cross_entropy call (the tensors among them
    are also saved with ``save_for_backward`` when backward may need them, and passed back in)."""

    __slots__ = ("target", "weight", "sample_weight", "ignore_index", "reduction", "label_smoothing", "z_loss",
                 "softcap", "chunk_size", "nthreads")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)

    def saved(self):
        """The tensors among target, weight, sample_weight (None for the others)."""
        return tuple(t if isinstance(t, torch.Tensor) else None for t in (self.target, self.weight, self.sample_weight))

    def lce(self, input, linear_weight, linear_bias, saved=(None, None, None), sample_weight=None, reduction=None):
        """The fastloss.linear call; `saved`: target, weight, sample_weight as saved for backward
        (None: the spec's own)."""
        from fastloss.linear import _LCE
        target, weight, sw = (s if s is not None else o
                              for s, o in zip(saved, (self.target, self.weight, self.sample_weight)))
        if sample_weight is not None:
            sw = sample_weight
        return _LCE(_numpy(input), _numpy(linear_weight), _numpy(target), _numpy(linear_bias),
                    _numpy(weight), _numpy(sw), self.ignore_index, reduction or self.reduction,
                    self.label_smoothing, self.z_loss, self.softcap, self.chunk_size, self.nthreads)

    def grads(self, need, input, linear_weight, linear_bias, target, weight, sample_weight, grad_output=None):
        """(grad_input, grad_linear_weight, grad_linear_bias) as tensors (None where not needed),
        from the saved tensors.  With `grad_output` (reduction "none": per-row upstream gradients)
        the gradient of sum(grad_output * loss) is computed, as reduction "sum" with grad_output
        folded into the sample weights."""
        saved = (target, weight, sample_weight)
        if grad_output is None:
            lce = self.lce(input, linear_weight, linear_bias, saved)
        else:
            go = grad_output.detach().to(torch.float64).numpy()
            sw = sample_weight if sample_weight is not None else self.sample_weight
            sw = go if sw is None else np.asarray(_numpy(sw), np.float64) * go
            lce = self.lce(input, linear_weight, linear_bias, saved, sample_weight=sw, reduction="sum")
        _, gx, gw, gb = lce.run(grad=True, need=need, gemm=_TorchGemm(self.nthreads))
        return tuple(None if g is None else _tensor(g) for g in (gx, gw, gb))


_LINEAR_NAMES = ("input", "weight", "bias")


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Fused linear + cross-entropy (fastloss.linear) as an autograd Function: the three
    gradients are computed chunk by chunk in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, spec, input, linear_weight, linear_bias):
        need = tuple(n for n, r in zip(_LINEAR_NAMES, ctx.needs_input_grad[1:]) if r)
        ctx.spec, ctx.need, ctx.grads = spec, need, None
        ctx.save_for_backward(input, linear_weight, linear_bias, *spec.saved())
        if spec.reduction == "none":       # the gradient needs the per-row upstream gradients: in backward
            loss = spec.lce(input, linear_weight, linear_bias).run(grad=False, gemm=_TorchGemm(spec.nthreads))
            return _loss_tensor(loss, input.dtype)
        loss, gx, gw, gb = spec.lce(input, linear_weight, linear_bias).run(
            grad=True, need=need, gemm=_TorchGemm(spec.nthreads))
        ctx.grads = tuple(None if g is None else _tensor(g) for g in (gx, gw, gb))
        return _loss_tensor(loss, input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        spec, need = ctx.spec, ctx.need
        grads, ctx.grads = ctx.grads, None
        if spec.reduction == "none":
            grads = spec.grads(need, *ctx.saved_tensors, grad_output=grad_output)
        else:
            if grads is None:                  # a second backward (retain_graph=True): recompute
                grads = spec.grads(need, *ctx.saved_tensors)
            if grad_output.item() != 1.0:
                for g in grads:
                    if g is not None:
                        g.mul_(grad_output.to(g.dtype))
        return (None,) + tuple(grads)


def _torch_linear_cross_entropy_ext(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                                    label_smoothing, z_loss, softcap, sample_weight):
    logits = F.linear(input, linear_weight, linear_bias)
    return _torch_cross_entropy_ext(logits, target, weight, -100 if ignore_index is None else ignore_index,
                                    reduction, label_smoothing, z_loss, softcap, sample_weight)


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=None, label_smoothing=0.0, options=None, z_loss=0.0, softcap=None,
                         sample_weight=None, chunk_size=None, num_threads=None):
    """``torch.nn.functional.linear_cross_entropy`` without the (N, V) logits: the rows stream
    through one (chunk_size, V) buffer (:func:`fastloss.linear_cross_entropy`), and the gradients
    with respect to ``input``, ``linear_weight`` and ``linear_bias`` are computed in the forward
    call, only those that require grad (a frozen head skips its weight-gradient GEMM).

    The loss is ``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)``, per row::

        loss_i = s_i * ((1 - eps) * w[t_i] * (lse_i - z_i[t_i]) + eps * (W lse_i - sum_j w[j] z_ij) / V)
                 + z_loss * s_i * w[t_i] * lse_i**2,        z_i = input_i @ linear_weight.T + linear_bias

    Shapes (torch's): ``input`` (N, H) or (H,); ``linear_weight`` (V, H); ``linear_bias`` (V,);
    ``target`` (N,) / () int64 class indices, or class probabilities of the logits' shape (N, V).
    dtypes float32, float64, float16, bfloat16, all three tensors alike (as ``F.linear``); 16-bit
    tensors are computed in float32 (the chunk's logits, the GEMMs and the weight-gradient
    accumulator) and the results rounded once.  ``ignore_index=None`` means -100 for class
    indices, as torch.

    The GEMMs run in torch's own BLAS (MKL on x86) on views of our chunk buffers, the
    cross-entropy of each chunk in fastloss's fused kernel.  ``reduction="none"`` computes
    the gradient in backward (it needs the per-row upstream gradient): one more logits GEMM.
    ``options`` (a ``torch.nn.LinearCrossEntropyOptions``) is accepted for signature
    compatibility; only its ``batch_chunk_size`` is used (as ``chunk_size`` when that is None).

    Extensions (keyword-only): ``z_loss``, ``softcap``, ``sample_weight``, ``chunk_size`` (rows per
    chunk; default :func:`fastloss.linear.default_chunk_size`), ``num_threads`` (our kernel and
    torch's GEMMs; default ``torch.get_num_threads()``).

    Falls back to torch (FallbackWarning) for non-CPU tensors, other dtypes, mixed dtypes, a
    K-dimensional ``linear_weight`` (V, d1, ..., H), a non-int64 integer target, and a target,
    weight or sample_weight that requires grad.

    >>> import torch, fastloss.torch as flt
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    >>> W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], requires_grad=True)
    >>> loss = flt.linear_cross_entropy(x, W, torch.tensor([0, 1]))
    >>> loss
    tensor(0.3955, grad_fn=<LinearCrossEntropyFunctionBackward>)
    >>> loss.backward(); W.grad
    tensor([[-0.2119, -0.0596],
            [ 0.1059, -0.0596],
            [ 0.1059,  0.1192]])
    """
    ext = z_loss != 0.0 or softcap is not None or sample_weight is not None
    if isinstance(input, torch.Tensor) and isinstance(linear_weight, torch.Tensor) and (
            input.dim() not in (1, 2) or linear_weight.dim() < 2):
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                      reduction=reduction, ignore_index=ignore_index,
                                      label_smoothing=label_smoothing)          # torch's error
    reason = _unsupported("linear_cross_entropy", input, (linear_weight, target, linear_bias, weight, sample_weight),
                          (("target", target), ("weight", weight), ("sample_weight", sample_weight)),
                          differentiates="input, linear_weight and linear_bias only")
    for arg, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"fastloss.torch.linear_cross_entropy: {arg} must be a torch.Tensor, got "
                            f"{type(t).__name__} (use fastloss.linear_cross_entropy for NumPy arrays)")
    if reason is None and linear_weight.dim() != 2:
        reason = "a K-dimensional linear_weight (V, d1, ..., H)"
    if reason is None and (linear_weight.dtype != input.dtype or (
            isinstance(linear_bias, torch.Tensor) and linear_bias.dtype != input.dtype)):
        reason = "mixed dtypes of input, linear_weight and linear_bias"
    if reason is None and isinstance(target, torch.Tensor) and not target.is_floating_point() \
            and target.dtype != torch.int64:
        reason = f"target dtype {target.dtype} (class indices must be int64)"
    if reason is not None:
        if ext:
            return _fallback("linear_cross_entropy", reason, _torch_linear_cross_entropy_ext, input, linear_weight,
                             target, linear_bias, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                             sample_weight)
        return _fallback("linear_cross_entropy", reason, F.linear_cross_entropy, input, linear_weight, target,
                         linear_bias=linear_bias, weight=weight, reduction=reduction, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, options=options)
    soft = isinstance(target, torch.Tensor) and tuple(target.shape) == (*input.shape[:-1], linear_weight.shape[0])
    if soft and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    if chunk_size is None and options is not None:
        chunk_size = getattr(options, "batch_chunk_size", None)
    spec = _LinearSpec(target=target, weight=weight, sample_weight=sample_weight,
                       ignore_index=-100 if ignore_index is None else ignore_index, reduction=reduction,
                       label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, chunk_size=chunk_size,
                       nthreads=_threads(num_threads))
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (input, linear_weight, linear_bias)):
        return LinearCrossEntropyFunction.apply(spec, input, linear_weight, linear_bias)
    loss = spec.lce(input, linear_weight, linear_bias).run(grad=False, gemm=_TorchGemm(spec.nthreads))
    return _loss_tensor(loss, input.dtype)


# ---- nn.Module classes -------------------------------------------------------------------------------------

class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by :func:`fastloss.torch.cross_entropy`.

    Extra keyword-only options: ``z_loss``, ``softcap``, ``num_threads``; ``forward`` takes an
    optional ``sample_weight``.

    >>> import torch, fastloss.torch as flt
    >>> flt.CrossEntropyLoss()(torch.zeros(2, 4), torch.tensor([1, 3]))
    tensor(1.3863)
    """

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, *, z_loss=0.0, softcap=None, num_threads=None):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss, self.softcap, self.num_threads = z_loss, softcap, num_threads

    def forward(self, input, target, sample_weight=None):
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                             softcap=self.softcap, sample_weight=sample_weight, num_threads=self.num_threads)


class NLLLoss(torch.nn.NLLLoss):
    """``torch.nn.NLLLoss`` computed by :func:`fastloss.torch.nll_loss`.

    >>> import torch, fastloss.torch as flt
    >>> flt.NLLLoss()(torch.log(torch.tensor([[0.5, 0.5]])), torch.tensor([0]))
    tensor(0.6931)
    """

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean", *,
                 num_threads=None):
        super().__init__(weight, size_average, ignore_index, reduce, reduction)
        self.num_threads = num_threads

    def forward(self, input, target):
        return nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                        num_threads=self.num_threads)


class MSELoss(torch.nn.MSELoss):
    """``torch.nn.MSELoss`` computed by :func:`fastloss.torch.mse_loss`.

    >>> import torch, fastloss.torch as flt
    >>> flt.MSELoss()(torch.tensor([1.0, 3.0]), torch.zeros(2))
    tensor(5.)
    """

    def __init__(self, size_average=None, reduce=None, reduction="mean", *, num_threads=None):
        super().__init__(size_average, reduce, reduction)
        self.num_threads = num_threads

    def forward(self, input, target):
        return mse_loss(input, target, reduction=self.reduction, num_threads=self.num_threads)


class L1Loss(torch.nn.L1Loss):
    """``torch.nn.L1Loss`` computed by :func:`fastloss.torch.l1_loss`.

    >>> import torch, fastloss.torch as flt
    >>> flt.L1Loss()(torch.tensor([1.0, -3.0]), torch.zeros(2))
    tensor(2.)
    """

    def __init__(self, size_average=None, reduce=None, reduction="mean", *, num_threads=None):
        super().__init__(size_average, reduce, reduction)
        self.num_threads = num_threads

    def forward(self, input, target):
        return l1_loss(input, target, reduction=self.reduction, num_threads=self.num_threads)


class HuberLoss(torch.nn.HuberLoss):
    """``torch.nn.HuberLoss`` computed by :func:`fastloss.torch.huber_loss`.

    >>> import torch, fastloss.torch as flt
    >>> flt.HuberLoss(delta=1.0)(torch.tensor([0.5, 3.0]), torch.zeros(2))
    tensor(1.3125)
    """

    def __init__(self, reduction="mean", delta=1.0, *, num_threads=None):
        super().__init__(reduction, delta)
        self.num_threads = num_threads

    def forward(self, input, target):
        return huber_loss(input, target, reduction=self.reduction, delta=self.delta, num_threads=self.num_threads)


class SmoothL1Loss(torch.nn.SmoothL1Loss):
    """``torch.nn.SmoothL1Loss`` computed by :func:`fastloss.torch.smooth_l1_loss`.

    >>> import torch, fastloss.torch as flt
    >>> flt.SmoothL1Loss(beta=1.0)(torch.tensor([0.5, 3.0]), torch.zeros(2))
    tensor(1.3125)
    """

    def __init__(self, size_average=None, reduce=None, reduction="mean", beta=1.0, *, num_threads=None):
        super().__init__(size_average, reduce, reduction, beta)
        self.num_threads = num_threads

    def forward(self, input, target):
        return smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta, num_threads=self.num_threads)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss`` computed by :func:`fastloss.torch.binary_cross_entropy_with_logits`.

    >>> import torch, fastloss.torch as flt
    >>> flt.BCEWithLogitsLoss()(torch.zeros(2), torch.tensor([0.0, 1.0]))
    tensor(0.6931)
    """

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean", pos_weight=None, *,
                 num_threads=None):
        super().__init__(weight, size_average, reduce, reduction, pos_weight)
        self.num_threads = num_threads

    def forward(self, input, target):
        return binary_cross_entropy_with_logits(input, target, self.weight, reduction=self.reduction,
                                                pos_weight=self.pos_weight, num_threads=self.num_threads)


class KLDivLogitsLoss(torch.nn.Module):
    """:func:`fastloss.torch.kl_div_logits` as a module: ``forward(student_logits, teacher_logits, target=None)``.

    >>> import torch, fastloss.torch as flt
    >>> flt.KLDivLogitsLoss(temperature=2.0)(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[0.0, 1.0, 4.0]]))
    tensor(0.4402)
    """

    def __init__(self, *, temperature=1.0, reduction="batchmean", ignore_index=-100, num_threads=None):
        super().__init__()
        self.temperature, self.reduction, self.ignore_index = temperature, reduction, ignore_index
        self.num_threads = num_threads

    def forward(self, student_logits, teacher_logits, target=None):
        return kl_div_logits(student_logits, teacher_logits, temperature=self.temperature, reduction=self.reduction,
                             ignore_index=self.ignore_index, target=target, num_threads=self.num_threads)


class LinearCrossEntropyLoss(torch.nn.LinearCrossEntropyLoss):
    """``torch.nn.LinearCrossEntropyLoss`` (a ``Linear`` head and its cross-entropy) computed by
    :func:`fastloss.torch.linear_cross_entropy`.

    Extra keyword-only options: ``z_loss``, ``softcap``, ``chunk_size``, ``num_threads``;
    ``forward`` takes an optional ``sample_weight``.  ``out_features != ()`` (a K-dimensional
    loss) runs torch's implementation (FallbackWarning).

    >>> import torch, fastloss.torch as flt
    >>> head = flt.LinearCrossEntropyLoss(4, 10)
    >>> with torch.no_grad():
    ...     _ = head.linear.weight.zero_()
    >>> head(torch.ones(2, 4), torch.tensor([1, 3]))
    tensor(2.3026, grad_fn=<LinearCrossEntropyFunctionBackward>)
    """

    def __init__(self, in_features, num_classes, *, out_features=(), bias=False, device=None, dtype=None,
                 reduction="mean", weight=None, ignore_index=None, label_smoothing=0.0, options=None, z_loss=0.0,
                 softcap=None, chunk_size=None, num_threads=None):
        super().__init__(in_features, num_classes, out_features=out_features, bias=bias, device=device, dtype=dtype,
                         reduction=reduction, weight=weight, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, options=options)
        self.z_loss, self.softcap, self.chunk_size, self.num_threads = z_loss, softcap, chunk_size, num_threads

    def forward(self, input, target, sample_weight=None):
        w = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        b = None if self.linear.bias is None else self.linear.bias.reshape((self.num_classes, *self.out_features))
        return linear_cross_entropy(input, w, target, linear_bias=b, weight=self.weight, reduction=self.reduction,
                                    ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                                    options=self.options, z_loss=self.z_loss, softcap=self.softcap,
                                    sample_weight=sample_weight, chunk_size=self.chunk_size,
                                    num_threads=self.num_threads)
