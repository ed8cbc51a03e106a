"""Regression losses under pytest-benchmark: one group per loss/size/dtype/mode holding
fastloss (per thread count and ISA), the NumPy reference and PyTorch (if installed).

The cases, the callables and the bytes counted for GB/s all come from
``fastloss.bench``, like ``python -m fastloss bench``; see benchmarks/conftest.py for
the options.  Not collected by ``pytest tests``.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

from fastloss import _core, bench

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _setting(config, name):
    value = config.getoption(f"--fastloss-{name}")
    return value if value is not None else os.environ.get(f"FASTLOSS_BENCH_{name.upper()}") or None


def _split(text):
    return [v.strip() for v in text.split(",") if v.strip()]


def bench_cases(config):
    """The fastloss cases selected by the options (``fastloss.bench.cases``)."""
    sizes = _setting(config, "sizes")
    threads = _setting(config, "threads")
    isa = _setting(config, "isa")
    losses = _setting(config, "losses")
    try:
        sizes = tuple(bench.parse_size(v) for v in _split(sizes)) if sizes else bench.PYTEST_SIZES
        threads = tuple(int(v) for v in _split(threads)) if threads else bench.DEFAULT_THREADS
    except ValueError as exc:
        raise pytest.UsageError(f"fastloss benchmarks: {exc}") from None
    if isa is None:
        isas = None
    elif isa.lower() == "all":
        isas = bench.isa_order()
    elif isa.lower() in bench.isa_order():
        isas = [isa.lower()]
    else:
        raise pytest.UsageError(f"fastloss benchmarks: ISA {isa!r} is not supported here "
                                f"(supported: {', '.join(bench.isa_order())}, all)")
    try:
        return bench.cases(_split(losses) if losses else None, sizes, threads, isas=isas)
    except ValueError as exc:
        raise pytest.UsageError(f"fastloss benchmarks: {exc}") from None


def _entries(config):
    """(provider, case) in run order; NumPy once per group (it is single-threaded)."""
    out, seen = [], set()
    for case in bench_cases(config):
        out.append(("fastloss", case))
        if case.group not in seen:
            seen.add(case.group)
            out.append(("numpy", case))
        if HAVE_TORCH and (case.group, case.threads) not in seen:
            seen.add((case.group, case.threads))
            out.append(("torch", case))
    return out


def _entry_id(entry):
    provider, c = entry
    who = {"fastloss": f"fastloss-{c.isa}-{c.threads}t", "numpy": "numpy", "torch": f"torch-{c.threads}t"}
    return f"{c.loss}-{bench.format_size(c.n)}-{c.dtype}-{c.mode}-{who[provider]}"


def pytest_generate_tests(metafunc):
    if "entry" in metafunc.fixturenames:
        entries = _entries(metafunc.config)
        metafunc.parametrize("entry", entries, ids=[_entry_id(e) for e in entries])


@pytest.fixture(scope="session")
def inputs():
    """input/target per (loss generator, size, dtype); only the latest pair is kept."""
    cache = {}

    def get(case):
        key = (bench.REGISTRY[case.loss].make_inputs, case.n, case.dtype)
        if key not in cache:
            cache.clear()
            cache[key] = bench.make_inputs(case.loss, case.n, case.dtype)
        return cache[key]
    yield get
    cache.clear()


@pytest.fixture(scope="session")
def read_bandwidth(request):
    """GB/s of fastloss._core.read_sum_f32 on 1 GiB, per thread count, measured once."""
    if request.config.getoption("benchmark_disable") or request.config.getoption("benchmark_skip"):
        return {}
    threads = sorted({c.threads for c in bench_cases(request.config)})
    samples = bench.measure_read_bandwidth(threads)
    return {th: bench.READ_BW_BYTES / sorted(s)[len(s) // 2] / 1e9 for th, s in samples.items()}


@pytest.fixture
def restore_state():
    isa = _core.get_isa()
    torch_threads = None
    if HAVE_TORCH:
        import torch
        torch_threads = torch.get_num_threads()
    yield
    _core.set_isa(isa)
    if torch_threads is not None:
        import torch
        torch.set_num_threads(torch_threads)


def test_regression(benchmark, entry, inputs, read_bandwidth, restore_state):
    provider, case = entry
    x, t = inputs(case)
    if provider == "fastloss":
        bench.fastloss_setup(case)()
        fn = bench.fastloss_fn(case, x, t)
    elif provider == "numpy":
        fn = bench.numpy_fn(case, x, t)
    else:
        bench.torch_setup(case.threads)()
        fn = bench.torch_fn(case, x, t)
    fn()  # warm-up, untimed
    benchmark.group = f"{case.loss} n={bench.format_size(case.n)} {case.dtype} {case.mode}"
    benchmark.extra_info.update({
        "provider": provider, "loss": case.loss, "n": case.n, "dtype": case.dtype, "mode": case.mode,
        "threads": 1 if provider == "numpy" else case.threads,
        "isa": case.isa if provider == "fastloss" else None,
        "bytes": case.nbytes(),
    })
    benchmark(fn)
    if benchmark.stats is not None:  # None under --benchmark-disable
        gbps = case.nbytes() / benchmark.stats.stats.median / 1e9
        bw = read_bandwidth.get(benchmark.extra_info["threads"])
        benchmark.extra_info["gbps"] = round(gbps, 3)
        if bw:
            benchmark.extra_info["pct_read_bw"] = round(100.0 * gbps / bw, 1)
            benchmark.extra_info["read_bw_gbps"] = round(bw, 3)
