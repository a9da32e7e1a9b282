"""A trained LM folder records its settings in generation_config.json, where transformers keeps them."""

import json

import pytest
import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from tarkit_plugins.lm.settings import (
    GenerationDefaults,
    TarSettings,
    TATokRecord,
    default_scale,
    read_settings,
    record_generation_defaults,
    settings_of,
    tatok_record,
    write_settings,
)

SETTINGS = TarSettings(
    train_scales=[2, 2, 3],
    tatok=TATokRecord(path="root:checkpoints/tatok", path_from_lm="../tatok", pool_scales=[1, 2, 3], num_codes=32),
    generation=GenerationDefaults(scale=2, cfg_scale=3.0, temperature=0.9, top_k=None, top_p=0.8),
)


@pytest.fixture
def lm_folder(tmp_path):
    """A plain tiny Qwen2 folder as transformers saves it (its generation_config.json marked from the model)."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, bos_token_id=1, eos_token_id=2)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "lm")
    return tmp_path / "lm"


def test_settings_round_trip_and_transformers_keeps_them(lm_folder):
    write_settings(lm_folder, SETTINGS)
    assert read_settings(lm_folder) == SETTINGS
    raw = json.loads((lm_folder / "generation_config.json").read_text())
    assert raw["tar"]["generation"] == {"scale": 2, "cfg_scale": 3.0, "temperature": 0.9, "top_k": None, "top_p": 0.8}
    assert raw["eos_token_id"] == 2  # transformers' own entries are kept
    assert GenerationConfig.from_pretrained(lm_folder).tar == SETTINGS.to_dict()
    model = Qwen2ForCausalLM.from_pretrained(lm_folder)
    assert settings_of(model) == SETTINGS
    model.save_pretrained(lm_folder.parent / "again")  # survives a save by transformers too
    assert read_settings(lm_folder.parent / "again") == SETTINGS


def test_a_folder_or_model_without_a_record_reads_as_defaults(lm_folder):
    assert read_settings(lm_folder) == TarSettings()
    assert read_settings(lm_folder.parent) == TarSettings()  # no generation_config.json at all
    assert settings_of(torch.nn.Linear(2, 2)) == TarSettings()
    reference = GenerationDefaults(scale=1, cfg_scale=1.0, temperature=1.0, top_k=1200, top_p=0.95)
    assert TarSettings().generation == reference


def test_record_generation_defaults_updates_only_what_it_is_given(lm_folder):
    write_settings(lm_folder, SETTINGS)
    updated = record_generation_defaults(lm_folder, scale=3, cfg_scale=4.5)
    assert updated == read_settings(lm_folder)
    assert updated.generation == GenerationDefaults(scale=3, cfg_scale=4.5, temperature=0.9, top_k=None, top_p=0.8)
    assert updated.train_scales == [2, 2, 3] and updated.tatok == SETTINGS.tatok


@pytest.mark.parametrize(
    ("defaults", "error", "match"),
    [
        ({"sacle": 2}, TypeError, "unknown generation default.*sacle.*known: scale, cfg_scale"),
        ({"scale": 4}, ValueError, r"scale 4 is not one of the recorded TA-Tok's pool scales \[1, 2, 3\]"),
        ({"scale": 1.5}, ValueError, "scale must be an integer >= 1"),
    ],
)
def test_record_generation_defaults_refuses_bad_values_in_one_line(lm_folder, defaults, error, match):
    write_settings(lm_folder, SETTINGS)
    with pytest.raises(error, match=match) as info:
        record_generation_defaults(lm_folder, **defaults)
    assert "\n" not in str(info.value)
    assert read_settings(lm_folder) == SETTINGS  # nothing written


def test_record_generation_defaults_needs_an_lm_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not an LM folder"):
        record_generation_defaults(tmp_path, scale=2)


def test_unknown_fields_in_a_record_name_the_file(lm_folder):
    write_settings(lm_folder, SETTINGS)
    raw = json.loads((lm_folder / "generation_config.json").read_text())
    raw["tar"]["generation"]["cfg"] = 2.0
    (lm_folder / "generation_config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"generation_config.json:tar.generation has unknown field\(s\) cfg"):
        read_settings(lm_folder)


@pytest.mark.parametrize(("scales", "expected"), [([1, 1, 2, 3], 1), ([2], 2), ([3, 2, 2], 2), ([2, 3], 2)])
def test_default_scale_is_the_most_frequent_training_scale_first_of_a_tie(scales, expected):
    assert default_scale(scales) == expected


def test_tatok_record_keeps_the_path_as_given_and_relative_to_the_lm(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "tatok").mkdir(parents=True)
    record = tatok_record("out/tatok", tmp_path / "out" / "lm", [1, 2], 64)
    assert record == TATokRecord(path="out/tatok", path_from_lm="../tatok", pool_scales=[1, 2], num_codes=64)
