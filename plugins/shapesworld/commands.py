"""``tarkit shapesworld ...`` (make data), ``tarkit eval ...`` (score GenEval folders and POPE answers) and
``tarkit demo`` (train and score tiny Tar).

Only argument parsing lives here: ``tarkit --help`` imports this module to list the commands, so what the
commands do (and torch with it) is imported when one runs (:mod:`~tarkit_plugins.shapesworld.actions`,
:mod:`~tarkit_plugins.shapesworld.demo`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tarkit.commands import Command, CommandError
from tarkit_plugins.shapesworld.world import SPLITS


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
        from tarkit_plugins.shapesworld import actions

        action = {"render": actions.render_scenes, "prompts": actions.write_prompts, "answer": actions.answer_questions}
        return action[args.action](args)


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
        from tarkit_plugins.shapesworld import actions

        return actions.score_geneval(args) if args.benchmark == "geneval" else actions.score_pope(args)


class DemoCommand(Command):
    """``tarkit demo [--quick]``: see :mod:`tarkit_plugins.shapesworld.demo`."""

    help = "train tiny Tar from scratch on ShapesWorld (CPU) and write a paper-style report"

    def run(self, argv: list[str], prog: str) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=self.help)
        parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (the stages' root)")
        parser.add_argument("--recipes", type=Path, default=Path("recipes/tiny"), help="folder of the stage recipes")
        parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test, not a result")
        parser.add_argument("--force", action="store_true", help="retrain stages whose folders exist")
        parser.add_argument("--prompts", type=int, help="GenEval-style prompts per split (default 120, quick 6)")
        parser.add_argument(
            "--images", type=int, help="images per split for POPE (4 questions each) and captions (default 80, quick 4)"
        )
        parser.add_argument(
            "--probe-fit-scenes", type=int, help="training scenes a probe is fitted on (2000, quick 200)"
        )
        parser.add_argument("--probe-scenes", type=int, help="test scenes a probe is scored on (300, quick 40)")
        parser.add_argument("--candidates", type=int, default=4, help="self-reflection candidates per prompt")
        parser.add_argument("--scale", type=int, default=2, help="pool scale of generated and read images")
        parser.add_argument("--cfg-scale", type=float, default=3.0, help="LM classifier-free guidance")
        parser.add_argument("--batch-size", type=int, default=16)
        parser.add_argument("--seed", type=int, default=0)
        args = parser.parse_args(argv)
        defaults = {"prompts": (120, 6), "images": (80, 4), "probe_fit_scenes": (2000, 200), "probe_scenes": (300, 40)}
        for name, (full, quick) in defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, quick if args.quick else full)
        if min(args.prompts, args.images, args.candidates, args.batch_size) < 1:
            raise CommandError("--prompts, --images, --candidates and --batch-size must be positive")
        if min(args.probe_fit_scenes, args.probe_scenes) < 20:
            raise CommandError("--probe-fit-scenes and --probe-scenes must be at least 20")
        from tarkit_plugins.shapesworld.demo import run_demo

        return run_demo(args)
