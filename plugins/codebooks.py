"""Codebook projections (group ``tarkit.codebooks``): where the quantizer's codes come from."""

from __future__ import annotations

import torch
from torch import nn

from tarkit.interfaces import CodebookProjection


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
