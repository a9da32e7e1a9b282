"""`tarkit ablate` runs each variant of a spec and compares what they logged, with clear errors for bad specs."""

import json
from pathlib import Path

import pytest

from tarkit.commands import CommandError
from tarkit_plugins.ablate import AblateCommand, comparison_table, last_logged, read_spec
from tarkit_plugins.encoders import SigLIP2Encoder

ROOT = Path(__file__).resolve().parents[2]


def test_reads_the_shipped_specs_and_names_bad_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    base, variants = read_spec(Path("recipes/ablations/codebook.yaml"))
    assert base == "recipes/tiny/tatok.yaml" and set(variants) == {"text_aligned", "learned"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants: {a: [x.yaml]}\n")
    with pytest.raises(CommandError, match="needs 'base"):
        read_spec(bad)
    bad.write_text("base: recipes/tiny/tatok.yaml\nvariants: {a: [missing.yaml]}\n")
    with pytest.raises(CommandError, match="not found: missing.yaml"):
        read_spec(bad)


def test_last_logged_values_and_the_table(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,train/loss,val/psnr,val/loss\n0,2.0,,\n9,1.0,12.5,0.7\n19,0.5,14.0,\n")
    assert last_logged(metrics, "val/") == {"val/psnr": 14.0, "val/loss": 0.7}
    table = comparison_table({"ar": {"val/psnr": 14.0}, "diffusion": {"val/psnr": 11.0, "val/loss": 0.2}})
    assert table.splitlines()[0] == "| metric | ar | diffusion |"
    assert "| val/loss | - | 0.2000 |" in table and "| val/psnr | 14.0000 | 11.0000 |" in table


def test_runs_every_variant_and_writes_one_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out, teacher = tmp_path / "ablation", tmp_path / "teacher"
    SigLIP2Encoder(preset="tiny", select_layer=-1).model.save_pretrained(teacher)
    small = ["--data.init_args.train_size=8", "--data.init_args.val_size=4", "--data.init_args.batch_size=4",
             "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1"]
    teacher_arg = f"--model.init_args.encoder.init_args.pretrained={teacher}"
    spec = ["recipes/ablations/codebook.yaml", "--out", str(out), "--max-steps", "1"]
    status = AblateCommand().run([*spec, "--", teacher_arg, *small], "tarkit ablate")
    assert status == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"text_aligned", "learned"}
    for values in results.values():
        assert 0 <= values["val/recon_cosine_s1"] <= 1
    assert "| metric | text_aligned | learned |" in capsys.readouterr().out
    with pytest.raises(CommandError, match="unknown variant"):
        AblateCommand().run(["recipes/ablations/codebook.yaml", "--variants", "nope"], "tarkit ablate")
