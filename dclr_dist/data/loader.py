"""The datasets and DataLoaders of a run, and ``to_device``, which finishes a batch on the device.

Data flow, per stream (one DataLoader worker of one rank, one epoch):
the epoch's sample range -> tar members grouped into samples -> bounded shuffle (of the
compressed samples) -> decode two clips per video (PyAV, from memory) -> crops -> batch -> [views].

The DataLoader takes one batch from each of the rank's workers in turn, so each (rank,
worker slot) is a stream with a fixed quota of samples per epoch (its range of the epoch:
dclr_dist.data.shards). One loader serves the whole run (``train_loader(..., epochs=n)``):
its workers stream on across epoch boundaries, with no fork, reconnect or buffer refill, and
prefetch the next epoch's first batches while the last ones train. An epoch's batches depend
on the seed, the epoch, the rank and the numbers of ranks and workers, not on the epoch the
loader started at, so a resumed run reads what an uninterrupted one would. Usage and the
batch contract: dclr_dist.data (the package docstring).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dclr_dist import views
from dclr_dist.config import DataConfig, ViewsConfig
from dclr_dist.data.decode import _collate, _eval_item, _train_item
from dclr_dist.data.read import _Skips, decoded, read_parts, read_shards
from dclr_dist.data.shards import Shard, batches_per_epoch, epoch_order, listed_shards, stream_parts


def _stream() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainStream(IterableDataset):
    """Training batches of one rank for ``epochs`` epochs from ``epoch``: ``batches`` per epoch, over its workers."""

    def __init__(
        self,
        shards: list[Shard],
        data: DataConfig,
        cfg: ViewsConfig,
        rank: int,
        world_size: int,
        epoch: int,
        epochs: int,
        batches: int,
        labelled: bool,
    ):
        self.shards, self.data, self.cfg = shards, data, cfg
        self.rank, self.world_size, self.epoch, self.epochs, self.batches = rank, world_size, epoch, epochs, batches
        self.labelled = labelled

    def __len__(self) -> int:
        return self.batches * self.epochs

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _stream()
        B = self.data.batch_size
        counts = [self.batches // workers + (slot < self.batches % workers) for slot in range(workers)]
        quotas = [count * B for count in counts] * self.world_size  # samples per stream and epoch
        skips = _Skips(len(self.shards))
        for epoch in range(self.epoch, self.epoch + self.epochs):
            # The DataLoader takes a batch from each worker in turn, on across epochs: this worker
            # makes the epoch's batches slot, slot + workers, ... whatever epoch the loader began at.
            slot = (worker - (epoch - self.epoch) * self.batches) % workers
            stream = self.rank * workers + slot
            rng = np.random.default_rng([self.data.seed, epoch, stream, len(quotas)])
            samples = read_parts(
                stream_parts(self.shards, self.data.seed, epoch, stream, quotas), skips, self.data.retries
            )
            # Shuffling compressed samples keeps the buffer small: ~100 kB per video at 128p.
            ordered = epoch_order(
                samples,
                quotas[stream],
                self.data.shuffle_buffer,
                self.data.shuffle_initial,
                random.Random(int(rng.integers(2**63))),
            )
            items = decoded(ordered, partial(_train_item, cfg=self.cfg, rng=rng, labelled=self.labelled), skips)
            for _ in range(counts[slot]):
                batch = _collate([next(items) for _ in range(B)], skips)
                if self.cfg.augment_on == "worker":
                    batch = views.dclr_views(batch, self.cfg)
                yield batch


class EvalStream(IterableDataset):
    """Evaluation batches of one rank: its share of the shards, each video once, no shuffling."""

    def __init__(self, shards: list[Shard], data: DataConfig, cfg: ViewsConfig, rank: int, world_size: int):
        self.shards, self.data, self.cfg, self.rank, self.world_size = shards, data, cfg, rank, world_size

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _stream()
        stream, streams = self.rank * workers + worker, self.world_size * workers
        mine = self.shards[stream::streams]
        skips = _Skips(len(self.shards))
        items = decoded(
            read_shards(iter(mine), skips, self.data.retries),
            partial(_eval_item, cfg=self.cfg, num_clips=self.data.eval_clips),
            skips,
        )
        batch = []
        for item in items:
            batch.append(item)
            if len(batch) == self.data.batch_size:
                yield _collate(batch, skips)
                batch = []
        if batch:
            yield _collate(batch, skips)
        samples, shards = skips.take()
        if samples or shards:  # damage after the last batch, which no batch carried: a batch of none
            yield {"key": [], "skipped_samples": torch.tensor(samples), "skipped_shards": torch.tensor(shards)}


def train_loader(
    data: DataConfig,
    cfg: ViewsConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    epochs: int = 1,
    labelled: bool = False,
) -> DataLoader:
    """The training batches of ``rank`` for epochs ``epoch`` to ``epoch + epochs - 1``, in order.

    ``batches_per_epoch`` per epoch; one loader serves a whole run (module docstring).
    ``labelled``: every sample must have a class label (supervised training on these shards).
    """
    _check_rank(rank, world_size)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    shards = listed_shards(data.train, "data.train")
    dataset = TrainStream(
        shards, data, cfg, rank, world_size, epoch, epochs, batches_per_epoch(data, shards, world_size), labelled
    )
    return _loader(dataset, data)


def eval_loader(data: DataConfig, cfg: ViewsConfig, *, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Evaluation batches of ``rank``: ranks may get different counts, so gather results at the end."""
    _check_rank(rank, world_size)
    return _loader(EvalStream(listed_shards(data.eval, "data.eval"), data, cfg, rank, world_size), data)


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def _loader(dataset: IterableDataset, data: DataConfig) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=data.loader_workers,
        pin_memory=data.pin_memory and torch.cuda.is_available(),
        prefetch_factor=data.prefetch if data.loader_workers else None,
    )


def to_device(batch: dict, device: torch.device | str, cfg: ViewsConfig) -> dict:
    """Copy a loader batch to ``device`` and finish it there: the model's dict (dclr_dist.data's docstring).

    With ``views.augment_on: device`` the decoded uint8 frames cross the bus and the views are
    made on the device; evaluation clips are cropped and normalised there in any case.
    """
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "aug" in out:
        out = views.dclr_views(out, cfg)
    if "clips" in out:
        out = views.eval_clips(out, cfg)
    return out
