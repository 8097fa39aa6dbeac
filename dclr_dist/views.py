"""DCLR's views of a video: two augmented RGB clips, their static and dynamic views.

Ding, Qian, Xiong, arXiv 2207.05340, as in the released code (Mark12Ding/DCLR): for each
of the two clips v_q, v_k of a video

- the RGB view v: T frames at stride s, augmented identically across its frames with
  MoCo v2's recipe (random resized crop, colour jitter, grayscale, Gaussian blur,
  horizontal flip) and normalised;
- the static view s: one frame of the clip, picked at random, with its own crop and colour
  augmentation, repeated T times: appearance without motion (not a temporal mean). With
  ``static_crop: clip`` it takes the clip's crop and flip instead (its own colour), so its
  activation map A_s covers the same pixels as f(v), which F_s(v) = GAP(f(v) * A_s) and the
  alignment target assume; the released code gives it its own crop;
- the dynamic view d: the temporal difference of the augmented clip, d_t = v_t - v_{t-1}.
  The loader decodes one extra frame, v_{-1}, one stride before the clip, so d_0 is a true
  neighbour difference. The released code uses roll instead (d_0 = v_0 - v_{T-1}), which
  makes d_0 a jump across the whole clip that no other frame of d resembles; the extra
  frame costs 1/(T+1) more pixels on the wire and one more frame to convert.

The work is split so that the CPU only decodes (docs/design.md, section 9: CPU decoding is the
scarce resource on GPU nodes):

1. In the DataLoader worker: every random draw (``draw``: crop boxes, the static frame,
   colour, blur and flip parameters), from the stream's seeded generator, so the result
   depends on the seed only, not on where step 2 runs.
2. ``dclr_views``: crops and resizing, colour jitter, grayscale, blur, flip,
   normalisation, static and dynamic views, as batched torch ops on the decoded uint8
   frames. It runs on the accelerator after the copy (``views.augment_on: device``) or in the
   worker (``worker``), the same code either way.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from dclr_dist.config import ViewsConfig

# Columns of the drawn parameters, one row per crop: the two clips and their static frames.
FLIP, GRAY, JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE, SIGMA = range(8)
# The order in which the four jitter operations apply: a permutation of 0..3, an operation's
# position in (brightness, contrast, saturation, hue), as torchvision's ColorJitter draws it.
ORDER = slice(8, 12)
# The crop in the decoded frame, pixels: top, left, height, width.
BOX = slice(12, 16)
# Static rows: which frame of the clip (1..T of v_{-1}..v_{T-1}) the static view shows.
FRAME = 16
NUM_PARAMS = 17
# Rows of "aug", in this order.
ROWS = ("q", "k", "static_q", "static_k")

# Luma weights (ITU-R BT.601), with torchvision's rounding, so grayscale, contrast and
# saturation match its rgb_to_grayscale and ColorJitter.
_LUMA = (0.2989, 0.587, 0.114)

# Evaluation crops the centre 112/128 of the short side: the usual protocol on frames
# stored at short side 128 (resize to 128, centre crop 112).
EVAL_CROP = 112 / 128


def crop_box(rng: np.random.Generator, height: int, width: int, cfg: ViewsConfig) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop, drawn as torchvision's RandomResizedCrop does.

    Area fraction uniform in ``cfg.scale``, aspect ratio log-uniform in ``cfg.ratio``; after
    10 draws that do not fit, the largest centre crop within the ratio range.
    """
    area = height * width
    log_ratio = (math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*cfg.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < cfg.ratio[0]:
        w, h = width, round(width / cfg.ratio[0])
    elif aspect > cfg.ratio[1]:
        w, h = round(height * cfg.ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the evaluation crop: a centred square, EVAL_CROP of the short side."""
    side = max(1, round(min(height, width) * EVAL_CROP))
    return (height - side) // 2, (width - side) // 2, side, side


def draw(rng: np.random.Generator, cfg: ViewsConfig, height: int, width: int) -> np.ndarray:
    """Random parameters of one video's four crops (ROWS): (4, NUM_PARAMS) float32.

    height, width: the size of its decoded frames.
    """
    p = np.zeros((len(ROWS), NUM_PARAMS), np.float32)
    for row in p:
        row[BOX] = crop_box(rng, height, width, cfg)
        _draw_colour(rng, cfg, row)
    # The static views show one frame of their clip, v_0..v_{T-1} (position 0 is v_{-1}).
    p[2:, FRAME] = 1 + rng.integers(cfg.frames, size=2)
    if cfg.static_crop == "clip":  # the clip's pixels, so A_s weights the region f(v) sees
        p[2:, BOX], p[2:, FLIP] = p[:2, BOX], p[:2, FLIP]
    return p


def _draw_colour(rng: np.random.Generator, cfg: ViewsConfig, p: np.ndarray) -> None:
    p[[BRIGHTNESS, CONTRAST, SATURATION]] = 1.0
    p[ORDER] = np.arange(4)
    if rng.random() < cfg.jitter_p:
        b, c, s, h = cfg.jitter
        p[JITTER] = 1.0
        p[BRIGHTNESS] = rng.uniform(max(0.0, 1 - b), 1 + b)
        p[CONTRAST] = rng.uniform(max(0.0, 1 - c), 1 + c)
        p[SATURATION] = rng.uniform(max(0.0, 1 - s), 1 + s)
        p[HUE] = rng.uniform(-h, h)
        p[ORDER] = rng.permutation(4)
    p[GRAY] = rng.random() < cfg.gray_p
    if rng.random() < cfg.blur_p:
        p[SIGMA] = rng.uniform(*cfg.blur_sigma)
    p[FLIP] = rng.random() < cfg.flip_p


def crop(frames: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each frame to its box and resize to size x size: (N, 3, S, S) float32 in [0, 1].

    frames: (N, 3, H, W) uint8; boxes: (N, 4) top, left, height, width in pixels.
    roi_align resizes a whole batch of differently sized boxes at once, bilinearly, and
    averages ceil(box / size) samples per output pixel along each axis, so shrinking crops
    do not alias (like torchvision's antialiased resize). At the frame's edge it clamps, as
    a resize of the cropped image would (the loader pads frames of mixed sizes by repeating
    their edge, so padding never leaks in).
    """
    top, left, h, w = boxes.to(torch.float32).unbind(1)
    index = torch.arange(len(frames), device=frames.device, dtype=torch.float32)
    rois = torch.stack([index, left, top, left + w, top + h], 1)  # (N, 5) batch index, x1, y1, x2, y2
    x = frames.to(torch.float32).div_(255)
    return roi_align(x, rois, output_size=(size, size), sampling_ratio=-1, aligned=True)


def dclr_views(batch: dict, cfg: ViewsConfig) -> dict:
    """The six views the model takes, from the loader's decoded frames and drawn parameters.

    batch: "q", "k" (B, 3, T+1, H, W) uint8 frames v_{-1}..v_{T-1} of the two clips;
           "aug" (B, 4, NUM_PARAMS) float32, rows ROWS; other keys pass through.
    Returns "q", "k" (v), "static_q", "static_k" (s), "dynamic_q", "dynamic_k" (d), each
    (B, 3, T, S, S) float32, normalised; s is one frame expanded over T (no copy).
    """
    out = {name: value for name, value in batch.items() if name not in ("q", "k", "aug")}
    aug = batch["aug"].to(batch["q"].device)
    B, _, T1, H, W = batch["q"].shape
    S = cfg.size
    for row, name in enumerate(("q", "k")):
        clip = batch[name]
        frames = clip.transpose(1, 2).reshape(B * T1, 3, H, W)  # (B*(T+1), 3, H, W)
        x = crop(frames, aug[:, row, BOX].repeat_interleave(T1, 0), S)  # the clip's box on each of its frames
        x = augment(x.view(B, T1, 3, S, S).transpose(1, 2), aug[:, row], cfg)  # (B, 3, T+1, S, S)
        out[name] = x[:, :, 1:]  # v_0 .. v_{T-1}
        out[f"dynamic_{name}"] = x[:, :, 1:] - x[:, :, :-1]  # d_t = v_t - v_{t-1}
        static = aug[:, row + 2]
        frame = clip[torch.arange(B, device=clip.device), :, static[:, FRAME].long()]  # (B, 3, H, W)
        s = augment(crop(frame, static[:, BOX], S).unsqueeze(2), static, cfg)  # (B, 3, 1, S, S)
        out[f"static_{name}"] = s.expand(-1, -1, T1 - 1, -1, -1)
    return out


def eval_clips(batch: dict, cfg: ViewsConfig) -> dict:
    """Evaluation clips, cropped and normalised: "clips" (B, N, 3, T, S, S) float32.

    batch: "clips" (B, N, 3, T, H, W) uint8 and "box" (B, 4), the centre crop of each video.
    """
    out = {name: value for name, value in batch.items() if name not in ("clips", "box")}
    clips = batch["clips"]
    B, N, _, T, H, W = clips.shape
    frames = clips.transpose(2, 3).reshape(B * N * T, 3, H, W)
    x = crop(frames, batch["box"].to(clips.device).repeat_interleave(N * T, 0), cfg.size)
    out["clips"] = normalize(x.view(B, N, T, 3, cfg.size, cfg.size).transpose(2, 3).contiguous(), cfg)
    return out


def augment(x: torch.Tensor, p: torch.Tensor, cfg: ViewsConfig) -> torch.Tensor:
    """Colour jitter, grayscale, blur, flip, normalisation (MoCo v2's order), per clip.

    x: (B, 3, T, S, S) float32 in [0, 1]; p: (B, NUM_PARAMS) rows of ``draw``. Each clip's
    parameters apply to all its frames alike, so the augmentation never fakes motion.
    Returns (B, 3, T, S, S) float32, normalised.

    Every operation runs on the whole batch and ``torch.where`` keeps it where a clip's
    parameters ask for it: no boolean-mask indexing and no ``if tensor.any()``, each of
    which makes the host wait for the accelerator.
    """
    x = _jitter(x, p)
    x = torch.where(_rows(p[:, GRAY] > 0), _gray(x).expand_as(x), x)
    blur = p[:, SIGMA] > 0
    x = torch.where(_rows(blur), _blur(x, torch.where(blur, p[:, SIGMA], 1.0)), x)
    x = torch.where(_rows(p[:, FLIP] > 0), x.flip(-1), x)
    return normalize(x, cfg)


def _rows(mask: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1, 1), to select whole clips."""
    return mask.view(-1, 1, 1, 1, 1)


def _jitter(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, in each clip's drawn order (torchvision's ColorJitter).

    The first three are blends towards a reference, r + f (x - r) (black, the clip's mean
    gray, the pixel's gray). With hue at position h of a clip's order, its state before the
    hue is that of its first h blends: all clips run the three blends in their own order, the
    hue rotates each clip's state after its h-th, and the blends after the hue follow. One hue
    rotation per call, the costly operation, instead of one per position.
    """
    on = _rows(p[:, JITTER] > 0)
    order = p[:, ORDER].long()  # (B, 4): 0 brightness, 1 contrast, 2 saturation, 3 hue
    h = (order == 3).to(torch.int64).argmax(1)  # (B,) the hue's position
    blends = [order.gather(1, (k + (k >= h)).unsqueeze(1)).squeeze(1) for k in range(3)]  # (B,) each, hue skipped
    states = [x]
    for op in blends:
        states.append(_blend(states[-1], op, p))
    before_hue = states[0]
    for k in range(1, 4):
        before_hue = torch.where(_rows(h == k), states[k], before_hue)
    y = _hue(before_hue, p[:, HUE])
    for k, op in enumerate(blends):
        y = torch.where(_rows(k >= h), _blend(y, op, p), y)
    return torch.where(on, y, x)


def _blend(x: torch.Tensor, op: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Each clip's blend op (B,): 0 brightness, 1 contrast, 2 saturation, by its factor in p."""
    factor = p.gather(1, (BRIGHTNESS + op).unsqueeze(1)).squeeze(1)  # (B,)
    gray = _gray(x)  # (B, 1, T, H, W)
    ref = torch.where(_rows(op == 2), gray, torch.where(_rows(op == 1), gray.mean((1, 2, 3, 4), keepdim=True), 0.0))
    return (ref + _factor(factor) * (x - ref)).clamp_(0, 1)


def normalize(x: torch.Tensor, cfg: ViewsConfig) -> torch.Tensor:
    """Normalise (..., 3, T, H, W) floats in [0, 1] per channel, in place."""
    mean, std = _channel_constants(tuple(cfg.mean), tuple(cfg.std), x.device)
    return x.sub_(mean).div_(std)


@functools.lru_cache(maxsize=16)
def _channel_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Built once per device: a tensor made from Python numbers on a GPU is a blocking
    host-to-device copy, and normalize runs several times per step."""
    return torch.tensor(mean, device=device).view(3, 1, 1, 1), torch.tensor(std, device=device).view(3, 1, 1, 1)


# Colour operations on (N, 3, T, H, W) floats in [0, 1], factors (N,), as torchvision defines
# them, except that contrast blends towards the mean of the whole clip rather than of each
# frame: one factor, one reference, so frames of a clip stay consistent.


def _factor(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)  # (N, 1, T, H, W)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns: RGB -> HSV, h + shift, HSV -> RGB."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    delta = v - x.amin(1)
    s = delta / v.clamp_min(1e-8)
    d = delta.clamp_min(1e-8)
    rc, gc, bc = (v - r) / d, (v - g) / d, (v - b) / d
    h = torch.where(v == r, bc - gc, torch.where(v == g, 2 + rc - bc, 4 + gc - rc))
    h = (h / 6 + shift.view(-1, 1, 1, 1)) % 1.0
    # HSV -> RGB: channel n in (5, 3, 1) for (r, g, b) is v - v s clamp(min(k, 4 - k), 0, 1),
    # k = (n + 6h) mod 6.
    out = []
    for n in (5, 3, 1):
        k = (n + 6 * h) % 6
        out.append(v - v * s * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(out, 1)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per clip; kernel side 10% of the image, as SimCLR and the released code."""
    N, C, T, H, W = x.shape
    size = max(3, int(0.1 * W) // 2 * 2 + 1)
    r = size // 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-t.square() / (2 * sigma.view(-1, 1).square()))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C * T, 0)  # (N*C*T, size)
    y = F.pad(x.reshape(1, N * C * T, H, W), (r, r, r, r), mode="reflect")  # reflect, as torchvision
    y = F.conv2d(y, k.view(-1, 1, 1, size), groups=N * C * T)  # along W
    y = F.conv2d(y, k.view(-1, 1, size, 1), groups=N * C * T)  # along H
    return y.view(N, C, T, H, W)
