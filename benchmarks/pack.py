"""Packing throughput and peak memory, measured in this run.

    python benchmarks/pack.py [--sizes 100 1000] [--workers 1 2]

For each corpus size: write a synthetic corpus (not timed), then run
``python -m dclr_dist.shard`` as a subprocess per worker count, polling the resident memory
of its whole process tree (packer + transcoding workers). Prints videos/s and MB/s (source
bytes read) per worker, and the peak memory; flat memory means the peak does not grow with
the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from dclr_dist.shard.synth import write_corpus


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_pack(manifest: Path, out: Path, workers: int) -> tuple[float, int, dict]:
    cmd = [
        sys.executable,
        "-m",
        "dclr_dist.shard",
        "--input",
        str(manifest),
        "--split",
        "train",
        "--output",
        str(out),
        "--workers",
        str(workers),
        "--no-progress",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"packing failed: {' '.join(cmd)}")
    return elapsed, peak, json.loads((out / "index.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="corpus sizes (videos)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    parser.add_argument("--workdir", default=None, help="where corpora go (default: a temporary folder)")
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pack-"))
    print(f"machine: {os.cpu_count()} cores; corpora in {root}")
    print(
        f"{'videos':>7} {'workers':>7} {'seconds':>8} {'videos/s':>9} {'videos/s/worker':>16} "
        f"{'MB/s/worker (in)':>17} {'MB out':>7} {'peak RSS MB':>12}"
    )
    for n in args.sizes:
        per_class = max(1, n // 6)
        corpus = root / f"synth-{n}"
        manifest = write_corpus(
            corpus,
            num_classes=6,
            train_per_class=per_class,
            test_per_class=1,
            workers=max(args.workers),
            progress=False,
        )
        sources = [p for p in (corpus / "train").rglob("*.mp4")]
        in_mb = sum(p.stat().st_size for p in sources) / 1e6
        for w in args.workers:
            out = root / f"shards-{n}-w{w}"
            elapsed, peak, index = run_pack(manifest, out, w)
            assert index["samples"] + index["rejected"] == index["inputs"] == len(sources)
            print(
                f"{len(sources):>7} {w:>7} {elapsed:>8.1f} {len(sources) / elapsed:>9.1f} "
                f"{len(sources) / elapsed / w:>16.1f} {in_mb / elapsed / w:>17.2f} "
                f"{index['bytes'] / 1e6:>7.1f} {peak / 2**20:>12.0f}"
            )


if __name__ == "__main__":
    main()
