"""The fused linear + cross-entropy section of `python -m fastloss bench` (issue 8): the smoke
preset through the CLI (one tiny case, one run per provider, each in a fresh process: about
10 s with torch), --no-torch, the option resolution and usage errors (in process), and the
targets and notes computed from synthetic records.  No timing assertions: only the form of
the output, plausible numbers, and the providers' losses against a float64 NumPy oracle.
"""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from fl_testing import run_python

HAVE_TORCH = importlib.util.find_spec("torch") is not None
PROVIDERS = ("fastloss", "fastloss_torch", "torch", "torch_chunked")
SMOKE_CASE = (64, 32, 500)


def bench(args, cwd):
    return run_python(["-m", "fastloss", "bench", *args], cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`bench --loss linear_cross_entropy --smoke` (with torch if installed): (process, report, markdown)."""
    d = tmp_path_factory.mktemp("bench_linear")
    r = bench(["--loss", "linear_cross_entropy", "--smoke", "--json", "l.json", "--markdown", "l.md"], d)
    assert r.returncode == 0, r.stdout + r.stderr
    return r, json.loads((d / "l.json").read_text()), (d / "l.md").read_text()


def _oracle_loss(N, H, V):
    """Mean cross-entropy of x @ W.T in float64, on the worker's inputs."""
    from fastloss._bench_linear import _inputs
    x, W, t = _inputs(N, H, V)
    z = x.astype(np.float64) @ W.astype(np.float64).T
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    return float(np.mean(lse - z[np.arange(N), t]))


def test_smoke_json_has_the_section_and_only_it(smoke):
    _, rep, _ = smoke
    sec = rep["linear_cross_entropy"]
    assert rep["cases"] == [] and "training_step" not in rep
    assert rep["options"]["linear"]["preset"] == sec["preset"] == "smoke"
    assert sec["cases"] == [list(SMOKE_CASE)] and sec["threads"] == [1] and sec["repeats"] == [1]
    want = PROVIDERS if HAVE_TORCH else ("fastloss",)
    assert tuple(sec["providers"]) == want and sec["torch"] is HAVE_TORCH
    assert [r["provider"] for r in sec["records"]] == list(want)
    assert sec["errors"] == [] and sec["skipped"] == []
    for r in sec["records"]:
        assert (r["N"], r["H"], r["V"], r["threads"]) == (*SMOKE_CASE, 1)
        assert r["seconds"] > 0 and r["peak_extra_bytes"] >= 0
        assert len(r["load_average"]) == 3


def test_smoke_summary_numbers_are_plausible(smoke):
    sec = smoke[1]["linear_cross_entropy"]
    rows = {r["provider"]: r for r in sec["summary"]}
    assert set(rows) == set(sec["providers"])
    for p, r in rows.items():
        assert r["runs"] == 1 and r["seconds"] > 0 and r["peak_extra_gib"] >= 0
        for base in ("fastloss", "fastloss_torch"):
            ratio = r["ratios"][base]
            if base not in rows:
                assert ratio == {"time": None, "memory": None}
                continue
            assert math.isfinite(ratio["time"]) and ratio["time"] > 0
            assert ratio["time"] == pytest.approx(r["seconds"] / rows[base]["seconds"])
            assert ratio["memory"] is None or (math.isfinite(ratio["memory"]) and ratio["memory"] >= 0)
    assert rows["fastloss"]["time_ratio"] == 1.0


def test_smoke_losses_agree_across_providers_and_with_float64(smoke):
    sec = smoke[1]["linear_cross_entropy"]
    exact = _oracle_loss(*SMOKE_CASE)
    losses = {r["provider"]: r["loss"] for r in sec["records"]}
    for p, v in losses.items():
        assert v == pytest.approx(exact, rel=1e-5), p
    assert max(losses.values()) - min(losses.values()) <= 1e-5 * abs(exact)
    (agree,) = sec["loss_agreement"]
    assert agree["agree"] and agree["max_rel_diff"] <= 1e-5


@pytest.mark.skipif(not HAVE_TORCH, reason="the targets compare with PyTorch")
def test_smoke_targets_follow_from_the_medians(smoke):
    sec = smoke[1]["linear_cross_entropy"]
    rows = {r["provider"]: r for r in sec["summary"]}
    assert [t["provider"] for t in sec["targets"]] == ["fastloss", "fastloss_torch"]
    for t in sec["targets"]:
        ours = rows[t["provider"]]
        for key, other, speed, mem in (("vs_torch_chunked", "torch_chunked", 1.3, 1.0),
                                       ("vs_torch", "torch", 1.0, 0.25)):
            theirs = rows[other]
            speedup = theirs["seconds"] / ours["seconds"]
            assert t[key]["speedup"] == pytest.approx(speedup)
            assert t[key]["holds"] is (speedup >= speed and ours["peak_extra_gib"] <= mem * theirs["peak_extra_gib"])
        assert t["budget"] is None                  # only the 8192x2048x128256 case has the 2 GiB budget


def test_smoke_text_and_markdown(smoke):
    r, _, md = smoke
    out = r.stdout
    assert "linear_cross_entropy 64x32x500; float32; threads 1" in out          # the header's cases line
    assert "fused linear + cross-entropy: loss and the gradients" in out
    table = out.split("fused linear + cross-entropy: loss")[1]
    for p in (PROVIDERS if HAVE_TORCH else ("fastloss",)):
        assert f"64x32x500        1  {p} " in table or f"64x32x500        1  {p}\n" in table
        assert f"linear_cross_entropy 64x32x500, 1 thread, {p}: " in r.stderr     # progress, one line per run
    assert "### fused linear + cross-entropy: loss" in md and "| 64x32x500 | 1 | fastloss |" in md
    if HAVE_TORCH:
        assert "the targets of issue 8" in out and "the targets of issue 8" in md
        assert "losses: the providers agree" in out
    assert "no case finished" not in out


def test_no_torch_runs_only_the_numpy_api(tmp_path):
    r = bench(["--loss", "linear", "--smoke", "--no-torch", "--threads", "1,2", "--json", "n.json"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    sec = json.loads((tmp_path / "n.json").read_text())["linear_cross_entropy"]
    assert sec["providers"] == ["fastloss"] and sec["torch"] is False and sec["torch_missing_reason"] == "--no-torch"
    assert [(x["provider"], x["threads"]) for x in sec["records"]] == [("fastloss", 1), ("fastloss", 2)]
    assert sec["targets"] == [{"N": 64, "H": 32, "V": 500, "threads": th, "provider": "fastloss",
                               "vs_torch_chunked": {"holds": None, "speedup": None, "memory_ratio": None},
                               "vs_torch": {"holds": None, "speedup": None, "memory_ratio": None},
                               "budget": None} for th in (1, 2)]
    assert "PyTorch not used (--no-torch): only the fastloss provider" in r.stdout
    table = r.stdout.split("\ncase ")[1].split("providers:")[0]
    assert "64x32x500        2  fastloss " in table and "torch" not in table
    assert "the targets of issue 8" not in r.stdout


# ---- options, in process ---------------------------------------------------------------------------

def _opts(*argv):
    from fastloss.__main__ import _bench_options, _build_parser
    return _bench_options(_build_parser().parse_args(["bench", *argv]))


@pytest.mark.parametrize("argv, linear, only", [
    ((), None, False), (("--smoke",), None, False), (("--quick",), None, False),
    (("--full",), "full", False),
    (("--loss", "linear_cross_entropy"), "full", True), (("--loss", "linear"), "full", True),
    (("--loss", "linear", "--quick"), "quick", True), (("--loss", "linear", "--smoke"), "smoke", True),
    (("--loss", "mse_loss,linear", "--smoke"), "smoke", False),
    (("--loss", "linear", "--no-torch"), "full", True),
], ids=lambda a: " ".join(a) if isinstance(a, tuple) else str(a))
def test_which_runs_include_the_section(argv, linear, only):
    o = _opts(*argv)
    assert o.linear == linear
    assert (o.losses == []) is only
    if only:
        assert o.training is None


def test_threads_and_repeat_and_torch_shape_the_plan():
    from fastloss import bench
    plan = bench.linear_plan(_opts("--loss", "linear"))
    assert plan["cases"] == [[4096, 1024, 32000], [8192, 2048, 128256]] and plan["threads"] == [1, 2]
    assert plan["repeats"] == [3, 1]                   # benchmarks/linear_cross_entropy.py's rule
    assert plan["providers"] == (list(PROVIDERS) if HAVE_TORCH else ["fastloss"])
    plan = bench.linear_plan(_opts("--loss", "linear", "--quick", "--threads", "2", "--repeat", "5"))
    assert plan["cases"] == [[1024, 512, 8000]] and plan["threads"] == [2] and plan["repeats"] == [5]
    plan = bench.linear_plan(_opts("--loss", "linear", "--no-torch"))
    assert plan["providers"] == ["fastloss"] and plan["torch_missing_reason"] == "--no-torch"
    assert bench.linear_plan(_opts("--smoke")) is None


@pytest.mark.parametrize("argv, words", [
    (["--loss", "linear", "--threads", "0"], "--threads"),
    (["--loss", "linear", "--smoke", "--quick"], "exclude"),
    (["--loss", "linear", "--repeat", "0"], "--repeat"),
    (["--loss", "linear,no_such_loss"], "linear_cross_entropy"),
    (["--loss", "linear", "--json", "/no/such/dir/x.json"], "--json"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else a)
def test_usage_errors_exit_2_before_any_work(argv, words, capsys):
    from fastloss.__main__ import main
    assert main(["bench", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "error" in err and words in err


def test_training_step_without_torch_is_not_an_error_next_to_the_linear_section():
    o = _opts("--loss", "training_step,linear", "--no-torch", "--smoke")
    assert o.training is None and o.linear == "smoke" and o.losses == []


# ---- the targets and notes, from synthetic records ------------------------------------------------

def _rec(provider, N, H, V, seconds, gib, loss=2.0, threads=1):
    return {"provider": provider, "N": N, "H": H, "V": V, "threads": threads, "chunk": None, "seconds": seconds,
            "peak_extra_bytes": int(gib * 2 ** 30), "loss": loss, "repeat": 0, "load_average": [1.0, 1.0, 1.0]}


def test_targets_budget_skip_and_errors_from_synthetic_records():
    from fastloss import _bench_report, bench
    big = (8192, 2048, 128256)
    sec = {"preset": "full", "cases": [list(big)], "threads": [1], "repeats": [1], "providers": list(PROVIDERS),
           "torch": True, "torch_missing_reason": None,
           "skipped": ["torch reference path skipped for (8192, 2048, 128256): needs ~16.0 GiB, 9.0 GiB available"],
           "records": [_rec("fastloss", *big, 10.0, 1.5), _rec("fastloss_torch", *big, 14.0, 2.5),
                       _rec("torch_chunked", *big, 15.0, 1.5, loss=2.0 + 1e-3),
                       {"provider": "torch_chunked", "N": 8192, "H": 2048, "V": 128256, "threads": 1,
                        "chunk": None, "error": "MemoryError"}]}
    bench.finish_linear(sec)
    t = {x["provider"]: x for x in sec["targets"]}
    assert t["fastloss"]["vs_torch_chunked"] == {"holds": True, "speedup": 1.5, "memory_ratio": 1.0}
    assert t["fastloss_torch"]["vs_torch_chunked"]["holds"] is False          # 15/14 < 1.3 and more memory
    assert t["fastloss"]["vs_torch"]["holds"] is None                          # skipped: not measured
    assert t["fastloss"]["budget"]["holds"] is True and t["fastloss_torch"]["budget"]["holds"] is False
    (agree,) = sec["loss_agreement"]
    assert agree["agree"] is False and agree["max_rel_diff"] == pytest.approx(5e-4)
    assert sec["errors"] == ["8192x2048x128256 1 thread(s) torch_chunked: MemoryError"]
    text = "\n".join(str(b) for b in _bench_report._linear_blocks(sec))
    assert "yes: speed 1.50x, mem 1.00x" in text and "- (not measured)" in text
    assert "yes: 1.50 GiB" in text and "NO: 2.50 GiB" in text
    assert "torch reference path skipped" in text and "FAILED: " in text and "DISAGREE" in text


def test_run_case_skips_torch_plain_when_memory_is_short(monkeypatch):
    from fastloss import _bench_linear as bl
    calls, logs = [], []
    monkeypatch.setattr(bl, "mem_available", lambda: 2.0 * bl.GIB)
    monkeypatch.setattr(bl, "run_worker", lambda p, N, H, V, th, chunk: calls.append(p) or _rec(p, N, H, V, 1.0, 0))
    kept = []
    out = bl.run_case(8192, 2048, 128256, 1, 2, log=logs.append, records=kept)
    assert calls == ["fastloss", "fastloss_torch", "torch_chunked"] * 2
    assert kept == out and len(out) == 6
    assert logs[0].startswith("# torch reference path skipped")


def test_worker_peak_memory_is_not_the_parents(tmp_path):
    """A child started by subprocess inherits its parent's high-water RSS in ru_maxrss; the worker
    measures its own (VmHWM), so a parent's large peak does not hide the call's gradients."""
    from fastloss import _bench_linear as bl
    big = np.ones(1 << 25, np.float32)          # 128 MiB touched: this process's peak RSS is above the child's
    assert big[-1] == 1.0
    del big
    N, H, V = 256, 64, 4000
    rec = bl.run_worker("fastloss", N, H, V, 1)
    assert "error" not in rec, rec
    assert rec["memory_method"].startswith("VmHWM")
    assert rec["peak_extra_bytes"] >= 4 * (V * H + N * H)        # at least the two float32 gradients it returns
    assert rec["loss"] == pytest.approx(_oracle_loss(N, H, V), rel=1e-5)
