"""CPU training step (logits -> cross-entropy -> backward): fastloss.torch vs torch.nn.functional.

    python benchmarks/torch_training_step.py --shapes 8192x32000 --dtypes float32,bfloat16 \
        --threads 1,2 --memory-shape 8192x128256

Prints the median step times (interleaved, same thread count for both), the speed-up
torch / fastloss, and the extra peak memory of one step per provider (fresh subprocesses).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

import fastloss
from fastloss import _core
from fastloss._bench_torch import format_markdown, peak_memory, training_step_cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192x32000")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory-shape", default="8192x128256", help="'' to skip the memory measurement")
    ap.add_argument("--memory-threads", type=int, default=2)
    args = ap.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    threads = [int(n) for n in args.threads.split(",") if n]
    print(f"fastloss {fastloss.__version__} (ISA {_core.get_isa()}), torch {torch.__version__}, "
          f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    if shapes:
        rows = training_step_cases(shapes, dtypes, threads, args.repeats)
        print(format_markdown(rows))
        sys.stdout.flush()
    if args.memory_shape:
        mem = []
        for dtype in dtypes:
            for provider in ("fastloss", "torch"):
                mem.append({"shape": args.memory_shape, "dtype": dtype, "provider": provider,
                            "peak_bytes": peak_memory(args.memory_shape, dtype, provider, args.memory_threads)})
                print(f"  {args.memory_shape} {dtype} {provider}: {mem[-1]['peak_bytes'] / 2 ** 30:.2f} GiB",
                      flush=True)
        print(format_markdown(mem))
        for dtype in dtypes:
            by = {r["provider"]: r["peak_bytes"] for r in mem if r["dtype"] == dtype}
            print(f"{dtype}: fastloss uses {(by['torch'] - by['fastloss']) / 2 ** 30:.2f} GiB less")
    return 0


if __name__ == "__main__":
    sys.exit(main())
