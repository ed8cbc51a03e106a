"""Where the C API is: the header ``fastloss.h`` and the shared library ``libfastloss.so``.

The build (setup.py) installs them inside the package, ``fastloss/include/`` and
``fastloss/lib/``, both for a wheel and for an in-place build.  The kernels in the
library are the ones the Python extension runs, callable from C (or C++, or Cython)
without Python; docs/c_api.md describes the ABI.
"""
from __future__ import annotations

import os
import sys

__all__ = ["get_include", "get_library_dir", "get_library", "get_cflags", "get_ldflags"]

_LIB_NAME = "fastloss"
_LIB_FILE = "libfastloss.so"


def _package_dir() -> str:
    # fastloss/__init__.py may redirect the package to an installed build (fastloss/_source_tree.py):
    # the built files live where the compiled extension is.
    import fastloss._core

    return os.path.dirname(os.path.abspath(fastloss._core.__file__))


def _existing(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"fastloss: {what} not found at {path}. It is written by the build: reinstall the package "
            f"(pip install .) or, in a source checkout, run `python setup.py build_ext --inplace`."
            + ("" if sys.platform.startswith("linux") else
               f" (The shared library is built on ELF platforms only, not on {sys.platform}.)"))
    return path


def get_include() -> str:
    """The directory that holds the public C header ``fastloss.h``.

    For C: ``cc -I$(python -c "import fastloss; print(fastloss.get_include())") ...``; for a
    Cython extension that does ``from fastloss.capi cimport ...``: ``include_dirs=[get_include()]``.

    >>> import os, fastloss
    >>> os.path.exists(os.path.join(fastloss.get_include(), "fastloss.h"))
    True
    """
    inc = os.path.join(_package_dir(), "include")
    _existing(os.path.join(inc, "fastloss.h"), "the C header fastloss.h")
    return inc


def get_library() -> str:
    """The path of the shared library ``libfastloss.so`` (the kernels, no Python symbols).

    Its ABI version, ``fl_abi_version()``, equals ``FL_ABI_VERSION`` of the header in
    :func:`get_include`.  Raises FileNotFoundError where it was not built (non-ELF platforms).

    >>> import ctypes, fastloss
    >>> ctypes.CDLL(fastloss.get_library()).fl_abi_version()
    1
    """
    return _existing(os.path.join(_package_dir(), "lib", _LIB_FILE), f"the shared library {_LIB_FILE}")


def get_library_dir() -> str:
    """The directory of ``libfastloss.so``: for ``-L``, ``-Wl,-rpath``, or setuptools'
    ``library_dirs`` and ``runtime_library_dirs`` (with ``libraries=["fastloss"]``).

    >>> import os, fastloss
    >>> os.path.basename(fastloss.get_library_dir())
    'lib'
    """
    return os.path.dirname(get_library())


def get_cflags() -> list[str]:
    """Compiler flags for a C program that includes ``fastloss.h``: ``["-I<include dir>"]``.

    >>> import fastloss
    >>> fastloss.get_cflags() == ["-I" + fastloss.get_include()]
    True
    """
    return ["-I" + get_include()]


def get_ldflags() -> list[str]:
    """Linker flags for a program that calls the kernels: ``-L<dir> -lfastloss -Wl,-rpath,<dir>``
    (the rpath lets the program find the library at run time without LD_LIBRARY_PATH).

    Usage: ``cc prog.c $(python -c "import fastloss; print(*fastloss.get_cflags(), *fastloss.get_ldflags())")``.

    >>> import fastloss
    >>> fastloss.get_ldflags()[1:2]
    ['-lfastloss']
    """
    lib_dir = get_library_dir()
    return ["-L" + lib_dir, "-l" + _LIB_NAME, "-Wl,-rpath," + lib_dir]
