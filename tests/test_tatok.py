import pytest
import torch
from torch import nn

from tarkit.tatok import TATok, pool_tokens
from tarkit_plugins.codebooks import LearnedCodebook, TextAlignedCodebook
from tarkit_plugins.encoders import SigLIP2Encoder
from tarkit_plugins.quantizers import SimVQ
from tarkit_plugins.tatok.reference_api import TextAlignedTokenizer

TINY_DECODER = {"num_attention_heads": 4, "intermediate_size": 128, "num_patches": 144, "vision_use_head": False}


def tiny_tatok(codebook=None, **kwargs):
    torch.manual_seed(0)
    codebook = codebook or TextAlignedCodebook(embeddings=None, num_codes=64, dim=16, embedding_width=24)
    return TATok(
        SigLIP2Encoder(preset="tiny"), codebook, SimVQ(), decoder_depth=1, decoder_config=TINY_DECODER, **kwargs
    ).eval()


def test_scale_adaptive_token_counts_tiny():
    tatok = tiny_tatok()
    images = torch.rand(2, 3, 64, 64)
    for scale, tokens in ((1, 144), (2, 36), (3, 16)):
        indices = tatok.tokenize(images, scale)
        assert indices.shape == (2, tokens) and tatok.tokens_per_image(scale) == tokens
        assert indices.dtype == torch.int64 and 0 <= indices.min() and indices.max() < 64
        assert tatok.decode_features(indices).shape == (2, tokens, 96)


def test_scale_adaptive_token_counts_paper_shape():
    """The paper preset gives 729/169/81 tokens; checked on a one-layer copy of so400m (same grid and width)."""
    torch.manual_seed(0)
    encoder = SigLIP2Encoder(preset="so400m-patch14-384", config={"num_hidden_layers": 2})
    codebook = TextAlignedCodebook(embeddings=None, num_codes=256, dim=32, embedding_width=32)
    tatok = TATok(encoder, codebook, SimVQ(), decoder_depth=1).eval()
    assert (encoder.grid_size, encoder.width, encoder.image_size) == (27, 1152, 384)
    image = torch.rand(1, 3, 384, 384)
    features = encoder(image)
    assert features.shape == (1, 729, 1152)
    counts = [tatok.encode(image, scale, features=features).indices.shape[1] for scale in (1, 2, 3)]
    assert counts == [729, 169, 81]


def test_pool_tokens_is_floor_average_pooling():
    features = torch.arange(2 * 27 * 27 * 3, dtype=torch.float32).reshape(2, 729, 3)
    pooled = pool_tokens(features, 2)
    assert pooled.shape == (2, 169, 3)
    grid = features.reshape(2, 27, 27, 3)
    assert torch.allclose(pooled[0, 0], grid[0, :2, :2].reshape(4, 3).mean(0))
    with pytest.raises(ValueError, match="not a square grid"):
        pool_tokens(torch.zeros(1, 10, 3), 2)


def test_indices_path_never_runs_the_decoder(monkeypatch):
    tatok = tiny_tatok()

    def forbidden(*args, **kwargs):
        raise AssertionError("feature decoder ran")

    monkeypatch.setattr(tatok.decoder, "forward", forbidden)
    images = torch.rand(1, 3, 64, 64)
    tatok.tokenize(images)
    for input_type in ("indices", "quant"):
        out = TextAlignedTokenizer(tatok, input_type=input_type)(images)
        assert out["encoded"].shape[:2] == (1, 144)
    with pytest.raises(AssertionError, match="feature decoder ran"):
        TextAlignedTokenizer(tatok, input_type="rec")(images)


def test_api_parity_and_bad_input():
    tok = TextAlignedTokenizer(tiny_tatok(), input_type="indices", pool_scale=2)
    images = torch.rand(2, 3, 64, 64)
    encoded = tok(images)["encoded"]
    assert encoded.shape == (2, 36) and torch.equal(encoded, tok.encode(images, scale=2))
    assert tok.decode_features(encoded).shape == (2, 36, 96)
    with pytest.raises(ValueError, match="pool scale 4 is not one of"):
        tok.encode(images, scale=4)
    with pytest.raises(ValueError, match=r"code indices must lie in \[0, 64\)"):
        tok.decode_features(torch.full((1, 16), 99))
    with pytest.raises(ValueError, match="input_type must be one of"):
        TextAlignedTokenizer(tok.tatok, input_type="pixels")


def test_save_load_round_trip(tmp_path):
    tatok = tiny_tatok(codebook=LearnedCodebook(num_codes=32, dim=16))
    images = torch.rand(2, 3, 64, 64)
    tatok.save_pretrained(tmp_path)
    loaded = TextAlignedTokenizer.from_checkpoint(str(tmp_path), input_type="indices")
    indices = tatok.tokenize(images)
    assert torch.equal(loaded.encode(images), indices)
    with torch.no_grad():
        assert torch.allclose(loaded.decode_features(indices), tatok.decode_features(indices))


def test_reconstruction_learns_on_a_fixed_batch():
    """A few optimiser steps raise the reconstruction cosine: the decoder and codes are trainable end to end."""
    tatok = tiny_tatok().train()
    tatok.encoder.requires_grad_(False)
    images = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        target = tatok.encoder(images)
    optimizer = torch.optim.AdamW([p for p in tatok.parameters() if p.requires_grad], lr=3e-3)

    def cosine():
        encoding = tatok.encode(images, 1, features=target)
        predicted = tatok.decode_latent(encoding.latent)
        return nn.functional.cosine_similarity(predicted, target, dim=-1).mean(), encoding.loss

    with torch.no_grad():
        before = cosine()[0].item()
    for _ in range(25):
        value, vq = cosine()
        (1 - value + vq).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after = cosine()[0].item()
    assert after > before + 0.2, (before, after)
