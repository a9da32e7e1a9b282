"""The demo's evaluation splits: the test split draws new scenes over the training combinations, never a
training scene; the compositional split only the held-out combinations."""

import hashlib
from pathlib import Path

import pytest
import yaml

from tarkit_plugins.shapesworld.datamodule import ShapesWorldDataModule
from tarkit_plugins.shapesworld.demo import evaluation_samplers
from tarkit_plugins.shapesworld.world import HELDOUT_COMBOS, SPLITS

ROOT = Path(__file__).resolve().parents[3]
RECIPES = sorted((ROOT / "recipes" / "tiny").glob("*.yaml"))
EVALUATED = 400  # more than the demo evaluates per split (prompts, images and probe scenes)


def content_hash(scene) -> str:
    """What a scene shows: its objects (class, colour, size, place to 0.01 px) and background."""
    objects = sorted((o.shape, o.color, round(o.side, 2), round(o.cx, 2), round(o.cy, 2)) for o in scene.objects)
    return hashlib.sha1(repr((scene.size, scene.background, objects)).encode()).hexdigest()


def test_scenes_are_told_apart_by_content():
    samplers = evaluation_samplers(seed=0)
    hashes = {content_hash(samplers["test"].example(i).scene) for i in range(EVALUATED)}
    assert len(hashes) == EVALUATED
    again = evaluation_samplers(seed=0)["test"].example(7).scene
    assert content_hash(again) in hashes


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_no_test_scene_is_a_training_scene_of_any_tiny_recipe(recipe):
    data = yaml.safe_load(recipe.read_text())["data"]["init_args"]
    module = ShapesWorldDataModule(**data)
    training = {content_hash(module.train_set.sampler.example(i).scene) for i in range(len(module.train_set))}
    test = evaluation_samplers(seed=0)["test"]
    assert {(c, s) for c, s in test.combos} == set(SPLITS["train"])  # the same combinations training shows
    overlap = [i for i in range(EVALUATED) if content_hash(test.example(i).scene) in training]
    assert overlap == []


def test_the_compositional_split_shows_only_held_out_combinations():
    compositional = evaluation_samplers(seed=0)["compositional"]
    for i in range(60):
        assert compositional.example(i).scene.combos() <= HELDOUT_COMBOS
