"""The elementwise losses of issue 6 (binary cross-entropy with probabilities and with logits,
sigmoid focal, hinge, KL divergence, DPO) under pytest-benchmark: fastloss (per mode, thread
count and ISA), the NumPy reference and PyTorch in one group per loss, size and mode.

Same cases and callables as ``python -m fastloss bench --loss elementwise`` (sizes per preset in
``fastloss._bench_field``; ``--fastloss-sizes`` replaces them).  Options: benchmarks/conftest.py.
"""
from __future__ import annotations

FAMILY = "elementwise"


def test_elementwise(entry, run_entry):
    run_entry(entry)
