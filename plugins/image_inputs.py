"""What users pass as images to the pipelines (paths, PIL images, numpy arrays, tensors, lists of these) as one
float batch ``[B, 3, H, W]`` in ``[0, 1]``; anything else is refused in one line that says what is accepted."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from tarkit.images import image_to_tensor, load_image, to_rgb

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
    images; images of different sizes are resized to ``size`` (bicubic, antialiased) to form one batch. A PIL
    image over twice ``size`` is first shrunk by an integer factor (box filter) to no less than that. A float
    tensor outside ``[0, 1]`` is refused rather than guessed at: 0-255 floats and normalised tensors look alike.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"got an empty list of images; pass {IMAGE_INPUTS}")
        batches = [_image_to_batch(image, size, f"item {i} of the list: ") for i, image in enumerate(images)]
    else:
        batches = [_image_to_batch(images, size)]
    if len({tuple(batch.shape[-2:]) for batch in batches}) > 1:
        batches = [_resize(batch, size) for batch in batches]
    return torch.cat(batches)


def _resize(batch: torch.Tensor, size: int) -> torch.Tensor:
    if batch.shape[-2:] == (size, size):
        return batch
    return F.interpolate(batch, size=(size, size), mode="bicubic", antialias=True).clamp_(0, 1)


def _image_to_batch(image: Any, size: int, where: str = "") -> torch.Tensor:
    if isinstance(image, (str, os.PathLike)):
        image = _open_image(Path(image))
    if isinstance(image, Image.Image):
        factor = max(min(image.size) // (2 * size), 1)  # an 8000-pixel photo as floats: GBs the encoder drops
        return image_to_tensor(to_rgb(image).reduce(factor))[None]
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
        detail = " ".join(str(err).split())
        raise OSError(f"cannot read image {path}: {detail}; pass an intact image file (PNG, JPEG, WebP, ...)") from err


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
