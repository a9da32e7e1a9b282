"""The plugin registry: every swappable part of tarkit is found through Python entry points.

A plugin is any installed distribution that declares an entry point in one of the groups below, e.g.

    [project.entry-points."tarkit.encoders"]
    siglip2 = "my_package.encoders:SigLIP2Encoder"

Discovery is lazy (nothing is imported until a group is asked for), a plugin that fails to import or a
name registered twice gives one warning naming the distribution and entry point and never breaks other
commands, and ``TARKIT_DISABLE_PLUGIN_AUTOLOAD=1`` keeps every distribution but tarkit itself out.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import warnings
from dataclasses import dataclass

GROUPS: tuple[str, ...] = (
    "tarkit.encoders",
    "tarkit.codebooks",
    "tarkit.quantizers",
    "tarkit.tatok_converters",
    "tarkit.detokenizers",
    "tarkit.lms",
    "tarkit.datamodules",
    "tarkit.tasks",
    "tarkit.modules",
    "tarkit.commands",
)

# What a plugin of each group must be, as import paths so that the registry imports nothing heavy until a
# group is used. `tarkit.commands` entries are sub-commands of the `tarkit` executable.
GROUP_BASES: dict[str, str] = {
    "tarkit.encoders": "tarkit.interfaces:VisionEncoder",
    "tarkit.codebooks": "tarkit.interfaces:CodebookProjection",
    "tarkit.quantizers": "tarkit.interfaces:Quantizer",
    "tarkit.tatok_converters": "tarkit.interfaces:TATokConverter",
    "tarkit.detokenizers": "tarkit.interfaces:DeTokenizer",
    "tarkit.lms": "tarkit.interfaces:LanguageModel",
    "tarkit.datamodules": "lightning.pytorch:LightningDataModule",
    "tarkit.tasks": "tarkit.interfaces:TaskFormatter",
    "tarkit.modules": "lightning.pytorch:LightningModule",
    "tarkit.commands": "tarkit.commands:Command",
}

BUILTIN_DISTRIBUTION = "tarkit"
DISABLE_AUTOLOAD_ENV = "TARKIT_DISABLE_PLUGIN_AUTOLOAD"


class TarkitPluginWarning(UserWarning):
    """A plugin could not be used (import error, wrong type, duplicate name); the rest still work."""


class UnknownPartError(ValueError):
    """A recipe or call named a part that no installed plugin registers."""

    def __init__(self, groups: list[str], name: str, available: dict[str, list[str]]):
        self.groups, self.name, self.available = groups, name, available
        listing = ", ".join(
            f"{g} (available: {', '.join(names) or 'none installed'})" for g, names in available.items()
        )
        super().__init__(
            f"unknown part {name!r} for {listing}; use a registered name, a class name or a full class_path "
            "(see `tarkit plugins`)"
        )


def import_from_string(target: str) -> object:
    """Import ``"package.module:attr"`` (or ``"package.module.attr"``)."""
    module_name, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class PluginEntry:
    """One registered part: its group, short name, ``module:attr`` target and the distribution declaring it."""

    group: str
    name: str
    target: str
    distribution: str

    @property
    def class_path(self) -> str:
        return self.target.replace(":", ".")

    def describe(self) -> str:
        return f"{self.group} plugin {self.name!r} ({self.target}) from distribution {self.distribution!r}"


def _warn(message: str) -> None:
    warnings.warn(message, TarkitPluginWarning, stacklevel=3)


class Registry:
    """Finds, validates and loads the parts registered under tarkit's entry-point groups."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, PluginEntry]] = {}
        self._loaded: dict[str, dict[str, type]] = {}

    def clear(self) -> None:
        """Forget what was discovered (tests and long-lived sessions that install plugins)."""
        self._entries.clear()
        self._loaded.clear()

    @staticmethod
    def _check_group(group: str) -> str:
        if group not in GROUPS:
            short = f"tarkit.{group}"
            if short in GROUPS:
                return short
            raise ValueError(f"unknown plugin group {group!r}; groups are: {', '.join(GROUPS)}")
        return group

    def entries(self, group: str) -> dict[str, PluginEntry]:
        """Registered names of a group, without importing them. Duplicates keep the built-in one, else the
        first found, and warn."""
        group = self._check_group(group)
        if group in self._entries:
            return self._entries[group]
        autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "") in ("", "0")
        found: dict[str, PluginEntry] = {}
        for ep in importlib.metadata.entry_points(group=group):
            dist = ep.dist.name if ep.dist is not None else "<unknown>"
            if not autoload and dist != BUILTIN_DISTRIBUTION:
                continue
            entry = PluginEntry(group, ep.name, ep.value, dist)
            previous = found.get(ep.name)
            if previous is None or previous == entry:
                found[ep.name] = entry
                continue
            keep, drop = (entry, previous) if dist == BUILTIN_DISTRIBUTION else (previous, entry)
            found[ep.name] = keep
            _warn(
                f"duplicate {group} name {ep.name!r}: {drop.target} from distribution {drop.distribution!r} "
                f"is ignored in favour of {keep.target} from {keep.distribution!r}"
            )
        self._entries[group] = dict(sorted(found.items()))
        return self._entries[group]

    def base_class(self, group: str) -> type:
        return import_from_string(GROUP_BASES[self._check_group(group)])

    def _load_entry(self, entry: PluginEntry) -> type | None:
        try:
            obj = import_from_string(entry.target)
        except Exception as err:  # a broken third-party plugin must not take the others down
            _warn(f"{entry.describe()} failed to load and is skipped: {type(err).__name__}: {err}")
            return None
        base = self.base_class(entry.group)
        if not (inspect.isclass(obj) and issubclass(obj, base)):
            _warn(f"{entry.describe()} is skipped: it is not a subclass of {base.__module__}.{base.__name__}")
            return None
        return obj

    def load_group(self, group: str) -> dict[str, type]:
        """Import every plugin of a group; broken ones are warned about and left out."""
        group = self._check_group(group)
        if group not in self._loaded:
            loaded = {}
            for name, entry in self.entries(group).items():
                obj = self._load_entry(entry)
                if obj is not None:
                    loaded[name] = obj
            self._loaded[group] = loaded
        return self._loaded[group]

    def load_all(self) -> dict[str, dict[str, type]]:
        return {group: self.load_group(group) for group in GROUPS}

    def get(self, group: str, name: str) -> type:
        """The class registered as ``name`` in ``group``; a clear error lists the names available."""
        group = self._check_group(group)
        loaded = self.load_group(group)
        if name not in loaded:
            raise UnknownPartError([group], name, {group: sorted(loaded)})
        return loaded[name]

    def registered_as(self, cls: type) -> tuple[str, str] | None:
        """``(group, name)`` under which ``cls`` itself is registered, among the groups of tarkit's own interfaces
        (None if it is not registered: an internal part, or a class given by its path)."""
        for group, base in GROUP_BASES.items():
            if base.startswith("tarkit.") and issubclass(cls, self.base_class(group)):
                name = self.name_of(group, cls)
                if name is not None:
                    return group, name
        return None

    def name_of(self, group: str, cls: type) -> str | None:
        """The name ``cls`` is registered under in ``group`` (None if it is not registered there)."""
        return next((name for name, obj in self.load_group(group).items() if obj is cls), None)

    def create(self, group: str, name: str, **kwargs: object) -> object:
        """Instantiate a registered part by short name (``timm.create_model`` style)."""
        return self.get(group, name)(**kwargs)

    def groups_accepting(self, typehint: type) -> list[str]:
        """Groups whose parts are valid values for a parameter annotated with ``typehint``."""
        return [g for g in GROUPS if issubclass(self.base_class(g), typehint)]

    def resolve(self, typehint: type, name: str) -> str | None:
        """Full class path of the part registered as ``name`` that fits ``typehint``; None if no group
        that fits ``typehint`` has that name."""
        for group in self.groups_accepting(typehint):
            cls = self.load_group(group).get(name)
            if cls is not None and issubclass(cls, typehint):
                return f"{cls.__module__}.{cls.__qualname__}"
        return None


registry = Registry()
