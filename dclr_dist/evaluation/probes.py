"""The protocols on frozen features (Ding, Qian, Xiong, arXiv 2207.05340, evaluation section;
docs/design.md, section 7), on the Features of ``dclr_dist.evaluation.features``.

- ``linear``: a linear classifier on frozen features. Multinomial logistic regression on
  the standardised video features of the train split, full-batch L-BFGS with an L2
  penalty (``eval.l2``, or chosen by 3-fold cross-validation on the train split when
  null): deterministic and seconds long, where the paper's SGD probe with augmentation
  costs epochs of backbone forwards. Top-1 and per-class accuracy on the test split, and
  its confusion matrix.
- ``knn``: retrieval, test queries against the train gallery by cosine similarity:
  recall@K (a query counts when one of its K nearest train videos has its class; paper:
  R@1/5/10/20/50) and the accuracy of a k-NN classifier whose k nearest neighbours vote
  with weights exp(cos / t) (Wu et al. 2018; ``eval.knn_k``, ``eval.knn_temperature``). Also on centred
  features (the train gallery's mean subtracted, then L2-normalised): GAP features of ReLU
  maps share a large common component that dominates raw cosines. k-NN and retrieval
  compare ``eval.chunk`` queries at a time with the gallery (top-k, never a full sort), on
  the GPU where there is one.
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

Also ``knn_monitor``, the k-NN accuracy that pretraining tracks (``eval.every``).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from dclr_dist.config import Config
from dclr_dist.evaluation import EvalError
from dclr_dist.evaluation.features import Features, extract, progress_bar


def logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float):
    """A multinomial logistic regression fitted by full-batch L-BFGS; returns predict(x) -> (N,) labels.

    Features are standardised with the training statistics (L2-normalised features have
    tiny per-dimension variance, which would make the L2 penalty meaningless).
    """
    z, mu, sd = _standardise(x)
    W, b = _fit(z, y.to(z.device), num_classes, l2)
    return lambda q: (((q.to(z.device, torch.float64) - mu) / sd) @ W + b).argmax(1).to(y.device)


def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.to(_probe_device(), torch.float64)
    mu, sd = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    return (x - mu) / sd, mu, sd


def _probe_device() -> torch.device:
    # The fits are full-batch matrix products: on a GPU when there is one.
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _fit(
    z: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, init: tuple | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising cross-entropy + l2/2 |W|^2 on standardised z, from ``init`` or zeros."""
    W0, b0 = init or (torch.zeros(z.shape[1], num_classes, dtype=z.dtype, device=z.device), None)
    W = W0.clone().requires_grad_(True)
    b = (torch.zeros(num_classes, dtype=z.dtype, device=z.device) if b0 is None else b0.clone()).requires_grad_(True)
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1,
        max_iter=500,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ W + b, y) + 0.5 * l2 * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


def accuracy(pred: torch.Tensor, y: torch.Tensor, classes: list[str]) -> dict:
    K = len(classes)
    confusion = torch.zeros(K, K, dtype=torch.long)
    confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    per_class = {
        c: (confusion[i, i] / confusion[i].sum()).item() for i, c in enumerate(classes) if confusion[i].sum() > 0
    }
    return {"top1": (pred == y).double().mean().item(), "per_class": per_class, "confusion": confusion.tolist()}


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def choose_l2(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, folds: int = 3, progress: str | None = None
) -> tuple[float, dict]:
    """The L2 penalty of L2_GRID with the best k-fold accuracy on (x, y), the train split; and each one's.

    Each fold walks the grid from the strongest penalty down, each fit starting from the
    previous one's solution (the problem is convex: the same optimum, in a fraction of the
    iterations); the folds run in parallel threads of one BLAS thread each (small matrix
    products scale badly with threads, worst on busy cores); on a GPU when there is one.
    """
    from concurrent.futures import ThreadPoolExecutor

    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    held = [order[i::folds] for i in range(folds)]
    grid = sorted(L2_GRID, reverse=True)
    correct = {l2: 0 for l2 in grid}
    threads = torch.get_num_threads()

    def fold(idx: torch.Tensor, bar) -> dict:
        fit = torch.ones(len(y), dtype=torch.bool)
        fit[idx] = False
        z, mu, sd = _standardise(x[fit])
        zq = (x[idx].to(z.device, torch.float64) - mu) / sd
        yf, yq = y[fit].to(z.device), y[idx].to(z.device)
        got, params = {}, None
        for l2 in grid:
            params = _fit(z, yf, num_classes, l2, params)
            got[l2] = int(((zq @ params[0] + params[1]).argmax(1) == yq).sum())
            bar.update()
        return got

    with progress_bar(progress, total=len(grid) * folds, unit="fit") as bar:
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(min(folds, os.cpu_count() or 1)) as pool:
                for got in pool.map(lambda idx: fold(idx, bar), held):
                    for l2, n in got.items():
                        correct[l2] += n
        finally:
            torch.set_num_threads(threads)
    scores = {l2: correct[l2] / len(y) for l2 in L2_GRID}
    return max(L2_GRID, key=lambda l2: (scores[l2], l2)), scores  # ties: the stronger penalty


def linear_probe(train: Features, test: Features, classes: list[str], l2: float) -> dict:
    predict = logistic_regression(train.x, train.label, len(classes), l2)
    return {**accuracy(predict(test.x), test.label, classes), "chance": 1 / len(classes), "l2": l2}


def nearest(
    gallery_x: torch.Tensor,
    query_x: torch.Tensor,
    n: int,
    chunk: int = 512,
    leave_one_out: bool = False,
    progress: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
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
    for start in progress_bar(progress, iterable=range(0, query_x.shape[0], chunk), unit="chunk"):
        sim = query_x[start : start + chunk] @ gallery_x.T  # (c, G)
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


def knn_predict(
    gallery_x: torch.Tensor,
    gallery_y: torch.Tensor,
    query_x: torch.Tensor,
    num_classes: int,
    k: int,
    t: float,
    leave_one_out: bool = False,
    chunk: int = 512,
) -> torch.Tensor:
    """k-NN classifier on L2-normalised features: votes exp(cos / t) of the k nearest (Wu et al. 2018).

    leave_one_out: queries are the gallery itself, and none votes for itself.
    """
    top, idx = nearest(gallery_x, query_x, k, chunk, leave_one_out)
    return _vote(top, gallery_y.to(idx.device)[idx], num_classes, t)


def knn_retrieval(
    train: Features,
    test: Features,
    classes: list[str],
    k: int,
    t: float,
    recall_at: list[int],
    chunk: int = 512,
    progress: bool = False,
) -> dict:
    """Test queries against the train gallery: recall@K and the k-NN classifier's accuracy, on the
    features and on centred features (``centred``); computed on the features' device."""
    mean = train.x.mean(0)
    gallery_y, query_y = train.label.to(train.x.device), test.label.to(train.x.device)
    out = {}
    for name, gallery, queries in (
        ("raw", train.x, test.x),
        ("centred", F.normalize(train.x - mean, dim=1), F.normalize(test.x - mean, dim=1)),
    ):
        # enough neighbours for the vote, every recall@K and the plotted curve's first 100
        top, idx = nearest(
            gallery, queries, max(k, 100, *recall_at), chunk, progress=f"k-NN, {name} features" if progress else None
        )
        hits = gallery_y[idx] == query_y[:, None]  # (Q, n)
        recall = {f"R@{r}": hits[:, :r].any(1).double().mean().item() for r in recall_at if r <= len(train.keys)}
        pred = _vote(top[:, :k], gallery_y[idx[:, :k]], len(classes), t)
        curve = hits.int().cummax(1).values.double().mean(0)  # recall@1, @2, ... (plot)
        out[name] = {"recall": recall, "recall_curve": curve.tolist(), **accuracy(pred, test.label, classes)}
    return {
        **out["raw"],
        "centred": {n: out["centred"][n] for n in ("top1", "recall")},
        "k": min(k, len(train.keys)),
        "t": t,
        "chance": 1 / len(classes),
    }


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
    pred = knn_predict(
        x,
        feats.label,
        x,
        num_classes,
        cfg.eval.knn_k,
        cfg.eval.knn_temperature,
        leave_one_out=True,
        chunk=cfg.eval.chunk,
    )
    return (pred == feats.label).double().mean().item()


def scene_probe(train: Features, test: Features, classes: list[str], l2: float) -> dict:
    """Motion against scene (module docstring): probes on the train split, scene-swap on the test split."""
    train_scenes, test_scenes = train.scenes, test.scenes
    if train_scenes is None or test_scenes is None:
        raise EvalError(
            "the scene probe needs a scene for every video (meta.scene in the records) and these "
            "shards have none: pack the synthetic scene-bias corpus (`python -m dclr_dist.shard "
            "synth`), or a manifest with a scene column"
        )
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
        "scenes": {"train": len(names), "test": len(set(test_scenes)), "shared": len(set(names) & set(test_scenes))},
    }
