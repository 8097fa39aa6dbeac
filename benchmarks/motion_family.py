"""Does DCLR's advantage hold on motion it was not tuned on? The motion family, through the trainer.

    python benchmarks/motion_family.py                              # every variant, seeds 0 1 2
    python benchmarks/motion_family.py --variants hard --seeds 0 1  # a part (runs resume)
    python benchmarks/motion_family.py --report                     # table and plot of what has finished
    python benchmarks/motion_family.py loss.tau=0.2 --val-only --methods DCLR --seeds 0 1
                                      # a variant of a method, val split only (overrides go first)

Corpora: the variants of ``dclr_dist.shard.family`` (translations; orbits and zooms; small fast
wrapping objects and oscillations; busy textures with 4 training scenes; camera pan and zoom
with wandering distractors; crops of real photographs under a panning camera), written by
``python -m dclr_dist.shard synth --variant`` and packed by the packer into train, val and test
shards, each split in scenes of its own.

Training: the trainer's own code on those shards, one worker: ``dclr_dist.engine.build`` (the
DeepSpeed engine on gloo), ``dclr_dist.data.train_loader`` (the shard reader, shuffle buffer
and views) and ``dclr_dist.train.run_epoch`` (the step ``train_loop`` runs), in one process per
run, one thread each, ``--jobs`` at a time. Only Ray's reporting and checkpoints are left out.
The recipe is the demo's (tiny 3D CNN, AdamW) at ``--size`` pixels with the shortcuts closed
for every method: own-video keys masked out of the queue (``dclr_dist.loss``), batch norm
groups of sqrt(batch) videos so a query's and its key's statistics share no other video,
the static view on its clip's crop.

Methods (the same seeds: initial weights, data order, augmentation): random init; the
input-level ceiling (the untrained backbone on frame differences, DCLR's dynamic view: what
needs no learning); the baseline (L_vv, no cross-video positives); DCLR; DCLR with
``loss.topk=0`` (the dual terms without cross-video positives); the baseline plus the
dynamic terms L_v<->d.

Evaluation: the final weights (no checkpoint selection), ``data.eval_clips`` clips per video,
``dclr_dist.evaluation``'s features and protocols: linear probe (L2 by 3-fold cross-validation
on the train split) and k-NN, on the val split and on the test split. Recipe decisions use the
val columns only. Each result row records the commit and every override; ``results.jsonl``
under ``--out`` is appended as each run ends, so an interrupted benchmark resumes. A
``--val-only`` run keeps its final backbone under ``--out``/weights: once its recipe is
chosen, the same run with the test split measures those weights instead of training them
again (only if they were trained with the same overrides on the same committed
``dclr_dist``, and only if they still read their val figures exactly).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import torch

from dclr_dist.config import BASELINE

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out" / "motion_family"

BATCH = 16
# Every method: the demo recipe on one worker, shortcuts closed (module docstring).
COMMON = [
    "cluster.workers=1",
    f"data.batch_size={BATCH}",
    "data.loader_workers=0",
    "data.shuffle_buffer=64",
    "data.shuffle_initial=16",
    "data.eval_clips=5",
    "model.bn_groups=4",
    "model.bn_sync=worker",
    "loss.queue_size=128",
    "views.flip_p=0",
    "views.scale=[0.5,1.0]",
    "views.static_crop=clip",
    "train.log_every=1000000",
    "eval.every=0",
]
# Method -> overrides; None: not trained (the untrained backbone on RGB or on frame differences).
METHODS = {
    "random init": None,
    "frame-difference ceiling": None,
    "baseline": list(BASELINE),
    "DCLR": [],
    "DCLR, topk=0": ["loss.topk=0"],
    "baseline + L_v<->d": [o for o in BASELINE if o != "loss.w_d=0"],
}
MEASURES = [("linear", "linear probe"), ("knn", "k-NN")]
# Corpus size per class and split, and clip geometry: chosen for the default run's time
# (README, "Motion it was not tuned on").
PER_CLASS = {"train": 32, "val": 12, "test": 24}
FRAMES = 32
STEPS = 480


def corpus(out: Path, variant: str, size: int) -> dict[str, str]:
    """The variant's videos and their train/val/test shards under ``out``, made on first use."""
    from dclr_dist.config import load_config
    from dclr_dist.shard.family import variant as get_variant
    from dclr_dist.shard.pack import pack
    from dclr_dist.shard.synth import write_corpus

    root = out / "corpora" / f"{variant}-{size}px"
    shards = {split: str(root / split) for split in ("train", "val", "test")}
    if all((Path(s) / "index.json").exists() for s in shards.values()):
        return shards
    train_scenes, val_scenes, test_scenes = get_variant(variant).scenes
    manifest = write_corpus(
        root / "videos",
        variant=variant,
        train_per_class=PER_CLASS["train"],
        val_per_class=PER_CLASS["val"],
        test_per_class=PER_CLASS["test"],
        train_scenes=train_scenes,
        val_scenes=val_scenes,
        test_scenes=test_scenes,
        frames=FRAMES,
        size=size,
        workers=os.cpu_count() or 1,
        progress=False,
    )
    # Packed at the corpus's own size (the packer's default upscales to 128 px).
    cfg = load_config(None, [f"shard.short_side={size}", "shard.max_samples=64"])
    for split, dest in shards.items():
        pack(str(manifest), dest, cfg.shard, split=split, workers=os.cpu_count() or 1, progress=False)
    return shards


def overrides(method: str, variant: str, seed: int, steps: int, size: int, shards: dict, extra: list[str]) -> list:
    """The full override list of one run (recorded in its row)."""
    per_epoch = PER_CLASS["train"] * len(_motions(variant)) // BATCH
    return [
        *COMMON,
        f"views.size={size}",
        f"data.train=[{shards['train']}]",
        f"data.eval=[{shards['val']}]",
        f"data.epoch_samples={per_epoch * BATCH}",
        f"train.epochs={-(-steps // per_epoch)}",
        f"train.seed={seed}",
        f"data.seed={seed}",
        *(METHODS[method] or []),
        *extra,
    ]


def _motions(variant: str) -> tuple[str, ...]:
    from dclr_dist.shard.family import variant as get_variant

    return get_variant(variant).motions


def _process_group() -> None:
    """A gloo group of one: what the DeepSpeed engine is built on."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"})
    os.environ["LOCAL_RANK"] = "0"
    dist.init_process_group("gloo", rank=0, world_size=1)


class FrameDifference(torch.nn.Module):
    """An untrained backbone on frame differences (the input-level ceiling)."""

    def __init__(self, f: torch.nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x[:, :, 1:] - x[:, :, :-1])


def train_and_measure(spec: tuple) -> dict:
    """One (variant, method, seed): train with the trainer's steps, measure; in a worker process."""
    from dclr_dist import data
    from dclr_dist.config import load_config
    from dclr_dist.demo import DEMO_CONFIG
    from dclr_dist.engine import build
    from dclr_dist.metrics import EpochMeter
    from dclr_dist.model import DCLR
    from dclr_dist.train import Rank, run_epoch

    variant, method, seed, steps, size, shards, extra, splits, out = spec
    torch.set_num_threads(1)
    args = overrides(method, variant, seed, steps, size, shards, extra)
    cfg = load_config(DEMO_CONFIG, args)
    t0 = time.monotonic()
    torch.manual_seed(cfg.train.seed)
    row = {"variant": variant, "method": _label(method, extra, steps), "seed": seed, "size": size, "commit": _commit()}
    row["overrides"] = args
    if METHODS[method] is None:
        f = DCLR.from_config(cfg.model, in_batch=False).encoder_q.f
        if method == "frame-difference ceiling":
            f = FrameDifference(f)
        return {**row, **measure(f, cfg, shards, splits), "seconds": round(time.monotonic() - t0, 1)}
    weights = _weights_path(out, row["method"], variant, size, seed)
    saved = _reusable(weights, args) if "test" in splits else None
    if saved is not None:
        f = DCLR.from_config(cfg.model, in_batch=cfg.loss.in_batch).encoder_q.f
        f.load_state_dict(saved["state_dict"])
        figures = measure(f, cfg, shards, splits)
        trained = saved["row"]
        # The same weights must read what they read when they were trained.
        if any(figures[k] != trained[k] for k in ("val_linear", "val_knn")):
            raise RuntimeError(f"{weights}: the saved weights no longer give their val figures; delete the file")
        seconds = round(trained["seconds"] + time.monotonic() - t0, 1)
        return {**trained, **figures, "seconds": seconds, "weights": "saved by its val-only run"}
    _process_group()
    device = torch.device("cpu")
    batches = data.batches_per_epoch(cfg.data, data.resolve_shards(cfg.data.train), 1)
    engine, criterion = build(cfg, 1, batches, device)
    r = Rank(cfg, "", 0, 1, device, engine, criterion)
    it = iter(data.train_loader(cfg.data, cfg.views, epochs=cfg.train.epochs))
    step, losses = 0, []
    for epoch in range(cfg.train.epochs):
        meter = EpochMeter()
        step = run_epoch(r, it, batches, epoch, step, meter)
        losses.append(meter.epoch(batches, device, {})[0]["loss"])
    f = engine.module.encoder_q.f
    row = {
        **row,
        "steps": step,
        "final_loss": losses[-1],
        **measure(f, cfg, shards, splits),
        "seconds": round(time.monotonic() - t0, 1),
    }
    if splits == ("val",):
        weights.parent.mkdir(parents=True, exist_ok=True)
        tmp = weights.with_suffix(".tmp")
        torch.save({"state_dict": f.state_dict(), "row": row, "tree": _tree()}, tmp)
        tmp.replace(weights)
    return row


def _weights_path(out: Path, label: str, variant: str, size: int, seed: int) -> Path:
    """Where a val-only run keeps its final backbone, so that once its recipe is chosen the test
    split is measured on the same weights instead of training them again."""
    name = "".join(c if c.isalnum() or c in ".-" else "_" for c in label)
    return out / "weights" / f"{variant}-{size}px" / f"{name}-seed{seed}.pt"


def _reusable(path: Path, args: list[str]) -> dict | None:
    """The saved weights at ``path`` if they were trained with exactly ``args`` on the
    ``dclr_dist`` this process runs (same tree, nothing uncommitted), else None."""
    if not path.exists():
        return None
    saved = torch.load(path, weights_only=True)
    return saved if saved["row"]["overrides"] == args and saved["tree"] == _tree() != "" else None


def _tree() -> str:
    """The git tree of the ``dclr_dist`` this process imported; "" when it has uncommitted changes."""
    return "" if _git("status", "--porcelain", "--", "dclr_dist") else _git("rev-parse", "HEAD:dclr_dist")


def measure(f, cfg, shards: dict, splits: tuple[str, ...]) -> dict:
    """Linear probe and k-NN of the frozen backbone on the held-out ``splits`` (val, test)."""
    from dclr_dist.evaluation.features import extract
    from dclr_dist.evaluation.probes import choose_l2, knn_retrieval, linear_probe

    device = torch.device("cpu")
    train = extract(f, cfg.data, cfg.views, [shards["train"]], device)
    classes = [str(c) for c in range(int(train.label.max()) + 1)]
    l2, _ = choose_l2(train.x, train.label, len(classes))
    out = {"l2": l2}
    for split in splits:
        held = extract(f, cfg.data, cfg.views, [shards[split]], device)
        out[f"{split}_linear"] = linear_probe(train, held, classes, l2)["top1"]
        out[f"{split}_knn"] = knn_retrieval(train, held, classes, cfg.eval.knn_k, cfg.eval.knn_temperature, [1])["top1"]
    return out


def _label(method: str, extra: list[str], steps: int) -> str:
    """A method's name in rows and tables: with the run's extra overrides and a step count other
    than the default, a method of its own."""
    return " ".join([method, *extra, *([f"--steps {steps}"] if steps != STEPS else [])])


def _dclr_dist_root() -> Path:
    """The checkout of the ``dclr_dist`` this process imported, which an editable install may
    have taken from another checkout than the one this file is in."""
    import dclr_dist

    return Path(dclr_dist.__file__).resolve().parents[1]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=_dclr_dist_root(), capture_output=True, text=True).stdout.strip()


def _commit() -> str:
    """The commit of the ``dclr_dist`` this process imported."""
    dirty = _git("status", "--porcelain", "--", "dclr_dist")
    commit = _git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    root = _dclr_dist_root()
    return commit if root == REPO else f"{commit} ({root})"


def main() -> int:
    from dclr_dist.shard.family import VARIANTS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD")
    parser.add_argument(
        "--steps", type=int, default=STEPS, help=f"optimizer steps of 16 clips per run (default {STEPS})"
    )
    parser.add_argument("--size", type=int, default=48, help="frame side of the corpus and the crops (default 48)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each (default 2)")
    parser.add_argument("--out", default=str(OUT), help=f"results, corpora and plot (default {OUT})")
    parser.add_argument("--report", action="store_true", help="only write the table and plot of finished runs")
    parser.add_argument(
        "--val-only",
        action="store_true",
        help="measure the val split only (test not even extracted): for choosing a recipe before any test figure",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides for every method; rows and tables name them after the method",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "results.jsonl"
    if not args.report:
        splits = ("val",) if args.val_only else ("val", "test")
        done = {(r["variant"], r["method"], r["seed"], r["size"]) for r in _read(log) if f"{splits[-1]}_knn" in r}
        shards = {variant: corpus(out, variant, args.size) for variant in args.variants}
        # Seed by seed across the variants, so that a benchmark stopped early has a whole table.
        specs = [
            (variant, m, s, args.steps, args.size, shards[variant], args.overrides, splits, out)
            for s in args.seeds
            for variant in args.variants
            for m in args.methods
            if (variant, _label(m, args.overrides, args.steps), s, args.size) not in done
        ]
        print(f"{len(specs)} runs to do, {args.jobs} at a time; results in {log}", flush=True)
        t0 = time.monotonic()
        with get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
            for i, r in enumerate(pool.imap_unordered(train_and_measure, specs), 1):
                with open(log, "a") as fh:
                    fh.write(json.dumps(r) + "\n")
                left = (time.monotonic() - t0) / i * (len(specs) - i)
                figures = "; ".join(
                    f"{s} linear {100 * r[f'{s}_linear']:.1f} k-NN {100 * r[f'{s}_knn']:.1f}" for s in splits
                )
                print(
                    f"[{i}/{len(specs)}, ~{left / 60:.0f} min left] {r['variant']:18s} {r['method']:26s} "
                    f"seed {r['seed']}: {figures} ({r['seconds']:.0f} s)",
                    flush=True,
                )
    report(_read(log), out, ("val",) if args.val_only else ("val", "test"))
    return 0


def _read(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def report(rows: list[dict], out: Path, splits: tuple[str, ...] = ("val", "test")) -> None:
    """Per variant: every method's mean +- std over seeds, and each trained method minus the
    baseline trained for as many steps, seed by seed, on the last of ``splits``. Val-only: rows
    with val figures, no plot."""
    from dclr_dist.shard.family import VARIANTS

    rows = [r for r in rows if f"{splits[-1]}_knn" in r]
    if not rows:
        print("no finished runs")
        return
    methods = list(METHODS) + sorted({r["method"] for r in rows} - set(METHODS))
    cols = [(s, k, f"{s} {m}") for s in splits for k, m in MEASURES]
    lines, md = [], []
    for size in sorted({r["size"] for r in rows}):
        for variant in [v for v in VARIANTS if any(r["variant"] == v and r["size"] == size for r in rows)]:
            runs = [r for r in rows if r["variant"] == variant and r["size"] == size]
            chance = 100 / len(VARIANTS[variant].motions)
            lines += [f"{variant} ({size} px, chance {chance:.1f}%): {VARIANTS[variant].note}"]
            lines += [f"  {'method':26s} | " + " | ".join(f"{c:17s}" for *_, c in cols)]
            md += [
                f"**{variant}** ({size} px, chance {chance:.1f}%): {VARIANTS[variant].note}",
                "",
                "| method | " + " | ".join(c for *_, c in cols) + " |",
                "|---|" + "---:|" * len(cols),
            ]
            for method in methods:
                mine = [r for r in runs if r["method"] == method]
                if mine:
                    cells = [_cell([100 * r[f"{s}_{k}"] for r in mine]) for s, k, _ in cols]
                    lines.append(f"  {method:26s} | " + " | ".join(f"{c:>17s}" for c in cells))
                    md.append(f"| {method} | " + " | ".join(cells) + " |")
            paired = [
                p
                for m in methods
                if METHODS.get(m, []) is not None and m != _same_budget_baseline(m)
                for p in _paired(runs, m, _same_budget_baseline(m), splits[-1])
            ]
            lines += paired + [""]
            md += [""] + [f"- {p.strip()}" for p in paired] + [""]
    table = "\n".join(lines)
    print(table)
    name = "motion_family" if "test" in splits else "motion_family_val"
    (out / f"{name}.txt").write_text(table + "\n")
    (out / f"{name}.md").write_text("\n".join(md))
    written = [out / f"{name}.txt", out / f"{name}.md"] + (
        [plot(rows, out / f"{name}.png")] if "test" in splits else []
    )
    print("wrote " + ", ".join(map(str, written)))


def _cell(v: list[float]) -> str:
    return f"{statistics.mean(v):.1f} +- {statistics.stdev(v) if len(v) > 1 else 0:.1f} ({len(v)})"


def _same_budget_baseline(method: str) -> str:
    """The baseline a method is paired with: the one trained for as many steps."""
    _, longer, steps = method.rpartition(" --steps ")
    return f"baseline --steps {steps}" if longer else "baseline"


def _paired(runs: list[dict], a: str, b: str, split: str) -> list[str]:
    base = {r["seed"]: r for r in runs if r["method"] == b}
    pairs = [(r, base[r["seed"]]) for r in runs if r["method"] == a and r["seed"] in base]
    if not pairs:
        return []
    out = []
    for key, label in MEASURES:
        d = [
            (x["seed"], 100 * (x[f"{split}_{key}"] - y[f"{split}_{key}"]))
            for x, y in sorted(pairs, key=lambda p: p[0]["seed"])
        ]
        out.append(
            f"  {a} - {b}, {split} {label}: "
            + ", ".join(f"seed {s} {v:+.1f}" for s, v in d)
            + f"; mean {statistics.mean(v for _, v in d):+.1f}"
        )
    return out


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dclr_dist.shard.family import VARIANTS

    # The size most variants ran at: a larger size checked on one variant has its own table.
    size = statistics.mode(sorted(r["size"] for r in rows))
    variants = [v for v in VARIANTS if any(r["variant"] == v and r["size"] == size for r in rows)]
    methods = list(METHODS) + sorted({r["method"] for r in rows} - set(METHODS))
    fig, axes = plt.subplots(
        1, len(MEASURES), figsize=(6 * len(MEASURES), 4.5 + 0.15 * len(methods)), squeeze=False, layout="constrained"
    )
    width = 0.85 / len(methods)
    # tab10 repeats its colours past ten methods (every lever's recipe is one)
    colours = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    for ax, (key, label) in zip(axes[0], MEASURES):
        for i, method in enumerate(methods):
            for j, variant in enumerate(variants):
                v = [
                    100 * r[f"test_{key}"]
                    for r in rows
                    if (r["variant"], r["method"], r["size"]) == (variant, method, size)
                ]
                x = j + (i - (len(methods) - 1) / 2) * width
                if v:
                    ax.bar(x, statistics.mean(v), width, color=colours(i), label=method if j == 0 else None)
                    ax.scatter([x] * len(v), v, color="black", s=5, zorder=3)
        for j, variant in enumerate(variants):
            chance = 100 / len(VARIANTS[variant].motions)
            ax.plot([j - 0.45, j + 0.45], [chance] * 2, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(variants)), [v.replace("_", "\n") for v in variants], fontsize=8)
        ax.set(ylabel="%", ylim=(0, 100), title=f"test {label}, unseen scenes ({size} px)")
    # Below the axes: with every lever's row the legend would hide the bars.
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=7)
    fig.suptitle("motion family: bars = mean over seeds, dots = seeds, dashed = chance", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
