"""``DeTokenizerModule``: trains any de-tokenizer to draw images back from a frozen TA-Tok's decoded features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from tarkit.data import sample_images
from tarkit.images import tensor_to_image
from tarkit.interfaces import DeTokenizer
from tarkit.training import TarkitModule
from tarkit_plugins.detok.autoencoder import MMAutoEncoder
from tarkit_plugins.evaluation import psnr
from tarkit_plugins.prediction_files import report_skipped, save_image


class DeTokenizerModule(TarkitModule):
    """De-tokenizer training (group ``tarkit.modules``), the same for every kind: swap ``detokenizer`` in a recipe.

    Each batch draws a pool scale from ``train_scales``; its images are tokenized by the frozen TA-Tok and
    decoded to teacher-like features, which condition ``detokenizer.loss``. Validation logs the loss and,
    on its first batch, the PSNR of images sampled from the codes (the round trip the de-tokenizer serves).
    Every ``sample_every_n_steps`` training steps a grid (originals over reconstructions) is written to
    ``<default_root_dir>/samples/``. ``predict`` over images writes their reconstructions as PNGs.

    Args:
        detokenizer: the de-tokenizer to train (``tarkit.detokenizers``), e.g. ``ar`` or ``diffusion``.
        tatok: the TA-Tok (a folder, or the reference's ``ta_tok.pth``) whose codes it learns to draw (frozen).
        train_scales: pool scales drawn per batch (paper ``[1, 1, 2, 3]``).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps, then cosine decay.
        sample_every_n_steps: training steps between reconstruction grids (0: never).
        num_samples: images in each grid and in the validation PSNR.
        cfg_scale: guidance used when sampling for grids, validation and predict.
        sampling: further sampling arguments of the de-tokenizer (e.g. ``num_steps``, ``temperature``).
        export_dir: where the trained de-tokenizer is saved as a folder at the end of fit.
        predict_dir: where ``predict`` writes ``<id>.png`` reconstructions.
        predict_scale: pool scale used for validation PSNR and ``predict``.
        seed: seeds the per-batch scale draw and sampling.
    """

    def __init__(
        self,
        detokenizer: DeTokenizer,
        tatok: str,
        train_scales: list[int] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 50,
        sample_every_n_steps: int = 200,
        num_samples: int = 8,
        cfg_scale: float = 1.0,
        sampling: dict[str, Any] | None = None,
        export_dir: str | None = None,
        predict_dir: str = "outputs/detok_predict",
        predict_scale: int = 1,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["detokenizer"])
        self.tatok = self.load_frozen_tatok(tatok)
        self.detokenizer = detokenizer
        self.setup_scale_draw([self.tatok.check_scale(s) for s in (train_scales or [1, 1, 2, 3])], seed)
        self.tatok.check_scale(predict_scale)
        # Fails early, with the widths named, if the de-tokenizer was configured for another TA-Tok.
        self.autoencoder = MMAutoEncoder(self.tatok, detokenizer, predict_scale, cfg_scale, **(sampling or {}))
        # MMAutoEncoder puts its parts in eval mode for inference, and Lightning keeps the modes it finds at fit
        # start: without this the de-tokenizer would train with condition dropout off.
        detokenizer.train()

    def frozen_parts(self) -> list[torch.nn.Module]:
        return [self.tatok]  # deterministic codes

    def images(self, batch: dict[str, Any] | torch.Tensor) -> torch.Tensor:
        """The batch's images at the de-tokenizer's resolution."""
        images = sample_images(batch)
        size = self.detokenizer.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        return images

    @torch.no_grad()
    def condition(self, images: torch.Tensor, scale: int) -> torch.Tensor:
        return self.tatok.decode_features(self.tatok.tokenize(images, scale))

    def generator(self) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(self.hparams.seed)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = self.images(batch)
        out = self.detokenizer.loss(self.condition(images, self.draw_scale()), images)
        self.log_metrics("train", out, len(images))
        self.maybe_write_sample_grid(images)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = self.images(batch)
        out = self.detokenizer.loss(self.condition(images, self.hparams.predict_scale), images)
        self.log("val/loss", out["loss"], prog_bar=True, batch_size=len(images))
        if batch_idx == 0:
            originals = images[: self.hparams.num_samples]
            self.log("val/psnr", psnr(self.redraw(originals), originals), prog_bar=True, batch_size=len(originals))

    def redraw(self, images: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.reconstruct(images, generator=self.generator()).float() / 255

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Reconstructs each image of a ``prompts`` batch over an image folder as ``<predict_dir>/<id>.png``, each
        written whole; an image already there (an interrupted earlier run into the folder) is not redrawn."""
        images = batch["image"] if isinstance(batch, dict) and "image" in batch else sample_images(batch)
        out = Path(self.hparams.predict_dir)
        ids = batch.get("id") if isinstance(batch, dict) else None
        paths = [out / f"{ids[i] if ids is not None else f'{batch_idx:05d}_{i:03d}'}.png" for i in range(len(images))]
        todo = [i for i, path in enumerate(paths) if not path.is_file()]
        self._skipped += len(paths) - len(todo)
        if not todo:
            return
        out.mkdir(parents=True, exist_ok=True)
        for i, image in zip(todo, self.redraw(images[todo].to(self.device)), strict=True):
            save_image(tensor_to_image(image), paths[i])

    def on_predict_epoch_start(self) -> None:
        self._skipped = 0

    def on_predict_epoch_end(self) -> None:
        report_skipped(self._skipped, self.hparams.predict_dir)

    def exported_model(self) -> DeTokenizer:
        return self.detokenizer
