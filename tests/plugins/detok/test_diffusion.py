"""The diffusion de-tokenizer: objective, guidance, save/load, and the tiny recipe under ``tarkit fit``."""

from pathlib import Path

import pytest
import torch

from tarkit.cli import main
from tarkit.interfaces import DeTokenizer
from tarkit_plugins.detok.autoencoder import load_detokenizer
from tarkit_plugins.detok.diffusion import DiffusionDeTokenizer, grid_position_embedding

ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(ROOT / "recipes/tiny/diffusion_detok.yaml")
SMALL_DATA = ["--data.init_args.train_size=8", "--data.init_args.val_size=4", "--data.init_args.batch_size=4"]

# A 16 px, ~40 k parameter UNet: every test here runs in well under a second.
TINY_UNET = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
    "cross_attention_dim": 16,
}
TINY_SANA = {
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "num_layers": 1,
    "num_cross_attention_heads": 2,
    "cross_attention_head_dim": 8,
    "cross_attention_dim": 16,
    "caption_channels": 16,
    "patch_size": 1,
}


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: thread hand-offs cost more than they save (tenfold on a busy two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(scheduler: str = "flow_match", backbone: str = "unet", **overrides) -> DiffusionDeTokenizer:
    torch.manual_seed(0)
    config = TINY_UNET if backbone == "unet" else TINY_SANA
    kwargs = {"preset": None, "condition_dim": 12, "image_size": 16, "patch_size": 2, "num_steps": 3}
    kwargs |= {"x0_prediction": True, "spatial_channels": 4}
    kwargs |= {"backbone": backbone, "backbone_config": config, "scheduler": scheduler}
    return DiffusionDeTokenizer(**{**kwargs, **overrides})


def condition(batch: int = 2, tokens: int = 16) -> torch.Tensor:
    return torch.randn(batch, tokens, 12, generator=torch.Generator().manual_seed(1))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_save_load_round_trip_keeps_config_weights_and_samples(tmp_path):
    detok = tiny(scheduler_config={"shift": 2.0}).eval()
    detok.save_pretrained(tmp_path / "detok")
    loaded = load_detokenizer(str(tmp_path / "detok")).eval()
    assert type(loaded) is DiffusionDeTokenizer and loaded.config_dict() == detok.config_dict()
    assert loaded.config_dict()["preset"] is None and loaded.noise_scheduler.config.shift == 2.0
    cond = condition()
    assert torch.equal(detok.sample(cond, generator=seeded()), loaded.sample(cond, generator=seeded()))


def test_preset_resolves_into_the_saved_config():
    config = DiffusionDeTokenizer("tiny", backbone_config={"layers_per_block": 2}).config_dict()
    assert config["condition_dim"] == 96 and config["image_size"] == 64 and config["scheduler"] == "flow_match"
    assert config["backbone_config"]["layers_per_block"] == 2
    assert config["backbone_config"]["block_out_channels"] == [64, 96, 128]


@pytest.mark.parametrize("tokens", [16, 4, 1])
def test_sample_has_image_shape_and_range_for_any_square_grid(tokens):
    images = tiny().eval().sample(condition(3, tokens), cfg_scale=2.0, generator=seeded())
    assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("scheduler", ["flow_match", "ddpm"])
def test_cfg_one_equals_unguided_sampling_and_guidance_changes_it(scheduler):
    detok, cond = tiny(scheduler).eval(), condition()
    unguided = detok.sample(cond, generator=seeded())
    assert torch.equal(detok.sample(cond, cfg_scale=1.0, generator=seeded()), unguided)
    assert not torch.equal(detok.sample(cond, cfg_scale=1.0, generator=seeded(1)), unguided)
    assert not torch.allclose(detok.sample(cond, cfg_scale=4.0, generator=seeded()), unguided)


@pytest.mark.parametrize(("cfg_scale", "rows"), [(1.0, 2), (3.0, 4)])
def test_guided_sampling_runs_cond_and_null_rows_as_one_batch(cfg_scale, rows):
    detok = tiny().eval()
    batches, conditions = [], []
    detok.denoiser.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    detok.condition_proj.register_forward_pre_hook(lambda module, args: conditions.append(args[0]))
    detok.sample(condition(), cfg_scale=cfg_scale, num_steps=4, generator=seeded())
    assert batches == [rows] * 4  # one denoiser call per step, never a separate unconditional pass
    if cfg_scale != 1.0:
        assert not conditions[1].any()  # the null condition is all zeros


def test_condition_dropout_replaces_whole_conditions_by_zeros_in_training_only():
    seen = []
    detok = tiny(condition_dropout=0.5)
    detok.condition_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    cond, images = condition(64), torch.rand(64, 3, 16, 16)
    detok.train().loss(cond, images)
    dropped = (seen[-1] == 0).flatten(1).all(1)
    kept = (seen[-1] == cond).flatten(1).all(1)
    assert (dropped | kept).all() and 10 < dropped.sum() < 54
    detok.eval().loss(cond, images)
    assert torch.equal(seen[-1], cond)


@pytest.mark.parametrize(
    ("scheduler", "backbone", "x0_prediction", "spatial_channels"),
    [
        ("flow_match", "unet", True, 4),
        ("flow_match", "unet", False, 0),
        ("ddpm", "unet", True, 0),
        ("ddpm", "unet", False, 4),
        ("ddim", "unet", False, 0),
        ("flow_match", "sana", True, 4),
    ],
)
def test_each_scheduler_and_backbone_trains_a_step_and_samples(scheduler, backbone, x0_prediction, spatial_channels):
    options = {
        "x0_prediction": x0_prediction,
        "spatial_channels": spatial_channels,
        "timestep_sampling": "logit_normal",
    }
    detok = tiny(scheduler, backbone, **options)
    expected = "sample" if x0_prediction else "epsilon"
    assert scheduler == "flow_match" or detok.noise_scheduler.config.prediction_type == expected
    out = detok.loss(condition(4), torch.rand(4, 3, 16, 16))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and set(out) == {"loss"}
    # gradients reach both the denoiser and the condition path (cross-attention is wired in)
    assert detok.condition_proj[1].weight.grad.abs().sum() > 0
    assert not spatial_channels or detok.spatial_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in detok.denoiser.parameters() if p.requires_grad)
    images = detok.eval().sample(condition(2, 4), cfg_scale=2.0, generator=seeded())
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1


def test_training_after_sampling_still_draws_from_the_full_schedule():
    detok = tiny()
    detok.eval().sample(condition(), num_steps=2, generator=seeded())
    assert len(detok.noise_scheduler.timesteps) == 1000  # sampling used its own scheduler
    assert torch.isfinite(detok.train().loss(condition(), torch.rand(2, 3, 16, 16))["loss"])


def test_position_embedding_places_pooled_tokens_at_the_same_image_location():
    fine, coarse = grid_position_embedding(81, 8), grid_position_embedding(9, 8)  # 9 x 9 pooled by 3 -> 3 x 3
    assert fine.shape == (81, 8) and coarse.shape == (9, 8)
    # coarse cell (r, c) averages fine cells 3r..3r+2 x 3c..3c+2, whose centre is fine cell (3r + 1, 3c + 1)
    for r, c in [(0, 0), (1, 2), (2, 1)]:
        assert torch.allclose(coarse[3 * r + c], fine[9 * (3 * r + 1) + 3 * c + 1], atol=1e-6)
    assert not torch.allclose(coarse[0], coarse[1])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.randn(2, 16, 8), "expects condition features [B, N, 12], got [2, 16, 8]"),
        (torch.randn(2, 12, 12), "12 condition tokens do not form a square grid"),
    ],
)
def test_bad_condition_is_a_clear_one_line_error(bad, message):
    detok = tiny()
    for call in (lambda: detok.sample(bad), lambda: detok.loss(bad, torch.rand(2, 3, 16, 16))):
        with pytest.raises(ValueError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"scheduler": "euler"}, "scheduler must be one of"),
        ({"image_size": 15}, "image_size 15 is not a multiple of patch_size 2"),
        ({"backbone_config": {**TINY_UNET, "sample_size": 8}}, "may not set ['sample_size']"),
        ({"x0_prediction": None}, "preset=None needs x0_prediction"),
        ({"scheduler": "ddpm", "scheduler_config": {"prediction_type": "epsilon"}}, "x0_prediction means"),
    ],
)
def test_bad_configuration_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match="DiffusionDeTokenizer") as err:
        tiny(**kwargs)
    assert message in str(err.value)


def test_unknown_sampling_option_is_rejected():
    with pytest.raises(ValueError, match=r"unknown options \['temperature'\]"):
        tiny().sample(condition(), temperature=1.0)


def test_tiny_recipe_fits_exports_and_predicts(tmp_path, tatok_dir):  # tatok_dir: conftest.py
    common = [
        "--config",
        RECIPE,
        *SMALL_DATA,
        f"--model.init_args.tatok={tatok_dir}",
        '--model.init_args.sampling={"num_steps": 2}',
        f"--trainer.default_root_dir={tmp_path}",
    ]
    main(["fit", *common, "--trainer.fast_dev_run=1", f"--model.init_args.export_dir={tmp_path / 'detok'}"])
    detok = DeTokenizer.from_pretrained(tmp_path / "detok")
    assert isinstance(detok, DiffusionDeTokenizer) and detok.condition_dim == 96 and detok.image_size == 64
    main(["predict", *common, f"--model.init_args.predict_dir={tmp_path / 'predict'}"])
    assert len(list((tmp_path / "predict").glob("*.png"))) == 4
