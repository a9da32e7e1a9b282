"""Peak memory of T2I generation at Tar-1.5B's shape in fp32 and bf16: the weights, the peaks while building the LM
and while generating image tokens with and without guidance, and the KV cache a 729-token image needs.

The LM is :class:`~tarkit_plugins.lms.HFCausalLM`'s ``qwen2.5-1.5b`` preset (Qwen2.5-1.5B-Instruct's shape, random
weights) with the real Qwen2 tokenizer expanded by 65,536 image tokens, built directly in each precision
(``config={"dtype": ...}``, so bf16 never holds an fp32 copy of the model); ``tiny`` is the demo's LM
(``recipes/tiny/lm.yaml``: 128 wide, 1,024 image tokens), for the test. Generation is ``t2i_generate.py``'s ``Row``:
``--tokens`` image tokens for one prompt with the reference's sampling, at cfg 1 (one row) and at ``--cfg``
(conditional and unconditional prompts as one batch of two rows).

Every peak is counted from what the process held just before the build (Python, torch, the libraries' code), so
that CPU and CUDA figures compare:

* CPU (default): the process's resident memory. On Linux, writing ``5`` to ``/proc/self/clear_refs`` resets its
  high-water mark (``VmHWM`` in ``/proc/self/status``) at the start of each phase. Where that fails,
  ``getrusage``'s ``ru_maxrss`` stands in; it cannot be reset, so each phase reads the peak since the process
  started (an upper bound for all but the first). Before each phase freed memory goes back to the system
  (``malloc_trim`` on glibc), so that pages the previous phase freed are not counted again.
* CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``: tensors only,
  not the CUDA context or the allocator's cache. The LM is built on the CPU and moved, so the build peak is its
  weights.

Weights bytes are the parameter count times the element size. The KV cache at 729 tokens is computed, not
measured (the few generated tokens leave a negligible cache): 2 (keys and values) x layers x KV heads x head dim
x 729 x element size, per row; guidance runs two rows. GB are 10^9 bytes.

Usage: ``python benchmarks/memory.py [--preset qwen2.5-1.5b|tiny] [--tokens 8] [--cfg 3] [--device cpu|cuda]
[--threads N] [--json OUT]``. The last line is the generation peak (the larger of the two guidance settings) in
each precision.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory, machine_facts, print_table, write_results  # noqa: E402
from t2i_generate import Row  # noqa: E402

from tarkit_plugins.lms import HFCausalLM  # noqa: E402

# HFCausalLM presets and the image tokens they are expanded by.
PRESETS: dict[str, dict[str, Any]] = {
    # the demo's LM (recipes/tiny/lm.yaml): for the test
    "tiny": {"lm": "tiny", "codes": 1024},
    # Tar-1.5B: Qwen2.5-1.5B-Instruct expanded by TA-Tok's 65,536 codes
    "qwen2.5-1.5b": {"lm": "qwen2.5-1.5b", "codes": 65536},
}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
KV_TOKENS = 729  # an image at scale 1 (384 px)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-1.5b")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    parser.add_argument("--tokens", type=int, default=8, help="image tokens generated per phase")
    parser.add_argument("--cfg", type=float, default=3.0, help="the guided phase's guidance scale (not 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="results file (default: benchmarks/results/<name>.json)")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.cfg == 1:
        parser.error("--tokens must be >= 1 and --cfg other than 1 (cfg 1 is always measured)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here; run on cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def build_lm(preset: dict[str, Any], dtype: torch.dtype, device: str, seed: int) -> HFCausalLM:
    """The preset's LM with its image vocabulary, random weights built in ``dtype``."""
    torch.manual_seed(seed)
    lm = HFCausalLM(preset=preset["lm"], config={"dtype": dtype}, num_codes=preset["codes"])
    return lm.to(device).eval()


def kv_cache_bytes(lm: HFCausalLM, tokens: int) -> int:
    """Keys and values of ``tokens`` positions in every layer, for one row."""
    config = lm.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(lm.parameters()).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * element


def measure(preset: dict[str, Any], dtype: torch.dtype, args: argparse.Namespace, memory: PeakMemory) -> dict[str, Any]:
    """Build the LM in ``dtype`` and generate at cfg 1 and at ``args.cfg``; the peaks above the pre-build baseline."""
    baseline = memory.start()
    lm = build_lm(preset, dtype, args.device, args.seed)
    build_peak = memory.peak() - baseline
    parameters = sum(p.numel() for p in lm.parameters())
    generation = []
    for cfg in (1.0, args.cfg):
        row = Row(lm, 1, cfg, args.tokens, args.seed)
        memory.start()
        row.tarkit()
        generation.append({"cfg": cfg, "rows": 1 if cfg == 1 else 2, "peak_bytes": memory.peak() - baseline})
    figures = {
        "parameters": parameters, "weights_bytes": parameters * next(lm.parameters()).element_size(),
        "baseline_bytes": baseline, "build_peak_bytes": build_peak, "generation": generation,
        "generation_peak_bytes": max(g["peak_bytes"] for g in generation),
        f"kv_cache_{KV_TOKENS}_bytes_per_row": kv_cache_bytes(lm, KV_TOKENS),
    }
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    facts = machine_facts(args.device)
    memory = PeakMemory(args.device)
    print(f"machine: {facts['cpu']}, {facts['threads']} threads, torch {facts['torch']}; peaks from {memory.method}")
    results = {name: measure(preset, dtype, args, memory) for name, dtype in PRECISIONS.items()}
    print(f"model: {args.preset}, {results['fp32']['parameters'] / 1e6:.0f}M parameters, {preset['codes']} image "
          f"tokens; T2I batch 1, {args.tokens} tokens, cfg 1 and {args.cfg:g}; peaks above the pre-build baseline")
    gb = 1e9
    print_table(
        ["dtype", "weights GB", "build peak GB", "T2I peak GB cfg 1", f"T2I peak GB cfg {args.cfg:g}",
         f"KV cache GB at {KV_TOKENS} tokens, per row"],
        [[name, r["weights_bytes"] / gb, r["build_peak_bytes"] / gb, r["generation"][0]["peak_bytes"] / gb,
          r["generation"][1]["peak_bytes"] / gb, r[f"kv_cache_{KV_TOKENS}_bytes_per_row"] / gb]
         for name, r in results.items()],
    )
    payload = {
        "benchmark": "memory", "preset": args.preset, "machine": facts, "method": memory.method,
        "tokens": args.tokens, "cfg": args.cfg, "precisions": results,
    }
    write_results(payload, args)
    print(f"T2I peak memory at {args.preset}: fp32 {results['fp32']['generation_peak_bytes'] / gb:.1f} GB, "
          f"bf16 {results['bf16']['generation_peak_bytes'] / gb:.1f} GB")
    return payload


if __name__ == "__main__":
    main()
