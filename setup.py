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

The C API (docs/c_api.md): next to the extension, the build writes
  fastloss/include/fastloss.h      a copy of src_c/fastloss.h       (fastloss.get_include())
  fastloss/lib/libfastloss.so      the kernels' object files, already compiled for
                                   ``_core``, linked again into a plain shared library
                                   with no Python symbols          (fastloss.get_library_dir())
into the build directory for wheels and into the source tree for ``build_ext --inplace``
(both gitignored there).  The library is built on ELF platforms (Linux, the BSDs) with a
GCC-like compiler; elsewhere the build says it skipped it and only the header is installed.
"""
import glob
import os
import types
from concurrent.futures import ThreadPoolExecutor
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

C_SOURCES = ["src_c/dispatch.c", "src_c/isa_baseline.c", "src_c/isa_avx2.c", "src_c/isa_avx512.c"]
HEADER = "src_c/fastloss.h"          # the public C API, installed as fastloss/include/fastloss.h
LIB_FILE = "libfastloss.so"          # the C API's shared library, fastloss/lib/libfastloss.so
GCC_LIKE_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-Wno-unused-function"]


def _elf_platform():
    """True where shared objects are ELF (Linux, the BSDs): there libfastloss.so is built."""
    return sys.platform.startswith(("linux", "freebsd", "netbsd", "openbsd", "dragonfly"))


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
                    "-O1", "-g1", "-fno-omit-frame-pointer", f"-fsanitize={san}", "-fno-sanitize-recover=all"]
                lflags.append(f"-fsanitize={san}")
                _log(f"sanitizers on: {san}")
            extra = os.environ.get("FASTLOSS_EXTRA_CFLAGS")
            if extra:
                cflags += extra.split()
        if ctype != "msvc" and not os.environ.get("FASTLOSS_SERIAL_BUILD"):
            self.compiler.compile = types.MethodType(_parallel_compile, self.compiler)
        _log(f"OpenMP: {'on' if openmp else 'OFF (the kernels will run single-threaded)'}")
        _log(f"compile flags: {' '.join(cflags)}")
        # -Bsymbolic: the extension's own calls to fl_* bind to its own copies (never to a
        # libfastloss.so loaded with RTLD_GLOBAL into the same process), and vice versa
        symbolic = ["-Wl,-Bsymbolic"] if ctype != "msvc" and _elf_platform() else []
        for ext in self.extensions:
            ext.extra_compile_args = cflags + list(ext.extra_compile_args or [])
            ext.extra_link_args = lflags + symbolic + list(ext.extra_link_args or [])
        super().build_extensions()
        self._install_c_api(ctype, cflags, lflags)

    def run(self):
        self._c_api_files = []
        super().run()
        if self.inplace or getattr(self, "editable_mode", False):
            # setuptools builds an in-place extension in build/ and copies it to the source tree
            # (copy_extensions_to_source; `pip install -e` imports from there): the C API files
            # follow it
            src_pkg = self.get_finalized_command("build_py").get_package_dir("fastloss")
            for path, rel in self._c_api_files:
                dest = os.path.join(src_pkg, rel)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copy(path, dest)

    def _install_c_api(self, ctype, cflags, lflags):
        """The public header into <package>/include, the kernels into <package>/lib/libfastloss.so."""
        pkg_dir = os.path.dirname(self.get_ext_fullpath("fastloss._core"))
        inc_dir = os.path.join(pkg_dir, "include")
        os.makedirs(inc_dir, exist_ok=True)
        header = os.path.join(inc_dir, os.path.basename(HEADER))
        shutil.copyfile(HEADER, header)
        self._c_api_files = [(header, os.path.join("include", os.path.basename(HEADER)))]
        if ctype == "msvc" or not _elf_platform():
            _log(f"C API: header installed; libfastloss not built on this platform ({sys.platform}, "
                 f"{ctype} compiler): only ELF platforms with a GCC-like compiler are supported")
            return
        # The object files the extension was built from (same flags, -fPIC): linked, not compiled
        # again.  They are missing only when the extension was up to date and build/ was removed.
        objects = self.compiler.object_filenames(C_SOURCES, output_dir=self.build_temp)
        if not all(os.path.exists(o) for o in objects):
            _log("C API: kernel objects not found in the build directory: compiling them")
            objects = self.compiler.compile(C_SOURCES, output_dir=self.build_temp, include_dirs=["src_c"],
                                            extra_postargs=cflags)
        lib_dir = os.path.join(pkg_dir, "lib")
        os.makedirs(lib_dir, exist_ok=True)
        lib = os.path.join(lib_dir, LIB_FILE)
        # Python's own link command without its -L/-rpath (the interpreter's lib directory of the
        # build machine has no business in the library's RUNPATH).  soname = the file name (wheels
        # cannot hold the usual .so.N symlink; the ABI is checked with fl_abi_version() instead);
        # -Bsymbolic: the library's internal calls bind to itself, so its ISA dispatch state is its
        # own; -lm: a C program need not link libm itself (the extension gets it from the
        # interpreter); -S: no debug info (it would double the wheel's size), except in sanitizer builds.
        linker = [a for a in self.compiler.linker_so if not a.startswith(("-L", "-Wl,-rpath", "-Wl,-R"))]
        link_args = lflags + ["-Wl,-soname," + LIB_FILE, "-Wl,-Bsymbolic", "-lm"]
        if not os.environ.get("FASTLOSS_SANITIZE"):
            link_args.append("-Wl,-S")
        cmd = linker + list(objects) + ["-o", lib] + link_args
        _log("C API: " + " ".join(cmd))
        subprocess.run(cmd, check=True)
        self._c_api_files.append((lib, os.path.join("lib", LIB_FILE)))
        _log(f"C API: {lib}")


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
