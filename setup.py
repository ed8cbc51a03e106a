"""Build of fastloss: one extension, ``fastloss._core``, from the Cython bindings in
``fastloss/`` and the plain-C kernels in ``src_c/``.

Compile flags: ``-O3 -fno-math-errno -fno-trapping-math`` (what lets GCC vectorize
branch-free math without changing NaN/inf semantics); never fast-math, and never a
flag that targets the build machine's own CPU: ``src_c/isa_*.c`` compile the kernels
for several ISAs and ``src_c/dispatch.c`` picks one at run time.

OpenMP is probed by compiling and linking a tiny program; without it the build
still succeeds (single-threaded, ``-fopenmp-simd`` keeps the SIMD pragmas) and
says so.  Environment knobs:
  FASTLOSS_NO_OPENMP=1             build without OpenMP
  FASTLOSS_SANITIZE=address,undefined   build with sanitizers (debug builds)
  FASTLOSS_EXTRA_CFLAGS="..."      appended to the compile flags
  FASTLOSS_SERIAL_BUILD=1          compile the C sources one after the other (default: in parallel)
"""
import glob
import os
import types
from concurrent.futures import ThreadPoolExecutor
import shutil
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

C_SOURCES = ["src_c/dispatch.c", "src_c/isa_baseline.c", "src_c/isa_avx2.c", "src_c/isa_avx512.c"]
GCC_LIKE_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-Wno-unused-function"]


def _log(msg):
    print(f"fastloss build: {msg}", file=sys.stderr, flush=True)


def _compiles(compiler, source, extra_compile, extra_link):
    """True if `source` compiles and links with the given flags."""
    tmp = tempfile.mkdtemp(prefix="fastloss-probe-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=extra_compile)
        compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=extra_link)
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


OPENMP_PROBE = """
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n > 0 ? 0 : 1;
}
"""


def _parallel_compile(self, sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                      extra_preargs=None, extra_postargs=None, depends=None):
    """CCompiler.compile with the translation units compiled in parallel (one compiler process per
    source, up to the CPU count): the three ISA files dominate the build, ~2x faster on 2 cores."""
    macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs)
    cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)

    def one(obj):
        if obj in build:
            src, ext = build[obj]
            self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

    workers = max(1, min(len(objects), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, objects))          # re-raises a compile error
    return objects


class BuildExt(build_ext):
    def build_extensions(self):
        ctype = self.compiler.compiler_type
        if ctype == "msvc":
            cflags, lflags = ["/O2", "/fp:precise"], []
            openmp = not os.environ.get("FASTLOSS_NO_OPENMP") and _compiles(
                self.compiler, OPENMP_PROBE, ["/openmp"], [])
            if openmp:
                cflags.append("/openmp")
        else:
            cflags, lflags = list(GCC_LIKE_FLAGS), []
            openmp = False
            if os.environ.get("FASTLOSS_NO_OPENMP"):
                _log("OpenMP disabled by FASTLOSS_NO_OPENMP")
            else:
                openmp = _compiles(self.compiler, OPENMP_PROBE, ["-fopenmp"], ["-fopenmp"])
            if openmp:
                cflags.append("-fopenmp")
                lflags.append("-fopenmp")
            else:
                cflags.append("-fopenmp-simd")
            san = os.environ.get("FASTLOSS_SANITIZE")
            if san:
                cflags = [f for f in cflags if f != "-O3"] + [
                    "-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={san}", "-fno-sanitize-recover=all"]
                lflags.append(f"-fsanitize={san}")
                _log(f"sanitizers on: {san}")
            extra = os.environ.get("FASTLOSS_EXTRA_CFLAGS")
            if extra:
                cflags += extra.split()
        if ctype != "msvc" and not os.environ.get("FASTLOSS_SERIAL_BUILD"):
            self.compiler.compile = types.MethodType(_parallel_compile, self.compiler)
        _log(f"OpenMP: {'on' if openmp else 'OFF (the kernels will run single-threaded)'}")
        _log(f"compile flags: {' '.join(cflags)}")
        for ext in self.extensions:
            ext.extra_compile_args = cflags + list(ext.extra_compile_args or [])
            ext.extra_link_args = lflags + list(ext.extra_link_args or [])
        super().build_extensions()


extensions = [
    Extension(
        "fastloss._core",
        sources=["fastloss/_core.pyx"] + C_SOURCES,
        include_dirs=["src_c", np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
        depends=sorted(glob.glob("src_c/*.h")),   # every kernel header: a change rebuilds
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
    cmdclass={"build_ext": BuildExt},
)
