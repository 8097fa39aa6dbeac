"""benchmarks/gpu_check.py in its reduced CPU form: every part runs and reports what it must."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dclr_dist.config import load_config

REPO = Path(__file__).resolve().parents[2]

STEP_FIELDS = (
    "samples_per_s",
    "step_ms",
    "mfu",
    "host_syncs",
    "host_syncs_per_step",
    "peak_memory_mb",
    "warmup_s",
    "build_s",
    "steps",
)
PROJECT_PHASES = ("views", "forward", "loss", "backward", "momentum")
SWITCHES = ("cudnn_benchmark", "channels_last", "compile")


@pytest.mark.slow
def test_reduced_gpu_check_reports_every_part(tmp_path, bucket, sample_videos):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_check.py"),
            "--cpu",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
            "--storage",
            f"{bucket}/checks",
            "--steps",
            "4",
            "--data-seconds",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in (
        "schema",
        "mode",
        "environment",
        "peak_tflops",
        "peak_source",
        "recipe",
        "step",
        "data",
        "checkpoint",
        "wall_s",
        "switches",
    ):
        assert key in report, key
    assert report["mode"] == "cpu-reduced" and report["peak_tflops"] is None  # no peak for a CPU: MFU unknown

    # (a) every switch has its row (gpu_check refuses to run if EngineConfig lacks one), and
    # every row ran or says why not
    assert report["switches"] == sorted(SWITCHES)
    rows = {r["name"]: r for r in report["step"]["rows"]}
    assert {"baseline", *SWITCHES} <= set(rows)
    assert report["step"]["flops_per_step"] > 0
    ran = [r for r in rows.values() if r["status"] == "ok"]
    assert {"baseline", "bn_sync=global (forced)"} <= {r["name"] for r in ran}
    for switch in report["switches"]:
        if switch != "compile":  # not tried on CPU unless asked
            assert rows[switch]["status"] == "ok", rows[switch]
    for r in rows.values():
        assert r["status"] == "ok" or r["status"].startswith("skipped"), r
    for r in ran:
        for field in STEP_FIELDS:
            assert field in r, (r["name"], field)
        assert r["samples_per_s"] > 0 and r["step_ms"] > 0 and r["mfu"] is None
        assert set(r["host_syncs"]) >= {"total", "by_kind", "by_phase"}  # benchmarks/syncs.py's four kinds
        bn = r["bn_ops_per_forward"]["ops"]  # one pass per layer: no per-segment batch_norm, no cat
        assert bn and not any("batch_norm" in name or name == "aten::cat" for name in bn), bn
        # the project's own code never makes the host wait for the device
        assert not set(r["host_syncs"]["by_phase"]) & set(PROJECT_PHASES), r["host_syncs"]
    # With ZeRO 0 (the trainer's default) a whole step has none; DeepSpeed's ZeRO-1/2 step reads
    # its overflow check and gradient norm on the host (then in engine.step only, checked above).
    stage0 = [r for r in ran if r["config"]["zero_stage"] == 0]
    # buckets leave while backward runs, not all at its end
    assert all(r["bucket_launches"] and min(r["bucket_launches"]) < 1 for r in stage0), stage0
    assert stage0 and all(r["host_syncs_per_step"] == 0 for r in stage0), [r["host_syncs"] for r in stage0]
    if report["recipe"]["zero_stage"] == 0:
        assert rows["baseline"]["host_syncs_per_step"] == 0, rows["baseline"]["host_syncs"]

    # (b) real footage, measured on one core and on all, and the cores a GPU needs
    data = report["data"]
    assert data["x264_tune"] == load_config("k400_r2plus1d").shard.tune == "fastdecode"  # as the recipe packs
    assert data["footage"].startswith("real"), data
    for part in ("one_core", "all_cores"):
        assert data[part]["samples"] > 0 and data[part]["samples_per_s"] > 0, data[part]
    assert data["decode_cores_per_gpu"]["baseline"]["cores_at_one_core_rate"] > 0

    # (c) the checkpoint came back equal, through S3 too
    ckpt = report["checkpoint"]
    assert ckpt["differed_before_load"], "the fresh engine started equal: the check would prove nothing"
    assert ckpt["weights_equal"] and ckpt["optimizer_equal"] and ckpt["criterion_equal"], ckpt["mismatched"]
    assert ckpt["loaded_from"].startswith(bucket) and ckpt["upload_s"] > 0 and ckpt["load_s"] > 0
    assert "(a) training step" in run.stdout and "(c) checkpoint" in run.stdout
