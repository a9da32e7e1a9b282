"""The reference implementation's tokenizer API (csuhan/Tar ``TextAlignedTokenizer``) over a tarkit TA-Tok, so
code written against the reference runs on tarkit unchanged."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tarkit.tatok import TATok, load_tatok

INPUT_TYPES = ("indices", "quant", "rec")


class TextAlignedTokenizer(nn.Module):
    """The reference implementation's API (csuhan/Tar ``TextAlignedTokenizer``) over a :class:`TATok`.

    ``tok(images)["encoded"]`` is, by ``input_type``: ``"indices"`` the code ids ``[B, n]`` (what the LLM
    reads), ``"quant"`` the quantized vectors ``[B, n, D]``, or ``"rec"`` the decoded teacher-like features
    ``[B, n, C]``. Only ``"rec"`` runs the feature decoder.
    """

    def __init__(self, tatok: TATok, input_type: str = "quant", pool_scale: int = 1, teacher: nn.Module | None = None):
        super().__init__()
        if input_type not in INPUT_TYPES:
            raise ValueError(f"input_type must be one of {', '.join(INPUT_TYPES)}, got {input_type!r}")
        self.tatok, self.input_type, self.teacher = tatok, input_type, teacher
        self.pool_scale = tatok.check_scale(pool_scale)

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        load_teacher: bool = False,
        input_type: str = "quant",
        pool_scale: int | None = None,
        **options: Any,
    ) -> TextAlignedTokenizer:
        """A TA-Tok folder or file through :func:`tarkit.tatok.load_tatok` (``options`` go there), in eval mode.
        ``pool_scale`` ``None`` is the file's default (the reference's ``args["pool_scale"]``), else 1."""
        tatok, teacher, file_scale = load_tatok(path, load_teacher=load_teacher, **options)
        return cls(tatok, input_type, file_scale if pool_scale is None else pool_scale, teacher).eval()

    def encode(self, images: torch.Tensor, scale: int | None = None) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` -> code indices ``[B, n]``."""
        return self.tatok.tokenize(images, self.pool_scale if scale is None else scale)

    def decode_features(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices ``[B, n]`` -> teacher-like features ``[B, n, C]``."""
        return self.tatok.decode_features(indices)

    def forward(self, images: torch.Tensor, pool_scale: int | None = None) -> dict[str, Any]:
        encoding = self.tatok.encode(images, self.pool_scale if pool_scale is None else pool_scale)
        outputs = {
            "bottleneck_rep": encoding.indices,
            "regularized_z": encoding.quantized,
            "pool_scale": encoding.scale,
            "vq_loss": encoding.loss,
            **encoding.metrics,
        }
        if self.input_type == "indices":
            outputs["encoded"] = encoding.indices
        elif self.input_type == "quant":
            outputs["encoded"] = encoding.quantized
        else:
            outputs["encoded"] = self.tatok.decode_latent(encoding.latent)
        return outputs
