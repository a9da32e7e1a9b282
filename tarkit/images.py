"""Images in and out: any PIL mode to RGB, files decoded strictly, tensors and the many forms users pass.

Images inside tarkit are float tensors ``[3, H, W]`` (batches ``[B, 3, H, W]``) in ``[0, 1]``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision.utils import save_image


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


def save_comparison_grid(root: str | Path, step: int, originals: torch.Tensor, redrawn: torch.Tensor) -> Path:
    """Originals (top row) over their reconstructions (bottom row) as ``<root>/samples/step_NNNNNN.png``."""
    path = Path(root) / "samples" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat([originals, redrawn]).float().cpu(), path, nrow=len(originals))
    return path
