"""Every datamodule shards by rank and worker: over 2 ranks x 0 or 2 DataLoader workers, an epoch shows each sample
exactly as often as the sharding promises, counted sample by sample.

- Map-style datasets (``image_text``, ``shapesworld``, ``prompts``) are sharded by the sampler Lightning puts into
  their loaders under DDP; the loaders here are rebuilt for each rank the way Lightning's ``_DataConnector`` does
  (its private helpers, so a Lightning upgrade that changes them shows here). Training and validation get a
  ``DistributedSampler``, which pads an uneven count with the first indices of the epoch's order so every rank runs
  as many steps (Lightning's documented behaviour): 7 records on 2 ranks are 4 + 4 samples, one record twice.
  Prediction gets Lightning's ``UnrepeatedDistributedSampler``: 5 rows are 3 + 2, none twice. Workers of a map-style
  loader fetch whole batches of the rank's indices, so they split nothing further.
- ``webdataset`` streams shards and splits them itself, by rank (read from the trainer when the loader is built,
  here a stand-in trainer, as Lightning attaches its own), then by worker: each sample once, the ranks' counts as
  uneven as their shares of the shards, unless ``epoch_length`` makes them equal. The workers here have neither a
  process group nor ``RANK`` to read, as workers started by ``spawn``/``forkserver`` under Lightning's launcher
  have not: the rank must travel with the dataset (before it did not, and every rank read every shard).
"""

import hashlib
import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods, _set_sampler_epoch
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader

from tarkit_plugins.datamodules.image_text import ImageTextDataModule
from tarkit_plugins.datamodules.prompts import PromptsDataModule
from tarkit_plugins.datamodules.webdataset import WebDatasetDataModule
from tarkit_plugins.shapesworld.datamodule import ShapesWorldDataModule

from .helpers import SIZE
from .test_webdataset import caption_of, unbatch, write_shards

WORLD, SEED = 2, 0
WORKERS = pytest.mark.parametrize("num_workers", [0, 2])


def rank_loader(hook, rank: int, mode: RunningStage, shuffle: bool) -> DataLoader:
    """The loader ``hook`` returns as Lightning's DDP hands it to rank ``rank`` of ``WORLD``
    (``_request_dataloader``, then ``_prepare_dataloader`` with the strategy's ``num_replicas``/``rank``)."""
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = hook()  # the arguments it was built with are recorded, so it can be rebuilt with a new sampler
    sampler = _get_distributed_sampler(loader, shuffle, overfit_batches=0, mode=mode, num_replicas=WORLD, rank=rank)
    return _update_dataloader(loader, sampler, mode=mode)


def epoch_counts(loaders: list[DataLoader], epoch: int, key) -> list[Counter]:
    """Each rank's samples of one epoch (``key`` names a sample), after the fit loop's ``set_epoch``."""
    counts = []
    for loader in loaders:
        _set_sampler_epoch(loader, epoch)
        counts.append(Counter(key(sample) for sample in unbatch(loader)))
    return counts


def padded_counts(length: int, epoch: int) -> Counter:
    """What a shuffling ``DistributedSampler`` over ``WORLD`` ranks yields of ``length`` indices in ``epoch``: each
    once, and the first ``-length % WORLD`` of the epoch's permutation once more."""
    order = torch.randperm(length, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
    return Counter(order + order[: -length % WORLD])


def write_records(tmp_path, count: int) -> str:
    """An image_text annotation file of ``count`` captioned images, caption ``cap {i}``."""
    lines = []
    for i in range(count):
        Image.new("RGB", (4, 4), (10 * i, 0, 0)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "text": f"cap {i}"}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "train.jsonl")


@WORKERS
def test_image_text_train_is_sharded_by_the_distributed_sampler(tmp_path, num_workers):
    dm = ImageTextDataModule(write_records(tmp_path, 7), image_size=SIZE, batch_size=2, num_workers=num_workers,
                             task_ratios={"i2t": 1.0, "t2i": 1.0})  # fmt: skip
    dm.setup("fit")
    loaders = [rank_loader(dm.train_dataloader, rank, RunningStage.TRAINING, shuffle=True) for rank in range(WORLD)]
    for epoch in range(2):
        ranks = epoch_counts(loaders, epoch, lambda s: int(caption_of(s).removeprefix("cap ")))
        assert [sum(c.values()) for c in ranks] == [4, 4]  # 7 records padded to 8: every rank runs 2 steps
        assert sum(ranks, Counter()) == padded_counts(7, epoch)  # each once, the epoch's first record twice


def scene_key(sample) -> str:
    """A ShapesWorld sample by its content (its scene's index is not in the sample)."""
    parts = [sample["task"], sample["text"], sample["answer"]]
    images = [sample[k].numpy().tobytes() for k in ("input_image", "target_image")]
    return hashlib.sha1("|".join(parts).encode() + b"".join(images)).hexdigest()


@WORKERS
def test_shapesworld_train_and_val_are_sharded_by_the_distributed_sampler(num_workers):
    dm = ShapesWorldDataModule(image_size=32, train_size=7, val_size=5, batch_size=2, num_workers=num_workers)

    def index_of(dataset, epoch: int) -> dict[str, int]:
        dataset.set_epoch(epoch)
        return {scene_key(dataset[i]): i for i in range(len(dataset))}

    train = [rank_loader(dm.train_dataloader, rank, RunningStage.TRAINING, shuffle=True) for rank in range(WORLD)]
    for epoch in range(2):
        # each rank's loader sets the epoch on its own copy of the dataset; the datamodule's is set here
        scenes = index_of(dm.train_set, epoch)
        ranks = epoch_counts(train, epoch, lambda s, scenes=scenes: scenes[scene_key(s)])
        assert [sum(c.values()) for c in ranks] == [4, 4]
        assert sum(ranks, Counter()) == padded_counts(7, epoch)

    val = [rank_loader(dm.val_dataloader, rank, RunningStage.VALIDATING, shuffle=False) for rank in range(WORLD)]
    scenes = index_of(dm.val_set, 0)
    ranks = epoch_counts(val, 0, lambda s: scenes[scene_key(s)])
    assert [sorted(c.elements()) for c in ranks] == [[0, 2, 4], [0, 1, 3]]  # in order, padded with scene 0


def test_prompts_predict_is_sharded_without_repeats(tmp_path):
    rows = [{"task": "t2i", "text": f"prompt {i}", "id": f"p{i}"} for i in range(5)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    dm = PromptsDataModule(str(tmp_path / "rows.jsonl"), image_size=SIZE, batch_size=2)  # no workers to set
    loaders = [rank_loader(dm.predict_dataloader, r, RunningStage.PREDICTING, shuffle=False) for r in range(WORLD)]
    ranks = [[row_id for batch in loader for row_id in batch["id"]] for loader in loaders]
    assert ranks == [["p0", "p2", "p4"], ["p1", "p3"]]  # every row once: prediction pads nothing


def webdataset_epochs(urls: str, num_workers: int, epochs: int = 2, **kwargs) -> list[list[Counter]]:
    """Per epoch, each rank's captions, the datamodule on a stand-in trainer of rank r of ``WORLD``."""
    loaders = []
    for rank in range(WORLD):
        dm = WebDatasetDataModule(urls, image_size=SIZE, batch_size=2, num_workers=num_workers,
                                  task_ratios={"i2t": 1.0, "t2i": 1.0}, shuffle_buffer=4, **kwargs)  # fmt: skip
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=WORLD)  # what Lightning's attach gives it
        loaders.append(dm.train_dataloader())
    return [[Counter(caption_of(s) for s in unbatch(loader)) for loader in loaders] for _ in range(epochs)]


@pytest.mark.filterwarnings("ignore::tarkit.data.DataWarning")  # the shards' corrupt and uncaptioned samples
@WORKERS
def test_webdataset_splits_shards_by_rank_then_worker(tmp_path, num_workers):
    urls, expected = write_shards(tmp_path, shards=5, per_shard=3)  # 15 good samples, 3 per shard
    for ranks in webdataset_epochs(urls, num_workers):
        assert sum(ranks, Counter()) == Counter(expected)  # every sample once across ranks and workers
        assert sorted(sum(c.values()) for c in ranks) == [6, 9]  # 2 and 3 of the 5 shards: uneven epochs


@pytest.mark.filterwarnings("ignore::tarkit.data.DataWarning")
@WORKERS
def test_webdataset_epoch_length_gives_every_rank_equal_epochs(tmp_path, num_workers):
    urls, expected = write_shards(tmp_path, shards=5, per_shard=3)
    for ranks in webdataset_epochs(urls, num_workers, epoch_length=6):
        assert [sum(c.values()) for c in ranks] == [6, 6]  # every rank runs 3 steps of 2
        seen = sum(ranks, Counter())
        assert set(seen) <= expected and set(seen.values()) == {1}  # none twice; 12 of 15, the rest another epoch
        assert len(seen) == 12


@pytest.mark.filterwarnings("ignore::tarkit.data.DataWarning")
def test_webdataset_without_a_trainer_reads_the_launchers_environment(tmp_path, monkeypatch):
    urls, expected = write_shards(tmp_path, shards=4, per_shard=3)
    ranks = []
    for rank in range(WORLD):
        monkeypatch.setenv("RANK", str(rank))  # what torchrun sets
        monkeypatch.setenv("WORLD_SIZE", str(WORLD))
        dm = WebDatasetDataModule(urls, image_size=SIZE, num_workers=2, task_ratios={"i2t": 1.0, "t2i": 1.0})
        loader = dm.train_dataloader()
        monkeypatch.delenv("RANK")  # the workers start after this: the rank travels with the dataset
        ranks.append(Counter(caption_of(s) for s in unbatch(loader)))
    assert sum(ranks, Counter()) == Counter(expected) and [sum(c.values()) for c in ranks] == [6, 6]
