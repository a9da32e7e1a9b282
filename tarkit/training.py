"""The base of tarkit's training modules: what every built-in LightningModule shares, written once. A third-party
module may still be a plain ``LightningModule``; one built on :class:`TarkitModule` gets, from its hyperparameters and
a few hooks:

* AdamW over :meth:`~TarkitModule.trainable_parameters` (``lr``, ``weight_decay``), with a per-step linear warm-up and
  cosine decay when it has ``warmup_steps`` (a constant rate without);
* the export at the end of fit to ``export_dir`` (:meth:`~TarkitModule.export`: by default the ``save_pretrained`` of
  :meth:`~TarkitModule.exported_model`) by the global-zero process, under FSDP from the parameters gathered whole;
* frozen parts (:meth:`~TarkitModule.frozen_parts`) kept in eval mode whatever ``train()`` is called with;
* its ``nn.Linear`` layers run through :mod:`tarkit.cpu_linear` (from ``setup``: faster kernels on CPU in fp32);
* one way to load a frozen TA-Tok (a tarkit folder or any file a converter reads, :func:`tarkit.tatok.load_tatok`);
* a seeded pool-scale draw per step (:meth:`~TarkitModule.draw_scale`);
* metric logging under ``<stage>/`` and the originals-over-redrawn image grid every ``sample_every_n_steps``.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from tarkit.cpu_linear import use_cpu_linears
from tarkit.optim import adamw_warmup_cosine
from tarkit.run_logging import log_comparison_grid
from tarkit.tatok import TATok, load_tatok


class TarkitModule(LightningModule):
    """A LightningModule with tarkit's shared training machinery (see the module docstring)."""

    def frozen_parts(self) -> list[nn.Module]:
        """Parts that never train: kept in eval mode (no dropout, fixed statistics)."""
        return []

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates; by default every parameter that requires a gradient."""
        return [p for p in self.parameters() if p.requires_grad]

    def exported_model(self) -> Any:
        """The model :meth:`export` saves with ``save_pretrained``; override one of the two."""
        raise NotImplementedError(f"{type(self).__name__} defines neither exported_model() nor export()")

    def export(self, folder: str | Path) -> Path:
        """Save the trained model as a folder (``config.json`` + weights) and return it."""
        self.exported_model().save_pretrained(folder)
        return Path(folder)

    def setup(self, stage: str) -> None:
        use_cpu_linears(self)  # fp32 on CPU: the faster kernels (tarkit.cpu_linear); elsewhere F.linear as before

    def train(self, mode: bool = True) -> TarkitModule:
        super().train(mode)
        for part in self.frozen_parts():
            part.eval()
        return self

    def configure_optimizers(self) -> Any:
        hp, steps, owner = self.hparams, self.trainer.estimated_stepping_batches, type(self).__name__
        return adamw_warmup_cosine(
            self.trainable_parameters(), hp.lr, hp.weight_decay, hp.get("warmup_steps"), steps, owner=owner
        )

    def on_fit_end(self) -> None:
        folder, strategy = self.hparams.get("export_dir"), self.trainer.strategy
        # FSDP shards every parameter: all ranks gather them whole onto rank 0 (views of one buffer: saved as copies)
        sharded = folder and isinstance(strategy, FSDPStrategy)
        with FSDP.summon_full_params(strategy.model, writeback=False, rank0_only=True) if sharded else nullcontext():
            if folder and self.trainer.is_global_zero:
                for param in self.parameters() if sharded else ():
                    param.data = param.data.clone()
                self.export(folder)

    @staticmethod
    def load_frozen_tatok(path: str) -> TATok:
        """A TA-Tok folder or file (the reference's ``ta_tok.pth`` too), frozen and in eval mode."""
        return load_tatok(path).tatok.requires_grad_(False).eval()

    def setup_scale_draw(self, train_scales: list[int], seed: int) -> None:
        """The scales :meth:`draw_scale` draws from, one per optimizer step, a function of ``seed`` and the step:
        the same on every rank, and the same after resuming from a checkpoint."""
        self.train_scales, self._scale_seed = list(train_scales), seed

    def draw_scale(self, step: int | None = None) -> int:
        """The pool scale of optimizer step ``step`` (None: the current one, ``global_step``)."""
        step = self.global_step if step is None else step
        return random.Random(f"{self._scale_seed}/{step}").choice(self.train_scales)

    def log_metrics(self, stage: str, metrics: dict[str, torch.Tensor], batch_size: int) -> None:
        """Each metric as ``<stage>/<name>``; ``loss`` also on the progress bar."""
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "loss", batch_size=batch_size)

    def redraw(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[0, 1]`` redrawn by the model, for the sample grid; modules with a grid override it."""
        raise NotImplementedError(f"{type(self).__name__} draws no sample grid")

    @torch.no_grad()
    def write_sample_grid(self, images: torch.Tensor) -> Path | None:
        """Originals over their :meth:`redraw` as one PNG under ``<default_root_dir>/samples/`` (and TensorBoard),
        written by rank 0; every rank redraws, as FSDP's sharded parts gather their parameters in lockstep."""
        was_training = self.training
        self.eval()
        redrawn, _ = self.redraw(images), self.train(was_training)
        return log_comparison_grid(self.trainer, images, redrawn) if self.trainer.is_global_zero else None

    def maybe_write_sample_grid(self, images: torch.Tensor) -> None:
        """:meth:`write_sample_grid` of the first ``num_samples`` images every ``sample_every_n_steps`` steps."""
        every = self.hparams.get("sample_every_n_steps")
        if every and self.global_step % every == 0:
            self.write_sample_grid(images[: self.hparams.get("num_samples", 8)])
