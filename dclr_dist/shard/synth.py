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
the recipe the shards use too). So that the
bytes also agree between machines, pixel arithmetic avoids what varies with the CPU's
vector instructions: no array-wide sin/exp (per-frame scalars go through ``math``), no
reductions, and RGB->YUV is computed here rather than by swscale's SIMD paths.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace
from tqdm import tqdm

from dclr_dist.shard.transcode import MP4_BITEXACT, deterministic_x264

MOTIONS = ("move_right", "move_left", "move_up", "move_down", "orbit_cw", "orbit_ccw", "zoom_in", "zoom_out")
SPLITS = ("train", "test", "val")  # val last: adding it changes no train or test video
SHAPES = ("disc", "square", "diamond", "triangle", "ring", "cross")

# Geometry in fractions of the frame side, rates per frame. At the lowest speed a 16-frame
# clip at stride 1 moves the object by 15% of the frame; at the top speeds a 48-frame
# translation or zoom (the default length) still fits in the frame without wrapping.
RADIUS = (0.07, 0.12)  # object radius, except while zooming
SPEED = (0.010, 0.015)  # centre speed of translations and orbits
ORBIT_RADIUS = (0.12, 0.20)  # orbits sweep 43-107 degrees per 16 frames at SPEED
ZOOM_RADIUS = (0.04, 0.27)  # the range a zoom's radius moves through
ZOOM_RATE = (0.02, 0.04)  # d(log radius)/dt: x1.35-1.8 per 16 frames
MARGIN = 0.02  # keep the object's edge this far inside the frame
MIN_FRAMES = 16  # DCLR's clip length
MIN_SIZE = 32

# Encoding: these videos are a *source* that the packer re-encodes, so spend bits on
# quality (crf 18) to keep the second generation clean. Keyframes every 16 frames so a
# reader of this folder seeks cheaply too (docs/design.md, section 9).
CRF = 18
GOP = 16
PRESET = "veryfast"

# Independent random streams, so that adding classes or videos changes no existing video.
_SCENE_STREAM, _PICK_STREAM, _OBJECT_STREAM = 0, 1, 2
_RECORD = "synth.json"


@dataclass(frozen=True)
class _Video:
    split: str
    label: str
    index: int  # within (split, label)
    scene: int

    @property
    def path(self) -> str:
        """Path relative to the corpus root, in UCF-101's class-folder layout."""
        return f"{self.split}/{self.label}/{self.label}_s{self.scene:03d}_v{self.index:04d}.mp4"

    def key(self, seed: int) -> list[int]:
        return [seed, _OBJECT_STREAM, SPLITS.index(self.split), MOTIONS.index(self.label), self.index]


def write_corpus(
    out_dir: str | os.PathLike,
    *,
    num_classes: int = 6,
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

    The classes are the first ``num_classes`` of ``MOTIONS``; each video shows one scene
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
    params = _checked_params(
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
    out = Path(out_dir)
    _claim(out, params)

    per_class = {"train": train_per_class, "test": test_per_class, "val": val_per_class}
    videos = _plan_videos(num_classes, per_class, train_scenes, test_scenes, val_scenes, seed)
    _write_videos(out, videos, num_classes, per_class, seed, frames, size, fps, workers, progress)

    manifest = out / "manifest.csv"
    _atomic_write(manifest, _manifest_text(videos))
    return manifest


def _checked_params(
    *,
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
    _check_int("num_classes", num_classes, 1, len(MOTIONS), f" (the number of defined motions: {', '.join(MOTIONS)})")
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
    return params


def _plan_videos(
    num_classes: int, per_class: dict[str, int], train_scenes: int, test_scenes: int, val_scenes: int, seed: int
) -> list[_Video]:
    """The corpus's videos in manifest order, each split's scenes drawn from its own pool."""
    pools = {
        "train": range(train_scenes),
        "test": range(train_scenes, train_scenes + test_scenes),
        "val": range(train_scenes + test_scenes, train_scenes + test_scenes + val_scenes),
    }
    videos = []
    for split in SPLITS:
        for c, label in enumerate(MOTIONS[:num_classes]):
            for i in range(per_class[split]):
                # Uniform over the split's pool, from a generator of its own: the class only
                # enters its key, so the scene is independent of the class.
                pick = np.random.default_rng([seed, _PICK_STREAM, SPLITS.index(split), c, i])
                pool = pools[split]
                videos.append(_Video(split, label, i, pool[int(pick.integers(len(pool)))]))
    return videos


def _write_videos(
    out: Path,
    videos: list[_Video],
    num_classes: int,
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
    for label in MOTIONS[:num_classes]:
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
    if record.exists():
        old = json.loads(record.read_text())
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
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(record, json.dumps(params, indent=2, sort_keys=True) + "\n")


def _manifest_text(videos: list[_Video]) -> str:
    lines = ["path,label,split,scene"]
    lines += [f"{v.path},{v.label},{v.split},scene{v.scene:03d}" for v in videos]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- drawing


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [0, 1]: x as (1, W), y as (H, 1)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[None, :], c[:, None]


def _smooth_field(rng: np.random.Generator, cells: int, size: int, channels: int) -> np.ndarray:
    """Random values on a cells x cells grid, bilinearly upsampled to (size, size, channels)."""
    grid = rng.uniform(0, 1, (cells, cells, channels)).astype(np.float32)
    t = np.linspace(0, cells - 1, size, dtype=np.float32)
    i = np.minimum(t.astype(int), cells - 2)
    f = (t - i)[:, None, None]
    rows = grid[i] * (1 - f) + grid[i + 1] * f  # (H, cells, C)
    f = f.reshape(1, size, 1)
    return rows[:, i] * (1 - f) + rows[:, i + 1] * f  # (H, W, C)


def _sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) to a unit-radius shape, in units of that radius."""
    au, av_ = np.abs(u), np.abs(v)
    if shape == "disc":
        return np.sqrt(u * u + v * v) - 1
    if shape == "square":
        return np.maximum(au, av_) - 0.85
    if shape == "diamond":
        return (au + av_) * np.float32(0.7071) - 0.8
    if shape == "triangle":
        # Equilateral, pointing up, inradius 0.55: the farthest of its three edge lines.
        return np.maximum(v, np.float32(0.866) * au - np.float32(0.5) * v) - 0.55
    if shape == "ring":
        return np.abs(np.sqrt(u * u + v * v) - 0.7) - 0.3
    if shape == "cross":
        return np.minimum(np.maximum(au - 1, av_ - 0.35), np.maximum(au - 0.35, av_ - 1))
    raise ValueError(f"unknown shape {shape!r}")


def _coverage(distance_px: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a pixel from its signed distance to the edge in pixels."""
    return np.clip(0.5 - distance_px, 0, 1)


@lru_cache(maxsize=64)
def render_scene(scene: int, size: int, seed: int = 0) -> np.ndarray:
    """Background ``scene`` as (H, W, 3) float32 RGB in [0, 1]; one fixed image per (scene, size, seed).

    A smooth colour field, a stripe grating over part of the frame, several flat shapes and
    a blotchy texture: colour layout alone tells scenes apart at a glance.
    """
    rng = np.random.default_rng([seed, _SCENE_STREAM, scene])
    x, y = _coords(size)
    img = 0.15 + 0.7 * _smooth_field(rng, 4, size, 3)

    angle, period, phase = rng.uniform(0, math.pi), rng.uniform(0.06, 0.2), rng.uniform(0, 1)
    across = (x * np.float32(math.cos(angle)) + y * np.float32(math.sin(angle))) / np.float32(period) + phase
    stripes = (across % 1) < 0.5
    nx, ny = rng.normal(size=2)
    half = (x - rng.uniform(0.2, 0.8)) * np.float32(nx) + (y - rng.uniform(0.2, 0.8)) * np.float32(ny) > 0
    img = np.where((stripes & half)[..., None], 0.35 * img + 0.65 * rng.uniform(0, 1, 3).astype(np.float32), img)

    for _ in range(int(rng.integers(5, 10))):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        cx, cy = rng.uniform(0, 1, 2)
        rx, ry = rng.uniform(0.04, 0.2, 2)
        colour = rng.uniform(0, 1, 3).astype(np.float32)
        d = _sdf(shape, (x - np.float32(cx)) / np.float32(rx), (y - np.float32(cy)) / np.float32(ry))
        a = _coverage(d * np.float32(min(rx, ry) * size))[..., None]
        img = img * (1 - a) + colour * a

    img = np.clip(img + 0.2 * (_smooth_field(rng, max(2, size // 6), size, 1) - 0.5), 0, 1).astype(np.float32)
    img.setflags(write=False)  # cached and shared by every video of this scene
    return img


def _sweep(rng: np.random.Generator, rate: float, lo: float, hi: float, frames: int) -> np.ndarray:
    """A coordinate moving by ``rate`` per frame inside [lo, hi], as (T,) float64.

    It starts where the whole path fits; a video too long for that wraps around the
    interval instead, so the object never leaves the frame and never turns back (which
    would show the opposite class).
    """
    t = np.arange(frames)
    travel = abs(rate) * (frames - 1)
    if travel <= hi - lo:
        start = rng.uniform(lo, hi - travel) if rate > 0 else rng.uniform(lo + travel, hi)
        return start + rate * t
    return lo + (rng.uniform(0, hi - lo) + rate * t) % (hi - lo)


def _track(motion: str, rng: np.random.Generator, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre x, centre y and radius of the object per frame, as three (T,) arrays in frame units."""
    # Every video draws the same values in the same order; the motion only decides which
    # of them it uses, so nothing but the motion depends on the class.
    radius = rng.uniform(*RADIUS)
    speed = rng.uniform(*SPEED)
    u, v = rng.uniform(0, 1, 2)  # position, as a fraction of the free range
    orbit_radius = rng.uniform(*ORBIT_RADIUS)
    zoom_rate = rng.uniform(*ZOOM_RATE)
    ones = np.ones(frames)

    def free(r: float, pos: float) -> float:
        return r + MARGIN + pos * (1 - 2 * (r + MARGIN))

    kind, _, direction = motion.partition("_")
    if kind == "move":
        lo, hi = radius + MARGIN, 1 - radius - MARGIN
        sign = 1 if direction in ("right", "down") else -1  # image y points down
        along = _sweep(rng, sign * speed, lo, hi, frames)
        if direction in ("right", "left"):
            return along, free(radius, v) * ones, radius * ones
        return free(radius, u) * ones, along, radius * ones
    if kind == "orbit":
        # With y down, increasing angle turns clockwise on screen.
        omega = (1 if direction == "cw" else -1) * speed / orbit_radius
        theta = rng.uniform(0, 2 * math.pi) + omega * np.arange(frames)
        # math.cos/sin per frame: scalar libm calls, not SIMD ones that vary across CPUs.
        cos = np.array([math.cos(a) for a in theta])
        sin = np.array([math.sin(a) for a in theta])
        reach = orbit_radius + radius
        return free(reach, u) + orbit_radius * cos, free(reach, v) + orbit_radius * sin, radius * ones
    if kind == "zoom":
        sign = 1 if direction == "in" else -1
        log_r = _sweep(rng, sign * zoom_rate, math.log(ZOOM_RADIUS[0]), math.log(ZOOM_RADIUS[1]), frames)
        r = np.array([math.exp(a) for a in log_r])
        return free(ZOOM_RADIUS[1], u) * ones, free(ZOOM_RADIUS[1], v) * ones, r
    raise ValueError(f"unknown motion {motion!r}")


def _render_video(motion: str, scene: int, *, key: list[int], frames: int, size: int, seed: int) -> np.ndarray:
    """The frames of one video as (T, H, W, 3) float32 RGB in [0, 1]."""
    rng = np.random.default_rng(key)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    fill = rng.uniform(0, 1, 3).astype(np.float32)
    # A black or white outline, whichever contrasts with the fill, keeps the object
    # visible on any background colour.
    luma = 0.299 * float(fill[0]) + 0.587 * float(fill[1]) + 0.114 * float(fill[2])
    outline = np.full(3, 0.0 if luma > 0.5 else 1.0, np.float32)
    cx, cy, r = (a.astype(np.float32)[:, None, None] for a in _track(motion, rng, frames))  # (T, 1, 1)

    x, y = _coords(size)
    d = _sdf(shape, (x - cx) / r, (y - cy) / r) * (r * size)  # (T, H, W) pixels
    width = np.float32(max(1.0, size / 64))
    outer = _coverage(d)[..., None]
    inner = _coverage(d + width)[..., None]
    bg = render_scene(scene, size, seed)
    return bg * (1 - outer) + outline * (outer - inner) + fill * inner  # (T, H, W, 3)


def _to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) RGB in [0, 1] to (T, 3H/2, W) uint8 planes, BT.601 limited range."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
    # Chroma of each 2x2 block, from its mean colour (the conversion is linear).
    # Explicit adds rather than .sum(), whose association order may vary with the SIMD path.
    r, g, b = ((c[:, 0::2, 0::2] + c[:, 0::2, 1::2] + c[:, 1::2, 0::2] + c[:, 1::2, 1::2]) * 0.25 for c in (r, g, b))
    T, H, W = y.shape
    cb = 128 - 37.797 * r - 74.203 * g + 112.0 * b
    cr = 128 + 112.0 * r - 93.786 * g - 18.214 * b
    chroma = np.concatenate([cb, cr], axis=1).reshape(T, H // 2, W)  # U plane rows then V plane rows
    planes = np.concatenate([y, chroma], axis=1)
    return np.clip(np.rint(planes), 0, 255).astype(np.uint8)


def _write_video(path: Path, video: _Video, seed: int, frames: int, size: int, fps: int) -> None:
    rgb = _render_video(video.label, video.scene, key=video.key(seed), frames=frames, size=size, seed=seed)
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
