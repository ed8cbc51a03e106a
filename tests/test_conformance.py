"""The conformance suite: every loss of the registry x dtype x reduction x shape x ISA x threads,
against the float64 NumPy reference (fastloss.reference) with the registry's tolerance table.

Also here: float32 accuracy against an exact (math.fsum) reference up to 1e8 elements.  The
hypothesis property tests (random shapes, broadcasts, weights, axes, dtypes, strides and special
values, for every family) are in tests/test_properties.py.
"""
from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

import numpy as np
import pytest

from fastloss._registry import REGISTRY, TOLERANCES
from fl_testing import (DTYPE_NAMES, SUPPORTED_ISAS, assert_close, assert_loss_type, get_dtype, grad_rtol, loss_cases,
                        loss_kwargs, variant_id)

THREADS = (1, 2, 3)
SMALL_SHAPES = {"0d": (), "empty": (0,), "1": (1,), "7": (7,), "17": (17,), "4097": (4097,),
                # a (9, 11) input viewed with a row step of 3 and a negative column step,
                # a Fortran-ordered target and a transposed weight
                "odd_strides": (9, 11)}
LARGE_SHAPES = {"1e6": (1_000_000,)}


@dataclass(frozen=True)
class Case:
    name: str
    variant: tuple       # sorted (key, value) pairs: hashable, for the caches below
    reduction: str
    dtype: str
    shape_id: str

    def __str__(self):
        return f"{self.name}[{variant_id(dict(self.variant))}] {self.reduction} {self.dtype} {self.shape_id}"


@functools.lru_cache(maxsize=8)
def _inputs(make_inputs, dtype_name, shape_id):
    """(input, target, weight), read-only (they are shared by the tests of one case)."""
    dtype = get_dtype(dtype_name)
    rng = np.random.default_rng(zlib.crc32(f"{dtype_name}/{shape_id}".encode()))
    if shape_id == "odd_strides":
        ins = make_inputs(rng, (27, 44), dtype)
        x = ins["input"][::3, ::-4]                                  # strides (3 rows, -4 items)
        t = np.asfortranarray(ins["target"][5:14, 7:18])
        w = rng.uniform(0.5, 2.0, (11, 9)).astype(dtype).T
        assert x.shape == t.shape == w.shape == SMALL_SHAPES["odd_strides"]
    else:
        shape = {**SMALL_SHAPES, **LARGE_SHAPES}[shape_id]
        ins = make_inputs(rng, shape, dtype)
        x, t = ins["input"], ins["target"]
        w = np.asarray(rng.uniform(0.5, 2.0, shape)).astype(dtype)
    for a in (x, t, w):
        a.flags.writeable = False
    return x, t, w


@functools.lru_cache(maxsize=8)
def _expected(case: Case, weighted: bool):
    spec = REGISTRY[case.name]
    x, t, w = _inputs(spec.make_inputs, case.dtype, case.shape_id)
    kw = loss_kwargs(spec, case.reduction, dict(case.variant))
    w = w if weighted else None
    return spec.reference(x, t, weight=w, **kw), spec.reference_grad(x, t, weight=w, **kw)


def _rows():
    """Test rows, ordered so that ISA and threads vary fastest (the caches above then compute
    each reference once per case)."""
    rows = []

    def add(p, dt, sid, isas, threads, marks=()):
        name, variant, red = p.values
        case = Case(name, tuple(sorted(variant.items())), red, dt, sid)
        for isa in isas:
            for n in threads:
                rows.append(pytest.param(case, isa, n, id=f"{p.id}-{dt}-{sid}-{isa}-t{n}", marks=marks))

    for p in loss_cases():
        for dt in DTYPE_NAMES:
            for sid in SMALL_SHAPES:
                add(p, dt, sid, SUPPORTED_ISAS, THREADS)
    # 1e6 elements (where the threads really split the work): every ISA x thread count for
    # float32, every ISA at 2 threads for the other dtypes; default variants only.
    for p in loss_cases(variants=False):
        for dt in DTYPE_NAMES:
            for sid in LARGE_SHAPES:
                add(p, dt, sid, SUPPORTED_ISAS, THREADS if dt == "float32" else (2,), marks=pytest.mark.slow)
    return rows


@pytest.mark.parametrize("case,isa,num_threads", _rows(), indirect=["isa"])
def test_conformance(case, isa, num_threads):
    spec = REGISTRY[case.name]
    x, t, w = _inputs(spec.make_inputs, case.dtype, case.shape_id)
    tol = TOLERANCES[case.dtype]
    kw = loss_kwargs(spec, case.reduction, dict(case.variant), num_threads=num_threads)
    reduced = case.reduction != "none"
    loss_rtol = tol["loss"] if reduced else tol["elem"]
    for weighted in ((False, True) if spec.has_weight else (False,)):
        weight = w if weighted else None
        exp_loss, exp_grad = _expected(case, weighted)
        label = f"{case} isa={isa} threads={num_threads} weighted={weighted}"

        got = spec.func(x, t, weight=weight, **kw)
        assert_loss_type(got, x.dtype, scalar=reduced)
        assert_close(got, exp_loss, rtol=loss_rtol, what=f"{label}: loss")

        loss, grad = spec.with_grad(x, t, weight=weight, **kw)
        assert_loss_type(loss, x.dtype, scalar=reduced)
        assert_close(loss, exp_loss, rtol=loss_rtol, what=f"{label}: loss of _with_grad")
        assert isinstance(grad, np.ndarray) and grad.dtype == x.dtype and grad.shape == x.shape, (
            f"{label}: grad is {type(grad).__name__} {getattr(grad, 'dtype', '')}{getattr(grad, 'shape', '')}")
        assert_close(grad, exp_grad, rtol=grad_rtol(spec, case.dtype, case.reduction, weighted),
                     atol=tol["grad_atol"], what=f"{label}: grad")


# ---- float32 accuracy against an exact sum -------------------------------------------------

def _exact_sum_of_elementwise(spec, variant, x, t, chunk=1_000_000):
    """math.fsum of the float64 elementwise loss, chunk by chunk (each chunk's fsum is correctly
    rounded; the fsum of those partials is within ~1e-16 relative of the exact sum)."""
    partials = []
    for i in range(0, x.size, chunk):
        elem = spec.reference(x[i:i + chunk], t[i:i + chunk], reduction="none", **variant)
        partials.append(math.fsum(elem.tolist()))
    return math.fsum(partials)


def _assert_within_ulps(got, exact, ulps, what):
    assert isinstance(got, np.float32), f"{what}: expected a float32 scalar, got {type(got).__name__}"
    ulp = float(np.spacing(np.float32(abs(exact))))
    err = abs(float(got) - exact)
    assert err <= ulps * ulp, f"{what}: got {float(got)!r}, exact {exact!r}: error {err / ulp:.2f} ulp > {ulps}"


@pytest.mark.parametrize("n", [1000, 100_000,
                               pytest.param(10_000_000, marks=pytest.mark.slow, id="1e7"),
                               pytest.param(100_000_000, marks=pytest.mark.slow, id="1e8")])
def test_float32_within_4_ulp_of_fsum(n):
    """float32 sums and means stay within 4 float32 ulp of the exact value even where a float32
    accumulator would stall (about 1e8 terms near 10 each; 1e8 needs about 1 GB)."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n, dtype=np.float32)
    x += 3.0
    t = rng.standard_normal(n, dtype=np.float32)
    t *= 0.1
    cases = loss_cases(variants=False, reductions=("sum",)) if n < 10**8 else [
        p for p in loss_cases(variants=False, reductions=("sum",)) if p.values[0] in ("mse_loss", "l1_loss")]
    for p in cases:
        name, variant, _ = p.values
        spec = REGISTRY[name]
        exact = _exact_sum_of_elementwise(spec, variant, x, t)
        _assert_within_ulps(spec.func(x, t, reduction="sum", **variant), exact, 4, f"{name} sum n={n}")
        _assert_within_ulps(spec.func(x, t, reduction="mean", **variant), exact / n, 4, f"{name} mean n={n}")
    del x, t
