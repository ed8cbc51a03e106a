"""The C and Cython API: the installed header, the shared library libfastloss.so, a C program
linked against it, and a Cython extension that cimports ``fastloss.capi``.

Works against the in-place build and against an installed wheel (FASTLOSS_TEST_INSTALLED=1):
everything is located through ``fastloss.get_include()`` / ``get_library_dir()``, never through
the source tree (only the example program's source and the reference header are read from it).
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastloss
from fastloss import _capi, reference
from fl_testing import SUPPORTED_ISAS, run_python

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "c" / "mse_and_ce.c"
ELF = sys.platform.startswith(("linux", "freebsd", "netbsd", "openbsd", "dragonfly"))
needs_lib = pytest.mark.skipif(not ELF, reason=f"libfastloss.so is built on ELF platforms only, not {sys.platform}")

# the status codes of fastloss.h
FL_OK, FL_ERR_DTYPE, FL_ERR_INDEX = 0, -2, -5


def _header_abi(path) -> int:
    m = re.search(r"^#define FL_ABI_VERSION (\d+)", Path(path).read_text(), re.M)
    assert m, f"no FL_ABI_VERSION in {path}"
    return int(m.group(1))


def _c_compiler():
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name.split()[0]):
            return name.split()
    pytest.skip("no C compiler (cc, gcc or clang) on PATH")


# ---- 1. the files ------------------------------------------------------------------------------

def test_header_is_installed_and_current():
    inc = Path(_capi.get_include())
    header = inc / "fastloss.h"
    assert header.is_file()
    assert _capi.get_cflags() == [f"-I{inc}"]
    src = REPO_ROOT / "src_c" / "fastloss.h"
    if src.is_file():           # the installed copy is the header the kernels were built from
        assert header.read_bytes() == src.read_bytes(), f"{header} differs from {src}: rebuild"
    assert _header_abi(header) >= 1


def test_capi_pxd_is_installed():
    pxd = Path(fastloss._core.__file__).parent / "capi.pxd"
    assert pxd.is_file()
    text = pxd.read_text()
    for name in ("fl_pointwise", "fl_cross_entropy", "fl_multi_margin", "fl_abi_version", "row_rank", "nogil"):
        assert name in text, name


def _strip_c_comments(text):
    return re.sub(r"/\*.*?\*/", " ", text, flags=re.S)


def _header_api(text):
    """Function names, FL_* constants and {struct: field names} declared by fastloss.h."""
    text = _strip_c_comments(text)
    funcs = set(re.findall(r"^[\w ]+?[\s*](fl_\w+)\s*\(", text, re.M))
    consts = set(re.findall(r"\b(FL_[A-Z0-9_]+)\s*=", text)) | set(re.findall(r"#define (FL_[A-Z0-9_]+) ", text))
    structs = {name: set(re.findall(r"(\w+)\s*(?:\[[^\]]*\]\s*)*(?=[,;])", body))
               for body, name in re.findall(r"typedef struct \{(.*?)\} (\w+);", text, re.S)}
    return funcs, consts, structs


def _pxd_api(text):
    funcs = set(re.findall(r"^    [\w ]+?[\s*](fl_\w+)\(", text, re.M))
    consts = set(re.findall(r"^        (FL_[A-Z0-9_]+)\s*$", text, re.M))
    structs = {}
    for name, body in re.findall(r"ctypedef struct (\w+):\n((?:        .*\n)+)", text):
        structs[name] = {re.match(r".*?\**(\w+)(\[|\s*$)", line.split("#")[0].rstrip()).group(1)
                         for line in body.splitlines() if line.split("#")[0].strip()}
    return funcs, consts, structs


def test_capi_pxd_declares_the_whole_header():
    """capi.pxd is written by hand: every function, constant and struct field of fastloss.h must be in it."""
    h_funcs, h_consts, h_structs = _header_api((Path(_capi.get_include()) / "fastloss.h").read_text())
    p_funcs, p_consts, p_structs = _pxd_api((Path(fastloss._core.__file__).parent / "capi.pxd").read_text())
    assert {"fl_pointwise", "fl_cross_entropy", "fl_abi_version"} <= h_funcs   # the parser works
    assert h_funcs == p_funcs, (h_funcs ^ p_funcs)
    assert h_consts == p_consts, (h_consts ^ p_consts)
    assert h_structs.keys() == p_structs.keys() == {"fl_pointwise_job", "fl_ce_job", "fl_rows_job"}
    for name, fields in h_structs.items():
        assert fields <= p_structs[name], (name, fields - p_structs[name])
        # fl_ce_job.row_rank: declared ahead of its C definition (appended by another change)
        assert p_structs[name] - fields <= {"row_rank"}, (name, p_structs[name] - fields)


@needs_lib
def test_library_abi_and_symbols():
    lib = Path(_capi.get_library())
    assert lib.name == "libfastloss.so" and lib.is_file()
    assert Path(_capi.get_library_dir()) == lib.parent
    assert _capi.get_ldflags() == [f"-L{lib.parent}", "-lfastloss", f"-Wl,-rpath,{lib.parent}"]
    so = ctypes.CDLL(str(lib))
    assert so.fl_abi_version() == _header_abi(Path(_capi.get_include()) / "fastloss.h")
    so.fl_isa_name.restype = ctypes.c_char_p
    assert so.fl_isa_name(so.fl_get_isa()).decode() in ("baseline", "avx2", "avx512")
    # the same build as the extension: same OpenMP setting, same ISAs compiled in
    assert bool(so.fl_have_openmp()) == fastloss._core.have_openmp()
    compiled = tuple(so.fl_isa_name(i).decode() for i in range(3) if so.fl_isa_compiled(i))
    assert compiled == fastloss._core.isa_compiled()
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm: the symbol checks need binutils")
    undefined = subprocess.run([nm, "-D", "--undefined-only", str(lib)], capture_output=True, text=True,
                               check=True).stdout.split()
    py = [s for s in undefined if s.startswith(("Py", "_Py"))]
    assert not py, f"libfastloss.so needs Python symbols: {py}"
    defined = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True, text=True,
                             check=True).stdout.split()
    for fn in ("fl_abi_version", "fl_pointwise", "fl_pointwise_scratch_len", "fl_cross_entropy",
               "fl_ce_scratch_len", "fl_multi_margin", "fl_triplet_margin", "fl_kl_div_logits",
               "fl_rows_scratch_len", "fl_set_isa", "fl_get_isa"):
        assert fn in defined, fn


@needs_lib
def test_docstring_examples(monkeypatch):
    """The examples in fastloss/_capi.py, run as written (``import fastloss`` + ``fastloss.get_...``)."""
    import doctest

    for name in _capi.__all__:          # exported by fastloss/__init__.py; added here where not (yet)
        if not hasattr(fastloss, name):
            monkeypatch.setattr(fastloss, name, getattr(_capi, name), raising=False)
    result = doctest.testmod(_capi, report=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0, result


# ---- 2. a C program ------------------------------------------------------------------------------

def _example_inputs():
    """The inputs of examples/c/mse_and_ce.c, rebuilt in NumPy (the same integer formulas)."""
    R, C, LD, N, V = 1000, 300, 320, 6, 11
    i = np.arange(R * LD)
    buf = (((i * 37) % 101).astype(np.float32) / np.float32(16) - np.float32(3)).reshape(R, LD)
    j = np.arange(C)
    y = ((j * 11) % 29).astype(np.float32) / np.float32(8)
    r, c = np.meshgrid(np.arange(N), np.arange(V), indexing="ij")
    logits = ((r * 7 + c * 5) % 13).astype(np.float32) / np.float32(4) - np.float32(1.5)
    target = (np.arange(N) * 3) % V
    target[N - 1] = -100
    return buf[:, :C], y, logits, target


@pytest.fixture(scope="module")
def example_binary(tmp_path_factory):
    if not ELF:
        pytest.skip(f"libfastloss.so is built on ELF platforms only, not {sys.platform}")
    if not EXAMPLE.is_file():
        pytest.skip(f"{EXAMPLE} not found (the tests run outside a source checkout)")
    out = tmp_path_factory.mktemp("capi_c") / "mse_and_ce"
    cmd = [*_c_compiler(), "-std=c99", "-O2", "-Wall", "-Werror", str(EXAMPLE), *_capi.get_cflags(),
           *_capi.get_ldflags(), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_tool_env(), timeout=120)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    return out


def _tool_env():
    """The environment for the compiler and the C program: this one without OMP_NUM_THREADS and,
    under tools/sanitize.sh (ASan preloaded), without leak checks of the compiler's own leaks."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if "detect_leaks=1" in env.get("ASAN_OPTIONS", ""):
        env["ASAN_OPTIONS"] = env["ASAN_OPTIONS"].replace("detect_leaks=1", "detect_leaks=0")
    return env


def _run_example(binary, *args):
    res = subprocess.run([str(binary), *args], capture_output=True, text=True, env=_tool_env(), timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
def test_c_program_matches_reference(example_binary, isa):
    out = _run_example(example_binary, "2", isa)
    x, y, logits, target = _example_inputs()
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    abi = re.match(r"(\d+) isa \w+", lines["abi"]).group(1)
    assert int(abi) == _header_abi(Path(_capi.get_include()) / "fastloss.h")
    assert lines["abi"].split()[2] == isa
    # the sums are accumulated in double: float64 accuracy
    np.testing.assert_allclose(float(lines["mse"]), reference.mse_loss(x, y), rtol=1e-13)
    np.testing.assert_allclose(float(lines["cross_entropy"]), reference.cross_entropy(logits, target), rtol=1e-6)
    assert lines["bad_target"] == f"status {FL_ERR_INDEX} row 2"
    assert lines["bad_dtype"] == f"status {FL_ERR_DTYPE}"


def test_c_program_thread_count_does_not_change_results(example_binary):
    # the MSE has 300k elements: 1, 2 or 4 threads (the kernels' minimum is 64k elements a thread)
    for isa in SUPPORTED_ISAS:
        outs = {n: _run_example(example_binary, str(n), isa) for n in (1, 2, 3, 4, 0)}
        assert len(set(outs.values())) == 1, outs


def test_c_program_default_isa_and_unavailable_isa(example_binary):
    out = _run_example(example_binary)
    assert out.splitlines()[0].split()[3] == SUPPORTED_ISAS[-1]      # "abi 1 isa <best>": the default
    res = subprocess.run([str(example_binary), "1", "sse9"], capture_output=True, text=True, env=_tool_env())
    assert res.returncode == 2 and "ISA sse9 is not available" in res.stderr


# ---- 3. a Cython extension that cimports fastloss.capi --------------------------------------------

PYX = '''
# cython: language_level=3, boundscheck=False, wraparound=False
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from fastloss.capi cimport *          # the nogil declarations of fastloss.h

def abi():
    return fl_abi_version(), FL_ABI_VERSION

def mse(const float[:, :] x, const float[::1] y, int nthreads):
    """mean (x - y)^2 over a 2-D float32 view with y broadcast over the rows."""
    cdef fl_pointwise_job job
    cdef double swl = 0.0, sw = 0.0
    cdef int st
    memset(&job, 0, sizeof(job))
    job.op = FL_PW_MSE
    job.dtype = FL_F32
    job.ndim = 2
    job.nred = 2
    job.shape[0] = x.shape[0]
    job.shape[1] = x.shape[1]
    job.strides[FL_OP_INPUT][0] = x.strides[0]
    job.strides[FL_OP_INPUT][1] = x.strides[1]
    job.strides[FL_OP_TARGET][0] = 0
    job.strides[FL_OP_TARGET][1] = y.strides[0]
    job.input = &x[0, 0]
    job.target = &y[0]
    job.sum_wl = &swl
    job.sum_w = &sw
    job.scratch = <double *>malloc(max(fl_pointwise_scratch_len(&job), 1) * sizeof(double))
    with nogil:
        st = fl_pointwise(&job, nthreads)
    free(job.scratch)
    return st, swl / sw

def cross_entropy(const double[:, ::1] logits, const int64_t[::1] target, double[::1] grad, int nthreads):
    """mean cross-entropy over rows (ignore_index -100) and its gradient, written into grad."""
    cdef fl_ce_job job
    cdef int st, r, n = 0
    cdef int64_t bad = -1
    cdef double total = 0.0
    cdef double *row_loss = <double *>malloc(logits.shape[0] * sizeof(double))
    for r in range(logits.shape[0]):
        n += target[r] != -100
    memset(&job, 0, sizeof(job))
    job.dtype = FL_F64
    job.V = logits.shape[1]
    job.row_ndim = 1
    job.row_shape[0] = logits.shape[0]
    job.logits_strides[0] = logits.strides[0]
    job.out_strides[0] = logits.strides[0]
    job.logits = &logits[0, 0]
    job.out = &grad[0]
    job.mode = FL_CE_OUT_GRAD
    job.target = &target[0]
    job.weight_sum = <double>job.V
    job.ignore_index = -100
    job.grad_scale = 1.0 / n
    job.row_loss = row_loss
    job.bad_row = &bad
    job.scratch = <double *>malloc(fl_ce_scratch_len(logits.shape[0], job.V) * sizeof(double))
    with nogil:
        st = fl_cross_entropy(&job, nthreads)
        if st == FL_OK:
            for r in range(logits.shape[0]):
                total += row_loss[r]
    free(job.scratch)
    free(row_loss)
    return st, bad, total / n
'''

SETUP = '''
import fastloss
from Cython.Build import cythonize
from setuptools import Extension, setup

ext = Extension("capi_user", ["capi_user.pyx"],
                include_dirs=[fastloss.get_include()],
                library_dirs=[fastloss.get_library_dir()],
                libraries=["fastloss"],
                runtime_library_dirs=[fastloss.get_library_dir()],
                extra_compile_args=["-O0", "-g0"])   # a quick build: the kernels are in the library
setup(name="capi_user", ext_modules=cythonize([ext], quiet=True), script_args=["build_ext", "--inplace", "-q"])
'''


@pytest.fixture(scope="module")
def cython_ext(tmp_path_factory):
    if not ELF:
        pytest.skip(f"libfastloss.so is built on ELF platforms only, not {sys.platform}")
    for mod in ("Cython", "setuptools"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed: the Cython API test builds an extension "
                        f"(pip install '.[test]' installs it)")
    _c_compiler()
    d = tmp_path_factory.mktemp("capi_cython")
    (d / "capi_user.pyx").write_text(PYX)
    # get_include() & co. are exported by fastloss/__init__ (or only by fastloss._capi on a branch
    # that does not export them yet): the setup script sees the same functions
    setup = SETUP if hasattr(fastloss, "get_include") else SETUP.replace(
        "import fastloss\n", "import fastloss._capi as fastloss\n")
    (d / "setup.py").write_text(setup)
    res = run_python(["setup.py"], cwd=d, timeout=300)
    assert res.returncode == 0, f"building the Cython extension failed:\n{res.stdout}\n{res.stderr}"
    [so] = [p for p in d.iterdir() if p.name.startswith("capi_user.") and p.suffix in (".so", ".pyd")]
    spec = importlib.util.spec_from_file_location("capi_user", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_cython_extension_calls_the_kernels(cython_ext, rng):
    assert cython_ext.abi() == (1, 1)
    # MSE on a strided view, broadcast target
    base = rng.standard_normal((800, 500)).astype(np.float32)
    x = base[::2, 3:453]               # 180k elements: up to 2 threads (the kernel's minimum per thread)
    y = rng.standard_normal(450).astype(np.float32)
    results = {n: cython_ext.mse(x, y, n) for n in (1, 2, 3)}
    assert len(set(results.values())) == 1, results
    st, value = results[1]
    assert st == FL_OK
    np.testing.assert_allclose(value, fastloss.mse_loss(x, np.broadcast_to(y, x.shape)), rtol=1e-6)
    np.testing.assert_allclose(value, reference.mse_loss(x, y), rtol=1e-13)

    # cross-entropy and its gradient, float64, with an ignored row
    logits = rng.standard_normal((9, 37))
    target = rng.integers(0, 37, 9)
    target[4] = -100
    grad = np.empty(logits.size)
    st, bad, loss = cython_ext.cross_entropy(logits, target, grad, 2)
    assert st == FL_OK
    want, want_grad = fastloss.cross_entropy_with_grad(logits, target)
    np.testing.assert_allclose(loss, want, rtol=1e-13)
    np.testing.assert_allclose(grad.reshape(logits.shape), want_grad, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(loss, reference.cross_entropy(logits, target), rtol=1e-12)

    # a target out of range: FL_ERR_INDEX and its row, not a crash
    target[6] = 37
    st, bad, _ = cython_ext.cross_entropy(logits, target, grad, 2)
    assert (st, bad) == (FL_ERR_INDEX, 6)
