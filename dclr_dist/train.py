"""``python -m dclr_dist.train``: DCLR pretraining on Ray Train, one DeepSpeed engine per worker.

    python -m dclr_dist.train --config demo                     # the demo's recipe (shards must exist)
    python -m dclr_dist.train --config dclr_dist/configs/ucf101_r2plus1d.yaml cluster.workers=16
    ray job submit --working-dir . -- python -m dclr_dist.train --config k400_r2plus1d

The driver (``fit``) validates the config and checks the shards before Ray starts a worker.
Each worker (``train_loop``) builds its engine (``dclr_dist.engine``), resumes from the
run's newest checkpoint if there is one, then runs epochs: train, measure, rank best/,
checkpoint or report (``dclr_dist.checkpoint``, ``dclr_dist.metrics``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dclr_dist import launch, storage
from dclr_dist.checkpoint import (
    latest,
    latest_json_callback,
    load_checkpoint,
    report_with_checkpoint,
    resume_refusal,
    save_best,
)
from dclr_dist.config import Config, ConfigError, config_from_dict, load_config
from dclr_dist.engine import build, seek_schedule
from dclr_dist.metrics import EpochMeter, MetricsLog, count_nodes, memory_mb, reduce

# --------------------------------------------------------------------------- worker side


@dataclass
class Rank:
    """One worker of the run: what each of its steps needs."""

    cfg: Config
    run_url: str
    rank: int
    world: int
    device: torch.device
    engine: Any
    criterion: Any
    log: MetricsLog | None = None
    # The driver's console (launch.Console's actor), rank 0 only; None: lines are printed here.
    console: Any = None
    postfix: dict = field(default_factory=dict)  # the progress bar's figures from the last step log


def train_loop(loop_config: dict) -> None:
    """Ray Train worker entry point: one rank of the pretraining job."""
    import ray.train
    import ray.train.torch

    from dclr_dist import data

    cfg = config_from_dict(loop_config["config"], where="train_loop_config")
    ctx = ray.train.get_context()
    world, device = ctx.get_world_size(), ray.train.torch.get_device()
    # Initial weights from the run's seed (DeepSpeed also broadcasts rank 0's); augmentation
    # randomness comes from data.seed, the epoch and the stream, not from torch's RNG.
    torch.manual_seed(cfg.train.seed)
    batches = data.batches_per_epoch(cfg.data, data.resolve_shards(cfg.data.train), world)
    steps_per_epoch = max(1, batches // cfg.train.grad_accum)
    r = Rank(
        cfg, loop_config["run_url"], ctx.get_world_rank(), world, device, *build(cfg, world, steps_per_epoch, device)
    )
    # best/ keeps the epoch with the highest k-NN accuracy on data.eval where it is measured
    # (eval.every; contrastive losses are not comparable across temperatures), else the lowest loss.
    ranking = "knn_acc" if cfg.eval.every else "loss"
    start_epoch, best, finished = resume(r, steps_per_epoch, ranking)
    if finished is not None:
        # Already finished (e.g. a sweep retried after the run ended): report its final
        # metrics again so the caller (Tune) sees the result instead of nothing.
        ray.train.report(finished)
        return
    r.log = MetricsLog(r.run_url) if r.rank == 0 else None
    r.console = loop_config.get("console") if r.rank == 0 else None
    if r.log is not None and start_epoch:
        r.log.write("resume", start_epoch, {"epoch": start_epoch})
        say(r, f"resumed {r.run_url} after epoch {start_epoch}")
    nodes, step, last_checkpoint = count_nodes(), start_epoch * steps_per_epoch, time.monotonic()
    # One loader for the run: its workers stream on across epoch boundaries (no fork, no refill).
    epochs = cfg.train.epochs - start_epoch
    it = iter(data.train_loader(cfg.data, cfg.views, rank=r.rank, world_size=world, epoch=start_epoch, epochs=epochs))
    for epoch in range(start_epoch, cfg.train.epochs):
        meter = EpochMeter()
        step = run_epoch(r, it, batches, epoch, step, meter)
        # Rank 0's clock decides a checkpoint by time for every rank, carried by the epoch's sum:
        # clocks and epoch ends differ between ranks, and ranks that disagree would hang in report.
        due = (
            r.rank == 0
            and cfg.checkpoint.minutes is not None
            and time.monotonic() - last_checkpoint >= 60 * cfg.checkpoint.minutes
        )
        metrics, flags = meter.epoch(batches, device, {"checkpoint_due": due})
        metrics.update(
            epoch=epoch + 1,
            step=step,
            lr=r.engine.get_lr()[0],
            world_size=world,
            nodes=nodes,
            zero_stage=cfg.engine.zero_stage,
            queue_filled=int(r.criterion.queue_filled),
        )
        if end_epoch(r, epoch, metrics, best, flags["checkpoint_due"]):
            last_checkpoint = time.monotonic()
    if r.log is not None:
        r.log.close()


def end_epoch(r: Rank, epoch: int, metrics: dict, best: dict, checkpoint_due: bool) -> bool:
    """Measure (k-NN monitor), rank best/ (``best`` is updated in place), log, then checkpoint or
    report the epoch; True if it checkpointed."""
    import ray.train

    cfg, last = r.cfg, epoch + 1 == r.cfg.train.epochs
    if cfg.eval.every and ((epoch + 1) % cfg.eval.every == 0 or last):
        metrics["knn_acc"] = monitor(r, epoch)
    if r.rank == 0:
        say(r, epoch_line(cfg, epoch, metrics))
    value, ranking = metrics.get(best["metric"]), best["metric"]
    if value is not None and (
        best["value"] is None or (value > best["value"] if ranking == "knn_acc" else value < best["value"])
    ):
        best["value"] = value
        if r.log is not None:  # rank 0
            save_best(r.engine, cfg, r.world, epoch, r.run_url, metrics, r.log.writes)
    if r.log is not None:
        r.log.write("epoch", epoch + 1, metrics)
        r.log.sync()
    every = cfg.checkpoint.every
    if last or (every and (epoch + 1) % every == 0) or checkpoint_due:
        report_with_checkpoint(r.engine, r.criterion, cfg, epoch, best, r.world, r.rank, r.run_url, metrics)
        if r.rank == 0:
            say(r, f"epoch {epoch + 1}: checkpoint written (uploaded in the background) under {r.run_url}")
        return True
    # In the background too: reports are delivered in order, so a synchronous one would wait for
    # the previous checkpoint's upload.
    ray.train.report(metrics, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
    return False


def resume(r: Rank, steps_per_epoch: int, ranking: str) -> tuple[int, dict, dict | None]:
    """(first epoch to run, best so far, the final metrics if the run had already finished) from
    the checkpoint Ray Train restored, if any; engine, queues and lr schedule are loaded."""
    import ray.train

    best = {"metric": ranking, "value": None}
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, best, None
    with checkpoint.as_directory() as d:
        meta = json.loads((Path(d) / "meta.json").read_text())
        saved = config_from_dict(meta["config"], where=f"{r.run_url} checkpoint's meta.json")  # older keys migrated
        why = resume_refusal(meta["world_size"], saved.engine.zero_stage, r.world, r.cfg.engine.zero_stage)
        if why:
            raise RuntimeError(f"the checkpoint in {r.run_url} {why}, or choose a new train.name to start afresh.")
        client = load_checkpoint(r.engine, d, storage.join(r.run_url, Path(checkpoint.path).name))
    r.criterion.load_state_dict(client["criterion"])
    start_epoch = client["epoch"] + 1
    seek_schedule(r.engine, r.cfg, r.world, start_epoch * steps_per_epoch)
    # A run resumed with another eval.every ranks afresh, as does one checkpointed before
    # best/ was ranked by k-NN (its "best" is a bare loss).
    if isinstance(client["best"], dict) and client["best"]["metric"] == ranking:
        best = client["best"]
    return start_epoch, best, client["metrics"] if start_epoch >= r.cfg.train.epochs else None


def run_epoch(r: Rank, it, batches: int, epoch: int, step: int, meter: EpochMeter) -> int:
    """Train on ``batches`` batches of ``it``, counting into ``meter``; returns the optimizer step reached."""
    from dclr_dist import data

    engine, criterion = r.engine, r.criterion
    engine.train()
    criterion.train()
    shown = 0.0
    for i in range(batches):
        if r.console is not None and time.monotonic() - shown >= 0.5:  # at most twice a second
            shown = time.monotonic()
            progress(r, epoch, i, batches)
        t0 = time.perf_counter()
        batch = next(it)
        meter.batch(batch, time.perf_counter() - t0)
        batch = data.to_device(batch, r.device, r.cfg.views)
        losses = criterion(engine(batch), batch["video"])
        engine.backward(losses["loss"])
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        if boundary:
            engine.module.momentum_update()
            step += 1
        meter.losses(losses)
        if boundary and step % r.cfg.train.log_every == 0:
            log_step(r, losses, meter.window(), epoch, step)
    if r.console is not None:
        progress(r, epoch, batches, batches)
    return step


def progress(r: Rank, epoch: int, batch: int, batches: int) -> None:
    """Where the epoch stands, for the driver's progress bar (no wait: a fire-and-forget call)."""
    state = {"epoch": epoch + 1, "epochs": r.cfg.train.epochs, "batch": batch, "batches": batches}
    r.console.update.remote({**state, "postfix": r.postfix})


def log_step(r: Rank, losses: dict, local: dict, epoch: int, step: int) -> None:
    """Every rank's loss terms (mean) and throughput (sum), written and printed by rank 0."""
    terms = reduce({k: float(v.detach()) for k, v in losses.items()}, r.device)
    rate = reduce({"samples_per_s": local["samples_per_s_worker"]}, r.device, op="sum")
    if r.log is None:
        return
    values = {**terms, **local, **rate, "lr": r.engine.get_lr()[0], "epoch": epoch, "memory_mb": memory_mb(r.device)}
    r.log.write("step", step, values)
    r.postfix = {
        "loss": f"{terms['loss']:.3f}",
        "samples/s": f"{rate['samples_per_s']:.1f}",
        "data wait": f"{local['data_wait']:.0%}",
    }
    if r.console is None:  # no driver console: the step line, as a log
        print(
            f"epoch {epoch + 1}/{r.cfg.train.epochs} step {step} loss {terms['loss']:.4f} "
            f"(vv {terms['vv']:.3f} v_s {terms['v_s']:.3f} v_d {terms['v_d']:.3f} "
            f"align {terms['align']:.4f}) lr {values['lr']:.2e} "
            f"{rate['samples_per_s']:.1f} samples/s data-wait {local['data_wait']:.0%}",
            flush=True,
        )


def monitor(r: Rank, epoch: int) -> float:
    """The query backbone's leave-one-out k-NN accuracy on data.eval, over every rank."""
    from dclr_dist.evaluation.probes import knn_monitor

    return knn_monitor(r.engine.module.encoder_q.f, r.cfg, r.device, r.rank, r.world)


def say(r: Rank, text: str) -> None:
    """A line for the person running this: on the driver's console, or printed here without one."""
    if r.console is not None:
        r.console.line.remote(text)
    else:
        print(text, flush=True)


def epoch_line(cfg: Config, epoch: int, m: dict) -> str:
    """One epoch in one line: loss and its terms, throughput, data wait, damage, the k-NN monitor."""
    terms = " ".join(f"{k} {m[k]:.3f}" for k in ("vv", "v_s", "v_d", "align") if k in m)
    knn = f", k-NN {m['knn_acc']:.1%} on data.eval" if "knn_acc" in m else ""
    damage = f", {m['skipped_samples']} damaged samples skipped" if m.get("skipped_samples") else ""
    return (
        f"epoch {epoch + 1}/{cfg.train.epochs}: loss {m['loss']:.4f} ({terms}), {m['samples_per_s']:.1f} samples/s, "
        f"data wait {m['data_wait']:.0%}{damage}{knn}"
    )


# --------------------------------------------------------------------------- driver side


def check_data(cfg: Config) -> None:
    """Before any worker starts: missing shards or a bad epoch length fail in seconds."""
    from dclr_dist import data

    shards = data.listed_shards(cfg.data.train, "data.train")
    data.check_shards(shards, "data.train")
    data.batches_per_epoch(cfg.data, shards, cfg.cluster.workers)
    if cfg.eval.every:
        if not cfg.data.eval:
            raise data.DataError(
                f"eval.every is {cfg.eval.every} and data.eval is empty: set data.eval to "
                "labelled validation shards for the k-NN monitor, or eval.every=0"
            )
        data.check_shards(data.resolve_shards(cfg.data.eval), "data.eval")


def fit(cfg: Config, callbacks: list | None = None):
    """Start (or resume) the run on the Ray cluster in RAY_ADDRESS, or a local one.

    ``callbacks``: Ray Train callbacks, e.g. Tune's TuneReportCallback when a sweep runs this
    (Tune then has the console; otherwise :class:`launch.Console` shows the run's progress).
    Raises launch.TrainingFailed when the restarts of cluster.max_failures are spent.
    """
    launch.make_paths_absolute(cfg)
    check_data(cfg)
    run_url = storage.join(cfg.train.storage_path, cfg.train.name)
    epoch = latest(run_url, cfg.cluster.workers, cfg.engine.zero_stage)
    if epoch is not None:
        print(f"resuming {run_url} from epoch {epoch}", flush=True)
    launch.connect_ray()
    console = None if callbacks else launch.Console()
    trainer = launch.torch_trainer(
        train_loop,
        {"config": cfg.to_dict(), "run_url": run_url, "console": console and console.handle},
        cfg,
        cfg.train.name,
        callbacks=[*(callbacks or []), latest_json_callback(run_url)],
        keep_checkpoints=cfg.checkpoint.keep,
        max_failures=cfg.cluster.max_failures,
    )
    with console or contextlib.nullcontext():
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        required=True,
        metavar="FILE.yaml",
        help="config file, or the name of a shipped recipe: demo, ucf101_r2plus1d, k400_r2plus1d",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the workers' own output (Ray's, DeepSpeed's, every rank's) as well; "
        "DCLR_VERBOSE=1 or RAY_LOG_TO_DRIVER=1 do the same",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. cluster.workers=8 loss.tau=0.1 data.batch_size=16",
    )
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ["DCLR_VERBOSE"] = "1"
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
        more = "" if launch.verbose() else " (--verbose shows the workers' output)"
        print(f"error: training failed: {e}{more}", file=sys.stderr)
        return 1
    m = result.metrics or {}
    print(
        f"done: {m.get('epoch')} epochs, {m.get('step')} steps, final loss {m.get('loss', float('nan')):.4f}; "
        f"checkpoint {result.checkpoint.path if result.checkpoint else None}"
    )
    return 0


if __name__ == "__main__":
    # Ray pickles the functions of __main__ by value, with every global they reach (and
    # torch.backends.cudnn cannot be pickled); those of the importable module go by name.
    from dclr_dist.train import main as _main

    sys.exit(_main())
