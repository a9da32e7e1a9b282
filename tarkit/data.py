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

import json
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision.utils import save_image


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


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: grayscale, palette, alpha (composited on white), 16/32-bit and float."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F" and array.max() <= 1.0:
            top = 1.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def load_image(source: str | Path | Any) -> Image.Image:
    """Open and fully decode an image (a path or a file object) as RGB; raises ``OSError``/``ValueError`` on
    corrupt, truncated or unsupported files so callers can skip them."""
    try:
        with Image.open(source) as image:
            image.load()  # decode now: truncated files fail here, not later in a worker
            return to_rgb(image)
    except (SyntaxError, Image.DecompressionBombError) as err:
        # Pillow reports a broken PNG chunk as SyntaxError and an absurd size (often a corrupt header) as
        # DecompressionBombError; callers skip on OSError, so neither may escape as something else.
        raise OSError(f"cannot decode image ({type(err).__name__}: {err})") from err


def image_to_tensor(image: Image.Image, size: int | None = None) -> torch.Tensor:
    """RGB PIL image -> ``[3, S, S]`` float in ``[0, 1]`` (resized with bicubic filtering when ``size`` is set)."""
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in ``[0, 1]`` -> RGB PIL image."""
    array = tensor.detach().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor

IMAGE_INPUTS = (
    "a path (str or pathlib.Path), a PIL image, a numpy array (H x W x C or H x W; uint8, or float in [0, 1]), "
    "a torch tensor ([C, H, W] or [B, C, H, W], C = 1 or 3; uint8, or float in [0, 1]) or a list of these"
)


def images_to_batch(images: ImageInput | Sequence[ImageInput], size: int) -> torch.Tensor:
    """Whatever a user passes as image(s) -> a float batch ``[B, 3, H, W]`` in ``[0, 1]``.

    Accepts :data:`IMAGE_INPUTS`. numpy arrays are read in the image libraries' layout (HWC), tensors in
    torch's (CHW); uint8 means 0-255. Grayscale becomes RGB, alpha is composited on white (as :func:`to_rgb`).
    Images that all share one size keep it, so the encoder resizes them exactly as it resized its training
    images; images of different sizes are resized to ``size`` (bicubic, antialiased) to form one batch. A float
    tensor outside ``[0, 1]`` is refused rather than guessed at: 0-255 floats and normalised tensors look alike.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"got an empty list of images; pass {IMAGE_INPUTS}")
        batches = [_image_to_batch(image, f"item {i} of the list: ") for i, image in enumerate(images)]
    else:
        batches = [_image_to_batch(images)]
    if len({tuple(batch.shape[-2:]) for batch in batches}) > 1:
        batches = [_resize(batch, size) for batch in batches]
    return torch.cat(batches)


def _resize(batch: torch.Tensor, size: int) -> torch.Tensor:
    if batch.shape[-2:] == (size, size):
        return batch
    return F.interpolate(batch, size=(size, size), mode="bicubic", antialias=True).clamp_(0, 1)


def _image_to_batch(image: Any, where: str = "") -> torch.Tensor:
    if isinstance(image, (str, os.PathLike)):
        image = _open_image(Path(image))
    if isinstance(image, Image.Image):
        return image_to_tensor(to_rgb(image))[None]
    if isinstance(image, np.ndarray):
        return _array_to_batch(image)
    if isinstance(image, torch.Tensor):
        return _tensor_to_batch(image)
    raise TypeError(f"{where}cannot read a {type(image).__name__} as an image; pass {IMAGE_INPUTS}")


def _open_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        return load_image(path)
    except OSError as err:
        raise OSError(f"cannot read image {path}: {' '.join(str(err).split())}") from err


def _array_to_batch(array: np.ndarray) -> torch.Tensor:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"expected a numpy image H x W or H x W x C (C = 1, 3 or 4), got shape {array.shape}")
    if array.dtype == np.uint8:  # PIL reads every such layout, alpha included
        return image_to_tensor(to_rgb(Image.fromarray(array.squeeze(2) if array.shape[-1] == 1 else array)))[None]
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"numpy images must be uint8 (0-255) or float in [0, 1], got {array.dtype}")
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return _tensor_to_batch(tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1))


def _tensor_to_batch(tensor: torch.Tensor) -> torch.Tensor:
    batch = tensor[None] if tensor.ndim == 3 else tensor
    if batch.ndim != 4 or batch.shape[1] not in (1, 3) or batch.shape[2] == 0 or batch.shape[3] == 0:
        shape = tuple(tensor.shape)
        raise ValueError(f"expected an image tensor [C, H, W] or [B, C, H, W] with C = 1 or 3, got {shape}")
    if batch.dtype == torch.uint8:
        batch = batch.float() / 255
    elif batch.is_floating_point():
        if not ((batch >= 0) & (batch <= 1)).all():  # NaN fails this too
            low, high = batch.min().item(), batch.max().item()
            raise ValueError(
                f"a float image must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
                "divide 0-255 values by 255 (or pass uint8), undo any normalisation"
            )
        batch = batch.float()
    else:
        raise TypeError(f"image tensors must be uint8 (0-255) or float in [0, 1], got {batch.dtype}")
    return batch.expand(-1, 3, -1, -1)


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


def iter_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of a JSONL file, so callers checking more than ``required`` can name the line too;
    blank lines skipped; a malformed line (JSON or UTF-8) or a missing field names file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    with path.open("rb") as handle:  # decoded line by line, so bad UTF-8 is reported with its line
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(f"{path}:{number}: not UTF-8 ({err.reason}); save the file as UTF-8") from err
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}:{number}: not valid JSON ({err.msg}); fix or remove the line") from err
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            missing = [key for key in required if key not in row]
            if missing:
                raise DataFormatError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
            yield number, row


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows of a JSONL file; blank lines skipped; a malformed line or a missing field names file and line."""
    return [row for _, row in iter_jsonl(path, required)]


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


class EpochDataLoader(DataLoader):
    """A DataLoader that calls ``dataset.set_epoch(n)`` when its ``n``-th pass (from 0) starts.

    The datasets use the epoch to vary the task mix (and the shard order) between epochs. Setting it here, in the
    main process, reaches the workers because each pass starts them anew with a copy of the dataset (so do not
    make them persistent). A run resumed from a checkpoint counts from 0 again: its mix stays balanced, it just
    differs from the uninterrupted run's.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.passes = 0

    def __iter__(self):
        self.dataset.set_epoch(self.passes)
        self.passes += 1
        return super().__iter__()


def sample_images(batch: dict[str, Any] | torch.Tensor) -> torch.Tensor:
    """The images of a batch: a tensor as is, or every image a tarkit sample dict carries."""
    if isinstance(batch, torch.Tensor):
        return batch
    parts = [batch["input_image"][batch["has_input_image"]], batch["target_image"][batch["has_target_image"]]]
    return torch.cat(parts)


def save_comparison_grid(root: str | Path, step: int, originals: torch.Tensor, redrawn: torch.Tensor) -> Path:
    """Originals (top row) over their reconstructions (bottom row) as ``<root>/samples/step_NNNNNN.png``."""
    path = Path(root) / "samples" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat([originals, redrawn]).float().cpu(), path, nrow=len(originals))
    return path
