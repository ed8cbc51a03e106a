"""Argument checking shared by every public function.

Errors are raised before any work starts, with a message that names the argument.
Rules (documented in the README, "Errors and special values"):
  * arrays: NumPy arrays (memmaps included), objects exposing ``__dlpack__`` (PyTorch CPU
    tensors, JAX CPU arrays, PyArrow arrays; bfloat16 PyTorch tensors too), PyArrow chunked
    arrays (one chunk: its buffer; several: concatenated, a copy), and anything
    ``np.asarray`` accepts (lists, scalars, objects with ``__array__``,
    ``__array_interface__`` or the buffer protocol), all without a copy where the memory
    layout allows (:func:`as_array`); ``None``, ``str``, ``dict`` and other non-numeric
    objects -> TypeError.  Python lists/scalars of ints are taken
    as float64; integer, bool, complex or object *arrays* -> TypeError.
  * floating dtypes: float16, float32, float64, and bfloat16 (``ml_dtypes``).
  * non-native byte order and unaligned data are copied (the kernels need native,
    aligned elements); every other layout (strides, read-only, memmap) is used
    in place.
"""
from __future__ import annotations

import numpy as np

REDUCTIONS = ("mean", "sum", "none")
_PLAIN_FLOATS = (np.float16, np.float32, np.float64)


def _is_bfloat16(dt: np.dtype) -> bool:
    return dt.name == "bfloat16" and dt.itemsize == 2


def is_supported_float(dt: np.dtype) -> bool:
    """float16/32/64 (either byte order) or bfloat16."""
    return dt.newbyteorder("=") in (np.float16, np.float32, np.float64) or _is_bfloat16(dt)


def is_python_scalar(x) -> bool:
    """A Python int or float: a "weak" scalar in NumPy 2's promotion rules (it takes the
    dtype of the array it is combined with)."""
    return type(x) in (int, float)


_DLPACK_ERRORS = (BufferError, TypeError, ValueError, RuntimeError, NotImplementedError, AttributeError)


def _from_torch(x, name: str) -> np.ndarray:
    """A NumPy view of a CPU torch.Tensor (any strides; bfloat16 as ml_dtypes.bfloat16)."""
    import torch

    if x.device.type != "cpu":
        raise TypeError(f"{name} is a torch.Tensor on device {x.device}; fastloss computes on the CPU: "
                        f"pass {name}.cpu() (or use fastloss.torch, which falls back to torch there)")
    if x.requires_grad:
        raise TypeError(f"{name} is a torch.Tensor that requires grad; pass {name}.detach() (no gradient flows "
                        "through fastloss's NumPy API), or use fastloss.torch for autograd")
    if x.dtype == torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError(f"{name} is a bfloat16 torch.Tensor: install ml_dtypes to pass it to fastloss") from None
        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)     # the same memory, reinterpreted
    if x.is_conj() or x.is_neg():
        x = x.resolve_conj().resolve_neg()
    return x.numpy()


def as_array(x, name: str) -> np.ndarray:
    """`x` as an ndarray, sharing its memory wherever the layout allows.

    NumPy arrays (and subclasses such as ``np.memmap``) are returned as they are.  A CPU
    ``torch.Tensor`` becomes a view of its storage (any strides, bfloat16 included);
    ``requires_grad`` or a non-CPU device is a TypeError that says what to do.  A PyArrow
    ``ChunkedArray`` with one chunk is that chunk's buffer (several chunks are concatenated,
    a copy).  Other objects with ``__dlpack__`` (JAX, PyArrow arrays, CuPy on the CPU, ...)
    go through ``np.from_dlpack`` (zero-copy); when DLPack refuses them (a device or dtype
    NumPy does not know, nulls in a PyArrow array) ``np.asarray`` is tried, which also
    covers ``__array__``, ``__array_interface__`` and the buffer protocol.
    """
    if isinstance(x, np.ndarray):
        return x
    if x is None or isinstance(x, (str, bytes, dict, set)):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    mod = type(x).__module__ or ""
    if mod.startswith("torch") and type(x).__name__ in ("Tensor", "Parameter"):
        return _from_torch(x, name)
    if mod.startswith("pyarrow"):
        if type(x).__name__ == "ChunkedArray":
            if x.num_chunks != 1:
                return x.to_numpy()                 # the chunks concatenated: a copy
            x = x.chunk(0)
        if hasattr(x, "to_numpy") and hasattr(x, "null_count"):      # a pyarrow.Array
            try:    # zero-copy: a primitive array without nulls
                return x.to_numpy(zero_copy_only=True)
            except (ValueError, TypeError, NotImplementedError):
                # nulls become NaN (floats) or objects (integers: then a dtype error names the argument)
                return x.to_numpy(zero_copy_only=False)
    if hasattr(x, "__dlpack__") and not isinstance(x, (list, tuple)):
        try:
            return np.from_dlpack(x)
        except _DLPACK_ERRORS:
            pass
    try:
        return np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} could not be converted to an array: {exc}") from None


def as_float_array(x, name: str) -> np.ndarray:
    """`x` as an ndarray of a supported float dtype, without copying when possible."""
    if isinstance(x, np.ndarray):
        a = x
    else:
        if x is None or isinstance(x, (str, bytes, dict, set)):
            raise TypeError(f"{name} must be an array of floats, got {type(x).__name__}")
        a = as_array(x, name)
        if a.dtype.kind in "iub" and isinstance(x, (list, tuple, int, float, np.number, np.bool_)):
            a = a.astype(np.float64)
    dt = a.dtype
    if dt.type in _PLAIN_FLOATS and dt.isnative and a.flags.aligned:     # the common case, quickly
        return a
    if not is_supported_float(dt):
        if dt.kind == "f":
            # e.g. float128 (longdouble): no kernel
            raise TypeError(f"{name} has dtype {dt}; supported: float16, float32, float64, bfloat16")
        raise TypeError(
            f"{name} must be a floating-point array (float16, float32, float64 or bfloat16), got dtype {dt}")
    if not dt.isnative:
        a = a.astype(dt.newbyteorder("="))
    if not a.flags.aligned:
        a = a.copy()
    return a


def result_float_dtype(*dtypes: np.dtype) -> np.dtype:
    """Common compute dtype of several float arrays (NumPy promotion; bfloat16 joins as float32)."""
    uniq = {np.dtype(d) for d in dtypes}
    if len(uniq) == 1:
        return uniq.pop()
    plain = [np.dtype(np.float32) if _is_bfloat16(d) else d for d in uniq]
    return np.result_type(*plain)


def check_reduction(reduction) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none'; got {reduction!r}")
    return reduction


def normalize_axis(axis, ndim: int) -> tuple[int, ...]:
    """`axis` (None, int or tuple of ints) as a sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if not isinstance(axis, (tuple, list)) else tuple(axis)
    out = []
    for ax in axes:
        if isinstance(ax, bool) or not isinstance(ax, (int, np.integer)):
            raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}")
        if not -ndim <= ax < ndim:
            raise np.exceptions.AxisError(int(ax), ndim, "axis")
        out.append(int(ax) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis contains a repeated axis: {axis!r}")
    return tuple(sorted(out))


def broadcast_operand(a: np.ndarray, shape: tuple, name: str, to_name: str = "input") -> np.ndarray:
    """A read-only broadcast view of `a` with `shape` (no copy), or ValueError naming `name`."""
    if a.shape == shape:
        return a
    try:
        return np.broadcast_to(a, shape)
    except ValueError:
        raise ValueError(
            f"{name} of shape {a.shape} cannot be broadcast to the shape of {to_name} {shape}") from None


def check_positive(value, name: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    ok = v >= 0 if allow_zero else v > 0
    if not ok or not np.isfinite(v):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def check_grad_out(grad_out, shape: tuple, dtype: np.dtype, inputs: dict, *, name: str = "grad_out",
                   inplace_name: str = "input") -> np.ndarray:
    """Validate a caller-supplied gradient buffer; returns it as an ndarray.

    It must be a writeable ndarray (or an object exposing ``__dlpack__``, e.g. a CPU
    torch.Tensor, taken as a view of its memory) of exactly `shape` and `dtype`.  It may be the
    input array itself (same memory, same strides: in-place gradient) but must not
    otherwise overlap any input.
    """
    if not isinstance(grad_out, np.ndarray):
        mod = type(grad_out).__module__ or ""
        if not (hasattr(grad_out, "__dlpack__") or mod.startswith("torch")):
            raise TypeError(f"{name} must be a numpy.ndarray (or a writeable array exposing __dlpack__, "
                            f"e.g. a CPU torch.Tensor), got {type(grad_out).__name__}")
        grad_out = as_array(grad_out, name)         # a view of its memory (written in place)
    if grad_out.shape != shape:
        raise ValueError(f"{name} has shape {grad_out.shape}, expected {shape}")
    if grad_out.dtype != dtype:
        raise TypeError(f"{name} has dtype {grad_out.dtype}, expected {dtype}")
    if not grad_out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if not grad_out.flags.aligned or not grad_out.dtype.isnative:
        raise ValueError(f"{name} must be aligned and in native byte order")
    if any(st == 0 and n > 1 for st, n in zip(grad_out.strides, grad_out.shape)):
        # a writeable zero-stride view (as_strided): several elements of the result would be one
        # memory location, written by several threads at once
        raise ValueError(f"{name} overlaps itself (a zero stride); pass an array whose elements are distinct")
    for arg, arr in inputs.items():
        if arr is None:
            continue
        same = (arr.__array_interface__["data"][0] == grad_out.__array_interface__["data"][0]
                and arr.strides == grad_out.strides and arr.shape == grad_out.shape
                and arr.dtype == grad_out.dtype)
        if same and arg == inplace_name:       # the operand itself, or a view of exactly its elements
            continue
        try:
            overlap = np.shares_memory(arr, grad_out, max_work=10_000)
        except np.exceptions.TooHardError:
            overlap = True
        if overlap:
            raise ValueError(f"{name} overlaps {arg}; only {name}={inplace_name} (in place) is allowed")
    return grad_out
