"""The single registry of losses.

One entry per public loss: the function, its ``_with_grad`` twin, the NumPy
reference (and reference gradient), the options it takes, how to make realistic
inputs, and the error tolerances we promise.  The conformance tests, the
benchmarks in ``benchmarks/`` and ``python -m fastloss bench`` all iterate over
``REGISTRY``, so adding a loss is one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fastloss import reference, regression

# Relative tolerances vs. the float64 reference, by the dtype of the INPUT.
#   loss:  reductions are accumulated in double and rounded once, so a float32
#          result is within a few float32 ulp (2**-23 ~ 1.19e-7) of the exact value;
#   elem:  elementwise outputs (reduction="none") are one rounding of a double;
#   grad:  one rounding into the input dtype (float16: 2**-11 relative, with an
#          absolute floor for results in the float16 subnormal range).
F32_ULP = 2.0 ** -23
TOLERANCES = {
    "float64": {"loss": 1e-12, "elem": 1e-15, "grad": 1e-15, "grad_atol": 0.0},
    "float32": {"loss": 4 * F32_ULP, "elem": F32_ULP, "grad": F32_ULP, "grad_atol": 1e-45},
    "float16": {"loss": 4 * F32_ULP, "elem": F32_ULP, "grad": 2.0 ** -11, "grad_atol": 2.0 ** -24},
    "bfloat16": {"loss": 4 * F32_ULP, "elem": F32_ULP, "grad": 2.0 ** -8, "grad_atol": 1e-38},
}


def regression_inputs(rng: np.random.Generator, shape, dtype) -> dict:
    """input, target ~ N(0, 1) of `shape` and `dtype` (values quantized to the dtype)."""
    dt = np.dtype(dtype)
    if dt in (np.float32, np.float64):  # generated directly: no float64 temporary at 1e8
        return {"input": rng.standard_normal(shape, dtype=dt), "target": rng.standard_normal(shape, dtype=dt)}
    x = rng.standard_normal(shape).astype(dtype)
    t = rng.standard_normal(shape).astype(dtype)
    return {"input": x, "target": t}


@dataclass(frozen=True)
class LossSpec:
    name: str
    family: str
    func: Callable
    with_grad: Callable
    reference: Callable
    reference_grad: Callable
    make_inputs: Callable = regression_inputs
    #: keyword options that tests sweep over (each dict is one variant)
    variants: tuple = ({},)
    reductions: tuple = ("mean", "sum", "none")
    has_weight: bool = True
    has_axis: bool = True
    #: arrays read per element by the forward kernel (for GB/s): input and target
    arrays_read: int = 2
    #: options that must be rejected: (kwargs, exception type, word the message must contain)
    bad_options: tuple = field(default_factory=tuple)


def _reg(name, variants=({},), reductions=("mean", "sum", "none"), bad=()):
    return LossSpec(
        name=name, family="regression",
        func=getattr(regression, name), with_grad=getattr(regression, name + "_with_grad"),
        reference=getattr(reference, name), reference_grad=getattr(reference, name + "_grad"),
        variants=variants, reductions=reductions, bad_options=bad)


REGISTRY: dict[str, LossSpec] = {
    s.name: s
    for s in [
        _reg("mse_loss"),
        _reg("l1_loss"),
        _reg("huber_loss", variants=({}, {"delta": 0.3}, {"delta": 2.5}),
             bad=(({"delta": 0.0}, ValueError, "delta"), ({"delta": -1.0}, ValueError, "delta"),
                  ({"delta": float("nan")}, ValueError, "delta"), ({"delta": "1"}, TypeError, "delta"))),
        _reg("smooth_l1_loss", variants=({}, {"beta": 0.0}, {"beta": 0.3}, {"beta": 2.5}),
             bad=(({"beta": -0.5}, ValueError, "beta"), ({"beta": float("inf")}, ValueError, "beta"),
                  ({"beta": None}, TypeError, "beta"))),
        _reg("rmse", reductions=("mean",)),
    ]
}


def get(name: str) -> LossSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; known: {', '.join(REGISTRY)}") from None
