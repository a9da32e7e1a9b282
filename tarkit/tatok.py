"""TA-Tok, the text-aligned tokenizer, composed from any registered encoder, codebook and quantizer.

    images -> encoder (teacher-initialised ViT, a chosen hidden layer) -> scale-adaptive pooling
           -> encode_task_layer (Linear+Tanh) -> in_linear (C -> D) -> quantizer over the codebook [K, D]
           -> indices (the LLM's image words) ... out_linear (D -> D) -> decoder (SigLIP2 blocks with patch 1
           over the pooled grid) -> decode_task_layer (Linear-Tanh-Linear) -> teacher-like features [B, n, C]

Submodules carry the official checkpoint's names (``encoder``, ``encode_task_layer``, ``in_linear``,
``out_linear``, ``decoder``, ``decode_task_layer``) so ``ta_tok.pth`` maps onto them key by key; the official
``bottleneck.regularizer`` (SimVQ's ``embedding`` and ``embedding_proj``) is the ``codebook`` part here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from transformers import Siglip2VisionConfig, Siglip2VisionModel

from tarkit.cpu_linear import use_cpu_linears
from tarkit.interfaces import CodebookProjection, Quantizer, VisionEncoder
from tarkit.pretrained import PretrainedMixin


@dataclass
class TATokEncoding:
    """What :meth:`TATok.encode` returns."""

    indices: torch.Tensor  # [B, n] code ids: the image tokens
    quantized: torch.Tensor  # [B, n, D] straight-through codes (the reference's "regularized_z")
    latent: torch.Tensor  # [B, n, D] out_linear(quantized), the decoder's input (the reference's "encoded")
    loss: torch.Tensor  # quantizer loss (commitment + codebook)
    scale: int
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def pooled_grid(grid: int, scale: int) -> int:
    """Side of the grid after ``avg_pool2d`` with kernel = stride = ``scale`` (27 -> 27, 13, 9)."""
    return grid // scale


def pool_tokens(features: torch.Tensor, scale: int) -> torch.Tensor:
    """Scale-adaptive pooling: ``[B, g*g, C]`` -> ``[B, (g//s)^2, C]`` by average pooling on the square grid."""
    if scale == 1:
        return features
    batch, tokens, width = features.shape
    grid = int(round(tokens**0.5))
    if grid * grid != tokens:
        raise ValueError(f"features have {tokens} tokens, which is not a square grid")
    square = features.transpose(1, 2).reshape(batch, width, grid, grid)
    return F.avg_pool2d(square, kernel_size=scale, stride=scale).flatten(2).transpose(1, 2)


class TATok(PretrainedMixin, nn.Module):
    """The text-aligned tokenizer (a model: saves and loads as a folder).

    Args:
        encoder: the vision tower (``tarkit.encoders``), initialised from the semantic teacher.
        codebook: the codebook projection (``tarkit.codebooks``): ``text_aligned`` for TA-Tok, ``learned`` for
            the ablation.
        quantizer: the vector quantizer (``tarkit.quantizers``).
        pool_scales: the pooling scales this tokenizer serves (paper: 1, 2, 3 on 27x27 -> 729, 169, 81 tokens);
            the LM's scale token ``<S{k}>`` is the position ``k`` in this list.
        decoder_depth: transformer blocks of the feature decoder (paper: 3).
        decoder_config: overrides of the decoder's ``Siglip2VisionConfig`` (the paper keeps its defaults:
            12 heads, MLP 3072, 256 position embeddings, attention-pooling head present).
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        codebook: CodebookProjection,
        quantizer: Quantizer,
        pool_scales: list[int] | None = None,
        decoder_depth: int = 3,
        decoder_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        pool_scales = list(pool_scales or [1, 2, 3])
        if not pool_scales or any(s < 1 or pooled_grid(encoder.grid_size, s) < 1 for s in pool_scales):
            raise ValueError(f"pool_scales {pool_scales} do not fit the encoder's {encoder.grid_size}x grid")
        width, dim = encoder.width, codebook.dim
        self.pool_scales = pool_scales
        self.encoder = encoder
        self.encode_task_layer = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.in_linear = nn.Linear(width, dim)
        self.codebook = codebook
        self.quantizer = quantizer
        self.out_linear = nn.Linear(dim, dim)
        config = {"patch_size": 1, "num_hidden_layers": decoder_depth, "num_channels": dim, "hidden_size": width}
        self.decoder = Siglip2VisionModel(Siglip2VisionConfig(**(config | (decoder_config or {}))))
        self.decode_task_layer = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        use_cpu_linears(self)  # fp32 on CPU: the faster kernels (tarkit.cpu_linear)

    @property
    def num_codes(self) -> int:
        return self.codebook.num_codes

    def tokens_per_image(self, scale: int) -> int:
        return pooled_grid(self.encoder.grid_size, scale) ** 2

    def check_scale(self, scale: int) -> int:
        if scale not in self.pool_scales:
            raise ValueError(f"pool scale {scale} is not one of this tokenizer's scales {self.pool_scales}")
        return scale

    def encode(self, images: torch.Tensor, scale: int = 1, features: torch.Tensor | None = None) -> TATokEncoding:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` (or precomputed encoder features) -> codes at ``scale``."""
        self.check_scale(scale)
        if features is None:
            features = self.encoder(images)
        hidden = self.encode_task_layer(pool_tokens(features, scale))
        out = self.quantizer(self.in_linear(hidden), self.codebook.codebook())
        return TATokEncoding(out.indices, out.quantized, self.out_linear(out.quantized), out.loss, scale, out.metrics)

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """Images -> code indices ``[B, n]``; never runs the feature decoder."""
        return self.encode(images, scale).indices

    def codes_to_latent(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices ``[B, n]`` -> the decoder's input ``[B, n, D]``."""
        if indices.min() < 0 or indices.max() >= self.num_codes:
            raise ValueError(f"code indices must lie in [0, {self.num_codes}), got [{indices.min()}, {indices.max()}]")
        return self.out_linear(self.quantizer.lookup(indices, self.codebook.codebook()))

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Decoder input ``[B, n, D]`` on a square grid -> teacher-like features ``[B, n, C]``."""
        batch, tokens, _ = latent.shape
        grid = int(round(tokens**0.5))
        if grid * grid != tokens:
            raise ValueError(f"{tokens} tokens do not form a square grid")
        mask = torch.ones(batch, tokens, dtype=torch.long, device=latent.device)
        shapes = torch.tensor([[grid, grid]] * batch, device=latent.device)
        hidden = self.decoder(pixel_values=latent, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state
        return self.decode_task_layer(hidden)

    def decode_features(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices ``[B, n]`` -> teacher-like features ``[B, n, C]`` (what de-tokenizers condition on)."""
        return self.decode_latent(self.codes_to_latent(indices))

    def forward(self, images: torch.Tensor, scale: int = 1) -> tuple[TATokEncoding, torch.Tensor]:
        """Encode and reconstruct: ``(encoding, reconstructed features [B, n, C])``."""
        encoding = self.encode(images, scale)
        return encoding, self.decode_latent(encoding.latent)


class LoadedTATok(NamedTuple):
    """What :func:`load_tatok` returns."""

    tatok: TATok
    teacher: nn.Module | None  # the frozen teacher encoder, when asked for and the file has one
    pool_scale: int  # the file's default pool scale (1 for a tarkit folder)


def load_tatok(
    path: str | Path, load_teacher: bool = False, converter: str | None = None, **options: Any
) -> LoadedTATok:
    """A TA-Tok from a tarkit folder (``save_pretrained``) or from another implementation's file, read by the
    installed converter (group ``tarkit.tatok_converters``) that accepts it, or by ``converter`` by name;
    ``options`` go to the converter (e.g. the reference's ``ta_tok.pth``: ``encoder_config``, ``quantizer``)."""
    from tarkit.paths import resolve_path
    from tarkit.pretrained import PretrainedLoadError
    from tarkit.registry import registry

    resolved = resolve_path(str(path))
    if resolved.is_dir():
        if load_teacher:
            raise ValueError(f"{path} is a tarkit folder, which holds no separate teacher; use load_teacher=False")
        if options or converter:
            raise ValueError(f"{path} is a tarkit folder: converter options apply to files only; drop them")
        return LoadedTATok(TATok.from_pretrained(resolved), None, 1)
    if not resolved.is_file():
        raise PretrainedLoadError(f"{path}: no such checkpoint file or TA-Tok folder")
    if converter is None:
        installed = registry.load_group("tarkit.tatok_converters")
        accepting = [name for name, cls in installed.items() if cls().accepts(resolved)]
        if len(accepting) != 1:
            found = f"{len(accepting)} do ({', '.join(accepting)})" if accepting else "none does"
            raise PretrainedLoadError(
                f"{path}: of the installed TA-Tok converters ({', '.join(installed) or 'none'}), {found}; pass a "
                "tarkit folder, or converter=NAME"
            )
        converter = accepting[0]
    return registry.get("tarkit.tatok_converters", converter)().load(resolved, load_teacher=load_teacher, **options)
