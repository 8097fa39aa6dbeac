"""The demo's closing evaluation takes the run's final weights, not a best/ ranked by a noisy monitor."""

from __future__ import annotations

import json

import pytest

from dclr_dist.checkpoint import CheckpointError
from dclr_dist.demo import final_checkpoint


def test_the_checkpoint_of_the_last_epoch_is_evaluated(tmp_path):
    # Ray names checkpoints by time; the epoch in meta.json decides, not the name's order.
    for name, epoch in (("checkpoint_2026-12-07_00-10-00", 16), ("checkpoint_2026-12-07_00-20-00", 12)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({"epoch": epoch}))
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "meta.json").write_text(json.dumps({"epoch": 20}))
    assert final_checkpoint(tmp_path) == str(tmp_path / "checkpoint_2026-12-07_00-10-00")


def test_a_run_without_checkpoints_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint_"):
        final_checkpoint(tmp_path)
