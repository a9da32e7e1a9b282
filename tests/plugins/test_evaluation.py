import json
from pathlib import Path

import pytest
from PIL import Image

from tarkit.data import DataFormatError
from tarkit_plugins.evaluation import (
    geneval_scores,
    iter_geneval_folder,
    pope_answer,
    pope_metrics,
    read_geneval_prompts,
    score_pope_files,
    write_geneval_sample,
)

GENEVAL_FILE = Path(__file__).resolve().parents[3] / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl"


@pytest.mark.skipif(not GENEVAL_FILE.is_file(), reason="needs ../shared/data/geneval beside the checkout")
def test_reads_the_real_geneval_prompt_file():
    records = read_geneval_prompts(GENEVAL_FILE)
    assert len(records) == 553
    counts = {tag: sum(r["tag"] == tag for r in records) for tag in {r["tag"] for r in records}}
    assert counts == {
        "single_object": 80,
        "two_object": 99,
        "counting": 80,
        "colors": 94,
        "position": 100,
        "color_attr": 100,
    }


def test_geneval_scores_average_tags_not_images():
    rows = [{"tag": "colors", "correct": True}] * 3 + [{"tag": "counting", "correct": False}]
    assert geneval_scores(rows) == {"counting": 0.0, "colors": 1.0, "overall": 0.5}


def test_geneval_folder_round_trip(tmp_path):
    record = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "p"}
    write_geneval_sample(tmp_path, 3, record, [Image.new("RGB", (8, 8))] * 2)
    assert (tmp_path / "00003" / "samples" / "0001.png").is_file()
    [(folder, read, samples)] = list(iter_geneval_folder(tmp_path))
    assert folder.name == "00003" and read == record and [p.name for p in samples] == ["0000.png", "0001.png"]


def test_malformed_prompt_files_name_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"tag": "colors", "include": [], "prompt": "x"}\n\n{"tag": oops}\n')
    with pytest.raises(DataFormatError, match=r"prompts.jsonl:3: not valid JSON"):
        read_geneval_prompts(path)
    path.write_text('{"tag": "colors", "prompt": "x"}\n')
    with pytest.raises(DataFormatError, match=r"prompts.jsonl:1: missing field\(s\) include"):
        read_geneval_prompts(path)


def test_pope_metrics_by_hand():
    labels = ["yes", "yes", "no", "no"]
    answers = ["Yes, there is.", "No.", "yes", "There is not."]
    metrics = pope_metrics(labels, answers)
    assert metrics == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}
    assert pope_answer("No, there isn't.") == "no" and pope_answer("Yes.") == "yes"


def test_pope_files_need_every_answer(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        "\n".join(json.dumps({"question_id": i, "image": "x.png", "text": "?", "label": "yes"}) for i in range(2))
    )
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"question_id": 0, "text": "yes"}) + "\n")
    with pytest.raises(DataFormatError, match="no answer for 1 question"):
        score_pope_files(questions, answers)


def test_psnr_per_image_then_averaged_and_clamped():
    import torch

    from tarkit_plugins.evaluation import psnr

    reference = torch.zeros(2, 3, 4, 4)
    noisy = reference.clone()
    noisy[0] += 0.1  # MSE 0.01 -> 20 dB
    noisy[1] += 0.01  # MSE 1e-4 -> 40 dB
    assert torch.isclose(psnr(noisy, reference), torch.tensor(30.0))
    assert torch.isclose(psnr(reference - 5, reference), torch.tensor(100.0))  # clamped to [0, 1]: exact
