"""What every tarkit datamodule yields, and the shared pieces to build one.

A sample is one training example of one task, a name registered under ``tarkit.tasks`` (:func:`task_names`).
The built-in ones:

- ``i2t``  image -> text   (``input_image`` + question in ``text``, supervised ``answer``)
- ``t2i``  text -> image   (prompt in ``text``, ``target_image``)
- ``i2i``  image -> image  (``input_image`` -> ``target_image``; the same image when the data has no pairs)
- ``ti2i`` text + image -> image (instruction in ``text``, ``input_image`` -> ``target_image``)

Images are float tensors ``[3, S, S]`` in ``[0, 1]``; an image a task does not use is all zeros with its
``has_*`` flag False, so mixed-task batches collate with torch's default collate.
"""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader


def _formatters() -> dict[str, Any]:
    from tarkit.registry import registry  # at call time: datamodule workers import this module first

    return registry.load_group("tarkit.tasks")


def task_names() -> tuple[str, ...]:
    """The registered tasks, those of the default mix first (by share), then by name."""
    formatters = _formatters()
    return tuple(sorted(formatters, key=lambda name: (-formatters[name].default_ratio, name)))


def default_task_ratios() -> dict[str, float]:
    """The default task mix: each registered task's ``default_ratio``, where positive."""
    formatters = _formatters()
    return {name: formatters[name].default_ratio for name in task_names() if formatters[name].default_ratio > 0}


def missing_fields(task: str, present: Mapping[str, bool]) -> list[str]:
    """The sample fields ``task`` needs that ``present`` (field -> whether it is there) lacks; an unknown task is a
    one-line error."""
    formatters = _formatters()
    if task not in formatters:
        raise ValueError(f"unknown task {task!r}; tasks are {', '.join(task_names())}")
    return sorted(field for field in formatters[task].needs if not present[field])


class DataWarning(UserWarning):
    """Something in the data was skipped or fixed up; training goes on."""


class DataFormatError(ValueError):
    """The data cannot be read as given (malformed file, missing field); names the file and line."""


def make_sample(
    task: str,
    image_size: int,
    text: str = "",
    answer: str = "",
    input_image: torch.Tensor | None = None,
    target_image: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The sample dict every datamodule yields (see the module docstring), checked against what its task needs."""
    given = {
        "text": bool(text),
        "answer": bool(answer),
        "input_image": input_image is not None,
        "target_image": target_image is not None,
    }
    missing = missing_fields(task, given)
    if missing:
        raise DataFormatError(f"a {task} sample needs {', '.join(missing)}")
    blank = torch.zeros(3, image_size, image_size)
    return {
        "task": task,
        "text": text,
        "answer": answer,
        "input_image": blank if input_image is None else input_image,
        "target_image": blank if target_image is None else target_image,
        "has_input_image": input_image is not None,
        "has_target_image": target_image is not None,
    }


@dataclass(frozen=True)
class TaskMix:
    """Chooses each sample's task by configurable ratios, reproducibly from ``(seed, epoch, index)``.

    Only tasks the record supports (a caption cannot make a ti2i example) and with a positive ratio are
    candidates; their ratios are renormalised.
    """

    ratios: Mapping[str, float]
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.ratios) - set(task_names())
        if unknown:
            raise ValueError(f"unknown task(s) in task_ratios: {sorted(unknown)}; tasks are {', '.join(task_names())}")
        if any(r < 0 for r in self.ratios.values()) or not any(r > 0 for r in self.ratios.values()):
            raise ValueError(f"task_ratios must be non-negative with at least one positive, got {dict(self.ratios)}")

    def choose(self, index: int, supported: Sequence[str] | None = None, epoch: int = 0) -> str:
        """A task for record ``index`` among ``supported`` (None: any), in the ratios' order (so it is stable)."""
        candidates = [t for t in self.ratios if (supported is None or t in supported) and self.ratios[t] > 0]
        if not candidates:
            tasks = "any task" if supported is None else f"tasks {list(supported)}"
            raise DataFormatError(f"record {index} supports {tasks} but task_ratios {dict(self.ratios)} enables none")
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        return rng.choices(candidates, weights=[self.ratios[t] for t in candidates])[0]


class SkipCounter:
    """Counts skipped inputs and warns once per skip with the running total (per process/worker)."""

    def __init__(self, what: str):
        self.what = what
        self.count = 0

    def skip(self, item: str, reason: BaseException | str) -> None:
        self.count += 1
        detail = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else reason
        detail = " ".join(str(detail).split())  # one line
        warnings.warn(f"{self.what}: skipped {item} ({detail}); {self.count} skipped so far", DataWarning, stacklevel=2)


class EpochDataLoader(DataLoader):
    """A DataLoader that calls ``dataset.set_epoch(n)`` when its ``n``-th pass (from 0) starts, and that a
    checkpoint resumes in the middle of a pass.

    The datasets use the epoch to vary the task mix (and the shard order) between epochs. Setting it here, in the
    main process, reaches the workers because each pass starts them anew with a copy of the dataset (so do not
    make them persistent). Each pass reseeds ``generator`` from its first seed and the pass, so a pass's order
    depends on nothing else. Lightning keeps :meth:`state_dict` (the pass, the batches it has yielded) in its
    checkpoints and hands it back on resume: the pass then starts again past those batches (a map-style
    dataset's without loading them, an iterable one's by reading through them).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.passes, self.yielded, self.finished, self._skip = 0, 0, False, 0
        self._first_seed = None if self.generator is None else self.generator.initial_seed()
        self._iterable = isinstance(self.dataset, torch.utils.data.IterableDataset)

    def state_dict(self) -> dict[str, int]:
        return {"passes": self.passes, "yielded": self.yielded, "finished": self.finished}

    def load_state_dict(self, state: dict[str, int]) -> None:
        in_a_pass = state["passes"] > 0 and not state["finished"]  # else the next pass starts from its beginning
        self.passes, self._skip = (state["passes"] - 1, state["yielded"]) if in_a_pass else (state["passes"], 0)

    @property
    def _index_sampler(self) -> Any:  # torch's iterator reads its batches' indices here, once per pass
        sampler = super()._index_sampler
        return _Skipping(sampler, self._skip) if self._skip and not self._iterable else sampler

    def __iter__(self):
        self.dataset.set_epoch(self.passes)
        if self._first_seed is not None:
            self.generator.manual_seed(self._first_seed + 1_000_003 * self.passes)
        self.passes, self.yielded, self.finished = self.passes + 1, self._skip, False
        batches = super().__iter__()
        skip, self._skip = self._skip, 0
        for _ in range(skip if self._iterable else 0):
            next(batches, None)
        for batch in batches:
            self.yielded += 1
            yield batch
        self.finished = True


class _Skipping:
    """A sampler of batch indices without its first ``skip`` batches; its length stays the whole pass's, since
    Lightning counts the resumed batches on from where they were."""

    def __init__(self, sampler: Any, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.sampler)


def sample_images(batch: dict[str, Any] | torch.Tensor) -> torch.Tensor:
    """The images of a batch: a tensor as is, or every image a tarkit sample dict carries."""
    if isinstance(batch, torch.Tensor):
        return batch
    parts = [batch["input_image"][batch["has_input_image"]], batch["target_image"][batch["has_target_image"]]]
    return torch.cat(parts)
