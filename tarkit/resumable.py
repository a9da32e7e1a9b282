"""What a killed run needs to go on as if it had never stopped: files written whole or not at all (Lightning
moves a checkpoint from the system's temporary folder, a copy a kill can cut in half where that is another
filesystem; :func:`atomic_write` renames beside the target), and randomness that does not depend on the run's
history (Lightning's checkpoints carry no random state; :class:`StepSeeds`).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write ``path.partial``, flush it to disk and rename it over ``path``: an error or a kill leaves ``path``
    as it was (at worst with a ``.partial`` beside it, never read)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with local saves through :func:`atomic_write` (remote URLs: Lightning's own)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as handle:
            torch.save(checkpoint, handle)


class StepSeeds(Callback):
    """Seeds torch (every device), numpy and Python's ``random`` before each training batch from the run's seed
    (``seed_everything``), the epoch, the batch's index and the process's rank: a step's draws (dropout,
    stochastic quantization, noise) depend on nothing that ran before it, so a run resumed from any checkpoint
    draws what the uninterrupted run drew, whatever validation ran in between. Ranks draw apart."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        run_seed = int(os.environ.get("PL_GLOBAL_SEED", "0")) % 2**32
        key = [run_seed, trainer.current_epoch, batch_idx, trainer.global_rank]
        seed = int(np.random.SeedSequence(key).generate_state(1)[0])
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
