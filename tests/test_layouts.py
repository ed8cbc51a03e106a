"""Memory layouts: strided, non-contiguous, negative-stride, Fortran, zero-stride, read-only,
memmap, byte-swapped and unaligned operands, and "weird" shapes."""
from __future__ import annotations

import numpy as np
import pytest

from fastloss._registry import REGISTRY, TOLERANCES
from fl_testing import REGRESSION, assert_close, grad_rtol, loss_cases, loss_kwargs

SHAPE = (23, 41)


def _layout(a: np.ndarray, layout: str, tmp_path) -> np.ndarray:
    """`a`'s values in the given memory layout."""
    if layout == "C":
        return np.ascontiguousarray(a)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "strided":                 # every 3rd column of a wider array, every 2nd row
        big = np.zeros((2 * a.shape[0], 3 * a.shape[1]), a.dtype)
        v = big[::2, 1::3]
        v[...] = a
        return v
    if layout == "negative":                # both strides negative
        return np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1]
    if layout == "transposed":              # a C array of the transpose, viewed back
        return np.ascontiguousarray(a.T).T
    if layout == "read-only":
        r = a.copy()
        r.flags.writeable = False
        return r
    if layout == "memmap-r":                # np.load(mmap_mode="r"): a read-only memmap
        path = tmp_path / f"{id(a)}.npy"
        np.save(path, a)
        return np.load(path, mmap_mode="r")
    if layout == "memmap-strided":          # a strided view of a writeable memmap
        mm = np.memmap(tmp_path / f"{id(a)}.bin", dtype=a.dtype, mode="w+", shape=(a.shape[0], 2 * a.shape[1]))
        v = mm[:, ::2]
        v[...] = a
        return v
    if layout == "byteswapped":
        return a.astype(a.dtype.newbyteorder())
    if layout == "unaligned":
        buf = np.zeros(a.size * a.itemsize + 1, np.uint8)
        u = buf[1:].view(a.dtype).reshape(a.shape)
        u[...] = a
        assert not u.flags.aligned
        return u
    raise ValueError(layout)


LAYOUTS = ["C", "F", "strided", "negative", "transposed", "read-only", "memmap-r", "memmap-strided", "unaligned"]


@pytest.mark.parametrize("dtype_name", ["float32", "float64", "float16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,variant,reduction", loss_cases(variants=False))
def test_layouts(name, variant, reduction, layout, dtype_name, rng, tmp_path):
    """Every operand (input, target, weight) in `layout` gives the reference values."""
    spec = REGISTRY[name]
    dt = np.dtype(dtype_name)
    x0 = rng.standard_normal(SHAPE).astype(dt)
    t0 = rng.standard_normal(SHAPE).astype(dt)
    w0 = rng.uniform(0.5, 2.0, SHAPE).astype(dt)
    x, t, w = (_layout(a, layout, tmp_path) for a in (x0, t0, w0))
    before = [np.array(a, copy=True) for a in (x, t, w)]
    tol = TOLERANCES[dtype_name]
    for axis in ((None, 0, 1) if reduction != "none" else (None,)):
        for weight, weight0 in ((None, None), (w, w0)):
            kw = loss_kwargs(spec, reduction, variant, axis=axis)
            what = f"{name} {reduction} {dtype_name} {layout} axis={axis} weighted={weight is not None}"
            exp = spec.reference(x0, t0, weight=weight0, **kw)
            rtol = tol["loss"] if reduction != "none" else tol["elem"]
            assert_close(spec.func(x, t, weight=weight, **kw), exp, rtol=rtol, what=f"{what}: loss")
            loss, grad = spec.with_grad(x, t, weight=weight, **kw)
            assert_close(loss, exp, rtol=rtol, what=f"{what}: loss of _with_grad")
            assert grad.shape == SHAPE and grad.dtype.name == dt.name and grad.dtype.isnative
            assert_close(grad, spec.reference_grad(x0, t0, weight=weight0, **kw),
                         rtol=grad_rtol(spec, dtype_name, reduction, weight is not None),
                         atol=tol["grad_atol"], what=f"{what}: grad")
    for a, b in zip((x, t, w), before):     # operands are never written
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype_name", ["float16", "float32", "float64"])
def test_non_native_byte_order(dtype_name, rng, tmp_path):
    """Documented in fastloss/_validation.py: non-native byte order is copied to native, i.e.
    accepted (e.g. big-endian data read from a file), for input, target and weight."""
    dt = np.dtype(dtype_name)
    x0, t0 = rng.standard_normal(SHAPE).astype(dt), rng.standard_normal(SHAPE).astype(dt)
    w0 = rng.uniform(0.5, 2.0, SHAPE).astype(dt)
    swapped = [_layout(a, "byteswapped", tmp_path) for a in (x0, t0, w0)]
    assert not swapped[0].dtype.isnative
    tol = TOLERANCES[dtype_name]
    for name, spec in REGRESSION.items():
        for operand in range(3):                       # one operand byte-swapped at a time, then all
            args = [x0, t0, w0]
            args[operand] = swapped[operand]
            for x, t, w in (args, swapped):
                kw = loss_kwargs(spec, "mean", weight=w)
                loss, grad = spec.with_grad(x, t, **kw)
                assert_close(loss, spec.reference(x0, t0, weight=w0), rtol=tol["loss"], what=f"{name} loss")
                assert grad.dtype == dt and grad.dtype.isnative
                assert_close(grad, spec.reference_grad(x0, t0, weight=w0), rtol=grad_rtol(spec, dtype_name, "mean", True),
                             atol=tol["grad_atol"], what=f"{name} grad")


def test_memmap_as_grad_out_in_place(rng, tmp_path):
    """A writeable memmap can receive its own gradient (grad_out=input)."""
    x0 = rng.standard_normal(10_000).astype(np.float32)
    t = rng.standard_normal(10_000).astype(np.float32)
    mm = np.memmap(tmp_path / "x.bin", dtype=np.float32, mode="w+", shape=x0.shape)
    mm[:] = x0
    expected = REGISTRY["huber_loss"].reference_grad(x0, t, delta=0.5)
    loss, grad = REGISTRY["huber_loss"].with_grad(mm, t, delta=0.5, grad_out=mm)
    assert grad is mm
    mm.flush()
    on_disk = np.fromfile(tmp_path / "x.bin", dtype=np.float32)
    assert_close(on_disk, expected, rtol=TOLERANCES["float32"]["grad"], what="gradient written to the memmap")


def test_zero_stride_input(rng):
    """A broadcast (zero-stride, read-only) input is read in place; its gradient is a new array."""
    row = rng.standard_normal(50)
    x = np.broadcast_to(row, (7, 50))
    t = rng.standard_normal((7, 50))
    for name, spec in REGRESSION.items():
        kw = loss_kwargs(spec, "mean")
        loss, grad = spec.with_grad(x, t, **kw)
        assert grad.shape == (7, 50) and grad.flags.writeable
        full = np.array(x)
        assert_close(loss, spec.reference(full, t, **kw), rtol=1e-12, what=name)
        assert_close(grad, spec.reference_grad(full, t, **kw), rtol=1e-12, what=f"{name} grad")


WEIRD = [((9, 7, 41), -1), ((3, 423, 320), -1), ((3, 423, 320), (0, 2)), ((2,) * 12, (1, 5, 11)),
         ((1, 4097, 1), 1), ((8193, 2), 0), ((2, 8193), 1), ((5, 16385), None)]


@pytest.mark.parametrize("shape,axis", WEIRD, ids=[f"{s}-axis={a}" for s, a in WEIRD])
def test_weird_shapes(shape, axis, rng):
    """Odd sizes across the block boundary (8192), many dimensions, size-1 dimensions."""
    x = rng.standard_normal(shape).astype(np.float32)
    t = rng.standard_normal(shape).astype(np.float32)
    w = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    for name, spec in REGRESSION.items():
        kw = loss_kwargs(spec, "mean", axis=axis, weight=w)
        loss, grad = spec.with_grad(x, t, **kw)
        assert_close(loss, spec.reference(x, t, **kw), rtol=TOLERANCES["float32"]["loss"], what=f"{name} {shape}")
        assert_close(grad, spec.reference_grad(x, t, **kw), rtol=grad_rtol(spec, "float32", "mean", True),
                     atol=TOLERANCES["float32"]["grad_atol"], what=f"{name} {shape} grad")


@pytest.mark.slow
def test_large_vocabulary_shape(rng):
    """(3, 423, 32000) float32, one loss per row (axis=-1), with a non-contiguous input view."""
    shape = (3, 423, 32000)
    base = rng.standard_normal((3, 423, 32001), dtype=np.float32)
    x = base[:, :, 1:]                                    # rows that start one element in
    t = rng.standard_normal(shape, dtype=np.float32)
    for name in ("mse_loss", "huber_loss"):
        spec = REGISTRY[name]
        loss, grad = spec.with_grad(x, t, axis=-1)
        assert loss.shape == (3, 423)
        assert_close(loss, spec.reference(x, t, axis=-1), rtol=TOLERANCES["float32"]["loss"], what=name)
        assert_close(grad, spec.reference_grad(x, t, axis=-1), rtol=TOLERANCES["float32"]["grad"],
                     atol=TOLERANCES["float32"]["grad_atol"], what=f"{name} grad")
