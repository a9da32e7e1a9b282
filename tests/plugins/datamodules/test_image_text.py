import io
import json
import os
import struct
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tarkit.data import DataFormatError, DataWarning, EpochDataLoader
from tarkit.registry import registry
from tarkit_plugins.datamodules.image_text import ImageTextDataModule
from tarkit_plugins.datamodules.webdataset import WebDatasetDataModule

from .helpers import SIZE, assert_valid_sample, fit

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def write_image(path, color=RED, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (4, 4), color).save(path)
    return path.name


def write_jsonl(path, rows):
    """Rows are dicts (written as JSON) or raw strings (written as they are)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def datamodule(tmp_path, rows, **kwargs):
    dm = ImageTextDataModule(write_jsonl(tmp_path / "train.jsonl", rows), image_size=SIZE, **kwargs)
    dm.setup("fit")
    return dm


def color_of(image):
    """Mean colour of a [3, S, S] tensor, in 0..255."""
    return tuple(round(v) for v in (image.mean(dim=(1, 2)) * 255).tolist())


# --- rows -> tasks and fields -------------------------------------------------------------------------------------


def test_caption_row_as_i2t_uses_default_question(tmp_path):
    write_image(tmp_path / "a.png", RED)
    dm = datamodule(
        tmp_path, [{"image": "a.png", "text": "a red square"}], task_ratios={"i2t": 1}, default_question="Q?"
    )
    sample = dm.train_set[0]
    assert (sample["task"], sample["text"], sample["answer"]) == ("i2t", "Q?", "a red square")
    assert sample["has_input_image"] and not sample["has_target_image"]
    assert color_of(sample["input_image"]) == RED and sample["target_image"].abs().sum() == 0


def test_caption_row_as_t2i_makes_the_image_the_target(tmp_path):
    write_image(tmp_path / "a.png", GREEN)
    dm = datamodule(tmp_path, [{"image": "a.png", "text": "a green square"}], task_ratios={"t2i": 1})
    sample = dm.train_set[0]
    assert (sample["task"], sample["text"], sample["answer"]) == ("t2i", "a green square", "")
    assert sample["has_target_image"] and not sample["has_input_image"]
    assert color_of(sample["target_image"]) == GREEN


def test_caption_row_as_i2i_reconstructs_the_image(tmp_path):
    write_image(tmp_path / "a.png", BLUE)
    dm = datamodule(tmp_path, [{"image": "a.png", "text": "a blue square"}], task_ratios={"i2i": 1})
    sample = dm.train_set[0]
    assert sample["task"] == "i2i" and sample["has_input_image"] and sample["has_target_image"]
    assert color_of(sample["input_image"]) == color_of(sample["target_image"]) == BLUE


def test_question_answer_row_is_i2t_only(tmp_path):
    write_image(tmp_path / "a.png")
    rows = [{"image": "a.png", "text": "What colour?", "answer": "red"}] * 20
    dm = datamodule(tmp_path, rows)  # default ratios enable every task
    samples = [dm.train_set[i] for i in range(20)]
    assert {s["task"] for s in samples} == {"i2t"}
    assert (samples[0]["text"], samples[0]["answer"]) == ("What colour?", "red")


def test_edit_row_makes_ti2i_and_i2i_pairs(tmp_path):
    write_image(tmp_path / "in.png", RED)
    write_image(tmp_path / "out.png", BLUE)
    row = {"image": "in.png", "target_image": "out.png", "text": "make it blue"}
    ti2i = datamodule(tmp_path, [row], task_ratios={"ti2i": 1}).train_set[0]
    assert (ti2i["task"], ti2i["text"]) == ("ti2i", "make it blue")
    assert color_of(ti2i["input_image"]) == RED and color_of(ti2i["target_image"]) == BLUE
    i2i = datamodule(tmp_path, [row], task_ratios={"i2i": 1}).train_set[0]
    assert i2i["task"] == "i2i" and color_of(i2i["input_image"]) == RED and color_of(i2i["target_image"]) == BLUE


def test_explicit_task_is_the_only_task(tmp_path):
    write_image(tmp_path / "a.png")
    dm = datamodule(tmp_path, [{"image": "a.png", "text": "red", "task": "t2i"}] * 30)
    assert {dm.train_set[i]["task"] for i in range(30)} == {"t2i"}


def test_image_only_row_needs_task_i2i(tmp_path):
    write_image(tmp_path / "a.png")
    assert datamodule(tmp_path, [{"image": "a.png", "task": "i2i"}]).train_set[0]["task"] == "i2i"
    with pytest.raises(DataFormatError, match=r':1: no "text"'):
        datamodule(tmp_path, [{"image": "a.png"}])


def test_paths_are_relative_to_the_annotation_file_or_image_root(tmp_path):
    write_image(tmp_path / "ann" / "imgs" / "a.png", GREEN)
    write_image(tmp_path / "root" / "a.png", BLUE)
    ann = tmp_path / "ann"
    near = datamodule(ann, [{"image": "imgs/a.png", "text": "x"}], task_ratios={"t2i": 1})
    assert color_of(near.train_set[0]["target_image"]) == GREEN
    rooted = datamodule(
        ann, [{"image": "a.png", "text": "x"}], task_ratios={"t2i": 1}, image_root=str(tmp_path / "root")
    )
    assert color_of(rooted.train_set[0]["target_image"]) == BLUE
    absolute = datamodule(ann, [{"image": str(tmp_path / "root" / "a.png"), "text": "x"}], task_ratios={"t2i": 1})
    assert color_of(absolute.train_set[0]["target_image"]) == BLUE


# --- task mixing --------------------------------------------------------------------------------------------------


def caption_rows(tmp_path, n):
    write_image(tmp_path / "a.png")
    return [{"image": "a.png", "text": f"caption {i}"} for i in range(n)]


def test_single_task_ratio_gives_only_that_task(tmp_path):
    dm = datamodule(tmp_path, caption_rows(tmp_path, 40), task_ratios={"t2i": 1})
    assert {dm.train_set[i]["task"] for i in range(40)} == {"t2i"}


def test_task_mix_roughly_matches_ratios_and_is_deterministic(tmp_path):
    rows = caption_rows(tmp_path, 200)
    ratios = {"i2t": 3, "t2i": 1}
    tasks = [datamodule(tmp_path, rows, task_ratios=ratios).train_set[i]["task"] for i in range(200)]
    counts = Counter(tasks)
    assert set(counts) == {"i2t", "t2i"}
    assert 0.65 < counts["i2t"] / 200 < 0.85  # 0.75 within about 3 standard deviations
    again = [datamodule(tmp_path, rows, task_ratios=ratios).train_set[i]["task"] for i in range(50)]
    other_seed = [datamodule(tmp_path, rows, task_ratios=ratios, seed=1).train_set[i]["task"] for i in range(50)]
    assert again == tasks[:50] and other_seed != tasks[:50]


def test_records_no_enabled_task_supports_are_left_out_with_a_warning(tmp_path):
    write_image(tmp_path / "a.png")
    rows = [{"image": "a.png", "text": "cap"}, {"image": "a.png", "text": "q?", "answer": "a"}]
    with pytest.warns(DataWarning, match="1 of 2 records support no task"):
        dm = datamodule(tmp_path, rows, task_ratios={"t2i": 1})
    assert len(dm.train_set) == 1 and dm.train_set[0]["text"] == "cap"
    with pytest.raises(DataFormatError, match="no record supports a task"):
        datamodule(tmp_path, rows[1:], task_ratios={"t2i": 1})


def test_train_loader_collates_mixed_tasks_and_changes_tasks_each_epoch(tmp_path):
    dm = datamodule(tmp_path, caption_rows(tmp_path, 32), batch_size=8)
    loader = dm.train_dataloader()
    assert isinstance(loader, EpochDataLoader)
    batch = next(iter(loader))
    assert len(set(batch["task"])) > 1 and len(batch["text"]) == 8
    assert batch["input_image"].shape == batch["target_image"].shape == (8, 3, SIZE, SIZE)
    assert batch["has_input_image"].dtype == torch.bool
    first = [dm.train_set[i]["task"] for i in range(32)]
    next(iter(loader))  # the second pass is epoch 1
    assert dm.train_set.epoch == 1 and [dm.train_set[i]["task"] for i in range(32)] != first


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
def test_fits_under_lightning_without_val_annotations(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", caption_rows(tmp_path, 12))
    dm = ImageTextDataModule(path, image_size=SIZE, batch_size=4)
    assert len(fit(dm, epochs=2)) == 24 and dm.train_set.epoch == 1


# --- bad images: skipped, never a crash -------------------------------------------------------------------------


def png_bytes(color=RED, size=(16, 16)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def broken_chunk_png():
    """A PNG whose second data chunk has a garbage chunk type: Pillow raises SyntaxError, not OSError."""
    data, position, out = png_bytes(), 8, png_bytes()[:8]
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        parts = (
            [(kind, body)] if kind != b"IDAT" else [(b"IDAT", body[: length // 2]), (b"\0\1\2\3", body[length // 2 :])]
        )
        for part_kind, part in parts:
            out += struct.pack(">I", len(part)) + part_kind + part + struct.pack(">I", zlib.crc32(part_kind + part))
        position += 12 + length
    return out


BAD_FILES = {
    "corrupt": ("bad.png", lambda: os.urandom(256)),
    "truncated": ("bad.png", lambda: png_bytes()[: len(png_bytes()) // 2]),
    "unsupported": ("bad.jpg", lambda: b"this is a text file, not a JPEG\n"),
    "broken_png_chunk": ("bad.png", broken_chunk_png),
    "missing": ("bad.png", None),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_unreadable_image_is_skipped_for_the_next_record(tmp_path, case):
    name, make = BAD_FILES[case]
    if make is not None:
        (tmp_path / name).write_bytes(make())
    write_image(tmp_path / "good.png", GREEN)
    rows = [{"image": name, "text": "bad"}, {"image": "good.png", "text": "good"}]
    dm = datamodule(tmp_path, rows, task_ratios={"t2i": 1})
    with pytest.warns(DataWarning, match=r"train\.jsonl:1 .*; 1 skipped so far"):
        sample = dm.train_set[0]
    assert_valid_sample(sample)
    assert sample["text"] == "good" and color_of(sample["target_image"]) == GREEN
    with pytest.warns(DataWarning, match="2 skipped so far"):
        dm.train_set[0]


def test_skipping_wraps_around_to_the_first_record(tmp_path):
    write_image(tmp_path / "good.png", GREEN)
    rows = [{"image": "good.png", "text": "good"}, {"image": "missing.png", "text": "bad"}]
    dm = datamodule(tmp_path, rows, task_ratios={"t2i": 1})
    with pytest.warns(DataWarning, match=r"jsonl:2 "):
        assert dm.train_set[1]["text"] == "good"


def test_decompression_bomb_is_skipped(tmp_path, monkeypatch):
    write_image(tmp_path / "good.png", GREEN)
    (tmp_path / "big.png").write_bytes(png_bytes(size=(64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    rows = [{"image": "big.png", "text": "big"}, {"image": "good.png", "text": "good"}]
    dm = datamodule(tmp_path, rows, task_ratios={"t2i": 1})
    with pytest.warns(DataWarning, match="DecompressionBombError"):
        assert dm.train_set[0]["text"] == "good"


def test_unreadable_edit_target_skips_the_record(tmp_path):
    write_image(tmp_path / "in.png", RED)
    write_image(tmp_path / "good.png", GREEN)
    rows = [{"image": "in.png", "target_image": "gone.png", "text": "edit"}, {"image": "good.png", "text": "good"}]
    dm = datamodule(tmp_path, rows, task_ratios={"ti2i": 1, "t2i": 1})
    with pytest.warns(DataWarning, match=r"jsonl:1 "):
        assert dm.train_set[0]["text"] == "good"


def test_nothing_readable_is_a_clear_error(tmp_path):
    dm = datamodule(tmp_path, [{"image": "gone.png", "text": "a"}, {"image": "gone2.png", "text": "b"}])
    with pytest.warns(DataWarning), pytest.raises(DataFormatError, match="none of its 2 images could be read"):
        dm.train_set[0]


# --- image modes --------------------------------------------------------------------------------------------------


def palette_image(transparent):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    return image, ({"transparency": 1} if transparent else {})


MODES = {
    "grayscale": (lambda: (Image.new("L", (4, 4), 128), {}), (128, 128, 128)),
    "rgba": (lambda: (Image.new("RGBA", (4, 4), (255, 0, 0, 255)), {}), RED),
    "rgba_transparent": (lambda: (Image.new("RGBA", (4, 4), (255, 0, 0, 0)), {}), (255, 255, 255)),
    "la": (lambda: (Image.new("LA", (4, 4), (0, 255)), {}), (0, 0, 0)),
    "palette": (lambda: palette_image(transparent=False), GREEN),
    "palette_transparent": (lambda: palette_image(transparent=True), (255, 255, 255)),
    "16bit_white": (lambda: (Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)), {}), (255, 255, 255)),
    "16bit_mid": (lambda: (Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)), {}), (128, 128, 128)),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_image_modes_become_rgb_in_unit_range(tmp_path, mode):
    make, expected = MODES[mode]
    image, options = make()
    image.save(tmp_path / "a.png", **options)
    dm = datamodule(tmp_path, [{"image": "a.png", "text": "x"}], task_ratios={"t2i": 1})
    target = dm.train_set[0]["target_image"]
    assert target.shape == (3, SIZE, SIZE) and target.dtype == torch.float32
    assert 0.0 <= target.min() and target.max() <= 1.0
    assert all(abs(got - want) <= 1 for got, want in zip(color_of(target), expected, strict=True))


# --- malformed annotation files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"image": "a.png", "text": ', r":3: not valid JSON .*fix or remove the line"),
        ('["a.png", "caption"]', r":3: expected a JSON object, got list"),
        ('{"text": "no image"}', r":3: missing field\(s\) image"),
        ('{"image": 7, "text": "x"}', r':3: "image" must be a path'),
        ('{"image": "a.png"}', r':3: no "text": add a caption'),
        ('{"image": "a.png", "answer": "yes"}', r':3: no "text"'),
        ('{"image": "a.png", "text": 5}', r':3: "text" must be a string'),
        ('{"image": "a.png", "text": "x", "task": "t2x"}', r':3: unknown "task" \'t2x\''),
        ('{"image": "a.png", "text": "x", "task": "ti2i"}', r':3: "task" \'ti2i\' does not fit .*"target_image"'),
        ('{"image": "a.png", "text": "q", "answer": "a", "task": "t2i"}', r":3: \"task\" 't2i' does not fit"),
    ],
    ids=[
        "malformed",
        "not_object",
        "no_image",
        "image_not_path",
        "no_caption",
        "answer_no_question",
        "not_string",
        "unknown_task",
        "task_needs_target",
        "task_not_for_qa",
    ],
)
def test_bad_annotation_line_names_file_and_line(tmp_path, bad_line, message):
    write_image(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "train.jsonl", ['{"image": "a.png", "text": "fine"}', "   ", bad_line])
    with pytest.raises(DataFormatError, match=message) as info:
        ImageTextDataModule(path).setup("fit")
    assert str(info.value).startswith(f"{path}:3: ") and "\n" not in str(info.value)


def test_empty_or_missing_annotation_file_is_an_error(tmp_path):
    with pytest.raises(DataFormatError, match="no annotations"):
        ImageTextDataModule(write_jsonl(tmp_path / "train.jsonl", [""])).setup("fit")
    with pytest.raises(DataFormatError, match="no such file"):
        ImageTextDataModule(str(tmp_path / "gone.jsonl")).setup("fit")


def test_non_utf8_line_names_its_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"image": "a.png", "text": "fine"}\n{"image": "a.png", "text": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=r"train\.jsonl:2: not UTF-8"):
        ImageTextDataModule(str(path)).setup("fit")


def test_val_loader_is_fixed_and_empty_without_val_annotations(tmp_path):
    rows = caption_rows(tmp_path, 16)
    path = write_jsonl(tmp_path / "val.jsonl", rows)
    assert ImageTextDataModule(path).val_dataloader() == []
    dm = ImageTextDataModule(path, val_annotations=path, image_size=SIZE, batch_size=16)
    dm.setup("validate")
    assert dm.train_set is None
    first, second = next(iter(dm.val_dataloader())), next(iter(dm.val_dataloader()))
    assert first["task"] == second["task"] and first["text"] == second["text"]


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="image_size and batch_size must be positive"):
        ImageTextDataModule("x.jsonl", batch_size=0)
    with pytest.raises(ValueError, match="unknown task"):
        ImageTextDataModule("x.jsonl", task_ratios={"t2x": 1.0})


def test_registry_finds_both_datamodules():
    assert registry.get("tarkit.datamodules", "image_text") is ImageTextDataModule
    assert registry.get("tarkit.datamodules", "webdataset") is WebDatasetDataModule
