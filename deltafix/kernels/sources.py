"""Where the kernel sources are: the top-level ``cuda_ext`` package.

The CUDA and C sources live in ``cuda_ext/`` at the repository's top (the design card's layout)
and ship in the wheel and the sdist as that package's data. They are found through
``importlib.resources`` rather than a path relative to this file, so the lookup is the same in a
source checkout (an editable install maps ``cuda_ext`` to the checkout's folder) and in an
installed wheel (``site-packages/cuda_ext``). ``deltafix doctor`` reports the folder found.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

PACKAGE = "cuda_ext"


def source_dir() -> Path:
    """The folder holding the kernel sources.

    Raises ``FileNotFoundError`` (an ``OSError``, which the loaders catch and report as the reason
    the kernels are unavailable) when the package is not installed or not a folder on disk: the
    compilers need real files, and a zipped install has none.
    """
    try:
        root = importlib.resources.files(PACKAGE)
    except ModuleNotFoundError as err:
        raise FileNotFoundError(f"the kernel sources are not installed (no package {PACKAGE!r}: {err})") from err
    except TypeError as err:  # a plain module named cuda_ext shadows the package
        raise FileNotFoundError(f"{PACKAGE!r} is not deltafix's kernel source package ({err})") from err
    if not isinstance(root, Path) or not root.is_dir():
        raise FileNotFoundError(f"the kernel sources at {root} are not a folder on disk")
    return root


def source_file(name: str) -> Path:
    """The path of one kernel source; ``FileNotFoundError`` when it is missing, which names the folder
    searched, so a broken install says where it looked."""
    path = source_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"the kernel source {name} is missing from {path.parent}")
    return path
