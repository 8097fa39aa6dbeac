"""The sections of the method and its data: packing, reading, views, model, loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dclr_dist.config.errors import _check

# Upper bounds of durations, in seconds: larger values overflow the timers they reach.
DAY, WEEK = 86400, 7 * 86400


@dataclass
class ShardConfig:
    """How videos are re-encoded and grouped into WebDataset shards (``dclr_dist.shard``)."""

    # 128 leaves room for DCLR's random resized crops to 112x112 at scale 0.2-1.
    short_side: int = 128
    # Output frame rate; null keeps the source rate (UCF-101 and Kinetics are 25-30 fps).
    fps: float | None = None
    # x264 constant rate factor: 23 is visually lossless at 128p and ~10x smaller than raw.
    crf: int = 23
    # Keyframe interval in frames. A 32-frame clip (16 frames at stride 2) then decodes at
    # most gop-1 frames it does not need; larger saves bytes, smaller saves decode time.
    gop: int = 16
    preset: str = "veryfast"
    # x264 tune, or null for none. fastdecode (no CABAC, no deblocking) makes every training
    # read cheaper for a few % more bytes: decoding, not the GPU, bounds a fast node.
    tune: str | None = None
    # Longer sources are cut: a training clip needs seconds, not a 2-hour film in memory.
    max_seconds: float | None = 600.0
    # Seconds one input may take in its transcoding process before that process is killed
    # and the input rejected: a read that never returns (hung network mount) must not stall
    # the run. Generous, since a 10-minute 4K source takes minutes on one core; null: no limit.
    input_timeout: float | None = 1800.0
    max_samples: int = 1000
    max_bytes: int = 512 * 1024 * 1024
    prefix: str = "shard"
    # Write inputs in a random order drawn from seed (deterministic, so resume still works);
    # false keeps the listing's order (class folders and manifests are usually class-sorted).
    shuffle: bool = True
    seed: int = 0

    def validate(self, where: str) -> None:
        _check(
            16 <= self.short_side <= 2160 and self.short_side % 2 == 0,
            where,
            "shard.short_side",
            f"must be an even number from 16 to 2160 (4K's short side), got {self.short_side}",
        )
        _check(
            self.fps is None or 1 <= self.fps <= 240,
            where,
            "shard.fps",
            f"must be from 1 to 240 frames per second, or null (the source's), got {self.fps}",
        )
        _check(0 <= self.crf <= 51, where, "shard.crf", f"must be in [0, 51] (x264), got {self.crf}")
        _check(self.gop >= 1, where, "shard.gop", f"must be >= 1, got {self.gop}")
        _check(
            self.preset in _X264_PRESETS,
            where,
            "shard.preset",
            f"must be one of {', '.join(_X264_PRESETS)}, got {self.preset!r}",
        )
        tunes = ("film", "animation", "grain", "stillimage", "psnr", "ssim", "fastdecode", "zerolatency")
        _check(
            self.tune is None or self.tune in tunes,
            where,
            "shard.tune",
            f"must be null or one of {', '.join(tunes)} (x264), got {self.tune!r}",
        )
        _check(
            self.max_seconds is None or 0 < self.max_seconds <= DAY,
            where,
            "shard.max_seconds",
            f"must be > 0 and at most {DAY} (a day of video), or null, got {self.max_seconds}",
        )
        _check(
            self.input_timeout is None or 0 < self.input_timeout <= WEEK,
            where,
            "shard.input_timeout",
            f"must be > 0 and at most {WEEK} seconds (a week), or null for no limit, got {self.input_timeout}",
        )
        _check(self.max_samples >= 1, where, "shard.max_samples", f"must be >= 1, got {self.max_samples}")
        _check(self.max_bytes >= 1024, where, "shard.max_bytes", f"must be >= 1024, got {self.max_bytes}")
        _check(
            bool(self.prefix) and all(c.isalnum() or c in "_-" for c in self.prefix),
            where,
            "shard.prefix",
            f"must be non-empty letters, digits, '_' or '-', got {self.prefix!r}",
        )
        # numpy's default_rng refuses negative seeds: fail here, not in the packer's first step.
        _check(self.seed >= 0, where, "shard.seed", f"must be >= 0, got {self.seed}")


@dataclass
class DataConfig:
    """Reading shards into batches of clips (``dclr_dist.data``)."""

    # Shards to read, each entry one of: a shard (.tar), an index.json, a packed folder or
    # prefix (its index.json is read), or a brace pattern (shard-{000000..000099}.tar);
    # local or s3://. Sample counts come from the index.json (also one beside shards listed
    # by URL); shards no index lists (other tools') are read whole, with unknown counts.
    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    # Videos per batch on each rank (the global batch is world_size times this).
    batch_size: int = 8
    # DataLoader worker processes per rank; decoding is the bottleneck (docs/design.md, section 9).
    loader_workers: int = 4
    # Batches each DataLoader worker prepares ahead.
    prefetch: int = 2
    # Samples held for shuffling by each DataLoader worker, as compressed mp4 bytes, so memory
    # is about shuffle_buffer x the mean video size per worker; shuffle_initial are buffered
    # before an epoch's first sample leaves (a faster start, a less random first batch): the
    # buffer drains at each epoch's end, so no video is read twice or dropped in an epoch.
    shuffle_buffer: int = 256
    shuffle_initial: int = 64
    # Epoch length, the same on every rank so collectives never wait on a rank that ran out:
    # epoch_batches per rank, or epoch_samples for all ranks together (whatever the world
    # size); neither: the sample count of the train index.json files.
    epoch_batches: int | None = None
    epoch_samples: int | None = None
    # Shard order, sample shuffle and view randomness; shared by all ranks.
    seed: int = 0
    # Page-locked batches for asynchronous host-to-GPU copies; ignored without CUDA.
    pin_memory: bool = True
    # Extra attempts to open a shard or to resume an S3 stream that broke off, before the
    # shard is skipped with a warning.
    retries: int = 3
    # Uniformly spaced clips per video at evaluation (paper: 10).
    eval_clips: int = 10

    def validate(self, where: str) -> None:
        for key in ("train", "eval"):
            urls = getattr(self, key)
            _check(all(u.strip() for u in urls), where, f"data.{key}", f"must not hold empty URLs, got {urls!r}")
        for key in ("batch_size", "prefetch", "shuffle_buffer", "eval_clips"):
            value = getattr(self, key)
            _check(value >= 1, where, f"data.{key}", f"must be >= 1, got {value}")
        # seed: numpy's default_rng refuses negative seeds, in the DataLoader workers, mid-run.
        for key in ("loader_workers", "shuffle_initial", "retries", "seed"):
            value = getattr(self, key)
            _check(value >= 0, where, f"data.{key}", f"must be >= 0, got {value}")
        _check(
            self.shuffle_initial <= self.shuffle_buffer,
            where,
            "data.shuffle_initial",
            f"must be <= data.shuffle_buffer ({self.shuffle_buffer}), got {self.shuffle_initial}",
        )
        for key in ("epoch_batches", "epoch_samples"):
            value = getattr(self, key)
            _check(value is None or value >= 1, where, f"data.{key}", f"must be >= 1 or null, got {value}")
        _check(
            self.epoch_batches is None or self.epoch_samples is None,
            where,
            "data.epoch_samples",
            "and data.epoch_batches are both set; set one of them",
        )


@dataclass
class ViewsConfig:
    """Clips and the DCLR views made from them (``dclr_dist.views``); defaults: the paper's recipe."""

    # T frames per clip at temporal stride s (paper: 16 at stride 2).
    frames: int = 16
    stride: int = 2
    # Side of the square crops (paper: 112).
    size: int = 112
    # Random resized crop: area fraction and aspect-ratio range (paper: scale 0.2-1).
    scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    # Colour jitter strengths (brightness, contrast, saturation, hue), applied with jitter_p.
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])
    jitter_p: float = 0.8
    gray_p: float = 0.2
    # Gaussian blur with sigma drawn from blur_sigma, applied with blur_p.
    blur_p: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    flip_p: float = 0.5
    # The static view's crop and flip: "clip" (the clip's, so the static activation map A_s is
    # aligned with the RGB features it weights) or "own" (the released code: drawn apart from
    # the clip's, so A_s weights pixels of another crop).
    static_crop: Literal["own", "clip"] = "clip"
    # Per-channel normalisation (ImageNet statistics, as the released code).
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # Where crops, colour augmentation, normalisation and the static/dynamic views run:
    # "device" ships the decoded uint8 frames and makes the views on the accelerator after
    # the copy (CPU decoding is the scarce resource on GPU nodes); "worker" makes them in
    # the DataLoader workers.
    augment_on: Literal["worker", "device"] = "device"

    def validate(self, where: str) -> None:
        for key in ("frames", "stride"):
            value = getattr(self, key)
            _check(value >= 1, where, f"views.{key}", f"must be >= 1, got {value}")
        _check(self.size >= 8, where, "views.size", f"must be >= 8, got {self.size}")
        for key, n in (("scale", 2), ("ratio", 2), ("blur_sigma", 2), ("jitter", 4), ("mean", 3), ("std", 3)):
            value = getattr(self, key)
            _check(len(value) == n, where, f"views.{key}", f"must hold {n} numbers, got {value!r}")
        lo, hi = self.scale
        _check(0 < lo <= hi <= 1, where, "views.scale", f"must be [lo, hi] with 0 < lo <= hi <= 1, got {self.scale!r}")
        lo, hi = self.ratio
        _check(0 < lo <= hi, where, "views.ratio", f"must be [lo, hi] with 0 < lo <= hi, got {self.ratio!r}")
        lo, hi = self.blur_sigma
        _check(0 < lo <= hi, where, "views.blur_sigma", f"must be [lo, hi] with 0 < lo <= hi, got {self.blur_sigma!r}")
        _check(
            all(j >= 0 for j in self.jitter) and self.jitter[3] <= 0.5,
            where,
            "views.jitter",
            f"must be >= 0 (brightness, contrast, saturation, hue), hue <= 0.5, got {self.jitter!r}",
        )
        for key in ("jitter_p", "gray_p", "blur_p", "flip_p"):
            value = getattr(self, key)
            _check(0 <= value <= 1, where, f"views.{key}", f"must be a probability in [0, 1], got {value}")
        _check(all(s > 0 for s in self.std), where, "views.std", f"must be > 0, got {self.std!r}")


@dataclass
class ModelConfig:
    """The DCLR network (``dclr_dist.model.DCLR``)."""

    # Backbone: torchvision video nets (paper: r2plus1d_18), s3d, or a small 3D CNN for CPU and the demo.
    arch: Literal["tiny", "r2plus1d_18", "r3d_18", "mc3_18", "s3d"] = "r2plus1d_18"
    # Base channel width; only "tiny" has a choice, the torchvision networks exist at 64.
    width: int = 64
    # Embedding dimension of the five projection heads (paper: 128).
    dim: int = 128
    # Momentum of the key encoder (paper: 0.999).
    momentum: float = 0.999
    # Decoupling threshold on the mean-normalised activation map; null: soft weights (released code).
    threshold: float | None = None
    # Batch norm statistics per view type (RGB, static, dynamic) within the encoder's one
    # backbone pass; false: joint statistics over all views, as the released code.
    per_view_bn: bool = True
    # Queue mode: G groups of videos per worker with batch norm statistics of their own, cut
    # differently in the query and key encoders (dclr_dist.batchnorm), so a query's group and
    # its positive key's share B / G**2 of their B / G videos (1/G of each group; with
    # G >= sqrt(B), no video but the query's own). 1 turns the guard off. Must divide
    # data.batch_size. With bn_sync the share stays 1/G: it does not fall with workers.
    bn_groups: int = 2
    # Batch norm statistics over: "worker" (each worker's own batch; no collective), "node"
    # (the workers of one node) or "global" (every worker); one all-reduce per BN layer per
    # pass otherwise. Use it when a worker's group is small (under ~8 videos): the GPU recipes
    # take G = sqrt(batch) groups synced per node.
    bn_sync: Literal["worker", "node", "global"] = "worker"

    def validate(self, where: str) -> None:
        _check(self.width >= 1, where, "model.width", f"must be >= 1, got {self.width}")
        _check(
            self.arch == "tiny" or self.width == 64,
            where,
            "model.width",
            f"must be 64 for {self.arch} (fixed torchvision width), got {self.width}",
        )
        _check(self.dim >= 1, where, "model.dim", f"must be >= 1, got {self.dim}")
        _check(0.0 <= self.momentum < 1.0, where, "model.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(
            self.threshold is None or self.threshold >= 0,
            where,
            "model.threshold",
            f"must be >= 0 or null, got {self.threshold}",
        )
        _check(self.bn_groups >= 1, where, "model.bn_groups", f"must be >= 1, got {self.bn_groups}")


# The baseline as config overrides: plain clip contrast (L_vv with the two clips of one
# video as the only positive pair), DCLR's code path with its other terms switched off.
BASELINE = ("loss.w_s=0", "loss.w_d=0", "loss.w_align=0", "loss.topk=0")


@dataclass
class LossConfig:
    """The DCLR objective and its negatives (``dclr_dist.loss.DCLRLoss``).

    Baseline (plain clip contrast, the formulation the paper argues against):
    w_s = w_d = w_align = 0 and topk = 0.
    """

    # Keys per queue (paper: 16384 for Kinetics-400, 2048 for UCF-101); unused when in_batch.
    queue_size: int = 16384
    # InfoNCE temperature (paper: 0.07).
    tau: float = 0.07
    # Cross-video positives per query, nearest by static/dynamic similarity (paper: 5).
    topk: int = 5
    # L_vv's cross-video positives: "static+dynamic" (released code: neighbours by both
    # similarities), "dynamic" (by motion only) or "none" (the other clip only). Static
    # neighbours are same-scene videos where scene and action are independent (README).
    vv_positives: Literal["static+dynamic", "dynamic", "none"] = "static+dynamic"
    # Optimizer steps before L_vv takes cross-video positives (the decoupling terms take
    # theirs from the start): at first the embeddings' nearest neighbours are noise.
    topk_warmup: int = 0
    # Weight of L_vv, RGB clip against RGB clip (paper: 1).
    w_vv: float = 1.0
    # Weight of L_v->s + L_s->v, static decoupling (paper: 1). These terms tie a clip to its
    # own frame, the scene where scene and action are independent: the recipe chosen on the
    # motion family's validation scenes sets 0 (them off), with vv_positives "dynamic", topk 10 (README).
    w_s: float = 1.0
    # Weight of L_v->d + L_d->v, dynamic decoupling (paper: 1).
    w_d: float = 1.0
    # Weight of L_align, A_v against (A_s + A_d) / 2 (released code: 0.1).
    w_align: float = 0.1
    # Negatives: false = MoCo queues of every worker's keys (paper); true = the global batch,
    # gathered with gradient.
    in_batch: bool = False

    def validate(self, where: str) -> None:
        _check(self.tau > 0, where, "loss.tau", f"must be > 0, got {self.tau}")
        _check(self.topk >= 0, where, "loss.topk", f"must be >= 0, got {self.topk}")
        _check(self.topk_warmup >= 0, where, "loss.topk_warmup", f"must be >= 0, got {self.topk_warmup}")
        _check(
            self.in_batch or self.queue_size > self.topk,
            where,
            "loss.queue_size",
            f"must exceed loss.topk ({self.topk}), got {self.queue_size}",
        )
        for key in ("w_vv", "w_s", "w_d", "w_align"):
            _check(getattr(self, key) >= 0, where, f"loss.{key}", f"must be >= 0, got {getattr(self, key)}")


_X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
