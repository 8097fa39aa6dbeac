"""What a run reports about itself: rank 0's metrics files and the cross-rank reductions behind them."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dclr_dist import storage


class MetricsLog:
    """Rank 0's metrics: JSON lines and TensorBoard events under ``<run>/metrics``.

    Written locally; for an s3:// run they are written to a local folder and copied to the
    run's prefix at every epoch end, in the background (``writes``, which best/ shares), so a
    killed node loses at most one epoch of curves and no rank waits for the upload. That
    folder is a fresh private one (mkdtemp): a predictable name in the shared temp dir would
    follow a symlink planted there and merge an earlier run's leftovers.
    """

    def __init__(self, run_url: str):
        self.run_url = run_url
        if storage.is_s3(run_url):
            local = Path(tempfile.mkdtemp(prefix="dclr-metrics-"))
        else:
            local = storage.local_path(storage.join(run_url, "metrics"))
            local.mkdir(parents=True, exist_ok=True)
        self.dir = local
        remote = storage.join(run_url, "metrics/metrics.jsonl")
        if storage.is_s3(run_url) and storage.exists(remote):
            # A restarted rank 0 may be on another node: continue the run's curve, don't restart it.
            (local / "metrics.jsonl").write_bytes(storage.read_bytes(remote))
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(local))
        self.jsonl = open(local / "metrics.jsonl", "a")
        self.writes = storage.BackgroundWrites()

    def write(self, kind: str, step: int, values: dict) -> None:
        self.jsonl.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def sync(self) -> None:
        self.tb.flush()
        if storage.is_s3(self.run_url):
            for path in self.dir.iterdir():  # read now: the files grow while the upload runs
                self.writes.write(storage.join(self.run_url, f"metrics/{path.name}"), path.read_bytes())

    def close(self) -> None:
        try:
            self.sync()
            self.tb.close()
            self.jsonl.close()
        finally:
            self.writes.close()
        if storage.is_s3(self.run_url):
            shutil.rmtree(self.dir)


def reduce(values: dict[str, float], device: torch.device, op: str = "mean") -> dict[str, float]:
    """Average (or sum) scalars over all ranks, in one collective."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    if op == "mean":
        t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))


def count_nodes() -> int:
    """Distinct Ray nodes hosting this run's workers."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not dist.is_initialized():
        return 1
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, node)
    return len(set(everyone))


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class EpochMeter:
    """One rank's counts over an epoch, and over the window since the last step log: losses
    summed on the device (a float() per step would make the host wait for the GPU every
    step), samples, damaged samples and shards the reader skipped, seconds waiting for data."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.samples = self.skipped_samples = self.skipped_shards = 0
        self.wait = 0.0
        self.start = time.perf_counter()
        self._open_window()

    def _open_window(self) -> None:
        self.window_start, self.window_samples, self.window_wait = time.perf_counter(), 0, 0.0

    def batch(self, batch: dict, wait: float) -> None:
        """A batch as the loader gave it, on the host (its counts read there: on the GPU, a sync)."""
        n = int(batch["label"].shape[0])
        self.skipped_samples += int(batch["skipped_samples"])
        self.skipped_shards += int(batch["skipped_shards"])
        self.samples += n
        self.window_samples += n
        self.wait += wait
        self.window_wait += wait

    def losses(self, losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach()

    def window(self) -> dict[str, float]:
        """This rank's throughput and data-wait fraction since the last call, and a new window."""
        elapsed = time.perf_counter() - self.window_start
        values = {"samples_per_s_worker": self.window_samples / elapsed, "data_wait": self.window_wait / elapsed}
        self._open_window()
        return values

    def epoch(self, batches: int, device: torch.device, flags: dict[str, bool]) -> tuple[dict, dict[str, bool]]:
        """The epoch's metrics over all ranks (mean losses per batch, summed counts, rates), in two
        collectives; and each of ``flags`` true if it was on any rank."""
        elapsed = time.perf_counter() - self.start
        metrics = reduce({k: float(v) / batches for k, v in self.sums.items()}, device)
        totals = reduce(
            {
                "skipped": float(self.skipped_samples),
                "skipped_shards": float(self.skipped_shards),
                "samples": float(self.samples),
                "wait": self.wait,
                **{k: float(v) for k, v in flags.items()},
            },
            device,
            op="sum",
        )
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        metrics.update(
            {
                "skipped_samples": int(totals["skipped"]),
                "skipped_shards": int(totals["skipped_shards"]),
                "samples_per_s": totals["samples"] / elapsed,
                "samples_per_s_worker": self.samples / elapsed,
                "data_wait": totals["wait"] / world / elapsed,
            }
        )
        return metrics, {k: bool(totals[k]) for k in flags}
