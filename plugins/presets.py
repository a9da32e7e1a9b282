"""Named architectures (presets) with overrides: the one way every configurable part resolves its config."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def preset_values(
    owner: str,
    presets: dict[str, dict[str, Any]],
    preset: str | None,
    overrides: dict[str, Any] | None = None,
    allowed: Iterable[str] | None = None,
) -> dict[str, Any]:
    """``presets[preset]`` (``{}`` for ``None``) with ``overrides`` on top; an unknown preset, or an override not
    in ``allowed`` (when given), is a one-line error naming ``owner`` and the valid choices."""
    if allowed is not None:
        allowed = list(allowed)
        unknown = sorted(set(overrides or {}) - set(allowed))
        if unknown:
            raise ValueError(f"{owner}: unknown config keys {unknown}; allowed: {allowed}")
    if preset is not None and preset not in presets:
        raise ValueError(f"{owner}: unknown preset {preset!r}; presets: {sorted(presets)}")
    return {**(presets[preset] if preset is not None else {}), **(overrides or {})}
