"""``python -m dclr_dist.eval``: downstream protocols for a pretrained DCLR backbone.

    python -m dclr_dist.eval --checkpoint runs/demo --train shards/demo/train --test shards/demo/test
    python -m dclr_dist.eval --checkpoint s3://bucket/runs/ucf/best --train s3://bucket/ucf101/train \\
        --test s3://bucket/ucf101/test --protocol finetune train.workers=8 train.gpus_per_worker=1

Protocols (Ding, Qian, Xiong, arXiv 2207.05340, evaluation section; docs/design.md, section 7):

- ``linear``: a linear classifier on frozen features. Multinomial logistic regression on
  the standardised video features of the train split, full-batch L-BFGS with an L2
  penalty (``eval.l2``, or chosen by 3-fold cross-validation on the train split when
  null): deterministic and seconds long, where the paper's SGD probe with augmentation
  costs epochs of backbone forwards. Top-1 and per-class accuracy on the test split, and
  its confusion matrix.
- ``knn``: retrieval, test queries against the train gallery by cosine similarity:
  recall@K (a query counts when one of its K nearest train videos has its class; paper:
  R@1/5/10/20/50) and the accuracy of a k-NN classifier whose k nearest neighbours vote
  with weights exp(cos / t) (Wu et al. 2018; ``eval.k``, ``eval.t``). Also on centred
  features (the train gallery's mean subtracted, then L2-normalised): GAP features of ReLU
  maps share a large common component that dominates raw cosines.
- ``scene``: how much of the representation follows the background scene and how much
  the motion, on corpora whose records carry a scene (``meta.scene``: the synthetic
  scene-bias corpus, ``python -m dclr_dist.shard synth``, or a manifest with a scene
  column). Train and test scenes are disjoint there, so scene decodability is measured
  on the train split: linear probes for the scene and for the motion on the same 2-fold
  split of the train videos (each scene in both folds). On the test split, whose scenes
  no probe has seen, the *scene-swap* test asks each query whether it is closer to a
  video of its motion in another scene than to a video of its scene with another motion,
  over all such pairs (1: follows the motion, 0: follows the scene, 0.5: neither), and
  which of the two its nearest neighbour shares. Motion accuracy on unseen scenes is the
  ``linear`` protocol's.
- ``finetune``: the paper's protocol: backbone and a linear classifier trained end to end
  on the train split (lr ``eval.finetune_lr`` per ``train.ref_batch`` samples, scaled with
  the global batch like pretraining, ``eval.finetune_epochs`` epochs, cosine schedule,
  augmented RGB clips of the training pipeline), distributed on Ray Train with the
  pretraining's scaling (``train.workers`` ...: DDP over gloo on CPU, nccl on GPU; no
  DeepSpeed, a backbone fits every GPU), then tested with the softmax averaged over the
  clips of each test video.
- ``all``: every protocol, ``scene`` only where the records carry scenes.

Features. Each video gives ``data.eval_clips`` uniformly spaced clips (paper: 10), centre
cropped (``dclr_dist.data.eval_loader``); the backbone's final feature maps are averaged
over positions (GAP) and over the clips, then L2-normalised: (V, C) for V videos, in key
order. They are extracted in this process (``eval.workers: 0``, on its GPU if it has one:
no start-up cost, right for small splits) or in ``eval.workers`` Ray tasks on the cluster,
each reading its part of the shards on a GPU of its own (``eval.gpus_per_worker``): what
Kinetics-400's 240k train videos need. Videos that cannot be read are skipped with a
warning and counted in the report. k-NN and retrieval compare ``eval.chunk`` queries at a
time with the gallery (top-k, never a full sort), on the GPU where there is one.

Checkpoint. ``--checkpoint`` is a folder written by ``python -m dclr_dist.train``
(``backbone.pt`` + ``meta.json``): a Ray checkpoint, a run's ``best/``, or the run folder
itself (its ``best/``), local or s3://. The clip shape and normalisation come from the
config saved with it (or ``--config``), so the backbone sees what it was trained on;
``key=value`` overrides change the rest (``data.eval_clips=10 data.workers=4``).

Outputs in ``--out``: ``report.json`` (every number), ``report.txt`` (the table printed at
the end), and plots: ``per_class.png``, ``retrieval.png``, ``scene.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dclr_dist import launch, storage
from dclr_dist.checkpoint import CheckpointError, load_backbone, load_meta, resolve_checkpoint
from dclr_dist.config import Config, ConfigError, DataConfig, ViewsConfig, config_from_dict, load_config
from dclr_dist.engine import scaled_lr
from dclr_dist.model import gap

PROTOCOLS = ("linear", "knn", "scene", "finetune")


class EvalError(RuntimeError):
    """The evaluation cannot run; the message names what and says what to do."""




# --------------------------------------------------------------------------- checkpoint







def eval_config(meta: dict, train: list[str], test: list[str], config: str | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The checkpoint's config (or ``config``, a YAML file) with ``key=value`` overrides applied,
    validated, and ``data.train``/``data.eval`` set to the train and test shards.

    The backbone is the checkpoint's: a config or override naming another is refused.
    """
    if config is not None:
        cfg = load_config(config, overrides)
    else:
        cfg = config_from_dict(meta["config"], where="checkpoint config + command line", overrides=overrides)
    cfg.data.train, cfg.data.eval = list(train), list(test)
    got, want = (cfg.model.arch, cfg.model.width), (meta["model"]["arch"], meta["model"]["width"])
    if got != want:
        raise EvalError(f"the checkpoint holds a {want[0]} backbone of width {want[1]} and the config asks for "
                        f"{got[0]} of width {got[1]}: evaluate a checkpoint of that backbone, or leave model.* "
                        "as the checkpoint has it")
    return cfg


# --------------------------------------------------------------------------- features

@dataclass
class Features:
    """Video features of one split, sorted by key (the same whatever the ranks and workers)."""

    x: torch.Tensor        # (V, C) float32, L2-normalised
    label: torch.Tensor    # (V,) int64
    keys: list[str]
    meta: list[dict]       # each record's meta (e.g. {"scene": "scene003"}), {} where none
    # Damage the reader skipped (each sample and shard named in a warning): the protocols
    # score the V videos read, so a report must say how many were not.
    skipped_samples: int = 0
    skipped_shards: int = 0

    @property
    def scenes(self) -> list[str] | None:
        """Each video's scene, or None unless every record has one."""
        scenes = [m.get("scene") for m in self.meta]
        return scenes if all(s is not None for s in scenes) else None


def _progress(desc: str | None, **kwargs):
    """A tqdm bar on stderr, shown on a terminal only (tqdm's rule); none at all when desc is None."""
    from tqdm import tqdm

    return tqdm(desc=desc, disable=True if desc is None else None, dynamic_ncols=True, **kwargs)


def _listed(urls: list[str]) -> int | None:
    """The videos the index.json files behind ``urls`` list; None where a shard is listed bare."""
    from dclr_dist import data

    counts = [s.samples for s in data.resolve_shards(urls)]
    return None if None in counts else sum(counts)


@torch.no_grad()
def _batch_features(f: nn.Module, data_cfg: DataConfig, views_cfg: ViewsConfig, urls: list[str],
                    device: torch.device, rank: int, world_size: int):
    """Per eval batch of ``rank``: (x (B, C) on the CPU, label (B,), keys, metas, skipped samples, skipped shards)."""
    from dclr_dist import data

    dtype = next(f.parameters()).dtype
    for batch in data.eval_loader(dataclasses.replace(data_cfg, eval=list(urls)), views_cfg, rank=rank,
                                  world_size=world_size):
        skipped = int(batch["skipped_samples"]), int(batch["skipped_shards"])
        batch = data.to_device(batch, device, views_cfg)
        clips = batch["clips"]  # (B, N, 3, T, S, S)
        B, N = clips.shape[:2]
        h = gap(f(clips.flatten(0, 1).to(dtype))).float()  # (B * N, C)
        yield (F.normalize(h.view(B, N, -1).mean(1), dim=1).cpu(), batch["label"].cpu(), batch["key"],
               batch["meta"], *skipped)


def _merge(parts: list[tuple], urls: list[str], listed: int | None) -> Features:
    """One split's Features from the batches of every rank or worker, in key order."""
    parts = [p for p in parts if p[2]]
    if not parts:
        raise EvalError(f"no video of {urls} could be read (damaged samples were skipped, each with a warning "
                        "naming it): evaluation needs shards packed by `python -m dclr_dist.shard`, whose "
                        "records carry an integer label")
    keys = [k for p in parts for k in p[2]]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    metas = [m for p in parts for m in p[3]]
    # The loader's counts travel with batches, so damage after a stream's last batch is not
    # in them; the index.json sample counts (``listed``) are exact where every shard is there.
    skipped = listed - len(keys) if listed is not None else sum(p[4] for p in parts)
    return Features(torch.cat([p[0] for p in parts])[order], torch.cat([p[1] for p in parts])[order],
                    [keys[i] for i in order], [metas[i] for i in order], skipped, sum(p[5] for p in parts))


def extract(f: nn.Module, data_cfg: DataConfig, views_cfg: ViewsConfig, urls: list[str], device: torch.device,
            rank: int = 0, world_size: int = 1, progress: str | None = None) -> Features:
    """Features of every video in ``urls``, in this process on ``device``; with several ranks (a
    process group) each extracts its share and all get all. ``progress``: a progress bar's label."""
    was_training = f.training
    f.eval()  # batch-norm running statistics: a video's feature must not depend on its batch
    parts, listed = [], _listed(urls)
    with _progress(progress, total=listed, unit="video") as bar:
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


def _worker_features(f: nn.Module, data_cfg: DataConfig, views_cfg: ViewsConfig, urls: list[str], rank: int,
                     world_size: int, use_gpu: bool):
    """Ray task: the batches of part ``rank`` of ``world_size`` (a generator: each batch streams back)."""
    device = torch.device("cuda" if use_gpu else "cpu")
    yield from _batch_features(f.to(device).eval(), data_cfg, views_cfg, urls, device, rank, world_size)


def extract_on_workers(f: nn.Module, cfg: Config, urls: list[str], progress: str | None = None) -> Features:
    """``extract`` in ``eval.workers`` Ray tasks on the cluster (RAY_ADDRESS, or a local one), each
    reading every ``eval.workers``-th part of the shards; the same Features as ``extract`` (up
    to float rounding), whatever the worker count. ``f``: on the CPU, shipped to the workers."""
    import ray

    launch.connect_ray()
    task = ray.remote(_worker_features).options(num_cpus=cfg.eval.cpus_per_worker,
                                                num_gpus=cfg.eval.gpus_per_worker)
    model = ray.put(f)
    streams = [task.remote(model, cfg.data, cfg.views, list(urls), rank, cfg.eval.workers,
                           cfg.eval.gpus_per_worker > 0) for rank in range(cfg.eval.workers)]
    parts, listed = [], _listed(urls)
    with _progress(progress, total=listed, unit="video") as bar:
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


# --------------------------------------------------------------------------- protocols on frozen features

def logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float):
    """A multinomial logistic regression fitted by full-batch L-BFGS; returns predict(x) -> (N,) labels.

    Features are standardised with the training statistics (L2-normalised features have
    tiny per-dimension variance, which would make the L2 penalty meaningless).
    """
    x = x.double()
    mu, sd = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    z = (x - mu) / sd
    W = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=500, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ W + b, y) + 0.5 * l2 * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    W, b = W.detach(), b.detach()
    return lambda q: (((q.double() - mu) / sd) @ W + b).argmax(1)


def _accuracy(pred: torch.Tensor, y: torch.Tensor, classes: list[str]) -> dict:
    K = len(classes)
    confusion = torch.zeros(K, K, dtype=torch.long)
    confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    per_class = {c: (confusion[i, i] / confusion[i].sum()).item() for i, c in enumerate(classes)
                 if confusion[i].sum() > 0}
    return {"top1": (pred == y).double().mean().item(), "per_class": per_class, "confusion": confusion.tolist()}


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def choose_l2(x: torch.Tensor, y: torch.Tensor, num_classes: int, folds: int = 3,
              progress: str | None = None) -> tuple[float, dict]:
    """The L2 penalty of L2_GRID with the best k-fold accuracy on (x, y), the train split; and each one's."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    held = [order[i::folds] for i in range(folds)]
    scores = {}
    with _progress(progress, total=len(L2_GRID) * folds, unit="fit") as bar:
        for l2 in L2_GRID:
            correct = 0
            for idx in held:
                fit = torch.ones(len(y), dtype=torch.bool)
                fit[idx] = False
                predict = logistic_regression(x[fit], y[fit], num_classes, l2)
                correct += int((predict(x[idx]) == y[idx]).sum())
                bar.update()
            scores[l2] = correct / len(y)
    return max(L2_GRID, key=lambda l2: (scores[l2], l2)), scores  # ties: the stronger penalty


def linear_probe(train: Features, test: Features, classes: list[str], l2: float) -> dict:
    predict = logistic_regression(train.x, train.label, len(classes), l2)
    return {**_accuracy(predict(test.x), test.label, classes), "chance": 1 / len(classes), "l2": l2}


def nearest(gallery_x: torch.Tensor, query_x: torch.Tensor, n: int, chunk: int = 512, leave_one_out: bool = False,
            progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The n gallery videos nearest each query by cosine (L2-normalised features), on their device:
    similarities and gallery indices, (Q, n), nearest first; equal similarities in gallery
    order, as a stable sort of each row gives them (topk alone leaves that to the device).

    Queries go ``chunk`` at a time against the whole gallery: memory about chunk x G x 5
    bytes (x 20 in rows whose equal similarities straddle the n-th place), where sorting the
    whole (Q, G) matrix takes Q x G x 12 (57 GB for Kinetics-400's 20k test against 240k
    train videos). Results do not depend on the chunk beyond float rounding: BLAS may round
    a similarity's last bit differently for a chunk of a few rows. leave_one_out: the
    queries are the gallery, and none is its own neighbour.
    """
    n = min(n, gallery_x.shape[0] - leave_one_out)
    sims, idxs = [], []
    for start in _progress(progress, iterable=range(0, query_x.shape[0], chunk), unit="chunk"):
        sim = query_x[start:start + chunk] @ gallery_x.T  # (c, G)
        if leave_one_out:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + start] = -math.inf
        top, idx = sim.topk(n, dim=1)
        # topk picks any of several equal similarities: where equals straddle the n-th place,
        # take the lowest indices (rare with real features, so those rows alone are sorted)...
        tied = (sim >= top[:, -1:]).sum(1) > n
        if tied.any():
            idx[tied] = sim[tied].argsort(dim=1, descending=True, stable=True)[:, :n]
        # ... and order equals by index.
        idx = idx.sort(dim=1).values
        order = sim.gather(1, idx).argsort(dim=1, descending=True, stable=True)
        idx = idx.gather(1, order)
        sims.append(sim.gather(1, idx))
        idxs.append(idx)
    return torch.cat(sims), torch.cat(idxs)


def _vote(top: torch.Tensor, labels: torch.Tensor, num_classes: int, t: float) -> torch.Tensor:
    """Each query's class by the votes exp(cos / t) of its neighbours: top, labels (Q, k); on the CPU."""
    votes = torch.zeros(top.shape[0], num_classes, dtype=torch.float64, device=top.device)
    votes.scatter_add_(1, labels, ((top - 1) / t).exp().double())  # exp((cos - 1) / t): no overflow
    return votes.argmax(1).cpu()


def knn_predict(gallery_x: torch.Tensor, gallery_y: torch.Tensor, query_x: torch.Tensor, num_classes: int,
                k: int, t: float, leave_one_out: bool = False, chunk: int = 512) -> torch.Tensor:
    """k-NN classifier on L2-normalised features: votes exp(cos / t) of the k nearest (Wu et al. 2018).

    leave_one_out: queries are the gallery itself, and none votes for itself.
    """
    top, idx = nearest(gallery_x, query_x, k, chunk, leave_one_out)
    return _vote(top, gallery_y.to(idx.device)[idx], num_classes, t)


def knn_retrieval(train: Features, test: Features, classes: list[str], k: int, t: float,
                  recall_at: list[int], chunk: int = 512, progress: bool = False) -> dict:
    """Test queries against the train gallery: recall@K and the k-NN classifier's accuracy, on the
    features and on centred features (``centred``); computed on the features' device."""
    mean = train.x.mean(0)
    gallery_y, query_y = train.label.to(train.x.device), test.label.to(train.x.device)
    out = {}
    for name, gallery, queries in (("raw", train.x, test.x),
                                   ("centred", F.normalize(train.x - mean, dim=1), F.normalize(test.x - mean, dim=1))):
        # enough neighbours for the vote, every recall@K and the plotted curve's first 100
        top, idx = nearest(gallery, queries, max(k, 100, *recall_at), chunk,
                           progress=f"k-NN, {name} features" if progress else None)
        hits = gallery_y[idx] == query_y[:, None]  # (Q, n)
        recall = {f"R@{r}": hits[:, :r].any(1).double().mean().item() for r in recall_at if r <= len(train.keys)}
        pred = _vote(top[:, :k], gallery_y[idx[:, :k]], len(classes), t)
        curve = hits.int().cummax(1).values.double().mean(0)  # recall@1, @2, ... (plot)
        out[name] = {"recall": recall, "recall_curve": curve.tolist(), **_accuracy(pred, test.label, classes)}
    return {**out["raw"], "centred": {n: out["centred"][n] for n in ("top1", "recall")},
            "k": min(k, len(train.keys)), "t": t, "chance": 1 / len(classes)}


def knn_monitor(f: nn.Module, cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1) -> float:
    """k-NN accuracy on ``data.eval``, leave-one-out: each video against all the others.

    The in-training objective (``eval.every``): it needs one labelled set and one forward
    of its clips, spread over the ranks, where a train-split gallery would mean a pass over
    the training shards. On the scene-bias corpus the eval videos share their (unseen)
    scenes, so a scene-following representation finds other motions first and scores low.
    """
    feats = extract(f, cfg.data, cfg.views, cfg.data.eval, device, rank=rank, world_size=world_size)
    if len(feats.keys) < 2:
        raise EvalError(f"data.eval {cfg.data.eval} holds {len(feats.keys)} video: leave-one-out k-NN needs two")
    num_classes = int(feats.label.max()) + 1
    x = feats.x.to(device)
    pred = knn_predict(x, feats.label, x, num_classes, cfg.eval.k, cfg.eval.t, leave_one_out=True,
                       chunk=cfg.eval.chunk)
    return (pred == feats.label).double().mean().item()


def scene_probe(train: Features, test: Features, classes: list[str], l2: float) -> dict:
    """Motion against scene (module docstring): probes on the train split, scene-swap on the test split."""
    train_scenes, test_scenes = train.scenes, test.scenes
    if train_scenes is None or test_scenes is None:
        raise EvalError("the scene probe needs a scene for every video (meta.scene in the records) and these "
                        "shards have none: pack the synthetic scene-bias corpus (`python -m dclr_dist.shard "
                        "synth`), or a manifest with a scene column")
    # Two folds of the train videos, each scene in both: a scene probe must recognise the scene
    # of videos it was not fitted on (their scenes' other videos are in the other fold).
    names = sorted(set(train_scenes))
    scene_y = torch.tensor([names.index(s) for s in train_scenes])
    fold = torch.zeros(len(train_scenes), dtype=torch.bool)
    for s in names:
        idx = [i for i, v in enumerate(train_scenes) if v == s]  # in key order
        fold[idx[1::2]] = True
    probes = {}
    for what, y, K in (("scene", scene_y, len(names)), ("motion", train.label, len(classes))):
        correct = 0
        for held in (fold, ~fold):
            predict = logistic_regression(train.x[~held], y[~held], K, l2)
            correct += int((predict(train.x[held]) == y[held]).sum())
        probes[what] = {"accuracy": correct / len(y), "chance": 1 / K}

    scene_t = torch.tensor([sorted(set(test_scenes)).index(s) for s in test_scenes])
    same_motion = test.label[:, None] == test.label[None, :]
    same_scene = scene_t[:, None] == scene_t[None, :]
    sim = test.x @ test.x.T
    aucs = []
    for i in range(len(test.keys)):
        pos = sim[i][same_motion[i] & ~same_scene[i]]  # its motion, another scene
        neg = sim[i][same_scene[i] & ~same_motion[i]]  # its scene, another motion
        if len(pos) and len(neg):
            d = pos[:, None] - neg[None, :]
            aucs.append(((d > 0).double() + 0.5 * (d == 0).double()).mean().item())
    sim.fill_diagonal_(-math.inf)
    nn_ = sim.argmax(1)
    rows = torch.arange(len(test.keys))
    return {
        "train_probe": probes,
        "swap": sum(aucs) / len(aucs) if aucs else None,
        "swap_queries": len(aucs),
        "nn_same_motion": same_motion[rows, nn_].double().mean().item(),
        "nn_same_scene": same_scene[rows, nn_].double().mean().item(),
        "scenes": {"train": len(names), "test": len(set(test_scenes)),
                   "shared": len(set(names) & set(test_scenes))},
    }


# --------------------------------------------------------------------------- fine-tuning on Ray Train

class Classifier(nn.Module):
    """Backbone f, GAP and a linear layer: (B, 3, T, H, W) -> (B, K) logits."""

    def __init__(self, f: nn.Module, channels: int, num_classes: int):
        super().__init__()
        self.f, self.fc = f, nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(gap(self.f(x)))


def finetune_loop(loop_config: dict) -> None:
    """Ray Train worker entry point: one rank of the fine-tuning."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from dclr_dist import data

    cfg = config_from_dict(loop_config["config"], where="finetune_loop_config")
    folder, num_classes = loop_config["checkpoint"], loop_config["num_classes"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # the same classifier init everywhere (DDP also broadcasts it)
    f, C = load_backbone(folder, load_meta(folder))
    model = Classifier(f, C, num_classes).train()
    if device.type == "cuda":  # SyncBatchNorm refuses CPU tensors once a process group exists
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model)
    torch.manual_seed(cfg.train.seed + rank)

    batches = data.batches_per_epoch(cfg.data, data.resolve_shards(cfg.data.train), world)
    epochs = cfg.eval.finetune_epochs
    lr = scaled_lr(cfg.eval.finetune_lr, cfg.data.batch_size * world, cfg.train.ref_batch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.train.momentum,
                          weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * batches)
    # One loader for every epoch (no re-fork at epoch boundaries); unlabelled shards are an error.
    it = iter(data.train_loader(cfg.data, cfg.views, rank=rank, world_size=world, epochs=epochs, labelled=True))
    for epoch in range(epochs):
        model.train()
        # Summed on the device: a float() per step would make the host wait for the GPU every step.
        total = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for _ in range(batches):
            # The first augmented RGB clip of the pretraining pipeline: random resized crop,
            # colour, blur, flip (its static and dynamic views are made and left unused).
            batch = data.to_device(next(it), device, cfg.views)
            logits = model(batch["q"])
            loss = F.cross_entropy(logits, batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(logits)
            correct += (logits.argmax(1) == batch["label"]).sum()
            seen += len(logits)
        train_loss, train_top1 = float(total) / seen, int(correct) / seen
        ray.train.report({"epoch": epoch + 1, "loss": train_loss, "train_top1": train_top1})

    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    net.eval()
    keys, preds, labels = [], [], []
    with torch.no_grad():
        for batch in data.eval_loader(dataclasses.replace(cfg.data, eval=loop_config["test"]), cfg.views,
                                      rank=rank, world_size=world):
            batch = data.to_device(batch, device, cfg.views)
            clips = batch["clips"]  # (B, N, 3, T, S, S)
            B, N = clips.shape[:2]
            p = net(clips.flatten(0, 1)).softmax(1).view(B, N, -1).mean(1)  # clip-averaged (B, K)
            keys += batch["key"]
            preds += p.argmax(1).tolist()
            labels += batch["label"].tolist()
    everyone: list = [None] * world
    if world > 1:
        dist.all_gather_object(everyone, (keys, preds, labels))
    else:
        everyone = [(keys, preds, labels)]
    pred = torch.tensor([p for e in everyone for p in e[1]])
    y = torch.tensor([label for e in everyone for label in e[2]])
    if len(y) == 0:
        raise EvalError(f"no test video of {loop_config['test']} could be read: see the warnings")
    metrics = {"epoch": epochs, "loss": train_loss, "train_top1": train_top1,
               **_accuracy(pred, y, loop_config["classes"]), "videos": len(y)}
    # Ray Train keeps the metrics of checkpointed reports only: rank 0's checkpoint is the
    # fine-tuned network, a state_dict of f.* (backbone) and fc.* (classifier).
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            torch.save({k: v.cpu() for k, v in net.state_dict().items()}, Path(d) / "model.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def finetune(cfg: Config, folder: str, test: list[str], classes: list[str]) -> dict:
    """Fine-tune the checkpoint's backbone on ``cfg.data.train`` with Ray Train and test it on ``test``."""
    # A new run each time, beside the pretraining runs (train.storage_path, which every node
    # reaches): the same name would make Ray Train resume a finished fine-tuning.
    name = f"{cfg.train.name}-finetune-{time.strftime('%Y%m%d-%H%M%S')}"
    loop_config = {"config": cfg.to_dict(), "checkpoint": folder, "test": test, "classes": classes,
                   "num_classes": len(classes)}
    try:
        result = launch.run(launch.torch_trainer(finetune_loop, loop_config, cfg, name))
    except launch.TrainingFailed as e:
        raise EvalError(f"fine-tuning failed: {e}") from None
    path = result.checkpoint.path  # pyarrow's paths lack the s3://
    where = f"s3://{path}" if storage.is_s3(cfg.train.storage_path) else path
    return {**result.metrics, "model": storage.join(where, "model.pt"), "epochs": cfg.eval.finetune_epochs,
            "chance": 1 / len(classes)}


# --------------------------------------------------------------------------- the whole evaluation

def _index_classes(urls: list[str]) -> list[str] | None:
    """Class names from the index.json files behind ``urls``; None if any entry is a bare .tar."""
    classes = None
    for entry in urls:
        if entry.endswith((".tar", ".tar.gz", ".tgz")) or "{" in entry:
            return None
        url = entry if entry.endswith(".json") else storage.join(entry, "index.json")
        try:
            got = json.loads(storage.read_bytes(url)).get("classes")
        except FileNotFoundError:
            raise EvalError(f"{url}: not found; list shards packed by `python -m dclr_dist.shard`") from None
        if got is None:
            return None
        if classes is not None and got != classes:
            raise EvalError(f"{url} lists other classes than the shards before it: {got} != {classes}")
        classes = got
    return classes


def _classes(train: list[str], test: list[str], labels: list[torch.Tensor]) -> list[str]:
    """Class names by label index; train and test must share them."""
    a, b = _index_classes(train), _index_classes(test)
    if a is not None and b is not None and a != b:
        raise EvalError(f"the train and test shards were packed with different class lists ({a} and {b}), so "
                        "their label indices mean different classes: pack both splits from one corpus in "
                        "which every class has videos in each split")
    names = a or b
    top = max((int(y.max()) for y in labels if len(y)), default=-1)
    if names is None:
        if top < 0:
            raise EvalError("the class count is unknown: list the shards by index.json (or packed folder) so "
                            "the class names are known")
        return [f"class {i}" for i in range(top + 1)]
    if top >= len(names):
        raise EvalError(f"a label {top} exceeds the {len(names)} classes of the index.json files")
    return names


def evaluate(checkpoint: str, train: list[str], test: list[str], protocols: tuple[str, ...] = ("all",),
             out: str | Path | None = None, config: str | None = None, overrides: tuple[str, ...] = (),
             log=print) -> dict:
    """Run ``protocols`` (names of PROTOCOLS, or "all") on ``checkpoint``; write the report files to
    ``out`` if given; return the report (what report.json holds)."""
    unknown = set(protocols) - {*PROTOCOLS, "all"}
    if unknown:
        raise EvalError(f"unknown protocol(s) {sorted(unknown)}: choose from {', '.join(PROTOCOLS)} or all")
    everything = "all" in protocols
    protocols = PROTOCOLS if everything else tuple(protocols)
    folder = resolve_checkpoint(checkpoint)
    meta = load_meta(folder)
    train, test = [storage.absolute(u) for u in train], [storage.absolute(u) for u in test]
    cfg = eval_config(meta, train, test, config, overrides)
    f, _ = load_backbone(folder, meta)  # a mismatched backbone fails before any video is read
    report = {"checkpoint": folder, "model": meta["model"], "epoch": meta["epoch"], "train": train, "test": test,
              "clips": cfg.data.eval_clips, "frames": cfg.views.frames, "stride": cfg.views.stride,
              "size": cfg.views.size, "protocols": {}}
    frozen = [p for p in protocols if p != "finetune"]
    if frozen:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if cfg.eval.workers:
            where, run = f"{cfg.eval.workers} Ray workers", lambda urls, bar: extract_on_workers(f, cfg, urls, bar)
        else:
            f = f.to(device)
            where, run = str(device), lambda urls, bar: extract(f, cfg.data, cfg.views, urls, device, progress=bar)
        log(f"eval: features of {folder} ({cfg.data.eval_clips} clips per video) on {where}")
        tr, te = run(train, "features, train"), run(test, "features, test")
        classes = _classes(train, test, [tr.label, te.label])
        if len(set(tr.label.tolist())) < 2:
            raise EvalError(f"the train shards {train} hold a single class: the probes need two or more")
        report.update(classes=classes, videos={"train": len(tr.keys), "test": len(te.keys)},
                      skipped={split: {"samples": s.skipped_samples, "shards": s.skipped_shards}
                               for split, s in (("train", tr), ("test", te))})
        l2 = cfg.eval.l2
        if l2 is None and {"linear", "scene"} & set(protocols):
            l2, scores = choose_l2(tr.x, tr.label, len(classes), progress="linear probe, l2 cross-validation")
            report["l2_cv"] = {"chosen": l2, "accuracy": {str(k): v for k, v in scores.items()}}
        if "linear" in protocols:
            report["protocols"]["linear"] = linear_probe(tr, te, classes, l2)
        if "knn" in protocols:
            on_device = [dataclasses.replace(s, x=s.x.to(device)) for s in (tr, te)]
            report["protocols"]["knn"] = knn_retrieval(*on_device, classes, cfg.eval.k, cfg.eval.t,
                                                       cfg.eval.recall_at, cfg.eval.chunk, progress=True)
        if "scene" in protocols:
            if tr.scenes is None and everything:
                report["protocols"]["scene"] = {"skipped": "the records carry no meta.scene"}
            else:
                report["protocols"]["scene"] = scene_probe(tr, te, classes, l2)
    if "finetune" in protocols:
        classes = report.get("classes") or _classes(train, test, [])
        report.setdefault("classes", classes)
        log(f"eval: fine-tuning on Ray Train ({cfg.train.workers} workers, {cfg.eval.finetune_epochs} epochs)")
        report["protocols"]["finetune"] = finetune(cfg, folder, test, classes)
    if out is not None:
        write_report(report, Path(out), log)
    return report


# --------------------------------------------------------------------------- report

def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def render_table(report: dict) -> str:
    """The report as a plain-text table: protocol, measure, value, chance."""
    m = report["model"]
    lines = [f"checkpoint {report['checkpoint']} ({m['arch']}, width {m['width']}, epoch {report['epoch']})"]
    if "videos" in report:
        split = {name: f"{name} {n} videos" for name, n in report["videos"].items()}
        for name, s in report.get("skipped", {}).items():
            if s["samples"] or s["shards"]:
                shards = f", {s['shards']} shards broken" if s["shards"] else ""
                split[name] += f" ({s['samples']} skipped as damaged or unreadable{shards}; see the warnings)"
        lines.append(f"{split['train']}, {split['test']}, {len(report['classes'])} classes, {report['clips']} clips "
                     f"of {report['frames']}x{report['size']}x{report['size']} per video")
    rows = [("protocol", "measure", "value", "chance")]
    p = report["protocols"]
    if "linear" in p:
        rows.append(("linear", f"top-1, test (l2 {p['linear']['l2']:g})", _pct(p["linear"]["top1"]),
                     _pct(p["linear"]["chance"])))
    if "knn" in p:
        k = p["knn"]
        rows.append(("knn", f"top-1, k={k['k']} t={k['t']:g}", _pct(k["top1"]), _pct(k["chance"])))
        rows += [("knn", f"retrieval {r}", _pct(v), "") for r, v in k["recall"].items()]
        rows.append(("knn", "top-1, centred features", _pct(k["centred"]["top1"]), _pct(k["chance"])))
        rows += [("knn", f"retrieval {r}, centred", _pct(v), "") for r, v in k["centred"]["recall"].items()]
    if "scene" in p:
        s = p["scene"]
        if "skipped" in s:
            rows.append(("scene", "skipped", s["skipped"], ""))
        else:
            for what in ("scene", "motion"):
                probe = s["train_probe"][what]
                rows.append(("scene", f"{what} probe, train 2-fold", _pct(probe["accuracy"]), _pct(probe["chance"])))
            rows.append(("scene", "swap test, unseen scenes", _pct(s["swap"]), "50.0%"))
            rows.append(("scene", "NN same motion, unseen scenes", _pct(s["nn_same_motion"]), ""))
            rows.append(("scene", "NN same scene, unseen scenes", _pct(s["nn_same_scene"]), ""))
    if "finetune" in p:
        ft = p["finetune"]
        rows.append(("finetune", f"top-1, test ({ft['epochs']} epochs)", _pct(ft["top1"]), _pct(ft["chance"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
              for r in rows]
    return "\n".join(lines)


def write_report(report: dict, out: Path, log=print) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    table = render_table(report)
    (out / "report.txt").write_text(table + "\n")
    plots = plot_report(report, out)
    log(table)
    log(f"eval: {', '.join(str(p) for p in (out / 'report.json', out / 'report.txt', *plots))}")


def plot_report(report: dict, out: Path) -> list[Path]:
    """Per-class accuracy, retrieval recall@K and the scene probe as PNGs, those the report has data for."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    p, written = report["protocols"], []
    per_class = {name: p[name]["per_class"] for name in ("linear", "knn", "finetune") if name in p}
    if per_class:
        classes = report["classes"]
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(classes) * len(per_class)), 4))
        width = 0.8 / len(per_class)
        for i, (name, acc) in enumerate(per_class.items()):
            ax.bar([c + i * width for c in range(len(classes))], [acc.get(c, 0) for c in classes], width, label=name)
        ax.axhline(1 / len(classes), color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(classes))], classes, rotation=30, ha="right")
        ax.set(ylabel="test accuracy", ylim=(0, 1), title="per-class accuracy")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out / "per_class.png", plt))
    if "knn" in p:
        curve = p["knn"]["recall_curve"]
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot(range(1, len(curve) + 1), curve, marker="." if len(curve) < 60 else None)
        ax.set(xscale="log", xlabel="K (train videos retrieved)", ylabel="recall@K", ylim=(0, 1.02),
               title="retrieval, test queries vs train gallery")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out / "retrieval.png", plt))
    if "scene" in p and "skipped" not in p["scene"]:
        s = p["scene"]
        names = ["scene probe\n(train, 2-fold)", "motion probe\n(train, 2-fold)", "swap test\n(unseen scenes)"]
        values = [s["train_probe"]["scene"]["accuracy"], s["train_probe"]["motion"]["accuracy"], s["swap"] or 0]
        chance = [s["train_probe"]["scene"]["chance"], s["train_probe"]["motion"]["chance"], 0.5]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(range(3), values, color=["tab:orange", "tab:blue", "tab:green"])
        ax.scatter(range(3), chance, marker="_", s=900, color="black", label="chance")
        ax.set_xticks(range(3), names)
        ax.set(ylim=(0, 1), title="scene or motion?")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out / "scene.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dclr_dist.eval",
        description="Evaluate a pretrained DCLR backbone: linear probe, k-NN retrieval (R@K), the scene-bias "
                    "probe and fine-tuning (on Ray Train). Prints a table and writes report.json, report.txt "
                    "and plots.",
        epilog="protocols:\n"
               "  linear    logistic regression on frozen features of the train split, top-1 on test\n"
               "  knn       test queries vs the train gallery: recall@K and weighted k-NN top-1\n"
               "  scene     scene vs motion probes on the train split and the scene-swap test on the\n"
               "            unseen-scene test split (records must carry meta.scene: synthetic corpus)\n"
               "  finetune  backbone + linear layer trained end to end on Ray Train (RAY_ADDRESS, or a\n"
               "            local cluster), train.workers workers; test with softmax averaged over clips\n"
               "  all       all four (scene only where the records carry scenes)\n\n"
               "The clip shape comes from the checkpoint's saved config; override with key=value, e.g.\n"
               "data.eval_clips=10 data.workers=4 eval.k=20 eval.finetune_epochs=10 train.workers=8.\n"
               "Features on the cluster's GPUs instead of this process: eval.workers=8 eval.gpus_per_worker=1.\n"
               "s3:// URLs use AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY / AWS_PROFILE.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="URL",
                        help="checkpoint folder of `python -m dclr_dist.train` (backbone.pt + meta.json), or "
                             "its run folder (uses best/); local or s3://")
    parser.add_argument("--train", required=True, action="append", metavar="SHARDS",
                        help="labelled train split: a packed folder, index.json or .tar URL (repeat for more)")
    parser.add_argument("--test", required=True, action="append", metavar="SHARDS",
                        help="labelled test split, likewise")
    parser.add_argument("--protocol", default="all", metavar="P[,P...]",
                        help=f"comma-separated, from {', '.join(PROTOCOLS)}, or all (default)")
    parser.add_argument("--out", metavar="DIR",
                        help="where the report goes (default: the checkpoint folder's eval/ if local, else ./eval)")
    parser.add_argument("--config", metavar="FILE.yaml", help="config to use instead of the checkpoint's")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    protocols = tuple(p.strip() for p in args.protocol.split(","))
    from dclr_dist.data import DataError

    try:
        folder = resolve_checkpoint(args.checkpoint)
        out = args.out or ("eval" if storage.is_s3(folder) else str(Path(folder) / "eval"))
        evaluate(folder, args.train, args.test, protocols, out=out, config=args.config, overrides=args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (EvalError, CheckpointError, DataError, storage.StorageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Ray pickles the functions of __main__ by value, with every global they reach (and
    # torch.backends.cudnn cannot be pickled); those of the importable module go by name.
    from dclr_dist.eval import main as _main

    sys.exit(_main())
