"""Rank 0's background writes (best/, metrics): the step does not wait, order and errors are kept."""

from __future__ import annotations

import threading
import time

import pytest

from dclr_dist import storage


def test_writes_do_not_hold_the_caller_and_land_in_order(tmp_path, monkeypatch):
    gate, landed = threading.Event(), []
    real = storage.write_bytes

    def slow(url, data):  # an S3 round trip that takes as long as the test says
        gate.wait(10)
        real(url, data)
        landed.append(url.rsplit("/", 1)[-1])

    monkeypatch.setattr(storage, "write_bytes", slow)
    writes = storage.BackgroundWrites(limit=4)
    t0 = time.monotonic()
    writes.write(str(tmp_path / "backbone.pt"), b"w")
    writes.write(str(tmp_path / "meta.json"), b"{}")
    assert time.monotonic() - t0 < 1 and landed == []
    gate.set()
    writes.close()
    assert landed == ["backbone.pt", "meta.json"] and (tmp_path / "meta.json").read_bytes() == b"{}"


def test_a_failed_write_is_raised_not_lost(tmp_path):
    (tmp_path / "file").write_text("x")
    writes = storage.BackgroundWrites()
    writes.write(str(tmp_path / "file" / "best" / "meta.json"), b"{}")  # its folder cannot be made
    with pytest.raises(OSError):
        writes.close()


def test_at_most_limit_writes_wait(tmp_path, monkeypatch):
    gate, started = threading.Event(), threading.Event()

    def slow(url, data):
        started.set()
        gate.wait(10)

    monkeypatch.setattr(storage, "write_bytes", slow)
    writes = storage.BackgroundWrites(limit=2)
    writes.write("a", b"")
    writes.write("b", b"")
    started.wait(10)
    blocked = threading.Thread(target=writes.write, args=("c", b""))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # the third waits for the oldest
    gate.set()
    blocked.join(10)
    writes.close()
