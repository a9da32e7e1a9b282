import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tarkit.vocab import IM_END, IM_START, ImageVocabulary, VocabularyError, image_token, scale_token
from tarkit_plugins.lm.tokenizers import load_tokenizer
from tarkit_plugins.lm.vocab_expansion import check_vocabulary, expand_vocabulary, orthonormal_map

BASE = 278  # the byte-level stand-in tokenizer: 256 bytes + 22 Qwen2.5 added tokens


def tiny_lm(rows: int = BASE, tied: bool = False, width: int = 32) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=rows,
        hidden_size=width,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )
    return Qwen2ForCausalLM(config).eval()


def rows_of(model: Qwen2ForCausalLM) -> tuple[torch.Tensor, torch.Tensor]:
    return model.get_input_embeddings().weight.detach().clone(), model.get_output_embeddings().weight.detach().clone()


def test_new_words_follow_the_reference_order_with_contiguous_ids():
    tokenizer, model = load_tokenizer("bytes"), tiny_lm()
    vocab = expand_vocabulary(model, tokenizer, num_codes=50, num_scales=3)
    assert vocab == ImageVocabulary(
        im_start=BASE, im_end=BASE + 1, scale_ids=(280, 281, 282), image_start=283, num_codes=50
    )
    words = [IM_START, IM_END, *map(scale_token, range(3)), *map(image_token, range(50))]
    assert tokenizer.convert_tokens_to_ids(words) == list(range(BASE, BASE + len(words)))
    assert len(tokenizer) == BASE + len(words)
    assert ImageVocabulary.from_tokenizer(tokenizer) == vocab
    # <im_start>/<im_end> are special tokens; scale and image tokens are plain added tokens.
    ids = tokenizer("<im_start><S2><I0><I49><im_end>x").input_ids
    assert ids == [BASE, 282, 283, 332, BASE + 1, ord("x")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<S2><I0><I49>x"


def test_codes_to_ids_to_text_and_back_is_exact():
    tokenizer, model = load_tokenizer("bytes"), tiny_lm()
    vocab = expand_vocabulary(model, tokenizer, num_codes=300, num_scales=2)
    codes = torch.randint(0, 300, (64,), generator=torch.Generator().manual_seed(0))
    ids = vocab.codes_to_ids(codes)
    text = tokenizer.decode(ids)
    assert text.startswith(image_token(int(codes[0])))
    again = torch.tensor(tokenizer(text).input_ids)
    assert torch.equal(vocab.ids_to_codes(again), codes)
    assert vocab.is_image(again).all() and not vocab.is_image(torch.tensor([vocab.im_start, 0])).any()


def test_old_rows_stay_bit_identical_and_new_rows_are_their_mean():
    tokenizer, model = load_tokenizer("bytes"), tiny_lm(tied=False)
    old_in, old_out = rows_of(model)
    text = torch.tensor([tokenizer("<|im_start|>user\nhi<|im_end|>").input_ids])
    with torch.no_grad():
        old_logits = model(text).logits
    vocab = expand_vocabulary(model, tokenizer, num_codes=40)
    new_in, new_out = rows_of(model)
    total = vocab.image_end
    assert new_in.shape == new_out.shape == (total, 32)
    assert torch.equal(new_in[:BASE], old_in) and torch.equal(new_out[:BASE], old_out)
    assert torch.allclose(new_in[BASE:], old_in.mean(0).expand(total - BASE, -1))
    assert torch.allclose(new_out[BASE:], old_out.mean(0).expand(total - BASE, -1))
    assert not torch.allclose(old_in.mean(0), old_out.mean(0))  # each matrix gets its own mean
    assert model.config.vocab_size == model.vocab_size == total
    assert model.get_input_embeddings().num_embeddings == model.get_output_embeddings().out_features == total
    with torch.no_grad():
        logits = model(text).logits
    assert logits.shape[-1] == total
    assert torch.equal(logits[..., :BASE], old_logits)  # text predictions unchanged


def test_tied_embeddings_grow_once_and_stay_tied():
    tokenizer, model = load_tokenizer("bytes"), tiny_lm(tied=True)
    old_in, _ = rows_of(model)
    vocab = expand_vocabulary(model, tokenizer, num_codes=10)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    new_in, _ = rows_of(model)
    assert new_in.shape[0] == vocab.image_end
    assert torch.equal(new_in[:BASE], old_in)
    assert torch.allclose(new_in[BASE:], old_in.mean(0).expand(vocab.image_end - BASE, -1))


def test_new_ids_start_after_the_tokenizer_even_when_the_model_has_padding_rows():
    # Like Qwen2 (151,665 tokens in 151,936 rows): 12 padding rows after the stand-in's 278 tokens.
    tokenizer, model = load_tokenizer("bytes"), tiny_lm(rows=BASE + 12)
    old_in, old_out = rows_of(model)
    vocab = expand_vocabulary(model, tokenizer, num_codes=5, num_scales=1)  # 8 words: fit in the padding
    assert (vocab.im_start, vocab.image_end) == (BASE, BASE + 8)
    new_in, new_out = rows_of(model)
    assert new_in.shape[0] == BASE + 12 and model.config.vocab_size == BASE + 12  # never shrinks
    assert torch.allclose(new_in[BASE : BASE + 8], old_in[:BASE].mean(0).expand(8, -1))  # mean of real tokens
    assert torch.equal(new_in[BASE + 8 :], old_in[BASE + 8 :]) and torch.equal(new_out[BASE + 8 :], old_out[BASE + 8 :])

    tokenizer, model = load_tokenizer("bytes"), tiny_lm(rows=BASE + 12)
    vocab = expand_vocabulary(model, tokenizer, num_codes=30)  # 35 words: more than the padding
    assert vocab.image_end == len(tokenizer) == model.get_input_embeddings().weight.shape[0] == BASE + 35


def test_image_token_input_rows_come_from_the_codebook_when_widths_match():
    tokenizer, model = load_tokenizer("bytes"), tiny_lm(tied=False)
    old_in, old_out = rows_of(model)
    codebook = torch.randn(16, 32, dtype=torch.float64)
    vocab = expand_vocabulary(model, tokenizer, num_codes=16, codebook=codebook)
    new_in, new_out = rows_of(model)
    assert torch.equal(new_in[vocab.image_start : vocab.image_end], codebook.float())
    assert torch.allclose(new_in[BASE : vocab.image_start], old_in.mean(0).expand(vocab.image_start - BASE, -1))
    assert torch.allclose(new_out[BASE:], old_out.mean(0).expand(vocab.image_end - BASE, -1))  # output: mean


@pytest.mark.parametrize("dim", [8, 48])
def test_a_codebook_of_another_width_arrives_through_a_fixed_orthonormal_map(dim):
    tokenizer, model = load_tokenizer("bytes"), tiny_lm()
    codebook = torch.randn(16, dim, generator=torch.Generator().manual_seed(0))
    vocab = expand_vocabulary(model, tokenizer, num_codes=16, codebook=codebook)
    rows = rows_of(model)[0][vocab.image_start : vocab.image_end]
    assert rows.shape == (16, 32) and torch.equal(rows, orthonormal_map(codebook, 32))
    if dim < 32:  # into the wider LM space every inner product (so every distance) is kept
        assert torch.allclose(rows @ rows.T, codebook @ codebook.T, atol=1e-5)
    assert torch.cdist(rows, rows).topk(2, largest=False).values[:, 1].min() > 0  # distinct codes, distinct rows


def test_bad_requests_fail_before_changing_anything():
    tokenizer, model = load_tokenizer("bytes"), tiny_lm()
    with pytest.raises(ValueError, match=r"codebook must be \[num_codes=16, D\]"):
        expand_vocabulary(model, tokenizer, num_codes=16, codebook=torch.randn(15, 32))
    with pytest.raises(VocabularyError, match="278 tokens"):
        expand_vocabulary(tiny_lm(rows=100), tokenizer, num_codes=16)
    assert len(tokenizer) == BASE and model.get_input_embeddings().weight.shape[0] == BASE
    expand_vocabulary(model, tokenizer, num_codes=16)
    with pytest.raises(VocabularyError, match="already has <im_start>, <im_end>, <S0>, <S1> ...: it is"):
        expand_vocabulary(model, tokenizer, num_codes=16)


def test_check_vocabulary_accepts_a_tar_pair_and_names_what_is_wrong_otherwise():
    tokenizer, model = load_tokenizer("bytes"), tiny_lm()
    with pytest.raises(VocabularyError, match="no <im_start>, <im_end>, <S0>, <I0>: it is not a Tar vocabulary"):
        check_vocabulary(model, tokenizer)
    vocab = expand_vocabulary(model, tokenizer, num_codes=16, num_scales=3)
    assert check_vocabulary(model, tokenizer) == check_vocabulary(model, tokenizer, 16, 3) == vocab
    with pytest.raises(VocabularyError, match="has 16 image tokens but 1024 were asked for"):
        check_vocabulary(model, tokenizer, num_codes=1024)
    with pytest.raises(VocabularyError, match="has 3 scale tokens but 2"):
        check_vocabulary(model, tokenizer, num_scales=2)
    # An expanded tokenizer next to the unexpanded model it came from.
    with pytest.raises(VocabularyError, match="input embedding has 278 rows .* reach id 298: this model was not"):
        check_vocabulary(tiny_lm(), tokenizer)


def test_the_paper_vocabulary_on_the_real_qwen2_tokenizer():
    tokenizer = load_tokenizer("qwen2")
    model = tiny_lm(rows=151_936, tied=True, width=16)  # Qwen2.5's padded matrix
    old_in, _ = rows_of(model)
    vocab = expand_vocabulary(model, tokenizer, num_codes=65_536, num_scales=3)
    assert (vocab.im_start, vocab.im_end, vocab.scale_ids) == (151_665, 151_666, (151_667, 151_668, 151_669))
    assert (vocab.image_start, vocab.image_end) == (151_670, 217_206)
    assert len(tokenizer) == model.config.vocab_size == model.get_input_embeddings().weight.shape[0] == 217_206
    new_in, _ = rows_of(model)
    assert torch.equal(new_in[:151_665], old_in[:151_665])
    ids = tokenizer("<im_start><S1><I0><I65535><im_end>").input_ids
    assert ids == [151_665, 151_668, 151_670, 217_205, 151_666]
    assert tokenizer("Hello, world!").input_ids == [9707, 11, 1879, 0]
