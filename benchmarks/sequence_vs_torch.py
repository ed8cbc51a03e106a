"""sequence_log_probs and info_nce_loss against the usual torch code, same thread count.

    python benchmarks/sequence_vs_torch.py [--shape 8x1024x32000] [--rounds 5] [--nce 4096x256]

Sequence log-probs, float32 (B, T, V) logits (10% ignored targets):
  * forward: ``fastloss.sequence_log_probs`` vs
    ``torch.log_softmax(x, -1).gather(-1, t[..., None]).squeeze(-1).masked_fill(ignored, 0).sum(-1)``;
  * forward + backward (upstream gradient g): ``sequence_log_probs_with_grad`` (new gradient
    array, and in place over a copy of the logits) vs torch autograd of ``(lp * g).sum()``.
InfoNCE, float32 (N, D) query and keys, tau = 0.07: ``info_nce_loss`` (+ ``_with_grad``) vs
``F.cross_entropy(q @ k.T / tau, arange(N))`` (+ autograd).

Each round runs every case at 1 and 2 threads, interleaved (fastloss and torch in the same
loop); the report gives medians and torch / fastloss ratios, plus peak extra memory:
tracemalloc for fastloss (its arrays are NumPy allocations), the peak-RSS increase
(VmHWM after resetting it through /proc/self/clear_refs) for torch.  NumPy's BLAS is limited
to the same thread count with threadpoolctl when it is installed.
"""
import argparse
import os
import time
import tracemalloc

import numpy as np
import torch

import fastloss
from fastloss._peakmem import reset_peak_rss, status_bytes

try:                                    # NumPy's BLAS (InfoNCE's matmul) at the same thread count
    from threadpoolctl import threadpool_limits
except ImportError:                     # pragma: no cover
    threadpool_limits = None


def torch_peak_extra(fn):
    """Peak RSS increase of one call, in bytes (None if the peak cannot be reset)."""
    if not reset_peak_rss():
        return None
    base = status_bytes("VmRSS")
    fn()
    hwm = status_bytes("VmHWM")
    return None if base is None or hwm is None else hwm - base


def ours_peak_extra(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8x1024x32000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--nce", default="4096x256")
    args = ap.parse_args()
    B, T, V = (int(v) for v in args.shape.split("x"))
    N, D = (int(v) for v in args.nce.split("x"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, V), dtype=np.float32)
    t = rng.integers(0, V, (B, T))
    t[rng.random((B, T)) < 0.1] = -100
    g = rng.standard_normal(B)
    work = np.empty_like(x)
    xt, tt, gt = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(g.astype(np.float32))
    ignored = tt == -100
    safe = torch.where(ignored, 0, tt)[..., None]

    def torch_fwd():
        return torch.log_softmax(xt, -1).gather(-1, safe).squeeze(-1).masked_fill(ignored, 0).sum(-1)

    def torch_fwdbwd():
        xg = xt.detach().requires_grad_(True)
        lp = torch.log_softmax(xg, -1).gather(-1, safe).squeeze(-1).masked_fill(ignored, 0).sum(-1)
        (lp * gt).sum().backward()
        return xg.grad

    q = rng.standard_normal((N, D), dtype=np.float32)
    k = rng.standard_normal((N, D), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    qt, kt = torch.from_numpy(q), torch.from_numpy(k)
    labels = torch.arange(N)

    def torch_nce():
        return torch.nn.functional.cross_entropy(qt @ kt.T / 0.07, labels)

    def torch_nce_grad():
        a, b = qt.detach().requires_grad_(True), kt.detach().requires_grad_(True)
        torch.nn.functional.cross_entropy(a @ b.T / 0.07, labels).backward()
        return a.grad, b.grad

    # correctness of what is timed
    ref = torch_fwd().double().numpy()
    got = fastloss.sequence_log_probs(x, t)
    print(f"max |logp - torch| / max |logp| = {np.max(np.abs(got - ref)) / np.max(np.abs(ref)):.2e}")

    def setup_inplace():
        np.copyto(work, x)

    cases = {
        "seq fwd": (lambda nt: fastloss.sequence_log_probs(x, t, num_threads=nt), torch_fwd, None),
        "seq fwd+bwd": (lambda nt: fastloss.sequence_log_probs_with_grad(x, t, g, num_threads=nt),
                        torch_fwdbwd, None),
        "seq fwd+bwd in place": (lambda nt: fastloss.sequence_log_probs_with_grad(work, t, g, num_threads=nt,
                                                                                  grad_out=work),
                                 torch_fwdbwd, setup_inplace),
        "info_nce fwd": (lambda nt: fastloss.info_nce_loss(q, k, num_threads=nt), torch_nce, None),
        "info_nce fwd+bwd": (lambda nt: fastloss.info_nce_loss_with_grad(q, k, num_threads=nt), torch_nce_grad,
                             None),
    }
    samples = {}
    for _ in range(args.rounds):
        for nt in (1, 2):
            torch.set_num_threads(nt)
            if threadpool_limits is not None:
                threadpool_limits(nt, user_api="blas")
            for name, (ours, theirs, setup) in cases.items():
                for who, fn in (("fastloss", lambda: ours(nt)), ("torch", theirs)):
                    if setup is not None and who == "fastloss":
                        setup()
                    t0 = time.perf_counter()
                    fn()
                    samples.setdefault((name, nt, who), []).append(time.perf_counter() - t0)
    torch.set_num_threads(1)
    print(f"shape ({B}, {T}, {V}) float32, InfoNCE ({N}, {D}); rounds {args.rounds}; isa {fastloss._core.get_isa()}; "
          f"torch {torch.__version__}; load average {os.getloadavg()}")
    print(f"{'case':24s} {'thr':>3s} {'fastloss ms':>12s} {'torch ms':>10s} {'torch/fastloss':>15s}")
    for name in cases:
        for nt in (1, 2):
            a = float(np.median(samples[(name, nt, "fastloss")]))
            b = float(np.median(samples[(name, nt, "torch")]))
            print(f"{name:24s} {nt:3d} {1e3 * a:12.1f} {1e3 * b:10.1f} {b / a:15.2f}")
    nv = x.nbytes
    print(f"\npeak extra memory (N x V float32 = {nv / 2**20:.0f} MiB):")
    print(f"  fastloss seq fwd               {ours_peak_extra(lambda: fastloss.sequence_log_probs(x, t)) / 2**20:10.2f} MiB"
          " (tracemalloc)")
    print(f"  fastloss seq fwd+bwd           "
          f"{ours_peak_extra(lambda: fastloss.sequence_log_probs_with_grad(x, t, g)) / 2**20:10.2f} MiB (tracemalloc)")
    setup_inplace()
    print(f"  fastloss seq fwd+bwd in place  "
          f"{ours_peak_extra(lambda: fastloss.sequence_log_probs_with_grad(work, t, g, grad_out=work)) / 2**20:10.2f}"
          " MiB (tracemalloc)")
    for name, fn in (("torch seq fwd", torch_fwd), ("torch seq fwd+bwd", torch_fwdbwd)):
        p = torch_peak_extra(fn)
        print(f"  {name:30s} {p / 2**20 if p is not None else float('nan'):10.2f} MiB (peak RSS increase)")


if __name__ == "__main__":
    main()
