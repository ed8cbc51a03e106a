"""Fused linear + cross-entropy (forward + gradients) vs torch 2.13's F.linear_cross_entropy.

    python benchmarks/linear_cross_entropy.py                       # both cases, 1 and 2 threads
    python benchmarks/linear_cross_entropy.py --cases 4096,1024,32000 --threads 2 --repeat 3
    python benchmarks/linear_cross_entropy.py --cases 2048,512,16000 --curve 256,512,1024,2048
    python benchmarks/linear_cross_entropy.py --json out.json

Each measurement is one call in a fresh subprocess (time, and peak extra memory from
VmHWM); repeats are interleaved across providers.  See fastloss/_bench_linear.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastloss import _bench_linear as bl  # noqa: E402


def _case(text):
    parts = [int(v) for v in text.split(",")]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"a case is N,H,V (positive ints), got {text!r}")
    return tuple(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", type=_case, default=list(bl.CASES), help="N,H,V ... (float32)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs per provider (default: 3 for small cases, 1 above 2e12 flops)")
    ap.add_argument("--providers", nargs="+", default=list(bl.PROVIDERS), choices=bl.PROVIDERS)
    ap.add_argument("--chunk", type=int, default=None, help="fastloss chunk_size (default: its rule)")
    ap.add_argument("--curve", type=str, default=None,
                    help="comma-separated chunk sizes: print fastloss's time/memory curve for each case instead")
    ap.add_argument("--json", dest="json_path", default=None)
    a = ap.parse_args(argv)

    env = bl.environment()
    print("# " + json.dumps(env), flush=True)
    log = (lambda s: print("# " + s, flush=True))
    out = {"environment": env, "records": [], "curves": []}
    for (N, H, V) in a.cases:
        for th in a.threads:
            if a.curve:
                chunks = [int(c) for c in a.curve.split(",")] + [None]
                curve = bl.chunk_curve(N, H, V, th, chunks, repeats=a.repeat or 1, log=log)
                out["curves"].append({"N": N, "H": H, "V": V, "threads": th, "curve": curve})
                print(bl.chunk_markdown(N, H, V, th, curve), flush=True)
                print(flush=True)
                continue
            rep = a.repeat or bl.default_repeats(N, H, V)
            out["records"] += bl.run_case(N, H, V, th, rep, a.providers, a.chunk, log=log)
    if out["records"]:
        rows = bl.summarize(out["records"])
        out["summary"] = rows
        env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        print(bl.markdown(rows, env))
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
