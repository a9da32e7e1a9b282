"""What ``tarkit shapesworld ...`` and ``tarkit eval ...`` do, apart from parsing their arguments.

Kept out of :mod:`tarkit_plugins.shapesworld.commands` so that listing the commands (``tarkit --help``)
imports neither torch nor the evaluation code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from tarkit.commands import CommandError
from tarkit.data import DataFormatError
from tarkit.images import load_image
from tarkit_plugins.evaluation import (
    geneval_scores,
    iter_geneval_folder,
    markdown_table,
    score_pope_files,
    write_geneval_sample,
)
from tarkit_plugins.jsonl import read_jsonl, write_jsonl
from tarkit_plugins.shapesworld.oracle import OracleError, answer_question, score_image
from tarkit_plugins.shapesworld.world import SceneSampler, render


def _sampler(args: argparse.Namespace) -> SceneSampler:
    try:
        return SceneSampler(args.split, seed=args.seed, size=args.size)
    except ValueError as err:
        raise CommandError(str(err)) from err


def render_scenes(args: argparse.Namespace) -> int:
    """``tarkit shapesworld render``: scenes in GenEval's folder layout plus ``pope_questions.jsonl`` and
    ``edits.jsonl`` (``{id, image, instruction, objects}``: a recolour or remove instruction per scene that has
    one, ``objects`` the edited scene's ``[colour, shape]`` pairs, what a right edit shows)."""
    sampler = _sampler(args)
    questions, edits = [], []
    for index in range(args.num):
        example = sampler.example(index)
        folder = write_geneval_sample(args.out, index, example.record, [render(example.scene)])
        image = (folder / "samples" / "0000.png").relative_to(args.out).as_posix()
        for k, (text, label) in enumerate(
            sampler.pope_questions(example, sampler.rng(index, "pope"), args.questions_per_image)
        ):
            questions.append({"question_id": f"{index:05d}-{k}", "image": image, "text": text, "label": label})
        try:
            instruction, edited = sampler.edit(example, sampler.rng(index, "edit"))
        except ValueError:  # a one-object scene with no recolour to give
            continue
        objects = sorted([o.color, o.shape] for o in edited.objects)
        edits.append({"id": f"{index:05d}", "image": image, "instruction": instruction, "objects": objects})
    write_jsonl(args.out / "pope_questions.jsonl", questions)
    write_jsonl(args.out / "edits.jsonl", edits)
    print(f"wrote {args.num} scenes, {len(questions)} POPE questions and {len(edits)} edits to {args.out}")
    return 0


def write_prompts(args: argparse.Namespace) -> int:
    """``tarkit shapesworld prompts``: a GenEval-style prompt file."""
    sampler = _sampler(args)
    write_jsonl(args.out, (sampler.example(i).record for i in range(args.num)))
    print(f"wrote {args.num} GenEval-style prompts to {args.out}")
    return 0


def answer_questions(args: argparse.Namespace) -> int:
    """``tarkit shapesworld answer``: the oracle's answers to POPE questions."""
    root = args.root or args.questions.parent
    answers = []
    for row in _read(args.questions, ("question_id", "image", "text")):
        image = _open(root / row["image"])
        try:
            answers.append({"question_id": row["question_id"], "text": answer_question(image, row["text"])})
        except OracleError as err:
            raise CommandError(f"{args.questions}: question_id {row['question_id']!r}: {err}") from err
    write_jsonl(args.out, answers)
    print(f"wrote {len(answers)} answers to {args.out}")
    return 0


def _read(path: Path, required: tuple[str, ...]) -> list[dict]:
    try:
        return read_jsonl(path, required)
    except DataFormatError as err:
        raise CommandError(str(err)) from err


def _open(path: Path) -> Image.Image:
    try:
        return load_image(path)
    except (OSError, ValueError) as err:
        raise CommandError(f"cannot read image {path}: {err}") from err


def score_geneval(args: argparse.Namespace) -> int:
    """``tarkit eval geneval``: GenEval's ``results.jsonl`` rows and scores, judged by the ShapesWorld oracle."""
    rows = []
    try:
        for folder, record, samples in iter_geneval_folder(args.images):
            if not samples:
                raise CommandError(f"{folder}/samples has no .png images")
            for path in samples:
                correct, reason = score_image(_open(path), record)
                rows.append(
                    {
                        "filename": str(path),
                        "tag": record["tag"],
                        "prompt": record["prompt"],
                        "correct": correct,
                        "reason": reason,
                        "metadata": json.dumps(record),
                    }
                )
    except (DataFormatError, OracleError) as err:
        raise CommandError(str(err)) from err
    scores = geneval_scores(rows)
    write_jsonl(args.results or args.images / "results.jsonl", rows)
    out = args.json or args.images / "scores.json"
    out.write_text(json.dumps({"geneval": scores, "num_images": len(rows)}, indent=2) + "\n")
    print(markdown_table(scores, ("GenEval-style (ShapesWorld oracle)", "accuracy")))
    print(f"\n{len(rows)} images; results in {args.results or args.images / 'results.jsonl'}, scores in {out}")
    return 0


def score_pope(args: argparse.Namespace) -> int:
    """``tarkit eval pope``: accuracy, precision, recall, F1 and yes-ratio of POPE answers."""
    questions = args.questions or args.answers.parent / "pope_questions.jsonl"
    try:
        metrics = score_pope_files(questions, args.answers)
    except (DataFormatError, ValueError) as err:
        raise CommandError(str(err)) from err
    if args.json:
        args.json.write_text(json.dumps({"pope": metrics}, indent=2) + "\n")
    print(markdown_table(metrics, ("POPE-style", "value")))
    return 0
