"""``TATokModule``: trains TA-Tok to reconstruct its frozen teacher's features through text-aligned codes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from tarkit.data import sample_images
from tarkit.interfaces import CodebookProjection, Quantizer, VisionEncoder
from tarkit.tatok import TATok, pool_tokens
from tarkit.training import TarkitModule
from tarkit_plugins.prediction_files import ResumableJsonl, report_skipped

RECON_LOSSES = ("cosine", "mse", "cosine+mse")


class TATokModule(TarkitModule):
    """TA-Tok training (group ``tarkit.modules``).

    Loss: ``recon_loss`` between decoded and teacher features at the batch's pool scale plus the quantizer's
    loss. ``cosine`` is ``1 - cos`` per token (direction is what the LLM-side codes must keep; the paper
    distils features), ``mse`` the mean squared error, ``cosine+mse`` their sum. The teacher is the encoder's
    initial weights, frozen: with ``train_encoder=False`` (default, cheapest) the encoder itself is frozen and
    its features are computed once per batch for both the codes and the target; with ``True`` a frozen copy
    provides the target while the encoder learns.

    Args:
        encoder: vision tower, initialised from the semantic teacher (``tarkit.encoders``).
        codebook: ``text_aligned`` (TA-Tok) or ``learned`` (ablation) (``tarkit.codebooks``).
        quantizer: e.g. ``simvq`` (``tarkit.quantizers``).
        pool_scales: scales the tokenizer serves (paper 1, 2, 3).
        train_scales: one is drawn per training batch (paper ``[1, 1, 2, 3]``: full resolution twice as often).
        decoder_depth: feature-decoder blocks.
        decoder_config: ``Siglip2VisionConfig`` overrides for the decoder.
        recon_loss: ``cosine``, ``mse`` or ``cosine+mse``.
        train_encoder: fine-tune the encoder against a frozen teacher copy.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before cosine decay to 10% over the run.
        predict_scale: pool scale used by ``predict``.
        predict_dir: where ``predict`` writes ``tokens.jsonl`` (one row of code indices per image).
        export_dir: where the trained tokenizer is saved as a folder at the end of fit.
        seed: seeds the per-batch scale draw.
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        codebook: CodebookProjection,
        quantizer: Quantizer,
        pool_scales: list[int] | None = None,
        train_scales: list[int] | None = None,
        decoder_depth: int = 3,
        decoder_config: dict[str, Any] | None = None,
        recon_loss: str = "cosine",
        train_encoder: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 50,
        predict_scale: int = 1,
        predict_dir: str = "outputs/tatok_predict",
        export_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {', '.join(RECON_LOSSES)}, got {recon_loss!r}")
        self.save_hyperparameters(ignore=["encoder", "codebook", "quantizer"])
        self.tokenizer = TATok(encoder, codebook, quantizer, pool_scales, decoder_depth, decoder_config)
        self.setup_scale_draw(train_scales or self.tokenizer.pool_scales, seed)
        for scale in {*self.train_scales, predict_scale}:
            self.tokenizer.check_scale(scale)
        self.teacher = copy.deepcopy(encoder).requires_grad_(False).eval() if train_encoder else None
        if not train_encoder:
            encoder.requires_grad_(False)
        self._predict_rows: list[dict[str, Any]] = []

    def frozen_parts(self) -> list[torch.nn.Module]:
        frozen = [] if self.teacher is None else [self.teacher]
        return frozen if self.hparams.train_encoder else [*frozen, self.tokenizer.encoder]

    def reconstruction_loss(self, predicted: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cosine = F.cosine_similarity(predicted, target, dim=-1).mean()
        loss = predicted.new_zeros(())
        if "cosine" in self.hparams.recon_loss:
            loss = loss + (1 - cosine)
        if "mse" in self.hparams.recon_loss:
            loss = loss + F.mse_loss(predicted, target)
        return loss, cosine

    def shared_step(self, images: torch.Tensor, scale: int, stage: str) -> torch.Tensor:
        tok = self.tokenizer
        if self.teacher is None:
            with torch.no_grad():
                features = tok.encoder(images)
            target = pool_tokens(features, scale)
            encoding = tok.encode(images, scale, features=features)
        else:
            with torch.no_grad():
                target = pool_tokens(self.teacher(images), scale)
            encoding = tok.encode(images, scale)
        predicted = tok.decode_latent(encoding.latent)
        recon, cosine = self.reconstruction_loss(predicted, target)
        loss = recon + encoding.loss
        batch_size = len(images)
        suffix = f"_s{scale}" if stage != "train" else ""
        self.log(f"{stage}/loss{suffix}", loss, prog_bar=stage == "train", batch_size=batch_size)
        self.log(f"{stage}/recon_cosine{suffix}", cosine, prog_bar=True, batch_size=batch_size)
        self.log(f"{stage}/vq_loss{suffix}", encoding.loss, batch_size=batch_size)
        for name, value in encoding.metrics.items():
            self.log(f"{stage}/{name}{suffix}", value, batch_size=batch_size)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.shared_step(sample_images(batch), self.draw_scale(), "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images = sample_images(batch)
        for scale in self.tokenizer.pool_scales:
            self.shared_step(images, scale, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        images = sample_images(batch)
        for scale in self.tokenizer.pool_scales:
            self.shared_step(images, scale, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        """The codes of each image, a ``tokens.jsonl`` row per image (its position in the predict data), appended
        with each batch; rows an interrupted earlier run into ``predict_dir`` wrote are kept and not redone."""
        images = sample_images(batch)
        positions = range(self._predicted, self._predicted + len(images))
        self._predicted += len(images)
        todo = [i for i, position in enumerate(positions) if position not in self._tokens.done]
        self._skipped += len(images) - len(todo)
        if not todo:
            return None
        indices = self.tokenizer.tokenize(images[todo], self.hparams.predict_scale)
        self._tokens.append(
            {"image": positions[i], "scale": self.hparams.predict_scale, "indices": row}
            for i, row in zip(todo, indices.tolist(), strict=True)
        )
        return indices

    def on_predict_epoch_start(self) -> None:
        self._tokens = ResumableJsonl(Path(self.hparams.predict_dir) / "tokens.jsonl", key="image")
        self._predicted = self._skipped = 0

    def on_predict_epoch_end(self) -> None:
        report_skipped(self._skipped, self.hparams.predict_dir)

    def exported_model(self) -> TATok:
        return self.tokenizer
