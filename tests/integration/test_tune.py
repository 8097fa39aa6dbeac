"""Sweeps on Ray Tune: a 4-trial ASHA sweep on CPU, an interrupted sweep resumed, bad spaces."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import TINY

from dclr_dist import sweep
from dclr_dist.config import RECIPES, load_config
from dclr_dist.sweep import load_space

REPO = Path(__file__).resolve().parents[2]
SWEEP = [sys.executable, "-m", "dclr_dist.sweep"]
SPACE = {
    "loss.tau": {"loguniform": [0.05, 0.2]},
    "model.threshold": {"choice": [None, 1.0]},
    "loss.w_s": {"uniform": [0.0, 1.0]},
}
# One 1-CPU worker per trial, two epochs: ASHA may stop a trial after the first.
TRIAL = [o for o in TINY if not o.startswith("cluster.workers")] + [
    "cluster.workers=1",
    "train.epochs=2",
    "data.eval_clips=2",
]


def _args(shards, tmp_path, *extra):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    return [
        *SWEEP,
        "--space",
        str(space),
        "--config",
        "demo",
        "--storage",
        str(tmp_path / "sweeps"),
        "--name",
        "s",
        *extra,
        *TRIAL,
        f"data.train=[{shards['train']}]",
        f"data.eval=[{shards['test']}]",
    ]


def _env():
    env = {**os.environ, "RAY_TMPDIR": "/tmp/rt-tune"}
    env.pop("RAY_ADDRESS", None)  # a local cluster of its own
    return env


def test_four_trial_asha_sweep_writes_table_best_config_and_plot(shards, tmp_path):
    r = subprocess.run(
        _args(shards, tmp_path, "--num-samples", "4", "--max-concurrent", "2"),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = tmp_path / "sweeps" / "s"
    rows = list(csv.DictReader((sweep / "trials.csv").open()))
    assert len(rows) == 4 and all(row["status"] == "done" for row in rows)
    accs = [float(row["knn_acc"]) for row in rows]
    assert all(0.0 <= a <= 1.0 for a in accs) and accs == sorted(accs, reverse=True)
    assert all(0.05 <= float(row["loss.tau"]) <= 0.2 for row in rows)
    best = load_config(sweep / "best.yaml")  # a valid, ready-to-run training config
    assert best.loss.tau == pytest.approx(float(rows[0]["loss.tau"]))
    assert best.eval.every == 1 and best.train.name.endswith("-best")
    assert (sweep / "objective.png").read_bytes()[:4] == b"\x89PNG"
    assert "knn_acc" in r.stdout and "best config" in r.stdout


def test_interrupted_sweep_resumes_without_redoing_finished_trials(shards, tmp_path):
    args = _args(shards, tmp_path, "--num-samples", "3", "--max-concurrent", "1")
    proc = subprocess.Popen(
        args, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    trials = tmp_path / "sweeps" / "s" / "trials"
    deadline = time.monotonic() + 400
    # One trial at a time: when the second trial's run appears, Tune has recorded the first as done.
    while len(list(trials.glob("trial-*"))) < 2:
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {
        p.parent.name: p.stat().st_mtime_ns
        for p in trials.glob("trial-*/latest.json")
        if json.loads(p.read_text())["epoch"] == 2
    }
    assert done_before, "no trial had finished before the kill"

    r = subprocess.run([*args, "--resume", "--trust-storage"], capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "sweeps" / "s" / "trials.csv").open()))
    assert len(rows) == 3 and all(row["status"] == "done" for row in rows)
    # the trials finished before the kill were not trained again
    for name, mtime in done_before.items():
        assert (trials / name / "latest.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    "space, message",
    [
        ({"loss.taux": {"uniform": [0, 1]}}, "unknown key 'loss.taux'"),
        ({"loss.tau": {"gaussian": [0, 1]}}, "unknown distribution 'gaussian'"),
        ({"loss.tau": {"uniform": [1, 0]}}, "needs lo < hi"),
        ({"loss.tau": {"uniform": [-1, 1]}}, "loss.tau must be > 0"),
        ({"cluster.workers": {"choice": [1, "two"]}}, "cluster.workers must be int"),
    ],
)
def test_invalid_space_is_a_clear_error(tmp_path, space, message):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    r = subprocess.run([*SWEEP, "--space", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "space.yaml" in r.stderr and message in r.stderr, r.stderr


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.mkdir(), "is a folder; give the path of a YAML search space file"),
        (lambda p: p.write_bytes(b"loss.tau: {uniform: [0.1, 0.2]}\n# caf\xe9\n"), "not UTF-8 text"),
        (
            lambda p: p.write_text("loss.tau: {uniform: [0.1, 0.2]}\nloss.tau: {uniform: [0.2, 0.3]}\n"),
            "line 2: duplicate key 'loss.tau' (first at line 1)",
        ),
    ],
)
def test_unreadable_space_is_a_clear_error(tmp_path, make, message):
    """The space is read like a config (``read_yaml``): each problem names the file, no traceback."""
    path = tmp_path / "space.yaml"
    make(path)
    r = subprocess.run([*SWEEP, "--space", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {path}: ") and message in r.stderr, r.stderr


def test_shipped_space_and_old_script_path(tmp_path):
    """The default space ships with the package, and ``python tune/search.py`` (a shim) still runs the
    sweep's command line from any directory; resuming nothing is an error, not a traceback."""
    base = load_config(RECIPES / "demo.yaml", ["eval.every=1"])
    assert set(load_space(sweep.SPACE, base)) >= {"loss.tau", "optim.lr"}
    r = subprocess.run(
        [sys.executable, str(REPO / "tune" / "search.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "dclr-tune" in r.stdout and "--space" in r.stdout, r.stderr
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "tune" / "search.py"),
            "--resume",
            "--trust-storage",
            "--storage",
            str(tmp_path / "sweeps"),
            "--name",
            "none",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "error: no sweep to resume at" in r.stderr, r.stderr[-3000:]
