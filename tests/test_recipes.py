"""Every recipe parses (litgpt's config-hub test): full recipes alone, ablation variants and fine-tuning layers
layered on their base."""

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser

from tarkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
FULL = sorted(p for p in RECIPES.rglob("*.yaml") if not {"ablations", "finetune"} & set(p.parts))
FINETUNE = sorted((RECIPES / "finetune").glob("*.yaml"))  # layers on an LM recipe
SPECS = sorted((RECIPES / "ablations").glob("*.yaml"))
PAPER = sorted((RECIPES / "paper").glob("*.yaml"))


def variants():
    for spec in SPECS:
        content = yaml.safe_load(spec.read_text())
        for name, layers in content["variants"].items():
            yield pytest.param(content["base"], layers, id=f"{spec.stem}-{name}")


def print_config(configs, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["fit"] + [arg for config in configs for arg in ("--config", str(config))] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("recipe", FULL, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_parses(recipe, capsys, monkeypatch):
    printed = print_config([recipe], capsys, monkeypatch)
    assert "." in printed["model"]["class_path"]  # short names resolved to full class paths
    assert "." in printed["data"]["class_path"]


@pytest.mark.parametrize("layer", FINETUNE, ids=lambda p: p.stem)
@pytest.mark.parametrize("base", ["recipes/tiny/lm.yaml", "recipes/paper/tar_1.5b.yaml"])
def test_finetune_layer_parses_on_an_lm_recipe(base, layer, capsys, monkeypatch):
    assert print_config([base, layer], capsys, monkeypatch)["model"]["init_args"]["lm"]["init_args"]["lora"]


@pytest.mark.parametrize(("base", "layers"), list(variants()))
def test_ablation_variant_parses(base, layers, capsys, monkeypatch):
    print_config([base, *layers], capsys, monkeypatch)


def test_every_ablation_layer_belongs_to_a_spec():
    listed = {
        Path(layer)
        for spec in SPECS
        for layers in yaml.safe_load(spec.read_text())["variants"].values()
        for layer in layers
    }
    on_disk = {p.relative_to(ROOT) for p in (RECIPES / "ablations").rglob("*.yaml") if p.parent.name != "ablations"}
    assert on_disk == listed


@pytest.mark.parametrize("recipe", PAPER, ids=lambda p: p.stem)
def test_paper_recipes_name_their_gpu_strategy(recipe, capsys, monkeypatch):
    trainer = print_config([recipe], capsys, monkeypatch)["trainer"]
    assert trainer["accelerator"] == "gpu" and trainer["precision"] == "bf16-mixed"
    assert trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    # --print_config leaves the wrap policies (sets of classes) out: parse them as the Trainer receives them
    parser = LightningArgumentParser()
    parser.add_lightning_class_args(Trainer, "trainer")
    strategy = parser.parse_object({"trainer": yaml.safe_load(recipe.read_text())["trainer"]}).trainer.strategy
    layers = strategy.init_args.activation_checkpointing_policy
    assert layers and layers == strategy.init_args.auto_wrap_policy  # one FSDP unit per checkpointed block
    assert all(isinstance(layer, type) and issubclass(layer, torch.nn.Module) for layer in layers)
