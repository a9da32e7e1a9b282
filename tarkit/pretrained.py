"""Save and load any tarkit model as a folder: ``config.json`` (constructor arguments) + ``model.safetensors``.

In the spirit of diffusers' ``ModelMixin``/``ConfigMixin``: a class that mixes in :class:`PretrainedMixin`
has the arguments of its constructor recorded automatically, so ``save_pretrained(dir)`` and
``Class.from_pretrained(dir)`` need nothing else. Injected parts that are themselves pretrained models are
stored as nested entries, so composite models round-trip too. Weights are never unpickled.

A part is named by its registry entry, ``{"group": "tarkit.detokenizers", "name": "ar", "init_args": {...}}``,
so a plugin may move its classes without breaking saved folders; a class that is not registered (a core class
such as ``TATok``, or a plugin's internal part) by its import path, ``{"class_path", "init_args"}`` (the
LightningCLI recipe form). ``config.json`` also records the ``tarkit_version`` that wrote it. Folders written
before registry names (class paths throughout) still load.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from tarkit import __version__
from tarkit.registry import UnknownPartError, import_from_string, registry

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class PretrainedLoadError(ValueError):
    """A pretrained folder or file cannot be loaded into the model it describes."""


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _identity(cls: type) -> dict[str, str]:
    """How a config names ``cls``: its registry group and name, else its import path."""
    registered = registry.registered_as(cls)
    return {"group": registered[0], "name": registered[1]} if registered else {"class_path": _class_path(cls)}


def _identity_text(config: dict[str, Any]) -> str:
    return f"{config['group']}:{config['name']}" if "group" in config else str(config.get("class_path"))


def _resolve_class(config: dict[str, Any]) -> type:
    if "group" in config:
        try:
            return registry.get(config["group"], config["name"])
        except (UnknownPartError, ValueError) as err:
            raise PretrainedLoadError(
                f"config names {_identity_text(config)}, which is not installed; install the package that provides "
                f"it ({err})"
            ) from err
    try:
        return import_from_string(config["class_path"])
    except (ImportError, AttributeError, ValueError) as err:
        raise PretrainedLoadError(
            f"config names {config['class_path']}, which cannot be imported; install the package that provides it"
        ) from err


def _record_init_args(init):
    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        # Only the most derived constructor records: parents called through super() see it already set.
        if "_init_config" not in self.__dict__:
            bound = inspect.signature(init).bind(self, *args, **kwargs)
            bound.apply_defaults()
            config = {}
            for name, value in list(bound.arguments.items())[1:]:
                kind = inspect.signature(init).parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    config.update(value)
                elif kind is not inspect.Parameter.VAR_POSITIONAL:
                    config[name] = value
            object.__setattr__(self, "_init_config", config)
        init(self, *args, **kwargs)

    return wrapper


def part_config(model: PretrainedMixin) -> dict[str, Any]:
    """How a config records a pretrained part: its identity (registry name or class path) and ``init_args``."""
    return {**_identity(type(model)), "init_args": model.config_dict()}


def _saved_part(config: Any) -> Any:
    """A saved ``config.json`` without its ``tarkit_version`` record: the part it describes."""
    return {k: v for k, v in config.items() if k != "tarkit_version"} if isinstance(config, dict) else config


def config_class(config: dict[str, Any]) -> type | None:
    """The class a saved ``config.json`` describes, or None when it is not a tarkit config (e.g. a Hugging Face
    folder's); an installed-nowhere class is a :class:`PretrainedLoadError`."""
    part = _saved_part(config)
    return _resolve_class(part) if _is_part(part) else None


def _to_json(value: Any, where: str) -> Any:
    if isinstance(value, PretrainedMixin):
        return part_config(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _to_json(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(
        f"cannot save config: argument {where!r} is a {type(value).__name__}, which is not JSON-serialisable; "
        "pass plain values (or pretrained parts) to the constructor"
    )


def _is_part(value: Any) -> bool:
    return isinstance(value, dict) and set(value) in ({"class_path", "init_args"}, {"group", "name", "init_args"})


def _from_json(value: Any) -> Any:
    if _is_part(value):
        cls = _resolve_class(value)
        if not (inspect.isclass(cls) and issubclass(cls, PretrainedMixin)):
            raise PretrainedLoadError(f"config names {_identity_text(value)}, which is not a tarkit pretrained class")
        return cls(**{k: _from_json(v) for k, v in value["init_args"].items()})
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _alias_groups(module: nn.Module) -> list[set[str]]:
    """State-dict keys that share storage (tied weights): safetensors stores one name per group."""
    groups: dict[tuple, set[str]] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        groups.setdefault(ident, set()).add(key)
    return list(groups.values())


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise one clear error listing missing, unexpected and wrongly shaped keys (tied aliases allowed)."""
    expected = module.state_dict()
    present = set(state)
    missing = sorted(k for group in _alias_groups(module) if not (group & present) for k in group)
    unexpected = sorted(present - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(present & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_short_list(mismatched)}")
    if problems:
        raise PretrainedLoadError(
            f"{source} does not match {type(module).__name__}: {'; '.join(problems)}. "
            "Is it the right checkpoint for this config?"
        )


def _short_list(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... {len(items) - limit} more' if len(items) > limit else ''}]"


def resolve_pretrained_dir(path: str | os.PathLike, filenames: tuple[str, ...] = (CONFIG_NAME, WEIGHTS_NAME)) -> Path:
    """A local folder, or a Hugging Face hub id downloaded to the local cache."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise PretrainedLoadError(f"{path} is a file; from_pretrained expects a folder with {', '.join(filenames)}")
    repo_id = str(path)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise PretrainedLoadError(f"{path} does not exist; give a local folder or a hub id like 'org/name'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=list(filenames)))
    except Exception as err:
        raise PretrainedLoadError(
            f"{path} is not a local folder and could not be fetched from the hub "
            f"({type(err).__name__}); download it and pass the local folder"
        ) from err


class PretrainedMixin:
    """Adds ``save_pretrained`` / ``from_pretrained`` (config.json + model.safetensors) to an ``nn.Module``.

    The constructor's arguments become the config; they must be JSON values or pretrained parts. A saved folder
    holds its own weights and must rebuild the same module later, so two kinds of argument are saved otherwise:

    - ``weight_sources`` (class attribute): arguments naming where the weights came from (a checkpoint folder,
      a hub id, embedding rows), saved as the given value, e.g. ``{"pretrained": None}``;
    - :meth:`resolved_config`: for a class built from a ``preset`` plus overrides, the architecture they
      resolved to, saved with ``preset: None`` (under ``config`` when the constructor takes a ``config``,
      else as its own arguments), so the folder does not depend on a preset's later edits.
    """

    weight_sources: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _record_init_args(cls.__init__)

    def resolved_config(self) -> dict[str, Any] | None:
        """The architecture ``preset`` and its overrides resolved to; ``None`` for a class without presets."""
        return None

    def config_dict(self) -> dict[str, Any]:
        """The constructor arguments as a saved folder needs them (see the class docstring), JSON-ready."""
        args = {**self.__dict__.get("_init_config", {}), **self.weight_sources}
        resolved = self.resolved_config()
        if resolved is not None:
            args.update({"preset": None, **({"config": resolved} if "config" in args else resolved)})
        return {k: _to_json(v, k) for k, v in args.items()}

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory`` (created if needed)."""
        config = {**_identity(type(self)), "init_args": self.config_dict(), "tarkit_version": __version__}
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_model(self, str(out / WEIGHTS_NAME), metadata={"format": "pt", "model": _identity_text(config)})
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Self:
        """Build an untrained model from a config as :meth:`save_pretrained` writes it (registry ``group`` and
        ``name``, or ``class_path``; ``init_args``)."""
        part = _saved_part(config)
        if not _is_part(part):
            raise PretrainedLoadError(
                "config must have 'init_args' and either 'group' + 'name' or 'class_path' entries"
            )
        model = _from_json(part)
        if not isinstance(model, cls):
            raise PretrainedLoadError(f"config describes {_identity_text(part)}, which is not a {cls.__name__}")
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Self:
        """Load a folder written by :meth:`save_pretrained` (a local path or a hub id)."""
        folder = resolve_pretrained_dir(path)
        config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for needed in (config_file, weights_file):
            if not needed.is_file():
                raise PretrainedLoadError(f"{folder} has no {needed.name}; is it a tarkit pretrained folder?")
        try:
            config = json.loads(config_file.read_bytes().decode("utf-8"))
        except ValueError as err:  # JSON and UTF-8 errors alike
            raise PretrainedLoadError(f"{config_file} is not valid UTF-8 JSON ({err}); save the folder again") from err
        try:
            model = cls.from_config(config)
        except Exception as err:  # a typo'd or wrongly typed argument, whatever type of error its class raises
            if isinstance(err, PretrainedLoadError):
                raise
            message = " ".join(str(err).split())
            raise PretrainedLoadError(f"{config_file} does not build its model ({message}); fix init_args") from err
        try:
            state = load_file(str(weights_file), device=str(map_location))
        except Exception as err:  # safetensors raises its own error type for a damaged or foreign file
            raise PretrainedLoadError(
                f"{weights_file} is not a readable safetensors file ({err}); it is damaged or truncated: save or "
                "download the folder again"
            ) from err
        check_state_dict(model, state, str(weights_file))
        model.load_state_dict(state, strict=False)  # strictness checked above; tied aliases are absent
        return model.to(map_location)
