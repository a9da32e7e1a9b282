"""Training a :class:`~tarkit_plugins.detok.pixel_vq.PixelVQ` on the images of any tarkit datamodule."""

from __future__ import annotations

from typing import Any

import torch

from tarkit.data import sample_images
from tarkit.training import TarkitModule
from tarkit_plugins.detok.pixel_vq import PixelVQ
from tarkit_plugins.evaluation import psnr


class PixelVQModule(TarkitModule):
    """Trains a :class:`PixelVQ` on the images of any tarkit datamodule (group ``tarkit.modules``).

    Logs the loss terms, PSNR and codebook usage (``usage``: share of codes a batch uses; ``val/usage_epoch``:
    share used over the whole validation set); every ``sample_every_n_steps`` steps writes a grid of originals
    over their reconstructions to ``<default_root_dir>/samples/step_NNNNNN.png``; exports the model as a folder
    to ``export_dir`` at the end of fit.

    Args:
        preset: :class:`PixelVQ` preset (``tiny``, ``vq-16``).
        config: :class:`PixelVQConfig` overrides (architecture and loss weights).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before cosine decay to 10% over the run.
        sample_every_n_steps: how often the reconstruction grid is written (0: never).
        num_samples: images in that grid.
        export_dir: where the trained VQ is saved as a folder at the end of fit.
    """

    def __init__(
        self,
        preset: str | None = "tiny",
        config: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 50,
        sample_every_n_steps: int = 200,
        num_samples: int = 8,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.vq = PixelVQ(preset, config)
        self._val_counts: torch.Tensor | None = None

    def shared_step(self, images: torch.Tensor, stage: str) -> torch.Tensor:
        reconstruction, losses = self.vq(images)
        self.log_metrics(stage, losses, len(images))
        self.log(f"{stage}/psnr", psnr(reconstruction.detach(), images), prog_bar=True, batch_size=len(images))
        return losses["loss"]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = sample_images(batch)
        self.maybe_write_sample_grid(images)
        return self.shared_step(images, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images = sample_images(batch)
        self.shared_step(images, "val")
        indices = self.vq.encode_indices(images)
        counts = torch.bincount(indices.flatten(), minlength=self.vq.codebook_size)
        self._val_counts = counts if self._val_counts is None else self._val_counts + counts

    def on_validation_epoch_end(self) -> None:
        if self._val_counts is not None:
            self.log("val/usage_epoch", (self._val_counts > 0).float().mean())
            self._val_counts = None

    def redraw(self, images: torch.Tensor) -> torch.Tensor:
        return self.vq.decode_indices(self.vq.encode_indices(images))

    def exported_model(self) -> PixelVQ:
        return self.vq
