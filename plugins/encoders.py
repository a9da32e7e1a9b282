"""Vision encoders (group ``tarkit.encoders``): pixels in ``[0, 1]`` -> a square grid of patch features.

Both encoders pick one hidden state by ``select_layer``, indexed like Hugging Face's ``hidden_states`` tuple
(``0`` = patch embeddings, ``i`` = output of the first ``i`` transformer layers, negative from the end), and
drop every layer after it, so they never compute what they do not return. Features are the raw residual
stream: the final norm and any pooling head belong to the classifier path and are removed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.utils import logging as hf_logging

from tarkit.interfaces import VisionEncoder
from tarkit.paths import resolve_path
from tarkit.pretrained import PretrainedLoadError, resolve_pretrained_dir
from tarkit_plugins.presets import preset_values

SIGLIP_PRESETS: dict[str, dict[str, Any]] = {
    # google/siglip2-so400m-patch14-384, the paper's encoder: 384 / 14 = 27 -> 729 patches of width 1152.
    "so400m-patch14-384": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 384,
    },
    # CPU miniature for 64 px ShapesWorld: 48 / 4 = 12 -> 144 patches, a grid that pools evenly at scales
    # 1, 2 and 3 (144 / 36 / 16 tokens), where the paper's 27 pools to 729 / 169 / 81.
    "tiny": {
        "hidden_size": 96,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "patch_size": 4,
        "image_size": 48,
    },
}

# The SiglipVisionConfig fields that define the tower; `config` overrides and saved configs use only these.
SIGLIP_ARCHITECTURE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
)


def _kept_layers(select_layer: int, depth: int, owner: str) -> int:
    """How many layers produce hidden state ``select_layer`` of a ``depth``-layer tower."""
    if not -(depth + 1) <= select_layer <= depth:
        raise ValueError(
            f"{owner}: select_layer {select_layer} is out of range for {depth} layers; "
            f"use 0..{depth} or -{depth + 1}..-1 (an index into [embeddings, layer 1, ..., layer {depth}])"
        )
    return select_layer % (depth + 1)


def _model_input(images: torch.Tensor, size: int, mode: str, mean: Any, std: Any) -> torch.Tensor:
    """Check ``[B, 3, H, W]`` floats, resize to ``size`` (antialiased) if needed, then normalise."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")
    if tuple(images.shape[-2:]) != (size, size):
        images = F.interpolate(images, size=(size, size), mode=mode, antialias=True, align_corners=False)
    return (images - mean) / std


def _channel_statistic(value: float | list[float], name: str) -> list[float]:
    """``mean`` or ``std`` as 3 floats, one per RGB channel (one value serves all three)."""
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3)]
    if len(values) != 3 or (name == "std" and min(values) <= 0):
        raise ValueError(f"SigLIP2Encoder: {name} must be one number or 3 (one per RGB channel), std > 0; got {value}")
    return values


def _siglip_checkpoint(pretrained: str) -> tuple[Path, dict[str, Any]]:
    """The local folder of a fixed-resolution SigLIP checkpoint and its vision tower's architecture."""
    try:
        folder = resolve_pretrained_dir(resolve_path(pretrained), ("config.json", "model*.safetensors*"))
    except PretrainedLoadError as err:
        raise PretrainedLoadError(f"SigLIP2Encoder(pretrained={pretrained!r}): {err}") from err
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise PretrainedLoadError(f"{folder} has no config.json; is it a Hugging Face SigLIP checkpoint?")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type in ("siglip2", "siglip2_vision_model"):
        raise PretrainedLoadError(
            f"{folder} is a NaFlex SigLIP2 checkpoint (model_type {model_type!r}); only fixed-resolution SigLIP-"
            "architecture checkpoints (model_type 'siglip', e.g. google/siglip2-so400m-patch14-384) are supported"
        )
    if model_type not in ("siglip", "siglip_vision_model"):
        raise PretrainedLoadError(f"{folder} holds model_type {model_type!r}, not a SigLIP vision model")
    # For a full SiglipModel folder this reads the `vision_config` part.
    config = SiglipVisionConfig.from_pretrained(folder)
    return folder, {key: getattr(config, key) for key in SIGLIP_ARCHITECTURE_KEYS}


def _load_siglip(folder: Path, config: SiglipVisionConfig) -> SiglipVisionModel:
    verbosity = hf_logging.get_verbosity()
    # The load report would list what is left out on purpose (text tower, pooling head, layers after the
    # selected one); missing and mismatched weights are reported below instead, hence ignore_mismatched_sizes.
    hf_logging.set_verbosity_error()
    try:
        model, info = SiglipVisionModel.from_pretrained(
            folder, config=config, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    # post_layernorm is replaced by the caller, so a checkpoint without it is fine.
    missing = sorted(key for key in info["missing_keys"] if not key.startswith("post_layernorm."))
    mismatched = sorted(f"{key}: file {tuple(old)} vs model {tuple(new)}" for key, old, new in info["mismatched_keys"])
    problems = "; ".join(
        f"{name} {keys[:8]}" for name, keys in (("missing keys", missing), ("shape mismatch", mismatched)) if keys
    )
    if problems:
        raise PretrainedLoadError(
            f"{folder} does not fit the SigLIP tower configured: {problems}; check the config overrides"
        )
    return model


class SigLIP2Encoder(VisionEncoder):
    """The SigLIP vision tower of Hugging Face transformers, the paper's TA-Tok encoder.

    The paper's ``google/siglip2-so400m-patch14-384`` is a fixed-resolution SigLIP-architecture checkpoint
    (model_type ``siglip``); NaFlex ``siglip2`` checkpoints are not supported. Inputs are resized to
    ``image_size`` (bilinear, antialiased, as the reference's ``Resize``) and normalised as ``(x - mean) / std``,
    by default mean = std = 0.5 (the reference's ``scale_layer``).
    The Hugging Face model is ``self.model``, so its weights are ``model.embeddings.*`` and
    ``model.encoder.layers.*``; layers after ``select_layer``, ``post_layernorm`` and the pooling head are
    dropped.

    Args:
        preset: named architecture, ``"so400m-patch14-384"`` (the paper's: hidden 1152, 27 layers,
            27 x 27 = 729 patches) or ``"tiny"`` (CPU miniature: 48 px, patch 4, 12 x 12 = 144 patches,
            hidden 96, 4 layers); ignored when ``pretrained`` is given; ``None`` starts from the
            ``SiglipVisionConfig`` defaults.
        config: ``SiglipVisionConfig`` fields overriding the preset or checkpoint (for ablations), e.g.
            ``{"num_hidden_layers": 2}``.
        pretrained: a local Hugging Face folder (``pkg:`` paths allowed), or a hub id where a hub is
            reachable, holding a ``SiglipVisionModel`` or a full ``SiglipModel`` (its vision tower is used).
        select_layer: which hidden state to return, indexed like ``hidden_states``: ``-2`` is the
            penultimate layer's output, the paper's choice.
        mean: the input normalisation's shift, one value or one per RGB channel.
        std: its scale, likewise.
    """

    # The SiglipVisionConfig fields that `config` takes (loaders of other checkpoint formats read them too).
    ARCHITECTURE_KEYS = SIGLIP_ARCHITECTURE_KEYS
    weight_sources = {"pretrained": None}  # a saved folder rebuilds the tower without the original checkpoint

    def __init__(
        self,
        preset: str | None = "tiny",
        config: dict[str, Any] | None = None,
        pretrained: str | None = None,
        select_layer: int = -2,
        mean: float | list[float] = 0.5,
        std: float | list[float] = 0.5,
    ):
        super().__init__()
        # A pretrained folder's own architecture takes the place of the preset.
        folder, base = _siglip_checkpoint(pretrained) if pretrained is not None else (None, {})
        presets = SIGLIP_PRESETS if pretrained is None else {}
        values = preset_values(
            "SigLIP2Encoder", presets, preset if pretrained is None else None, config, SIGLIP_ARCHITECTURE_KEYS
        )
        hf_config = SiglipVisionConfig(**{**base, **values}, vision_use_head=False)
        # The whole tower's shape, kept for config_dict: the model itself is built shorter.
        self.architecture = {key: getattr(hf_config, key) for key in SIGLIP_ARCHITECTURE_KEYS}
        # The patch convolution is "valid", so the grid is image_size // patch_size (384 // 14 = 27).
        image_size, patch_size = hf_config.image_size, hf_config.patch_size
        if not (isinstance(image_size, int) and isinstance(patch_size, int) and 0 < patch_size <= image_size):
            raise ValueError(
                f"SigLIP2Encoder: image_size and patch_size must be integers with patch_size <= image_size (square "
                f"inputs), got {image_size} and {patch_size}"
            )
        self.select_layer = select_layer
        hf_config.num_hidden_layers = _kept_layers(select_layer, hf_config.num_hidden_layers, "SigLIP2Encoder")
        self.model = _load_siglip(folder, hf_config) if folder is not None else SiglipVisionModel(hf_config)
        # hidden_states (the reference's features) come before the final norm, which only feeds the head.
        self.model.post_layernorm = nn.Identity()
        self.normalisation = {"mean": _channel_statistic(mean, "mean"), "std": _channel_statistic(std, "std")}
        # Not persistent: they are constructor arguments (in config.json), so the weights stay Hugging Face's.
        for name, values in self.normalisation.items():
            self.register_buffer(name, torch.tensor(values).view(1, 3, 1, 1), persistent=False)

    def resolved_config(self) -> dict[str, Any]:
        return dict(self.architecture)

    @property
    def image_size(self) -> int:
        return self.architecture["image_size"]

    @property
    def grid_size(self) -> int:
        return self.architecture["image_size"] // self.architecture["patch_size"]

    @property
    def width(self) -> int:
        return self.architecture["hidden_size"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = _model_input(images, self.image_size, "bilinear", self.mean, self.std)
        # No output_hidden_states: the truncated tower's last output is the selected hidden state.
        return self.model(pixel_values=pixels).last_hidden_state


class TimmEncoder(VisionEncoder):
    """Any timm Vision Transformer by name, as a drop-in replacement for :class:`SigLIP2Encoder`.

    Class and other prefix tokens are dropped, so the output is the square patch grid. Inputs are resized
    with the model's own interpolation (antialiased) and normalised with its ``pretrained_cfg`` mean and std.

    Args:
        model_name: a timm ViT name, e.g. ``"vit_tiny_patch16_224"``.
        pretrained: load timm's pretrained weights (needs the hub, or ``model_kwargs={"pretrained_cfg_overlay":
            {"file": PATH}}`` for a local weights file).
        image_size: input side, passed to timm as ``img_size``; ``None`` keeps the model's default.
        select_layer: which hidden state to return, indexed like :class:`SigLIP2Encoder`'s: ``-1`` is the
            last block's output, ``i > 0`` the output of block ``i``; ``0`` (patch embeddings) is not offered.
        model_kwargs: further ``timm.create_model`` arguments, e.g. ``{"depth": 2, "embed_dim": 64}``.
    """

    weight_sources = {"pretrained": False}  # a saved folder's weights are its own

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        pretrained: bool = False,
        image_size: int | None = None,
        select_layer: int = -1,
        model_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        if not timm.is_model(model_name):
            raise ValueError(f"TimmEncoder: unknown timm model {model_name!r}; see timm.list_models('vit*')")
        kwargs = dict(model_kwargs or {})
        if image_size is not None:
            kwargs["img_size"] = image_size
        try:
            model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
        except Exception as err:
            if not pretrained:
                raise
            raise PretrainedLoadError(
                f"TimmEncoder: no pretrained weights for {model_name!r} ({type(err).__name__}: {err}); offline, "
                "pass model_kwargs={'pretrained_cfg_overlay': {'file': LOCAL_WEIGHTS}} or pretrained=False"
            ) from err
        if not (hasattr(model, "forward_intermediates") and hasattr(model, "patch_embed") and hasattr(model, "blocks")):
            raise ValueError(f"TimmEncoder: {model_name!r} is not a timm Vision Transformer with a patch grid")
        grid = tuple(model.patch_embed.grid_size)
        if grid[0] != grid[1]:
            raise ValueError(f"TimmEncoder: {model_name!r} has a {grid[0]}x{grid[1]} patch grid, not a square one")
        kept = _kept_layers(select_layer, len(model.blocks), "TimmEncoder")
        if kept == 0:
            raise ValueError("TimmEncoder: select_layer 0 (the patch embeddings) is not supported; pick a block")
        self.select_layer = select_layer
        model.prune_intermediate_layers([kept - 1], prune_norm=True, prune_head=True)
        self.model = model
        self._block = kept - 1
        self._grid_size = grid[0]
        data = timm.data.resolve_model_data_config(model)
        self._interpolation = data["interpolation"] if data["interpolation"] in ("bilinear", "bicubic") else "bicubic"
        # Not persistent: they follow the model name, and keeping them out of the state dict keeps it timm's.
        self.register_buffer("mean", torch.tensor(data["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data["std"]).view(1, 3, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        return self.model.patch_embed.img_size[0]

    @property
    def grid_size(self) -> int:
        return self._grid_size

    @property
    def width(self) -> int:
        return self.model.embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = _model_input(images, self.image_size, self._interpolation, self.mean, self.std)
        (features,) = self.model.forward_intermediates(
            pixels, indices=[self._block], norm=False, output_fmt="NLC", intermediates_only=True
        )
        return features
