import huggingface_hub.constants
import pytest
import torch
from jsonargparse import ArgumentParser
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Qwen2ForCausalLM

from tarkit.interfaces import LanguageModel
from tarkit.pretrained import PretrainedLoadError
from tarkit.registry import registry
from tarkit.vocab import ImageVocabulary, VocabularyError
from tarkit_plugins.lms import HFCausalLM

SMALL = {"num_hidden_layers": 2}  # the tiny preset, shallower
BASE = 278  # the byte-level stand-in tokenizer


def small_lm(**kwargs) -> HFCausalLM:
    torch.manual_seed(0)
    return HFCausalLM(**{"tokenizer": "bytes", "config": SMALL, **kwargs}).eval()


def prompt_ids(lm: HFCausalLM, codes: list[int]) -> torch.Tensor:
    text = "<|im_start|>user\n" + "".join(f"<I{c}>" for c in codes) + "\nWhat is it?<|im_end|>"
    return torch.tensor([lm.tokenizer(text).input_ids])


def test_tiny_lm_forward_hidden_states_and_head_agree():
    lm = small_lm(num_codes=16)
    assert isinstance(lm, LanguageModel)
    assert lm.vocab == ImageVocabulary(BASE, BASE + 1, (280, 281, 282), 283, 16)
    ids = torch.cat([prompt_ids(lm, [0, 15, 3]), prompt_ids(lm, [1, 2, 3])])
    with torch.no_grad():
        logits = lm(ids, attention_mask=torch.ones_like(ids))
        hidden = lm.hidden_states(ids)
    assert logits.shape == (2, ids.shape[1], BASE + 21)
    assert hidden.shape == (2, ids.shape[1], 128)
    torch.testing.assert_close(lm.output_head(hidden), logits)
    assert lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight  # tiny: tied


def test_save_and_load_round_trip_gives_identical_logits_and_vocabulary(tmp_path):
    lm = small_lm(num_codes=16)
    ids = prompt_ids(lm, [5, 6, 7])
    with torch.no_grad():
        expected = lm(ids)
    lm.save_pretrained(tmp_path / "tar")
    loaded = HFCausalLM.from_pretrained(tmp_path / "tar").eval()
    assert isinstance(loaded, HFCausalLM)
    assert loaded.vocab == lm.vocab
    assert loaded.tokenizer("<I5>\nhi").input_ids == lm.tokenizer("<I5>\nhi").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids), expected)
    # The folder is the reference's Tar layout: transformers alone loads the model and the image words.
    model = Qwen2ForCausalLM.from_pretrained(tmp_path / "tar").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tar")
    assert ImageVocabulary.from_tokenizer(tokenizer) == lm.vocab
    assert tokenizer("<im_start><S1><I15><im_end>").input_ids == [BASE, 281, 298, BASE + 1]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


def test_a_folder_without_image_words_is_a_plain_lm_until_expanded(tmp_path):
    small_lm().save_pretrained(tmp_path / "plain")
    plain = HFCausalLM(pretrained=str(tmp_path / "plain")).eval()
    ids = plain.tokenizer("<|im_start|>user\nhi", return_tensors="pt").input_ids
    assert plain(ids).shape == (1, ids.shape[1], BASE)
    with pytest.raises(VocabularyError, match="no <im_start>, <im_end>, <S0>, <I0>: it is not a Tar vocabulary"):
        _ = plain.vocab
    # Expanding at load time, or later (as the LM training module does).
    assert HFCausalLM(pretrained=str(tmp_path / "plain"), num_codes=8, num_scales=2).vocab.num_codes == 8
    vocab = plain.ensure_image_vocabulary(8, 2)
    assert plain.vocab == vocab and vocab.image_end == BASE + 12
    assert plain.ensure_image_vocabulary(8, 2) == vocab  # already there: checked, not added again
    assert plain.config_dict()["num_codes"] == 8


def test_a_tar_folder_must_have_the_requested_number_of_codes(tmp_path):
    small_lm(num_codes=16).save_pretrained(tmp_path / "tar")
    assert HFCausalLM(pretrained=str(tmp_path / "tar"), num_codes=16).vocab.num_codes == 16
    with pytest.raises(VocabularyError, match="has 16 image tokens but 32 were asked for"):
        HFCausalLM(pretrained=str(tmp_path / "tar"), num_codes=32)


def test_another_architecture_by_model_type_expands_saves_and_loads(tmp_path):
    lm = small_lm(config={"model_type": "llama", "num_hidden_layers": 1}, num_codes=8)
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    ids = prompt_ids(lm, [0, 7])
    lm.save_pretrained(tmp_path / "llama")
    with torch.no_grad():
        assert torch.equal(HFCausalLM.from_pretrained(tmp_path / "llama").eval()(ids), lm(ids))


def test_image_rows_come_from_the_codebook_when_widths_match():
    lm = small_lm()
    codebook = torch.randn(8, 128)
    vocab = lm.ensure_image_vocabulary(8, 3, codebook)
    embeddings = lm.model.get_input_embeddings().weight
    assert torch.equal(embeddings[vocab.image_start : vocab.image_end], codebook)


def test_a_folder_without_tokenizer_files_uses_the_tokenizer_argument(tmp_path):
    small_lm().model.save_pretrained(tmp_path / "weights_only")
    lm = HFCausalLM(pretrained=str(tmp_path / "weights_only"), tokenizer="bytes")
    assert len(lm.tokenizer) == BASE


def test_bad_sources_fail_in_one_line_saying_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(PretrainedLoadError, match="does not exist; give a local folder or a hub id") as err:
        HFCausalLM(pretrained=str(tmp_path / "missing"))
    assert "\n" not in str(err.value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, as with no network
    with pytest.raises(PretrainedLoadError, match="could not be fetched from the hub.*pass the local folder"):
        HFCausalLM(pretrained="Qwen/Qwen2.5-1.5B-Instruct")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedLoadError, match="has no config.json; is it a Hugging Face causal LM folder"):
        HFCausalLM(pretrained=str(tmp_path / "empty"))
    small_lm().tokenizer.save_pretrained(tmp_path / "no_weights")
    small_lm().model.config.save_pretrained(tmp_path / "no_weights")
    with pytest.raises(PretrainedLoadError, match="cannot be loaded as a Hugging Face causal LM") as err:
        HFCausalLM(pretrained=str(tmp_path / "no_weights"))
    assert "\n" not in str(err.value)
    small_lm().save_pretrained(tmp_path / "damaged")
    weights = load_file(tmp_path / "damaged" / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, tmp_path / "damaged" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PretrainedLoadError, match=r"does not fit its config.json: missing weights \['model.norm"):
        HFCausalLM(pretrained=str(tmp_path / "damaged"))
    with pytest.raises(ValueError, match="unknown preset 'huge'; presets: \\['qwen2.5-1.5b', 'tiny'\\]"):
        HFCausalLM(preset="huge", tokenizer="bytes")


def test_recipes_can_build_it_by_its_registered_name_or_class_path():
    assert registry.get("tarkit.lms", "hf_causal_lm") is HFCausalLM
    parser = ArgumentParser()
    parser.add_argument("--lm", type=LanguageModel)
    config = parser.parse_args(
        ["--lm", '{"class_path": "tarkit_plugins.lms.HFCausalLM", "init_args": {"tokenizer": "bytes", "num_codes": 4}}']
    )
    lm = parser.instantiate(config).lm
    assert isinstance(lm, HFCausalLM) and lm.vocab.num_codes == 4


def test_real_qwen2_tokenizer_with_a_tiny_model_round_trips(tmp_path):
    torch.manual_seed(0)
    lm = HFCausalLM(config={"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128}, num_codes=256)
    assert lm.vocab == ImageVocabulary(151_665, 151_666, (151_667, 151_668, 151_669), 151_670, 256)
    messages = [{"role": "user", "content": "<I7><I255>\nDescribe the image."}]
    prompt = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([lm.tokenizer(prompt).input_ids])
    assert lm.vocab.ids_to_codes(ids[0, 14:16]).tolist() == [7, 255]  # after the system turn and "user\n"
    lm.eval().save_pretrained(tmp_path / "tar")
    loaded = HFCausalLM.from_pretrained(tmp_path / "tar").eval()  # its tokenizer: AutoTokenizer's Qwen2Tokenizer
    assert type(loaded.tokenizer).__name__ == "Qwen2Tokenizer"
    assert loaded.tokenizer(prompt).input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(loaded(ids), lm(ids))


def test_qwen25_15b_preset_has_the_official_shape_on_the_meta_device():
    with torch.device("meta"):
        lm = HFCausalLM(preset="qwen2.5-1.5b")
        assert sum(p.numel() for p in lm.parameters()) == 1_543_714_304  # Qwen2.5-1.5B-Instruct's count
        assert lm.model.get_input_embeddings().weight.shape == (151_936, 1536)
        vocab = lm.ensure_image_vocabulary(65_536, 3)
    assert vocab.image_end == lm.model.get_input_embeddings().weight.shape[0] == lm.model.config.vocab_size == 217_206
    assert lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight
