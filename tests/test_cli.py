import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tarkit.cli import main

TARKIT = str(Path(sys.executable).parent / "tarkit")  # the installed console script


def run(*args, env=None):
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def test_help_lists_lightning_and_plugin_commands():
    result = run(TARKIT, "--help")
    assert result.returncode == 0, result.stderr
    commands = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")}
    assert {"fit", "validate", "test", "predict", "plugins"} <= commands


def test_version_and_python_dash_m():
    result = run(sys.executable, "-m", "tarkit", "--version")
    assert result.returncode == 0 and result.stdout.startswith("tarkit 0.")


def test_plugins_lists_every_group_with_builtin_and_example_plugin():
    result = run(TARKIT, "plugins")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for group in ("encoders", "codebooks", "quantizers", "detokenizers", "lms", "datamodules", "tasks", "modules"):
        assert f"tarkit.{group}\n" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "(" in line}
    assert "tarkit_plugins.codebooks.LearnedCodebook" in rows["learned"] and "(tarkit)" in rows["learned"]
    assert "tarkit_example_plugin.ExampleRegressor" in rows["example_regressor"]
    assert "(tarkit-example-plugin)" in rows["example_regressor"]


def test_broken_plugin_gives_one_line_warning_and_plugins_still_works(tmp_path):
    # A real installed-looking distribution whose entry point cannot be imported.
    dist_info = tmp_path / "broken_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[tarkit.encoders]\nbusted = broken_plugin_missing_module:Encoder\n")
    result = run(TARKIT, "plugins", "--check", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    warning_lines = [line for line in result.stderr.splitlines() if "broken-plugin" in line]
    assert len(warning_lines) == 1
    assert warning_lines[0].startswith("tarkit: warning:") and "'busted'" in warning_lines[0]
    assert "ModuleNotFoundError" in warning_lines[0]
    assert "Traceback" not in result.stderr
    assert "busted" in result.stdout and "broken" in result.stdout  # listed, flagged
    assert "learned" in result.stdout  # the rest still works

    hidden = run(TARKIT, "plugins", env={"PYTHONPATH": str(tmp_path), "TARKIT_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert "busted" not in hidden.stdout and "example_regressor" not in hidden.stdout
    assert "learned" in hidden.stdout and hidden.stderr.strip() == ""


def test_unknown_command_is_one_line():
    result = run(TARKIT, "nonsense")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown command 'nonsense'" in result.stderr


@pytest.fixture
def recipe(tmp_path):
    """A recipe that names every part by its registered short name (third-party and built-in)."""

    def write(name="recipe.yaml", codebook="learned", num_codes=4):
        path = tmp_path / name
        path.write_text(
            textwrap.dedent(f"""\
            model:
              class_path: example_regressor
              init_args:
                codebook:
                  class_path: {codebook}
                  init_args: {{num_codes: {num_codes}, dim: 8}}
            data:
              class_path: example_random
            trainer:
              accelerator: cpu
              logger: false
              enable_checkpointing: false
              enable_progress_bar: false
              enable_model_summary: false
              default_root_dir: {tmp_path / "run"}
            """)
        )
        return path

    return write


def test_fit_recipe_by_short_names(recipe):
    main(["fit", "--config", str(recipe()), "--trainer.fast_dev_run=1"])


def test_rerun_into_same_dir_and_config_is_saved(recipe, tmp_path):
    args = ["fit", "--config", str(recipe()), "--trainer.max_steps=1", "--trainer.limit_val_batches=1"]
    main(args)
    saved = tmp_path / "run" / "config.yaml"
    assert saved.is_file()
    main(args)  # must not refuse to overwrite config.yaml
    config = yaml.safe_load(saved.read_text())
    assert config["model"]["class_path"] == "tarkit_example_plugin.ExampleRegressor"


def test_layered_configs_and_print_config(recipe, capsys):
    base = recipe()
    override = recipe("override.yaml", num_codes=9)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(base), "--config", str(override), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    codebook = printed["model"]["init_args"]["codebook"]
    assert codebook["class_path"] == "tarkit_plugins.codebooks.LearnedCodebook"
    assert codebook["init_args"]["num_codes"] == 9


def test_unknown_part_names_group_and_available(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe(codebook="lerned")), "--trainer.fast_dev_run=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "unknown part 'lerned' for tarkit.codebooks (available: learned, " in err


def test_listing_the_commands_imports_no_heavy_library():
    code = "import sys; from tarkit.cli import main; main(['--help']); main(['plugins']);" + (
        "heavy = sorted({'torch', 'lightning', 'transformers'} & set(sys.modules)); assert not heavy, heavy"
    )
    result = run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr


TEACHER = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "teacher.yaml")


def logged(run_dir):
    """The rows of every CSV log of a run, oldest version first."""
    rows = []
    for metrics in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        header, *lines = metrics.read_text().splitlines()
        rows += [dict(zip(header.split(","), line.split(","), strict=True)) for line in lines]
    return rows


def test_a_tiny_fit_leaves_curves_and_a_checkpoint_it_resumes_from(tmp_path):
    args = ["--root", str(tmp_path), "fit", "--config", TEACHER, "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    main([*args, "--trainer.max_steps=12"])
    assert "TARKIT_ROOT" not in os.environ  # --root held for that call only
    run_dir = tmp_path / "runs" / "teacher"
    rows = logged(run_dir)
    columns = {key for row in rows for key, value in row.items() if value}
    assert {"train/loss", "train/retrieval_acc", "lr-AdamW", "train/samples_per_sec"} <= columns
    losses = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    assert len(losses) >= 1 and all(loss > 0 for loss in losses)
    assert list((run_dir / "tensorboard").glob("version_0/events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "checkpoints" / "teacher" / "model.safetensors").is_file()

    main([*args, "--trainer.max_steps=20", "--ckpt_path=last"])
    resumed = [row for row in logged(run_dir)[len(rows):] if row.get("train/loss")]
    assert resumed and min(int(row["step"]) for row in resumed) >= 12  # continued, not restarted


def test_runs_are_quiet_unless_verbose(tmp_path):
    args = ["fit", "--config", TEACHER, "--trainer.fast_dev_run=1"]
    quiet = run(TARKIT, "--root", str(tmp_path), *args)
    assert quiet.returncode == 0, quiet.stderr
    for noise in ("Tip:", "GPU available", "LeafSpec", "module(s) in eval mode", "Seed set"):
        assert noise not in quiet.stdout + quiet.stderr
    verbose = run(TARKIT, "--verbose", "--root", str(tmp_path), *args)
    assert verbose.returncode == 0 and "GPU available" in verbose.stdout + verbose.stderr


def test_a_missing_stage_is_one_line_naming_its_recipe(tmp_path):
    result = run(TARKIT, "--root", str(tmp_path), "fit", "--config", TEACHER.replace("teacher", "tatok"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"tarkit: error: model.init_args.encoder.init_args.pretrained: root:checkpoints/teacher "
        f"({tmp_path}/checkpoints/teacher) does not exist; make it with `tarkit fit --config {TEACHER}`, or point "
        "--root (TARKIT_ROOT) at a root that has it"
    ]
