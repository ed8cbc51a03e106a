"""float64 one-shot reductions are (nearly) correctly rounded sums (issue 7).

The oracle is ``math.fsum`` (the correctly rounded sum) of float64 element / row losses:
those of ``fastloss.reference`` (float64 NumPy, from the published formulas) for the losses
it has, else the kernel's own ``reduction="none"`` output, which isolates the summation.
One-shot float64 sums must be within 1 ulp of that, so that the chunked sums of
fastloss.metrics / fastloss.dask (also within ~1 ulp of exact) agree with them within 2 ulp.
``_core.sum_f64`` (the compensated sum used for row losses) is unit-tested here too.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import fastloss
from fastloss import _core
from fastloss import reference as R
from fl_testing import SUPPORTED_ISAS


def ulps(got, exact) -> float:
    """|got - exact| in ulps of exact (0 when equal, inf/nan handled by the callers)."""
    got, exact = float(got), float(exact)
    if got == exact:
        return 0.0
    return abs(got - exact) / float(np.spacing(abs(exact)))


def assert_within(got, exact, n_ulp, what):
    u = ulps(got, exact)
    assert u <= n_ulp, f"{what}: got {float(got)!r}, exact {float(exact)!r}: {u:.2f} ulp > {n_ulp}"


def fsum(a) -> float:
    return math.fsum(np.asarray(a, np.float64).ravel().tolist())


# ---- _core.sum_f64 --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 2, 15, 16, 17, 31, 33, 1000, 100_003])
def test_sum_f64_vs_fsum(n, isa, rng):
    for scale in (1.0, 1e-300, 1e300 / max(n, 1)):
        x = rng.standard_normal(n) * scale + rng.random(n) * scale * 0.1
        assert_within(_core.sum_f64(x), fsum(x), 1, f"n={n} scale={scale}")
        y = np.abs(x)                              # condition number 1: 1 ulp is the bound
        assert_within(_core.sum_f64(y), fsum(y), 1, f"|x| n={n}")


def test_sum_f64_same_bits_on_every_isa(rng):
    x = rng.standard_normal(10_007) * np.exp(rng.uniform(-20, 20, 10_007))
    previous = _core.get_isa()
    try:
        got = set()
        for name in SUPPORTED_ISAS:
            _core.set_isa(name)
            s, c = _core.sum_f64(x, True)
            got.add((s.hex(), c.hex()))
    finally:
        _core.set_isa(previous)
    assert len(got) == 1, got


def test_sum_f64_cancellation():
    assert _core.sum_f64([1e100, 1.0, -1e100]) == 1.0            # np.sum gives 0.0
    assert _core.sum_f64([1.0, 1e-16, 1e-16, 1e-16, 1e-16]) == math.fsum([1.0] + [1e-16] * 4)
    x = np.tile([1e16, 1.0, -1e16, 3.0], 25)                    # exact sum 100
    assert _core.sum_f64(x) == 100.0 and np.sum(x) != 100.0
    rng = np.random.default_rng(5)
    y = rng.standard_normal(4096)
    y = np.concatenate([y, -y[::-1], [0.5]])                   # exact sum 0.5
    assert _core.sum_f64(y) == 0.5


def test_sum_f64_compensation():
    s, c = _core.sum_f64([1.0, 2.0**-60, 2.0**-60], True)
    assert s == 1.0 and c == 2.0**-59                          # exact = s + c
    s, c = _core.sum_f64([1.0, 2.0], True)
    assert (s, c) == (3.0, 0.0)


def test_sum_f64_special_values():
    inf, nan = math.inf, math.nan
    assert _core.sum_f64([]) == 0.0 and not math.copysign(1.0, _core.sum_f64([])) < 0
    assert math.copysign(1.0, _core.sum_f64([-0.0])) < 0          # as np.sum
    assert math.copysign(1.0, _core.sum_f64([-0.0] * 40)) < 0
    assert _core.sum_f64([1.0, inf, 2.0]) == inf
    assert _core.sum_f64([-inf] + [1.0] * 20) == -inf
    assert math.isnan(_core.sum_f64([inf, 1.0, -inf]))
    assert math.isnan(_core.sum_f64([1.0] * 17 + [nan]))
    assert math.isnan(_core.sum_f64([inf] * 20 + [nan]))
    assert _core.sum_f64([1e308] * 20) == inf                    # overflow, as np.sum
    s, c = _core.sum_f64([inf, 1.0], True)
    assert s == inf and c == 0.0
    with np.errstate(all="raise"):                               # no warning, no error
        assert math.isnan(_core.sum_f64(np.array([inf, -inf])))


def test_sum_f64_layouts_and_dtypes(rng):
    x = rng.standard_normal((37, 11))
    exact = fsum(x)
    assert_within(_core.sum_f64(x), exact, 1, "2-d")
    assert_within(_core.sum_f64(np.asfortranarray(x)), exact, 1, "fortran")
    assert_within(_core.sum_f64(x[:, ::2]), fsum(x[:, ::2]), 1, "strided")
    f = x.astype(np.float32)
    assert_within(_core.sum_f64(f), fsum(f), 1, "float32 input")
    assert _core.sum_f64([1, 2, 3]) == 6.0


# ---- pointwise kernel, float64 ----------------------------------------------------------------

def _operands(rng, case):
    """(x, t, w) float64, with strided / broadcast layouts; exact values irrelevant."""
    scale = 10.0 ** rng.uniform(-3, 3)
    if case == "contiguous":
        x = rng.standard_normal((3791, 3)) * scale
        t, w = rng.standard_normal((3791, 3)), rng.random((3791, 3))
    elif case == "long":
        x = rng.standard_normal(50_001) * scale
        t, w = rng.standard_normal(50_001), rng.random(50_001)
    elif case == "strided rows":                       # segments = rows, unit-stride loops
        x = rng.standard_normal((257, 40))[:, :33] * scale
        t, w = rng.standard_normal((257, 40))[:, 3:36], rng.random((257, 33))
    elif case == "strided last":                       # generic (scalar) loop
        x = rng.standard_normal((300, 66))[:, ::2] * scale
        t, w = rng.standard_normal((300, 33)), rng.random((300, 66))[:, 1::2]
    else:                                              # broadcast target and weight
        x = rng.standard_normal((513, 17)) * scale
        t = np.broadcast_to(rng.standard_normal(17), x.shape)
        w = np.broadcast_to(rng.random((513, 1)), x.shape)
    return x, t, w


@pytest.mark.parametrize("case", ["contiguous", "long", "strided rows", "strided last", "broadcast"])
@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "huber_loss"])
@pytest.mark.parametrize("weighted", [False, True])
def test_regression_sum_within_1ulp_of_exact(name, case, weighted, rng):
    f, ref = getattr(fastloss, name), getattr(R, name)
    previous = _core.get_isa()
    try:
        for _ in range(3):
            x, t, w = _operands(rng, case)
            kw = {"weight": w} if weighted else {}
            elems = ref(x, t, reduction="none", **kw)
            exact = fsum(elems)
            bits = set()
            for isa_name in SUPPORTED_ISAS:
                _core.set_isa(isa_name)
                got = f(x, t, reduction="sum", **kw)
                assert got.dtype == np.float64
                assert_within(got, exact, 1, f"{name} {case} sum {isa_name}")
                bits.add(float(got).hex())
                mean = f(x, t, reduction="mean", **kw)
                den = fsum(w) if weighted else x.size
                assert_within(mean, exact / den, 2, f"{name} {case} mean {isa_name}")
            assert len(bits) == 1, f"{name} {case}: ISAs differ: {bits}"
    finally:
        _core.set_isa(previous)


@pytest.mark.parametrize("case", ["contiguous", "strided rows", "strided last", "broadcast"])
def test_elementwise_sum_is_rounded_sum_of_elements(case, isa, rng):
    """Section 3b losses (float64): the sum is within 1 ulp of fsum of the kernel's own element
    losses (reduction="none"); thread counts agree bitwise."""
    x, t, w = _operands(rng, case)
    p = 1.0 / (1.0 + np.exp(-t))                       # probabilities for the BCE target
    for name, args, kw in [
        ("binary_cross_entropy_with_logits", (x, p), {}),
        ("binary_cross_entropy_with_logits", (x, p), {"weight": w}),
        ("sigmoid_focal_loss", (x, p), {}),
        ("hinge_loss", (x, np.sign(t)), {}),
    ]:
        f = getattr(fastloss, name)
        exact = fsum(f(*args, reduction="none", **kw))
        got = [f(*args, reduction="sum", num_threads=k, **kw) for k in (1, 2, 3)]
        assert_within(got[0], exact, 1, f"{name} {case} {sorted(kw)}")
        assert got[0].tobytes() == got[1].tobytes() == got[2].tobytes()


def test_large_sum_threads_bitwise_and_exact(rng):
    x, t = rng.standard_normal(300_000), rng.standard_normal(300_000)
    exact = fsum(R.mse_loss(x, t, reduction="none"))
    got = [fastloss.mse_loss(x, t, reduction="sum", num_threads=k) for k in (1, 2, 3)]
    assert_within(got[0], exact, 1, "mse 3e5")
    assert got[0].tobytes() == got[1].tobytes() == got[2].tobytes()


# ---- row losses ------------------------------------------------------------------------------

@pytest.mark.parametrize("V", [3, 10, 1000])
def test_cross_entropy_sum_within_1ulp_of_exact(V, isa, rng):
    n = 20_000 // V + 7
    logits = rng.standard_normal((n, V)) * 3.0
    target = rng.integers(0, V, n)
    cw = rng.random(V) + 0.1
    for kw in ({}, {"weight": cw}, {"label_smoothing": 0.1}):
        rows = R.cross_entropy(logits, target, reduction="none", **kw)
        got = fastloss.cross_entropy(logits, target, reduction="sum", **kw)
        assert got.dtype == np.float64
        assert_within(got, fsum(rows), 1, f"cross_entropy V={V} {sorted(kw)}")
        # strided rows (a view) give the same bits
        wide = np.zeros((n, V + 5))
        wide[:, 2:V + 2] = logits
        assert fastloss.cross_entropy(wide[:, 2:V + 2], target, reduction="sum", **kw) == got


def test_row_loss_sums_are_rounded_sums(rng):
    """multi_margin_loss, triplet_margin_loss, kl_div_logits (float64): the sum is within 1 ulp of
    fsum of the kernel's own row losses."""
    x = rng.standard_normal((4001, 7)) * 5
    y = rng.integers(0, 7, 4001)
    a, p, q = (rng.standard_normal((3001, 9)) for _ in range(3))
    s, t = rng.standard_normal((2003, 11)), rng.standard_normal((2003, 11))
    for name, args in [("multi_margin_loss", (x, y)), ("triplet_margin_loss", (a, p, q)),
                       ("kl_div_logits", (s, t))]:
        f = getattr(fastloss, name)
        rows = f(*args, reduction="none")
        got = f(*args, reduction="sum")
        assert got.dtype == np.float64
        assert_within(got, fsum(rows), 1, name)
