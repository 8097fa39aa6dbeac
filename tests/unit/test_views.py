"""DCLR views: crops, per-clip augmentation, static and dynamic views, parameter draws."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from dclr_dist import views
from dclr_dist.config import ConfigError, ViewsConfig, load_config
from dclr_dist.views import (
    BOX,
    BRIGHTNESS,
    CONTRAST,
    FLIP,
    FRAME,
    GRAY,
    HUE,
    JITTER,
    NUM_PARAMS,
    ORDER,
    SATURATION,
    SIGMA,
)

# Every augmentation on, so a test sees each one act.
ALL_ON = ViewsConfig(frames=4, stride=2, size=16, jitter_p=1.0, gray_p=0.0, blur_p=1.0, flip_p=1.0)


def batch_of(frames: torch.Tensor, cfg: ViewsConfig, seed: int = 0) -> dict:
    """A loader batch for (B, 3, T+1, H, W) uint8 frames, used as both clips, with drawn parameters."""
    rng = np.random.default_rng(seed)
    B, _, _, H, W = frames.shape
    aug = torch.from_numpy(np.stack([views.draw(rng, cfg, H, W) for _ in range(B)]))
    return {"q": frames, "k": frames.clone(), "aug": aug, "label": torch.arange(B)}


def random_frames(B=3, T1=5, H=24, W=20, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (B, 3, T1, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def identity_params(n: int) -> torch.Tensor:
    p = torch.zeros(n, NUM_PARAMS)
    p[:, [BRIGHTNESS, CONTRAST, SATURATION]] = 1
    p[:, ORDER] = torch.arange(4.0)
    return p


def unnormalize(x: torch.Tensor, cfg: ViewsConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean).view(3, 1, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1, 1)
    return x * std + mean


def test_views_have_the_models_shapes_and_dtype():
    cfg = ViewsConfig(frames=4, size=16)
    out = views.dclr_views(batch_of(random_frames(), cfg), cfg)
    assert set(out) == {"q", "k", "static_q", "static_k", "dynamic_q", "dynamic_k", "label"}
    for name in ("q", "k", "static_q", "static_k", "dynamic_q", "dynamic_k"):
        assert out[name].shape == (3, 3, 4, 16, 16) and out[name].dtype == torch.float32, name
        assert torch.isfinite(out[name]).all()
    assert torch.equal(out["label"], torch.arange(3))


def test_crop_box_stays_inside_the_frame_within_scale_and_ratio():
    cfg = ViewsConfig(scale=[0.2, 1.0])
    rng = np.random.default_rng(0)
    for height, width in ((128, 170), (128, 128), (240, 320), (20, 200)):
        for _ in range(200):
            top, left, h, w = views.crop_box(rng, height, width, cfg)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            if (height, width) != (20, 200):  # that one is too wide for the ratio range: the fallback
                assert 0.18 <= h * w / (height * width) <= 1.0
                assert 3 / 4 - 0.06 <= w / h <= 4 / 3 + 0.06


def test_crop_of_a_box_the_output_size_is_a_plain_slice():
    frames = random_frames(B=1, T1=4)[0].transpose(0, 1)  # (4, 3, 24, 20)
    boxes = torch.tensor([[3, 2, 16, 16]] * 4)
    out = views.crop(frames, boxes, 16)
    assert torch.allclose(out, frames[:, :, 3:19, 2:18].float() / 255, atol=1e-6)


def test_augmentation_is_identical_across_the_frames_of_a_clip():
    # A still clip (every frame the same picture) must stay still under augmentation.
    still = random_frames(B=4, T1=1).expand(-1, -1, ALL_ON.frames + 1, -1, -1).contiguous()
    out = views.dclr_views(batch_of(still, ALL_ON), ALL_ON)
    for name in ("q", "k", "static_q", "static_k"):
        x = out[name]
        assert torch.equal(x, x[:, :, :1].expand_as(x)), name
    assert out["dynamic_q"].abs().max() == 0

    # A moving clip: each frame is augmented exactly as it would be alone, with the clip's
    # parameters (contrast off: it blends towards the whole clip's mean, by design).
    cfg = ViewsConfig(frames=4, size=16, jitter=[0.4, 0.0, 0.4, 0.1], jitter_p=1.0, gray_p=0.5, blur_p=1.0)
    frames = random_frames(B=4)
    batch = batch_of(frames, cfg, seed=3)
    out = views.dclr_views(batch, cfg)
    B, _, T1, H, W = frames.shape
    aug = batch["aug"].clone()
    aug[:, 2:, FRAME] = 1  # the static views of the two-frame clips below
    for t in range(1, T1):
        one = {"q": frames[:, :, t : t + 1].expand(-1, -1, 2, -1, -1), "k": frames[:, :, :2], "aug": aug}
        alone = views.dclr_views(one, cfg)["q"][:, :, 0]
        assert torch.allclose(out["q"][:, :, t - 1], alone, atol=1e-5), t


def test_static_view_is_one_frame_of_the_clip_repeated_with_its_own_augmentation():
    cfg = dataclasses.replace(ALL_ON, static_crop="own")  # the released code's: a crop of its own
    frames = random_frames(B=3)
    batch = batch_of(frames, cfg, seed=1)
    out = views.dclr_views(batch, cfg)
    aug = batch["aug"]
    for name, row in (("static_q", 2), ("static_k", 3)):
        s = out[name]
        assert torch.equal(s, s[:, :, :1].expand_as(s))  # one frame repeated T times
        t = aug[:, row, FRAME].long()
        assert ((t >= 1) & (t <= cfg.frames)).all()  # a frame of v_0..v_{T-1}
        frame = frames[torch.arange(3), :, t]  # (B, 3, H, W)
        expected = views.augment(views.crop(frame, aug[:, row, BOX], cfg.size).unsqueeze(2), aug[:, row], cfg)
        assert torch.allclose(s[:, :, 0], expected[:, :, 0], atol=1e-6)
    # Its own crop and colours, not the clip's.
    assert not torch.equal(aug[:, 2, BOX], aug[:, 0, BOX])


def test_aligned_static_view_takes_the_clips_crop_and_flip_and_its_own_colour():
    cfg = ViewsConfig(frames=4, size=16, jitter_p=1.0, flip_p=0.5, static_crop="clip")
    aug = np.stack([views.draw(np.random.default_rng(i), cfg, 24, 20) for i in range(20)])
    for clip, static in ((0, 2), (1, 3)):
        assert (aug[:, static, BOX] == aug[:, clip, BOX]).all() and (aug[:, static, FLIP] == aug[:, clip, FLIP]).all()
        assert (aug[:, static, BRIGHTNESS] != aug[:, clip, BRIGHTNESS]).any()


def test_views_never_make_the_host_wait():
    # Boolean-mask indexing and `if tensor.any()` read a device value on the host; on CUDA
    # each is a synchronisation. Counted on CPU through the ops that would do it.
    cfg = ViewsConfig(frames=4, size=16, jitter_p=0.5, gray_p=0.5, blur_p=0.5, flip_p=0.5)
    batch = batch_of(random_frames(B=8), cfg)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        views.dclr_views(batch, cfg)
    ops = {e.key: e.count for e in prof.key_averages()}
    assert ops.get("aten::_local_scalar_dense", 0) == 0 and ops.get("aten::nonzero", 0) == 0, {
        k: v for k, v in ops.items() if k in ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")
    }


def test_dynamic_view_is_the_temporal_difference_of_the_augmented_clip():
    cfg = ALL_ON
    frames = random_frames(B=2)
    batch = batch_of(frames, cfg, seed=2)
    out = views.dclr_views(batch, cfg)
    B, _, T1, H, W = frames.shape
    aug = batch["aug"]
    crops = views.crop(
        frames.transpose(1, 2).reshape(B * T1, 3, H, W), aug[:, 0, BOX].repeat_interleave(T1, 0), cfg.size
    )
    x = views.augment(crops.view(B, T1, 3, cfg.size, cfg.size).transpose(1, 2), aug[:, 0], cfg)  # v_{-1}..v_{T-1}
    assert torch.allclose(out["q"], x[:, :, 1:], atol=1e-6)
    for t in range(cfg.frames):
        assert torch.allclose(out["dynamic_q"][:, :, t], x[:, :, t + 1] - x[:, :, t], atol=1e-6)
    # d_0 uses the frame before the clip, not the released code's wrap-around v_0 - v_{T-1}.
    assert not torch.allclose(out["dynamic_q"][:, :, 0], x[:, :, 1] - x[:, :, -1])


def test_colour_operations_match_torchvision_on_single_images():
    # Colour jitter: every clip's four operations in its own drawn order, as ColorJitter applies them.
    cfg = ViewsConfig(frames=1, size=16, jitter_p=1.0)
    rng = np.random.default_rng(0)
    p = torch.from_numpy(np.stack([views.draw(rng, cfg, 16, 16)[0] for _ in range(24)]))
    x = torch.rand(24, 3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    got = views._jitter(x.clone(), p)[:, :, 0]
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(24):
        want = x[i, :, 0]
        for op in p[i, ORDER].long().tolist():
            want = ops[op](want, float(p[i, BRIGHTNESS + op]))
        assert torch.allclose(got[i], want, atol=1e-4), p[i, ORDER]
    assert len({tuple(r) for r in p[:, ORDER].tolist()}) > 10  # many orders seen
    x, image = x[:2], x[:2, :, 0]  # (2, 3, H, W)
    shift = torch.tensor([-0.1, 0.25])
    got = views._hue(x.clone(), shift)[:, :, 0]
    want = torch.stack([TF.adjust_hue(image[i], float(shift[i])) for i in range(2)])
    assert torch.allclose(got, want, atol=1e-4)
    sigma = torch.tensor([0.5, 2.0])
    got = views._blur(x.clone(), sigma)[:, :, 0]
    want = torch.stack([TF.gaussian_blur(image[i], [3, 3], [float(sigma[i])] * 2) for i in range(2)])
    assert torch.allclose(got, want, atol=1e-5)


def test_flip_and_grayscale_do_what_their_flags_say():
    cfg = ViewsConfig(frames=2, size=8)
    x = torch.rand(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    p = identity_params(2)
    plain = views.augment(x.clone(), p, cfg)
    p[0, FLIP] = 1
    p[1, GRAY] = 1
    out = views.augment(x.clone(), p, cfg)
    assert torch.equal(out[0], plain[0].flip(-1))
    gray = unnormalize(out[1], cfg)
    assert torch.allclose(gray[0], gray[1], atol=1e-5) and torch.allclose(gray[1], gray[2], atol=1e-5)
    # All flags off: only normalisation.
    assert torch.allclose(unnormalize(plain, cfg), x, atol=1e-5)


def test_draw_follows_the_configured_probabilities_and_ranges():
    cfg = ViewsConfig(jitter_p=0.8, gray_p=0.2, blur_p=0.5, flip_p=0.5, blur_sigma=[0.1, 2.0])
    rng = np.random.default_rng(0)
    p = np.concatenate([views.draw(rng, cfg, 128, 170) for _ in range(1000)])  # 4000 rows
    for column, prob in ((JITTER, 0.8), (GRAY, 0.2), (FLIP, 0.5)):
        assert abs(p[:, column].mean() - prob) < 0.03
    assert abs((p[:, SIGMA] > 0).mean() - 0.5) < 0.03
    blurred = p[p[:, SIGMA] > 0, SIGMA]
    assert blurred.min() >= 0.1 and blurred.max() <= 2.0
    jittered = p[p[:, JITTER] > 0]
    assert jittered[:, BRIGHTNESS].min() >= 0.6 and jittered[:, BRIGHTNESS].max() <= 1.4
    assert np.abs(jittered[:, HUE]).max() <= 0.1
    assert all(sorted(o) == [0, 1, 2, 3] for o in jittered[:, ORDER])
    assert len({tuple(o) for o in jittered[:, ORDER]}) == 24  # every order occurs
    off = ViewsConfig(jitter_p=0, gray_p=0, blur_p=0, flip_p=0)
    p = np.concatenate([views.draw(rng, off, 64, 64) for _ in range(100)])
    assert not p[:, [JITTER, GRAY, SIGMA, FLIP]].any()


def test_eval_clips_are_the_centre_crop_normalised():
    cfg = ViewsConfig(frames=2, size=14)
    clips = torch.randint(0, 256, (2, 3, 3, 2, 16, 20), dtype=torch.uint8)  # (B, N, 3, T, H, W)
    box = torch.tensor([views.center_box(16, 20)] * 2, dtype=torch.float32)
    assert views.center_box(16, 20) == (1, 3, 14, 14)
    out = views.eval_clips({"clips": clips, "box": box, "label": torch.zeros(2)}, cfg)
    assert out["clips"].shape == (2, 3, 3, 2, 14, 14)
    assert torch.allclose(unnormalize(out["clips"], cfg), clips[..., 1:15, 3:17].float() / 255, atol=1e-5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("views.scale=[0.5, 0.2]", "views.scale must be [lo, hi]"),
        ("views.jitter=[0.4, 0.4, 0.4]", "views.jitter must hold 4 numbers"),
        ("views.gray_p=1.5", "views.gray_p must be a probability"),
        ("views.augment_on=gpu", "views.augment_on must be one of"),
        ("views.std=[0.2, 0, 0.2]", "views.std must be > 0"),
    ],
)
def test_views_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [override])
    assert math.isclose(load_config(None, ["views.scale=[0.3, 1]"]).views.scale[0], 0.3)


def test_normalisation_builds_its_constants_once_per_device(monkeypatch):
    x = torch.rand(2, 3, 4, 8, 8)
    expected = (x - torch.tensor(ALL_ON.mean).view(3, 1, 1, 1)) / torch.tensor(ALL_ON.std).view(3, 1, 1, 1)
    views.normalize(x.clone(), ALL_ON)  # the first call may build them
    built = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: built.append(a) or real(*a, **k))
    out = views.normalize(x.clone(), ALL_ON)
    # On a GPU each tensor made from Python numbers is a blocking host-to-device copy.
    assert built == [] and torch.allclose(out, expected, atol=1e-6)
