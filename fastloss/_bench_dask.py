"""Overhead of ``fastloss.dask`` versus the in-process call (the implementation of
``benchmarks/dask_overhead.py``).

For each size n (float32 elements, default 1e8 and 1e9) it times, interleaved round by round
(medians; this machine is shared and noisy):

* ``inprocess``: ``fastloss.mse_loss(x, t)`` on NumPy arrays already in memory (default
  threads).  Above ``--inprocess-max`` elements (default 2e8: the arrays take 8 bytes per
  element and the machine is shared) it is the time at ``--inprocess-max`` scaled by
  n / inprocess-max (the kernel is memory-bound and linear in n), marked "(scaled)".
* per scheduler (``cluster``: a ``distributed.LocalCluster`` of 2 worker processes x 1
  thread on loopback; ``threads``: the local threaded scheduler), four graphs over the same
  chunks whose data is GENERATED INSIDE THE TASKS (a cached random tile copied into each
  block, deterministic per block; nothing is ever gathered to the client):
    - ``generate``: generate both blocks and return one element per block (the cost of the
      data and of the scheduler alone);
    - ``numpy_sum``: generate and ``np.sum`` both blocks (a reading pass with NumPy);
    - ``dask_mse``: the plain Dask expression ``((P - T) ** 2).mean()``;
    - ``fastloss``: ``fastloss.dask.mse_loss(P, T)``.

Reported: medians, ``fastloss / inprocess`` (the whole overhead, data generation included),
and ``fastloss - generate`` (the loss's own share in the graph) next to ``inprocess``.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time

import numpy as np

import fastloss

_TILE = (1 << 20) + 7          # odd length: consecutive blocks do not repeat each other


@functools.lru_cache(maxsize=4)
def _tile(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(_TILE, dtype=np.float32)


def generate_block(block_index, size: int, seed: int) -> np.ndarray:
    """Deterministic float32 data of one block: the seed's random tile, rotated by the block
    index, repeated to `size` elements (memory speed, so the loss's share stays visible)."""
    b = int(np.asarray(block_index).ravel()[0])
    tile = np.roll(_tile(seed), -((b * 7919) % _TILE))
    return np.resize(tile, size)


def _dask_data(n: int, chunk: int, seed: int):
    import dask.array as da
    sizes = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    index = da.arange(len(sizes), chunks=1)
    return da.map_blocks(lambda i, block_info=None: generate_block(i, block_info[None]["chunk-shape"][0], seed),
                         index, chunks=(tuple(sizes),), dtype=np.float32, meta=np.empty(0, np.float32))


def _touch(p, t):
    return np.array([np.float64(p[0]) + np.float64(t[0])])


def graphs(n: int, chunk: int) -> dict:
    import dask.array as da
    import fastloss.dask as fd
    P, T = _dask_data(n, chunk, 1), _dask_data(n, chunk, 2)
    return {
        "generate": da.map_blocks(_touch, P, T, chunks=((1,) * P.numblocks[0],), dtype=np.float64).sum(),
        "numpy_sum": P.sum(dtype=np.float32) + T.sum(dtype=np.float32),
        "dask_mse": ((P - T) ** 2).mean(),
        "fastloss": fd.mse_loss(P, T),
    }


def _time(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def run(sizes, chunk: int, rounds: int, schedulers, inprocess_max: int, log=print) -> dict:
    import dask
    report = {"env": environment(), "chunk": chunk, "rounds": rounds, "results": []}
    client = cluster = None
    if "cluster" in schedulers:
        import distributed
        cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                                           dashboard_address=None, silence_logs=50)
        client = distributed.Client(cluster, set_as_default=False)
    runners = {}
    if client is not None:
        runners["cluster"] = lambda g: client.compute(g, sync=True)
    if "threads" in schedulers:
        runners["threads"] = lambda g: g.compute(scheduler="threads")
    try:
        m = min(max(sizes), inprocess_max)
        x = np.concatenate([generate_block(i, min(chunk, m - i * chunk), 1) for i in range(math.ceil(m / chunk))])
        t = np.concatenate([generate_block(i, min(chunk, m - i * chunk), 2) for i in range(math.ceil(m / chunk))])
        for n in sizes:
            g = graphs(n, chunk)
            samples: dict = {}
            values: dict = {}
            nin = min(n, m)
            xin, tin = x[:nin], t[:nin]
            fastloss.mse_loss(xin, tin)                         # warm-up
            for name, run_ in runners.items():                  # warm-up: worker imports, tiles
                run_(graphs(min(n, 4 * chunk), chunk)["fastloss"])
            for r in range(rounds):
                dt, v = _time(lambda: fastloss.mse_loss(xin, tin))
                samples.setdefault("inprocess", []).append(dt * n / nin)
                values["inprocess"] = v
                for sname, run_ in runners.items():
                    for gname, graph in g.items():
                        dt, v = _time(lambda: run_(graph))
                        samples.setdefault(f"{sname}/{gname}", []).append(dt)
                        values[f"{sname}/{gname}"] = v
                log(f"  n={n:.0e} round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.3f}s"
                                                                     for k, v in samples.items()))
            med = {k: float(np.median(v)) for k, v in samples.items()}
            entry = {"n": n, "inprocess_scaled": n > nin, "medians_s": med, "ratios": {}, "loss_share_s": {},
                     "values": {k: float(v) for k, v in values.items()}}
            for sname in runners:
                f = med[f"{sname}/fastloss"]
                entry["ratios"][f"{sname}/fastloss / inprocess"] = f / med["inprocess"]
                entry["ratios"][f"{sname}/dask_mse / {sname}/fastloss"] = med[f"{sname}/dask_mse"] / f
                entry["loss_share_s"][f"{sname}/fastloss - generate"] = f - med[f"{sname}/generate"]
                entry["loss_share_s"][f"{sname}/dask_mse - generate"] = med[f"{sname}/dask_mse"] - \
                    med[f"{sname}/generate"]
                entry["loss_share_s"][f"{sname}/numpy_sum - generate"] = med[f"{sname}/numpy_sum"] - \
                    med[f"{sname}/generate"]
            report["results"].append(entry)
    finally:
        if client is not None:
            client.close()
            cluster.close()
    report["env"]["loadavg_after"] = os.getloadavg()
    return report


def environment() -> dict:
    import dask
    try:
        import distributed
        dist = distributed.__version__
    except ImportError:
        dist = None
    cfg = fastloss.config()
    return {"fastloss": cfg["fastloss"], "numpy": cfg["numpy"], "dask": dask.__version__, "distributed": dist,
            "python": platform.python_version(), "cores": os.cpu_count(), "isa": cfg["isa_selected"],
            "default_threads": cfg["default_threads"], "loadavg_before": os.getloadavg()}


def format_report(report: dict) -> str:
    env = report["env"]
    lines = [f"fastloss {env['fastloss']}, numpy {env['numpy']}, dask {env['dask']}, distributed "
             f"{env['distributed']}, python {env['python']}, {env['cores']} cores, ISA {env['isa']}, "
             f"in-process threads {env['default_threads']}",
             f"load average before {tuple(round(v, 2) for v in env['loadavg_before'])}, after "
             f"{tuple(round(v, 2) for v in env['loadavg_after'])}; chunk {report['chunk']:.3g} elements "
             f"(float32), {report['rounds']} rounds, medians",
             "cluster = LocalCluster(2 processes x 1 thread, loopback); threads = local threaded scheduler"]
    for e in report["results"]:
        lines.append("")
        scaled = " (scaled from a smaller in-process run)" if e["inprocess_scaled"] else ""
        lines.append(f"mse_loss, n = {e['n']:.0e} float32 (input + target {8 * e['n'] / 1e9:.1f} GB)")
        for k, v in e["medians_s"].items():
            lines.append(f"  {k:<22} {v:8.3f} s{scaled if k == 'inprocess' else ''}")
        for k, v in e["ratios"].items():
            lines.append(f"  {k:<40} {v:6.2f}x")
        for k, v in e["loss_share_s"].items():
            lines.append(f"  {k:<40} {v:7.3f} s   (in-process: {e['medians_s']['inprocess']:.3f} s)")
        vals = e["values"]
        ref = vals["inprocess"]
        diffs = {k: abs(v - ref) / abs(ref) for k, v in vals.items() if k.endswith("fastloss")}
        if not e["inprocess_scaled"]:
            lines.append("  relative difference to the in-process loss: " +
                         ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fastloss.dask overhead versus the in-process call (mse_loss, float32)")
    ap.add_argument("--sizes", default="1e8,1e9", help="comma-separated element counts (default 1e8,1e9)")
    ap.add_argument("--chunk", type=float, default=2.5e7, help="elements per block (default 2.5e7 = 100 MB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--schedulers", default="cluster,threads")
    ap.add_argument("--inprocess-max", type=float, default=2e8,
                    help="largest in-process size actually allocated (8 bytes per element); above: scaled")
    ap.add_argument("--json", help="also write the report to this file")
    args = ap.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    schedulers = [s.strip() for s in args.schedulers.split(",")]
    unknown = set(schedulers) - {"cluster", "threads"}
    if unknown:
        ap.error(f"unknown scheduler(s) {sorted(unknown)}: use cluster, threads")
    report = run(sizes, int(args.chunk), args.rounds, schedulers, int(args.inprocess_max),
                 log=lambda s: print(s, file=sys.stderr))
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
