"""Task formatters (group ``tarkit.tasks``): how each task kind becomes an LM training example."""

from __future__ import annotations

from typing import Any

import torch

from tarkit.interfaces import TaskFormatter
from tarkit.prompts import chat_example, image_ids, image_span
from tarkit.vocab import ImageVocabulary


def _codes(sample: dict[str, Any], key: str) -> torch.Tensor:
    codes = sample.get(key)
    if codes is None:
        raise ValueError(f"{sample.get('task', 'this')} sample has no {key}")
    return codes


class ImageToText(TaskFormatter):
    """i2t: image tokens + "\\n" + question in the user turn; the answer is supervised."""

    name = "i2t"
    needs = frozenset({"text", "answer", "input_image"})
    default_ratio = 1.0

    def format(self, sample: dict[str, Any], tokenizer: Any, vocab: ImageVocabulary) -> dict[str, torch.Tensor]:
        user = [image_ids(vocab, _codes(sample, "input_codes")), "\n" + sample["text"]]
        return chat_example(tokenizer, user, [sample["answer"]])


class TextToImage(TaskFormatter):
    """t2i: the prompt in the user turn; ``<im_start><S{k}>`` + image tokens + ``<im_end>`` supervised."""

    name = "t2i"
    needs = frozenset({"text", "target_image"})
    default_ratio = 1.0

    def format(self, sample: dict[str, Any], tokenizer: Any, vocab: ImageVocabulary) -> dict[str, torch.Tensor]:
        target = image_span(vocab, _codes(sample, "target_codes"), sample["scale_index"])
        return chat_example(tokenizer, [sample["text"]], [target])


class ImageToImage(TaskFormatter):
    """i2i: an image in, the same content out (re-drawn); ti2i adds an instruction after the input image."""

    name = "i2i"
    needs = frozenset({"input_image", "target_image"})
    default_ratio = 0.25

    def format(self, sample: dict[str, Any], tokenizer: Any, vocab: ImageVocabulary) -> dict[str, torch.Tensor]:
        user: list[Any] = [image_ids(vocab, _codes(sample, "input_codes"))]
        if sample.get("text"):
            user.append("\n" + sample["text"])
        target = image_span(vocab, _codes(sample, "target_codes"), sample["scale_index"])
        return chat_example(tokenizer, user, [target])


class TextImageToImage(ImageToImage):
    """ti2i: input image tokens + "\\n" + instruction; the edited image supervised."""

    name = "ti2i"
    needs = frozenset({"text", "input_image", "target_image"})
    default_ratio = 0.25
