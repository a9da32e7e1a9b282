"""The LLM's image words: ``<im_start>``, ``<im_end>``, scale tokens ``<S0>..`` and image tokens ``<I0>..``.

Token strings and their order follow the reference (csuhan/Tar): ``<im_start>``, ``<im_end>``, ``<S0>`` ..
``<S{n-1}>``, ``<I0>`` .. ``<I{K-1}>``, appended after the base vocabulary. Image tokens are contiguous, so
code ``c`` is token ``image_start + c``: no code path ever parses ``<I123>`` out of decoded text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IM_START, IM_END = "<im_start>", "<im_end>"


def scale_token(k: int) -> str:
    return f"<S{k}>"


def image_token(code: int) -> str:
    return f"<I{code}>"


class VocabularyError(ValueError):
    """A tokenizer or model lacks tarkit's image vocabulary, or has it in another layout."""


@dataclass(frozen=True)
class ImageVocabulary:
    """Token ids of the image words of an expanded vocabulary and the code <-> id map."""

    im_start: int
    im_end: int
    scale_ids: tuple[int, ...]
    image_start: int
    num_codes: int

    @property
    def num_scales(self) -> int:
        return len(self.scale_ids)

    @property
    def image_end(self) -> int:
        """One past the last image token id."""
        return self.image_start + self.num_codes

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """TA-Tok code indices -> token ids."""
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise VocabularyError(f"codes must lie in [0, {self.num_codes}), got [{codes.min()}, {codes.max()}]")
        return codes + self.image_start

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (all image tokens) -> TA-Tok code indices."""
        if ids.numel() and (ids.min() < self.image_start or ids.max() >= self.image_end):
            raise VocabularyError(f"ids must be image tokens in [{self.image_start}, {self.image_end})")
        return ids - self.image_start

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.image_start) & (ids < self.image_end)

    def scale_of(self, token_id: int) -> int:
        """The scale index ``k`` of ``<S{k}>``."""
        try:
            return self.scale_ids.index(token_id)
        except ValueError:
            raise VocabularyError(f"token id {token_id} is not a scale token") from None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ImageVocabulary:
        """Find the image words in an (already expanded) tokenizer; a clear error if they are missing."""
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IM_START, IM_END, scale_token(0), image_token(0)) if t not in vocab]
        if missing:
            raise VocabularyError(
                f"the tokenizer has no {', '.join(missing)}: it is not a Tar vocabulary; expand it with "
                "its LM plugin (LanguageModel.ensure_image_vocabulary) or load a Tar model folder"
            )
        scales = []
        while scale_token(len(scales)) in vocab:
            scales.append(vocab[scale_token(len(scales))])
        start = vocab[image_token(0)]
        count = 0
        while image_token(count) in vocab:
            if vocab[image_token(count)] != start + count:
                raise VocabularyError(
                    f"image tokens are not contiguous: {image_token(count)} is not id {start + count}"
                )
            count += 1
        return cls(vocab[IM_START], vocab[IM_END], tuple(scales), start, count)
