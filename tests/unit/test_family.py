"""The motion family: each variant's class is its motion, the nuisances do what they say, and
corpora of a variant are written, recorded and refused like the scene-bias corpus."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from dclr_dist.shard import family, synth
from dclr_dist.shard.__main__ import main as shard_main

FRAMES, SIZE = 24, 48


def track(motion: str, v: family.Variant | None = None, key=(0, 2, 0, 0, 0)) -> dict:
    v = v or family.Variant((motion,))
    return family._object(v, motion, np.random.default_rng(list(key)), FRAMES)


def render(v: family.Variant, scene: int, key: list[int]) -> np.ndarray:
    """A training video of ``v``'s first motion."""
    return family.render_variant(v, v.motions[0], scene, key=key, frames=FRAMES, size=SIZE, seed=0, split="train")


@pytest.mark.parametrize("name", list(family.VARIANTS))
def test_every_variant_renders_deterministic_frames(name):
    v = family.VARIANTS[name]
    video = render(v, 3, [0, 2, 0, 0, 1])
    assert video.shape == (FRAMES, SIZE, SIZE, 3) and video.dtype == np.float32
    assert 0 <= video.min() and video.max() <= 1
    again = render(v, 3, [0, 2, 0, 0, 1])
    other = render(v, 3, [0, 2, 0, 0, 2])
    assert np.array_equal(video, again) and not np.array_equal(video, other)


def test_translations_move_the_object_their_way():
    for motion, axis, sign in (
        ("move_right", "x", 1),
        ("move_left", "x", -1),
        ("move_down", "y", 1),
        ("move_up", "y", -1),
    ):
        t = track(motion)
        step = np.diff(t[axis])
        assert (np.sign(step) == sign).all(), motion
        assert np.ptp(t["y" if axis == "x" else "x"]) == 0  # straight along its axis
        r = t["r"][0]
        assert (t[axis] - r >= 0).all() and (t[axis] + r <= 1).all()  # "fit": the path stays in the frame


def test_wrapping_objects_leave_one_side_and_come_back_at_the_other():
    v = family.Variant(("move_right",), speed=(0.05, 0.05), edge="wrap")
    x = track("move_right", v)["x"]
    steps = np.diff(x)
    assert (steps < 0).sum() >= 1  # the jump back: wrapped
    assert np.allclose(steps[steps > 0], 0.05)  # otherwise always rightwards


def test_orbits_turn_their_way_and_zooms_scale_their_way():
    for motion, sense in (("orbit_cw", 1), ("orbit_ccw", -1)):
        t = track(motion)
        cx, cy = t["x"].mean(), t["y"].mean()  # near the centre over most of a turn; use the angle's sign
        angle = np.unwrap(np.arctan2(t["y"] - cy, t["x"] - cx))
        assert sense * (angle[-1] - angle[0]) > 0, motion  # image y down: increasing angle is clockwise
    assert (np.diff(np.log(track("zoom_in")["r"])) > 0).sum() > FRAMES // 2
    assert (np.diff(np.log(track("zoom_out")["r"])) < 0).sum() > FRAMES // 2


def test_oscillations_go_back_and_forth_along_their_axis():
    for motion, axis in (("oscillate_h", "x"), ("oscillate_v", "y")):
        t = track(motion, family.Variant((motion,), speed=(0.02, 0.02)))
        signs = np.sign(np.diff(t[axis]))
        assert (signs > 0).any() and (signs < 0).any(), motion  # both ways within one video
        assert np.ptp(t["y" if axis == "x" else "x"]) == 0


def test_nothing_but_the_motion_depends_on_the_class():
    v = family.VARIANTS["hard"]
    a, b = track("move_right", v), track("orbit_cw", v)
    assert a["shape"] == b["shape"] and np.array_equal(a["fill"], b["fill"])
    assert a["r"][0] == b["r"][0]  # size drawn the same way too


def changed_pixels(v: family.Variant) -> float:
    """Fraction of pixels that change between two frames of a video of ``v``."""
    video = render(v, 0, [0, 2, 0, 0, 0])
    return float((np.abs(video[FRAMES // 2] - video[FRAMES // 2 + 1]).max(-1) > 1e-3).mean())


def test_camera_motion_moves_the_background_and_distractors_move_too():
    still = family.Variant(("move_right",))
    assert changed_pixels(still) < 0.1  # only the object
    assert changed_pixels(family.Variant(("move_right",), camera="pan")) > 0.5  # every background pixel
    assert changed_pixels(family.Variant(("move_right",), distractors=2)) > changed_pixels(still)


def test_photo_scenes_are_crops_of_photographs_no_other_split_shows():
    assert not set(family.PHOTOS["train"]) & (set(family.PHOTOS["val"]) | set(family.PHOTOS["test"]))
    assert not set(family.PHOTOS["val"]) & set(family.PHOTOS["test"])
    crops = {
        split: [family._photo_crop(s, 2 * SIZE, 0, split) for s in range(len(family.PHOTOS[split]))]
        for split in ("train", "test")
    }
    for crop in crops["train"] + crops["test"]:
        assert crop.shape == (2 * SIZE, 2 * SIZE, 3) and crop.dtype == np.float32 and crop.std() > 0.02
    assert np.array_equal(family._photo_crop(1, 2 * SIZE, 0, "train"), crops["train"][1])
    # Scenes that take their turn on the same photograph are other crops of it.
    again = family._photo_crop(len(family.PHOTOS["train"]), 2 * SIZE, 0, "train")
    assert not np.array_equal(again, crops["train"][0])
    # A test scene matches no training scene, the same scene id included.
    for t in crops["test"]:
        assert min(np.abs(t - c).mean() for c in crops["train"]) > 0.05


def test_photo_background_without_its_package_says_what_to_install(monkeypatch):
    family._photo.cache_clear()
    monkeypatch.setattr(family.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="skimage ships.*pip install scikit-image"):
        family._photo_crop(0, 2 * SIZE, 0, "train")
    family._photo.cache_clear()


def test_camera_drift_is_centred_on_the_clip_s_middle_frame():
    cam = family._camera("pan+zoom", np.random.default_rng(5), FRAMES)
    mid = cam[(FRAMES - 1) // 2]
    assert abs(mid[0] - 0.5) < 0.01 and abs(mid[1] - 0.5) < 0.01 and abs(math.log(mid[2])) < 0.01
    with pytest.raises(ValueError, match="camera"):
        family._camera("dolly", np.random.default_rng(5), FRAMES)


def test_unknown_variant_is_one_line_naming_the_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus variant 'spin'.*translate"):
        synth.write_corpus(tmp_path / "x", variant="spin")


def test_a_variant_corpus_has_its_motions_as_classes_and_is_recorded(tmp_path):
    args = dict(train_per_class=1, test_per_class=1, train_scenes=2, test_scenes=1, frames=16, size=32, progress=False)
    manifest = synth.write_corpus(tmp_path / "c", variant="rotate_zoom", **args)
    with open(manifest, newline="") as f:
        labels = sorted({r["label"] for r in csv.DictReader(f)})
    assert labels == sorted(family.VARIANTS["rotate_zoom"].motions)
    assert json.loads((tmp_path / "c" / "synth.json").read_text())["motions"] == list(
        family.VARIANTS["rotate_zoom"].motions
    )
    with pytest.raises(ValueError, match="other arguments: motions"):
        synth.write_corpus(tmp_path / "c", variant="translate", **args)
    # The same motions drawn another way are another corpus too.
    synth.write_corpus(tmp_path / "t", variant="translate", **args)
    with pytest.raises(ValueError, match="variant=translate"):
        synth.write_corpus(tmp_path / "t", variant="hard", num_classes=4, **args)


def test_command_line_writes_a_variant(tmp_path, capsys):
    argv = ["synth", "--output", str(tmp_path / "v"), "--variant", "oscillate_wrap", "--classes", "2"]
    argv += ["--train-per-class", "1", "--test-per-class", "1", "--train-scenes", "1", "--test-scenes", "1"]
    argv += ["--frames", "16", "--size", "32"]
    assert shard_main(argv) == 0
    assert "2 motion classes" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "v" / "train").iterdir()) == ["move_left", "move_right"]
