"""TA-Tok + a de-tokenizer as one image autoencoder: the reference's ``MMAutoEncoder``, any de-tokenizer behind it.

    images -> TA-Tok codes (the LLM's image words) -> TA-Tok decoded features -> de-tokenizer -> pixels

Text-to-image runs the second half on the codes the LM generates (:meth:`decode_from_encoder_indices`);
:meth:`reconstruct` runs the whole round trip, which is how a de-tokenizer is judged.
"""

from __future__ import annotations

from typing import Any

import torch

from tarkit.interfaces import DeTokenizer
from tarkit.tatok import TATok, load_tatok


def load_detokenizer(path: str) -> DeTokenizer:
    """A de-tokenizer folder written by ``save_pretrained`` (any registered kind: the folder names its class)."""
    return DeTokenizer.from_pretrained(path)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in ``[0, 1]`` -> ``uint8`` in ``[0, 255]`` (rounded, clamped)."""
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8)


class MMAutoEncoder:
    """TA-Tok and a de-tokenizer composed: codes <-> pixels.

    Args:
        tatok: a :class:`TATok`, a TA-Tok folder or the reference's ``ta_tok.pth``.
        detokenizer: a :class:`DeTokenizer` or its folder.
        scale: pool scale that :meth:`reconstruct` tokenizes at (decoding infers it from the code count).
        cfg_scale: default classifier-free guidance of the de-tokenizer (1: unguided).
        sampling: default sampling arguments of the de-tokenizer (e.g. ``temperature``, ``num_steps``).
    """

    def __init__(
        self,
        tatok: TATok | str,
        detokenizer: DeTokenizer | str,
        scale: int = 1,
        cfg_scale: float = 1.0,
        **sampling: Any,
    ):
        self.tatok = (load_tatok(tatok).tatok if isinstance(tatok, str) else tatok).eval()
        self.detokenizer = (load_detokenizer(detokenizer) if isinstance(detokenizer, str) else detokenizer).eval()
        if self.detokenizer.condition_dim != self.tatok.encoder.width:
            raise ValueError(
                f"the de-tokenizer expects {self.detokenizer.condition_dim}-wide condition features but the TA-Tok "
                f"decodes {self.tatok.encoder.width}-wide ones; train the de-tokenizer on this TA-Tok"
            )
        self.scale = self.tatok.check_scale(scale)
        self.cfg_scale, self.sampling = cfg_scale, sampling

    @property
    def device(self) -> torch.device:
        return next(self.tatok.parameters()).device

    @torch.no_grad()
    def decode_from_encoder_indices(
        self,
        indices: torch.Tensor,
        cfg_scale: float | None = None,
        generator: torch.Generator | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """TA-Tok codes ``[B, n]`` (any pool scale) -> ``uint8`` images ``[B, 3, H, W]``; codes that are not one
        image's at one of the TA-Tok's scales are a one-line ``ValueError`` (:meth:`check_codes`)."""
        condition = self.tatok.decode_features(self.check_codes(indices).to(self.device))
        images = self.detokenizer.sample(
            condition,
            cfg_scale=self.cfg_scale if cfg_scale is None else cfg_scale,
            generator=generator,
            **{**self.sampling, **sampling},
        )
        return to_uint8(images)

    def check_codes(self, indices: Any) -> torch.Tensor:
        """``indices`` if it holds one whole image's codes per row, ``[B, n]`` integers in ``[0, K)`` with ``n``
        the token count of one of the TA-Tok's scales; else a one-line ``ValueError`` saying what to pass."""
        shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        if not isinstance(indices, torch.Tensor) or indices.ndim != 2 or indices.dtype.is_floating_point:
            raise ValueError(f"expected code indices [B, n] as an integer torch tensor, got {shape}")
        counts = {self.tatok.tokens_per_image(s): s for s in self.tatok.pool_scales}
        if indices.shape[1] not in counts:
            raise ValueError(
                f"got {indices.shape[1]} codes per image, but this TA-Tok's scales {self.tatok.pool_scales} take "
                f"{', '.join(map(str, counts))}; pass all of one image's codes per row"
            )
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.tatok.num_codes):
            raise ValueError(
                f"codes must lie in [0, {self.tatok.num_codes}) (this TA-Tok's codebook), got "
                f"[{indices.min()}, {indices.max()}]; decode codes made by this TA-Tok"
            )
        return indices

    @torch.no_grad()
    def reconstruct(
        self,
        images: torch.Tensor,
        scale: int | None = None,
        generator: torch.Generator | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` -> TA-Tok codes -> ``uint8`` images redrawn by the de-tokenizer."""
        codes = self.tatok.tokenize(images.to(self.device), self.tatok.check_scale(scale or self.scale))
        return self.decode_from_encoder_indices(codes, generator=generator, **sampling)
