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


def test_codebook_is_cached_for_inference_and_invalidated_when_weights_change():
    codebook = LearnedCodebook(num_codes=5, dim=3).eval()
    with torch.no_grad():
        first = codebook.codebook()
        assert codebook.codebook() is first  # reused
        codebook.embedding.add_(1.0)  # an in-place update, as an optimizer step makes
        second = codebook.codebook()
        assert second is not first and torch.equal(second, codebook.embedding)
        codebook.load_state_dict({"embedding": torch.zeros(5, 3)})
        assert torch.equal(codebook.codebook(), torch.zeros(5, 3))
    codebook.train()
    assert codebook.codebook().requires_grad  # training always recomputes, with gradients
