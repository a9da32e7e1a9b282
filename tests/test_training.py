"""TarkitModule: the optimiser and schedule, frozen parts, the export at fit end, the scale draw and the grid."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tarkit.pretrained import PretrainedMixin
from tarkit.training import TarkitModule


class TinyModel(PretrainedMixin, nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(x))


class TinyModule(TarkitModule):
    def __init__(
        self,
        lr: float = 0.1,
        weight_decay: float = 0.0,
        warmup_steps: int | None = 2,
        export_dir: str | None = None,
        sample_every_n_steps: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = TinyModel()
        self.frozen = TinyModel().requires_grad_(False)
        self.setup_scale_draw([1, 1, 2, 3], seed=0)
        self.modes: list[tuple[bool, bool]] = []

    def frozen_parts(self) -> list[nn.Module]:
        return [self.frozen]

    def exported_model(self) -> TinyModel:
        return self.model

    def redraw(self, images: torch.Tensor) -> torch.Tensor:
        return images.flip(-1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        self.maybe_write_sample_grid(x[:, :3].sigmoid()[:, :, None, None].expand(-1, -1, 8, 8))
        self.modes.append((self.model.training, self.frozen.training))  # after a grid too: back in training
        loss = (self.model(x) - self.frozen(x)).pow(2).mean()
        self.log_metrics("train", {"loss": loss}, len(x))
        return loss


def fit(module: TarkitModule, tmp_path: Path, steps: int = 4) -> Trainer:
    data = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4)
    trainer = Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    return trainer


def test_frozen_parts_stay_in_eval_mode_and_out_of_the_optimiser():
    module = TinyModule().train()
    assert module.model.training and not module.frozen.training
    assert {id(p) for p in module.trainable_parameters()} == {id(p) for p in module.model.parameters()}


def test_fit_warms_up_then_decays_and_exports_the_model(tmp_path):
    module = TinyModule(export_dir=str(tmp_path / "export"), warmup_steps=2)
    trainer = fit(module, tmp_path)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.get_last_lr()[0] < 0.1  # the cosine has started to decay
    reloaded = TinyModel.from_pretrained(tmp_path / "export")
    assert torch.equal(reloaded.linear.weight, module.model.linear.weight)


def test_without_warmup_steps_the_rate_is_constant(tmp_path):
    trainer = fit(TinyModule(warmup_steps=None), tmp_path)
    assert not trainer.lr_scheduler_configs
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.1


def test_a_module_with_nothing_to_train_is_a_clear_error(tmp_path):
    module = TinyModule()
    module.model.requires_grad_(False)
    with pytest.raises(ValueError, match="TinyModule has no trainable parameters"):
        fit(module, tmp_path)


def test_the_scale_draw_is_a_function_of_the_seed_and_the_step():
    first, second = TinyModule(), TinyModule()
    draws = [first.draw_scale(step) for step in range(20)]
    assert set(draws) == {1, 2, 3}
    # a module resumed at step 12 (or another rank) draws what the uninterrupted one draws from there
    assert [second.draw_scale(step) for step in range(12, 20)] == draws[12:]
    assert first.draw_scale() == draws[0]  # no trainer yet: step 0


def test_the_sample_grid_is_written_on_schedule_and_keeps_the_training_mode(tmp_path):
    module = TinyModule(sample_every_n_steps=2)
    fit(module, tmp_path, steps=3)
    assert module.modes == [(True, False)] * 3
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000000.png", "step_000002.png"]
