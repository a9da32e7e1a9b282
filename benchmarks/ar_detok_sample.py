"""AR de-tokenizer sampling: pixel codes per second of tarkit's loop against LlamaGen's, per batch x guidance.

Both paths draw every pixel-VQ code of an image, one per step, from the same random-weight
:class:`~tarkit_plugins.detok.ar.AutoregressiveDeTokenizer` after the same condition features, with the
reference's sampling (temperature 1, top-k and top-p off: csuhan/Tar's ``ARModel.sample`` defaults; ``--top-k``
and ``--top-p`` turn the filters on in both):

* ``tarkit``: :meth:`~tarkit_plugins.detok.ar.AutoregressiveDeTokenizer.sample_codes`: a KV cache of the whole
  sequence whose filled part only (``cache[:, :, :t]``) each step attends over, the head over the prefill's last
  position only, with ``rope2d`` the rotary angles of each step computed at that step, guidance as one batch of
  2B rows, :func:`~tarkit_plugins.lm.generation.sample_next` (top-k before top-p, so top-p sorts the k survivors
  only).
* ``llamagen``: :class:`LlamaGenLoop`, the loop of LlamaGen's ``autoregressive/models/generate.py`` and
  ``ARModel.forward`` as csuhan/Tar's ``tok/ar_dtok`` runs them, written here over the *same* modules' weights
  (``clip_proj``, ``tok_embeddings``, ``abs_pe`` or the rotary angles, each layer's ``attention.wqkv``/``wo``,
  ``feed_forward`` and norms, ``norm``, ``output``; ``dense_proj`` where the model has it): static KV caches
  and a ``[2B, L, L]`` boolean causal mask of the whole sequence (``L`` rounded up to a multiple of 8) set up
  per call; every step writes the caches by index, copies them (``repeat_interleave`` for grouped heads, a copy
  even without any) and attends over all ``L`` positions under the mask row ``causal_mask[:, None, input_pos]``
  with the math kernel the reference forces for decoding; the head runs over every prefill position; guidance
  is a doubled batch (cond rows, then null-condition rows; ``uncond + (cond - uncond) * s``); sampling is
  ``logits / max(T, 1e-5)``, LlamaGen's ``top_k_top_p_filtering`` when a filter is on (a top-k threshold over
  the whole vocabulary, then a sort of the whole vocabulary for top-p), softmax, multinomial, and every step's
  probabilities are kept, as the reference keeps them.

Before timing, greedy decoding (temperature 0; LlamaGen's ``sample_logits=False``) of every code checks that
both loops pick the same codes (the ``sanity:`` line; one differing code changes all later ones, so a near-tie
broken differently by rounding shows as far less than 1.0).

Presets: ``tiny`` is the demo's de-tokenizer (``recipes/tiny/ar_detok.yaml``: the ``tiny`` GPT, 4 layers of
width 128 with 2D rotary positions and ``dense_condition``; the pixel VQ of ``recipes/tiny/pixel_vq.yaml``: 256
codes, 16 x 16 per 64 px image; 36 condition tokens of width 96, the tiny TA-Tok's pool scale 2); ``base`` is
LlamaGen's ``llama-abs-B`` (12 layers, width 768, 12 heads, learned absolute positions, 111M parameters) over
LlamaGen's VQ-16 at 256 px (16,384 codes, 16 x 16 per image) after 169 condition tokens of width 1152 (the
paper's pool scale 2): ~7 s per call at batch 1 on one CPU thread.

Usage: ``python benchmarks/ar_detok_sample.py [--preset tiny|base] [--batches 1 8] [--cfg 1 3] [--top-k K]
[--top-p P] [--dtype float32|bfloat16] [--device cpu|cuda] [--repeats 3] [--warmup 1] [--threads N] [--json OUT]``.
Results go to ``--json`` or ``benchmarks/results/ar_detok_sample_<preset>_<dtype>_<device>.json``. The last line
is the smallest tarkit/llamagen speed ratio over the rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

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
from t2i_generate import plain_linears  # noqa: E402

from tarkit_plugins.detok.ar import Attention, AutoregressiveDeTokenizer, rotate  # noqa: E402
from tarkit_plugins.detok.pixel_vq import PixelVQ  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # the demo's AR de-tokenizer over the demo's pixel VQ: for the test and quick looks
    "tiny": {
        "vq": {"preset": "tiny", "config": {"channel_mult": [1, 2, 2], "codebook_size": 256}},
        "gpt": {"preset": "tiny", "config": {"dense_condition": True}},
        "condition_dim": 96,
        "condition_tokens": 36,
    },
    # llama-abs-B over VQ-16 at 256 px; the reference's cls_token_num is its prefix length, hence 169 positions
    "base": {
        "vq": {"preset": "vq-16", "config": {"image_size": 256}},
        "gpt": {"preset": None, "config": {"width": 768, "depth": 12, "heads": 12, "max_condition_tokens": 169}},
        "condition_dim": 1152,
        "condition_tokens": 169,
    },
}


def build_model(preset: dict[str, Any], dtype: torch.dtype, device: str, seed: int) -> AutoregressiveDeTokenizer:
    torch.manual_seed(seed)
    vq = PixelVQ(**preset["vq"])
    model = AutoregressiveDeTokenizer(vq, preset["condition_dim"], **preset["gpt"])
    # The head starts at zero (LlamaGen's init), so every logit would tie; a trained model's rows differ.
    with torch.no_grad():
        model.output.weight.normal_(0.0, model.config.init_std)
    return model.to(device=device, dtype=dtype).eval()


def top_k_top_p_filtering(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """LlamaGen's filter, in place: logits below the k-th largest and outside the top-p nucleus become ``-inf``."""
    if top_k > 0:
        logits[logits < torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]] = float("-inf")
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        remove = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # shifted: the token that crosses top_p stays
        remove[..., 0] = False
        logits[remove.scatter(1, sorted_indices, remove)] = float("-inf")
    return logits


def llamagen_sample(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaGen's ``sample`` on the last position of ``logits [B, L, V]``: codes ``[B, 1]`` and probabilities."""
    logits = logits[:, -1, :] / max(temperature, 1e-5)
    if top_k > 0 or top_p < 1.0:
        logits = top_k_top_p_filtering(logits, top_k, top_p)
    probs = F.softmax(logits.float(), dim=-1)
    if temperature == 0:  # the reference's greedy switch, sample_logits=False
        return torch.topk(probs, k=1, dim=-1)[1], probs
    return torch.multinomial(probs, num_samples=1, generator=generator), probs


class LlamaGenLoop:
    """LlamaGen's sampling loop over an :class:`AutoregressiveDeTokenizer`'s own modules (see the module notes)."""

    def __init__(self, model: AutoregressiveDeTokenizer):
        self.model = model
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.causal_mask = torch.empty(0, dtype=torch.bool)
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def setup_caches(self, batch: int, length: int, prefix: int, device: torch.device) -> None:
        """``ARModel.setup_caches``: zeroed caches and the boolean causal mask for ``length`` positions (rounded up
        to a multiple of 8), allocated on every call; rotary angles, like LlamaGen's ``freqs_cis``, computed once
        for the whole sequence."""
        model, config = self.model, self.model.config
        padded = -(-length // 8) * 8
        shape = (batch, config.heads, padded, config.width // config.heads)
        dtype = model.tok_embeddings.weight.dtype
        self.caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in model.layers
        ]
        causal = torch.tril(torch.ones(padded, padded, dtype=torch.bool, device=device))
        self.causal_mask = causal.unsqueeze(0).repeat(batch, 1, 1)
        self.rope = model._rope(prefix, device)  # None with absolute positions

    def attention(
        self, attention: Attention, x: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor, layer: int
    ) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = attention.wqkv(x).split(width, dim=-1)
        q, k, v = (t.view(batch, length, attention.heads, -1).transpose(1, 2) for t in qkv)
        if self.rope is not None:
            cos, sin = (t[input_pos] for t in self.rope)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        keys, values = self.caches[layer]
        keys[:, :, input_pos] = k
        values[:, :, input_pos] = v
        # LlamaGen expands grouped KV heads this way; with as many KV heads as heads it still copies the caches.
        keys, values = keys.repeat_interleave(1, dim=1), values.repeat_interleave(1, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return attention.wo(out.transpose(1, 2).contiguous().view(batch, length, width))

    def forward(self, h: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """``ARModel.forward`` while sampling: embedded inputs at ``input_pos`` -> logits at every one of them."""
        model = self.model
        mask = self.causal_mask[: len(h), None, input_pos]
        h = model.tok_dropout(h)
        if model.config.positions == "absolute":
            h = h + model.abs_pe[:, input_pos]
        for i, layer in enumerate(model.layers):
            h = h + self.attention(layer.attention, layer.attention_norm(h), input_pos, mask, i)
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return model.output(model.norm(h))

    def guided(self, logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        if cfg_scale <= 1.0:
            return logits
        cond, uncond = torch.split(logits, len(logits) // 2, dim=0)
        return uncond + (cond - uncond) * cfg_scale

    def sample_codes(
        self,
        condition: torch.Tensor,
        cfg_scale: float,
        generator: torch.Generator | None,
        temperature: float,
        top_k: int,
        top_p: float,
    ) -> torch.Tensor:
        """``generate``: codes ``[B, n]`` after the condition ``[B, N, C]`` (all-zero null rows when guided)."""
        model, device = self.model, condition.device
        dtype = model.tok_embeddings.weight.dtype
        rows = torch.cat([condition, torch.zeros_like(condition)]) if cfg_scale > 1.0 else condition
        batch, prefix = condition.shape[:2]
        codes = model.num_image_tokens
        self.setup_caches(len(rows), prefix + codes, prefix, device)
        # tarkit's dense_condition (LlamaGen has none): added to the same inputs as in sample_codes
        dense = model._dense(rows.to(dtype))
        h = model.clip_proj(rows.to(dtype))
        if dense is not None:
            h = torch.cat([h[:, :-1], h[:, -1:] + dense[:, :1]], dim=1)
        logits = self.forward(h, torch.arange(prefix, device=device))[:, prefix - 1 :]
        token = llamagen_sample(self.guided(logits, cfg_scale), temperature, top_k, top_p, generator)[0]
        seq = torch.empty((batch, prefix + codes), dtype=torch.int, device=device)
        seq[:, prefix : prefix + 1] = token
        input_pos = torch.tensor([prefix], device=device, dtype=torch.int)
        # generate keeps every step's probabilities too (decode_n_tokens returns them; generate drops them)
        new_tokens, new_probs = [], []
        for step in range(1, codes):
            with sdpa_kernel(SDPBackend.MATH):  # the reference's decode steps force the math kernel
                h = model.tok_embeddings(torch.cat([token, token]) if cfg_scale > 1.0 else token)
                if dense is not None:
                    h = h + dense[:, step : step + 1]
                logits = self.guided(self.forward(h, input_pos), cfg_scale)
                token, probs = llamagen_sample(logits, temperature, top_k, top_p, generator)
                input_pos += 1
                new_tokens.append(token.clone())
                new_probs.append(probs.clone())
        seq[:, prefix + 1 :] = torch.cat(new_tokens, dim=1)
        return seq[:, prefix:]


class Row:
    """One (batch, guidance) row: the condition and both loops' calls."""

    def __init__(
        self, model: AutoregressiveDeTokenizer, preset: dict[str, Any], batch: int, cfg: float, top_k: int,
        top_p: float, seed: int,
    ):
        device = model.output.weight.device
        self.model, self.loop, self.cfg = model, LlamaGenLoop(model), cfg
        self.top_k, self.top_p, self.seed = top_k, top_p, seed
        shape = (batch, preset["condition_tokens"], preset["condition_dim"])
        self.condition = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)

    def settings(self, greedy: bool) -> tuple[torch.Generator, float, int, float]:
        """A fresh generator and ``(temperature, top_k, top_p)`` in LlamaGen's terms (0 and 1: off)."""
        generator = torch.Generator(self.condition.device).manual_seed(self.seed)
        return (generator, 0.0, 0, 1.0) if greedy else (generator, 1.0, self.top_k, self.top_p)

    @torch.inference_mode()
    def tarkit(self, greedy: bool = False) -> torch.Tensor:
        generator, temperature, top_k, top_p = self.settings(greedy)
        return self.model.sample_codes(
            self.condition, self.cfg, generator, temperature, top_k or None, top_p if top_p < 1 else None
        )

    @torch.inference_mode()
    def llamagen(self, greedy: bool = False) -> torch.Tensor:
        plain_linears(self.model)  # the reference's loop runs nn.Linear; tarkit's sampling makes them CPULinear
        return self.loop.sample_codes(self.condition, self.cfg, *self.settings(greedy))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, sorted(PRESETS), "base")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0], help="guidance scales (1: none)")
    parser.add_argument("--top-k", type=int, default=0, help="0: off (the reference's)")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: off (the reference's)")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    if args.top_k < 0 or not 0 < args.top_p <= 1:
        parser.error("--top-k must be >= 0 and --top-p in (0, 1]")
    if min(args.cfg) < 1:
        parser.error("--cfg: scales below 1 mean no guidance to LlamaGen but guidance to tarkit; use 1 or more")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    preset, dtype = PRESETS[args.preset], DTYPES[args.dtype]
    facts = machine_facts(args.device, dtype)
    model = build_model(preset, dtype, args.device, args.seed)
    codes = model.num_image_tokens
    gpt = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("vq."))
    print(machine_line(facts))
    print(f"model: {args.preset}, {gpt / 1e6:.1f}M parameters (VQ aside), {model.config.positions} positions; "
          f"{codes} codes per image of {model.vq.codebook_size}, after {preset['condition_tokens']} condition tokens; "
          f"top-k {args.top_k or 'off'}, top-p {args.top_p if args.top_p < 1 else 'off'}")

    rows, results = [], []
    for batch in args.batches:
        for cfg in args.cfg:
            row = Row(model, preset, batch, cfg, args.top_k, args.top_p, args.seed)
            agreement = (row.tarkit(greedy=True) == row.llamagen(greedy=True)).float().mean().item()
            paths = {"tarkit": row.tarkit, "llamagen": row.llamagen}
            times = interleaved(paths, args.repeats, args.warmup, args.device)
            seconds = {name: median(t) for name, t in times.items()}
            result = {
                "batch": batch, "cfg": cfg, "codes": codes, "greedy_agreement": agreement,
                "tarkit_codes_per_s": batch * codes / seconds["tarkit"],
                "llamagen_codes_per_s": batch * codes / seconds["llamagen"],
                "tarkit_ms_per_step": seconds["tarkit"] / codes * 1e3,
                "llamagen_ms_per_step": seconds["llamagen"] / codes * 1e3,
                "speedup": seconds["llamagen"] / seconds["tarkit"], "times_s": times,
            }
            results.append(result)
            rows.append([batch, cfg, result["tarkit_codes_per_s"], result["llamagen_codes_per_s"],
                         result["tarkit_ms_per_step"], result["llamagen_ms_per_step"], f"{result['speedup']:.2f}x",
                         f"{agreement:.3f}"])
    print_table(["batch", "cfg", "tarkit codes/s", "llamagen codes/s", "tarkit ms/step", "llamagen ms/step",
                 "tarkit/llamagen", "greedy agree"], rows)
    print(f"sanity: greedy codes agree on {min(r['greedy_agreement'] for r in results):.6f} of codes (1.0 expected)")
    payload = {"benchmark": "ar_detok_sample", "preset": args.preset, "machine": facts,
               "sampling": {"temperature": 1.0, "top_k": args.top_k, "top_p": args.top_p}, "rows": results}
    write_results(payload, args)
    print(f"tarkit/llamagen speed ratio (lowest row): {min(r['speedup'] for r in results):.2f}x")
    return payload


if __name__ == "__main__":
    main()
