import json

import pytest
from PIL import Image

from tarkit.data import DataWarning
from tarkit_plugins.prediction_files import ResumableJsonl, save_image


def test_appended_rows_are_on_disk_and_known_to_a_reopened_file(tmp_path):
    path = tmp_path / "out" / "answers.jsonl"
    first = ResumableJsonl(path, key="question_id")
    first.append([{"question_id": "a", "text": "yes"}, {"question_id": 2, "text": "no"}])
    first.append([])
    assert ResumableJsonl(path, key="question_id").done == {"a", 2}
    assert [json.loads(line)["text"] for line in path.read_text().splitlines()] == ["yes", "no"]


def test_a_line_cut_by_a_kill_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": "a", "text": "yes"}\n{"question_id": "b", "te')
    with pytest.warns(DataWarning, match="answers.jsonl: its last line was cut off"):
        reopened = ResumableJsonl(path, key="question_id")
    assert reopened.done == {"a"} and path.read_text() == '{"question_id": "a", "text": "yes"}\n'


def test_a_row_without_its_key_is_a_one_line_error(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"text": "yes"}\n')
    with pytest.raises(ValueError, match="answers.jsonl:1: missing field"):
        ResumableJsonl(path, key="question_id")


def test_an_image_that_fails_to_encode_leaves_no_file(tmp_path):
    save_image(Image.new("RGB", (4, 4), "red"), tmp_path / "ok.png")
    assert Image.open(tmp_path / "ok.png").getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(OSError):
        save_image(Image.new("F", (4, 4)), tmp_path / "bad.png")  # 32-bit float pixels: PNG has no such mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png"]
