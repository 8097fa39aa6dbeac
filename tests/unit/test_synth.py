"""The synthetic scene-bias corpus: layout, decodability, determinism, and that the class is the motion."""

from __future__ import annotations

import csv
import hashlib
import shutil
from collections import defaultdict
from pathlib import Path

import av
import numpy as np
import pytest

from dclr_dist.shard import render, synth
from dclr_dist.shard.__main__ import _synth_parser
from dclr_dist.shard.__main__ import main as shard_main

# Small but complete: every motion, both splits, several scenes per pool.
SMALL = dict(
    num_classes=8,
    train_per_class=3,
    test_per_class=2,
    train_scenes=3,
    test_scenes=2,
    val_per_class=1,
    val_scenes=2,
    frames=24,
    size=64,
    fps=30,
    seed=0,
    progress=False,
)


def _rows(manifest: Path) -> list[dict]:
    with open(manifest, newline="") as f:
        return list(csv.DictReader(f))


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.float32)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    # Two workers here, one in the determinism test: the bytes must not depend on the pool.
    return synth.write_corpus(tmp_path_factory.mktemp("small"), workers=2, **SMALL)


@pytest.fixture(scope="module")
def motion(tmp_path_factory) -> Path:
    # 32 frames: one 16-frame clip at stride 2 spans the whole video.
    return synth.write_corpus(
        tmp_path_factory.mktemp("motion"),
        num_classes=6,
        train_per_class=12,
        test_per_class=1,
        frames=32,
        size=64,
        seed=3,
        workers=2,
        progress=False,
    )


def test_manifest_matches_files_and_pools(small):
    root = small.parent
    assert small.read_text().splitlines()[0] == "path,label,split,scene"
    rows = _rows(small)
    assert len(rows) == 8 * (3 + 2 + 1)
    assert sorted(r["path"] for r in rows) == sorted(p.relative_to(root).as_posix() for p in root.rglob("*.mp4"))
    assert not list(root.rglob("*.part"))
    for r in rows:
        split, label, name = r["path"].split("/")
        assert (split, label) == (r["split"], r["label"])  # UCF-101 class folders per split
        assert name.startswith(f"{label}_s{r['scene'][5:]}_v")
    assert len({r["path"] for r in rows}) == len(rows)
    scenes = {s: {int(r["scene"].removeprefix("scene")) for r in rows if r["split"] == s} for s in synth.SPLITS}
    assert scenes["train"] <= set(range(3)) and scenes["test"] <= {3, 4} and scenes["val"] <= {5, 6}
    for split in synth.SPLITS:
        assert {r["label"] for r in rows if r["split"] == split} == set(synth.MOTIONS)


def test_videos_decode_as_specified(small):
    for r in _rows(small)[::7]:
        with av.open(str(small.parent / r["path"])) as c:
            s = c.streams.video[0]
            assert (s.codec_context.name, s.codec_context.pix_fmt) == ("h264", "yuv420p")
            assert s.average_rate == 30
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        assert len(frames) == 24
        assert frames[0].shape == (64, 64, 3)


def test_same_seed_same_bytes_other_seed_other_bytes(small, tmp_path):
    again = synth.write_corpus(tmp_path / "again", workers=1, **SMALL)
    assert _digests(again.parent) == _digests(small.parent)
    other = synth.write_corpus(tmp_path / "other", workers=1, **{**SMALL, "seed": 1})
    a, b = _digests(small.parent), _digests(other.parent)
    videos = [k for k in a if k.endswith(".mp4") and k in b]
    # The scene picks change with the seed, so only some names recur; those must differ.
    assert videos and all(a[k] != b[k] for k in videos)


def test_scene_column_is_the_scene_in_the_pixels(small):
    # The median over time removes the moving object; it must be nearest to the recorded
    # scene among all scenes of the three pools.
    scenes = [render.render_scene(i, 64, 0) * 255 for i in range(7)]
    for r in _rows(small)[::5]:
        background = np.median(_decode(small.parent / r["path"]), axis=0)
        errors = [np.abs(background - s).mean() for s in scenes]
        assert int(np.argmin(errors)) == int(r["scene"][5:])


def _centroids(video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Object centre per frame: the pixels that differ from the video's median frame."""
    moving = np.abs(video - np.median(video, axis=0)).sum(-1) > 60  # (T, H, W)
    ys, xs = np.mgrid[: video.shape[1], : video.shape[2]]
    n = moving.sum((1, 2))
    assert n.min() > 0, "the object disappeared"
    return (moving * xs).sum((1, 2)) / n, (moving * ys).sum((1, 2)) / n


def test_class_is_the_motion(motion):
    directions = {"move_right": (1, 0), "move_left": (-1, 0), "move_down": (0, 1), "move_up": (0, -1)}
    for r in _rows(motion):
        cx, cy = _centroids(_decode(motion.parent / r["path"]))
        if r["label"] in directions:
            dx, dy = directions[r["label"]]
            along, across = dx * cx + dy * cy, dy * cx + dx * cy
            # Every 16-frame clip at stride 1 moves the object the class's way, visibly
            # (the whole 32-frame video is the clip at stride 2).
            shifts = along[15:] - along[:-15]
            assert shifts.min() > 0.05 * 64, (r["path"], shifts.min())
            t = np.arange(len(cx))
            assert abs(np.polyfit(t, across, 1)[0]) < 0.5 * np.polyfit(t, along, 1)[0], r["path"]
        else:
            # Angle of the centroid around its mean: increasing is clockwise with y down.
            angle = np.unwrap(np.arctan2(cy - cy.mean(), cx - cx.mean()))
            turn = np.polyfit(np.arange(len(angle)), angle, 1)[0]
            assert (turn > 0) == (r["label"] == "orbit_cw"), (r["path"], turn)


def test_scene_is_drawn_independently_of_class(motion):
    classes_per_scene = defaultdict(set)
    for r in _rows(motion):
        if r["split"] == "train":
            classes_per_scene[r["scene"]].add(r["label"])
    assert len(classes_per_scene) == 8  # the whole training pool is used
    assert all(len(c) >= 3 for c in classes_per_scene.values()), classes_per_scene


def test_resume_rewrites_exactly_the_missing_file(small, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(small.parent, root)
    before = _digests(root)
    victim = root / _rows(small)[5]["path"]
    victim.unlink()
    (root / "manifest.csv").unlink()
    # What a killed run leaves behind: a half-written temp file.
    (victim.parent / (victim.name + ".part")).write_bytes(b"half a video")
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*.mp4")}
    synth.write_corpus(root, workers=1, **SMALL)
    assert _digests(root) == before
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # the others were not rewritten


def test_refuses_a_folder_written_with_other_arguments(small, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(small.parent, root)
    with pytest.raises(ValueError, match=r"seed=0 \(now 5\)"):
        synth.write_corpus(root, **{**SMALL, "seed": 5})


@pytest.mark.parametrize(
    "override, error, message",
    [
        (dict(num_classes=9), ValueError, "between 1 and 8"),
        (dict(num_classes=0), ValueError, "num_classes"),
        (dict(train_per_class=0), ValueError, "train_per_class must be >= 1"),
        (dict(test_scenes=0), ValueError, "test_scenes must be >= 1"),
        (dict(frames=8), ValueError, "frames must be >= 16"),
        (dict(size=63), ValueError, "size must be even"),
        (dict(size=16), ValueError, "size must be >= 32"),
        (dict(fps=0), ValueError, "fps must be >= 1"),
        (dict(workers=0), ValueError, "workers must be >= 1"),
        (dict(size=64.0), TypeError, "size must be an int"),
    ],
)
def test_invalid_arguments(tmp_path, override, error, message):
    with pytest.raises(error, match=message):
        synth.write_corpus(tmp_path / "x", **{**SMALL, **override})
    assert not (tmp_path / "x").exists()  # nothing written before validation


def test_command_line(tmp_path, capsys):
    defaults = _synth_parser().parse_args(["--output", "x"])
    assert (defaults.classes, defaults.variant, defaults.frames, defaults.size) == (None, None, 48, 128)
    assert (
        shard_main(
            [
                "synth",
                "--output",
                str(tmp_path / "c"),
                "--classes",
                "2",
                "--train-per-class",
                "2",
                "--test-per-class",
                "1",
                "--train-scenes",
                "2",
                "--test-scenes",
                "1",
                "--frames",
                "16",
                "--size",
                "32",
                "--fps",
                "25",
                "--seed",
                "0",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "4 train + 2 test videos" in out and str(tmp_path / "c" / "manifest.csv") in out
    assert len(_rows(tmp_path / "c" / "manifest.csv")) == 6
    assert shard_main(["synth", "--output", str(tmp_path / "d"), "--classes", "99"]) == 1
    assert "num_classes must be between 1 and 8" in capsys.readouterr().err


def test_an_output_that_is_a_file_or_a_damaged_record_is_one_line(small, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"file: is a file, not a folder; choose another --output"):
        synth.write_corpus(tmp_path / "file", **SMALL)
    root = tmp_path / "corpus"
    shutil.copytree(small.parent, root)
    (root / "synth.json").write_text('{"seed": ')
    with pytest.raises(ValueError, match=r"synth.json: damaged .* delete the folder"):
        synth.write_corpus(root, **SMALL)
