"""One pretraining worker's method and engine: DCLR and its loss, the DeepSpeed engine around
them (optimizer, lr schedule, ZeRO stage, gradient all-reduce overlapped with backward) and
the process groups batch norm is synced over. Construction only: no I/O (Ray is asked
which node a rank is on, for per-node batch-norm groups).
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from dclr_dist.config import Config


def lr_lambda(cfg: Config, steps_per_epoch: int):
    """Multiplier of the base lr at optimizer step s: linear warm-up, then step or cosine."""
    o = cfg.optim
    warmup = o.warmup_epochs * steps_per_epoch
    total = cfg.train.epochs * steps_per_epoch

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        return 0.1 ** sum(step >= m * steps_per_epoch for m in o.milestones)

    return f


# Gradients are reduced in buckets of at least this many elements (20 MB of fp32): the 33M
# trainable parameters of R(2+1)D-18 and the heads make 6, so the first is on the wire while
# backward computes the rest. DeepSpeed's default (5e8) would be one bucket, reduced only
# once backward has finished.
BUCKET_ELEMENTS = 5_000_000


def deepspeed_config(cfg: Config) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        # overlap_comm and the bucket size act at stages 1-2 (stage 0's all-reduce is
        # OverlappedAllReduce's); there overlap_comm defaults to off.
        "zero_optimization": {
            "stage": cfg.engine.zero_stage,
            "overlap_comm": True,
            "reduce_bucket_size": BUCKET_ELEMENTS,
        },
        # ZeRO with a torch.optim optimizer: no fused-Adam extension to compile on CPU nodes.
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": cfg.optim.grad_clip,
        "steps_per_print": 10**9,
        # DeepSpeed's throughput timer (on by default) synchronises the device twice per step
        # to time it; the trainer measures its own throughput without waiting on the device.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if cfg.engine.precision == "bf16":
        # Autocast keeps fp32 master weights and BN statistics; only the matmuls/convs run in bf16.
        # No lower-precision-safe modules: by default DeepSpeed marks Linear and Conv parameters
        # for bf16 gradient reduction under autocast (ZeRO 1-2), summing 32 ranks' gradients in
        # bf16; without marks they are reduced in their own dtype, fp32.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return ds


class OverlappedAllReduce:
    """ZeRO stage 0's gradient all-reduce, each bucket as soon as backward has produced it.

    DeepSpeed (0.19) at stage 0 all-reduces every gradient after backward has finished
    (engine.allreduce_gradients), so the whole transfer adds to the step; overlap_comm
    exists for ZeRO 1-2 only. This does what DDP does instead: buckets of ``bucket`` elements
    in reverse parameter order (about the order backward produces gradients), each summed
    asynchronously in the gradients' dtype (fp32: the parameters' dtype, autocast or not)
    once its last gradient is accumulated, and all of them awaited and averaged when
    backward ends, before engine.step(); at accumulation boundaries only, as DeepSpeed.
    Nothing waits on the host: on NCCL, wait() orders the streams.

    Buckets go out in bucket order on every rank (a bucket complete before an earlier one
    waits for it): collectives issued in a rank-dependent order would hang NCCL. A backward
    that raised leaves half-counted buckets: the next engine.backward starts afresh.
    """

    def __init__(self, engine, bucket: int):
        import torch.distributed as dist

        self.engine, self.dist = engine, dist
        params = [p for p in engine.module.parameters() if p.requires_grad][::-1]
        self.buckets: list[list[torch.nn.Parameter]] = [[]]
        size = 0
        for p in params:
            if size >= bucket:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel()
        self.bucket_of = {p: i for i, b in enumerate(self.buckets) for p in b}
        self._reset()
        for p in params:
            p.register_post_accumulate_grad_hook(self._accumulated)
        engine.enable_backward_allreduce = False
        backward = engine.backward

        def fresh_backward(*args, **kwargs):
            if self.in_backward:  # the previous backward raised before its end
                self._reset()
            return backward(*args, **kwargs)

        engine.backward = fresh_backward

    def _reset(self) -> None:
        self.waiting = [len(b) for b in self.buckets]  # gradients each bucket still waits for
        self.next = 0  # the next bucket to go out
        self.in_flight: list[tuple[int, torch.Tensor, object]] = []
        self.in_backward = False

    def _accumulated(self, p: torch.nn.Parameter) -> None:
        if not self.engine.is_gradient_accumulation_boundary():
            return
        if not self.in_backward:
            self.in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        self.waiting[self.bucket_of[p]] -= 1
        while self.next < len(self.buckets) and not self.waiting[self.next]:
            self._launch(self.next)

    def _launch(self, i: int) -> None:
        for p in self.buckets[i]:
            if p.grad is None:  # no gradient this step: zeros, so every rank reduces the same buckets
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in self.buckets[i]])
        self.in_flight.append((i, flat, self.dist.all_reduce(flat, async_op=True)))
        self.waiting[i], self.next = 0, i + 1

    def _finish(self) -> None:
        while self.next < len(self.buckets):  # those still waiting for a gradient that never came
            self._launch(self.next)
        world = self.dist.get_world_size()
        for i, flat, work in self.in_flight:
            work.wait()
            flat /= world
            for p, g in zip(self.buckets[i], flat.split([p.numel() for p in self.buckets[i]])):
                p.grad.copy_(g.view_as(p))
        self._reset()


def build_method(cfg: Config, device: torch.device):
    """DCLR and its loss on ``device``, with the model's speed switches and batch-norm groups."""
    from dclr_dist.batchnorm import set_sync
    from dclr_dist.loss import DCLRLoss
    from dclr_dist.model import DCLR

    e = cfg.engine
    torch.backends.cudnn.benchmark = e.cudnn_benchmark
    model = DCLR.from_config(cfg.model, in_batch=cfg.loss.in_batch).to(device)
    model.memory_format = torch.channels_last_3d if e.channels_last else torch.contiguous_format
    set_sync(model, bn_group(cfg.model.bn_sync))
    if e.compile:
        model.compile_backbones()
    criterion = DCLRLoss(dim=cfg.model.dim, grad_accum=cfg.train.grad_accum, **asdict(cfg.loss)).to(device)
    return model, criterion


def build_engine(model, cfg: Config, world_size: int, steps_per_epoch: int):
    """The DeepSpeed engine training ``model``: optimizer, lr schedule, ZeRO stage, gradient reduction."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]  # the key encoder moves by momentum only
    optimizer = make_optimizer(params, cfg, base_lr(cfg, world_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg), dist_init_required=False
    )
    if cfg.engine.zero_stage == 0:
        OverlappedAllReduce(engine, BUCKET_ELEMENTS)  # lives on in the parameters' hooks
    return engine


def make_optimizer(params, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """optim.name's optimizer over ``params`` at ``lr``, with optim's momentum and weight decay."""
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)


def build(cfg: Config, world_size: int, steps_per_epoch: int, device: torch.device):
    """Engine and loss for one worker: build_method, then build_engine."""
    model, criterion = build_method(cfg, device)
    return build_engine(model, cfg, world_size, steps_per_epoch), criterion


def scaled_lr(lr: float, global_batch: int, ref_batch: int) -> float:
    """``lr``, given per ``ref_batch`` samples, for ``global_batch`` samples per step: the linear
    scaling rule (Goyal et al. 2017) of pretraining and fine-tuning alike."""
    return lr * global_batch / ref_batch


def base_lr(cfg: Config, world_size: int) -> float:
    """optim.lr for this run's global batch."""
    return scaled_lr(cfg.optim.lr, cfg.data.batch_size * world_size * cfg.train.grad_accum, cfg.optim.ref_batch)


def seek_schedule(engine, cfg: Config, world_size: int, step: int) -> None:
    """Put the loaded lr scheduler at optimizer step ``step`` of this run.

    A checkpoint's scheduler counted steps and scaled the lr for the world size that wrote
    it; resumed at another, steps per epoch and the global batch differ. The schedule is a
    function of the step (lr_lambda), so it is set anew from this run's.
    """
    scheduler = engine.lr_scheduler
    lr = base_lr(cfg, world_size)
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    scheduler.last_epoch = step
    for group, f in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = lr * f(step)


def bn_group(sync: str):
    """The process group batch norm statistics are summed over (model.bn_sync); None: per worker.

    "node": one group per Ray node; every rank creates every group, as new_group requires.
    """
    import torch.distributed as dist

    if sync == "worker" or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    if sync == "global":
        return dist.group.WORLD
    import ray

    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    mine = None
    for node in dict.fromkeys(nodes):
        group = dist.new_group([r for r, n in enumerate(nodes) if n == node])
        if node == nodes[dist.get_rank()]:
            mine = group
    return mine
