"""fastloss.torch.linear_cross_entropy and LinearCrossEntropyLoss: the fused LM-head loss as an
autograd drop-in for torch 2.13's F.linear_cross_entropy / nn.LinearCrossEntropyLoss.

Oracle: torch's reference path (``options=None``: F.linear then F.cross_entropy) run in float64
on the same (exactly upcast) values, gradients from torch autograd; for our extensions (z_loss,
softcap, sample_weight) a torch formula written here.  16-bit tensors: we compute in float32
and round once, so they are compared at one 16-bit rounding (relative to the largest entry).
"""
from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
if not hasattr(F, "linear_cross_entropy"):
    pytest.skip("torch without F.linear_cross_entropy (torch < 2.13)", allow_module_level=True)

import fastloss.torch as flt  # noqa: E402
from fl_testing import assert_close  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
RTOL = {"float64": 1e-11, "float32": 3e-5, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


def _need(dtype_name):
    if dtype_name == "bfloat16":
        pytest.importorskip("ml_dtypes")


def _inputs(N, H, V, seed=0, bias=True, ignored=True, soft=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    if soft:
        t = torch.softmax(torch.randn(N, V, generator=g, dtype=torch.float64), -1)
    else:
        t = torch.randint(0, V, (N,), generator=g)
        if ignored and N > 2:
            t[1::4] = -100
    return x, W, b, t


def _leaves(dtype, *ts):
    return [None if t is None else t.detach().to(dtype).clone().requires_grad_() for t in ts]


def _upstream(loss):
    if loss.dim() == 0:
        return torch.tensor(0.75, dtype=torch.float64)
    return (torch.arange(loss.numel(), dtype=torch.float64).reshape(loss.shape) % 7 + 1) / 4


def _run(fn, x, W, b, t, **kw):
    loss = fn(x, W, t, linear_bias=b, **kw)
    up = _upstream(loss.detach().double())
    (loss * up.to(loss.dtype)).sum().backward()
    return loss.detach(), x.grad, W.grad, None if b is None else b.grad


def _compare(ours, ref, dtype_name, what=""):
    rtol = RTOL[dtype_name]
    for name, a, r in zip(("loss", "grad_input", "grad_linear_weight", "grad_linear_bias"), ours, ref):
        if r is None:
            assert a is None, f"{what}{name}: expected None"
            continue
        r = r.detach().double().numpy()
        scale = float(np.max(np.abs(r))) if r.size else 1.0
        atol = (1e-14 if dtype_name == "float64" else rtol if dtype_name in ("float16", "bfloat16") else 2e-6) \
            * max(scale, 1e-30)
        assert_close(a.detach().double().numpy(), r, rtol=rtol, atol=atol, what=f"{what}{name}")


# ---- signatures ------------------------------------------------------------------------------------

def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("ours, theirs, extra", [
    (flt.linear_cross_entropy, F.linear_cross_entropy,
     ["z_loss", "softcap", "sample_weight", "chunk_size", "num_threads"]),
    (flt.LinearCrossEntropyLoss.__init__, torch.nn.LinearCrossEntropyLoss.__init__,
     ["z_loss", "softcap", "chunk_size", "num_threads"]),
])
def test_signature_matches_torch(ours, theirs, extra):
    """torch's parameters first (names, kinds, defaults, order), then our keyword-only extensions."""
    p_ours, p_theirs = _params(ours), _params(theirs)
    assert p_ours[:len(p_theirs)] == p_theirs
    assert [p[0] for p in p_ours[len(p_theirs):]] == extra
    assert all(p[1] is inspect.Parameter.KEYWORD_ONLY for p in p_ours[len(p_theirs):])


# ---- values and the three gradients vs torch ------------------------------------------------------------

@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch(dtype_name, reduction, bias):
    _need(dtype_name)
    dt = DTYPES[dtype_name]
    x, W, b, t = _inputs(37, 24, 53, bias=bias)
    xo, Wo, bo = _leaves(dt, x, W, b)
    ours = _run(flt.linear_cross_entropy, xo, Wo, bo, t, reduction=reduction, chunk_size=8)
    assert ours[0].dtype == dt and ours[1].dtype == dt and ours[2].dtype == dt
    xr, Wr, br = _leaves(torch.float64, xo, Wo, bo)        # the same values, exactly upcast
    ref = _run(F.linear_cross_entropy, xr, Wr, br, t, reduction=reduction)
    _compare(ours, ref, dtype_name)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_options_match_torch(label_smoothing, weighted, reduction):
    x, W, b, t = _inputs(41, 16, 30, seed=1)
    w = torch.rand(30, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5 if weighted else None
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, ignore_index=-100)
    xo, Wo, bo = _leaves(torch.float32, x, W, b)
    ours = _run(flt.linear_cross_entropy, xo, Wo, bo, t, weight=None if w is None else w.float(), **kw)
    xr, Wr, br = _leaves(torch.float64, xo, Wo, bo)
    ref = _run(F.linear_cross_entropy, xr, Wr, br, t, weight=None if w is None else w.float().double(), **kw)
    _compare(ours, ref, "float32")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_match_torch(reduction):
    x, W, b, q = _inputs(19, 8, 12, seed=2, soft=True)
    xo, Wo, bo = _leaves(torch.float64, x, W, b)
    ours = _run(flt.linear_cross_entropy, xo, Wo, bo, q, reduction=reduction, label_smoothing=0.1)
    xr, Wr, br = _leaves(torch.float64, x, W, b)
    ref = _run(F.linear_cross_entropy, xr, Wr, br, q, reduction=reduction, label_smoothing=0.1)
    _compare(ours, ref, "float64")
    with pytest.raises(RuntimeError, match="ignore_index cannot be specified"):   # torch's rule
        flt.linear_cross_entropy(xo, Wo, q, ignore_index=-100)


def _ref_ext(x, W, t, linear_bias=None, z_loss=0.0, softcap=None, sample_weight=None, reduction="mean"):
    """Our extensions, from their formula: z = softcap * tanh(logits / softcap), row loss
    s * (lse - z[t] + z_loss * lse**2), mean over sum(s) of non-ignored rows."""
    z = F.linear(x, W, linear_bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, -1)
    active = t != -100
    tt = torch.where(active, t, 0)
    s = torch.ones_like(lse) if sample_weight is None else sample_weight.to(lse.dtype)
    rows = (lse - z.gather(-1, tt[:, None])[:, 0] + z_loss * lse ** 2) * s * active
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / (s * active).sum()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_extensions_match_formula(reduction):
    x, W, b, t = _inputs(29, 12, 40, seed=3)
    sw = torch.rand(29, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2
    kw = dict(z_loss=1e-3, softcap=4.0, reduction=reduction)
    xo, Wo, bo = _leaves(torch.float64, x, W, b)
    ours = _run(flt.linear_cross_entropy, xo, Wo, bo, t, sample_weight=sw, **kw)
    xr, Wr, br = _leaves(torch.float64, x, W, b)

    def ref(x_, W_, t_, linear_bias=None, **k):
        return _ref_ext(x_, W_, t_, linear_bias=linear_bias, sample_weight=sw, **k)

    _compare(ours, _run(ref, xr, Wr, br, t, **kw), "float64")


def test_gradcheck_float64():
    x, W, b, t = _inputs(5, 3, 4, seed=4, ignored=False)
    x, W, b = _leaves(torch.float64, x, W, b)
    t[2] = -100
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x_, W_, b_: flt.linear_cross_entropy(x_, W_, t, linear_bias=b_, reduction=reduction,
                                                        label_smoothing=0.1, chunk_size=2),
            (x, W, b))


# ---- shapes -----------------------------------------------------------------------------------------------

def test_unbatched_input_and_single_class():
    x, W, b, t = _inputs(1, 6, 9, seed=6, ignored=False)
    xo, Wo, bo = _leaves(torch.float64, x[0], W, b)
    ours = _run(flt.linear_cross_entropy, xo, Wo, bo, t[0])
    xr, Wr, br = _leaves(torch.float64, x[0], W, b)
    _compare(ours, _run(F.linear_cross_entropy, xr, Wr, br, t[0]), "float64")
    # V = 1: the loss is 0 and so are the gradients (as torch)
    x1, W1, b1 = _leaves(torch.float32, x.repeat(3, 1), W[:1], b[:1])
    ours = _run(flt.linear_cross_entropy, x1, W1, b1, torch.zeros(3, dtype=torch.int64))
    assert ours[0].item() == 0.0
    assert not ours[1].any() and not ours[2].any() and not ours[3].any()


def test_all_rows_ignored():
    x, W, b, t = _inputs(6, 4, 5, seed=7)
    t[:] = -100
    xo, Wo, bo = _leaves(torch.float32, x, W, b)
    loss = flt.linear_cross_entropy(xo, Wo, t, linear_bias=bo)
    assert torch.isnan(loss)                                # torch: a mean over no rows
    assert torch.isnan(F.linear_cross_entropy(x, W, t, linear_bias=b))
    loss = flt.linear_cross_entropy(xo, Wo, t, linear_bias=bo, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0
    assert not xo.grad.any() and not Wo.grad.any() and not bo.grad.any()


# ---- autograd behaviour ------------------------------------------------------------------------------------

def test_only_the_gradients_that_are_needed(monkeypatch):
    """A frozen head (linear_weight without grad) runs no weight-gradient GEMM; a frozen input no
    input-gradient GEMM; under no_grad the forward-only path runs."""
    x, W, b, t = _inputs(20, 8, 11, seed=8)
    calls = []
    for name in ("accumulate", "gx"):
        orig = getattr(flt._TorchGemm, name)

        def spy(*args, _orig=orig, _name=name):
            calls.append(_name)
            return _orig(*args)

        monkeypatch.setattr(flt._TorchGemm, name, staticmethod(spy))
    xo = x.float().requires_grad_()
    Wf, bf = W.float(), b.float()
    flt.linear_cross_entropy(xo, Wf, t, linear_bias=bf, chunk_size=64).backward()
    assert calls == ["gx"] and Wf.grad is None
    ref_x = x.float().requires_grad_()
    F.linear_cross_entropy(ref_x, Wf, t, linear_bias=bf).backward()
    assert_close(xo.grad.numpy(), ref_x.grad.numpy(), rtol=3e-5, atol=1e-7)
    calls.clear()
    Wo = W.float().requires_grad_()
    flt.linear_cross_entropy(x.float(), Wo, t, chunk_size=64).backward()
    assert calls == ["accumulate"] and Wo.grad is not None
    calls.clear()
    with torch.no_grad():
        loss = flt.linear_cross_entropy(x.float().requires_grad_(), Wo, t)
    assert calls == [] and loss.grad_fn is None


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retain_graph_and_accumulation(reduction):
    x, W, b, t = _inputs(13, 5, 7, seed=9)
    xo, Wo, bo = _leaves(torch.float64, x, W, b)
    loss = flt.linear_cross_entropy(xo, Wo, t, linear_bias=bo, reduction=reduction).sum()
    loss.backward(retain_graph=True)
    first = [g.clone() for g in (xo.grad, Wo.grad, bo.grad)]
    (3 * loss).backward()                    # the recomputed gradients, scaled by 3
    for g, f in zip((xo.grad, Wo.grad, bo.grad), first):
        assert_close(g.numpy(), 4 * f.numpy(), rtol=1e-13, atol=1e-300)


def test_inplace_change_of_the_target_before_backward_is_detected():
    """reduction "none" computes the gradients in backward from the saved target: changing it in
    place in between is torch's in-place modification error, not a silently wrong gradient."""
    x, W, b, t = _inputs(9, 4, 6, seed=14)
    xo, Wo, bo = _leaves(torch.float64, x, W, b)
    loss = flt.linear_cross_entropy(xo, Wo, t, linear_bias=bo, reduction="none")
    t[0] = (t[0] + 1) % 6
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


def test_numpy_blas_limited_to_one_thread_inside_the_call(monkeypatch):
    """Inside the drop-in's GEMM context NumPy's BLAS (the bias gradient's product) is capped at
    one thread, whatever num_threads: its own pool would compete with torch's threads."""
    import fastloss.linear as lin
    limits = []
    real = lin._blas_threads

    def spy(n):
        limits.append(n)
        return real(n)

    monkeypatch.setattr(lin, "_blas_threads", spy)
    x, W, b, t = _inputs(16, 4, 6, seed=15)
    xo, Wo, bo = _leaves(torch.float32, x, W, b)
    flt.linear_cross_entropy(xo, Wo, t, linear_bias=bo, num_threads=2).backward()
    assert limits == [1]


def test_module_matches_torch_module():
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(16, 40, bias=True, label_smoothing=0.05, dtype=torch.float64)
    ours = flt.LinearCrossEntropyLoss(16, 40, bias=True, label_smoothing=0.05, dtype=torch.float64, chunk_size=8)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
    x, _, _, t = _inputs(25, 16, 40, seed=10)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, lb = ours(xa, t), theirs(xb, t)
    la.backward()
    lb.backward()
    assert_close(la.item(), lb.item(), rtol=1e-12)
    assert_close(xa.grad.numpy(), xb.grad.numpy(), rtol=1e-11, atol=1e-16)
    for pa, pb in zip(ours.parameters(), theirs.parameters()):
        assert_close(pa.grad.numpy(), pb.grad.numpy(), rtol=1e-11, atol=1e-16)


def test_threads_and_options():
    """num_threads sets torch's GEMM threads for the call and restores them; the results for 1
    and 2 threads agree (MKL may sum in another order); options.batch_chunk_size is the chunk."""
    x, W, b, t = _inputs(64, 32, 300, seed=11)
    before = torch.get_num_threads()
    res = {}
    for n in (1, 2):
        xo, Wo, bo = _leaves(torch.float32, x, W, b)
        res[n] = _run(flt.linear_cross_entropy, xo, Wo, bo, t, num_threads=n)
        assert torch.get_num_threads() == before
    _compare(res[2], res[1], "float32")
    xo, Wo, bo = _leaves(torch.float32, x, W, b)
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=5)
    _compare(_run(flt.linear_cross_entropy, xo, Wo, bo, t, options=opts), res[1], "float32")


# ---- fallbacks and errors ------------------------------------------------------------------------------------

@pytest.fixture
def fresh_warnings():
    flt._warned.clear()
    yield
    flt._warned.clear()


def test_fallbacks(fresh_warnings):
    x, W, b, t = _inputs(6, 4, 5, seed=12)
    xm = torch.empty(6, 4, device="meta", requires_grad=True)
    with pytest.warns(flt.FallbackWarning, match="meta tensors"):
        loss = flt.linear_cross_entropy(xm, torch.empty(5, 4, device="meta"), torch.empty(6, dtype=torch.int64,
                                                                                              device="meta"))
    assert loss.device.type == "meta"
    # a K-dimensional head: torch's implementation, same result
    W3 = torch.randn(5, 2, 4, dtype=torch.float64)
    t3 = torch.randint(0, 5, (6, 2))
    with pytest.warns(flt.FallbackWarning, match="K-dimensional"):
        lo = flt.linear_cross_entropy(x, W3, t3)
    assert lo.item() == F.linear_cross_entropy(x, W3, t3).item()
    with pytest.warns(flt.FallbackWarning, match="mixed dtypes"), pytest.raises(RuntimeError):
        flt.linear_cross_entropy(x, W.float(), t)                  # torch's own error
    with pytest.warns(flt.FallbackWarning, match="int64"), pytest.raises(RuntimeError):
        flt.linear_cross_entropy(x, W, t.int())
    # extensions in the fallback path: the torch formula
    w = torch.ones(5, dtype=torch.float64, requires_grad=True)
    with pytest.warns(flt.FallbackWarning, match="weight requires grad .*linear_weight and linear_bias"):
        lo = flt.linear_cross_entropy(x, W, t, weight=w, z_loss=0.01, softcap=3.0)
    assert_close(lo.item(), _ref_ext(x, W, t, z_loss=0.01, softcap=3.0).item(), rtol=1e-12)


def test_bad_input():
    x, W, b, t = _inputs(6, 4, 5, seed=13)
    with pytest.raises(RuntimeError, match="dimensionality 1 or 2"):        # torch's rule
        flt.linear_cross_entropy(x.reshape(2, 3, 4), W, t.reshape(2, 3))
    with pytest.raises(ValueError, match="in_features"):
        flt.linear_cross_entropy(x, W[:, :3], t)
    with pytest.raises(ValueError, match="linear_bias"):
        flt.linear_cross_entropy(x, W, t, linear_bias=b[:4])
    with pytest.raises(IndexError, match="out of range"):
        flt.linear_cross_entropy(x, W, torch.full((6,), 5))
    with pytest.raises(ValueError, match="reduction"):
        flt.linear_cross_entropy(x, W, t, reduction="avg")
    with pytest.raises(TypeError, match="torch.Tensor"):
        flt.linear_cross_entropy(x.numpy(), W, t)
    with pytest.raises(TypeError, match="linear_weight must be a torch.Tensor"):
        flt.linear_cross_entropy(x, W.numpy(), t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # no fallback warning on the main path
        flt.linear_cross_entropy(x.requires_grad_(), W, t).backward()
