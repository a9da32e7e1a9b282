"""The wheel must contain every package, and every built-in entry point must load as its group's type."""

import tomllib
from pathlib import Path

from tarkit.registry import GROUPS, import_from_string, registry

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_source_package_is_listed_for_the_wheel():
    setuptools = PYPROJECT["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    for package, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            assert ".".join((package, *relative)) in listed, f"{init.parent} is not in [tool.setuptools] packages"


def test_builtin_entry_points_load_as_their_group_type():
    declared = {k.removeprefix("tarkit."): v for k, v in PYPROJECT["project"]["entry-points"].items()}
    assert declared, "the built-in plugins must be registered through entry points"
    for short_group, entries in declared.items():
        group = f"tarkit.{short_group}"
        assert group in GROUPS
        for name, target in entries.items():
            assert issubclass(import_from_string(target), registry.base_class(group)), f"{group}:{name}"
            assert name in registry.load_group(group), f"{group}:{name} is declared but not installed"
