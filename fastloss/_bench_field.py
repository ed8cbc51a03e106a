"""The benchmark entries of the losses of issue 6 (``python -m fastloss bench``): how each one is
fed, called and compared.

The benchmark machinery (:mod:`fastloss.bench`) times calls ``f(x, t)``: ``x`` is the array the
gradient is taken with respect to, ``t`` everything else, packed into ONE array whose first axis
runs along ``x``'s (so that the warm-up prefix, ``x[:k], t[:k]``, is a consistent smaller
problem).  The adapters below unpack ``t``:

===========================  =====================  =============================================
loss                         x                      t
===========================  =====================  =============================================
binary_cross_entropy         probabilities (n,)     labels in {0, 1} (n,)
binary_cross_entropy_with_.. logits (n,)            labels in {0, 1} (n,)
sigmoid_focal_loss           logits (n,)            labels in {0, 1} (n,)
hinge_loss                   scores (n,)            labels in {-1, +1} (n,)
kl_div                       log-probabilities (n,) probabilities (n,)
dpo_loss                     policy chosen (B,)     (B, 3): policy rejected, ref chosen, ref rejected
multi_margin_loss            scores (N, V)          class indices (N,)
kl_div_logits                student logits (N, V)  teacher logits (N, V) (temperature 2)
sequence_log_probs           logits (N, V)          token ids (N,); viewed as (8, N/8, V) / (8, N/8)
triplet_margin_loss          anchors (N, D)         (N, 2, D): positives, negatives
info_nce_loss                queries (N, D)         keys (N, D) (temperature 0.07)
===========================  =====================  =============================================

Every adapter returns what the machinery compares: a scalar loss (``sequence_log_probs``: the sum
of the per-sequence log-probabilities) and, with the gradient, ``(loss, gradient with respect to
x)``; the other gradients a call returns (triplet, DPO, InfoNCE) are computed and dropped.  The
torch competitor is the idiomatic torch code for each (``torch.nn.functional`` where torch has the
loss; torchvision's focal formula, TRL's DPO formula, ``log_softmax`` + ``gather`` for sequence
log-probs, ``F.cross_entropy`` on ``q @ k.T / tau`` for InfoNCE), differentiated by autograd.
"""
from __future__ import annotations

import inspect
import math

import numpy as np

import fastloss
from fastloss import reference

#: Per-preset problem sizes of the elementwise family (element counts) and shapes of the row
#: family; the CLI's --sizes / --shapes replace them.
ELEMENTWISE_SIZES = {"default": (10**7,), "quick": (10**6,), "full": (10**6, 10**7, 10**8),
                     "pytest": (10**5,), "smoke": (1000, 10_000)}
DPO_SIZES = {"default": (64, 4096), "quick": (64,), "full": (64, 4096, 65536), "pytest": (64,),
             "smoke": (64,)}
V_SHAPES = {"default": ((512, 32000),), "quick": ((64, 32000),), "full": ((2048, 32000), (512, 128256)),
            "pytest": ((16, 32000),), "smoke": ((4, 1000),)}
SEQUENCE_SHAPES = {"default": ((2048, 32000),), "quick": ((256, 32000),), "full": ((8192, 32000),),
                   "pytest": ((64, 32000),), "smoke": ((16, 1000),)}
TRIPLET_SHAPES = {"default": ((4096, 512),), "quick": ((1024, 512),), "full": ((4096, 512), (65536, 128)),
                  "pytest": ((256, 128),), "smoke": ((8, 64),)}
INFO_NCE_SHAPES = {"default": ((2048, 256),), "quick": ((1024, 256),), "full": ((4096, 256), (16384, 128)),
                   "pytest": ((256, 64),), "smoke": ((8, 16),)}

KL_TEMPERATURE = 2.0
INFO_NCE_TEMPERATURE = 0.07
SEQUENCES = 8


# ---- inputs ---------------------------------------------------------------------------------------

def _normal(rng, shape, dtype, scale=1.0):
    x = rng.standard_normal(shape, dtype=np.float32)
    if scale != 1.0:
        x *= np.float32(scale)
    return x if np.dtype(dtype) == np.float32 else x.astype(dtype)


def _labels01(rng, shape, dtype):
    return (rng.random(shape, dtype=np.float32) < 0.5).astype(dtype)


def bce_inputs(rng, shape, dtype):
    """probabilities sigmoid(N(0, 2^2)) and labels in {0, 1}."""
    z = rng.standard_normal(shape, dtype=np.float32) * np.float32(2.0)
    p = np.float32(1) / (np.float32(1) + np.exp(-z))
    return {"input": p.astype(dtype, copy=False), "target": _labels01(rng, shape, dtype)}


def logit_label_inputs(rng, shape, dtype):
    """logits ~ N(0, 2^2) and labels in {0, 1}."""
    return {"input": _normal(rng, shape, dtype, 2.0), "target": _labels01(rng, shape, dtype)}


def hinge_inputs(rng, shape, dtype):
    """scores ~ N(0, 1) and labels in {-1, +1}."""
    y = np.where(rng.random(shape, dtype=np.float32) < 0.5, np.float32(-1), np.float32(1)).astype(dtype)
    return {"input": _normal(rng, shape, dtype), "target": y}


def kl_div_inputs(rng, shape, dtype):
    """input = log q and target = p, q and p ~ U(0.01, 1) (unnormalized: an elementwise loss)."""
    q = rng.uniform(0.01, 1.0, size=shape).astype(np.float32)
    p = rng.uniform(0.01, 1.0, size=shape).astype(np.float32)
    return {"input": np.log(q).astype(dtype, copy=False), "target": p.astype(dtype, copy=False)}


def dpo_inputs(rng, shape, dtype):
    """sequence log-probabilities ~ -100 + N(0, 10^2): policy chosen (B,) and (B, 3) for the rest."""
    B = shape[0]
    x = (-100.0 + 10.0 * rng.standard_normal(B)).astype(dtype)
    rest = (-100.0 + 10.0 * rng.standard_normal((B, 3))).astype(dtype)
    return {"input": x, "target": rest}


def logits_index_inputs(rng, shape, dtype):
    """scores ~ N(0, 1) of (N, V) and class indices uniform in [0, V)."""
    return {"input": _normal(rng, shape, dtype), "target": rng.integers(0, shape[-1], size=shape[:-1])}


def two_logits_inputs(rng, shape, dtype):
    """student and teacher logits ~ N(0, 2^2) of (N, V)."""
    return {"input": _normal(rng, shape, dtype, 2.0), "target": _normal(rng, shape, dtype, 2.0)}


def triplet_inputs(rng, shape, dtype):
    """anchors (N, D) ~ N(0, 1); positives = anchors + N(0, 0.5^2), negatives ~ N(0, 1): (N, 2, D)."""
    N, D = shape
    a = rng.standard_normal((N, D), dtype=np.float32)
    t = np.empty((N, 2, D), dtype=np.float32)
    t[:, 0] = a + np.float32(0.5) * rng.standard_normal((N, D), dtype=np.float32)
    t[:, 1] = rng.standard_normal((N, D), dtype=np.float32)
    return {"input": a.astype(dtype, copy=False), "target": t.astype(dtype, copy=False)}


def embedding_inputs(rng, shape, dtype):
    """queries and keys (N, D) ~ N(0, 1/D) (unit norm on average); keys = queries + noise."""
    N, D = shape
    q = rng.standard_normal((N, D), dtype=np.float32) / np.float32(math.sqrt(D))
    k = q + np.float32(0.5 / math.sqrt(D)) * rng.standard_normal((N, D), dtype=np.float32)
    return {"input": q.astype(dtype, copy=False), "target": k.astype(dtype, copy=False)}


# ---- fastloss / NumPy / torch adapters -------------------------------------------------------------

def _ref(fn, *args, dtype=np.float64, **kw):
    """A reference call in `dtype` where the reference takes one (None: the inputs' dtype, NumPy as
    a user writes it); the references without ``dtype`` compute in float64 whatever it is."""
    if "dtype" in inspect.signature(fn).parameters:
        kw["dtype"] = dtype
    return fn(*args, **kw)


def _first(result):
    """The first gradient of a reference's tuple of gradients (or the gradient itself)."""
    return result[0] if isinstance(result, tuple) else result


def _first_grad(result):
    """(loss, gradient of x) from a with-grad result (loss, grad_x, ...)."""
    return result[0], result[1]


def _seq_view(x, t):
    """(B, T, V) and (B, T) views of rows (N, V) and (N,): B = 8 when it divides N, else 1."""
    B = SEQUENCES if x.shape[0] % SEQUENCES == 0 else 1
    return x.reshape(B, -1, x.shape[-1]), t.reshape(B, -1)


def _dpo_args(x, t):
    return x, t[:, 0], t[:, 1], t[:, 2]


class FieldLoss:
    """One loss's adapters: ``fwd(x, t, **kw)``, ``grad(x, t, **kw)`` -> (loss, grad_x),
    ``ref(x, t, dtype)``, ``ref_grad(x, t, dtype)`` and ``torch(xt, t)`` -> a scalar tensor."""

    def __init__(self, fwd, grad, ref, ref_grad, torch_loss):
        self.fwd, self.grad, self.ref, self.ref_grad, self.torch_loss = fwd, grad, ref, ref_grad, torch_loss


def _elementwise(name, torch_loss, **kw):
    f, g = getattr(fastloss, name), getattr(fastloss, name + "_with_grad")
    r, rg = getattr(reference, name), getattr(reference, name + "_grad")
    return FieldLoss(lambda x, t, **o: f(x, t, **kw, **o), lambda x, t, **o: g(x, t, **kw, **o),
                     lambda x, t, dtype=np.float64: _ref(r, x, t, dtype=dtype, **kw),
                     lambda x, t, dtype=np.float64: _ref(rg, x, t, dtype=dtype, **kw), torch_loss)


def _torch_focal(x, t, alpha=0.25, gamma=2.0):
    """torchvision.ops.sigmoid_focal_loss (reduction "mean"), written with torch ops."""
    import torch
    import torch.nn.functional as F
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * ((1 - p_t) ** gamma)
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    return torch.mean(alpha_t * loss)


def _torch_hinge(x, t):
    import torch
    return torch.clamp(1.0 - t * x, min=0).mean()


def _torch_dpo(x, t, beta=0.1):
    """TRL's sigmoid DPO loss: -logsigmoid(beta * ((pc - pr) - (rc - rr))).mean()."""
    import torch.nn.functional as F
    pr, rc, rr = t[:, 0], t[:, 1], t[:, 2]
    return -F.logsigmoid(beta * ((x - pr) - (rc - rr))).mean()


def _torch_kl_logits(x, t, temperature=KL_TEMPERATURE):
    import torch.nn.functional as F
    T = temperature
    return F.kl_div(F.log_softmax(x / T, -1), F.log_softmax(t / T, -1), log_target=True,
                    reduction="batchmean") * (T * T)


def _torch_seq(x, t):
    """The usual sequence log-probability: log_softmax + gather + masked sum (TRL's get_batch_logps)."""
    import torch
    B = SEQUENCES if x.shape[0] % SEQUENCES == 0 else 1
    x3 = x.reshape(B, -1, x.shape[-1])
    t2 = t.reshape(B, -1)
    mask = t2 != -100
    logp = torch.log_softmax(x3, -1).gather(-1, torch.where(mask, t2, 0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1).sum()


def _torch_triplet(x, t):
    import torch.nn.functional as F
    return F.triplet_margin_loss(x, t[:, 0], t[:, 1])


def _torch_info_nce(x, t, temperature=INFO_NCE_TEMPERATURE):
    import torch
    import torch.nn.functional as F
    logits = (x @ t.T) / temperature
    return F.cross_entropy(logits, torch.arange(x.shape[0]))


def _torch_kl_div_sum(x, t):
    import torch.nn.functional as F
    return F.kl_div(x, t, reduction="sum")   # "sum": torch warns on every "mean" call


def _torch_f(name):
    def call(x, t):
        import torch.nn.functional as F
        return getattr(F, name)(x, t)
    return call


def _field_losses() -> dict:
    """name -> (family, FieldLoss, make_inputs, presets, arrays_read)."""
    out = {}
    for name, torch_loss, gen, kw in (
            ("binary_cross_entropy", _torch_f("binary_cross_entropy"), bce_inputs, {}),
            ("binary_cross_entropy_with_logits", _torch_f("binary_cross_entropy_with_logits"),
             logit_label_inputs, {}),
            ("sigmoid_focal_loss", _torch_focal, logit_label_inputs, {}),
            ("hinge_loss", _torch_hinge, hinge_inputs, {}),
            ("kl_div", _torch_kl_div_sum, kl_div_inputs, {"reduction": "sum"})):
        out[name] = ("elementwise", _elementwise(name, torch_loss, **kw), gen, ELEMENTWISE_SIZES, 2)

    # dpo_loss takes no num_threads (NumPy on (B,) vectors): every thread row times the same call
    def dpo_fwd(x, t, num_threads=None):
        return fastloss.dpo_loss(*_dpo_args(x, t))

    def dpo_grad(x, t, num_threads=None):
        return _first_grad(fastloss.dpo_loss_with_grad(*_dpo_args(x, t)))

    out["dpo_loss"] = ("elementwise", FieldLoss(
        dpo_fwd, dpo_grad,
        lambda x, t, dtype=np.float64: _ref(reference.dpo_loss, *_dpo_args(x, t), dtype=dtype),
        lambda x, t, dtype=np.float64: _first(_ref(reference.dpo_loss_grad, *_dpo_args(x, t), dtype=dtype)),
        _torch_dpo), dpo_inputs, DPO_SIZES, 4)

    out["multi_margin_loss"] = ("rows", FieldLoss(
        lambda x, t, **o: fastloss.multi_margin_loss(x, t, **o),
        lambda x, t, **o: fastloss.multi_margin_loss_with_grad(x, t, **o),
        lambda x, t, dtype=np.float64: _ref(reference.multi_margin_loss, x, t, dtype=dtype),
        lambda x, t, dtype=np.float64: _ref(reference.multi_margin_loss_grad, x, t, dtype=dtype),
        _torch_f("multi_margin_loss")), logits_index_inputs, V_SHAPES, 1)

    T = KL_TEMPERATURE
    out["kl_div_logits"] = ("rows", FieldLoss(
        lambda x, t, **o: fastloss.kl_div_logits(x, t, temperature=T, **o),
        lambda x, t, **o: fastloss.kl_div_logits_with_grad(x, t, temperature=T, **o),
        lambda x, t, dtype=np.float64: _ref(reference.kl_div_logits, x, t, temperature=T, dtype=dtype),
        lambda x, t, dtype=np.float64: _ref(reference.kl_div_logits_grad, x, t, temperature=T, dtype=dtype),
        _torch_kl_logits), two_logits_inputs, V_SHAPES, 2)

    def seq_fwd(x, t, **o):
        return np.sum(fastloss.sequence_log_probs(*_seq_view(x, t), **o))

    def seq_grad(x, t, **o):
        x3, t2 = _seq_view(x, t)
        logp, g = fastloss.sequence_log_probs_with_grad(x3, t2, np.ones(x3.shape[0]), **o)
        return np.sum(logp), g.reshape(x.shape)

    out["sequence_log_probs"] = ("rows", FieldLoss(
        seq_fwd, seq_grad,
        lambda x, t, dtype=np.float64: np.sum(_ref(reference.sequence_log_probs, *_seq_view(x, t), dtype=dtype)),
        lambda x, t, dtype=np.float64: _ref(reference.sequence_log_probs_grad, *_seq_view(x, t),
                                            np.ones(_seq_view(x, t)[0].shape[0]), dtype=dtype).reshape(x.shape),
        _torch_seq), logits_index_inputs, SEQUENCE_SHAPES, 1)

    out["triplet_margin_loss"] = ("rows", FieldLoss(
        lambda x, t, **o: fastloss.triplet_margin_loss(x, t[:, 0], t[:, 1], **o),
        lambda x, t, **o: _first_grad(fastloss.triplet_margin_loss_with_grad(x, t[:, 0], t[:, 1], **o)),
        lambda x, t, dtype=np.float64: _ref(reference.triplet_margin_loss, x, t[:, 0], t[:, 1], dtype=dtype),
        lambda x, t, dtype=np.float64: _first(_ref(reference.triplet_margin_loss_grad, x, t[:, 0], t[:, 1],
                                                   dtype=dtype)),
        _torch_triplet), triplet_inputs, TRIPLET_SHAPES, 3)

    tau = INFO_NCE_TEMPERATURE
    out["info_nce_loss"] = ("rows", FieldLoss(
        lambda x, t, **o: fastloss.info_nce_loss(x, t, temperature=tau, **o),
        lambda x, t, **o: _first_grad(fastloss.info_nce_loss_with_grad(x, t, temperature=tau, **o)),
        lambda x, t, dtype=np.float64: _ref(reference.info_nce_loss, x, t, temperature=tau, dtype=dtype),
        lambda x, t, dtype=np.float64: _first(_ref(reference.info_nce_loss_grad, x, t, temperature=tau,
                                                   dtype=dtype)),
        _torch_info_nce), embedding_inputs, INFO_NCE_SHAPES, 2)
    return out


FIELD_LOSSES = _field_losses()
