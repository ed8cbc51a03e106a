"""The single registry of the public functions: losses (``REGISTRY``) and the other public
functions (``FUNCTIONS``: log_softmax, softmax, logsumexp).

One entry per public loss: the function, its ``_with_grad`` twin (if it has one), the NumPy
reference (and reference gradient), its operands (name, kind, shape), the options it takes,
how to make realistic inputs, and the error tolerances we promise.  The conformance and
layout tests, the table-driven bad-input test (tests/test_bad_input_table.py), the property
tests, the benchmarks in ``benchmarks/`` and ``python -m fastloss bench`` all iterate over
this module, so adding a function is one entry here.

Families: ``"regression"`` (elementwise losses on ``input, target`` of one shape, reduced
over ``axis``), ``"classification"`` (rows of classes on ``axis``: cross_entropy, nll_loss,
perplexity) and ``"softmax"`` (log_softmax, softmax, logsumexp).  Consumers that build
regression-shaped calls filter on the family (:func:`by_family`); the others read the
operand descriptions (:class:`Operand`) and the option kinds (:data:`OPTION_KINDS`).

The losses of issue 6 form the families of :data:`FIELD_FAMILIES` (``"elementwise"``:
binary cross-entropy, focal, hinge, KL; ``"margin"``: multi-margin, triplet;
``"distillation"``: kl_div_logits; ``"sequence"``: sequence log-probs, DPO, InfoNCE).  Their
operands do not follow one pattern (three embeddings, four log-probability vectors, a
gradient-only ``grad_seq``), so the bad-input table of the first three families
(tests/test_bad_input.py) does not build their calls; tests/test_field_losses.py runs one
registry-driven suite over them (reference conformance per dtype, reduction and variant,
gradients, thread counts, layouts, generic bad input), and each module has its own tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fastloss import classification, distillation, elementwise, margin, reference, regression, sequence
from fastloss._error_bounds import (CE_TOLERANCES, FIELD_TOLERANCES, TOLERANCES, Tolerance,  # noqa: F401
                                    cross_entropy_tolerance, field_tolerance, logsumexp_tolerance, nll_tolerance,
                                    perplexity_tolerance, regression_tolerance, softmax_tolerance)

F32_ULP = 2.0 ** -23


# ---- operands and options ---------------------------------------------------------------------

@dataclass(frozen=True)
class Operand:
    """One array argument of a public function.

    kind:
      ``"float"``           floating-point data (float16/32/64, bfloat16);
      ``"weight"``          floating-point weights (non-negative in realistic inputs);
      ``"index"``           integer class indices in [0, V) or ``ignore_index``;
      ``"index_or_probs"``  class indices, or class probabilities (a float array of the
                            first operand's shape).
    shape:
      ``"first"``    the first operand's shape (``broadcast``: anything that broadcasts to it);
      ``"rows"``     the first operand's shape without the class axis;
      ``"classes"``  ``(V,)``, one value per class.
    required: a positional argument; else a keyword that defaults to None.
    """
    name: str
    kind: str
    shape: str
    required: bool = True
    broadcast: bool = False


#: The kinds of keyword options; each kind has one set of valid and invalid values in the
#: bad-input table (tests/test_bad_input_table.py).
OPTION_KINDS = {
    "reduction": "one of 'mean', 'sum', 'none'",
    "reduce_axes": "None, an int or a tuple of ints: the axes reduced",
    "class_axis": "an int: the class axis",
    "num_threads": "None, -1 or an int in [1, 4096]",
    "positive": "a finite real number > 0",
    "nonnegative": "a finite real number >= 0",
    "unit_interval": "a real number in [0, 1]",
    "positive_or_none": "None or a finite real number > 0",
    "index": "an int (compared with the class indices)",
    # the losses of issue 6 (FIELD_FAMILIES)
    "real": "a finite real number",
    "bool": "True or False",
    "choice": "one of a fixed set of strings",
    "p_norm": "a real number > 0 (the norm of triplet_margin_loss; multi_margin_loss: 1 or 2)",
}

REGRESSION_OPERANDS = (Operand("input", "float", "first"),
                       Operand("target", "float", "first", broadcast=True),
                       Operand("weight", "weight", "first", required=False, broadcast=True))
REGRESSION_OPTIONS = (("reduction", "reduction"), ("axis", "reduce_axes"), ("num_threads", "num_threads"))


# ---- input generators -------------------------------------------------------------------------

def regression_inputs(rng: np.random.Generator, shape, dtype) -> dict:
    """input, target ~ N(0, 1) of `shape` and `dtype` (values quantized to the dtype)."""
    dt = np.dtype(dtype)
    if dt in (np.float32, np.float64):  # generated directly: no float64 temporary at 1e8
        return {"input": rng.standard_normal(shape, dtype=dt), "target": rng.standard_normal(shape, dtype=dt)}
    x = rng.standard_normal(shape).astype(dtype)
    t = rng.standard_normal(shape).astype(dtype)
    return {"input": x, "target": t}


#: Logits ~ N(0, 2.5**2): peaked rows (target probabilities from ~1e-9 to ~1).
LOGIT_SCALE = 2.5


def _logits(rng, shape, dtype):
    x = rng.standard_normal(shape) * LOGIT_SCALE
    return x.astype(dtype)


def classification_inputs(rng: np.random.Generator, shape, dtype) -> dict:
    """logits of `shape` (classes on the last axis) and class indices uniform in [0, V)."""
    V = shape[-1]
    return {"logits": _logits(rng, shape, dtype), "target": rng.integers(0, max(V, 1), size=shape[:-1])}


def nll_inputs(rng: np.random.Generator, shape, dtype) -> dict:
    """log-probabilities (log_softmax of logits) of `shape` and class indices."""
    ins = classification_inputs(rng, shape, dtype)
    lp = reference.log_softmax(ins["logits"]) if ins["logits"].size else np.zeros(shape)
    return {"log_probs": lp.astype(dtype), "target": ins["target"]}


def softmax_inputs(rng: np.random.Generator, shape, dtype) -> dict:
    return {"x": _logits(rng, shape, dtype)}


# ---- specs -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FunctionSpec:
    """A public function: what the harness needs to call it and check it.

    ``operands`` are the array arguments (the required ones positional, in order);
    ``options`` the keyword options as (name, kind) pairs (kinds: :data:`OPTION_KINDS`);
    ``make_inputs(rng, shape, dtype)`` the required operands as a dict (shape: the first
    operand's, classes last); ``tolerance(spec, dtype_name, args, kwargs)`` the error bound of
    one call (a :class:`Tolerance`); ``out``: the name of the output-buffer keyword and
    ``inplace`` the operand that may be passed as that buffer (in place)."""
    name: str
    family: str
    func: Callable
    reference: Callable
    operands: tuple = REGRESSION_OPERANDS
    options: tuple = REGRESSION_OPTIONS
    make_inputs: Callable = regression_inputs
    tolerances: dict = field(default_factory=lambda: TOLERANCES)
    tolerance: Callable = regression_tolerance
    out: str | None = None
    inplace: str | None = None

    @property
    def option_kinds(self) -> dict:
        return dict(self.options)

    def operand(self, name: str) -> Operand:
        return next(o for o in self.operands if o.name == name)


@dataclass(frozen=True)
class LossSpec(FunctionSpec):
    """A public loss: a :class:`FunctionSpec` with its ``_with_grad`` twin (None if it has
    none), the reference gradient, the option variants the tests sweep and the reductions."""
    with_grad: Callable | None = None
    reference_grad: Callable | None = None
    #: keyword options that tests sweep over (each dict is one variant)
    variants: tuple = ({},)
    reductions: tuple = ("mean", "sum", "none")
    has_weight: bool = True
    #: arrays read per element by the forward kernel (for GB/s): input and target
    arrays_read: int = 2
    #: options that must be rejected: (kwargs, exception type, word the message must contain)
    bad_options: tuple = ()
    #: shapes of the first operand that the registry-driven tests of FIELD_FAMILIES use
    test_shapes: tuple = ()
    #: operands that only the ``_with_grad`` twin (and the reference gradient) take, after the
    #: others (sequence_log_probs_with_grad's ``grad_seq``); shape "batch": the leading dims
    grad_operands: tuple = ()
    out: str | None = "grad_out"
    inplace: str | None = "input"

    @property
    def has_axis(self) -> bool:
        """Takes ``axis`` = the axes to reduce (the regression losses)."""
        return self.option_kinds.get("axis") == "reduce_axes"


def _reg(name, variants=({},), reductions=("mean", "sum", "none"), bad=(), extra_options=()):
    options = REGRESSION_OPTIONS if "none" in reductions else REGRESSION_OPTIONS[1:]
    return LossSpec(
        name=name, family="regression",
        func=getattr(regression, name), with_grad=getattr(regression, name + "_with_grad"),
        reference=getattr(reference, name), reference_grad=getattr(reference, name + "_grad"),
        variants=variants, reductions=reductions, bad_options=bad, options=options + tuple(extra_options))


CE_OPERANDS = (Operand("logits", "float", "first"),
               Operand("target", "index_or_probs", "rows"),
               Operand("weight", "weight", "classes", required=False),
               Operand("sample_weight", "weight", "rows", required=False, broadcast=True))
CE_OPTIONS = (("ignore_index", "index"), ("reduction", "reduction"), ("label_smoothing", "unit_interval"),
              ("z_loss", "nonnegative"), ("softcap", "positive_or_none"), ("axis", "class_axis"),
              ("num_threads", "num_threads"))

_CLASSIFICATION = [
    LossSpec(name="cross_entropy", family="classification",
             func=classification.cross_entropy, with_grad=classification.cross_entropy_with_grad,
             reference=reference.cross_entropy, reference_grad=reference.cross_entropy_grad,
             operands=CE_OPERANDS, options=CE_OPTIONS, make_inputs=classification_inputs,
             tolerances=CE_TOLERANCES, tolerance=cross_entropy_tolerance, arrays_read=1, inplace="logits",
             variants=({}, {"label_smoothing": 0.1}, {"z_loss": 1e-3}, {"softcap": 5.0}, {"ignore_index": 0},
                       {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 8.0})),
    LossSpec(name="nll_loss", family="classification",
             func=classification.nll_loss, with_grad=None,
             reference=reference.nll_loss, reference_grad=reference.nll_loss_grad,
             operands=(Operand("log_probs", "float", "first"), Operand("target", "index", "rows"),
                       Operand("weight", "weight", "classes", required=False)),
             options=(("ignore_index", "index"), ("reduction", "reduction"), ("num_threads", "num_threads")),
             make_inputs=nll_inputs, tolerance=nll_tolerance, arrays_read=1, out=None, inplace=None,
             variants=({}, {"ignore_index": 0})),
    LossSpec(name="perplexity", family="classification",
             func=classification.perplexity, with_grad=None,
             reference=reference.perplexity, reference_grad=reference.perplexity_grad,
             operands=(Operand("logits", "float", "first"), Operand("target", "index", "rows")),
             options=(("ignore_index", "index"), ("num_threads", "num_threads")),
             make_inputs=classification_inputs, tolerances=CE_TOLERANCES, tolerance=perplexity_tolerance,
             reductions=("mean",), has_weight=False, arrays_read=1, out=None, inplace=None),
]

REGISTRY: dict[str, LossSpec] = {
    s.name: s
    for s in [
        _reg("mse_loss"),
        _reg("l1_loss"),
        _reg("huber_loss", variants=({}, {"delta": 0.3}, {"delta": 2.5}),
             bad=(({"delta": 0.0}, ValueError, "delta"), ({"delta": -1.0}, ValueError, "delta"),
                  ({"delta": float("nan")}, ValueError, "delta"), ({"delta": "1"}, TypeError, "delta")),
             extra_options=(("delta", "positive"),)),
        _reg("smooth_l1_loss", variants=({}, {"beta": 0.0}, {"beta": 0.3}, {"beta": 2.5}),
             bad=(({"beta": -0.5}, ValueError, "beta"), ({"beta": float("inf")}, ValueError, "beta"),
                  ({"beta": None}, TypeError, "beta")),
             extra_options=(("beta", "nonnegative"),)),
        _reg("rmse", reductions=("mean",)),
        *_CLASSIFICATION,
    ]
}

_SOFTMAX_OPERANDS = (Operand("x", "float", "first"),)
_SOFTMAX_OPTIONS = (("axis", "class_axis"), ("num_threads", "num_threads"))

#: Public functions that are not losses (no reduction, no gradient twin).
FUNCTIONS: dict[str, FunctionSpec] = {
    s.name: s
    for s in [
        FunctionSpec(name=n, family="softmax", func=getattr(classification, n), reference=getattr(reference, n),
                     operands=_SOFTMAX_OPERANDS, options=_SOFTMAX_OPTIONS, make_inputs=softmax_inputs,
                     tolerances=CE_TOLERANCES,
                     tolerance=logsumexp_tolerance if n == "logsumexp" else softmax_tolerance,
                     out=None if n == "logsumexp" else "out", inplace=None if n == "logsumexp" else "x")
        for n in ("log_softmax", "softmax", "logsumexp")
    ]
}


def by_family(family: str) -> dict[str, LossSpec]:
    """The losses of one family ("regression" or "classification"), in registry order."""
    return {n: s for n, s in REGISTRY.items() if s.family == family}


@dataclass(frozen=True)
class PublicCall:
    """One public callable: a loss, its ``_with_grad`` twin or another function."""
    name: str
    func: Callable
    spec: FunctionSpec
    with_grad: bool
    out: str | None         # the output-buffer keyword (grad_out / out), if any
    inplace: str | None     # the operand that may be passed as that buffer


def public_calls() -> list[PublicCall]:
    """Every public function of fastloss with its spec (aliases such as ``mse`` excluded)."""
    calls = []
    for spec in REGISTRY.values():
        calls.append(PublicCall(spec.name, spec.func, spec, False, None, None))
        if spec.with_grad is not None:
            calls.append(PublicCall(spec.with_grad.__name__, spec.with_grad, spec, True, spec.out, spec.inplace))
    for spec in FUNCTIONS.values():
        calls.append(PublicCall(spec.name, spec.func, spec, False, spec.out, spec.inplace))
    return calls


def get(name: str) -> LossSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; known: {', '.join(REGISTRY)}") from None


# ---- the other losses of the field (issue 6) ---------------------------------------------------

#: The families of the losses of issue 6 (see the module docstring).
FIELD_FAMILIES = ("elementwise", "margin", "distillation", "sequence")


def _q(a, dtype):
    """float64 values rounded to `dtype`."""
    return np.asarray(a).astype(dtype)


def bce_inputs(rng, shape, dtype):
    """probabilities sigmoid(N(0, 2^2)) (exactly 0 and 1 excluded) and soft labels in [0, 1]."""
    p = 1.0 / (1.0 + np.exp(-2.0 * rng.standard_normal(shape)))
    return {"input": _q(np.clip(p, 1e-3, 1 - 1e-3), dtype), "target": _q(rng.uniform(0, 1, shape), dtype)}


def logit_label_inputs(rng, shape, dtype):
    """logits ~ N(0, 2.5^2) and soft labels in [0, 1]."""
    return {"input": _q(LOGIT_SCALE * rng.standard_normal(shape), dtype), "target": _q(rng.uniform(0, 1, shape), dtype)}


def hinge_inputs(rng, shape, dtype):
    """scores ~ N(0, 1) and labels in {-1, +1}."""
    return {"input": _q(rng.standard_normal(shape), dtype),
            "target": _q(np.where(rng.random(shape) < 0.5, -1.0, 1.0), dtype)}


def kl_div_inputs(rng, shape, dtype):
    """log-probabilities log U(0.01, 1) and probabilities U(0, 1), a tenth of them exactly 0."""
    p = rng.uniform(0, 1, shape)
    p[rng.random(shape) < 0.1] = 0.0
    return {"input": _q(np.log(rng.uniform(0.01, 1.0, shape)), dtype), "target": _q(p, dtype)}


def multi_margin_inputs(rng, shape, dtype):
    """scores ~ N(0, 1) of (N, C) and class indices."""
    return {"input": _q(rng.standard_normal(shape), dtype), "target": rng.integers(0, shape[-1], size=shape[:-1])}


def triplet_inputs(rng, shape, dtype):
    """anchors, positives (anchors + N(0, 0.5^2)) and negatives ~ N(0, 1) of (N, D)."""
    a = rng.standard_normal(shape)
    return {"anchor": _q(a, dtype), "positive": _q(a + 0.5 * rng.standard_normal(shape), dtype),
            "negative": _q(rng.standard_normal(shape), dtype)}


def distillation_inputs(rng, shape, dtype):
    """student and teacher logits ~ N(0, 2.5^2) of (N, V)."""
    return {"student_logits": _q(LOGIT_SCALE * rng.standard_normal(shape), dtype),
            "teacher_logits": _q(LOGIT_SCALE * rng.standard_normal(shape), dtype)}


def sequence_inputs(rng, shape, dtype):
    """logits (B, T, V) ~ N(0, 2.5^2), token ids with a fifth ignored (-100), and grad_seq (B,)
    ~ N(0, 1) for the ``_with_grad`` twin."""
    t = rng.integers(0, shape[-1], size=shape[:-1])
    t[rng.random(shape[:-1]) < 0.2] = -100
    return {"logits": _q(LOGIT_SCALE * rng.standard_normal(shape), dtype), "target": t,
            "grad_seq": rng.standard_normal(shape[:-2])}


def dpo_inputs(rng, shape, dtype):
    """the four log-probability vectors (B,) ~ -50 + N(0, 5^2)."""
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    return {n: _q(-50.0 + 5.0 * rng.standard_normal(shape), dtype) for n in names}


def info_nce_inputs(rng, shape, dtype):
    """queries and keys (N, D) ~ N(0, 1/D); keys = queries + noise (positives on the diagonal)."""
    q = rng.standard_normal(shape) / np.sqrt(shape[-1])
    return {"query": _q(q, dtype), "keys": _q(q + 0.5 * rng.standard_normal(shape) / np.sqrt(shape[-1]), dtype)}


_ELEM_OPERANDS = (Operand("input", "float", "first"), Operand("target", "float", "first", broadcast=True),
                  Operand("weight", "weight", "first", required=False, broadcast=True))
_RED_THREADS = (("reduction", "reduction"), ("num_threads", "num_threads"))


def _field(module, name, family, operands, options, make_inputs, test_shapes, *, variants=({},),
           reductions=("mean", "sum", "none"), grad_operands=(), has_weight=False, inplace=None):
    """A loss of issue 6; ``inplace``: the operand that ``grad_out`` may be (None: no ``grad_out``)."""
    return LossSpec(name=name, family=family, func=getattr(module, name),
                    with_grad=getattr(module, name + "_with_grad"), reference=getattr(reference, name),
                    reference_grad=getattr(reference, name + "_grad"), operands=operands, options=options,
                    make_inputs=make_inputs, tolerances=FIELD_TOLERANCES, tolerance=field_tolerance,
                    variants=variants, reductions=reductions, has_weight=has_weight, test_shapes=test_shapes,
                    grad_operands=grad_operands, out="grad_out" if inplace else None, inplace=inplace)


_FIELD = [
    _field(elementwise, "binary_cross_entropy", "elementwise", _ELEM_OPERANDS, _RED_THREADS, bce_inputs,
           ((7,), (3, 5, 40)), has_weight=True, inplace="input"),
    _field(elementwise, "binary_cross_entropy_with_logits", "elementwise",
           _ELEM_OPERANDS + (Operand("pos_weight", "weight", "classes", required=False, broadcast=True),),
           _RED_THREADS, logit_label_inputs, ((7,), (3, 5, 40)), has_weight=True, inplace="input"),
    _field(elementwise, "sigmoid_focal_loss", "elementwise", _ELEM_OPERANDS[:2],
           (("alpha", "real"), ("gamma", "nonnegative")) + _RED_THREADS, logit_label_inputs, ((7,), (3, 5, 40)),
           variants=({}, {"alpha": -1.0, "gamma": 0.0}, {"alpha": 0.75, "gamma": 1.5}), inplace="input"),
    _field(elementwise, "hinge_loss", "elementwise", _ELEM_OPERANDS[:2], (("margin", "real"),) + _RED_THREADS,
           hinge_inputs, ((7,), (3, 5, 40)), variants=({}, {"margin": 0.5}), inplace="input"),
    _field(elementwise, "kl_div", "elementwise", _ELEM_OPERANDS[:2],
           (("reduction", "reduction"), ("log_target", "bool"), ("num_threads", "num_threads")), kl_div_inputs,
           ((7,), (3, 5, 40)), reductions=("mean", "sum", "none", "batchmean"), inplace="input"),
    _field(margin, "multi_margin_loss", "margin",
           (Operand("input", "float", "first"), Operand("target", "index", "rows"),
            Operand("weight", "weight", "classes", required=False)),
           (("p", "p_norm"), ("margin", "real")) + _RED_THREADS, multi_margin_inputs, ((9, 7), (3, 41)),
           variants=({}, {"p": 2, "margin": 0.5}), has_weight=True, inplace="input"),
    _field(margin, "triplet_margin_loss", "margin",
           (Operand("anchor", "float", "first"), Operand("positive", "float", "first"),
            Operand("negative", "float", "first")),
           (("margin", "positive"), ("p", "p_norm"), ("eps", "nonnegative"), ("swap", "bool")) + _RED_THREADS,
           triplet_inputs, ((9, 7), (4, 130)),
           variants=({}, {"p": 1.0, "swap": True}, {"p": 3.0, "margin": 2.0})),
    _field(distillation, "kl_div_logits", "distillation",
           (Operand("student_logits", "float", "first"), Operand("teacher_logits", "float", "first"),
            Operand("target", "index", "rows", required=False)),
           (("temperature", "positive"), ("reduction", "reduction"), ("ignore_index", "index"),
            ("num_threads", "num_threads")), distillation_inputs, ((9, 7), (3, 41)),
           variants=({}, {"temperature": 2.0}, {"temperature": 0.5}),
           reductions=("batchmean", "mean", "sum", "none"), inplace="student_logits"),
    _field(sequence, "sequence_log_probs", "sequence",
           (Operand("logits", "float", "first"), Operand("target", "index", "rows")),
           (("ignore_index", "index"), ("average", "bool"), ("num_threads", "num_threads")), sequence_inputs,
           ((2, 5, 7), (3, 4, 41)), variants=({}, {"average": True}), reductions=("none",),
           grad_operands=(Operand("grad_seq", "float", "batch"),), inplace="logits"),
    _field(sequence, "dpo_loss", "sequence",
           (Operand("policy_chosen_logps", "float", "first"), Operand("policy_rejected_logps", "float", "first"),
            Operand("ref_chosen_logps", "float", "first", required=False),
            Operand("ref_rejected_logps", "float", "first", required=False)),
           (("beta", "positive"), ("loss_type", "choice"), ("label_smoothing", "unit_interval"),
            ("reduction", "reduction"), ("return_rewards", "bool")), dpo_inputs, ((7,), (64,)),
           variants=({}, {"loss_type": "sigmoid", "label_smoothing": 0.1}, {"loss_type": "robust",
                     "label_smoothing": 0.2}, {"loss_type": "ipo", "beta": 0.5}, {"loss_type": "hinge"})),
    _field(sequence, "info_nce_loss", "sequence",
           (Operand("query", "float", "first"), Operand("keys", "float", "first")),
           (("temperature", "positive"), ("symmetric", "bool")) + _RED_THREADS, info_nce_inputs, ((9, 7), (16, 33)),
           variants=({}, {"symmetric": True, "temperature": 0.5})),
]
REGISTRY.update((s.name, s) for s in _FIELD)


def field_specs() -> dict[str, LossSpec]:
    """The losses of issue 6 (families :data:`FIELD_FAMILIES`), in registry order."""
    return {n: s for n, s in REGISTRY.items() if s.family in FIELD_FAMILIES}
