"""I2T answering: time to first token and decoding speed for a question about a 729-token image, tarkit's
text generation against Hugging Face ``generate``.

Both paths answer the same prompt (the chat with 729 image tokens and a question, as the pipelines build it)
on the same random-weight Qwen2 (shapes of ``t2i_generate.py``), greedily, with the image and scale tokens
banned from the answer and no early stop (``min_new_tokens``), so that both produce exactly ``--tokens`` tokens:

* ``tarkit``: :func:`tarkit_plugins.lm.generation.generate_text` over the LM's incremental decoder.
* ``hf``: ``model.generate`` (its linears plain ``nn.Linear``) with a logits processor that bans the same ids.

Time to first token is one call with ``max_new_tokens=1`` (the prefill of the ~760-token prompt and one pick);
decoding speed is ``(tokens - 1) / (t(tokens) - t(1))``. The ``sanity:`` line compares the greedy answers.

Usage: ``python benchmarks/i2t_answer.py [--preset tiny|small|0.5b] [--image-tokens 729] [--tokens 32]``. The
last line is tarkit's decoding speed over Hugging Face's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

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
from t2i_generate import PRESETS, build_lm, plain_linears  # noqa: E402

from tarkit.prompts import image_ids, user_prefix  # noqa: E402
from tarkit_plugins.lm.generation import generate_text  # noqa: E402

QUESTION = "What is in the image?"


class BannedRange(LogitsProcessor):
    """Hugging Face's side of the constraint: the ids in ``[start, end)`` get ``-inf``."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.start : self.end] = float("-inf")
        return scores


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, sorted(PRESETS), "small")
    parser.add_argument("--image-tokens", type=int, default=729, help="image tokens in the prompt (729/169/81)")
    parser.add_argument("--tokens", type=int, default=32, help="answer tokens per call")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    if args.tokens < 2:
        parser.error("--tokens must be >= 2 (decoding speed is measured past the first token)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    preset, dtype = PRESETS[args.preset], DTYPES[args.dtype]
    facts = machine_facts(args.device, dtype)
    lm = build_lm(preset, dtype, args.device, args.seed)
    vocab, tok = lm.vocab, lm.tokenizer
    codes = torch.randint(vocab.num_codes, (args.image_tokens,), generator=torch.Generator().manual_seed(args.seed))
    prompt = torch.tensor([user_prefix(tok, [image_ids(vocab, codes), "\n" + QUESTION])], device=args.device)
    mask = torch.ones_like(prompt)
    banned = (vocab.im_start, vocab.image_end)
    processor = LogitsProcessorList([BannedRange(*banned)])

    @torch.inference_mode()
    def tarkit(tokens: int) -> list[int]:
        return generate_text(lm, prompt, mask, tokens, eos_token_ids=[], banned_token_ids=banned)[0]

    @torch.inference_mode()
    def hf(tokens: int) -> list[int]:
        out = plain_linears(lm.model).generate(
            input_ids=prompt, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
            logits_processor=processor, pad_token_id=tok.pad_token_id, eos_token_id=None,
        )
        return out[0, prompt.shape[1] :].tolist()

    agreement = sum(a == b for a, b in zip(tarkit(args.tokens), hf(args.tokens), strict=True)) / args.tokens
    paths = {
        "tarkit_first": lambda: tarkit(1), "hf_first": lambda: hf(1),
        "tarkit_all": lambda: tarkit(args.tokens), "hf_all": lambda: hf(args.tokens),
    }
    times = {name: median(t) for name, t in interleaved(paths, args.repeats, args.warmup, args.device).items()}
    figures = {}
    for path in ("tarkit", "hf"):
        first, total = times[f"{path}_first"], times[f"{path}_all"]
        figures[path] = {"ttft_s": first, "decode_tokens_per_s": (args.tokens - 1) / max(total - first, 1e-9)}
    print(machine_line(facts))
    print(f"prompt: {prompt.shape[1]} tokens ({args.image_tokens} image tokens); answer: {args.tokens} tokens")
    print_table(
        ["path", "time to first token s", "decode tokens/s"],
        [[p, f["ttft_s"], f["decode_tokens_per_s"]] for p, f in figures.items()],
    )
    print(f"sanity: greedy answers agree on {agreement:.6f} of tokens (1.0 expected)")
    payload = {
        "benchmark": "i2t_answer", "preset": args.preset, "machine": facts, "prompt_tokens": prompt.shape[1],
        "answer_tokens": args.tokens, "greedy_agreement": agreement, "paths": figures, "times_s": times,
        "ttft_ratio": figures["hf"]["ttft_s"] / figures["tarkit"]["ttft_s"],
        "decode_ratio": figures["tarkit"]["decode_tokens_per_s"] / figures["hf"]["decode_tokens_per_s"],
    }
    write_results(payload, args)
    print(f"time to first token, hf/tarkit: {payload['ttft_ratio']:.2f}x")
    print(f"tarkit/hf decoding speed ratio: {payload['decode_ratio']:.2f}x")
    return payload


if __name__ == "__main__":
    main()
