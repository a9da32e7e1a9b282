"""The pixel VQ autoencoder whose codes the AR de-tokenizer predicts (LlamaGen's VQ-16), and its trainer.

    images [0, 1] -> [-1, 1] -> encoder (conv_in; per level ResnetBlocks, attention at the lowest resolution,
    a stride-2 downsample; mid res-attn-res; GroupNorm, Swish, conv_out) -> quant_conv (z -> codebook dim)
    -> nearest l2-normalised code (straight-through) -> post_quant_conv -> decoder (the mirror, upsampling)

Parameter names are LlamaGen's (``tokenizer/tokenizer_image/vq_model.py``: ``encoder.conv_blocks.N.res.M``,
``encoder.mid``, ``quantize.embedding.weight``, ``quant_conv``, ``post_quant_conv``, ``decoder.*``), so the
reference's ``vq_ds16_t2i.pt`` (``{"model": state_dict}``) loads key by key with :meth:`PixelVQ.from_official`.
The reference trains it with perceptual and adversarial losses too; those need downloaded networks, so here the
objective is reconstruction (L2 or L1) + codebook + 0.25 commitment (+ optional entropy), enough for ShapesWorld.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tarkit.checkpoints import load_checkpoint
from tarkit.paths import resolve_path
from tarkit.pretrained import PretrainedLoadError, PretrainedMixin, check_state_dict
from tarkit_plugins.presets import preset_values

RECON_LOSSES = ("l2", "l1")
RESTART_SOURCES = ("random", "error")


@dataclass(frozen=True)
class PixelVQConfig:
    """The architecture and loss weights of a :class:`PixelVQ`; the defaults are LlamaGen's VQ-16.

    ``dead_code_threshold`` > 0 restarts, in training, every code whose running usage (codes chosen per step,
    averaged over ~10 steps) falls below it at a random encoder output of the batch, as SoundStream and
    vector-quantize-pytorch do; without it a small VQ settles on a few dozen codes and merges colours.
    ``restart_from`` picks those outputs: ``"random"`` (uniformly, so codes follow the data's density: on
    mostly flat images most restarts land on the background and split it into many interchangeable codes) or
    ``"error"`` (with probability proportional to the squared distance to their nearest code, so restarts go
    where the codebook fits worst, as k-means++ seeds).

    ``image_size`` is what the model is used at (the network is convolutional: it sets the code grid,
    ``image_size // 2**(len(channel_mult) - 1)``, that a de-tokenizer generates).
    """

    image_size: int = 256
    codebook_size: int = 16384
    codebook_dim: int = 8
    codebook_l2_norm: bool = True
    channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    num_res_blocks: int = 2
    norm_groups: int = 32
    dropout: float = 0.0
    recon_loss: str = "l2"
    commitment_weight: float = 0.25
    entropy_weight: float = 0.0
    dead_code_threshold: float = 0.0
    restart_from: str = "random"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


PIXEL_VQ_PRESETS: dict[str, dict[str, Any]] = {
    # LlamaGen VQ-16 (vq_ds16_t2i.pt): 16x downsampling, 16,384 codes of width 8; 256 px -> 16 x 16 codes.
    "vq-16": {},
    # CPU miniature for 64 px ShapesWorld: 8x downsampling -> 8 x 8 = 64 codes, 512 codes of width 8, narrow
    # channels (16/16/32/32) and one res block per level, so a few CPU minutes reach a useful reconstruction.
    "tiny": {
        "image_size": 64,
        "codebook_size": 512,
        "channels": 16,
        "channel_mult": [1, 1, 2, 2],
        "z_channels": 32,
        "num_res_blocks": 1,
        "norm_groups": 8,
    },
}

CONFIG_KEYS = tuple(f.name for f in fields(PixelVQConfig))


def resolve_pixel_vq_config(preset: str | None, config: dict[str, Any] | None) -> PixelVQConfig:
    """A preset (``None``: the VQ-16 defaults) with ``config`` overrides, checked."""
    values = preset_values("PixelVQ", PIXEL_VQ_PRESETS, preset, config, allowed=CONFIG_KEYS)
    resolved = PixelVQConfig(**{**values, "channel_mult": list(values.get("channel_mult", [1, 1, 2, 2, 4]))})
    if resolved.recon_loss not in RECON_LOSSES:
        raise ValueError(f"PixelVQ: recon_loss must be one of {', '.join(RECON_LOSSES)}, got {resolved.recon_loss!r}")
    if resolved.restart_from not in RESTART_SOURCES:
        raise ValueError(
            f"PixelVQ: restart_from must be one of {', '.join(RESTART_SOURCES)}, got {resolved.restart_from!r}"
        )
    widths = [resolved.channels * m for m in resolved.channel_mult] + [resolved.channels]
    if not resolved.channel_mult or any(w % resolved.norm_groups for w in widths):
        raise ValueError(
            f"PixelVQ: every level's width (channels x channel_mult = {widths}) must be a multiple of norm_groups "
            f"{resolved.norm_groups}; change channels or norm_groups"
        )
    if resolved.image_size % resolved.downsample:
        raise ValueError(
            f"PixelVQ: image_size {resolved.image_size} is not a multiple of the {resolved.downsample}x downsampling"
        )
    return resolved


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: GroupNorm-Swish-conv twice, a 1x1 ``nin_shortcut`` when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)
        return x + self.proj_out(out.reshape(batch, channels, height, width))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LlamaGen pads right and bottom only (a stride-2 "valid" conv), so weights carry over exactly.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: ``res`` blocks, each followed by its ``attn`` block when the level has attention."""

    def __init__(self, widths: list[tuple[int, int]], attention: bool, groups: int, dropout: float):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(cin, cout, groups, dropout) for cin, cout in widths)
        self.attn = nn.ModuleList(AttnBlock(cout, groups) for _, cout in widths) if attention else nn.ModuleList()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


def _middle(channels: int, groups: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(
        [
            ResnetBlock(channels, channels, groups, dropout),
            AttnBlock(channels, groups),
            ResnetBlock(channels, channels, groups, dropout),
        ]
    )


class Encoder(nn.Module):
    def __init__(self, config: PixelVQConfig):
        super().__init__()
        ch, mult, groups, drop = config.channels, config.channel_mult, config.norm_groups, config.dropout
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        width = ch
        for i, m in enumerate(mult):
            last = i == len(mult) - 1
            widths = [(width if j == 0 else ch * m, ch * m) for j in range(config.num_res_blocks)]
            level = Level(widths, attention=last, groups=groups, dropout=drop)
            if not last:
                level.downsample = Downsample(ch * m)
            self.conv_blocks.append(level)
            width = ch * m
        self.mid = _middle(width, groups, drop)
        self.norm_out = _norm(width, groups)
        self.conv_out = nn.Conv2d(width, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: PixelVQConfig):
        super().__init__()
        ch, mult, groups, drop = config.channels, config.channel_mult, config.norm_groups, config.dropout
        width = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, width, 3, padding=1)
        self.mid = _middle(width, groups, drop)
        # Lowest resolution first; each level has one res block more than the encoder's, as in LlamaGen.
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(mult))):
            widths = [(width if j == 0 else ch * mult[i], ch * mult[i]) for j in range(config.num_res_blocks + 1)]
            level = Level(widths, attention=i == len(mult) - 1, groups=groups, dropout=drop)
            if i != 0:
                level.upsample = Upsample(ch * mult[i])
            self.conv_blocks.append(level)
            width = ch * mult[i]
        self.norm_out = _norm(width, groups)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest code of an (optionally l2-normalised) codebook ``embedding [K, D]``, straight-through gradients."""

    def __init__(self, config: PixelVQConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / config.codebook_size, 1.0 / config.codebook_size)
        # Training state only (not saved: a folder keeps LlamaGen's keys). It starts at 0, so with restarts on
        # the first training step initialises every code from the data.
        self.register_buffer("usage", torch.zeros(config.codebook_size), persistent=False)

    def codebook(self) -> torch.Tensor:
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.config.codebook_l2_norm else weight

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``z [B, D, h, w]`` -> (straight-through codes ``[B, D, h, w]``, indices ``[B, h, w]``, losses)."""
        batch, dim, height, width = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, dim).float()
        if self.config.codebook_l2_norm:
            flat = F.normalize(flat, dim=-1)
        restarting = self.training and self.config.dead_code_threshold > 0
        if restarting:  # before the codebook enters this step's graph: an in-place edit later would break backward
            self._restart_dead_codes(flat.detach())
        codebook = self.codebook().float()
        # In float32 even under mixed precision: bfloat16 distances would tie many of the 16,384 codes.
        with torch.autocast(z.device.type, enabled=False):
            distances = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        indices = distances.argmin(dim=1)
        if restarting:
            counts = torch.bincount(indices, minlength=self.config.codebook_size).to(self.usage.dtype)
            self.usage.mul_(0.9).add_(counts, alpha=0.1)
        # F.embedding, not codebook[indices]: the indexing's backward accumulates rows in a thread-dependent
        # order on CPU, so two runs with one seed would train different codebooks.
        quantized = F.embedding(indices, codebook)
        losses = {
            "codebook": F.mse_loss(quantized, flat.detach()),
            "commitment": self.config.commitment_weight * F.mse_loss(flat, quantized.detach()),
        }
        if self.config.entropy_weight > 0:
            losses["entropy"] = self.config.entropy_weight * entropy_loss(-distances)
        straight = flat + (quantized - flat).detach()
        codes = straight.reshape(batch, height, width, dim).permute(0, 3, 1, 2).to(z.dtype)
        return codes, indices.reshape(batch, height, width), losses

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        """Move every code whose running usage is below the threshold onto a vector of this batch, drawn as
        ``restart_from`` says."""
        dead = (self.usage < self.config.dead_code_threshold).nonzero().flatten()
        if len(dead):
            if self.config.restart_from == "error":
                error = torch.cdist(flat, self.codebook().float()).amin(dim=1).pow(2)
                picks = torch.multinomial(error + 1e-12, len(dead), replacement=len(dead) > len(flat))
            else:
                picks = torch.randint(len(flat), (len(dead),), device=flat.device)
            self.embedding.weight[dead] = flat[picks].to(self.embedding.weight.dtype)
            self.usage[dead] = 1.0


def entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Per-vector entropy minus the batch-average entropy of ``softmax(affinity / T)``: rewards confident and
    diverse code choices (LlamaGen's ``compute_entropy_loss``)."""
    log_probs = F.log_softmax(affinity / temperature, dim=-1)
    probs = log_probs.exp()
    average = probs.mean(0)
    return -(probs * log_probs).sum(-1).mean() + (average * torch.log(average + 1e-5)).sum()


class PixelVQ(PretrainedMixin, nn.Module):
    """A LlamaGen-style VQ autoencoder: images <-> a square grid of discrete codes (a model: saves as a folder).

    Args:
        preset: ``"vq-16"`` (the reference's LlamaGen VQ-16: 16,384 codes of width 8, 16x downsampling,
            channels 128 x [1, 1, 2, 2, 4], z 256; 256 px) or ``"tiny"`` (64 px ShapesWorld, 8x downsampling to
            8 x 8 codes, 512 codes of width 8); ``None`` starts from the VQ-16 defaults.
        config: :class:`PixelVQConfig` fields overriding the preset, e.g. ``{"image_size": 512}``.
    """

    def __init__(self, preset: str | None = "tiny", config: dict[str, Any] | None = None):
        super().__init__()
        self.config = resolve_pixel_vq_config(preset, config)
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quantize = VectorQuantizer(self.config)
        self.quant_conv = nn.Conv2d(self.config.z_channels, self.config.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(self.config.codebook_dim, self.config.z_channels, 1)

    def resolved_config(self) -> dict[str, Any]:
        return asdict(self.config)

    def with_image_size(self, image_size: int) -> PixelVQ:
        """Use the (convolutional) model at another image size, which sets the code grid; returns ``self``."""
        self.config = resolve_pixel_vq_config(None, {**asdict(self.config), "image_size": image_size})
        self.quantize.config = self.config
        return self

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def grid_size(self) -> int:
        """Side of the code grid at ``image_size``, so an image has ``grid_size**2`` codes."""
        return self.config.image_size // self.config.downsample

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"expected float images [B, 3, H, W] in [0, 1], got {images.dtype} {tuple(images.shape)}")
        if images.shape[-2] % self.downsample or images.shape[-1] % self.downsample:
            raise ValueError(
                f"image sides {tuple(images.shape[-2:])} must be multiples of the VQ's {self.downsample}x "
                f"downsampling; resize to {self.image_size} px"
            )

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` -> (codes ``[B, D, h, w]``, indices ``[B, h, w]``, VQ losses)."""
        self._check_images(images)
        return self.quantize(self.quant_conv(self.encoder(images * 2 - 1)))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors ``[B, D, h, w]`` -> images in ``[0, 1]`` (not clamped, so losses keep their gradients)."""
        return (self.decoder(self.post_quant_conv(codes)) + 1) / 2

    @torch.no_grad()
    def encode_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` -> code indices ``[B, h*w]`` in raster order."""
        return self.encode(images)[1].flatten(1)

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices ``[B, h*w]`` on a square grid -> images ``[B, 3, H, W]`` in ``[0, 1]``."""
        if indices.ndim != 2:
            raise ValueError(f"expected code indices [B, n], got shape {tuple(indices.shape)}")
        grid = math.isqrt(indices.shape[1])
        if grid * grid != indices.shape[1]:
            raise ValueError(f"{indices.shape[1]} codes do not form a square grid")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise ValueError(
                f"code indices must lie in [0, {self.codebook_size}), got [{indices.min()}, {indices.max()}]"
            )
        codes = self.quantize.codebook()[indices].reshape(len(indices), grid, grid, -1).permute(0, 3, 1, 2)
        return self.decode(codes).clamp(0, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruct: ``(images in [0, 1] (unclamped), losses)``; ``losses["loss"]`` is the training objective,
        ``usage`` the share of the codebook this batch used."""
        codes, indices, losses = self.encode(images)
        reconstruction = self.decode(codes)
        # Compared on the model's [-1, 1] scale, as LlamaGen does (an L2 there is 4x the [0, 1] one).
        diff = (reconstruction - images) * 2
        losses["recon"] = diff.pow(2).mean() if self.config.recon_loss == "l2" else diff.abs().mean()
        losses["loss"] = sum(losses.values())
        losses["usage"] = torch.tensor(indices.unique().numel() / self.codebook_size, device=images.device)
        return reconstruction, losses

    @classmethod
    def from_official(cls, path: str | Path, config: dict[str, Any] | None = None) -> PixelVQ:
        """Load a LlamaGen VQ checkpoint (``vq_ds16_t2i.pt``: ``{"model": state_dict}``) from a local file.

        The architecture is read from the weights' shapes (codebook, channels, levels, res blocks, z width);
        ``config`` sets what they cannot tell (``image_size``, default 256; ``norm_groups``, default 32). The
        file is read with ``weights_only=True``; its ``quantize.codebook_used`` (a training-time usage log) is
        dropped. Missing, unexpected or wrongly shaped weights raise one :class:`PretrainedLoadError`.
        """
        file = resolve_path(str(path))
        checkpoint = load_checkpoint(file)
        state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
            raise PretrainedLoadError(f"{file} is not a LlamaGen VQ checkpoint {{'model': state_dict}}; found {found}")
        state = {k: v for k, v in state.items() if k != "quantize.codebook_used"}
        model = cls(preset=None, config={**official_vq_architecture(state, str(file)), **(config or {})})
        check_state_dict(model, state, str(file))
        model.load_state_dict(state)
        return model


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max((int(m.group(1)) for key in state if (m := pattern.match(key))), default=-1)


def official_vq_architecture(state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """The :class:`PixelVQConfig` fields a LlamaGen VQ state dict's shapes tell."""

    def require(key: str) -> torch.Tensor:
        if key not in state:
            raise PretrainedLoadError(f"{source}: missing key {key}; is this a LlamaGen VQ checkpoint?")
        return state[key]

    codebook = require("quantize.embedding.weight")
    channels = require("encoder.conv_in.weight").shape[0]
    levels = _count(state, "encoder.conv_blocks.")
    mult = [require(f"encoder.conv_blocks.{i}.res.0.conv1.weight").shape[0] // channels for i in range(levels)]
    return {
        "codebook_size": codebook.shape[0],
        "codebook_dim": codebook.shape[1],
        "channels": channels,
        "channel_mult": mult,
        "z_channels": require("quant_conv.weight").shape[1],
        "num_res_blocks": _count(state, "encoder.conv_blocks.0.res."),
    }


def load_pixel_vq(source: PixelVQ | str, image_size: int | None = None) -> PixelVQ:
    """A :class:`PixelVQ` from an instance, a tarkit folder, or a LlamaGen ``.pt``/``.pth`` file (``pkg:`` paths
    allowed); ``image_size`` (optional) sets the size it is used at."""
    if isinstance(source, PixelVQ):
        vq = source
    else:
        path = resolve_path(source)
        vq = PixelVQ.from_official(path) if path.is_file() else PixelVQ.from_pretrained(path)
    return vq if image_size is None or image_size == vq.image_size else vq.with_image_size(image_size)
