"""Diffusion de-tokenizer sampling: images per second and seconds per step of tarkit's diffusion de-tokenizer, per
number of sampling steps x batch x guidance.

One path, no baseline (the reference decodes with SANA 600M in a DC-AE latent space, which tarkit does not
have): :meth:`~tarkit_plugins.detok.diffusion.DiffusionDeTokenizer.sample` of a random-weight de-tokenizer from
the same condition features and the same seed, under ``torch.inference_mode()``: noise, then ``steps`` scheduler
steps of one denoiser forward each (guidance as one batch of 2B rows, ``uncond + s * (cond - uncond)`` against
the all-zero condition), then the unfolding to pixels. The step counts of a row are timed round-robin, so load
from other processes falls on all of them alike; seconds per step are a call's median over its steps (the
condition projection and the final unfolding are spread over them, a small share at any step count).

Before timing, two calls with the same seed at the fewest steps check that sampling is deterministic and finite
(the ``sanity:`` line; 1.0 expected).

Presets (the de-tokenizer's own, :data:`tarkit_plugins.detok.diffusion.PRESETS`): ``tiny`` (the demo's: a 5.7M
parameter UNet on 64 px images folded to 16 x 16 x 48, flow matching, 20 steps by default; 36 condition tokens of
width 96, the tiny TA-Tok's pool scale 2), ``tiny-sana`` (the same with a 1.8M parameter SANA transformer) and
``base`` (a 419M parameter UNet at 256 px for 1152-wide paper features, 30 steps by default; 729 condition tokens,
the paper's pool scale 1). ``base`` takes ~3 s per step at batch 1 on one CPU thread, so minutes per row: it is
there for GPUs.

Usage: ``python benchmarks/diffusion_detok_sample.py [--preset tiny|tiny-sana|base] [--steps 5 10 20]
[--batches 1 8] [--cfg 1 3] [--dtype float32|bfloat16] [--device cpu|cuda] [--repeats 3] [--warmup 1]
[--threads N] [--json OUT]``. Results go to ``--json`` or
``benchmarks/results/diffusion_detok_sample_<preset>_<dtype>_<device>.json``. The last line is the images per
second at the preset's default step count (the most steps measured if that one is not), the largest batch and
the lowest guidance scale.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DTYPES,
    add_common_arguments,
    check_common_arguments,
    interleaved,
    machine_facts,
    machine_line,
    median,
    print_table,
    write_results,
)

from tarkit_plugins.detok.diffusion import DiffusionDeTokenizer  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # the demo's de-tokenizer (recipes/tiny/diffusion_detok.yaml): for the test and quick looks
    "tiny": {"condition_dim": 96, "condition_tokens": 36, "steps": [5, 10, 20]},
    "tiny-sana": {"condition_dim": 96, "condition_tokens": 36, "steps": [5, 10, 20]},
    # paper-width conditions at 256 px: too heavy for a CPU run (see the notes above)
    "base": {"condition_dim": 1152, "condition_tokens": 729, "steps": [10, 20, 30, 50]},
}


def build_model(name: str, dtype: torch.dtype, device: str, seed: int) -> DiffusionDeTokenizer:
    torch.manual_seed(seed)
    model = DiffusionDeTokenizer(name, condition_dim=PRESETS[name]["condition_dim"])
    return model.to(device=device, dtype=dtype).eval()


class Row:
    """One (batch, guidance) row: the condition and a seeded sampling call at any step count."""

    def __init__(self, model: DiffusionDeTokenizer, preset: dict[str, Any], batch: int, cfg: float, seed: int):
        self.model, self.cfg, self.seed = model, cfg, seed
        shape = (batch, preset["condition_tokens"], preset["condition_dim"])
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        self.condition = noise.to(next(model.parameters()).device)

    @torch.inference_mode()
    def sample(self, steps: int) -> torch.Tensor:
        generator = torch.Generator(self.condition.device).manual_seed(self.seed)
        return self.model.sample(self.condition, self.cfg, generator, num_steps=steps)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, sorted(PRESETS), "tiny")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="step counts (default: the preset's)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0], help="guidance scales (1: none)")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    if args.steps is not None and min(args.steps) < 1:
        parser.error("--steps must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    preset, dtype = PRESETS[args.preset], DTYPES[args.dtype]
    step_counts = sorted(set(args.steps or preset["steps"]))
    facts = machine_facts(args.device, dtype)
    model = build_model(args.preset, dtype, args.device, args.seed)
    resolved = model.resolved_config()
    print(machine_line(facts))
    print(f"model: {args.preset}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{resolved['backbone']} on {model.image_size} px, {resolved['scheduler']} ({model.num_steps} steps by "
          f"default); {preset['condition_tokens']} condition tokens of width {preset['condition_dim']}")

    rows, results = [], []
    for batch in args.batches:
        for cfg in args.cfg:
            row = Row(model, preset, batch, cfg, args.seed)
            first, second = row.sample(step_counts[0]), row.sample(step_counts[0])
            agreement = (first == second).float().mean().item()
            finite = bool(first.isfinite().all())
            # each step count is a path of its own, so all of them share the same moments of outside load
            paths = {str(steps): partial(row.sample, steps) for steps in step_counts}
            times = interleaved(paths, args.repeats, args.warmup, args.device)
            for steps in step_counts:
                seconds = median(times[str(steps)])
                result = {
                    "batch": batch, "cfg": cfg, "steps": steps, "same_seed_agreement": agreement, "finite": finite,
                    "images_per_s": batch / seconds, "s_per_step": seconds / steps, "s_per_call": seconds,
                    "times_s": times[str(steps)],
                }
                results.append(result)
                rows.append([batch, cfg, steps, seconds, result["s_per_step"], result["images_per_s"]])
    print_table(["batch", "cfg", "steps", "s/call", "s/step", "images/s"], rows)
    agreement = min(r["same_seed_agreement"] for r in results)
    finite = all(r["finite"] for r in results)
    print(f"sanity: same-seed images agree on {agreement:.6f} of pixels (1.0 expected), all finite: {finite}")
    steps = model.num_steps if model.num_steps in step_counts else step_counts[-1]
    headline = next(r for r in results if r["steps"] == steps and r["batch"] == max(args.batches)
                    and r["cfg"] == min(args.cfg))
    payload = {"benchmark": "diffusion_detok_sample", "preset": args.preset, "machine": facts,
               "default_steps": model.num_steps,
               "headline": {key: headline[key] for key in ("steps", "batch", "cfg", "images_per_s")}, "rows": results}
    write_results(payload, args)
    print(f"diffusion images/s at {steps} steps, batch {headline['batch']}: {headline['images_per_s']:.3g}")
    return payload


if __name__ == "__main__":
    main()
