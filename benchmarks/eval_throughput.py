"""Benchmark: ``python -m fastloss eval`` over a ~4 GB .npy of logits vs the in-memory kernel.

    python benchmarks/eval_throughput.py [--size-gb 4] [--vocab 32000] [--mem-gb 1] [--repeats 3]
                                         [--dir /tmp] [--threads N] [--chunk-rows N] [--no-cli] [--json]

Check the free space of --dir first (``df -h /tmp``): the file is written there and deleted
afterwards.  See fastloss/_bench_eval.py for what is timed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys

from fastloss import _bench_eval


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=4.0)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--mem-gb", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default="/tmp")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--chunk-rows", type=int, default=None)
    p.add_argument("--no-cli", action="store_true")
    p.add_argument("--json", action="store_true", help="also print the report as JSON")
    a = p.parse_args(argv)
    free = shutil.disk_usage(a.dir).free / 1e9
    if free < a.size_gb * 1.2 + 1:
        print(f"not enough free space in {a.dir}: {free:.1f} GB for a {a.size_gb} GB file", file=sys.stderr)
        return 2
    rep = _bench_eval.run(a.size_gb, a.vocab, a.mem_gb, a.repeats, a.dir, a.threads, a.chunk_rows, not a.no_cli)
    if a.json:
        print(json.dumps(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
