"""More than 2**31 elements, and byte offsets past 2**31: the kernels index with int64.

Views, not memory: ``x[r, c] = base[r + c]`` (``as_strided`` with both strides one element,
rows overlapping) has 32769 x 65537 > 2**31 elements on ~100k floats of memory, and, unlike a
broadcast row, every row is different, so a flat index or block start that wrapped at 2**31
would read the wrong values.  The expected values come from prefix sums over `base` (O(R + C)):
row r's sum of f(x) is F[r + C] - F[r] with F the prefix sum of f(base).

float16 views and the real-memory case (a 2.1 GB array whose last rows start past byte
2**31, gradient in place) are marked slow (about 10 s each on 2 cores).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import fastloss
from fastloss._registry import CE_TOLERANCES, TOLERANCES
from fl_testing import assert_close

R, C = 32769, 65537                 # R * C = 2**31 + 163841
V = 65536                           # R * V = 2**31 + 65536


def _hankel(base, rows, cols):
    """x[r, c] = base[r + c], read-only."""
    assert base.size >= rows + cols - 1
    return np.lib.stride_tricks.as_strided(base, (rows, cols), (base.itemsize, base.itemsize), writeable=False)


def _window_sums(f, width):
    """sum(f[r : r + width]) for every r, from a float64 prefix sum."""
    F = np.concatenate([[0.0], np.cumsum(np.asarray(f, np.float64))])
    return F[width:] - F[:-width]


@pytest.fixture(scope="module", params=["float32", pytest.param("float16", marks=pytest.mark.slow)])
def base(request):
    rng = np.random.default_rng(31)
    return rng.standard_normal(R + C - 1).astype(request.param)


def test_regression_losses_past_2_31_elements(base):
    dt = base.dtype.name
    x = _hankel(base, R, C)
    assert x.size > 2 ** 31
    zero = np.zeros(C, base.dtype)                               # the target: a row, broadcast
    b = base.astype(np.float64)
    tol = TOLERANCES[dt]["loss"]
    # per row (axis=1): the window sums of b**2; check every row, the last ones in particular
    rows = fastloss.mse_loss(x, zero, axis=1, reduction="sum")
    want = _window_sums(b * b, C)
    assert rows.shape == (R,)
    assert_close(rows, want, rtol=tol, what=f"{dt} mse per row of a {R}x{C} view")
    # everything: sum over rows of the window sums; l1 too
    assert_close(fastloss.mse_loss(x, zero), np.sum(want) / x.size, rtol=tol, what=f"{dt} mse mean")
    if dt == "float32":
        assert_close(fastloss.l1_loss(x, zero, reduction="sum"), np.sum(_window_sums(np.abs(b), C)), rtol=tol,
                     what=f"{dt} l1 sum")


def test_cross_entropy_family_past_2_31_elements(base):
    dt = base.dtype.name
    x = _hankel(base, R, V)
    assert x.size > 2 ** 31 and x.strides[-1] == x.itemsize     # rows overlap, classes contiguous
    b = base.astype(np.float64)
    rng = np.random.default_rng(32)
    t = rng.integers(0, V, R)
    t[-1] = V - 1                                               # the very last element of the view
    lse = np.log(_window_sums(np.exp(b), V)[:R])
    picked = b[np.arange(R) + t]
    tol = CE_TOLERANCES[dt]["loss"]
    assert_close(fastloss.logsumexp(x), lse, rtol=tol, atol=tol, what=f"{dt} logsumexp of a {R}x{V} view")
    rows = fastloss.cross_entropy(x, t, reduction="none")
    assert_close(rows, lse - picked, rtol=tol, atol=tol * (1 + np.abs(lse)), what=f"{dt} cross_entropy per row")
    mean_ce = np.mean(lse - picked)
    assert_close(fastloss.cross_entropy(x, t), mean_ce, rtol=tol, atol=tol, what=f"{dt} cross_entropy mean")
    assert_close(fastloss.perplexity(x, t), math.exp(mean_ce), rtol=2 * tol, what=f"{dt} perplexity")
    assert_close(fastloss.nll_loss(x, t, reduction="none"), -picked, rtol=TOLERANCES[dt]["elem"],
                 what=f"{dt} nll_loss per row")


@pytest.mark.slow
def test_byte_offsets_past_2_31_in_place():
    """A real float32 array of 2.15 GB: the rows from 8192 on start past byte 2**31.  Gradients
    written in place (no second array); rows checked before and after the boundary."""
    rows, cols = 8208, 65536                                    # 8208 * 65536 * 4 bytes > 2**31
    pattern = np.random.default_rng(33).standard_normal((16, cols)).astype(np.float32)
    x = np.empty((rows, cols), np.float32)
    x.reshape(rows // 16, 16, cols)[...] = pattern              # row r is pattern[r % 16]
    assert x[8192:].__array_interface__["data"][0] - x.__array_interface__["data"][0] >= 2 ** 31
    t = np.zeros(cols, np.float32)
    p64 = pattern.astype(np.float64)
    check = [0, 8191, 8192, 8193, rows - 1]

    loss, grad = fastloss.mse_loss_with_grad(x, t, reduction="sum", grad_out=x)
    assert grad is x
    assert_close(loss, (rows // 16) * np.sum(p64 * p64), rtol=TOLERANCES["float32"]["loss"], what="mse sum")
    for r in check:
        assert_close(x[r], 2 * pattern[r % 16], rtol=TOLERANCES["float32"]["grad"], what=f"mse grad row {r}")

    x.reshape(rows // 16, 16, cols)[...] = pattern
    target = np.arange(rows) % cols
    loss, grad = fastloss.cross_entropy_with_grad(x, target, reduction="sum", grad_out=x)
    assert grad is x
    lse = np.log(np.sum(np.exp(p64), axis=1))
    per_row = lse[np.arange(rows) % 16] - p64[np.arange(rows) % 16, target]
    tol = CE_TOLERANCES["float32"]
    assert_close(loss, np.sum(per_row), rtol=tol["loss"], atol=tol["loss"] * rows, what="cross_entropy sum")
    for r in check:
        p = np.exp(p64[r % 16] - lse[r % 16])
        p[target[r]] -= 1.0
        assert_close(x[r], p, rtol=0.0, atol=tol["compute"] * (np.abs(p) + 1e-3) + 1e-9, what=f"ce grad row {r}")
