"""Cross-entropy under pytest-benchmark: one group per shape/dtype for the forward and one
for with-grad, holding fastloss (per mode -- new array, preallocated ``grad_out``, in place
-- thread count and ISA), the NumPy reference (where ``fastloss.bench.numpy_timed``
allows) and PyTorch (if installed).

Same cases and callables as ``python -m fastloss bench --loss cross_entropy``
(``fastloss.bench.cases``, preset ``"pytest"``: small shapes by default, so that the
``--benchmark-disable`` smoke run stays quick; ``--fastloss-shapes 8192x32000,...`` for
the real sizes).  The in-place case overwrites a copy of the logits, refreshed by an
untimed setup before each round.  ``extra_info`` also carries each provider's peak
extra memory (not under ``--benchmark-disable``).  Options: benchmarks/conftest.py.
"""
from __future__ import annotations

FAMILY = "classification"


def test_cross_entropy(entry, run_entry):
    run_entry(entry)
