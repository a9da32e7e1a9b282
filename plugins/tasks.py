"""Task formatters (group ``tarkit.tasks``): the user turn of each built-in task (see ``TaskFormatter``)."""

from __future__ import annotations

from typing import Any

from tarkit.interfaces import TaskFormatter
from tarkit.prompts import Part, image_ids
from tarkit.vocab import ImageVocabulary
from tarkit_plugins.lm.reflect import DEFAULT_QUESTION


class ImageToText(TaskFormatter):
    """i2t: image tokens + "\\n" + question in the user turn; the answer is supervised. A blank question is the
    caption question (``DEFAULT_QUESTION``), as the pipelines read it."""

    name = "i2t"
    needs = frozenset({"text", "answer", "input_image"})
    default_ratio = 1.0

    def user(self, sample: dict[str, Any], vocab: ImageVocabulary) -> list[Part]:
        question = sample["text"] if sample["text"].strip() else DEFAULT_QUESTION
        return [image_ids(vocab, self.codes(sample, "input_codes")), "\n" + question]


class TextToImage(TaskFormatter):
    """t2i: the prompt in the user turn; ``<im_start><S{k}>`` + image tokens + ``<im_end>`` supervised."""

    name = "t2i"
    needs = frozenset({"text", "target_image"})
    default_ratio = 1.0
    output = "image"

    def user(self, sample: dict[str, Any], vocab: ImageVocabulary) -> list[Part]:
        return [sample["text"]]


class ImageToImage(TaskFormatter):
    """i2i: an image in, the same content out (re-drawn); ti2i adds an instruction after the input image."""

    name = "i2i"
    needs = frozenset({"input_image", "target_image"})
    default_ratio = 0.25
    output = "image"

    def user(self, sample: dict[str, Any], vocab: ImageVocabulary) -> list[Part]:
        user: list[Part] = [image_ids(vocab, self.codes(sample, "input_codes"))]
        if sample.get("text"):
            user.append("\n" + sample["text"])
        return user


class TextImageToImage(ImageToImage):
    """ti2i: input image tokens + "\\n" + instruction; the edited image supervised."""

    name = "ti2i"
    needs = frozenset({"text", "input_image", "target_image"})
    default_ratio = 0.25
