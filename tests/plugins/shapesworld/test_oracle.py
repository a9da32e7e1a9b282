import copy
import random

import pytest
from PIL import Image

from tarkit.evaluation import geneval_scores, pope_metrics
from tarkit_plugins.shapesworld.oracle import OracleError, answer_question, detect, score_image
from tarkit_plugins.shapesworld.world import COLORS, NUMBER_WORDS, RELATIONS, SceneSampler, render

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def mismatch(record, scene):
    """The same record with one fact made false: colour, count, position or class."""
    wrong = copy.deepcopy(record)
    tag = record["tag"]
    present = {o.shape for o in scene.objects}
    if tag in ("colors", "color_attr"):
        item = wrong["include"][0]
        used = {o.color for o in scene.objects if o.shape == item["class"]}
        item["color"] = next(c for c in COLORS if c not in used)
    elif tag == "counting":
        count = record["include"][0]["count"]
        new = 4 if count == 2 else count - 1
        wrong["include"][0]["count"], wrong["exclude"][0]["count"] = new, new + 1
        wrong["prompt"] = wrong["prompt"].replace(NUMBER_WORDS[count], NUMBER_WORDS[new])
    elif tag == "position":
        relation = record["include"][1]["position"][0]
        wrong["include"][1]["position"][0] = OPPOSITE[relation]
    else:  # single_object, two_object: ask for a shape that is not there
        wrong["include"][-1]["class"] = next(s for s in ("circle", "square", "triangle") if s not in present)
    return wrong


@pytest.fixture(scope="module")
def renders():
    """1,000 ground-truth renders: 500 from each split."""
    out = []
    for split in ("train", "heldout"):
        sampler = SceneSampler(split, seed=11)
        for index in range(500):
            example = sampler.example(index)
            out.append((sampler, index, example, render(example.scene)))
    return out


def test_oracle_scores_ground_truth_renders_correct(renders):
    rows = [{"tag": ex.record["tag"], "correct": score_image(img, ex.record)[0]} for _, _, ex, img in renders]
    scores = geneval_scores(rows)
    assert scores["overall"] >= 0.99, scores
    assert min(scores.values()) >= 0.98, scores


def test_oracle_rejects_mismatched_prompts(renders):
    rows = []
    for _, _, ex, img in renders:
        wrong = mismatch(ex.record, ex.scene)
        assert wrong != ex.record
        rows.append({"tag": ex.record["tag"], "correct": score_image(img, wrong)[0]})
    scores = geneval_scores(rows)
    assert scores["overall"] <= 0.05, scores


def test_oracle_answers_pope_questions(renders):
    labels, answers = [], []
    for sampler, index, ex, img in renders:
        for question, label in sampler.pope_questions(ex, random.Random(index)):
            labels.append(label)
            answers.append(answer_question(img, question))
    metrics = pope_metrics(labels, answers)
    assert metrics["accuracy"] >= 0.99 and metrics["f1"] >= 0.99
    flipped = pope_metrics(labels, ["no" if a == "yes" else "yes" for a in answers])
    assert flipped["accuracy"] <= 0.01


def test_detections_match_the_scene():
    example = SceneSampler("all", seed=4).example(2)  # counting
    found = detect(render(example.scene))
    assert sorted((d.shape, d.color) for d in found) == sorted((o.shape, o.color) for o in example.scene.objects)


def test_blank_image_has_nothing_and_fails_every_spec():
    blank = Image.new("RGB", (64, 64), (230, 230, 230))
    assert detect(blank) == []
    correct, reason = score_image(blank, {"tag": "single_object", "include": [{"class": "circle", "count": 1}]})
    assert not correct and "found 0" in reason


def test_relations_are_checked_both_ways():
    sampler = SceneSampler("train", seed=0, tags=("position",))
    for index in range(20):
        example = sampler.example(index)
        image = render(example.scene)
        assert score_image(image, example.record)[0]
        assert example.record["include"][1]["position"][0] in RELATIONS


def test_unknown_class_and_question_are_clear_errors():
    image = Image.new("RGB", (64, 64), (230, 230, 230))
    with pytest.raises(OracleError, match="'dog' is not a ShapesWorld shape"):
        score_image(image, {"tag": "single_object", "include": [{"class": "dog", "count": 1}]})
    with pytest.raises(OracleError, match="cannot parse question"):
        answer_question(image, "What colour is the sky?")
