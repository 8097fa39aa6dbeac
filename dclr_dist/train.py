"""``python -m dclr_dist.train``: DCLR pretraining on Ray Train, one DeepSpeed engine per worker.

    python -m dclr_dist.train                                   # the demo, on this machine
    python -m dclr_dist.train --config configs/ucf101_r2plus1d.yaml train.workers=16
    ray job submit --working-dir . -- python -m dclr_dist.train --config configs/k400_r2plus1d.yaml

The driver validates the whole config and checks that the shards are readable before Ray
starts a single worker. Each worker builds the model, the loss (queues fed by every
worker's keys), a DeepSpeed engine (gloo on CPU, nccl on GPU, as Ray Train sets up the
process group) and its shard of the data stream, then trains epoch by epoch. Every
``checkpoint_every`` epochs or ``checkpoint_minutes`` each rank saves its DeepSpeed shard
into one Ray checkpoint under ``storage_path/name``, uploaded while training goes on; a
restarted worker group (``max_failures``) or a re-submitted run of the same name resumes
from the newest one, loading tensors and plain data only.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import pickle
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dclr_dist import storage
from dclr_dist.config import Config, ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
# train: pretraining; val (scenes of its own): the k-NN monitor that ranks best/; test (unseen
# scenes): the closing evaluation only.
DEMO_SPLITS = ("train", "val", "test")
CHECKPOINT_TAG = "ds"


# --------------------------------------------------------------------------- worker side

def lr_lambda(cfg: Config, steps_per_epoch: int):
    """Multiplier of the base lr at optimizer step s: linear warm-up, then step or cosine."""
    t = cfg.train
    warmup = t.warmup_epochs * steps_per_epoch
    total = t.epochs * steps_per_epoch

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        return 0.1 ** sum(step >= m * steps_per_epoch for m in t.milestones)

    return f


# Gradients are reduced in buckets of at least this many elements (20 MB of fp32): the 33M
# trainable parameters of R(2+1)D-18 and the heads make 6, so the first is on the wire while
# backward computes the rest. DeepSpeed's default (5e8) would be one bucket, reduced only
# once backward has finished.
BUCKET_ELEMENTS = 5_000_000


def deepspeed_config(cfg: Config) -> dict:
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        # overlap_comm and the bucket size act at stages 1-2 (stage 0's all-reduce is
        # OverlappedAllReduce's); there overlap_comm defaults to off.
        "zero_optimization": {"stage": t.zero_stage, "overlap_comm": True, "reduce_bucket_size": BUCKET_ELEMENTS},
        # ZeRO with a torch.optim optimizer: no fused-Adam extension to compile on CPU nodes.
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": t.grad_clip,
        "steps_per_print": 10**9,
    }
    if t.precision == "bf16":
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
        self.waiting = [len(b) for b in self.buckets]  # gradients each bucket still waits for
        self.in_flight: list[tuple[int, torch.Tensor, object]] = []
        self.in_backward = False
        for p in params:
            p.register_post_accumulate_grad_hook(self._accumulated)
        engine.enable_backward_allreduce = False

    def _accumulated(self, p: torch.nn.Parameter) -> None:
        if not self.engine.is_gradient_accumulation_boundary():
            return
        if not self.in_backward:
            self.in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        i = self.bucket_of[p]
        self.waiting[i] -= 1
        if not self.waiting[i]:
            self._launch(i)

    def _launch(self, i: int) -> None:
        for p in self.buckets[i]:
            if p.grad is None:  # no gradient this step: zeros, so every rank reduces the same buckets
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in self.buckets[i]])
        self.in_flight.append((i, flat, self.dist.all_reduce(flat, async_op=True)))
        self.waiting[i] = 0

    def _finish(self) -> None:
        for i, left in enumerate(self.waiting):
            if left:
                self._launch(i)
        world = self.dist.get_world_size()
        for i, flat, work in self.in_flight:
            work.wait()
            flat /= world
            for p, g in zip(self.buckets[i], flat.split([p.numel() for p in self.buckets[i]])):
                p.grad.copy_(g.view_as(p))
        self.in_flight, self.in_backward = [], False
        self.waiting = [len(b) for b in self.buckets]


def build(cfg: Config, world_size: int, steps_per_epoch: int, device: torch.device):
    """Model, loss and DeepSpeed engine for one worker, with train's speed switches applied."""
    import deepspeed

    from dclr_dist.batchnorm import set_sync
    from dclr_dist.loss import DCLRLoss
    from dclr_dist.model import DCLR

    t = cfg.train
    torch.backends.cudnn.benchmark = t.cudnn_benchmark
    model = DCLR.from_config(cfg.model, in_batch=cfg.loss.in_batch).to(device)
    model.memory_format = torch.channels_last_3d if t.channels_last else torch.contiguous_format
    set_sync(model, bn_group(cfg.model.bn_sync))
    if t.compile:
        model.compile_backbones()
    criterion = DCLRLoss(dim=cfg.model.dim, **asdict(cfg.loss)).to(device)
    lr = base_lr(cfg, world_size)
    params = [p for p in model.parameters() if p.requires_grad]  # the key encoder moves by momentum only
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg), dist_init_required=False)
    if t.zero_stage == 0:
        OverlappedAllReduce(engine, BUCKET_ELEMENTS)  # lives on in the parameters' hooks
    return engine, criterion


def base_lr(cfg: Config, world_size: int) -> float:
    """train.lr scaled linearly from train.ref_batch samples to the global batch."""
    return cfg.train.lr * cfg.data.batch_size * world_size * cfg.train.grad_accum / cfg.train.ref_batch


def resume_refusal(saved_workers: int, saved_stage: int, workers: int, stage: int) -> str | None:
    """Why a checkpoint of ``saved_workers`` ranks at ZeRO ``saved_stage`` cannot resume on
    ``workers`` ranks at ``stage`` (a phrase after "the checkpoint ..."), or None.

    Stage 0 checkpoints hold the whole optimizer state and load at any world size. Stages
    1-2 hold one shard per rank, which DeepSpeed re-partitions only through an offline
    conversion to its universal format; one stage's state does not load into another's.
    """
    if saved_stage != stage:
        return (f"was written with train.zero_stage={saved_stage} and this run has {stage}: one ZeRO stage's "
                f"optimizer state does not load into another's. Set train.zero_stage={saved_stage} to resume it")
    if saved_workers != workers and stage:
        return (f"was written by {saved_workers} workers at ZeRO stage {stage} and this run has {workers}: "
                f"ZeRO-{stage} optimizer shards do not re-partition (stage 0 runs resume at any train.workers). "
                f"Set train.workers={saved_workers} to resume it")
    return None


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


class MetricsLog:
    """Rank 0's metrics: JSON lines and TensorBoard events under ``<run>/metrics``.

    Written locally; for an s3:// run they are written to a local folder and copied to the
    run's prefix at every epoch end, so a killed node loses at most one epoch of curves. That
    folder is a fresh private one (mkdtemp): a predictable name in the shared temp dir would
    follow a symlink planted there and merge an earlier run's leftovers.
    """

    def __init__(self, run_url: str):
        self.run_url = run_url
        if storage.is_s3(run_url):
            local = Path(tempfile.mkdtemp(prefix="dclr-metrics-"))
        else:
            local = storage.local_path(storage.join(run_url, "metrics"))
            local.mkdir(parents=True, exist_ok=True)
        self.dir = local
        remote = storage.join(run_url, "metrics/metrics.jsonl")
        if storage.is_s3(run_url) and storage.exists(remote):
            # A restarted rank 0 may be on another node: continue the run's curve, don't restart it.
            (local / "metrics.jsonl").write_bytes(storage.read_bytes(remote))
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(local))
        self.jsonl = open(local / "metrics.jsonl", "a")

    def write(self, kind: str, step: int, values: dict) -> None:
        self.jsonl.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def sync(self) -> None:
        self.tb.flush()
        if storage.is_s3(self.run_url):
            for path in self.dir.iterdir():
                storage.write_bytes(storage.join(self.run_url, f"metrics/{path.name}"), path.read_bytes())

    def close(self) -> None:
        self.sync()
        self.tb.close()
        self.jsonl.close()
        if storage.is_s3(self.run_url):
            shutil.rmtree(self.dir)


def _reduce(values: dict[str, float], device: torch.device, op: str = "mean") -> dict[str, float]:
    """Average (or sum) scalars over all ranks, in one collective."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    if op == "mean":
        t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))


def _count_nodes() -> int:
    """Distinct Ray nodes hosting this run's workers."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not dist.is_initialized():
        return 1
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, node)
    return len(set(everyone))


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def export_backbone(engine) -> bytes:
    """The query encoder's backbone as a plain state_dict, for torch.load(weights_only=True)."""
    state = {k: v.detach().float().cpu() for k, v in engine.module.encoder_q.f.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _checkpoint_classes() -> list:
    """What a DeepSpeed ZeRO 0-2 checkpoint pickles besides tensors and plain data: inert
    records (the loss scaler's settings, an enum, a dataclass of two ints), no callable."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_checkpoint(engine, folder: str, where: str) -> dict:
    """``engine.load_checkpoint`` unpickling tensors and plain data only; returns the client state.

    DeepSpeed calls torch.load(weights_only=False), so a checkpoint could run code on every
    worker, planted by anyone who can write the run's storage. TORCH_FORCE_WEIGHTS_ONLY_LOAD
    overrides that argument in every torch.load the call makes.
    """
    saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_checkpoint_classes()):
            _, client = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines()
        what = next((line.split("GLOBAL ", 1)[1].split()[0] for line in lines if "GLOBAL " in line), None)
        reason = f"it unpickles {what}" if what else next(
            (line.strip() for line in lines if "WeightsUnpickler error" in line), lines[0])
        raise RuntimeError(
            f"{where}: refusing to resume: the checkpoint holds more than tensors and plain data ({reason}), "
            "so loading it could run code planted in it. Check who can write the run's storage; choose a new "
            "train.name to start afresh.") from None
    finally:
        if saved is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved
    return client


def train_loop(loop_config: dict) -> None:
    """Ray Train worker entry point: one rank of the pretraining job."""
    import ray.train
    import ray.train.torch

    from dclr_dist import data

    cfg = config_from_dict(loop_config["config"], where="train_loop_config")
    run_url = loop_config["run_url"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # Initial weights from the run's seed (DeepSpeed also broadcasts rank 0's); augmentation
    # randomness comes from data.seed, the epoch and the stream, not from torch's RNG.
    torch.manual_seed(cfg.train.seed)

    batches = data.batches_per_epoch(cfg.data, data.resolve_shards(cfg.data.train), world)
    steps_per_epoch = max(1, batches // cfg.train.grad_accum)
    engine, criterion = build(cfg, world, steps_per_epoch, device)

    # best/ keeps the epoch with the highest k-NN accuracy on data.eval where it is measured
    # (eval.every; contrastive losses are not comparable across temperatures), else the lowest loss.
    ranking = "knn_acc" if cfg.eval.every else "loss"
    start_epoch, best = 0, {"metric": ranking, "value": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            meta = json.loads((Path(d) / "meta.json").read_text())
            why = resume_refusal(meta["world_size"], meta["config"]["train"]["zero_stage"], world, cfg.train.zero_stage)
            if why:
                raise RuntimeError(f"the checkpoint in {run_url} {why}, or choose a new train.name to start afresh.")
            client = load_checkpoint(engine, d, storage.join(run_url, Path(checkpoint.path).name))
            criterion.load_state_dict(client["criterion"])
            start_epoch = client["epoch"] + 1
            seek_schedule(engine, cfg, world, start_epoch * steps_per_epoch)
            # A run resumed with another eval.every ranks afresh, as does one checkpointed before
            # best/ was ranked by k-NN (its "best" is a bare loss).
            if isinstance(client["best"], dict) and client["best"]["metric"] == ranking:
                best = client["best"]
            if start_epoch >= cfg.train.epochs:
                # Already finished (e.g. a sweep retried after the run ended): report its final
                # metrics again so the caller (Tune) sees the result instead of nothing.
                ray.train.report(client["metrics"])
                return

    log = MetricsLog(run_url) if rank == 0 else None
    if log is not None and start_epoch:
        log.write("resume", start_epoch, {"epoch": start_epoch})
        print(f"resumed {run_url} after epoch {start_epoch}", flush=True)
    nodes = _count_nodes()
    step = start_epoch * steps_per_epoch
    last_checkpoint = time.monotonic()
    # One loader for the run: its workers stream on across epoch boundaries (no fork, no refill).
    it = iter(data.train_loader(cfg.data, cfg.views, rank=rank, world_size=world, epoch=start_epoch,
                                epochs=cfg.train.epochs - start_epoch))
    for epoch in range(start_epoch, cfg.train.epochs):
        engine.train()
        criterion.train()
        # Summed on the device: a float() per step would make the host wait for the GPU every step.
        sums: dict[str, torch.Tensor] = {}
        skipped, skipped_shards, samples, wait = 0, 0, 0, 0.0
        t_epoch = time.perf_counter()
        t_mark = time.perf_counter()
        window = {"wait": 0.0, "samples": 0}
        for _ in range(batches):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            window["wait"] += t1 - t0
            # Counts read on the host before the copy: reading them on the GPU would sync every step.
            skipped += int(batch["skipped_samples"])
            skipped_shards += int(batch["skipped_shards"])
            n = int(batch["label"].shape[0])
            batch = data.to_device(batch, device, cfg.views)
            out = engine(batch)
            losses = criterion(out)
            engine.backward(losses["loss"])
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            if boundary:
                engine.module.momentum_update()
                step += 1
            samples += n
            window["samples"] += n
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
            if boundary and step % cfg.train.log_every == 0:
                elapsed = time.perf_counter() - t_mark
                local = {"samples_per_s_worker": window["samples"] / elapsed, "data_wait": window["wait"] / elapsed}
                terms = _reduce({k: float(v.detach()) for k, v in losses.items()}, device)
                rate = _reduce({"samples_per_s": local["samples_per_s_worker"]}, device, op="sum")
                if log is not None:
                    values = {**terms, **local, **rate, "lr": engine.get_lr()[0], "epoch": epoch,
                              "memory_mb": _memory_mb(device)}
                    log.write("step", step, values)
                    print(f"epoch {epoch + 1}/{cfg.train.epochs} step {step} loss {terms['loss']:.4f} "
                          f"(vv {terms['vv']:.3f} v_s {terms['v_s']:.3f} v_d {terms['v_d']:.3f} "
                          f"align {terms['align']:.4f}) lr {values['lr']:.2e} "
                          f"{rate['samples_per_s']:.1f} samples/s data-wait {local['data_wait']:.0%}", flush=True)
                t_mark, window = time.perf_counter(), {"wait": 0.0, "samples": 0}
            wait += t1 - t0
        elapsed = time.perf_counter() - t_epoch
        epoch_metrics = _reduce({k: float(v) / batches for k, v in sums.items()}, device)
        # Rank 0's clock decides a checkpoint by time for every rank, carried by this sum: clocks
        # and epoch ends differ between ranks, and ranks that disagree would hang in report.
        due = rank == 0 and cfg.train.checkpoint_minutes is not None and \
            time.monotonic() - last_checkpoint >= 60 * cfg.train.checkpoint_minutes
        totals = _reduce({"skipped": float(skipped), "skipped_shards": float(skipped_shards), "samples": float(samples),
                          "wait": wait, "checkpoint_due": float(due)}, device, op="sum")
        epoch_metrics.update({
            "epoch": epoch + 1, "step": step, "skipped_samples": int(totals["skipped"]),
            "skipped_shards": int(totals["skipped_shards"]),
            "samples_per_s": totals["samples"] / elapsed, "samples_per_s_worker": samples / elapsed,
            "data_wait": totals["wait"] / world / elapsed, "lr": engine.get_lr()[0], "world_size": world,
            "zero_stage": cfg.train.zero_stage,
            "nodes": nodes, "queue_filled": int(criterion.queue_filled),
        })
        last = epoch + 1 == cfg.train.epochs
        if cfg.eval.every and ((epoch + 1) % cfg.eval.every == 0 or last):
            from dclr_dist.eval import knn_monitor

            epoch_metrics["knn_acc"] = knn_monitor(engine.module.encoder_q.f, cfg, device, rank, world)
            if rank == 0:
                print(f"epoch {epoch + 1}/{cfg.train.epochs} k-NN accuracy {epoch_metrics['knn_acc']:.1%} on "
                      "data.eval (leave-one-out)", flush=True)
        value = epoch_metrics.get(ranking)
        if value is not None and (best["value"] is None or
                                  (value > best["value"] if ranking == "knn_acc" else value < best["value"])):
            best = {"metric": ranking, "value": value}
            if rank == 0:
                _save_best(engine, cfg, world, epoch, run_url, epoch_metrics)
        if log is not None:
            log.write("epoch", epoch + 1, epoch_metrics)
            log.sync()
        every = cfg.train.checkpoint_every
        if last or (every and (epoch + 1) % every == 0) or totals["checkpoint_due"]:
            _report_with_checkpoint(engine, criterion, cfg, epoch, best, world, rank, run_url, epoch_metrics)
            last_checkpoint = time.monotonic()
        else:
            # In the background too: reports are delivered in order, so a synchronous one would
            # wait for the previous checkpoint's upload.
            ray.train.report(epoch_metrics, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
    if log is not None:
        log.close()


def _checkpoint_meta(cfg: Config, world: int, epoch: int) -> dict:
    """meta.json of a checkpoint and of best/: what `python -m dclr_dist.eval` needs to rebuild f."""
    return {"world_size": world, "epoch": epoch + 1,
            "model": {"arch": cfg.model.arch, "width": cfg.model.width, "epoch": epoch + 1}, "config": cfg.to_dict()}


def _report_with_checkpoint(engine, criterion, cfg: Config, epoch: int, best: dict, world: int, rank: int,
                            run_url: str, metrics: dict) -> None:
    import ray.train

    # Uploaded in the background while training goes on, so the folder outlives this call;
    # Ray deletes it once uploaded. latest.json follows from Train's controller (_latest_json).
    d = tempfile.mkdtemp(prefix=f"dclr-checkpoint-{cfg.train.name}-")
    try:
        engine.save_checkpoint(d, tag=CHECKPOINT_TAG, client_state={
            "epoch": epoch, "best": best, "criterion": criterion.state_dict(), "metrics": metrics})
        if rank == 0:
            (Path(d) / "backbone.pt").write_bytes(export_backbone(engine))
            (Path(d) / "meta.json").write_text(json.dumps(_checkpoint_meta(cfg, world, epoch)))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise


def _save_best(engine, cfg: Config, world: int, epoch: int, run_url: str, metrics: dict) -> None:
    """best/: the backbone of the best epoch so far, which outlives Ray's keep-the-newest-N.

    Written at every improvement, checkpoint epoch or not, so an improvement between
    checkpoints is not lost; meta.json last, as the mark of a complete pair.
    """
    storage.write_bytes(storage.join(run_url, "best/backbone.pt"), export_backbone(engine))
    storage.write_bytes(storage.join(run_url, "best/meta.json"),
                        json.dumps({**_checkpoint_meta(cfg, world, epoch), "metrics": metrics}).encode())


# --------------------------------------------------------------------------- driver side

def ray_storage(path: str):
    """(storage_path, filesystem) for RunConfig: S3 through pyarrow with AWS_ENDPOINT_URL honoured
    and the bucket's region (pyarrow does not follow region redirects: a wrong one would fail
    only at the first checkpoint). The filesystem pickles no credentials: each node uses its own."""
    if not storage.is_s3(path):
        return str(Path(path).resolve()), None
    import pyarrow.fs

    bucket, key = storage.split_s3(path)
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, region=storage.bucket_region(path),
                                 scheme="http" if endpoint and endpoint.startswith("http://") else "https")
    return f"{bucket}/{key}".rstrip("/"), fs


# The driver's S3 settings reach the workers, so shards and checkpoints resolve the same
# way on every node. Never a credential: a runtime_env is stored in the job table and Train's
# run state and written to runtime_env_agent.log, readable by anyone with the dashboard or a
# shell on a node. Nodes take credentials from their own chain (instance role, IRSA, a
# profile, the environment their raylet was started with; a local cluster started by the
# driver inherits the driver's).
_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_MAX_ATTEMPTS", "AWS_PROFILE")


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in _AWS_ENV if k in os.environ}


def connect_ray() -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one, once per process."""
    import socket

    import ray

    if ray.is_initialized():
        return
    env = forwarded_env()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env})
        return
    # Ray Train's placement-group cleaner finds its cluster through the state API, whose
    # auto-discovery fails when several Ray clusters share the machine (tests, sweeps next
    # to a dev cluster); placement groups then leak and the next run waits forever. Name
    # the local cluster's API server for it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, runtime_env={"env_vars": env})


def ensure_demo_shards(cfg: Config) -> None:
    """The embedded default trains on synthetic shards, made here on first use."""
    from dclr_dist.shard.pack import pack
    from dclr_dist.shard.synth import write_corpus

    root = REPO / "shards" / "demo"
    if all((root / split / "index.json").exists() for split in DEMO_SPLITS):
        return
    print(f"demo: writing the synthetic scene-bias corpus and its shards under {root}", flush=True)
    # The scene-bias benchmark's corpus (README) with two thirds of its training videos: the
    # same 4 translations, 64x64 videos of 48 frames, so the demo repeats a measured recipe.
    manifest = write_corpus(root / "videos", num_classes=4, train_per_class=32, test_per_class=24, train_scenes=12,
                            test_scenes=6, val_per_class=12, val_scenes=6, frames=48, size=64,
                            workers=os.cpu_count() or 1, progress=True)
    for split in DEMO_SPLITS:
        pack(str(manifest), str(root / split), cfg.shard, split=split, workers=os.cpu_count() or 1)


def _latest_json(run_url: str):
    """A Ray Train callback that writes ``<run>/latest.json``, the run's newest checkpoint as
    the driver reads it before starting workers (world size, epoch, metrics).

    It runs in Train's controller once every rank's part of a checkpoint is uploaded and Ray
    has recorded it, so latest.json never names a checkpoint a restart would not resume
    from; rank 0 could not know that, with uploads in the background on every rank.
    """
    from ray.train import UserCallback

    class LatestJson(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if checkpoint is not None:
                m = metrics[0]
                storage.write_bytes(storage.join(run_url, "latest.json"), json.dumps(
                    {"world_size": m["world_size"], "epoch": m["epoch"], "metrics": m}).encode())

    return LatestJson()


def make_paths_absolute(cfg: Config) -> None:
    """Workers (and Tune trials) run in other working directories: ship absolute local paths."""
    def absolute(url: str) -> str:
        return url if storage.is_s3(url) else str(Path(url).resolve())

    cfg.data.train = [absolute(u) for u in cfg.data.train]
    cfg.data.eval = [absolute(u) for u in cfg.data.eval]
    cfg.train.storage_path = absolute(cfg.train.storage_path)


def fit(cfg: Config, callbacks: list | None = None):
    """Start (or resume) the run on the Ray cluster in RAY_ADDRESS, or a local one.

    ``callbacks``: Ray Train callbacks, e.g. Tune's TuneReportCallback when a sweep runs this.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dclr_dist import data

    make_paths_absolute(cfg)
    # Before any worker starts: missing shards or a bad epoch length fail in seconds.
    if not cfg.data.train:
        raise data.DataError("data.train is empty: set it to the shards to train on (an index.json, a folder "
                             "or s3:// prefix packed by `python -m dclr_dist.shard`, or .tar URLs)")
    shards = data.resolve_shards(cfg.data.train)
    data.check_shards(shards, "data.train")
    data.batches_per_epoch(cfg.data, shards, cfg.train.workers)
    if cfg.eval.every:
        if not cfg.data.eval:
            raise data.DataError(f"eval.every is {cfg.eval.every} and data.eval is empty: set data.eval to "
                                 "labelled validation shards for the k-NN monitor, or eval.every=0")
        data.check_shards(data.resolve_shards(cfg.data.eval), "data.eval")
    storage_path, fs = ray_storage(cfg.train.storage_path)
    run_url = storage.join(cfg.train.storage_path, cfg.train.name)
    latest_url = storage.join(run_url, "latest.json")
    if storage.exists(latest_url):
        latest = json.loads(storage.read_bytes(latest_url))
        # Runs checkpointed before the stage was recorded are judged by the workers, from the
        # checkpoint's own config.
        saved_stage = latest["metrics"].get("zero_stage")
        why = saved_stage is not None and resume_refusal(latest["world_size"], saved_stage, cfg.train.workers,
                                                         cfg.train.zero_stage)
        if why:
            raise ValueError(f"{run_url}: the checkpoint of epoch {latest['epoch']} {why}, or choose a new "
                             "train.name to start afresh.")
        print(f"resuming {run_url} from epoch {latest['epoch']}", flush=True)
    connect_ray()
    use_gpu = cfg.train.gpus_per_worker > 0
    resources = {"CPU": cfg.train.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.to_dict(), "run_url": run_url},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.train.name, callbacks=[*(callbacks or []), _latest_json(run_url)], storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            worker_runtime_env={"env_vars": forwarded_env()},
            failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
    )
    return trainer.fit()


def failure_summary(e: Exception) -> str:
    """The last "SomethingError: message" line of a Ray Train failure (whose text holds the
    workers' tracebacks), or its first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)
              and not line.startswith(("ray.train.", "TrainingFailedError"))]
    return (raised or lines or [type(e).__name__])[-1 if raised else 0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dclr_dist.train",
        description="DCLR pretraining on Ray Train with one DeepSpeed engine per worker. Without arguments it "
                    "runs the demo: synthetic scene-bias shards under shards/demo (made on first use), CPU "
                    "workers on a local Ray cluster.",
        epilog="Ray: RAY_ADDRESS selects the cluster (`ray job submit` sets it); without it a local cluster "
               "starts. Object storage: s3:// URLs use AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
               "AWS_SECRET_ACCESS_KEY / AWS_PROFILE; the workers get the endpoint, region and profile name, "
               "never credentials (they use their node's). Re-running with the same train.name resumes the run.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", help=f"config file (default: {DEMO_CONFIG.relative_to(REPO)})")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.workers=8 loss.tau=0.1 data.batch_size=16")
    args = parser.parse_args(argv)
    demo = args.config is None
    try:
        cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dclr_dist.data import DataError

    if demo:
        ensure_demo_shards(cfg)
    from ray.train import TrainingFailedError

    try:
        result = fit(cfg)
    except (FileNotFoundError, storage.StorageError, ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingFailedError as e:
        # Raised when the restarts of train.max_failures are spent; the workers' tracebacks are
        # already on the console and in the run's logs, so one line says what ended it.
        print(f"error: training failed: {failure_summary(e)}", file=sys.stderr)
        return 1
    m = result.metrics or {}
    print(f"done: {m.get('epoch')} epochs, {m.get('step')} steps, final loss {m.get('loss', float('nan')):.4f}; "
          f"checkpoint {result.checkpoint.path if result.checkpoint else None}")
    if demo:
        # The demo ends with what tells a good representation from a bad one: motion accuracy
        # on the test split's unseen scenes, and how much of the features follow the scene.
        from dclr_dist.eval import EvalError, evaluate

        run = Path(cfg.train.storage_path) / cfg.train.name
        test = [str(REPO / "shards" / "demo" / "test")]
        try:
            evaluate(str(run), cfg.data.train, test, ("linear", "knn", "scene"), out=run / "eval")
        except (EvalError, DataError) as e:
            print(f"error: evaluation: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    # Ray pickles the functions of __main__ by value, with every global they reach (and
    # torch.backends.cudnn cannot be pickled); those of the importable module go by name.
    from dclr_dist.train import main as _main

    sys.exit(_main())
