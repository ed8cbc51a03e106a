"""Inputs from the ecosystem (issue 7, part 2): every public function takes NumPy arrays and any
object exposing ``__dlpack__``, the buffer protocol, ``__array__`` or ``__array_interface__`` --
PyTorch CPU tensors (bfloat16 included), PyArrow arrays and chunked arrays, JAX CPU arrays,
memmaps -- without a copy where the memory layout allows.

The oracle of each call is the same call on plain NumPy arrays: the results must be bitwise
equal (the same memory is read).  Zero-copy is checked on ``_validation.as_array`` (the one
conversion every public function goes through) by comparing data pointers.  Tests of a
library that is not installed are skipped (CI installs torch, pyarrow and JAX).
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import fastloss
from fastloss._registry import REGISTRY
from fastloss._validation import as_array
from fl_testing import get_dtype


def _ptr(a) -> int:
    return a.__array_interface__["data"][0]


def _rng(*key):
    return np.random.default_rng(zlib.crc32("/".join(map(str, key)).encode()))


def _shape(spec):
    return spec.test_shapes[0] if spec.test_shapes else (6, 5)


def _inputs(spec, dtype="float32"):
    return spec.make_inputs(_rng(spec.name, dtype), _shape(spec), get_dtype(dtype))


def _call(spec, ins, convert, with_grad=False):
    """`spec`'s function on `ins` with every array operand passed through `convert`."""
    pos = [convert(ins[o.name]) for o in spec.operands if o.required]
    kw = {o.name: convert(ins[o.name]) for o in spec.operands if not o.required and o.name in ins}
    if with_grad:
        grad_pos = [convert(ins[o.name]) for o in spec.grad_operands]
        return spec.with_grad(*pos, *grad_pos, **kw)
    return spec.func(*pos, **kw)


def _assert_same(got, exp, what):
    got = got if isinstance(got, tuple) else (got,)
    exp = exp if isinstance(exp, tuple) else (exp,)
    assert len(got) == len(exp), what
    for g, e in zip(got, exp):
        if e is None:
            assert g is None, what
            continue
        assert isinstance(g, (np.ndarray, np.generic)), f"{what}: returned {type(g).__name__}, not NumPy"
        assert g.dtype == e.dtype and g.shape == e.shape, what
        assert np.array_equal(np.asarray(g), np.asarray(e), equal_nan=True), what


# ---- wrappers that expose one protocol each ----------------------------------------------------

class ArrayOnly:
    """Only ``__array__`` (like many array-likes: xarray, pandas)."""

    def __init__(self, a):
        self._a = a

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)


class InterfaceOnly:
    """Only ``__array_interface__`` (no methods)."""

    def __init__(self, a):
        self._keep = a
        self.__array_interface__ = a.__array_interface__


class DLPackOnly:
    """Only ``__dlpack__`` / ``__dlpack_device__`` (an array library NumPy does not know)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


GENERIC = {"array_only": ArrayOnly, "interface_only": InterfaceOnly, "dlpack_only": DLPackOnly}


def _wrap_all(wrapper):
    return lambda a: wrapper(a) if isinstance(a, np.ndarray) else a


LOSSES = sorted(REGISTRY)


@pytest.mark.parametrize("kind", sorted(GENERIC))
@pytest.mark.parametrize("name", LOSSES)
def test_generic_protocols_every_loss(name, kind):
    spec = REGISTRY[name]
    ins = _inputs(spec)
    conv = _wrap_all(GENERIC[kind])
    _assert_same(_call(spec, ins, conv), _call(spec, ins, lambda a: a), f"{name} via {kind}")
    if spec.with_grad is not None:
        _assert_same(_call(spec, ins, conv, True), _call(spec, ins, lambda a: a, True), f"{name}_with_grad via {kind}")


@pytest.mark.parametrize("kind", sorted(GENERIC))
def test_generic_protocols_share_memory(kind):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)[:, 1:]
    got = as_array(GENERIC[kind](a), "x")
    assert _ptr(got) == _ptr(a) and got.strides == a.strides


def test_buffer_protocol_and_memmap(tmp_path):
    import array
    buf = array.array("f", [1.0, 2.0, 4.0])
    got = as_array(buf, "x")
    assert got.dtype == np.float32 and _ptr(got) == buf.buffer_info()[0]
    assert fastloss.mse_loss(buf, memoryview(np.zeros(3, np.float32))) == np.float32(7.0)
    path = tmp_path / "x.npy"
    np.save(path, np.arange(10, dtype=np.float32))
    mm = np.load(path, mmap_mode="r")
    assert as_array(mm, "x") is mm
    assert fastloss.l1_loss(mm, np.zeros(10, np.float32), reduction="sum") == np.float32(45.0)


# ---- PyTorch -----------------------------------------------------------------------------------

def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("name", LOSSES)
def test_torch_tensors_every_loss(name):
    torch = _torch()
    spec = REGISTRY[name]
    ins = _inputs(spec)
    conv = lambda a: torch.from_numpy(a) if isinstance(a, np.ndarray) else a   # noqa: E731
    _assert_same(_call(spec, ins, conv), _call(spec, ins, lambda a: a), name)
    if spec.with_grad is not None:
        _assert_same(_call(spec, ins, conv, True), _call(spec, ins, lambda a: a, True), name + "_with_grad")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
def test_torch_zero_copy_any_dtype_and_strides(dtype):
    torch = _torch()
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    t = torch.randn(5, 9).to(getattr(torch, dtype))[1:, ::2]       # strided view
    got = as_array(t, "x")
    assert _ptr(got) == t.data_ptr()
    assert got.shape == tuple(t.shape)
    assert got.strides == tuple(s * t.element_size() for s in t.stride())
    assert got.dtype.name == dtype
    assert np.array_equal(got.astype(np.float64), t.double().numpy())


def test_torch_bfloat16_losses_match_numpy_bfloat16():
    torch = _torch()
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = torch.randn(8, 50).bfloat16()
    t = torch.randint(0, 50, (8,))
    xn = x.float().numpy().astype(ml_dtypes.bfloat16)
    assert fastloss.cross_entropy(x, t) == fastloss.cross_entropy(xn, t.numpy())
    loss, g = fastloss.cross_entropy_with_grad(x, t)
    loss_n, g_n = fastloss.cross_entropy_with_grad(xn, t.numpy())
    assert loss == loss_n and g.dtype == g_n.dtype and np.array_equal(g.view(np.uint16), g_n.view(np.uint16))
    y = torch.randn(100).bfloat16()
    assert fastloss.mse_loss(y, y * 0) == fastloss.mse_loss(y.float().numpy().astype(ml_dtypes.bfloat16),
                                                            np.zeros(100, ml_dtypes.bfloat16))


def test_torch_grad_out_tensor_is_written_in_place():
    torch = _torch()
    x = torch.randn(4, 7)
    t = torch.tensor([0, 6, 3, 1])
    g = torch.empty(4, 7)
    loss, grad = fastloss.cross_entropy_with_grad(x, t, grad_out=g)
    exp_loss, exp_grad = fastloss.cross_entropy_with_grad(x.numpy(), t.numpy())
    assert loss == exp_loss and _ptr(grad) == g.data_ptr()
    assert np.array_equal(g.numpy(), exp_grad)
    xi = x.clone()
    fastloss.cross_entropy_with_grad(xi, t, grad_out=xi)                 # in place over the logits
    assert np.array_equal(xi.numpy(), exp_grad)
    y = torch.randn(10)
    gy = torch.empty(10)
    fastloss.mse_loss_with_grad(y, torch.zeros(10), grad_out=gy)
    assert np.array_equal(gy.numpy(), fastloss.mse_loss_with_grad(y.numpy(), np.zeros(10, np.float32))[1])


def test_torch_errors_say_what_to_do():
    torch = _torch()
    with pytest.raises(TypeError, match=r"requires grad.*detach\(\)"):
        fastloss.mse_loss(torch.ones(3, requires_grad=True), torch.ones(3))
    with pytest.raises(TypeError, match="device meta"):
        fastloss.mse_loss(torch.ones(3, device="meta"), np.ones(3))
    with pytest.raises(TypeError, match="integer|floating"):
        fastloss.mse_loss(torch.ones(3, dtype=torch.int32), np.ones(3))
    with pytest.raises(TypeError, match="target"):
        fastloss.cross_entropy(torch.zeros(2, 3), torch.ones(2, requires_grad=True))


def test_torch_input_never_written():
    torch = _torch()
    x = torch.randn(6, 11)
    before = x.clone()
    fastloss.cross_entropy_with_grad(x, torch.arange(6) % 11)
    fastloss.log_softmax(x)
    assert torch.equal(x, before)


# ---- PyArrow -----------------------------------------------------------------------------------

def test_pyarrow_arrays_zero_copy_and_results():
    pa = pytest.importorskip("pyarrow")
    x = np.linspace(-2, 2, 11, dtype=np.float32)
    y = np.cos(x).astype(np.float32)
    px, py = pa.array(x), pa.array(y)
    got = as_array(px, "x")
    assert _ptr(got) == px.buffers()[1].address
    for f in (fastloss.mse_loss, fastloss.l1_loss, fastloss.huber_loss, fastloss.smooth_l1_loss):
        assert f(px, py) == f(x, y)
    one = pa.chunked_array([px])
    assert _ptr(as_array(one, "x")) == px.buffers()[1].address           # one chunk: its buffer
    two = pa.chunked_array([px[:5], px[5:]])                              # several: concatenated
    assert np.array_equal(as_array(two, "x"), x)
    assert fastloss.mse_loss(two, pa.chunked_array([py])) == fastloss.mse_loss(x, y)
    logits = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    t = np.array([0, 5, 2, 3])
    assert fastloss.cross_entropy(logits, pa.array(t)) == fastloss.cross_entropy(logits, t)
    assert fastloss.nll_loss(logits, pa.chunked_array([pa.array(t[:2]), pa.array(t[2:])])) == \
        fastloss.nll_loss(logits, t)


def test_pyarrow_nulls():
    pa = pytest.importorskip("pyarrow")
    # a null float is NaN (so the loss is NaN, as documented for NaN input); a null class index
    # cannot be an index: the target is rejected with a message that names it
    assert np.isnan(fastloss.mse_loss(pa.array([1.0, None, 3.0]), np.zeros(3)))
    with pytest.raises(TypeError, match="target"):
        fastloss.cross_entropy(np.zeros((2, 3)), pa.array([1, None]))
    with pytest.raises(TypeError, match="input"):
        fastloss.mse_loss(pa.array(["a", "b"]), np.zeros(2))


# ---- JAX ---------------------------------------------------------------------------------------

def test_jax_arrays():
    jnp = pytest.importorskip("jax.numpy")
    x = np.random.default_rng(1).standard_normal((5, 7)).astype(np.float32)
    t = np.array([0, 1, 6, 3, 2])
    jx, jt = jnp.asarray(x), jnp.asarray(t)
    got = as_array(jx, "x")
    assert _ptr(got) == jx.unsafe_buffer_pointer()                       # DLPack: no copy
    assert fastloss.cross_entropy(jx, jt) == fastloss.cross_entropy(x, t.astype(np.int32))
    loss, g = fastloss.cross_entropy_with_grad(jx, jt)
    assert np.array_equal(g, fastloss.cross_entropy_with_grad(x, t)[1])
    assert fastloss.mse_loss(jx, jnp.zeros_like(jx)) == fastloss.mse_loss(x, np.zeros_like(x))
    # bfloat16 (NumPy's DLPack does not know it; JAX's __array__ gives ml_dtypes.bfloat16)
    jb = jnp.asarray(x, dtype=jnp.bfloat16)
    assert as_array(jb, "x").dtype.name == "bfloat16"
    assert fastloss.cross_entropy(jb, jt) == fastloss.cross_entropy(np.asarray(jb), t)
    # a JAX array is immutable: as grad_out it is refused, not silently copied
    with pytest.raises(ValueError, match="read-only"):
        fastloss.mse_loss_with_grad(jx, jx, grad_out=jnp.zeros_like(jx))


def test_linear_cross_entropy_takes_tensors_and_arrow():
    torch = _torch()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 6)).astype(np.float32)
    w = rng.standard_normal((11, 6)).astype(np.float32)
    b = rng.standard_normal(11).astype(np.float32)
    t = rng.integers(0, 11, 9)
    exp = fastloss.linear_cross_entropy_with_grad(x, w, t, linear_bias=b, num_threads=1)
    got = fastloss.linear_cross_entropy_with_grad(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(t),
                                                  linear_bias=ArrayOnly(b), num_threads=1)
    _assert_same(got, exp, "linear_cross_entropy_with_grad via torch")
