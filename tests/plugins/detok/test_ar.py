"""The AR de-tokenizer: sampling (KV cache, guidance), condition dropout, save/load, the reference's checkpoint
layout, and the tiny recipe under ``tarkit fit``."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tarkit.cli import main
from tarkit.interfaces import DeTokenizer
from tarkit.pretrained import PretrainedLoadError
from tarkit_plugins.detok.ar import AutoregressiveDeTokenizer, load_official_ar_detokenizer
from tarkit_plugins.detok.autoencoder import load_detokenizer
from tarkit_plugins.lm.generation import sample_next

from .conftest import micro_vq

ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(ROOT / "recipes/tiny/ar_detok.yaml")
SMALL_DATA = ["--data.init_args.train_size=8", "--data.init_args.val_size=4", "--data.init_args.batch_size=4"]
MICRO_GPT = {"width": 32, "depth": 2, "heads": 2, "mlp_hidden": 64, "max_condition_tokens": 16}


def tiny(vq=None, positions: str = "absolute", **overrides) -> AutoregressiveDeTokenizer:
    """16 px images as 4 x 4 codes of 32, a 2-layer GPT of width 32 over up to 16 condition tokens of width 12."""
    vq = micro_vq() if vq is None else vq
    torch.manual_seed(0)
    config = {**MICRO_GPT, "positions": positions, **overrides}
    detok = AutoregressiveDeTokenizer(vq, condition_dim=12, preset="tiny", config=config)
    torch.nn.init.normal_(detok.output.weight, std=0.3)  # not the zero init: samples should depend on the weights
    return detok.eval()


def condition(batch: int = 2, tokens: int = 16) -> torch.Tensor:
    return torch.randn(batch, tokens, 12, generator=torch.Generator().manual_seed(1))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def naive_codes(detok, cond, cfg_scale, generator):
    """Sampling without a KV cache: the whole sequence re-run through ``logits`` for every code."""
    codes = torch.zeros(len(cond), 0, dtype=torch.long)
    for step in range(detok.num_image_tokens):
        padded = torch.cat([codes, torch.zeros(len(cond), 1, dtype=torch.long)], dim=1)
        logits = detok.logits(cond, padded)[:, step]
        if cfg_scale != 1:
            uncond = detok.logits(torch.zeros_like(cond), padded)[:, step]
            logits = uncond + cfg_scale * (logits - uncond)
        codes = torch.cat([codes, sample_next(logits, generator=generator)[:, None]], dim=1)
    return codes


@pytest.mark.parametrize("tokens", [16, 9, 4, 1])
def test_sample_has_image_shape_and_range_for_any_square_prefix(tokens):
    detok = tiny()
    images = detok.sample(condition(3, tokens), cfg_scale=2.0, generator=seeded())
    assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert detok.image_size == 16 and detok.condition_dim == 12 and detok.num_image_tokens == 16


@pytest.mark.parametrize(("positions", "dense"), [("absolute", False), ("rope2d", False), ("rope2d", True)])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_sampling_equals_full_recomputation_and_cfg_one_is_unguided(positions, dense, cfg_scale):
    detok, cond = tiny(positions=positions, dense_condition=dense), condition(tokens=9)
    codes = detok.sample_codes(cond, cfg_scale=cfg_scale, generator=seeded())
    assert torch.equal(codes, naive_codes(detok, cond, cfg_scale, seeded()))
    if cfg_scale != 1:
        assert not torch.equal(codes, detok.sample_codes(cond, generator=seeded()))


def test_dense_condition_gives_each_code_the_condition_over_its_own_region():
    detok = tiny(positions="rope2d", dense_condition=True)
    cond = torch.zeros(1, 4, 12)  # a 2 x 2 grid over the 4 x 4 codes; only the top-left cell carries features
    cond[0, 0] = 5.0
    regions = detok._dense(cond) - detok.dense_proj.bias
    touched = regions.abs().sum(-1).reshape(4, 4) > 1e-6
    assert touched[0, 0] and not touched[3, 3]  # the bottom-right codes lie outside the top-left cell's reach
    plain = tiny(positions="rope2d")
    assert plain.dense_proj is None and "dense_proj.weight" not in plain.state_dict()


@pytest.mark.parametrize(("cfg_scale", "rows"), [(1.0, 2), (4.0, 4)])
def test_guided_sampling_runs_cond_and_null_rows_as_one_batch(cfg_scale, rows):
    detok, cond = tiny(), condition()
    batches, projected = [], []
    detok.layers[0].register_forward_hook(lambda module, args, out: batches.append(out.shape[0]))
    detok.clip_proj.register_forward_hook(lambda module, args, out: projected.append(args[0]))
    detok.sample_codes(cond, cfg_scale=cfg_scale, generator=seeded())
    assert batches == [rows] * detok.num_image_tokens  # one prefill, then one step per further code
    if cfg_scale != 1:
        assert torch.equal(projected[0], torch.cat([cond, torch.zeros_like(cond)]))


def test_sampling_options_reach_the_sampler():
    detok, cond = tiny(), condition()
    greedy = detok.sample_codes(cond, temperature=0.0)
    assert torch.equal(greedy, detok.sample_codes(cond, temperature=0.0, generator=seeded(5)))
    assert torch.equal(detok.sample_codes(cond, top_k=1, generator=seeded()), greedy)
    with pytest.raises(ValueError, match="top_p must be None or in"):
        detok.sample_codes(cond, top_p=1.5)


def test_condition_dropout_replaces_whole_conditions_by_zeros_in_training_only():
    detok, cond = tiny(condition_dropout=0.5), condition(batch=64, tokens=4)
    seen = []
    detok.clip_proj.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    images = torch.rand(64, 3, 16, 16)
    detok.train()
    torch.manual_seed(0)
    detok.loss(cond, images)
    dropped = (seen[-1] == 0).flatten(1).all(1)
    kept = (seen[-1] == cond).flatten(1).all(1)
    assert torch.all(dropped ^ kept) and 16 < dropped.sum() < 48
    detok.eval()
    detok.loss(cond, images)
    assert torch.equal(seen[-1], cond)


def test_loss_trains_the_gpt_only_and_reports_accuracy():
    detok = tiny().train()
    out = detok.loss(condition(), torch.rand(2, 3, 32, 32))  # other sizes are resized to the VQ's
    assert set(out) == {"loss", "accuracy"} and 0 <= out["accuracy"] <= 1
    out["loss"].backward()
    assert detok.layers[0].attention.wqkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in detok.vq.parameters())
    assert not detok.vq.training  # the frozen VQ stays in eval mode


def test_saved_folder_reloads_without_the_vq_folder(tmp_path):
    micro_vq().save_pretrained(tmp_path / "vq")
    detok = tiny(vq=str(tmp_path / "vq"))
    detok.save_pretrained(tmp_path / "detok")
    shutil.rmtree(tmp_path / "vq")
    assert str(tmp_path) not in (tmp_path / "detok/config.json").read_text()
    loaded = load_detokenizer(str(tmp_path / "detok")).eval()
    assert isinstance(loaded, AutoregressiveDeTokenizer) and loaded.config == detok.config
    cond = condition()
    assert torch.equal(loaded.sample(cond, cfg_scale=2.0, generator=seeded()), detok.sample(cond, 2.0, seeded()))
    assert torch.equal(loaded.vq.quantize.embedding.weight, detok.vq.quantize.embedding.weight)


class ReferenceBlock(nn.Module):
    """One block of the reference's GPT under its names (tok/ar_dtok/ar_model.py ``TransformerBlock``)."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.attention = nn.Module()
        self.attention.wqkv = nn.Linear(width, 3 * width, bias=False)
        self.attention.wo = nn.Linear(width, width, bias=False)
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = nn.Linear(width, hidden, bias=False)
        self.feed_forward.w3 = nn.Linear(width, hidden, bias=False)
        self.feed_forward.w2 = nn.Linear(hidden, width, bias=False)
        self.attention_norm = nn.RMSNorm(width, eps=1e-5)
        self.ffn_norm = nn.RMSNorm(width, eps=1e-5)

    def forward(self, x):
        qkv = self.attention.wqkv(self.attention_norm(x)).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in qkv)
        h = x + self.attention.wo(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2))
        normed, ff = self.ffn_norm(h), self.feed_forward
        return h + ff.w2(F.silu(ff.w1(normed)) * ff.w3(normed))


class ReferenceGPT(nn.Module):
    """The reference's ``clip_cond`` ARModel under its names, and its forward (the oracle): condition features
    through ``clip_proj`` as the prefix, codes after it, learned absolute positions over the whole sequence."""

    def __init__(self, width=32, depth=2, heads=2, hidden=64, vocab=32, cond_dim=12, prefix=16, codes=16):
        super().__init__()
        torch.manual_seed(0)
        self.clip_proj = nn.Linear(cond_dim, width)
        self.tok_embeddings = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(ReferenceBlock(width, heads, hidden) for _ in range(depth))
        self.norm = nn.RMSNorm(width, eps=1e-5)
        self.output = nn.Linear(width, vocab, bias=False)
        self.abs_pe = nn.Parameter(torch.randn(1, prefix + codes - 1, width) * 0.02)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.1)

    @torch.no_grad()
    def logits(self, cond, codes):
        h = torch.cat([self.clip_proj(cond), self.tok_embeddings(codes[:, :-1])], dim=1)
        h = h + self.abs_pe[:, : h.shape[1]]
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))[:, cond.shape[1] - 1 :]

    def greedy(self, cond, cfg_scale, steps=16):
        """The reference's sampling at top_k=1, recomputed in full each step: guidance against zero features."""
        codes = torch.zeros(len(cond), 0, dtype=torch.long)
        for step in range(steps):
            padded = torch.cat([codes, codes.new_zeros(len(cond), 1)], dim=1)
            logits = self.logits(cond, padded)[:, step]
            if cfg_scale > 1:
                uncond = self.logits(torch.zeros_like(cond), padded)[:, step]
                logits = uncond + (logits - uncond) * cfg_scale
            codes = torch.cat([codes, logits.argmax(-1, keepdim=True)], dim=1)
        return codes


def save_official_ar(path: Path, gpt: nn.Module, name: str = "llama-abs-tiny", **args) -> dict[str, torch.Tensor]:
    """``ar_dtok_*.pth`` as ``ARModel.from_checkpoint`` reads it: ``{"model": {"name", "args", "sd"}}``."""
    state = {k: v.clone() for k, v in gpt.state_dict().items()}
    spec_args = {"vocab_size": 32, "cls_token_num": 16, "model_type": "clip_cond", "cond_dim": 12, **args}
    torch.save({"model": {"name": name, "args": spec_args, "sd": state}}, path)
    return state


def test_official_checkpoint_gives_the_reference_logits_and_guided_codes(tmp_path):
    gpt = ReferenceGPT()
    save_official_ar(tmp_path / "ar_dtok_lp_16px.pth", gpt, max_seq_len=16, class_dropout_prob=0.2)
    loaded = load_official_ar_detokenizer(tmp_path / "ar_dtok_lp_16px.pth", micro_vq(), config={"heads": 2}).eval()
    assert (loaded.config.width, loaded.config.depth, loaded.config.mlp_hidden) == (32, 2, 64)
    assert loaded.config.max_condition_tokens == 16 and loaded.config.condition_dropout == 0.2
    assert loaded.condition_dim == 12 and loaded.image_size == 16
    cond, codes = condition(), torch.randint(0, 32, (2, 16), generator=seeded())
    torch.testing.assert_close(loaded.logits(cond, codes), gpt.logits(cond, codes))
    for tokens in (16, 9):  # the reference shortens its prefix to 169/81 tokens at the smaller scales
        short = cond[:, :tokens]
        assert torch.equal(loaded.sample_codes(short, cfg_scale=4.0, top_k=1), gpt.greedy(short, 4.0))


def test_the_files_name_gives_the_heads(tmp_path):
    gpt = ReferenceGPT(width=384, depth=1, heads=6, hidden=1024)  # llama-abs-S's width and heads, one layer
    save_official_ar(tmp_path / "ar.pth", gpt, name="llama-abs-S", max_seq_len=16)
    loaded = load_official_ar_detokenizer(tmp_path / "ar.pth", micro_vq()).eval()
    assert loaded.config.heads == 6
    cond, codes = condition(), torch.randint(0, 32, (2, 16), generator=seeded())
    torch.testing.assert_close(loaded.logits(cond, codes), gpt.logits(cond, codes))
    save_official_ar(tmp_path / "misnamed.pth", ReferenceGPT(), name="llama-abs-S", max_seq_len=16)
    with pytest.raises(PretrainedLoadError, match="named 'llama-abs-S' \\(width 384\\) but its weights are 32 wide"):
        load_official_ar_detokenizer(tmp_path / "misnamed.pth", micro_vq())


def test_official_loader_infers_the_image_size_from_the_code_count(tmp_path):
    vq = micro_vq()
    save_official_ar(tmp_path / "ar.pth", ReferenceGPT(codes=64), max_seq_len=64)  # 8 x 8 codes
    loaded = load_official_ar_detokenizer(tmp_path / "ar.pth", vq, config={"heads": 2})
    assert loaded.image_size == 32 and loaded.num_image_tokens == 64
    with pytest.raises(PretrainedLoadError, match="leave image_size unset or pass 32"):
        load_official_ar_detokenizer(tmp_path / "ar.pth", vq, image_size=16, config={"heads": 2})


@pytest.mark.parametrize(
    ("tamper", "args", "message"),
    [
        (lambda s: s.update({"layers.1.attention.wo.weight": torch.zeros(32, 16)}), {}, "layers.1.attention.wo.weight"),
        (lambda s: s.pop("clip_proj.weight"), {}, "missing key clip_proj.weight"),
        (lambda s: s.update({"tok_embeddings.weight": torch.zeros(99, 32)}), {}, "predicts 99 codes but the VQ has 32"),
        (lambda s: None, {"cls_token_num": 9}, "abs_pe holds 31 positions, not cls_token_num 9 \\+ max_seq_len 16"),
        (lambda s: None, {"model_type": "indice_cond"}, "'indice_cond' model; only 'clip_cond'"),
        (lambda s: None, {"n_kv_head": 1}, "1 KV heads for 2 heads"),
    ],
)
def test_wrong_official_checkpoint_is_a_clear_one_line_error(tmp_path, tamper, args, message):
    state = save_official_ar(tmp_path / "ar.pth", ReferenceGPT())
    tamper(state)
    spec_args = {"cls_token_num": 16, "max_seq_len": 16, **args}
    torch.save({"model": {"name": "llama-abs-tiny", "args": spec_args, "sd": state}}, tmp_path / "ar.pth")
    with pytest.raises(PretrainedLoadError) as error:
        load_official_ar_detokenizer(tmp_path / "ar.pth", micro_vq(), config={"heads": 2})
    assert re.search(message, str(error.value)) and "\n" not in str(error.value)


def test_unknown_width_needs_heads(tmp_path):
    save_official_ar(tmp_path / "ar.pth", ReferenceGPT(), max_seq_len=16)
    with pytest.raises(PretrainedLoadError, match="cannot tell the attention heads of 'llama-abs-tiny' from width 32"):
        load_official_ar_detokenizer(tmp_path / "ar.pth", micro_vq())


@pytest.mark.parametrize(
    ("positions", "bad", "message"),
    [
        ("absolute", torch.zeros(2, 16, 7), r"expected condition features \[B, N, 12\], got shape \(2, 16, 7\)"),
        ("absolute", torch.zeros(2, 25, 12), "25 condition tokens exceed this model's max_condition_tokens 16"),
        ("rope2d", torch.zeros(2, 12, 12), "12 condition tokens do not form a square grid"),
    ],
)
def test_bad_condition_is_a_clear_one_line_error(positions, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny(positions=positions).sample(bad)


def test_rope2d_has_no_prefix_limit_and_no_position_table():
    detok = tiny(positions="rope2d")
    assert not hasattr(detok, "abs_pe")
    assert detok.sample(condition(1, 36), generator=seeded()).shape == (1, 3, 16, 16)  # 36 > max_condition_tokens


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"config": {"depht": 2}}, r"unknown config keys \['depht'\]"),
        ({"config": {"positions": "alibi"}}, "positions must be one of"),
        ({"config": {"width": 24, "heads": 4}}, "width 24 must split into 4 heads"),
        ({"vq": "/no/such/vq"}, "/no/such/vq does not exist"),
    ],
)
def test_bad_configuration_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoregressiveDeTokenizer(**{"vq": micro_vq(), "condition_dim": 12, **kwargs})


def test_tiny_recipe_fits_exports_and_predicts(tmp_path, tatok_dir, tiny_vq_dir):
    common = [
        "--config",
        RECIPE,
        *SMALL_DATA,
        f"--model.init_args.tatok={tatok_dir}",
        f"--model.init_args.detokenizer.init_args.vq={tiny_vq_dir}",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    main(["fit", *common, "--trainer.fast_dev_run=1", f"--model.init_args.export_dir={tmp_path / 'detok'}"])
    detok = DeTokenizer.from_pretrained(tmp_path / "detok")
    assert isinstance(detok, AutoregressiveDeTokenizer) and detok.condition_dim == 96 and detok.image_size == 64
    assert (tmp_path / "samples/step_000000.png").is_file()
    main(["predict", *common, f"--model.init_args.predict_dir={tmp_path / 'predict'}"])
    drawn = sorted((tmp_path / "predict").glob("*.png"))
    assert len(drawn) == 4
    kept = drawn[0].read_bytes()
    drawn[1].unlink()  # an interrupted earlier run: one image missing
    main(["predict", *common, f"--model.init_args.predict_dir={tmp_path / 'predict'}"])
    assert sorted((tmp_path / "predict").iterdir()) == drawn and drawn[0].read_bytes() == kept  # only it redrawn
