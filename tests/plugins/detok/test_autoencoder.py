"""MMAutoEncoder composes a TA-Tok with any de-tokenizer: codes <-> uint8 pixels, folders, clear errors."""

from typing import Any

import pytest
import torch
from torch import nn

from tarkit.interfaces import DeTokenizer
from tarkit_plugins.detok.autoencoder import MMAutoEncoder, load_detokenizer, to_uint8
from tests.tiny_parts import tiny_tatok


class FlatColourDeTokenizer(DeTokenizer):
    """A flat image whose colour is a linear function of the mean condition, guided against zeros."""

    def __init__(self, condition_dim: int = 96, size: int = 16):
        super().__init__()
        self.width, self.size = condition_dim, size
        self.to_colour = nn.Linear(condition_dim, 3)
        self.calls: list[dict[str, Any]] = []

    @property
    def condition_dim(self) -> int:
        return self.width

    @property
    def image_size(self) -> int:
        return self.size

    def colour(self, condition: torch.Tensor) -> torch.Tensor:
        return self.to_colour(condition.mean(1))

    def loss(self, condition: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": (self.colour(condition) - images.mean((2, 3))).pow(2).mean()}

    def sample(self, condition, cfg_scale=1.0, generator=None, **sampling):
        self.calls.append({"cfg_scale": cfg_scale, "tokens": condition.shape[1], **sampling})
        cond = self.colour(condition)
        if cfg_scale != 1:
            cond = self.colour(torch.zeros_like(condition)) * (1 - cfg_scale) + cond * cfg_scale
        return torch.sigmoid(cond)[:, :, None, None].expand(-1, -1, self.size, self.size)


@pytest.fixture(scope="module")
def tatok():
    torch.manual_seed(0)
    return tiny_tatok().eval()


def test_reconstruct_and_decode_give_uint8_images_at_every_scale(tatok):
    detok = FlatColourDeTokenizer()
    autoencoder = MMAutoEncoder(tatok, detok, scale=2, cfg_scale=3.0, temperature=0.5)
    images = autoencoder.reconstruct(torch.rand(2, 3, 64, 64))
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 16, 16)
    assert detok.calls[-1] == {"cfg_scale": 3.0, "tokens": 36, "temperature": 0.5}
    for tokens in (144, 36, 16):
        codes = torch.randint(0, 32, (1, tokens))
        decoded = autoencoder.decode_from_encoder_indices(codes, cfg_scale=1.0, temperature=1.0)
        assert decoded.shape == (1, 3, 16, 16) and detok.calls[-1]["tokens"] == tokens
        assert detok.calls[-1]["cfg_scale"] == 1.0 and detok.calls[-1]["temperature"] == 1.0


def test_decode_matches_the_detokenizer_on_the_tatok_features(tatok):
    detok = FlatColourDeTokenizer()
    codes = torch.randint(0, 32, (3, 16))
    expected = to_uint8(detok.sample(tatok.decode_features(codes)))
    assert torch.equal(MMAutoEncoder(tatok, detok).decode_from_encoder_indices(codes), expected)


def test_folders_load_and_bad_input_is_named(tatok, tmp_path):
    FlatColourDeTokenizer().save_pretrained(tmp_path / "detok")
    tatok.save_pretrained(tmp_path / "tatok")
    autoencoder = MMAutoEncoder(str(tmp_path / "tatok"), str(tmp_path / "detok"))
    assert isinstance(load_detokenizer(str(tmp_path / "detok")), FlatColourDeTokenizer)
    with pytest.raises(ValueError, match="expected code indices"):
        autoencoder.decode_from_encoder_indices(torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="96-wide"):
        MMAutoEncoder(tatok, FlatColourDeTokenizer(condition_dim=8))
    with pytest.raises(ValueError, match="scale"):
        MMAutoEncoder(tatok, FlatColourDeTokenizer(), scale=5)
