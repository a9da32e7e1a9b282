"""The reference implementation's checkpoint layout, ``{"model": {"name", "args", "sd"}}`` (csuhan/Tar's
``ta_tok.pth``, ``ar_dtok_*.pth``), read weights-only (:func:`tarkit.checkpoints.load_checkpoint`) for the
plugins that convert such files into their models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tarkit.checkpoints import load_checkpoint
from tarkit.pretrained import PretrainedLoadError


def read_official_spec(path: str | Path) -> tuple[str | None, dict[str, Any], dict[str, torch.Tensor]]:
    """``(name, args, state_dict)`` of a reference ``{"model": {"name", "args", "sd"}}`` file, loaded without
    unpickling code (``name`` is ``None`` where the file has none, as ``ta_tok.pth``)."""
    checkpoint = load_checkpoint(path)
    model = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("sd"), dict):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise PretrainedLoadError(f"{path} is not in the reference layout {{'model': {{'args', 'sd'}}}}; found {found}")
    return model.get("name"), dict(model.get("args") or {}), model["sd"]


def spec_args(spec: Any, name: str, source: str) -> dict[str, Any]:
    """The ``args`` of a reference ``{"name": name, "args": {...}}`` part spec (``{}`` if the file has none)."""
    if spec is None:
        return {}
    if not isinstance(spec, dict) or not isinstance(spec.get("args", {}), dict):
        raise PretrainedLoadError(f"{source}: args holds {spec!r} where a {{'name', 'args'}} spec of {name!r} belongs")
    if spec.get("name", name) != name:
        raise PretrainedLoadError(
            f"{source}: its {spec['name']!r} part is not the {name!r} this loader reads; unsupported"
        )
    return dict(spec.get("args") or {})
