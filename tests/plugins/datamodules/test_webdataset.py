import io
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from tarkit.data import DataWarning
from tarkit_plugins.datamodules.webdataset import WebDatasetDataModule

from .helpers import SIZE, assert_valid_sample, fit

MIX = {"i2t": 1.0, "t2i": 1.0}  # every sample keeps its caption in a field we can read back


def encode(color=(255, 0, 0), fmt="PNG", mode="RGB"):
    buffer = io.BytesIO()
    image = (
        Image.fromarray(np.full((4, 4), color, dtype=np.uint16)) if mode == "I;16" else Image.new(mode, (4, 4), color)
    )
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def good_sample(shard, index):
    """A readable sample whose caption (or answer) is ``cap {shard}-{index}``, in varied layouts."""
    caption, kind = f"cap {shard}-{index}", index % 4
    if kind == 0:
        return {"png": encode(), "txt": caption}
    if kind == 1:
        return {"jpg": encode(fmt="JPEG"), "txt": caption}
    if kind == 2:
        return {"webp": encode(fmt="WEBP"), "json": json.dumps({"text": "What is it?", "answer": caption})}
    return {"jpeg": encode(mode="L", color=128, fmt="JPEG"), "json": json.dumps({"text": caption})}


def write_shards(folder, shards=3, per_shard=4):
    """Shards of good samples, plus one corrupt image (shard 0) and one sample without a caption (shard 1)."""
    expected = set()
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"train-{shard:06d}.tar")) as sink:
            for index in range(per_shard):
                sink.write({"__key__": f"s{shard}-{index}", **good_sample(shard, index)})
                expected.add(f"cap {shard}-{index}")
            if shard == 0:
                sink.write({"__key__": "corrupt", "png": os.urandom(100), "txt": "corrupt"})
            if shard == 1:
                sink.write({"__key__": "uncaptioned", "png": encode()})
    return f"{folder}/train-{{000000..{shards - 1:06d}}}.tar", expected


def caption_of(sample):
    return sample["answer"] if sample["task"] == "i2t" else sample["text"]


def unbatch(batches):
    for batch in batches:
        for i in range(len(batch["task"])):
            yield {key: value[i] for key, value in batch.items()}


def epoch(loader):
    samples = list(unbatch(loader))
    for sample in samples:
        assert_valid_sample(sample)
    return samples


def test_two_workers_yield_every_good_sample_once_per_epoch(tmp_path):
    urls, expected = write_shards(tmp_path)
    dm = WebDatasetDataModule(urls, image_size=SIZE, batch_size=3, num_workers=2, task_ratios=MIX, shuffle_buffer=4)
    loader = dm.train_dataloader()
    first, second = epoch(loader), epoch(loader)
    for samples in (first, second):
        captions = Counter(caption_of(s) for s in samples)
        assert set(captions) == expected and set(captions.values()) == {1}  # no duplicates, no corrupt/uncaptioned
    tasks = {caption_of(s): s["task"] for s in first}
    assert set(tasks.values()) == {"i2t", "t2i"}
    assert tasks != {caption_of(s): s["task"] for s in second}  # the mix is drawn anew each epoch


@pytest.mark.filterwarnings("ignore::tarkit.data.DataWarning")
def test_tasks_do_not_depend_on_the_number_of_workers(tmp_path):
    urls, _ = write_shards(tmp_path)

    def tasks(num_workers):
        dm = WebDatasetDataModule(urls, image_size=SIZE, num_workers=num_workers, task_ratios=MIX, seed=3)
        return {caption_of(s): s["task"] for s in epoch(dm.train_dataloader())}

    assert tasks(0) == tasks(2)


def test_tasks_do_not_depend_on_where_the_shards_are_mounted(tmp_path):
    def tasks(folder):
        folder.mkdir(parents=True)
        urls, _ = write_shards(folder)
        dm = WebDatasetDataModule(urls, image_size=SIZE, task_ratios=MIX, shuffle_shards=False)
        with pytest.warns(DataWarning):  # the corrupt and uncaptioned samples
            return {caption_of(s): s["task"] for s in epoch(dm.train_dataloader())}

    assert tasks(tmp_path / "here") == tasks(tmp_path / "mounted" / "elsewhere")


def test_corrupt_and_uncaptioned_samples_warn_in_process(tmp_path):
    urls, expected = write_shards(tmp_path)
    dm = WebDatasetDataModule(urls, image_size=SIZE, batch_size=4, task_ratios=MIX, shuffle_shards=False)
    with pytest.warns(DataWarning) as caught:
        samples = epoch(dm.train_dataloader())
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert any("train-000000.tar key corrupt" in m and "1 skipped so far" in m for m in messages)
    assert any(
        "train-000001.tar key uncaptioned" in m and 'no "text"' in m and "2 skipped so far" in m for m in messages
    )
    assert {caption_of(s) for s in samples} == expected


def test_image_modes_decode_like_load_image(tmp_path):
    with wds.TarWriter(str(tmp_path / "modes.tar")) as sink:
        sink.write({"__key__": "white16", "png": encode(color=65535, mode="I;16"), "txt": "white16"})
        sink.write({"__key__": "clear", "png": encode(color=(255, 0, 0, 0), mode="RGBA"), "txt": "clear"})
        sink.write({"__key__": "gray", "png": encode(color=128, mode="L"), "txt": "gray"})
    dm = WebDatasetDataModule(str(tmp_path / "modes.tar"), image_size=SIZE, task_ratios={"t2i": 1})
    images = {s["text"]: s["target_image"] for s in epoch(dm.train_dataloader())}
    assert torch.allclose(images["white16"], torch.ones(3, SIZE, SIZE))
    assert torch.allclose(images["clear"], torch.ones(3, SIZE, SIZE))  # transparent composites on white
    assert torch.allclose(images["gray"], torch.full((3, SIZE, SIZE), 128 / 255))


def test_epoch_length_cycles_the_shards(tmp_path):
    urls, expected = write_shards(tmp_path, shards=2, per_shard=2)
    dm = WebDatasetDataModule(urls, image_size=SIZE, task_ratios=MIX, epoch_length=10, batch_size=4)
    with pytest.warns(DataWarning):
        captions = Counter(caption_of(s) for s in epoch(dm.train_dataloader()))
    assert sum(captions.values()) == 10 and set(captions) == expected


def test_epoch_length_is_split_between_workers(tmp_path):
    urls, _ = write_shards(tmp_path, shards=2, per_shard=2)
    dm = WebDatasetDataModule(urls, image_size=SIZE, task_ratios=MIX, epoch_length=5, num_workers=2)
    assert len(epoch(dm.train_dataloader())) == 6  # 3 per worker


def test_missing_shard_and_edit_pairs_are_skipped(tmp_path):
    urls, expected = write_shards(tmp_path, shards=1, per_shard=2)
    with wds.TarWriter(str(tmp_path / "edit.tar")) as sink:
        sink.write({"__key__": "pair", "png": encode(), "json": json.dumps({"text": "x", "target_image": "y.png"})})
    shards = [urls, str(tmp_path / "edit.tar"), str(tmp_path / "gone.tar")]
    dm = WebDatasetDataModule(shards, image_size=SIZE, task_ratios=MIX, shuffle_shards=False)
    with pytest.warns(DataWarning) as caught:
        samples = epoch(dm.train_dataloader())
    messages = " | ".join(str(w.message) for w in caught)
    assert "edit.tar key pair" in messages and "use image_text" in messages
    assert "unreadable shard data" in messages and "gone.tar" in messages
    assert {caption_of(s) for s in samples} == expected


def test_samples_without_an_enabled_task_are_left_out_silently(tmp_path):
    urls, expected = write_shards(tmp_path, shards=1, per_shard=4)
    dm = WebDatasetDataModule(urls, image_size=SIZE, task_ratios={"t2i": 1}, shuffle_shards=False)
    with pytest.warns(DataWarning) as caught:  # only the corrupt image warns; the QA sample just cannot be t2i
        samples = epoch(dm.train_dataloader())
    assert len([w for w in caught if issubclass(w.category, DataWarning)]) == 1
    assert {s["text"] for s in samples} == expected - {"cap 0-2"}


def test_val_loader_reads_in_order_and_is_empty_when_unset(tmp_path):
    urls, _ = write_shards(tmp_path, shards=2, per_shard=4)
    assert WebDatasetDataModule(urls).val_dataloader() == []
    dm = WebDatasetDataModule(urls, val_urls=urls, image_size=SIZE, task_ratios=MIX)
    with pytest.warns(DataWarning):
        order = [caption_of(s) for s in epoch(dm.val_dataloader())]
    assert order == [f"cap {shard}-{index}" for shard in range(2) for index in range(4)]


@pytest.mark.filterwarnings("ignore::tarkit.data.DataWarning", "ignore:You passed in a `val_dataloader`")
def test_fits_under_lightning(tmp_path):
    urls, expected = write_shards(tmp_path)
    assert len(fit(WebDatasetDataModule(urls, image_size=SIZE, batch_size=4), epochs=2)) == 2 * len(expected)


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="epoch_length must be positive"):
        WebDatasetDataModule("x.tar", epoch_length=0)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        WebDatasetDataModule("x.tar", shuffle_buffer=-1)
