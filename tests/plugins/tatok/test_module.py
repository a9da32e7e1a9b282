"""The tiny TA-Tok recipes run under `tarkit fit` / `predict` on CPU, and parts swap by recipe alone."""

import json
from pathlib import Path

import pytest
import torch

from tarkit.cli import main
from tarkit.tatok import TATok
from tarkit_plugins.encoders import SigLIP2Encoder
from tarkit_plugins.tatok.teacher import SigLIPTeacherModule, hash_words

ROOT = Path(__file__).resolve().parents[3]
TATOK = str(ROOT / "recipes/tiny/tatok.yaml")
SMALL_DATA = ["--data.init_args.train_size=8", "--data.init_args.val_size=4", "--data.init_args.batch_size=4"]


@pytest.fixture
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    main(
        [
            "fit",
            "--config",
            str(ROOT / "recipes/tiny/teacher.yaml"),
            "--trainer.fast_dev_run=1",
            f"--model.init_args.export_dir={out}",
            *SMALL_DATA,
        ]
    )
    return out


def fit_tatok(tmp_path, teacher_dir, *extra):
    """fast_dev_run of the tiny recipe (``teacher_dir`` None: the layers in ``extra`` replace the encoder)."""
    teacher = [] if teacher_dir is None else [f"--model.init_args.encoder.init_args.pretrained={teacher_dir}"]
    main(
        [
            "fit",
            "--config",
            TATOK,
            *teacher,
            *extra,
            "--trainer.fast_dev_run=1",
            *SMALL_DATA,
            f"--model.init_args.export_dir={tmp_path / 'tatok'}",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    return TATok.from_pretrained(tmp_path / "tatok")


def test_teacher_exports_a_folder_the_siglip2_encoder_loads(teacher_dir):
    assert (teacher_dir / "config.json").is_file() and (teacher_dir / "model.safetensors").is_file()


def test_tiny_tatok_fits_exports_and_predicts(tmp_path, teacher_dir):
    tatok = fit_tatok(tmp_path, teacher_dir)
    assert type(tatok.codebook).__name__ == "TextAlignedCodebook"
    assert tatok.tokenize(torch.rand(1, 3, 64, 64), 2).shape == (1, 36)
    predict_dir = tmp_path / "predict"
    main(
        [
            "predict",
            "--config",
            TATOK,
            *SMALL_DATA,
            f"--model.init_args.encoder.init_args.pretrained={teacher_dir}",
            f"--model.init_args.predict_dir={predict_dir}",
            "--model.init_args.predict_scale=3",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    rows = [json.loads(line) for line in (predict_dir / "tokens.jsonl").read_text().splitlines()]
    assert len(rows) >= 4 and all(row["scale"] == 3 and len(row["indices"]) == 16 for row in rows)
    assert all(0 <= i < 1024 for row in rows for i in row["indices"])
    # an interrupted earlier run: the first row's line kept, the rest lost; the re-run adds the rest only
    (predict_dir / "tokens.jsonl").write_text(json.dumps(rows[0]) + "\n")
    main(["predict", "--config", TATOK, *SMALL_DATA, f"--model.init_args.encoder.init_args.pretrained={teacher_dir}",
          f"--model.init_args.predict_dir={predict_dir}", "--model.init_args.predict_scale=3",
          f"--trainer.default_root_dir={tmp_path}"])
    again = [json.loads(line) for line in (predict_dir / "tokens.jsonl").read_text().splitlines()]
    assert sorted(again, key=lambda row: row["image"]) == rows


@pytest.mark.parametrize("layer", ["codebook/learned.yaml", "encoder/timm.yaml"])
def test_parts_swap_by_recipe_only(tmp_path, teacher_dir, layer):
    teacher = None if layer.startswith("encoder/") else teacher_dir
    tatok = fit_tatok(tmp_path, teacher, "--config", str(ROOT / "recipes/ablations" / layer))
    swapped = {
        "codebook/learned.yaml": ("codebook", "LearnedCodebook"),
        "encoder/timm.yaml": ("encoder", "TimmEncoder"),
    }
    part, cls = swapped[layer]
    assert type(getattr(tatok, part)).__name__ == cls
    assert tatok.tokenize(torch.rand(2, 3, 64, 64), 1).shape == (2, 144)


def test_bad_scale_or_loss_is_a_clear_error(teacher_dir, capsys):
    bad = [
        ("--model.init_args.recon_loss=l1", "recon_loss must be one of cosine, mse, cosine+mse, got 'l1'"),
        ("--model.init_args.predict_scale=5", "pool scale 5 is not one of this tokenizer's scales [1, 2, 3]"),
        ("--model.init_args.encoder.init_args.pretrained=/no/such/teacher", "/no/such/teacher"),
    ]
    for arg, expected in bad:
        with pytest.raises(SystemExit) as exit_info:
            main(
                [
                    "fit",
                    "--config",
                    TATOK,
                    "--trainer.fast_dev_run=1",
                    f"--model.init_args.encoder.init_args.pretrained={teacher_dir}",
                    arg,
                ]
            )
        last = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: weight-loading progress
        assert exit_info.value.code == 2 and last.startswith("tarkit: error:") and expected in last, last


def test_siglip_loss_prefers_matching_pairs():
    module = SigLIPTeacherModule.__new__(SigLIPTeacherModule)
    torch.nn.Module.__init__(module)
    module.logit_scale = torch.nn.Parameter(torch.tensor(10.0).log())
    module.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
    aligned = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    good, accuracy = module.siglip_loss(aligned, aligned)
    bad, _ = module.siglip_loss(aligned, aligned.roll(1, dims=0))
    assert good < bad and accuracy == 1.0


def test_hashed_words_are_stable_and_padded():
    ids, present = hash_words(["a red circle", "Red"], buckets=100, max_words=4)
    assert ids[0, 1] == ids[1, 0] and present.tolist() == [[True, True, True, False], [True, False, False, False]]


def test_dense_term_targets_each_patch_in_token_order():
    teacher = SigLIPTeacherModule(SigLIP2Encoder(preset="tiny"), dense_weight=1.0)
    images = torch.zeros(1, 3, 48, 48)
    images[0, 0, :4, 4:8] = 1.0  # red in the second patch of the first row
    pixels = teacher.patch_pixels(images)
    assert pixels.shape == (1, 144, 48)
    assert pixels[0, 1].reshape(3, 4, 4)[0].eq(1).all() and pixels[0, [0, 2, 12]].eq(0).all()
    assert teacher.patch_head(teacher.encoder(images)).shape == pixels.shape
    assert SigLIPTeacherModule(SigLIP2Encoder(preset="tiny")).patch_head is None
