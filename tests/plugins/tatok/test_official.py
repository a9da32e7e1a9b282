"""The authors' files load into tarkit and give the authors' outputs.

``ta_tok.pth`` is written here from real modules under the reference's attribute names (csuhan/Tar
``tok/ta_tok.py``: a SigLIP tower from the teacher's config, a Siglip2 decoder, the task layers, the bottleneck
with its SimVQ regularizer, the ``scale_layer`` buffers), so it carries every parameter and persistent buffer
those modules register. The same modules compute the expected outputs, following the reference's forward.
A Tar LM folder (csuhan/Tar-1.5B's layout) is built the way the reference expands its vocabulary.
"""

import json

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    GenerationConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipConfig,
)

from tarkit.pretrained import PretrainedLoadError
from tarkit.tatok import TATok
from tarkit.vocab import ImageVocabulary
from tarkit_plugins.lm.tokenizers import load_tokenizer
from tarkit_plugins.lms import HFCausalLM
from tarkit_plugins.tatok.reference_api import TextAlignedTokenizer

# 36 px / patch 6 = a 6 x 6 grid (36, 9 and 4 tokens at scales 1, 2, 3). Three heads: no known SigLIP width, so
# only the teacher's config can tell them. Width 48 suits the decoder's default 12 heads.
TEACHER = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 3,
    "image_size": 36,
    "patch_size": 6,
}
TEXT = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "vocab_size": 64,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}
DIM, CODES, DECODER_DEPTH = 8, 40, 2


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """The teacher named in args["teacher"]: a local SigLIP folder with only the config the reference reads."""
    folder = tmp_path_factory.mktemp("teacher")
    SiglipConfig(vision_config=TEACHER, text_config=TEXT).save_pretrained(folder)
    return folder


def regularizer_args(**overrides):
    return {"codebook_size": CODES, "l2_normalized": True, **overrides}


def reference_args(teacher, regularizer=None, **overrides):
    """Constructor kwargs as the reference saves them (``{"name", "args"}`` specs for the bottleneck)."""
    bottleneck = {"bottleneck_dim": DIM, "regularizer": {"name": "simvq", "args": regularizer or regularizer_args()}}
    return {
        "bottleneck": {"name": "bottleneck", "args": bottleneck},
        "teacher": str(teacher),
        "input_size": 36,
        "select_layer_id": -2,
        "pool_scale": 2,
        "decoder_depth": DECODER_DEPTH,
        "bottleneck_token_num": 36,
        **overrides,
    }


class ScaleLayer(nn.Module):
    def __init__(self, shift, scale):
        super().__init__()
        self.register_buffer("shift", torch.tensor(shift).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(scale).view(1, 3, 1, 1))


class Regularizer(nn.Module):
    """SimVQ's weights; a learned inverse temperature when ``stochastic_temperature < 0``."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.embedding = nn.Embedding(CODES, DIM)
        self.embedding_proj = nn.Linear(DIM, DIM)
        if args.get("stochastic") and args.get("stochastic_temperature", 1.0) < 0:
            self.stochastic_temperature_inv = nn.Parameter(torch.tensor(25.0))

    def codebook(self):
        codes = self.embedding_proj(self.embedding.weight)
        return F.normalize(codes, dim=-1) if self.args.get("l2_normalized") else codes

    def indices(self, z):
        codes = self.codebook()
        if self.args.get("l2_normalized"):
            z = F.normalize(z, dim=-1)
        if self.args.get("stochastic"):  # deterministic eval: the mode of softmax(cos * inv)
            inverse = getattr(self, "stochastic_temperature_inv", 1 / self.args.get("stochastic_temperature", 1.0))
            return torch.softmax(z @ codes.T * inverse, dim=-1).argmax(-1)
        distances = z.pow(2).sum(-1, keepdim=True) + codes.pow(2).sum(-1) - 2 * z @ codes.T
        return distances.argmin(-1)


class Bottleneck(nn.Module):
    def __init__(self, width, regularizer):
        super().__init__()
        self.in_linear = nn.Linear(width, DIM)
        self.out_linear = nn.Linear(DIM, DIM)
        self.regularizer = Regularizer(regularizer)


class ReferenceTATok(nn.Module):
    """The reference's module tree, built from ``args`` as the reference builds it, and its forward (the oracle)."""

    def __init__(self, args, shift=(0.5, 0.5, 0.5), scale=(0.5, 0.5, 0.5)):
        super().__init__()
        torch.manual_seed(0)
        self.args = args
        self.encoder = AutoModel.from_config(AutoConfig.from_pretrained(args["teacher"])).vision_model
        width = self.encoder.config.hidden_size
        decoder = Siglip2VisionConfig()
        decoder.update(
            {"patch_size": 1, "num_hidden_layers": args["decoder_depth"], "num_channels": DIM, "hidden_size": width}
        )
        self.decoder = Siglip2VisionModel(decoder)
        self.encode_task_layer = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.decode_task_layer = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        self.bottleneck = Bottleneck(width, args["bottleneck"]["args"]["regularizer"]["args"])
        self.scale_layer = ScaleLayer(shift, scale)
        with torch.no_grad():  # livelier than the initialisers' near-identity layers: codes then vary per token
            for parameter in self.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.2)

    @torch.no_grad()
    def indices(self, images, pool_scale):
        size = self.args["input_size"]
        x = (images - self.scale_layer.shift) / self.scale_layer.scale
        if x.shape[-2:] != (size, size):  # torchvision's Resize on tensors: bilinear, antialiased
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        features = self.encoder(x, output_hidden_states=True).hidden_states[self.args["select_layer_id"]]
        if pool_scale != 1:
            batch, tokens, width = features.shape
            grid = int(tokens**0.5)
            square = features.transpose(1, 2).reshape(batch, width, grid, grid)
            features = F.avg_pool2d(square, pool_scale, pool_scale).flatten(2).transpose(1, 2)
        return self.bottleneck.regularizer.indices(self.bottleneck.in_linear(self.encode_task_layer(features)))

    @torch.no_grad()
    def decode(self, indices):
        z = self.bottleneck.out_linear(F.embedding(indices, self.bottleneck.regularizer.codebook()))
        grid = int(indices.shape[1] ** 0.5)
        mask = torch.ones(z.shape[:2], dtype=torch.int)
        shapes = torch.tensor([[grid, grid]] * len(z))
        return self.decode_task_layer(self.decoder(z, mask, shapes).last_hidden_state)

    def official_state(self, decoder_prefix="decoder.vision_model."):
        """The state dict as the file holds it; transformers 4 (the reference's) names the decoder's weights
        ``decoder.vision_model.*``, transformers 5 ``decoder.*``."""
        return {
            (decoder_prefix + k.removeprefix("decoder.") if k.startswith("decoder.") else k): v.clone()
            for k, v in self.state_dict().items()
        }


def save_reference(path, reference, state=None, args=None):
    state = reference.official_state() if state is None else state
    torch.save({"model": {"args": args or reference.args, "sd": state}}, path)
    return path


def images(size=36):
    return torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))


VARIANTS = {
    # The paper's setting: stochastic SimVQ with a learned temperature, l2-normalised; a non-default scale_layer;
    # transformers-4 decoder names; inputs resized from 40 px.
    "stochastic-learned": (
        {"regularizer": regularizer_args(stochastic=True, stochastic_temperature=-1.0)},
        {"shift": (0.4, 0.5, 0.6), "scale": (0.2, 0.3, 0.25)},
        "decoder.vision_model.",
        40,
    ),
    # Plain squared-L2 argmin on raw codes, an earlier hidden state, transformers-5 decoder names.
    "argmin-raw": (
        {"regularizer": regularizer_args(l2_normalized=False), "select_layer_id": 1},
        {},
        "decoder.",
        36,
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reference_file_gives_the_reference_indices_and_features_at_every_scale(tmp_path, teacher_dir, variant):
    arg_overrides, buffers, decoder_prefix, size = VARIANTS[variant]
    reference = ReferenceTATok(reference_args(teacher_dir, **arg_overrides), **buffers).eval()
    path = save_reference(tmp_path / "ta_tok.pth", reference, reference.official_state(decoder_prefix))
    tok = TextAlignedTokenizer.from_checkpoint(str(path), input_type="indices")
    assert tok.pool_scale == 2  # args["pool_scale"]
    x = images(size)
    for scale, tokens in ((1, 36), (2, 9), (3, 4)):
        expected = reference.indices(x, scale)
        assert expected.shape == (3, tokens) and expected.unique().numel() > 1
        indices = tok.encode(x, scale)
        assert torch.equal(indices, expected), f"pool scale {scale}"
        torch.testing.assert_close(tok.decode_features(indices), reference.decode(expected))


def test_learned_temperature_and_normalisation_are_applied_and_saved(tmp_path, teacher_dir):
    args = reference_args(teacher_dir, regularizer=regularizer_args(stochastic=True, stochastic_temperature=-1.0))
    reference = ReferenceTATok(args, shift=(0.4, 0.5, 0.6), scale=(0.2, 0.3, 0.25)).eval()
    tatok = TextAlignedTokenizer.from_checkpoint(str(save_reference(tmp_path / "ta_tok.pth", reference))).tatok
    inverse = reference.bottleneck.regularizer.stochastic_temperature_inv.item()
    assert tatok.quantizer.stochastic and tatok.quantizer.temperature == pytest.approx(1 / inverse)
    assert tatok.encoder.mean.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])
    assert tatok.encoder.std.flatten().tolist() == pytest.approx([0.2, 0.3, 0.25])
    reloaded = TATok.from_pretrained(tatok.save_pretrained(tmp_path / "folder")).eval()
    assert torch.equal(reloaded.encoder.std, tatok.encoder.std)
    assert torch.equal(reloaded.tokenize(images(), 1), tatok.tokenize(images(), 1))


def test_the_files_scale_layer_decides_the_indices(tmp_path, teacher_dir):
    """A file whose scale_layer is shift 0 / scale 1 (inputs already normalised) gives its own, correct indices."""
    args = reference_args(teacher_dir)
    half = ReferenceTATok(args).eval()
    identity = ReferenceTATok(args, shift=(0.0, 0.0, 0.0), scale=(1.0, 1.0, 1.0)).eval()
    x = images()
    got = {}
    for name, reference in (("half", half), ("identity", identity)):
        path = save_reference(tmp_path / f"{name}.pth", reference)
        got[name] = TextAlignedTokenizer.from_checkpoint(str(path)).encode(x, 1)
        assert torch.equal(got[name], reference.indices(x, 1))
    assert not torch.equal(got["half"], got["identity"])


def test_without_the_teacher_config_the_weights_and_one_override_suffice(tmp_path, teacher_dir, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no hub: fail at once, fall back
    reference = ReferenceTATok(reference_args(teacher_dir)).eval()
    path = save_reference(tmp_path / "ta_tok.pth", reference, args=reference_args("no-such-org/no-such-teacher"))
    with pytest.raises(PretrainedLoadError) as err:
        TextAlignedTokenizer.from_checkpoint(str(path))
    message = str(err.value)
    assert "cannot tell the encoder's attention heads from its weights (width 48)" in message
    assert "pass encoder_config={'num_attention_heads': N}" in message and "\n" not in message
    tok = TextAlignedTokenizer.from_checkpoint(str(path), encoder_config={"num_attention_heads": 3})
    assert torch.equal(tok.encode(images(), 3), reference.indices(images(), 3))


def test_teacher_weights_load_when_asked(tmp_path, teacher_dir):
    reference = ReferenceTATok(reference_args(teacher_dir)).eval()
    state = reference.official_state()
    teacher = {f"teacher.{k.removeprefix('encoder.')}": v + 1 for k, v in state.items() if k.startswith("encoder.")}
    path = save_reference(tmp_path / "ta_tok.pth", reference, state | teacher)
    tok = TextAlignedTokenizer.from_checkpoint(str(path), load_teacher=True)
    assert torch.equal(
        tok.teacher.model.embeddings.patch_embedding.weight, state["encoder.embeddings.patch_embedding.weight"] + 1
    )
    assert torch.equal(tok.teacher.std, tok.tatok.encoder.std)
    with pytest.raises(PretrainedLoadError, match="no teacher"):
        TextAlignedTokenizer.from_checkpoint(str(save_reference(tmp_path / "plain.pth", reference)), load_teacher=True)


def test_wrong_keys_and_shapes_are_listed_in_one_line(tmp_path, teacher_dir):
    reference = ReferenceTATok(reference_args(teacher_dir))
    broken = reference.official_state()
    del broken["bottleneck.out_linear.bias"]
    broken["decode_task_layer.2.weight"] = torch.zeros(48, 49)
    broken["bottleneck.regularizer.stochastic_temperature_inv"] = torch.tensor(10.0)  # args: not stochastic
    path = save_reference(tmp_path / "broken.pth", reference, broken)
    with pytest.raises(PretrainedLoadError) as err:
        TextAlignedTokenizer.from_checkpoint(str(path))
    message = str(err.value)
    assert "missing keys [out_linear.bias]" in message
    assert "unexpected keys [bottleneck.regularizer.stochastic_temperature_inv]" in message
    assert "decode_task_layer.2.weight: file (48, 49) vs model (48, 48)" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"input_size": 48}, "input_size 48 with patch 6 does not give the 6 x 6 grid"),
        ({"decoder_depth": 3}, r"missing keys \[decoder.encoder.layers.2"),
        ({"regularizer": regularizer_args(codebook_size=64)}, r"codebook.embedding: file \(40, 8\) vs model \(64, 8\)"),
        ({"regularizer": regularizer_args(stochastic=True, stochastic_temperature=-1.0)}, "missing key bottleneck.reg"),
    ],
)
def test_args_that_disagree_with_the_weights_are_clear_errors(tmp_path, teacher_dir, overrides, message):
    reference = ReferenceTATok(reference_args(teacher_dir))
    path = save_reference(tmp_path / "ta_tok.pth", reference, args=reference_args(teacher_dir, **overrides))
    with pytest.raises(PretrainedLoadError, match=message):
        TextAlignedTokenizer.from_checkpoint(str(path))


def test_unreadable_or_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(PretrainedLoadError, match="no such checkpoint file"):
        TextAlignedTokenizer.from_checkpoint(str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedLoadError, match="cannot be read as a weights-only torch checkpoint"):
        TextAlignedTokenizer.from_checkpoint(str(tmp_path / "junk.pth"))
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(PretrainedLoadError, match=r"not in the reference layout .*found \['state_dict'\]"):
        TextAlignedTokenizer.from_checkpoint(str(tmp_path / "other.pth"))


def tar_lm_folder(folder, llava, num_codes=64):
    """A Tar-1.5B-shaped folder: a Qwen2 causal LM with the Qwen2.5 tokenizer expanded as the reference expands it
    (``add_tokens``: ``<im_start>``/``<im_end>`` special, then ``<S0>..<S2>``, then ``<I0>..``), the reference's
    vocabulary ids in the config, and a generation config. ``llava``: as the reference's trainer saves it, a
    ``llava_qwen`` config whose weights hold the vision tower too."""
    tokenizer = load_tokenizer("qwen2")
    base = len(tokenizer)
    tokenizer.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    tokenizer.add_tokens([f"<S{i}>" for i in range(3)])
    tokenizer.add_tokens([f"<I{i}>" for i in range(num_codes)])
    rows = len(tokenizer)  # the reference resizes the embeddings to the expanded vocabulary
    tokenizer.add_tokens(["<image>"], special_tokens=True)  # its data pipeline's placeholder, after the resize
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=rows,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        image_start_tag_id=base,
        image_end_tag_id=base + 1,
        scale_start_token_id=base + 2,
        scale_end_token_id=base + 4,
        num_scale_tokens=3,
        image_start_token_id=base + 5,
        image_end_token_id=base + 4 + num_codes,
        num_image_tokens=num_codes,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    generation = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, eos_token_id=[151645, 151643])
    generation.save_pretrained(folder)
    if llava:
        saved = json.loads((folder / "config.json").read_text())
        saved |= {
            "model_type": "llava_qwen",
            "architectures": ["LlavaQwenForCausalLM"],
            "mm_vision_tower": "ta_tok.pth",
        }
        (folder / "config.json").write_text(json.dumps(saved))
        weights = load_file(folder / "model.safetensors")
        weights["model.vision_tower.vision_tower.scale_layer.shift"] = torch.full((1, 3, 1, 1), 0.5)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return model, base


@pytest.mark.parametrize("llava", [False, True], ids=["qwen2", "llava_qwen"])
def test_a_tar_lm_folder_loads_with_its_image_vocabulary(tmp_path, llava):
    model, base = tar_lm_folder(tmp_path / "tar", llava)
    lm = HFCausalLM(pretrained=str(tmp_path / "tar"), num_codes=64).eval()
    assert type(lm.model) is Qwen2ForCausalLM
    assert lm.vocab == ImageVocabulary(base, base + 1, (base + 2, base + 3, base + 4), base + 5, 64)
    # The reference's understanding prompt: the image tokens, a newline, the question.
    messages = [{"role": "user", "content": "<I3><I63>\nDescribe the image shortly."}]
    prompt = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([lm.tokenizer(prompt).input_ids])
    assert lm.vocab.ids_to_codes(ids[lm.vocab.is_image(ids)]).tolist() == [3, 63]
    assert lm.tokenizer("<im_start><S2>").input_ids == [base, base + 4]
    with torch.no_grad():
        assert torch.equal(lm(ids), model(ids).logits)
