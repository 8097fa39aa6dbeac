"""The GPU check's rows switch what they say: each speed switch is a field of EngineConfig, the
baseline turns every one off (whatever the recipe sets) and each switch row turns on its own."""

from __future__ import annotations

import pytest
from helpers import benchmark_script

from dclr_dist.config import load_config


@pytest.fixture(scope="module")
def gpu_check():
    return benchmark_script("gpu_check")


def test_every_switch_is_an_engine_field_and_each_row_sets_exactly_its_own(gpu_check):
    switches = gpu_check.available_switches()
    assert list(switches) == list(gpu_check.SWITCHES) == ["cudnn_benchmark", "channels_last", "compile"]
    rows = {r["name"]: r for r in gpu_check.rows_to_run(switches, cpu=False, compile_on_cpu=False, zero_stage=0)}
    # The K400 recipe turns every switch on: the baseline must still have all of them off.
    on = {name: load_config("k400_r2plus1d", rows[name]["overrides"]).engine for name in rows}
    assert not any(getattr(on["baseline"], s) for s in switches)
    for s in switches:
        assert [t for t in switches if getattr(on[s], t)] == [s], s
    assert all(getattr(on["all switches"], s) for s in switches)
    assert rows["compile"]["compile"] and rows["all switches"]["compile"] and not rows["baseline"]["compile"]
    assert all(r["skip"] is None for r in rows.values())


def test_a_switch_missing_from_the_config_stops_the_check(gpu_check, monkeypatch):
    monkeypatch.setattr(gpu_check, "SWITCHES", (*gpu_check.SWITCHES, "fused_adam"))
    with pytest.raises(SystemExit, match="engine.fused_adam is not in EngineConfig"):
        gpu_check.available_switches()
