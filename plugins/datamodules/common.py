"""What the ``image_text`` and ``webdataset`` datamodules share: one annotation record -> the tasks it supports ->
a sample.

A record has the fields of a JSONL row or of a shard's ``txt``/``json`` (all optional strings):

- ``text`` only: a caption. Supports ``i2t`` (a default question, the caption as answer), ``t2i`` (the caption as
  prompt) and ``i2i`` (the image reconstructed).
- ``text`` + ``answer``: a question/answer pair. Supports ``i2t`` only.
- ``target_image`` (+ ``text``, the instruction): an edit pair. Supports ``ti2i`` (needs the ``text``) and ``i2i``.
- ``task``: the record supports only that task, which must fit the fields above; an image-only record (no
  ``text``) is allowed only with ``"task": "i2i"``. A task another plugin registers is supported when the
  record has the fields it ``needs`` (the record's image is its ``input_image``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningDataModule

from tarkit.data import DataFormatError, TaskMix, default_task_ratios, make_sample, missing_fields, task_names

# What a task needs from a record, for the error that names what to fix.
TASK_NEEDS: dict[str, str] = {
    "i2t": 'i2t needs "text" (a caption, or a question with "answer") and no "target_image"',
    "t2i": 't2i needs a "text" caption and no "answer" or "target_image"',
    "i2i": 'i2i needs no "answer"',
    "ti2i": 'ti2i needs "text" (the instruction) and "target_image"',
}


@dataclass(frozen=True)
class Record:
    """One checked annotation: its text fields (stripped, ``""`` when absent) and the tasks it supports.

    ``target_image`` is the edit target as the annotation names it (a path in JSONL rows).
    """

    text: str
    answer: str
    target_image: str
    tasks: tuple[str, ...]


def parse_record(fields: Mapping[str, Any]) -> Record:
    """Check one annotation's fields (see the module docstring); raises ``DataFormatError`` saying what to fix,
    without saying where: the caller adds the file and line (or shard and key)."""
    values = {}
    for name in ("text", "answer", "target_image", "task"):
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            raise DataFormatError(f'"{name}" must be a string, got {type(value).__name__} {value!r}')
        values[name] = (value or "").strip()
    text, answer, target, task = values["text"], values["answer"], values["target_image"], values["task"]
    if task and task not in task_names():
        raise DataFormatError(f'unknown "task" {task!r}; use one of {", ".join(task_names())} or leave it out')
    if target:
        supported = ("ti2i", "i2i") if text else ("i2i",)
    elif answer:
        supported = ("i2t",) if text else ()
    elif text:
        supported = ("i2t", "t2i", "i2i")
    else:
        # An image with no text at all is more likely a forgotten caption than a reconstruction-only row.
        supported = ("i2i",) if task else ()
    if task and task not in TASK_NEEDS:  # another plugin's task: the fields it needs
        fields_present = {"text": bool(text), "answer": bool(answer), "target_image": bool(target), "input_image": True}
        missing = missing_fields(task, fields_present)
        if missing:
            raise DataFormatError(f'"task" {task!r} needs {", ".join(missing)}, which this record lacks')
        supported = (task,)
    elif task:
        if task not in supported:
            raise DataFormatError(f'"task" {task!r} does not fit this record: {TASK_NEEDS[task]}')
        supported = (task,)
    if not supported:
        raise DataFormatError(
            'no "text": add a caption as "text" (the question, when there is an "answer"), '
            'or "task": "i2i" for an image-only record'
        )
    return Record(text=text, answer=answer, target_image=target, tasks=supported)


def enabled_tasks(record: Record, mix: TaskMix) -> list[str]:
    """The record's tasks that ``mix`` can choose (a positive ratio); a record with none is left out."""
    return [task for task in record.tasks if mix.ratios.get(task, 0) > 0]


def uses_target_image(record: Record, task: str) -> bool:
    """Whether making ``task`` from ``record`` needs its separate ``target_image`` decoded."""
    return bool(record.target_image) and (task in ("i2i", "ti2i") or task not in TASK_NEEDS)


def record_sample(
    record: Record,
    task: str,
    image: torch.Tensor,
    image_size: int,
    default_question: str,
    target_image: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The ``make_sample`` dict of ``task`` (one of ``record.tasks``) for a record whose image is ``image``;
    ``target_image`` is the decoded edit target when ``uses_target_image`` says it is needed."""
    if task == "i2t":
        question, answer = (record.text, record.answer) if record.answer else (default_question, record.text)
        return make_sample(task, image_size, text=question, answer=answer, input_image=image)
    if task == "t2i":
        return make_sample(task, image_size, text=record.text, target_image=image)
    if task not in TASK_NEEDS:  # another plugin's task: the record's fields as they are
        return make_sample(task, image_size, record.text, record.answer, input_image=image, target_image=target_image)
    target = image if target_image is None else target_image
    text = record.text if task == "ti2i" else ""
    return make_sample(task, image_size, text=text, input_image=image, target_image=target)


class RecordDataModule(LightningDataModule):
    """The settings the record-based datamodules share, checked in one place; the subclasses document them (the
    CLI reads their constructors). ``task_ratios`` None means the registered tasks' default mix."""

    def __init__(
        self,
        image_size: int,
        batch_size: int,
        num_workers: int,
        task_ratios: dict[str, float] | None,
        default_question: str,
        seed: int,
    ):
        super().__init__()
        if image_size < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"image_size and batch_size must be positive and num_workers >= 0, got image_size={image_size}, "
                f"batch_size={batch_size}, num_workers={num_workers}"
            )
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.mix = TaskMix(default_task_ratios() if task_ratios is None else task_ratios, seed)
        self.default_question = default_question
        self.seed = seed
