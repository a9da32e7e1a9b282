"""Images in and out: any PIL mode to RGB, files decoded strictly, tensors to images and back.

Images inside tarkit are float tensors ``[3, H, W]`` (batches ``[B, 3, H, W]``) in ``[0, 1]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
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


def save_comparison_grid(root: str | Path, step: int, originals: torch.Tensor, redrawn: torch.Tensor) -> Path:
    """Originals (top row) over their reconstructions (bottom row) as ``<root>/samples/step_NNNNNN.png``."""
    path = Path(root) / "samples" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat([originals, redrawn]).float().cpu(), path, nrow=len(originals))
    return path
