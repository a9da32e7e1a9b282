"""T2I image-token decoding: tarkit's constrained generation against Hugging Face ``generate``, per row of
shape x batch x guidance, with each row's memory-bandwidth floor.

Both paths sample the same image span from the same random-weight Qwen2 (the real Qwen2 tokenizer, expanded by
``<im_start>``, ``<im_end>``, ``<S0>..<S2>`` and 65,536 image tokens) with the reference's sampling
(temperature 1, top-k 1200, top-p 0.95) at one precision:

* ``tarkit``: :func:`tarkit_plugins.lm.generation.generate_image_codes`: the LM's incremental decoder (its
  linears through :mod:`tarkit.cpu_linear`), logits of the head's image rows only, guidance as one
  batch of 2B rows.
* ``hf``: ``model.generate`` (its linears plain ``nn.Linear``) after the same ``<im_start><S0>`` prompt, a
  logits processor that leaves only the image tokens, ``min_new_tokens = max_new_tokens``; guidance is Hugging
  Face's own ``guidance_scale`` with the unconditional prompt as ``negative_prompt_ids`` (a second, unbatched
  forward per step).

Before timing, greedy decoding of a few tokens checks that both paths pick the same tokens (the ``sanity:``
line). The bandwidth floor of a step is the bytes tarkit must read per step (every decoder weight and the
image rows of the head, once for the whole batch) over the read bandwidth measured in the same run.

Usage: ``python benchmarks/t2i_generate.py [--preset tiny|small|0.5b] [--batches 1 8] [--cfg 1 3] [--tokens N]
[--dtype float32|bfloat16] [--device cpu|cuda] [--repeats 2] [--warmup 1]``. The last line is the smallest
tarkit/hf speed ratio over the rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
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

from tarkit.cpu_linear import CPULinear  # noqa: E402
from tarkit.prompts import user_prefix  # noqa: E402
from tarkit_plugins.lm.generation import generate_image_codes  # noqa: E402
from tarkit_plugins.lms import HFCausalLM  # noqa: E402
from tarkit_plugins.pipelines import left_pad  # noqa: E402

# Qwen2 shapes; the vocabulary follows the tokenizer (151,665 text tokens) plus the image vocabulary.
PRESETS: dict[str, dict[str, Any]] = {
    # the CPU miniature's LM with the paper's 65,536 image tokens: for the test and quick looks
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "codes": 1024, "tokens": 16},
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 2, "codes": 65536, "tokens": 48},
    # Qwen2.5-0.5B-Instruct's shape
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "rope_theta": 1_000_000.0, "codes": 65536, "tokens": 24},
}
PROMPT = "a red circle to the left of a blue square"
SAMPLING = {"temperature": 1.0, "top_k": 1200, "top_p": 0.95}  # the reference's


class ImageTokensOnly(LogitsProcessor):
    """Hugging Face's side of the constraint: every token outside the image rows gets ``-inf``."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, : self.start] = float("-inf")
        scores[:, self.end :] = float("-inf")
        return scores


def plain_linears(model: nn.Module) -> nn.Module:
    """The model as Hugging Face runs it: tarkit's decoder turns its linears into ``CPULinear`` (the same
    weights, faster kernels on CPU in fp32) when it decodes; the baseline gets them back as ``nn.Linear``."""
    for module in model.modules():
        if type(module) is CPULinear:
            module.__class__ = nn.Linear
    return model


def build_lm(preset: dict[str, Any], dtype: torch.dtype, device: str, seed: int) -> HFCausalLM:
    torch.manual_seed(seed)
    shape = {k: v for k, v in preset.items() if k not in ("codes", "tokens")}
    lm = HFCausalLM(preset=None, config={**shape, "tie_word_embeddings": True}, num_codes=preset["codes"])
    # New image rows start as the mean text row: all equal, every logit of the span would tie. A trained Tar's
    # rows differ, so give them random values like the rest of the random weights.
    with torch.no_grad():
        rows = lm.model.get_input_embeddings().weight[lm.vocab.image_start : lm.vocab.image_end]
        rows.normal_(0.0, lm.model.config.initializer_range)
    return lm.to(device=device, dtype=dtype).eval()


def streamed_bytes(lm: HFCausalLM) -> int:
    """What one decoding step must read: every weight of the decoder stack and the head's image rows."""
    model = lm.model
    decoder = sum(p.numel() * p.element_size() for n, p in model.model.named_parameters() if "embed_tokens" not in n)
    head = model.get_output_embeddings().weight
    return decoder + lm.vocab.num_codes * head.shape[1] * head.element_size()


@torch.inference_mode()
def precision_agreement(lm: HFCausalLM, reference: HFCausalLM, tokens: int, seed: int) -> float:
    """Share of the image positions where ``lm`` (e.g. bf16) picks the same next code as ``reference`` (fp32),
    both reading the reference's own greedy image, so that one early difference does not shift every later one.
    On random weights the image logits lie close together, so this reads lower than on a trained model."""
    row = Row(reference, 1, 1.0, tokens, seed)
    codes = row.tarkit(greedy=True)
    ids = torch.cat([row.hf_ids, reference.vocab.codes_to_ids(codes)], dim=1)
    rows = slice(reference.vocab.image_start, reference.vocab.image_end)
    span = slice(row.hf_ids.shape[1] - 1, -1)  # the positions that predict the image's codes
    picks = [model(ids)[0, span, rows].argmax(-1) for model in (lm, reference)]
    return (picks[0] == picks[1]).float().mean().item()


class Row:
    """One (batch, guidance) row: the prompts and both paths' calls."""

    def __init__(self, lm: HFCausalLM, batch: int, cfg: float, tokens: int, seed: int):
        tok, vocab, device = lm.tokenizer, lm.vocab, next(lm.parameters()).device
        self.lm, self.cfg, self.tokens, self.seed = lm, cfg, tokens, seed
        self.ids, self.mask = (t.to(device) for t in left_pad([user_prefix(tok, [PROMPT])] * batch, tok.pad_token_id))
        self.uncond_ids, self.uncond_mask = (t.to(device) for t in left_pad([user_prefix(tok, [""])], tok.pad_token_id))
        opening = torch.tensor([[vocab.im_start, vocab.scale_ids[0]]], device=device)
        self.hf_ids = torch.cat([self.ids, opening.expand(batch, -1)], dim=1)
        self.hf_mask = torch.cat([self.mask, torch.ones_like(opening).expand(batch, -1)], dim=1)
        self.hf_uncond = torch.cat([self.uncond_ids, opening], dim=1).expand(batch, -1)
        self.hf_uncond_mask = torch.cat([self.uncond_mask, torch.ones_like(opening)], dim=1).expand(batch, -1)
        self.processor = LogitsProcessorList([ImageTokensOnly(vocab.image_start, vocab.image_end)])

    @torch.inference_mode()
    def tarkit(self, tokens: int | None = None, greedy: bool = False) -> torch.Tensor:
        sampling = {"temperature": 0.0, "top_k": None, "top_p": None} if greedy else SAMPLING
        return generate_image_codes(
            self.lm, self.lm.vocab, self.ids, self.mask, num_tokens=tokens or self.tokens, scale_index=0,
            cfg_scale=self.cfg, uncond_input_ids=self.uncond_ids, uncond_attention_mask=self.uncond_mask,
            generator=torch.Generator(self.ids.device).manual_seed(self.seed), **sampling,
        )

    @torch.inference_mode()
    def hf(self, tokens: int | None = None, greedy: bool = False) -> torch.Tensor:
        tokens = tokens or self.tokens
        sampling = {"do_sample": False} if greedy else {"do_sample": True, **SAMPLING}
        guidance = (
            {"guidance_scale": self.cfg, "negative_prompt_ids": self.hf_uncond,
             "negative_prompt_attention_mask": self.hf_uncond_mask}
            if self.cfg != 1 else {}
        )
        out = plain_linears(self.lm.model).generate(
            input_ids=self.hf_ids, attention_mask=self.hf_mask, max_new_tokens=tokens, min_new_tokens=tokens,
            logits_processor=self.processor, pad_token_id=self.lm.tokenizer.pad_token_id, eos_token_id=None,
            **sampling, **guidance,
        )
        return self.lm.vocab.ids_to_codes(out[:, self.hf_ids.shape[1] :])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, sorted(PRESETS), "small")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0], help="guidance scales (1: none)")
    parser.add_argument("--tokens", type=int, default=None, help="image tokens per call (default: the preset's)")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    preset, dtype = PRESETS[args.preset], DTYPES[args.dtype]
    tokens = args.tokens or preset["tokens"]
    facts = machine_facts(args.device, dtype)
    lm = build_lm(preset, dtype, args.device, args.seed)
    step_bytes = streamed_bytes(lm)
    floor_ms = step_bytes / (facts["read_bandwidth_gbs"] * 1e9) * 1e3
    print(machine_line(facts))
    print(f"model: {args.preset}, {sum(p.numel() for p in lm.parameters()) / 1e6:.0f}M parameters, "
          f"{lm.vocab.num_codes} image tokens; {step_bytes / 1e6:.0f} MB read per step -> floor {floor_ms:.1f} ms/step")

    rows, results = [], []
    for batch in args.batches:
        for cfg in args.cfg:
            row = Row(lm, batch, cfg, tokens, args.seed)
            agreement = (row.tarkit(4, greedy=True) == row.hf(4, greedy=True)).float().mean().item()
            times = interleaved({"tarkit": row.tarkit, "hf": row.hf}, args.repeats, args.warmup, args.device)
            ms = {name: median(t) / tokens * 1e3 for name, t in times.items()}
            result = {
                "batch": batch, "cfg": cfg, "tokens": tokens, "greedy_agreement": agreement,
                "tarkit_ms_per_step": ms["tarkit"], "hf_ms_per_step": ms["hf"], "speedup": ms["hf"] / ms["tarkit"],
                "floor_ms_per_step": floor_ms, "tarkit_over_floor": ms["tarkit"] / floor_ms,
                "tarkit_tokens_per_s": batch * 1e3 / ms["tarkit"], "hf_tokens_per_s": batch * 1e3 / ms["hf"],
                "times_s": times,
            }
            results.append(result)
            rows.append([batch, cfg, ms["tarkit"], ms["hf"], f"{result['speedup']:.2f}x", floor_ms,
                         f"{result['tarkit_over_floor']:.2f}x", f"{agreement:.3f}"])
    print_table(["batch", "cfg", "tarkit ms/step", "hf ms/step", "tarkit/hf", "floor ms", "tarkit/floor",
                 "greedy agree"], rows)
    print(f"sanity: greedy tokens agree on {min(r['greedy_agreement'] for r in results):.6f} of tokens (1.0 expected)")
    payload = {"benchmark": "t2i_generate", "preset": args.preset, "machine": facts, "rows": results}
    if dtype != torch.float32:
        reference = build_lm(preset, torch.float32, args.device, args.seed)  # the same weights before the cast
        payload["fp32_agreement"] = precision_agreement(lm, reference, tokens, args.seed)
        del reference
        print(f"{args.dtype} against fp32: the same next code at {payload['fp32_agreement']:.3f} of image positions")
    write_results(payload, args)
    print(f"tarkit/hf speed ratio (lowest row): {min(r['speedup'] for r in results):.2f}x")
    return payload


if __name__ == "__main__":
    main()
