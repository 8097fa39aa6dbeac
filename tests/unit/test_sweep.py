"""The sweep's command line refuses to unpickle from storage unless told the storage is trusted."""

from __future__ import annotations

import pickle

from dclr_dist import sweep


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_resume_refuses_tune_state_planted_in_storage(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    experiment = tmp_path / "sweeps" / "s"
    experiment.mkdir(parents=True)
    # Whoever can write the sweep storage leaves a Tune state that runs code when unpickled.
    (experiment / "tuner.pkl").write_bytes(pickle.dumps(Payload(marker)))
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    rc = sweep.main(["--resume", "--storage", str(tmp_path / "sweeps"), "--name", "s"])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    assert err.count("\n") == 1 and "--trust-storage" in err and "runs code" in err, err


def test_trust_storage_is_explained_in_help(capsys):
    try:
        sweep.main(["--help"])
    except SystemExit:
        pass
    out = " ".join(capsys.readouterr().out.split())
    assert "--trust-storage" in out and "unpickling can run code" in out
