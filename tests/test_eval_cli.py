"""``python -m fastloss eval``: streamed results equal the one-shot functions; .npy/.npz inputs,
both readers, errors (one line, exit code 2), progress, and a file larger than the process's
address-space limit."""
from __future__ import annotations

import io
import json
import math
import textwrap

import numpy as np
import pytest

import fastloss
from fastloss import _eval
from fastloss.__main__ import main
from fl_testing import run_python


def _ulps(got, expected, n=2):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.dtype == expected.dtype
    assert np.all(np.abs(got.astype(np.float64) - expected.astype(np.float64))
                  <= n * np.spacing(np.abs(expected)).astype(np.float64)), (got, expected)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(700, 130)) * 2).astype(np.float32)
    t = rng.integers(0, 130, size=700)
    t[::11] = -100
    t[5] = 1
    x[5] = 0                                   # a row of ties: rank of target 1 is 1
    np.save(d / "x.npy", x)
    np.save(d / "t.npy", t)
    np.save(d / "t32.npy", t.astype(np.int32))
    np.savez(d / "d.npz", logits=x, targets=t)
    np.savez_compressed(d / "c.npz", logits=x, targets=t)
    np.save(d / "tf.npy", t.astype(np.float32))
    np.save(d / "short.npy", t[:-1])
    np.save(d / "xi.npy", x.astype(np.int32))
    y = rng.normal(size=(300, 3))
    p = rng.normal(size=(300, 3))
    np.save(d / "y.npy", y)
    np.save(d / "p.npy", p)
    np.save(d / "x3.npy", x.reshape(7, 100, 130))
    np.save(d / "t3.npy", t.reshape(7, 100))
    return d, x, t, y, p


@pytest.mark.parametrize("reader", ["mmap", "read"])
@pytest.mark.parametrize("chunk", [None, 1, 64])
def test_cross_entropy_npy(files, reader, chunk):
    d, x, t, _, _ = files
    acc, info = _eval.evaluate("cross_entropy", d / "x.npy", d / "t.npy", chunk_rows=chunk, reader=reader)
    _ulps(acc.result(), fastloss.cross_entropy(x, t))
    _ulps(acc.perplexity(), fastloss.perplexity(x, t))
    act = t != -100
    assert acc.n_tokens == act.sum() and info["rows"] == 700
    assert acc.accuracy() == np.count_nonzero(act & (np.argmax(x, axis=1) == t)) / act.sum()


@pytest.mark.parametrize("spec", ["d.npz:{}", "c.npz:{}"])
def test_npz_members(files, spec):
    d, x, t, _, _ = files
    acc, _ = _eval.evaluate("cross_entropy", str(d / spec.format("logits")), str(d / spec.format("targets")),
                            chunk_rows=33, topk=(1, 3))
    _ulps(acc.result(), fastloss.cross_entropy(x, t))
    ts = np.where(t < 0, 0, t)
    xy = x[np.arange(700), ts][:, None]
    ranks = (x > xy).sum(1) + ((x == xy) & (np.arange(130) < ts[:, None])).sum(1)
    act = t != -100
    assert acc.accuracy() == np.count_nonzero(act & (ranks == 0)) / act.sum()
    assert acc.topk_accuracy(3) == np.count_nonzero(act & (ranks < 3)) / act.sum()


def test_leading_dims_and_int32_target(files):
    d, x, t, _, _ = files
    acc, info = _eval.evaluate("cross_entropy", d / "x3.npy", d / "t3.npy", chunk_rows=50, label_smoothing=0.1)
    _ulps(acc.result(), fastloss.cross_entropy(x, t, label_smoothing=0.1))
    acc2, _ = _eval.evaluate("cross_entropy", d / "x.npy", d / "t32.npy", ignore_index=-100)
    _ulps(acc2.result(), fastloss.cross_entropy(x, t))


def test_regression_losses(files):
    d, _, _, y, p = files
    acc, _ = _eval.evaluate("huber_loss", d / "p.npy", d / "y.npy", chunk_rows=7, delta=0.5)
    _ulps(acc.result(), fastloss.huber_loss(p, y, delta=0.5), 4)
    acc, _ = _eval.evaluate("rmse", d / "p.npy", d / "y.npy", chunk_rows=41, multioutput="raw_values")
    expected = np.sqrt(np.mean((p - y) ** 2, axis=0))          # scikit-learn's raw_values
    np.testing.assert_allclose(acc.result(), expected, rtol=1e-14)


def test_cli_json_and_text(files, capsys):
    d, x, t, _, _ = files
    assert main(["eval", "--loss", "cross_entropy", "--input", str(d / "x.npy"), "--target", str(d / "t.npy"),
                 "--chunk-rows", "100", "--topk", "1,5", "--json", "--no-progress"]) == 0
    out = capsys.readouterr()
    r = json.loads(out.out)
    assert out.err == ""
    assert r["loss"] == "cross_entropy" and r["rows"] == 700 and "top5_accuracy" in r
    assert abs(r["result"] - float(fastloss.cross_entropy(x, t))) <= 2 * np.spacing(np.float32(r["result"]))
    assert main(["eval", "--loss", "mse_loss", "--input", str(d / "p.npy"), "--target", str(d / "y.npy"),
                 "--progress"]) == 0
    out = capsys.readouterr()
    assert "result" in out.out and "%" in out.err                 # forced progress, not a TTY: lines


def test_cli_subprocess(files, tmp_path):
    d, x, t, _, _ = files
    r = run_python(["-m", "fastloss", "eval", "--loss", "perplexity", "--input", str(d / "x.npy"), "--target",
                    str(d / "t.npy"), "--json"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""                                        # not a TTY: no progress by default
    _ulps(np.float32(json.loads(r.stdout)["result"]), fastloss.perplexity(x, t))
    r = run_python(["-m", "fastloss", "eval", "--loss", "cross_entropy", "--input", "missing.npy", "--target",
                    str(d / "t.npy")], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such file: missing.npy" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--input", "nope.npy", "--target", "t.npy"], "input: no such file"),
    (["--input", "x.npy", "--target", "nope.npy"], "target: no such file"),
    (["--input", "x.npy", "--target", "short.npy"], "does not match"),
    (["--input", "x.npy", "--target", "tf.npy"], "needs integer class indices"),
    (["--input", "xi.npy", "--target", "t.npy"], "expected float16, float32 or float64"),
    (["--input", "x.npy", "--target", "t.npy", "--chunk-rows", "0"], "--chunk-rows must be >= 1"),
    (["--input", "x.npy", "--target", "t.npy", "--delta", "2"], "--delta does not apply"),
    (["--input", "d.npz", "--target", "t.npy"], "choose one with"),
    (["--input", "d.npz:nope", "--target", "t.npy"], "no member 'nope'"),
    (["--input", "x.npy", "--target", "t.npy", "--topk", "0"], "--topk"),
    (["--input", "x.npy", "--target", "t.npy", "--label-smoothing", "2"], "label_smoothing"),
])
def test_cli_errors(files, capsys, monkeypatch, args, message):
    d = files[0]
    monkeypatch.chdir(d)
    assert main(["eval", "--loss", "cross_entropy", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("python -m fastloss eval: error:")


def test_cli_bad_loss_and_types(files, capsys, monkeypatch):
    d = files[0]
    monkeypatch.chdir(d)
    assert main(["eval", "--loss", "nope", "--input", "x.npy", "--target", "t.npy"]) == 2
    assert "unknown or unsupported loss 'nope'" in capsys.readouterr().err
    assert main(["eval", "--loss", "mse_loss", "--input", "p.npy", "--target", "t.npy"]) == 2
    assert "needs a float target" in capsys.readouterr().err
    assert main(["eval", "--loss", "mse_loss", "--input", "p.npy", "--target", "x.npy"]) == 2
    assert "does not match" in capsys.readouterr().err
    (d / "bad.npy").write_bytes(b"not an array")
    assert main(["eval", "--loss", "mse_loss", "--input", "bad.npy", "--target", "y.npy"]) == 2
    assert "not a valid .npy/.npz" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:                       # argparse: a non-integer chunk size
        main(["eval", "--loss", "mse_loss", "--input", "p.npy", "--target", "y.npy", "--chunk-rows", "x"])
    assert exc.value.code == 2


def test_out_of_range_target_row_reported(files, tmp_path, capsys):
    d, x, t, _, _ = files
    bad = t.copy()
    bad[650] = 130
    np.save(tmp_path / "bad_t.npy", bad)
    assert main(["eval", "--loss", "cross_entropy", "--input", str(d / "x.npy"), "--target",
                 str(tmp_path / "bad_t.npy"), "--chunk-rows", "100"]) == 2
    assert "rows 600..699" in capsys.readouterr().err


def test_progress_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    s = Tty()
    bar = _eval.Progress(1000, True, s)
    bar.update(500)
    bar.update(1000)
    bar.close()
    text = s.getvalue()
    assert text.startswith("\r[") and "100.0%" in text and text.endswith("\n")
    s2 = Tty()
    _eval.Progress(10, False, s2).update(5)
    assert s2.getvalue() == ""


def test_file_larger_than_the_address_space_limit(tmp_path):
    """A child process caps RLIMIT_AS at its baseline + 768 MiB and evaluates a 1 GiB-larger
    (sparse) logits file: the whole file cannot be mapped there, the windows can."""
    script = textwrap.dedent("""
        import json, math, resource, sys
        import numpy as np
        import fastloss
        from fastloss import _eval
        V = 32000
        d = sys.argv[1]
        np.save(d + "/warm_x.npy", np.zeros((64, V), np.float32)); np.save(d + "/warm_t.npy", np.zeros(64, np.int64))
        _eval.evaluate("cross_entropy", d + "/warm_x.npy", d + "/warm_t.npy", chunk_rows=8)   # threads, arenas
        vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        cap = vm + (768 << 20)
        rows = (cap + (256 << 20)) // (4 * V) + 1
        x = np.lib.format.open_memmap(d + "/big.npy", mode="w+", dtype=np.float32, shape=(rows, V))  # sparse
        pattern = np.random.default_rng(0).normal(size=(3, V)).astype(np.float32) * 3
        x[:3] = pattern
        x[-1] = pattern[0]
        del x
        t = np.arange(rows) % 7
        t[1] = -100
        np.save(d + "/big_t.npy", t)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        try:
            np.load(d + "/big.npy", mmap_mode="r")[-1].sum()
            whole = "mapped"
        except (MemoryError, OSError, ValueError):
            whole = "refused"
        acc, info = _eval.evaluate("cross_entropy", d + "/big.npy", d + "/big_t.npy", chunk_rows=512)
        print(json.dumps({"whole": whole, "rows": rows, "cap": cap, "size": rows * 4 * V,
                          "summary": acc.summary()}))
    """)
    r = run_python(["-c", script, str(tmp_path)], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["size"] > out["cap"] and out["whole"] == "refused"
    rows, V = out["rows"], 32000
    pattern = np.random.default_rng(0).normal(size=(3, V)).astype(np.float32) * 3
    t = np.arange(rows) % 7
    t[1] = -100
    special = {0: pattern[0], 2: pattern[2], rows - 1: pattern[0]}       # row 1 ignored; the rest zeros
    loss_sum = sum(float(fastloss.cross_entropy(row[None].astype(np.float64), t[[k]], reduction="sum"))
                   for k, row in special.items())
    n_zero = rows - 1 - len(special)
    tokens = rows - 1
    expected = (loss_sum + n_zero * math.log(V)) / tokens
    s = out["summary"]
    assert s["tokens"] == tokens and s["rows"] == rows
    assert abs(s["cross_entropy"] - expected) <= 1e-6 * expected
    # zero rows: the target's rank is its index (ties by index): a hit only for target 0
    hits = np.count_nonzero(t[3:-1] == 0) + sum(int(np.argmax(row) == t[k]) for k, row in special.items())
    assert s["accuracy"] == hits / tokens


def test_npz_member_at_an_unaligned_offset(tmp_path):
    """np.savez puts a member's data after a header whose length depends on the name: float64 data
    can start at an offset that is not a multiple of 8.  It is read into aligned buffers."""
    rng = np.random.default_rng(3)
    y, p = rng.normal(size=(500, 4)), rng.normal(size=(500, 4))
    np.savez(tmp_path / "u.npz", a=p, bb=y)
    src = _eval.ArraySource(str(tmp_path / "u.npz") + ":a", "input")
    reader = src.reader("mmap")
    try:
        if src.offset % 8:
            assert isinstance(reader, _eval._ReadintoReader)
    finally:
        reader.close()
        src.close()
    acc, _ = _eval.evaluate("mse_loss", str(tmp_path / "u.npz") + ":a", str(tmp_path / "u.npz") + ":bb",
                            chunk_rows=37)
    _ulps(acc.result(), fastloss.mse_loss(p, y), 4)


def test_perplexity_summary_and_tokens_without_topk(files, capsys):
    d, x, t, _, _ = files
    assert main(["eval", "--loss", "perplexity", "--input", str(d / "x.npy"), "--target", str(d / "t.npy"),
                 "--json", "--no-progress"]) == 0
    r = json.loads(capsys.readouterr().out)
    _ulps(np.float32(r["cross_entropy"]), fastloss.cross_entropy(x, t))
    _ulps(np.float32(r["perplexity"]), fastloss.perplexity(x, t))
    assert main(["eval", "--loss", "cross_entropy", "--input", str(d / "x.npy"), "--target", str(d / "t.npy"),
                 "--topk", "none", "--json", "--no-progress"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] == int(np.count_nonzero(t != -100)) and "accuracy" not in r


def test_json_is_strict_for_an_empty_input(tmp_path, capsys):
    np.save(tmp_path / "e.npy", np.zeros((0, 3), np.float32))
    np.save(tmp_path / "f.npy", np.zeros((0, 3), np.float32))
    assert main(["eval", "--loss", "mse_loss", "--input", str(tmp_path / "e.npy"), "--target",
                 str(tmp_path / "f.npy"), "--json", "--no-progress"]) == 0
    out = capsys.readouterr().out
    r = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert r["result"] is None                  # the mean of nothing is NaN: null in JSON
