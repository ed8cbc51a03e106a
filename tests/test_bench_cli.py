"""`python -m fastloss bench`, run as a user runs it: in a fresh interpreter that imports the
build under test (fl_testing.run_python), on the hidden ``--smoke`` case set (sizes 1e3 and 1e4,
logits 4x1000 and 2x5000: seconds).  Checked: the exit codes, the table, the --json, --markdown
and --plot files, --compare, Ctrl-C, the usage errors and the progress display.  No timing
assertions: only the form of the output (and the error columns, which are not timing).
"""
from __future__ import annotations

import importlib.util
import io
import json
import re
import signal
import subprocess
import sys

import pytest

from fl_testing import fastloss_import_root, python_env, run_python

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAVE_TORCH = importlib.util.find_spec("torch") is not None
ELEMENTWISE_LOSSES = ("binary_cross_entropy", "binary_cross_entropy_with_logits", "sigmoid_focal_loss", "hinge_loss",
                      "kl_div")
ROW_LOSSES = ("multi_margin_loss", "kl_div_logits", "sequence_log_probs", "triplet_margin_loss", "info_nce_loss")
SMOKE_LOSSES = ("mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss", "rmse", "cross_entropy") + ELEMENTWISE_LOSSES \
    + ("dpo_loss",) + ROW_LOSSES
#: cases per thread count: 5 regression losses x 2 sizes x 2 modes + 2 shapes x 2 dtypes x 2 modes, and the losses of
#: issue 6: 5 elementwise x 2 sizes x 2 modes + dpo_loss at 1 size x 2 modes + 5 row losses x 1 shape x 2 modes
SMOKE_CASES_PER_THREAD_COUNT = 5 * 2 * 2 + 2 * 2 * 2 + 5 * 2 * 2 + 2 + 5 * 2
#: one small, fast run for the --compare checks: 2 cases
SMALL = ["--smoke", "--no-torch", "--loss", "mse_loss", "--sizes", "1e3", "--threads", "1"]


def bench(args, cwd, **kwargs):
    return run_python(["-m", "fastloss", "bench", *args], cwd=cwd, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One --smoke run (with torch if it is installed) that writes every file: (process, directory)."""
    d = tmp_path_factory.mktemp("bench_smoke")
    args = ["--smoke", "--json", "run.json", "--markdown", "run.md"] + (["--plot", "run.png"] if HAVE_MATPLOTLIB
                                                                         else [])
    r = bench(args, d)
    assert r.returncode == 0, r.stdout + r.stderr
    return r, d


@pytest.fixture(scope="module")
def report(smoke):
    return json.loads((smoke[1] / "run.json").read_text())


def test_smoke_run_prints_header_and_tables(smoke, report):
    r, _ = smoke
    out = r.stdout
    for word in ("fastloss", "cpu", "isa", "threads", "versions", "read bandwidth"):
        assert re.search(rf"^{word}\b", out, re.MULTILINE), f"no {word!r} line in:\n{out}"
    for head in ("regression (n = ", "cross-entropy (shape = ", "elementwise losses (n = ", "row losses (shape = "):
        assert head in out
    for col in ("fastloss", "NumPy", "NumPy/fl", "GB/s", "%read", "mem:fl", "mem:NumPy", "err:fl", "err:NumPy"):
        assert re.search(rf"(^|\s){re.escape(col)}(\s|$)", out), f"no column {col!r}"
    for loss in SMOKE_LOSSES[:5] + ELEMENTWISE_LOSSES:
        assert re.search(rf"^{loss}\s+1e3\s+forward\s+1\s", out, re.MULTILINE), f"no {loss} row"
    for loss in ROW_LOSSES:
        assert re.search(rf"^{loss}\s+\d+x\d+\s+forward\s+1\s", out, re.MULTILINE), f"no {loss} row"
    assert re.search(r"^4x1000\s+float16\s+with-grad\s+1\s", out, re.MULTILINE)
    # one table row per case (the training step's own tables come after them)
    rows = [line for line in out.split("PyTorch training step")[0].splitlines()
            if re.match(r"^(\w+\s+(1e[34]|64|\d+x\d+)\s|\d+x\d+\s+float)", line)]
    assert len(rows) == len(report["cases"])
    assert "tracemalloc" in out and ("peak RSS" in out or not HAVE_TORCH)  # how memory was measured is said


def test_smoke_run_progress_is_plain_lines_on_a_pipe(smoke, report):
    r, _ = smoke
    assert "\r" not in r.stdout + r.stderr
    assert "\x1b" not in r.stdout + r.stderr
    total = len(report["cases"])
    lines = [line for line in r.stderr.splitlines() if line.startswith("[")]
    assert [int(re.match(r"\[(\d+)/(\d+)\]", line).group(1)) for line in lines] == list(range(1, total + 1))
    assert all(f"/{total}] " in line and "fastloss" in line and " ms" in line for line in lines)


def test_json_report(report):
    assert report["schema"].startswith("fastloss-bench/")
    assert report["interrupted"] is False
    env = report["environment"]
    for key in ("cpu", "cores", "isa_selected", "fastloss", "numpy", "date", "memory_methods"):
        assert key in env
    threads = report["options"]["threads"]
    assert len(report["cases"]) == SMOKE_CASES_PER_THREAD_COUNT * len(threads)
    assert {r["loss"] for r in report["cases"]} == set(SMOKE_LOSSES)
    assert {r["mode"] for r in report["cases"]} == {"forward", "with_grad"}
    for th in threads:
        assert report["read_bandwidth"][str(th)]["gbps"] > 0
    for r in report["cases"]:
        what = f"{r['loss']} {r['n']} {r['dtype']} {r['mode']} {r['threads']}t"
        assert r["family"] in ("regression", "classification", "elementwise", "rows")
        assert (r["family"] in ("classification", "rows")) == ("shape" in r), what
        assert r["fastloss"]["median_s"] > 0 and r["fastloss"]["count"] >= 1, what
        assert r["fastloss"]["q1_s"] <= r["fastloss"]["median_s"] <= r["fastloss"]["q3_s"], what
        assert r["numpy"] is not None and r["speedup_numpy"] > 0, what
        assert r["bytes"] > 0 and r["gbps"] > 0 and r["pct_read_bw"] > 0, what
        assert set(r["peak_extra_bytes"]) == {"fastloss", "numpy", "torch"}, what
        assert r["peak_extra_bytes"]["fastloss"] is not None and r["peak_extra_bytes"]["numpy"] is not None, what
        assert set(r["memory_method"]) == {"fastloss", "numpy", "torch"}, what
        err = r["error_vs_float64"]
        assert r["error_elements"] == r["n"], what  # tiny inputs: the error is on the whole input
        # the error columns are a correctness check: float32 rounds at ~6e-8, float16 at ~5e-4
        bound = 1e-6 if r["dtype"] == "float32" else 2e-3
        if r["family"] in ("elementwise", "rows"):   # the normwise bound of _error_bounds.field_tolerance
            bound = 2e-5
        assert 0 <= err["fastloss"] < bound, (what, err)
        assert 0 <= err["numpy"] < bound, (what, err)
        if r["torch"] is not None:
            assert 0 <= err["torch"] < bound, (what, err)
        assert r["agrees_with_numpy"] is True, what


def _markdown_tables(text: str) -> list[list[str]]:
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


def test_markdown_report(smoke, report):
    text = (smoke[1] / "run.md").read_text()
    assert text.startswith("## fastloss ")
    for key in ("cpu", "isa", "threads", "versions", "cases"):
        assert f"- **{key}**: " in text
    assert "### regression" in text and "### cross-entropy" in text
    assert "### elementwise losses" in text and "### row losses" in text
    tables = _markdown_tables(text)
    assert len(tables) == 4 + (2 if HAVE_TORCH else 0)       # + the training step's speed and memory
    cells = lambda line: re.split(r"(?<!\\)\|", line)[1:-1]  # noqa: E731 (pipes in cells are escaped)
    for table in tables:
        assert all(line.endswith("|") for line in table)
        assert re.fullmatch(r"\|(:?-{3,}:?\|)+", table[1]), table[1]
        width = len(cells(table[0]))
        assert all(len(cells(line)) == width for line in table), "rows of unequal length"
    assert sum(len(t) - 2 for t in tables[:4]) == len(report["cases"])
    assert "\r" not in text and "\x1b" not in text


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed")
def test_plot_png(smoke):
    data = (smoke[1] / "run.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed")
def test_plot_svg_and_compare_with_the_same_run(smoke, tmp_path):
    """--compare against the JSON just written: ratios for the cases of both runs, the others
    listed on their side; --plot with .svg writes SVG."""
    old = smoke[1] / "run.json"
    r = bench(SMALL + ["--compare", str(old), "--json", "cmp.json", "--plot", "cmp.svg"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "<svg" in (tmp_path / "cmp.svg").read_text()[:2000]
    cmp = json.loads((tmp_path / "cmp.json").read_text())["comparison"]
    assert len(cmp["cases"]) == 2 and cmp["only_in_this_run"] == []
    assert len(cmp["only_in_previous"]) == len(json.loads(old.read_text())["cases"]) - 2
    for c in cmp["cases"]:
        assert c["ratio"] > 0 and c["ratio"] == pytest.approx(c["new_median_s"] / c["old_median_s"])
    assert f"compared with {old}" in r.stdout
    assert re.search(r"^mse_loss 1e3 float32 forward 1t \w+\s+[\d.]+\s+[\d.]+\s+[\d.]+", r.stdout, re.MULTILINE)
    assert f"only in {old} ({len(cmp['only_in_previous'])}): " in r.stdout


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_small")
    r = bench(SMALL + ["--json", "old.json"], d)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads((d / "old.json").read_text())


@pytest.mark.parametrize("factor, flagged", [(1000.0, False), (1e-3, True)], ids=["old-slower", "old-faster"])
def test_compare_flags_a_regression(small_report, tmp_path, factor, flagged):
    """A previous run whose times were 1000x slower flags nothing; one 1000x faster flags every case."""
    old = json.loads(json.dumps(small_report))
    for r in old["cases"]:
        r["fastloss"]["median_s"] *= factor
    (tmp_path / "old.json").write_text(json.dumps(old))
    r = bench(SMALL + ["--compare", "old.json", "--json", "new.json"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    cmp = json.loads((tmp_path / "new.json").read_text())["comparison"]
    assert len(cmp["cases"]) == 2
    assert all(c["regression"] is flagged for c in cmp["cases"])
    assert ("REGRESSION" in r.stdout) is flagged
    assert f"2 cases matched, {2 if flagged else 0} regressions" in r.stdout


def test_ctrl_c_reports_the_finished_cases(tmp_path):
    """SIGINT after the first case: the table of what finished, the JSON of it, exit code 130."""
    proc = subprocess.Popen([sys.executable, "-m", "fastloss", "bench", "--smoke", "--no-torch", "--repeat", "20",
                             "--json", "run.json"], cwd=tmp_path, env=python_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = ""
        for _ in range(20):  # the first progress line: the first case has finished
            line = proc.stderr.readline()
            if line.startswith("[") or not line:
                break
        assert line.startswith("[1/"), line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, out + err
    assert "INTERRUPTED (Ctrl-C)" in out and "regression (n = " in out
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["interrupted"] is True
    total = report["options"]["total_cases"]
    assert 1 <= len(report["cases"]) < total
    assert f"{len(report['cases'])} of {total} cases finished" in out


@pytest.mark.parametrize("argv, words", [
    (["--loss", "no_such_loss"], "unknown loss"),
    (["--threads", "0"], "--threads"),
    (["--repeat", "-1"], "--repeat"),
    (["--plot", "x.txt"], "--plot"),
])
def test_bad_options_exit_2_with_one_line(argv, words, tmp_path):
    r = bench(argv, tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr and words in r.stderr


def test_plot_without_matplotlib_exit_2(tmp_path):
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    r = bench(["--plot", "x.png"], tmp_path,
              env_extra={"PYTHONPATH": f"{shim.parent}:{fastloss_import_root()}"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "matplotlib" in r.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv", [
    ["--sizes", "abc"], ["--sizes", "0"], ["--threads", "0"], ["--threads", "1,x"], ["--loss", "no_such_loss"],
    ["--isa", "sse9"], ["--repeat", "0"], ["--repeat", "-1"], ["--json", "/no/such/dir/out.json"],
    ["--markdown", "/no/such/dir/out.md"], ["--plot", "x.txt"], ["--plot", "/no/such/dir/x.png"],
    ["--compare", "/no/such/old.json"], ["--dtype", "int8"], ["--dtypes", "float32,bfloat99"],
    ["--shapes", "3x"], ["--modes", "sideways"], ["--quick", "--full"], ["--smoke", "--quick"],
    ["--loss", "mse_loss", "--modes", "with_grad_out"], ["--no-such-option"],
], ids=lambda a: " ".join(a))
def test_bench_usage_errors_exit_2_before_any_work(argv, capsys):
    """In process, every validation path: exit code 2 and a one-line error, nothing run."""
    from fastloss.__main__ import main
    try:
        code = main(["bench", *argv])
    except SystemExit as exc:           # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "error" in err


def test_compare_rejects_a_file_that_is_not_a_report(tmp_path, capsys):
    from fastloss.__main__ import main
    for text in ("not json", json.dumps({"schema": "something else", "cases": []}),
                 json.dumps({"schema": "fastloss-bench/3", "cases": [{"loss": "mse_loss"}]})):
        (tmp_path / "old.json").write_text(text)
        assert main(["bench", "--compare", str(tmp_path / "old.json")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "--compare" in err


def test_dtype_is_an_alias_of_dtypes_and_applies_to_both_families():
    from fastloss.__main__ import _bench_options, _build_parser
    opts = _bench_options(_build_parser().parse_args(["bench", "--smoke", "--dtype", "float16"]))
    assert opts.dtypes == ("float16",)
    assert {c.dtype for c in opts.cases()} == {"float16"}
    assert {c.family for c in opts.cases()} == {"regression", "classification", "elementwise", "rows"}


class _FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_is_one_rewritten_line_with_an_eta():
    from fastloss.bench import Progress
    now = [0.0]
    stream = _FakeTerminal()
    p = Progress(total_cases=4, total_weight=4.0, stream=stream, clock=lambda: now[0])
    for i in range(2):
        p.begin(f"group {i}", 2.0)
        now[0] += 10.0
        p.case_done("a case")
        p.case_done("a case")
        p.group_done()
    p.close()
    text = stream.getvalue()
    assert "\n" not in text
    frames = [f for f in text.split("\r\x1b[K") if f]
    assert frames[0].startswith("[0/4 cases] group 0")
    assert "[2/4 cases] group 1  0:10 elapsed, ~0:10 left" in frames  # 10 s per group of weight 2
    assert frames[-1].startswith("[4/4 cases]")
    assert text.endswith("\r\x1b[K")  # the line is cleared before the report


def test_progress_on_a_pipe_is_one_line_per_case():
    from fastloss.bench import Progress
    stream = io.StringIO()
    p = Progress(total_cases=2, total_weight=1.0, stream=stream)
    p.begin("group", 1.0)
    p.case_done("first")
    p.case_done("second")
    p.group_done()
    p.close()
    assert stream.getvalue() == "[1/2] first\n[2/2] second\n"


# ---- the PyTorch training step (issue 7) --------------------------------------------------------

@pytest.mark.skipif(not HAVE_TORCH, reason="the training step needs PyTorch")
def test_default_smoke_run_includes_the_training_step(smoke, report):
    tr = report["training_step"]
    assert report["options"]["training"] == "smoke"
    assert [(r["shape"], r["dtype"], r["threads"]) for r in tr["speed"]] == [("16x1000", "float32", 1),
                                                                              ("16x1000", "float32", 2)]
    for r in tr["speed"]:
        assert r["fastloss_s"] > 0 and r["torch_s"] > 0
        assert r["speedup"] == pytest.approx(r["torch_s"] / r["fastloss_s"])
    assert {m["provider"] for m in tr["memory"]} == {"fastloss", "torch"}
    assert all(isinstance(m["peak_bytes"], int) for m in tr["memory"])
    out = smoke[0].stdout
    assert "PyTorch training step" in out and "F.cross_entropy" in out
    assert "PyTorch training step" in (smoke[1] / "run.md").read_text()


@pytest.mark.skipif(not HAVE_TORCH, reason="the training step needs PyTorch")
def test_loss_training_step_alone(tmp_path):
    r = bench(["--smoke", "--loss", "training_step", "--threads", "1", "--json", "t.json"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / "t.json").read_text())
    assert rep["cases"] == [] and rep["options"]["training_only"]
    assert [r["threads"] for r in rep["training_step"]["speed"]] == [1]
    assert "no case finished" not in r.stdout


def test_no_torch_leaves_the_training_step_out(tmp_path, capsys):
    from fastloss.__main__ import main
    assert main(["bench", "--loss", "training_step", "--no-torch"]) == 2
    assert "needs PyTorch" in capsys.readouterr().err
    r = bench(SMALL + ["--json", "s.json"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / "s.json").read_text())
    assert "training_step" not in rep and rep["options"]["training"] is None
