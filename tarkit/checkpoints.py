"""Reading checkpoint files safely: ``torch.load(weights_only=True)`` only (tensors and plain containers, never
code), and the reference implementation's ``{"model": {"name", "args", "sd"}}`` layout (csuhan/Tar's
``ta_tok.pth``, ``ar_dtok_*.pth``), which plugins convert into their models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tarkit.paths import resolve_path
from tarkit.pretrained import PretrainedLoadError


def load_checkpoint(path: str | Path) -> Any:
    """A ``torch.save`` file read with ``weights_only=True`` (tensors and plain containers, never code)."""
    path = resolve_path(str(path))
    if not path.is_file():
        raise PretrainedLoadError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights-only refusals all mean the same thing to the user
        raise PretrainedLoadError(
            f"{path} cannot be read as a weights-only torch checkpoint ({type(err).__name__}: {str(err)[:200]})"
        ) from err


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
