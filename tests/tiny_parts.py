"""Untrained tiny parts the tests build in seconds: a TA-Tok of 32 codes, a small LM with its image words, a micro
pixel VQ + AR de-tokenizer, and a Tar bundle of them as `tarkit demo` lays one out."""

from pathlib import Path

import torch

from tarkit.tatok import TATok
from tarkit_plugins.codebooks import LearnedCodebook
from tarkit_plugins.detok.ar import AutoregressiveDeTokenizer
from tarkit_plugins.detok.pixel_vq import PixelVQ
from tarkit_plugins.encoders import SigLIP2Encoder
from tarkit_plugins.lm.settings import GenerationDefaults, TarSettings, tatok_record, write_settings
from tarkit_plugins.lms import HFCausalLM
from tarkit_plugins.quantizers import SimVQ

TATOK_DECODER = {"num_attention_heads": 4, "intermediate_size": 64, "num_patches": 144, "vision_use_head": False}
SMALL_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "initializer_range": 0.3}
# A 16 px VQ with 4x downsampling: 4 x 4 = 16 codes of a 32-code codebook, a few thousand parameters.
MICRO_VQ = {"image_size": 16, "codebook_size": 32, "codebook_dim": 4, "channels": 8, "channel_mult": [1, 2, 2],
            "z_channels": 8, "num_res_blocks": 1, "norm_groups": 4}
MICRO_GPT = {"width": 32, "depth": 1, "heads": 2, "mlp_hidden": 64, "max_condition_tokens": 144}
RECORDED = GenerationDefaults(scale=2, cfg_scale=3.0, temperature=0.5, top_k=7, top_p=0.9)


def tiny_tatok(**kwargs) -> TATok:
    """The tiny SigLIP2 tower, 32 learned codes of width 16, SimVQ, a one-layer feature decoder."""
    return TATok(SigLIP2Encoder(preset="tiny"), LearnedCodebook(num_codes=32, dim=16), SimVQ(),
                 **{"decoder_depth": 1, "decoder_config": TATOK_DECODER, **kwargs})


def small_lm(config: dict | None = SMALL_LM) -> HFCausalLM:
    """A byte-tokenizer LM with the 32 image words, their head rows spread so that sampled codes vary (new rows
    start as the mean of the old ones)."""
    lm = HFCausalLM(preset="tiny", tokenizer="bytes", config=config, num_codes=32, num_scales=3)
    with torch.no_grad():
        lm.output_head.weight[lm.vocab.image_start : lm.vocab.image_end].normal_(std=0.3)
    return lm


def write_bundle(root: Path, generation: GenerationDefaults = RECORDED) -> Path:
    """``root`` holding ``tatok/``, ``lm/`` (recording train_scales [2], its TA-Tok and ``generation``),
    ``plain_lm/`` (the same LM without the record), ``pixel_vq/`` (no de-tokenizer) and ``ar_detok/``, seeded."""
    torch.manual_seed(0)
    tatok = tiny_tatok()
    tatok.save_pretrained(root / "tatok")
    lm = small_lm()
    lm.save_pretrained(root / "lm")
    lm.save_pretrained(root / "plain_lm")
    record = tatok_record(str(root / "tatok"), root / "lm", tatok.pool_scales, tatok.num_codes)
    write_settings(root / "lm", TarSettings(train_scales=[2], tatok=record, generation=generation))
    vq = PixelVQ(preset=None, config=MICRO_VQ)
    vq.save_pretrained(root / "pixel_vq")
    AutoregressiveDeTokenizer(vq, condition_dim=96, preset="tiny", config=MICRO_GPT).save_pretrained(root / "ar_detok")
    return root
