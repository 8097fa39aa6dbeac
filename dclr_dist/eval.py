"""``python -m dclr_dist.eval``: downstream protocols for a pretrained DCLR backbone.

    python -m dclr_dist.eval --checkpoint runs/demo --train shards/demo/train --test shards/demo/test
    python -m dclr_dist.eval --checkpoint s3://bucket/runs/ucf/best --train s3://bucket/ucf101/train \\
        --test s3://bucket/ucf101/test --protocol finetune cluster.workers=8 cluster.gpus_per_worker=1

Protocols (Ding, Qian, Xiong, arXiv 2207.05340; docs/design.md, section 7): ``linear``, ``knn``,
``scene`` on frozen features (``dclr_dist.evaluation.probes`` on ``.features``), ``finetune`` on Ray
Train (``.finetune``); ``all``: each, ``scene`` only where the records carry scenes. ``--checkpoint``:
a folder of ``python -m dclr_dist.train`` (``backbone.pt`` + ``meta.json``): a Ray checkpoint, a run's
``best/`` or the run folder (its ``best/``), local or s3://. The clip shape and normalisation come
from the config saved with it (or ``--config``), so the backbone sees what it was trained on;
``key=value`` overrides change the rest (``data.eval_clips=10 data.loader_workers=4``). ``--out`` gets
report.json, report.txt and plots (``.report``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from dclr_dist import storage
from dclr_dist.checkpoint import CHECKPOINT_HELP, CheckpointError, load_backbone, load_meta, resolve_checkpoint
from dclr_dist.config import Config, ConfigError, config_from_dict, load_config
from dclr_dist.data import index_url
from dclr_dist.evaluation import EvalError
from dclr_dist.evaluation.features import extract, extract_on_workers
from dclr_dist.evaluation.finetune import finetune
from dclr_dist.evaluation.probes import choose_l2, knn_retrieval, linear_probe, scene_probe
from dclr_dist.evaluation.report import write_report

PROTOCOLS = ("linear", "knn", "scene", "finetune")


# --------------------------------------------------------------------------- config


def eval_config(
    meta: dict,
    train: list[str],
    test: list[str],
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
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
        raise EvalError(
            f"the checkpoint holds a {want[0]} backbone of width {want[1]} and the config asks for "
            f"{got[0]} of width {got[1]}: evaluate a checkpoint of that backbone, or leave model.* "
            "as the checkpoint has it"
        )
    return cfg


# --------------------------------------------------------------------------- the whole evaluation


def _index_classes(urls: list[str]) -> list[str] | None:
    """Class names from the index.json files behind ``urls``; None if any entry is a bare .tar."""
    classes = None
    for entry in urls:
        if entry.endswith((".tar", ".tar.gz", ".tgz")) or "{" in entry:
            return None
        url = index_url(entry)
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
        raise EvalError(
            f"the train and test shards were packed with different class lists ({a} and {b}), so "
            "their label indices mean different classes: pack both splits from one corpus in "
            "which every class has videos in each split"
        )
    names = a or b
    top = max((int(y.max()) for y in labels if len(y)), default=-1)
    if names is None:
        if top < 0:
            raise EvalError(
                "the class count is unknown: list the shards by index.json (or packed folder) so "
                "the class names are known"
            )
        return [f"class {i}" for i in range(top + 1)]
    if top >= len(names):
        raise EvalError(f"a label {top} exceeds the {len(names)} classes of the index.json files")
    return names


def evaluate(
    checkpoint: str,
    train: list[str],
    test: list[str],
    protocols: tuple[str, ...] = ("all",),
    out: str | Path | None = None,
    config: str | None = None,
    overrides: tuple[str, ...] = (),
    log=print,
) -> dict:
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
    report = {
        "checkpoint": folder,
        "model": meta["model"],
        "epoch": meta["epoch"],
        "train": train,
        "test": test,
        "clips": cfg.data.eval_clips,
        "frames": cfg.views.frames,
        "stride": cfg.views.stride,
        "size": cfg.views.size,
        "protocols": {},
    }
    if any(p != "finetune" for p in protocols):
        _frozen_protocols(f, cfg, folder, protocols, everything, report, log)
    if "finetune" in protocols:
        classes = report.get("classes") or _classes(train, test, [])
        report.setdefault("classes", classes)
        log(f"eval: fine-tuning on Ray Train ({cfg.cluster.workers} workers, {cfg.finetune.epochs} epochs)")
        report["protocols"]["finetune"] = finetune(cfg, folder, test, classes)
    if out is not None:
        write_report(report, Path(out), log)
    return report


def _frozen_protocols(
    f: torch.nn.Module, cfg: Config, folder: str, protocols: tuple[str, ...], everything: bool, report: dict, log
) -> None:
    """Features of both splits, then the linear, k-NN and scene protocols asked for, into ``report``."""
    train, test = cfg.data.train, cfg.data.eval
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
    report.update(
        classes=classes,
        videos={"train": len(tr.keys), "test": len(te.keys)},
        skipped={
            split: {"samples": s.skipped_samples, "shards": s.skipped_shards}
            for split, s in (("train", tr), ("test", te))
        },
    )
    l2 = cfg.eval.l2
    if l2 is None and {"linear", "scene"} & set(protocols):
        l2, scores = choose_l2(tr.x, tr.label, len(classes), progress="linear probe, l2 cross-validation")
        report["l2_cv"] = {"chosen": l2, "accuracy": {str(k): v for k, v in scores.items()}}
    if "linear" in protocols:
        report["protocols"]["linear"] = linear_probe(tr, te, classes, l2)
    if "knn" in protocols:
        on_device = [dataclasses.replace(s, x=s.x.to(device)) for s in (tr, te)]
        report["protocols"]["knn"] = knn_retrieval(
            *on_device,
            classes,
            cfg.eval.knn_k,
            cfg.eval.knn_temperature,
            cfg.eval.recall_at,
            cfg.eval.chunk,
            progress=True,
        )
    if "scene" in protocols:
        if tr.scenes is None and everything:
            report["protocols"]["scene"] = {"skipped": "the records carry no meta.scene"}
        else:
            report["protocols"]["scene"] = scene_probe(tr, te, classes, l2)


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
        "            local cluster), cluster.workers workers; test with softmax averaged over clips\n"
        "  all       all four (scene only where the records carry scenes)\n\n"
        "The clip shape comes from the checkpoint's saved config; override with key=value, e.g.\n"
        "data.eval_clips=10 data.loader_workers=4 eval.knn_k=20 finetune.epochs=10 cluster.workers=8.\n"
        "Features on the cluster's GPUs instead of this process: eval.workers=8 eval.gpus_per_worker=1.\n"
        "s3:// URLs use AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY / AWS_PROFILE.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, metavar="URL", help=CHECKPOINT_HELP)
    parser.add_argument(
        "--train",
        required=True,
        action="append",
        metavar="SHARDS",
        help="labelled train split: a packed folder, index.json or .tar URL (repeat for more)",
    )
    parser.add_argument(
        "--test", required=True, action="append", metavar="SHARDS", help="labelled test split, likewise"
    )
    parser.add_argument(
        "--protocol",
        default="all",
        metavar="P[,P...]",
        help=f"comma-separated, from {', '.join(PROTOCOLS)}, or all (default)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="where the report goes (default: the checkpoint folder's eval/ if local, else ./eval)",
    )
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
