import json
import shutil

import huggingface_hub.constants
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import (
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from tarkit.interfaces import VisionEncoder
from tarkit.pretrained import PretrainedLoadError
from tarkit.registry import registry
from tarkit_plugins.encoders import SigLIP2Encoder, TimmEncoder

# A 3-layer SigLIP tower on 32 px images: 4 x 4 = 16 patches of width 32.
SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
TIMM_SMALL = {"depth": 3, "embed_dim": 32, "num_heads": 2}


@pytest.fixture
def hf_tower(tmp_path):
    """A randomly initialised Hugging Face SigLIP vision tower, saved as a local checkpoint folder."""
    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(**SMALL)).eval()
    model.save_pretrained(tmp_path / "siglip")
    return model, tmp_path / "siglip"


def count_layer_calls(layers) -> list[int]:
    calls = []
    for layer in layers:
        layer.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_tiny_siglip_preset_gives_a_12x12_grid_that_pools_evenly_at_scales_1_2_3():
    encoder = SigLIP2Encoder().eval()
    assert (encoder.image_size, encoder.grid_size, encoder.width) == (48, 12, 96)
    with torch.no_grad():
        features = encoder(torch.rand(2, 3, 64, 64))  # ShapesWorld size, resized to 48
    assert features.shape == (2, 144, 96)
    grid = features.transpose(1, 2).reshape(2, 96, 12, 12)
    assert [F.avg_pool2d(grid, s, s).flatten(2).shape[-1] for s in (1, 2, 3)] == [144, 36, 16]


def test_paper_preset_is_27x27_by_1152_without_allocating_weights():
    with torch.device("meta"):
        encoder = SigLIP2Encoder(preset="so400m-patch14-384")
        features = encoder(torch.rand(1, 3, 256, 256))  # resized to 384
    assert all(p.is_meta for p in encoder.parameters())
    assert (encoder.image_size, encoder.grid_size, encoder.width) == (384, 27, 1152)
    assert features.shape == (1, 729, 1152)
    assert len(encoder.model.encoder.layers) == 26  # select_layer=-2 of 27: the last layer is never built
    assert encoder.config_dict()["config"]["num_hidden_layers"] == 27
    # floor pooling of the 27 grid, as the reference's avg_pool2d: 729 / 169 / 81 tokens
    grid = torch.zeros(1, 1, 27, 27)
    assert [F.avg_pool2d(grid, s, s).numel() for s in (1, 2, 3)] == [729, 169, 81]


@pytest.mark.parametrize("select_layer", [-2, -1, 0, 1, 3])
def test_select_layer_indexes_hidden_states_and_runs_only_the_layers_it_needs(hf_tower, select_layer):
    reference, folder = hf_tower
    encoder = SigLIP2Encoder(pretrained=str(folder), select_layer=select_layer).eval()
    calls = count_layer_calls(encoder.model.encoder.layers)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values=images * 2 - 1, output_hidden_states=True).hidden_states[select_layer]
        features = encoder(images)
    assert torch.allclose(features, expected, atol=1e-6)
    kept = select_layer % 4
    assert len(calls) == kept and len(encoder.model.encoder.layers) == kept
    assert isinstance(encoder.model.post_layernorm, torch.nn.Identity) and not hasattr(encoder.model, "head")


def test_penultimate_layer_is_the_default_and_differs_from_the_last(hf_tower):
    reference, folder = hf_tower
    encoder = SigLIP2Encoder(pretrained=str(folder)).eval()
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        hidden = reference(pixel_values=images * 2 - 1, output_hidden_states=True).hidden_states
        features = encoder(images)
    assert torch.equal(features, hidden[-2]) and not torch.allclose(features, hidden[-1])


def test_siglip_normalises_with_half_mean_and_std_and_resizes_antialiased():
    encoder = SigLIP2Encoder(config=SMALL).eval()
    seen = []
    encoder.model.embeddings.patch_embedding.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        encoder(torch.full((1, 3, 32, 32), 0.5))
        encoder(torch.ones(1, 3, 32, 32))
        encoder(images)
    assert torch.equal(seen[0], torch.zeros(1, 3, 32, 32)) and torch.equal(seen[1], torch.ones(1, 3, 32, 32))
    resized = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(seen[2], resized * 2 - 1)


def test_full_siglip_model_folder_loads_its_vision_tower(tmp_path):
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text |= {"vocab_size": 100, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 1}
    full = SiglipModel(SiglipConfig(vision_config=SMALL, text_config=text)).eval()
    full.save_pretrained(tmp_path)
    encoder = SigLIP2Encoder(pretrained=str(tmp_path)).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=images * 2 - 1, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(encoder(images), expected)


def test_siglip_checkpoint_errors_are_clear(tmp_path, monkeypatch):
    naflex = {k: v for k, v in SMALL.items() if k != "image_size"}
    Siglip2VisionModel(Siglip2VisionConfig(**naflex)).save_pretrained(tmp_path / "naflex")
    with pytest.raises(PretrainedLoadError, match="NaFlex SigLIP2 checkpoint.*only fixed-resolution"):
        SigLIP2Encoder(pretrained=str(tmp_path / "naflex"))
    with pytest.raises(PretrainedLoadError, match="does not exist; give a local folder"):
        SigLIP2Encoder(pretrained=str(tmp_path / "missing"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, as with no network
    with pytest.raises(PretrainedLoadError, match="could not be fetched from the hub.*pass the local folder"):
        SigLIP2Encoder(pretrained="google/siglip2-so400m-patch14-384")


def test_siglip_checkpoint_that_does_not_fit_the_overrides_is_refused(hf_tower):
    _, folder = hf_tower
    with pytest.raises(PretrainedLoadError, match=r"missing keys \['encoder.layers.3"):
        SigLIP2Encoder(pretrained=str(folder), config={"num_hidden_layers": 5})
    with pytest.raises(PretrainedLoadError, match="shape mismatch.*mlp.fc1"):
        SigLIP2Encoder(pretrained=str(folder), config={"intermediate_size": 128})


def test_siglip_argument_errors():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        SigLIP2Encoder(preset="huge")
    with pytest.raises(ValueError, match=r"unknown config keys \['num_layers'\]"):
        SigLIP2Encoder(config={"num_layers": 2})
    with pytest.raises(ValueError, match="select_layer 5 is out of range for 4 layers"):
        SigLIP2Encoder(select_layer=5)


def test_pretrained_siglip_round_trips_without_its_source_folder(hf_tower, tmp_path):
    _, folder = hf_tower
    encoder = SigLIP2Encoder(pretrained=str(folder)).eval()
    encoder.save_pretrained(tmp_path / "saved")
    shutil.rmtree(folder)
    config = json.loads((tmp_path / "saved" / "config.json").read_text())["init_args"]
    assert config["pretrained"] is None and config["preset"] is None
    assert config["config"]["num_hidden_layers"] == 3  # the whole tower; select_layer shortens it again
    loaded = SigLIP2Encoder.from_pretrained(tmp_path / "saved").eval()
    images = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(loaded(images), encoder(images))


def test_timm_encoder_drops_prefix_tokens_and_returns_the_selected_block(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0, **TIMM_SMALL).eval()
    encoder = TimmEncoder(image_size=64, select_layer=-2, model_kwargs=TIMM_SMALL).eval()
    encoder.model.load_state_dict(full.state_dict(), strict=False)  # the encoder has no last block or norm
    outputs = []
    full.blocks[1].register_forward_hook(lambda _module, _args, out: outputs.append(out))
    calls = count_layer_calls(encoder.model.blocks)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        full.forward_features((images - 0.5) / 0.5)
        features = encoder(images)
    assert full.num_prefix_tokens == 1 and outputs[0].shape == (2, 17, 32)
    assert (encoder.image_size, encoder.grid_size, encoder.width) == (64, 4, 32)
    assert torch.allclose(features, outputs[0][:, 1:], atol=1e-6)
    assert len(calls) == 2 and len(encoder.model.blocks) == 2


def test_timm_encoder_normalises_with_the_models_mean_and_std():
    encoder = TimmEncoder("deit_tiny_patch16_224", image_size=32, model_kwargs={"depth": 1}).eval()
    seen = []
    encoder.model.patch_embed.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        encoder(torch.full((1, 3, 32, 32), 0.5))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(seen[0][0, :, 0, 0], (0.5 - mean) / std)


def test_timm_encoder_loads_local_pretrained_weights_and_round_trips(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", img_size=32, **TIMM_SMALL)
    save_file(source.state_dict(), tmp_path / "weights.safetensors")
    overlay = {"pretrained_cfg_overlay": {"file": str(tmp_path / "weights.safetensors")}}
    encoder = TimmEncoder(pretrained=True, image_size=32, model_kwargs=TIMM_SMALL | overlay).eval()
    assert torch.equal(encoder.model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    encoder.save_pretrained(tmp_path / "saved")
    (tmp_path / "weights.safetensors").unlink()
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["init_args"]["pretrained"] is False
    loaded = TimmEncoder.from_pretrained(tmp_path / "saved").eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), encoder(images))


def test_timm_encoder_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown timm model 'vit_nonexistent'"):
        TimmEncoder("vit_nonexistent")
    with pytest.raises(ValueError, match="select_layer 0 .* not supported"):
        TimmEncoder(select_layer=0, model_kwargs={"depth": 1})
    with pytest.raises(ValueError, match="select_layer -3 is out of range for 1 layers"):
        TimmEncoder(select_layer=-3, model_kwargs={"depth": 1})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PretrainedLoadError, match="no pretrained weights for 'vit_tiny_patch16_224'.*offline, pass"):
        TimmEncoder(pretrained=True, model_kwargs={"depth": 1})


ENCODERS = {
    "siglip2": lambda: SigLIP2Encoder(config=SMALL),
    "timm": lambda: TimmEncoder(image_size=32, model_kwargs=TIMM_SMALL | {"patch_size": 8}),
}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoders_are_interchangeable(name):
    cls = registry.get("tarkit.encoders", name)
    encoder = ENCODERS[name]().eval()
    assert isinstance(encoder, cls) and isinstance(encoder, VisionEncoder)
    assert (encoder.image_size, encoder.grid_size, encoder.width) == (32, 4, 32)
    with torch.no_grad():
        for size in (32, 50):
            assert encoder(torch.rand(3, 3, size, size)).shape == (3, 16, 32)
    for bad in (torch.rand(3, 32, 32), torch.rand(1, 1, 32, 32), torch.rand(1, 4, 32, 32)):
        with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, H, W\]"):
            encoder(bad)
    with pytest.raises(ValueError, match="expected float images"):
        encoder(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
