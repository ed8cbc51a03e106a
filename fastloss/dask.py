"""Losses over Dask arrays: each chunk runs the C kernel, chunk states merge in a tree.

``fastloss.dask.<loss>(input, target, ...)`` takes Dask arrays (NumPy arrays are wrapped
with :func:`dask.array.asarray`) and returns a *lazy* result: a 0-d Dask array for
``reduction="mean"``/``"sum"`` (``.compute()`` gives the same NumPy scalar as the NumPy
function), a Dask array for ``reduction="none"``.  It runs on every Dask scheduler: the local
threaded and synchronous ones and ``dask.distributed`` clusters (see docs/dask.md).

Design:

1. Operands are aligned to the chunks of the first operand (``input``/``logits``): ``target``,
   ``weight``, ``sample_weight``, ... are broadcast to the shape they pair with and rechunked
   to its chunks (cheap: chunk boundaries only move, each block keeps its size).  The class
   axis of the row losses (cross_entropy, nll_loss, ...) must be ONE chunk: a row is one
   softmax, and silently concatenating class chunks would multiply the memory of every task,
   so a chunked class axis raises ValueError (rechunk it yourself: ``x.rechunk({-1: -1})``).
2. Per block: ``fastloss.metrics.accumulator(loss, **options).update(block_input,
   block_target, **block_operands)`` -> an accumulator holding float64 (compensated) sums.
3. The states merge in a tree of fan-in ``split_every`` (``Accumulator.merge``); the root's
   ``result()`` is the loss.  The tree has ceil(log_split_every(#blocks)) levels, each task a
   few hundred bytes, so the reduction costs nothing next to the kernels.
4. ``reduction="none"``: ``blockwise`` of the NumPy function with ``reduction="none"``
   (elementwise losses: the input's shape and chunks; row losses: the rows' shape).

Options are checked and the result dtype found before any graph is built, by calling the
NumPy function on zero-size arrays of the operands' dtypes (so bad options and dtypes raise
the NumPy function's own TypeError/ValueError at once); data-dependent errors (a class index
out of range) are raised by ``.compute()``.

Threads: with ``num_threads=None`` each task runs the kernel on ONE thread: the Dask scheduler
already runs one task per core (threaded scheduler) or per worker thread (distributed), and
nesting OpenMP threads inside would oversubscribe the cores.  Pass ``num_threads=k`` to give
each task k kernel threads (e.g. the synchronous scheduler, or distributed workers started
with one thread on a many-core node).  The result is bitwise identical for every thread count
and every scheduler, for a given chunking; different chunkings agree within 2 ulp.
"""
from __future__ import annotations

import copy
import inspect
import math
import numbers
from typing import NamedTuple

import numpy as np

try:
    import dask
    import dask.array as da
    try:                                            # public since dask 2025.1
        from dask.task_spec import Task, TaskRef
    except ImportError:                             # 2024.12 (the extra's floor)
        from dask._task_spec import Task, TaskRef
    from dask.highlevelgraph import HighLevelGraph
except ImportError as _exc:  # pragma: no cover - exercised only without dask
    raise ImportError(
        "fastloss.dask needs Dask: install the 'dask' extra (pip install 'fastloss[dask]'), "
        "or dask[array] (and distributed for clusters) directly") from _exc

import fastloss

__all__ = [
    "mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss", "rmse",
    "cross_entropy", "nll_loss", "perplexity",
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "sigmoid_focal_loss", "hinge_loss", "kl_div",
    "multi_margin_loss", "triplet_margin_loss", "kl_div_logits",
]

_DEFAULT_SPLIT_EVERY = 8
_KERNEL_THREADS_IN_TASK = 1


def _metrics():
    """fastloss.metrics, imported when a graph is built or run (not at import: a worker
    unpickling a task imports this module first)."""
    from fastloss import metrics
    return metrics


# ---- the table of losses -------------------------------------------------------------------------

class _Spec(NamedTuple):
    """How a loss's operands pair with its first operand.

    kind: "elementwise" (every operand broadcast to the input's shape and chunks) or "rows"
    (classes/features on the last axis, one chunk; per-row operands have the rows' shape).
    roles: operand name -> "elem" (input's shape), "rows" (rows' shape), "class" ((V,), one
    chunk, shared by every block; an option of the accumulator), "target" (cross-entropy
    target: "rows" for class indices, "full" for probabilities of the logits' shape), "full"
    (the first operand's shape and chunks).
    positional: how many operands (the first ones) are positional.
    """
    kind: str
    first: str
    roles: dict
    positional: int = 2


_ELEM = {"target": "elem", "weight": "elem"}
_SPECS = {
    "mse_loss": _Spec("elementwise", "input", _ELEM),
    "l1_loss": _Spec("elementwise", "input", _ELEM),
    "huber_loss": _Spec("elementwise", "input", _ELEM),
    "smooth_l1_loss": _Spec("elementwise", "input", _ELEM),
    "rmse": _Spec("elementwise", "input", _ELEM),
    "binary_cross_entropy": _Spec("elementwise", "input", _ELEM),
    "binary_cross_entropy_with_logits": _Spec("elementwise", "input", {**_ELEM, "pos_weight": "elem"}),
    "sigmoid_focal_loss": _Spec("elementwise", "input", {"target": "elem"}),
    "hinge_loss": _Spec("elementwise", "input", {"target": "elem"}),
    "kl_div": _Spec("elementwise", "input", {"target": "elem"}),
    "cross_entropy": _Spec("rows", "logits", {"target": "target", "weight": "class", "sample_weight": "rows"}),
    "nll_loss": _Spec("rows", "log_probs", {"target": "rows", "weight": "class"}),
    "perplexity": _Spec("rows", "logits", {"target": "target"}),
    "multi_margin_loss": _Spec("rows", "input", {"target": "rows", "weight": "class"}),
    "triplet_margin_loss": _Spec("rows", "anchor", {"positive": "full", "negative": "full"}, 3),
    "kl_div_logits": _Spec("rows", "student_logits", {"teacher_logits": "full", "target": "rows"}),
}


# ---- operands ------------------------------------------------------------------------------------

def _as_dask(x, name: str):
    if isinstance(x, da.Array):
        return x
    if isinstance(x, (str, bytes, dict, set)) or x is None:
        raise TypeError(f"{name} must be a Dask or NumPy array, got {type(x).__name__}")
    return da.asarray(x)


def _check_aligned_to(x, shape: tuple, name: str, what: str, *, broadcast: bool):
    """x broadcast (if allowed) to `shape`, else a clear ValueError naming `name`."""
    if x.shape == shape:
        return x
    if any(isinstance(s, float) and math.isnan(s) for s in x.shape):
        raise ValueError(f"{name} has unknown chunk sizes (shape {x.shape}); call {name}.compute_chunk_sizes() "
                         f"first")
    if broadcast:
        try:
            return da.broadcast_to(x, shape)
        except ValueError:
            pass
        raise ValueError(f"{name} of shape {x.shape} cannot be broadcast to {what} {shape}")
    raise ValueError(f"{name} must have {what} {shape}, got {x.shape}")


def _is_float(dt: np.dtype) -> bool:
    return dt.kind == "f" or dt.name == "bfloat16"


def _is_python_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _Operands:
    """The operands of one call, as Dask arrays aligned to the first operand's chunks, with
    their blockwise index strings."""

    def __init__(self, spec: _Spec, arrays: dict):
        self.spec = spec
        first = _as_dask(arrays[spec.first], spec.first)
        if any(isinstance(s, float) and math.isnan(s) for s in first.shape):
            raise ValueError(f"{spec.first} has unknown chunk sizes (shape {first.shape}); call "
                             f"{spec.first}.compute_chunk_sizes() first")
        if spec.kind == "rows":
            if first.ndim == 0:
                raise ValueError(f"{spec.first} must have at least one dimension (the classes)")
            if len(first.chunks[-1]) > 1:
                raise ValueError(
                    f"the class axis (last axis) of {spec.first} must be a single chunk, got chunks "
                    f"{first.chunks[-1]}: a row is one softmax; rechunk it, e.g. "
                    f"{spec.first}.rechunk({{-1: -1}}) (each block then holds whole rows)")
        self.first = first
        nd = first.ndim
        letters = "abcdefghijklmnopqrstuvwxy"[:nd]
        self.full_index = letters
        self.rows_index = letters[:-1] if spec.kind == "rows" else letters
        self.class_index = letters[-1] if spec.kind == "rows" else None
        rows_shape = first.shape[:-1] if spec.kind == "rows" else first.shape
        rows_chunks = first.chunks[:-1] if spec.kind == "rows" else first.chunks
        self.names = [spec.first]
        self.arrays = [first]
        self.indices = [self.full_index]
        self.roles = ["first"]
        for name, role in spec.roles.items():
            x = arrays.get(name)
            if x is None:
                continue
            if role == "elem" and _is_python_number(x) and _is_float(first.dtype):
                # NumPy 2 promotion, as the NumPy functions: a Python scalar takes the input's dtype
                x = np.asarray(x, dtype=first.dtype)
            x = _as_dask(x, name)
            if role == "target":
                role = "full" if _is_float(x.dtype) and x.ndim == nd else "rows"
            if role == "elem":
                x = _check_aligned_to(x, first.shape, name, f"the shape of {spec.first}", broadcast=True)
                x, index = x.rechunk(first.chunks), self.full_index
            elif role == "full":
                x = _check_aligned_to(x, first.shape, name, f"the shape of {spec.first}", broadcast=False)
                x, index = x.rechunk(first.chunks), self.full_index
            elif role == "rows":
                broadcast = name != "target"
                what = f"the shape of {spec.first} without the class axis" if spec.kind == "rows" else "the shape"
                x = _check_aligned_to(x, rows_shape, name, what, broadcast=broadcast)
                x, index = x.rechunk(rows_chunks), self.rows_index
            else:  # "class"
                V = first.shape[-1]
                if x.shape != (V,):
                    raise ValueError(f"{name} must have shape ({V},) (one weight per class), got {x.shape}")
                x, index = x.rechunk(-1), self.class_index
            self.names.append(name)
            self.roles.append(role)
            self.arrays.append(x)
            self.indices.append(index)

    def zero_size(self) -> dict:
        """Small NumPy stand-ins with the operands' dtypes and shapes, the first row axis of
        length 0 (class axes and class weights keep their length; values valid for every loss:
        1 for floats, 0 for class indices), to validate a call without data."""
        out = {}
        row_axes = self.first.ndim - (1 if self.spec.kind == "rows" else 0)
        for name, x, role in zip(self.names, self.arrays, self.roles):
            shape = list(x.shape)
            if row_axes > 0 and role != "class":
                shape[0] = 0
            fill = 0 if x.dtype.kind in "iub" else 1
            out[name] = np.full(shape, fill, dtype=x.dtype)
        return out


# ---- tasks ---------------------------------------------------------------------------------------

def _kernel_threads(num_threads):
    return _KERNEL_THREADS_IN_TASK if num_threads is None else num_threads


def _split_blocks(layout, blocks):
    """Blocks -> (positional operands, constructor operands (class weights), keyword operands)."""
    pos, ctor, kw = [], {}, {}
    for (name, where), b in zip(layout, blocks):
        if where == "pos":
            pos.append(b)
        elif where == "class":
            ctor[name] = b
        else:
            kw[name] = b
    return pos, ctor, kw


#: the cross-entropy accumulators also count top-k accuracy by default (a rank per row, 5-15 % of the
#: kernel's time); the Dask functions return the loss only, so they turn it off
_NO_RANK = {"cross_entropy": {"topk": None}, "perplexity": {"topk": None}}


def _block_state(*blocks, loss, options, layout, num_threads):
    """One block -> an accumulator holding its float64 sums."""
    pos, ctor, kw = _split_blocks(layout, blocks)
    acc = _metrics().accumulator(loss, **options, **ctor, **_NO_RANK.get(loss, {}))
    return acc.update(*pos, num_threads=_kernel_threads(num_threads), **kw)


def _merge_states(*states):
    """Tree node: merge a group of accumulators (into a copy: inputs belong to other tasks)."""
    acc = copy.deepcopy(states[0])
    for s in states[1:]:
        acc.merge(s)
    return acc


def _finish_state(state):
    """Tree root: the loss from the merged accumulator."""
    return state.result()


def _block_none(*blocks, fn, options, layout, num_threads):
    """reduction="none" on one block: the NumPy function itself."""
    pos, ctor, kw = _split_blocks(layout, blocks)
    return fn(*pos, num_threads=_kernel_threads(num_threads), **options, **ctor, **kw)


def _tree_reduce(states, loss: str, split_every: int, dtype: np.dtype):
    """A 0-d Dask array: states merged in a tree of fan-in split_every, then finished."""
    token = dask.base.tokenize(states.name, split_every)
    keys = list(dask.core.flatten(states.__dask_keys__()))
    layers = {}
    level = 0
    while len(keys) > 1:
        name = f"fastloss-merge-{level}-{token}"
        layer, next_keys = {}, []
        for i in range(0, len(keys), split_every):
            key = (name, i // split_every)
            layer[key] = Task(key, _merge_states, *[TaskRef(k) for k in keys[i:i + split_every]])
            next_keys.append(key)
        layers[name] = (layer, keys)
        keys = next_keys
        level += 1
    out = f"fastloss-{loss}-{token}"
    root = (out,)
    layers[out] = ({root: Task(root, _finish_state, TaskRef(keys[0]))}, keys)
    graph = dict(states.dask.layers)
    deps = dict(states.dask.dependencies)
    previous = states.name
    for name, (layer, _) in layers.items():
        graph[name] = layer
        deps[name] = {previous}
        previous = name
    hlg = HighLevelGraph(graph, deps)
    return da.Array(hlg, out, chunks=(), dtype=dtype, meta=np.empty((), dtype=dtype))


# ---- the generic reduction -----------------------------------------------------------------------

def _check_split_every(split_every) -> int:
    if split_every is None:
        return _DEFAULT_SPLIT_EVERY
    if isinstance(split_every, bool) or not isinstance(split_every, numbers.Integral) or split_every < 2:
        raise ValueError(f"split_every must be an int >= 2, got {split_every!r}")
    return int(split_every)


def _check_num_threads(num_threads):
    if num_threads is None:
        return None
    fastloss._config.resolve_num_threads(num_threads)    # the NumPy functions' checks
    return num_threads


def _reduce(loss: str, arrays: dict, options: dict, *, num_threads=None, split_every=None):
    """``fastloss.<loss>`` over Dask arrays: a lazy 0-d array (or an array for "none").

    arrays: the data operands by keyword name (the first ones positional), None if absent;
    options: the loss's keyword options (reduction, delta, ignore_index, ...).
    """
    spec = _SPECS[loss]
    fn = getattr(fastloss, loss)
    split_every = _check_split_every(split_every)
    num_threads = _check_num_threads(num_threads)
    ops = _Operands(spec, arrays)
    layout = tuple((name, "pos" if i < spec.positional else ("class" if role == "class" else "kw"))
                   for i, (name, role) in enumerate(zip(ops.names, ops.roles)))
    # 1. options and dtypes: the NumPy function on zero-size operands raises what it would raise
    pos, ctor, kw = _split_blocks(layout, list(ops.zero_size().values()))
    probe = fn(*pos, **options, **ctor, **kw, num_threads=1)
    dtype = np.asarray(probe).dtype
    pairs = [p for a, i in zip(ops.arrays, ops.indices) for p in (a, i)]
    token = dask.base.tokenize(loss, options, layout, num_threads, *ops.arrays)
    if options.get("reduction") == "none":
        out_index = ops.full_index if spec.kind == "elementwise" else ops.rows_index
        return da.blockwise(_block_none, out_index, *pairs, name=f"fastloss-{loss}-none-{token}",
                            dtype=dtype, concatenate=True, meta=np.empty((0,) * len(out_index), dtype=dtype),
                            fn=fn, options=options, layout=layout, num_threads=num_threads)
    if loss == "kl_div" and options.get("reduction") == "batchmean" and any(n > 1 for n in ops.first.numblocks[1:]):
        raise ValueError(f"kl_div with reduction='batchmean' divides by input.shape[0]: chunk input along the first "
                         f"axis only (got chunks {ops.first.chunks}); rechunk, e.g. input.rechunk({{1: -1}}) for 2-d, "
                         f"or use reduction='sum' and divide")
    # 2. one accumulator per block (the accumulator accepts these options: checked here, once)
    _metrics().accumulator(loss, **options, **ctor, **_NO_RANK.get(loss, {}))
    out_index = ops.rows_index
    states = da.blockwise(_block_state, out_index, *pairs, name=f"fastloss-{loss}-state-{token}",
                          dtype=object, concatenate=True, meta=np.empty((0,) * len(out_index), dtype=object),
                          adjust_chunks={i: 1 for i in out_index},
                          loss=loss, options=options, layout=layout, num_threads=num_threads)
    # 3. the tree
    return _tree_reduce(states, loss, split_every, dtype)


# ---- public functions ----------------------------------------------------------------------------

_COMMON_DOC = """
    Dask version of :func:`fastloss.{name}`: same formula, keywords and result (see its
    docstring for the definition and the options), lazy: nothing runs until ``.compute()``
    (or ``dask.compute`` / ``persist`` / ``Client.compute``).{note}

    Parameters
    ----------
{params}    num_threads : int, optional
        Kernel threads per task.  None: 1 (the scheduler already runs one task per core or
        per worker thread); set it for the synchronous scheduler, or for distributed workers
        started with one thread on a many-core node.  The result does not depend on it.
    split_every : int >= 2, optional
        Fan-in of the tree that merges the per-block states (default 8).

    Returns
    -------
    {returns}

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastloss.dask
{example}
"""

_ELEM_PARAMS = """    input : dask.array.Array or numpy.ndarray
        float16, float32, float64 or bfloat16 (ml_dtypes), any shape and chunks.
    target : dask.array.Array, numpy.ndarray or Python scalar
        Broadcastable to ``input.shape``; broadcast and rechunked to ``input``'s chunks.
"""
_WEIGHT = """    weight : dask.array.Array or numpy.ndarray, optional
        Per-element weights broadcastable to ``input.shape`` (rechunked to its chunks).
"""
_REDUCTION = """    reduction : {{{values}}}
        ``"none"``: a lazy array of {shape} (the NumPy function on each block).
"""
_ELEM_RETURNS = """0-d dask.array.Array (float64 for float64 input, else float32); for ``reduction="none"``
        a Dask array of ``input``'s shape and chunks."""
_ROWS_RETURNS = """0-d dask.array.Array (float64 for float64 {first}, else float32); for ``reduction="none"``
        a Dask array of the rows' shape (the shape of ``{first}`` without the last axis),
        chunked as the rows of ``{first}``."""
_ROWS_FIRST = """    {first} : dask.array.Array or numpy.ndarray, shape (..., {V})
        float16, float32, float64 or bfloat16; any chunks on the leading (row) axes, the last
        axis ONE chunk (else ValueError; rechunk with ``{first}.rechunk({{-1: -1}})``).
"""
_INDEX_TARGET = """    target : dask.array.Array or numpy.ndarray of int
        Class indices (or ``ignore_index``), the rows' shape; rechunked to the rows' chunks.
"""
_CLASS_WEIGHT = """    weight : numpy.ndarray or dask.array.Array (V,), optional
        Per-class weights (one chunk, shared by every block).
"""
_OPTIONS = """    {names}
        As :func:`fastloss.{name}`.
"""

_DOCS = {
    "mse_loss": (_ELEM_PARAMS + _WEIGHT, "reduction", "input", None, """\
    >>> x = da.arange(8, chunks=3, dtype=np.float32)
    >>> loss = fastloss.dask.mse_loss(x, 1.0)
    >>> loss.compute()
    np.float32(11.5)"""),
    "l1_loss": (_ELEM_PARAMS + _WEIGHT, "reduction", "input", None, """\
    >>> x = da.arange(8, chunks=3, dtype=np.float32)
    >>> fastloss.dask.l1_loss(x, 1.0, reduction="sum").compute()
    np.float32(22.0)"""),
    "huber_loss": (_ELEM_PARAMS + _WEIGHT, "reduction", "input", "delta", """\
    >>> x = da.arange(8, chunks=3, dtype=np.float32)
    >>> fastloss.dask.huber_loss(x, 1.0, delta=2.0).compute()
    np.float32(3.875)"""),
    "smooth_l1_loss": (_ELEM_PARAMS + _WEIGHT, "reduction", "input", "beta", """\
    >>> x = da.arange(8, chunks=3, dtype=np.float32)
    >>> fastloss.dask.smooth_l1_loss(x, 1.0, beta=0.5).compute()
    np.float32(2.53125)"""),
    "rmse": (_ELEM_PARAMS + _WEIGHT, None, "input", None, """\
    >>> x = da.arange(8, chunks=3, dtype=np.float32)
    >>> fastloss.dask.rmse(x, 1.0).compute()
    np.float32(3.391165)"""),
    "binary_cross_entropy": (_ELEM_PARAMS + _WEIGHT, "reduction", "input", None, """\
    >>> p = da.from_array(np.array([0.9, 0.2, 0.7, 0.4]), chunks=2)
    >>> fastloss.dask.binary_cross_entropy(p, np.array([1.0, 0.0, 1.0, 1.0])).compute()
    np.float64(0.4003674356962309)"""),
    "binary_cross_entropy_with_logits": (
        _ELEM_PARAMS + _WEIGHT + """    pos_weight : dask.array.Array or numpy.ndarray, optional
        Broadcastable to ``input.shape`` (rechunked to its chunks).
""", "reduction", "input", None, """\
    >>> z = da.from_array(np.array([2.0, -1.0, 0.5, 0.0]), chunks=2)
    >>> fastloss.dask.binary_cross_entropy_with_logits(z, np.array([1.0, 0.0, 1.0, 1.0])).compute()
    np.float64(0.4018534658253118)"""),
    "sigmoid_focal_loss": (_ELEM_PARAMS, "reduction", "input", "alpha, gamma", """\
    >>> z = da.from_array(np.array([2.0, -1.0, 0.5, 0.0]), chunks=2)
    >>> fastloss.dask.sigmoid_focal_loss(z, np.array([1.0, 0.0, 1.0, 1.0])).compute()
    np.float64(0.019414876313633273)"""),
    "hinge_loss": (_ELEM_PARAMS, "reduction", "input", "margin", """\
    >>> z = da.from_array(np.array([2.0, -1.0, 0.5, 0.0]), chunks=2)
    >>> fastloss.dask.hinge_loss(z, np.array([1.0, -1.0, -1.0, 1.0])).compute()
    np.float64(0.625)"""),
    "kl_div": (_ELEM_PARAMS, "kl", "input", "log_target", """\
    >>> logp = da.from_array(np.log(np.array([[0.5, 0.5], [0.25, 0.75]])), chunks=(1, 2))
    >>> fastloss.dask.kl_div(logp, np.array([[0.25, 0.75], [0.5, 0.5]]), reduction="batchmean").compute()
    np.float64(0.1373265360835137)"""),
    "cross_entropy": (
        _ROWS_FIRST.format(first="logits", V="V") + """    target : dask.array.Array or numpy.ndarray
        Integer class indices of the rows' shape, or class probabilities of the logits'
        shape; rechunked to the logits' (row) chunks.
""" + _CLASS_WEIGHT + """    sample_weight : dask.array.Array or numpy.ndarray, optional
        Broadcastable to the rows' shape (rechunked to the rows' chunks).
""", "reduction", "logits", "ignore_index, label_smoothing, z_loss, softcap", """\
    >>> logits = da.zeros((6, 4), chunks=(2, 4))        # 3 blocks of 2 rows, 4 classes
    >>> fastloss.dask.cross_entropy(logits, np.array([0, 1, 2, 3, -100, 1])).compute()
    np.float64(1.3862943611198906)"""),
    "nll_loss": (_ROWS_FIRST.format(first="log_probs", V="V") + _INDEX_TARGET + _CLASS_WEIGHT, "reduction",
                 "log_probs", "ignore_index", """\
    >>> logp = da.full((4, 2), np.log(0.5), chunks=(2, 2))
    >>> fastloss.dask.nll_loss(logp, np.array([0, 1, 1, 0])).compute()
    np.float64(0.6931471805599453)"""),
    "perplexity": (_ROWS_FIRST.format(first="logits", V="V") + _INDEX_TARGET, None, "logits", "ignore_index", """\
    >>> logits = da.zeros((6, 4), chunks=(2, 4))
    >>> fastloss.dask.perplexity(logits, np.array([0, 1, 2, 3, -100, 1])).compute()
    np.float64(4.0)"""),
    "multi_margin_loss": (_ROWS_FIRST.format(first="input", V="C") + _INDEX_TARGET + _CLASS_WEIGHT, "reduction",
                          "input", "p, margin", """\
    >>> x = da.zeros((4, 3), chunks=(2, 3))
    >>> fastloss.dask.multi_margin_loss(x, np.array([0, 1, 2, 0])).compute()
    np.float64(0.6666666666666666)"""),
    "triplet_margin_loss": (_ROWS_FIRST.format(first="anchor", V="D") + """    positive, negative : dask.array.Array or numpy.ndarray
        The anchor's shape; rechunked to its chunks.
""", "reduction", "anchor", "margin, p, eps, swap", """\
    >>> a = da.zeros((4, 3), chunks=(2, 3))
    >>> fastloss.dask.triplet_margin_loss(a, np.full((4, 3), 0.5), np.ones((4, 3))).compute()
    np.float64(0.1339745962155614)"""),
    "kl_div_logits": (_ROWS_FIRST.format(first="student_logits", V="V") + """    teacher_logits : dask.array.Array or numpy.ndarray
        The student's shape; rechunked to its chunks.
    target : dask.array.Array or numpy.ndarray of int, optional
        The rows' shape: rows whose target is ``ignore_index`` are left out.
""", "kl_batchmean", "student_logits", "temperature, ignore_index", """\
    >>> s = da.zeros((3, 2), chunks=(2, 2))
    >>> fastloss.dask.kl_div_logits(s, np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])).compute()
    np.float64(0.14625246571482156)"""),
}

_AXIS = """    axis : None
        Only None (every axis: NotImplementedError otherwise); for per-axis results take
        ``reduction="none"`` and reduce the Dask array.
"""

_NOTES = {
    "kl_div": """

    ``reduction="batchmean"`` divides by ``input.shape[0]``: ``input`` must then be chunked
    along its first axis only (else ValueError).""",
    "cross_entropy": """

    ``"mean"`` is the token-weighted mean of the whole array (sum over the non-ignored rows of
    the weighted row losses / sum of s * w[t] over them), as the NumPy function on all the
    rows -- not a mean of per-block means.  The classes must be on the last axis (``axis=-1``,
    the only accepted value; move them with ``da.moveaxis``).""",
    "perplexity": """

    exp(sum of the token NLLs / number of non-ignored tokens) over all the blocks.""",
}


def _document(func):
    name = func.__name__
    params, reduction, first, options, example = _DOCS[name]
    if reduction is not None:
        values = {"reduction": '"mean", "sum", "none"', "kl": '"mean", "batchmean", "sum", "none"',
                  "kl_batchmean": '"batchmean", "mean", "sum", "none"'}[reduction]
        params += _REDUCTION.format(values=values, shape=f"``{first}``'s shape and chunks" if _SPECS[name].kind == "elementwise"
                                     else "the rows' shape")
    if options:
        params += _OPTIONS.format(names=options, name=name)
    if "axis" in inspect.signature(func).parameters and _SPECS[name].kind == "elementwise":
        params += _AXIS
    if _SPECS[name].kind == "elementwise":
        returns = _ELEM_RETURNS
    else:
        returns = _ROWS_RETURNS.format(first=first)
    if reduction is None:
        returns = returns.split("; for")[0] + "."
    func.__doc__ = func.__doc__.rstrip() + "\n" + _COMMON_DOC.format(
        name=name, note=_NOTES.get(name, ""), params=params, returns=returns, example=example)
    return func


def _options(**kw):
    return kw


def mse_loss(input, target, *, weight=None, reduction="mean", axis=None, num_threads=None, split_every=None):
    """Mean squared error over Dask arrays: mean (or sum) of weight * (input - target)**2."""
    _no_axis(axis)
    return _reduce("mse_loss", {"input": input, "target": target, "weight": weight}, _options(reduction=reduction),
                   num_threads=num_threads, split_every=split_every)


def l1_loss(input, target, *, weight=None, reduction="mean", axis=None, num_threads=None, split_every=None):
    """Mean absolute error over Dask arrays: mean (or sum) of weight * |input - target|."""
    _no_axis(axis)
    return _reduce("l1_loss", {"input": input, "target": target, "weight": weight}, _options(reduction=reduction),
                   num_threads=num_threads, split_every=split_every)


def huber_loss(input, target, *, delta=1.0, weight=None, reduction="mean", axis=None, num_threads=None,
               split_every=None):
    """Huber loss over Dask arrays: 0.5 d**2 for |d| <= delta, else delta (|d| - 0.5 delta)."""
    _no_axis(axis)
    return _reduce("huber_loss", {"input": input, "target": target, "weight": weight},
                   _options(delta=delta, reduction=reduction), num_threads=num_threads, split_every=split_every)


def smooth_l1_loss(input, target, *, beta=1.0, weight=None, reduction="mean", axis=None, num_threads=None,
                   split_every=None):
    """Smooth L1 loss over Dask arrays: 0.5 d**2 / beta for |d| < beta, else |d| - 0.5 beta."""
    _no_axis(axis)
    return _reduce("smooth_l1_loss", {"input": input, "target": target, "weight": weight},
                   _options(beta=beta, reduction=reduction), num_threads=num_threads, split_every=split_every)


def rmse(input, target, *, weight=None, axis=None, num_threads=None, split_every=None):
    """Root mean squared error over Dask arrays: sqrt(sum w (input - target)**2 / sum w)."""
    _no_axis(axis)
    return _reduce("rmse", {"input": input, "target": target, "weight": weight}, _options(),
                   num_threads=num_threads, split_every=split_every)


def binary_cross_entropy(input, target, *, weight=None, reduction="mean", num_threads=None, split_every=None):
    """Binary cross-entropy of probabilities over Dask arrays:
    -weight * (t log p + (1 - t) log(1 - p))."""
    return _reduce("binary_cross_entropy", {"input": input, "target": target, "weight": weight},
                   _options(reduction=reduction), num_threads=num_threads, split_every=split_every)


def binary_cross_entropy_with_logits(input, target, *, weight=None, pos_weight=None, reduction="mean",
                                     num_threads=None, split_every=None):
    """Binary cross-entropy of logits over Dask arrays:
    -weight * (pos_weight t log sigmoid(x) + (1 - t) log(1 - sigmoid(x)))."""
    return _reduce("binary_cross_entropy_with_logits",
                   {"input": input, "target": target, "weight": weight, "pos_weight": pos_weight},
                   _options(reduction=reduction), num_threads=num_threads, split_every=split_every)


def sigmoid_focal_loss(input, target, *, alpha=0.25, gamma=2.0, reduction="mean", num_threads=None,
                       split_every=None):
    """Sigmoid focal loss over Dask arrays: alpha_t (1 - p_t)**gamma * BCE-with-logits."""
    return _reduce("sigmoid_focal_loss", {"input": input, "target": target},
                   _options(alpha=alpha, gamma=gamma, reduction=reduction), num_threads=num_threads,
                   split_every=split_every)


def hinge_loss(input, target, *, margin=1.0, reduction="mean", num_threads=None, split_every=None):
    """Hinge loss over Dask arrays: max(0, margin - target * input), target in {-1, 1}."""
    return _reduce("hinge_loss", {"input": input, "target": target}, _options(margin=margin, reduction=reduction),
                   num_threads=num_threads, split_every=split_every)


def kl_div(input, target, *, reduction="mean", log_target=False, num_threads=None, split_every=None):
    """Pointwise KL divergence over Dask arrays: target * (log target - input) (input: log-probabilities)."""
    return _reduce("kl_div", {"input": input, "target": target},
                   _options(reduction=reduction, log_target=log_target), num_threads=num_threads,
                   split_every=split_every)


def cross_entropy(logits, target, *, weight=None, sample_weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None, axis=-1, num_threads=None, split_every=None):
    """Cross-entropy of logits (rows x V) against class indices or probabilities over Dask arrays."""
    _last_axis(axis, logits)
    return _reduce("cross_entropy",
                   {"logits": logits, "target": target, "weight": weight, "sample_weight": sample_weight},
                   _options(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                            z_loss=z_loss, softcap=softcap),
                   num_threads=num_threads, split_every=split_every)


def nll_loss(log_probs, target, *, weight=None, ignore_index=-100, reduction="mean", num_threads=None,
             split_every=None):
    """Negative log-likelihood of log-probabilities (rows x V) over Dask arrays: -w[t] log_probs[t]."""
    return _reduce("nll_loss", {"log_probs": log_probs, "target": target, "weight": weight},
                   _options(ignore_index=ignore_index, reduction=reduction), num_threads=num_threads,
                   split_every=split_every)


def perplexity(logits, target, *, ignore_index=-100, num_threads=None, split_every=None):
    """Perplexity over Dask arrays: exp(sum of NLL / number of non-ignored tokens)."""
    return _reduce("perplexity", {"logits": logits, "target": target}, _options(ignore_index=ignore_index),
                   num_threads=num_threads, split_every=split_every)


def _no_axis(axis):
    if axis is not None:
        raise NotImplementedError("fastloss.dask reduces over every axis: axis must be None (for per-axis "
                                  "results use reduction='none' and reduce the Dask array)")


def _last_axis(axis, logits):
    nd = getattr(logits, "ndim", None)
    if nd is None:
        nd = np.ndim(logits)
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not (axis == -1 or axis == nd - 1):
        raise ValueError(f"fastloss.dask.cross_entropy takes the classes on the last axis (axis=-1), got "
                         f"axis={axis!r}; move them with da.moveaxis(logits, {axis!r}, -1)")


def multi_margin_loss(input, target, *, p=1, margin=1.0, weight=None, reduction="mean", num_threads=None,
                      split_every=None):
    """Multi-class margin loss over Dask arrays (rows x C):
    sum_{j != y} w[y] max(0, margin - x[y] + x[j])**p / C per row."""
    return _reduce("multi_margin_loss", {"input": input, "target": target, "weight": weight},
                   _options(p=p, margin=margin, reduction=reduction), num_threads=num_threads,
                   split_every=split_every)


def triplet_margin_loss(anchor, positive, negative, *, margin=1.0, p=2.0, eps=1e-6, swap=False, reduction="mean",
                        num_threads=None, split_every=None):
    """Triplet margin loss over Dask arrays (rows x D): max(0, d(a, p) - d(a, n) + margin) per row."""
    return _reduce("triplet_margin_loss", {"anchor": anchor, "positive": positive, "negative": negative},
                   _options(margin=margin, p=p, eps=eps, swap=swap, reduction=reduction), num_threads=num_threads,
                   split_every=split_every)


def kl_div_logits(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", ignore_index=-100,
                  target=None, num_threads=None, split_every=None):
    """Distillation KL over Dask arrays (rows x V): T**2 KL(softmax(teacher/T) || softmax(student/T)) per row."""
    return _reduce("kl_div_logits", {"student_logits": student_logits, "teacher_logits": teacher_logits,
                                     "target": target},
                   _options(temperature=temperature, reduction=reduction, ignore_index=ignore_index),
                   num_threads=num_threads, split_every=split_every)


for _name in __all__:
    _document(globals()[_name])
del _name
