"""Stream batches of DCLR clips from WebDataset shards on local disk or S3: one loader per run.

    it = iter(train_loader(cfg.data, cfg.views, rank=rank, world_size=world, epoch=start, epochs=n))
    for epoch in range(start, start + n):                 # one loader, one set of workers, for the run
        for _ in range(batches):                          # batches_per_epoch(): equal on every rank
            batch = to_device(next(it), device, cfg.views)    # the model's dict (below)
            skipped += batch["skipped_samples"]           # sum over steps, all_reduce over ranks

Shards are tars of samples, each an .mp4 video and a .json record sharing a key. The model's dict:
    q, k, static_q, static_k, dynamic_q, dynamic_k: (B, 3, T, S, S) float32, normalised
    label: (B,) int64, -1 where the record has none; key: list of B str (the sample keys)
    skipped_samples, skipped_shards: () int64, damage since this stream's previous batch
Evaluation (``eval_loader``: every video once across ranks, in shard order): clips
(B, N, 3, T, S, S) float32, N uniformly spaced clips per video; label; key; meta (B dicts); the
skip counts; a stream whose last batch was followed by damage ends with a batch of no videos
({"key": [], "skipped_samples", "skipped_shards"}) so that no count is lost. The loader's own
batches (uint8 frames) and decoding: decode.py; epochs, order and distribution over ranks:
shards.py; damage: read.py; the loader across epochs: loader.py.
"""

# Private names the tests reach.
from dclr_dist.data.decode import _frames as _frames
from dclr_dist.data.decode import _record as _record
from dclr_dist.data.decode import clip_indices, decode_frames
from dclr_dist.data.errors import DamagedSample, DataError
from dclr_dist.data.loader import EvalStream, TrainStream, eval_loader, to_device, train_loader
from dclr_dist.data.read import _Skips as _Skips
from dclr_dist.data.read import decoded, read_parts, read_shards
from dclr_dist.data.shards import (
    DEFAULT_GOP,
    Part,
    Shard,
    batches_per_epoch,
    check_shards,
    epoch_order,
    index_url,
    listed_shards,
    resolve_shards,
    shard_order,
    stream_parts,
)
from dclr_dist.s3stream import ShardReplaced, gopen_s3

__all__ = [
    "DEFAULT_GOP",
    "DamagedSample",
    "DataError",
    "EvalStream",
    "Part",
    "Shard",
    "ShardReplaced",
    "TrainStream",
    "batches_per_epoch",
    "check_shards",
    "clip_indices",
    "decode_frames",
    "decoded",
    "epoch_order",
    "index_url",
    "eval_loader",
    "gopen_s3",
    "listed_shards",
    "read_parts",
    "read_shards",
    "resolve_shards",
    "shard_order",
    "stream_parts",
    "to_device",
    "train_loader",
]
