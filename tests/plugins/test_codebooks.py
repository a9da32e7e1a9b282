import pytest
import torch

from tarkit_plugins.codebooks import LearnedCodebook


def test_learned_codebook_shape_and_normalisation():
    codebook = LearnedCodebook(num_codes=7, dim=3, l2_normalize=True)
    codes = codebook()
    assert codes.shape == (7, 3) and codebook.num_codes == 7 and codebook.dim == 3
    assert torch.allclose(codes.norm(dim=-1), torch.ones(7))
    codes.sum().backward()
    assert codebook.embedding.grad is not None


def test_learned_codebook_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_codes and dim must be positive"):
        LearnedCodebook(num_codes=0, dim=3)
