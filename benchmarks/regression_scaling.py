"""Memory-bound check for the regression kernels: % of read bandwidth and 1 -> 2 thread scaling.

    python benchmarks/regression_scaling.py [--n 1e8] [--rounds 11]

Interleaves, round by round, the plain read kernel (fastloss._core.read_sum_f32) and each
regression loss forward at 1 and 2 threads on float32 input, and reports medians: GB/s
(input + target bytes), that rate as % of the read rate at the same thread count, and the
2-thread speedup.  Medians of interleaved calls, because this machine is shared and noisy.
"""
import argparse
import time

import numpy as np

import fastloss
from fastloss import _core

LOSSES = ("mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=float, default=1e8)
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    n = int(args.n)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n, dtype=np.float32)
    t = rng.standard_normal(n, dtype=np.float32)
    probe = np.ones(2 * n, np.float32)          # the same number of bytes as input + target
    samples = {}
    for _ in range(args.rounds):
        for nt in (1, 2):
            calls = [("read", lambda: _core.read_sum_f32(probe, nt))]
            calls += [(name, lambda f=getattr(fastloss, name): f(x, t, num_threads=nt)) for name in LOSSES]
            for key, fn in calls:
                t0 = time.perf_counter()
                fn()
                samples.setdefault((key, nt), []).append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in samples.items()}
    gbs = {k: 8 * n / v / 1e9 for k, v in med.items()}
    print(f"fastloss {fastloss.__version__}, isa {_core.get_isa()}, n = {n:.0e} float32, "
          f"{args.rounds} interleaved rounds, medians")
    print(f"read: 1 thread {gbs['read', 1]:.1f} GB/s, 2 threads {gbs['read', 2]:.1f} GB/s")
    for name in LOSSES:
        print(f"{name:15s} 1t {gbs[name, 1]:5.1f} GB/s ({100 * gbs[name, 1] / gbs['read', 1]:3.0f}% of read)"
              f"   2t {gbs[name, 2]:5.1f} GB/s ({100 * gbs[name, 2] / gbs['read', 2]:3.0f}%)"
              f"   2t/1t {med[name, 1] / med[name, 2]:.2f}x")


if __name__ == "__main__":
    main()
