"""The quality ladder: one figure per stage of the chain, on the same test scenes, each with its gate.

    renders -> teacher features -> TA-Tok codes -> pixel VQ -> TA-Tok + de-tokenizer -> T2I, I2T

A rung that misses its gate while the rungs below it pass is where the chain loses what the task needs. Each
figure is computed from what it is given (images and the records they should match, features and the labels
they should predict), so a rung fed mismatched inputs drops; the tests check that.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from tarkit.images import image_to_tensor, tensor_to_image
from tarkit_plugins.evaluation import psnr
from tarkit_plugins.shapesworld.oracle import score_image
from tarkit_plugins.shapesworld.world import Example


@dataclass(frozen=True)
class Rung:
    """One rung: its figure (with standard error where it is a mean over items), its gate and the verdict."""

    rung: str
    metric: str
    value: float
    gate: float
    passed: bool
    stderr: float | None = None
    extra: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def rung(name: str, metric: str, value: float, stderr: float | None = None, *, gate: float, **extra: float) -> Rung:
    """A rung whose figure ``value`` passes when it reaches ``gate``."""
    return Rung(name, metric, float(value), gate, bool(value >= gate), stderr, extra or None)


def proportion_stderr(p: float, n: int) -> float:
    """Standard error of a proportion ``p`` over ``n`` items."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def geneval_stderr(rows: Sequence[dict[str, Any]]) -> float:
    """Standard error of GenEval's overall score (the mean of per-tag accuracies)."""
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        by_tag[row["tag"]].append(bool(row["correct"]))
    variances = [proportion_stderr(sum(v) / len(v), len(v)) ** 2 for v in by_tag.values()]
    return math.sqrt(sum(variances)) / len(variances)


def oracle_pass_rate(images: Sequence[Image.Image], records: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """Share of images the oracle accepts for their record, and its standard error."""
    if len(images) != len(records) or not images:
        raise ValueError(f"need equally many images and records, got {len(images)} and {len(records)}")
    passed = [score_image(image, record)[0] for image, record in zip(images, records, strict=True)]
    rate = sum(passed) / len(passed)
    return rate, proportion_stderr(rate, len(passed))


def presence_labels(examples: Sequence[Example], pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """``[N, P]`` booleans: does scene ``n`` contain colour-shape pair ``p``."""
    return np.array([[pair in e.scene.combos() for pair in pairs] for e in examples], dtype=bool)


def probe_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> tuple[float, float]:
    """A linear probe per pair (logistic regression on standardised features): mean balanced accuracy over
    the pairs on the test set, and the standard error of that mean across pairs."""
    scaler = StandardScaler().fit(train_x)
    train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
    accuracies = []
    for p in range(train_y.shape[1]):
        if train_y[:, p].all() or not train_y[:, p].any() or test_y[:, p].all() or not test_y[:, p].any():
            continue  # a pair always (or never) present says nothing about the features
        predicted = LogisticRegression(C=1.0, max_iter=2000).fit(train_x, train_y[:, p]).predict(test_x)
        truth = test_y[:, p]
        accuracies.append(0.5 * ((predicted[truth] == 1).mean() + (predicted[~truth] == 0).mean()))
    if not accuracies:
        raise ValueError("no colour-shape pair is both present and absent in the probe's scenes")
    return float(np.mean(accuracies)), float(np.std(accuracies) / math.sqrt(len(accuracies)))


def pooled_features(features: torch.Tensor) -> np.ndarray:
    """Patch features ``[B, N, C]`` -> ``[B, 2C]``: mean and max over patches (what a probe reads)."""
    return torch.cat([features.mean(1), features.amax(1)], dim=1).float().numpy()


def bag_of_codes(indices: torch.Tensor, num_codes: int) -> np.ndarray:
    """Code indices ``[B, n]`` -> ``[B, K]`` counts: what the codes say, wherever they sit."""
    bags = torch.zeros(len(indices), num_codes)
    bags.scatter_add_(1, indices.long(), torch.ones_like(indices, dtype=torch.float))
    return bags.numpy()


def batched(function: Callable[[torch.Tensor], Any], images: torch.Tensor, batch_size: int = 64) -> list[Any]:
    """``function`` over ``images`` in batches, without gradients."""
    with torch.no_grad():
        return [function(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]


def render_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    return torch.stack([image_to_tensor(image) for image in images])


def reconstruction_rung(
    name: str, originals: torch.Tensor, redrawn: torch.Tensor, records: Sequence[dict[str, Any]], gate: float
) -> Rung:
    """The oracle on reconstructions of ``originals`` (and their PSNR)."""
    rate, stderr = oracle_pass_rate([tensor_to_image(image) for image in redrawn], records)
    return rung(name, "oracle pass rate", rate, stderr, gate=gate, psnr=float(psnr(redrawn, originals)))


def lowest_failed(rungs: Sequence[Rung]) -> str | None:
    """The first rung, bottom up, that misses its gate."""
    return next((r.rung for r in rungs if not r.passed), None)
