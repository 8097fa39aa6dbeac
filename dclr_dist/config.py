"""One typed configuration for every stage, loaded from YAML with ``key=value`` overrides.

Each stage of the data flow owns one section (a dataclass below). The whole tree is
validated before anything expensive starts, so an unknown key or a wrong type fails in
milliseconds with a message naming the key and the file, not an hour into a Ray job.

    cfg = load_config("dclr_dist/configs/demo.yaml", ["shard.crf=28", "shard.fps=15"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem, with the offending key and its source in the message."""


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
        _check(self.short_side >= 16 and self.short_side % 2 == 0, where, "shard.short_side",
               f"must be an even number >= 16, got {self.short_side}")
        _check(self.fps is None or self.fps > 0, where, "shard.fps", f"must be > 0 or null, got {self.fps}")
        _check(0 <= self.crf <= 51, where, "shard.crf", f"must be in [0, 51] (x264), got {self.crf}")
        _check(self.gop >= 1, where, "shard.gop", f"must be >= 1, got {self.gop}")
        _check(self.preset in _X264_PRESETS, where, "shard.preset",
               f"must be one of {', '.join(_X264_PRESETS)}, got {self.preset!r}")
        tunes = ("film", "animation", "grain", "stillimage", "psnr", "ssim", "fastdecode", "zerolatency")
        _check(self.tune is None or self.tune in tunes, where, "shard.tune",
               f"must be null or one of {', '.join(tunes)} (x264), got {self.tune!r}")
        _check(self.max_seconds is None or self.max_seconds > 0, where, "shard.max_seconds",
               f"must be > 0 or null, got {self.max_seconds}")
        _check(self.input_timeout is None or self.input_timeout > 0, where, "shard.input_timeout",
               f"must be > 0 or null, got {self.input_timeout}")
        _check(self.max_samples >= 1, where, "shard.max_samples", f"must be >= 1, got {self.max_samples}")
        _check(self.max_bytes >= 1024, where, "shard.max_bytes", f"must be >= 1024, got {self.max_bytes}")
        _check(bool(self.prefix) and all(c.isalnum() or c in "_-" for c in self.prefix), where,
               "shard.prefix", f"must be non-empty letters, digits, '_' or '-', got {self.prefix!r}")
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
    workers: int = 4
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
        for key in ("workers", "shuffle_initial", "retries", "seed"):
            value = getattr(self, key)
            _check(value >= 0, where, f"data.{key}", f"must be >= 0, got {value}")
        _check(self.shuffle_initial <= self.shuffle_buffer, where, "data.shuffle_initial",
               f"must be <= data.shuffle_buffer ({self.shuffle_buffer}), got {self.shuffle_initial}")
        for key in ("epoch_batches", "epoch_samples"):
            value = getattr(self, key)
            _check(value is None or value >= 1, where, f"data.{key}", f"must be >= 1 or null, got {value}")
        _check(self.epoch_batches is None or self.epoch_samples is None, where, "data.epoch_samples",
               "and data.epoch_batches are both set; set one of them")


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
    # The static view's crop and flip: "own" (released code: drawn apart from the clip's) or
    # "clip" (the clip's, so the static activation map is aligned with the RGB features it weights).
    static_crop: Literal["own", "clip"] = "own"
    # Per-channel normalisation (ImageNet statistics, as the released code).
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # Where crops, colour augmentation, normalisation and the static/dynamic views run:
    # "device" ships the decoded uint8 frames and makes the views on the accelerator after
    # the copy (CPU decoding is the scarce resource on GPU nodes); "worker" makes them in
    # the DataLoader workers.
    where: Literal["worker", "device"] = "device"

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
        _check(all(j >= 0 for j in self.jitter) and self.jitter[3] <= 0.5, where, "views.jitter",
               f"must be >= 0 (brightness, contrast, saturation, hue), hue <= 0.5, got {self.jitter!r}")
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
    m: float = 0.999
    # Decoupling threshold on the mean-normalised activation map; null: soft weights (released code).
    threshold: float | None = None
    # Batch norm statistics per view type (RGB, static, dynamic) within the encoder's one
    # backbone pass; false: joint statistics over all views, as the released code.
    per_view_bn: bool = True
    # Queue mode: groups of videos per worker with batch norm statistics of their own, cut
    # differently in the query and key encoders, so a query and its positive key never share
    # statistics (MoCo's shuffle-BN, dclr_dist.batchnorm). They share B / G**2 of the B / G
    # videos of a group (1 with G = sqrt(B)); 1 turns the guard off. Must divide data.batch_size.
    bn_groups: int = 2
    # Batch norm statistics over: "worker" (each worker's own batch; no collective), "node"
    # (the workers of one node) or "global" (every worker); one all-reduce per BN layer per
    # pass otherwise. Worth it when a worker's group is small (under ~8 videos).
    bn_sync: Literal["worker", "node", "global"] = "worker"

    def validate(self, where: str) -> None:
        _check(self.width >= 1, where, "model.width", f"must be >= 1, got {self.width}")
        _check(self.arch == "tiny" or self.width == 64, where, "model.width",
               f"must be 64 for {self.arch} (fixed torchvision width), got {self.width}")
        _check(self.dim >= 1, where, "model.dim", f"must be >= 1, got {self.dim}")
        _check(0.0 <= self.m < 1.0, where, "model.m", f"must be in [0, 1), got {self.m}")
        _check(self.threshold is None or self.threshold >= 0, where, "model.threshold",
               f"must be >= 0 or null, got {self.threshold}")
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
    # Optimizer steps (training forwards) before any cross-video positive is used: at first
    # the embeddings' nearest neighbours are noise.
    topk_warmup: int = 0
    # Weight of L_vv, RGB clip against RGB clip (paper: 1).
    w_vv: float = 1.0
    # Weight of L_v->s + L_s->v, static decoupling (paper: 1).
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
        _check(self.in_batch or self.queue_size > self.topk, where, "loss.queue_size",
               f"must exceed loss.topk ({self.topk}), got {self.queue_size}")
        for key in ("w_vv", "w_s", "w_d", "w_align"):
            _check(getattr(self, key) >= 0, where, f"loss.{key}", f"must be >= 0, got {getattr(self, key)}")


@dataclass
class TrainConfig:
    """The pretraining job (``dclr_dist.train``): Ray Train scaling, DeepSpeed, schedule, checkpoints."""

    # Ray Train run name under storage_path; re-submitting the same name resumes the run.
    name: str = "dclr"
    # Where checkpoints and metrics go: a local folder or s3://bucket/prefix (AWS_ENDPOINT_URL honoured).
    storage_path: str = "runs"
    # Ray Train workers (one DeepSpeed rank each) and what each reserves.
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    epochs: int = 200
    # Optimizer steps per epoch are data.epoch_samples / (batch per worker x workers x grad_accum).
    grad_accum: int = 1
    optimizer: Literal["sgd", "adamw"] = "sgd"
    # Paper recipe (UCF-101, batch 40): SGD momentum 0.9, lr 0.01, wd 1e-4. lr is per
    # ref_batch samples and scaled linearly with the global batch (Goyal et al. 2017).
    lr: float = 0.01
    ref_batch: int = 40
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    # "step": lr x 0.1 at each of milestones (epochs; paper: 120, 160 of 200); "cosine": to 0.
    schedule: Literal["step", "cosine"] = "step"
    milestones: list[int] = field(default_factory=lambda: [120, 160])
    grad_clip: float = 0.0
    # bf16 runs under autocast with fp32 master weights; fp32 on CPU CI.
    precision: Literal["fp32", "bf16"] = "fp32"
    # DeepSpeed ZeRO stage. 0: every rank holds the whole optimizer state; gradients are
    # all-reduced in fp32, bucket by bucket while backward runs; a run resumes at any
    # train.workers. 2: optimizer state and gradients sharded, reductions overlapped with
    # backward; for models far larger than R(2+1)D-18's 31M parameters, where sharding SGD's
    # momentum and the gradients saves at most ~250 MB per GPU. 1: optimizer state sharded,
    # kept to resume runs checkpointed with it (the old default). Stages 1-2 resume only at
    # the same train.workers (DeepSpeed does not re-partition their shards).
    zero_stage: int = 0
    # Speed switches for GPU runs (the GPU recipes set them; off on CPU, where they gain nothing).
    # cudnn_benchmark: cuDNN times its convolution algorithms once per input shape and keeps
    # the fastest; shapes are fixed here, so that happens in the first steps only.
    cudnn_benchmark: bool = False
    # channels_last: the backbones' inputs, and so every convolution and activation, in
    # torch.channels_last_3d (NDHWC), the layout of tensor-core convolutions.
    channels_last: bool = False
    # compile: torch.compile each backbone in place (state_dict keys unchanged); the first
    # steps and the first evaluation compile (minutes).
    compile: bool = False
    # Checkpoint every N epochs (0: not by epochs), and at the first epoch end checkpoint_minutes
    # after the previous checkpoint (null: not by time), whichever comes first; the last epoch
    # always. Ray keeps the newest keep_checkpoints, the best backbone is kept apart.
    checkpoint_every: int = 1
    checkpoint_minutes: float | None = None
    keep_checkpoints: int = 2
    # Worker/node failures survived by restarting from the latest checkpoint (-1: unlimited).
    max_failures: int = 3
    log_every: int = 10
    seed: int = 0

    def validate(self, where: str) -> None:
        _check(bool(self.name) and "/" not in self.name, where, "train.name", f"must be a non-empty name without '/', got {self.name!r}")
        _check(self.workers >= 1, where, "train.workers", f"must be >= 1, got {self.workers}")
        _check(self.gpus_per_worker >= 0, where, "train.gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        _check(self.cpus_per_worker > 0, where, "train.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        _check(self.epochs >= 1, where, "train.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.grad_accum >= 1, where, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.lr > 0, where, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.ref_batch >= 1, where, "train.ref_batch", f"must be >= 1, got {self.ref_batch}")
        _check(self.warmup_epochs >= 0, where, "train.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _check(all(0 < m for m in self.milestones), where, "train.milestones", f"must be positive epochs, got {self.milestones}")
        _check(self.grad_clip >= 0, where, "train.grad_clip", f"must be >= 0 (0: off), got {self.grad_clip}")
        _check(self.zero_stage in (0, 1, 2), where, "train.zero_stage",
               f"must be 0, 1 or 2 (ZeRO-3 shards parameters, which the momentum encoder needs whole), got {self.zero_stage}")
        _check(self.checkpoint_every >= 0, where, "train.checkpoint_every",
               f"must be >= 0 (0: not by epochs), got {self.checkpoint_every}")
        _check(self.checkpoint_minutes is None or self.checkpoint_minutes > 0, where, "train.checkpoint_minutes",
               f"must be > 0 or null, got {self.checkpoint_minutes}")
        _check(self.keep_checkpoints >= 1, where, "train.keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        _check(self.max_failures >= -1, where, "train.max_failures", f"must be >= -1, got {self.max_failures}")
        _check(self.log_every >= 1, where, "train.log_every", f"must be >= 1, got {self.log_every}")
        _check(self.seed >= 0, where, "train.seed", f"must be >= 0, got {self.seed}")


@dataclass
class EvalConfig:
    """Downstream protocols (``dclr_dist.eval``) and the k-NN monitor during pretraining."""

    # k-NN accuracy of the query backbone on data.eval every N epochs, reported as knn_acc;
    # best/ then keeps the epoch with the highest (contrastive losses are not comparable
    # across temperatures). 0: off, best/ keeps the lowest loss.
    every: int = 0
    # k-NN classifier: votes of the k nearest neighbours weighted by exp(cos / t) (Wu et al. 2018).
    k: int = 20
    t: float = 0.07
    # Retrieval recall@K, test queries against the train gallery (paper: 1, 5, 10, 20, 50).
    recall_at: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 50])
    # Linear probe: L2 penalty of the logistic regression on frozen, standardised features;
    # null: chosen by 3-fold cross-validation on the train split (6 values, 18 extra fits:
    # set a value for very large splits).
    l2: float | None = None
    # Fine-tuning the whole backbone and a linear classifier (paper: lr 0.1, 10 epochs); lr is
    # per train.ref_batch samples and scaled linearly like pretraining's.
    finetune_epochs: int = 10
    finetune_lr: float = 0.1
    # Feature extraction of `python -m dclr_dist.eval`: 0 runs it in the driver process (on its
    # GPU if it has one), which suits small splits; N > 0 runs it in N Ray tasks on the cluster,
    # each reading every N-th part of the shards with data.workers loader processes and
    # reserving what follows (gpus_per_worker > 0: on a GPU).
    workers: int = 0
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    # k-NN and retrieval compare this many queries at a time with the whole gallery (top-k,
    # no full sort): memory about chunk x gallery x 5 bytes (512 x 240k Kinetics-400 train
    # videos: 0.6 GB), where sorting all test x train similarities would take 57 GB.
    chunk: int = 512

    def validate(self, where: str) -> None:
        _check(self.every >= 0, where, "eval.every", f"must be >= 0 (0: off), got {self.every}")
        _check(self.k >= 1, where, "eval.k", f"must be >= 1, got {self.k}")
        _check(self.t > 0, where, "eval.t", f"must be > 0, got {self.t}")
        _check(bool(self.recall_at) and all(r >= 1 for r in self.recall_at), where, "eval.recall_at",
               f"must be a non-empty list of ranks >= 1, got {self.recall_at!r}")
        _check(self.l2 is None or self.l2 >= 0, where, "eval.l2", f"must be >= 0 or null, got {self.l2}")
        _check(self.finetune_epochs >= 1, where, "eval.finetune_epochs", f"must be >= 1, got {self.finetune_epochs}")
        _check(self.finetune_lr > 0, where, "eval.finetune_lr", f"must be > 0, got {self.finetune_lr}")
        _check(self.workers >= 0, where, "eval.workers", f"must be >= 0 (0: in this process), got {self.workers}")
        _check(self.gpus_per_worker >= 0, where, "eval.gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        _check(self.cpus_per_worker > 0, where, "eval.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        _check(self.chunk >= 1, where, "eval.chunk", f"must be >= 1, got {self.chunk}")


_X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow",
                 "slower", "veryslow")


@dataclass
class Config:
    shard: ShardConfig = field(default_factory=ShardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, where: str = "<config>") -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(where)
        _check(self.loss.in_batch or self.data.batch_size % self.model.bn_groups == 0, where, "model.bn_groups",
               f"must divide data.batch_size ({self.data.batch_size}), got {self.model.bn_groups}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, where: str, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {key} {message}")


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(key, line, first)
        self.key, self.line, self.first = key, line, first


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a key given twice in one mapping is an error.

    PyYAML lets the later one win silently: a second ``train:`` section would drop the first.
    Checked as each mapping is composed, before merge keys (``<<: *base``, YAML's own way to
    override a key) are flattened into it.
    """

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in first:
                raise _DuplicateKey(key, line, first[key])
            first[key] = line
        return node


# The recipes shipped with the package (dclr_dist/configs/*.yaml), found by name from any directory.
RECIPES = Path(__file__).with_name("configs")


def recipe_path(path: str | Path) -> Path:
    """``path``, or the shipped recipe it names (``demo``, ``k400_r2plus1d``, ``downstream/r2plus1d_18``)
    when no such file exists here."""
    path = Path(path)
    shipped = RECIPES / f"{path}.yaml"
    return shipped if not path.exists() and path.suffix == "" and shipped.is_file() else path


def read_yaml(path: str | Path, error_type: type[Exception] = ConfigError, what: str = "config file", *,
              not_found_hint: typing.Callable[[], str] | None = None) -> Any:
    """The YAML document in the UTF-8 file ``path``, with a key given twice in one mapping refused.

    Every way the file can fail to read (not found, a folder, unreadable, not UTF-8, a
    duplicate key, not valid YAML) raises ``error_type`` with a message that names the file,
    and ``what`` it should be; ``not_found_hint()`` is appended when the file does not exist.
    """
    where = str(path)
    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_StrictLoader)
    except FileNotFoundError:
        raise error_type(f"{where}: {what} not found{not_found_hint() if not_found_hint else ''}") from None
    except IsADirectoryError:
        raise error_type(f"{where}: is a folder; give the path of a YAML {what}") from None
    except OSError as e:
        raise error_type(f"{where}: cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise error_type(f"{where}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except _DuplicateKey as e:
        raise error_type(f"{where}: line {e.line}: duplicate key '{e.key}' (first at line {e.first}); "
                         "keep one, the later would silently win") from None
    except yaml.YAMLError as e:
        raise error_type(f"{where}: not valid YAML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated :class:`Config` from an optional YAML file (or shipped recipe name) and
    ``key=value`` overrides.

    Overrides use dotted keys (``shard.crf=28``) and YAML values (``shard.fps=null``).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = recipe_path(path)
        where = str(path)
        loaded = read_yaml(path, ConfigError, "config file", not_found_hint=lambda: " (shipped recipes: " + ", ".join(
            sorted(str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.rglob("*.yaml"))) + ")")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}: top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    cfg = _build(Config, tree, prefix="", where=str(path) if path is not None else "<defaults>")
    for item in overrides:
        _apply_override(cfg, item)
    cfg.validate(str(path) if path is not None else "<command line>")
    return cfg


def config_from_dict(tree: dict[str, Any], where: str = "<dict>", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Rebuild a config saved with :meth:`Config.to_dict` (e.g. from a checkpoint), with
    ``key=value`` overrides applied, validating it."""
    cfg = _build(Config, tree, prefix="", where=where)
    for item in overrides:
        _apply_override(cfg, item)
    cfg.validate(where)
    return cfg


def _build(cls: type, data: Any, prefix: str, where: str) -> Any:
    label = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {label} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{_suggest(key, fields)}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}", where)
    return cls(**kwargs)


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(known))})"


def _coerce(tp: Any, value: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.", where=where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{where}: {key} must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-3" as a string; accept what Python reads as a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config type {tp!r} of {key} is not supported")
    raise ConfigError(f"{where}: {key} must be {tp.__name__}, got {type(value).__name__} {value!r}")


def _apply_override(cfg: Config, item: str) -> None:
    where = "command line"
    if "=" not in item:
        raise ConfigError(f"{where}: override {item!r} must look like section.key=value")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    node: Any = cfg
    for depth, name in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"{where}: {'.'.join(parts[:depth])} is not a section, cannot set {dotted}")
        known = {f.name for f in dataclasses.fields(node)}
        if name not in known:
            prefix = ".".join(parts[:depth])
            raise ConfigError(f"{where}: unknown key '{dotted}'{_suggest(name, known)}"
                              + (f" in section '{prefix}'" if prefix else ""))
        if depth == len(parts) - 1:
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
            hint = typing.get_type_hints(type(node))[name]
            if hint is str and not isinstance(value, str):
                value = raw  # "prefix=001" stays the string the user typed
            setattr(node, name, _coerce(hint, value, dotted, where))
        else:
            node = getattr(node, name)
