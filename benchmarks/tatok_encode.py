"""Images -> TA-Tok indices throughput: tarkit's encode path against a mirror of the reference's, on CPU.

Three paths run on the same images, interleaved in every repeat so that load from other processes hits
them alike:

* ``tarkit``: a :class:`~tarkit.tatok.TATok` built from registered parts (SigLIP2 encoder truncated after the
  penultimate layer, text-aligned codebook with a frozen random ``E``, SimVQ searching deterministically in
  eval), ``tokenize(images, scale=1)`` under ``torch.inference_mode()``. The first call fills the codebook
  cache; it belongs to the warm-up, as in real inference where the tokenizer is loaded once.
* ``baseline``: :class:`ReferenceEncodePath`, a mirror of csuhan/Tar's ``TextAlignedTokenizer`` forward with
  the *same* weights: the full-depth HF SigLIP tower with ``output_hidden_states=True`` (its last layer is
  computed and thrown away), ``hidden_states[-2]``, the task layer, ``in_linear``, the codebook ``E W^T + b``
  recomputed on every call, the full ``[B*N, K]`` cosine matrix, ``softmax(cos / T)`` and
  ``torch.multinomial``, then the feature decoder on the sampled codes (the reference always runs it).
* ``tower``: the full-depth HF SigLIP tower alone, the floor any encode path has to pay (its linears as tarkit
  runs them, :mod:`tarkit.cpu_linear`; the baseline's as ``nn.Linear``, as the reference runs them).

Usage: ``python benchmarks/tatok_encode.py [--preset paper|tiny] [--batch 2] [--repeats 3] [--warmup 1]
[--threads N] [--dtype float32|bfloat16] [--device cpu|cuda] [--json OUT]``. Results go to ``--json`` or
``benchmarks/results/tatok_encode_<preset>_<dtype>_<device>.json``. A line reports each path's peak memory
above the model (the reference's ``[B*N, K]`` similarity and softmax against tarkit's chunked search). The last
line printed is the tarkit/baseline throughput ratio; the line before it is tarkit against the tower alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import SiglipVisionConfig, SiglipVisionModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved, peak_memory_increase, write_results  # noqa: E402
from t2i_generate import plain_linears  # noqa: E402

from tarkit.cpu_linear import use_cpu_linears
from tarkit.registry import registry
from tarkit.tatok import TATok

# The reference's SimVQ sampling temperature (the paper's T).
TEMPERATURE = 0.03

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's shape: SigLIP2 so400m-patch14-384 (27 layers, width 1152, 27x27 = 729 tokens), 65,536 codes of
    # width 1536 (Qwen2.5-1.5B's embedding width: E [65536, 1536], W 1536x1536), a 3-block decoder with the
    # reference's Siglip2VisionConfig defaults (12 heads, MLP 3072, 256 position embeddings).
    "paper": {
        "encoder": "so400m-patch14-384",
        "num_codes": 65536,
        "dim": 1536,
        "decoder_depth": 3,
        "decoder_config": None,
        "batch": 2,
    },
    # The CPU miniature, for quick runs and the test: 48 px, 12x12 grid, 1024 codes of width 64.
    "tiny": {
        "encoder": "tiny",
        "num_codes": 1024,
        "dim": 64,
        "decoder_depth": 2,
        "decoder_config": {
            "num_attention_heads": 4,
            "intermediate_size": 384,
            "num_patches": 144,
            "vision_use_head": False,
        },
        "batch": 8,
    },
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_tatok(preset: dict[str, Any]) -> TATok:
    """TA-Tok from the registered parts, as a recipe would name them (``siglip2``, ``text_aligned``, ``simvq``)."""
    encoder = registry.get("tarkit.encoders", "siglip2")(preset=preset["encoder"])
    codebook = registry.get("tarkit.codebooks", "text_aligned")(
        embeddings=None, num_codes=preset["num_codes"], dim=preset["dim"], embedding_width=preset["dim"]
    )
    # The paper recipe's quantizer: stochastic in training, nearest code in eval.
    quantizer = registry.get("tarkit.quantizers", "simvq")(l2_normalize=True, stochastic=True, temperature=TEMPERATURE)
    return TATok(
        encoder, codebook, quantizer, decoder_depth=preset["decoder_depth"], decoder_config=preset["decoder_config"]
    )


def full_tower(tatok: TATok) -> SiglipVisionModel:
    """The full-depth HF SigLIP tower (with its post-norm and pooling head) holding tarkit's encoder weights.

    tarkit keeps only the layers up to the selected one; the layers after it (and the head) stay random here,
    since the reference computes them but discards what they produce.
    """
    config = SiglipVisionConfig(**tatok.encoder.architecture)
    tower = SiglipVisionModel(config)
    kept = {k: v for k, v in tatok.encoder.model.state_dict().items() if not k.startswith("post_layernorm.")}
    missing, unexpected = tower.load_state_dict(kept, strict=False)
    # Only the dropped layers, the post-norm and the head may stay random: anything else is a naming mismatch.
    depth = tatok.encoder.model.config.num_hidden_layers
    dropped = tuple(f"encoder.layers.{i}." for i in range(depth, config.num_hidden_layers))
    allowed = (*dropped, "post_layernorm.", "head.")
    if unexpected or not all(any(part in key for part in allowed) for key in missing):
        raise RuntimeError(
            f"weights do not map onto the full tower: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return tower


def with_linears(cpu_linears: bool, call: Callable[[], Any], *modules: nn.Module) -> Callable[[], Any]:
    """``call`` with the linears of ``modules`` as tarkit runs them (:mod:`tarkit.cpu_linear`) or as the
    reference does (``nn.Linear``): the paths share weights, so each sets the classes before it runs."""

    def run() -> Any:
        for module in modules:
            if cpu_linears:
                use_cpu_linears(module)
            else:
                plain_linears(module)
        return call()

    return run


class ReferenceEncodePath(nn.Module):
    """The reference's ``TextAlignedTokenizer`` forward (csuhan/Tar ``tok/ta_tok.py``), over shared modules.

    It is the baseline, so it does what the reference does even where that is wasteful: it runs the whole tower
    and keeps ``hidden_states[-2]``, recomputes and normalises the whole codebook on every call, materialises
    the ``[B*N, K]`` similarity matrix and its softmax, and always runs the feature decoder.
    """

    def __init__(self, tower: SiglipVisionModel, tatok: TATok, temperature: float = TEMPERATURE):
        super().__init__()
        self.tower, self.tatok, self.temperature = tower, tatok, temperature

    def scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarity ``[B*N, K]`` of every token to every code, and the normalised codebook ``[K, D]``.

        The reference's SimVQ at scale 1: the codebook ``embedding_proj(embedding)`` is computed once per call
        and serves both the similarity and the gathered codes.
        """
        pixels = (images - 0.5) / 0.5  # the reference's Normalize(mean=0.5, std=0.5); inputs are already 384 px
        hidden = self.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        latent = self.tatok.in_linear(self.tatok.encode_task_layer(hidden))
        book = self.tatok.codebook
        embedding = F.normalize(book.projection(book.embedding), dim=-1)
        rows = F.normalize(latent.reshape(-1, latent.shape[-1]), dim=-1)
        return torch.einsum("bd,nd->bn", rows, embedding), embedding

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        batch = images.shape[0]
        cos, embedding = self.scores(images)
        probs = F.softmax(cos / self.temperature, dim=-1)
        indices = torch.multinomial(probs, 1, generator=generator).view(batch, -1)
        codes = embedding[indices]  # the reference's regularized_z
        features = self.tatok.decode_latent(self.tatok.out_linear(codes))
        # The similarity matrix is returned for the sanity check only; it is alive at this point anyway.
        return {"indices": indices, "features": features, "similarity": cos}


def summary(times: list[float], batch: int) -> dict[str, float]:
    median = statistics.median(times)
    return {
        "median_s": median,
        "min_s": min(times),
        "images_per_s": batch / median,
        "images_per_s_best": batch / min(times),
        "times_s": times,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (paper: 2, tiny: 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per path first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="one precision for all paths (with bfloat16 SimVQ still searches in float32, so the sanity agreement "
        "drops below 1: about 0.97 on tiny)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", default=None, help="write every figure to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    batch = args.batch or preset["batch"]
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tatok = build_tatok(preset).to(device=args.device, dtype=dtype).eval()
    tower = full_tower(tatok).to(device=args.device, dtype=dtype).eval()
    baseline = ReferenceEncodePath(tower, tatok).eval()
    size = tatok.encoder.image_size
    # Already at the encoder's resolution, so neither path resizes (the reference's Resize(384) is a no-op too).
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
    images = images.to(device=args.device, dtype=dtype)
    sampler = torch.Generator(args.device).manual_seed(args.seed)

    print(
        f"setup: preset={args.preset} (encoder {preset['encoder']}, {tatok.tokens_per_image(1)} tokens/image, "
        f"K={preset['num_codes']}, D={preset['dim']}, decoder depth {preset['decoder_depth']}) batch={batch} "
        f"dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}"
    )

    paths: dict[str, Callable[[], Any]] = {
        "tarkit": with_linears(True, lambda: tatok.tokenize(images, scale=1), tatok),
        "baseline": with_linears(False, lambda: baseline(images, generator=sampler), tower, tatok),
        "tower": with_linears(True, lambda: tower(pixel_values=(images - 0.5) / 0.5), tower),
    }
    with torch.inference_mode():
        # Sanity check at equal precision; tarkit's first call here also fills its codebook cache.
        ours = paths["tarkit"]()
        theirs = paths["baseline"]()
        if ours.shape != theirs["indices"].shape:
            raise RuntimeError(
                f"tarkit gives indices {tuple(ours.shape)}, the baseline {tuple(theirs['indices'].shape)}"
            )
        nearest = theirs["similarity"].argmax(dim=-1).view_as(ours)
        del theirs  # frees the [B*N, K] matrix before timing
        agreement = (ours == nearest).float().mean().item()
        print(
            f"sanity: indices {tuple(ours.shape)} on both paths; tarkit == argmax of the baseline's similarity "
            f"for {agreement:.6f} of tokens"
        )
        # The sanity check above served as tarkit's and the baseline's first warm-up call; the tower's comes here.
        if args.warmup:
            paths["tower"]()
        times = interleaved(paths, args.repeats, max(0, args.warmup - 1), args.device)

        # Peak memory of each encode path, each alone: the reference's [B*N, K] similarity and its softmax
        # against tarkit's chunked nearest-code search.
        memory = {name: peak_memory_increase(paths[name], args.device) for name in ("tarkit", "baseline", "tower")}

    results = {name: summary(t, batch) for name, t in times.items()}
    for name, r in results.items():
        print(
            f"{name:9s} median {r['median_s']:.4f} s/batch  {r['images_per_s']:.4g} images/s  "
            f"(min {r['min_s']:.4f} s, {r['images_per_s_best']:.4g} images/s)"
        )
    similarity_mib = batch * tatok.tokens_per_image(1) * preset["num_codes"] * 4 / 2**20
    print(
        "peak memory above the model: "
        + ", ".join(f"{name} {memory[name] / 2**20:.0f} MiB" for name in memory)
        + f" (the [B*N, K] similarity alone: {similarity_mib:.0f} MiB)"
    )
    vs_tower = results["tarkit"]["median_s"] / results["tower"]["median_s"]
    ratio = results["tarkit"]["images_per_s"] / results["baseline"]["images_per_s"]

    report = {
        "preset": args.preset,
        "batch": batch,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "benchmark": "tatok_encode",
        "device": args.device,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "tokens_per_image": tatok.tokens_per_image(1),
        "num_codes": preset["num_codes"],
        "dim": preset["dim"],
        "agreement": agreement,
        "paths": results,
        "peak_memory_bytes": memory,
        "tarkit_over_tower_time": vs_tower,
        "tarkit_over_baseline_throughput": ratio,
        # The same two figures from the fastest repeats: less sensitive to other processes on a shared machine.
        "tarkit_over_tower_time_best": results["tarkit"]["min_s"] / results["tower"]["min_s"],
        "tarkit_over_baseline_throughput_best": results["baseline"]["min_s"] / results["tarkit"]["min_s"],
    }
    write_results(report, args)
    print(f"tarkit time / tower-alone time: {vs_tower:.2f}x")
    print(f"tarkit/baseline throughput ratio: {ratio:.2f}x")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
