"""``python -m dclr_dist.train``: DCLR pretraining on Ray Train, one DeepSpeed engine per worker.

    python -m dclr_dist.train                                   # the demo, on this machine
    python -m dclr_dist.train --config configs/ucf101_r2plus1d.yaml train.workers=16
    ray job submit --working-dir . -- python -m dclr_dist.train --config configs/k400_r2plus1d.yaml

The driver validates the whole config and checks that the shards are readable before Ray
starts a single worker. Each worker builds the model, the loss (queues fed by every
worker's keys), a DeepSpeed engine (gloo on CPU, nccl on GPU, as Ray Train sets up the
process group) and its shard of the data stream, then trains epoch by epoch. Every
``checkpoint_every`` epochs each rank saves its DeepSpeed shard into one Ray checkpoint
under ``storage_path/name``; a restarted worker group (``max_failures``) or a re-submitted
run of the same name resumes from the newest one.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
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


def deepspeed_config(cfg: Config) -> dict:
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "zero_optimization": {"stage": t.zero_stage},
        # ZeRO with a torch.optim optimizer: no fused-Adam extension to compile on CPU nodes.
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": t.grad_clip,
        "steps_per_print": 10**9,
    }
    if t.precision == "bf16":
        # Autocast keeps fp32 master weights and BN statistics; only the matmuls/convs run in bf16.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return ds


def build(cfg: Config, world_size: int, steps_per_epoch: int, device: torch.device):
    """Model, loss and DeepSpeed engine for one worker."""
    import deepspeed

    from dclr_dist.batchnorm import set_sync
    from dclr_dist.loss import DCLRLoss
    from dclr_dist.model import DCLR

    model = DCLR.from_config(cfg.model, in_batch=cfg.loss.in_batch).to(device)
    set_sync(model, bn_group(cfg.model.bn_sync))
    criterion = DCLRLoss(dim=cfg.model.dim, **asdict(cfg.loss)).to(device)
    global_batch = cfg.data.batch_size * world_size * cfg.train.grad_accum
    lr = cfg.train.lr * global_batch / cfg.train.ref_batch
    params = [p for p in model.parameters() if p.requires_grad]  # the key encoder moves by momentum only
    if cfg.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg), dist_init_required=False)
    return engine, criterion


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
    run's prefix at every epoch end, so a killed node loses at most one epoch of curves.
    """

    def __init__(self, run_url: str):
        self.run_url = run_url
        local = storage.local_path(storage.join(run_url, "metrics")) if not storage.is_s3(run_url) else \
            Path(tempfile.gettempdir()) / "dclr-metrics" / run_url.replace("s3://", "").replace("/", "_")
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
            if meta["world_size"] != world:
                raise RuntimeError(
                    f"the checkpoint in {run_url} was written by {meta['world_size']} workers and this run has "
                    f"{world}: ZeRO shards do not re-partition. Set train.workers={meta['world_size']}, or "
                    "choose a new train.name to start afresh.")
            _, client = engine.load_checkpoint(d, tag=CHECKPOINT_TAG)
            criterion.load_state_dict(client["criterion"])
            start_epoch = client["epoch"] + 1
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
    for epoch in range(start_epoch, cfg.train.epochs):
        engine.train()
        criterion.train()
        loader = data.train_loader(cfg.data, cfg.views, rank=rank, world_size=world, epoch=epoch)
        # Summed on the device: a float() per step would make the host wait for the GPU every step.
        sums: dict[str, torch.Tensor] = {}
        skipped, skipped_shards, samples, wait = 0, 0, 0, 0.0
        t_epoch = time.perf_counter()
        t_mark = time.perf_counter()
        window = {"wait": 0.0, "samples": 0}
        it = iter(loader)
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
        totals = _reduce({"skipped": float(skipped), "skipped_shards": float(skipped_shards), "samples": float(samples),
                          "wait": wait}, device, op="sum")
        epoch_metrics.update({
            "epoch": epoch + 1, "step": step, "skipped_samples": int(totals["skipped"]),
            "skipped_shards": int(totals["skipped_shards"]),
            "samples_per_s": totals["samples"] / elapsed, "samples_per_s_worker": samples / elapsed,
            "data_wait": totals["wait"] / world / elapsed, "lr": engine.get_lr()[0], "world_size": world,
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
        if (epoch + 1) % cfg.train.checkpoint_every == 0 or last:
            _report_with_checkpoint(engine, criterion, cfg, epoch, best, world, rank, run_url, epoch_metrics)
        else:
            ray.train.report(epoch_metrics)
    if log is not None:
        log.close()


def _checkpoint_meta(cfg: Config, world: int, epoch: int) -> dict:
    """meta.json of a checkpoint and of best/: what `python -m dclr_dist.eval` needs to rebuild f."""
    return {"world_size": world, "epoch": epoch + 1,
            "model": {"arch": cfg.model.arch, "width": cfg.model.width, "epoch": epoch + 1}, "config": cfg.to_dict()}


def _report_with_checkpoint(engine, criterion, cfg: Config, epoch: int, best: dict, world: int, rank: int,
                            run_url: str, metrics: dict) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=CHECKPOINT_TAG, client_state={
            "epoch": epoch, "best": best, "criterion": criterion.state_dict(), "metrics": metrics})
        if rank == 0:
            (Path(d) / "backbone.pt").write_bytes(export_backbone(engine))
            (Path(d) / "meta.json").write_text(json.dumps(_checkpoint_meta(cfg, world, epoch)))
            # The run's newest state, readable by the driver before it starts workers.
            storage.write_bytes(storage.join(run_url, "latest.json"), json.dumps({
                "world_size": world, "epoch": epoch + 1, "metrics": metrics}).encode())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


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
    """(storage_path, filesystem) for RunConfig: S3 through pyarrow with AWS_ENDPOINT_URL honoured."""
    if not storage.is_s3(path):
        return str(Path(path).resolve()), None
    import pyarrow.fs

    bucket, key = storage.split_s3(path)
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                                 scheme="http" if endpoint and endpoint.startswith("http://") else "https")
    return f"{bucket}/{key}".rstrip("/"), fs


# The standard AWS variables the driver sees reach the workers too, so shards and
# checkpoints resolve the same way on every node (nodes with their own instance roles
# need none of them).
_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_MAX_ATTEMPTS", "AWS_PROFILE",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


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
    data.batches_per_epoch(cfg.data, data.resolve_shards(cfg.data.train), cfg.train.workers)
    if cfg.eval.every:
        if not cfg.data.eval:
            raise data.DataError(f"eval.every is {cfg.eval.every} and data.eval is empty: set data.eval to "
                                 "labelled validation shards for the k-NN monitor, or eval.every=0")
        data.resolve_shards(cfg.data.eval)
    storage_path, fs = ray_storage(cfg.train.storage_path)
    run_url = storage.join(cfg.train.storage_path, cfg.train.name)
    latest_url = storage.join(run_url, "latest.json")
    if storage.exists(latest_url):
        latest = json.loads(storage.read_bytes(latest_url))
        if latest["world_size"] != cfg.train.workers:
            raise ValueError(f"{run_url} was checkpointed by {latest['world_size']} workers (epoch "
                             f"{latest['epoch']}) and train.workers is {cfg.train.workers}: ZeRO shards do not "
                             f"re-partition. Set train.workers={latest['world_size']} to resume it, or choose a "
                             "new train.name to start afresh.")
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
            name=cfg.train.name, callbacks=callbacks, storage_path=storage_path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            worker_runtime_env={"env_vars": forwarded_env()},
            failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
    )
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dclr_dist.train",
        description="DCLR pretraining on Ray Train with one DeepSpeed engine per worker. Without arguments it "
                    "runs the demo: synthetic scene-bias shards under shards/demo (made on first use), CPU "
                    "workers on a local Ray cluster.",
        epilog="Ray: RAY_ADDRESS selects the cluster (`ray job submit` sets it); without it a local cluster "
               "starts. Object storage: s3:// URLs use AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
               "AWS_SECRET_ACCESS_KEY / AWS_PROFILE. Re-running with the same train.name resumes the run.",
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
    try:
        result = fit(cfg)
    except (FileNotFoundError, storage.StorageError, ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.error:
        print(f"error: training failed: {result.error}", file=sys.stderr)
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
    sys.exit(main())
