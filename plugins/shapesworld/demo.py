"""``tarkit demo``: train tiny Tar from scratch on ShapesWorld and score it the way the paper scores Tar.

    teacher (SigLIP loss) -> TA-Tok -> pixel VQ -> AR de-tokenizer -> LM (mixed i2t/t2i/i2i/ti2i)
        -> GenEval-style T2I (with and without self-reflection), POPE-style I2T, caption attributes

Every stage is a recipe under ``recipes/tiny/`` run by ``tarkit --root <out> fit``: the recipes name their
inputs and outputs as ``root:`` paths, so with ``<out>`` as the root each stage writes
``<out>/checkpoints/<stage>`` (its logs under ``<out>/runs/<stage>``) and reads the earlier stages from
there, exactly as ``tarkit fit`` does on its own under ``outputs/tiny``. A stage whose folder exists is
reused (``--force`` retrains) and a killed stage goes on from its ``last.ckpt``, so an interrupted demo resumes
where it stopped; ``<out>/checkpoints`` is a
Tar bundle (``TextToImagePipeline.from_pretrained``). ``--quick`` shrinks every budget for a smoke test. Writes
``report.md``, ``metrics.json`` and ``samples.png`` to ``<out>``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from tarkit.cli import main as tarkit_main
from tarkit.commands import CommandError
from tarkit.images import tensor_to_image
from tarkit_plugins.ablate import last_logged
from tarkit_plugins.detok.pixel_vq import PixelVQ
from tarkit_plugins.lm.settings import record_generation_defaults
from tarkit_plugins.pipelines import EditPipeline, ImageToTextPipeline, TextToImagePipeline
from tarkit_plugins.shapesworld.curves import newest_log, plot_stage
from tarkit_plugins.shapesworld.ladder import (
    Rung,
    bag_of_codes,
    batched,
    lowest_failed,
    oracle_pass_rate,
    pooled_features,
    presence_labels,
    probe_accuracy,
    reconstruction_rung,
    render_batch,
    rung,
)
from tarkit_plugins.shapesworld.report import (
    evaluate_edits,
    evaluate_i2t,
    evaluate_t2i,
    geneval_summary,
    labelled_grid,
    write_report,
)
from tarkit_plugins.shapesworld.world import SceneSampler, render


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
    Stage("tatok", "tatok.yaml", 700, 20, ("val/recon_cosine_s1", "train/recon_cosine")),
    Stage("pixel_vq", "pixel_vq.yaml", 1000, 20, ("val/psnr", "train/psnr")),
    Stage("ar_detok", "ar_detok.yaml", 200, 20, ("val/psnr", "train/loss")),
    Stage("lm", "lm.yaml", 450, 20, ("val/acc_i2t", "val/loss", "train/loss")),
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
    log = newest_log(out / "runs" / stage.name)
    if log is None:
        return "no metrics logged"
    logged = last_logged(log, "")
    for key in stage.headline:
        if key in logged:
            return f"{key} {logged[key]:.3f}"
    return "no headline metric logged"


def run_stages(recipes: Path, out: Path, quick: bool, force: bool) -> dict[str, float]:
    """Train every stage whose folder is missing (all with ``force``); returns seconds per stage.

    ``<out>/stages.json`` records each stage's budget when it starts: a folder trained with another budget (a
    ``--quick`` folder met by a full run, or the reverse) is neither reused as if it were this run's nor
    overwritten. A stage killed before its folder was written goes on from its ``last.ckpt`` (``--force``
    starts it again).
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
        last = out / "runs" / stage.name / "checkpoints" / "last.ckpt"
        resume = last.is_file() and not force
        if resume and trained != steps:
            raise CommandError(
                f"{last} is from a run of {trained} steps, this run asks {steps}; pass --force to start the stage "
                "again or choose another --out"
            )
        if resume:
            print(f"[demo] {stage.name:<9} resuming from {last}", flush=True)
        record[stage.name] = {"steps": steps}
        record_file.parent.mkdir(parents=True, exist_ok=True)
        record_file.write_text(json.dumps(record, indent=2) + "\n")
        start = time.perf_counter()
        try:
            status = tarkit_main(stage_arguments(stage, recipes, out, quick) + [f"--ckpt_path={last}"] * resume)
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


# Evaluation scenes are drawn with this seed offset: apart from every training and validation seed the tiny
# recipes use (the datamodule's seed and seed + 1_000_003); tests check by content that none is a training scene.
EVAL_SEED_OFFSET = 2024
PROBE_FIT_SCENES = 2000  # training-split scenes a linear probe is fitted on
PROBE_TEST_SCENES = 300  # test scenes it is scored on
SPLITS_ABOUT = {
    "test": ("train", "new scenes and prompts over the training split's colour-shape combinations (the headline)"),
    "compositional": ("heldout", "the six colour-shape combinations that training never shows"),
}


def evaluation_samplers(seed: int) -> dict[str, SceneSampler]:
    """The samplers of the evaluation splits: ``test`` (the headline) and ``compositional``."""
    return {name: SceneSampler(split, seed=seed + EVAL_SEED_OFFSET) for name, (split, _) in SPLITS_ABOUT.items()}


def evaluate_split(
    t2i: TextToImagePipeline,
    i2t: ImageToTextPipeline,
    edit: EditPipeline,
    sampler: SceneSampler,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    examples = [sampler.example(i) for i in range(max(args.prompts, args.images))]
    rows, samples = evaluate_t2i(t2i, examples[: args.prompts], args.batch_size, args.seed)
    pope, caption = evaluate_i2t(i2t, sampler, examples[: args.images], args.batch_size)
    edits, _ = evaluate_edits(edit, sampler, examples[: args.images], args.batch_size, args.seed)
    return {"geneval": geneval_summary(rows), "pope": pope, "caption": caption, "edit": edits}, samples


def measure_ladder(
    checkpoints: Path, t2i: TextToImagePipeline, test: SceneSampler, results: dict[str, Any], args: argparse.Namespace
) -> list[Rung]:
    """Every rung of the ladder on the test split's scenes (see :mod:`~tarkit_plugins.shapesworld.ladder`)."""
    count = max(args.prompts, args.images, args.probe_scenes)
    examples = [test.example(i) for i in range(count)]
    records = [e.record for e in examples]
    renders = [render(e.scene) for e in examples]
    pixels = render_batch(renders)
    fit_examples = [SceneSampler("train", seed=args.seed).example(i) for i in range(args.probe_fit_scenes)]
    fit_pixels = render_batch([render(e.scene) for e in fit_examples])
    pairs = sorted(test.combos)
    fit_labels, test_labels = presence_labels(fit_examples, pairs), presence_labels(examples, pairs)
    tatok, generator = t2i.tatok, torch.Generator().manual_seed(args.seed)

    def teacher(batch: torch.Tensor) -> np.ndarray:
        return pooled_features(tatok.encoder(batch))

    def codes(batch: torch.Tensor) -> np.ndarray:
        return bag_of_codes(tatok.tokenize(batch, t2i.scale), tatok.num_codes)

    rungs = [rung("renders", "oracle pass rate", *oracle_pass_rate(renders, records), gate=0.99)]
    for name, features, gate in (("teacher", teacher, 0.98), ("TA-Tok codes", codes, 0.95)):
        fit_x, test_x = np.concatenate(batched(features, fit_pixels)), np.concatenate(batched(features, pixels))
        rungs.append(
            rung(name, "probe balanced accuracy", *probe_accuracy(fit_x, fit_labels, test_x, test_labels), gate=gate)
        )
    vq = PixelVQ.from_pretrained(checkpoints / "pixel_vq").eval()
    redrawn = torch.cat(batched(lambda b: vq.decode_indices(vq.encode_indices(b)).clamp(0, 1), pixels))
    rungs.append(reconstruction_rung("pixel VQ", pixels, redrawn, records, gate=0.97))
    round_trip = batched(lambda b: t2i.autoencoder.reconstruct(b, generator=generator).float() / 255, pixels)
    round_trip = torch.cat(round_trip)
    rungs.append(reconstruction_rung("TA-Tok + de-tokenizer", pixels, round_trip, records, gate=0.92))
    geneval = results["geneval"]
    plain = geneval["plain"]["overall"]
    rungs.append(rung("T2I", "GenEval-style overall", plain, geneval["plain"]["overall_stderr"], gate=0.85))
    if "self_reflect" in geneval:
        reflected = geneval["self_reflect"]
        rungs.append(
            rung(
                "T2I self-reflection",
                "GenEval-style overall (gate: plain + 0.02)",
                reflected["overall"],
                reflected["overall_stderr"],
                gate=round(plain + 0.02, 4),
            )
        )
    pope, caption = results["pope"], results["caption"]
    rungs.append(rung("I2T", "POPE accuracy", pope["accuracy"], pope["accuracy_stderr"], gate=0.95))
    rungs.append(rung("I2T captions", "caption exact match", caption["exact"], caption["exact_stderr"], gate=0.80))
    save_comparison_grid_image(pixels[:12], redrawn[:12], round_trip[:12], args.out / "round_trip.png")
    return rungs


def save_comparison_grid_image(originals: torch.Tensor, vq: torch.Tensor, round_trip: torch.Tensor, path: Path) -> Path:
    """Originals over their pixel-VQ reconstructions over their TA-Tok + de-tokenizer round trips."""
    grid = make_grid(torch.cat([originals, vq, round_trip]).clamp(0, 1), nrow=len(originals), padding=2)
    tensor_to_image(grid).resize((grid.shape[2] * 2, grid.shape[1] * 2), Image.Resampling.NEAREST).save(path)
    return path


def evaluate(out: Path, args: argparse.Namespace) -> tuple[dict[str, Any], list[Rung], dict[str, str]]:
    checkpoints = out / "checkpoints"
    torch.manual_seed(args.seed)
    t2i = TextToImagePipeline.from_pretrained(
        checkpoints, scale=args.scale, cfg_scale=args.cfg_scale, candidates=args.candidates
    )
    i2t = ImageToTextPipeline(t2i.lm, t2i.tatok, scale=args.scale)
    # edits are scored as sampled (one candidate), over the same loaded models
    edit = EditPipeline(t2i.lm, t2i.tatok, t2i.autoencoder.detokenizer, scale=args.scale, cfg_scale=args.cfg_scale)
    samplers = evaluation_samplers(args.seed)
    splits, samples = {}, {}
    for name, sampler in samplers.items():
        splits[name], samples[name] = evaluate_split(t2i, i2t, edit, sampler, args)
        splits[name]["about"] = SPLITS_ABOUT[name][1]
    ladder = measure_ladder(checkpoints, t2i, samplers["test"], splits["test"], args)
    labelled_grid(samples["test"][:24]).save(out / "samples.png")
    labelled_grid(samples["compositional"][:12]).save(out / "samples_compositional.png")
    images = {
        "T2I samples (test)": "samples.png",
        "T2I samples (compositional)": "samples_compositional.png",
        "originals / pixel VQ / TA-Tok + de-tokenizer (test)": "round_trip.png",
    }
    for stage in STAGES:
        if plot_stage(out / "runs" / stage.name, out / f"curves_{stage.name}.png", stage.name):
            images[f"curves: {stage.name}"] = f"curves_{stage.name}.png"
    # The LM folder now says how it was evaluated: the pipelines' defaults when it is loaded again.
    record_generation_defaults(checkpoints / "lm", scale=args.scale, cfg_scale=args.cfg_scale)
    return {"splits": splits}, ladder, images


def run_demo(args: argparse.Namespace) -> int:
    """Train the missing stages, evaluate, write the report; ``args`` as ``tarkit demo`` parses them."""
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stage_seconds = run_stages(args.recipes, args.out, args.quick, args.force)
    eval_start = time.perf_counter()
    try:
        metrics, ladder, images = evaluate(args.out, args)
    except (ValueError, OSError) as err:  # e.g. a --scale the TA-Tok lacks; trained stages stay reusable
        raise CommandError(f"evaluation failed: {err}") from err
    eval_seconds = round(time.perf_counter() - eval_start, 1)
    test = metrics["splits"]["test"]
    failed = lowest_failed(ladder)
    print(
        f"[demo] {'evaluate':<9} {eval_seconds:7.1f} s  test: GenEval-style overall "
        f"{test['geneval']['plain']['overall']:.3f}, POPE accuracy {test['pope']['accuracy']:.3f}; "
        + (f"lowest rung below its gate: {failed}" if failed else "every rung meets its gate"),
        flush=True,
    )
    metrics["ladder"] = [r.as_dict() for r in ladder]
    metrics["lowest_failed_rung"] = failed
    metrics["run"] = {
        "quick": args.quick,
        "stage_seconds": stage_seconds,
        "eval_seconds": eval_seconds,
        "total_seconds": round(time.perf_counter() - start, 1),
        "prompts": args.prompts,
        "images": args.images,
        "pope_questions": 4 * args.images,
        "candidates": args.candidates,
        "scale": args.scale,
        "cfg_scale": args.cfg_scale,
        "threads": torch.get_num_threads(),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    report = write_report(args.out, metrics, ladder, images)
    print(report.read_text())
    print(f"[demo] wrote {report}, {args.out / 'metrics.json'} and the pictures it shows")
    return 0
