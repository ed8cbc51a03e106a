"""Benchmark of the fused linear + cross-entropy (forward + all gradients) against torch.

Providers (one call = loss and the gradients of input, linear_weight):

* ``fastloss``: ``fastloss.linear.linear_cross_entropy_with_grad`` (``num_threads=n``);
* ``torch``: ``torch.nn.functional.linear_cross_entropy`` (reference path: full logits) and
  ``loss.backward()``, ``torch.set_num_threads(n)``;
* ``torch_chunked``: the same with ``options=LinearCrossEntropyOptions()`` (torch 2.13's
  chunked path, its "auto" chunk size);
* ``fastloss_torch``: ``fastloss.torch.linear_cross_entropy`` and ``loss.backward()`` (our
  chunking and cross-entropy kernel, the GEMMs in torch's BLAS), ``torch.set_num_threads(n)``.

Every run happens in a FRESH subprocess (``python -m fastloss._bench_linear --worker ...``):
the inputs are allocated and touched, a tiny warm-up call loads lazy state (BLAS wrappers,
thread pools), then the process's peak RSS (``VmHWM``) is reset to its current RSS, the
timed call is made, and ``VmHWM`` is read: its excess over the RSS before the call is the
call's peak extra memory (the returned gradients included, for every provider).  Not
``ru_maxrss``, which a child inherits from its parent (see :func:`fastloss._peakmem.peak_probe`).  Repeats
are interleaved across providers (A B C A B C ...) so that load changes on a shared machine
hit every provider alike; medians and ratios are reported.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from fastloss._peakmem import peak_after, peak_probe

CASES = ((4096, 1024, 32000), (8192, 2048, 128256))
PROVIDERS = ("fastloss", "fastloss_torch", "torch", "torch_chunked")
GIB = 2.0 ** 30


def _inputs(N, H, V, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N, H), dtype=np.float32) * np.float32(0.5))
    W = rng.standard_normal((V, H), dtype=np.float32) * np.float32(1.0 / np.sqrt(H))
    t = rng.integers(0, V, N)
    return x, W, t


def _runner(provider, N, H, V, threads, chunk):
    """(warm-up callable, call) for one provider; inputs allocated here."""
    x, W, t = _inputs(N, H, V)
    if provider == "fastloss":
        from fastloss.linear import linear_cross_entropy_with_grad as f

        def call(x=x, W=W, t=t):
            return f(x, W, t, chunk_size=chunk, num_threads=threads)

        def warm():
            xs, Ws, ts = _inputs(8, 4, 16)
            f(xs, Ws, ts, chunk_size=4, num_threads=threads)
        return warm, call
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    opts = None
    if provider == "torch_chunked":
        opts = torch.nn.LinearCrossEntropyOptions() if chunk is None else \
            torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk, chunking_method=None)
    xt = torch.from_numpy(x).requires_grad_(True)
    Wt = torch.from_numpy(W).requires_grad_(True)
    tt = torch.from_numpy(t)

    if provider == "fastloss_torch":
        import fastloss.torch as flt

        def lce(xt, Wt, tt, options):
            return flt.linear_cross_entropy(xt, Wt, tt, chunk_size=chunk)
    else:
        lce = F.linear_cross_entropy

    def tcall(xt, Wt, tt, o):
        xt.grad = None
        Wt.grad = None
        loss = lce(xt, Wt, tt, options=o)
        loss.backward()
        return loss.item(), xt.grad, Wt.grad

    def warm():
        xs, Ws, ts = _inputs(8, 4, 16)
        o = None if opts is None else torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4, chunking_method=None)
        tcall(torch.from_numpy(xs).requires_grad_(True), torch.from_numpy(Ws).requires_grad_(True),
              torch.from_numpy(ts), o)
    return warm, (lambda: tcall(xt, Wt, tt, opts))


def worker(provider, N, H, V, threads, chunk) -> dict:
    """One measured call in this (fresh) process: seconds and peak extra bytes."""
    warm, call = _runner(provider, N, H, V, threads, chunk)
    warm()
    method, before = peak_probe()
    t0 = time.perf_counter()
    out = call()
    sec = time.perf_counter() - t0
    after = peak_after(method)
    loss = float(out[0])
    return {"provider": provider, "N": N, "H": H, "V": V, "threads": threads, "chunk": chunk, "seconds": sec,
            "peak_extra_bytes": max(0, after - before), "memory_method": method, "loss": loss}


def run_worker(provider, N, H, V, threads, chunk=None, timeout=3600) -> dict:
    cmd = [sys.executable, "-m", "fastloss._bench_linear", "--worker", provider, str(N), str(H), str(V),
           str(threads), "none" if chunk is None else str(chunk)]
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # this fastloss, in the child
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        return {"provider": provider, "N": N, "H": H, "V": V, "threads": threads, "chunk": chunk,
                "error": (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def mem_available() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def torch_plain_estimate(N, H, V) -> float:
    """Rough peak extra bytes of torch's reference path: logits, their gradient and softmax
    temporaries (~4 N x V float32) plus the gradients."""
    return 4.0 * N * V * 4 + (V * H + N * H) * 4


def default_repeats(N, H, V) -> int:
    """Runs per provider: 3 for cases under 2e12 flops (the three GEMMs, 6 N H V), 1 above."""
    return 3 if 6.0 * N * H * V < 2e12 else 1


def run_case(N, H, V, threads, repeats, providers=PROVIDERS, chunk=None, log=print, records=None) -> list:
    """Interleaved fresh-process runs; returns every record (also appended to `records` as
    they finish, if given: a caller interrupted by Ctrl-C keeps the runs that finished)."""
    avail = mem_available()
    todo = list(providers)
    if "torch" in todo and avail is not None and torch_plain_estimate(N, H, V) > 0.7 * avail:
        log(f"# torch reference path skipped for {(N, H, V)}: needs ~{torch_plain_estimate(N, H, V) / GIB:.1f} GiB, "
            f"{avail / GIB:.1f} GiB available")
        todo.remove("torch")
    out = []
    for r in range(repeats):
        for p in todo:
            rec = run_worker(p, N, H, V, threads, chunk if p.startswith("fastloss") else None)
            rec["repeat"] = r
            rec["load_average"] = [round(v, 2) for v in os.getloadavg()]
            out.append(rec)
            if records is not None:
                records.append(rec)
            log(json.dumps(rec))
    return out


#: The providers that the ratios of :func:`summarize` are taken against.
BASES = ("fastloss", "fastloss_torch")


def _ratio(num, den):
    return num / den if den else None


def summarize(records) -> list:
    """Median seconds, median peak extra memory, median 1-minute load average and median loss per
    (case, threads, provider), and the ratios time / base and memory / base against each
    fastloss provider (``ratios[base]``; ``time_ratio``, ``memory_ratio``: against ``fastloss``).
    A ratio is None when the base was not measured or its peak extra memory is 0."""
    groups: dict = {}
    for rec in records:
        if "error" in rec:
            continue
        groups.setdefault((rec["N"], rec["H"], rec["V"], rec["threads"], rec["provider"]), []).append(rec)
    rows = []
    for key, recs in sorted(groups.items(), key=lambda kv: (kv[0][:4], PROVIDERS.index(kv[0][4])
                                                             if kv[0][4] in PROVIDERS else len(PROVIDERS))):
        loads = [r["load_average"][0] for r in recs if r.get("load_average")]
        rows.append({"N": key[0], "H": key[1], "V": key[2], "threads": key[3], "provider": key[4],
                     "runs": len(recs), "seconds": statistics.median(r["seconds"] for r in recs),
                     "peak_extra_gib": statistics.median(r["peak_extra_bytes"] for r in recs) / GIB,
                     "load_average": statistics.median(loads) if loads else None,
                     "loss": statistics.median(r["loss"] for r in recs)})
    by = {(r["N"], r["H"], r["V"], r["threads"], r["provider"]): r for r in rows}
    for r in rows:
        r["ratios"] = {}
        for base in BASES:
            o = by.get((r["N"], r["H"], r["V"], r["threads"], base))
            r["ratios"][base] = {"time": _ratio(r["seconds"], o["seconds"]) if o else None,
                                 "memory": _ratio(r["peak_extra_gib"], o["peak_extra_gib"]) if o else None}
        r["time_ratio"] = r["ratios"]["fastloss"]["time"]          # provider / fastloss
        r["memory_ratio"] = r["ratios"]["fastloss"]["memory"]
    return rows


def _cell(v, fmt=".2f"):
    return "-" if v is None else format(v, fmt)


def markdown(rows, env=None) -> str:
    out = []
    if env:
        out.append("Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
        out.append("")
    out.append("| N | H | V | threads | provider | runs | median s | peak extra GiB | time / fastloss "
               "| memory / fastloss |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        out.append(f"| {r['N']} | {r['H']} | {r['V']} | {r['threads']} | {r['provider']} | {r['runs']} | "
                   f"{r['seconds']:.2f} | {r['peak_extra_gib']:.3f} | {_cell(r['time_ratio'])} | "
                   f"{_cell(r['memory_ratio'])} |")
    return "\n".join(out)


def chunk_curve(N, H, V, threads, chunks, repeats=1, log=print) -> list:
    """fastloss time and peak extra memory for several chunk sizes (fresh process each)."""
    rows = []
    for r in range(repeats):
        for c in chunks:
            rec = run_worker("fastloss", N, H, V, threads, c)
            rec["repeat"] = r
            log(json.dumps(rec))
            rows.append(rec)
    out = {}
    for rec in rows:
        if "error" not in rec:
            out.setdefault(rec["chunk"], []).append(rec)
    return [{"chunk": c, "seconds": statistics.median(x["seconds"] for x in v),
             "peak_extra_gib": statistics.median(x["peak_extra_bytes"] for x in v) / GIB}
            for c, v in sorted(out.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]


def chunk_markdown(N, H, V, threads, curve) -> str:
    out = [f"Chunk-size curve, fastloss, (N, H, V) = ({N}, {H}, {V}), float32, {threads} thread(s):", "",
           "| chunk_size | median s | peak extra GiB |", "|---|---|---|"]
    for r in curve:
        c = r["chunk"] if r["chunk"] is not None else "None (default)"
        out.append(f"| {c} | {r['seconds']:.2f} | {r['peak_extra_gib']:.3f} |")
    return "\n".join(out)


def environment() -> dict:
    import fastloss
    from fastloss import _core
    try:
        import torch
        tv = torch.__version__
    except Exception:
        tv = None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    from fastloss.linear import _blas
    _blas()                                   # loads SciPy's BLAS (used by fastloss.linear) if present
    try:
        from threadpoolctl import threadpool_info
        blas = ",".join(f"{i.get('internal_api')} {i.get('version')} ({os.path.basename(i.get('filepath', ''))})"
                        for i in threadpool_info()
                        if i.get("user_api") == "blas")
    except Exception:
        blas = "unknown (no threadpoolctl)"
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": _core.get_isa(), "numpy": np.__version__, "torch": tv,
            "blas": blas, "fastloss": getattr(fastloss, "__version__", "?"),
            "load_average": [round(v, 2) for v in os.getloadavg()]}


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        prov, N, H, V, th, ch = sys.argv[2:8]
        res = worker(prov, int(N), int(H), int(V), int(th), None if ch == "none" else int(ch))
        print(json.dumps(res))
    else:
        print("usage: python benchmarks/linear_cross_entropy.py --help", file=sys.stderr)
        sys.exit(2)
