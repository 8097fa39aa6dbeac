"""Synthetic scene-bias corpus: the class is the motion of a foreground object, the scene is not.

DCLR (arXiv 2207.05340) starts from the observation that clips of one video share their
background, and that the scene is easier to tell apart than the motion, so a plain
clip-contrastive model learns the scene. This corpus makes that setting measurable:

- the class is one of ``MOTIONS``, the motion of a foreground object; its shape, colour,
  size, position and speed are drawn the same way for every class;
- the background is a static procedural scene, a much easier cue than the motion, drawn
  uniformly from a pool independently of the class; train scenes are ids
  ``[0, train_scenes)`` and test scenes the next ``test_scenes`` ids, so a model that
  learned scenes instead of motions has nothing to recognise at test time;
- ``manifest.csv`` records each video's scene, so an evaluation can probe for the motion
  label and for the scene label on the same features.

Command line: ``python -m dclr_dist.shard synth`` (``dclr_dist/shard/__main__.py``).

The same arguments write byte-identical files. Every random draw comes from a generator
keyed by (seed, stream, ids); x264 runs on one thread (its output depends on the thread
count) and without macroblock-tree rate control (which made it nondeterministic), and the
container leaves out library versions and creation time (``transcode.deterministic_x264``,
the recipe the shards use too). So that the bytes also agree between machines, the pixel
arithmetic (``render``) avoids what varies with the CPU's vector instructions: no array-wide
sin/exp (per-frame scalars go through ``math``), no reductions, and RGB->YUV is computed
there rather than by swscale's SIMD paths.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace
from tqdm import tqdm

from dclr_dist.shard import family
from dclr_dist.shard.render import _OBJECT_STREAM, _PICK_STREAM, _render_video, _to_yuv420p
from dclr_dist.shard.transcode import MP4_BITEXACT, deterministic_x264

MOTIONS = ("move_right", "move_left", "move_up", "move_down", "orbit_cw", "orbit_ccw", "zoom_in", "zoom_out")
SPLITS = ("train", "test", "val")  # val last: adding it changes no train or test video

MIN_FRAMES = 16  # DCLR's clip length
MIN_SIZE = 32

# Encoding: these videos are a *source* that the packer re-encodes, so spend bits on
# quality (crf 18) to keep the second generation clean. Keyframes every 16 frames so a
# reader of this folder seeks cheaply too (docs/design.md, section 9).
CRF = 18
GOP = 16
PRESET = "veryfast"

_RECORD = "synth.json"


@dataclass(frozen=True)
class _Video:
    split: str
    label: str
    index: int  # within (split, label)
    scene: int
    variant: str | None = None  # a corpus of the family (``family.VARIANTS``); None: the scene-bias corpus

    @property
    def path(self) -> str:
        """Path relative to the corpus root, in UCF-101's class-folder layout."""
        return f"{self.split}/{self.label}/{self.label}_s{self.scene:03d}_v{self.index:04d}.mp4"

    def key(self, seed: int) -> list[int]:
        # MOTION_VOCABULARY extends MOTIONS, so the scene-bias corpus's videos keep their keys.
        return [seed, _OBJECT_STREAM, SPLITS.index(self.split), family.MOTION_VOCABULARY.index(self.label), self.index]


def write_corpus(
    out_dir: str | os.PathLike,
    *,
    variant: str | None = None,
    num_classes: int | None = None,
    train_per_class: int = 8,
    test_per_class: int = 4,
    train_scenes: int = 8,
    test_scenes: int = 4,
    val_per_class: int = 0,
    val_scenes: int = 0,
    frames: int = 48,
    size: int = 128,
    fps: int = 25,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Write ``out_dir/{train,test[,val]}/<motion>/*.mp4`` and ``out_dir/manifest.csv``; return the manifest's path.

    The classes are the first ``num_classes`` (default 6) of ``MOTIONS``, or with ``variant``
    the motions of that corpus of the family (``family.VARIANTS``, drawn by
    ``family.render_variant``; ``num_classes`` then takes the first of them); each video shows one scene
    from its split's pool (``train_scenes`` ids, then ``test_scenes`` more, then
    ``val_scenes`` more: a validation split whose scenes are neither trained on nor
    tested, for choosing checkpoints and settings without looking at the test split), ``frames``
    frames of ``size`` x ``size`` at ``fps``. The defaults make a 72-video demo corpus that
    takes seconds on a laptop.

    Videos already present are kept (an interrupted run completes where it stopped); the
    manifest is written last, so its presence means the corpus is complete. A folder
    written with other arguments is refused rather than silently mixed: the arguments are
    recorded in ``synth.json``.
    """
    motions = variant_motions(variant)
    if num_classes is None:
        num_classes = len(motions) if variant else 6
    params = _checked_params(
        motions=motions,
        num_classes=num_classes,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
        train_scenes=train_scenes,
        test_scenes=test_scenes,
        val_per_class=val_per_class,
        val_scenes=val_scenes,
        frames=frames,
        size=size,
        fps=fps,
        seed=seed,
        workers=workers,
    )
    if variant:  # two variants may share their motions, not their pictures
        params["variant"] = variant
    out = Path(out_dir)
    _claim(out, params)

    per_class = {"train": train_per_class, "test": test_per_class, "val": val_per_class}
    videos = _plan_videos(motions[:num_classes], per_class, train_scenes, test_scenes, val_scenes, seed, variant)
    _write_videos(out, videos, motions[:num_classes], per_class, seed, frames, size, fps, workers, progress)

    manifest = out / "manifest.csv"
    _atomic_write(manifest, _manifest_text(videos))
    return manifest


def variant_motions(name: str | None) -> tuple[str, ...]:
    """The motions a corpus's classes are taken from: ``MOTIONS``, or those of a family variant."""
    return MOTIONS if name is None else family.variant(name).motions


def _checked_params(
    *,
    motions: tuple[str, ...],
    num_classes: int,
    train_per_class: int,
    test_per_class: int,
    train_scenes: int,
    test_scenes: int,
    val_per_class: int,
    val_scenes: int,
    frames: int,
    size: int,
    fps: int,
    seed: int,
    workers: int,
) -> dict:
    """Check ``write_corpus``'s arguments; return those that ``synth.json`` records."""
    _check_int("num_classes", num_classes, 1, len(motions), f" (the number of defined motions: {', '.join(motions)})")
    for name, value in (
        ("train_per_class", train_per_class),
        ("test_per_class", test_per_class),
        ("train_scenes", train_scenes),
        ("test_scenes", test_scenes),
        ("workers", workers),
    ):
        _check_int(name, value, 1)
    _check_int("val_per_class", val_per_class, 0)
    _check_int("val_scenes", val_scenes, 1 if val_per_class else 0, note=" (val_per_class > 0 needs val scenes)")
    _check_int("frames", frames, MIN_FRAMES, note=" (one 16-frame clip must fit)")
    _check_int("size", size, MIN_SIZE)
    if size % 2:
        raise ValueError(f"size must be even (yuv420p halves the chroma planes), got {size}")
    _check_int("fps", fps, 1)
    _check_int("seed", seed, 0)

    params = dict(
        num_classes=num_classes,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
        train_scenes=train_scenes,
        test_scenes=test_scenes,
        frames=frames,
        size=size,
        fps=fps,
        seed=seed,
    )
    if val_per_class:  # recorded only when used, so corpora written before val existed stay valid
        params.update(val_per_class=val_per_class, val_scenes=val_scenes)
    if motions is not MOTIONS:  # likewise: corpora written before the family existed
        params.update(motions=list(motions))
    return params


def _plan_videos(
    classes: tuple[str, ...],
    per_class: dict[str, int],
    train_scenes: int,
    test_scenes: int,
    val_scenes: int,
    seed: int,
    variant: str | None,
) -> list[_Video]:
    """The corpus's videos in manifest order, each split's scenes drawn from its own pool."""
    pools = {
        "train": range(train_scenes),
        "test": range(train_scenes, train_scenes + test_scenes),
        "val": range(train_scenes + test_scenes, train_scenes + test_scenes + val_scenes),
    }
    videos = []
    for split in SPLITS:
        for c, label in enumerate(classes):
            for i in range(per_class[split]):
                # Uniform over the split's pool, from a generator of its own: the class only
                # enters its key, so the scene is independent of the class.
                pick = np.random.default_rng([seed, _PICK_STREAM, SPLITS.index(split), c, i])
                pool = pools[split]
                videos.append(_Video(split, label, i, pool[int(pick.integers(len(pool)))], variant))
    return videos


def _write_videos(
    out: Path,
    videos: list[_Video],
    classes: tuple[str, ...],
    per_class: dict[str, int],
    seed: int,
    frames: int,
    size: int,
    fps: int,
    workers: int,
    progress: bool,
) -> None:
    """Render and encode the videos not yet under ``out``, on ``workers`` processes."""
    todo = [v for v in videos if not (out / v.path).exists()]
    for label in classes:
        for split in (s for s in SPLITS if per_class[s]):
            (out / split / label).mkdir(parents=True, exist_ok=True)
    jobs = [(out / v.path, v, seed, frames, size, fps) for v in todo]
    with tqdm(
        total=len(videos), initial=len(videos) - len(todo), unit="video", desc="synth", disable=not progress
    ) as bar:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                _write_video(*job)
                bar.update()
        else:
            with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
                pending = {pool.submit(_write_video, *job) for job in jobs}
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for f in done:
                        if f.exception() is not None:
                            # Don't render the remaining hundreds of videos before reporting.
                            pool.shutdown(cancel_futures=True)
                            raise f.exception()
                    bar.update(len(done))


def _check_int(name: str, value: object, lo: int, hi: int | None = None, note: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bound}{note}, got {value}")


def _claim(out: Path, params: dict) -> None:
    """Record the arguments in ``out``, or refuse if it already holds a corpus made with others."""
    record = out / _RECORD
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file, not a folder; choose another --output")
    if record.exists():
        try:
            old = json.loads(record.read_text())
        except (ValueError, UnicodeDecodeError):
            raise ValueError(
                f"{record}: damaged (not the JSON this command writes); delete the folder {out} and write the "
                "corpus again, or choose another --output"
            ) from None
        if old != params:
            diff = ", ".join(
                f"{k}={old.get(k)} (now {params.get(k)})"
                for k in sorted(params.keys() | old.keys())
                if old.get(k) != params.get(k)
            )
            raise ValueError(
                f"{out} holds a synthetic corpus written with other arguments: {diff}; "
                f"use another output folder, or the same arguments to complete it"
            )
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(record, json.dumps(params, indent=2, sort_keys=True) + "\n")
    except OSError as e:
        raise ValueError(f"{out}: cannot write there ({e.strerror or e}); choose another --output") from None


def _manifest_text(videos: list[_Video]) -> str:
    lines = ["path,label,split,scene"]
    lines += [f"{v.path},{v.label},{v.split},scene{v.scene:03d}" for v in videos]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_video(path: Path, video: _Video, seed: int, frames: int, size: int, fps: int) -> None:
    if video.variant is None:
        rgb = _render_video(video.label, video.scene, key=video.key(seed), frames=frames, size=size, seed=seed)
    else:
        rgb = family.render_variant(
            family.variant(video.variant),
            video.label,
            video.scene,
            key=video.key(seed),
            frames=frames,
            size=size,
            seed=seed,
            split=video.split,
        )
    planes = _to_yuv420p(rgb)
    tmp = path.with_name(path.name + ".part")
    try:
        with av.open(str(tmp), "w", format="mp4", options=dict(MP4_BITEXACT)) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            ctx = stream.codec_context
            ctx.color_range, ctx.colorspace = ColorRange.MPEG, Colorspace.ITU601  # what _to_yuv420p wrote
            ctx.flags |= av.codec.context.Flags.bitexact
            deterministic_x264(stream, crf=CRF, preset=PRESET, gop=GOP)  # the recipe shards use too
            for t, plane in enumerate(planes):
                frame = av.VideoFrame.from_ndarray(plane, format="yuv420p")
                frame.pts = t
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
