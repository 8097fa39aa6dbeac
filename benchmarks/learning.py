"""Does it learn? A fast single-process loop for what-if questions about the recipe.

    python benchmarks/learning.py                                   # the demo's recipe, 300 steps
    python benchmarks/learning.py optim.name=sgd optim.lr=0.05  # the first demo's lr: collapse
    python benchmarks/learning.py model.per_view_bn=false            # the released code's joint BN
    python benchmarks/learning.py --baseline                         # plain clip contrast
    python benchmarks/learning.py --supervised views.jitter_p=0      # can the network learn the motion at all?

The real views, model and loss (dclr_dist.views, .model, .loss) on the demo's synthetic
corpus (``shards/demo/videos``, written by ``python -m dclr_dist.demo`` on first use),
decoded once into memory, so a step costs only the views and the network: no Ray, no
DeepSpeed, no decoding per step. Every 25 steps it prints each loss term's mean; every
``--eval-every`` steps the k-NN (k=10) and linear-probe accuracy of the query backbone on
the motion labels of the test split (unseen scenes), from 3 clips per video.

The config is dclr_dist/configs/demo.yaml with the overrides given. The batch is the demo's global
batch (data.batch_size x cluster.workers); the lr is optim.lr scaled to it as the trainer
does, held constant (no warm-up or schedule). The figures in the README's "Does DCLR
follow the motion?" came from this script.
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import asdict
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from scene_bias import train_views  # this folder is on sys.path when run as a script

from dclr_dist import views
from dclr_dist.config import BASELINE, load_config
from dclr_dist.demo import DEMO_CONFIG, ensure_demo_shards
from dclr_dist.engine import make_optimizer, scaled_lr
from dclr_dist.evaluation.probes import knn_predict, logistic_regression
from dclr_dist.loss import DCLRLoss
from dclr_dist.model import DCLR, gap

REPO = Path(__file__).resolve().parents[1]


def load(root: Path, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every video of ``split``, resized to size x size: (N, L, H, W, 3) uint8, labels (N,), class names."""
    rows = [r for r in csv.DictReader(open(root / "manifest.csv")) if r["split"] == split]
    classes = sorted({r["label"] for r in rows})
    videos = []
    for r in rows:
        with av.open(str(root / r["path"])) as container:
            videos.append(
                np.stack([f.to_ndarray(format="rgb24", width=size, height=size) for f in container.decode(video=0)])
            )
    return torch.from_numpy(np.stack(videos)), torch.tensor([classes.index(r["label"]) for r in rows]), classes


@torch.no_grad()
def features(f: torch.nn.Module, videos: torch.Tensor, cfg, clips: int = 3) -> torch.Tensor:
    """L2-normalised clip-averaged GAP features, (N, C), with batch norm in eval mode."""
    f.eval()
    L, T, stride = videos.shape[1], cfg.frames, cfg.stride
    out = []
    for start in np.linspace(0, L - (T - 1) * stride - 1, clips).round().astype(int):
        x = views.normalize(
            videos[:, start : start + (T - 1) * stride + 1 : stride].permute(0, 4, 1, 2, 3).float() / 255, cfg
        )
        out.append(torch.cat([gap(f(chunk)) for chunk in x.split(32)]))
    f.train()
    return F.normalize(torch.stack(out).mean(0), dim=1)


def accuracy(f: torch.nn.Module, train, test, cfg) -> tuple[float, float]:
    """(k-NN, linear probe) top-1 on the test split's motion labels."""
    a, b = features(f, train[0], cfg), features(f, test[0], cfg)
    knn = knn_predict(a, train[1], b, len(train[2]), 10, 0.07)
    linear = logistic_regression(a, train[1], len(train[2]), 1e-3)(b)
    return (knn == test[1]).double().mean().item(), (linear == test[1]).double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", action="store_true", help="plain clip contrast: " + " ".join(BASELINE))
    parser.add_argument(
        "--supervised",
        action="store_true",
        help="train the backbone and a linear classifier on the motion labels instead (RGB clips)",
    )
    parser.add_argument(
        "--corpus",
        default=str(REPO / "shards" / "demo" / "videos"),
        help="a synthetic corpus folder (manifest.csv); default: the demo's",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides on dclr_dist/configs/demo.yaml"
    )
    args = parser.parse_args()
    cfg = load_config(DEMO_CONFIG, [*(BASELINE if args.baseline else []), *args.overrides])
    root = Path(args.corpus)
    if not (root / "manifest.csv").exists() and root == REPO / "shards" / "demo" / "videos":
        ensure_demo_shards(cfg, REPO / "shards" / "demo")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    v = cfg.views
    train, test = load(root, "train", v.size), load(root, "test", v.size)
    print(
        f"{len(train[0])} train, {len(test[0])} test videos, {len(train[2])} classes (chance {1 / len(train[2]):.3f})",
        flush=True,
    )
    # Built from the config as the trainer builds them.
    model = DCLR.from_config(cfg.model, in_batch=cfg.loss.in_batch)
    criterion = DCLRLoss(dim=cfg.model.dim, **asdict(cfg.loss))
    f = model.encoder_q.f
    head = torch.nn.Linear(model.encoder_q.g["vv"][0].in_features, len(train[2]))
    params = (
        [*f.parameters(), *head.parameters()] if args.supervised else [p for p in model.parameters() if p.requires_grad]
    )
    batch_size = cfg.data.batch_size * cfg.cluster.workers
    lr = scaled_lr(cfg.optim.lr, batch_size, cfg.optim.ref_batch)
    opt = make_optimizer(params, cfg, lr)
    print(
        f"{'supervised' if args.supervised else 'baseline' if args.baseline else 'DCLR'}: batch {batch_size}, "
        f"{cfg.optim.name} lr {lr:g}, per_view_bn {cfg.model.per_view_bn}",
        flush=True,
    )

    start, sums = time.perf_counter(), {}
    for step in range(1, args.steps + 1):
        idx = rng.choice(len(train[0]), batch_size, replace=False)
        batch = train_views(train[0], idx, v, rng)
        if args.supervised:
            terms = {"loss": F.cross_entropy(head(gap(f(batch["q"]))), train[1][idx])}
        else:
            terms = criterion(model(batch))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        if not args.supervised:
            model.momentum_update()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.item()
        if step % 25 == 0:
            print(
                f"step {step:4d} "
                + " ".join(f"{n} {s / 25:.3f}" for n, s in sums.items())
                + f"  ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
            sums = {}
        if step % args.eval_every == 0 or step == args.steps:
            knn, linear = accuracy(f, train, test, v)
            print(f"step {step:4d} test (unseen scenes): k-NN {knn:.3f}, linear {linear:.3f}", flush=True)


if __name__ == "__main__":
    main()
