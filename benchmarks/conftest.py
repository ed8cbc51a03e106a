"""pytest-benchmark suite of fastloss: the cases of ``fastloss.bench.cases`` (the same
source as ``python -m fastloss bench``), with the NumPy reference and PyTorch (when
installed) in the same group, so pytest-benchmark's table compares them.

    pytest benchmarks/ --benchmark-only                        # sizes 1e6, 1e7; CE 1x262144, 64x32000
    pytest benchmarks/ --benchmark-only --fastloss-sizes 1e6,1e7,1e8
    FASTLOSS_BENCH_SIZES=1e8 pytest benchmarks/ --benchmark-only
    pytest benchmarks/test_bench_cross_entropy.py --benchmark-only --fastloss-shapes 8192x32000
    pytest benchmarks/ --benchmark-disable                     # smoke test: each call once

Each test module holds one family (``FAMILY``): test_bench_regression.py the regression
losses, test_bench_cross_entropy.py cross-entropy (forward, and with-grad into a new
array, a preallocated ``grad_out`` and in place), test_bench_elementwise.py and
test_bench_rows.py the other losses (issue 6; inputs and competitors in
``fastloss._bench_field``).

Options (each also an environment variable): ``--fastloss-sizes`` /
FASTLOSS_BENCH_SIZES (regression), ``--fastloss-shapes`` / FASTLOSS_BENCH_SHAPES
(cross-entropy ROWSxCLASSES), ``--fastloss-dtypes`` / FASTLOSS_BENCH_DTYPES
(both families), ``--fastloss-modes`` / FASTLOSS_BENCH_MODES, ``--fastloss-threads`` /
FASTLOSS_BENCH_THREADS (default 1,2), ``--fastloss-isa`` / FASTLOSS_BENCH_ISA (an ISA
name or ``all``; default: the one selected at import), ``--fastloss-losses`` /
FASTLOSS_BENCH_LOSSES (names or families).  Cross-entropy defaults:
``fastloss.bench.CE_PRESETS["pytest"]``; NumPy is timed where ``fastloss.bench.numpy_timed``
says so (NumPy's float16 is too slow above 32768x1024).

Unless given on the command line, ``--benchmark-max-time`` is 0.25 s and
``--benchmark-min-rounds`` follows ``fastloss.bench.policy_for`` (7 at 1e6, 5 at 1e7,
3 at 1e8), which keeps the default run under a minute or so.  Each benchmark makes one
untimed warm-up call first.  The in-place cross-entropy case runs under
``benchmark.pedantic`` with an untimed setup that refreshes its copy of the logits.
``extra_info`` carries the case (provider, loss, n, shape, dtype, mode, threads, ISA), the
bytes moved, GB/s and its percentage of the read bandwidth measured once per session, and
the peak extra memory of one untimed call (torch, for inputs under 32 MiB: from one helper
process for the whole session, ``fastloss.bench.TorchMemoryHelper``).

Compare two runs with pytest-benchmark itself::

    pytest benchmarks/ --benchmark-only --benchmark-save=before      # .benchmarks/<machine>/0001_before.json
    ... change something, rebuild ...
    pytest benchmarks/ --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:10%
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import time

import pytest

MAX_TIME = 0.25  # seconds per benchmark, unless --benchmark-max-time is given
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def pytest_addoption(parser):
    group = parser.getgroup("fastloss", "fastloss benchmark cases")
    group.addoption("--fastloss-sizes", default=None, metavar="LIST",
                    help="regression element counts, e.g. 1e6,1e7,1e8 (env FASTLOSS_BENCH_SIZES; default 1e6,1e7)")
    group.addoption("--fastloss-shapes", default=None, metavar="LIST",
                    help="cross-entropy shapes ROWSxCLASSES, e.g. 8192x32000 (env FASTLOSS_BENCH_SHAPES; "
                         "default 1x262144,64x32000)")
    group.addoption("--fastloss-dtypes", default=None, metavar="LIST",
                    help="dtypes of both families (env FASTLOSS_BENCH_DTYPES; default: float32 for the regression "
                         "losses, float32,float16 for cross-entropy)")
    group.addoption("--fastloss-modes", default=None, metavar="LIST",
                    help="modes: forward, with_grad, with_grad_out, with_grad_inplace (env FASTLOSS_BENCH_MODES; "
                         "default: all of each family)")
    group.addoption("--fastloss-threads", default=None, metavar="LIST",
                    help="thread counts (env FASTLOSS_BENCH_THREADS; default 1,2)")
    group.addoption("--fastloss-isa", default=None, metavar="NAME",
                    help="ISA of the fastloss cases, or 'all' (env FASTLOSS_BENCH_ISA; default: selected)")
    group.addoption("--fastloss-losses", default=None, metavar="LIST",
                    help="losses or families to time (env FASTLOSS_BENCH_LOSSES; default: all)")


def _given_on_command_line(config, flag):
    args = list(config.invocation_params.args) + shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
    args += list(config.getini("addopts"))
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _setting(config, name):
    value = config.getoption(f"--fastloss-{name}")
    return value if value is not None else os.environ.get(f"FASTLOSS_BENCH_{name.upper()}") or None


def _split(text):
    return [v.strip() for v in text.split(",") if v.strip()]


def _threads(config):
    from fastloss import bench
    text = _setting(config, "threads")
    try:
        return tuple(int(v) for v in _split(text)) if text else bench.DEFAULT_THREADS
    except ValueError as exc:
        raise pytest.UsageError(f"fastloss benchmarks: {exc}") from None


def bench_cases(config, family):
    """The fastloss cases of `family` selected by the options (``fastloss.bench.cases``)."""
    from fastloss import bench

    sizes, shapes = _setting(config, "sizes"), _setting(config, "shapes")
    dtypes, modes = _setting(config, "dtypes"), _setting(config, "modes")
    isa, losses = _setting(config, "isa"), _setting(config, "losses")
    try:
        sizes_given = bool(sizes)
        sizes = tuple(bench.parse_size(v) for v in _split(sizes)) if sizes else bench.PYTEST_SIZES
        shapes = tuple(bench.parse_shape(v) for v in _split(shapes)) if shapes else None
        dtypes = tuple(_split(dtypes)) if dtypes else None
        modes = tuple(bench.normalize_mode(m) for m in _split(modes)) if modes else None
        names = bench.resolve_losses(_split(losses)) if losses else bench.known_losses()
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
    names = [n for n in names if bench.BENCH_LOSSES[n].family == family]
    if not names:
        return []
    try:
        return bench.cases(names, sizes, _threads(config), modes, isas=isas, shapes=shapes, dtypes=dtypes,
                           preset="pytest", sizes_given=sizes_given)
    except ValueError as exc:
        if modes and str(exc).startswith("no cases"):  # e.g. with_grad_out only: no regression case
            return []
        raise pytest.UsageError(f"fastloss benchmarks: {exc}") from None


def bench_entries(config, family):
    """(provider, case) in run order; NumPy once per group (it is single-threaded) where
    ``fastloss.bench.numpy_timed`` allows, torch once per group and thread count."""
    from fastloss import bench

    numpy_max = bench.CE_PRESETS["pytest"].numpy_max
    out, seen = [], set()
    for case in bench_cases(config, family):
        out.append(("fastloss", case))
        if case.group not in seen:
            seen.add(case.group)
            if bench.numpy_timed(case, numpy_max):
                out.append(("numpy", case))
        if HAVE_TORCH and (case.group, case.threads) not in seen:
            seen.add((case.group, case.threads))
            out.append(("torch", case))
    return out


def _entry_id(entry):
    provider, c = entry
    who = {"fastloss": f"fastloss-{c.isa}-{c.threads}t", "numpy": "numpy", "torch": f"torch-{c.threads}t"}
    mode = c.mode if provider == "fastloss" else c.group_mode
    return f"{c.loss}-{c.size_label}-{c.dtype}-{mode}-{who[provider]}"


def pytest_generate_tests(metafunc):
    if "entry" in metafunc.fixturenames:
        family = getattr(metafunc.module, "FAMILY", "regression")
        entries = bench_entries(metafunc.config, family)
        metafunc.parametrize("entry", entries, ids=[_entry_id(e) for e in entries])


def pytest_collection_modifyitems(config, items):
    """Our defaults for max_time / min_rounds, unless the user chose them."""
    from fastloss import bench

    set_time = not _given_on_command_line(config, "--benchmark-max-time")
    set_rounds = not _given_on_command_line(config, "--benchmark-min-rounds")
    for item in items:
        entry = getattr(item, "callspec", None) and item.callspec.params.get("entry")
        if not isinstance(entry, tuple):  # None, or NOTSET: a family with no case selected (skipped)
            continue
        kwargs = {}
        if set_time:
            kwargs["max_time"] = MAX_TIME
        if set_rounds:
            kwargs["min_rounds"] = bench.policy_for(entry[1].n, entry[1].dtype).min_calls
        if kwargs:
            item.add_marker(pytest.mark.benchmark(**kwargs))


def _benchmarks_off(config):
    return bool(config.getoption("benchmark_disable") or config.getoption("benchmark_skip"))


@pytest.fixture(scope="session")
def inputs():
    """input/target of the latest (generator, shape, dtype): ``fastloss.bench.InputCache``."""
    from fastloss import bench

    cache = bench.InputCache()
    yield cache.get
    cache.clear()


@pytest.fixture(scope="session")
def read_bandwidth(request):
    """GB/s of fastloss._core.read_sum_f32 on 1 GiB, per thread count, measured once."""
    from fastloss import bench

    if _benchmarks_off(request.config):
        return {}
    samples = bench.measure_read_bandwidth(sorted(set(_threads(request.config))))
    return {th: bench.READ_BW_BYTES / sorted(s)[len(s) // 2] / 1e9 for th, s in samples.items()}


@pytest.fixture(scope="session")
def torch_small_memory(request):
    """torch's peak extra memory (bytes) of a case whose input is under 32 MiB: measured for every
    such torch entry of the session at once, at the first request, by one helper process."""
    import numpy as np

    from fastloss import bench

    cache, done = {}, []

    def get(case):
        if not done:
            done.append(True)
            wanted = []
            for item in request.session.items:
                entry = getattr(item, "callspec", None) and item.callspec.params.get("entry")
                if isinstance(entry, tuple) and entry[0] == "torch":
                    c = entry[1]
                    if c.n * np.dtype(c.dtype).itemsize < bench.RSS_IN_PROCESS_MIN_BYTES:
                        wanted.append(c)
            cache.update(bench.torch_memory_subprocess(wanted))
        return cache.get(bench.torch_memory_key(case))
    return get


@pytest.fixture
def restore_state():
    from fastloss import _core

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


@pytest.fixture
def run_entry(benchmark, inputs, read_bandwidth, restore_state, torch_small_memory, request):
    """Benchmark one (provider, case) entry: the callables of ``fastloss.bench``, one untimed
    warm-up call, then pytest-benchmark (``pedantic`` with the untimed ``prepare`` step for the
    in-place case)."""
    from fastloss import bench

    def run(entry):
        provider, case = entry
        x, t = inputs(case)
        scratch = bench.Scratch()  # out= / in-place buffer, freed with this test
        if provider == "fastloss":
            bench.fastloss_setup(case)()
            fn = bench.fastloss_fn(case, x, t, scratch)
        elif provider == "numpy":
            fn = bench.numpy_fn(case, x, t)
        else:
            bench.torch_setup(case.threads)()
            fn = bench.torch_fn(case, x, t)
        t0 = time.perf_counter()
        bench.call_once(fn)  # warm-up, untimed
        warm_s = time.perf_counter() - t0
        threads = 1 if provider == "numpy" else case.threads
        benchmark.group = f"{case.loss} {case.size_label} {case.dtype} {case.group_mode.replace('_', '-')}"
        benchmark.extra_info.update({
            "provider": provider, "loss": case.loss, "n": case.n, "dtype": case.dtype,
            "mode": case.mode if provider == "fastloss" else case.group_mode,
            "threads": threads, "isa": case.isa if provider == "fastloss" else None, "bytes": case.nbytes(),
        })
        if case.shape is not None:
            benchmark.extra_info["shape"] = list(case.shape)
        if not _benchmarks_off(request.config):
            if provider == "torch" and x.nbytes < bench.RSS_IN_PROCESS_MIN_BYTES:
                peak = torch_small_memory(case)
                method = "peak RSS growth, helper process"
            else:
                peak = bench.peak_extra_memory(fn, bench.MEMORY_METHODS[provider])
                method = "tracemalloc" if provider != "torch" else "peak RSS growth, in process"
            benchmark.extra_info.update({"peak_extra_bytes": peak, "memory_method": method})
        prepare = getattr(fn, "prepare", None)
        if prepare is None:
            benchmark(fn)
        else:
            # pedantic has no time budget: as many rounds as max_time allows (from the warm-up, which
            # includes the untimed copy), at least min_rounds
            config = request.config
            min_rounds = (config.getoption("benchmark_min_rounds")
                          if _given_on_command_line(config, "--benchmark-min-rounds")
                          else bench.policy_for(case.n, case.dtype).min_calls)
            max_time = (config.getoption("benchmark_max_time")
                        if _given_on_command_line(config, "--benchmark-max-time") else MAX_TIME)
            rounds = max(min_rounds, min(10_000, int(max_time / max(warm_s, 1e-6))))
            benchmark.pedantic(fn, setup=prepare, rounds=rounds, iterations=1)
        if benchmark.stats is not None:  # None under --benchmark-disable
            gbps = case.nbytes() / benchmark.stats.stats.median / 1e9
            bw = read_bandwidth.get(threads)
            benchmark.extra_info["gbps"] = round(gbps, 3)
            if bw:
                benchmark.extra_info["pct_read_bw"] = round(100.0 * gbps / bw, 1)
                benchmark.extra_info["read_bw_gbps"] = round(bw, 3)
    return run
