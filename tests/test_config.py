"""Configuration: config()/show_config(), ISA selection (private hooks and FASTLOSS_ISA),
`python -m fastloss info`, the documentation examples and the installed-build guard."""
from __future__ import annotations

import doctest
import io
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest

import fastloss
import fastloss.regression
from fastloss import _config, _core
from fl_testing import SUPPORTED_ISAS, run_python

TESTS_DIR = Path(__file__).resolve().parent


def test_config_contents():
    c = fastloss.config()
    for key in ("fastloss", "python", "numpy", "platform", "compiler", "openmp", "default_threads", "cores",
                "isa_compiled", "isa_supported", "isa_selected", "isa_forced_by_env"):
        assert key in c, key
    assert c["fastloss"] == fastloss.__version__
    assert c["numpy"] == np.__version__
    assert isinstance(c["openmp"], bool)
    assert c["default_threads"] == fastloss.get_num_threads() >= 1
    assert c["cores"] >= 1
    assert "baseline" in c["isa_supported"]
    assert set(c["isa_supported"]) <= set(c["isa_compiled"]) <= set(_core.ISA_NAMES)
    assert c["isa_selected"] == _core.get_isa() and c["isa_selected"] in c["isa_supported"]


def test_default_isa_is_the_best_supported(tmp_path):
    """Without FASTLOSS_ISA the widest ISA the CPU supports is chosen at import."""
    r = run_python(["-c", "from fastloss import _core; print(_core.get_isa())"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    order = [n for n in _core.ISA_NAMES if n in SUPPORTED_ISAS]
    assert r.stdout.strip() == order[-1]


def test_show_config_prints_the_configuration():
    buf = io.StringIO()
    fastloss.show_config(file=buf)
    out = buf.getvalue()
    c = fastloss.config()
    assert f"fastloss       {fastloss.__version__}" in out
    assert "isa selected" in out and c["isa_selected"] in out
    assert "numpy" in out and np.__version__ in out
    assert f"{c['default_threads']} by default" in out


def test_set_and_get_isa(isa):
    assert _core.get_isa() == isa
    assert fastloss.config()["isa_selected"] == isa
    x = np.linspace(-3, 3, 1000)
    assert fastloss.l1_loss(x, 0.0, reduction="sum") == pytest.approx(np.abs(x).sum(), rel=1e-12)


def test_set_isa_rejects_unknown_names():
    before = _core.get_isa()
    with pytest.raises(ValueError, match="sse9"):
        _core.set_isa("sse9")
    assert _core.get_isa() == before


@pytest.mark.parametrize("name", SUPPORTED_ISAS)
def test_fastloss_isa_env_selects_the_isa(name, tmp_path):
    code = "import fastloss; from fastloss import _core; print(_core.get_isa(), fastloss.config()['isa_forced_by_env'])"
    for value in (name, f" {name.upper()} "):           # case and surrounding blanks are ignored
        r = run_python(["-c", code], cwd=tmp_path, env_extra={"FASTLOSS_ISA": value})
        assert r.returncode == 0, r.stderr
        selected, forced = r.stdout.split()
        assert selected == name and forced.lower() == name


@pytest.mark.parametrize("value", ["sse9", "avx1024", "native"])
def test_fastloss_isa_env_unknown_name_fails_at_import(value, tmp_path):
    r = run_python(["-c", "import fastloss"], cwd=tmp_path, env_extra={"FASTLOSS_ISA": value})
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "FASTLOSS_ISA" in r.stderr and value in r.stderr


def _unsupported_isa_runs():
    """(command prefix, ISA) pairs where the ISA is compiled in but the (possibly emulated) CPU
    lacks it: natively if this CPU lacks one, else under QEMU's user-mode CPU models."""
    native = [((), n) for n in _core.isa_compiled() if n not in SUPPORTED_ISAS]
    if native:
        return native
    qemu = shutil.which("qemu-x86_64")
    if qemu is None or platform.machine() not in ("x86_64", "AMD64"):
        return []
    emulated = {"Haswell": ("avx512",), "Nehalem": ("avx2",)}    # Haswell: AVX2, no AVX-512; Nehalem: no AVX
    return [((qemu, "-cpu", cpu), n) for cpu, names in emulated.items() for n in names if n in _core.isa_compiled()]


@pytest.mark.qemu
def test_fastloss_isa_env_unsupported_isa_fails_at_import(tmp_path):
    runs = _unsupported_isa_runs()
    if not runs:
        pytest.skip(f"this CPU runs every compiled ISA ({', '.join(SUPPORTED_ISAS)}) and qemu-x86_64 is not "
                    "installed; test_unsupported_isa_is_an_import_error covers the logic")
    for prefix, name in runs:
        r = run_python(["-c", "import fastloss"], cwd=tmp_path, env_extra={"FASTLOSS_ISA": name}, prefix=prefix)
        assert r.returncode != 0, f"{prefix} FASTLOSS_ISA={name}: imported"
        assert "ImportError" in r.stderr and "FASTLOSS_ISA" in r.stderr and name in r.stderr, r.stderr
    # and the emulated CPU does run the ISAs it has
    prefix = runs[0][0]
    r = run_python(["-c", "from fastloss import _core; print(_core.get_isa())"], cwd=tmp_path,
                   env_extra={"FASTLOSS_ISA": "baseline"}, prefix=prefix)
    assert r.returncode == 0 and r.stdout.strip() == "baseline", r.stderr


def test_unsupported_isa_is_an_import_error(monkeypatch):
    """The import-time hook turns the kernel layer's refusal into ImportError (simulated: the
    CPU running the tests may support every compiled ISA)."""
    def refuse(name):
        raise RuntimeError(f"ISA {name!r} is not supported by this CPU")

    monkeypatch.setenv("FASTLOSS_ISA", "avx512")
    monkeypatch.setattr(_core, "set_isa", refuse)
    with pytest.raises(ImportError, match="FASTLOSS_ISA"):
        _config._select_isa_from_env()


def test_python_m_fastloss_info(tmp_path):
    r = run_python(["-m", "fastloss", "info"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "fastloss" in r.stdout and fastloss.__version__ in r.stdout
    assert "isa selected" in r.stdout and _core.get_isa() in r.stdout
    r = run_python(["-m", "fastloss", "info"], cwd=tmp_path, env_extra={"FASTLOSS_ISA": "baseline"})
    assert r.returncode == 0, r.stderr
    assert "FASTLOSS_ISA=baseline" in r.stdout


def test_docstring_examples_give_the_documented_values():
    for module in (fastloss, fastloss.regression):
        result = doctest.testmod(module, extraglobs={"np": np, "fastloss": fastloss}, report=False)
        assert result.attempted > 0 and result.failed == 0, f"{module.__name__}: {result}"


def test_docstring_examples_run_standalone():
    """Each docstring's example is what a user pastes into a fresh interpreter (and what
    `pytest --doctest-modules` runs): it must import what it uses."""
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    failed = []
    for test in doctest.DocTestFinder().find(fastloss.regression):
        test.globs = {}                 # nothing but what the example itself imports
        if test.examples and runner.run(test, out=out.write).failed:
            failed.append(test.name)
    assert not failed, f"examples that fail in a fresh namespace: {failed}\n{out.getvalue()[:2000]}"


def test_installed_build_guard(tmp_path):
    """conftest.py refuses to test the source checkout when FASTLOSS_TEST_INSTALLED=1."""
    from_checkout = Path(fastloss.__file__).resolve().is_relative_to(TESTS_DIR.parent)
    r = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", str(TESTS_DIR / "test_config.py")],
                   cwd=tmp_path, env_extra={"FASTLOSS_TEST_INSTALLED": "1"})
    if from_checkout:
        assert r.returncode != 0
        assert "FASTLOSS_TEST_INSTALLED=1 but fastloss was imported from the source checkout" in r.stdout + r.stderr
    else:
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("argv", [[], ["frobnicate"]], ids=lambda a: " ".join(a) or "no-command")
def test_cli_usage_errors_exit_2_before_any_work(argv, capsys):
    """`python -m fastloss` with bad arguments: exit code 2 and a one-line error, nothing run.
    (The options of `bench`: tests/test_bench_cli.py.)"""
    from fastloss.__main__ import main
    try:
        code = main(argv)
    except SystemExit as exc:           # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "error" in err


def test_cli_info_in_process(capsys):
    from fastloss.__main__ import main
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"fastloss       {fastloss.__version__}" in out and "isa selected" in out
