"""The trainer end to end: a real local Ray cluster, DeepSpeed on gloo, shards from real mp4s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import TINY, local_ray

from dclr_dist import storage
from dclr_dist.config import load_config


@pytest.fixture(scope="module")
def ray_local(s3_endpoint):
    # Started with the S3 settings and credentials in its environment, as a node with its own
    # credential chain: the driver forwards settings, never credentials.
    with local_ray("/tmp/rt-train"):
        yield


def _cfg(shards, tmp_path, *extra):
    return load_config(
        None,
        [
            *TINY,
            f"data.train=[{shards['train']}]",
            f"data.eval=[{shards['test']}]",
            f"train.storage_path={tmp_path / 'runs'}",
            *extra,
        ],
    )


def _metrics(run: str) -> list[dict]:
    return [
        json.loads(line)
        for line in storage.read_bytes(storage.join(run, "metrics/metrics.jsonl")).decode().splitlines()
    ]


def test_two_workers_train_checkpoint_and_resume(ray_local, shards, tmp_path):
    from dclr_dist.train import fit

    cfg = _cfg(shards, tmp_path, "train.name=two")
    result = fit(cfg)
    assert result.error is None
    m = result.metrics
    assert (m["epoch"], m["world_size"], m["step"]) == (3, 2, 3 * 2)  # 16 samples / (4 x 2 workers) = 2 steps
    assert m["skipped_samples"] == 0 and m["samples_per_s"] > 0 and 0 <= m["data_wait"] <= 1
    # every step writes the keys of both workers into the queue: 6 steps x 4 x 2 = 48 keys
    assert m["queue_filled"] == 48
    for term in ("loss", "vv", "v_s", "s_v", "v_d", "d_v", "align"):
        assert torch.isfinite(torch.tensor(m[term])), term

    run = str(tmp_path / "runs" / "two")
    rows = _metrics(run)
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2, 3]
    assert {"lr", "samples_per_s", "samples_per_s_worker", "data_wait", "memory_mb", "vv", "align"} <= set(
        next(r for r in rows if r["kind"] == "step")
    )
    assert any(p.name.startswith("events.out.tfevents") for p in (Path(run) / "metrics").iterdir())

    ckpt = Path(result.checkpoint.path)
    backbone = torch.load(ckpt / "backbone.pt", weights_only=True)
    assert all(torch.is_tensor(v) for v in backbone.values()) and len(backbone) > 4
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["model"]["arch"] == "tiny" and meta["epoch"] == 3
    assert (Path(run) / "best" / "backbone.pt").exists()
    # Ray keeps the newest keep_checkpoints (2) of the 3 written
    assert len([p for p in Path(run).iterdir() if p.name.startswith("checkpoint_2")]) == 2

    # the same name again, with more epochs: it resumes from epoch 3, not from scratch
    longer = fit(_cfg(shards, tmp_path, "train.name=two", "train.epochs=4"))
    assert longer.metrics["epoch"] == 4 and longer.metrics["step"] == 8
    assert [r["epoch"] for r in _metrics(run) if r["kind"] == "epoch"] == [1, 2, 3, 4]

    # ZeRO stage 0 (the default) checkpoints hold the whole optimizer state: the run resumes on
    # 1 worker, from epoch 4 with its weights. An lr of ~0 keeps them through epoch 5, so its
    # checkpoint shows what was loaded; one epoch at the normal lr moved them (epoch 3 to 4).
    epoch4 = torch.load(Path(longer.checkpoint.path) / "backbone.pt", weights_only=True)
    one = fit(_cfg(shards, tmp_path, "train.name=two", "train.epochs=5", "cluster.workers=1", "optim.lr=1e-9"))
    assert one.error is None
    # 4 steps per epoch on 1 worker, counted from epoch 4; the lr scaled to 1 worker's batch of 4
    assert (one.metrics["epoch"], one.metrics["world_size"], one.metrics["step"]) == (5, 1, 4 * 4 + 4)
    assert one.metrics["lr"] == pytest.approx(1e-9 * 4 / 8)
    assert [r["epoch"] for r in _metrics(run) if r["kind"] == "resume"][-1] == 4
    epoch5 = torch.load(Path(one.checkpoint.path) / "backbone.pt", weights_only=True)
    weights = [k for k in epoch4 if "running" not in k and "num_batches" not in k]  # BN statistics still move
    assert max(float((epoch4[k] - backbone[k]).abs().max()) for k in weights) > 1e-3
    for k in weights:
        torch.testing.assert_close(epoch5[k], epoch4[k], rtol=0, atol=1e-6)

    # another ZeRO stage cannot load the checkpoint: a clear error before any worker starts
    with pytest.raises(
        ValueError,
        match=r"written with engine.zero_stage=0 and this run has 1: .* "
        r"Set engine.zero_stage=0 to resume it, or choose a new train.name",
    ):
        fit(_cfg(shards, tmp_path, "train.name=two", "train.epochs=6", "cluster.workers=1", "engine.zero_stage=1"))


def test_zero_shards_refuse_another_worker_count_before_any_worker_starts(shards, tmp_path):
    from dclr_dist.train import fit

    run = tmp_path / "runs" / "sharded"
    run.mkdir(parents=True)
    (run / "latest.json").write_text(json.dumps({"world_size": 2, "epoch": 1, "metrics": {"zero_stage": 2}}))
    with pytest.raises(
        ValueError,
        match=r"written by 2 workers at ZeRO stage 2 and this run has 1: ZeRO-2 optimizer "
        r"shards do not re-partition .* Set cluster.workers=2 to resume it",
    ):
        fit(_cfg(shards, tmp_path, "train.name=sharded", "cluster.workers=1", "engine.zero_stage=2"))


def test_checkpoints_by_time_upload_in_the_background_and_leave_no_staging(ray_local, shards, tmp_path):
    import ray

    from dclr_dist.train import fit

    def checkpointed(run: Path) -> list[int]:
        return sorted(
            json.loads((p / "meta.json").read_text())["epoch"] for p in run.glob("checkpoint_*") if p.is_dir()
        )

    run = tmp_path / "runs" / "minutes"
    # Not by epochs; a due time of 6 ms: every epoch end is past it.
    fit(
        _cfg(
            shards,
            tmp_path,
            "train.name=minutes",
            "checkpoint.every=0",
            "checkpoint.minutes=0.0001",
            "checkpoint.keep=3",
        )
    )
    assert checkpointed(run) == [1, 2, 3]
    assert json.loads((run / "latest.json").read_text())["epoch"] == 3
    # An hour apart: only the last epoch (5) is checkpointed after the resume, not 4.
    result = fit(
        _cfg(
            shards,
            tmp_path,
            "train.name=minutes",
            "train.epochs=5",
            "checkpoint.every=0",
            "checkpoint.minutes=60",
            "checkpoint.keep=3",
        )
    )
    assert result.metrics["epoch"] == 5 and checkpointed(run) == [2, 3, 5]
    assert json.loads((run / "latest.json").read_text())["epoch"] == 5
    # The workers staged each checkpoint in a folder of their temp dir that Ray removed once uploaded.
    worker_tmp = ray.get(ray.remote(num_cpus=0)(tempfile.gettempdir).remote())
    assert not list(Path(worker_tmp).glob("dclr-checkpoint-minutes-*"))


def test_kill_a_worker_on_s3_storage_resumes_to_the_same_final_step(ray_local, shards, bucket):
    from dclr_dist.train import fit

    cfg = load_config(
        None,
        [
            *TINY,
            f"data.train=[{shards['train']}]",
            f"train.storage_path={bucket}/runs",
            "train.name=killed",
            "train.epochs=6",
            "cluster.max_failures=2",
        ],
    )
    killed: list[int] = []

    def kill_after_first_checkpoint():
        # Ray's controller writes its snapshot once it has registered a checkpoint: from then
        # on a restarted worker group must resume, not start over.
        deadline = time.monotonic() + 240
        snapshot = f"{bucket}/runs/killed/checkpoint_manager_snapshot.json"
        while time.monotonic() < deadline:
            if storage.exists(snapshot):
                for p in psutil.process_iter(["cmdline"]):
                    if any("RayTrainWorker" in part for part in (p.info["cmdline"] or [])):
                        p.kill()
                        killed.append(p.pid)
                        return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    result = fit(cfg)
    killer.join()
    assert killed, "no worker was killed: the test did not exercise a failure"
    assert result.error is None
    assert (result.metrics["epoch"], result.metrics["step"]) == (6, 12)
    rows = _metrics(f"{bucket}/runs/killed")
    resumes = [r for r in rows if r["kind"] == "resume"]
    assert resumes and 1 <= resumes[0]["epoch"] < 6
    assert sorted({r["epoch"] for r in rows if r["kind"] == "epoch"}) == [1, 2, 3, 4, 5, 6]
    assert any(n.startswith("checkpoint_") for n in _list_dirs(f"{bucket}/runs/killed"))


def _list_dirs(url: str) -> set[str]:
    bucket, key = storage.split_s3(url)
    pages = (
        storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/", Delimiter="/")
    )
    return {p["Prefix"][len(key) + 1 :].rstrip("/") for page in pages for p in page.get("CommonPrefixes", [])}


def _run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "dclr_dist.train", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_bad_config_fails_fast_naming_the_problem(tmp_path, shards):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    r = _run_cli("--config", str(bad))
    assert r.returncode == 2 and "bad.yaml: unknown key 'train.epochz' (did you mean 'epochs'?)" in r.stderr
    r = _run_cli("--config", "demo", "cluster.workers=two")  # a shipped recipe, by name
    assert r.returncode == 2 and "command line: cluster.workers must be int, got str 'two'" in r.stderr
    good = tmp_path / "good.yaml"
    good.write_text(f"data:\n  train: [{tmp_path / 'no-such-shards'}]\n")
    start = time.monotonic()
    r = _run_cli("--config", str(good))
    assert r.returncode == 1 and "no-such-shards" in r.stderr
    assert time.monotonic() - start < 60  # before any Ray worker starts


def test_a_failed_run_is_summarised_in_one_line_by_the_workers_error():
    from dclr_dist.launch import failure_summary

    ray_text = (
        "Training failed due to worker errors:\n[Rank 0,1 Error Snippet]:\nTraceback (most recent call last):\n"
        '  File "train.py", line 3, in train_loop\nray.train.WorkerGroupError: Training failed due to worker '
        "errors:\nValueError: shard-000003.tar: no such object\n"
    )
    assert failure_summary(RuntimeError(ray_text)) == "ValueError: shard-000003.tar: no such object"
    assert (
        failure_summary(RuntimeError("Training failed due to worker errors:\n"))
        == "Training failed due to worker errors:"
    )
