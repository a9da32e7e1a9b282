"""The unified LM trains under `tarkit fit`, exports a Tar HF folder, and the pipelines run on it."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, Qwen2ForCausalLM

from tarkit.cli import main
from tarkit.prompts import IGNORE_INDEX
from tarkit.vocab import VocabularyError
from tarkit_plugins.lm.reflect import DEFAULT_QUESTION
from tarkit_plugins.lm.settings import GenerationDefaults, TarSettings, TATokRecord, read_settings
from tarkit_plugins.lms import HFCausalLM
from tarkit_plugins.pipelines import ImageToTextPipeline, TextToImagePipeline
from tarkit_plugins.tasks import ImageToText as I2TTask
from tarkit_plugins.tasks import TextToImage as T2ITask
from tests.tiny_parts import tiny_tatok

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tatok_dir(tmp_path_factory):
    torch.manual_seed(0)
    return tiny_tatok().save_pretrained(tmp_path_factory.mktemp("tatok"))


@pytest.fixture(scope="module")
def tar_dir(tatok_dir, tmp_path_factory):
    """A tiny Tar LM folder written by `tarkit fit` on the tiny recipe."""
    out = tmp_path_factory.mktemp("lm")
    main(["fit", "--config", str(ROOT / "recipes/tiny/lm.yaml"), "--trainer.fast_dev_run=1",
          f"--model.init_args.tatok={tatok_dir}", f"--model.init_args.export_dir={out}",
          "--data.init_args.train_size=8", "--data.init_args.val_size=4", "--data.init_args.batch_size=8",
          f"--trainer.default_root_dir={out / 'run'}"])
    return out


def test_fit_exports_a_folder_plain_transformers_loads(tar_dir):
    model = Qwen2ForCausalLM.from_pretrained(tar_dir)
    tokenizer = AutoTokenizer.from_pretrained(tar_dir)
    assert tokenizer.convert_tokens_to_ids("<I31>") == tokenizer.convert_tokens_to_ids("<I0>") + 31
    assert model.get_input_embeddings().weight.shape[0] >= tokenizer.convert_tokens_to_ids("<I31>") + 1


def test_the_exported_folder_records_its_training(tar_dir, tatok_dir):
    record = TATokRecord(str(tatok_dir), os.path.relpath(tatok_dir, tar_dir), [1, 2, 3], 32)
    assert read_settings(tar_dir) == TarSettings(
        train_scales=[2], tatok=record, generation=GenerationDefaults(scale=2, cfg_scale=1.0), lm_plugin="hf_causal_lm"
    )
    assert GenerationConfig.from_pretrained(tar_dir).tar["train_scales"] == [2]


def test_pipelines_run_on_the_exported_folder_with_its_defaults(tar_dir, tatok_dir):
    t2i = TextToImagePipeline(str(tar_dir), cfg_scale=3.0)  # the TA-Tok and the scale come from the folder's record
    assert t2i.scale == 2 and t2i.tatok.num_codes == 32
    codes = t2i.generate_codes(["a photo of a red circle"], generator=torch.Generator().manual_seed(0))[0]
    assert codes.shape == (36,) and 0 <= codes.min() and codes.max() < 32
    i2t = ImageToTextPipeline(str(tar_dir), str(tatok_dir))
    answer = i2t.generate(torch.rand(3, 64, 64), "Is there a red circle in the image?", max_new_tokens=5)
    assert isinstance(answer, str)


def test_a_folder_without_image_tokens_is_a_clear_error(tmp_path, tatok_dir):
    HFCausalLM(preset="tiny", tokenizer="bytes").save_pretrained(tmp_path / "plain")
    with pytest.raises(VocabularyError, match="has no <im_start>"):
        ImageToTextPipeline(str(tmp_path / "plain"), str(tatok_dir))


def test_a_task_another_plugin_registers_trains_with_no_core_edit(tatok_dir, tmp_path):
    """The example plugin's fifth task, t2t, from its own datamodule, through the LM module."""
    out = tmp_path / "lm"
    main(["fit", "--config", str(ROOT / "recipes/tiny/lm.yaml"), "--trainer.max_steps=2",
          "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0", f"--model.init_args.tatok={tatok_dir}",
          f"--model.init_args.export_dir={out}",
          "--data=example_qa", "--data.init_args.batch_size=4", f"--trainer.default_root_dir={tmp_path / 'run'}"])
    logged = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/loss_t2t" in logged and "train/acc_t2t" in logged
    assert (out / "config.json").is_file()
    # ... and predicts: its rows go to its formatter's prompt, its text output to answers.jsonl
    rows = tmp_path / "t2t.jsonl"
    rows.write_text('{"task": "t2t", "id": "q1", "text": "What is 2 plus 2?"}\n{"task": "t2t", "text": "Hi?"}\n')
    main(["predict", "--config", str(ROOT / "recipes/tiny/lm.yaml"), f"--model.init_args.tatok={tatok_dir}",
          f"--model.init_args.lm.init_args.pretrained={out}", f"--model.init_args.predict_dir={tmp_path / 'pred'}",
          f"--trainer.default_root_dir={tmp_path / 'run'}", "--data=prompts", f"--data.init_args.path={rows}"])
    answers = [json.loads(line) for line in (tmp_path / "pred" / "answers.jsonl").read_text().splitlines()]
    assert [(a["question_id"], a["task"]) for a in answers] == [("q1", "t2t"), ("1", "t2t")]
    assert all(isinstance(a["text"], str) for a in answers)


def test_predict_dispatches_each_row_to_its_task(tar_dir, tatok_dir, tmp_path):
    """An image-output task with an input image (ti2i, editing) and an i2t row in one file; a task's missing
    input image and an unknown task are named in one-line errors."""
    renders = tmp_path / "renders"
    main(["shapesworld", "render", "--num", "1", "--out", str(renders)])
    image = sorted((renders / "00000" / "samples").glob("*.png"))[0].relative_to(tmp_path)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"task": "ti2i", "id": "edit", "text": "make it red", "image": str(image)}) + "\n"
        + json.dumps({"task": "i2t", "id": "ask", "text": "Describe the image.", "image": str(image)}) + "\n"
    )
    common = ["predict", "--config", str(ROOT / "recipes/tiny/lm.yaml"), f"--model.init_args.tatok={tatok_dir}",
              f"--model.init_args.lm.init_args.pretrained={tar_dir}", "--model.init_args.predict_scale=3",
              f"--trainer.default_root_dir={tmp_path / 'run'}", "--data=prompts"]
    main([*common, f"--data.init_args.path={rows}", f"--model.init_args.predict_dir={tmp_path / 'out'}"])
    codes = json.loads((tmp_path / "out" / "ti2i" / "edit_codes.json").read_text())
    assert codes["scale"] == 3 and [len(c) for c in codes["codes"]] == [16]
    answers = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert [(a["question_id"], a["task"]) for a in answers] == [("ask", "i2t")]

    for row, message in (
        ({"task": "ti2i", "id": "x", "text": "make it red"}, "task ti2i needs an input image; rows \\['x'\\]"),
        ({"task": "caption3d", "text": "?"}, "no task formatter for 'caption3d'; installed tasks: i2i, i2t, t2i"),
    ):
        rows.write_text(json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=message):
            main([*common, f"--data.init_args.path={rows}", f"--model.init_args.predict_dir={tmp_path / 'bad'}"])


def test_predict_over_an_edit_file_writes_the_edited_images(tar_dir, tatok_dir, tmp_path):
    renders = tmp_path / "renders"
    main(["shapesworld", "render", "--num", "2", "--out", str(renders)])
    images = sorted(renders.glob("*/samples/*.png"))
    edits = tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps({"image": str(p.relative_to(tmp_path)), "instruction": text}) + "\n"
                             for p, text in zip(images, ["make the circle red", "remove the square"], strict=True)))
    main(["predict", "--config", str(ROOT / "recipes/tiny/lm.yaml"), f"--model.init_args.tatok={tatok_dir}",
          f"--model.init_args.lm.init_args.pretrained={tar_dir}", "--model.init_args.predict_scale=3",
          f"--trainer.default_root_dir={tmp_path / 'run'}", "--data=prompts", f"--data.init_args.path={edits}",
          f"--model.init_args.predict_dir={tmp_path / 'out'}"])
    for row in ("0", "1"):
        codes = json.loads((tmp_path / "out" / "ti2i" / f"{row}_codes.json").read_text())
        assert codes["scale"] == 3 and [len(c) for c in codes["codes"]] == [16]


def test_task_formatters_supervise_only_the_assistant_turn():
    lm = HFCausalLM(preset="tiny", tokenizer="bytes", num_codes=10, num_scales=3)
    vocab, tokenizer = lm.vocab, lm.tokenizer
    codes = torch.tensor([3, 1, 4, 1])
    i2t = I2TTask().format({"text": "What?", "answer": "Yes.", "input_codes": codes}, tokenizer, vocab)
    supervised = i2t["input_ids"][i2t["labels"] != IGNORE_INDEX]
    assert tokenizer.decode(supervised).startswith("Yes.")
    assert vocab.is_image(i2t["input_ids"]).sum() == 4 and not vocab.is_image(supervised).any()
    t2i = T2ITask().format({"text": "a circle", "target_codes": codes, "scale_index": 2}, tokenizer, vocab)
    target = t2i["input_ids"][t2i["labels"] != IGNORE_INDEX]
    assert target[:2].tolist() == [vocab.im_start, vocab.scale_ids[2]]
    assert torch.equal(vocab.ids_to_codes(target[2:6]), codes) and target[6] == vocab.im_end
    blank, caption = ({"text": text, "input_codes": codes} for text in ("  ", DEFAULT_QUESTION))
    assert I2TTask().prompt(blank, tokenizer, vocab) == I2TTask().prompt(caption, tokenizer, vocab)  # as pipelines


def test_predict_answers_questions_and_writes_geneval_layout(tar_dir, tatok_dir, tmp_path):
    renders = tmp_path / "renders"
    main(["shapesworld", "render", "--num", "3", "--out", str(renders)])
    main(["shapesworld", "prompts", "--num", "2", "--out", str(tmp_path / "prompts.jsonl")])
    common = ["predict", "--config", str(ROOT / "recipes/tiny/lm.yaml"), f"--model.init_args.tatok={tatok_dir}",
              f"--model.init_args.lm.init_args.pretrained={tar_dir}", "--model.init_args.predict_scale=3",
              f"--trainer.default_root_dir={tmp_path / 'run'}", "--data=prompts"]
    main([*common, f"--data.init_args.path={renders / 'pope_questions.jsonl'}",
          f"--model.init_args.predict_dir={tmp_path / 'answers'}"])
    answers = [json.loads(line) for line in (tmp_path / "answers" / "answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers][:2] == ["00000-0", "00000-1"] and len(answers) == 12
    main([*common, f"--data.init_args.path={tmp_path / 'prompts.jsonl'}",
          f"--model.init_args.predict_dir={tmp_path / 'geneval'}"])
    for index in range(2):
        folder = tmp_path / "geneval" / f"{index:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text())["tag"]
        codes = json.loads((folder / "codes.json").read_text())
        assert codes["scale"] == 3 and [len(c) for c in codes["codes"]] == [16]


def test_a_killed_predict_resumes_without_redoing_or_losing_items(tar_dir, tatok_dir, tmp_path, capsys):
    """SIGKILL once the first answers are on disk; the re-run into the same folder answers only the rest. A
    GenEval folder without its marker (codes.json, written last) and a torn JSONL line are redone."""
    import signal
    import subprocess
    import sys
    import time

    renders = tmp_path / "renders"
    main(["shapesworld", "render", "--num", "3", "--out", str(renders)])  # 12 POPE questions
    common = ["predict", "--config", str(ROOT / "recipes/tiny/lm.yaml"), f"--model.init_args.tatok={tatok_dir}",
              f"--model.init_args.lm.init_args.pretrained={tar_dir}", "--model.init_args.predict_scale=3",
              f"--trainer.default_root_dir={tmp_path / 'run'}", "--data=prompts", "--trainer.enable_progress_bar=false",
              f"--data.init_args.path={renders / 'pope_questions.jsonl'}", "--data.init_args.batch_size=1",
              f"--model.init_args.predict_dir={tmp_path / 'answers'}"]
    answers = tmp_path / "answers" / "answers.jsonl"
    killed = subprocess.Popen([str(Path(sys.executable).parent / "tarkit"), *common], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    while not (answers.is_file() and answers.read_bytes().count(b"\n") >= 2):
        assert killed.poll() is None, killed.stderr.read()
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    written = answers.read_bytes()
    assert 2 <= written.count(b"\n") < 12
    answers.write_bytes(written + b'{"question_id": "00002-3", "te')  # as if the kill had cut a line
    capsys.readouterr()
    with pytest.warns(UserWarning, match="last line was cut off"):
        main(common)
    kept = len(written.splitlines())
    assert f"tarkit predict: {kept} item(s) already complete" in capsys.readouterr().err
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert rows[:kept] == [json.loads(line) for line in written.splitlines()]  # nothing redone
    assert sorted(r["question_id"] for r in rows) == sorted(f"{i:05d}-{q}" for i in range(3) for q in range(4))

    main(["shapesworld", "prompts", "--num", "2", "--out", str(tmp_path / "prompts.jsonl")])
    geneval = [*common[:-3], f"--data.init_args.path={tmp_path / 'prompts.jsonl'}",
               f"--model.init_args.predict_dir={tmp_path / 'geneval'}"]
    main(geneval)
    first = tmp_path / "geneval" / "00001"
    (first / "codes.json").unlink()  # killed mid-item: samples may be there, the marker is not
    kept_folder = (tmp_path / "geneval" / "00000" / "codes.json").read_bytes()
    capsys.readouterr()
    main(geneval)
    assert "1 item(s) already complete" in capsys.readouterr().err
    assert (first / "codes.json").is_file()
    assert (tmp_path / "geneval" / "00000" / "codes.json").read_bytes() == kept_folder  # not redrawn
    assert not list((tmp_path / "geneval").rglob("*.partial"))
