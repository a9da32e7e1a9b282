"""The oracle is as strict as a person on generated images: it rejects hard negatives made from renders (heavy
blur, melted shapes, mixed colours, wrong silhouettes, stray fragments) and passes renders and the mild
perturbations a good de-tokenizer draws."""

import itertools
import random
from collections import defaultdict

import numpy as np
import pytest

from tarkit_plugins.shapesworld import hard_negatives as hn
from tarkit_plugins.shapesworld.oracle import score_image, score_scene
from tarkit_plugins.shapesworld.world import TAGS, render

COUNT = 300  # per hard-negative kind, and of clean and of mildly perturbed renders


def judged(variants):
    """Each variant with the oracle's verdict on it."""
    return [(v, score_image(v.image, v.example.record)[0]) for v in variants]


def rates(verdicts, key, passed):
    """Fraction (and count) of judged variants the oracle passes (``passed``) or rejects, grouped by ``key``."""
    groups = defaultdict(list)
    for v, verdict in verdicts:
        groups[key(v)].append(verdict == passed)
    return {k: (float(np.mean(g)), len(g)) for k, g in sorted(groups.items())}


def faithful(variants):
    """Those made from scenes that satisfy their own prompt under GenEval's rules. ``SceneSampler`` places
    position prompts by a looser rule than GenEval's, so about a fifth of its position scenes do not (see
    test_oracle.py::test_position_scenes_satisfy_genevals_rule); a judge must reject those."""
    return [v for v in variants if score_scene(v.example.scene, v.example.record)[0]]


@pytest.fixture(scope="module")
def negatives():
    return {kind: hn.hard_negatives(kind, COUNT, seed=0) for kind in hn.HARD_KINDS}


def test_oracle_rejects_every_kind_of_hard_negative(negatives):
    verdicts = judged(v for variants in negatives.values() for v in variants)
    per_kind = rates(verdicts, lambda v: v.kind, passed=False)
    per_variant = rates(verdicts, lambda v: f"{v.kind}/{v.variant}", passed=False)
    report = f"per kind {per_kind}; per variant {per_variant}"
    assert all(n == COUNT for _, n in per_kind.values()), report
    assert all(rate >= 0.95 for rate, _ in per_kind.values()), report


def test_hard_negatives_cover_every_tag_they_can_break(negatives):
    for kind, variants in negatives.items():
        tags = {v.example.record["tag"] for v in variants}
        # colour mixing breaks a named colour: only colour prompts name one
        assert tags == ({"colors", "color_attr"} if kind == "color_mix" else set(TAGS)), kind


def test_oracle_passes_clean_and_mildly_perturbed_renders():
    scenes = itertools.islice(hn.examples(seed=0), COUNT)
    clean = [hn.Variant("clean", "clean", ex, render(ex.scene)) for _, _, ex in scenes]
    mild = hn.mild_perturbations(COUNT, seed=0)
    for variants in (clean, mild):
        kept = faithful(variants)
        assert len(kept) >= 0.9 * COUNT and {v.example.record["tag"] for v in kept} == set(TAGS)
        verdicts = judged(kept)
        per_kind = rates(verdicts, lambda v: v.kind, passed=True)
        per_tag = rates(verdicts, lambda v: v.example.record["tag"], passed=True)
        assert np.mean([verdict for _, verdict in verdicts]) >= 0.99, (per_kind, per_tag)
        assert all(rate >= 0.97 for rate, _ in per_kind.values()), per_kind


def test_corruptions_are_seeded():
    first, again = hn.hard_negatives("melted", 5, seed=3), hn.hard_negatives("melted", 5, seed=3)
    other = hn.hard_negatives("melted", 5, seed=4)
    assert [v.image.tobytes() for v in first] == [v.image.tobytes() for v in again]
    assert [v.image.tobytes() for v in first] != [v.image.tobytes() for v in other]
    image = render(next(hn.examples(seed=3))[2].scene)
    for kind in hn.MILD_KINDS:
        assert hn.mild(image, kind, random.Random(1)).tobytes() == hn.mild(image, kind, random.Random(1)).tobytes()


def test_mild_perturbations_stay_close_and_hard_negatives_change_an_object():
    for v in hn.mild_perturbations(50, seed=1):
        change = np.abs(np.asarray(v.image, np.float32) - np.asarray(render(v.example.scene), np.float32))
        assert change.mean() < 8, v.kind
    for kind in hn.HARD_KINDS:
        for v in hn.hard_negatives(kind, 20, seed=1):
            change = np.abs(np.asarray(v.image, np.float32) - np.asarray(render(v.example.scene), np.float32))
            assert (change.max(axis=-1) > 60).sum() >= 4, (kind, v.variant)  # a visible change, not noise


def test_color_mix_needs_a_named_colour_and_unknown_kinds_are_errors():
    counting = next(ex for _, _, ex in hn.examples(seed=0) if ex.record["tag"] == "counting")
    assert hn.color_mix(counting, random.Random(0)) is None
    with pytest.raises(ValueError, match="unknown hard negative"):
        hn.hard_negatives("smudge", 1)
    with pytest.raises(ValueError, match="unknown mild perturbation"):
        hn.mild(render(counting.scene), "smudge", random.Random(0))
