"""Nothing lost, nothing leaked: faults that used to pass silently, each now refused by name."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from helpers import tar_bytes

from dclr_dist import data
from dclr_dist.config import ConfigError, DataConfig, ShardConfig, ViewsConfig, load_config
from dclr_dist.data import DataError, resolve_shards, train_loader
from dclr_dist.shard.pack import pack

RGB = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)


# --------------------------------------------------------------------------- config files


@pytest.mark.parametrize(
    "text, key, line, first",
    [
        ("train:\n  epochs: 3\nshard:\n  crf: 20\ntrain:\n  lr: 0.1\n", "train", 5, 1),
        ("shard:\n  crf: 20\n  gop: 8\n  crf: 30\n", "crf", 4, 2),
        ("shard: {crf: 20, gop: 8}\ndata: {seed: 1, seed: 2}\n", "seed", 2, 2),
    ],
)
def test_duplicate_yaml_key_is_an_error_naming_key_file_and_line(tmp_path, text, key, line, first):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: line {line}: duplicate key '{key}' (first at line {first})"), message
    assert "\n" not in message


def test_yaml_merge_keys_still_override(tmp_path):
    # `<<: *base` then one of base's keys is YAML's own override, not a duplicate.
    path = tmp_path / "c.yaml"
    path.write_text("shard:\n  <<: &base {crf: 20, gop: 8}\n  crf: 30\n")
    cfg = load_config(path)
    assert (cfg.shard.crf, cfg.shard.gop) == (30, 8)


def test_config_path_that_is_a_folder_or_not_utf8_is_a_one_line_config_error(tmp_path):
    folder = tmp_path / "configs.yaml"
    folder.mkdir()
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("train:\n  name: caf\xe9\n".encode("latin-1"))
    for path, says in ((folder, "is a folder"), (latin1, "not UTF-8")):
        with pytest.raises(ConfigError) as e:
            load_config(path)
        message = str(e.value)
        assert message.startswith(f"{path}: ") and says in message and "\n" not in message, message


# --------------------------------------------------------------------------- values that crash workers


@pytest.mark.parametrize("key", ["data.seed", "train.seed", "shard.seed"])
def test_negative_seed_is_refused_by_validation(tmp_path, key):
    with pytest.raises(ValueError):
        np.random.default_rng(-1)  # what the workers would hit
    section, name = key.split(".")
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  {name}: -1\n")
    with pytest.raises(ConfigError, match=rf"c\.yaml: {key} must be >= 0, got -1"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"{key} must be >= 0, got -7"):
        load_config(None, [f"{key}=-7"])
    assert getattr(getattr(load_config(None, [f"{key}=0"]), section), name) == 0


# --------------------------------------------------------------------------- shard URLs

SAMPLE = [("v0.mp4", b"\x00" * 64), ("v0.json", b'{"frames": 8, "label": 0}')]


def _read(urls: list[str]) -> list[dict]:
    shards = resolve_shards(urls)
    return list(data.read_shards(iter(shards), data._Skips(len(shards)), retries=0))


def test_pipe_urls_are_refused_unless_allowed(tmp_path, monkeypatch):
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(tar_bytes(SAMPLE))
    marker = tmp_path / "ran"
    url = f"pipe:touch {marker} && cat {shard}"
    monkeypatch.delenv("DCLR_ALLOW_PIPE", raising=False)
    for urls in ([url], [f"pipe:touch {marker}"], [f"{{{shard},pipe:touch {marker} && cat {shard}}}"]):
        with pytest.raises(DataError, match=r"pipe: URLs run shell commands.*DCLR_ALLOW_PIPE=1"):
            resolve_shards(urls)
    cfg = DataConfig(train=[url], batch_size=1, loader_workers=0, epoch_samples=1, retries=0, pin_memory=False)
    with pytest.raises(DataError, match="pipe: URLs run shell commands"):
        train_loader(cfg, ViewsConfig())
    assert not marker.exists()  # refused before anything ran

    monkeypatch.setenv("DCLR_ALLOW_PIPE", "1")
    samples = _read([url])
    assert marker.exists() and [s["__key__"] for s in samples] == ["v0"]


@pytest.mark.parametrize(
    "kind, compress, suffix",
    [
        ("gzip", gzip.compress, ".tar.gz"),
        ("gzip", gzip.compress, ".tgz"),
        ("bzip2", bz2.compress, ".tar.bz2"),
        ("xz", lzma.compress, ".tar.xz"),
    ],
)
def test_compressed_shards_are_refused_by_name_and_by_content(tmp_path, kind, compress, suffix):
    packed = compress(tar_bytes(SAMPLE))
    named = tmp_path / f"shard-000000{suffix}"
    named.write_bytes(packed)
    with pytest.raises(DataError, match=r"compressed shards are not supported; repack .* `python -m dclr_dist\.shard`"):
        resolve_shards([str(named)])
    # ... also when an index.json lists it
    (tmp_path / "index.json").write_text(json.dumps({"shards": [{"name": named.name, "samples": 1}]}))
    with pytest.raises(DataError, match="compressed shards are not supported"):
        resolve_shards([str(tmp_path)])
    # ... and when it is named .tar: refused when opened, not skipped as a damaged shard
    disguised = tmp_path / "disguised.tar"
    disguised.write_bytes(packed)
    cfg = DataConfig(
        train=[str(disguised)], batch_size=1, loader_workers=0, epoch_samples=1, retries=0, pin_memory=False
    )
    with pytest.raises(DataError, match=rf"disguised\.tar: a {kind}-compressed tar; .*`python -m dclr_dist\.shard`"):
        list(train_loader(cfg, ViewsConfig()))


def test_plain_tar_whose_first_name_looks_like_bzip2_is_read(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(tar_bytes([("BZh91AY.mp4", b"\x00" * 64), ("BZh91AY.json", b"{}")] + SAMPLE))
    assert [s["__key__"] for s in _read([str(shard)])] == ["BZh91AY", "v0"]


# --------------------------------------------------------------------------- the packer


def _pack_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dclr_dist.shard", "--workers", "1", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_packer_exits_nonzero_when_every_input_is_rejected(tmp_path):
    for cls in ("Archery", "Bowling"):
        (tmp_path / "in" / cls).mkdir(parents=True)
        (tmp_path / "in" / cls / "clip.mp4").write_text("a text file, renamed\n")
    out = tmp_path / "out"
    r = _pack_cli("--input", str(tmp_path / "in"), "--output", str(out))
    assert r.returncode != 0, r
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: nothing packed: all 2 inputs were rejected"), (
        r.stderr
    )
    assert str(out / "rejects.jsonl") in r.stderr
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in rejects) == ["Archery/clip.mp4", "Bowling/clip.mp4"]


def _png(rgb: np.ndarray) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + row.tobytes() for row in rgb)  # filter 0 per scanline
    header = struct.pack(">IIBBBBB", rgb.shape[1], rgb.shape[0], 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _encode(path: Path, fmt: str, codec: str, pix_fmt: str, frames: int) -> None:
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = RGB.shape[1], RGB.shape[0], pix_fmt
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.roll(RGB, 4 * i, axis=1), format="rgb24").reformat(format=pix_fmt)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_still_images_renamed_mp4_are_rejected_with_a_reason(tmp_path):
    folder = tmp_path / "in" / "Archery"
    folder.mkdir(parents=True)
    (folder / "png.mp4").write_bytes(_png(RGB))
    _encode(folder / "jpeg.mp4", "image2pipe", "mjpeg", "yuvj420p", 1)
    _encode(folder / "gif.mp4", "gif", "gif", "rgb8", 1)
    _encode(folder / "video.mp4", "mp4", "libx264", "yuv420p", 8)
    _encode(folder / "one_frame.mp4", "mp4", "libx264", "yuv420p", 1)  # a video still, with a duration
    out = tmp_path / "out"
    index = pack(str(tmp_path / "in"), str(out), ShardConfig(short_side=32), workers=1, progress=False).index
    rejects = {r["source"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert set(rejects) == {"Archery/png.mp4", "Archery/jpeg.mp4", "Archery/gif.mp4"}, rejects
    assert all(reason.startswith("not a video: ") for reason in rejects.values()), rejects
    assert index["samples"] == 2 and index["samples"] + index["rejected"] == index["inputs"] == 5
    with tarfile.open(out / index["shards"][0]["name"]) as tar:
        frames = sorted(json.load(tar.extractfile(m))["frames"] for m in tar if m.name.endswith(".json"))
    assert frames == [1, 8]
