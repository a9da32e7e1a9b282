"""The reference's ta_tok.pth layout loads into tarkit's TA-Tok and computes the same tokens."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import Siglip2VisionConfig, Siglip2VisionModel, SiglipVisionConfig, SiglipVisionModel

from tarkit.pretrained import PretrainedLoadError
from tarkit.tatok import TextAlignedTokenizer

WIDTH, DIM, CODES = 32, 16, 50


def reference_parts():
    """The reference's modules, built the way csuhan/Tar builds them (full SigLIP tower with head)."""
    torch.manual_seed(0)
    encoder = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=48,
            patch_size=4,
        )
    )
    decoder_config = Siglip2VisionConfig(
        patch_size=1,
        num_hidden_layers=2,
        num_channels=DIM,
        hidden_size=WIDTH,
        num_attention_heads=2,
        intermediate_size=48,
        num_patches=144,
    )
    parts = {
        "encoder": encoder,
        "encode_task_layer": nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()),
        "bottleneck.in_linear": nn.Linear(WIDTH, DIM),
        "bottleneck.out_linear": nn.Linear(DIM, DIM),
        "bottleneck.regularizer.embedding": nn.Embedding(CODES, DIM),
        "bottleneck.regularizer.embedding_proj": nn.Linear(DIM, DIM),
        "decoder.vision_model": Siglip2VisionModel(decoder_config),  # transformers 4 naming, as the file has it
        "decode_task_layer": nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH)),
    }
    state = {f"{prefix}.{k}": v.clone() for prefix, module in parts.items() for k, v in module.state_dict().items()}
    return parts, state


def save_reference(path, state, args=None):
    args = args or {
        "input_size": 48,
        "select_layer_id": -2,
        "pool_scale": 1,
        "teacher": "a/teacher",
        "bottleneck": {"args": {"bottleneck_dim": DIM, "regularizer": {"args": {"l2_normalized": True}}}},
    }
    torch.save({"model": {"args": args, "sd": state}}, path)
    return path


def reference_indices(parts, images):
    """The reference's encode path: normalise, hidden_states[-2], task layer, in_linear, l2-normalised argmin."""
    pixels = (images - 0.5) / 0.5
    with torch.no_grad():
        features = parts["encoder"](pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        z = F.normalize(parts["bottleneck.in_linear"](parts["encode_task_layer"](features)), dim=-1)
        codes = parts["bottleneck.regularizer.embedding_proj"](parts["bottleneck.regularizer.embedding"].weight)
        codes = F.normalize(codes, dim=-1)
        return torch.cdist(z, codes.expand(len(z), -1, -1)).argmin(-1)


def test_reference_file_loads_and_gives_the_same_tokens(tmp_path):
    parts, state = reference_parts()
    path = save_reference(tmp_path / "ta_tok.pth", state)
    tok = TextAlignedTokenizer.from_checkpoint(
        str(path),
        input_type="indices",
        encoder_config={"num_attention_heads": 2},
        decoder_config={"num_attention_heads": 2},
    )
    images = torch.rand(3, 3, 48, 48)
    assert torch.equal(tok.encode(images), reference_indices(parts, images))
    assert torch.equal(tok.tatok.codebook.embedding, state["bottleneck.regularizer.embedding.weight"])
    assert torch.equal(
        tok.tatok.decoder.encoder.layers[1].mlp.fc2.weight,
        state["decoder.vision_model.encoder.layers.1.mlp.fc2.weight"],
    )
    assert tok.decode_features(tok.encode(images)).shape == (3, 144, WIDTH)


def test_teacher_weights_load_when_asked(tmp_path):
    parts, state = reference_parts()
    teacher = {f"teacher.{k.removeprefix('encoder.')}": v + 1 for k, v in state.items() if k.startswith("encoder.")}
    path = save_reference(tmp_path / "ta_tok.pth", state | teacher)
    tok = TextAlignedTokenizer.from_checkpoint(
        str(path),
        load_teacher=True,
        encoder_config={"num_attention_heads": 2},
        decoder_config={"num_attention_heads": 2},
    )
    assert torch.equal(
        tok.teacher.model.embeddings.patch_embedding.weight, state["encoder.embeddings.patch_embedding.weight"] + 1
    )
    no_teacher = save_reference(tmp_path / "plain.pth", state)
    with pytest.raises(PretrainedLoadError, match="no teacher"):
        TextAlignedTokenizer.from_checkpoint(
            str(no_teacher),
            load_teacher=True,
            encoder_config={"num_attention_heads": 2},
            decoder_config={"num_attention_heads": 2},
        )


def test_wrong_shapes_and_missing_keys_are_listed(tmp_path):
    _, state = reference_parts()
    broken = dict(state)
    del broken["bottleneck.out_linear.bias"]
    broken["decode_task_layer.2.weight"] = torch.zeros(WIDTH, WIDTH + 1)
    broken["bottleneck.extra.weight"] = torch.zeros(1)
    path = save_reference(tmp_path / "broken.pth", broken)
    with pytest.raises(PretrainedLoadError) as err:
        TextAlignedTokenizer.from_checkpoint(
            str(path), encoder_config={"num_attention_heads": 2}, decoder_config={"num_attention_heads": 2}
        )
    message = str(err.value)
    assert "missing keys [out_linear.bias]" in message
    assert "unexpected keys [bottleneck.extra.weight]" in message
    assert "decode_task_layer.2.weight: file (32, 33) vs model (32, 32)" in message
    assert "\n" not in message


def test_unreadable_or_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(PretrainedLoadError, match="no such checkpoint file"):
        TextAlignedTokenizer.from_checkpoint(str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedLoadError, match="cannot be read as a weights-only torch checkpoint"):
        TextAlignedTokenizer.from_checkpoint(str(tmp_path / "junk.pth"))
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(PretrainedLoadError, match=r"not in the reference layout .*found \['state_dict'\]"):
        TextAlignedTokenizer.from_checkpoint(str(tmp_path / "other.pth"))
    _, state = reference_parts()
    path = save_reference(tmp_path / "ta_tok.pth", state)
    with pytest.raises(PretrainedLoadError, match="cannot tell the encoder's attention heads"):
        TextAlignedTokenizer.from_checkpoint(str(path))
    with pytest.raises(PretrainedLoadError, match="decoder's 12 attention heads do not divide its width 32"):
        TextAlignedTokenizer.from_checkpoint(str(path), encoder_config={"num_attention_heads": 2})
