"""Stream batches of DCLR clips from WebDataset shards on local disk or S3.

Data flow, per stream (one DataLoader worker of one rank, one epoch):
the epoch's sample range -> tar members grouped into samples -> bounded shuffle (of the
compressed samples) -> decode two clips per video (PyAV, from memory) -> crops -> batch -> [views].

    it = iter(train_loader(cfg.data, cfg.views, rank=rank, world_size=world, epoch=start, epochs=n))
    for epoch in range(start, start + n):                 # one loader, one set of workers, for the run
        for _ in range(batches):                          # batches_per_epoch(): equal on every rank
            batch = to_device(next(it), device, cfg.views)    # the model's dict (below)
            skipped += batch["skipped_samples"]           # sum over steps, all_reduce over ranks

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
epoch. One loader serves the whole run (``train_loader(..., epochs=n)``): its workers stream
on across epoch boundaries, with no fork, reconnect or buffer refill, and prefetch the next
epoch's first batches while the last ones train. An epoch's batches depend on the seed, the
epoch, the rank and the numbers of ranks and workers, not on the epoch the loader started
at, so a resumed run reads what an uninterrupted one would.

Damage. A sample whose mp4 does not decode, whose JSON is missing or broken, or whose tar
member is cut short is skipped with a warning naming it, and counted; so is a shard that
cannot be opened (after ``data.retries`` more attempts), that breaks off, that ends before
the samples its index.json lists, or that does not end as a tar should (no end-of-archive
marker, a damaged header, trailing data, a second tar appended: tar readers stop there
without a word). A damaged sample is replaced by reading on past the stream's range, and
each loss is counted once, by the stream whose range holds it. A shard no index.json lists
cannot say how many samples followed a break; the warning says so. S3 streams that break
mid-shard are resumed at the byte where they broke (a ranged GET), so a flaky link costs
neither data nor duplicates; every resuming GET is pinned to the first response's ETag
(If-Match), so a shard replaced mid-read is skipped and counted, never spliced from two
versions. Each batch carries the stream's count since its previous batch
(``skipped_samples``, ``skipped_shards``); summing them over the batches of all ranks gives
the run's total. Training stops with an error only when nothing can be read: every shard in
a row failing, or a stream's first 50 samples all damaged.

Shards of other tools. A sample is the members sharing a key: a video ``.mp4`` and a JSON
record ``.json`` are required, other members (video2dataset's ``.txt`` caption) are
ignored. The packer's record gives the frame count and the label; a record without them
(video2dataset's: url, caption, status, ...) is read for pretraining with label -1 and the
frame count from the container. Evaluation (and ``labelled=True``) needs labels and stops
with an error naming the sample. The video must be one PyAV's FFmpeg decodes, at a constant
frame rate, in an mp4 with its index (moov) anywhere, and small: frames are decoded and
shipped at their stored size (the packer's short side is 128 px; full HD costs ~50x). Without
an index.json the keyframe interval is taken to be the packer's (16): a longer one only
costs decoding time.

Decoding (docs/design.md, section 9: the likely bottleneck). Each video is decoded once, from
the bytes in memory, with one decoder thread per DataLoader worker, seeking to the
keyframe before each clip and decoding only up to its last frame; two clips close together
are decoded in one pass. Only the frames used are converted to RGB, and that is all the
worker does to them: crops, resizing and augmentation run after the copy to the device
(``views.where: device``), where they cost next to nothing.

Short videos. A video with fewer frames than a clip spans (T x stride + 1 with the
dynamic view's extra frame) loops: frame indices are taken modulo its length from a
random start. That keeps the stride, i.e. the speed of motion, at the cost of one jump
where the clip wraps; slowing the clip down instead would teach a different motion.

Training batch from the loader (``views.where: device``), H x W the decoded frame size
(the largest in the batch; smaller frames are edge-padded):
    q, k:       (B, 3, T+1, H, W) uint8   frames v_{-1}..v_{T-1} of the two clips, channels-last
                                          in memory as decoded; 2 x 17 x 128 x 170 x 3 bytes
                                          = 2.2 MB per video, against 14.4 MB for the six
                                          float32 views made from them on the device
    aug:        (B, 4, views.NUM_PARAMS) float32   drawn crop boxes, static frames, colour,
                                          blur and flip parameters (rows views.ROWS)
    label:      (B,) int64                class index, -1 where the record has none (DCLR is self-supervised)
    key:        list of B str             sample keys
    skipped_samples, skipped_shards: () int64   damage since this stream's previous batch
After ``to_device`` (or from the loader itself with ``views.where: worker``):
    q, k, static_q, static_k, dynamic_q, dynamic_k: (B, 3, T, S, S) float32, normalised,
    plus label, key and the skip counts.

Evaluation batch (``eval_loader``; every video once across ranks, in shard order):
    clips: (B, N, 3, T, H, W) uint8, N uniformly spaced clips per video, and box (B, 4),
    their centre crop; after ``to_device``: clips (B, N, 3, T, S, S) float32, normalised.
    label (B,) int64; key; meta: list of B dicts, each record's meta (the manifest's extra
    columns, e.g. {"scene": "scene003"} in the synthetic corpus; {} where none); the skip counts.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import random
import re
import tarfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import av
import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen, gopen_schemes

from dclr_dist import storage, views
from dclr_dist.config import DataConfig, ShardConfig, ViewsConfig

log = logging.getLogger(__name__)

# Seek/decode decisions need the keyframe interval; shards listed without their index.json
# are assumed to use the packer's default.
DEFAULT_GOP = ShardConfig().gop
# A stream whose first this-many samples are all damaged is reading something that is not
# our shard format (or hit a bug): stop instead of skipping forever.
_MAX_DAMAGED_FIRST = 50


class DataError(RuntimeError):
    """The data cannot be read at all; the message names what and says what to do."""


class DamagedSample(ValueError):
    """One sample cannot be used; it is skipped and counted."""


# --------------------------------------------------------------------------- shard lists

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
                shards.extend(_read_index(url if url.endswith(".json") else storage.join(url, "index.json")))
    for shard in shards:
        _check_url(shard.url)  # names an index.json lists, too
    if not shards:
        raise DataError(f"no shards in {urls!r}: the index.json files list none; re-pack the corpus")
    return shards


def _check_url(url: str) -> None:
    """Refuse URLs that run commands or name compressed shards, before any worker opens them."""
    # WebDataset runs a pipe: URL as a shell command: a config or index.json is not a script.
    if _is_pipe(url) and os.environ.get("DCLR_ALLOW_PIPE") != "1":
        raise DataError(f"{url}: pipe: URLs run shell commands and are refused; list .tar files, an index.json "
                        "or a packed folder (local or s3://), or set DCLR_ALLOW_PIPE=1 if you trust every URL")
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


def _read_index(url: str) -> list[Shard]:
    try:
        return _index_shards(url)
    except FileNotFoundError:
        raise DataError(f"{url}: not found. List shard .tar URLs, an index.json, or a folder packed by "
                        "`python -m dclr_dist.shard` (its index.json is written last: is the packing "
                        "finished?)") from None
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
        raise DataError(f"{storage.join(folder, 'index.json')}: not an index.json written by "
                        f"`python -m dclr_dist.shard` ({e!r}); move it away from the shards") from None


def listed_shards(urls: list[str], key: str) -> list[Shard]:
    """``resolve_shards`` of the config entry ``key``, which must name some."""
    if not urls:
        raise DataError(f"{key} is empty: set it to the shards to read (an index.json, a folder or s3:// prefix "
                        "packed by `python -m dclr_dist.shard`, or .tar URLs)")
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
        raise DataError(f"{missing[0]}{more}: listed in {key} (or the index.json it names) but not there: copy "
                        f"the whole packed folder, or re-pack with `python -m dclr_dist.shard`, or fix {key}")


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
            raise DataError("data.train lists shards no index.json lists, so the epoch length is unknown: set "
                            "data.epoch_samples (or data.epoch_batches), or list the index.json")
        samples = sum(s.samples for s in shards)
    # Rounded down: every rank must step the same number of times; at least one step.
    return max(1, samples // (world_size * data.batch_size))


# --------------------------------------------------------------------------- s3:// for WebDataset

class ShardReplaced(storage.StorageError):
    """An S3 object was replaced while it was being read."""


# Forward seeks up to this far read through the open body; farther ones start a ranged GET
# (a request costs about what a few MB of transfer does).
_SKIP_BY_READING = 8 << 20


class _S3Reader(io.RawIOBase):
    """A streaming GET of one version of an s3:// object that resumes where the connection broke.

    A body that breaks off mid-shard is reopened with a ranged GET from the current offset
    (storage.retry's back-off), so nothing is read twice and no sample is delivered twice.
    Every later GET carries If-Match with the first response's ETag: an object replaced in
    between answers 412 (ShardReplaced) instead of splicing two versions. Seekable, so tar
    members before a stream's range are skipped, not decoded.
    """

    def __init__(self, url: str, attempts: int):
        super().__init__()
        self.url, self.attempts = url, attempts
        self.bucket, self.key = storage.split_s3(url)
        self.pos, self.body, self.etag, self.size = 0, None, None, None
        storage.retry(self._open, f"open {url}", attempts)  # a missing shard fails here, by name

    def _open(self) -> None:
        from botocore.exceptions import ClientError

        client = storage.s3_client()
        if self.etag is None:
            response = client.get_object(Bucket=self.bucket, Key=self.key)
            self.etag, self.size = response["ETag"], response["ContentLength"]
        else:
            try:
                response = client.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.pos}-",
                                             IfMatch=self.etag)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
                    raise
                raise ShardReplaced(f"{self.url}: replaced while it was being read, at byte {self.pos} (it is no "
                                    f"longer version {self.etag}); the rest would come from another version") from None
        self.body = response["Body"]

    def _drop(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = (offset, self.pos + offset, self.size + offset)[whence]
        if 0 < target - self.pos <= _SKIP_BY_READING and self.body is not None:
            scratch = memoryview(bytearray(min(target - self.pos, 1 << 20)))
            while self.pos < target and self.readinto(scratch[:target - self.pos]):
                pass
        elif target != self.pos:
            self._drop()  # the next read opens at the target
            self.pos = target
        return self.pos

    def readinto(self, buffer) -> int:
        if self.pos >= self.size:
            return 0  # a ranged GET there would be refused (416)

        def read() -> int:
            if self.body is None:
                self._open()
            try:
                return self.body.readinto(buffer)
            except BaseException:
                self.body = None  # the next attempt reopens at self.pos
                raise

        n = storage.retry(read, f"read {self.url} at byte {self.pos}", self.attempts)
        self.pos += n
        return n

    def close(self) -> None:
        self._drop()
        super().close()


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, attempts: int = 5, **_) -> io.BufferedReader:
    """WebDataset gopen handler for s3:// URLs: boto3 with the standard AWS environment.

    The boto3 client is made lazily in each process (``storage.s3_client``): clients do
    not survive the fork into DataLoader workers.
    """
    if mode != "rb":
        raise ValueError(f"{url}: s3:// shards are read-only here (mode {mode!r})")
    return io.BufferedReader(_S3Reader(url, attempts), buffer_size=max(bufsize, 1 << 20))


# WebDataset 1.0.2 reads s3:// only through `pipe:aws s3 cp ...` (a CLI and a process per shard).
gopen_schemes["s3"] = gopen_s3


# --------------------------------------------------------------------------- tar -> samples

class _Skips:
    """Damage one stream skipped; each batch carries the increase since the previous batch."""

    def __init__(self, num_shards: int):
        self.samples = self.shards = 0
        self.reported = (0, 0)
        self.good_samples = self.damaged = 0
        self.failed_in_a_row = 0
        self.num_shards = num_shards

    def lost(self, part: Part, at: int, reason: str, cut: bool) -> None:
        """Samples ``at`` on of the part's shard are lost (``cut``: sample ``at`` broke off mid-read)."""
        url = part.shard.url
        if not part.counted:
            log.debug("%s: read past this stream's range: %s", url, reason)
            return
        end = part.end if part.end is not None else part.shard.samples
        if end is None:
            self.shards += 1
            self.samples += cut
            log.warning("%s: skipped: %s; %s an unknown number of samples after it (no index.json lists this "
                        "shard)", url, reason, "lost the sample being read and" if cut else "lost")
            return
        lost = end - max(at, part.first)
        self.samples += lost
        # The shard is counted by the one stream whose range holds its first lost sample.
        self.shards += at >= part.first
        log.warning("%s: skipped: %s (%d samples lost)", url, reason, lost)

    def sample(self, sample: dict, error: Exception) -> None:
        self.damaged += 1
        if sample["__counted__"]:
            self.samples += 1
            log.warning("%s in %s: damaged sample skipped: %s", sample["__key__"], sample["__url__"], error)
        else:
            log.debug("%s in %s: damaged sample read past this stream's range: %s", sample["__key__"],
                      sample["__url__"], error)
        if self.good_samples == 0 and self.damaged >= _MAX_DAMAGED_FIRST:
            raise DataError(f"the first {self.damaged} samples read were all damaged (last: "
                            f"{sample['__key__']} in {sample['__url__']}: {error}). Are these shards of "
                            "videos (an .mp4 and a .json per sample, see dclr_dist.data)?")

    def take(self) -> tuple[int, int]:
        previous, self.reported = self.reported, (self.samples, self.shards)
        return self.samples - previous[0], self.shards - previous[1]


def read_shards(shards: Iterable[Shard], skips: _Skips, retries: int) -> Iterator[dict]:
    """The samples of each shard, whole (see read_parts)."""
    return read_parts((Part(shard) for shard in shards), skips, retries)


def read_parts(parts: Iterable[Part], skips: _Skips, retries: int) -> Iterator[dict]:
    """Samples {"__key__", "__url__", "__gop__", "__counted__", <extension>: bytes, ...} of each part,
    in tar order."""
    for part in parts:
        shard = part.shard
        try:
            stream = _open_shard(shard.url, retries)
        except OSError as e:  # StorageError is an OSError
            skips.lost(part, 0, f"cannot be opened: {e}", cut=False)
            _fail(skips, shard, e)
            continue
        tar = _Tar(stream, shard)
        with stream:
            try:
                for sample in tar.samples(part.first, part.end):
                    sample["__counted__"] = part.counted
                    yield sample
                problem = tar.ending() if part.to_end else None
            except (OSError, tarfile.TarError) as e:
                # The sample being read is lost, and with it the rest of the part.
                skips.lost(part, tar.done, f"broke off after {tar.done} samples: {type(e).__name__}: {e}", cut=True)
                if tar.done > part.first:
                    skips.failed_in_a_row = 0
                else:
                    _fail(skips, shard, e)
                continue
        expected = shard.samples if part.to_end else part.end
        if expected is not None and tar.done < expected:
            skips.lost(part, tar.done, f"it ended after {tar.done} of the {shard.samples} samples its index.json "
                       f"lists" + (f": {problem}" if problem else " (truncated?)"), cut=False)
        elif problem and shard.samples is None:
            skips.lost(part, tar.done, f"after {tar.done} samples, {problem}", cut=False)
        elif problem:
            log.warning("%s: %s; the %d samples its index.json lists were read", shard.url, problem, shard.samples)
        skips.failed_in_a_row = 0


def _fail(skips: _Skips, shard: Shard, error: Exception) -> None:
    skips.failed_in_a_row += 1
    if skips.failed_in_a_row >= skips.num_shards:
        raise DataError(f"{skips.failed_in_a_row} shards in a row could not be read; the last, {shard.url}: "
                        f"{type(error).__name__}: {error}") from error


class _Tar:
    """The samples of one tar stream, in order; ``done`` counts those passed (read or skipped)."""

    def __init__(self, stream, shard: Shard):
        self.stream, self.shard = stream, shard
        self.seekable = getattr(stream, "seekable", lambda: False)()  # files and S3; not pipes
        self.done, self.more, self.tar = 0, False, None

    def samples(self, first: int, end: int | None) -> Iterator[dict]:
        """Samples ``first`` to ``end`` - 1; on a seekable stream those before ``first`` are seeked past."""
        self.tar = tarfile.open(fileobj=self.stream, mode="r:" if self.seekable else "r|")
        key, sample = None, None
        for member in self.tar:
            if not member.isreg():
                continue
            # WebDataset's convention: the key is the path up to the first dot of the file name.
            folder, _, name = member.name.rpartition("/")
            stem, dot, ext = name.partition(".")
            if not dot:
                continue
            if (f"{folder}/{stem}" if folder else stem) != key:
                if key is not None:
                    if sample is not None:
                        yield sample
                    self.done += 1
                if self.done == end:
                    self.more = True
                    return
                key = f"{folder}/{stem}" if folder else stem
                sample = {"__key__": key, "__url__": self.shard.url, "__gop__": self.shard.gop} \
                    if self.done >= first else None
            if sample is not None:
                sample[ext.lower()] = self.tar.extractfile(member).read()
        if key is not None:
            if sample is not None:
                yield sample
            self.done += 1

    def ending(self) -> str | None:
        """Why the tar does not end where its last sample did, or None: it ends as a tar should.

        tarfile stops without a word at a damaged or cut header, at trailing garbage, and at
        the end of the first of two concatenated tars.
        """
        if self.more:
            return f"it holds more than the {self.done} samples its index.json lists"
        if not self.seekable:
            return None
        offset = self.tar.offset
        self.stream.seek(offset)
        head = self.stream.read(tarfile.BLOCKSIZE)
        if not head:
            return f"it ends at byte {offset} without an end-of-archive marker (truncated?)"
        if head.strip(b"\0"):
            return (f"unreadable data at byte {offset}, where a tar header should be (a damaged or cut header, "
                    "or garbage)")
        while chunk := self.stream.read(1 << 16):
            if chunk.strip(b"\0"):
                return f"data after its end-of-archive marker at byte {offset} (a second tar appended?)"
        return None


# First bytes of a gzip, bzip2 or xz stream (bzip2's with its block magic: "BZh" alone could
# begin a tar member's name).
_COMPRESSED_MAGIC = {"gzip": re.compile(rb"\x1f\x8b"), "bzip2": re.compile(rb"BZh[1-9]1AY&SY"),
                     "xz": re.compile(rb"\xfd7zXZ\x00")}


def _refuse_compressed(stream, url: str) -> None:
    # A shard named .tar may still be compressed; say so rather than report a damaged tar.
    # Pipes cannot be peeked at; they are opt-in (DCLR_ALLOW_PIPE) and the user's to vouch for.
    head = stream.peek(10)[:10] if hasattr(stream, "peek") else b""
    for kind, magic in _COMPRESSED_MAGIC.items():
        if magic.match(head):
            raise DataError(f"{url}: a {kind}-compressed tar; compressed shards are not supported, {_REPACK}")


def _open_shard(url: str, retries: int):
    for attempt in range(retries + 1):
        try:
            stream = gopen(url, attempts=retries + 1) if storage.is_s3(url) else gopen(url)
            try:
                _refuse_compressed(stream, url)
            except BaseException:
                stream.close()
                raise
            return stream
        except OSError:
            # A shard can be missing for a moment (a sync in progress, an NFS hiccup): retry a
            # few times, then let read_parts skip it.
            if attempt == retries:
                raise
            time.sleep(0.2 * 2 ** attempt)
    raise AssertionError("unreachable")


def decoded(samples: Iterator[dict], fn, skips: _Skips) -> Iterator[dict]:
    """``fn(sample)`` for each sample; damaged samples are skipped and counted."""
    for sample in samples:
        try:
            item = fn(sample)
        except DamagedSample as e:
            skips.sample(sample, e)
            continue
        skips.good_samples += 1
        yield item


# --------------------------------------------------------------------------- decoding

def decode_frames(data: bytes, wanted: list[int], gop: int) -> dict[int, np.ndarray]:
    """RGB frames, (H, W, 3) uint8 by frame index, at ``wanted`` (sorted, unique indices).

    Seeks to the keyframe at or before a wanted frame when it lies more than a keyframe
    interval past the last decoded one (decoding through would cost more than the at most
    gop - 1 frames a seek decodes in vain); otherwise decodes through.
    """
    frames: dict[int, np.ndarray] = {}
    try:
        with av.open(io.BytesIO(data), metadata_errors="ignore") as container:
            if not container.streams.video:
                raise DamagedSample("no video stream")
            stream = container.streams.video[0]
            # One thread: a DataLoader worker is one core's work; parallelism comes from the workers.
            stream.codec_context.thread_count = 1
            rate = stream.average_rate or stream.guessed_rate
            if not rate or not stream.time_base:
                raise DamagedSample("the video stream has no frame rate")
            ticks = float(1 / (stream.time_base * rate))  # pts per frame (the packer writes constant frame rates)
            start = stream.start_time or 0
            todo = deque(wanted)
            frame_iter, last = None, None
            while todo:
                if frame_iter is None or todo[0] - last > gop:
                    container.seek(start + int(todo[0] * ticks), stream=stream, backward=True)
                    frame_iter = container.decode(stream)
                for frame in frame_iter:
                    if frame.pts is None:
                        raise DamagedSample("a frame without a timestamp")
                    last = round((frame.pts - start) / ticks)
                    if last < todo[0]:
                        continue
                    if last > todo[0]:
                        raise DamagedSample(f"frame {todo[0]} is missing (decoding went on at frame {last})")
                    # threads=1: swscale's default thread pool is 5x slower on frames this small.
                    frames[last] = frame.to_ndarray(format="rgb24", threads=1)
                    todo.popleft()
                    if not todo or todo[0] - last > gop:
                        break
                else:
                    raise DamagedSample(f"the video ends before frame {todo[0]}")
    except av.error.FFmpegError as e:
        raise DamagedSample(f"undecodable video: {e}") from None
    return frames


def _record(sample: dict, labelled: bool) -> dict:
    """The sample's JSON record with its 'frames' and 'label' (-1: none), which other tools' records lack."""
    if "mp4" not in sample:
        raise DamagedSample(f"no .mp4 member (found: {', '.join(k for k in sample if not k.startswith('__'))})")
    if "json" not in sample:
        raise DamagedSample("no .json member")
    try:
        record = json.loads(sample["json"])
    except ValueError as e:
        raise DamagedSample(f"unreadable .json: {e}") from None
    if not isinstance(record, dict):
        raise DamagedSample("the .json member is not a JSON object")
    frames, label = record.get("frames"), record.get("label")
    if not (frames is None or isinstance(frames, int) and frames >= 1) or not (label is None or isinstance(label, int)):
        raise DamagedSample("the .json record's 'frames' (>= 1) and 'label' are not integers")
    if label is None and labelled:
        raise DataError(f"{sample['__key__']} in {sample['__url__']}: its record has no class label, and evaluation "
                        "needs one (shards of another tool, e.g. video2dataset?): pack the labelled videos with "
                        "`python -m dclr_dist.shard` (class folders or a manifest with a label column)")
    return {**record, "frames": frames or _frame_count(sample["mp4"]), "label": -1 if label is None else label}


def _frame_count(mp4: bytes) -> int:
    """The frame count the container records (its index, or duration x frame rate)."""
    try:
        with av.open(io.BytesIO(mp4), metadata_errors="ignore") as container:
            if not container.streams.video:
                raise DamagedSample("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = stream.frames or (round(stream.duration * stream.time_base * rate)
                                       if stream.duration and stream.time_base and rate else 0)
    except av.error.FFmpegError as e:
        raise DamagedSample(f"undecodable video: {e}") from None
    if frames < 1:
        raise DamagedSample("neither the record nor the container says how many frames the video has")
    return frames


def clip_indices(start: int, count: int, stride: int, frames: int) -> list[int]:
    """``count`` frame indices at ``stride`` from ``start``, looping past the video's end."""
    return [(start + t * stride) % frames for t in range(count)]


def _train_item(sample: dict, cfg: ViewsConfig, rng: np.random.Generator, labelled: bool) -> dict:
    record = _record(sample, labelled)
    n, T, stride = record["frames"], cfg.frames, cfg.stride
    span = T * stride + 1  # T + 1 frames: the dynamic view's v_{-1} precedes the clip
    clips = []
    for _ in range(2):  # q and k: independent random positions in the same video
        start = int(rng.integers(0, n - span + 1)) if n >= span else int(rng.integers(0, n))
        clips.append(clip_indices(start, T + 1, stride, n))
    frames = decode_frames(sample["mp4"], sorted(set(clips[0] + clips[1])), sample["__gop__"])
    height, width = frames[clips[0][0]].shape[:2]
    return {"label": record["label"], "key": sample["__key__"],
            "q": [frames[i] for i in clips[0]], "k": [frames[i] for i in clips[1]],
            "aug": views.draw(rng, cfg, height, width)}  # (4, NUM_PARAMS)


def _eval_item(sample: dict, cfg: ViewsConfig, num_clips: int) -> dict:
    record = _record(sample, labelled=True)
    n, T, stride = record["frames"], cfg.frames, cfg.stride
    span = (T - 1) * stride + 1
    starts = np.linspace(0, max(n - span, 0), num_clips).round().astype(int)
    clips = [clip_indices(int(s), T, stride, n) for s in starts]
    frames = decode_frames(sample["mp4"], sorted({i for c in clips for i in c}), sample["__gop__"])
    return {"label": record["label"], "key": sample["__key__"], "clips": [[frames[i] for i in c] for c in clips],
            "box": views.center_box(*frames[clips[0][0]].shape[:2]), "meta": record.get("meta", {})}


def _frames(videos: list[list[np.ndarray]]) -> torch.Tensor:
    """Each video's frames, (H, W, 3) uint8, in one (B, L, H, W, 3) uint8 tensor: one copy.

    Frames of different sizes (videos of other aspect ratios) are padded to the largest by
    repeating their last row and column, so a crop that touches an edge resizes as if
    clamped there. Channels stay last, as decoded: transposing is left to the device.
    """
    height = max(v[0].shape[0] for v in videos)
    width = max(v[0].shape[1] for v in videos)
    out = np.empty((len(videos), len(videos[0]), height, width, 3), np.uint8)
    for b, video in enumerate(videos):
        h, w = video[0].shape[:2]
        for t, frame in enumerate(video):
            out[b, t, :h, :w] = frame
        if h < height:
            out[b, :, h:, :w] = out[b, :, h - 1:h, :w]
        if w < width:
            out[b, :, :, w:] = out[b, :, :, w - 1:w]
    return torch.from_numpy(out)


def _collate(items: list[dict], skips: _Skips) -> dict:
    batch = {"key": [it["key"] for it in items], "label": torch.tensor([it["label"] for it in items])}
    if "aug" in items[0]:
        for name in ("q", "k"):
            batch[name] = _frames([it[name] for it in items]).permute(0, 4, 1, 2, 3)  # (B, 3, T+1, H, W)
        batch["aug"] = torch.from_numpy(np.stack([it["aug"] for it in items]))
    else:
        N, T = len(items[0]["clips"]), len(items[0]["clips"][0])
        x = _frames([[f for clip in it["clips"] for f in clip] for it in items])  # (B, N*T, H, W, 3)
        batch["clips"] = x.unflatten(1, (N, T)).permute(0, 1, 5, 2, 3, 4)  # (B, N, 3, T, H, W)
        batch["box"] = torch.tensor([it["box"] for it in items], dtype=torch.float32)
        batch["meta"] = [it["meta"] for it in items]
    batch["skipped_samples"], batch["skipped_shards"] = map(torch.tensor, skips.take())
    return batch


# --------------------------------------------------------------------------- datasets and loaders

def _stream() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainStream(IterableDataset):
    """Training batches of one rank for ``epochs`` epochs from ``epoch``: ``batches`` per epoch, over its workers."""

    def __init__(self, shards: list[Shard], data: DataConfig, cfg: ViewsConfig, rank: int, world_size: int,
                 epoch: int, epochs: int, batches: int, labelled: bool):
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
            samples = read_parts(stream_parts(self.shards, self.data.seed, epoch, stream, quotas), skips,
                                 self.data.retries)
            # Shuffling compressed samples keeps the buffer small: ~100 kB per video at 128p.
            ordered = epoch_order(samples, quotas[stream], self.data.shuffle_buffer, self.data.shuffle_initial,
                                  random.Random(int(rng.integers(2**63))))
            items = decoded(ordered, partial(_train_item, cfg=self.cfg, rng=rng, labelled=self.labelled), skips)
            for _ in range(counts[slot]):
                batch = _collate([next(items) for _ in range(B)], skips)
                if self.cfg.where == "worker":
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
        items = decoded(read_shards(iter(mine), skips, self.data.retries),
                        partial(_eval_item, cfg=self.cfg, num_clips=self.data.eval_clips), skips)
        batch = []
        for item in items:
            batch.append(item)
            if len(batch) == self.data.batch_size:
                yield _collate(batch, skips)
                batch = []
        if batch:
            yield _collate(batch, skips)


def train_loader(data: DataConfig, cfg: ViewsConfig, *, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 epochs: int = 1, labelled: bool = False) -> DataLoader:
    """The training batches of ``rank`` for epochs ``epoch`` to ``epoch + epochs - 1``, in order.

    ``batches_per_epoch`` per epoch; one loader serves a whole run (module docstring).
    ``labelled``: every sample must have a class label (supervised training on these shards).
    """
    _check_rank(rank, world_size)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    shards = listed_shards(data.train, "data.train")
    dataset = TrainStream(shards, data, cfg, rank, world_size, epoch, epochs,
                          batches_per_epoch(data, shards, world_size), labelled)
    return _loader(dataset, data)


def eval_loader(data: DataConfig, cfg: ViewsConfig, *, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Evaluation batches of ``rank``: ranks may get different counts, so gather results at the end."""
    _check_rank(rank, world_size)
    return _loader(EvalStream(listed_shards(data.eval, "data.eval"), data, cfg, rank, world_size), data)


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def _loader(dataset: IterableDataset, data: DataConfig) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=data.workers,
                      pin_memory=data.pin_memory and torch.cuda.is_available(),
                      prefetch_factor=data.prefetch if data.workers else None)


def to_device(batch: dict, device: torch.device | str, cfg: ViewsConfig) -> dict:
    """Copy a loader batch to ``device`` and finish it there: the model's dict (module docstring).

    With ``views.where: device`` the decoded uint8 frames cross the bus and the views are
    made on the device; evaluation clips are cropped and normalised there in any case.
    """
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "aug" in out:
        out = views.dclr_views(out, cfg)
    if "clips" in out:
        out = views.eval_clips(out, cfg)
    return out
