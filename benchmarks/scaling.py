"""Scale-adaptive tokens: what Tar's coarser scales save in T2I generation and I2T answering, at 729, 169 and 81
image tokens on one LM.

TA-Tok pools the 27x27 grid of a 384 px image by 1, 2 or 3 (the paper's scales 1/2/3: 729, 169 and 81 tokens);
the LM then writes or reads that many image tokens. On one random-weight Qwen2 (``t2i_generate.py``'s presets and
``build_lm``: the real Qwen2 tokenizer expanded by the preset's image tokens), for each count:

* T2I: seconds to generate one image's tokens with :func:`tarkit_plugins.lm.generation.generate_image_codes`, batch
  1, no guidance (cfg 1), the reference's sampling, after ``<im_start><S{k}>`` with the scale's ``k``. At the 0.5b
  shape 729 tokens take minutes on a CPU, so ``--t2i-tokens-measured N`` times only N tokens and extrapolates:
  the seconds over N tokens divided by N, times the count (the table says "measured over N tokens"). The
  extrapolation leaves out that later steps attend over a longer cache (it reads low) and counts the prompt's
  prefill once per N tokens instead of once per image (it reads high, the more so the smaller N).
  When N is below every count, all rows time the same N steps, so the T2I ratio is the count ratio up to noise.
* I2T: :func:`tarkit_plugins.lm.generation.generate_text` on the chat with that many image tokens and a question
  (built as in ``i2t_answer.py``), greedy, image tokens banned, no early stop: the time to first token (the prefill
  and one pick, ``max_new_tokens=1``) and the time to answer ``--answer-tokens`` (16) tokens, prefill included.

The calls take turns in every repeat (``common.interleaved``); the figures are medians. A plot of the three times
against the image tokens goes to ``benchmarks/results/scaling_<preset>.png`` (``--plot``).

Usage: ``python benchmarks/scaling.py [--preset tiny|small|0.5b] [--image-tokens 729 169 81]
[--t2i-tokens-measured N] [--answer-tokens 16] [--repeats 3] [--warmup 1]``. The last line is the cost of the
most image tokens over that of the fewest: T2I seconds per image and I2T time to first token.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import torch

matplotlib.use("Agg")  # files only: no display on a CI machine
import matplotlib.pyplot as plt  # noqa: E402 (the backend is chosen first)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DTYPES,
    RESULTS,
    add_common_arguments,
    check_common_arguments,
    interleaved,
    machine_facts,
    machine_line,
    median,
    print_table,
    write_results,
)
from i2t_answer import QUESTION  # noqa: E402
from t2i_generate import PRESETS, PROMPT, SAMPLING, build_lm  # noqa: E402

from tarkit.prompts import image_ids, user_prefix  # noqa: E402
from tarkit_plugins.lm.generation import generate_image_codes, generate_text  # noqa: E402
from tarkit_plugins.lms import HFCausalLM  # noqa: E402

# The paper's image tokens at 384 px and the index k of the <S{k}> token that opens an image of that scale.
SCALE_INDEX = {729: 0, 169: 1, 81: 2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, sorted(PRESETS), "small")
    parser.add_argument("--image-tokens", type=int, nargs="+", default=[729, 169, 81],
                        help="image tokens per image (the paper's scales 1/2/3: 729/169/81)")
    parser.add_argument("--t2i-tokens-measured", type=int, default=None,
                        help="T2I tokens timed per image, extrapolated to the count (default: all of them)")
    parser.add_argument("--answer-tokens", type=int, default=16, help="I2T answer tokens")
    parser.add_argument("--plot", default=None, help="plot file (default: benchmarks/results/scaling_<preset>.png)")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    if min(args.image_tokens) < 1 or args.answer_tokens < 1:
        parser.error("--image-tokens and --answer-tokens must be >= 1")
    if args.t2i_tokens_measured is not None and args.t2i_tokens_measured < 1:
        parser.error("--t2i-tokens-measured must be >= 1")
    return args


def t2i_call(lm: HFCausalLM, image_tokens: int, tokens: int, seed: int) -> Callable[[], torch.Tensor]:
    """Generate ``tokens`` image tokens of an ``image_tokens``-token image for one prompt, without guidance."""
    ids = torch.tensor([user_prefix(lm.tokenizer, [PROMPT])], device=next(lm.parameters()).device)
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def call() -> torch.Tensor:
        return generate_image_codes(
            lm, lm.vocab, ids, mask, num_tokens=tokens, scale_index=SCALE_INDEX.get(image_tokens, 0),
            generator=torch.Generator(ids.device).manual_seed(seed), **SAMPLING,
        )

    return call


def i2t_prompt(lm: HFCausalLM, image_tokens: int, seed: int) -> torch.Tensor:
    """The chat with ``image_tokens`` random image tokens and the question, ``[1, T]``."""
    vocab = lm.vocab
    codes = torch.randint(vocab.num_codes, (image_tokens,), generator=torch.Generator().manual_seed(seed))
    prompt = user_prefix(lm.tokenizer, [image_ids(vocab, codes), "\n" + QUESTION])
    return torch.tensor([prompt], device=next(lm.parameters()).device)


def i2t_call(lm: HFCausalLM, prompt: torch.Tensor, tokens: int) -> Callable[[], list[list[int]]]:
    """Answer ``prompt`` with exactly ``tokens`` text tokens, greedily (no eos, image tokens banned)."""
    mask = torch.ones_like(prompt)
    banned = (lm.vocab.im_start, lm.vocab.image_end)

    @torch.inference_mode()
    def call() -> list[list[int]]:
        return generate_text(lm, prompt, mask, tokens, eos_token_ids=[], banned_token_ids=banned)

    return call


def plot(rows: list[dict[str, Any]], preset: str, out: Path) -> Path:
    """T2I seconds per image (left) and the I2T times (right) against the image tokens, as a PNG."""
    counts = [r["image_tokens"] for r in rows]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    axes[0].plot(counts, [r["t2i_s_per_image"] for r in rows], marker="o", label="T2I s/image")
    axes[1].plot(counts, [r["i2t_ttft_s"] for r in rows], marker="o", label="time to first token")
    answer = f"{rows[0]['answer_tokens']}-token answer"
    axes[1].plot(counts, [r["i2t_answer_s"] for r in rows], marker="o", label=answer)
    for ax, title in ((axes[0], "T2I: generate one image"), (axes[1], "I2T: answer about one image")):
        ax.set_title(f"{preset}, {title}")
        ax.set_xlabel("image tokens")
        ax.set_ylabel("s")
        ax.set_ylim(bottom=0)
        ax.set_xticks(counts)
        ax.legend(fontsize=7)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    preset, dtype = PRESETS[args.preset], DTYPES[args.dtype]
    facts = machine_facts(args.device, dtype)
    lm = build_lm(preset, dtype, args.device, args.seed)
    measured = {n: min(n, args.t2i_tokens_measured or n) for n in args.image_tokens}
    prompts = {n: i2t_prompt(lm, n, args.seed) for n in args.image_tokens}
    paths: dict[str, Callable[[], Any]] = {}
    for n in args.image_tokens:
        paths[f"t2i_{n}"] = t2i_call(lm, n, measured[n], args.seed)
        paths[f"ttft_{n}"] = i2t_call(lm, prompts[n], 1)
        paths[f"answer_{n}"] = i2t_call(lm, prompts[n], args.answer_tokens)
    times = interleaved(paths, args.repeats, args.warmup, args.device)
    print(machine_line(facts))
    print(f"model: {args.preset}, {sum(p.numel() for p in lm.parameters()) / 1e6:.0f}M parameters, "
          f"{lm.vocab.num_codes} image tokens; T2I batch 1, cfg 1; I2T answer {args.answer_tokens} tokens")

    rows = []
    for n in args.image_tokens:
        t2i_per_token = median(times[f"t2i_{n}"]) / measured[n]
        rows.append({
            "image_tokens": n, "scale_index": SCALE_INDEX.get(n, 0), "t2i_tokens_measured": measured[n],
            "t2i_s_per_token": t2i_per_token, "t2i_s_per_image": t2i_per_token * n,
            "i2t_prompt_tokens": prompts[n].shape[1], "i2t_ttft_s": median(times[f"ttft_{n}"]),
            "answer_tokens": args.answer_tokens, "i2t_answer_s": median(times[f"answer_{n}"]),
        })
    print_table(
        ["image tokens", "T2I s/image", "T2I measured over", "I2T prompt tokens", "I2T TTFT s", "I2T answer s"],
        [[r["image_tokens"], r["t2i_s_per_image"], f"{r['t2i_tokens_measured']} tokens", r["i2t_prompt_tokens"],
          r["i2t_ttft_s"], r["i2t_answer_s"]] for r in rows],
    )
    most = max(rows, key=lambda r: r["image_tokens"])
    fewest = min(rows, key=lambda r: r["image_tokens"])
    payload = {
        "benchmark": "scaling", "preset": args.preset, "machine": facts, "rows": rows, "times_s": times,
        "t2i_ratio": most["t2i_s_per_image"] / fewest["t2i_s_per_image"],
        "ttft_ratio": most["i2t_ttft_s"] / fewest["i2t_ttft_s"],
        "answer_ratio": most["i2t_answer_s"] / fewest["i2t_answer_s"],
    }
    figure = plot(rows, args.preset, Path(args.plot) if args.plot else RESULTS / f"scaling_{args.preset}.png")
    print(f"plot: {figure}")
    write_results(payload, args)
    print(f"T2I cost {most['image_tokens']} vs {fewest['image_tokens']} tokens: {payload['t2i_ratio']:.2f}x; "
          f"I2T time to first token: {payload['ttft_ratio']:.2f}x")
    return payload


if __name__ == "__main__":
    main()
