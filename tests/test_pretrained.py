import json

import pytest
import torch
from torch import nn

from tarkit.pretrained import CONFIG_NAME, WEIGHTS_NAME, PretrainedLoadError, PretrainedMixin
from tarkit_plugins.codebooks import LearnedCodebook


class TinyNet(PretrainedMixin, nn.Module):
    def __init__(self, width: int = 4, depth: int = 2, act: str = "gelu", tie: bool = False):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
        self.act = nn.GELU() if act == "gelu" else nn.ReLU()
        self.out = nn.Linear(width, width, bias=False)
        if tie:
            self.out.weight = self.layers[0].weight
        self.register_buffer("scale", torch.full((width,), 2.0))

    def forward(self, x):
        return self.out(self.act(self.layers(x))) * self.scale


class WithPart(PretrainedMixin, nn.Module):
    def __init__(self, codebook: LearnedCodebook, hidden: int = 3):
        super().__init__()
        self.codebook = codebook
        self.proj = nn.Linear(codebook.dim, hidden)

    def forward(self):
        return self.proj(self.codebook())


def test_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = TinyNet(width=5, depth=3, act="relu").eval()
    model.scale.fill_(0.5)
    x = torch.randn(2, 5)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / CONFIG_NAME).is_file() and (tmp_path / "m" / WEIGHTS_NAME).is_file()
    config = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert config["init_args"] == {"width": 5, "depth": 3, "act": "relu", "tie": False}
    assert config["class_path"].endswith("TinyNet")
    loaded = TinyNet.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(loaded(x), model(x))
    assert loaded is not model


def test_tied_weights_round_trip(tmp_path):
    model = TinyNet(tie=True)
    model.save_pretrained(tmp_path)
    loaded = TinyNet.from_pretrained(tmp_path)
    assert loaded.out.weight is loaded.layers[0].weight
    assert torch.equal(loaded.out.weight, model.out.weight)


def test_nested_pretrained_parts_round_trip(tmp_path):
    model = WithPart(LearnedCodebook(num_codes=6, dim=4, l2_normalize=True), hidden=2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["init_args"]["codebook"]["init_args"]["num_codes"] == 6
    loaded = WithPart.from_pretrained(tmp_path)
    assert torch.equal(loaded(), model())


def test_refuses_config_that_does_not_match_weights(tmp_path):
    TinyNet(width=4).save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["init_args"]["width"] = 6
    config["init_args"]["depth"] = 3
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(PretrainedLoadError) as err:
        TinyNet.from_pretrained(tmp_path)
    message = str(err.value)
    assert "missing keys [layers.2.bias, layers.2.weight]" in message
    assert "shape mismatch [layers.0.bias: file (4,) vs model (6,)" in message
    assert "\n" not in message


def test_refuses_weights_with_extra_keys(tmp_path):
    TinyNet(depth=3).save_pretrained(tmp_path / "three")
    TinyNet(depth=2).save_pretrained(tmp_path / "two")
    (tmp_path / "two" / WEIGHTS_NAME).write_bytes((tmp_path / "three" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(PretrainedLoadError, match=r"unexpected keys \[layers.2.bias, layers.2.weight\]"):
        TinyNet.from_pretrained(tmp_path / "two")


def test_refuses_other_class_and_missing_files(tmp_path):
    LearnedCodebook(num_codes=2, dim=2).save_pretrained(tmp_path / "cb")
    with pytest.raises(PretrainedLoadError, match="not a TinyNet"):
        TinyNet.from_pretrained(tmp_path / "cb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedLoadError, match="has no config.json"):
        TinyNet.from_pretrained(tmp_path / "empty")
    with pytest.raises(PretrainedLoadError, match="does not exist"):
        TinyNet.from_pretrained(tmp_path / "nowhere")


def test_unserialisable_constructor_argument_is_a_clear_error(tmp_path):
    class Holder(PretrainedMixin, nn.Module):
        def __init__(self, thing: object = None):
            super().__init__()

    with pytest.raises(TypeError, match="argument 'thing' is a object"):
        Holder(thing=object()).save_pretrained(tmp_path)


PRESETS = {"small": {"width": 4, "depth": 1}}


class PresetNet(PretrainedMixin, nn.Module):
    """Built from a preset plus overrides, optionally from a weight file: what a saved folder must not need."""

    weight_sources = {"init_from": None}

    def __init__(self, preset: str | None = "small", config: dict | None = None, init_from: str | None = None):
        super().__init__()
        self.resolved = {**PRESETS.get(preset, {"width": 2, "depth": 1}), **(config or {})}
        self.layers = nn.Sequential(*[nn.Linear(self.resolved["width"], 3) for _ in range(self.resolved["depth"])])
        if init_from is not None:
            self.layers.load_state_dict(torch.load(init_from, weights_only=True))

    def resolved_config(self):
        return dict(self.resolved)


def test_a_saved_folder_holds_the_resolved_config_not_the_preset_nor_the_weight_source(tmp_path, monkeypatch):
    torch.manual_seed(0)
    torch.save(PresetNet(config={"width": 6}).layers.state_dict(), tmp_path / "init.pt")
    model = PresetNet(config={"width": 6}, init_from=str(tmp_path / "init.pt"))
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert config["init_args"] == {"preset": None, "config": {"width": 6, "depth": 1}, "init_from": None}
    (tmp_path / "init.pt").unlink()  # the source is gone
    monkeypatch.setitem(PRESETS, "small", {"width": 4, "depth": 7})  # and the preset changed since
    loaded = PresetNet.from_pretrained(tmp_path / "m")
    assert len(loaded.layers) == 1 and torch.equal(loaded.layers[0].weight, model.layers[0].weight)
