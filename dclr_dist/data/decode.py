"""Samples -> clips: decoding the videos, and collating the items into the loader's batches.

Decoding (docs/design.md, section 9: the likely bottleneck). Each video is decoded once, from
the bytes in memory, with one decoder thread per DataLoader worker, seeking to the
keyframe before each clip and decoding only up to its last frame; two clips close together
are decoded in one pass. Only the frames used are converted to RGB, and that is all the
worker does to them: crops, resizing and augmentation run after the copy to the device
(``views.augment_on: device``), where they cost next to nothing.

Short videos. A video with fewer frames than a clip spans (T x stride + 1 with the
dynamic view's extra frame) loops: frame indices are taken modulo its length from a
random start. That keeps the stride, i.e. the speed of motion, at the cost of one jump
where the clip wraps; slowing the clip down instead would teach a different motion.

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

Training batch from the loader (``views.augment_on: device``), H x W the decoded frame size
(the largest in the batch; smaller frames are edge-padded):
    q, k:       (B, 3, T+1, H, W) uint8   frames v_{-1}..v_{T-1} of the two clips, channels-last
                                          in memory as decoded; 2 x 17 x 128 x 170 x 3 bytes
                                          = 2.2 MB per video, against 14.4 MB for the six
                                          float32 views made from them on the device
    aug:        (B, 4, views.NUM_PARAMS) float32   drawn crop boxes, static frames, colour,
                                          blur and flip parameters (rows views.ROWS)
    label:      (B,) int64                class index, -1 where the record has none (DCLR is self-supervised)
    key:        list of B str             sample keys
    video:      (B,) int64                ``video_id`` of each key, for the loss's own-video mask
    skipped_samples, skipped_shards: () int64   damage since this stream's previous batch
After ``to_device`` (or from the loader itself with ``views.augment_on: worker``):
    q, k, static_q, static_k, dynamic_q, dynamic_k: (B, 3, T, S, S) float32, normalised,
    plus label, key and the skip counts.

Evaluation batch (``eval_loader``; every video once across ranks, in shard order):
    clips: (B, N, 3, T, H, W) uint8, N uniformly spaced clips per video, and box (B, 4),
    their centre crop; after ``to_device``: clips (B, N, 3, T, S, S) float32, normalised.
    label (B,) int64; key; meta: list of B dicts, each record's meta (the manifest's extra
    columns, e.g. {"scene": "scene003"} in the synthetic corpus; {} where none); the skip counts.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import deque

import av
import numpy as np
import torch

from dclr_dist import views
from dclr_dist.config import ViewsConfig
from dclr_dist.data.errors import DamagedSample, DataError
from dclr_dist.data.read import _Skips


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
    if not (frames is None or isinstance(frames, int) and not isinstance(frames, bool) and frames >= 1):
        raise DamagedSample("the .json record's 'frames' is not an integer >= 1")
    if not isinstance(label, int) or isinstance(label, bool):
        # Other tools' records (video2dataset) may hold a caption or class name as 'label':
        # pretraining needs no label; evaluation needs a class index.
        if labelled:
            what = "no class label" if label is None else f"a label that is not a class index ({label!r:.40})"
            raise DataError(
                f"{sample['__key__']} in {sample['__url__']}: its record has {what}, and evaluation needs "
                "one (shards of another tool, e.g. video2dataset?): pack the labelled videos with "
                "`python -m dclr_dist.shard` (class folders or a manifest with a label column)"
            )
        label = None
    return {**record, "frames": frames or _frame_count(sample["mp4"]), "label": -1 if label is None else label}


def _frame_count(mp4: bytes) -> int:
    """The frame count the container records (its index, or duration x frame rate)."""
    try:
        with av.open(io.BytesIO(mp4), metadata_errors="ignore") as container:
            if not container.streams.video:
                raise DamagedSample("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = stream.frames or (
                round(stream.duration * stream.time_base * rate) if stream.duration and stream.time_base and rate else 0
            )
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
    return {
        "label": record["label"],
        "key": sample["__key__"],
        "q": [frames[i] for i in clips[0]],
        "k": [frames[i] for i in clips[1]],
        "aug": views.draw(rng, cfg, height, width),
    }  # (4, NUM_PARAMS)


def _eval_item(sample: dict, cfg: ViewsConfig, num_clips: int) -> dict:
    record = _record(sample, labelled=True)
    n, T, stride = record["frames"], cfg.frames, cfg.stride
    span = (T - 1) * stride + 1
    starts = np.linspace(0, max(n - span, 0), num_clips).round().astype(int)
    clips = [clip_indices(int(s), T, stride, n) for s in starts]
    frames = decode_frames(sample["mp4"], sorted({i for c in clips for i in c}), sample["__gop__"])
    return {
        "label": record["label"],
        "key": sample["__key__"],
        "clips": [[frames[i] for i in c] for c in clips],
        "box": views.center_box(*frames[clips[0][0]].shape[:2]),
        "meta": record.get("meta", {}),
    }


def video_id(key: str) -> int:
    """A non-negative int64 id of a sample key, the same in every process (unlike hash()): the
    loss keeps a query's own video out of its negatives by it (``dclr_dist.loss``)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


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
            out[b, :, h:, :w] = out[b, :, h - 1 : h, :w]
        if w < width:
            out[b, :, :, w:] = out[b, :, :, w - 1 : w]
    return torch.from_numpy(out)


def _collate(items: list[dict], skips: _Skips) -> dict:
    batch = {
        "key": [it["key"] for it in items],
        "video": torch.tensor([video_id(it["key"]) for it in items]),
        "label": torch.tensor([it["label"] for it in items]),
    }
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
