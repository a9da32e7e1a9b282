"""`root:` paths: one root for every stage, resolved before parts are built; a missing input names its recipe."""

from pathlib import Path

import pytest
from jsonargparse import Namespace

from tarkit.paths import resolve_path
from tarkit.recipe_paths import MissingStageError, check_inputs, producing_recipe, resolve_root_paths

ROOT = Path(__file__).resolve().parents[1]


def recipe_config(**model_args):
    return Namespace(
        trainer=Namespace(default_root_dir="root:runs/tatok", callbacks=[{"init_args": {"dirpath": "root:runs/c"}}]),
        model=Namespace(class_path="tatok", init_args=Namespace(export_dir="root:checkpoints/tatok", **model_args)),
    )


def test_root_paths_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TARKIT_ROOT", raising=False)
    assert resolve_path("root:checkpoints/tatok") == Path("outputs/tiny/checkpoints/tatok")
    monkeypatch.setenv("TARKIT_ROOT", str(tmp_path))
    assert resolve_path("root:checkpoints/tatok") == tmp_path / "checkpoints/tatok"


def test_every_root_path_of_a_config_is_resolved_in_place(monkeypatch, tmp_path):
    monkeypatch.setenv("TARKIT_ROOT", str(tmp_path))
    config = resolve_root_paths(recipe_config(tatok="root:checkpoints/x", other="plain/path"))
    assert config.trainer.default_root_dir == str(tmp_path / "runs/tatok")
    assert config.trainer.callbacks[0]["init_args"]["dirpath"] == str(tmp_path / "runs/c")
    assert config.model.init_args.tatok == str(tmp_path / "checkpoints/x")
    assert config.model.init_args.other == "plain/path"


def test_outputs_may_be_missing_but_a_missing_input_names_the_recipe_that_makes_it(monkeypatch, tmp_path):
    monkeypatch.setenv("TARKIT_ROOT", str(tmp_path))
    check_inputs(recipe_config(), [ROOT / "recipes/tiny"])  # only outputs: nothing to check
    with pytest.raises(MissingStageError) as err:
        check_inputs(recipe_config(teacher="root:checkpoints/teacher"), [ROOT / "recipes/tiny"])
    message = str(err.value)
    assert message.startswith(f"model.init_args.teacher: root:checkpoints/teacher ({tmp_path}/checkpoints/teacher)")
    assert f"make it with `tarkit fit --config {ROOT / 'recipes/tiny/teacher.yaml'}`" in message
    assert "\n" not in message
    (tmp_path / "checkpoints/teacher").mkdir(parents=True)
    check_inputs(recipe_config(teacher="root:checkpoints/teacher"), [ROOT / "recipes/tiny"])


def test_each_tiny_stage_is_written_by_the_recipe_of_its_name():
    for stage in ("teacher", "tatok", "pixel_vq", "ar_detok", "diffusion_detok", "lm"):
        recipe = producing_recipe(f"root:checkpoints/{stage}", [ROOT / "recipes/tiny"])
        assert recipe == ROOT / f"recipes/tiny/{stage}.yaml"
    assert producing_recipe("root:checkpoints/nothing", [ROOT / "recipes/tiny"]) is None
