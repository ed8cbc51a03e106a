"""Throughput of ``python -m fastloss eval`` against the in-memory cross-entropy kernel.

Writes a float32 logits ``.npy`` of ``size_gb`` (default 32768 x 32000, 4.2 GB) and its targets
in ``directory`` (deleted afterwards), warms the page cache with one untimed pass, then times
interleaved:

* ``eval`` in process (:func:`fastloss._eval.evaluate`, the function the CLI calls) with each
  reader (``mmap`` windows with MAP_POPULATE, ``read`` = readinto double buffers) and with the
  helper thread's prefetch on and off;
* the one-shot :func:`fastloss.cross_entropy` on an array already in memory (``mem_gb`` of the
  same rows: the kernel's throughput does not depend on the row count at this size, and a
  second full copy would not fit beside the page cache on small machines);

and once the CLI itself (a subprocess, import time included).  Reports medians in GB/s
(logits + targets bytes over seconds) and the ratio eval / in-memory (target >= 0.70).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np


def _write(path_x, path_t, rows, V, seed=0):
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal((256, V), dtype=np.float32) * 2).astype(np.float32)
    x = np.lib.format.open_memmap(path_x, mode="w+", dtype=np.float32, shape=(rows, V))
    for r0 in range(0, rows, 256):
        r1 = min(r0 + 256, rows)
        x[r0:r1] = block[:r1 - r0]
    x.flush()
    del x
    t = rng.integers(0, V, size=rows)
    t[::17] = -100
    np.save(path_t, t)
    return block, t


def run(size_gb: float = 4.0, V: int = 32000, mem_gb: float = 1.0, repeats: int = 3, directory: str = "/tmp",
        num_threads=None, chunk_rows=None, cli: bool = True, keep: bool = False, out=sys.stdout) -> dict:
    import fastloss
    from fastloss import _eval

    rows = max(1, int(size_gb * 1e9) // (4 * V))
    px = os.path.join(directory, f"fastloss_bench_eval_{os.getpid()}_x.npy")
    pt = os.path.join(directory, f"fastloss_bench_eval_{os.getpid()}_t.npy")
    try:
        t0 = time.perf_counter()
        block, t = _write(px, pt, rows, V)
        write_s = time.perf_counter() - t0
        nbytes = rows * (4 * V + 8)
        mem_rows = max(1, min(rows, int(mem_gb * 1e9) // (4 * V)))
        xm = np.empty((mem_rows, V), np.float32)
        for r0 in range(0, mem_rows, 256):
            xm[r0:r0 + 256] = block[:min(256, mem_rows - r0)]
        tm = t[:mem_rows].copy()
        mem_bytes = mem_rows * (4 * V + 8)
        kw = dict(chunk_rows=chunk_rows, num_threads=num_threads)
        _eval.evaluate("cross_entropy", px, pt, **kw)                    # warm the page cache (and threads)
        variants = {"eval mmap+prefetch": dict(reader="mmap", prefetch=True),
                    "eval mmap, no prefetch": dict(reader="mmap", prefetch=False),
                    "eval read+prefetch": dict(reader="read", prefetch=True),
                    "eval mmap+prefetch topk=None": dict(reader="mmap", prefetch=True, topk=None)}
        times = {k: [] for k in variants}
        times["in-memory cross_entropy"] = []
        one_shot = None
        for _ in range(repeats):
            for name, v in variants.items():
                s = time.perf_counter()
                acc, _ = _eval.evaluate("cross_entropy", px, pt, **kw, **v)
                times[name].append(time.perf_counter() - s)
            s = time.perf_counter()
            one_shot = fastloss.cross_entropy(xm, tm, num_threads=num_threads)
            times["in-memory cross_entropy"].append(time.perf_counter() - s)
        gbs = {k: (mem_bytes if k.startswith("in-memory") else nbytes) / statistics.median(v) / 1e9
               for k, v in times.items()}
        base = gbs["in-memory cross_entropy"]
        report = {"rows": rows, "V": V, "file_gb": rows * 4 * V / 1e9, "in_memory_rows": mem_rows,
                  "write_seconds": write_s, "gb_per_s": gbs, "ratio": {k: g / base for k, g in gbs.items()},
                  "loadavg": os.getloadavg(), "threads": num_threads or fastloss.get_num_threads(),
                  "isa": fastloss._core.get_isa(), "check": float(acc.result()), "one_shot_rows": float(one_shot)}
        if cli:
            s = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "fastloss", "eval", "--loss", "cross_entropy", "--input", px,
                                "--target", pt, "--json", "--no-progress"], capture_output=True, text=True)
            wall = time.perf_counter() - s
            if r.returncode == 0:
                inner = json.loads(r.stdout)
                report["cli"] = {"wall_seconds": wall, "wall_gb_per_s": nbytes / wall / 1e9,
                                 "streaming_gb_per_s": inner["gb_per_s"], "ratio_wall": nbytes / wall / 1e9 / base,
                                 "ratio_streaming": inner["gb_per_s"] / base}
            else:
                report["cli"] = {"error": r.stderr.strip()}
    finally:
        if not keep:
            for p in (px, pt):
                try:
                    os.remove(p)
                except OSError:
                    pass
    _print(report, out)
    return report


def _print(rep: dict, out):
    print(f"eval throughput: {rep['rows']} x {rep['V']} float32 logits ({rep['file_gb']:.2f} GB file, page cache "
          f"warm), threads {rep['threads']}, ISA {rep['isa']}, load average "
          f"{', '.join(f'{v:.2f}' for v in rep['loadavg'])}", file=out)
    for k, g in rep["gb_per_s"].items():
        print(f"  {k:<28} {g:7.2f} GB/s   ratio vs in-memory {rep['ratio'][k]:.2f}", file=out)
    if "cli" in rep:
        c = rep["cli"]
        if "error" in c:
            print(f"  CLI: error: {c['error']}", file=out)
        else:
            print(f"  CLI (subprocess)             {c['streaming_gb_per_s']:7.2f} GB/s streaming (ratio "
                  f"{c['ratio_streaming']:.2f}); {c['wall_gb_per_s']:.2f} GB/s wall incl. start-up (ratio "
                  f"{c['ratio_wall']:.2f})", file=out)
