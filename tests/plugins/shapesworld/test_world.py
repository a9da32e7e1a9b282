import random
from collections import Counter

import numpy as np
import pytest

from tarkit_plugins.shapesworld.world import (
    ALL_COMBOS,
    COLORS,
    HELDOUT_COMBOS,
    SHAPES,
    SPLITS,
    TAGS,
    SceneSampler,
    render,
)


def test_same_seed_gives_byte_identical_images_and_records():
    first, second = SceneSampler("train", seed=7), SceneSampler("train", seed=7)
    for index in range(20):
        a, b = first.example(index), second.example(index)
        assert a.record == b.record
        assert render(a.scene).tobytes() == render(b.scene).tobytes()
    other = SceneSampler("train", seed=8)
    assert any(render(other.example(i).scene).tobytes() != render(first.example(i).scene).tobytes() for i in range(5))


def test_heldout_split_shares_no_colour_shape_combination_with_train():
    assert SPLITS["train"] & SPLITS["heldout"] == set()
    assert SPLITS["train"] | SPLITS["heldout"] == ALL_COMBOS
    # every colour and every shape alone is still seen in training
    assert {c for c, _ in SPLITS["train"]} == set(COLORS) and {s for _, s in SPLITS["train"]} == set(SHAPES)
    train_seen = set().union(*(SceneSampler("train", seed=1).example(i).scene.combos() for i in range(600)))
    heldout_seen = set().union(*(SceneSampler("heldout", seed=1).example(i).scene.combos() for i in range(600)))
    assert train_seen & heldout_seen == set()
    assert heldout_seen == set(HELDOUT_COMBOS)


def test_records_follow_geneval_schema_for_every_tag():
    sampler = SceneSampler("all", seed=3)
    seen = set()
    for index in range(60):
        example = sampler.example(index)
        record, scene = example.record, example.scene
        seen.add(record["tag"])
        assert set(record) <= {"tag", "include", "exclude", "prompt"}
        assert record["prompt"].startswith("a photo of ")
        assert all({"class", "count"} <= set(item) for item in record["include"])
        assert len(scene.objects) == sum(item["count"] for item in record["include"])
        if record["tag"] == "counting":
            assert record["exclude"] == [{"class": record["include"][0]["class"], "count": len(scene.objects) + 1}]
        if record["tag"] == "position":
            assert record["include"][1]["position"][1] == 0
    assert seen == set(TAGS)


def test_renders_are_anti_aliased_and_noisy():
    example = SceneSampler("train", seed=0).example(0)
    pixels = np.asarray(render(example.scene)).reshape(-1, 3)
    assert len({tuple(p) for p in pixels}) > 100  # noise and blended edges, not a handful of flat colours


def test_pope_questions_are_balanced():
    sampler = SceneSampler("train", seed=0)
    labels = [label for i in range(50) for _, label in sampler.pope_questions(sampler.example(i), random.Random(i))]
    assert labels.count("yes") == labels.count("no") == 100


def test_training_questions_are_true_and_their_wording_does_not_give_the_answer_away():
    sampler = SceneSampler("train", seed=0)
    counts = Counter()
    for index in range(2000):
        example = sampler.example(index)
        question, label = sampler.training_question(example, random.Random(index))
        thing = question.removeprefix("Is there ").removesuffix(" in the image?").split(" ", 1)[1]
        *color, shape = thing.split()
        present = any(s == shape and (not color or c == color[0]) for c, s in example.scene.combos())
        assert label == ("yes" if present else "no"), question
        counts[bool(color), label] += 1
    for named in (True, False):  # P(yes | the question names a colour) = P(yes | it does not) = 1/2
        yes, no = counts[named, "yes"], counts[named, "no"]
        assert abs(yes / (yes + no) - 0.5) < 0.05, counts


def test_edits_stay_in_split_and_change_the_scene():
    sampler = SceneSampler("heldout", seed=2)
    for index in range(40):
        example = sampler.example(index)
        instruction, edited = sampler.edit(example, random.Random(index))
        assert edited.combos() <= set(HELDOUT_COMBOS)
        assert edited.objects != example.scene.objects
        assert instruction.startswith(("Make the", "Remove the"))


def test_bad_sampler_arguments_are_clear():
    with pytest.raises(ValueError, match="unknown ShapesWorld split 'test'"):
        SceneSampler("test")
    with pytest.raises(ValueError, match="size >= 32"):
        SceneSampler(size=16)
