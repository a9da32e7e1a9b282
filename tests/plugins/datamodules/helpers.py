"""Shared by the datamodule tests: what every sample must look like, and a short Lightning fit."""

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer

SIZE = 8

# The images each task fills in (the other one is all zeros with its flag False).
TASK_IMAGES = {"i2t": (True, False), "t2i": (False, True), "i2i": (True, True), "ti2i": (True, True)}


def assert_valid_sample(sample, size=SIZE):
    assert sample["task"] in TASK_IMAGES
    assert isinstance(sample["text"], str) and isinstance(sample["answer"], str)
    assert (bool(sample["has_input_image"]), bool(sample["has_target_image"])) == TASK_IMAGES[sample["task"]]
    for key in ("input_image", "target_image"):
        image = sample[key]
        assert image.shape == (3, size, size) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0


class TaskRecorder(LightningModule):
    """Trains one weight on the images' mean and records the task of every sample it sees."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tasks = []

    def training_step(self, batch, batch_idx):
        self.tasks.extend(batch["task"])
        return (self.weight - batch["input_image"].mean()).pow(2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(datamodule: LightningDataModule, epochs: int = 2) -> list[str]:
    """Fit ``epochs`` epochs on CPU with nothing written; the tasks of the samples trained on."""
    module = TaskRecorder()
    trainer = Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=datamodule)
    return module.tasks
