"""Clips per second of one process: this pipeline against a naive reader and the decode ceiling.

    python benchmarks/data.py [--videos 200 --frames 180 --passes 2 --workdir benchmarks/out/data]

One run, one synthetic corpus (UCF-101's mean length by default: 7.2 s at 25 fps = 180
frames, 128x128, packed with the packer's defaults: short side 128, a keyframe every 16
frames), one process, one thread (torch and every decoder), 16x112x112 clips at stride 2
(the paper's recipe), two clips per video. Rows:

(a) this pipeline, ``train_loader`` with no DataLoader workers: shards from local disk,
    then from a moto S3 server (a separate process, so its CPU is not charged here).
    ``views.where: device``, the default for GPU nodes: the process reads, decodes and
    batches the frames; crops, colour augmentation and the static/dynamic views run on the
    accelerator. The "views on this CPU" row runs those in the process too (``where:
    worker``: their cost when there is no accelerator).
(b) naive: one mp4 file per video on disk (the same encoded bytes), each sample decoded in
    full with PyAV's defaults and converted to RGB, then cut into the two clips.
(c) decode ceiling: PyAV decoding exactly the frames (a) decodes, from bytes already in
    memory, converted to RGB: ``data.decode_frames`` and nothing else (no tar, no crop, no
    batching).

Targets: (a) >= 3x (b), (a) >= 80% of (c).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from dclr_dist import data, storage
from dclr_dist.config import DataConfig, ShardConfig, ViewsConfig
from dclr_dist.shard.pack import pack
from dclr_dist.shard.synth import write_corpus


def corpus(workdir: Path, videos: int, frames: int) -> tuple[Path, list[tuple[str, bytes, dict]]]:
    """Pack the corpus once (kept in workdir) and return the shard folder and every sample."""
    per_class = max(1, videos // 8)
    manifest = write_corpus(workdir / f"videos-{frames}", num_classes=8, train_per_class=per_class,
                            test_per_class=1, frames=frames, size=128, workers=os.cpu_count() or 1,
                            progress=False)
    shards = workdir / f"shards-{frames}"
    pack(str(manifest), str(shards), ShardConfig(max_samples=32), split="train",
         workers=os.cpu_count() or 1, progress=False)
    samples = []
    for tar_path in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}
        for name in sorted(members):
            if name.endswith(".mp4"):
                key = name[:-4]
                samples.append((key, members[name], json.loads(members[key + ".json"])))
    return shards, samples


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_pipeline(dcfg: DataConfig, vcfg: ViewsConfig) -> int:
    loader = data.train_loader(dcfg, vcfg)
    skipped = 0
    for batch in loader:
        skipped += int(batch["skipped_samples"])
        # where: device: the views would run on the accelerator after the copy, so not here.
        assert (batch["q"].dtype == torch.uint8) == (vcfg.where == "device")
    if skipped:
        raise SystemExit(f"the pipeline skipped {skipped} samples of a clean corpus")
    return len(loader)


def clip_starts(rng: np.random.Generator, n: int, span: int) -> list[int]:
    return [int(rng.integers(0, n - span + 1)) if n >= span else int(rng.integers(0, n)) for _ in range(2)]


def naive(files: list[Path], frames_per_video: list[int], vcfg: ViewsConfig, rng: np.random.Generator) -> None:
    T, s = vcfg.frames, vcfg.stride
    for path, n in zip(files, frames_per_video):
        with av.open(str(path)) as container:
            video = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        for start in clip_starts(rng, n, T * s + 1):
            clip = video[[(start + t * s) % len(video) for t in range(T + 1)]]  # (T+1, H, W, 3), as (a) ships
            assert clip.shape[0] == T + 1


def ceiling(samples: list[tuple[str, bytes, dict]], vcfg: ViewsConfig, gop: int, rng: np.random.Generator) -> None:
    T, s = vcfg.frames, vcfg.stride
    for _, mp4, record in samples:
        n = record["frames"]
        clips = [data.clip_indices(start, T + 1, s, n) for start in clip_starts(rng, n, T * s + 1)]
        data.decode_frames(mp4, sorted(set(clips[0] + clips[1])), gop)


def s3_server() -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--frames", type=int, default=180, help="frames per video (UCF-101 mean: 180)")
    parser.add_argument("--passes", type=int, default=2, help="passes over the corpus per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per fast row; the best counts")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workdir", default="benchmarks/out/data", help="corpus cache (kept between runs)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    shards, samples = corpus(workdir, args.videos, args.frames)
    files_dir = workdir / f"files-{args.frames}"
    files_dir.mkdir(exist_ok=True)
    files = []
    for key, mp4, _ in samples:
        path = files_dir / f"{key}.mp4"
        if not path.exists():
            path.write_bytes(mp4)
        files.append(path)
    frames = [r["frames"] for _, _, r in samples]
    vcfg = ViewsConfig()
    gop = ShardConfig().gop
    batches = args.passes * len(samples) // args.batch_size
    clips = 2 * batches * args.batch_size
    local = DataConfig(train=[str(shards)], batch_size=args.batch_size, workers=0, epoch_batches=batches)
    remote = dataclasses.replace(local, train=["s3://bench/shards"])
    rng = np.random.default_rng(0)
    print(f"corpus: {len(samples)} videos x {frames[0]} frames, 128x128, "
          f"{sum(len(m) for _, m, _ in samples) / 2**20:.1f} MiB of mp4; clips {vcfg.frames}x{vcfg.size}x{vcfg.size} "
          f"at stride {vcfg.stride}; {clips} clips per timing; one process, one thread; the best of "
          f"{args.repeats} interleaved timings for the fast rows (others share this machine)", flush=True)

    proc, endpoint = s3_server()
    try:
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        storage.s3_client().create_bucket(Bucket="bench")
        for path in sorted(shards.iterdir()):
            if path.is_file():
                storage.s3_client().upload_file(str(path), "bench", f"shards/{path.name}")
        # name -> (clips per timing, timings to take, what to time)
        rows = {
            "(a) pipeline, local shards": (clips, args.repeats, lambda: run_pipeline(local, vcfg)),
            "(a) pipeline, S3 (moto)": (clips, args.repeats, lambda: run_pipeline(remote, vcfg)),
            "(a) + views on this CPU (where: worker)": (clips, 1, lambda: run_pipeline(
                local, dataclasses.replace(vcfg, where="worker"))),
            "(b) naive: mp4 files, full decode, cut": (2 * len(files) * args.passes, 1, lambda: [
                naive(files, frames, vcfg, rng) for _ in range(args.passes)]),
            "(c) decode ceiling": (2 * len(samples) * args.passes, args.repeats, lambda: [
                ceiling(samples, vcfg, gop, rng) for _ in range(args.passes)]),
        }
        best: dict[str, tuple[float, float]] = {}
        for repeat in range(args.repeats):
            for name, (_, repeats, fn) in rows.items():
                if repeat < repeats:
                    wall, cpu = timed(fn)
                    if name not in best or wall < best[name][0]:
                        best[name] = (wall, cpu)
    finally:
        proc.terminate()
        proc.wait()

    rate = {name: rows[name][0] / wall for name, (wall, _) in best.items()}
    print()
    print("| reader | clips | seconds | clips/s | clips per CPU-second |")
    print("|---|---:|---:|---:|---:|")
    for name, (wall, cpu) in best.items():
        n = rows[name][0]
        print(f"| {name} | {n} | {wall:.2f} | {n / wall:.1f} | {n / cpu:.1f} |")
    b, c = rate["(b) naive: mp4 files, full decode, cut"], rate["(c) decode ceiling"]
    print()
    for label, name in (("local", "(a) pipeline, local shards"), ("S3", "(a) pipeline, S3 (moto)")):
        a = rate[name]
        print(f"(a) {label} / (b) = {a / b:.2f}x (target >= 3x: {'met' if a >= 3 * b else 'MISSED'}); "
              f"(a) {label} / (c) = {100 * a / c:.0f}% (target >= 80%: {'met' if a >= 0.8 * c else 'MISSED'})")


if __name__ == "__main__":
    main()
