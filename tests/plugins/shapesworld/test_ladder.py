"""Each rung of the quality ladder measures what it is given: fed mismatched inputs, its figure drops."""

import json
import random

import numpy as np
import pytest
import torch

from tarkit.tatok import load_tatok
from tarkit_plugins.shapesworld.ladder import (
    batched,
    geneval_stderr,
    lowest_failed,
    oracle_pass_rate,
    pooled_features,
    presence_labels,
    probe_accuracy,
    reconstruction_rung,
    render_batch,
    rung,
)
from tarkit_plugins.shapesworld.world import SPLITS, SceneSampler, render

LADDER = ["renders", "teacher", "TA-Tok codes", "pixel VQ", "TA-Tok + de-tokenizer", "T2I", "T2I self-reflection",
          "I2T", "I2T captions"]


def shuffled(items, seed=0):
    """The same items, none left in its place (a derangement by rotation after a shuffle)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    rotated = order[1:] + order[:1]
    return [items[rotated[order.index(i)]] for i in range(len(items))]


@pytest.fixture(scope="module")
def scenes():
    sampler = SceneSampler("train", seed=99)
    examples = [sampler.example(i) for i in range(90)]
    return examples, [render(e.scene) for e in examples]


def test_renders_and_reconstructions_scored_against_other_prompts_drop(scenes):
    examples, images = scenes
    records = [e.record for e in examples]
    matched, _ = oracle_pass_rate(images, records)
    mismatched, _ = oracle_pass_rate(images, shuffled(records))
    assert matched >= 0.99 and mismatched < 0.5
    pixels = render_batch(images)
    right = reconstruction_rung("pixel VQ", pixels, pixels, records, gate=0.97)
    wrong = reconstruction_rung("pixel VQ", pixels, pixels, shuffled(records), gate=0.97)
    assert right.passed and not wrong.passed and wrong.value < 0.5
    blank = reconstruction_rung("pixel VQ", pixels, torch.ones_like(pixels), records, gate=0.97)
    assert blank.value == 0.0 and blank.extra["psnr"] < right.extra["psnr"]


def test_a_probe_on_features_of_other_images_falls_to_chance(quick_demo):
    tatok = load_tatok(quick_demo / "checkpoints" / "tatok").tatok.eval()
    pairs = sorted(SPLITS["train"])
    fit = [SceneSampler("train", seed=0).example(i) for i in range(300)]
    test = [SceneSampler("train", seed=5).example(i) for i in range(150)]

    def features(examples):
        pixels = render_batch([render(e.scene) for e in examples])
        return np.concatenate(batched(lambda b: pooled_features(tatok.encoder(b)), pixels))

    fit_x, test_x = features(fit), features(test)
    fit_y, test_y = presence_labels(fit, pairs), presence_labels(test, pairs)
    matched, _ = probe_accuracy(fit_x, fit_y, test_x, test_y)
    mismatched, _ = probe_accuracy(fit_x, fit_y, np.stack(shuffled(list(test_x))), test_y)
    assert mismatched < matched - 0.1 and abs(mismatched - 0.5) < 0.1


def test_generated_answers_and_captions_are_scored_against_their_own_items():
    from tarkit_plugins.evaluation import pope_metrics

    labels = ["yes", "no"] * 50
    assert pope_metrics(labels, labels)["accuracy"] == 1.0
    assert pope_metrics(labels, shuffled(labels))["accuracy"] < 0.6
    rows = [{"tag": t, "correct": True} for t in ("colors", "position") for _ in range(20)]
    assert geneval_stderr(rows) == 0.0


def test_the_report_names_the_lowest_rung_below_its_gate():
    rungs = [rung("renders", "oracle", 1.0, gate=0.99), rung("teacher", "probe", 0.9, 0.01, gate=0.98),
             rung("T2I", "geneval", 0.1, gate=0.85)]
    assert lowest_failed(rungs) == "teacher"
    assert lowest_failed(rungs[:1]) is None
    assert rungs[1].as_dict() == {"rung": "teacher", "metric": "probe", "value": 0.9, "gate": 0.98, "passed": False,
                                  "stderr": 0.01}


@pytest.mark.slow  # reads the session's QUICK demo, shared with tests/plugins/shapesworld/test_demo.py
def test_the_quick_demo_writes_every_ladder_key(quick_demo):
    metrics = json.loads((quick_demo / "metrics.json").read_text())
    assert [r["rung"] for r in metrics["ladder"]] == LADDER
    for entry in metrics["ladder"]:
        assert {"rung", "metric", "value", "gate", "passed"} <= set(entry)
        assert isinstance(entry["value"], float) and entry["passed"] == (entry["value"] >= entry["gate"])
    assert metrics["lowest_failed_rung"] in [*LADDER, None]
    assert set(metrics["splits"]) == {"test", "compositional"}
    report = (quick_demo / "report.md").read_text()
    assert "## Quality ladder (test split)" in report and "round_trip.png" in report
    assert (quick_demo / "round_trip.png").is_file() and (quick_demo / "curves_lm.png").is_file()
