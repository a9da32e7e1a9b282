"""The autoregressive de-tokenizer: a LlamaGen-style GPT that draws pixel-VQ codes after a prefix of TA-Tok features.

    condition [B, N, C] (TA-Tok decoded features; N = 729/169/81) -> clip_proj Linear(C, width) -> N prefix tokens
    VQ codes [B, n] (raster order) -> tok_embeddings -> appended after the prefix (all but the last code)
    -> + positions -> depth x [x + attention(RMSNorm(x)) (causal); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> output
    -> logits of code i at position N - 1 + i  ->  codes -> frozen pixel VQ decoder -> images

Training is next-code cross-entropy with condition dropout (a sample's whole condition replaced by zeros, the
null condition); sampling runs the prefix once, then one code per step through a KV cache, with classifier-free
guidance ``uncond + s * (cond - uncond)`` against the all-zero condition, both halves in one batch.

What the reference (csuhan/Tar ``tok/ar_dtok/ar_model.py``, the ``clip_cond`` model type) is taken to be, from
that file's published copies (the checkpoints themselves were not available here):

* ``ar_dtok_lp_{256,512,1024}px.pth`` = ``{"model": {"name": "llama-abs-LP", "args": {...}, "sd": state_dict}}``;
  ``llama-abs-LP`` is 30 layers, width 1280, 20 heads; ``args`` holds ``vocab_size`` (16,384), ``cls_token_num``
  (729), ``cond_dim`` (1152), ``max_seq_len`` (256/1024/4096 codes for 256/512/1024 px).
* Keys: ``clip_proj.{weight,bias}`` (Linear(cond_dim, width)), ``tok_embeddings.weight``,
  ``layers.N.attention.wqkv.weight`` (q, k, v stacked; no grouped KV heads), ``layers.N.attention.wo.weight``,
  ``layers.N.feed_forward.w1/w2/w3.weight`` (SwiGLU, no biases), ``layers.N.attention_norm.weight``,
  ``layers.N.ffn_norm.weight``, ``norm.weight``, ``output.weight`` and ``abs_pe`` ``[1, cls_token_num +
  max_seq_len - 1, width]``: learned absolute positions over the whole sequence (prefix then codes), no RoPE.
* Condition and codes share one sequence (positions ``0..N-1`` for the prefix, ``N + i`` for the ``i``-th input
  code, whatever ``N`` is), attention is causal over the prefix too, and dropout is applied before adding the
  positions. The null condition is all-zero *features* (so ``clip_proj``'s bias survives).

``positions="rope2d"`` (tarkit's option, not the reference's) replaces ``abs_pe`` by 2D rotary embeddings that
place every token where it lies in the image: code ``i`` at ``(i // g, i % g)`` on the ``g x g`` code grid, and
condition token ``t`` of an ``s x s`` grid at its cell's centre in code-grid units, ``((t // s + 0.5) g / s - 0.5,
...)``. A code then finds the condition features of its own region by position alone, at any pool scale and with
no maximum prefix length (half of each head rotates with the row, half with the column, as in LlamaGen's 2D RoPE).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tarkit.cpu_linear import use_cpu_linears
from tarkit.interfaces import DeTokenizer
from tarkit.pretrained import PretrainedLoadError, check_state_dict, part_config
from tarkit_plugins.detok.pixel_vq import PixelVQ, load_pixel_vq
from tarkit_plugins.lm.generation import sample_next
from tarkit_plugins.presets import preset_values
from tarkit_plugins.reference_files import read_official_spec

POSITIONS = ("absolute", "rope2d")


@dataclass(frozen=True)
class ARConfig:
    """The GPT's shape and regularisation; the defaults are the reference's ``llama-abs-LP`` (~630M parameters).

    ``mlp_hidden`` ``None`` is LlamaGen's SwiGLU width: ``2/3 * 4 * width`` rounded up to a multiple of 256.
    ``max_condition_tokens`` bounds the prefix with ``positions="absolute"`` (the reference's 729 = 27 x 27).
    ``dense_condition`` (tarkit's, not the reference's) also adds each code's own region of the condition,
    resized to the code grid and projected by ``dense_proj``, to the input that predicts that code.
    """

    width: int = 1280
    depth: int = 30
    heads: int = 20
    mlp_hidden: int | None = None
    norm_eps: float = 1e-5
    max_condition_tokens: int = 729
    positions: str = "absolute"
    rope_base: float = 10000.0
    token_dropout: float = 0.1
    attn_dropout: float = 0.0
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    condition_dropout: float = 0.1
    dense_condition: bool = False
    init_std: float = 0.02

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return -(-int(2 * 4 * self.width / 3) // 256) * 256


AR_PRESETS: dict[str, dict[str, Any]] = {
    # The reference's ar_dtok_lp_*px: llama-abs-LP, 30 layers of width 1280 with 20 heads, 729-token prefix.
    "lp": {},
    # CPU miniature: the tiny TA-Tok's 144/36/16 condition tokens -> the tiny pixel VQ's 8 x 8 codes. 2D rotary
    # positions (base 100 suits an 8 x 8 grid) learn to read the right region much sooner than the reference's
    # absolute ones (ShapesWorld, 400 steps: cross-entropy 1.8 vs 2.4). No dropout but the condition's: a few CPU
    # minutes of training are far from overfitting.
    "tiny": {
        "width": 128,
        "depth": 4,
        "heads": 4,
        "mlp_hidden": 384,
        "positions": "rope2d",
        "rope_base": 100.0,
        "token_dropout": 0.0,
        "resid_dropout": 0.0,
        "ffn_dropout": 0.0,
    },
}

CONFIG_KEYS = tuple(f.name for f in fields(ARConfig))


def resolve_ar_config(preset: str | None, config: dict[str, Any] | None) -> ARConfig:
    """A preset (``None``: the ``lp`` defaults) with ``config`` overrides, checked."""
    resolved = ARConfig(**preset_values("AutoregressiveDeTokenizer", AR_PRESETS, preset, config, allowed=CONFIG_KEYS))
    if resolved.positions not in POSITIONS:
        raise ValueError(f"AutoregressiveDeTokenizer: positions must be one of {POSITIONS}, got {resolved.positions!r}")
    if resolved.width % resolved.heads or (resolved.width // resolved.heads) % 4:
        raise ValueError(
            f"AutoregressiveDeTokenizer: width {resolved.width} must split into {resolved.heads} heads of a width "
            "divisible by 4"
        )
    if not 0.0 <= resolved.condition_dropout <= 1.0:
        raise ValueError(f"condition_dropout must be in [0, 1], got {resolved.condition_dropout}")
    return resolved


@dataclass
class KVCache:
    """Keys and values ``[B, heads, length, head_dim]`` of one layer, filled as sampling proceeds."""

    keys: torch.Tensor
    values: torch.Tensor


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [B, H, L, D]`` over interleaved pairs ``(x[2i], x[2i+1])`` (LlamaGen's layout)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ARConfig):
        super().__init__()
        self.heads, self.attn_dropout = config.heads, config.attn_dropout
        self.wqkv = nn.Linear(config.width, 3 * config.width, bias=False)
        self.wo = nn.Linear(config.width, config.width, bias=False)
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(
        self, x: torch.Tensor, start: int, cache: KVCache | None, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.wqkv(x).split(width, dim=-1))
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None:
            cache.keys[:, :, start : start + length] = k
            cache.values[:, :, start : start + length] = v
            k, v = cache.keys[:, :, : start + length], cache.values[:, :, : start + length]
        # Several positions are only ever run from position 0 (training, the prefix), where a plain causal mask is
        # right; one new position attends to everything cached.
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=length > 1, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(batch, length, width)))


class FeedForward(nn.Module):
    def __init__(self, config: ARConfig):
        super().__init__()
        self.w1 = nn.Linear(config.width, config.hidden, bias=False)
        self.w3 = nn.Linear(config.width, config.hidden, bias=False)
        self.w2 = nn.Linear(config.hidden, config.width, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, config: ARConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = nn.RMSNorm(config.width, eps=config.norm_eps)
        self.ffn_norm = nn.RMSNorm(config.width, eps=config.norm_eps)

    def forward(
        self, x: torch.Tensor, start: int, cache: KVCache | None, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), start, cache, rope)
        return x + self.feed_forward(self.ffn_norm(x))


class AutoregressiveDeTokenizer(DeTokenizer):
    """TA-Tok features -> pixel-VQ codes by a causal transformer -> images (group ``tarkit.detokenizers``, ``ar``).

    The pixel VQ is part of the model, frozen: its weights are saved with the GPT's and its architecture in
    the config, so a saved folder reloads without the VQ's own folder or file.

    Args:
        vq: the frozen pixel VQ: a :class:`~tarkit_plugins.detok.pixel_vq.PixelVQ`, a folder it was saved to,
            or LlamaGen's ``vq_ds16_t2i.pt`` (``pkg:`` paths allowed).
        condition_dim: width ``C`` of the condition features (the TA-Tok's teacher width; 1152 in the paper).
        preset: ``"lp"`` (the reference's 30 x 1280, 20 heads, up to 729 condition tokens) or ``"tiny"``;
            ``None`` starts from the ``lp`` defaults.
        config: :class:`ARConfig` fields overriding the preset, e.g. ``{"condition_dropout": 0.0}``.
        image_size: side of the generated images; ``None`` keeps the VQ's. The VQ is convolutional, so one
            model serves any size (the reference's 256/512/1024 px de-tokenizers share ``vq_ds16_t2i.pt``).
    """

    def __init__(
        self,
        vq: PixelVQ | str,
        condition_dim: int = 1152,
        preset: str | None = "tiny",
        config: dict[str, Any] | None = None,
        image_size: int | None = None,
    ):
        super().__init__()
        self.config = resolve_ar_config(preset, config)
        self.vq = load_pixel_vq(vq, image_size).requires_grad_(False).eval()
        self.num_image_tokens = self.vq.grid_size**2
        cfg, width = self.config, self.config.width
        self.clip_proj = nn.Linear(condition_dim, width)
        self.dense_proj = nn.Linear(condition_dim, width) if cfg.dense_condition else None
        self.tok_embeddings = nn.Embedding(self.vq.codebook_size, width)
        self.tok_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(width, eps=cfg.norm_eps)
        self.output = nn.Linear(width, self.vq.codebook_size, bias=False)
        for module in (self.clip_proj, self.dense_proj, self.tok_embeddings, self.layers):
            if module is not None:
                module.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)  # LlamaGen starts from uniform next-code predictions
        if cfg.positions == "absolute":
            # The last code is never an input, hence the - 1.
            length = cfg.max_condition_tokens + self.num_image_tokens - 1
            self.abs_pe = nn.Parameter(torch.randn(1, length, width) * cfg.init_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def resolved_config(self) -> dict[str, Any]:
        return asdict(self.config)

    def config_dict(self) -> dict[str, Any]:
        """With the VQ's own config (not the path it came from, and at the size in use), so a folder is
        self-contained."""
        return {**super().config_dict(), "vq": part_config(self.vq), "image_size": None}

    def train(self, mode: bool = True) -> AutoregressiveDeTokenizer:
        super().train(mode)
        self.vq.eval()  # frozen: fixed normalisation and no dropout
        return self

    @property
    def condition_dim(self) -> int:
        return self.clip_proj.in_features

    @property
    def image_size(self) -> int:
        return self.vq.image_size

    def _check_condition(self, condition: torch.Tensor) -> None:
        if condition.ndim != 3 or condition.shape[-1] != self.condition_dim:
            raise ValueError(
                f"expected condition features [B, N, {self.condition_dim}], got shape {tuple(condition.shape)}"
            )
        tokens = condition.shape[1]
        if self.config.positions == "absolute" and tokens > self.config.max_condition_tokens:
            raise ValueError(
                f"{tokens} condition tokens exceed this model's max_condition_tokens "
                f"{self.config.max_condition_tokens}; pool the TA-Tok features at a larger scale"
            )
        if (self.config.positions == "rope2d" or self.config.dense_condition) and math.isqrt(tokens) ** 2 != tokens:
            raise ValueError(
                f"{tokens} condition tokens do not form a square grid, which rope2d positions and dense_condition need"
            )

    def _rope(self, prefix: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(cos, sin)`` ``[prefix + n - 1, head_dim / 2]`` of the 2D rotary angles of every sequence position, or
        None with absolute positions. Sampling computes it once and slices it at every step."""
        if self.config.positions == "absolute":
            return None
        side, grid = math.isqrt(prefix), self.vq.grid_size
        cells = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) * grid / side - 0.5
        codes = torch.arange(self.num_image_tokens - 1, device=device)
        rows = torch.cat([cells.repeat_interleave(side), (codes // grid).float()])
        cols = torch.cat([cells.repeat(side), (codes % grid).float()])
        quarter = self.config.width // self.config.heads // 4
        freqs = self.config.rope_base ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
        angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)
        return angles.cos(), angles.sin()

    def _transformer(
        self,
        h: torch.Tensor,
        rope_table: tuple[torch.Tensor, torch.Tensor] | None,
        start: int,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """Embedded tokens ``[B, L, width]`` at positions ``start..start+L-1`` (``rope_table``: :meth:`_rope` of the
        sequence) -> normalised hidden states."""
        h = self.tok_dropout(h)
        rope = None
        if rope_table is None:
            h = h + self.abs_pe[:, start : start + h.shape[1]]
        else:
            rope = tuple(t[start : start + h.shape[1]] for t in rope_table)
        for i, layer in enumerate(self.layers):
            h = layer(h, start, None if caches is None else caches[i], rope)
        return self.norm(h)

    def _dense(self, condition: torch.Tensor) -> torch.Tensor | None:
        """With ``dense_condition``: ``[B, n, width]``, row ``i`` the projected condition over code ``i``'s region."""
        if self.dense_proj is None:
            return None
        side, grid = math.isqrt(condition.shape[1]), self.vq.grid_size
        cells = condition.transpose(1, 2).reshape(len(condition), -1, side, side)
        regions = F.interpolate(cells, size=(grid, grid), mode="bilinear", align_corners=False)
        return self.dense_proj(regions.flatten(2).transpose(1, 2))

    def logits(self, condition: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced next-code logits ``[B, n, K]``: row ``i`` predicts ``codes[:, i]`` from the condition
        ``[B, N, C]`` and ``codes[:, :i]``. No condition dropout here (see :meth:`loss`)."""
        self._check_condition(condition)
        prefix = condition.shape[1]
        h = torch.cat([self.clip_proj(condition), self.tok_embeddings(codes[:, :-1])], dim=1)
        dense = self._dense(condition)
        if dense is not None:  # the inputs at positions prefix - 1 + i predict code i
            h = torch.cat([h[:, : prefix - 1], h[:, prefix - 1 :] + dense[:, : codes.shape[1]]], dim=1)
        return self.output(self._transformer(h, self._rope(prefix, h.device), 0)[:, prefix - 1 :]).float()

    def loss(self, condition: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Next-code cross-entropy of the images' VQ codes; in training each sample's condition is replaced by the
        null (all-zero) one with probability ``condition_dropout``. Metrics: ``accuracy`` (top-1 codes)."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", antialias=True)
        targets = self.vq.encode_indices(images)
        if self.training and self.config.condition_dropout > 0:
            drop = torch.rand(len(condition), device=condition.device) < self.config.condition_dropout
            condition = condition.masked_fill(drop[:, None, None], 0.0)
        logits = self.logits(condition, targets)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        accuracy = (logits.argmax(-1) == targets).float().mean()
        return {"loss": loss, "accuracy": accuracy}

    @torch.no_grad()
    def sample_codes(
        self,
        condition: torch.Tensor,
        cfg_scale: float = 1.0,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> torch.Tensor:
        """VQ codes ``[B, n]`` drawn one at a time given the condition ``[B, N, C]``.

        With ``cfg_scale != 1`` the null condition's rows are appended to the batch (one forward per step over
        ``2B`` rows) and the logits become ``uncond + cfg_scale * (cond - uncond)``; at 1 they are never run, so
        the codes equal unguided sampling under the same generator. ``temperature`` (0: greedy), ``top_k`` and
        ``top_p`` filter as :func:`tarkit_plugins.lm.generation.sample_next` does (the reference: 1.0, off, off).
        """
        self._check_condition(condition)
        use_cpu_linears(self)  # a few rows per step: tarkit.cpu_linear
        guided = cfg_scale != 1.0
        rows = torch.cat([condition, torch.zeros_like(condition)]) if guided else condition
        batch, prefix = rows.shape[:2]
        head_dim = self.config.width // self.config.heads
        length = prefix + self.num_image_tokens - 1
        dtype = self.tok_embeddings.weight.dtype
        caches = [
            KVCache(*(rows.new_zeros(batch, self.config.heads, length, head_dim, dtype=dtype) for _ in range(2)))
            for _ in self.layers
        ]
        prefill = self.clip_proj(rows.to(dtype))
        dense = self._dense(rows.to(dtype))
        if dense is not None:
            prefill = torch.cat([prefill[:, :-1], prefill[:, -1:] + dense[:, :1]], dim=1)
        rope_table = self._rope(prefix, rows.device)
        hidden = self._transformer(prefill, rope_table, 0, caches)[:, -1]
        codes = []
        for step in range(self.num_image_tokens):
            logits = self.output(hidden).float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + cfg_scale * (cond - uncond)
            code = sample_next(logits, temperature, top_k, top_p, generator)
            codes.append(code)
            if step + 1 < self.num_image_tokens:
                token = self.tok_embeddings(code.repeat(2) if guided else code)[:, None]
                if dense is not None:
                    token = token + dense[:, step + 1 : step + 2]
                hidden = self._transformer(token, rope_table, prefix + step, caches)[:, -1]
        return torch.stack(codes, dim=1)

    @torch.no_grad()
    def sample(
        self,
        condition: torch.Tensor,
        cfg_scale: float = 1.0,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]``: :meth:`sample_codes`, then the pixel VQ's decoder."""
        return self.vq.decode_indices(self.sample_codes(condition, cfg_scale, generator, temperature, top_k, top_p))


# The reference's GPT sizes by the file's "name" (LlamaGen's llama-abs-*): width and attention heads, the one shape
# the weights cannot tell. Its depth is read from the weights.
AR_MODEL_NAMES = {
    "llama-abs-S": (384, 6),
    "llama-abs-B": (768, 12),
    "llama-abs-L": (1024, 16),
    "llama-abs-LP": (1280, 20),
    "llama-abs-XL": (1280, 20),
    "llama-abs-XXL": (1536, 24),
    "llama-abs-XXXL": (2560, 40),
}
KNOWN_HEADS = dict(AR_MODEL_NAMES.values())
# The reference's ModelArgs (float) that tarkit's ARConfig takes, under its own names.
ARG_NAMES = {
    "token_dropout_p": "token_dropout",
    "attn_dropout_p": "attn_dropout",
    "resid_dropout_p": "resid_dropout",
    "ffn_dropout_p": "ffn_dropout",
    "class_dropout_prob": "condition_dropout",
    "norm_eps": "norm_eps",
}


def _official_heads(name: str | None, width: int, config: dict[str, Any], source: str) -> int:
    """Attention heads: ``config``'s, else the named size's (whose width must be the weights'), else the width's."""
    if config.get("heads"):
        return int(config["heads"])
    if name in AR_MODEL_NAMES:
        named_width, heads = AR_MODEL_NAMES[name]
        if named_width != width:
            raise PretrainedLoadError(
                f"{source} is named {name!r} (width {named_width}) but its weights are {width} wide; is it damaged?"
            )
        return heads
    if width not in KNOWN_HEADS:
        raise PretrainedLoadError(
            f"{source}: cannot tell the attention heads of {name!r} from width {width}; pass config={{'heads': N}}"
        )
    return KNOWN_HEADS[width]


def _check_official_args(args: dict[str, Any], heads: int, source: str) -> None:
    """Refuse the reference's variants tarkit does not implement: it is the ``clip_cond`` GPT, one KV head per head."""
    if args.get("model_type", "clip_cond") != "clip_cond":
        raise PretrainedLoadError(
            f"{source} is a {args['model_type']!r} model; only 'clip_cond' (conditioned on features) is supported"
        )
    if args.get("frame_prediction"):
        raise PretrainedLoadError(f"{source} is a frame-prediction model, which tarkit does not support")
    if args.get("n_kv_head") not in (None, heads):
        raise PretrainedLoadError(f"{source} has {args['n_kv_head']} KV heads for {heads} heads; tarkit has no GQA")


def _code_grid(args: dict[str, Any], positions: int, source: str) -> tuple[int, int]:
    """``(codes per image, condition tokens)`` from ``args`` and the ``abs_pe`` length (``prefix + codes - 1``)."""
    codes = int(args.get("max_seq_len") or positions - int(args.get("cls_token_num", 729)) + 1)
    prefix = positions - codes + 1
    if codes < 1 or math.isqrt(codes) ** 2 != codes:
        raise PretrainedLoadError(f"{source}: {codes} image codes per image do not form a square grid")
    if prefix < 1 or int(args.get("cls_token_num", prefix)) != prefix:
        raise PretrainedLoadError(
            f"{source}: abs_pe holds {positions} positions, not cls_token_num {args.get('cls_token_num')} + "
            f"max_seq_len {codes} - 1; the file's args do not match its weights"
        )
    return codes, prefix


def _official_vq(vq: PixelVQ | str, image_size: int | None, grid: int, vocab: int, source: str) -> PixelVQ:
    """The pixel VQ at the size whose code grid the GPT generates; it must have the GPT's codebook."""
    vq_model = load_pixel_vq(vq)
    vq_model = load_pixel_vq(vq_model, image_size or grid * vq_model.downsample)
    if vq_model.grid_size != grid:
        raise PretrainedLoadError(
            f"{source} generates {grid} x {grid} codes but the VQ at {vq_model.image_size} px has "
            f"{vq_model.grid_size} x {vq_model.grid_size}; leave image_size unset or pass {grid * vq_model.downsample}"
        )
    if vocab != vq_model.codebook_size:
        raise PretrainedLoadError(
            f"{source} predicts {vocab} codes but the VQ has {vq_model.codebook_size}; pass the VQ it was trained on"
        )
    return vq_model


def load_official_ar_detokenizer(
    path: str | Path,
    vq: PixelVQ | str,
    image_size: int | None = None,
    config: dict[str, Any] | None = None,
) -> AutoregressiveDeTokenizer:
    """An :class:`AutoregressiveDeTokenizer` from the reference's ``ar_dtok_*.pth`` (a local file, read with
    ``weights_only=True``) and its pixel VQ (``vq_ds16_t2i.pt``, a tarkit VQ folder or instance).

    The file is ``{"model": {"name", "args", "sd"}}`` as ``ARModel.from_checkpoint`` reads it. Width, depth,
    vocabulary, SwiGLU width, condition width and prefix length are read from the weights; the heads from
    ``config``, else the ``name``'s size (``llama-abs-LP``: 20), else the width. The number of codes is
    ``args["max_seq_len"]`` (else ``abs_pe`` minus ``args["cls_token_num"]``, default 729), which also sets
    ``image_size`` when it is not given; ``norm_eps`` and the dropouts (``*_dropout_p``, ``class_dropout_prob``)
    come from ``args``. Only the ``clip_cond`` model type is supported. Missing, unexpected or wrongly shaped
    weights raise one :class:`PretrainedLoadError` naming them.
    """
    name, args, state = read_official_spec(path)
    source, config = str(path), dict(config or {})

    def require(key: str) -> torch.Tensor:
        if key not in state:
            raise PretrainedLoadError(f"{source}: missing key {key}; is this an ar_dtok checkpoint?")
        return state[key]

    vocab, width = require("tok_embeddings.weight").shape
    heads = _official_heads(name, width, config, source)
    _check_official_args(args, heads, source)
    codes, prefix = _code_grid(args, require("abs_pe").shape[1], source)
    vq_model = _official_vq(vq, image_size, math.isqrt(codes), vocab, source)
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))), default=-1)
    architecture = {
        "width": width,
        "depth": depth,
        "heads": heads,
        "mlp_hidden": require("layers.0.feed_forward.w1.weight").shape[0] if depth else None,
        "max_condition_tokens": prefix,
        "positions": "absolute",
        **{ours: float(args[theirs]) for theirs, ours in ARG_NAMES.items() if theirs in args},
    }
    model = AutoregressiveDeTokenizer(
        vq_model, require("clip_proj.weight").shape[1], preset=None, config={**architecture, **config}
    )
    full = {**state, **{f"vq.{key}": value for key, value in vq_model.state_dict().items()}}
    check_state_dict(model, full, source)
    model.load_state_dict(full)
    return model
