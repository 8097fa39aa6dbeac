"""The paper's downstream protocol on UCF-101 and HMDB-51: for each of the three official
splits, a linear probe and fine-tuning of the pretrained backbone, video-level top-1 (each
test video's 10 clips averaged), and the three-split mean that papers report.

    # 1. Where the videos are: pack both splits of the 3 folds of each dataset (local or s3://).
    python cluster/downstream.py pack --ucf101 UCF-101/ --hmdb51 hmdb51_org/ --shards s3://my-bucket/downstream
    # 2. On a machine with a GPU, or on the cluster with the driver on a GPU node (the linear
    #    probe extracts features in the driver; fine-tuning runs on Ray Train workers).
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml --entrypoint-num-gpus 1 -- \\
        python cluster/downstream.py eval --checkpoint s3://my-bucket/dclr-runs/k400-r2plus1d \\
        --shards s3://my-bucket/downstream --out s3://my-bucket/downstream/results
    # 3. The table again, from the reports (eval ends with it).
    python cluster/downstream.py summary --out s3://my-bucket/downstream/results

`pack` runs `python -m dclr_dist.shard --dataset ... --fold N` for the train and test split
of every fold into SHARDS/<dataset>-<fold>-<split>, each video transcoded once: the folds
after the first reuse the first fold's encodings (``--reuse``); `eval` runs `python -m dclr_dist.eval`
with dclr_dist/configs/downstream/r2plus1d_18.yaml on each fold, keeps its report in
OUT/<dataset>-<fold>/ and prints the table; `all` packs and evaluates. Re-running is safe:
the packer keeps a finished packing, and a fold whose report exists is not evaluated again
(--force does). --dry-run prints the commands instead of running them. Arguments after `--`
are config overrides for every evaluation (e.g. -- cluster.workers=8 finetune.epochs=20).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from dclr_dist import storage

REPO = Path(__file__).resolve().parents[1]

DATASETS = ("ucf101", "hmdb51")
FOLDS = (1, 2, 3)
STEPS = ("pack", "eval", "summary", "all")
PROTOCOLS = ("linear", "finetune")
CONFIG = "dclr_dist/configs/downstream/r2plus1d_18.yaml"


def shards_url(shards: str, dataset: str, fold: int, split: str) -> str:
    return storage.join(shards, f"{dataset}-{fold}-{split}")


def pack_commands(args) -> list[list[str]]:
    commands = []
    for dataset in args.datasets:
        source = getattr(args, dataset)
        annotations = getattr(args, f"{dataset}_annotations")
        first = args.folds[0]
        for fold in args.folds:
            # The first fold's two packings hold every video: later folds copy its encodings.
            reuse = [] if fold == first else [shards_url(args.shards, dataset, first, s) for s in ("train", "test")]
            for split in ("train", "test"):
                commands.append(
                    [
                        sys.executable,
                        "-m",
                        "dclr_dist.shard",
                        "--dataset",
                        dataset,
                        "--input",
                        source,
                        *(["--annotations", annotations] if annotations else []),
                        "--fold",
                        str(fold),
                        "--split",
                        split,
                        "--output",
                        shards_url(args.shards, dataset, fold, split),
                        "--max-samples",
                        str(args.max_samples),
                        "--no-progress",
                        *(["--workers", str(args.workers)] if args.workers else []),
                        *(["--reuse", *reuse] if reuse else []),
                    ]
                )
    return commands


def eval_command(args, dataset: str, fold: int, out: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dclr_dist.eval",
        "--checkpoint",
        args.checkpoint,
        "--train",
        shards_url(args.shards, dataset, fold, "train"),
        "--test",
        shards_url(args.shards, dataset, fold, "test"),
        "--protocol",
        ",".join(PROTOCOLS),
        "--config",
        args.config,
        "--out",
        out,
        # One fine-tuning run per fold under train.storage_path, named for it.
        f"train.name=downstream-{dataset}-{fold}",
        *args.overrides,
    ]


def _run(command: list[str], dry_run: bool) -> None:
    print("$ " + shlex.join(command), flush=True)
    if not dry_run:
        subprocess.run(command, check=True)


def evaluate(args) -> None:
    for dataset in args.datasets:
        for fold in args.folds:
            out = storage.join(args.out, f"{dataset}-{fold}")
            if not args.force and not args.dry_run and storage.exists(storage.join(out, "report.json")):
                print(f"{dataset} split {fold}: evaluated already ({out}/report.json; --force evaluates again)")
                continue
            if not storage.is_s3(out):
                _run(eval_command(args, dataset, fold, out), args.dry_run)
                continue
            # The evaluation writes its report to a local folder; the folder goes to S3 after.
            with tempfile.TemporaryDirectory(prefix="dclr-downstream-") as local:
                _run(eval_command(args, dataset, fold, local), args.dry_run)
                for name in ("report.json", "report.txt"):
                    print(f"  copy {name} to {out}/")
                    if not args.dry_run:
                        storage.write_bytes(storage.join(out, name), (Path(local) / name).read_bytes())


def summary(out: str, datasets=DATASETS, folds=FOLDS) -> tuple[str, int]:
    """The table of top-1 per split and the mean over the splits found, and how many reports it read."""
    rows, clips, found = [], set(), 0
    for dataset in datasets:
        scores: dict[str, dict[int, float]] = {p: {} for p in PROTOCOLS}
        for fold in folds:
            url = storage.join(storage.join(out, f"{dataset}-{fold}"), "report.json")
            if not storage.exists(url):
                continue
            report = json.loads(storage.read_bytes(url))
            found += 1
            clips.add(report.get("clips"))
            for protocol in PROTOCOLS:
                if "top1" in report["protocols"].get(protocol, {}):
                    scores[protocol][fold] = report["protocols"][protocol]["top1"]
        for protocol in PROTOCOLS:
            got = scores[protocol]
            cells = [f"{100 * got[f]:.1f}" if f in got else "-" for f in folds]
            mean = f"{100 * sum(got.values()) / len(got):.1f}" if got else "-"
            if got and len(got) < len(folds):
                mean += f" ({len(got)} of {len(folds)})"
            rows.append([dataset, protocol, *cells, mean])
    header = ["dataset", "protocol", *(f"split {f}" for f in folds), "mean"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        f"video-level top-1 (%), {'/'.join(map(str, sorted(c for c in clips if c)))} clips per video, from {out}"
        if found
        else f"no report.json under {out}"
    ]
    lines += [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines), found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="python cluster/downstream.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("--ucf101", metavar="DIR", help="the UCF-101/ video folder (pack)")
    parser.add_argument(
        "--ucf101-annotations", metavar="DIR", help="ucfTrainTestlist/ (default: inside or next to the video folder)"
    )
    parser.add_argument("--hmdb51", metavar="DIR", help="the hmdb51_org/ video folder (pack)")
    parser.add_argument(
        "--hmdb51-annotations",
        metavar="DIR",
        help="testTrainMulti_7030_splits/ (default: inside or next to the video folder)",
    )
    parser.add_argument(
        "--datasets", nargs="+", choices=DATASETS, help="default: for pack, those whose folder is given; otherwise both"
    )
    parser.add_argument("--folds", nargs="+", type=int, choices=FOLDS, default=list(FOLDS))
    parser.add_argument("--shards", metavar="URL", help="where the packed folds go (a folder or s3://...)")
    parser.add_argument("--checkpoint", metavar="URL", help="the pretraining run or checkpoint to evaluate")
    parser.add_argument(
        "--out",
        metavar="URL",
        default="downstream",
        help="one folder of reports per fold (a folder or s3://...; default downstream)",
    )
    parser.add_argument(
        "--config", default=os.path.relpath(REPO / CONFIG), help=f"the evaluation's config (default {CONFIG})"
    )
    parser.add_argument(
        "--max-samples",
        type=int,
        default=32,
        help="videos per shard (default 32: UCF-101's ~9.5k train videos make ~300 shards, enough "
        "for every loader process of the fine-tuning to read its own)",
    )
    parser.add_argument("--workers", type=int, help="transcoding processes (default: all cores)")
    parser.add_argument("--force", action="store_true", help="evaluate folds that have a report")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    args.overrides = overrides
    steps = {"all": ("pack", "eval", "summary"), "eval": ("eval", "summary")}.get(args.step, (args.step,))
    if args.datasets is None:
        given = [d for d in DATASETS if getattr(args, d)]
        args.datasets = given if "pack" in steps else list(DATASETS)
    if "pack" in steps:
        if not args.datasets or any(getattr(args, d) is None for d in args.datasets):
            parser.error("pack needs the video folder of each dataset: --ucf101 DIR, --hmdb51 DIR")
    if {"pack", "eval"} & set(steps) and not args.shards:
        parser.error(f"{args.step} needs --shards URL")
    if "eval" in steps and not args.checkpoint:
        parser.error(f"{args.step} needs --checkpoint URL")

    try:
        if "pack" in steps:
            for command in pack_commands(args):
                _run(command, args.dry_run)
        if "eval" in steps:
            evaluate(args)
        if "summary" in steps and not args.dry_run:
            table, found = summary(args.out, args.datasets, args.folds)
            print(table)
            return 0 if found else 1
    except subprocess.CalledProcessError as e:
        print(f"error: `{shlex.join(e.cmd)}` exited with {e.returncode}", file=sys.stderr)
        return 1
    except storage.StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
