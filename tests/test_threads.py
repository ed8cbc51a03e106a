"""Threads: bitwise identical results for every thread count, num_threads validation,
set/get_num_threads, threadpoolctl and OMP_NUM_THREADS, concurrent callers, read_sum_f32."""
from __future__ import annotations

import math
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastloss
from fastloss import _core
from fastloss._registry import REGISTRY
from fl_testing import DTYPE_NAMES, REGRESSION, assert_identical, get_dtype, loss_cases, loss_kwargs, run_python

#: Large enough for the kernels to really use several threads (they keep >= 2**16 elements per thread).
LAYOUTS = {"flat": ((1_000_000,), None), "axis0": ((1000, 600), 0), "axis1": ((600, 1000), 1)}
THREAD_COUNTS = (2, 3, -1, 8)


def _bitwise_rows():
    rows = []
    for p in loss_cases(variants=False):
        name, variant, reduction = p.values
        for dt in DTYPE_NAMES:
            for layout in (LAYOUTS if reduction != "none" else ("flat",)):
                rows.append(pytest.param(name, variant, reduction, dt, layout, id=f"{p.id}-{dt}-{layout}"))
    return rows


@pytest.mark.parametrize("name,variant,reduction,dtype_name,layout", _bitwise_rows())
def test_bitwise_identical_across_thread_counts(name, variant, reduction, dtype_name, layout, rng):
    spec = REGISTRY[name]
    shape, axis = LAYOUTS[layout]
    dt = get_dtype(dtype_name)
    x = rng.standard_normal(shape).astype(dt)
    t = rng.standard_normal(shape).astype(dt)
    w = rng.uniform(0.5, 2.0, shape).astype(dt) if spec.has_weight else None
    kw = loss_kwargs(spec, reduction, variant, axis=axis, weight=w)
    loss1 = spec.func(x, t, num_threads=1, **kw)
    wloss1, grad1 = spec.with_grad(x, t, num_threads=1, **kw)
    for n in THREAD_COUNTS + (None,):
        what = f"{name} {reduction} {dtype_name} {layout} num_threads={n} vs 1"
        assert_identical(spec.func(x, t, num_threads=n, **kw), loss1, what=f"{what}: loss")
        wloss, grad = spec.with_grad(x, t, num_threads=n, **kw)
        assert_identical(wloss, wloss1, what=f"{what}: loss of _with_grad")
        assert_identical(grad, grad1, what=f"{what}: grad")


# ---- num_threads validation -----------------------------------------------------------------

BAD_THREADS = [pytest.param(v, e, id=f"{v!r}-{e.__name__}") for v, e in [
    (0, ValueError), (-2, ValueError), (10**6, ValueError), (1.5, TypeError), (True, TypeError),
    ("2", TypeError), (np.float64(2.0), TypeError)]]


@pytest.mark.parametrize("value,exc", BAD_THREADS)
@pytest.mark.parametrize("name", list(REGRESSION))
def test_bad_num_threads_raises(name, value, exc):
    spec = REGISTRY[name]
    x = np.ones(5)
    for f in (spec.func, spec.with_grad):
        with pytest.raises(exc, match="num_threads"):
            f(x, x, num_threads=value)


@pytest.mark.parametrize("value", [-1, 1, 2, 3, 4096, np.int64(2), np.int32(3)], ids=repr)
def test_valid_num_threads(value, rng):
    x = rng.standard_normal(300_000).astype(np.float32)
    t = rng.standard_normal(300_000).astype(np.float32)
    assert_identical(fastloss.mse_loss(x, t, num_threads=value), fastloss.mse_loss(x, t, num_threads=1),
                     what=f"num_threads={value!r}")


def test_set_num_threads_sets_get_num_threads(threads_restored):
    omp_default = fastloss.get_num_threads()
    assert omp_default >= 1
    fastloss.set_num_threads(3)
    assert fastloss.get_num_threads() == 3
    assert fastloss.config()["default_threads"] == 3
    fastloss.set_num_threads(np.int64(1))
    assert fastloss.get_num_threads() == 1
    fastloss.set_num_threads(-1)
    assert fastloss.get_num_threads() == fastloss.config()["cores"] >= 1
    fastloss.set_num_threads(None)
    assert fastloss.get_num_threads() == omp_default


@pytest.mark.parametrize("value,exc", BAD_THREADS)
def test_set_num_threads_rejects_bad_values(value, exc, threads_restored):
    fastloss.set_num_threads(2)
    with pytest.raises(exc, match=r"^n\b"):       # the parameter of set_num_threads is `n`
        fastloss.set_num_threads(value)
    assert fastloss.get_num_threads() == 2      # unchanged


def test_threadpoolctl_limits_change_get_num_threads(threads_restored):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    fastloss.set_num_threads(None)
    before = fastloss.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1):
        assert fastloss.get_num_threads() == 1
        assert fastloss.config()["default_threads"] == 1
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert fastloss.get_num_threads() == 1
        fastloss.set_num_threads(2)                 # an explicit package setting takes precedence
        assert fastloss.get_num_threads() == 2
        fastloss.set_num_threads(None)
    assert fastloss.get_num_threads() == before


@pytest.mark.skipif(not _core.have_openmp(), reason="built without OpenMP: always 1 thread")
@pytest.mark.parametrize("omp", ["1", "3"])
def test_omp_num_threads_sets_the_default(omp, tmp_path):
    code = "import fastloss; print(fastloss.get_num_threads(), fastloss.config()['default_threads'])"
    r = run_python(["-c", code], cwd=tmp_path, env_extra={"OMP_NUM_THREADS": omp})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [omp, omp]


def test_concurrent_python_threads(rng):
    """The kernels release the GIL and share no state: concurrent callers get the serial results."""
    data = [(rng.standard_normal(200_000).astype(np.float32), rng.standard_normal(200_000).astype(np.float32))
            for _ in range(4)]

    def work(i):
        x, t = data[i % 4]
        return fastloss.huber_loss_with_grad(x, t, delta=0.5, num_threads=1 + i % 2)

    serial = [work(i) for i in range(16)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(work, range(16)))
    for i, ((l1, g1), (l2, g2)) in enumerate(zip(serial, parallel)):
        assert_identical(l2, l1, what=f"call {i}: loss")
        assert_identical(g2, g1, what=f"call {i}: grad")


# ---- the read kernel (bandwidth probe) ------------------------------------------------------

def test_read_sum_f32_value(rng):
    x = rng.standard_normal(1_000_003).astype(np.float32)
    exact = math.fsum(x.astype(np.float64).tolist())
    got = _core.read_sum_f32(x, 2)
    # float32 partial sums over blocks of FL_BLOCK elements: error <= BLOCK * eps32 * sum|x|
    bound = _core.BLOCK * np.finfo(np.float32).eps * float(np.sum(np.abs(x), dtype=np.float64))
    assert abs(got - exact) <= bound
    with pytest.raises(TypeError):
        _core.read_sum_f32(x.astype(np.float64), 1)
    with pytest.raises(TypeError):
        _core.read_sum_f32(x[::2], 1)


def test_read_sum_f32_identical_across_thread_counts():
    """Block partials combined in block order give the same bits for every thread count.
    Block sums 2**60, 1, -2**60, 1: the order of the double additions decides the result."""
    x = np.zeros(4 * _core.BLOCK, np.float32)
    x[0 * _core.BLOCK], x[1 * _core.BLOCK], x[2 * _core.BLOCK], x[3 * _core.BLOCK] = 2.0**60, 1.0, -2.0**60, 1.0
    results = {n: _core.read_sum_f32(x, n) for n in (1, 2, 3, 4)}
    assert len(set(results.values())) == 1, f"read_sum_f32 by thread count: {results}"


def test_subprocess_helper_imports_the_same_build(tmp_path):
    """run_python (used by the environment-variable tests) imports the build under test."""
    r = run_python(["-c", "import fastloss; print(fastloss.__file__)"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == fastloss.__file__, textwrap.shorten(r.stdout + r.stderr, 500)
