"""Packing real videos into WebDataset shards: layout, keys, bad inputs, determinism, resume, S3."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds

from dclr_dist import storage
from dclr_dist.config import ShardConfig
from dclr_dist.shard.pack import PackError, list_inputs, pack, sample_key

CFG = ShardConfig(short_side=64, max_samples=2)


def _records(output: str) -> list[dict]:
    """Every sample of every shard listed in index.json, read with webdataset."""
    index = json.loads(storage.read_bytes(storage.join(output, "index.json")))
    urls = [storage.join(output, s["name"]) for s in index["shards"]]
    records = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        assert set(sample) >= {"__key__", "mp4", "json"}, sorted(sample)
        record = json.loads(sample["json"])
        assert record["key"] == sample["__key__"]
        with av.open(io.BytesIO(sample["mp4"])) as c:
            frames = [f for f in c.decode(video=0)]
        assert len(frames) == record["frames"]
        assert (frames[0].width, frames[0].height) == (record["width"], record["height"])
        records.append(record)
    return records


def _rejects(output: str) -> list[dict]:
    text = storage.read_bytes(storage.join(output, "rejects.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines()]


def _make_bad_inputs(folder: Path, good: Path) -> dict[str, str]:
    """The bad inputs a real corpus has, each with the reject reason we expect (a substring)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "random_bytes.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    data = good.read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 3])  # moov atom at the end: lost
    (folder / "notes.txt").write_text("not a video")
    os.symlink(folder / "gone.mp4", folder / "dangling.mp4")
    with av.open(str(folder / "audio_only.m4a"), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode(None):
            out.mux(p)
    with av.open(str(folder / "zero_frames.mp4"), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        out.start_encoding()  # header and an empty track, no frames
    return {
        "empty.mp4": "empty file",
        "random_bytes.mp4": "not a readable video container",
        "truncated.mp4": "not a readable video container",
        "notes.txt": "not a readable video container",
        "dangling.mp4": "file not found",
        "audio_only.m4a": "no video stream (found: audio)",
        "zero_frames.mp4": "no video frames",
    }


def test_real_videos_pack_with_distinct_valid_keys(class_folders, tmp_path):
    out = str(tmp_path / "out")
    result = pack(str(class_folders), out, CFG, workers=2, progress=False)
    index = result.index
    records = _records(out)

    assert index["inputs"] == index["samples"] == len(records) == 5
    assert index["rejected"] == 0 and _rejects(out) == []
    assert index["classes"] == ["Biking", "Talking"]
    assert {r["source"] for r in records} == {str(p.relative_to(class_folders)) for p in class_folders.rglob("*.mp4")}
    keys = [r["key"] for r in records]
    assert len(set(keys)) == 5
    for key in keys:  # webdataset takes the key up to the first dot of the member name
        assert "." not in key and "/" not in key and key.isascii()
    for r in records:
        assert r["label"] == index["classes"].index(r["class"])
        assert min(r["width"], r["height"]) == 64 and r["width"] % 2 == r["height"] % 2 == 0
        assert r["fps"] > 0 and r["duration"] == pytest.approx(r["frames"] / r["fps"], rel=1e-3)
    # max_samples=2: 5 samples make 3 shards, each as index.json describes it
    assert [s["samples"] for s in index["shards"]] == [2, 2, 1]
    for shard in index["shards"]:
        path = Path(out) / shard["name"]
        assert path.stat().st_size == shard["bytes"]
        import hashlib

        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
    assert sorted(p.name for p in Path(out).iterdir()) == [
        "index.json",
        "rejects.jsonl",
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]


def test_inputs_are_written_in_a_seeded_shuffled_order(class_folders, tmp_path):
    listing = [i.source for i in list_inputs(str(class_folders))[0]]  # class-sorted
    written = {}
    for shuffle, seed in ((True, 0), (True, 1), (False, 0)):
        out = str(tmp_path / f"out-{shuffle}-{seed}")
        pack(str(class_folders), out, dataclasses.replace(CFG, shuffle=shuffle, seed=seed), progress=False)
        written[shuffle, seed] = [r["source"] for r in _records(out)]
    assert written[False, 0] == listing
    for seed in (0, 1):
        order = np.random.default_rng(seed).permutation(len(listing))
        assert written[True, seed] == [listing[i] for i in order]
    assert written[True, 0] != written[True, 1]


def test_shards_are_plain_tar(class_folders, tmp_path):
    out = tmp_path / "out"
    pack(str(class_folders), str(out), CFG, workers=1, progress=False)
    listing = subprocess.run(
        ["tar", "-tvf", str(out / "shard-000000.tar")], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    names = [line.split()[-1] for line in listing]
    assert len(names) == 4 and [n.rsplit(".", 1)[1] for n in names] == ["mp4", "json"] * 2
    assert all(" 1970-01-01 " in line for line in listing)  # no clock in the headers
    extracted = tmp_path / "x"
    extracted.mkdir()
    subprocess.run(["tar", "-xf", str(out / "shard-000000.tar"), "-C", str(extracted)], check=True)
    mp4 = next(extracted.glob("*.mp4"))
    with av.open(str(mp4)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert sum(1 for _ in c.decode(stream)) == json.loads(mp4.with_suffix(".json").read_text())["frames"]


def test_bad_inputs_are_rejected_with_reasons_and_nothing_is_lost(class_folders, tmp_path, sample_videos):
    expected = _make_bad_inputs(class_folders / "Broken", sample_videos["bikes"])
    (class_folders / "stray.mp4").write_bytes(b"")  # outside any class folder
    out = str(tmp_path / "out")
    index = pack(str(class_folders), out, CFG, workers=2, progress=False).index
    rejects = {r["source"]: r["reason"] for r in _rejects(out)}
    records = _records(out)

    inputs, _ = list_inputs(str(class_folders))
    assert index["samples"] + index["rejected"] == index["inputs"] == len(inputs) == 5 + len(expected) + 1
    assert {r["source"] for r in records} | set(rejects) == {i.source for i in inputs}
    for name, reason in expected.items():
        assert reason in rejects[f"Broken/{name}"], (name, rejects[f"Broken/{name}"])
    assert "class folder" in rejects["stray.mp4"]
    # counted by kind: the text before its first ':' or ' (' ("no video stream (found: audio)")
    assert index["reject_reasons"]["no video stream"] >= 1 and index["reject_reasons"]["not inside a class folder"] == 1
    assert not any("(" in kind for kind in index["reject_reasons"]), index["reject_reasons"]
    # a class whose every file was rejected still has its label index: labels never shift
    assert index["classes"] == ["Biking", "Broken", "Talking"]


def test_partially_decodable_video_is_kept_and_flagged(tmp_path, sample_videos):
    # moov first (faststart), then cut the media data: the first frames still decode.
    src = tmp_path / "faststart.mp4"
    with av.open(str(sample_videos["bikes"])) as c, av.open(str(src), "w", options={"movflags": "+faststart"}) as o:
        s = o.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 320, 136, "yuv420p"
        for i, frame in enumerate(c.decode(video=0)):
            f = frame.reformat(width=320, height=136, format="yuv420p")
            f.pts, f.time_base = i, Fraction(1, 25)
            for p in s.encode(f):
                o.mux(p)
        for p in s.encode(None):
            o.mux(p)
    data = src.read_bytes()
    (tmp_path / "in" / "cls").mkdir(parents=True)
    (tmp_path / "in" / "cls" / "cut.mp4").write_bytes(data[: int(len(data) * 0.6)])
    out = str(tmp_path / "out")
    index = pack(str(tmp_path / "in"), out, CFG, progress=False).index
    (record,) = _records(out)
    assert index["samples"] == 1 and 0 < record["frames"] < 250
    assert "partial" in record and "decoding stopped after" in record["partial"]


def test_same_input_and_options_give_identical_shards(class_folders, tmp_path):
    a = pack(str(class_folders), str(tmp_path / "a"), CFG, workers=1, progress=False).index
    b = pack(str(class_folders), str(tmp_path / "b"), CFG, workers=2, progress=False).index
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert (tmp_path / "a" / "index.json").read_bytes() == (tmp_path / "b" / "index.json").read_bytes()
    c = pack(
        str(class_folders), str(tmp_path / "c"), ShardConfig(short_side=64, max_samples=2, crf=30), progress=False
    ).index
    assert [s["sha256"] for s in c["shards"]] != [s["sha256"] for s in a["shards"]]


def test_rerun_on_finished_output_does_nothing_and_other_options_are_refused(class_folders, tmp_path):
    out = str(tmp_path / "out")
    pack(str(class_folders), out, CFG, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir()}
    again = pack(str(class_folders), out, CFG, progress=False)
    assert again.already_complete
    # The same folder spelled otherwise is the same input.
    assert pack(str(class_folders) + "/", out, CFG, progress=False).already_complete
    rel = os.path.relpath(class_folders)
    assert pack(rel, out, CFG, progress=False).already_complete
    assert {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir()} == before
    # A flipped byte keeps the size: --verify reads the shards again and finds it.
    assert pack(str(class_folders), out, CFG, progress=False, verify=True).already_complete
    shard = Path(out) / "shard-000000.tar"
    blob = bytearray(shard.read_bytes())
    blob[700] ^= 1
    shard.write_bytes(bytes(blob))
    assert pack(str(class_folders), out, CFG, progress=False).already_complete  # sizes only
    with pytest.raises(PackError, match=r"shard-000000.tar does not hold the bytes index.json records \(sha256\)"):
        pack(str(class_folders), out, CFG, progress=False, verify=True)
    with pytest.raises(PackError, match="--overwrite"):
        pack(str(class_folders), out, ShardConfig(short_side=64, max_samples=3), progress=False)
    replaced = pack(
        str(class_folders), out, ShardConfig(short_side=64, max_samples=3), overwrite=True, progress=False
    ).index
    assert [s["samples"] for s in replaced["shards"]] == [3, 2]
    assert sorted(p.name for p in Path(out).iterdir()) == [
        "index.json",
        "rejects.jsonl",
        "shard-000000.tar",
        "shard-000001.tar",
    ]


def test_tune_fastdecode_is_applied_and_recorded(tmp_path, sample_videos, capsys):
    from dclr_dist.shard.__main__ import main

    (tmp_path / "in" / "cls").mkdir(parents=True)
    shutil.copyfile(sample_videos["carphone_pristine"], tmp_path / "in" / "cls" / "v.mp4")
    streams = {}
    for tune in (None, "fastdecode"):
        out = tmp_path / f"out-{tune}"
        index = pack(str(tmp_path / "in"), str(out), ShardConfig(short_side=64, tune=tune), progress=False).index
        assert index["encoding"]["tune"] == tune and len(_records(str(out))) == 1  # every frame decodes
        with tarfile.open(out / index["shards"][0]["name"]) as tar:
            streams[tune] = next(tar.extractfile(m).read() for m in tar if m.name.endswith(".mp4"))
    # x264 writes its settings into the stream: fastdecode turns off CABAC and the deblocking filter
    assert b"cabac=1" in streams[None] and b"deblock=1" in streams[None]
    assert b"cabac=0" in streams["fastdecode"] and b"deblock=0" in streams["fastdecode"]
    assert main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--tune", "fast"]) == 2
    assert "shard.tune must be null or one of film, animation" in capsys.readouterr().err


def test_max_bytes_bounds_shard_size(class_folders, tmp_path):
    out = str(tmp_path / "out")
    index = pack(str(class_folders), out, ShardConfig(short_side=64, max_bytes=40_000), progress=False).index
    sizes = {r["key"]: r for r in _records(out)}
    assert index["samples"] == 5
    for shard in index["shards"]:
        with tarfile.open(Path(out) / shard["name"]) as tar:
            video_bytes = sum(m.size for m in tar.getmembers() if m.name.endswith(".mp4"))
        # a shard only exceeds the bound when a single video is larger than the bound
        assert video_bytes <= 40_000 or shard["samples"] == 1
    assert len(index["shards"]) > 1 and len(sizes) == 5


def _kill_when(proc: subprocess.Popen, path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "the packer finished before it could be interrupted"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the packer and its transcoding workers, mid-run
    proc.wait()


def test_killed_run_resumes_to_the_same_result(tmp_path, sample_videos):
    corpus = tmp_path / "corpus"
    for n in range(8):
        (corpus / f"c{n % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample_videos["bikes"], corpus / f"c{n % 2}" / f"v{n}.mp4")
    args = [
        sys.executable,
        "-m",
        "dclr_dist.shard",
        "--input",
        str(corpus),
        "--short-side",
        "64",
        "--max-samples",
        "2",
        "--workers",
        "1",
        "--no-progress",
    ]
    reference = tmp_path / "reference"
    subprocess.run(args + ["--output", str(reference)], check=True, capture_output=True)

    out = tmp_path / "out"
    proc = subprocess.Popen(
        args + ["--output", str(out)], start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _kill_when(proc, out / "_partial" / "shard-000001.tar.json")
    assert not (out / "index.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-00000[01].tar")}
    assert len(kept) == 2

    done = subprocess.run(args + ["--output", str(out)], check=True, capture_output=True, text=True)
    assert "kept 2 shards from an earlier run" in done.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-00000[01].tar")} == kept
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for p in reference.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_manifest_csv_with_split_meta_and_bad_rows(tmp_path, sample_videos):
    shutil.copyfile(sample_videos["carphone_pristine"], tmp_path / "a.mp4")
    shutil.copyfile(sample_videos["bikes"], tmp_path / "b.mp4")
    (tmp_path / "m.csv").write_text(
        "path,label,split,scene\n"
        "a.mp4,10,train,s1\n"
        "b.mp4,9,train,s2\n"
        "a.mp4,9,train,s3\n"  # the same file twice: one sample, one reject
        "b.mp4,,train,s4\n"  # no label
        f"{sample_videos['bikes']},10,test,s5\n"
    )
    out = str(tmp_path / "train")
    index = pack(str(tmp_path / "m.csv"), out, CFG, split="train", progress=False).index
    records = {r["source"]: r for r in _records(out)}
    rejects = _rejects(out)
    assert index["inputs"] == 4 and index["samples"] == 2 and index["rejected"] == 2
    assert index["classes"] == ["9", "10"]  # numeric labels sort as numbers
    assert records["a.mp4"]["label"] == 1 and records["b.mp4"]["label"] == 0
    assert records["a.mp4"]["meta"] == {"scene": "s1"} and records["a.mp4"]["split"] == "train"
    assert "duplicate" in rejects[0]["reason"] and "empty label" in rejects[1]["reason"]
    with pytest.raises(PackError, match="no inputs with split 'val'"):
        pack(str(tmp_path / "m.csv"), str(tmp_path / "val"), CFG, split="val", progress=False)


def test_manifest_jsonl_and_missing_columns(tmp_path, sample_videos):
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": str(sample_videos["bikes"]), "label": "x"}) + "\n" + "{broken json\n"
    )
    out = str(tmp_path / "out")
    index = pack(str(tmp_path / "m.jsonl"), out, CFG, progress=False).index
    assert (index["samples"], index["rejected"]) == (1, 1)
    assert "line 2 is not a JSON object" in _rejects(out)[0]["reason"]
    (tmp_path / "bad.csv").write_text("file,class\na.mp4,x\n")
    with pytest.raises(PackError, match="missing label, path"):
        pack(str(tmp_path / "bad.csv"), out, CFG, progress=False)


def test_cli_errors_name_the_problem(tmp_path, class_folders):
    run = lambda *a: subprocess.run([sys.executable, "-m", "dclr_dist.shard", *a], capture_output=True, text=True)
    r = run("--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    assert r.returncode == 1 and "no such file or folder" in r.stderr
    r = run("--input", str(class_folders), "--output", str(tmp_path / "o"), "--crf", "80")
    assert r.returncode == 2 and "shard.crf must be in [0, 51]" in r.stderr
    (tmp_path / "c.yaml").write_text("shard:\n  crff: 20\n")
    r = run("--input", str(class_folders), "--output", str(tmp_path / "o"), "--config", str(tmp_path / "c.yaml"))
    assert r.returncode == 2 and "c.yaml: unknown key 'shard.crff' (did you mean 'crf'?)" in r.stderr
    r = run("--help")
    assert r.returncode == 0 and "AWS_ENDPOINT_URL" in r.stdout and "rejects.jsonl" in r.stdout


def test_pack_to_s3_and_read_back(class_folders, bucket, sample_videos):
    _make_bad_inputs(class_folders / "Broken", sample_videos["bikes"])
    out = f"{bucket}/ucf/train"
    index = pack(str(class_folders), out, CFG, workers=2, progress=False).index
    names = set(storage.list_names(out))
    assert names == {"index.json", "rejects.jsonl"} | {s["name"] for s in index["shards"]}
    assert index["samples"] + index["rejected"] == index["inputs"]
    # webdataset reads the published objects through a pipe to our storage layer
    urls = [
        f'pipe:{sys.executable} -c "import sys; from dclr_dist import storage; '
        f"sys.stdout.buffer.write(storage.read_bytes('{storage.join(out, s['name'])}'))\""
        for s in index["shards"]
    ]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert len(keys) == index["samples"] == 5
    assert len(_rejects(out)) == index["rejected"] == 7


def test_s3_errors_are_clear(s3_endpoint, tmp_path, class_folders, monkeypatch):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        pack(str(class_folders), "s3://no-such-bucket/x", CFG, progress=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with pytest.raises(storage.StorageError, match=r"cannot reach S3 .*AWS_ENDPOINT_URL"):
        storage.read_bytes("s3://b/k")


def test_s3_survives_dropped_and_cut_connections(bucket, flaky_proxy):
    payload = os.urandom(300_000)
    storage.write_bytes(f"{bucket}/blob", payload)
    proxy = flaky_proxy(refuse=2)  # botocore retries a connection dropped before any reply
    assert storage.read_bytes(f"{bucket}/blob") == payload
    assert proxy.connections >= 3
    proxy = flaky_proxy(cut=2, cut_after=50_000)  # the body breaks off: our retry re-reads it
    assert storage.read_bytes(f"{bucket}/blob") == payload
    assert proxy.connections >= 3


def test_ray_distributed_transcoding_matches_local(class_folders, tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("RAY_TMPDIR", "/tmp/rt-shard")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        on_ray = pack(str(class_folders), str(tmp_path / "ray"), CFG, use_ray=True, progress=False).index
    finally:
        ray.shutdown()
    local = pack(str(class_folders), str(tmp_path / "local"), CFG, progress=False).index
    assert [s["sha256"] for s in on_ray["shards"]] == [s["sha256"] for s in local["shards"]]


def test_sample_key_survives_any_name():
    from dclr_dist.shard.pack import Input

    names = ["a.b.c.mp4", "with space.mp4", "#hash(1)!.mp4", "日本語.mp4", "..hidden..mp4", "ü.mp4", "u.mp4"]
    keys = {sample_key(Input(f"cls/{n}", "", "cls")) for n in names}
    assert len(keys) == len(names)
    assert all(k.replace("-", "").replace("_", "").isalnum() and k.isascii() and len(k) < 90 for k in keys)


def _write(path: Path, frames: list[np.ndarray], times: list[float], rotation: int = 0) -> None:
    """An mp4 of RGB ``frames`` shown at ``times`` (seconds), with a display rotation as phones write."""
    with av.open(str(path), mode="w") as out:
        s = out.add_stream("libx264", rate=30)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt, s.codec_context.time_base = "yuv420p", Fraction(1, 1000)
        if rotation:
            s.set_display_rotation(rotation)
        for a, t in zip(frames, times):
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            f.pts, f.time_base = round(t * 1000), Fraction(1, 1000)
            out.mux(s.encode(f))
        out.mux(s.encode(None))


def _packed_frames(tmp_path: Path, source: Path) -> tuple[dict, list[np.ndarray]]:
    (tmp_path / "in" / "c").mkdir(parents=True)
    shutil.copy(source, tmp_path / "in" / "c" / source.name)
    out = str(tmp_path / "out")
    pack(str(tmp_path / "in"), out, ShardConfig(short_side=32), workers=1, progress=False)
    (record,) = _records(out)
    sample = next(iter(wds.WebDataset([str(Path(out) / "shard-000000.tar")], shardshuffle=False)))
    with av.open(io.BytesIO(sample["mp4"])) as c:
        return record, [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_a_portrait_phone_video_is_packed_upright(tmp_path):
    """Stored 64 x 32 with a display rotation of 90 degrees counter-clockwise, as a phone held
    upright writes it: packed 32 x 64, white at the bottom as a player shows it."""
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :16] = 255  # white at the left of the stored picture
    _write(tmp_path / "portrait.mp4", [a] * 6, [i / 30 for i in range(6)], rotation=90)
    record, frames = _packed_frames(tmp_path, tmp_path / "portrait.mp4")
    assert (record["width"], record["height"]) == (32, 64)
    rows = frames[0].mean(axis=(1, 2))
    assert rows[-8:].mean() > 200 and rows[:40].mean() < 30


def test_a_variable_frame_rate_video_keeps_its_local_speed(tmp_path):
    """One second at 30 fps, then one at 6 fps (FFmpeg's average: 22.5 fps). Packed at that rate,
    the frame on screen at 1.5 s is the source's frame at 1.5 s, not one from much earlier."""
    n_fast, n_slow = 30, 6
    times = [i / 30 for i in range(n_fast)] + [1 + i / 6 for i in range(n_slow)]
    frames = [np.full((32, 32, 3), 7 * i, np.uint8) for i in range(n_fast + n_slow)]
    _write(tmp_path / "vfr.mp4", frames, times)
    record, packed = _packed_frames(tmp_path, tmp_path / "vfr.mp4")
    rate = record["fps"]
    # As long as the source: to its last frame's time, plus that frame (36 frames would be 1.6 s).
    assert abs(record["frames"] / rate - (times[-1] + 1 / rate)) < 1.5 / rate
    for t in (0.5, 1.0, 1.5, 1.8):
        shown = max(i for i, s in enumerate(times) if s <= t + 0.5 / rate)  # the source frame on screen
        got = packed[int(t * rate + 1e-9)].mean() / 7
        assert abs(got - shown) <= 1.5, (t, got, shown)


def test_two_packings_into_one_output_the_second_is_told_why(class_folders, tmp_path):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    # Another packer holds the output: the same lock a running pack() takes.
    with open(out / ".pack.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(PackError, match=r"another packing is writing there now .* or choose another --output"):
            pack(str(class_folders), str(out), CFG, progress=False)
    assert pack(str(class_folders), str(out), CFG, progress=False).index["samples"] > 0
    assert not (out / ".pack.lock").exists()


def test_a_killed_s3_packing_leaves_no_temporaries_after_the_next_run(class_folders, bucket):
    import hashlib
    import tempfile

    output = f"{bucket}/k"
    work = Path(tempfile.gettempdir()) / f"dclr-pack-{os.getuid()}-{hashlib.sha256(output.encode()).hexdigest()[:16]}"
    work.mkdir(mode=0o700)
    stale = work / ".shard-000000.tar.x1y2.tmp"  # what a kill -9 mid-shard leaves
    stale.write_bytes(b"half a shard")
    pack(str(class_folders), output, CFG, progress=False)
    assert not stale.exists() and not work.exists()


def test_a_manifest_on_s3_packs_the_videos_it_names(bucket, sample_videos):
    """Rows relative to the manifest's own prefix, or full s3:// URLs; a missing manifest is one line."""
    storage.write_bytes(f"{bucket}/raw/v/a.mp4", Path(sample_videos["bikes"]).read_bytes())
    storage.write_bytes(f"{bucket}/other/b.mp4", Path(sample_videos["carphone_pristine"]).read_bytes())
    storage.write_bytes(
        f"{bucket}/raw/m.csv", f"path,label,split\nv/a.mp4,ride,train\n{bucket}/other/b.mp4,call,train\n".encode()
    )
    out = f"{bucket}/packed"
    index = pack(f"{bucket}/raw/m.csv", out, CFG, split="train", progress=False).index
    assert index["samples"] == 2 and index["rejected"] == 0 and index["classes"] == ["call", "ride"]
    with pytest.raises(PackError, match=rf"^{bucket}/raw/nope.csv: no such manifest$"):
        pack(f"{bucket}/raw/nope.csv", f"{bucket}/x", CFG, progress=False)


def test_the_same_packing_under_two_hash_seeds_is_byte_identical(tmp_path, sample_videos):
    """Labels equal as numbers ("1", "01") and a set of classes are where a hash order could leak."""
    shutil.copyfile(sample_videos["bikes"], tmp_path / "a.mp4")
    shutil.copyfile(sample_videos["carphone_pristine"], tmp_path / "b.mp4")
    (tmp_path / "m.csv").write_text("path,label\na.mp4,1\nb.mp4,01\n")
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"out-{seed}"
        subprocess.run(
            [sys.executable, "-m", "dclr_dist.shard", "--input", "m.csv", "--output", str(out), "--short-side", "32"],
            cwd=tmp_path,
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
            capture_output=True,
        )
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0] == outs[1] and json.loads(outs[0]["index.json"])["classes"] == ["01", "1"]


def test_reuse_copies_the_encodings_of_another_packing_and_gives_the_same_bytes(class_folders, tmp_path):
    """Folds of one dataset: what the first packed is copied (by the source's sha256), not transcoded."""
    first = pack(str(class_folders), str(tmp_path / "first"), CFG, progress=False)
    again = pack(str(class_folders), str(tmp_path / "again"), CFG, progress=False, reuse=(str(tmp_path / "first"),))
    assert again.reused == first.index["samples"] > 0
    files = lambda out: {p.name: p.read_bytes() for p in sorted((tmp_path / out).iterdir())}
    assert files("again") == files("first")
    with pytest.raises(PackError, match=r"--reuse .*first: packed with other encoding options \(crf\)"):
        pack(
            str(class_folders),
            str(tmp_path / "other"),
            dataclasses.replace(CFG, crf=30),
            progress=False,
            reuse=(str(tmp_path / "first"),),
        )
