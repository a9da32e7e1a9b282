import json
import os
import subprocess
import sys
from pathlib import Path

from tarkit.cli import main

TARKIT = str(Path(sys.executable).parent / "tarkit")


def test_render_then_score_round_trip_through_the_cli(tmp_path, capsys):
    out = tmp_path / "renders"
    assert main(["shapesworld", "render", "--num", "24", "--out", str(out), "--split", "heldout"]) == 0
    assert (out / "00023" / "metadata.jsonl").is_file() and (out / "00023" / "samples" / "0000.png").is_file()
    assert main(["eval", "geneval", "--images", str(out)]) == 0
    scores = json.loads((out / "scores.json").read_text())["geneval"]
    assert scores["overall"] == 1.0 and len(scores) == 7
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and set(rows[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata"}
    assert "| overall | 1.0000 |" in capsys.readouterr().out

    answers = tmp_path / "answers.jsonl"
    assert main(["shapesworld", "answer", "--questions", str(out / "pope_questions.jsonl"), "--out", str(answers)]) == 0
    assert (
        main(
            [
                "eval",
                "pope",
                "--answers",
                str(answers),
                "--questions",
                str(out / "pope_questions.jsonl"),
                "--json",
                str(tmp_path / "pope.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "pope.json").read_text())["pope"]["accuracy"] == 1.0


def test_scores_drop_when_images_do_not_match(tmp_path):
    out = tmp_path / "renders"
    main(["shapesworld", "render", "--num", "12", "--out", str(out), "--seed", "1"])
    # shift every sample to the next prompt's image: scores must collapse
    images = [(out / f"{i:05d}" / "samples" / "0000.png").read_bytes() for i in range(12)]
    for i in range(12):
        (out / f"{i:05d}" / "samples" / "0000.png").write_bytes(images[(i + 1) % 12])
    main(["eval", "geneval", "--images", str(out)])
    assert json.loads((out / "scores.json").read_text())["geneval"]["overall"] < 0.5


def test_prompts_file_is_geneval_schema(tmp_path):
    path = tmp_path / "prompts.jsonl"
    assert main(["shapesworld", "prompts", "--num", "12", "--out", str(path)]) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 12 and all({"tag", "include", "prompt"} <= set(r) for r in rows)


def test_bad_input_is_one_line_without_traceback(tmp_path):
    (tmp_path / "00000" / "samples").mkdir(parents=True)
    (tmp_path / "00000" / "metadata.jsonl").write_text(
        '{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}\n'
    )
    (tmp_path / "00000" / "samples" / "0000.png").write_bytes(b"not a png")
    cases = [
        ["eval", "geneval", "--images", str(tmp_path / "missing")],
        ["eval", "geneval", "--images", str(tmp_path)],
        ["eval", "pope", "--answers", str(tmp_path / "none.jsonl")],
    ]
    for args in cases:
        result = subprocess.run([TARKIT, *args], capture_output=True, text=True, env=os.environ)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_render_writes_an_edit_per_scene_that_the_prompts_datamodule_reads(tmp_path):
    from tarkit_plugins.datamodules.prompts import PromptDataset

    assert main(["shapesworld", "render", "--num", "8", "--split", "train", "--out", str(tmp_path)]) == 0
    edits = [json.loads(line) for line in (tmp_path / "edits.jsonl").read_text().splitlines()]
    assert 1 <= len(edits) <= 8 and {e["instruction"].split()[0] for e in edits} <= {"Make", "Remove"}
    for edit in edits:
        scene = json.loads((tmp_path / edit["id"] / "metadata.jsonl").read_text())
        shown = sum(item["count"] for item in scene["include"])
        assert len(edit["objects"]) == shown - (edit["instruction"].startswith("Remove"))
    rows = PromptDataset(str(tmp_path / "edits.jsonl"), image_size=64)
    assert rows[0]["kind"] == "ti2i" and rows[0]["text"] == edits[0]["instruction"] and rows[0]["has_image"]
