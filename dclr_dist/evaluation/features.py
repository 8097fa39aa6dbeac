"""Video features of a split: what the frozen-feature protocols (``dclr_dist.evaluation.probes``) see.

Each video gives ``data.eval_clips`` uniformly spaced clips (paper: 10), centre
cropped (``dclr_dist.data.eval_loader``); the backbone's final feature maps are averaged
over positions (GAP) and over the clips, then L2-normalised: (V, C) for V videos, in key
order. They are extracted in this process (``eval.workers: 0``, on its GPU if it has one:
no start-up cost, right for small splits) or in ``eval.workers`` Ray tasks on the cluster,
each reading its part of the shards on a GPU of its own (``eval.gpus_per_worker``): what
Kinetics-400's 240k train videos need. Videos that cannot be read are skipped with a
warning and counted in the report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dclr_dist import launch
from dclr_dist.config import Config, DataConfig, ViewsConfig
from dclr_dist.evaluation import EvalError
from dclr_dist.model import gap


@dataclass
class Features:
    """Video features of one split, sorted by key (the same whatever the ranks and workers)."""

    x: torch.Tensor  # (V, C) float32, L2-normalised
    label: torch.Tensor  # (V,) int64
    keys: list[str]
    meta: list[dict]  # each record's meta (e.g. {"scene": "scene003"}), {} where none
    # Damage the reader skipped (each sample and shard named in a warning): the protocols
    # score the V videos read, so a report must say how many were not.
    skipped_samples: int = 0
    skipped_shards: int = 0

    @property
    def scenes(self) -> list[str] | None:
        """Each video's scene, or None unless every record has one."""
        scenes = [m.get("scene") for m in self.meta]
        return scenes if all(s is not None for s in scenes) else None


def progress_bar(desc: str | None, **kwargs):
    """A tqdm bar on stderr, shown on a terminal only (tqdm's rule); none at all when desc is None."""
    from tqdm import tqdm

    return tqdm(desc=desc, disable=True if desc is None else None, dynamic_ncols=True, **kwargs)


def _listed(urls: list[str]) -> int | None:
    """The videos the index.json files behind ``urls`` list; None where a shard is listed bare."""
    from dclr_dist import data

    counts = [s.samples for s in data.resolve_shards(urls)]
    return None if None in counts else sum(counts)


@torch.no_grad()
def _batch_features(
    f: nn.Module,
    data_cfg: DataConfig,
    views_cfg: ViewsConfig,
    urls: list[str],
    device: torch.device,
    rank: int,
    world_size: int,
):
    """Per eval batch of ``rank``: (x (B, C) on the CPU, label (B,), keys, metas, skipped samples, skipped shards)."""
    from dclr_dist import data

    dtype = next(f.parameters()).dtype
    for batch in data.eval_loader(
        dataclasses.replace(data_cfg, eval=list(urls)), views_cfg, rank=rank, world_size=world_size
    ):
        skipped = int(batch["skipped_samples"]), int(batch["skipped_shards"])
        if not batch["key"]:  # damage counts only (data.EvalStream)
            yield None, None, [], [], *skipped
            continue
        batch = data.to_device(batch, device, views_cfg)
        clips = batch["clips"]  # (B, N, 3, T, S, S)
        B, N = clips.shape[:2]
        h = gap(f(clips.flatten(0, 1).to(dtype))).float()  # (B * N, C)
        yield (
            F.normalize(h.view(B, N, -1).mean(1), dim=1).cpu(),
            batch["label"].cpu(),
            batch["key"],
            batch["meta"],
            *skipped,
        )


def _merge(parts: list[tuple], urls: list[str], listed: int | None) -> Features:
    """One split's Features from the batches of every rank or worker, in key order."""
    skipped_shards = sum(p[5] for p in parts)
    skipped_samples = sum(p[4] for p in parts)
    parts = [p for p in parts if p[2]]
    if not parts:
        raise EvalError(
            f"no video of {urls} could be read (damaged samples were skipped, each with a warning "
            "naming it): evaluation needs shards packed by `python -m dclr_dist.shard`, whose "
            "records carry an integer label"
        )
    keys = [k for p in parts for k in p[2]]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    metas = [m for p in parts for m in p[3]]
    # The index.json sample counts (``listed``) are exact where every shard is listed; without
    # them, what the streams counted (damage after a stream's last batch comes in a batch of none).
    skipped = listed - len(keys) if listed is not None else skipped_samples
    return Features(
        torch.cat([p[0] for p in parts])[order],
        torch.cat([p[1] for p in parts])[order],
        [keys[i] for i in order],
        [metas[i] for i in order],
        skipped,
        skipped_shards,
    )


def extract(
    f: nn.Module,
    data_cfg: DataConfig,
    views_cfg: ViewsConfig,
    urls: list[str],
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    progress: str | None = None,
) -> Features:
    """Features of every video in ``urls``, in this process on ``device``; with several ranks (a
    process group) each extracts its share and all get all. ``progress``: a progress bar's label."""
    was_training = f.training
    f.eval()  # batch-norm running statistics: a video's feature must not depend on its batch
    parts, listed = [], _listed(urls)
    with progress_bar(progress, total=listed, unit="video") as bar:
        for part in _batch_features(f, data_cfg, views_cfg, urls, device, rank, world_size):
            parts.append(part)
            bar.update(len(part[2]))
    f.train(was_training)
    if world_size > 1:
        import torch.distributed as dist

        everyone: list = [None] * world_size
        dist.all_gather_object(everyone, parts)
        parts = [p for mine in everyone for p in mine]
    return _merge(parts, urls, listed)


def _worker_features(
    f: nn.Module,
    data_cfg: DataConfig,
    views_cfg: ViewsConfig,
    urls: list[str],
    rank: int,
    world_size: int,
    use_gpu: bool,
):
    """Ray task: the batches of part ``rank`` of ``world_size`` (a generator: each batch streams back)."""
    device = torch.device("cuda" if use_gpu else "cpu")
    yield from _batch_features(f.to(device).eval(), data_cfg, views_cfg, urls, device, rank, world_size)


def extract_on_workers(f: nn.Module, cfg: Config, urls: list[str], progress: str | None = None) -> Features:
    """``extract`` in ``eval.workers`` Ray tasks on the cluster (RAY_ADDRESS, or a local one), each
    reading every ``eval.workers``-th part of the shards; the same Features as ``extract`` (up
    to float rounding), whatever the worker count. ``f``: on the CPU, shipped to the workers."""
    import ray

    launch.connect_ray()
    task = ray.remote(_worker_features).options(num_cpus=cfg.eval.cpus_per_worker, num_gpus=cfg.eval.gpus_per_worker)
    model = ray.put(f)
    streams = [
        task.remote(model, cfg.data, cfg.views, list(urls), rank, cfg.eval.workers, cfg.eval.gpus_per_worker > 0)
        for rank in range(cfg.eval.workers)
    ]
    parts, listed = [], _listed(urls)
    with progress_bar(progress, total=listed, unit="video") as bar:
        while streams:
            [ready], _ = ray.wait(streams, num_returns=1)
            try:
                part = ray.get(next(ready))
            except StopIteration:
                streams.remove(ready)
                continue
            parts.append(part)
            bar.update(len(part[2]))
    return _merge(parts, urls, listed)
