"""Stream batches of DCLR clips from WebDataset shards on local disk or S3.

Data flow, per stream (one DataLoader worker of one rank):
shard order -> tar members grouped into samples -> bounded shuffle (of the compressed
samples) -> decode two clips per video (PyAV, from memory) -> crops -> batch -> [views].

    loader = train_loader(cfg.data, cfg.views, rank=rank, world_size=world, epoch=epoch)
    for batch in loader:                                  # len(loader) batches, equal on every rank
        batch = to_device(batch, device, cfg.views)       # the model's dict (below)
        skipped += batch["skipped_samples"]               # sum over steps, all_reduce over ranks

Distribution. The shard list is permuted with a seed shared by all ranks and the epoch
(so the order changes every epoch, identically everywhere); concatenated permutations
form an endless sequence from which stream g of G (G = ranks x DataLoader workers) takes
every G-th shard. Within a cycle no two streams read the same shard and every shard is
read once; no stream ever runs dry, even with fewer shards than streams. An epoch is a
fixed number of batches per rank (``data.epoch_batches``, or ``data.epoch_samples`` /
(world size x batch size), or the index.json sample count likewise), shared out among the
rank's DataLoader workers, so every rank steps the same number of times and collectives
never wait at an epoch's end. This is WebDataset's "resampled shards + with_epoch" recipe,
with resampling without replacement instead of its independent per-worker draws (which read
some shards twice and others never within an epoch).

Damage. A sample whose mp4 does not decode, whose JSON is missing or broken, or whose tar
member is cut short is skipped with a warning naming it, and counted; so is a shard that
cannot be opened (after ``data.retries`` more attempts) or that breaks off. S3 streams that
break mid-shard are resumed at the byte where they broke (a ranged GET), so a flaky link
costs neither data nor duplicates. Each batch carries the stream's count since its
previous batch (``skipped_samples``, ``skipped_shards``); summing them over the batches of
all ranks gives the run's total. Training stops with an error only when nothing can be
read: every shard in a row failing, or a stream's first 50 samples all damaged.

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
    label:      (B,) int64                class index (for monitoring; DCLR is self-supervised)
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
import json
import logging
import os
import random
import re
import tarfile
import time
from collections import deque
from collections.abc import Iterator
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
    samples: int | None  # from index.json; None for a shard listed by URL
    gop: int  # keyframe interval it was packed with


# Shards are plain tar, as the packer writes them. Each tar member is read whole into memory,
# so a small compressed shard can expand to gigabytes (a review turned a 1.3 MB gzip shard
# into 600 MB), and mp4 does not compress further anyway.
_COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_REPACK = "repack the videos into uncompressed .tar shards with `python -m dclr_dist.shard`"


def resolve_shards(urls: list[str]) -> list[Shard]:
    """The shards behind ``data.train`` / ``data.eval`` entries (see DataConfig), in order."""
    shards = []
    for entry in urls:
        for url in braceexpand(entry):
            _check_url(url)
            if url.endswith(".tar"):
                shards.append(Shard(url, None, DEFAULT_GOP))
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
    if url.strip().lower().startswith("pipe:") and os.environ.get("DCLR_ALLOW_PIPE") != "1":
        raise DataError(f"{url}: pipe: URLs run shell commands and are refused; list .tar files, an index.json "
                        "or a packed folder (local or s3://), or set DCLR_ALLOW_PIPE=1 if you trust every URL")
    if url.lower().endswith(_COMPRESSED_TAR):
        raise DataError(f"{url}: compressed shards are not supported; {_REPACK}")


def _read_index(url: str) -> list[Shard]:
    try:
        index = json.loads(storage.read_bytes(url))
        gop = int(index.get("encoding", {}).get("gop", DEFAULT_GOP))
        base = url.rsplit("/", 1)[0] if storage.is_s3(url) else str(storage.local_path(url).parent)
        return [Shard(storage.join(base, s["name"]), int(s["samples"]), gop) for s in index["shards"]]
    except FileNotFoundError:
        raise DataError(f"{url}: not found. List shard .tar URLs, an index.json, or a folder packed by "
                        "`python -m dclr_dist.shard` (its index.json is written last: is the packing "
                        "finished?)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{url}: not an index.json written by `python -m dclr_dist.shard` ({e!r})") from None


def shard_order(num_shards: int, seed: int, epoch: int, stream: int, streams: int) -> Iterator[int]:
    """Endless shard indices for stream ``stream`` of ``streams`` (see the module docstring)."""
    position, cycle, perm = stream, -1, None
    while True:
        c, i = divmod(position, num_shards)
        if c != cycle:
            cycle, perm = c, np.random.default_rng([seed, epoch, c]).permutation(num_shards)
        yield int(perm[i])
        position += streams


def batches_per_epoch(data: DataConfig, shards: list[Shard], world_size: int) -> int:
    if data.epoch_batches is not None:
        return data.epoch_batches
    samples = data.epoch_samples
    if samples is None:
        if any(s.samples is None for s in shards):
            raise DataError("data.train lists shards without their index.json, so the epoch length is "
                            "unknown: set data.epoch_samples (or data.epoch_batches), or list the index.json")
        samples = sum(s.samples for s in shards)
    # Rounded down: every rank must step the same number of times; at least one step.
    return max(1, samples // (world_size * data.batch_size))


# --------------------------------------------------------------------------- s3:// for WebDataset

class _S3Reader(io.RawIOBase):
    """A streaming GET of one s3:// object that resumes where the connection broke.

    A body that breaks off mid-shard is reopened with a ranged GET from the current offset
    (storage.retry's back-off), so nothing is read twice and no sample is delivered twice.
    """

    def __init__(self, url: str, attempts: int):
        self.url, self.attempts = url, attempts
        self.bucket, self.key = storage.split_s3(url)
        self.pos = 0
        self.body = None
        storage.retry(self._open, f"open {url}", attempts)  # a missing shard fails here, by name

    def _open(self) -> None:
        extra = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        self.body = storage.s3_client().get_object(Bucket=self.bucket, Key=self.key, **extra)["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
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
        if self.body is not None:
            self.body.close()
            self.body = None
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
        self.good_samples = 0
        self.failed_in_a_row = 0
        self.num_shards = num_shards

    def shard(self, shard: Shard, lost: int, message: str) -> None:
        self.shards += 1
        self.samples += lost
        log.warning("%s: skipped: %s", shard.url, message)

    def sample(self, sample: dict, error: Exception) -> None:
        self.samples += 1
        log.warning("%s in %s: damaged sample skipped: %s", sample.get("__key__"), sample.get("__url__"), error)
        if self.good_samples == 0 and self.samples >= _MAX_DAMAGED_FIRST:
            raise DataError(f"the first {self.samples} samples read were all damaged (last: "
                            f"{sample.get('__key__')} in {sample.get('__url__')}: {error}). Are these "
                            "shards packed by `python -m dclr_dist.shard` (an .mp4 and a .json per sample)?")

    def take(self) -> tuple[int, int]:
        previous, self.reported = self.reported, (self.samples, self.shards)
        return self.samples - previous[0], self.shards - previous[1]


def read_shards(shards: Iterator[Shard], skips: _Skips, retries: int) -> Iterator[dict]:
    """Samples {"__key__", "__url__", "__gop__", "mp4", "json"} (bytes) of each shard, in tar order."""
    for shard in shards:
        got = 0
        try:
            stream = _open_shard(shard.url, retries)
        except OSError as e:  # StorageError is an OSError
            skips.shard(shard, shard.samples or 0, f"cannot be opened: {e}")
            _fail(skips, shard, e)
            continue
        try:
            for sample in _tar_samples(stream, shard):
                got += 1
                yield sample
        except (OSError, tarfile.TarError) as e:
            # The sample being read is lost, and with it the rest of the shard.
            lost = shard.samples - got if shard.samples is not None else 1
            skips.shard(shard, lost, f"broke off after {got} samples: {type(e).__name__}: {e}")
            if got:
                skips.failed_in_a_row = 0
            else:
                _fail(skips, shard, e)
            continue
        if shard.samples is not None and got < shard.samples:
            # tarfile ends quietly when a shard is cut at a member boundary; the index knows better.
            skips.shard(shard, shard.samples - got,
                        f"it ended after {got} of the {shard.samples} samples its index.json lists (truncated?)")
        skips.failed_in_a_row = 0


def _fail(skips: _Skips, shard: Shard, error: Exception) -> None:
    skips.failed_in_a_row += 1
    if skips.failed_in_a_row >= skips.num_shards:
        raise DataError(f"{skips.failed_in_a_row} shards in a row could not be read; the last, {shard.url}: "
                        f"{type(error).__name__}: {error}") from error


def _tar_samples(stream, shard: Shard) -> Iterator[dict]:
    current = None
    with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isreg():
                continue
            # WebDataset's convention: the key is the path up to the first dot of the file name.
            folder, _, name = member.name.rpartition("/")
            stem, dot, ext = name.partition(".")
            if not dot:
                continue
            key = f"{folder}/{stem}" if folder else stem
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": shard.url, "__gop__": shard.gop}
            current[ext.lower()] = tar.extractfile(member).read()
        if current is not None:
            yield current


# First bytes of a gzip, bzip2 or xz stream (bzip2's with its block magic: "BZh" alone could
# begin a tar member's name).
_COMPRESSED_MAGIC = {"gzip": re.compile(rb"\x1f\x8b"), "bzip2": re.compile(rb"BZh[1-9]1AY&SY"),
                     "xz": re.compile(rb"\xfd7zXZ\x00")}


def _refuse_compressed(stream, url: str) -> None:
    # A shard named .tar may still be compressed; tarfile's "r|*" would quietly decompress it.
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
            # few times, then let read_shards skip it.
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


def _record(sample: dict) -> dict:
    if "mp4" not in sample:
        raise DamagedSample(f"no .mp4 member (found: {', '.join(k for k in sample if not k.startswith('__'))})")
    if "json" not in sample:
        raise DamagedSample("no .json member")
    try:
        record = json.loads(sample["json"])
    except ValueError as e:
        raise DamagedSample(f"unreadable .json: {e}") from None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), int) for k in ("frames", "label")) \
            or record["frames"] < 1:
        raise DamagedSample("the .json record lacks integer 'frames' (>= 1) and 'label'")
    return record


def clip_indices(start: int, count: int, stride: int, frames: int) -> list[int]:
    """``count`` frame indices at ``stride`` from ``start``, looping past the video's end."""
    return [(start + t * stride) % frames for t in range(count)]


def _train_item(sample: dict, cfg: ViewsConfig, rng: np.random.Generator) -> dict:
    record = _record(sample)
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
    record = _record(sample)
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
    """Training batches of one rank for one epoch: exactly ``batches`` of them, over all its workers."""

    def __init__(self, shards: list[Shard], data: DataConfig, cfg: ViewsConfig, rank: int, world_size: int,
                 epoch: int, batches: int):
        self.shards, self.data, self.cfg = shards, data, cfg
        self.rank, self.world_size, self.epoch, self.batches = rank, world_size, epoch, batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _stream()
        stream, streams = self.rank * workers + worker, self.world_size * workers
        # Worker w of W yields every W-th batch (DataLoader's round robin): its share is fixed.
        count = self.batches // workers + (worker < self.batches % workers)
        rng = np.random.default_rng([self.data.seed, self.epoch, stream, streams])
        skips = _Skips(len(self.shards))
        pipeline = wds.DataPipeline(
            lambda: (self.shards[i] for i in shard_order(len(self.shards), self.data.seed, self.epoch,
                                                         stream, streams)),
            partial(read_shards, skips=skips, retries=self.data.retries),
            # Shuffling compressed samples keeps the buffer small: ~100 kB per video at 128p.
            wds.shuffle(self.data.shuffle_buffer, self.data.shuffle_initial,
                        rng=random.Random(int(rng.integers(2**63)))),
            partial(decoded, fn=partial(_train_item, cfg=self.cfg, rng=rng), skips=skips),
        )
        items = iter(pipeline)
        for _ in range(count):
            batch = _collate([next(items) for _ in range(self.data.batch_size)], skips)
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


def train_loader(data: DataConfig, cfg: ViewsConfig, *, rank: int = 0, world_size: int = 1,
                 epoch: int = 0) -> DataLoader:
    """The training batches of ``rank`` for ``epoch``: call once per epoch (the shard order changes)."""
    _check_rank(rank, world_size)
    if not data.train:
        raise DataError("data.train is empty: set it to the shards to train on (an index.json, a packed "
                        "folder or s3:// prefix, or .tar URLs)")
    shards = resolve_shards(data.train)
    dataset = TrainStream(shards, data, cfg, rank, world_size, epoch, batches_per_epoch(data, shards, world_size))
    return _loader(dataset, data)


def eval_loader(data: DataConfig, cfg: ViewsConfig, *, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Evaluation batches of ``rank``: ranks may get different counts, so gather results at the end."""
    _check_rank(rank, world_size)
    if not data.eval:
        raise DataError("data.eval is empty: set it to the shards to evaluate on")
    return _loader(EvalStream(resolve_shards(data.eval), data, cfg, rank, world_size), data)


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
