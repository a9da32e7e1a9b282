"""Web-scale image-text tar shards streamed with ``webdataset`` (``tarkit.datamodules`` name ``webdataset``).

A shard sample (files sharing a key) holds one image (``jpg``, ``jpeg``, ``png`` or ``webp``) and a ``txt``
caption and/or a ``json`` object with the fields of an ``image_text`` JSONL row: ``text``, ``answer``, ``task``
(see ``tarkit_plugins.datamodules.common``). A ``json`` without ``text`` takes the ``txt`` as its text. Edit pairs
(``target_image``, the ti2i task) are not read from shards: such samples are skipped with a warning; use the
``image_text`` datamodule for them.

Shards are split by node, then by DataLoader worker, so no shard is read twice in an epoch (with fewer shards
than workers some workers stay idle). The node split uses the rank and world size read when the loader is built, in
the main process (the trainer's, under Lightning), not webdataset's reading in each worker: a worker started by
``spawn`` or ``forkserver`` (macOS; Linux from Python 3.14) has no process group to ask, and without ``RANK`` in the
environment (Lightning's launcher sets only ``WORLD_SIZE``) it would read every shard on every rank.

Images are decoded with tarkit's ``load_image`` so modes convert as everywhere else. A corrupt image, a sample
without a caption or an unreadable shard is skipped with a ``DataWarning`` (counted per worker process); samples
whose tasks ``task_ratios`` disables all are left out silently, that being a choice rather than a data problem.

The task of a sample is chosen by ``TaskMix`` from a stable index, the CRC32 of its shard's file name and key, and
the epoch: it does not depend on the number of workers, the shuffle, the sample's position in the stream or where
the shards are mounted (a copy of the data on another machine or bucket draws the same tasks).
"""

from __future__ import annotations

import io
import itertools
import json
import random
import zlib
from collections.abc import Iterator
from typing import Any

import webdataset as wds
from torch.utils.data import DataLoader

from tarkit.data import DataFormatError, EpochDataLoader, SkipCounter, TaskMix
from tarkit.images import image_to_tensor, load_image
from tarkit_plugins.datamodules.common import (
    RecordDataModule,
    enabled_tasks,
    parse_record,
    record_sample,
)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


def expand_shard_urls(urls: str | list[str]) -> list[str]:
    """Shard URLs with brace patterns (``train-{000000..000003}.tar``) and ``::`` lists expanded, in order."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    expanded = [url for pattern in patterns for url in wds.shardlists.expand_urls(pattern)]
    if not expanded:
        raise ValueError(f"no shard URLs in {urls!r}")
    return expanded


class ShardDataset(wds.DataPipeline):
    """Samples streamed from tar shards: shard URLs (shuffled per epoch) -> split by node and worker -> tar
    samples -> optional shuffle buffer -> sample dicts, bad samples skipped.

    Args:
        urls: shard URLs or brace patterns.
        mix: chooses each sample's task.
        image_size: side ``S`` of the square images.
        default_question: the question of i2t samples made from captions.
        shuffle_shards: shuffle the shard order, differently each epoch.
        shuffle_buffer: shuffle samples within a buffer of this many per worker (0: stream order).
        seed: seed of the shard and sample shuffles.
        epoch_length: if set, samples per epoch and worker; the shards are cycled to fill it (``with_epoch``).
        node: this process's ``(rank, world size)``; None reads them now as webdataset does (``RANK`` and
            ``WORLD_SIZE``, else an initialised process group, else one process).
    """

    def __init__(
        self,
        urls: str | list[str],
        mix: TaskMix,
        image_size: int,
        default_question: str,
        shuffle_shards: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        epoch_length: int | None = None,
        node: tuple[int, int] | None = None,
    ):
        self.urls = expand_shard_urls(urls)
        self.rank, self.world_size = wds.utils.pytorch_worker_info()[:2] if node is None else node
        self.mix = mix
        self.image_size = image_size
        self.default_question = default_question
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0
        self.skips = SkipCounter("webdataset")
        stages = [
            self._shard_urls,
            self._split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=self._skip_unreadable),
        ]
        if shuffle_buffer > 0:
            stages.append(self._shuffle)
        super().__init__(*stages, self._to_samples)
        if epoch_length is not None:
            self.with_epoch(epoch_length)

    def set_epoch(self, epoch: int) -> None:
        """Shuffle and choose tasks as in epoch ``epoch`` from now on (``EpochDataLoader`` calls this)."""
        self.epoch = epoch

    def _shard_urls(self) -> Iterator[dict[str, str]]:
        urls = list(self.urls)
        if self.shuffle_shards:
            # Every node and worker draws the same order, so splitting it still partitions the shards.
            random.Random(f"{self.seed}/{self.epoch}").shuffle(urls)
        return iter([{"url": url} for url in urls])

    def _split_by_node(self, urls: Iterator[dict[str, str]]) -> Iterator[dict[str, str]]:
        return itertools.islice(urls, self.rank, None, self.world_size)

    def _skip_unreadable(self, error: Exception) -> bool:
        self.skips.skip("unreadable shard data", error)
        return True  # go on with the next file or shard

    def _shuffle(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        worker = wds.utils.pytorch_worker_info()[2]
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
        return wds.shuffle(self.shuffle_buffer, rng=rng)(samples)

    def _to_samples(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for raw in samples:
            sample = self._to_sample(raw)
            if sample is not None:
                yield sample

    def _to_sample(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        where = f"{raw.get('__url__')} key {raw['__key__']}"
        try:
            fields = json.loads(raw["json"]) if "json" in raw else {}
            if not isinstance(fields, dict):
                raise DataFormatError(f"json must be an object, got {type(fields).__name__}")
            if "target_image" in fields:
                raise DataFormatError("target_image (edit pairs) is not read from shards; use image_text for them")
            if not fields.get("text") and "txt" in raw:
                fields["text"] = raw["txt"].decode("utf-8")
            record = parse_record(fields)
            if not enabled_tasks(record, self.mix):
                return None
            extension = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
            if extension is None:
                raise DataFormatError(f"no image ({', '.join(IMAGE_EXTENSIONS)}) in the sample")
            image = image_to_tensor(load_image(io.BytesIO(raw[extension])), self.image_size)
        except (OSError, ValueError) as err:  # DataFormatError, bad JSON and bad UTF-8 are ValueErrors
            self.skips.skip(where, err)
            return None
        shard_name = str(raw.get("__url__", "")).rsplit("/", 1)[-1]
        task = self.mix.choose(zlib.crc32(f"{shard_name} key {raw['__key__']}".encode()), record.tasks, self.epoch)
        return record_sample(record, task, image, self.image_size, self.default_question)


class WebDatasetDataModule(RecordDataModule):
    """Image-text tar shards streamed with webdataset (sample layout in the module docstring).

    For multi-process training set ``epoch_length``: otherwise each process's epoch ends with its own shards,
    and processes with fewer samples leave the others waiting.

    Args:
        train_urls: training shards: URLs or paths, brace patterns such as ``shards/train-{000000..000003}.tar``.
        val_urls: validation shards, read in order without shuffling; no validation when None.
        image_size: side ``S`` of the square ``[3, S, S]`` images.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes (0 loads in the main process); shards are split between them.
        task_ratios: relative frequency of each task (``i2t``, ``t2i``, ``i2i``; ``ti2i`` needs edit pairs, which
            shards do not carry) among the samples that support it; None for the registered tasks' default mix.
        default_question: the question of i2t samples made from captions.
        shuffle_buffer: shuffle training samples within a buffer of this many per worker (0: stream order).
        shuffle_shards: shuffle the training shard order, differently each epoch.
        seed: seed of the task choice and of the shuffles.
        epoch_length: training samples per epoch and process (rounded up to a multiple of ``num_workers``);
            the shards are cycled to fill it. None: an epoch is one pass over the shards.
    """

    def __init__(
        self,
        train_urls: str | list[str],
        val_urls: str | list[str] | None = None,
        image_size: int = 64,
        batch_size: int = 16,
        num_workers: int = 0,
        task_ratios: dict[str, float] | None = None,
        default_question: str = "Describe the image.",
        shuffle_buffer: int = 0,
        shuffle_shards: bool = True,
        seed: int = 0,
        epoch_length: int | None = None,
    ):
        super().__init__(image_size, batch_size, num_workers, task_ratios, default_question, seed)
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be positive or None, got {epoch_length}")
        self.train_urls = train_urls
        self.val_urls = val_urls
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.epoch_length = epoch_length

    def node(self) -> tuple[int, int]:
        """This process's ``(rank, world size)``: the trainer's when one is attached (right under every strategy and
        launcher Lightning supports), else webdataset's reading of the environment."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return wds.utils.pytorch_worker_info()[:2]

    def train_dataloader(self) -> DataLoader:
        # webdataset's with_epoch counts per worker; split the per-process length between the workers.
        per_worker = None if self.epoch_length is None else -(-self.epoch_length // max(1, self.num_workers))
        dataset = ShardDataset(
            self.train_urls,
            self.mix,
            self.image_size,
            self.default_question,
            shuffle_shards=self.shuffle_shards,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            epoch_length=per_worker,
            node=self.node(),
        )
        return EpochDataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_urls is None:
            return []  # Lightning skips validation for an empty list
        dataset = ShardDataset(self.val_urls, self.mix, self.image_size, self.default_question, node=self.node())
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)
