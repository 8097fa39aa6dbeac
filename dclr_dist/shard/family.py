"""A family of synthetic motion corpora: axes that change what is easy, and named variants.

The scene-bias corpus (``synth``, ``render``) has one setting: one object translating over a
static procedural scene. On it a single frame difference almost gives the label away (one
Lucas-Kanade step classifies it), which is the case most favourable to DCLR's dynamic view.
A ``Variant`` moves along axes that take that shortcut away one at a time:

- ``motions``: the classes, from ``MOTION_VOCABULARY``: translations, orbits (the sense of
  rotation needs more than one frame difference: its local tangent changes), zooms and
  oscillations (back and forth along an axis: the sign of a frame difference flips with
  the phase);
- ``radius`` and ``speed``: object size and speed, as fractions of the frame side (per frame);
- ``edge``: "fit" (the whole path stays in the frame), "wrap" (the object leaves at one side
  and comes back at the other);
- ``background``: "procedural" (``render.render_scene``: colour fields, stripes, shapes),
  "texture" (fine random texture: a crop or a frame difference of it is busy everywhere) or
  "photo" (a crop of a real photograph; each split crops photographs of its own, ``PHOTOS``);
- ``camera``: "static", "pan" (the whole view drifts in a random direction) or "pan+zoom":
  a nuisance motion, drawn independently of the class, that moves every background pixel;
- ``distractors``: smaller objects wandering on smooth random paths, so that "something
  moved" is not the label;
- scenes per split: fewer training scenes make the scene a stronger shortcut.

Every random draw is keyed like the scene-bias corpus's (the class enters only as which
draws a motion uses), and the arithmetic follows its rules for bytes that agree between
machines (``synth``'s docstring): per-frame scalars through ``math``, no reductions.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from dclr_dist.shard.render import SHAPES, _coords, _coverage, _sdf, _smooth_field, render_scene

MOTION_VOCABULARY = (
    "move_right",
    "move_left",
    "move_up",
    "move_down",
    "orbit_cw",
    "orbit_ccw",
    "zoom_in",
    "zoom_out",
    "oscillate_h",
    "oscillate_v",
)
_TEXTURE_STREAM, _CAMERA_STREAM, _DISTRACTOR_STREAM, _PHOTO_STREAM = 10, 11, 12, 13
# Where each package keeps its photographs, and the name pip installs it by.
_PHOTO_PACKAGES = {"skimage": ("data", "scikit-image"), "matplotlib": ("mpl-data", "matplotlib")}
# Photographs that installed packages ship (scikit-image's data folder, matplotlib's sample
# data), colour and grey, people, objects, materials; no photograph is in two splits, so a
# test scene is a photograph no training video showed, not another crop of one.
PHOTOS = {
    "train": (
        "skimage:astronaut.png",
        "skimage:coffee.png",
        "skimage:motorcycle_left.png",
        "skimage:ihc.png",
        "skimage:brick.png",
        "skimage:grass.png",
    ),
    "val": ("skimage:chelsea.png", "skimage:hubble_deep_field.jpg", "skimage:gravel.png"),
    "test": (
        "skimage:rocket.jpg",
        "matplotlib:sample_data/grace_hopper.jpg",
        "skimage:retina.jpg",
        "skimage:camera.png",
        "skimage:coins.png",
        "skimage:moon.png",
    ),
}


@dataclass(frozen=True)
class Variant:
    """One corpus of the family (module docstring for the axes)."""

    motions: tuple[str, ...]
    radius: tuple[float, float] = (0.07, 0.12)
    speed: tuple[float, float] = (0.010, 0.015)
    edge: str = "fit"
    background: str = "procedural"
    camera: str = "static"
    distractors: int = 0
    # (train, val, test) scenes; each split's scenes are its own.
    scenes: tuple[int, int, int] = (12, 6, 12)
    note: str = field(default="", compare=False)


# Fixed before any test figure was seen (docs/motion_family.md): from the scene-bias corpus's
# own task to one where neither a frame difference nor the scene gives the label.
VARIANTS = {
    "translate": Variant(
        ("move_right", "move_left", "move_up", "move_down"),
        note="the scene-bias benchmark's task: 4 global translations of one object",
    ),
    "rotate_zoom": Variant(
        ("orbit_cw", "orbit_ccw", "zoom_in", "zoom_out"),
        radius=(0.09, 0.14),
        note="orbits and zooms: the class is the sense of a rotation or of a scale change",
    ),
    "oscillate_wrap": Variant(
        ("move_right", "move_left", "oscillate_h", "oscillate_v"),
        radius=(0.05, 0.09),
        speed=(0.02, 0.03),
        edge="wrap",
        note="small fast objects that wrap around the frame, and oscillations",
    ),
    "texture_few_scenes": Variant(
        ("move_right", "move_left", "orbit_cw", "orbit_ccw"),
        background="texture",
        scenes=(4, 4, 12),
        note="busy textures, 4 training scenes",
    ),
    "hard": Variant(
        ("move_right", "move_left", "move_up", "move_down", "orbit_cw", "orbit_ccw"),
        camera="pan+zoom",
        distractors=2,
        note="camera pan and zoom, 2 wandering distractor objects, 6 classes",
    ),
    # Added a session after the five above, fixed before any of its runs.
    "photo": Variant(
        ("move_right", "move_left", "zoom_in", "zoom_out"),
        background="photo",
        camera="pan",
        note="crops of real photographs (other photographs per split), camera pan",
    ),
}


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown corpus variant {name!r}: choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def render_variant(
    v: Variant, motion: str, scene: int, *, key: list[int], frames: int, size: int, seed: int, split: str
):
    """The frames of one video of ``split`` of variant ``v`` as (T, H, W, 3) float32 RGB in [0, 1]."""
    cam = _camera(v.camera, np.random.default_rng([*key, _CAMERA_STREAM]), frames)
    bg = _background(v.background, scene, size, seed, split)
    x, y = _coords(size)
    img = np.empty((frames, size, size, 3), np.float32)
    for t in range(frames):
        # World coordinates seen at screen (x, y): the camera looks at (cx, cy) with zoom z.
        cx, cy, z = cam[t]
        wx, wy = np.float32(cx) + (x - 0.5) / np.float32(z), np.float32(cy) + (y - 0.5) / np.float32(z)
        img[t] = _sample(bg, wx, wy)
    rng = np.random.default_rng(key)
    for obj in [_object(v, motion, rng, frames)] + [
        _distractor(v, np.random.default_rng([*key, _DISTRACTOR_STREAM, i]), frames) for i in range(v.distractors)
    ]:
        _draw(img, obj, cam, size, x, y)
    return img


def _background(kind: str, scene: int, size: int, seed: int, split: str) -> np.ndarray:
    """The scene on a canvas twice the frame (world [-0.5, 1.5]), so a moving camera finds pixels."""
    if kind == "photo":
        return _photo_crop(scene, 2 * size, seed, split)
    if kind == "procedural":
        return render_scene(scene, 2 * size, seed)
    if kind == "texture":
        rng = np.random.default_rng([seed, _TEXTURE_STREAM, scene])
        coarse = _smooth_field(rng, 4, 2 * size, 3)
        fine = _smooth_field(rng, max(2, size // 2), 2 * size, 3)
        return np.clip(0.1 + 0.45 * coarse + 0.45 * fine, 0, 1).astype(np.float32)
    raise ValueError(f"unknown background {kind!r}")


def _photo_crop(scene: int, side: int, seed: int, split: str) -> np.ndarray:
    """Scene ``scene``: a square crop of one of ``split``'s photographs (they take turns), of
    60-100% of its short side at a random place, mirrored or not, resized to ``side`` (the
    frame shows the middle half of it: 30-50% of the photograph)."""
    from PIL import Image

    pool = PHOTOS[split]
    photo = _photo(pool[scene % len(pool)])
    rng = np.random.default_rng([seed, _PHOTO_STREAM, scene])
    w, h = photo.size
    crop = int(min(w, h) * rng.uniform(0.6, 1.0))
    left, top = int(rng.integers(w - crop + 1)), int(rng.integers(h - crop + 1))
    # Pillow's 8-bit resampling is integer arithmetic: the same bytes on every machine.
    out = photo.resize((side, side), Image.Resampling.BILINEAR, box=(left, top, left + crop, top + crop))
    if rng.uniform() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, np.float32) / 255


@cache
def _photo(name: str):
    """A bundled photograph as an RGB PIL image; ``name`` is "package:path in its data folder"."""
    from PIL import Image

    package, _, rel = name.partition(":")
    data, pip_name = _PHOTO_PACKAGES[package]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the photo background reads photographs that {package} ships, and {package} is not installed: "
            f"pip install {pip_name} (or the dev extra)"
        )
    folder = Path(spec.submodule_search_locations[0]) / data
    with Image.open(folder / rel) as im:
        return im.convert("RGB")


def _sample(canvas: np.ndarray, wx: np.ndarray, wy: np.ndarray) -> np.ndarray:
    """Bilinear sample of the (2S, 2S, 3) canvas at world coordinates, clamped at its edge."""
    n = canvas.shape[0]
    px = np.clip((wx + 0.5) / 2 * n - 0.5, 0, n - 1.001)  # (1, W)
    py = np.clip((wy + 0.5) / 2 * n - 0.5, 0, n - 1.001)  # (H, 1)
    ix, iy = px.astype(int), py.astype(int)
    fx, fy = (px - ix)[..., None], (py - iy)[..., None]
    top = canvas[iy, ix] * (1 - fx) + canvas[iy, ix + 1] * fx
    bottom = canvas[iy + 1, ix] * (1 - fx) + canvas[iy + 1, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _camera(kind: str, rng: np.random.Generator, frames: int) -> list[tuple[float, float, float]]:
    """Per frame (centre x, centre y, zoom) of the view into the world."""
    angle, speed = rng.uniform(0, 2 * math.pi), rng.uniform(0.004, 0.008)
    zoom_rate = rng.uniform(-0.008, 0.008)
    if kind == "static":
        return [(0.5, 0.5, 1.0)] * frames
    if kind not in ("pan", "pan+zoom"):
        raise ValueError(f"unknown camera {kind!r}")
    half = (frames - 1) / 2  # centred on the frame's middle, so the view stays on the canvas
    return [
        (
            0.5 + math.cos(angle) * speed * (t - half),
            0.5 + math.sin(angle) * speed * (t - half),
            math.exp(zoom_rate * (t - half)) if kind == "pan+zoom" else 1.0,
        )
        for t in range(frames)
    ]


def _wrap(start: float, rate: float, lo: float, hi: float, frames: int) -> np.ndarray:
    return lo + (start - lo + rate * np.arange(frames)) % (hi - lo)


def _object(v: Variant, motion: str, rng: np.random.Generator, frames: int) -> dict:
    """The labelled object: shape, colours and per-frame centre and radius."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    fill = rng.uniform(0, 1, 3).astype(np.float32)
    # Every video draws the same values in the same order; the motion decides which it uses.
    radius, speed = rng.uniform(*v.radius), rng.uniform(*v.speed)
    u, w = rng.uniform(0, 1, 2)
    phase, orbit = rng.uniform(0, 2 * math.pi), rng.uniform(0.12, 0.20)
    zoom = rng.uniform(0.02, 0.04)
    t = np.arange(frames)
    ones = np.ones(frames)
    margin = radius + 0.02
    kind, _, direction = motion.partition("_")
    if kind == "move":
        sign = 1 if direction in ("right", "down") else -1  # image y points down
        travel = speed * (frames - 1)
        if v.edge == "wrap":
            along = _wrap(u, sign * speed, -radius, 1 + radius, frames)
        elif travel <= 1 - 2 * margin:
            lo = margin if sign > 0 else margin + travel
            along = lo + u * (1 - 2 * margin - travel) + sign * speed * t
        else:  # too long to fit: wrap rather than turn back (which would show the other class)
            along = _wrap(u, sign * speed, margin, 1 - margin, frames)
        across = (margin + w * (1 - 2 * margin)) * ones
        cx, cy = (along, across) if direction in ("right", "left") else (across, along)
        r = radius * ones
    elif kind == "orbit":
        omega = (1 if direction == "cw" else -1) * speed / orbit  # y down: increasing angle is clockwise
        theta = phase + omega * t
        reach = orbit + margin
        cx = reach + u * (1 - 2 * reach) + orbit * np.array([math.cos(a) for a in theta])
        cy = reach + w * (1 - 2 * reach) + orbit * np.array([math.sin(a) for a in theta])
        r = radius * ones
    elif kind == "zoom":
        sign = 1 if direction == "in" else -1
        lo, hi = math.log(0.04), math.log(0.25)
        log_r = _wrap(lo + u * (hi - lo), sign * zoom, lo, hi, frames)
        r = np.array([math.exp(a) for a in log_r])
        cx, cy = (0.27 + u * 0.46) * ones, (0.27 + w * 0.46) * ones
    elif kind == "oscillate":
        # A period of 12-20 frames, so a 16-frame clip sees most of a cycle; peak speed twice
        # the variant's speed.
        period = 12 + 8 * u
        amplitude = min(0.5 - margin, speed * period / math.pi)
        swing = 0.5 + amplitude * np.array([math.sin(phase + 2 * math.pi * s / period) for s in t])
        across = (0.35 + 0.3 * w) * ones
        cx, cy = (swing, across) if direction == "h" else (across, swing)
        r = radius * ones
    else:
        raise ValueError(f"unknown motion {motion!r}")
    return {"shape": shape, "fill": fill, "x": cx, "y": cy, "r": r}


def _distractor(v: Variant, rng: np.random.Generator, frames: int) -> dict:
    """A smaller object on a smooth random path: motion that is not the label."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    fill = rng.uniform(0, 1, 3).astype(np.float32)
    radius = 0.6 * rng.uniform(*v.radius)
    knots = rng.uniform(radius, 1 - radius, (4, 2))  # a path through 4 random points
    s = np.linspace(0, 3, frames)
    i = np.minimum(s.astype(int), 2)
    f = s - i
    ease = f * f * (3 - 2 * f)  # smooth at the knots
    xy = knots[i] * (1 - ease)[:, None] + knots[i + 1] * ease[:, None]
    return {"shape": shape, "fill": fill, "x": xy[:, 0], "y": xy[:, 1], "r": radius * np.ones(frames)}


def _draw(img: np.ndarray, obj: dict, cam: list, size: int, x: np.ndarray, y: np.ndarray) -> None:
    """Composite ``obj`` (world coordinates) into the frames as the camera sees it, in place."""
    fill = obj["fill"]
    luma = 0.299 * float(fill[0]) + 0.587 * float(fill[1]) + 0.114 * float(fill[2])
    outline = np.full(3, 0.0 if luma > 0.5 else 1.0, np.float32)  # contrasts with the fill
    width = np.float32(max(1.0, size / 64))
    for t, (cx, cy, z) in enumerate(cam):
        # Screen position and radius of the object at frame t.
        sx = np.float32((obj["x"][t] - cx) * z + 0.5)
        sy = np.float32((obj["y"][t] - cy) * z + 0.5)
        r = np.float32(obj["r"][t] * z)
        d = _sdf(obj["shape"], (x - sx) / r, (y - sy) / r) * (r * size)
        outer, inner = _coverage(d)[..., None], _coverage(d + width)[..., None]
        img[t] = img[t] * (1 - outer) + outline * (outer - inner) + fill * inner
