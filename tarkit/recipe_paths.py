"""``root:`` paths in a parsed recipe: resolved before its parts are built, and a missing input stage named
together with the recipe that makes it.

A recipe's outputs (``export_dir``, the trainer's ``default_root_dir``, a logger's ``save_dir``) may not
exist yet; every other ``root:`` path is an input stage and must.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from tarkit.paths import ROOT_PREFIX, ROOT_VARIABLE, resolve_path

OUTPUT_KEYS = ("export_dir", "default_root_dir", "save_dir", "dirpath")


class MissingStageError(FileNotFoundError):
    """A ``root:`` input of a recipe does not exist; the message names the recipe that writes it."""


def _leaves(value: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, dict):
        for name, inner in value.items():
            yield from _leaves(inner, f"{key}.{name}" if key else name)
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _leaves(inner, f"{key}[{index}]")
    elif isinstance(value, str) and value.startswith(ROOT_PREFIX):
        yield key, value


def _resolved(value: Any) -> Any:
    if isinstance(value, Namespace):
        for name, inner in vars(value).items():
            setattr(value, name, _resolved(inner))
        return value
    if isinstance(value, dict):
        return {name: _resolved(inner) for name, inner in value.items()}
    if isinstance(value, list):
        return [_resolved(inner) for inner in value]
    if isinstance(value, str) and value.startswith(ROOT_PREFIX):
        return str(resolve_path(value))
    return value


def producing_recipe(path: str, recipe_dirs: Iterable[Path]) -> Path | None:
    """The recipe (a YAML file in ``recipe_dirs``) whose ``export_dir`` is the ``root:`` path ``path``."""
    pattern = re.compile(rf"^\s*export_dir:\s*['\"]?{re.escape(path)}['\"]?\s*(#.*)?$", re.MULTILINE)
    for folder in recipe_dirs:
        for recipe in sorted(folder.glob("*.yaml")):
            if pattern.search(recipe.read_text(errors="replace")):
                return recipe
    return None


def check_inputs(config: Namespace, recipe_dirs: Iterable[Path]) -> None:
    """Raise :class:`MissingStageError` for the first ``root:`` input of ``config`` that does not exist."""
    recipe_dirs = list(recipe_dirs)
    for key, value in _leaves(config):
        if key.rsplit(".", 1)[-1] in OUTPUT_KEYS or resolve_path(value).exists():
            continue
        recipe = producing_recipe(value, recipe_dirs)
        make = f"make it with `tarkit fit --config {recipe}`" if recipe else "train the stage that writes it"
        raise MissingStageError(
            f"{key}: {value} ({resolve_path(value)}) does not exist; {make}, or point --root ({ROOT_VARIABLE}) "
            "at a root that has it"
        )


def resolve_root_paths(config: Namespace) -> Namespace:
    """``config`` with every ``root:`` string replaced by its file-system path (in place)."""
    return _resolved(config)
