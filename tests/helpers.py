"""Plain helpers the tests share (fixtures live in conftest.py): corpora, a local Ray cluster,
tar files built byte by byte, a temporary environment, the tiny training config."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import tarfile
from pathlib import Path

# A training config small enough for CPU tests: 2 workers, 3 epochs of 2 steps.
TINY = [
    "model.arch=tiny",
    "model.width=8",
    "model.dim=32",
    "loss.queue_size=64",
    "views.frames=4",
    "views.size=32",
    "data.batch_size=4",
    "data.loader_workers=0",
    "data.shuffle_buffer=8",
    "data.shuffle_initial=4",
    "data.epoch_samples=16",
    "cluster.workers=2",
    "train.epochs=3",
    "optim.lr=0.05",
    "optim.ref_batch=8",
    "train.log_every=1",
    "checkpoint.every=1",
]


def pack_synthetic(
    root: Path,
    *,
    classes: int,
    train_per_class: int,
    test_per_class: int,
    train_scenes: int,
    test_scenes: int,
    max_samples: int,
) -> dict[str, str]:
    """A small synthetic scene-bias corpus (48 px, 24 frames) packed into train/test shards."""
    from dclr_dist.config import load_config
    from dclr_dist.shard.pack import pack
    from dclr_dist.shard.synth import write_corpus

    manifest = write_corpus(
        root / "videos",
        num_classes=classes,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
        train_scenes=train_scenes,
        test_scenes=test_scenes,
        frames=24,
        size=48,
        workers=2,
        progress=False,
    )
    cfg = load_config(None, ["shard.short_side=48", f"shard.max_samples={max_samples}"]).shard
    for split in ("train", "test"):
        pack(str(manifest), str(root / split), cfg, split=split, workers=2, progress=False)
    return {split: str(root / split) for split in ("train", "test")}


@contextlib.contextmanager
def local_ray(tmpdir: str, num_cpus: int = 3):
    """A local Ray cluster for one test module (starting one costs seconds: share it)."""
    import ray

    os.environ["RAY_TMPDIR"] = tmpdir
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=num_cpus, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A plain (ustar) tar of ``(name, payload)`` members, for shards built byte by byte."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """``values`` set in os.environ for the block (Ray and boto3 read the real environment), then restored."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.write_bytes(tar_bytes(members))


def benchmark_script(name: str):
    """``benchmarks/<name>.py`` as a module (benchmarks/ is a folder of scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
