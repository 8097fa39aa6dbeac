"""Drawing of the synthetic corpus: background scenes, the moving object's track, the frames, RGB->YUV.

Apart from ``synth`` (the corpus plan and the files it writes) because it is pure pixel
arithmetic: no I/O, no encoding. What keeps it byte-identical across machines (no array-wide
sin/exp, no reductions, RGB->YUV here) is in ``synth``'s docstring. The random-stream ids of
the whole corpus live here together, so that they stay distinct.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

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

# Independent random streams, so that adding classes or videos changes no existing video.
_SCENE_STREAM, _PICK_STREAM, _OBJECT_STREAM = 0, 1, 2


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
