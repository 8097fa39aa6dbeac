"""How well does the reader mix a corpus, and what does an epoch boundary cost?

    python benchmarks/data_order.py [--skip-boundary]

Order. Replays the training reader's order on sample ids and labels instead of videos,
for shards packed class-sorted (the listing's order) and shuffled (``shard.shuffle``, the
default), at two scales:

- the scene-bias benchmark / demo: 192 videos, 4 classes, shards of 64, 1 rank x 1 worker,
  buffer 64 (16 before the first sample), batch 16, queue 128;
- Kinetics-400 on 32 GPUs (``dclr_dist/configs/k400_r2plus1d.yaml``): 240,000 videos, 400 classes,
  shards of 1,000, 32 ranks x 10 workers, buffer 1,024 (64 first), batch 16 per rank,
  queue 16,384; and the same with shards of 200.

Two readers: "per-epoch" is the reader before issue 13 (a new DataLoader every epoch: each
stream takes every G-th whole shard of the epoch's permutations through a fresh shuffle
buffer, and what the buffer holds at the epoch's end is dropped); "one loader" is
``dclr_dist.data`` now (``stream_parts``: each stream reads its range of the epoch's
permutation; ``epoch_order``: the buffer drains at the epoch's end). Prints, per setting,
measured over 2 epochs: same-class pairs within a rank's batch (against 1 / classes for
i.i.d. batches), queries whose own video already has a key in the queue, videos read
twice, or not at all, within an epoch, and samples a stream passes without using them (the
per-epoch reader's dropped buffer fill; the samples before a range that begins inside a
shard, seeked past on disk, transferred and dropped on S3), all per video of the corpus.

Boundary. Packs a small synthetic corpus and reads 4 epochs with 2 DataLoader workers
through real ``train_loader``s, one per epoch (as the trainer did) and one for the run,
sleeping a fixed "training step" after each batch; prints, for the epochs after the first,
the mean wait for an epoch's first batch and for all its batches, and the wall time.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from itertools import chain, islice
from pathlib import Path

import numpy as np
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dclr_dist import data  # noqa: E402

SCALES = {
    "scene-bias (192 videos)": dict(
        videos=192, classes=4, shard=64, ranks=1, workers=1, buffer=64, initial=16, batch=16, queue=128
    ),
    "Kinetics-400, 32 GPUs": dict(
        videos=240_000, classes=400, shard=1000, ranks=32, workers=10, buffer=1024, initial=64, batch=16, queue=16384
    ),
    "Kinetics-400, 32 GPUs, shards of 200": dict(
        videos=240_000, classes=400, shard=200, ranks=32, workers=10, buffer=1024, initial=64, batch=16, queue=16384
    ),
}
READERS = ("per-epoch", "one loader")


def _per_epoch_stream(
    shards: list[np.ndarray], seed: int, epoch: int, stream: int, streams: int, buffer: int, initial: int, take: int
) -> tuple[list[int], int]:
    """A stream's ids in one epoch, and how many samples it passed without using them."""
    pulled = Counter()
    ids = (
        pulled.update(["n"]) or int(i)
        for k in data.shard_order(len(shards), seed, epoch, stream, streams)
        for i in shards[k]
    )
    rng = random.Random(seed * 7919 + epoch * 104729 + stream)
    got = list(islice(wds.shuffle(buffer, initial, rng=rng)(ids), take))
    return got, pulled["n"] - take  # the buffer's fill, dropped at the epoch's end


def _one_loader_stream(
    shards: list[np.ndarray], seed: int, epoch: int, stream: int, quotas: list[int], buffer: int, initial: int
) -> tuple[list[int], int]:
    listed = [data.Shard(str(k), len(ids), 16) for k, ids in enumerate(shards)]
    parts = data.stream_parts(listed, seed, epoch, stream, quotas)
    first = next(parts)
    ids = (int(i) for p in chain([first], parts) for i in shards[int(p.shard.url)][p.first : p.end])
    rng = np.random.default_rng([seed, epoch, stream, len(quotas)])
    order = data.epoch_order(ids, quotas[stream], buffer, initial, random.Random(int(rng.integers(2**63))))
    return list(islice(order, quotas[stream])), first.first  # the samples before its range in its first shard


def simulate(
    videos: int,
    classes: int,
    shard: int,
    ranks: int,
    workers: int,
    buffer: int,
    initial: int,
    batch: int,
    queue: int,
    packing: str,
    reader: str,
    epochs: int = 2,
    seed: int = 0,
) -> dict:
    labels = np.repeat(np.arange(classes), -(-videos // classes))[:videos]  # the listing: class by class
    order = np.arange(videos) if packing == "class-sorted" else np.random.default_rng(seed).permutation(videos)
    shards = [order[i : i + shard] for i in range(0, videos, shard)]
    streams = ranks * workers
    steps = videos // (ranks * batch)  # one pass per epoch, as data.epoch_samples = corpus size
    counts = [steps // workers + (w < steps % workers) for w in range(workers)]
    quotas = [c * batch for c in counts] * ranks
    same, pairs, own, queries, twice, never, unused = 0, 0, 0, 0, 0, 0, 0
    last_seen: dict[int, int] = {}
    window = queue // (ranks * batch)  # steps a key stays in the queue
    step_global = 0
    for epoch in range(epochs):
        batches = {}
        for s in range(streams):
            if reader == "per-epoch":
                ids, passed = _per_epoch_stream(shards, seed, epoch, s, streams, buffer, initial, quotas[s])
            else:
                ids, passed = _one_loader_stream(shards, seed, epoch, s, quotas, buffer, initial)
            unused += passed
            batches[s] = [ids[i : i + batch] for i in range(0, len(ids), batch)]
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
                own += step_global - last_seen.get(i, -(10**9)) <= window
                queries += 1
            for i in step:
                last_seen[i] = step_global
                seen[i] += 1
            step_global += 1
        twice += sum(n - 1 for n in seen.values() if n > 1)
        never += videos - len(seen)
    return {
        "same_class": same / pairs,
        "iid": 1 / classes,
        "own_in_queue": own / queries,
        "twice": twice / epochs / videos,
        "never": never / epochs / videos,
        "unused": unused / epochs / videos,
    }


def order_table() -> None:
    print(
        f"{'scale':37s} {'packing':13s} {'reader':11s} {'same-class pairs':>17s} {'(iid)':>7s} "
        f"{'own key in queue':>17s} {'read twice/epoch':>17s} {'unread/epoch':>13s} {'passed unused':>14s}"
    )
    for name, scale in SCALES.items():
        for packing in ("class-sorted", "shuffled"):
            for reader in READERS:
                r = simulate(**scale, packing=packing, reader=reader)
                print(
                    f"{name:37s} {packing:13s} {reader:11s} {100 * r['same_class']:16.1f}% {100 * r['iid']:6.2f}% "
                    f"{100 * r['own_in_queue']:16.1f}% {100 * r['twice']:16.1f}% {100 * r['never']:12.1f}% "
                    f"{100 * r['unused']:13.1f}%",
                    flush=True,
                )


def boundary_table(epochs: int = 4, step_s: float = 0.05) -> None:
    from dclr_dist.config import DataConfig, ShardConfig, ViewsConfig
    from dclr_dist.shard.pack import pack
    from dclr_dist.shard.synth import write_corpus

    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_corpus(
            Path(tmp) / "videos",
            num_classes=4,
            train_per_class=16,
            test_per_class=1,
            frames=32,
            size=64,
            progress=False,
        )
        pack(str(manifest), f"{tmp}/train", ShardConfig(short_side=64, max_samples=16), split="train", progress=False)
        d = DataConfig(
            train=[f"{tmp}/train"], batch_size=8, loader_workers=2, prefetch=2, shuffle_buffer=32, shuffle_initial=8
        )
        v = ViewsConfig(frames=8, stride=2, size=32)
        batches = data.batches_per_epoch(d, data.resolve_shards(d.train), 1)
        print(
            f"\n{epochs} epochs of {batches} batches of {d.batch_size} (64 videos, 64 px), {d.workers} workers, "
            f"a {1000 * step_s:.0f} ms step after each batch"
        )
        print(f"{'reader':11s} {'first batch of an epoch (s)':>28s} {'all its batches (s)':>20s} {'wall (s)':>9s}")
        for reader in READERS:
            first, other = [], []
            start = time.perf_counter()
            it = iter(data.train_loader(d, v, epoch=0, epochs=epochs)) if reader == "one loader" else None
            for epoch in range(epochs):
                t_epoch = time.perf_counter()
                if reader == "per-epoch":  # as the trainer did: the last epoch's workers stop, new ones fork
                    it = iter(data.train_loader(d, v, epoch=epoch))
                for i in range(batches):
                    t0 = time.perf_counter() if i else t_epoch
                    next(it)
                    if epoch:  # the first epoch starts alike for both
                        (other if i else first).append(time.perf_counter() - t0)
                    time.sleep(step_s)
            print(
                f"{reader:11s} {np.mean(first):28.3f} {(sum(first) + sum(other)) / (epochs - 1):20.3f} "
                f"{time.perf_counter() - start:9.1f}",
                flush=True,
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-boundary", action="store_true", help="only the order replay (no decoding)")
    args = parser.parse_args()
    order_table()
    if not args.skip_boundary:
        boundary_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
