"""pytest-benchmark suite of fastloss: the cases of ``fastloss.bench.cases`` (the same
source as ``python -m fastloss bench``), with the NumPy reference and PyTorch (when
installed) in the same group, so pytest-benchmark's table compares them.

    pytest benchmarks/ --benchmark-only                        # sizes 1e6, 1e7
    pytest benchmarks/ --benchmark-only --fastloss-sizes 1e6,1e7,1e8
    FASTLOSS_BENCH_SIZES=1e8 pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-disable                     # smoke test: each call once

Options (each also an environment variable): ``--fastloss-sizes`` /
FASTLOSS_BENCH_SIZES, ``--fastloss-threads`` / FASTLOSS_BENCH_THREADS (default 1,2),
``--fastloss-isa`` / FASTLOSS_BENCH_ISA (an ISA name or ``all``; default: the one
selected at import), ``--fastloss-losses`` / FASTLOSS_BENCH_LOSSES.

Unless given on the command line, ``--benchmark-max-time`` is 0.25 s and
``--benchmark-min-rounds`` follows ``fastloss.bench.policy_for`` (7 at 1e6, 5 at 1e7,
3 at 1e8), which keeps the default run under a minute or so.  Each benchmark makes one
untimed warm-up call first.  ``extra_info`` carries the case, the bytes moved, GB/s and
its percentage of the read bandwidth measured once per session.
"""
from __future__ import annotations

import os
import shlex

import pytest

MAX_TIME = 0.25  # seconds per benchmark, unless --benchmark-max-time is given


def pytest_addoption(parser):
    group = parser.getgroup("fastloss", "fastloss benchmark cases")
    group.addoption("--fastloss-sizes", default=None, metavar="LIST",
                    help="element counts, e.g. 1e6,1e7,1e8 (env FASTLOSS_BENCH_SIZES; default 1e6,1e7)")
    group.addoption("--fastloss-threads", default=None, metavar="LIST",
                    help="thread counts (env FASTLOSS_BENCH_THREADS; default 1,2)")
    group.addoption("--fastloss-isa", default=None, metavar="NAME",
                    help="ISA of the fastloss cases, or 'all' (env FASTLOSS_BENCH_ISA; default: selected)")
    group.addoption("--fastloss-losses", default=None, metavar="LIST",
                    help="losses to time (env FASTLOSS_BENCH_LOSSES; default: all regression losses)")


def _given_on_command_line(config, flag):
    args = list(config.invocation_params.args) + shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
    args += list(config.getini("addopts"))
    return any(a == flag or a.startswith(flag + "=") for a in args)


def pytest_collection_modifyitems(config, items):
    """Our defaults for max_time / min_rounds, unless the user chose them."""
    from fastloss import bench

    set_time = not _given_on_command_line(config, "--benchmark-max-time")
    set_rounds = not _given_on_command_line(config, "--benchmark-min-rounds")
    for item in items:
        entry = getattr(item, "callspec", None) and item.callspec.params.get("entry")
        if entry is None:
            continue
        kwargs = {}
        if set_time:
            kwargs["max_time"] = MAX_TIME
        if set_rounds:
            kwargs["min_rounds"] = bench.policy_for(entry[1].n, entry[1].dtype).min_calls
        if kwargs:
            item.add_marker(pytest.mark.benchmark(**kwargs))
