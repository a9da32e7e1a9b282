"""Every recipe parses (litgpt's config-hub test): full recipes alone, ablation variants layered on their base."""

from pathlib import Path

import pytest
import yaml

from tarkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
FULL = sorted(p for p in RECIPES.rglob("*.yaml") if "ablations" not in p.parts)
SPECS = sorted((RECIPES / "ablations").glob("*.yaml"))


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
