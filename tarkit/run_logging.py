"""What every ``tarkit fit`` records unless its recipe says otherwise: curves, throughput, a checkpoint.

A recipe that leaves ``trainer.logger`` at its default gets a CSV log (``<run>/csv/version_N/metrics.csv``)
and, where ``tensorboard`` is installed, a TensorBoard log (``<run>/tensorboard/version_N``), ``<run>``
being the trainer's ``default_root_dir``. Every logged run also logs its learning rate and throughput. A
recipe that keeps checkpointing on and names no ``ModelCheckpoint`` gets one writing ``<run>/checkpoints``
(``last.ckpt``, every 100 steps and at the end), so ``--ckpt_path=last`` resumes it
whatever version its logs are at.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.tensorboard import _TENSORBOARD_AVAILABLE
from torchvision.utils import make_grid

from tarkit.images import save_comparison_grid


def default_loggers(run_dir: str) -> list[Logger]:
    """CSV, plus TensorBoard when it is installed, both under ``run_dir``."""
    loggers: list[Logger] = [CSVLogger(run_dir, name="csv")]
    if _TENSORBOARD_AVAILABLE:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", default_hp_metric=False))
    return loggers


def batch_size(batch: Any) -> int | None:
    """The number of examples in a batch: the leading size of its first tensor (dicts, lists and tuples)."""
    if isinstance(batch, torch.Tensor):
        return len(batch) if batch.ndim else None
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        size = batch_size(value)
        if size is not None:
            return size
    return None


class ThroughputLogger(Callback):
    """Logs ``train/samples_per_sec`` and ``train/seconds_per_step``, measured from one step's end to the
    next (data loading included, which is what a user waits for)."""

    def __init__(self) -> None:
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last = None  # the gap across validation and epoch ends is not a training step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None:
            seconds = now - self._last
            size = batch_size(batch) or 1
            pl_module.log("train/seconds_per_step", seconds, on_step=True, on_epoch=False, batch_size=size)
            pl_module.log("train/samples_per_sec", size / seconds, on_step=True, on_epoch=False, batch_size=size)
        self._last = now


def default_callbacks() -> list[Callback]:
    """Learning rate (per step) and throughput."""
    return [LearningRateMonitor(logging_interval="step"), ThroughputLogger()]


def default_checkpoint(run_dir: str, every: int = 100) -> ModelCheckpoint:
    """``run_dir/checkpoints/last.ckpt`` alone, rewritten whole (AtomicCheckpointIO) every ``every`` steps and at the
    end: a link to a step file is removed and made again on each save, which a kill could leave undone."""
    return ModelCheckpoint(f"{run_dir}/checkpoints", save_last=True, save_top_k=0, every_n_train_steps=every)


def log_comparison_grid(trainer: Trainer, originals: torch.Tensor, redrawn: torch.Tensor) -> Path:
    """Originals over their reconstructions: a PNG under ``<run>/samples/`` (:func:`tarkit.images.save_comparison_grid`)
    and, where the run logs to TensorBoard, an image ``samples`` at the current step."""
    path = save_comparison_grid(trainer.default_root_dir, trainer.global_step, originals, redrawn)
    grid = make_grid(torch.cat([originals, redrawn]).float().cpu().clamp(0, 1), nrow=len(originals))
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image("samples", grid, trainer.global_step)
    return path
