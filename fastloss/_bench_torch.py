"""Benchmark of a PyTorch CPU training step: logits (a leaf that requires grad) -> cross-entropy ->
backward -> ``logits.grad = None``, with ``fastloss.torch.cross_entropy`` and with
``torch.nn.functional.cross_entropy`` at the same thread count.

* :func:`training_step_cases`: median step times of both providers, measured interleaved
  (fastloss, torch, fastloss, torch, ...) in one process so that both see the same machine
  load; the ratio torch / fastloss is the speed-up.
* :func:`peak_memory`: the extra peak resident memory of one step, measured in a fresh
  subprocess per (shape, dtype, provider): the peak RSS during the step (``VmHWM``, reset
  just before it) minus the RSS after allocating the logits and the target
  (:mod:`fastloss._peakmem`).
* :func:`format_markdown`: the rows as a Markdown table.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

__all__ = ["training_step_cases", "peak_memory", "format_markdown", "parse_shape"]

PROVIDERS = ("fastloss", "torch")


def parse_shape(text: str) -> tuple:
    """'8192x32000' -> (8192, 32000)."""
    return tuple(int(v) for v in text.lower().split("x"))


def _torch_dtype(name: str):
    import torch
    return {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[name]


def _make_inputs(shape, dtype_name: str, seed: int = 0):
    """Logits (a leaf requiring grad) filled row-block by row-block (no full-size temporary) and targets."""
    import torch
    g = torch.Generator().manual_seed(seed)
    N, V = shape
    logits = torch.empty((N, V), dtype=_torch_dtype(dtype_name))
    step = max(1, (1 << 22) // V)
    for i in range(0, N, step):
        logits[i:i + step] = torch.randn((min(step, N - i), V), generator=g) * 2
    target = torch.randint(0, V, (N,), generator=g)
    return logits.requires_grad_(), target


def _step_fn(provider: str, threads: int):
    import torch.nn.functional as F
    import fastloss.torch as flt
    if provider == "fastloss":
        def step(logits, target):
            flt.cross_entropy(logits, target, num_threads=threads).backward()
            logits.grad = None
    else:
        def step(logits, target):
            F.cross_entropy(logits, target).backward()
            logits.grad = None
    return step


def training_step_cases(shapes, dtypes, threads, repeats: int = 5) -> list[dict]:
    """Median time of one training step per provider for every (shape, dtype, threads).

    Returns dicts with shape, dtype, threads, fastloss_s, torch_s, speedup (torch / fastloss)
    and the 1-minute load average when the case finished."""
    import torch
    rows = []
    previous = torch.get_num_threads()
    try:
        for shape in shapes:
            shape = parse_shape(shape) if isinstance(shape, str) else tuple(shape)
            for dtype_name in dtypes:
                logits, target = _make_inputs(shape, dtype_name)
                for n in threads:
                    torch.set_num_threads(n)
                    steps = {p: _step_fn(p, n) for p in PROVIDERS}
                    times = {p: [] for p in PROVIDERS}
                    for p in PROVIDERS:            # warm-up
                        steps[p](logits, target)
                    for _ in range(repeats):
                        for p in PROVIDERS:
                            t0 = time.perf_counter()
                            steps[p](logits, target)
                            times[p].append(time.perf_counter() - t0)
                    med = {p: statistics.median(times[p]) for p in PROVIDERS}
                    rows.append({"shape": "x".join(map(str, shape)), "dtype": dtype_name, "threads": n,
                                 "fastloss_s": med["fastloss"], "torch_s": med["torch"],
                                 "speedup": med["torch"] / med["fastloss"], "repeats": repeats,
                                 "loadavg": os.getloadavg()[0]})
                del logits, target
    finally:
        torch.set_num_threads(previous)
    return rows


_MEMORY_SCRIPT = r"""
import json, sys
import torch
from fastloss._bench_torch import _make_inputs, _step_fn
from fastloss._peakmem import peak_after, peak_probe
shape, dtype_name, provider, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
step = _step_fn(provider, threads)
small, small_t = _make_inputs((4, 16), dtype_name)
step(small, small_t)                      # imports, lazy initialisation
logits, target = _make_inputs(tuple(shape), dtype_name)
method, before = peak_probe()
step(logits, target)
print(json.dumps({"before": before, "after": peak_after(method), "method": method}))
"""


def peak_memory(shape, dtype: str, provider: str, threads: int = 1) -> int:
    """Extra peak resident memory (bytes) of one training step, measured in a fresh subprocess:
    the peak RSS during the step minus the RSS after allocating the logits and the target
    (:func:`fastloss._peakmem.peak_probe`)."""
    shape = parse_shape(shape) if isinstance(shape, str) else tuple(shape)
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    arg = json.dumps([list(shape), dtype, provider, threads])
    r = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, arg], capture_output=True, text=True, check=True,
                       env=dict(os.environ))
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["after"] - out["before"]


def format_markdown(rows: list[dict]) -> str:
    """Speed rows (from training_step_cases) or memory rows (shape, dtype, provider, peak_bytes) as a table."""
    if not rows:
        return ""
    if "speedup" in rows[0]:
        lines = ["| shape | dtype | threads | fastloss.torch (ms) | F.cross_entropy (ms) | speed-up | load |",
                 "|---|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['threads']} | {r['fastloss_s'] * 1e3:.1f} | "
                         f"{r['torch_s'] * 1e3:.1f} | {r['speedup']:.2f}x | {r['loadavg']:.1f} |")
    else:
        lines = ["| shape | dtype | provider | extra peak RSS (GiB) |", "|---|---|---|---:|"]
        for r in rows:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['provider']} | {r['peak_bytes'] / 2 ** 30:.2f} |")
    return "\n".join(lines)
