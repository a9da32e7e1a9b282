"""Fixtures shared by the de-tokenizer tests: a tiny TA-Tok folder and tiny pixel VQs."""

import pytest
import torch

from tarkit.tatok import TATok
from tarkit_plugins.codebooks import LearnedCodebook
from tarkit_plugins.detok.pixel_vq import PixelVQ
from tarkit_plugins.encoders import SigLIP2Encoder
from tarkit_plugins.quantizers import SimVQ
from tests.tiny_parts import MICRO_VQ


def micro_vq(**overrides) -> PixelVQ:
    torch.manual_seed(0)
    return PixelVQ(preset=None, config={**MICRO_VQ, **overrides})


@pytest.fixture(scope="session")
def tatok_dir(tmp_path_factory):
    """An untrained TA-Tok of the tiny recipe's shape (96-wide features, 144/36/16 tokens), saved as a folder."""
    torch.manual_seed(0)
    tatok = TATok(
        SigLIP2Encoder("tiny"),
        LearnedCodebook(num_codes=64, dim=16),
        SimVQ(),
        pool_scales=[1, 2, 3],
        decoder_depth=1,
        decoder_config={"num_attention_heads": 4, "intermediate_size": 96, "vision_use_head": False},
    )
    return tatok.save_pretrained(tmp_path_factory.mktemp("tatok"))


@pytest.fixture(scope="session")
def tiny_vq_dir(tmp_path_factory):
    """An untrained pixel VQ of the tiny preset (64 px -> 8 x 8 codes), saved as a folder."""
    torch.manual_seed(0)
    return PixelVQ("tiny").save_pretrained(tmp_path_factory.mktemp("pixel_vq"))
