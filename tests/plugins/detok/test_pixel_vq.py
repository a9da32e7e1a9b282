"""The pixel VQ: shapes, losses, save/load, LlamaGen's checkpoint layout, and the tiny recipe under ``tarkit fit``."""

from pathlib import Path

import pytest
import torch

from tarkit.cli import main
from tarkit.pretrained import PretrainedLoadError
from tarkit_plugins.detok.pixel_vq import PixelVQ, load_pixel_vq, resolve_pixel_vq_config

from .conftest import micro_vq

ROOT = Path(__file__).resolve().parents[3]
SMALL_DATA = ["--data.init_args.train_size=8", "--data.init_args.val_size=4", "--data.init_args.batch_size=4"]


def images(batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_presets_set_the_code_grid():
    reference = resolve_pixel_vq_config("vq-16", None)
    assert (reference.codebook_size, reference.codebook_dim, reference.downsample) == (16384, 8, 16)
    assert (reference.channels, reference.channel_mult, reference.z_channels) == (128, [1, 1, 2, 2, 4], 256)
    vq = PixelVQ("tiny").eval()
    assert (vq.image_size, vq.downsample, vq.grid_size, vq.codebook_size) == (64, 8, 8, 512)
    codes = vq.encode_indices(torch.rand(2, 3, 64, 64))
    assert codes.shape == (2, 64) and codes.dtype == torch.int64 and 0 <= codes.min() and codes.max() < 512
    decoded = vq.decode_indices(codes)
    assert decoded.shape == (2, 3, 64, 64) and 0 <= decoded.min() and decoded.max() <= 1


def test_forward_returns_losses_and_trains_encoder_through_the_straight_through_codes():
    vq = micro_vq(entropy_weight=0.1)
    reconstruction, losses = vq(images())
    assert reconstruction.shape == (2, 3, 16, 16)
    assert set(losses) == {"loss", "recon", "codebook", "commitment", "entropy", "usage"}
    expected = losses["recon"] + losses["codebook"] + losses["commitment"] + losses["entropy"]
    assert torch.allclose(losses["loss"], expected)
    losses["recon"].backward()  # reconstruction alone reaches the encoder only through the straight-through codes
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0


def test_dead_code_restarts_spread_a_collapsed_codebook_over_the_data_and_keep_training():
    torch.manual_seed(0)
    z = 1 + 0.3 * torch.randn(4, 4, 8, 8)  # one small region of the micro VQ's 4-wide code space

    def used_codes(threshold: float) -> tuple[int, PixelVQ]:
        vq = micro_vq(dead_code_threshold=threshold)
        optimizer = torch.optim.SGD(vq.parameters(), lr=0.1)
        for _ in range(3):  # restarts edit the codebook in place between steps: backward must still work
            _, _, losses = vq.quantize(z)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
        return vq.eval().quantize(z)[1].unique().numel(), vq

    collapsed, _ = used_codes(0.0)
    spread, vq = used_codes(0.03)
    assert spread > 2 * collapsed, (collapsed, spread)
    before = vq.quantize.embedding.weight.clone()
    vq.quantize(z)  # in eval nothing restarts
    assert torch.equal(before, vq.quantize.embedding.weight)
    assert "quantize.usage" not in vq.state_dict()  # training state: a saved folder keeps LlamaGen's keys


@pytest.mark.parametrize("restart_from", ["random", "error"])
def test_error_weighted_restarts_send_dead_codes_to_the_poorly_fitted_minority(restart_from):
    torch.manual_seed(0)
    # 95 % of the vectors sit where the one live code is (a flat background), 5 % far away (a rare colour)
    common, rare = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    flat = torch.cat([common + 0.01 * torch.randn(950, 4), rare + 0.01 * torch.randn(50, 4)])
    quantizer = micro_vq(dead_code_threshold=0.03, restart_from=restart_from).quantize
    with torch.no_grad():
        quantizer.embedding.weight[:] = common
    quantizer.usage[0] = 1.0  # code 0 is alive; the other 31 are restarted
    quantizer._restart_dead_codes(flat)
    near_rare = (quantizer.codebook()[1:] @ rare > 0.9).sum().item()
    if restart_from == "error":
        assert near_rare == 31  # every restart goes where the codebook fits worst
    else:
        assert near_rare < 10  # uniform picks follow the density: most land on the background


def test_codebook_gradient_is_the_same_every_run():
    """Two runs with one seed must train the same codebook: indexing's backward on CPU accumulates rows in a
    thread-dependent order (20 runs gave 20 different gradients), the embedding lookup's does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = set()
        for _ in range(8):
            quantizer = micro_vq(codebook_size=256, codebook_dim=8).quantize  # the tiny recipe's codebook
            z = torch.randn(16, 8, 16, 16, generator=torch.Generator().manual_seed(3))
            sum(quantizer(z)[2].values()).backward()
            grads.add(quantizer.embedding.weight.grad.numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    assert len(grads) == 1


def test_two_fits_of_the_tiny_recipe_with_one_seed_give_the_same_weights(tmp_path, monkeypatch):
    """What the demo's "same seed, same figures" rests on for this stage, with two threads as the demo runs
    (before the fix the codebook differed after one step)."""
    from safetensors.torch import load_file

    monkeypatch.setenv("TARKIT_NUM_THREADS", "2")
    weights = []
    for run in ("a", "b"):
        main(
            [
                "fit",
                "--config",
                str(ROOT / "recipes/tiny/pixel_vq.yaml"),
                "--trainer.max_steps=2",
                "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false",
                "--data.init_args.train_size=32",
                "--data.init_args.batch_size=16",
                f"--trainer.default_root_dir={tmp_path / run}",
                f"--model.init_args.export_dir={tmp_path / run / 'vq'}",
            ]
        )
        weights.append(load_file(str(tmp_path / run / "vq" / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_restart_from_is_checked():
    with pytest.raises(ValueError, match="restart_from must be one of random, error"):
        micro_vq(restart_from="farthest")


def test_save_load_round_trip_keeps_codes_and_images(tmp_path):
    vq = micro_vq().eval()
    vq.save_pretrained(tmp_path / "vq")
    loaded = PixelVQ.from_pretrained(tmp_path / "vq").eval()
    assert loaded.config == vq.config and loaded.config_dict()["preset"] is None
    x = images()
    assert torch.equal(loaded.encode_indices(x), vq.encode_indices(x))
    codes = vq.encode_indices(x)
    assert torch.equal(loaded.decode_indices(codes), vq.decode_indices(codes))
    assert load_pixel_vq(str(tmp_path / "vq"), image_size=32).grid_size == 8  # convolutional: any size


def llamagen_vq_keys(levels: int, res_blocks: int, widths_change: list[bool]) -> set[str]:
    """LlamaGen's VQModel parameter names (tokenizer/tokenizer_image/vq_model.py), spelled out independently."""
    res = ["norm1.weight", "norm1.bias", "conv1.weight", "conv1.bias", "norm2.weight", "norm2.bias"]
    res += ["conv2.weight", "conv2.bias"]
    attn = [f"{p}.{t}" for p in ("norm", "q", "k", "v", "proj_out") for t in ("weight", "bias")]
    keys = {"quantize.embedding.weight", "quant_conv.weight", "quant_conv.bias"}
    keys |= {"post_quant_conv.weight", "post_quant_conv.bias"}
    for part in ("encoder", "decoder"):
        keys |= {f"{part}.{n}.{t}" for n in ("conv_in", "norm_out", "conv_out") for t in ("weight", "bias")}
        keys |= {f"{part}.mid.{i}.{k}" for i in (0, 2) for k in res} | {f"{part}.mid.1.{k}" for k in attn}
        blocks = res_blocks if part == "encoder" else res_blocks + 1
        for i in range(levels):
            prefix = f"{part}.conv_blocks.{i}"
            keys |= {f"{prefix}.res.{j}.{k}" for j in range(blocks) for k in res}
            if (part == "encoder" and i == levels - 1) or (part == "decoder" and i == 0):  # lowest resolution
                keys |= {f"{prefix}.attn.{j}.{k}" for j in range(blocks) for k in attn}
            if part == "encoder" and i < levels - 1:
                keys |= {f"{prefix}.downsample.conv.weight", f"{prefix}.downsample.conv.bias"}
            if part == "decoder" and i < levels - 1:
                keys |= {f"{prefix}.upsample.conv.weight", f"{prefix}.upsample.conv.bias"}
            if widths_change[i]:
                keys |= {f"{prefix}.res.0.nin_shortcut.weight", f"{prefix}.res.0.nin_shortcut.bias"}
    return keys


def write_official_vq(path: Path, vq: PixelVQ) -> dict[str, torch.Tensor]:
    state = {k: torch.randn_like(v) for k, v in vq.state_dict().items()}
    state["quantize.codebook_used"] = torch.zeros(65536)  # LlamaGen's usage log, present in its checkpoints
    torch.save({"model": state}, path)
    return state


OFFICIAL_SHAPE = {"channels": 32, "channel_mult": [1, 2], "z_channels": 32, "codebook_size": 64}


def test_official_checkpoint_layout_loads_key_by_key(tmp_path):
    vq = PixelVQ(None, {**OFFICIAL_SHAPE, "image_size": 32}).eval()  # norm_groups 32, as LlamaGen
    # encoder level 1 widens 32 -> 64; the decoder's first level (64 wide) takes 64, its second narrows to 32
    assert set(vq.state_dict()) == llamagen_vq_keys(2, 2, widths_change=[False, True])
    state = write_official_vq(tmp_path / "vq_ds16_t2i.pt", vq)
    loaded = PixelVQ.from_official(tmp_path / "vq_ds16_t2i.pt", config={"image_size": 32}).eval()
    assert loaded.config == vq.config
    assert torch.equal(loaded.quantize.embedding.weight, state["quantize.embedding.weight"])
    vq.load_state_dict({k: v for k, v in state.items() if k != "quantize.codebook_used"})
    x = images(size=32)
    assert torch.equal(loaded.encode_indices(x), vq.encode_indices(x))
    assert isinstance(load_pixel_vq(str(tmp_path / "vq_ds16_t2i.pt")), PixelVQ)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda s: s.update({"decoder.conv_out.weight": torch.zeros(3, 32, 1, 1)}), "decoder.conv_out.weight: file"),
        (lambda s: s.pop("quantize.embedding.weight"), "missing key quantize.embedding.weight"),
        (lambda s: s.pop("decoder.mid.1.q.bias"), "missing keys [decoder.mid.1.q.bias]"),
        (lambda s: s.update({"discriminator.weight": torch.zeros(1)}), "unexpected keys [discriminator.weight]"),
    ],
)
def test_wrong_official_checkpoint_is_a_clear_one_line_error(tmp_path, tamper, message):
    state = write_official_vq(tmp_path / "vq.pt", PixelVQ(None, OFFICIAL_SHAPE))
    tamper(state)
    torch.save({"model": state}, tmp_path / "vq.pt")
    with pytest.raises(PretrainedLoadError) as error:
        PixelVQ.from_official(tmp_path / "vq.pt")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_file_in_another_layout_is_a_clear_error(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(PretrainedLoadError, match="not a LlamaGen VQ checkpoint"):
        PixelVQ.from_official(tmp_path / "other.pt")
    with pytest.raises(PretrainedLoadError, match="no such checkpoint file"):
        PixelVQ.from_official(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    ("preset", "config", "message"),
    [
        ("huge", None, "unknown preset 'huge'"),
        ("tiny", {"chanels": 8}, "unknown config keys ['chanels']"),
        ("tiny", {"channels": 20}, "must be a multiple of norm_groups 8"),
        ("tiny", {"image_size": 60}, "image_size 60 is not a multiple of the 8x downsampling"),
        ("tiny", {"recon_loss": "lpips"}, "recon_loss must be one of l2, l1"),
    ],
)
def test_bad_configuration_is_a_clear_error(preset, config, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PixelVQ(preset, config)


def test_bad_input_is_a_clear_error():
    vq = micro_vq()
    with pytest.raises(ValueError, match="multiples of the VQ's 4x downsampling"):
        vq.encode_indices(torch.rand(1, 3, 18, 18))
    with pytest.raises(ValueError, match="do not form a square grid"):
        vq.decode_indices(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValueError, match=r"code indices must lie in \[0, 32\)"):
        vq.decode_indices(torch.full((1, 16), 32))


def test_tiny_recipe_fits_logs_writes_samples_and_exports(tmp_path):
    main(
        [
            "fit",
            "--config",
            str(ROOT / "recipes/tiny/pixel_vq.yaml"),
            "--trainer.fast_dev_run=1",
            *SMALL_DATA,
            f"--trainer.default_root_dir={tmp_path}",
            f"--model.init_args.export_dir={tmp_path / 'vq'}",
        ]
    )
    vq = PixelVQ.from_pretrained(tmp_path / "vq")
    assert vq.grid_size == 16 and vq.codebook_size == 256  # the recipe's 4x VQ
    assert vq.config.restart_from == "error"
    assert vq.config.dead_code_threshold > 0
    assert [p.name for p in (tmp_path / "samples").glob("*.png")] == ["step_000000.png"]
