"""The ``shapesworld`` datamodule: mixed-task samples rendered on the fly, no files needed."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from tarkit.data import EpochDataLoader, TaskMix, default_task_ratios, make_sample
from tarkit.images import image_to_tensor
from tarkit_plugins.shapesworld.world import TAGS, SceneSampler, render

CAPTION_QUESTIONS: tuple[str, ...] = (
    "Describe the image.",
    "What is in the image?",
    "List the shapes in the image.",
)


SHAPESWORLD_TASKS = ("i2t", "t2i", "i2i", "ti2i")  # what a scene can make


def answer_text(label: str) -> str:
    """How ShapesWorld phrases a yes/no answer ("Yes."/"No."), so POPE's reading of it is unambiguous."""
    return f"{label.capitalize()}."


class ShapesWorldDataset(Dataset):
    """``length`` scenes of one split; scene ``i`` depends only on the seed and ``i``, its task and wording
    also on the epoch (see :meth:`set_epoch`), so every epoch shows each scene through another task."""

    def __init__(self, sampler: SceneSampler, length: int, task_mix: TaskMix, pope_fraction: float = 0.5):
        self.sampler, self.length, self.task_mix, self.pope_fraction = sampler, length, task_mix, pope_fraction
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose tasks and wording as in epoch ``epoch`` (``EpochDataLoader`` calls this)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        example = self.sampler.example(index)
        rng = self.sampler.rng(index, f"sample/{self.epoch}")
        task = self.task_mix.choose(index, epoch=self.epoch)
        image = image_to_tensor(render(example.scene))
        size = self.sampler.size
        if task == "i2t":
            if rng.random() < self.pope_fraction:
                question, label = self.sampler.training_question(example, rng)
                return make_sample(task, size, question, answer_text(label), input_image=image)
            return make_sample(task, size, rng.choice(CAPTION_QUESTIONS), example.scene.describe(), input_image=image)
        if task == "t2i":
            return make_sample(task, size, self.sampler.caption(example, rng), target_image=image)
        if task == "i2i":  # the same scene drawn again: new pixel noise and colour jitter, same content
            again = render(replace(example.scene, noise_seed=rng.randrange(2**31)))
            return make_sample(task, size, input_image=image, target_image=image_to_tensor(again))
        instruction, edited = self.sampler.edit(example, rng)
        return make_sample(task, size, instruction, input_image=image, target_image=image_to_tensor(render(edited)))


class ShapesWorldDataModule(LightningDataModule):
    """ShapesWorld scenes rendered on the fly, mixing i2t (captions and POPE-style yes/no questions), t2i,
    i2i (re-draw the scene) and ti2i (recolour or remove an object) by ``task_ratios``.

    Args:
        image_size: side of the square images in pixels.
        train_size: examples per training epoch (fixed, seeded scenes).
        val_size: examples in the validation and test sets.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        task_ratios: relative frequency of each task (``i2t``, ``t2i``, ``i2i``, ``ti2i``).
        train_split: colour-shape combinations for training (``train``, ``heldout`` or ``all``).
        val_split: the same for validation and test; ``heldout`` never shares a combination with ``train``.
        tags: GenEval categories to draw scenes for (default all six).
        pope_fraction: share of i2t samples that are yes/no questions rather than descriptions.
        noise_std: standard deviation of the pixel noise (0-255 scale).
        seed: seeds every scene and task choice.
    """

    def __init__(
        self,
        image_size: int = 64,
        train_size: int = 10000,
        val_size: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        task_ratios: dict[str, float] | None = None,
        train_split: str = "train",
        val_split: str = "heldout",
        tags: list[str] | None = None,
        pope_fraction: float = 0.5,
        noise_std: float = 3.0,
        seed: int = 0,
    ):
        super().__init__()
        if train_size < 1 or val_size < 1 or batch_size < 1:
            raise ValueError("train_size, val_size and batch_size must be positive")
        if not 0.0 <= pope_fraction <= 1.0:
            raise ValueError(f"pope_fraction must be in [0, 1], got {pope_fraction}")
        self.batch_size, self.num_workers = batch_size, num_workers
        ratios = task_ratios or {t: r for t, r in default_task_ratios().items() if t in SHAPESWORLD_TASKS}
        unsupported = sorted(t for t, r in ratios.items() if r > 0 and t not in SHAPESWORLD_TASKS)
        if unsupported:
            raise ValueError(
                f"ShapesWorld makes {', '.join(SHAPESWORLD_TASKS)} samples, not {', '.join(unsupported)}; remove them "
                "from task_ratios"
            )
        self.task_mix = TaskMix(ratios, seed)
        common = {"seed": seed, "size": image_size, "tags": tuple(tags or TAGS), "noise_std": noise_std}
        self.train_set = ShapesWorldDataset(
            SceneSampler(train_split, **common), train_size, self.task_mix, pope_fraction
        )
        # a different seed for evaluation scenes, so val never repeats a training scene even with split="all"
        val_sampler = SceneSampler(val_split, **{**common, "seed": seed + 1_000_003})
        self.val_set = ShapesWorldDataset(val_sampler, val_size, self.task_mix, pope_fraction)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.task_mix.seed)
        return EpochDataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers, generator=generator
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
