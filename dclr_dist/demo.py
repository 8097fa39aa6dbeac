"""``python -m dclr_dist.demo``: the whole path on this machine, from nothing.

Synthetic scene-bias videos -> WebDataset shards under ``shards/demo`` (made on first use,
in the current directory) -> DCLR pretraining on a local Ray cluster (the shipped recipe
``demo``) -> the closing evaluation on the test split's unseen scenes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dclr_dist.config import RECIPES, Config, ConfigError, load_config

DEMO_CONFIG = RECIPES / "demo.yaml"
# train: pretraining; val (scenes of its own): the k-NN monitor that ranks best/; test (unseen
# scenes): the closing evaluation only.
DEMO_SPLITS = ("train", "val", "test")
DEMO_SHARDS = Path("shards/demo")


def ensure_demo_shards(cfg: Config, root: Path = DEMO_SHARDS) -> None:
    """The demo trains on synthetic shards, made here on first use."""
    from dclr_dist.shard.pack import pack
    from dclr_dist.shard.synth import write_corpus

    if all((root / split / "index.json").exists() for split in DEMO_SPLITS):
        return
    print(f"demo: writing the synthetic scene-bias corpus and its shards under {root}", flush=True)
    # The scene-bias benchmark's corpus (README) with two thirds of its training videos: the
    # same 4 translations, 64x64 videos of 48 frames, so the demo repeats a measured recipe.
    manifest = write_corpus(
        root / "videos",
        num_classes=4,
        train_per_class=32,
        test_per_class=24,
        train_scenes=12,
        test_scenes=6,
        val_per_class=12,
        val_scenes=6,
        frames=48,
        size=64,
        workers=os.cpu_count() or 1,
        progress=True,
    )
    for split in DEMO_SPLITS:
        pack(str(manifest), str(root / split), cfg.shard, split=split, workers=os.cpu_count() or 1)


def final_checkpoint(run: Path) -> str:
    """The run's checkpoint of its last epoch (Ray's checkpoint_* folders, by their meta.json)."""
    from dclr_dist.checkpoint import CheckpointError

    metas = {m.parent: json.loads(m.read_text())["epoch"] for m in run.glob("checkpoint_*/meta.json")}
    if not metas:
        raise CheckpointError(f"{run}: no checkpoint_*/meta.json; the training run did not checkpoint")
    return str(max(metas, key=metas.__getitem__))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dclr_dist.demo",
        description="The demo: synthetic scene-bias shards under ./shards/demo (made on first use), DCLR "
        "pretraining on a local Ray cluster of CPU workers (recipe: demo), then the linear, k-NN "
        "and scene protocols on the test split's unseen scenes. About 8 minutes on 2 idle cores.",
        epilog="Runs go to ./runs/demo; running it again resumes (or, once finished, re-evaluates) that run.",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(DEMO_CONFIG, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dclr_dist.checkpoint import CheckpointError
    from dclr_dist.data import DataError
    from dclr_dist.eval import EvalError, evaluate
    from dclr_dist.train import train

    ensure_demo_shards(cfg)
    code = train(cfg)
    if code:
        return code
    # The demo ends with what tells a good representation from a bad one: motion accuracy
    # on the test split's unseen scenes, and how much of the features follow the scene. Of the
    # final weights: the k-NN monitor's 48 validation videos (a standard error of ~6 points)
    # are too few to choose an epoch by.
    run = Path(cfg.train.storage_path) / cfg.train.name
    try:
        final = final_checkpoint(run)
        evaluate(final, cfg.data.train, [str(DEMO_SHARDS / "test")], ("linear", "knn", "scene"), out=run / "eval")
    except (EvalError, CheckpointError, DataError) as e:
        print(f"error: evaluation: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Ray pickles the functions of __main__ by value (train_loop's globals among them); those
    # of the importable module go by name.
    from dclr_dist.demo import main as _main

    sys.exit(_main())
