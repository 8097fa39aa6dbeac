"""The trainer's overhead: full trainer (Ray Train + DeepSpeed, 1 worker) against a plain loop.

    python benchmarks/train.py [--epochs 4] [key=value ...]

Both run the same model, loss, optimizer and data pipeline (dclr_dist/configs/demo.yaml with one
worker, on synthetic shards made here), in this one run. Throughput is samples/s over
the epochs after the first (start-up and warm-up excluded), as the trainer itself reports
it; the trainer's wall time including Ray and DeepSpeed start-up is printed too.
Target: trainer >= 0.9 x plain loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dclr_dist import data
from dclr_dist.config import load_config
from dclr_dist.demo import DEMO_CONFIG
from dclr_dist.engine import lr_lambda
from dclr_dist.loss import DCLRLoss
from dclr_dist.model import DCLR
from dclr_dist.shard.pack import pack
from dclr_dist.shard.synth import write_corpus
from dclr_dist.train import fit


def plain_loop(cfg, epochs: int) -> list[float]:
    """samples/s per epoch of a single-process PyTorch loop: no Ray, no DeepSpeed."""
    torch.manual_seed(cfg.train.seed)
    model = DCLR.from_config(cfg.model, in_batch=cfg.loss.in_batch)
    criterion = DCLRLoss(dim=cfg.model.dim, **asdict(cfg.loss))
    batches = data.batches_per_epoch(cfg.data, data.resolve_shards(cfg.data.train), 1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, batches))
    rates = []
    # One loader for the run, as the trainer's.
    it = iter(data.train_loader(cfg.data, cfg.views, rank=0, world_size=1, epochs=epochs))
    for _ in range(epochs):
        start, samples = time.perf_counter(), 0
        for _ in range(batches):
            batch = data.to_device(next(it), "cpu", cfg.views)
            loss = criterion(model(batch))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            model.momentum_update()
            samples += batch["label"].shape[0]
        rates.append(samples / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("overrides", nargs="*", help="config overrides on top of dclr_dist/configs/demo.yaml")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    manifest = write_corpus(
        root / "videos",
        num_classes=6,
        train_per_class=16,
        test_per_class=1,
        workers=os.cpu_count() or 1,
        progress=False,
    )
    shard_cfg = load_config(DEMO_CONFIG).shard
    pack(str(manifest), str(root / "train"), shard_cfg, split="train", workers=os.cpu_count() or 1, progress=False)
    cfg = load_config(
        DEMO_CONFIG,
        [
            f"data.train=[{root / 'train'}]",
            "cluster.workers=1",
            f"train.epochs={args.epochs}",
            f"train.storage_path={root / 'runs'}",
            "train.name=bench",
            f"checkpoint.every={args.epochs}",
            "eval.every=0",
            "data.eval=[]",
            *args.overrides,
        ],
    )
    torch.set_num_threads(1)  # a Ray worker with cpus_per_worker=1 gets one intra-op thread too

    plain = plain_loop(cfg, args.epochs)
    os.environ["RAY_TMPDIR"] = "/tmp/rt-bench"
    start = time.perf_counter()
    result = fit(cfg)
    wall = time.perf_counter() - start
    rows = [
        json.loads(line) for line in (root / "runs" / "bench" / "metrics" / "metrics.jsonl").read_text().splitlines()
    ]
    trainer = [r["samples_per_s_worker"] for r in rows if r["kind"] == "epoch"]
    assert result.error is None and len(trainer) == args.epochs

    p, t = statistics.mean(plain[1:]), statistics.mean(trainer[1:])
    samples = data.batches_per_epoch(cfg.data, data.resolve_shards(cfg.data.train), 1) * cfg.data.batch_size
    print(
        f"config: dclr_dist/configs/demo.yaml, 1 worker, {args.epochs} epochs of {samples} samples, "
        f"{cfg.model.arch} width {cfg.model.width}, {cfg.views.frames}x{cfg.views.size}x{cfg.views.size} clips"
    )
    print(f"{'':<28}{'samples/s (epochs 2+)':>22}{'per epoch':>40}")
    print(f"{'plain PyTorch loop':<28}{p:>22.1f}{'  ' + ', '.join(f'{r:.1f}' for r in plain):>40}")
    print(f"{'trainer (Ray+DeepSpeed)':<28}{t:>22.1f}{'  ' + ', '.join(f'{r:.1f}' for r in trainer):>40}")
    print(
        f"trainer / plain = {t / p:.2f} (target >= 0.90: {'met' if t / p >= 0.9 else 'MISSED'}); "
        f"trainer wall time incl. start-up {wall:.1f} s"
    )


if __name__ == "__main__":
    main()
