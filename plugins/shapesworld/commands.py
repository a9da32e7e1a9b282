"""``tarkit shapesworld ...`` (make data) and ``tarkit eval ...`` (score GenEval folders and POPE answers)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from tarkit.commands import Command, CommandError
from tarkit.data import DataFormatError, load_image, read_jsonl, write_jsonl
from tarkit.evaluation import (
    geneval_scores,
    iter_geneval_folder,
    markdown_table,
    score_pope_files,
    write_geneval_sample,
)
from tarkit_plugins.shapesworld.oracle import OracleError, answer_question, score_image
from tarkit_plugins.shapesworld.world import SPLITS, SceneSampler, render


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _sampler_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num", type=_positive, default=100, help="number of prompts/images")
    parser.add_argument("--split", choices=sorted(SPLITS), default="heldout", help="colour-shape combinations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")


def _sampler(args: argparse.Namespace) -> SceneSampler:
    try:
        return SceneSampler(args.split, seed=args.seed, size=args.size)
    except ValueError as err:
        raise CommandError(str(err)) from err


class ShapesWorldCommand(Command):
    """``tarkit shapesworld render|prompts|answer``."""

    help = "make ShapesWorld data: rendered scenes, GenEval-style prompts, oracle POPE answers"

    def run(self, argv: list[str], prog: str) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=self.help)
        sub = parser.add_subparsers(dest="action", required=True)
        render_parser = sub.add_parser("render", help="render scenes in GenEval's folder layout + POPE questions")
        _sampler_arguments(render_parser)
        render_parser.add_argument("--out", required=True, type=Path, help="output folder")
        render_parser.add_argument("--questions-per-image", type=_positive, default=2, help="yes and no each")
        prompts_parser = sub.add_parser("prompts", help="write a GenEval-style prompt file (evaluation_metadata)")
        _sampler_arguments(prompts_parser)
        prompts_parser.add_argument("--out", required=True, type=Path, help="output .jsonl file")
        answer_parser = sub.add_parser("answer", help="answer POPE questions with the oracle")
        answer_parser.add_argument("--questions", required=True, type=Path, help="POPE questions .jsonl")
        answer_parser.add_argument("--out", required=True, type=Path, help="answers .jsonl to write")
        answer_parser.add_argument(
            "--root", type=Path, help="folder image paths are relative to (default: the questions file's)"
        )
        args = parser.parse_args(argv)
        return {"render": self.render, "prompts": self.prompts, "answer": self.answer}[args.action](args)

    def render(self, args: argparse.Namespace) -> int:
        sampler = _sampler(args)
        questions = []
        for index in range(args.num):
            example = sampler.example(index)
            folder = write_geneval_sample(args.out, index, example.record, [render(example.scene)])
            image = (folder / "samples" / "0000.png").relative_to(args.out).as_posix()
            for k, (text, label) in enumerate(
                sampler.pope_questions(example, sampler.rng(index, "pope"), args.questions_per_image)
            ):
                questions.append({"question_id": f"{index:05d}-{k}", "image": image, "text": text, "label": label})
        write_jsonl(args.out / "pope_questions.jsonl", questions)
        print(f"wrote {args.num} scenes and {len(questions)} POPE questions to {args.out}")
        return 0

    def prompts(self, args: argparse.Namespace) -> int:
        sampler = _sampler(args)
        write_jsonl(args.out, (sampler.example(i).record for i in range(args.num)))
        print(f"wrote {args.num} GenEval-style prompts to {args.out}")
        return 0

    def answer(self, args: argparse.Namespace) -> int:
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


class EvalCommand(Command):
    """``tarkit eval geneval|pope``: GenEval-style scores by the ShapesWorld oracle, POPE metrics."""

    help = "score generated images (GenEval layout, ShapesWorld oracle) or POPE answers"

    def run(self, argv: list[str], prog: str) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=self.help)
        sub = parser.add_subparsers(dest="benchmark", required=True)
        geneval = sub.add_parser("geneval", help="score a GenEval-layout image folder")
        geneval.add_argument("--images", required=True, type=Path, help="<out> with <00000>/metadata.jsonl, samples/")
        geneval.add_argument("--results", type=Path, help="results.jsonl to write (default: <images>/results.jsonl)")
        geneval.add_argument("--json", type=Path, help="scores JSON to write (default: <images>/scores.json)")
        pope = sub.add_parser("pope", help="score POPE answers against labelled questions")
        pope.add_argument("--answers", required=True, type=Path, help="answers .jsonl: {question_id, text}")
        pope.add_argument(
            "--questions", type=Path, help="questions .jsonl with labels (default: pope_questions.jsonl beside answers)"
        )
        pope.add_argument("--json", type=Path, help="metrics JSON to write")
        args = parser.parse_args(argv)
        return self.geneval(args) if args.benchmark == "geneval" else self.pope(args)

    def geneval(self, args: argparse.Namespace) -> int:
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

    def pope(self, args: argparse.Namespace) -> int:
        questions = args.questions or args.answers.parent / "pope_questions.jsonl"
        try:
            metrics = score_pope_files(questions, args.answers)
        except (DataFormatError, ValueError) as err:
            raise CommandError(str(err)) from err
        if args.json:
            args.json.write_text(json.dumps({"pope": metrics}, indent=2) + "\n")
        print(markdown_table(metrics, ("POPE-style", "value")))
        return 0
