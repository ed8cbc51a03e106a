"""Fused linear + cross-entropy: the loss of a language-model head without the N x V logits.

``linear_cross_entropy(input, linear_weight, target)`` equals
``cross_entropy(input @ linear_weight.T + linear_bias, target)`` (torch 2.13's
``torch.nn.functional.linear_cross_entropy``), but the (N, V) logits are never materialized:
the rows are streamed in chunks of ``chunk_size`` rows through ONE preallocated
(chunk_size, V) buffer.

Design (per chunk of rows [s, e), all steps in place in that buffer):

1. Compact: the rows whose target is ``ignore_index`` are dropped (they have loss 0 and a 0
   gradient, whatever their logits), so they cost no BLAS work.  The k kept rows of ``input``
   are gathered into a reused (chunk_size, H) buffer unless the chunk is used as it is.
2. ``L = x_k @ W.T (+ b)``: one BLAS GEMM (NumPy's ``matmul(..., out=buffer)``).
3. The fused cross-entropy row kernel (``fastloss._core.cross_entropy_rows``, the one under
   ``cross_entropy``) reads each row of L once for its max / log-sum-exp and writes the row's
   loss and ``G = grad_scale * d loss / d L`` over L (mode "grad", in place).
4. ``grad_linear_weight += G.T @ x_k``: at one thread a GEMM with beta = 1 (SciPy's BLAS
   wrapper when SciPy is importable, which writes into the accumulator); else NumPy's matmul in
   blocks of vocabulary rows into a small reused block, then added), ``grad_linear_bias += sum_rows G``,
   ``grad_input[rows] = G @ W`` (a GEMM; ignored rows get 0).

The forward-only call stops after step 3 (mode "none": no gradient written).  Peak extra
memory: the chunk buffer (chunk_size x V in the compute type), a (chunk_size, H) buffer for
gathered or converted rows, and the gradients asked for (grad_linear_weight is accumulated in
float32, float64 for float64, and returned in linear_weight's dtype).
"""
from __future__ import annotations

import contextlib
import math
import threading

import numpy as np

from fastloss import _core
from fastloss._config import resolve_num_threads
from fastloss._validation import as_float_array, check_reduction
from fastloss.classification import (_F32_OVERFLOW, _check_options, _hard_target, _int64, _soft_target, _sum,
                                     _weights)

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_grad", "default_chunk_size"]

#: Upper bound of the default chunk's logits buffer (bytes).
CHUNK_BYTES_MAX = 512 * 2 ** 20
#: Bounds of the default chunk size (rows).
CHUNK_ROWS_MIN, CHUNK_ROWS_MAX = 256, 4096


def default_chunk_size(n_rows: int, in_features: int, num_classes: int, itemsize: int = 4) -> int:
    """The ``chunk_size`` that ``chunk_size=None`` picks.

    Rule: ``H / 2`` rows, rounded down to a power of two and clipped to [256, 4096], then
    lowered (to a multiple of 64) until the chunk's logits buffer (rows x V x itemsize) is at
    most 512 MiB, and at most ``n_rows``.  Why: the weight-gradient GEMM of a chunk reads and
    writes the whole (V, H) accumulator once for 2 x rows x V x H flops (about rows / 4 flops
    per byte in float32), so a few hundred rows keep it compute-bound; the input-gradient GEMM
    ``G @ W`` (rows x V times V x H: short and very deep) was 3-5x slower per flop in OpenBLAS
    at 256 rows than at 1024 for H = 512, V = 16000 (2 threads), hence the floor of 256.  At
    (N, H, V) = (4096, 1024, 32000), 2 threads, 256 to 2048 rows took the same time within
    the machine's noise (21-27 s) while the peak extra memory grew from 0.18 to 0.42 GiB, so
    the rule takes the smaller end: ``rows = H / 2`` makes the logits buffer half the size of
    the weight gradient (V x H) that the caller asked for anyway; the 512 MiB cap bounds the
    largest heads (V = 128256, H = 2048: 1024 rows, 0.5 GiB).  The benchmark
    (``benchmarks/linear_cross_entropy.py --curve ...``) prints the curve.

    >>> from fastloss.linear import default_chunk_size
    >>> default_chunk_size(4096, 1024, 32000), default_chunk_size(8192, 2048, 128256)
    (512, 1024)
    """
    rows = 1 << max(0, int(in_features // 2).bit_length() - 1)
    rows = min(max(rows, CHUNK_ROWS_MIN), CHUNK_ROWS_MAX)
    cap = CHUNK_BYTES_MAX // max(1, num_classes * itemsize)
    if rows > cap:
        rows = max(1, cap // 64 * 64 or cap)
    return max(1, min(rows, n_rows))


# ---- BLAS threads and the accumulating GEMM --------------------------------------------------

_blas_lock = threading.Lock()
_blas_state: dict = {}


def _blas():
    """(scipy gemm functions by dtype or None, threadpoolctl controller or None), made once."""
    with _blas_lock:
        if not _blas_state:
            gemm = None
            try:
                from scipy.linalg import blas as _sb
                gemm = {np.dtype(np.float32): _sb.sgemm, np.dtype(np.float64): _sb.dgemm}
            except Exception:          # SciPy is optional
                gemm = None
            ctl = None
            try:                        # after SciPy: its BLAS is loaded now and gets limited too
                from threadpoolctl import ThreadpoolController
                ctl = ThreadpoolController()
            except Exception:          # threadpoolctl is optional
                ctl = None
            _blas_state["gemm"] = gemm
            _blas_state["ctl"] = ctl
        return _blas_state["gemm"], _blas_state["ctl"]


def _blas_threads(n: int):
    """A context limiting the BLAS libraries to `n` threads (threadpoolctl), or a no-op."""
    ctl = _blas()[1]
    if ctl is None:
        return contextlib.nullcontext()
    return ctl.limit(limits=n, user_api="blas")


#: Size of the block of the weight gradient made by one GEMM and then added (see _gemm_accumulate).
ACC_BLOCK_BYTES = 8 * 2 ** 20


def _gemm_accumulate(acc: np.ndarray, g: np.ndarray, x: np.ndarray, tmp_holder: list, nthreads: int) -> None:
    """acc (V, H) += g.T @ x, with g (k, V) and x (k, H) C-contiguous, acc C-contiguous.

    At one thread, SciPy's GEMM wrapper (when SciPy is importable) accumulates in place
    (beta = 1).  With several threads NumPy's matmul makes the product a block of vocabulary
    rows at a time (ACC_BLOCK_BYTES) and adds it: SciPy brings its own OpenBLAS, whose thread
    pool then spins next to NumPy's and the kernel's on the same cores (measured at (4096,
    1024, 32000) on 2 cores: the whole call 15-20 % slower than with the blocks)."""
    if acc.size == 0 or x.shape[0] == 0:
        return
    gemm = _blas()[0] if nthreads == 1 else None
    if gemm is not None:
        # In Fortran order acc.T is (H, V) = x.T (H, k) @ g (k, V); g.T (V, k) is F-contiguous.
        r = gemm[acc.dtype](1.0, x.T, g.T, beta=1.0, c=acc.T, trans_b=1, overwrite_c=1)
        if not np.shares_memory(r, acc):     # (never with the layouts above; kept as a guard)
            acc.T[...] = r
        return
    V, H = acc.shape
    vb = max(1, min(V, ACC_BLOCK_BYTES // max(1, H * acc.itemsize)))
    if not tmp_holder:
        tmp_holder.append(np.empty((vb, H), dtype=acc.dtype))
    tmp = tmp_holder[0]
    for v0 in range(0, V, vb):
        v1 = min(V, v0 + vb)
        t = tmp[:v1 - v0]
        np.matmul(g[:, v0:v1].T, x, out=t)
        np.add(acc[v0:v1], t, out=acc[v0:v1])


class NumpyGemm:
    """The three products of a chunk with NumPy's BLAS (the default of :class:`_LCE.run`).

    ``logits(out, x, w)``: out = x @ w.T; ``accumulate(acc, g, x)``: acc += g.T @ x;
    ``gx(out, g, w)``: out = g @ w; ``threads()``: a context under which they run (BLAS limited
    to ``nthreads`` by threadpoolctl).  ``fastloss.torch`` passes one that calls torch's BLAS."""

    def __init__(self, nthreads: int):
        self.nthreads = nthreads
        self._tmp: list = []

    def threads(self):
        return _blas_threads(self.nthreads)

    def logits(self, out, x, w):
        np.matmul(x, w.T, out=out)

    def accumulate(self, acc, g, x):
        _gemm_accumulate(acc, g, x, self._tmp, self.nthreads)

    @staticmethod
    def gx(out, g, w):
        np.matmul(g, w, out=out)


# ---- the call ---------------------------------------------------------------------------------

def _check_chunk_size(chunk_size):
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"chunk_size must be None or a positive int, got {type(chunk_size).__name__}")
    c = int(chunk_size)
    if c < 1:
        raise ValueError(f"chunk_size must be None or a positive int, got {c}")
    return c


def _blasable(a: np.ndarray) -> bool:
    """A 2-D array that BLAS reads in place (unit stride on one axis)."""
    s0, s1 = a.strides
    it = a.itemsize
    return (s1 == it and s0 >= max(1, a.shape[1]) * it and s0 % it == 0) or a.shape[0] <= 1


class _LCE:
    def __init__(self, input, linear_weight, target, linear_bias, weight, sample_weight, ignore_index, reduction,
                 label_smoothing, z_loss, softcap, chunk_size, num_threads):
        x0 = as_float_array(input, "input")
        if x0.ndim == 0:
            raise ValueError("input must have at least one dimension (the in_features H), got a 0-d array")
        w0 = as_float_array(linear_weight, "linear_weight")
        if w0.ndim != 2:
            raise ValueError(f"linear_weight must have shape (V, H) (classes x in_features), got shape {w0.shape}")
        H = x0.shape[-1]
        if w0.shape[1] != H:
            raise ValueError(f"linear_weight has in_features {w0.shape[1]} (shape {w0.shape}) but input has "
                             f"in_features {H} (shape {x0.shape}); the last dimensions must match")
        V = w0.shape[0]
        if V == 0:
            raise ValueError("linear_weight has 0 rows (0 classes)")
        b0 = None
        if linear_bias is not None:
            b0 = as_float_array(linear_bias, "linear_bias")
            if b0.shape != (V,):
                raise ValueError(f"linear_bias must have shape ({V},) (one per class, linear_weight has {V} rows), "
                                 f"got shape {b0.shape}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.ignore_index = _int64(ignore_index, "ignore_index")
        self.reduction = check_reduction(reduction)
        self.ls, self.z, self.cap = _check_options(label_smoothing, z_loss, softcap)
        self.chunk = _check_chunk_size(chunk_size)
        self.nthreads = resolve_num_threads(num_threads)

        self.compute = np.dtype(np.float64) if any(
            a is not None and a.dtype == np.float64 for a in (x0, w0, b0)) else np.dtype(np.float32)
        self.loss_dtype = self.compute
        self.rows_shape = x0.shape[:-1]
        self.N, self.H, self.V = math.prod(self.rows_shape), H, V
        logits_shape = self.rows_shape + (V,)
        fake = np.broadcast_to(np.zeros((), dtype=self.compute), logits_shape)   # shape and dtype only
        q = _soft_target(target, fake, fake, len(logits_shape) - 1, self.ignore_index)
        self.q = None if q is None else q.reshape(self.N, V)
        self.t = None if q is not None else _hard_target(
            target, logits_shape, len(logits_shape) - 1, self.rows_shape, V, self.ignore_index,
            func="linear_cross_entropy")
        self.cw, self.sw = _weights(weight, sample_weight, V, self.rows_shape)
        self.x0, self.w0, self.b0 = x0, w0, b0
        if self.q is not None:
            self.denominator = _sum(self.sw) if self.sw is not None else float(self.N)
        elif self.cw is None and self.sw is None:
            self.denominator = float(np.count_nonzero(self.t != self.ignore_index))
        else:
            active = self.t != self.ignore_index
            w_rows = np.where(active, self.cw[np.where(active, self.t, 0)] if self.cw is not None else 1.0, 0.0)
            if self.sw is not None:
                with np.errstate(invalid="ignore"):
                    w_rows = w_rows * np.where(active, self.sw, 0.0)
            self.denominator = _sum(w_rows)

    def _reduce(self, row_loss):
        if self.reduction == "none":
            with np.errstate(over="ignore"):
                return row_loss.astype(self.loss_dtype).reshape(self.rows_shape)
        total = _sum(row_loss)
        if self.reduction == "mean":
            total = total / self.denominator if self.denominator != 0 else math.nan
        if self.loss_dtype == np.float32 and math.isfinite(total) and abs(total) >= _F32_OVERFLOW:
            total = math.copysign(math.inf, total)
        return self.loss_dtype.type(total)

    def run(self, grad: bool, need=("input", "weight", "bias"), gemm=None):
        """The loss (grad False) or (loss, grad_input, grad_linear_weight, grad_linear_bias).

        `need`: which gradients to compute (the others are None and cost no GEMM); `gemm`: the
        object that runs the three products (default :class:`NumpyGemm`)."""
        N, H, V, cd = self.N, self.H, self.V, self.compute
        x2 = self.x0.reshape(N, H)                    # a view unless the row axes cannot merge
        # float16/bfloat16 (or mixed) weights: one float32 copy of W for BLAS (documented).
        wc = self.w0 if self.w0.dtype == cd else self.w0.astype(cd)
        bc = None if self.b0 is None else np.ascontiguousarray(self.b0, dtype=cd)
        C = self.chunk if self.chunk is not None else default_chunk_size(N, H, V, cd.itemsize)
        C = max(1, min(C, N))
        scale = 1.0
        if self.reduction == "mean":
            scale = 1.0 / self.denominator if self.denominator != 0 else math.inf
        wsum = _sum(self.cw) if self.cw is not None else float(V)
        row_loss = np.zeros(N, dtype=np.float64)
        gx = gw = gb = None
        if grad:
            if "input" in need:
                gx = np.empty((N, H), dtype=self.x0.dtype)
            if "weight" in need:
                gw = np.zeros((V, H), dtype=cd)
            if bc is not None and "bias" in need:
                gb = np.zeros(V, dtype=np.float64)
        if gemm is None:
            gemm = NumpyGemm(self.nthreads)
        if N == 0:
            return self._finish(row_loss, grad, gx, gw, gb)
        buf = np.empty((C, V), dtype=cd)              # THE chunk of logits (then of gradients)
        rl = np.empty(C, dtype=np.float64)
        xbuf = None                                   # (C, H): gathered / converted rows
        ones = np.ones(C, dtype=cd) if gb is not None else None
        x_direct = x2.dtype == cd and _blasable(x2)
        gx_direct = gx is not None and gx.dtype == cd
        ii = self.ignore_index
        with gemm.threads():
            for s in range(0, N, C):
                e = min(N, s + C)
                rows = None                           # None: every row of the chunk is used
                tk = None
                if self.t is not None:
                    tc = self.t[s:e]
                    keep = tc != ii
                    k = int(np.count_nonzero(keep))
                    if k == 0:
                        if gx is not None:
                            gx[s:e] = 0
                        continue
                    if k < e - s:
                        rows = s + np.flatnonzero(keep)
                        tk = self.t[rows]
                    else:
                        tk = tc
                else:
                    k = e - s
                # 1. the chunk's rows of input, in the compute type, BLAS-readable
                if rows is None and x_direct:
                    xc = x2[s:e]
                else:
                    if xbuf is None:
                        xbuf = np.empty((C, H), dtype=cd)
                    xc = xbuf[:k]
                    if rows is None:
                        xc[...] = x2[s:e]
                    elif x2.dtype == cd:
                        np.take(x2, rows, axis=0, out=xc)
                    else:
                        xc[...] = x2[rows]
                # 2. logits
                L = buf[:k]
                gemm.logits(L, xc, wc)
                if bc is not None:
                    np.add(L, bc, out=L)
                # 3. loss (and gradient in place)
                swk = None if self.sw is None else (self.sw[s:e] if rows is None else self.sw[rows])
                qk = None if self.q is None else self.q[s:e]
                _core.cross_entropy_rows(L, L if grad else None, "grad" if grad else "none", tk, self.cw, wsum,
                                         swk, ii, self.ls, self.z, self.cap, scale, rl[:k], None, self.nthreads,
                                         qk)
                if rows is None:
                    row_loss[s:e] = rl[:k]
                else:
                    row_loss[rows] = rl[:k]
                if not grad:
                    continue
                # 4. gradients
                if gw is not None:
                    gemm.accumulate(gw, L, xc)
                if gb is not None:
                    gb += np.matmul(ones[:k], L)
                if gx is None:
                    continue
                if rows is None and gx_direct:
                    gemm.gx(gx[s:e], L, wc)
                else:
                    if xbuf is None:
                        xbuf = np.empty((C, H), dtype=cd)
                    gk = xbuf[:k]                     # x_k is no longer needed
                    gemm.gx(gk, L, wc)
                    if rows is None:
                        gx[s:e] = gk
                    else:
                        gx[s:e] = 0
                        gx[rows] = gk
        return self._finish(row_loss, grad, gx, gw, gb)

    def _finish(self, row_loss, grad, gx, gw, gb):
        loss = self._reduce(row_loss)
        if not grad:
            return loss
        if gx is not None:
            gx = gx.reshape(self.x0.shape)
        with np.errstate(over="ignore", invalid="ignore"):
            if gw is not None:
                gw = gw.astype(self.w0.dtype, copy=False)
            if gb is not None:
                gb = gb.astype(self.b0.dtype)
        return loss, gx, gw, gb


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, sample_weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                         chunk_size=None, num_threads=None):
    """Cross-entropy of the logits ``input @ linear_weight.T + linear_bias`` without materializing
    them, ``torch.nn.functional.linear_cross_entropy``.

    The result is ``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` with the
    same options (see :func:`fastloss.cross_entropy` for the per-row formula)::

        logits = input @ W.T + b                        (..., V)
        loss_i = s_i * ((1 - eps) * w[t_i] * (lse_i - logits_i[t_i])
                        + eps * (sum_j w[j] * lse_i - sum_j w[j] logits_i[j]) / V)
                 + z_loss * s_i * w[t_i] * lse_i**2

    computed over chunks of ``chunk_size`` rows: each chunk's logits come from one GEMM into a
    single reused (chunk_size, V) buffer and go through the fused cross-entropy row kernel.
    Rows whose target is ``ignore_index`` are skipped before the GEMM (they cost nothing).

    Parameters
    ----------
    input : array_like (..., H)
        float16, float32, float64 or bfloat16 (e.g. (N, H) or (B, T, H)).  Row axes that
        cannot be merged into one (a strided 3-D view) are copied once (N x H, not N x V).
    linear_weight : array_like (V, H)
    target : integer array of the rows' shape (...), or float array (..., V)
        Class indices in [0, V) or ``ignore_index``; or class probabilities (a float target of
        the logits' shape, as torch; ``ignore_index >= 0`` is then a ValueError).
    linear_bias : array_like (V,), optional
    weight : array_like (V,), optional
        Class weights.
    sample_weight : array_like broadcastable to the rows' shape, optional
        (an extension, as in :func:`fastloss.cross_entropy`).
    ignore_index, reduction, label_smoothing, z_loss, softcap
        As :func:`fastloss.cross_entropy` (torch has no ``z_loss``/``softcap``/``sample_weight``).
    chunk_size : int, optional
        Rows per chunk; ``None`` picks :func:`default_chunk_size` (H / 2 rows, a power of two
        in [256, 4096], logits buffer at most 512 MiB).
    num_threads : int, optional
        Threads of the cross-entropy kernel AND of the BLAS libraries during the call (through
        threadpoolctl when it is installed; without it BLAS keeps its own default; the BLAS
        limit is process-wide while the call runs, as any threadpoolctl limit).  BLAS and the
        kernel run one after the other, never at once: n threads busy at most.  Our
        kernel is bitwise reproducible for any thread count; OpenBLAS is not for small
        products (its single-threaded "small matrix" GEMM sums in another order), so results
        for different thread counts can differ in the last bits (identical for equal counts).

    Computation: float32 (float64 if any of input, linear_weight, linear_bias is float64).
    float16/bfloat16 rows are converted per chunk; a float16/bfloat16 ``linear_weight`` is
    converted once to float32 (a V x H float32 copy) because NumPy has no 16-bit GEMM.

    Returns
    -------
    float32 / float64 scalar, or an array of the rows' shape for ``reduction="none"``.

    Examples
    --------
    >>> import numpy as np, fastloss.linear as fl
    >>> x = np.array([[1.0, 0.0], [0.0, 2.0]])
    >>> W = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> fl.linear_cross_entropy(x, W, np.array([0, 1]))
    np.float64(0.39549474007696783)
    """
    return _LCE(input, linear_weight, target, linear_bias, weight, sample_weight, ignore_index, reduction,
                label_smoothing, z_loss, softcap, chunk_size, num_threads).run(grad=False)


def linear_cross_entropy_with_grad(input, linear_weight, target, *, linear_bias=None, weight=None,
                                   sample_weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                                   z_loss=0.0, softcap=None, chunk_size=None, num_threads=None):
    """:func:`linear_cross_entropy` and the gradients of ``loss.sum()``:
    ``(loss, grad_input, grad_linear_weight, grad_linear_bias)``.

    With G the cross-entropy gradient with respect to the logits (written chunk by chunk
    over the logits buffer, never N x V)::

        grad_input         = G @ W          (..., H), input's dtype (0 for ignored rows)
        grad_linear_weight = G.T @ input    (V, H), linear_weight's dtype
        grad_linear_bias   = G.sum(rows)    (V,), linear_bias's dtype; None without a bias

    ``grad_linear_weight`` is accumulated over the chunks in float32 (float64 when computing
    in float64): at one thread by a GEMM with beta = 1 (SciPy's BLAS wrapper if SciPy is
    importable), else by NumPy's matmul into an 8 MiB block that is then added;
    ``grad_linear_bias`` in float64.
    Extra memory: the chunk buffer, one (chunk_size, H) buffer, and the gradients (plus, for
    a 16-bit ``linear_weight``, its float32 copy and accumulator).

    >>> import numpy as np, fastloss.linear as fl
    >>> x = np.array([[1.0, 0.0]]); W = np.zeros((2, 2))
    >>> loss, gx, gW, gb = fl.linear_cross_entropy_with_grad(x, W, np.array([1]), linear_bias=np.zeros(2))
    >>> gW
    array([[ 0.5,  0. ],
           [-0.5,  0. ]])
    >>> gb
    array([ 0.5, -0.5])
    """
    return _LCE(input, linear_weight, target, linear_bias, weight, sample_weight, ignore_index, reduction,
                label_smoothing, z_loss, softcap, chunk_size, num_threads).run(grad=True)
