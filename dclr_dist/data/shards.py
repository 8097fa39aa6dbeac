"""Shard lists, and which samples each stream reads in each epoch.

Distribution. An epoch is a fixed number of batches per rank (``data.epoch_batches``, or
``data.epoch_samples`` / (world size x batch size), or the index.json sample count
likewise), so every rank steps the same number of times and collectives never wait at an
epoch's end. The DataLoader takes one batch from each of the rank's workers in turn, so
each (rank, worker slot) is a stream with a fixed quota of samples per epoch. Each epoch
the shard list is permuted with a seed shared by all ranks and the epoch (the order
changes every epoch, identically everywhere), and the concatenated permutation is cut into
consecutive ranges, one per stream, of its quota: across all ranks every video is read at
most once per epoch, exactly once when the epoch is the corpus, whatever the numbers of
shards and streams. A range may begin inside a shard; the stream then skips the samples
before it (a seek on local disk; on S3 read and dropped, or a new ranged GET past a few
MB). A stream's quota passes through its shuffle buffer, which drains at the epoch's end:
nothing read is dropped or carried into the next epoch. Shards without a sample count (no
index.json lists them) are dealt whole instead: stream g of G takes every G-th shard of the
concatenated permutations, so with more streams than such shards some are read twice in an
epoch. How one loader carries its streams across epochs: dclr_dist.data.loader.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import webdataset as wds
from braceexpand import braceexpand

from dclr_dist import storage
from dclr_dist.config import DataConfig, ShardConfig
from dclr_dist.data.errors import DataError

# Seek/decode decisions need the keyframe interval; shards listed without their index.json
# are assumed to use the packer's default.
DEFAULT_GOP = ShardConfig().gop


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None  # from an index.json; None when none lists the shard
    gop: int  # keyframe interval it was packed with


@dataclass(frozen=True)
class Part:
    """Samples ``first`` to ``end`` - 1 of a shard, as one stream reads them in one epoch.

    ``end`` None: to the shard's end. ``counted``: this stream counts the damage it finds here
    (the part lies in its range); parts read past the range, to replace damaged samples, lie
    in other streams' ranges and are theirs to count.
    """

    shard: Shard
    first: int = 0
    end: int | None = None
    counted: bool = True

    @property
    def to_end(self) -> bool:
        return self.end is None or self.end == self.shard.samples


# Shards are plain tar, as the packer writes them. Each tar member is read whole into memory,
# so a small compressed shard can expand to gigabytes (a review turned a 1.3 MB gzip shard
# into 600 MB), and mp4 does not compress further anyway.
_COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_REPACK = "repack the videos into uncompressed .tar shards with `python -m dclr_dist.shard`"


def resolve_shards(urls: list[str]) -> list[Shard]:
    """The shards behind ``data.train`` / ``data.eval`` entries (see DataConfig), in order.

    A shard named by URL takes its sample count and keyframe interval from the index.json
    beside it, when that lists it (a brace pattern over a packed folder).
    """
    shards = []
    beside: dict[str, dict[str, Shard]] = {}  # folder -> the shards its index.json lists, by name
    for entry in urls:
        for url in braceexpand(entry):
            _check_url(url)
            if url.endswith(".tar"):
                folder, name = _folder(url), url.rsplit("/", 1)[-1]
                if folder not in beside:
                    beside[folder] = _index_beside(folder)
                listed = beside[folder].get(name)
                shards.append(Shard(url, listed.samples, listed.gop) if listed else Shard(url, None, DEFAULT_GOP))
            else:
                shards.extend(_read_index(index_url(url)))
    for shard in shards:
        _check_url(shard.url)  # names an index.json lists, too
    if not shards:
        raise DataError(f"no shards in {urls!r}: the index.json files list none; re-pack the corpus")
    return shards


def _check_url(url: str) -> None:
    """Refuse URLs that run commands or name compressed shards, before any worker opens them."""
    # WebDataset runs a pipe: URL as a shell command: a config or index.json is not a script.
    if _is_pipe(url) and os.environ.get("DCLR_ALLOW_PIPE") != "1":
        raise DataError(
            f"{url}: pipe: URLs run shell commands and are refused; list .tar files, an index.json "
            "or a packed folder (local or s3://), or set DCLR_ALLOW_PIPE=1 if you trust every URL"
        )
    if url.lower().endswith(_COMPRESSED_TAR):
        raise DataError(f"{url}: compressed shards are not supported; {_REPACK}")


def _is_pipe(url: str) -> bool:
    return url.strip().lower().startswith("pipe:")


def _folder(url: str) -> str:
    return url.rsplit("/", 1)[0] if storage.is_s3(url) else str(storage.local_path(url).parent)


def _index_shards(url: str) -> list[Shard]:
    index = json.loads(storage.read_bytes(url))
    gop = int(index.get("encoding", {}).get("gop", DEFAULT_GOP))
    return [Shard(storage.join(_folder(url), s["name"]), int(s["samples"]), gop) for s in index["shards"]]


def index_url(entry: str) -> str:
    """The index.json a folder (or prefix) entry of data.train / data.eval stands for, or the entry itself."""
    return entry if entry.endswith(".json") else storage.join(entry, "index.json")


def _read_index(url: str) -> list[Shard]:
    try:
        return _index_shards(url)
    except FileNotFoundError:
        raise DataError(
            f"{url}: not found. List shard .tar URLs, an index.json, or a folder packed by "
            "`python -m dclr_dist.shard` (its index.json is written last: is the packing "
            "finished?)"
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{url}: not an index.json written by `python -m dclr_dist.shard` ({e!r})") from None


def _index_beside(folder: str) -> dict[str, Shard]:
    if _is_pipe(folder):
        return {}
    try:
        return {s.url.rsplit("/", 1)[-1]: s for s in _index_shards(storage.join(folder, "index.json"))}
    except FileNotFoundError:
        return {}  # shards of another tool: no counts
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{storage.join(folder, 'index.json')}: not an index.json written by "
            f"`python -m dclr_dist.shard` ({e!r}); move it away from the shards"
        ) from None


def listed_shards(urls: list[str], key: str) -> list[Shard]:
    """``resolve_shards`` of the config entry ``key``, which must name some."""
    if not urls:
        raise DataError(
            f"{key} is empty: set it to the shards to read (an index.json, a folder or s3:// prefix "
            "packed by `python -m dclr_dist.shard`, or .tar URLs)"
        )
    return resolve_shards(urls)


def check_shards(shards: list[Shard], key: str) -> None:
    """Fail, naming the first, if listed shards are not there: the trainer's pre-flight.

    One listing per folder or S3 prefix (1,000 names per request) rather than a HEAD per
    shard, so tens of thousands of shards cost seconds; pipe: URLs cannot be checked.
    """
    by_folder: dict[str, list[str]] = {}
    for shard in shards:
        if not _is_pipe(shard.url):
            by_folder.setdefault(_folder(shard.url), []).append(shard.url)
    missing = []
    for folder, urls in by_folder.items():
        present = set(storage.list_names(folder))
        missing += [url for url in urls if url.rsplit("/", 1)[-1] not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(
            f"{missing[0]}{more}: listed in {key} (or the index.json it names) but not there: copy "
            f"the whole packed folder, or re-pack with `python -m dclr_dist.shard`, or fix {key}"
        )


def _permutation(num_shards: int, seed: int, epoch: int, cycle: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, cycle]).permutation(num_shards)


def shard_order(num_shards: int, seed: int, epoch: int, stream: int, streams: int) -> Iterator[int]:
    """Endless shard indices for stream ``stream`` of ``streams``: every ``streams``-th of the
    epoch's concatenated shard permutations (shards without sample counts)."""
    position, cycle, perm = stream, -1, None
    while True:
        c, i = divmod(position, num_shards)
        if c != cycle:
            cycle, perm = c, _permutation(num_shards, seed, epoch, c)
        yield int(perm[i])
        position += streams


def stream_parts(shards: list[Shard], seed: int, epoch: int, stream: int, quotas: list[int]) -> Iterator[Part]:
    """What stream ``stream`` reads in ``epoch`` (``quotas``: samples per stream): its range, then on.

    The range is samples sum(quotas[:stream]) .. + quotas[stream] of the epoch's concatenated
    shard permutations; what follows it is read only to replace damaged samples.
    """
    if any(s.samples is None for s in shards):
        yield from (Part(shards[i]) for i in shard_order(len(shards), seed, epoch, stream, len(quotas)))
        return
    if not any(s.samples for s in shards):
        raise DataError(f"the shards hold no samples ({shards[0].url}, ... by their index.json): re-pack the corpus")
    start = sum(quotas[:stream])
    stop, position = start + quotas[stream], 0
    for cycle in itertools.count():
        for i in _permutation(len(shards), seed, epoch, cycle):
            shard = shards[i]
            low, position = position, position + shard.samples
            if position <= start or not shard.samples:
                continue
            first, end = max(start - low, 0), min(max(stop - low, 0), shard.samples)
            if first < end:
                yield Part(shard, first, end)
            if end < shard.samples:
                yield Part(shard, end, shard.samples, counted=False)


def epoch_order(samples: Iterator, quota: int, buffer: int, initial: int, rng: random.Random) -> Iterator:
    """One stream's epoch: its first ``quota`` samples through the shuffle buffer, which drains at
    the epoch's end, then the rest in order (read only to replace damaged samples)."""
    yield from wds.shuffle(buffer, initial, rng=rng)(itertools.islice(samples, quota))
    yield from samples


def batches_per_epoch(data: DataConfig, shards: list[Shard], world_size: int) -> int:
    if data.epoch_batches is not None:
        return data.epoch_batches
    samples = data.epoch_samples
    if samples is None:
        if any(s.samples is None for s in shards):
            raise DataError(
                "data.train lists shards no index.json lists, so the epoch length is unknown: set "
                "data.epoch_samples (or data.epoch_batches), or list the index.json"
            )
        samples = sum(s.samples for s in shards)
    # Rounded down: every rank must step the same number of times; at least one step.
    return max(1, samples // (world_size * data.batch_size))
