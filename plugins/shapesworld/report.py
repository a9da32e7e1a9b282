"""Scoring a trained Tar on ShapesWorld the way the paper scores Tar: GenEval-style T2I (with and without
self-reflection), POPE-style yes/no questions, and caption attribute accuracy, all on the held-out split; and
editing (recolour and remove instructions), judged by the oracle against the edited scene."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from tarkit_plugins.evaluation import geneval_scores, pope_metrics
from tarkit_plugins.pipelines import EditPipeline, ImageToTextPipeline, TextToImagePipeline
from tarkit_plugins.shapesworld.ladder import Rung, geneval_stderr, lowest_failed, proportion_stderr
from tarkit_plugins.shapesworld.oracle import score_edit, score_image
from tarkit_plugins.shapesworld.world import COLORS, SHAPES, Example, SceneSampler, render

CAPTION_QUESTION = "Describe the image."
NAMED_OBJECT = re.compile(rf"\b({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})s?\b")


def named_objects(text: str) -> set[tuple[str, str]]:
    """The ``(colour, shape)`` pairs a caption names, e.g. "a red circle and two blue squares"."""
    return set(NAMED_OBJECT.findall(text.lower()))


def caption_scores(captions: list[str], truths: list[set[tuple[str, str]]]) -> dict[str, float]:
    """Attribute accuracy: recall of the scene's colour-shape pairs in the caption, precision of the named
    pairs, and the share of captions that name exactly the scene's pairs."""
    named = [named_objects(c) for c in captions]
    hits = sum(len(n & t) for n, t in zip(named, truths, strict=True))
    return {
        "attribute_recall": hits / max(sum(len(t) for t in truths), 1),
        "attribute_precision": hits / max(sum(len(n) for n in named), 1),
        "exact": sum(n == t for n, t in zip(named, truths, strict=True)) / len(truths),
    }


def batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def evaluate_t2i(
    t2i: TextToImagePipeline, examples: list[Example], batch_size: int, seed: int
) -> tuple[dict[str, list[dict[str, Any]]], list[tuple[str, Image.Image]]]:
    """GenEval-style results rows of the first candidate (plain sampling) and of the self-reflected best, and
    ``(prompt, image)`` samples (the self-reflected ones when there are candidates)."""
    generator = torch.Generator().manual_seed(seed)
    records = [e.record for e in examples]
    rows: dict[str, list[dict[str, Any]]] = {"plain": [], "self_reflect": []}
    samples: list[tuple[str, Image.Image]] = []
    for group in batches(records, batch_size):
        prompts = [r["prompt"] for r in group]
        if t2i.candidates > 1:
            reflected = t2i.reflect(prompts, generator)
            first = reflected["candidate_codes"][:: t2i.candidates]
            drawn = {"plain": t2i.decode(first, generator), "self_reflect": t2i.decode(reflected["codes"], generator)}
        else:
            drawn = {"plain": t2i.decode(t2i.generate_codes(prompts, generator), generator)}
        for kind, images in drawn.items():
            for record, image in zip(group, images, strict=True):
                correct, reason = score_image(image, record)
                rows[kind].append({"tag": record["tag"], "prompt": record["prompt"], "correct": correct})
        best = drawn.get("self_reflect", drawn["plain"])
        samples += list(zip(prompts, best, strict=True))
    return {kind: r for kind, r in rows.items() if r}, samples


def geneval_summary(rows: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per-tag and overall scores of each kind of sampling, with the overall score's standard error."""
    return {kind: {**geneval_scores(r), "overall_stderr": geneval_stderr(r)} for kind, r in rows.items()}


def pope_items(sampler: SceneSampler, examples: list[Example]) -> list[tuple[int, str, str]]:
    """``(image index, question, label)``: two yes and two no questions per image, as POPE balances them."""
    return [
        (index, text, label)
        for index, example in enumerate(examples)
        for text, label in sampler.pope_questions(example, sampler.rng(index, "pope"))
    ]


def evaluate_i2t(
    i2t: ImageToTextPipeline, sampler: SceneSampler, examples: list[Example], batch_size: int
) -> tuple[dict[str, float], dict[str, float]]:
    """POPE-style metrics (with the accuracy's standard error) and caption attribute scores."""
    images = [render(e.scene) for e in examples]
    questions = pope_items(sampler, examples)
    answers = []
    for group in batches(questions, batch_size):
        answers += i2t.generate_batch([images[i] for i, _, _ in group], [q for _, q, _ in group], max_new_tokens=4)
    captions = []
    for group in batches(list(range(len(examples))), batch_size):
        captions += i2t.generate_batch([images[i] for i in group], [CAPTION_QUESTION] * len(group), max_new_tokens=32)
    pope = pope_metrics([label for _, _, label in questions], answers)
    pope["accuracy_stderr"] = proportion_stderr(pope["accuracy"], len(questions))
    caption = caption_scores(captions, [e.scene.combos() for e in examples])
    caption["exact_stderr"] = proportion_stderr(caption["exact"], len(examples))
    return pope, caption


def evaluate_edits(
    edit: EditPipeline, sampler: SceneSampler, examples: list[Example], batch_size: int, seed: int
) -> tuple[dict[str, float], list[tuple[str, Image.Image]]]:
    """The share of edits the oracle finds exactly right (with its standard error), per kind of instruction,
    and ``(instruction, edited image)`` samples. Each scene gets the sampler's edit (a recolour, or a removal
    where it holds several objects); a one-object scene with no recolour to give is left out."""
    edits = []
    for index, example in enumerate(examples):
        try:
            instruction, edited = sampler.edit(example, sampler.rng(index, "edit"))
        except ValueError:
            continue
        edits.append((render(example.scene), instruction, edited))
    generator = torch.Generator().manual_seed(seed)
    verdicts: dict[str, list[bool]] = {"recolour": [], "remove": []}
    samples: list[tuple[str, Image.Image]] = []
    for group in batches(edits, batch_size):
        drawn = edit.edit_images([image for image, _, _ in group], [text for _, text, _ in group], generator)
        for (_, text, edited), image in zip(group, drawn, strict=True):
            verdicts["remove" if text.startswith("Remove") else "recolour"].append(score_edit(image, edited)[0])
            samples.append((text, image))
    every = verdicts["recolour"] + verdicts["remove"]
    accuracy = sum(every) / max(len(every), 1)
    scores = {"accuracy": accuracy, "accuracy_stderr": proportion_stderr(accuracy, max(len(every), 1))}
    scores |= {kind: sum(v) / len(v) for kind, v in verdicts.items() if v}
    return scores | {"edits": float(len(every))}, samples


def labelled_grid(samples: list[tuple[str, Image.Image]], columns: int = 6, scale: int = 2) -> Image.Image:
    """Generated images, each above its (wrapped) prompt."""
    side = samples[0][1].width * scale
    label_height = 34
    rows = (len(samples) + columns - 1) // columns
    grid = Image.new("RGB", (columns * side, rows * (side + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (prompt, image) in enumerate(samples):
        x, y = (k % columns) * side, (k // columns) * (side + label_height)
        grid.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, y))
        text = prompt.removeprefix("a photo of ")
        width = max(side // 6, 8)
        lines = [text[i : i + width] for i in range(0, len(text), width)][:3]
        draw.multiline_text((x + 2, y + side + 1), "\n".join(lines), fill="black", spacing=1)
    return grid


def _value(value: float, stderr: float | None) -> str:
    return f"{value:.3f}" if stderr is None else f"{value:.3f} ± {stderr:.3f}"


def _metric_table(title: str, values: dict[str, float], headline: str) -> list[str]:
    """A two-column table, ``headline`` first with its standard error."""
    lines = [
        "",
        f"| {title} | value |",
        "|---|---|",
        f"| {headline} | {_value(values[headline], values[f'{headline}_stderr'])} |",
    ]
    return lines + [f"| {k} | {v:.3f} |" for k, v in values.items() if k not in (headline, f"{headline}_stderr")]


def write_report(out: Path, metrics: dict[str, Any], ladder: list[Rung], images: dict[str, str]) -> Path:
    """``report.md``: the ladder, then tables shaped like the paper's for each evaluation split (GenEval per
    category + overall; POPE; captions), the pictures and the training curves."""
    failed = lowest_failed(ladder)
    lines = ["# Tar on ShapesWorld (tiny, CPU)", ""]
    lines += [
        "## Quality ladder (test split)",
        "",
        "| rung | metric | value | gate | passed |",
        "|---|---|---|---|---|",
    ]
    for r in ladder:
        extra = "".join(f", {k} {v:.2f}" for k, v in (r.extra or {}).items())
        lines.append(
            f"| {r.rung} | {r.metric} | {_value(r.value, r.stderr)}{extra} | {r.gate:.2f} | "
            f"{'yes' if r.passed else 'NO'} |"
        )
    verdict = f"The lowest rung that misses its gate: **{failed}**." if failed else "Every rung meets its gate."
    lines += ["", verdict, ""]
    for split, results in metrics["splits"].items():
        geneval = results["geneval"]
        kinds = list(geneval)
        lines += [
            f"## {split}: {results['about']}",
            "",
            "| GenEval-style | " + " | ".join(kinds) + " |",
            "|---|" + "---|" * len(kinds),
        ]
        for tag in geneval[kinds[0]]:
            if tag.endswith("_stderr"):
                continue
            stderr = {k: geneval[k].get("overall_stderr") if tag == "overall" else None for k in kinds}
            lines.append(f"| {tag} | " + " | ".join(_value(geneval[k][tag], stderr[k]) for k in kinds) + " |")
        lines += _metric_table("POPE-style", results["pope"], "accuracy")
        lines += _metric_table("captions", results["caption"], "exact")
        if "edit" in results:
            lines += _metric_table("edits (oracle vs the edited scene)", results["edit"], "accuracy")
        lines += [""]
    lines += ["## Pictures", ""] + [f"![{name}]({path})" for name, path in images.items()] + [""]
    lines += ["## Run", "", "```json", json.dumps(metrics["run"], indent=2), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
