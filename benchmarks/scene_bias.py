"""The scene-bias result: does DCLR follow the motion where the baseline follows the scene?

    python benchmarks/scene_bias.py                      # 3 seeds, under 30 minutes on 2 cores
    python benchmarks/scene_bias.py --seeds 0 --epochs 4 # a quick look
    python benchmarks/scene_bias.py loss.tau=0.1 ...     # overrides for every method

On the synthetic scene-bias corpus (class = motion of a foreground object, background
scene drawn independently of the class, test scenes never seen in training), pretrain

- DCLR: configs/demo.yaml (the paper's loss: L_vv + static and dynamic terms + alignment,
  top-5 cross-video positives), and
- the baseline: the same config with loss.w_s=0 loss.w_d=0 loss.w_align=0 loss.topk=0, i.e.
  plain clip contrast (L_vv: two clips of one video as the only positive pair), the same
  code path, and
- DCLR joint BN: DCLR with the released code's single backbone pass over all views
  (model.per_view_bn=false), the ablation of batch norm per view type,

with the same budget, data and seeds (train.seed and data.seed), then evaluate the final
checkpoint of each with ``dclr_dist.eval`` on the test split (unseen scenes): linear probe
and k-NN on the motion labels, and the scene probe. A randomly initialised backbone of
each seed is evaluated too, as the floor. Prints the table (mean +- std over seeds) and
writes ``scene_bias.json`` and ``scene_bias.png`` under ``--out``.

Setting (the same for every method): the demo's recipe (tiny backbone, AdamW, batch norm
per view type) with one worker and batch 16, and
- horizontal flips off (views.flip_p=0): on this corpus a flip turns move_left into
  move_right, so with flips the contrastive task itself declares those classes identical;
- the four translations (move_right/left/up/down);
- queues of 128 keys, fewer than the 192 train videos: a queue longer than the corpus holds
  several keys of the query's own video, all counted as negatives.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dclr_dist.config import BASELINE, load_config  # noqa: E402
from dclr_dist.eval import evaluate  # noqa: E402
from dclr_dist.model import backbone  # noqa: E402
from dclr_dist.shard.pack import pack  # noqa: E402
from dclr_dist.shard.synth import write_corpus  # noqa: E402
from dclr_dist.train import DEMO_CONFIG, fit  # noqa: E402

# Method -> its overrides (None: an untrained backbone). "DCLR joint BN" is the released
# code's single backbone pass over RGB, static and dynamic views (model.per_view_bn=false).
METHODS = {"random init": None, "baseline": BASELINE, "DCLR": [], "DCLR joint BN": ["model.per_view_bn=false"]}
# Every method: the demo's network and clips, on this corpus, flips off (module docstring).
COMMON = ["views.flip_p=0", "loss.queue_size=128", "train.workers=1", "data.workers=1", "data.batch_size=16",
          "train.checkpoint_every=100",
          "train.keep_checkpoints=1", "eval.every=0", "data.eval_clips=5", "eval.k=10"]
PROTOCOLS = ("linear", "knn", "scene")
# (label, path into the report, chance key): the table's columns.
MEASURES = [
    ("linear top-1 (motion, unseen scenes)", ("linear", "top1")),
    ("k-NN top-1 (motion, unseen scenes)", ("knn", "top1")),
    ("R@1 (motion, unseen scenes)", ("knn", "recall", "R@1")),
    ("scene-swap test (unseen scenes)", ("scene", "swap")),
    ("scene probe (train scenes)", ("scene", "train_probe", "scene", "accuracy")),
    ("motion probe (train scenes)", ("scene", "train_probe", "motion", "accuracy")),
]


def corpus(root: Path, args) -> dict[str, str]:
    manifest = write_corpus(root / "videos", num_classes=args.classes, train_per_class=args.train_per_class,
                            test_per_class=args.test_per_class, train_scenes=args.train_scenes,
                            test_scenes=args.test_scenes, frames=48, size=64, workers=os.cpu_count() or 1,
                            progress=False)
    shard = load_config(None, ["shard.short_side=64", "shard.max_samples=64"]).shard
    out = {}
    for split in ("train", "test"):
        if not (root / split / "index.json").exists():
            pack(str(manifest), str(root / split), shard, split=split, workers=os.cpu_count() or 1, progress=False)
        out[split] = str(root / split)
    return out


def random_init(folder: Path, cfg, seed: int) -> str:
    """A checkpoint folder of an untrained backbone, as the trainer would write it."""
    torch.manual_seed(seed)
    f, _ = backbone(cfg.model.arch, cfg.model.width)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(f.state_dict(), folder / "backbone.pt")
    (folder / "meta.json").write_text(json.dumps({"world_size": 1, "epoch": 0, "config": cfg.to_dict(),
                                                  "model": {"arch": cfg.model.arch, "width": cfg.model.width,
                                                            "epoch": 0}}))
    return str(folder)


def dig(report: dict, path: tuple) -> float | None:
    node = report["protocols"]
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "scene_bias"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--train-per-class", type=int, default=48)
    parser.add_argument("--test-per-class", type=int, default=16)
    parser.add_argument("--train-scenes", type=int, default=12)
    parser.add_argument("--test-scenes", type=int, default=6)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD",
                        help=f"which to run, of {list(METHODS)} (default: all)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every method")
    args = parser.parse_args()
    out = Path(args.out)
    start = time.monotonic()
    shards = corpus(out / f"corpus-{args.classes}x{args.train_per_class}-{args.train_scenes}s", args)
    samples = args.classes * args.train_per_class

    import ray

    os.environ.setdefault("RAY_TMPDIR", "/tmp/ray-scene-bias")
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    methods = {m: METHODS[m] for m in args.methods}
    results: dict[str, list[dict]] = {m: [] for m in methods}
    tag = time.strftime("%Y%m%d-%H%M%S")
    for seed in args.seeds:
        for method, extra in methods.items():
            name = f"{method.replace(' ', '-')}-s{seed}-{tag}"
            cfg = load_config(DEMO_CONFIG, [*COMMON, f"train.epochs={args.epochs}", f"data.epoch_samples={samples}",
                                            f"data.train=[{shards['train']}]", f"data.eval=[{shards['test']}]",
                                            f"train.storage_path={out / 'runs'}", f"train.name={name}",
                                            f"train.seed={seed}", f"data.seed={seed}", *(extra or []),
                                            *args.overrides])
            t0 = time.monotonic()
            if extra is None:
                checkpoint = random_init(out / "runs" / name, cfg, seed)
            else:
                result = fit(cfg)
                if result.error:
                    print(f"error: {method} seed {seed}: {result.error}", file=sys.stderr)
                    return 1
                checkpoint = result.checkpoint.path
            report = evaluate(checkpoint, [shards["train"]], [shards["test"]], PROTOCOLS, log=lambda *a: None,
                              overrides=["data.workers=1"])
            row = {"seed": seed, "checkpoint": checkpoint, "seconds": round(time.monotonic() - t0, 1),
                   **{label: dig(report, path) for label, path in MEASURES}}
            if extra is not None:
                row["final_loss"] = result.metrics["loss"]
            results[method].append(row)
            print(f"{method:12s} seed {seed}: " + ", ".join(f"{label.split(' (')[0]} {100 * row[label]:.1f}"
                                                            for label, _ in MEASURES) + f" ({row['seconds']:.0f} s)",
                  flush=True)
    ray.shutdown()

    chance = {"motion": 1 / args.classes, "scene": 1 / args.train_scenes, "swap": 0.5}
    summary = {m: {label: (statistics.mean(r[label] for r in rows),
                           statistics.stdev(r[label] for r in rows) if len(rows) > 1 else 0.0)
                   for label, _ in MEASURES} for m, rows in results.items()}
    table = render(summary, args, chance)
    wall = time.monotonic() - start
    print(table)
    print(f"wall time {wall / 60:.1f} min")
    (out / "scene_bias.json").write_text(json.dumps({
        "args": vars(args), "common_overrides": COMMON, "baseline_overrides": BASELINE, "chance": chance,
        "summary": summary, "runs": results, "wall_s": round(wall, 1), "table": table}, indent=1))
    print(f"wrote {out / 'scene_bias.json'}")
    print(f"wrote {plot(results, chance, out / 'scene_bias.png')}")
    return 0


def render(summary: dict, args, chance: dict) -> str:
    seeds = len(args.seeds)
    head = [f"measure, % (mean +- std over {seeds} seeds)", *summary, "chance"]
    rows = [head]
    for label, path in MEASURES:
        c = chance["swap"] if "swap" in label else chance["scene"] if label.startswith("scene probe") else chance["motion"]
        rows.append([label, *(f"{100 * m:.1f} +- {100 * s:.1f}" for m, s in (summary[k][label] for k in summary)),
                     f"{100 * c:.1f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: dict, chance: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _ in MEASURES]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(results)
    for i, (method, rows) in enumerate(results.items()):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(labels))]
        values = [[100 * r[label] for r in rows] for label in labels]
        ax.bar(xs, [statistics.mean(v) for v in values], width,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values], capsize=3, label=method)
        for x, v in zip(xs, values):
            ax.scatter([x] * len(v), v, color="black", s=8, zorder=3)
    for j, label in enumerate(labels):
        c = chance["swap"] if "swap" in label else chance["scene"] if label.startswith("scene probe") else chance["motion"]
        ax.plot([j - 0.45, j + 0.45], [100 * c] * 2, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(labels)), [label.replace(" (", "\n(") for label in labels], fontsize=8)
    ax.set(ylabel="%", ylim=(0, 100), title="scene-bias corpus: motion (unseen scenes) vs scene; dashed: chance")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
