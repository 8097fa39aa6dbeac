"""The package outside its checkout: console scripts, shipped recipes, a wheel that carries them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_console_script_runs_from_any_directory(name, tmp_path):
    script = Path(sys.executable).parent / name
    r = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


def test_recipes_load_by_name_away_from_the_checkout(tmp_path):
    code = (
        "from dclr_dist.config import load_config; from dclr_dist.sweep import SPACE, load_space; "
        "c = load_config('k400_r2plus1d'); print(c.cluster.workers, len(load_space(SPACE, load_config('demo'))))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["32", "10"], r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "dclr_dist.train", "--config", "no_such_recipe"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "shipped recipes: demo, downstream/r2plus1d_18, k400_r2plus1d" in r.stderr


def test_the_wheel_carries_the_recipes_and_the_search_space(tmp_path):
    # Built from a copy: setuptools writes build/ beside the sources.
    src = tmp_path / "src"
    shutil.copytree(REPO / "dclr_dist", src / "dclr_dist", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
    subprocess.run([*pip, str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("dclr_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        f"dclr_dist/configs/{n}.yaml" for n in ("demo", "k400_r2plus1d", "ucf101_r2plus1d", "downstream/r2plus1d_18")
    } | {"dclr_dist/sweep_space.yaml"}
    assert shipped <= names
    assert not any(n.startswith(("tests/", "benchmarks/", "tune/")) for n in names)
