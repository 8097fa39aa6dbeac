"""The sections of running it: the pretraining run, optimizer, engine, cluster, checkpoints,
evaluation and fine-tuning; and the whole tree."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from dclr_dist.config.errors import _check
from dclr_dist.config.method import WEEK, DataConfig, LossConfig, ModelConfig, ShardConfig, ViewsConfig


@dataclass
class TrainConfig:
    """The pretraining run (``dclr_dist.train``): its name, where it lives, how long it runs."""

    # Ray Train run name under storage_path; re-submitting the same name resumes the run.
    name: str = "dclr"
    # Where checkpoints and metrics go: a local folder or s3://bucket/prefix (AWS_ENDPOINT_URL honoured).
    storage_path: str = "runs"
    epochs: int = 200
    # Optimizer steps per epoch are data.epoch_samples / (batch per worker x workers x grad_accum).
    grad_accum: int = 1
    log_every: int = 10
    seed: int = 0

    def validate(self, where: str) -> None:
        _check(
            re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,127}", self.name) is not None,
            where,
            "train.name",
            "must be a folder name of letters, digits and . _ = - (not starting with . _ = -), "
            f"at most 128 characters, got {self.name!r}",
        )
        _check(
            bool(self.storage_path.strip()),
            where,
            "train.storage_path",
            "must be a folder or s3://bucket/prefix, got an empty value",
        )
        _check(self.epochs >= 1, where, "train.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.grad_accum >= 1, where, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.log_every >= 1, where, "train.log_every", f"must be >= 1, got {self.log_every}")
        _check(self.seed >= 0, where, "train.seed", f"must be >= 0, got {self.seed}")


@dataclass
class OptimConfig:
    """Pretraining's optimizer and lr schedule (``dclr_dist.engine``)."""

    name: Literal["sgd", "adamw"] = "sgd"
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

    def validate(self, where: str) -> None:
        _check(self.lr > 0, where, "optim.lr", f"must be > 0, got {self.lr}")
        _check(self.ref_batch >= 1, where, "optim.ref_batch", f"must be >= 1, got {self.ref_batch}")
        _check(self.warmup_epochs >= 0, where, "optim.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _check(
            all(0 < m for m in self.milestones),
            where,
            "optim.milestones",
            f"must be positive epochs, got {self.milestones}",
        )
        _check(self.grad_clip >= 0, where, "optim.grad_clip", f"must be >= 0 (0: off), got {self.grad_clip}")


@dataclass
class ClusterConfig:
    """The Ray Train workers of pretraining and fine-tuning (``dclr_dist.launch``)."""

    # Workers (one DeepSpeed or DDP rank each) and what each reserves.
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    # Worker/node failures survived by restarting from the latest checkpoint (-1: unlimited).
    max_failures: int = 3

    def validate(self, where: str) -> None:
        _check(self.workers >= 1, where, "cluster.workers", f"must be >= 1, got {self.workers}")
        _check(self.gpus_per_worker >= 0, where, "cluster.gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        _check(self.cpus_per_worker > 0, where, "cluster.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        _check(self.max_failures >= -1, where, "cluster.max_failures", f"must be >= -1, got {self.max_failures}")


@dataclass
class CheckpointConfig:
    """When pretraining checkpoints and how many Ray keeps (``dclr_dist.checkpoint``)."""

    # Every N epochs (0: not by epochs), and at the first epoch end `minutes` after the
    # previous checkpoint (null: not by time), whichever comes first; the last epoch always.
    # Ray keeps the newest `keep`; the best backbone is kept apart (best/).
    every: int = 1
    minutes: float | None = None
    keep: int = 2

    def validate(self, where: str) -> None:
        _check(self.every >= 0, where, "checkpoint.every", f"must be >= 0 (0: not by epochs), got {self.every}")
        _check(
            self.minutes is None or 0 < self.minutes <= WEEK / 60,
            where,
            "checkpoint.minutes",
            f"must be > 0 and at most a week ({WEEK // 60}), or null, got {self.minutes}",
        )
        _check(self.keep >= 1, where, "checkpoint.keep", f"must be >= 1, got {self.keep}")


@dataclass
class EngineConfig:
    """The DeepSpeed engine and the GPU speed switches (``dclr_dist.engine``)."""

    # bf16 runs under autocast with fp32 master weights; fp32 on CPU CI.
    precision: Literal["fp32", "bf16"] = "fp32"
    # DeepSpeed ZeRO stage. 0: every rank holds the whole optimizer state; gradients are
    # all-reduced in fp32, bucket by bucket while backward runs; a run resumes at any
    # cluster.workers. 2: optimizer state and gradients sharded, reductions overlapped with
    # backward; for models far larger than R(2+1)D-18's 31M parameters, where sharding SGD's
    # momentum and the gradients saves at most ~250 MB per GPU. 1: optimizer state sharded,
    # kept to resume runs checkpointed with it (the old default). Stages 1-2 resume only at
    # the same cluster.workers (DeepSpeed does not re-partition their shards).
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

    def validate(self, where: str) -> None:
        _check(
            self.zero_stage in (0, 1, 2),
            where,
            "engine.zero_stage",
            "must be 0, 1 or 2 (ZeRO-3 shards parameters, which the momentum encoder needs whole), "
            f"got {self.zero_stage}",
        )


@dataclass
class FinetuneConfig:
    """The fine-tuning protocol (``dclr_dist.evaluation.finetune``) on the ``cluster`` workers."""

    # Backbone and a linear classifier trained end to end (paper: SGD lr 0.1, 10 epochs); lr is
    # per ref_batch samples and scaled linearly with the global batch, like pretraining's.
    epochs: int = 10
    lr: float = 0.1
    ref_batch: int = 40
    momentum: float = 0.9
    weight_decay: float = 1e-4

    def validate(self, where: str) -> None:
        _check(self.epochs >= 1, where, "finetune.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.lr > 0, where, "finetune.lr", f"must be > 0, got {self.lr}")
        _check(self.ref_batch >= 1, where, "finetune.ref_batch", f"must be >= 1, got {self.ref_batch}")


@dataclass
class EvalConfig:
    """Frozen-feature protocols (``dclr_dist.evaluation``) and the k-NN monitor during pretraining."""

    # k-NN accuracy of the query backbone on data.eval every N epochs, reported as knn_acc;
    # best/ then keeps the epoch with the highest (contrastive losses are not comparable
    # across temperatures). 0: off, best/ keeps the lowest loss.
    every: int = 0
    # k-NN classifier: votes of the knn_k nearest neighbours weighted by exp(cos / knn_temperature)
    # (Wu et al. 2018); its own temperature, not loss.tau.
    knn_k: int = 20
    knn_temperature: float = 0.07
    # Retrieval recall@K, test queries against the train gallery (paper: 1, 5, 10, 20, 50).
    recall_at: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 50])
    # Linear probe: L2 penalty of the logistic regression on frozen, standardised features;
    # null: chosen by 3-fold cross-validation on the train split (6 values, 18 extra fits:
    # set a value for very large splits).
    l2: float | None = None
    # Feature extraction of `python -m dclr_dist.eval`: 0 runs it in the driver process (on its
    # GPU if it has one), which suits small splits; N > 0 runs it in N Ray tasks on the cluster,
    # each reading every N-th part of the shards with data.loader_workers loader processes and
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
        _check(self.knn_k >= 1, where, "eval.knn_k", f"must be >= 1, got {self.knn_k}")
        _check(self.knn_temperature > 0, where, "eval.knn_temperature", f"must be > 0, got {self.knn_temperature}")
        _check(
            bool(self.recall_at) and all(r >= 1 for r in self.recall_at),
            where,
            "eval.recall_at",
            f"must be a non-empty list of ranks >= 1, got {self.recall_at!r}",
        )
        _check(self.l2 is None or self.l2 >= 0, where, "eval.l2", f"must be >= 0 or null, got {self.l2}")
        _check(self.workers >= 0, where, "eval.workers", f"must be >= 0 (0: in this process), got {self.workers}")
        _check(self.gpus_per_worker >= 0, where, "eval.gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        _check(self.cpus_per_worker > 0, where, "eval.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        _check(self.chunk >= 1, where, "eval.chunk", f"must be >= 1, got {self.chunk}")


@dataclass
class Config:
    """The whole tree; each section's docstring names the component that owns it."""

    shard: ShardConfig = field(default_factory=ShardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self, where: str = "<config>") -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(where)
        _check(
            self.loss.in_batch or self.data.batch_size % self.model.bn_groups == 0,
            where,
            "model.bn_groups",
            f"must divide data.batch_size ({self.data.batch_size}), got {self.model.bn_groups}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
