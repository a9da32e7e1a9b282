"""What a trained Tar LM folder records about itself, in Hugging Face's place for it: ``generation_config.json``.

Everything sits under one custom ``"tar"`` key, which ``GenerationConfig.from_pretrained`` (and so
``Qwen2ForCausalLM.from_pretrained``) keeps as an attribute and ignores otherwise::

    "tar": {
      "train_scales": [2],
      "tatok": {"path": "root:checkpoints/tatok", "path_from_lm": "../tatok",
                "pool_scales": [1, 2, 3], "num_codes": 1024},
      "generation": {"scale": 2, "cfg_scale": 1.0, "temperature": 1.0, "top_k": 1200, "top_p": 0.95},
      "lm_plugin": "hf_causal_lm"
    }

``train_scales``: the pool scales the LM was trained on. ``lm_plugin``: the ``tarkit.lms`` name of the plugin
that wrote the folder (what the pipelines load it with). ``tatok``: the TA-Tok it was trained with, its path
as given to training, the same TA-Tok relative to the LM folder (what loading tries first: it still holds when
the stages' folders move together) and the shape the LM's image and scale tokens assume. ``generation``: the
defaults the pipelines use when a call does not set them; ``scale`` serves both pipelines, the rest is
text-to-image sampling of image tokens (``top_k``/``top_p`` ``null`` = off). They sit apart from Hugging
Face's own ``temperature``/``top_k``/``top_p``, which drive text generation with ``model.generate``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tarkit.paths import resolve_path

GENERATION_CONFIG = "generation_config.json"
SETTINGS_KEY = "tar"


@dataclass(frozen=True)
class GenerationDefaults:
    """Defaults of the pipelines' generation arguments (a folder without a record gets these)."""

    scale: int = 1
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int | None = 1200
    top_p: float | None = 0.95


@dataclass(frozen=True)
class TATokRecord:
    """The TA-Tok an LM was trained with."""

    path: str
    path_from_lm: str | None = None
    pool_scales: list[int] | None = None
    num_codes: int | None = None


@dataclass(frozen=True)
class TarSettings:
    """A Tar LM folder's record (see the module docstring); ``None`` fields were not recorded."""

    train_scales: list[int] | None = None
    tatok: TATokRecord | None = None
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    lm_plugin: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "settings") -> TarSettings:
        """The inverse of :meth:`to_dict`; unknown fields are an error naming ``source``."""
        values = _known_fields(cls, data, source)
        if values.get("tatok") is not None:
            values["tatok"] = TATokRecord(**_known_fields(TATokRecord, values["tatok"], f"{source}.tatok"))
        if "generation" in values:
            values["generation"] = GenerationDefaults(
                **_known_fields(GenerationDefaults, values["generation"], f"{source}.generation")
            )
        return cls(**values)


def _known_fields(cls: type, data: Any, source: str) -> dict[str, Any]:
    names = [f.name for f in fields(cls)]
    if not isinstance(data, dict):
        raise ValueError(f"{source} must be a JSON object with fields {', '.join(names)}, got {data!r}")
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{source} has unknown field(s) {', '.join(unknown)}; known: {', '.join(names)}")
    return dict(data)


def default_scale(train_scales: list[int]) -> int:
    """The scale generation defaults to: the most frequent training scale, the first of a tie."""
    return Counter(train_scales).most_common(1)[0][0]


def tatok_record(path: str, lm_folder: str | os.PathLike, pool_scales: list[int], num_codes: int) -> TATokRecord:
    """How an LM folder names its TA-Tok: ``path`` as given, and relative to ``lm_folder``."""
    relative = os.path.relpath(resolve_path(path).resolve(), Path(lm_folder).resolve())
    return TATokRecord(path=path, path_from_lm=relative, pool_scales=list(pool_scales), num_codes=num_codes)


def _read_generation_config(folder: Path) -> dict[str, Any]:
    file = folder / GENERATION_CONFIG
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err


def read_settings(lm_folder: str | os.PathLike) -> TarSettings:
    """The record of an LM folder; an empty :class:`TarSettings` when it has none."""
    folder = Path(lm_folder)
    record = _read_generation_config(folder).get(SETTINGS_KEY)
    return TarSettings() if record is None else TarSettings.from_dict(record, f"{folder / GENERATION_CONFIG}:tar")


def settings_of(model: Any) -> TarSettings:
    """The record a loaded model carries: Hugging Face reads ``generation_config.json`` into
    ``model.generation_config``, custom attributes included. Empty for a model without one."""
    record = getattr(getattr(model, "generation_config", None), SETTINGS_KEY, None)
    return TarSettings() if record is None else TarSettings.from_dict(record, "model.generation_config.tar")


def write_settings(lm_folder: str | os.PathLike, settings: TarSettings) -> Path:
    """Write ``settings`` into the folder's ``generation_config.json``, keeping every other entry in it."""
    folder = Path(lm_folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; save the LM there first")
    config = _read_generation_config(folder)
    config[SETTINGS_KEY] = settings.to_dict()
    # A config marked as derived from the model config has its custom attributes dropped on load by transformers.
    config["_from_model_config"] = False
    file = folder / GENERATION_CONFIG
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return file


def _check_scale(scale: Any, pool_scales: list[int] | None) -> None:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    if pool_scales and scale not in pool_scales:
        raise ValueError(f"scale {scale} is not one of the recorded TA-Tok's pool scales {pool_scales}")


def record_generation_defaults(lm_folder: str | os.PathLike, **defaults: float | int | None) -> TarSettings:
    """Update the generation defaults an LM folder records, e.g. with the settings it was evaluated with::

        record_generation_defaults("outputs/demo/checkpoints/lm", scale=2, cfg_scale=3.0)

    Names are those of :class:`GenerationDefaults` (``scale``, ``cfg_scale``, ``temperature``, ``top_k``,
    ``top_p``; ``None`` turns ``top_k``/``top_p`` off); the rest of the record is kept. Returns the new record.
    """
    folder = Path(lm_folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not an LM folder (it has no config.json)")
    names = [f.name for f in fields(GenerationDefaults)]
    unknown = sorted(set(defaults) - set(names))
    if unknown:
        raise TypeError(f"unknown generation default(s) {', '.join(unknown)}; known: {', '.join(names)}")
    settings = read_settings(folder)
    if "scale" in defaults:
        _check_scale(defaults["scale"], settings.tatok.pool_scales if settings.tatok else None)
    settings = replace(settings, generation=replace(settings.generation, **defaults))
    write_settings(folder, settings)
    return settings
