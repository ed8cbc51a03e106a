"""Importing fastloss from a source checkout that was never built in place.

``python -m fastloss ...`` run inside the repository puts the checkout first on
``sys.path``, so ``import fastloss`` finds the source package, which has no
compiled ``_core`` after a plain ``pip install .`` (the build went into
site-packages).  Rather than fail, ``fastloss/__init__.py`` then takes its
modules from the installed build; without one it raises an ImportError that says
what to do.
"""
from __future__ import annotations

import os


def installed_package_dir(source_dir: str, error: ImportError) -> str:
    """The directory of the installed ``fastloss`` package (not `source_dir`), or ImportError."""
    from importlib import metadata

    hint = ("fastloss is imported from its source tree, which has no compiled extension. "
            "Install it with `pip install .` (or `pip install -e .` to build in place), "
            "or run Python from another directory.")
    source = os.path.realpath(source_dir)
    # every installed copy on sys.path (the checkout's own build metadata is one of them)
    for dist in metadata.distributions(name="fastloss"):
        pkg = os.path.realpath(str(dist.locate_file("fastloss")))
        if pkg != source and os.path.isdir(pkg) and any(
                f.startswith("_core.") and f.endswith((".so", ".pyd")) for f in os.listdir(pkg)):
            return pkg
    raise ImportError(hint) from error
