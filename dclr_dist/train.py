"""``python -m dclr_dist.train``: DCLR pretraining on Ray Train, one DeepSpeed engine per worker.

    python -m dclr_dist.train --config demo                     # the demo's recipe (shards must exist)
    python -m dclr_dist.train --config dclr_dist/configs/ucf101_r2plus1d.yaml train.workers=16
    ray job submit --working-dir . -- python -m dclr_dist.train --config k400_r2plus1d

The driver (``fit``) validates the config and checks the shards before Ray starts a worker.
Each worker (``train_loop``) builds its engine (``dclr_dist.engine``), resumes from the
run's newest checkpoint if there is one, then runs epochs: train, measure, rank best/,
checkpoint or report (``dclr_dist.checkpoint``, ``dclr_dist.metrics``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dclr_dist import launch, storage
from dclr_dist.checkpoint import (latest, latest_json_callback, load_checkpoint, report_with_checkpoint,
                                  resume_refusal, save_best)
from dclr_dist.config import Config, ConfigError, config_from_dict, load_config
from dclr_dist.engine import build, seek_schedule
from dclr_dist.metrics import EpochMeter, MetricsLog, count_nodes, memory_mb, reduce

# --------------------------------------------------------------------------- worker side


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
    start_epoch, best, finished = resume(engine, criterion, cfg, run_url, world, steps_per_epoch, ranking)
    if finished is not None:
        # Already finished (e.g. a sweep retried after the run ended): report its final
        # metrics again so the caller (Tune) sees the result instead of nothing.
        ray.train.report(finished)
        return

    log = MetricsLog(run_url) if rank == 0 else None
    if log is not None and start_epoch:
        log.write("resume", start_epoch, {"epoch": start_epoch})
        print(f"resumed {run_url} after epoch {start_epoch}", flush=True)
    nodes = count_nodes()
    step = start_epoch * steps_per_epoch
    last_checkpoint = time.monotonic()
    # One loader for the run: its workers stream on across epoch boundaries (no fork, no refill).
    it = iter(data.train_loader(cfg.data, cfg.views, rank=rank, world_size=world, epoch=start_epoch,
                                epochs=cfg.train.epochs - start_epoch))
    for epoch in range(start_epoch, cfg.train.epochs):
        meter = EpochMeter()
        step = run_epoch(engine, criterion, it, batches, cfg, device, epoch, step, meter, log)
        # Rank 0's clock decides a checkpoint by time for every rank, carried by the epoch's sum:
        # clocks and epoch ends differ between ranks, and ranks that disagree would hang in report.
        due = rank == 0 and cfg.train.checkpoint_minutes is not None and \
            time.monotonic() - last_checkpoint >= 60 * cfg.train.checkpoint_minutes
        metrics, flags = meter.epoch(batches, device, {"checkpoint_due": due})
        metrics.update({"epoch": epoch + 1, "step": step, "lr": engine.get_lr()[0], "world_size": world,
                        "zero_stage": cfg.train.zero_stage, "nodes": nodes,
                        "queue_filled": int(criterion.queue_filled)})
        last = epoch + 1 == cfg.train.epochs
        if cfg.eval.every and ((epoch + 1) % cfg.eval.every == 0 or last):
            metrics["knn_acc"] = monitor(engine, cfg, device, rank, world, epoch)
        value = metrics.get(ranking)
        if value is not None and (best["value"] is None or
                                  (value > best["value"] if ranking == "knn_acc" else value < best["value"])):
            best = {"metric": ranking, "value": value}
            if rank == 0:
                save_best(engine, cfg, world, epoch, run_url, metrics)
        if log is not None:
            log.write("epoch", epoch + 1, metrics)
            log.sync()
        every = cfg.train.checkpoint_every
        if last or (every and (epoch + 1) % every == 0) or flags["checkpoint_due"]:
            report_with_checkpoint(engine, criterion, cfg, epoch, best, world, rank, run_url, metrics)
            last_checkpoint = time.monotonic()
        else:
            # In the background too: reports are delivered in order, so a synchronous one would
            # wait for the previous checkpoint's upload.
            ray.train.report(metrics, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
    if log is not None:
        log.close()


def resume(engine, criterion, cfg: Config, run_url: str, world: int, steps_per_epoch: int,
           ranking: str) -> tuple[int, dict, dict | None]:
    """(first epoch to run, best so far, the final metrics if the run had already finished) from
    the checkpoint Ray Train restored, if any; engine, queues and lr schedule are loaded."""
    import ray.train

    best = {"metric": ranking, "value": None}
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, best, None
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
    return start_epoch, best, client["metrics"] if start_epoch >= cfg.train.epochs else None


def run_epoch(engine, criterion, it, batches: int, cfg: Config, device: torch.device, epoch: int, step: int,
              meter: EpochMeter, log: MetricsLog | None) -> int:
    """Train on ``batches`` batches of ``it``, counting into ``meter``; returns the optimizer step reached."""
    from dclr_dist import data

    engine.train()
    criterion.train()
    for _ in range(batches):
        t0 = time.perf_counter()
        batch = next(it)
        meter.batch(batch, time.perf_counter() - t0)
        losses = criterion(engine(data.to_device(batch, device, cfg.views)))
        engine.backward(losses["loss"])
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        if boundary:
            engine.module.momentum_update()
            step += 1
        meter.losses(losses)
        if boundary and step % cfg.train.log_every == 0:
            log_step(engine, losses, meter.window(), cfg, device, epoch, step, log)
    return step


def log_step(engine, losses: dict, local: dict, cfg: Config, device: torch.device, epoch: int, step: int,
             log: MetricsLog | None) -> None:
    """Every rank's loss terms (mean) and throughput (sum), written and printed by rank 0."""
    terms = reduce({k: float(v.detach()) for k, v in losses.items()}, device)
    rate = reduce({"samples_per_s": local["samples_per_s_worker"]}, device, op="sum")
    if log is None:
        return
    values = {**terms, **local, **rate, "lr": engine.get_lr()[0], "epoch": epoch, "memory_mb": memory_mb(device)}
    log.write("step", step, values)
    print(f"epoch {epoch + 1}/{cfg.train.epochs} step {step} loss {terms['loss']:.4f} "
          f"(vv {terms['vv']:.3f} v_s {terms['v_s']:.3f} v_d {terms['v_d']:.3f} "
          f"align {terms['align']:.4f}) lr {values['lr']:.2e} "
          f"{rate['samples_per_s']:.1f} samples/s data-wait {local['data_wait']:.0%}", flush=True)


def monitor(engine, cfg: Config, device: torch.device, rank: int, world: int, epoch: int) -> float:
    """The query backbone's leave-one-out k-NN accuracy on data.eval, over every rank."""
    from dclr_dist.evaluation.probes import knn_monitor

    acc = knn_monitor(engine.module.encoder_q.f, cfg, device, rank, world)
    if rank == 0:
        print(f"epoch {epoch + 1}/{cfg.train.epochs} k-NN accuracy {acc:.1%} on data.eval (leave-one-out)",
              flush=True)
    return acc


# --------------------------------------------------------------------------- driver side


def check_data(cfg: Config) -> None:
    """Before any worker starts: missing shards or a bad epoch length fail in seconds."""
    from dclr_dist import data

    shards = data.listed_shards(cfg.data.train, "data.train")
    data.check_shards(shards, "data.train")
    data.batches_per_epoch(cfg.data, shards, cfg.train.workers)
    if cfg.eval.every:
        if not cfg.data.eval:
            raise data.DataError(f"eval.every is {cfg.eval.every} and data.eval is empty: set data.eval to "
                                 "labelled validation shards for the k-NN monitor, or eval.every=0")
        data.check_shards(data.resolve_shards(cfg.data.eval), "data.eval")


def fit(cfg: Config, callbacks: list | None = None):
    """Start (or resume) the run on the Ray cluster in RAY_ADDRESS, or a local one.

    ``callbacks``: Ray Train callbacks, e.g. Tune's TuneReportCallback when a sweep runs this.
    Raises launch.TrainingFailed when the restarts of train.max_failures are spent.
    """
    launch.make_paths_absolute(cfg)
    check_data(cfg)
    run_url = storage.join(cfg.train.storage_path, cfg.train.name)
    epoch = latest(run_url, cfg.train.workers, cfg.train.zero_stage)
    if epoch is not None:
        print(f"resuming {run_url} from epoch {epoch}", flush=True)
    trainer = launch.torch_trainer(
        train_loop, {"config": cfg.to_dict(), "run_url": run_url}, cfg, cfg.train.name,
        callbacks=[*(callbacks or []), latest_json_callback(run_url)],
        keep_checkpoints=cfg.train.keep_checkpoints, max_failures=cfg.train.max_failures)
    return launch.run(trainer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dclr_dist.train",
        description="DCLR pretraining on Ray Train with one DeepSpeed engine per worker. The demo (synthetic "
                    "shards made on first use, then this, then evaluation) is `python -m dclr_dist.demo`.",
        epilog="Ray: RAY_ADDRESS selects the cluster (`ray job submit` sets it); without it a local cluster "
               "starts. Object storage: s3:// URLs use AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
               "AWS_SECRET_ACCESS_KEY / AWS_PROFILE; the workers get the endpoint, region and profile name, "
               "never credentials (they use their node's). Re-running with the same train.name resumes the run.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, metavar="FILE.yaml",
                        help="config file, or the name of a shipped recipe: demo, ucf101_r2plus1d, k400_r2plus1d")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.workers=8 loss.tau=0.1 data.batch_size=16")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return train(cfg)


def train(cfg: Config) -> int:
    """``fit`` as a command: 0 when done, 1 with a one-line error on stderr otherwise."""
    from dclr_dist.data import DataError

    try:
        result = fit(cfg)
    except (FileNotFoundError, storage.StorageError, ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except launch.TrainingFailed as e:
        print(f"error: training failed: {e}", file=sys.stderr)
        return 1
    m = result.metrics or {}
    print(f"done: {m.get('epoch')} epochs, {m.get('step')} steps, final loss {m.get('loss', float('nan')):.4f}; "
          f"checkpoint {result.checkpoint.path if result.checkpoint else None}")
    return 0


if __name__ == "__main__":
    # Ray pickles the functions of __main__ by value, with every global they reach (and
    # torch.backends.cudnn cannot be pickled); those of the importable module go by name.
    from dclr_dist.train import main as _main

    sys.exit(_main())
