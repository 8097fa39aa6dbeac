"""Damage the reader used to miss or undercount, S3 objects replaced mid-read, the trainer's
pre-flight, and shards written by another tool (video2dataset's layout)."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import av
import numpy as np
import pytest
import torch
from helpers import tar_bytes

from dclr_dist import data, s3stream, storage
from dclr_dist.config import DataConfig, ViewsConfig, load_config
from dclr_dist.data import DataError, Part, Shard, eval_loader, read_parts, resolve_shards, to_device, train_loader
from dclr_dist.model import VIEWS


def samples(keys: str, size: int = 3000) -> list[tuple[str, bytes]]:
    """Members of samples ``keys`` (one letter each); the bytes are never decoded here."""
    rng = np.random.default_rng(0)
    return [m for k in keys for m in ((f"{k}.mp4", rng.bytes(size)), (f"{k}.json", b'{"frames": 8, "label": 0}'))]


GOOD = tar_bytes(samples("abc"))


def _offsets(blob: bytes) -> dict[str, tuple[int, int]]:
    """Member name -> (header offset, end of its data and padding)."""
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return {m.name: (m.offset, m.offset_data + -(-m.size // 512) * 512) for m in tar}


AT = _offsets(GOOD)
B_END, C_MP4 = AT["b.json"][1], AT["c.mp4"]
GARBAGE = np.random.default_rng(1).bytes(1500)

# name -> (shard bytes, keys read, (samples lost, shards counted) with and without an index, warning)
DAMAGE = {
    "intact": (GOOD, "abc", (0, 0), (0, 0), None),
    "cut at a member boundary": (GOOD[:B_END], "ab", (1, 1), (0, 1), "without an end-of-archive marker"),
    "cut inside a header": (GOOD[: B_END + 100], "ab", (1, 1), (0, 1), "where a tar header should be"),
    "cut inside a member": (GOOD[: C_MP4[0] + 1000], "ab", (1, 1), (1, 1), "broke off after 2 samples"),
    "a damaged header": (
        GOOD[:B_END] + GARBAGE[:512] + GOOD[B_END + 512 :],
        "ab",
        (1, 1),
        (0, 1),
        "where a tar header should be",
    ),
    "trailing garbage": (GOOD[: AT["c.json"][1]] + GARBAGE, "abc", (0, 0), (0, 1), "where a tar header should be"),
    "a second tar appended": (
        GOOD + tar_bytes(samples("de")),
        "abc",
        (0, 0),
        (0, 1),
        "after its end-of-archive marker",
    ),
}


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_tar_that_does_not_end_as_written_is_counted_and_named(damage, where, request, tmp_path, caplog):
    blob, keys, indexed, bare, warning = DAMAGE[damage]
    url = f"{request.getfixturevalue('bucket')}/s.tar" if where == "s3" else str(tmp_path / "s.tar")
    storage.write_bytes(url, blob)
    for samples_listed, (lost, counted) in ((3, indexed), (None, bare)):
        skips = data._Skips(1)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dclr_dist.data"):
            got = [s["__key__"] for s in data.read_shards([Shard(url, samples_listed, 16)], skips, retries=0)]
        assert "".join(got) == keys
        assert (skips.samples, skips.shards) == (lost, counted), (damage, samples_listed)
        if warning is None:
            assert not caplog.text
        else:
            assert f"{url}: " in caplog.text and warning in caplog.text, caplog.text
            if samples_listed is None:  # nothing says how many samples the damage took
                assert "an unknown number of samples" in caplog.text


def test_skipping_to_a_range_inside_a_shard_reads_the_same_samples_on_s3(bucket, tmp_path, monkeypatch):
    blob = tar_bytes(samples("abcd", size=20000))
    storage.write_bytes(f"{bucket}/s.tar", blob)
    (tmp_path / "s.tar").write_bytes(blob)

    def read(url: str) -> list[dict]:
        got = read_parts([Part(Shard(url, 4, 16), 1, 3)], data._Skips(1), retries=0)
        return [{k: v for k, v in s.items() if k != "__url__"} for s in got]

    local = read(str(tmp_path / "s.tar"))
    assert [s["__key__"] for s in local] == ["b", "c"]
    assert read(f"{bucket}/s.tar") == local  # short skips read through the open body
    monkeypatch.setattr(s3stream, "_SKIP_BY_READING", 0)
    assert read(f"{bucket}/s.tar") == local  # each skip a new ranged GET, pinned to the first ETag


# --------------------------------------------------------------------------- S3 object replaced mid-read


def test_s3_shard_replaced_between_a_cut_and_its_resume_is_skipped_not_spliced(
    bucket, flaky_proxy, sample_videos, caplog
):
    mp4 = sample_videos["carphone_pristine"].read_bytes()  # 589 kB: a shard of three spans 1 MiB reads
    members = lambda keys: [m for k in keys for m in ((f"{k}.mp4", mp4), (f"{k}.json", b"{}"))]  # noqa: E731
    old, new = tar_bytes(members("abc")), tar_bytes(members("xyz"))
    url = f"{bucket}/shard-000000.tar"
    storage.write_bytes(url, old)

    # The raw reader: a few bytes, the object replaced, then the cut; the resuming GET is refused.
    flaky_proxy(cut=1, cut_after=6000)
    raw = s3stream._S3Reader(url, attempts=3)
    buf = bytearray(1000)
    assert raw.readinto(buf) == 1000 and buf == old[:1000]
    storage.write_bytes(url, new)
    with pytest.raises(s3stream.ShardReplaced, match=rf"{url}: replaced while it was being read, at byte \d+"):
        while raw.readinto(buf):
            pass
    raw.close()

    # The reader: sample a from the first 1 MiB read, the object replaced, the cut past 1 MiB.
    storage.write_bytes(url, old)
    flaky_proxy(cut=1, cut_after=1_200_000)
    skips = data._Skips(1)
    with caplog.at_level(logging.WARNING, logger="dclr_dist.data"):
        reader = data.read_shards([Shard(url, 3, 16)], skips, retries=1)
        got = [next(reader)]
        storage.write_bytes(url, new)
        got += list(reader)
    keys = "".join(s["__key__"] for s in got)
    assert keys in ("a", "ab") and all(s["mp4"] == mp4 for s in got)  # the old version's, and no more
    assert (skips.samples, skips.shards) == (3 - len(keys), 1)
    assert (
        f"{url}: skipped: broke off after {len(keys)} samples: ShardReplaced: {url}: replaced while it was "
        "being read" in caplog.text
    )


# --------------------------------------------------------------------------- pre-flight


def _index(folder: str, names: list[str]) -> None:
    index = {"encoding": {"gop": 16}, "shards": [{"name": n, "samples": 1} for n in names]}
    storage.write_bytes(storage.join(folder, "index.json"), json.dumps(index).encode())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_preflight_names_a_missing_listed_shard(where, request, tmp_path):
    folder = f"{request.getfixturevalue('bucket')}/corpus" if where == "s3" else str(tmp_path / "corpus")
    names = [f"shard-{i:06d}.tar" for i in range(4)]
    _index(folder, names)
    for name in names[:2] + names[3:]:
        storage.write_bytes(storage.join(folder, name), tar_bytes(samples("a")))
    missing = storage.join(folder, names[2])
    with pytest.raises(DataError) as e:
        data.check_shards(resolve_shards([folder]), "data.train")
    message = str(e.value)
    assert message.startswith(f"{missing}: listed in data.train") and "re-pack" in message and "\n" not in message
    with pytest.raises(DataError, match=r"shard-000002.tar \(and 1 more\): listed in data.eval"):
        data.check_shards(
            resolve_shards([storage.join(folder, "shard-{000000..000003}.tar"), storage.join(folder, "gone.tar")]),
            "data.eval",
        )
    storage.write_bytes(missing, tar_bytes(samples("a")))
    data.check_shards(resolve_shards([folder]), "data.train")


def test_fit_fails_on_a_missing_shard_before_any_worker_starts(tmp_path):
    from dclr_dist.train import fit

    folder = tmp_path / "corpus"
    _index(str(folder), ["shard-000000.tar"])
    cfg = load_config(None, ["eval.every=0", f"train.storage_path={tmp_path / 'runs'}"])
    cfg.data.train = [str(folder)]
    with pytest.raises(DataError, match=r"shard-000000.tar: listed in data.train .* but not there"):
        fit(cfg)
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- shards of other tools


def decode_all(mp4: bytes) -> np.ndarray:
    with av.open(io.BytesIO(mp4)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("label", [None, "cooking"])
def test_video2dataset_shards_pretrain_without_labels_and_evaluation_asks_for_them(sample_videos, tmp_path, label):
    # video2dataset's layout, as its webdataset writer orders members: <key>.json, <key>.mp4,
    # <key>.txt; the record has no label and no frame count; real videos nobody here encoded.
    videos = {
        f"{i:09d}": sample_videos[name].read_bytes()
        for i, name in enumerate(["carphone_pristine", "carphone_distorted", "carphone_pristine"])
    }
    members = []
    for key, mp4 in videos.items():
        record = {
            "url": f"https://example.com/{key}.mp4",
            "key": key,
            "status": "success",
            "error_message": None,
            "caption": "a clip",
            **({} if label is None else {"label": label}),  # a class name or caption as text
        }
        members += [(f"{key}.json", json.dumps(record).encode()), (f"{key}.mp4", mp4), (f"{key}.txt", b"a clip")]
    shard = tmp_path / "00000.tar"
    shard.write_bytes(tar_bytes(members))
    cfg = ViewsConfig(frames=8, stride=2, size=32)
    d = DataConfig(train=[str(shard)], eval=[str(shard)], batch_size=3, loader_workers=0, epoch_samples=3)
    (batch,) = list(train_loader(d, cfg))
    assert sorted(batch["key"]) == sorted(videos) and batch["label"].tolist() == [-1, -1, -1]
    for b, key in enumerate(batch["key"]):
        ref = decode_all(videos[key])
        h, w = ref.shape[1:3]
        clip = batch["q"][b].permute(1, 2, 3, 0).numpy()[:, :h, :w]  # (T+1, H, W, 3), unpadded
        assert any(np.array_equal(clip, ref[s : s + 17 : 2]) for s in range(len(ref) - 16)), key
    out = to_device(batch, "cpu", cfg)
    assert all(torch.isfinite(out[name]).all() for name in VIEWS)
    for loader in (eval_loader(d, cfg), train_loader(d, cfg, labelled=True)):
        what = "no class label" if label is None else "a label that is not a class index \\('cooking'\\)"
        with pytest.raises(DataError, match=rf"00000.tar: its record has {what}, and evaluation needs one"):
            list(loader)
    # A record that says nothing and a container that cannot say either: a damaged sample.
    with pytest.raises(data.DamagedSample, match="undecodable video"):
        data._record({"__key__": "k", "__url__": "u", "mp4": b"\0" * 100, "json": b"{}"}, labelled=False)


def test_s3_throttling_and_server_errors_are_retried_and_access_denied_is_one_line(bucket, flaky_proxy):
    blob = GOOD
    url = f"{bucket}/throttled.tar"
    storage.write_bytes(url, blob)
    proxy = flaky_proxy(answer=3)  # 503 SlowDown three times, then the server
    with data.gopen_s3(url, attempts=1) as f:
        assert f.read() == blob
    assert proxy.connections == 4
    proxy = flaky_proxy(answer=2, status=(500, "Internal Error", "InternalError"))
    storage.write_bytes(f"{bucket}/copy.tar", blob)
    assert proxy.connections == 3
    assert storage.read_bytes(f"{bucket}/copy.tar") == blob
    flaky_proxy(answer=1000, status=(403, "Forbidden", "AccessDenied"))
    for act in (lambda: storage.read_bytes(url), lambda: storage.write_bytes(f"{bucket}/denied.tar", blob)):
        with pytest.raises(storage.StorageError) as e:
            act()
        assert "access denied (AccessDenied)" in str(e.value) and "\n" not in str(e.value)


def test_a_sparse_or_oversized_member_is_damage_not_memory(tmp_path, monkeypatch):
    """A GNU sparse member (written by GNU tar itself) declares its holes as data: a few kB of
    shard would be gigabytes in memory. It is a damaged sample, counted; so is a member over the cap."""
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    folder = tmp_path / "members"
    folder.mkdir()
    for name, blob in samples("a"):
        (folder / name).write_bytes(blob)
    with open(folder / "b.mp4", "wb") as f:
        f.truncate(256 << 20)  # 256 MiB of holes
    (folder / "b.json").write_bytes(b'{"frames": 8, "label": 0}')
    shard = tmp_path / "s.tar"
    subprocess.run(
        ["tar", "--sparse", "--format=gnu", "-cf", str(shard), "-C", str(folder), "a.mp4", "a.json", "b.mp4", "b.json"],
        check=True,
    )
    assert shard.stat().st_size < 64 << 10
    for cap, damaged in ((data.read.MAX_MEMBER_BYTES, ["b"]), (1000, ["a", "b"])):
        monkeypatch.setattr(data.read, "MAX_MEMBER_BYTES", cap)
        skips = data._Skips(1)
        items = list(data.decoded(data.read_shards([Shard(str(shard), 2, 16)], skips, retries=0), dict, skips))
        assert [i["__key__"] for i in items] == [k for k in "ab" if k not in damaged]
        assert skips.damaged == len(damaged) and all(len(i["mp4"]) < 1 << 20 for i in items)
