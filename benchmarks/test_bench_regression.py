"""Regression losses under pytest-benchmark: one group per loss/size/dtype/mode holding
fastloss (per thread count and ISA), the NumPy reference and PyTorch (if installed).

The cases, the callables and the bytes counted for GB/s all come from
``fastloss.bench``, like ``python -m fastloss bench``; the parametrization and the
benchmark body are in benchmarks/conftest.py (shared with test_bench_cross_entropy.py),
which also lists the options.  Not collected by ``pytest tests``.
"""
from __future__ import annotations

FAMILY = "regression"


def test_regression(entry, run_entry):
    run_entry(entry)
