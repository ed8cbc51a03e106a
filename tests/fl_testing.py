"""Shared helpers for the fastloss test suite (imported by conftest.py and the test modules).

Everything that more than one test module needs lives here, once:

* ``assert_close`` / ``assert_identical``: comparisons that, on failure, list the first
  mismatching elements as (index, got, expected) instead of just "not close";
* the registry-driven case lists (``loss_cases``) and the keyword plumbing that hides the
  one irregularity of the API (``rmse`` has no ``reduction``);
* dtype names -> dtypes (bfloat16 through ``ml_dtypes``, skipped when it is missing);
* ``run_python`` (and ``python_env``): run a snippet in a fresh interpreter that imports the
  same fastloss build.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastloss
from fastloss import _core
from fastloss._registry import TOLERANCES, by_family

#: ISAs this machine can run; every kernel test is parametrized over them.
SUPPORTED_ISAS = tuple(_core.isa_supported())
DTYPE_NAMES = ("float16", "float32", "float64", "bfloat16")

#: Sums are accumulated in double for every input dtype: a quantity derived from a sum
#: (the divisor of a weighted mean, the root of rmse) carries the float64 summation error.
DOUBLE_SUM_RTOL = TOLERANCES["float64"]["loss"]
#: The regression losses: the registry entries that take (input, target) of one shape.  Tests
#: that build regression-shaped calls iterate over these; the classification family has its
#: own tests and, with every other public function, the registry-driven bad-input table and
#: property tests.
REGRESSION = by_family("regression")


# ---- dtypes ---------------------------------------------------------------------------------

def get_dtype(name: str) -> np.dtype:
    """The NumPy dtype called `name`; bfloat16 comes from ml_dtypes (skip if not installed)."""
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def loss_dtype_for(input_dtype) -> np.dtype:
    """Documented: the loss is float64 for float64 input and float32 otherwise."""
    return np.dtype(np.float64) if np.dtype(input_dtype) == np.float64 else np.dtype(np.float32)


# ---- registry plumbing ----------------------------------------------------------------------

def takes_reduction(spec) -> bool:
    return "reduction" in inspect.signature(spec.func).parameters


def loss_kwargs(spec, reduction="mean", variant=None, **extra) -> dict:
    """Keyword arguments for spec.func / spec.reference (no num_threads: the reference has none)."""
    kw = dict(variant or {})
    if takes_reduction(spec):
        kw["reduction"] = reduction
    elif reduction != "mean":
        raise ValueError(f"{spec.name} has no reduction argument")
    kw.update(extra)
    return kw


def variant_id(variant: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(variant.items())) or "default"


def loss_cases(*, variants=True, reductions=None, weighted=False, family="regression"):
    """(name, variant, reduction) for every loss of one family of the registry (default: the
    regression losses), as pytest params.

    variants=False keeps only each loss's first variant; `reductions` restricts the
    reductions; weighted=True keeps only losses that take a weight.
    """
    out = []
    for name, spec in by_family(family).items():
        if weighted and not spec.has_weight:
            continue
        for variant in (spec.variants if variants else spec.variants[:1]):
            for red in spec.reductions:
                if reductions is not None and red not in reductions:
                    continue
                out.append(pytest.param(name, dict(variant), red, id=f"{name}[{variant_id(variant)}]-{red}"))
    return out


def grad_rtol(spec, dtype_name: str, reduction: str, weighted: bool) -> float:
    """Tolerance of a gradient against the float64 reference gradient.

    One rounding into the input dtype (TOLERANCES[...]["grad"]), plus, when the gradient is
    divided by a reduced quantity (weighted mean: sum(w); rmse: the root), that quantity's
    double summation error.
    """
    rtol = TOLERANCES[dtype_name]["grad"]
    if reduction == "mean" and (weighted or not takes_reduction(spec)):
        rtol += DOUBLE_SUM_RTOL
    return rtol


# ---- comparisons ----------------------------------------------------------------------------

def _mismatch_report(what, got, expected, bad, header, max_items=10) -> str:
    idx = np.argwhere(bad)
    lines = [f"{what}: {header}; {idx.shape[0]} of {bad.size} elements differ. First mismatches "
             "(index, got, expected):"]
    for i in idx[:max_items]:
        key = tuple(int(k) for k in i)
        lines.append(f"  {key}: got {float(got[key])!r}, expected {float(expected[key])!r}")
    return "\n".join(lines)


def _as_f64(a) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.float64) if a.dtype != np.float64 else a


def assert_close(got, expected, *, rtol, atol=0.0, what="value"):
    """|got - expected| <= atol + rtol * |expected| elementwise; NaN must match NaN and inf must
    match the same inf exactly.  Shapes must be equal (no broadcasting of got/expected); `atol`
    may be an array broadcastable to them (an error bound per element)."""
    g, e = np.asarray(got), np.asarray(expected)
    if g.shape != e.shape:
        raise AssertionError(f"{what}: shape {g.shape}, expected {e.shape}")
    g64, e64 = _as_f64(g), _as_f64(e)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(g64 - e64)
        ok = (err <= atol + rtol * np.abs(e64)) | (np.isnan(g64) & np.isnan(e64))
        ok |= np.isinf(e64) & (g64 == e64)
    bad = ~ok
    if bad.any():
        finite = bad & np.isfinite(err)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = float(np.max(err[finite] / np.abs(e64[finite]))) if finite.any() else float("nan")
        atol_text = f"{atol:.3g}" if np.ndim(atol) == 0 else f"per element (max {float(np.max(atol)):.3g})"
        header = f"rtol={rtol:.3g}, atol={atol_text}, worst relative error {rel:.3g}"
        g0, e0 = g64.reshape(g.shape or ()), e64.reshape(e.shape or ())
        raise AssertionError(_mismatch_report(what, np.atleast_1d(g0), np.atleast_1d(e0),
                                              np.atleast_1d(bad), header))


def assert_identical(got, expected, *, what="value"):
    """Same shape, same dtype and the same bits in every element (NaN payloads included)."""
    g, e = np.asarray(got), np.asarray(expected)
    if g.shape != e.shape or g.dtype != e.dtype:
        raise AssertionError(f"{what}: {g.dtype}{g.shape}, expected {e.dtype}{e.shape}")
    bits = np.dtype(f"u{g.dtype.itemsize}")
    gb = np.atleast_1d(np.ascontiguousarray(g)).view(bits)
    eb = np.atleast_1d(np.ascontiguousarray(e)).view(bits)
    bad = gb != eb
    if bad.any():
        raise AssertionError(_mismatch_report(what, np.atleast_1d(_as_f64(g)), np.atleast_1d(_as_f64(e)),
                                              bad, "not bitwise identical"))


def assert_loss_type(result, input_dtype, *, scalar: bool):
    """The documented result type: a NumPy scalar for a full reduction, else an ndarray;
    float64 for float64 input, float32 otherwise."""
    want = loss_dtype_for(input_dtype)
    if scalar:
        assert isinstance(result, np.floating) and result.dtype == want, (
            f"expected a numpy {want} scalar, got {type(result).__name__} {getattr(result, 'dtype', '')}")
    else:
        assert isinstance(result, np.ndarray) and result.dtype == want, (
            f"expected a {want} ndarray, got {type(result).__name__} {getattr(result, 'dtype', '')}")


def fd_gradient(f, x, h):
    """d f / d x by 4th-order central differences, (f(x-2h) - 8 f(x-h) + 8 f(x+h) - f(x+2h)) / 12h,
    one element at a time (for small float64 arrays; truncation error O(h**4))."""
    g = np.empty(x.shape, dtype=np.float64)
    for i in np.ndindex(x.shape):
        vals = []
        for k in (-2, -1, 1, 2):
            xp = x.copy()
            xp[i] += k * h
            vals.append(float(f(xp)))
        g[i] = (vals[0] - 8.0 * vals[1] + 8.0 * vals[2] - vals[3]) / (12.0 * h)
    return g


# ---- subprocesses ---------------------------------------------------------------------------

def fastloss_import_root() -> str:
    """The directory that contains the `fastloss` package under test (source tree or site-packages)."""
    return str(Path(fastloss.__file__).resolve().parent.parent)


def python_env(env_extra=None, drop=("FASTLOSS_ISA", "OMP_NUM_THREADS")) -> dict:
    """The environment of a fresh interpreter that imports the same fastloss build."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([fastloss_import_root()] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(env_extra or {})
    if "detect_leaks=1" in env.get("ASAN_OPTIONS", ""):
        # tools/sanitize.sh: the interpreter's own leaks at exit would change a child's exit
        # status; the parent process (the test run) keeps the leak check.
        env["ASAN_OPTIONS"] = env["ASAN_OPTIONS"].replace("detect_leaks=1", "detect_leaks=0")
    return env


def run_python(args, cwd, env_extra=None, drop=("FASTLOSS_ISA", "OMP_NUM_THREADS"), timeout=120, prefix=()):
    """Run `python <args>` in a fresh interpreter that imports the same fastloss build.

    cwd should be a scratch directory, so that a source checkout in the current
    directory cannot shadow an installed build.  `prefix` is prepended to the command
    line (e.g. an emulator: ("qemu-x86_64", "-cpu", "Haswell")).
    """
    return subprocess.run([*prefix, sys.executable, *args], cwd=cwd, env=python_env(env_extra, drop),
                          capture_output=True, text=True, timeout=timeout)


def computing_functions() -> dict:
    """The public functions that compute (``fastloss.__all__`` minus configuration), by their
    own name: aliases (``mse`` is ``mse_loss``) appear once."""
    out = {}
    for name in fastloss.__all__:
        f = getattr(fastloss, name)
        if callable(f) and getattr(f, "__module__", "") not in ("fastloss._config", "fastloss._capi"):
            out.setdefault(f.__name__, f)
    return out
