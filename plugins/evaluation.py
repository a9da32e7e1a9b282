"""Benchmark file formats and metrics, so external evaluators read tarkit's output unchanged.

- GenEval prompts: JSONL rows ``{tag, include: [{class, count, color?, position?}], exclude?, prompt}``.
- GenEval images: ``<out>/<00000>/metadata.jsonl`` (that prompt's row) and ``<out>/<00000>/samples/<0000>.png``;
  results rows ``{filename, tag, prompt, correct, reason, metadata}``; a tag's score is the mean of
  ``correct``, the overall score the mean of the tag scores.
- POPE: questions ``{question_id, image, text, label}``, answers ``{question_id, text}``; accuracy,
  precision, recall, F1 and yes-ratio with "yes" as the positive class.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tarkit.data import DataFormatError
from tarkit_plugins.jsonl import read_jsonl
from tarkit_plugins.prediction_files import save_image, write_text

GENEVAL_TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def read_geneval_prompts(path: str | Path) -> list[dict[str, Any]]:
    """GenEval prompt records (the real ``evaluation_metadata.jsonl`` or tarkit's ShapesWorld ones)."""
    rows = read_jsonl(path, required=("tag", "include", "prompt"))
    for number, row in enumerate(rows, start=1):
        if not isinstance(row["include"], list) or not all(
            isinstance(item, dict) and "class" in item and "count" in item for item in row["include"]
        ):
            raise DataFormatError(f"{path}: record {number}: 'include' must be a list of {{class, count, ...}}")
    return rows


def geneval_folder(out: str | Path, index: int) -> Path:
    """Where prompt ``index``'s images go: ``<out>/<index:05d>``."""
    return Path(out) / f"{index:05d}"


def write_geneval_sample(out: str | Path, index: int, record: dict[str, Any], images: list[Image.Image]) -> Path:
    """One prompt's folder: ``<out>/<index:05d>/metadata.jsonl`` and ``samples/<k:04d>.png``, each file whole."""
    folder = geneval_folder(out, index)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    write_text(folder / "metadata.jsonl", json.dumps(record) + "\n")
    for k, image in enumerate(images):
        save_image(image, folder / "samples" / f"{k:04d}.png")
    return folder


def iter_geneval_folder(root: str | Path) -> Iterator[tuple[Path, dict[str, Any], list[Path]]]:
    """``(folder, record, sample paths)`` for each prompt folder, in order."""
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError(f"{root}: not a folder of GenEval samples (<out>/<00000>/metadata.jsonl)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    if not folders:
        raise DataFormatError(f"{root}: no <00000>/ prompt folders found; is this GenEval's image layout?")
    for folder in folders:
        records = read_jsonl(folder / "metadata.jsonl", required=("tag", "include", "prompt"))
        if len(records) != 1:
            raise DataFormatError(f"{folder / 'metadata.jsonl'}: expected exactly one record, found {len(records)}")
        yield folder, records[0], sorted((folder / "samples").glob("*.png"))


def geneval_scores(results: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Per-tag accuracy and ``overall`` = mean of the tag scores (GenEval's summary)."""
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for row in results:
        by_tag[row["tag"]].append(bool(row["correct"]))
    if not by_tag:
        raise ValueError("no GenEval results to score")
    scores = {tag: sum(v) / len(v) for tag, v in sorted(by_tag.items(), key=lambda kv: _tag_order(kv[0]))}
    scores["overall"] = sum(scores.values()) / len(scores)
    return scores


def _tag_order(tag: str) -> int:
    return GENEVAL_TAGS.index(tag) if tag in GENEVAL_TAGS else len(GENEVAL_TAGS)


def pope_answer(text: str) -> str:
    """POPE's reading of a free-form answer: "no" if the words contain no/not, else "yes"."""
    words = re.sub(r"[^\w\s]", " ", text).lower().split()
    return "no" if "no" in words or "not" in words else "yes"


def pope_metrics(labels: list[str], answers: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no answers against yes/no labels."""
    if len(labels) != len(answers) or not labels:
        raise ValueError(f"need equally many labels and answers, got {len(labels)} and {len(answers)}")
    predicted = [pope_answer(a) == "yes" for a in answers]
    truth = [label.strip().lower() == "yes" for label in labels]
    tp = sum(p and t for p, t in zip(predicted, truth, strict=True))
    fp = sum(p and not t for p, t in zip(predicted, truth, strict=True))
    fn = sum(t and not p for p, t in zip(predicted, truth, strict=True))
    correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": correct / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(predicted) / len(predicted),
    }


def score_pope_files(questions_path: str | Path, answers_path: str | Path) -> dict[str, float]:
    """POPE metrics from a questions file (with labels) and an answers file, matched by ``question_id``."""
    questions = read_jsonl(questions_path, required=("question_id", "text", "label"))
    answers = {row["question_id"]: row["text"] for row in read_jsonl(answers_path, required=("question_id", "text"))}
    unanswered = [q["question_id"] for q in questions if q["question_id"] not in answers]
    if unanswered:
        raise DataFormatError(
            f"{answers_path}: no answer for {len(unanswered)} question(s), e.g. question_id {unanswered[0]!r}"
        )
    return pope_metrics([q["label"] for q in questions], [answers[q["question_id"]] for q in questions])


def markdown_table(rows: dict[str, float], header: tuple[str, str] = ("metric", "score")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in rows.items()]
    return "\n".join(lines)


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Mean peak signal-to-noise ratio in dB of images in ``[0, 1]`` (clamped): each image's own MSE, then averaged."""
    mse = (images.float().clamp(0, 1) - references.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / mse)).mean()
