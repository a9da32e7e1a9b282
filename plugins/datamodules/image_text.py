"""Images in a folder, described by a JSONL annotation file (``tarkit.datamodules`` name ``image_text``).

One JSON object per line (blank lines and other keys are ignored):

    {"image": "cats/1.png", "text": "a cat on a mat"}                         caption: i2t, t2i, i2i
    {"image": "count.png", "text": "How many cats?", "answer": "two"}         question/answer: i2t
    {"image": "a.png", "target_image": "b.png", "text": "make it red"}        edit pair: ti2i, i2i
    {"image": "c.png", "text": "a red cube", "task": "t2i"}                   only the task given

``image`` is required; the rest is checked as in ``tarkit_plugins.datamodules.common``. Paths are relative to the
annotation file's folder unless ``image_root`` is given (absolute paths are kept). The whole file is checked when
the datamodule is set up, so a bad line stops the run before training with its file and line number; images are
read lazily, and one that is missing, corrupt, truncated or not an image is skipped (a ``DataWarning`` with the
running count) for the next readable record.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from tarkit.data import DataFormatError, DataWarning, EpochDataLoader, SkipCounter, TaskMix
from tarkit.images import image_to_tensor, load_image
from tarkit_plugins.datamodules.common import (
    Record,
    RecordDataModule,
    enabled_tasks,
    parse_record,
    record_sample,
    uses_target_image,
)
from tarkit_plugins.jsonl import iter_jsonl


@dataclass(frozen=True)
class Annotation:
    """One JSONL row: its resolved image paths, its checked record, and where it came from (``file:line``)."""

    image: Path
    target_image: Path | None
    record: Record
    where: str


def read_annotations(path: str | Path, image_root: str | Path | None = None) -> list[Annotation]:
    """Parse and check a whole JSONL annotation file; raises ``DataFormatError`` naming the file, the 1-based line
    and what to fix."""
    root = Path(path).parent if image_root is None else Path(image_root)
    annotations = []
    for number, row in iter_jsonl(path, required=("image",)):
        where = f"{path}:{number}"
        image = row["image"]
        if not isinstance(image, str) or not image.strip():
            raise DataFormatError(f'{where}: "image" must be a path (relative to {root}), got {image!r}')
        try:
            record = parse_record(row)
        except DataFormatError as err:
            raise DataFormatError(f"{where}: {err}") from None
        target = root / record.target_image if record.target_image else None
        annotations.append(Annotation(root / image.strip(), target, record, where))
    if not annotations:
        raise DataFormatError(f"{path}: no annotations; write one JSON object per line")
    return annotations


class ImageTextDataset(Dataset):
    """Samples of checked annotations, each record's task chosen by ``mix`` from ``(index, epoch)``.

    An unreadable image is skipped with a ``DataWarning`` and the next readable record (wrapping around) is
    returned instead, so one bad file never stops training.
    """

    def __init__(
        self, annotations: list[Annotation], mix: TaskMix, image_size: int, default_question: str, source: str
    ):
        self.annotations = annotations
        self.mix = mix
        self.image_size = image_size
        self.default_question = default_question
        self.source = source
        self.epoch = 0
        self.skips = SkipCounter(f"image_text {source}")

    def set_epoch(self, epoch: int) -> None:
        """Choose the tasks of epoch ``epoch`` from now on (``EpochDataLoader`` calls this)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for offset in range(len(self)):
            position = (index + offset) % len(self)
            annotation = self.annotations[position]
            task = self.mix.choose(position, annotation.record.tasks, self.epoch)
            try:
                image = image_to_tensor(load_image(annotation.image), self.image_size)
                target = None
                if uses_target_image(annotation.record, task):
                    target = image_to_tensor(load_image(annotation.target_image), self.image_size)
            except (OSError, ValueError) as err:
                self.skips.skip(annotation.where, err)
                continue
            return record_sample(annotation.record, task, image, self.image_size, self.default_question, target)
        raise DataFormatError(
            f"{self.source}: none of its {len(self)} images could be read (see the DataWarnings); "
            "check the image paths and image_root"
        )


class ImageTextDataModule(RecordDataModule):
    """Image-text data from a folder of images and JSONL annotations (row format in the module docstring).

    Each record makes one sample per epoch, of a task chosen among those it supports by ``task_ratios``;
    training passes reshuffle the records and choose tasks anew, validation always uses epoch 0's choice.

    Args:
        train_annotations: JSONL file of the training records.
        val_annotations: JSONL file of the validation records; no validation when None.
        image_root: folder the image paths are relative to; None for each annotation file's own folder.
        image_size: side ``S`` of the square ``[3, S, S]`` images.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes (0 loads in the main process).
        task_ratios: relative frequency of each task (``i2t``, ``t2i``, ``i2i``, ``ti2i``) among the records
            that support it; None for the registered tasks' default mix. Records supporting no task with a
            positive ratio are left out (with a warning).
        default_question: the question of i2t samples made from captions.
        seed: seed of the task choice and of the training shuffle.
    """

    def __init__(
        self,
        train_annotations: str,
        val_annotations: str | None = None,
        image_root: str | None = None,
        image_size: int = 64,
        batch_size: int = 16,
        num_workers: int = 0,
        task_ratios: dict[str, float] | None = None,
        default_question: str = "Describe the image.",
        seed: int = 0,
    ):
        super().__init__(image_size, batch_size, num_workers, task_ratios, default_question, seed)
        self.train_annotations = train_annotations
        self.val_annotations = val_annotations
        self.image_root = image_root
        self.train_set: ImageTextDataset | None = None
        self.val_set: ImageTextDataset | None = None

    def _dataset(self, path: str) -> ImageTextDataset:
        annotations = read_annotations(path, self.image_root)
        usable = [a for a in annotations if enabled_tasks(a.record, self.mix)]
        if not usable:
            raise DataFormatError(
                f"{path}: no record supports a task that task_ratios {dict(self.mix.ratios)} enables; "
                "give a positive ratio to a task the records support"
            )
        if len(usable) < len(annotations):
            warnings.warn(
                f"{path}: {len(annotations) - len(usable)} of {len(annotations)} records support no task that "
                f"task_ratios {dict(self.mix.ratios)} enables and are left out",
                DataWarning,
                stacklevel=2,
            )
        return ImageTextDataset(usable, self.mix, self.image_size, self.default_question, path)

    def setup(self, stage: str | None = None) -> None:
        """Parse and check the annotation files the stage needs (all of them when ``stage`` is None)."""
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._dataset(self.train_annotations)
        if self.val_set is None and self.val_annotations is not None and stage in (None, "fit", "validate"):
            self.val_set = self._dataset(self.val_annotations)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return EpochDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_annotations is None:
            return []  # Lightning skips validation for an empty list
        if self.val_set is None:
            self.setup("validate")
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
