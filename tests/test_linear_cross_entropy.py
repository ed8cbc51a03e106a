"""fastloss.linear: fused linear + cross-entropy against our own cross_entropy on materialized
logits, the float64 reference, torch 2.13's F.linear_cross_entropy (reference and chunked
paths), finite differences; odd shapes, dtypes, threads, ISAs, bad input."""
from __future__ import annotations

import numpy as np
import pytest

import fastloss
from fastloss import reference as ref
from fastloss.linear import default_chunk_size, linear_cross_entropy, linear_cross_entropy_with_grad
from fl_testing import assert_close, assert_identical, fd_gradient, get_dtype


def _problem(rng, N=23, H=9, V=31, dtype=np.float64, ignore_every=0, bias=True):
    x = rng.standard_normal((N, H)).astype(dtype)
    W = (rng.standard_normal((V, H)) * 0.7).astype(dtype)
    b = rng.standard_normal(V).astype(dtype) if bias else None
    t = rng.integers(0, V, N)
    if ignore_every:
        t[::ignore_every] = -100
    return x, W, b, t


def _ours_materialized(x, W, b, t, **kw):
    """Our own cross_entropy on the materialized float64 logits, gradients by the chain rule."""
    x64, W64 = np.asarray(x, np.float64), np.asarray(W, np.float64)
    logits = x64 @ W64.T + (0.0 if b is None else np.asarray(b, np.float64))
    loss, G = fastloss.cross_entropy_with_grad(logits, t, **kw)
    G2 = G.reshape(-1, W.shape[0])
    return loss, (G2 @ W64).reshape(x.shape), G2.T @ x64.reshape(G2.shape[0], W.shape[1]), (None if b is None else G2.sum(0))


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.2},
    {"z_loss": 1e-2},
    {"softcap": 3.0},
    {"weight": "class"},
    {"sample_weight": "rows"},
    {"weight": "class", "sample_weight": "rows", "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0,
     "reduction": "mean"},
]


def _materialize_options(opts, rng, N, V):
    kw = dict(opts)
    if kw.get("weight") == "class":
        kw["weight"] = rng.uniform(0.2, 2.0, V)
    if kw.get("sample_weight") == "rows":
        kw["sample_weight"] = rng.uniform(0.0, 2.0, N)
    return kw


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_matches_cross_entropy_on_materialized_logits(rng, opts, chunk):
    N, V = 23, 31
    x, W, b, t = _problem(rng, N=N, V=V, ignore_every=4)
    kw = _materialize_options(opts, rng, N, V)
    eloss, egx, egw, egb = _ours_materialized(x, W, b, t, **kw)
    loss = linear_cross_entropy(x, W, t, linear_bias=b, chunk_size=chunk, **kw)
    assert_close(loss, eloss, rtol=1e-12, atol=1e-14, what="loss")
    loss2, gx, gw, gb = linear_cross_entropy_with_grad(x, W, t, linear_bias=b, chunk_size=chunk, **kw)
    assert_identical(loss2, loss, what="loss of _with_grad")
    assert_close(gx, egx, rtol=1e-11, atol=1e-14, what="grad_input")
    assert_close(gw, egw, rtol=1e-11, atol=1e-14, what="grad_linear_weight")
    assert_close(gb, egb, rtol=1e-11, atol=1e-14, what="grad_linear_bias")
    # and the independent float64 NumPy oracle
    rkw = {k: v for k, v in kw.items()}
    assert_close(loss, ref.linear_cross_entropy(x, W, t, linear_bias=b, **rkw), rtol=1e-10, atol=1e-13,
                 what="loss vs reference")
    rgx, rgw, rgb = ref.linear_cross_entropy_grad(x, W, t, linear_bias=b, **rkw)
    assert_close(gx, rgx, rtol=1e-10, atol=1e-13, what="grad_input vs reference")
    assert_close(gw, rgw, rtol=1e-10, atol=1e-13, what="grad_linear_weight vs reference")
    assert_close(gb, rgb, rtol=1e-10, atol=1e-13, what="grad_linear_bias vs reference")


@pytest.mark.parametrize("dtype_name", ["float16", "float32", "float64", "bfloat16"])
def test_dtypes(rng, dtype_name, isa):
    dt = get_dtype(dtype_name)
    x, W, b, t = _problem(rng, N=19, H=12, V=40, dtype=np.float64, ignore_every=6)
    x, W, b = x.astype(dt), W.astype(dt), b.astype(dt)
    loss, gx, gw, gb = linear_cross_entropy_with_grad(x, W, t, linear_bias=b, chunk_size=7, label_smoothing=0.1)
    assert loss.dtype == (np.float64 if dtype_name == "float64" else np.float32)
    assert gx.dtype == dt and gw.dtype == dt and gb.dtype == dt
    assert gx.shape == x.shape and gw.shape == W.shape and gb.shape == b.shape
    # expected: float64 math on the same (rounded) inputs
    rl = ref.linear_cross_entropy(x, W, t, linear_bias=b, label_smoothing=0.1)
    rgx, rgw, rgb = ref.linear_cross_entropy_grad(x, W, t, linear_bias=b, label_smoothing=0.1)
    rtol = {"float64": 1e-12, "float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype_name]
    scale = {"float64": 1e-14, "float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}[dtype_name]
    assert_close(loss, rl, rtol=rtol, what=f"loss {dtype_name}")
    assert_close(gx, rgx, rtol=rtol, atol=scale * np.abs(rgx).max(), what=f"grad_input {dtype_name}")
    assert_close(gw, rgw, rtol=rtol, atol=scale * np.abs(rgw).max(), what=f"grad_linear_weight {dtype_name}")
    assert_close(gb, rgb, rtol=rtol, atol=scale * np.abs(rgb).max(), what=f"grad_linear_bias {dtype_name}")


def test_soft_targets(rng):
    N, H, V = 11, 5, 13
    x, W, b, _ = _problem(rng, N=N, H=H, V=V)
    q = rng.dirichlet(np.ones(V), N)
    for red in ("mean", "sum", "none"):
        kw = {"reduction": red, "label_smoothing": 0.1, "sample_weight": rng.uniform(0.5, 1.5, N)}
        eloss, egx, egw, egb = _ours_materialized(x, W, b, q, **kw)
        loss, gx, gw, gb = linear_cross_entropy_with_grad(x, W, q, linear_bias=b, chunk_size=4, **kw)
        assert_close(loss, eloss, rtol=1e-12, atol=1e-14, what=f"soft loss {red}")
        assert_close(gx, egx, rtol=1e-11, atol=1e-14, what="soft grad_input")
        assert_close(gw, egw, rtol=1e-11, atol=1e-14, what="soft grad_linear_weight")
        assert_close(gb, egb, rtol=1e-11, atol=1e-14, what="soft grad_linear_bias")


@pytest.mark.parametrize("N,H,V,chunk", [(10, 4, 1, 3), (7, 1, 9, 2), (1, 3, 5, None), (0, 3, 5, 2),
                                         (17, 6, 11, 16), (17, 6, 11, 17), (17, 6, 11, 100), (5, 0, 4, 2)])
def test_odd_shapes(rng, N, H, V, chunk):
    x, W, b, t = _problem(rng, N=N, H=H, V=V)
    eloss, egx, egw, egb = _ours_materialized(x, W, b, t, reduction="sum")
    loss, gx, gw, gb = linear_cross_entropy_with_grad(x, W, t, linear_bias=b, chunk_size=chunk, reduction="sum")
    assert_close(loss, eloss, rtol=1e-12, atol=1e-14, what="loss")
    assert_close(gx, egx, rtol=1e-11, atol=1e-14, what="grad_input")
    assert_close(gw, egw, rtol=1e-11, atol=1e-14, what="grad_linear_weight")
    assert_close(gb, egb, rtol=1e-11, atol=1e-14, what="grad_linear_bias")


def test_all_rows_ignored(rng):
    x, W, b, t = _problem(rng, N=9, H=4, V=6)
    t[:] = -100
    loss, gx, gw, gb = linear_cross_entropy_with_grad(x, W, t, linear_bias=b, chunk_size=4)
    assert np.isnan(loss)                                  # torch: mean over no rows is nan
    assert not gx.any() and not gw.any() and not gb.any()
    assert linear_cross_entropy(x, W, t, reduction="sum") == 0.0
    assert not linear_cross_entropy(x, W, t, reduction="none").any()


def test_batched_and_unbatched_rows(rng):
    B, T, H, V = 3, 5, 4, 7
    x = rng.standard_normal((B, T, H))
    W = rng.standard_normal((V, H))
    t = rng.integers(0, V, (B, T))
    t[1, 2] = -100
    eloss, egx, egw, _ = _ours_materialized(x, W, None, t, reduction="none")
    loss, gx, gw, gb = linear_cross_entropy_with_grad(x, W, t, reduction="none", chunk_size=4)
    assert loss.shape == (B, T) and gx.shape == (B, T, H) and gb is None
    assert_close(loss, eloss, rtol=1e-12, atol=1e-14, what="(B, T) loss")
    assert_close(gx, egx, rtol=1e-11, atol=1e-14, what="(B, T) grad_input")
    assert_close(gw, egw, rtol=1e-11, atol=1e-14, what="(B, T) grad_linear_weight")
    # a single row (H,) with a 0-d target
    l1 = linear_cross_entropy(x[0, 0], W, t[0, 0], reduction="none")
    assert l1.shape == () and np.isclose(l1, eloss[0, 0], rtol=1e-12)


def test_strided_inputs(rng):
    big = rng.standard_normal((30, 2, 12))
    x = big[::3, 1, ::2]                               # (10, 6), no unit stride anywhere
    Wbig = rng.standard_normal((9, 14))
    W = Wbig[:, 1:13:2]                                # (9, 6) strided
    b = rng.standard_normal(18)[::2]
    t = rng.integers(0, 9, 20)[::2]
    t[3] = -100
    eloss, egx, egw, egb = _ours_materialized(np.ascontiguousarray(x), np.ascontiguousarray(W), b, t)
    loss, gx, gw, gb = linear_cross_entropy_with_grad(x, W, t, linear_bias=b, chunk_size=3)
    assert_close(loss, eloss, rtol=1e-12, what="loss")
    assert_close(gx, egx, rtol=1e-11, atol=1e-14, what="grad_input")
    assert_close(gw, egw, rtol=1e-11, atol=1e-14, what="grad_linear_weight")
    x3 = rng.standard_normal((4, 6, 5))[:, ::2, :]    # (4, 3, 5) rows that do not merge
    t3 = rng.integers(0, 9, (4, 3))
    W3 = rng.standard_normal((9, 5))
    e3 = _ours_materialized(np.ascontiguousarray(x3), W3, None, t3)
    r3 = linear_cross_entropy_with_grad(x3, W3, t3, chunk_size=5)
    assert_close(r3[0], e3[0], rtol=1e-12, what="3-D strided loss")
    assert_close(r3[1], e3[1], rtol=1e-11, atol=1e-14, what="3-D strided grad_input")


def test_finite_differences(rng):
    N, H, V = 4, 3, 5
    x, W, b, t = _problem(rng, N=N, H=H, V=V)
    t[1] = -100
    kw = {"label_smoothing": 0.1, "z_loss": 0.01, "softcap": 4.0, "weight": rng.uniform(0.5, 1.5, V)}
    _, gx, gw, gb = linear_cross_entropy_with_grad(x, W, t, linear_bias=b, chunk_size=3, **kw)
    h = 1e-4
    fgx = fd_gradient(lambda v: float(linear_cross_entropy(v, W, t, linear_bias=b, chunk_size=3, **kw)), x, h)
    fgw = fd_gradient(lambda v: float(linear_cross_entropy(x, v, t, linear_bias=b, chunk_size=3, **kw)), W, h)
    fgb = fd_gradient(lambda v: float(linear_cross_entropy(x, W, t, linear_bias=v, chunk_size=3, **kw)), b, h)
    assert_close(gx, fgx, rtol=1e-7, atol=1e-9, what="grad_input vs finite differences")
    assert_close(gw, fgw, rtol=1e-7, atol=1e-9, what="grad_linear_weight vs finite differences")
    assert_close(gb, fgb, rtol=1e-7, atol=1e-9, what="grad_linear_bias vs finite differences")


def test_extreme_values(rng):
    x, W, b, t = _problem(rng, N=6, H=4, V=7)
    x = x * 1e3                                        # logits ~ 1e3: the kernel's max shift keeps it finite
    eloss, egx, egw, egb = _ours_materialized(x, W, b, t)
    loss, gx, gw, gb = linear_cross_entropy_with_grad(x, W, t, linear_bias=b, chunk_size=4)
    assert np.isfinite(loss) and np.isfinite(gx).all() and np.isfinite(gw).all()
    assert_close(loss, eloss, rtol=1e-12, what="large logits loss")
    assert_close(gw, egw, rtol=1e-10, atol=1e-9, what="large logits grad_linear_weight")
    xn = x.copy()
    xn[2, 1] = np.nan
    ln = linear_cross_entropy(xn, W, t, reduction="none", chunk_size=4)
    assert np.isnan(ln[2]) and np.isfinite(np.delete(ln, 2)).all()


def test_threads(rng):
    """Our kernel is bitwise reproducible for any thread count; OpenBLAS's single-threaded small
    GEMM sums in another order than its threaded one, so thread counts agree to rounding, and
    the same count is bitwise repeatable."""
    x, W, b, t = _problem(rng, N=300, H=64, V=257, dtype=np.float32, ignore_every=7)
    runs = {n: linear_cross_entropy_with_grad(x, W, t, linear_bias=b, chunk_size=128, num_threads=n)
            for n in (1, 2, 3)}
    for n in (2, 3):
        for a, e, what in zip(runs[n], runs[1], ("loss", "grad_input", "grad_linear_weight", "grad_linear_bias")):
            assert_close(a, e, rtol=1e-5, atol=1e-7 * np.abs(e).max(), what=f"{what} threads={n} vs 1")
        again = linear_cross_entropy_with_grad(x, W, t, linear_bias=b, chunk_size=128, num_threads=n)
        for a, e in zip(again, runs[n]):
            assert_identical(a, e, what=f"repeat threads={n}")


def test_default_chunk_size_rule():
    assert default_chunk_size(4096, 1024, 32000) == 512
    assert default_chunk_size(8192, 2048, 128256) == 1024
    assert default_chunk_size(8192, 8192, 262144) == 512            # 4096 rows: over 512 MiB
    assert default_chunk_size(10, 1024, 32000) == 10
    assert default_chunk_size(100000, 100000, 10 ** 6) * 10 ** 6 * 4 <= 512 * 2 ** 20
    assert default_chunk_size(100000, 100000, 10 ** 9) == 1
    assert default_chunk_size(100000, 8, 100) == 256


# ---- torch ------------------------------------------------------------------------------------

def _torch_lce(torch, x, W, b, t, chunked, **kw):
    F = torch.nn.functional
    xt = torch.tensor(x, requires_grad=True)
    Wt = torch.tensor(W, requires_grad=True)
    bt = None if b is None else torch.tensor(b, requires_grad=True)
    wt = None if kw.get("weight") is None else torch.tensor(kw["weight"].astype(x.dtype))
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4, chunking_method=None) if chunked else None
    loss = F.linear_cross_entropy(xt, Wt, torch.tensor(t), linear_bias=bt, weight=wt,
                                  reduction=kw.get("reduction", "mean"), ignore_index=kw.get("ignore_index", -100),
                                  label_smoothing=kw.get("label_smoothing", 0.0), options=opts)
    loss.sum().backward()
    return (loss.detach().numpy(), xt.grad.numpy(), Wt.grad.numpy(), None if bt is None else bt.grad.numpy())


_TORCH_OPTS = [{}, {"reduction": "sum"}, {"reduction": "none"}, {"weight": "class"}, {"ignore_index": 3},
               {"label_smoothing": 0.15, "weight": "class"}]


def _opts_id(o):
    return ",".join(f"{k}={v}" for k, v in o.items()) or "default"


# torch's chunked path sends label_smoothing back to its reference path: that pair is the
# reference case again, so it is not generated
@pytest.mark.parametrize("chunked,opts", [pytest.param(c, o, id=f"{'chunked' if c else 'reference'}-{_opts_id(o)}")
                                          for c in (False, True) for o in _TORCH_OPTS
                                          if not (c and o.get("label_smoothing"))])
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_matches_torch(rng, chunked, opts, dtype_name):
    torch = pytest.importorskip("torch")
    if not hasattr(torch.nn.functional, "linear_cross_entropy"):
        pytest.skip("torch without F.linear_cross_entropy")
    dt = np.dtype(dtype_name)
    N, V = 21, 17
    x, W, b, t = _problem(rng, N=N, H=6, V=V, dtype=dt, ignore_every=5)
    kw = _materialize_options(opts, rng, N, V)
    if "ignore_index" in kw:
        t[t == -100] = kw["ignore_index"]
    tl, tgx, tgw, tgb = _torch_lce(torch, x, W, b, t, chunked, **kw)
    loss, gx, gw, gb = linear_cross_entropy_with_grad(x, W, t, linear_bias=b, chunk_size=6, **kw)
    rtol = 1e-12 if dt == np.float64 else 3e-5
    atol = 1e-14 if dt == np.float64 else 1e-6
    assert_close(loss, tl, rtol=rtol, atol=atol, what="loss vs torch")
    assert_close(gx, tgx, rtol=rtol, atol=atol, what="grad_input vs torch")
    assert_close(gw, tgw, rtol=rtol, atol=atol, what="grad_linear_weight vs torch")
    assert_close(gb, tgb, rtol=rtol, atol=atol, what="grad_linear_bias vs torch")


def test_matches_torch_float16_and_all_ignored(rng):
    torch = pytest.importorskip("torch")
    if not hasattr(torch.nn.functional, "linear_cross_entropy"):
        pytest.skip("torch without F.linear_cross_entropy")
    x, W, b, t = _problem(rng, N=12, H=8, V=10, dtype=np.float16, ignore_every=3)
    # torch on the float32 upcast of the same float16 values (we compute in float32)
    tl, tgx, tgw, tgb = _torch_lce(torch, x.astype(np.float32), W.astype(np.float32), b.astype(np.float32), t,
                                   False)
    loss, gx, gw, gb = linear_cross_entropy_with_grad(x, W, t, linear_bias=b, chunk_size=5)
    assert_close(loss, tl, rtol=1e-5, what="float16 loss vs torch")
    assert_close(gx, tgx.astype(np.float16), rtol=2e-3, atol=1e-4, what="float16 grad_input")
    assert_close(gw, tgw.astype(np.float16), rtol=2e-3, atol=1e-4, what="float16 grad_linear_weight")
    t[:] = -100
    tl = _torch_lce(torch, x.astype(np.float32), W.astype(np.float32), None, t, True)[0]
    assert np.isnan(tl) and np.isnan(linear_cross_entropy(x, W, t))


def test_z_loss_and_softcap_match_torch_autograd(rng):
    """torch has no z_loss / softcap: a small torch formula on the materialized logits."""
    torch = pytest.importorskip("torch")
    N, H, V = 13, 5, 11
    x, W, b, t = _problem(rng, N=N, H=H, V=V, ignore_every=4)
    sw = rng.uniform(0.2, 2.0, N)
    z, cap = 0.05, 2.5
    xt = torch.tensor(x, requires_grad=True)
    Wt = torch.tensor(W, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    logits = cap * torch.tanh((xt @ Wt.T + bt) / cap)
    keep = torch.tensor(t != -100)
    tt = torch.tensor(np.where(t == -100, 0, t))
    lse = torch.logsumexp(logits, dim=1)
    per_row = (lse - logits.gather(1, tt[:, None])[:, 0] + z * lse ** 2) * torch.tensor(sw) * keep
    loss_t = per_row.sum() / (torch.tensor(sw) * keep).sum()
    loss_t.backward()
    loss, gx, gw, gb = linear_cross_entropy_with_grad(x, W, t, linear_bias=b, sample_weight=sw, z_loss=z,
                                                      softcap=cap, chunk_size=4)
    assert_close(loss, loss_t.item(), rtol=1e-12, what="z_loss+softcap loss")
    assert_close(gx, xt.grad.numpy(), rtol=1e-10, atol=1e-14, what="grad_input")
    assert_close(gw, Wt.grad.numpy(), rtol=1e-10, atol=1e-14, what="grad_linear_weight")
    assert_close(gb, bt.grad.numpy(), rtol=1e-10, atol=1e-14, what="grad_linear_bias")


# ---- bad input --------------------------------------------------------------------------------

def _good(rng):
    x, W, b, t = _problem(rng, N=6, H=4, V=5)
    return {"input": x, "linear_weight": W, "target": t, "linear_bias": b}


@pytest.mark.parametrize("change,exc,match", [
    ({"linear_weight": np.zeros((5, 3))}, ValueError, "linear_weight.*in_features"),
    ({"linear_weight": np.zeros(20)}, ValueError, "linear_weight must have shape"),
    ({"linear_weight": np.zeros((0, 4))}, ValueError, "linear_weight has 0 rows"),
    ({"linear_bias": np.zeros(4)}, ValueError, "linear_bias must have shape"),
    ({"input": np.zeros((6, 4), dtype=np.int64)}, TypeError, "input"),
    ({"input": np.float64(1.0)}, ValueError, "input"),
    ({"linear_weight": np.zeros((5, 4), dtype=np.int32)}, TypeError, "linear_weight"),
    ({"target": np.zeros(5, dtype=np.int64)}, ValueError, "target has shape"),
    ({"target": np.zeros(6)}, TypeError, "target"),
    ({"target": np.array([0, 1, 2, 3, 4, 5])}, IndexError, "target 5"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"chunk_size": 2.0}, TypeError, "chunk_size"),
    ({"chunk_size": True}, TypeError, "chunk_size"),
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"weight": np.ones(4)}, ValueError, "weight"),
    ({"sample_weight": np.ones(5)}, ValueError, "sample_weight"),
    ({"label_smoothing": 2.0}, ValueError, "label_smoothing"),
    ({"softcap": -1.0}, ValueError, "softcap"),
    ({"num_threads": 0}, ValueError, "num_threads"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index"),
])
@pytest.mark.parametrize("func", [linear_cross_entropy, linear_cross_entropy_with_grad])
def test_bad_input(rng, func, change, exc, match):
    kw = _good(rng)
    kw.update(change)
    x, W, t = kw.pop("input"), kw.pop("linear_weight"), kw.pop("target")
    with pytest.raises(exc, match=match):
        func(x, W, t, **kw)


def test_without_scipy_blas(rng, monkeypatch):
    """The fallback accumulation (NumPy matmul into a block, then added) when SciPy is missing."""
    import fastloss.linear as lin
    ctl = lin._blas()[1]
    monkeypatch.setattr(lin, "_blas", lambda: (None, ctl))
    monkeypatch.setattr(lin, "_gemm_accumulate", lin._gemm_accumulate)
    x, W, b, t = _problem(rng, N=40, H=300, V=7000, ignore_every=3)   # blocks of 3495 rows of W: 3 blocks
    eloss, egx, egw, egb = _ours_materialized(x, W, b, t)
    loss, gx, gw, gb = linear_cross_entropy_with_grad(x, W, t, linear_bias=b, chunk_size=16)
    assert_close(loss, eloss, rtol=1e-12, what="loss")
    assert_close(gw, egw, rtol=1e-10, atol=1e-15, what="grad_linear_weight (fallback)")
    assert_close(gx, egx, rtol=1e-10, atol=1e-15, what="grad_input (fallback)")


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_weight_gradient_accumulation_paths(rng, monkeypatch, num_threads):
    """One thread: SciPy's in-place GEMM (beta = 1) when SciPy is there; several: NumPy's matmul
    a block of vocabulary rows at a time, then added (here blocks of 16 rows: several per chunk)."""
    import fastloss.linear as lin
    monkeypatch.setattr(lin, "ACC_BLOCK_BYTES", 16 * 200 * 8)
    gemm, ctl = lin._blas()
    used = []
    if gemm is not None:
        spied = {dt: (lambda *a, _f=f, **kw: (used.append("scipy"), _f(*a, **kw))[1]) for dt, f in gemm.items()}
        monkeypatch.setattr(lin, "_blas", lambda: (spied, ctl))
    x, W, b, t = _problem(rng, N=150, H=200, V=97, ignore_every=5)     # chunk 1: 80 of 100 rows kept
    eloss, egx, egw, egb = _ours_materialized(x, W, b, t)
    loss, gx, gw, gb = linear_cross_entropy_with_grad(x, W, t, linear_bias=b, chunk_size=100,
                                                      num_threads=num_threads)
    assert used == (["scipy"] * 2 if gemm is not None and num_threads == 1 else []), used
    assert_close(loss, eloss, rtol=1e-12, what="loss")
    assert_close(gx, egx, rtol=1e-10, atol=1e-15, what="grad_input")
    assert_close(gw, egw, rtol=1e-10, atol=1e-15, what="grad_linear_weight")
    assert_close(gb, egb, rtol=1e-10, atol=1e-15, what="grad_linear_bias")
