"""Sequence log-probabilities, DPO and InfoNCE, built on the fused cross-entropy kernel.

* ``sequence_log_probs``: per-sequence sum (or mean) of log p(target_t) from (..., T, V)
  logits.  The usual way (TRL and most users) materializes ``log_softmax(logits)``, an
  N x V array, and gathers from it; here each row goes once through the cross-entropy
  row kernel (``fastloss._core.cross_entropy_rows``), whose per-row loss is
  ``lse - x_t = -log p(target_t)``, so only O(B*T) doubles are allocated.  The gradient
  for a vector ``grad_seq`` is the cross-entropy gradient with the per-row sample weight
  ``-grad_seq[b]`` (``/ count_b`` with ``average=True``), written once (possibly in place
  over the logits).
* ``dpo_loss``: Direct Preference Optimization (Rafailov et al. 2023) and the variants
  documented by TRL's ``DPOTrainer`` (conservative DPO via label smoothing, robust DPO,
  IPO, hinge / SLiC), on the B sequence log-probabilities.  These are B-length vectors
  (B is typically 8..256): a few NumPy operations on them cost microseconds, and a C
  kernel would not beat them; the heavy part of a DPO step is the sequence log-probs.
* ``info_nce_loss``: CLIP/SimCLR InfoNCE, the cross-entropy of the similarity rows
  ``query @ keys.T / temperature`` (NumPy's BLAS) with the matching key as the positive,
  through the same row kernel with its gradient written in place into the similarity
  buffer.

End to end, a DPO step on CPU (only the gradient is N x V, and it may overwrite the logits)::

    logp = sequence_log_probs(logits, target)                     # (2B,) chosen then rejected
    ref = sequence_log_probs(ref_logits, target)
    loss, g_c, g_r = dpo_loss_with_grad(logp[:B], logp[B:], ref[:B], ref[B:], beta=0.1)
    _, grad = sequence_log_probs_with_grad(logits, target, np.concatenate([g_c, g_r]),
                                           grad_out=logits)        # d loss / d logits, in place
"""
from __future__ import annotations

import math

import numpy as np

from fastloss import _core
from fastloss._config import resolve_num_threads
from fastloss._validation import as_array, as_float_array, check_grad_out, check_positive, check_reduction
from fastloss.classification import _hard_target, _int64, _into, _rows_layout

__all__ = ["sequence_log_probs", "sequence_log_probs_with_grad", "dpo_loss", "dpo_loss_with_grad",
           "info_nce_loss", "info_nce_loss_with_grad"]

DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")


def _loss_dtype(*arrays) -> np.dtype:
    return np.dtype(np.float64) if any(a.dtype == np.float64 for a in arrays) else np.dtype(np.float32)


def _cast(values, dtype: np.dtype):
    """float64 values in the result dtype (overflow to inf silently, as the kernels do)."""
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float64).astype(dtype)


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _same_array(a, b: np.ndarray) -> bool:
    """`a` views exactly the elements of `b` (same address, shape, strides and dtype)."""
    return (isinstance(a, np.ndarray) and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype)


# ---- sequence log-probabilities ------------------------------------------------------------

class _Seq:
    """A sequence_log_probs call, checked and laid out for the row kernel."""

    def __init__(self, logits, target, ignore_index, average, num_threads):
        x0 = as_float_array(logits, "logits")
        if x0.ndim < 2:
            raise ValueError(f"logits must have shape (..., T, V) (at least 2 dimensions), got shape {x0.shape}")
        self.logits = x0
        self.x = _rows_layout(x0, x0.ndim - 1)      # a copy only if the class axis is strided
        self.V = x0.shape[-1]
        if self.V == 0:
            raise ValueError("logits have 0 classes (V = 0)")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.ignore_index = _int64(ignore_index, "ignore_index")
        self.average = _check_bool(average, "average")
        self.lead = x0.shape[:-2]
        self.T = x0.shape[-2]
        self.B = math.prod(self.lead)
        self.t = _hard_target(target, x0.shape, x0.ndim - 1, x0.shape[:-1], self.V, self.ignore_index,
                              func="sequence_log_probs")
        self.nthreads = resolve_num_threads(num_threads)
        self.active = (self.t != self.ignore_index).reshape(self.B, self.T)
        self.loss_dtype = _loss_dtype(x0)

    def counts(self) -> np.ndarray:
        return np.count_nonzero(self.active, axis=1).astype(np.float64)

    def finish(self, neg_row_logp: np.ndarray):
        """logp per sequence from the per-row -log p (0 on ignored rows), in the result dtype.

        Both entry points go through here, so the forward and _with_grad agree bitwise."""
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            s = -np.sum(neg_row_logp.reshape(self.B, self.T), axis=1) + 0.0   # + 0.0: no -0.0
            if self.average:
                s = s / self.counts()                                        # 0 tokens: nan
        return _cast(s, self.loss_dtype).reshape(self.lead)


def sequence_log_probs(logits, target, *, ignore_index=-100, average=False, num_threads=None):
    """Per-sequence log-probability of the target tokens, ``sum_t log softmax(logits[..., t, :])[target_t]``.

    ``logits``: (..., T, V) (e.g. (B, T, V)), float16/float32/float64/bfloat16, classes on
    the last axis (unit stride for the fast path; any strides on the other axes, e.g. the
    usual shift ``logits[:, :-1]``, are used without a copy).  ``target``: integer array of
    shape (..., T); positions whose target is ``ignore_index`` are skipped (0 contribution,
    whatever their logits).  Returns shape (...) (``(B,)``; a 0-d array for (T, V) logits),
    float64 for float64 logits, float32 otherwise (computed in double)::

        logp[b] = sum_{t : target[b, t] != ignore_index} (x[b, t, target[b, t]] - logsumexp(x[b, t, :]))

    ``average=True`` divides by the number of non-ignored tokens of the sequence (a sequence
    with none gives nan, 0 / 0, as a masked mean in torch would).

    This is ``-cross_entropy(..., reduction="none")`` summed per sequence: each row is read
    once by the fused cross-entropy kernel and no N x V log-softmax is materialized (only
    O(B*T) doubles are allocated); torch's ``log_softmax(...).gather(...)`` writes one.  A
    row with a +inf logit or all -inf logits gives nan, as in torch.  Targets outside
    [0, V) other than ``ignore_index`` raise IndexError.

    >>> import numpy as np, fastloss
    >>> logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1/3, 1/3, 1/3]]]))
    >>> fastloss.sequence_log_probs(logits, np.array([[0, 2, -100]]))   # log 0.5 + log 0.8
    array([-0.91629073])
    >>> fastloss.sequence_log_probs(logits, np.array([[0, 2, -100]]), average=True)
    array([-0.45814537])
    """
    s = _Seq(logits, target, ignore_index, average, num_threads)
    row_loss = np.zeros(s.B * s.T, dtype=np.float64)
    if s.x.size:
        _core.cross_entropy_rows(s.x, None, "none", s.t, None, float(s.V), None, s.ignore_index,
                                 0.0, 0.0, 0.0, 1.0, row_loss, None, s.nthreads)
    return s.finish(row_loss)


def sequence_log_probs_with_grad(logits, target, grad_seq, *, ignore_index=-100, average=False, num_threads=None,
                                 grad_out=None):
    """``sequence_log_probs`` and the gradient of ``sum_b grad_seq[b] * logp[b]`` w.r.t. the logits.

    Returns ``(logp, grad_logits)``.  ``grad_seq``: the upstream gradient d loss / d logp, of
    the shape of ``logp`` (``(B,)`` for (B, T, V) logits), any float dtype, finite (else
    ValueError).  The gradient (logits' shape and dtype) is, per non-ignored position::

        grad[b, t, :] = w_b * (onehot(target[b, t]) - softmax(x[b, t, :])),
        w_b = grad_seq[b]  (/ count_b with average=True)

    and 0 on ignored positions.  It is the cross-entropy kernel's gradient with the per-row
    sample weight ``-w_b``: each row is read for its statistics and then read and written
    for the gradient while in cache.  ``grad_out``: an array of the logits' shape and dtype
    to write into, or ``logits`` itself (or a view of exactly its elements): in place, the
    gradient overwrites the logits, so the only N x V memory is the logits'.  No other N x V
    array is allocated.  ``logp`` is bitwise identical to ``sequence_log_probs``'s.

    Chained with ``dpo_loss_with_grad`` this is a DPO step without a log-softmax temporary:

    >>> import numpy as np, fastloss
    >>> rng = np.random.default_rng(0)
    >>> logits = rng.standard_normal((4, 5, 7))             # chosen = rows 0, 1; rejected = rows 2, 3
    >>> target = rng.integers(0, 7, (4, 5))
    >>> logp = fastloss.sequence_log_probs(logits, target)
    >>> loss, g_c, g_r = fastloss.dpo_loss_with_grad(logp[:2], logp[2:], beta=0.5)
    >>> _, grad = fastloss.sequence_log_probs_with_grad(logits, target, np.concatenate([g_c, g_r]))
    >>> grad.shape, round(float(loss), 6)
    ((4, 5, 7), 0.131117)
    """
    s = _Seq(logits, target, ignore_index, average, num_threads)
    g = as_float_array(grad_seq, "grad_seq")
    if g.shape != s.lead:
        raise ValueError(f"grad_seq has shape {g.shape}, expected {s.lead} (one value per sequence, the shape "
                         f"of sequence_log_probs' result)")
    g = np.asarray(g, dtype=np.float64).reshape(s.B)
    if not np.all(np.isfinite(g)):
        i = int(np.flatnonzero(~np.isfinite(g))[0])
        raise ValueError(f"grad_seq must be finite, got {g[i]} at sequence {i}")
    x0 = s.logits
    if grad_out is not None:
        if not isinstance(grad_out, np.ndarray) and hasattr(grad_out, "__dlpack__"):
            grad_out = as_array(grad_out, "grad_out")       # e.g. a torch.Tensor: a view of its memory
        inputs = {"target": as_array(target, "target"), "grad_seq": as_array(grad_seq, "grad_seq")}
        if not _same_array(grad_out, x0):       # logits itself (or a view of the same elements): in place
            inputs["logits"] = x0
        grad_out = check_grad_out(grad_out, x0.shape, x0.dtype, inputs, inplace_name="logits")

    # w_b per row, negated: the kernel's gradient is sw * (softmax - onehot).
    w = -g
    if s.average:
        c = s.counts()
        w = np.divide(w, c, out=np.zeros_like(w), where=c > 0)
    sw = np.repeat(w, s.T)
    # x_t before the kernel runs (it may overwrite the logits); ignored rows read class 0.
    safe_t = np.where(s.active.reshape(-1), s.t, 0).reshape(x0.shape[:-1] + (1,))
    xt = np.take_along_axis(s.x, safe_t, axis=-1).reshape(-1).astype(np.float64)
    lse = np.zeros(s.B * s.T, dtype=np.float64)

    def fill(buf):
        if s.x.size:
            _core.cross_entropy_rows(s.x, buf, "grad", s.t, None, float(s.V), sw, s.ignore_index,
                                     0.0, 0.0, 0.0, 1.0, None, lse, s.nthreads)

    if grad_out is None:
        result = np.empty(x0.shape, dtype=x0.dtype)
        fill(result)
    else:
        result = grad_out
        _into(result, x0.ndim - 1, s.x.shape, fill)
    with np.errstate(invalid="ignore"):
        lse = np.where(lse == np.inf, np.nan, lse)          # a +inf logit: nan, as the forward
        neg = np.where(s.active.reshape(-1), lse - xt, 0.0)
    return s.finish(neg), result


# ---- DPO -----------------------------------------------------------------------------------

def _dpo_prepare(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                 loss_type, label_smoothing, reduction):
    pc = as_float_array(policy_chosen_logps, "policy_chosen_logps")
    pr = as_float_array(policy_rejected_logps, "policy_rejected_logps")
    if pc.ndim != 1:
        raise ValueError(f"policy_chosen_logps must be 1-D (one log-prob per pair), got shape {pc.shape}")
    if pr.shape != pc.shape:
        raise ValueError(f"policy_rejected_logps has shape {pr.shape}, expected {pc.shape} (that of "
                         f"policy_chosen_logps)")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        missing = "ref_rejected_logps" if ref_rejected_logps is None else "ref_chosen_logps"
        raise ValueError(f"{missing} is None but the other reference log-probs are given: pass both (DPO) or "
                         f"neither (reference-free)")
    arrays = [pc, pr]
    if ref_chosen_logps is not None:
        rc = as_float_array(ref_chosen_logps, "ref_chosen_logps")
        rr = as_float_array(ref_rejected_logps, "ref_rejected_logps")
        for name, a in (("ref_chosen_logps", rc), ("ref_rejected_logps", rr)):
            if a.shape != pc.shape:
                raise ValueError(f"{name} has shape {a.shape}, expected {pc.shape} (that of policy_chosen_logps)")
        arrays += [rc, rr]
    else:
        rc = rr = None
    b = check_positive(beta, "beta")
    if not isinstance(loss_type, str) or loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(repr(t) for t in DPO_LOSS_TYPES)}; "
                         f"got {loss_type!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float, np.integer, np.floating)):
        raise TypeError(f"label_smoothing must be a real number, got {type(label_smoothing).__name__}")
    eps = float(label_smoothing)
    if loss_type == "robust" and not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for loss_type='robust', got {label_smoothing!r}")
    if loss_type == "sigmoid" and not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1] for loss_type='sigmoid', got {label_smoothing!r}")
    if loss_type in ("ipo", "hinge") and eps != 0.0:
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' and 'robust' only; got "
                         f"label_smoothing={label_smoothing!r} with loss_type={loss_type!r}")
    reduction = check_reduction(reduction)
    f64 = [np.asarray(a, dtype=np.float64) for a in (pc, pr)]
    r64 = [np.zeros_like(f64[0]), np.zeros_like(f64[0])] if rc is None else \
        [np.asarray(a, dtype=np.float64) for a in (rc, rr)]
    return pc, pr, f64, r64, b, eps, reduction, _loss_dtype(*arrays)


def _dpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
         label_smoothing, reduction, want_grad, want_rewards=True):
    pc, pr, (c, r), (rc, rr), b, eps, reduction, dt = _dpo_prepare(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
        label_smoothing, reduction)
    # One softplus per pair: with sp = softplus(-z) = -log sigmoid(z) and softplus(z) = sp + z,
    #   sigmoid: (1 - eps) sp(-z) + eps sp(z) = sp + eps z,
    #   robust:  ((1 - eps) sp(-z) - eps sp(z)) / (1 - 2 eps) = sp - eps z / (1 - 2 eps),
    # and sigmoid(z) = exp(-sp), sigmoid(-z) = exp(-sp - z) (no 1 - s: exact for large |z|).
    # The gradient is formed only when asked for (the forward is ~4x faster than with it).
    dh = None
    with np.errstate(invalid="ignore", over="ignore"):
        h = (c - r) - (rc - rr)
        z = b * h
        if loss_type in ("sigmoid", "robust"):
            sp = np.log1p(np.exp(-np.abs(z))) + np.maximum(-z, 0.0)   # 4x faster than logaddexp(0, -z)
            if loss_type == "sigmoid":
                loss = sp + eps * z
                if want_grad:                             # b (-(1 - eps) sigmoid(-z) + eps sigmoid(z))
                    dh = b * (eps * np.exp(-sp) - (1.0 - eps) * np.exp(-sp - z))
            else:
                k = 1.0 / (1.0 - 2.0 * eps)
                loss = sp - (eps * k) * z
                if want_grad:                             # b (-(1 - eps) sigmoid(-z) - eps sigmoid(z)) / (1 - 2 eps)
                    dh = (-b * k) * ((1.0 - eps) * np.exp(-sp - z) + eps * np.exp(-sp))
        elif loss_type == "ipo":
            d = h - 1.0 / (2.0 * b)
            loss = d * d
            dh = 2.0 * d
        else:                                             # hinge
            m = 1.0 - z
            loss = np.maximum(m, 0.0)
            if want_grad:
                dh = np.where(m > 0.0, -b, 0.0)
                dh = np.where(np.isnan(m), np.nan, dh)
        chosen_rewards = _cast(b * (c - rc), dt) if want_rewards else None
        rejected_rewards = _cast(b * (r - rr), dt) if want_rewards else None
        n = loss.shape[0]
        if reduction == "none":
            out = _cast(loss, dt)
        else:
            total = _core.sum_f64(loss)     # compensated: within ~1 ulp of the exact sum
            if reduction == "mean":
                total = total / n if n else math.nan
                if dh is not None:
                    dh = dh / n
            out = _cast(total, dt)[()]
    if not want_grad:
        return out, chosen_rewards, rejected_rewards
    with np.errstate(over="ignore"):
        g_c = dh.astype(pc.dtype)
        g_r = (-dh).astype(pr.dtype)
    return out, g_c, g_r, chosen_rewards, rejected_rewards


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0, reduction="mean", return_rewards=False):
    """Direct Preference Optimization loss (Rafailov et al. 2023) and TRL's variants.

    Inputs: 1-D arrays of equal length B (float16/float32/float64/bfloat16) holding the
    sequence log-probabilities (e.g. from ``sequence_log_probs``) of the chosen and rejected
    completions under the policy and the reference model.  With both references None the
    loss is reference-free (their terms are 0); exactly one None is a ValueError.  With
    h = (pi_c - pi_r) - (ref_c - ref_r), beta > 0 and eps = ``label_smoothing``:

    ==========  ================================================================  ==============
    loss_type   per-pair loss                                                     eps
    ==========  ================================================================  ==============
    "sigmoid"   -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)          [0, 1] (cDPO)
    "robust"    (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h))        [0, 0.5)
                / (1 - 2 eps)
    "ipo"       (h - 1 / (2 beta))**2                                             0
    "hinge"     max(0, 1 - beta h)                                                0
    ==========  ================================================================  ==============

    as TRL's ``DPOTrainer`` documents them (IPO on the log-probs as given: TRL averages the
    log-probs over tokens for IPO, here pass ``sequence_log_probs(..., average=True)`` for
    that).  log sigmoid is computed as ``-(log1p(exp(-|z|)) + max(-z, 0))``: exact for any
    |beta h| (1e4 gives 0 and -1e4).  ``reduction``: "mean" / "sum" over the pairs, or "none" (B,).
    The result is float64 if any input is float64, else float32 (computed in float64).
    With ``return_rewards=True`` returns ``(loss, chosen_rewards, rejected_rewards)`` with
    the implicit rewards ``beta * (pi_c - ref_c)`` and ``beta * (pi_r - ref_r)`` (B,), the
    quantities DPO users log.

    These are B-length vectors: the computation is a few NumPy operations (microseconds for
    B ~ 64; a C kernel would not be faster).  The heavy part of DPO, the sequence
    log-probabilities over (B, T, V) logits, is the fused kernel of ``sequence_log_probs``.

    >>> import numpy as np, fastloss
    >>> fastloss.dpo_loss(np.array([-10.0, -12.0]), np.array([-11.0, -11.0]), beta=1.0)
    np.float64(0.8132616875182228)
    >>> fastloss.dpo_loss(np.array([-10.0]), np.array([-11.0]), np.array([-10.5]), np.array([-10.5]),
    ...                   beta=0.1, return_rewards=True)
    (np.float64(0.6443966600735709), array([0.05]), array([-0.05]))
    """
    out, cr, rr = _dpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                       loss_type, label_smoothing, reduction, want_grad=False, want_rewards=bool(return_rewards))
    return (out, cr, rr) if return_rewards else out


def dpo_loss_with_grad(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                       *, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, reduction="mean",
                       return_rewards=False):
    """``dpo_loss`` and its gradient with respect to the policy log-probabilities.

    Returns ``(loss, grad_policy_chosen, grad_policy_rejected)``, and with
    ``return_rewards=True`` the 5-tuple ``(loss, grad_policy_chosen, grad_policy_rejected,
    chosen_rewards, rejected_rewards)``.  The gradients (of ``loss.sum()``; the mean divides
    by B) have the dtype of the corresponding input; with dl/dh the derivative of the
    per-pair loss in h, grad_chosen = dl/dh and grad_rejected = -dl/dh::

        sigmoid: beta (-(1 - eps) sigmoid(-beta h) + eps sigmoid(beta h))
        robust:  beta (-(1 - eps) sigmoid(-beta h) - eps sigmoid(beta h)) / (1 - 2 eps)
        ipo:     2 (h - 1 / (2 beta))
        hinge:   -beta where 1 - beta h > 0, else 0 (0 at the kink, as torch's relu)

    Pass them as ``grad_seq`` to ``sequence_log_probs_with_grad`` for the gradient with
    respect to the logits (see that function's example).

    >>> import numpy as np, fastloss
    >>> loss, g_c, g_r = fastloss.dpo_loss_with_grad(np.array([-10.0]), np.array([-10.0]), beta=1.0)
    >>> loss, g_c, g_r
    (np.float64(0.6931471805599453), array([-0.5]), array([0.5]))
    """
    out, g_c, g_r, cr, rr = _dpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                 ref_rejected_logps, beta, loss_type, label_smoothing, reduction, want_grad=True,
                                 want_rewards=bool(return_rewards))
    return (out, g_c, g_r, cr, rr) if return_rewards else (out, g_c, g_r)


# ---- InfoNCE -------------------------------------------------------------------------------

class _NCE:
    def __init__(self, query, keys, temperature, symmetric, reduction, num_threads):
        q = as_float_array(query, "query")
        k = as_float_array(keys, "keys")
        if q.ndim != 2:
            raise ValueError(f"query must have shape (N, D), got shape {q.shape}")
        if k.ndim != 2:
            raise ValueError(f"keys must have shape (M, D), got shape {k.shape}")
        if k.shape[1] != q.shape[1]:
            raise ValueError(f"keys have dimension D = {k.shape[1]}, query has D = {q.shape[1]}; they must match")
        self.symmetric = _check_bool(symmetric, "symmetric")
        if k.shape[0] < q.shape[0]:
            raise ValueError(f"keys must have at least as many rows as query (key i is the positive of query i): "
                             f"got M = {k.shape[0]} keys for N = {q.shape[0]} queries")
        if self.symmetric and k.shape[0] != q.shape[0]:
            raise ValueError(f"symmetric=True needs as many keys as queries (M == N), got M = {k.shape[0]}, "
                             f"N = {q.shape[0]}")
        self.tau = check_positive(temperature, "temperature")
        self.reduction = check_reduction(reduction)
        self.nthreads = resolve_num_threads(num_threads)
        self.q, self.k = q, k
        self.compute = np.dtype(np.float64) if np.float64 in (q.dtype, k.dtype) else np.dtype(np.float32)
        self.loss_dtype = self.compute
        self.qc = q if q.dtype == self.compute else q.astype(self.compute)
        self.kc = k if k.dtype == self.compute else k.astype(self.compute)
        self.N, self.M = q.shape[0], k.shape[0]
        self.labels = np.arange(self.N, dtype=np.int64)

    def similarities(self) -> np.ndarray:
        s = np.matmul(self.qc, self.kc.T)
        with np.errstate(over="ignore", invalid="ignore"):
            np.divide(s, self.tau, out=s)
        return s

    def ce_rows(self, s, grad: bool, scale: float) -> np.ndarray:
        """Per-row cross-entropy of the similarity rows `s` (C-contiguous) against arange(N);
        with grad, its gradient times `scale` overwrites `s`."""
        row_loss = np.zeros(s.shape[0], dtype=np.float64)
        if s.size:
            _core.cross_entropy_rows(s, s if grad else None, "grad" if grad else "none", self.labels, None,
                                     float(s.shape[1]), None, -100, 0.0, 0.0, 0.0, scale, row_loss, None,
                                     self.nthreads)
        return row_loss

    def run(self, grad: bool):
        half = 0.5 if self.symmetric else 1.0
        scale = half / self.N if (self.reduction == "mean" and self.N) else half
        s = self.similarities()
        st = np.ascontiguousarray(s.T) if self.symmetric else None
        rows = self.ce_rows(s, grad, scale)
        if self.symmetric:
            rows = 0.5 * rows + 0.5 * self.ce_rows(st, grad, scale)
            if grad:
                s += st.T
        if self.reduction == "none":
            loss = _cast(rows, self.loss_dtype)
        else:
            total = _core.sum_f64(rows)     # compensated: within ~1 ulp of the exact sum
            if self.reduction == "mean":
                total = total / self.N if self.N else math.nan
            loss = _cast(total, self.loss_dtype)[()]
        if not grad:
            return loss
        with np.errstate(over="ignore", invalid="ignore"):
            gq = np.matmul(s, self.kc)
            gq /= self.tau
            gk = np.matmul(s.T, self.qc)
            gk /= self.tau
            return loss, gq.astype(self.q.dtype, copy=False), gk.astype(self.k.dtype, copy=False)


def info_nce_loss(query, keys, *, temperature=0.07, symmetric=False, reduction="mean", num_threads=None):
    """InfoNCE / CLIP contrastive loss: cross-entropy of ``query @ keys.T / temperature``
    with query i's positive at key i.

    ``query``: (N, D); ``keys``: (M, D) with M >= N (rows N..M-1 are extra negatives);
    float16/float32/float64/bfloat16.  With S = query @ keys.T / tau::

        loss_i = logsumexp(S[i, :]) - S[i, i]

    ``symmetric=True`` (CLIP; needs M == N) averages both directions:
    ``loss_i = (CE(S)[i] + CE(S.T)[i]) / 2``.  ``reduction``: "mean" / "sum" over the N
    queries, or "none" (N,).  The loss is float64 if either input is float64, else float32.

    The similarities are computed by NumPy's BLAS (``matmul``; float16/bfloat16 inputs are
    converted to float32 first, the (N, D) inputs only) and go through the fused
    cross-entropy row kernel; ``num_threads`` sets that kernel's threads (BLAS uses its own
    pool).  The embeddings are NOT normalized: for the cosine similarity of CLIP and SimCLR,
    normalize the rows first (``x / np.linalg.norm(x, axis=1, keepdims=True)``).

    >>> import numpy as np, fastloss
    >>> q = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> fastloss.info_nce_loss(q, q, temperature=1.0)                  # log(1 + e**-1)
    np.float64(0.3132616875182228)
    """
    return _NCE(query, keys, temperature, symmetric, reduction, num_threads).run(grad=False)


def info_nce_loss_with_grad(query, keys, *, temperature=0.07, symmetric=False, reduction="mean", num_threads=None):
    """``info_nce_loss`` and its gradients: ``(loss, grad_query, grad_keys)``.

    With G = d loss.sum() / d S (the cross-entropy kernel's gradient, written in place over
    the N x M similarity buffer; for ``symmetric`` the two directions' gradients are added,
    which needs a second N x N buffer)::

        grad_query = G @ keys / tau        (N, D), query's dtype
        grad_keys  = G.T @ query / tau     (M, D), keys' dtype

    >>> import numpy as np, fastloss
    >>> q = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> loss, gq, gk = fastloss.info_nce_loss_with_grad(q, q, temperature=1.0, reduction="sum")
    >>> gq
    array([[-0.26894142,  0.26894142],
           [ 0.26894142, -0.26894142]])
    """
    return _NCE(query, keys, temperature, symmetric, reduction, num_threads).run(grad=True)
