"""A minimal third-party tarkit plugin, registered by entry points: a LightningModule and a datamodule, and a fifth
LM task (``t2t``, text questions answered in text) with a datamodule that makes its samples."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, TensorDataset

from tarkit.data import make_sample
from tarkit.interfaces import CodebookProjection, TaskFormatter


class ExampleRegressor(LightningModule):
    """Regresses random inputs onto the first code of an injected codebook (any `tarkit.codebooks` part)."""

    def __init__(self, codebook: CodebookProjection, lr: float = 0.01):
        super().__init__()
        self.codebook = codebook
        self.lr = lr
        self.head = torch.nn.Linear(codebook.dim, codebook.dim)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        target = self.codebook()[0].detach().expand_as(x)
        loss = torch.nn.functional.mse_loss(self.head(x), target)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.training_step(batch, batch_idx))

    def predict_step(self, batch, batch_idx):
        return self.head(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ExampleRandomData(LightningDataModule):
    """Random feature vectors of width `dim`."""

    def __init__(self, num_samples: int = 16, dim: int = 8, batch_size: int = 4):
        super().__init__()
        self.num_samples, self.dim, self.batch_size = num_samples, dim, batch_size

    def _loader(self) -> DataLoader:
        data = torch.randn(self.num_samples, self.dim, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(data), batch_size=self.batch_size)

    train_dataloader = val_dataloader = predict_dataloader = _loader


class TextToText(TaskFormatter):
    """t2t: a question in the user turn, its answer supervised; no image."""

    name = "t2t"
    needs = frozenset({"text", "answer"})

    def user(self, sample, vocab):
        return [sample["text"]]


class ExampleQAData(LightningDataModule):
    """Arithmetic questions as ``t2t`` samples (images blank, as every tarkit sample batch carries them)."""

    def __init__(self, num_samples: int = 8, batch_size: int = 4, image_size: int = 48):
        super().__init__()
        self.num_samples, self.batch_size, self.image_size = num_samples, batch_size, image_size

    def _loader(self) -> DataLoader:
        samples = [
            make_sample("t2t", self.image_size, text=f"What is {i} plus {i}?", answer=str(2 * i))
            for i in range(self.num_samples)
        ]
        return DataLoader(samples, batch_size=self.batch_size)

    train_dataloader = val_dataloader = _loader
