"""fastloss.torch: autograd drop-ins for torch.nn.functional losses.

Oracle: torch itself, run in float64 on the same (exactly upcast) values, with gradients from
torch autograd; for the fastloss extensions (z_loss, softcap, sample_weight) and kl_div_logits a
small torch reference written here from the published formulas.  16-bit inputs are compared
with the float64 result at the tolerance of one 16-bit rounding (our kernels compute them in
float32 and round once).
"""
from __future__ import annotations

import inspect
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import fastloss  # noqa: E402
import fastloss.torch as flt  # noqa: E402
from fastloss import _core  # noqa: E402
from fl_testing import SUPPORTED_ISAS, assert_close, assert_identical  # noqa: E402

DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
#: relative error of one rounding to the dtype (float32: the float32 compute, a few roundings)
RTOL = {"float64": 1e-11, "float32": 2e-5, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}
ROOT = Path(__file__).resolve().parents[1]


def _need_bf16(dtype_name):
    if dtype_name == "bfloat16":
        pytest.importorskip("ml_dtypes")


def _np64(t):
    return t.detach().double().numpy()


def _upstream(loss):
    """An upstream gradient exactly representable in every dtype (multiples of 1/4)."""
    if loss.dim() == 0:
        return torch.tensor(0.75, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    return torch.randint(1, 8, loss.shape, generator=g).double() / 4


def compare(ours, ref, x, args=(), kwargs=None, dtype_name="float32", *, ref_kwargs=None, grad=True,
            other_float=()):
    """ours(x_dtype, *args, **kwargs) against ref(x64, *args64, **ref_kwargs) in float64: loss dtype
    and value, and the gradient of (loss * upstream).sum() from autograd.  Float tensors in `args`
    whose positions are in `other_float` are cast to the dtype (and back exactly for the ref)."""
    _need_bf16(dtype_name)
    kwargs = kwargs or {}
    ref_kwargs = kwargs if ref_kwargs is None else ref_kwargs
    dt = DTYPES[dtype_name]
    xo = x.detach().to(dt).clone().requires_grad_(grad)
    a_o = [a.to(dt) if i in other_float else a for i, a in enumerate(args)]
    a_r = [a.double() if i in other_float else a for i, a in enumerate(a_o)]
    lo = ours(xo, *a_o, **kwargs)
    x64 = xo.detach().double().requires_grad_(grad)
    lr = ref(x64, *a_r, **ref_kwargs)
    assert lo.dtype == dt, f"loss dtype {lo.dtype}, expected {dt}"
    assert lo.shape == lr.shape
    rtol = RTOL[dtype_name]
    atol = 1e-300 if dtype_name == "float64" else 1e-6 * float(lr.detach().abs().max().clamp(min=1.0))
    assert_close(_np64(lo), _np64(lr), rtol=rtol, atol=atol, what="loss")
    if not grad:
        return lo
    up = _upstream(lr)
    (lo * up.to(dt)).sum().backward()
    (lr * up).sum().backward()
    assert xo.grad.dtype == dt and xo.grad.shape == xo.shape
    ge = x64.grad.numpy()
    gscale = float(np.max(np.abs(ge))) if ge.size else 1.0
    g_atol = (1e-15 if dtype_name == "float64" else 2e-6) * max(gscale, 1e-30)
    if dtype_name == "float16":
        g_atol = max(g_atol, 2.0 ** -24)
    assert_close(_np64(xo.grad), ge, rtol=rtol, atol=g_atol, what="gradient")
    return lo


# ---- signatures ------------------------------------------------------------------------------------

FUNCS = ["cross_entropy", "nll_loss", "mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss",
         "binary_cross_entropy_with_logits"]
MODULES = ["CrossEntropyLoss", "NLLLoss", "MSELoss", "L1Loss", "HuberLoss", "SmoothL1Loss", "BCEWithLogitsLoss"]
EXTENSIONS = {"cross_entropy": ["z_loss", "softcap", "sample_weight", "num_threads"],
              "CrossEntropyLoss": ["z_loss", "softcap", "num_threads"]}


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", FUNCS + MODULES)
def test_signature_matches_torch(name):
    """torch's parameters first (names, kinds, defaults, order), then our keyword-only extensions."""
    if name in FUNCS:
        ours, theirs = getattr(flt, name), getattr(F, name)
    else:
        ours, theirs = getattr(flt, name).__init__, getattr(torch.nn, name).__init__
    p_ours, p_theirs = _params(ours), _params(theirs)
    assert p_ours[:len(p_theirs)] == p_theirs
    extra = p_ours[len(p_theirs):]
    assert [p[0] for p in extra] == EXTENSIONS.get(name, ["num_threads"])
    assert all(p[1] is inspect.Parameter.KEYWORD_ONLY for p in extra)


def test_kl_div_logits_signature_mirrors_numpy_api():
    assert _params(flt.kl_div_logits) == _params(fastloss.kl_div_logits)


# ---- cross_entropy vs torch ------------------------------------------------------------------------------

def _ce_inputs(shape, seed=0, soft=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    cd = 1 if len(shape) >= 2 else 0
    V = shape[cd]
    rows = shape[:cd] + shape[cd + 1:]
    if soft:
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), cd)
    else:
        t = torch.randint(0, V, rows, generator=g)
    return x, t, V


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", [(7,), (9, 41), (3, 5, 4, 2)])
def test_cross_entropy_layouts_and_dtypes(shape, dtype_name):
    x, t, _ = _ce_inputs(shape)
    for reduction in ("mean", "none"):
        compare(flt.cross_entropy, F.cross_entropy, x, (t,), dict(reduction=reduction), dtype_name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_cross_entropy_options(reduction, weighted, label_smoothing):
    x, t, V = _ce_inputs((13, 11), seed=1)
    t[::4] = -100
    t[1] = 7
    w = torch.rand(V, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5 if weighted else None
    for dtype_name in ("float64", "float32"):
        wd = None if w is None else w.to(DTYPES[dtype_name])
        kw = dict(weight=wd, reduction=reduction, label_smoothing=label_smoothing)
        ref_kw = dict(kw, weight=None if w is None else wd.double())
        compare(flt.cross_entropy, F.cross_entropy, x, (t,), kw, dtype_name, ref_kwargs=ref_kw)
    # a non-default ignore_index (a valid class)
    t7 = torch.where(t == -100, 7, t)
    compare(flt.cross_entropy, F.cross_entropy, x, (t7,), dict(ignore_index=7, reduction=reduction,
                                                                label_smoothing=label_smoothing), "float64")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype_name", ["float64", "float32", "bfloat16"])
def test_cross_entropy_soft_targets(reduction, dtype_name):
    for shape in ((6, 9), (2, 5, 3)):
        x, q, V = _ce_inputs(shape, seed=2, soft=True)
        w = torch.linspace(0.5, 2.0, V, dtype=torch.float64)
        compare(flt.cross_entropy, F.cross_entropy, x, (q, w), dict(reduction=reduction, label_smoothing=0.1),
                dtype_name, other_float=(0, 1))


def _ref_ce_ext(x, t, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                softcap=None, sample_weight=None):
    """The documented fastloss formula, in torch float64 (class indices, classes on dim 1)."""
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    V = x.shape[1]
    lse = torch.logsumexp(x, 1)
    logp = x - lse[:, None]
    w = torch.ones(V, dtype=x.dtype) if weight is None else weight
    ts = torch.where(t != ignore_index, t, 0)
    keep = (t != ignore_index).to(x.dtype)
    wt = w[ts] * keep
    s = torch.ones_like(lse) if sample_weight is None else sample_weight
    eps = label_smoothing
    row = s * ((1 - eps) * wt * -logp.gather(1, ts[:, None])[:, 0] - eps * keep * (w * logp).sum(1) / V
               + z_loss * wt * lse ** 2)
    if reduction == "none":
        return row
    return row.sum() if reduction == "sum" else row.sum() / (s * wt).sum()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_cross_entropy_extensions(reduction, dtype_name):
    x, t, V = _ce_inputs((10, 17), seed=4)
    t[3] = -100
    sw = torch.rand(10, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.25
    w = torch.linspace(0.5, 1.5, V, dtype=torch.float64)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, sample_weight=sw)
    compare(flt.cross_entropy, _ref_ce_ext, x, (t,), kw, dtype_name)


def test_cross_entropy_module_matches_torch():
    x, t, V = _ce_inputs((8, 6), seed=6)
    w = torch.linspace(0.5, 1.5, V, dtype=torch.float64)
    ours = flt.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1, reduction="sum")
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert "weight" in ours.state_dict()
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1, reduction="sum")
    compare(ours, theirs, x, (t,), dtype_name="float64")
    sw = torch.rand(8, dtype=torch.float64)
    lo = flt.CrossEntropyLoss(z_loss=0.01, softcap=3.0)(x, t, sample_weight=sw)
    assert_close(float(lo), float(_ref_ce_ext(x, t, z_loss=0.01, softcap=3.0, sample_weight=sw)), rtol=1e-12)


# ---- nll_loss -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(5,), (9, 6), (3, 6, 2)])
def test_nll_loss(reduction, shape):
    x, t, V = _ce_inputs(shape, seed=7)
    lp = torch.log_softmax(x, 1 if len(shape) >= 2 else 0)
    if t.dim():
        t.view(-1)[::3] = -100
    w = torch.linspace(0.5, 1.5, V, dtype=torch.float64)
    for dtype_name in ("float64", "float32", "bfloat16"):
        compare(flt.nll_loss, F.nll_loss, lp, (t,), dict(reduction=reduction), dtype_name)
        t1 = torch.where(t == -100, 1, t)
        compare(flt.nll_loss, F.nll_loss, lp, (t1, w), dict(reduction=reduction, ignore_index=1), dtype_name,
                other_float=(1,))
    ours, theirs = flt.NLLLoss(weight=w, reduction=reduction), torch.nn.NLLLoss(weight=w, reduction=reduction)
    compare(ours, theirs, lp, (t,), dtype_name="float64")


# ---- regression and BCE ----------------------------------------------------------------------------------------

REGRESSION = [("mse_loss", {}), ("l1_loss", {}), ("huber_loss", {"delta": 0.7}), ("huber_loss", {}),
              ("smooth_l1_loss", {"beta": 0.5}), ("smooth_l1_loss", {"beta": 0.0})]


@pytest.mark.parametrize("name,opts", REGRESSION, ids=lambda v: str(v))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_regression_vs_torch(name, opts, reduction, dtype_name):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 7, generator=g, dtype=torch.float64) * 2
    y = torch.randn(6, 7, generator=g, dtype=torch.float64)
    ours, theirs = getattr(flt, name), getattr(F, name)
    compare(ours, theirs, x, (y,), dict(reduction=reduction, **opts), dtype_name, other_float=(0,))
    if name != "smooth_l1_loss" and dtype_name in ("float64", "float32"):  # torch 2.13: weight=
        w = torch.rand(6, 7, generator=g, dtype=torch.float64) + 0.1
        compare(ours, theirs, x, (y,), dict(reduction=reduction, weight=w.to(DTYPES[dtype_name]), **opts),
                dtype_name, other_float=(0,), ref_kwargs=dict(reduction=reduction, weight=w.to(
                    DTYPES[dtype_name]).double(), **opts))


@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss"])
def test_regression_broadcast_target_and_modules(name):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    y = torch.randn(5, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)    # torch's (and our) target-size warning
        compare(getattr(flt, name), getattr(F, name), x, (y,), dtype_name="float64")
    cls = {"mse_loss": "MSELoss", "l1_loss": "L1Loss", "huber_loss": "HuberLoss", "smooth_l1_loss": "SmoothL1Loss"}
    ours, theirs = getattr(flt, cls[name])(reduction="sum"), getattr(torch.nn, cls[name])(reduction="sum")
    assert isinstance(ours, type(theirs))
    compare(ours, theirs, x, (x.flip(0),), dtype_name="float64")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_bce_with_logits(reduction, dtype_name):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64) * 4
    y = torch.rand(5, 6, generator=g, dtype=torch.float64).round()
    w = torch.rand(6, generator=g, dtype=torch.float64) + 0.2
    pw = torch.rand(6, generator=g, dtype=torch.float64) * 3
    compare(flt.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, (y,),
            dict(reduction=reduction), dtype_name, other_float=(0,))
    compare(flt.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, (y, w),
            dict(reduction=reduction, pos_weight=pw.to(DTYPES[dtype_name])), dtype_name, other_float=(0, 1),
            ref_kwargs=dict(reduction=reduction, pos_weight=pw.to(DTYPES[dtype_name]).double()))
    ours = flt.BCEWithLogitsLoss(weight=w, pos_weight=pw, reduction=reduction)
    theirs = torch.nn.BCEWithLogitsLoss(weight=w, pos_weight=pw, reduction=reduction)
    compare(ours, theirs, x, (y,), dtype_name="float64")


# ---- kl_div_logits ---------------------------------------------------------------------------------------------

def _ref_kl(s, t, temperature=1.0, reduction="batchmean", ignore_index=-100, target=None):
    T = temperature
    rows = T * T * F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                            reduction="none").sum(-1)
    n = rows.numel()
    if target is not None:
        keep = target != ignore_index
        rows, n = rows * keep, int(keep.sum())
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (n * (s.shape[-1] if reduction == "mean" else 1))


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("dtype_name", ["float64", "float32", "bfloat16"])
def test_kl_div_logits(reduction, dtype_name):
    g = torch.Generator().manual_seed(11)
    s = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
    te = torch.randn(3, 4, 9, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, 9, (3, 4), generator=g)
    target[0, 1] = -100
    kw = dict(temperature=2.0, reduction=reduction, target=target)
    compare(flt.kl_div_logits, _ref_kl, s, (te,), kw, dtype_name, other_float=(0,))
    compare(flt.KLDivLogitsLoss(temperature=2.0, reduction=reduction), _ref_kl, s, (te,), dict(target=target),
            dtype_name, other_float=(0,), ref_kwargs=kw)


# ---- autograd behaviour ------------------------------------------------------------------------------------------

GRADCHECK = {
    "cross_entropy": lambda x: flt.cross_entropy(x, torch.tensor([0, 2, 1]), label_smoothing=0.1, z_loss=0.01,
                                                 softcap=5.0, sample_weight=torch.tensor([1.0, 0.5, 2.0]),
                                                 weight=torch.tensor([1.0, 2.0, 0.5, 1.0]), reduction="none"),
    "cross_entropy_soft": lambda x: flt.cross_entropy(x, torch.softmax(torch.ones(3, 4).double().cumsum(1), 1)),
    "nll_loss": lambda x: flt.nll_loss(x, torch.tensor([0, 2, 1]), weight=torch.tensor([1.0, 2.0, 0.5, 1.0])),
    "mse_loss": lambda x: flt.mse_loss(x, torch.zeros(3, 4).double(), reduction="none"),
    "l1_loss": lambda x: flt.l1_loss(x, torch.full((3, 4), 0.01).double()),
    "huber_loss": lambda x: flt.huber_loss(x, torch.zeros(3, 4).double(), delta=0.8,
                                           weight=torch.linspace(0.5, 1.5, 12).double().view(3, 4)),
    "smooth_l1_loss": lambda x: flt.smooth_l1_loss(x, torch.zeros(3, 4).double(), beta=0.6, reduction="sum"),
    "bce_with_logits": lambda x: flt.binary_cross_entropy_with_logits(
        x, torch.eye(3, 4).double(), pos_weight=torch.tensor([1.0, 2.0, 3.0, 0.5]).double()),
    "kl_div_logits": lambda x: flt.kl_div_logits(x, torch.arange(12.0).double().view(3, 4) / 3, temperature=1.5),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck_float64(name):
    x = (torch.arange(12, dtype=torch.float64).view(3, 4) * 0.37).sin().mul(2).requires_grad_()
    assert torch.autograd.gradcheck(GRADCHECK[name], (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_double_backward_is_an_error(name):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(GRADCHECK[name](x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|twice|differentiable"):
        g.sum().backward()


def test_no_grad_runs_the_forward_only_kernel(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the gradient kernel ran")
    for name in ("cross_entropy_with_grad", "mse_loss_with_grad", "kl_div_logits_with_grad",
                 "binary_cross_entropy_with_logits_with_grad"):
        monkeypatch.setattr(fastloss, name, boom)
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        for loss in (flt.cross_entropy(x, t), flt.mse_loss(x, x.detach() + 1), flt.kl_div_logits(x, x.detach()),
                     flt.binary_cross_entropy_with_logits(x, torch.ones(4, 5))):
            assert not loss.requires_grad
    loss = flt.cross_entropy(x.detach(), t)     # nothing requires grad
    assert not loss.requires_grad
    assert_close(float(loss), float(F.cross_entropy(x.detach(), t)), rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retain_graph_and_accumulation(reduction):
    x0 = torch.randn(6, 10, dtype=torch.float64)
    t = torch.randint(0, 10, (6,))
    x = x0.clone().requires_grad_()
    loss = flt.cross_entropy(x, t, reduction=reduction).sum()
    loss.backward(retain_graph=True)
    g1 = x.grad.clone()
    loss.backward()                     # recomputed from the saved inputs
    assert_close(x.grad.numpy(), 2 * g1.numpy(), rtol=1e-15)
    x_ref = x0.clone().requires_grad_()
    F.cross_entropy(x_ref, t, reduction=reduction).sum().backward()
    assert_close(g1.numpy(), x_ref.grad.numpy(), rtol=1e-12, atol=1e-16)
    # two separate forward/backward calls accumulate into .grad
    x.grad = None
    for _ in range(2):
        flt.cross_entropy(x, t, reduction=reduction).sum().backward()
    assert_close(x.grad.numpy(), 2 * g1.numpy(), rtol=1e-15)
    assert torch.equal(x.detach(), x0)  # the input is never modified
    with pytest.raises(RuntimeError, match="second time|freed"):
        loss.backward()


def test_inplace_modification_after_forward_is_detected_on_recompute():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = x * 1.0
    loss = flt.mse_loss(y, torch.zeros(3, 4, dtype=torch.float64))
    loss.backward(retain_graph=True)
    with torch.no_grad():
        y.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---- zero-copy and memory ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
def test_numpy_views_share_memory(dtype_name):
    _need_bf16(dtype_name)
    t = torch.randn(6, 10).to(DTYPES[dtype_name])[1:5, 2:9]       # strided view
    a = flt._numpy(t)
    assert a.__array_interface__["data"][0] == t.data_ptr()
    assert a.shape == tuple(t.shape) and a.strides == tuple(s * t.element_size() for s in t.stride())
    assert_close(a.astype(np.float64), t.double().numpy(), rtol=0.0)
    g = flt._tensor(a)
    assert g.data_ptr() == t.data_ptr() and g.dtype == t.dtype


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_no_n_by_v_allocation_besides_the_gradient(dtype_name):
    """tracemalloc sees NumPy's allocations: forward + backward allocate one gradient (N x V),
    plus O(N) row buffers; the gradient buffer becomes x.grad (autograd takes it, no copy)."""
    _need_bf16(dtype_name)
    N, V = 64, 4000
    x = torch.randn(N, V).to(DTYPES[dtype_name])[:, :V - 1].requires_grad_()   # a strided view, read in place
    t = torch.randint(0, V - 1, (N,))
    flt.cross_entropy(x, t).backward()       # warm-up (imports, caches)
    x.grad = None
    tracemalloc.start()
    try:
        loss = flt.cross_entropy(x, t)
        loss.backward()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grad_bytes = N * (V - 1) * x.element_size()
    assert grad_bytes <= peak < grad_bytes + 64 * N + 65536, (peak, grad_bytes)
    assert x.grad.is_contiguous() and x.grad.dtype == x.dtype


# ---- fallbacks --------------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_warnings():
    flt._warned.clear()
    yield
    flt._warned.clear()


def test_fallback_non_cpu_tensor(fresh_warnings):
    """No GPU here: a `meta` tensor stands for any non-CPU device (torch computes shapes only)."""
    x = torch.empty(4, 5, device="meta", requires_grad=True)
    t = torch.empty(4, dtype=torch.int64, device="meta")
    with pytest.warns(flt.FallbackWarning, match="meta tensors"):
        loss = flt.cross_entropy(x, t)
    assert loss.device.type == "meta"
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # warned once per (function, reason)
        flt.cross_entropy(x, t)
    with pytest.warns(flt.FallbackWarning, match="meta"):
        flt.mse_loss(x, torch.empty(4, 5, device="meta"))


def test_fallback_reasons(fresh_warnings):
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 4, 2])
    with pytest.warns(flt.FallbackWarning, match="size_average"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # torch's own deprecation warning
        warnings.simplefilter("always", flt.FallbackWarning)
        loss = flt.cross_entropy(x, t, reduce=False)
    assert loss.shape == (4,)
    with pytest.warns(flt.FallbackWarning, match="int64"), pytest.raises(RuntimeError, match="Long"):
        flt.cross_entropy(x, t.int())       # torch's own error
    with pytest.warns(flt.FallbackWarning, match="input dtype"), pytest.raises(NotImplementedError):
        flt.mse_loss(torch.ones(3, dtype=torch.complex64), torch.zeros(3, dtype=torch.complex64))
    # a target that requires grad: torch computes both gradients
    y = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    with pytest.warns(flt.FallbackWarning, match="target requires grad"):
        flt.mse_loss(x, y).backward()
    assert_close(y.grad.numpy(), -x.grad.numpy(), rtol=1e-15)
    with pytest.warns(flt.FallbackWarning, match="dtype"):
        flt.binary_cross_entropy_with_logits(x, torch.ones(4, 5))   # float32 target for float64 input
    # extensions in the fallback path use the torch formula
    with pytest.warns(flt.FallbackWarning, match="weight requires grad"):
        w = torch.ones(5, dtype=torch.float64, requires_grad=True)
        lo = flt.cross_entropy(x, t, weight=w, z_loss=0.01, softcap=3.0)
    assert_close(lo.item(), float(_ref_ce_ext(x.detach(), t, z_loss=0.01, softcap=3.0)), rtol=1e-12)
    with pytest.warns(flt.FallbackWarning, match="teacher_logits requires grad"):
        te = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        lo = flt.kl_div_logits(x, te, temperature=2.0)
    assert_close(lo.item(), _ref_kl(x, te, temperature=2.0).item(), rtol=1e-12)


# ---- threads and ISAs ------------------------------------------------------------------------------------------

def test_threads_and_isas_bitwise_identical():
    previous = _core.get_isa()
    x0 = torch.randn(33, 3000) * 4
    t = torch.randint(0, 3000, (33,))
    y0 = torch.randn(33, 3000)
    results = {}
    try:
        for isa in SUPPORTED_ISAS:
            _core.set_isa(isa)
            for n in (1, 2, 3):
                out = []
                for fn, args in ((flt.cross_entropy, (t,)), (flt.mse_loss, (y0,)), (flt.kl_div_logits, (y0,))):
                    x = x0.clone().requires_grad_()
                    loss = fn(x, *args, num_threads=n)
                    loss.backward()
                    out += [loss.detach().numpy(), x.grad.numpy()]
                results[isa, n] = out
    finally:
        _core.set_isa(previous)
    for isa in SUPPORTED_ISAS:
        for n in (2, 3):
            for a, b in zip(results[isa, n], results[isa, 1]):
                assert_identical(a, b, what=f"{isa}, {n} threads")
    x = x0.clone().requires_grad_()
    F.cross_entropy(x, t).backward()
    for isa in SUPPORTED_ISAS:       # every ISA agrees with torch
        assert_close(results[isa, 1][1], x.grad.numpy(), rtol=1e-4, atol=1e-9)


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_bad_input_raises_before_any_work():
    x = torch.randn(4, 5, requires_grad=True)
    with pytest.raises(IndexError, match="out of range"):
        flt.cross_entropy(x, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="reduction"):
        flt.cross_entropy(x, torch.tensor([0, 1, 2, 2]), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        flt.cross_entropy(x, torch.tensor([0, 1, 2, 2]), label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss"):
        flt.cross_entropy(x, torch.tensor([0, 1, 2, 2]), z_loss=-1.0)
    with pytest.raises(ValueError, match="target has shape"):
        flt.cross_entropy(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="delta"):
        flt.huber_loss(x, torch.zeros(4, 5), delta=0.0)
    with pytest.raises(ValueError, match="temperature"):
        flt.kl_div_logits(x, torch.zeros(4, 5), temperature=-1.0)
    with pytest.raises(ValueError, match="num_threads|threads"):
        flt.mse_loss(x, torch.zeros(4, 5), num_threads=0)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        flt.cross_entropy(np.zeros((4, 5)), torch.tensor([0, 1, 2, 2]))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        flt.mse_loss([1.0, 2.0], torch.zeros(2))
    with pytest.raises(TypeError, match="student_logits must be a torch.Tensor"):
        flt.kl_div_logits(np.zeros((2, 3)), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="target"):
        flt.cross_entropy(x, "abc")
    with pytest.raises(ValueError, match="reduction"):
        flt.kl_div_logits(x, torch.zeros(4, 5), reduction="avg")
    assert x.grad is None


# ---- the example -------------------------------------------------------------------------------------------------

def test_example_runs():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "train_tiny_lm_cpu.py"), "--steps", "5",
                        "--vocab", "300", "--threads", "1"], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "max |loss difference|" in r.stdout


def test_operands_that_are_not_tensors_with_grad():
    """A float or NumPy sample_weight, a NumPy target or a Python scalar target work when the input
    requires grad, as they do under no_grad (saved for a second backward as they are)."""
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    sw = np.array([1.0, 2.0, 0.5, 3.0])
    for kwargs in ({"sample_weight": sw}, {"sample_weight": 2.0}, {"sample_weight": sw.tolist()}):
        x.grad = None
        loss = flt.cross_entropy(x, t, **kwargs)
        loss.backward(retain_graph=True)
        g1 = x.grad.clone()
        loss.backward()                                     # recomputed from what was saved
        exp_loss, exp_grad = fastloss.cross_entropy_with_grad(x.detach().numpy(), t.numpy(),
                                                              sample_weight=np.broadcast_to(
                                                                  np.asarray(kwargs["sample_weight"]), (4,)))
        assert float(loss.detach()) == pytest.approx(float(exp_loss), rel=1e-15)
        torch.testing.assert_close(g1, torch.from_numpy(exp_grad), rtol=1e-15, atol=0)
        torch.testing.assert_close(x.grad, 2 * g1, rtol=0, atol=0)
    x.grad = None
    flt.cross_entropy(x, t.numpy()).backward()
    gx = x.grad.clone()
    x.grad = None
    F.cross_entropy(x, t).backward()
    torch.testing.assert_close(gx, x.grad)
    y = torch.randn(6, dtype=torch.float64, requires_grad=True)
    flt.mse_loss(y, torch.tensor(0.5, dtype=torch.float64).expand(6)).backward()
    g_ref = y.grad.clone()
    y.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # torch's size-mismatch warning is not ours to test
        flt.mse_loss(y, 0.5).backward()
    torch.testing.assert_close(y.grad, g_ref)


def test_nll_loss_all_rows_ignored_gives_zero_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    t = torch.full((4,), -100)
    loss = flt.nll_loss(x, t)
    loss.backward()
    xt = x.detach().clone().requires_grad_()
    F.nll_loss(xt, t).backward()
    assert torch.isnan(loss) and torch.isnan(F.nll_loss(xt, t))
    torch.testing.assert_close(x.grad, xt.grad)             # zeros, not NaN
    assert torch.all(x.grad == 0)
