"""The host-sync counter of the GPU check (benchmarks/syncs.py) sees each kind in its phase
(the trainer's step with it: tests/unit/test_deepspeed.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import benchmark_script


@pytest.fixture(scope="module")
def syncs():
    return benchmark_script("syncs")


def test_each_kind_is_counted_in_its_phase_and_the_methods_come_back(syncs):
    from deepspeed.accelerator import get_accelerator

    x = torch.ones(4)
    cpu, accelerator_sync = torch.Tensor.cpu, type(get_accelerator()).synchronize
    with syncs.watch(torch.device("cpu")) as w:
        with torch.profiler.record_function("p/a"):
            x.sum().item()
            torch.tensor([1.0, 2.0])
            x.cpu()
            x.tolist()
        with torch.profiler.record_function("p/b"):
            get_accelerator().synchronize()
            x[x > 0]
        x.numpy()
    counts = w.counts("p/")
    assert counts["by_kind"] == {"read": 2, "python data": 1, "to host": 3, "synchronize": 1}
    assert counts["by_phase"] == {"a": 4, "b": 2, "other": 1} and counts["total"] == 7
    assert torch.Tensor.cpu is cpu and "synchronize" not in vars(get_accelerator())
    assert type(get_accelerator()).synchronize is accelerator_sync
