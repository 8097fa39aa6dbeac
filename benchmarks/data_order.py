"""How well does the reader mix a corpus? The real shard order and shuffle buffer, on labels only.

    python benchmarks/data_order.py

Replays the training reader's order (``dclr_dist.data.shard_order``: a per-epoch shard
permutation shared out among every DataLoader worker of every rank, then WebDataset's
shuffle buffer per stream, batches taken in turn from each rank's workers) on sample ids
and labels instead of videos, for shards packed class-sorted (the listing's order) and
shuffled (``shard.shuffle``, the default), at two scales:

- the scene-bias benchmark / demo: 192 videos, 4 classes, shards of 64, 1 rank x 1 worker,
  buffer 64 (16 before the first sample), batch 16, queue 128;
- Kinetics-400 on 32 GPUs (``configs/k400_r2plus1d.yaml``): 240,000 videos, 400 classes,
  shards of 1,000, 32 ranks x 10 workers, buffer 1,024 (64 first), batch 16 per rank,
  queue 16,384.

Prints, per setting, measured over 2 epochs: the fraction of same-class pairs within a
rank's batch (against 1 / classes for i.i.d. batches), the fraction of queries whose own
video already has a key in the queue (a false negative for plain contrast, a likely false
positive for DCLR's neighbour search), and the videos read twice within an epoch.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dclr_dist.data import shard_order  # noqa: E402

SCALES = {
    "scene-bias (192 videos)": dict(videos=192, classes=4, shard=64, ranks=1, workers=1, buffer=64, initial=16,
                                    batch=16, queue=128),
    "Kinetics-400, 32 GPUs": dict(videos=240_000, classes=400, shard=1000, ranks=32, workers=10, buffer=1024,
                                  initial=64, batch=16, queue=16384),
}


def simulate(videos: int, classes: int, shard: int, ranks: int, workers: int, buffer: int, initial: int, batch: int,
             queue: int, packing: str, epochs: int = 2, seed: int = 0) -> dict:
    labels = np.repeat(np.arange(classes), -(-videos // classes))[:videos]  # the listing: class by class
    order = np.arange(videos) if packing == "class-sorted" else np.random.default_rng(seed).permutation(videos)
    shards = [order[i:i + shard] for i in range(0, videos, shard)]
    streams = ranks * workers
    steps = videos // (ranks * batch)  # one pass per epoch, as data.epoch_samples = corpus size
    same, pairs, own, queries, dupes = 0, 0, 0, 0, 0
    last_seen: dict[int, int] = {}
    window = queue // (ranks * batch)  # steps a key stays in the queue
    step_global = 0
    for epoch in range(epochs):
        batches = {}
        for s in range(streams):
            count = steps // workers + (s % workers < steps % workers)
            ids = (int(i) for k in shard_order(len(shards), seed, epoch, s, streams) for i in shards[k])
            stream = wds.shuffle(buffer, initial, rng=random.Random(seed * 7919 + epoch * 104729 + s))(ids)
            batches[s] = [[next(stream) for _ in range(batch)] for _ in range(count)]
        seen = Counter()
        for t in range(steps):
            step = []
            for r in range(ranks):
                b = batches[r * workers + t % workers][t // workers]
                lab = Counter(labels[i] for i in b)
                same += sum(n * (n - 1) // 2 for n in lab.values())
                pairs += batch * (batch - 1) // 2
                step += b
            for i in step:
                own += step_global - last_seen.get(i, -10**9) <= window
                queries += 1
            for i in step:
                last_seen[i] = step_global
                seen[i] += 1
            step_global += 1
        dupes += sum(n - 1 for n in seen.values() if n > 1)
    return {"same_class": same / pairs, "iid": 1 / classes, "own_in_queue": own / queries,
            "duplicates_per_epoch": dupes / epochs / videos}


def main() -> int:
    print(f"{'scale':26s} {'packing':13s} {'same-class pairs':>17s} {'(iid)':>7s} {'own key in queue':>17s} "
          f"{'read twice/epoch':>17s}")
    for name, scale in SCALES.items():
        for packing in ("class-sorted", "shuffled"):
            r = simulate(**scale, packing=packing)
            print(f"{name:26s} {packing:13s} {100 * r['same_class']:16.1f}% {100 * r['iid']:6.2f}% "
                  f"{100 * r['own_in_queue']:16.1f}% {100 * r['duplicates_per_epoch']:16.1f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
