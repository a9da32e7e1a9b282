"""The QUICK demo runs the whole chain end to end on CPU and writes every artefact with figures in range."""

import json
from pathlib import Path

import pytest
from PIL import Image

from tarkit.cli import main
from tarkit_plugins.shapesworld.report import caption_scores, named_objects

ROOT = Path(__file__).resolve().parents[3]


def test_captions_are_read_as_colour_shape_pairs():
    assert named_objects("A red circle, two blue squares and a cyan triangle") == {
        ("red", "circle"), ("blue", "square"), ("cyan", "triangle")}
    scores = caption_scores(["a red circle and a blue square", "a green triangle"],
                            [{("red", "circle")}, {("green", "triangle"), ("red", "square")}])
    assert scores == {"attribute_recall": 2 / 3, "attribute_precision": 2 / 3, "exact": 0.0}


def in_unit_range(values):
    return all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in values)


@pytest.mark.slow  # the whole chain, end to end; nothing faster covers it, so it stays in the default run
def test_quick_demo_writes_report_grid_and_metrics(quick_demo):
    metrics = json.loads((quick_demo / "metrics.json").read_text())
    for split in ("test", "compositional"):
        results = metrics["splits"][split]
        assert set(results["geneval"]) == {"plain", "self_reflect"}
        for scores in results["geneval"].values():
            assert "overall" in scores and in_unit_range(v for k, v in scores.items() if not k.endswith("_stderr"))
        assert in_unit_range(results["pope"].values()) and set(results["pope"]) >= {"accuracy", "f1"}
        assert in_unit_range(results["caption"].values())
        edit = results["edit"]
        assert edit["edits"] >= 1 and in_unit_range(v for k, v in edit.items() if k != "edits")
    assert metrics["run"]["total_seconds"] > 0 and metrics["run"]["quick"] is True
    report = (quick_demo / "report.md").read_text()
    assert "GenEval-style" in report and "POPE" in report and "| overall |" in report and "edits (oracle" in report
    assert Image.open(quick_demo / "samples.png").size[0] > 0
    for stage in ("teacher", "tatok", "pixel_vq", "ar_detok", "lm"):
        assert (quick_demo / "checkpoints" / stage / "config.json").is_file()


@pytest.mark.slow
def test_demo_reuses_finished_stages_and_predict_reads_its_checkpoints(quick_demo, capsys, tmp_path):
    status = main(["demo", "--quick", "--out", str(quick_demo), "--recipes", str(ROOT / "recipes/tiny"),
                   "--prompts", "1", "--images", "1", "--candidates", "2"])  # the shared fixture keeps its ladder
    assert status == 0 and capsys.readouterr().out.count("reused") == 5
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}],
                                   "prompt": "a photo of a red circle"}) + "\n")
    # The demo's folder is a root like outputs/tiny: the recipe reads its stages with --root alone.
    main(["--root", str(quick_demo), "predict", "--config", str(ROOT / "recipes/tiny/lm.yaml"),
          "--model.init_args.lm.init_args.pretrained=root:checkpoints/lm",
          "--model.init_args.detokenizer=root:checkpoints/ar_detok",
          f"--model.init_args.predict_dir={tmp_path / 'out'}",
          "--data=prompts", f"--data.init_args.path={prompts}"])
    assert len(list((tmp_path / "out" / "00000" / "samples").glob("*.png"))) == 1


def test_bad_demo_arguments_stop_before_training_with_one_line(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--prompts", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tarkit demo: error: --prompts, --images, --candidates and --batch-size must be positive"]
    assert main(["demo", "--out", str(tmp_path), "--recipes", str(tmp_path / "none")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "checkpoints").exists()


def test_a_stage_trained_with_another_budget_is_neither_reused_nor_overwritten(tmp_path, capsys):
    folder = tmp_path / "checkpoints" / "teacher"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (tmp_path / "stages.json").write_text(json.dumps({"teacher": {"steps": 20}}))
    assert main(["demo", "--out", str(tmp_path), "--recipes", str(ROOT / "recipes/tiny")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained for 20 steps, this run asks 400; pass --force" in err[0]
    assert (folder / "config.json").read_text() == "{}"


@pytest.mark.slow
def test_the_demo_bundle_loads_with_one_path_at_its_training_scale(quick_demo):
    from tarkit_plugins.lm.settings import read_settings
    from tarkit_plugins.pipelines import ImageToTextPipeline, TextToImagePipeline

    settings = read_settings(quick_demo / "checkpoints" / "lm")
    assert settings.train_scales == [2] and settings.generation.scale == 2 and settings.generation.cfg_scale == 3.0
    i2t = ImageToTextPipeline.from_pretrained(quick_demo / "checkpoints")
    t2i = TextToImagePipeline.from_pretrained(quick_demo / "checkpoints")
    assert i2t.scale == t2i.scale == 2 and t2i.cfg_scale == 3.0
    assert t2i.generate_codes(["a photo of a red circle"]).shape == (1, 36)  # 6 x 6: scale 2 of the 12 x 12 grid
    image = t2i.generate_image("a photo of a red circle")
    assert isinstance(i2t.generate(image, "Is there a red circle in the image?"), str)


def test_a_stage_line_reports_its_preferred_logged_figure(tmp_path):
    from tarkit_plugins.shapesworld.demo import STAGES, headline

    tatok = next(stage for stage in STAGES if stage.name == "tatok")
    assert headline(tmp_path, tatok) == "no metrics logged"
    log = tmp_path / "runs" / "tatok" / "csv" / "version_0" / "metrics.csv"
    log.parent.mkdir(parents=True)
    log.write_text("step,train/recon_cosine,val/recon_cosine_s1\n9,0.5,\n19,0.6,\n19,,0.875\n")
    assert headline(tmp_path, tatok) == "val/recon_cosine_s1 0.875"
    log.write_text("step,train/recon_cosine\n9,0.5\n19,0.625\n")
    assert headline(tmp_path, tatok) == "train/recon_cosine 0.625"


def fake_stages(monkeypatch):
    """Stand in for `tarkit fit`: record each stage's arguments and write its folder as a finished fit would."""
    from tarkit_plugins.shapesworld import demo

    calls = []

    def fit(args):
        calls.append(args)
        root, recipe = Path(args[1]), Path(args[args.index("--config") + 1])
        stage = next(s for s in demo.STAGES if s.recipe == recipe.name)
        (root / "checkpoints" / stage.name).mkdir(parents=True)
        (root / "checkpoints" / stage.name / "config.json").write_text("{}")
        return 0

    monkeypatch.setattr(demo, "tarkit_main", fit)
    return demo, calls


def test_a_stage_killed_mid_run_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    demo, calls = fake_stages(monkeypatch)
    last = tmp_path / "runs" / "tatok" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"a checkpoint")
    record = {"teacher": {"steps": 400, "seconds": 1}, "tatok": {"steps": 700}}  # tatok started, never finished
    (tmp_path / "stages.json").write_text(json.dumps(record))
    (tmp_path / "checkpoints" / "teacher").mkdir(parents=True)
    (tmp_path / "checkpoints" / "teacher" / "config.json").write_text("{}")
    demo.run_stages(ROOT / "recipes/tiny", tmp_path, quick=False, force=False)
    assert [Path(c[c.index("--config") + 1]).stem for c in calls] == ["tatok", "pixel_vq", "ar_detok", "lm"]
    assert calls[0][-1] == f"--ckpt_path={last}" and not any("--ckpt_path" in a for c in calls[1:] for a in c)
    assert f"[demo] tatok     resuming from {last}" in capsys.readouterr().out
    assert json.loads((tmp_path / "stages.json").read_text())["lm"]["steps"] == 450


def test_a_killed_stage_of_another_budget_is_not_resumed(tmp_path, monkeypatch):
    from tarkit.commands import CommandError

    demo, calls = fake_stages(monkeypatch)
    last = tmp_path / "runs" / "teacher" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"a quick run's checkpoint")
    (tmp_path / "stages.json").write_text(json.dumps({"teacher": {"steps": 20}}))
    with pytest.raises(CommandError, match="is from a run of 20 steps, this run asks 400; pass --force"):
        demo.run_stages(ROOT / "recipes/tiny", tmp_path, quick=False, force=False)
    assert calls == []
    demo.run_stages(ROOT / "recipes/tiny", tmp_path, quick=False, force=True)  # --force starts it again
    assert len(calls) == 5 and not any("--ckpt_path" in a for c in calls for a in c)
