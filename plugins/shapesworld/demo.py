"""``tarkit demo``: train tiny Tar from scratch on ShapesWorld and score it the way the paper scores Tar.

    teacher (SigLIP loss) -> TA-Tok -> pixel VQ -> AR de-tokenizer -> LM (mixed i2t/t2i/i2i/ti2i)
        -> GenEval-style T2I (with and without self-reflection), POPE-style I2T, caption attributes

Every stage is a recipe under ``recipes/tiny/`` run by ``tarkit --root <out> fit``: the recipes name their
inputs and outputs as ``root:`` paths, so with ``<out>`` as the root each stage writes
``<out>/checkpoints/<stage>`` (its logs under ``<out>/runs/<stage>``) and reads the earlier stages from
there, exactly as ``tarkit fit`` does on its own under ``outputs/tiny``. A stage whose folder exists is
reused (``--force`` retrains), so an interrupted demo resumes where it stopped; ``<out>/checkpoints`` is a
Tar bundle (``TextToImage.from_pretrained``). ``--quick`` shrinks every budget for a smoke test. Writes
``report.md``, ``metrics.json`` and ``samples.png`` to ``<out>``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tarkit.ablate import last_logged
from tarkit.cli import main as tarkit_main
from tarkit.commands import CommandError
from tarkit.pipelines import ImageToText, TextToImage
from tarkit.settings import record_generation_defaults
from tarkit_plugins.shapesworld.report import evaluate_i2t, evaluate_t2i, labelled_grid, write_report
from tarkit_plugins.shapesworld.world import SceneSampler

TARGETS = {"geneval": 0.85, "pope": 0.95}


@dataclass(frozen=True)
class Stage:
    """One ``tarkit fit`` of a tiny recipe; ``headline`` is the logged metric its line reports, by preference."""

    name: str
    recipe: str
    steps: int
    quick_steps: int
    headline: tuple[str, ...]


STAGES: tuple[Stage, ...] = (
    Stage("teacher", "teacher.yaml", 400, 20, ("val/retrieval_acc", "train/retrieval_acc")),
    Stage("tatok", "tatok.yaml", 400, 20, ("val/recon_cosine_s1", "train/recon_cosine")),
    Stage("pixel_vq", "pixel_vq.yaml", 600, 20, ("val/psnr", "train/psnr")),
    Stage("ar_detok", "ar_detok.yaml", 400, 20, ("val/psnr", "train/loss")),
    Stage("lm", "lm.yaml", 500, 20, ("val/acc_i2t", "val/loss", "train/loss")),
)


def stage_arguments(stage: Stage, recipes: Path, out: Path, quick: bool) -> list[str]:
    """The ``tarkit`` arguments of a stage: its recipe with ``out`` as the root of its ``root:`` paths."""
    args = [
        "--root",
        str(out),
        "fit",
        "--config",
        str(recipes / stage.recipe),
        f"--trainer.max_steps={stage.quick_steps if quick else stage.steps}",
        "--trainer.enable_progress_bar=false",  # one line per stage instead
        "--trainer.enable_model_summary=false",
    ]
    if quick:
        args += ["--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0"]
    return args


def headline(out: Path, stage: Stage) -> str:
    """The stage's preferred last-logged figure from its CSV log, e.g. ``val/psnr 22.71``."""
    logs = sorted((out / "runs" / stage.name / "csv").glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return "no metrics logged"
    logged = last_logged(logs[-1], "")
    for key in stage.headline:
        if key in logged:
            return f"{key} {logged[key]:.3f}"
    return "no headline metric logged"


def run_stages(recipes: Path, out: Path, quick: bool, force: bool) -> dict[str, float]:
    """Train every stage whose folder is missing (all with ``force``); returns seconds per stage.

    ``<out>/stages.json`` records each stage's budget: a folder trained with another budget (a ``--quick``
    folder met by a full run, or the reverse) is neither reused as if it were this run's nor overwritten.
    """
    record_file = out / "stages.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    seconds = {}
    for stage in STAGES:
        folder = out / "checkpoints" / stage.name
        steps = stage.quick_steps if quick else stage.steps
        trained = record.get(stage.name, {}).get("steps", steps)  # folders from before the record: reuse
        if (folder / "config.json").is_file() and not force:
            if trained == steps:
                print(f"[demo] {stage.name:<9} reused {folder}", flush=True)
                continue
            raise CommandError(
                f"{folder} was trained for {trained} steps, this run asks {steps}; pass --force to retrain it or "
                "choose another --out"
            )
        if not (recipes / stage.recipe).is_file():
            raise CommandError(f"recipe {recipes / stage.recipe} not found; run from the repo root or set --recipes")
        start = time.perf_counter()
        try:
            status = tarkit_main(stage_arguments(stage, recipes, out, quick))
        except SystemExit as err:  # LightningCLI exits on bad arguments; the message is already printed
            status = err.code
        if status:
            recipe = recipes / stage.recipe
            raise CommandError(f"stage {stage.name} failed (exit status {status}); its recipe is {recipe}")
        seconds[stage.name] = round(time.perf_counter() - start, 1)
        record[stage.name] = {"steps": steps, "seconds": seconds[stage.name]}
        record_file.write_text(json.dumps(record, indent=2) + "\n")
        print(f"[demo] {stage.name:<9} {seconds[stage.name]:7.1f} s  {headline(out, stage)}", flush=True)
    return seconds


def evaluate(out: Path, args: argparse.Namespace) -> dict[str, object]:
    checkpoints = out / "checkpoints"
    torch.manual_seed(args.seed)
    t2i = TextToImage.from_pretrained(
        checkpoints, scale=args.scale, cfg_scale=args.cfg_scale, candidates=args.candidates
    )
    i2t = ImageToText(t2i.lm, t2i.tatok, scale=args.scale)
    sampler = SceneSampler("heldout", seed=args.seed + 2024)
    geneval, samples = evaluate_t2i(t2i, sampler, args.prompts, args.batch_size, args.seed)
    pope, caption = evaluate_i2t(i2t, sampler, args.images, args.batch_size)
    labelled_grid(samples[:24]).save(out / "samples.png")
    # The LM folder now says how it was evaluated: the pipelines' defaults when it is loaded again.
    record_generation_defaults(checkpoints / "lm", scale=args.scale, cfg_scale=args.cfg_scale)
    return {"geneval": geneval, "pope": pope, "caption": caption}


def run_demo(args: argparse.Namespace) -> int:
    """Train the missing stages, evaluate, write the report; ``args`` as ``tarkit demo`` parses them."""
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stage_seconds = run_stages(args.recipes, args.out, args.quick, args.force)
    eval_start = time.perf_counter()
    try:
        metrics = evaluate(args.out, args)
    except (ValueError, OSError) as err:  # e.g. a --scale the TA-Tok lacks; trained stages stay reusable
        raise CommandError(f"evaluation failed: {err}") from err
    eval_seconds = round(time.perf_counter() - eval_start, 1)
    print(
        f"[demo] {'evaluate':<9} {eval_seconds:7.1f} s  GenEval-style overall "
        f"{metrics['geneval']['plain']['overall']:.3f}, POPE accuracy {metrics['pope']['accuracy']:.3f}",
        flush=True,
    )
    metrics["run"] = {
        "quick": args.quick,
        "stage_seconds": stage_seconds,
        "eval_seconds": eval_seconds,
        "total_seconds": round(time.perf_counter() - start, 1),
        "prompts": args.prompts,
        "images": args.images,
        "candidates": args.candidates,
        "scale": args.scale,
        "cfg_scale": args.cfg_scale,
        "threads": torch.get_num_threads(),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    report = write_report(args.out, metrics, TARGETS)
    print(report.read_text())
    print(f"[demo] wrote {report}, {args.out / 'metrics.json'} and {args.out / 'samples.png'}")
    return 0
