"""Secrets and trust: no credential in Ray's files, job table or run state, nor in the run's
storage; resume unpickles no code; rank 0 stages metrics in a private folder.

Real parts throughout: a local Ray cluster started with credentials in its environment (as a
node with its own credential chain), moto's S3 server, DeepSpeed on gloo.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path

import pytest
import torch
from helpers import TINY, environment, local_ray, pack_synthetic

from dclr_dist import storage
from dclr_dist.config import load_config

# The smallest run that writes a checkpoint: one worker, one epoch of 8 samples, no restarts.
ONE_EPOCH = [*TINY, "data.epoch_samples=8", "cluster.workers=1", "train.epochs=1", "cluster.max_failures=0"]
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@pytest.fixture(scope="module")
def secrets(s3_endpoint):
    """Distinctive credentials in this process's environment for the module (moto accepts any)."""
    tag = uuid.uuid4().hex[:16].upper()
    values = {
        "AWS_ACCESS_KEY_ID": f"AKIADCLR{tag}",
        "AWS_SECRET_ACCESS_KEY": f"dclrSecretKey{tag}",
        "AWS_SESSION_TOKEN": f"dclrSessionToken{tag}",
    }
    with environment(values):
        yield values


@pytest.fixture(scope="module")
def ray_local(secrets):
    # Started after the credentials are set: the node's own environment, as on a machine
    # with a profile or an instance role; nothing forwards them. Train's run state (what
    # the dashboard shows) is kept only when asked for.
    with environment({"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}), local_ray("/tmp/rt-sec", num_cpus=2):
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    return pack_synthetic(
        tmp_path_factory.mktemp("sec-shards"),
        classes=2,
        train_per_class=4,
        test_per_class=1,
        train_scenes=2,
        test_scenes=1,
        max_samples=4,
    )


@pytest.fixture(scope="module")
def s3_run(ray_local, shards, s3_endpoint):
    """One short training run on s3:// storage: (its URL, its config overrides, its result)."""
    import boto3

    from dclr_dist.train import fit

    name = f"sec-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    overrides = [
        *ONE_EPOCH,
        f"data.train=[{shards['train']}]",
        f"train.storage_path=s3://{name}/runs",
        "train.name=run",
    ]
    result = fit(load_config(None, overrides))
    assert result.error is None, result.error
    return f"s3://{name}/runs/run", overrides, result


def test_forwarded_env_carries_settings_not_secrets(secrets, monkeypatch):
    from dclr_dist.launch import forwarded_env

    monkeypatch.setenv("AWS_PROFILE", "training")
    env = forwarded_env()
    assert not set(SECRET_KEYS) & set(env)
    assert not set(secrets.values()) & set(env.values())
    assert env["AWS_PROFILE"] == "training" and env["AWS_ENDPOINT_URL"] == os.environ["AWS_ENDPOINT_URL"]


def test_resume_refuses_a_checkpoint_that_unpickles_code(s3_run, tmp_path):
    from dclr_dist.launch import TrainingFailed
    from dclr_dist.train import fit

    run, overrides, result = s3_run
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('pwned')",)

    # Whoever can write the bucket replaces rank 0's model states with a pickle that runs code.
    bucket = storage.split_s3(run)[0]
    target = f"s3://{bucket}/{result.checkpoint.path.split('/', 1)[1]}/ds/mp_rank_00_model_states.pt"
    assert storage.exists(target)
    buf = tempfile.SpooledTemporaryFile()
    torch.save({"module": Payload()}, buf)
    buf.seek(0)
    storage.write_bytes(target, buf.read())

    with pytest.raises(TrainingFailed) as failed:
        fit(load_config(None, [*overrides, "train.epochs=2"]))
    assert not marker.exists(), "resuming ran the checkpoint's code"
    line = next(line for line in str(failed.value).splitlines() if "refusing to resume" in line)
    assert f"{run}/checkpoint_" in line and "unpickles exec" in line and "train.name" in line


def test_no_secret_in_ray_logs_job_table_run_state_or_storage(s3_run, secrets):
    import ray
    from ray._private.state import state
    from ray.train.v2._internal.state.state_actor import get_state_actor

    run, _, _ = s3_run
    needles = [v.encode() for v in secrets.values()]
    found: list[str] = []

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    files = [p for p in session.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix in (".log", ".out", ".err") for p in files)  # the scan reads Ray's logs
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        found += [f"{path}: {n.decode()}" for n in needles if n in data]

    jobs = state._connect_and_get_accessor().get_job_table(
        skip_submission_job_info_field=False, skip_is_running_tasks_field=True
    )
    assert jobs
    found += [f"job table: {n.decode()}" for job in jobs for n in needles if n in job]

    runs = ray.get(get_state_actor().get_train_runs.remote())
    assert runs
    for train_run in runs.values():
        text = train_run.model_dump_json().encode()
        found += [f"Train run state: {n.decode()}" for n in needles if n in text]

    bucket, prefix = storage.split_s3(run)
    objects = [
        o["Key"]
        for page in storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    ]
    assert any("/checkpoint_" in key for key in objects) and f"{prefix}/latest.json" in objects
    for key in objects:
        data = storage.read_bytes(f"s3://{bucket}/{key}")
        found += [f"s3://{bucket}/{key}: {n.decode()}" for n in needles if n in data]
    assert not found, found


def test_metrics_staging_is_private_and_fresh(bucket):
    from dclr_dist.metrics import MetricsLog

    run = f"{bucket}/runs/metrics"
    # The staging folder an earlier version used: predictable, so anyone on the node could
    # plant a symlink there (writes go where they point) or leave rows to be merged.
    predictable = Path(tempfile.gettempdir()) / "dclr-metrics" / run.replace("s3://", "").replace("/", "_")
    predictable.parent.mkdir(exist_ok=True)
    elsewhere = Path(tempfile.mkdtemp())
    predictable.symlink_to(elsewhere)
    (elsewhere / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "step": 99, "epoch": 99}) + "\n")
    try:
        log = MetricsLog(run)
        log.write("epoch", 1, {"epoch": 1, "loss": 1.0})
        log.close()
        second = MetricsLog(run)  # a restarted rank 0 continues the run's curve from storage
        second.write("epoch", 2, {"epoch": 2, "loss": 0.5})
        second.close()
    finally:
        predictable.unlink()
    rows = [json.loads(line) for line in storage.read_bytes(f"{run}/metrics/metrics.jsonl").decode().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [p.name for p in elsewhere.iterdir()] == ["metrics.jsonl"]
    assert not log.dir.exists() and not second.dir.exists()


def test_evaluation_refuses_a_backbone_that_unpickles_code(tmp_path):
    from dclr_dist.checkpoint import CheckpointError, load_backbone

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"0.weight": Payload()}, tmp_path / "backbone.pt")
    with pytest.raises(CheckpointError, match="backbone.pt: refusing to load") as e:
        load_backbone(str(tmp_path), {"model": {"arch": "tiny", "width": 8}})
    assert "\n" not in str(e.value) and not marker.exists()
