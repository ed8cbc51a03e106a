"""pytest configuration for fastloss: the installed-build guard, markers, the hypothesis
profile and the fixtures shared by every module (rng, isa, threads_restored).

The comparison helpers live in tests/fl_testing.py (one copy, imported where needed).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import fastloss
from fastloss import _core
from fl_testing import SUPPORTED_ISAS

REPO_ROOT = Path(__file__).resolve().parent.parent


def _check_installed_build() -> None:
    """CI installs a wheel and sets FASTLOSS_TEST_INSTALLED=1: the tests must then import that
    installed build, not the source checkout they live in."""
    if os.environ.get("FASTLOSS_TEST_INSTALLED") != "1":
        return
    imported = Path(fastloss.__file__).resolve()
    assert not imported.is_relative_to(REPO_ROOT), (
        f"FASTLOSS_TEST_INSTALLED=1 but fastloss was imported from the source checkout ({imported}); "
        f"run pytest so that the installed wheel is imported (e.g. not with `python -m pytest` "
        f"from {REPO_ROOT}, and without PYTHONPATH pointing at it)")


_check_installed_build()

# Derandomized and bounded: the property test is reproducible and its cost is fixed.
settings.register_profile("fastloss", derandomize=True, max_examples=60, deadline=None, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fastloss")



def pytest_configure(config):
    # Also declared in pyproject.toml; repeated so that the marker is known whatever ini file is used.
    config.addinivalue_line("markers", "slow: long-running cases (large arrays); they run in CI too")
    config.addinivalue_line("markers", "qemu: runs the build under QEMU's user-mode emulation of other CPUs")


def pytest_report_header(config):
    return (f"fastloss {fastloss.__version__} from {Path(fastloss.__file__).parent}; "
            f"ISAs runnable here: {', '.join(SUPPORTED_ISAS)}; default ISA {_core.get_isa()}; "
            f"threads {fastloss.get_num_threads()}")


@pytest.fixture
def rng():
    """A fixed-seed generator: every run sees the same data."""
    return np.random.default_rng(20240611)


@pytest.fixture(params=SUPPORTED_ISAS)
def isa(request):
    """Run the test with each ISA the machine supports selected, then restore the previous one."""
    previous = _core.get_isa()
    _core.set_isa(request.param)
    try:
        yield request.param
    finally:
        _core.set_isa(previous)


@pytest.fixture
def threads_restored():
    """For tests that call fastloss.set_num_threads: restore the package default afterwards."""
    try:
        yield
    finally:
        fastloss.set_num_threads(None)
