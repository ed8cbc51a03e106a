"""The row losses of issue 6 (multi-margin, distillation KL on logits, sequence log-probs,
triplet margin, InfoNCE) under pytest-benchmark: fastloss (per mode, thread count and ISA), the
NumPy reference and PyTorch in one group per loss, shape and mode.

Same cases and callables as ``python -m fastloss bench --loss rows`` (shapes per preset in
``fastloss._bench_field``; ``--fastloss-shapes`` replaces them).  Options: benchmarks/conftest.py.
"""
from __future__ import annotations

FAMILY = "rows"


def test_rows(entry, run_entry):
    run_entry(entry)
