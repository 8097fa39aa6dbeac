"""``python -m dclr_dist.shard``: pack videos into WebDataset shards, or write the synthetic corpus."""

from __future__ import annotations

import argparse
import os
import re
import sys

from dclr_dist import storage
from dclr_dist.config import ConfigError, ShardConfig, load_config

_EPILOG = """\
examples:
  python -m dclr_dist.shard --input UCF-101/ --output s3://my-bucket/ucf101/train
  python -m dclr_dist.shard --input manifest.csv --split test --output shards/ucf101-test
  python -m dclr_dist.shard synth --output shards/synth-videos     (see: synth --help)

public datasets as they ship (--dataset): their official splits and class numbering, the
same numbering for every split; a listed video that is not on disk is a reject "missing":
  UCF-101: videos UCF-101/<class>/<video>.avi, split lists ucfTrainTestlist/ (classInd.txt,
  trainlist0N.txt, testlist0N.txt); labels follow classInd.txt; --fold 1-3 (default 1)
    python -m dclr_dist.shard --dataset ucf101 --input UCF-101/ --annotations ucfTrainTestlist/ \\
        --fold 1 --split train --output shards/ucf101-1-train
  HMDB-51: videos hmdb51_org/<class>/<video>.avi, split files testTrainMulti_7030_splits/
  (<class>_test_splitN.txt: 1 train, 2 test, 0 unused); classes sorted; --fold 1-3 (default 1)
    python -m dclr_dist.shard --dataset hmdb51 --input hmdb51_org/ \\
        --annotations testTrainMulti_7030_splits/ --fold 1 --split test --output shards/hmdb51-1-test
  Kinetics-400/600/700: annotation CSVs (label,youtube_id,time_start,time_end,split[,is_cc]) or
  their folder; videos <youtube_id>_<start:06d>_<end:06d>.mp4 in IN/<label>/, flat in IN/ or at any
  depth; classes are every label of the CSVs given, sorted (give all splits' CSVs); --split train, val
    python -m dclr_dist.shard --dataset kinetics --input kinetics400/train/ \\
        --annotations kinetics400/annotations/ --split train --output shards/k400-train
  Something-Something v2: videos 20bn-something-something-v2/<id>.webm, --annotations the
  folder with labels.json, train.json, validation.json; labels follow labels.json; --split train, val
    python -m dclr_dist.shard --dataset ssv2 --input 20bn-something-something-v2/ \\
        --annotations labels/ --split val --output shards/ssv2-val

object storage: s3:// URLs use the standard AWS environment (AWS_ENDPOINT_URL for MinIO,
Ceph, R2 and other S3-compatible stores; AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or
AWS_PROFILE). --ray uses the cluster in RAY_ADDRESS, or starts a local one.

output: <prefix>-000000.tar ... (each sample is <key>.mp4 + <key>.json), index.json
(written last: a folder without it is unfinished) and rejects.jsonl (every input that
could not be packed, with the reason). Re-running the same command resumes an interrupted
run. Format: shards/README.md.
"""

_DATASETS = ("ucf101", "hmdb51", "kinetics", "ssv2")  # dclr_dist.shard.datasets.NAMES, without importing it
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


def _bytes(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1000000, 512MB, 1GiB)")
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(unit or " "))


def _pack_parser() -> argparse.ArgumentParser:
    d = ShardConfig()
    p = argparse.ArgumentParser(
        prog="python -m dclr_dist.shard",
        description="Pack a video corpus into WebDataset tar shards on local disk or S3-compatible "
        "object storage. Each video is re-encoded to a small H.264 mp4 sized for DCLR's "
        "112x112 crops, with a JSON record of its label and provenance.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input",
        required=True,
        metavar="IN",
        help="class folders (IN/<class>/<video>, as UCF-101 and HMDB-51 ship) or a .csv/.jsonl "
        "manifest with path,label[,split] (relative paths are relative to the manifest; "
        "extra columns are kept in the record's meta); with --dataset, its video folder",
    )
    p.add_argument("--output", required=True, metavar="OUT", help="a local folder or s3://bucket/prefix")
    p.add_argument(
        "--split",
        help="pack only the manifest rows of this split (e.g. train); with --dataset: "
        "train or test (ucf101, hmdb51), train or val (kinetics, ssv2)",
    )
    g = p.add_argument_group("public datasets in their official layout (examples below)")
    g.add_argument(
        "--dataset",
        choices=_DATASETS,
        help="read IN and --annotations as this dataset ships, with its split files and class numbering",
    )
    g.add_argument(
        "--annotations",
        action="append",
        metavar="PATH",
        help="ucf101: the ucfTrainTestlist/ folder; hmdb51: the testTrainMulti_7030_splits/ folder "
        "(both default to that folder inside or next to IN); kinetics: the annotation CSVs or "
        "their folder (repeatable); ssv2: the folder with labels.json",
    )
    g.add_argument("--fold", type=int, metavar="N", help="ucf101, hmdb51: official split 1, 2 or 3 (default 1)")
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="read encoding settings from the shard: section of a dclr-dist config; the flags below override it",
    )
    g = p.add_argument_group("encoding (defaults fit 16x112x112 clips)")
    g.add_argument(
        "--short-side", type=int, help=f"resize so the shorter side is this many pixels (default {d.short_side})"
    )
    g.add_argument("--fps", type=float, help="lower the frame rate to at most this (default: keep the source's)")
    g.add_argument("--crf", type=int, help=f"x264 quality, 0-51, lower is better and bigger (default {d.crf})")
    g.add_argument(
        "--gop",
        type=int,
        help=f"keyframe interval in frames; a clip read decodes at most this many "
        f"frames it does not use (default {d.gop})",
    )
    g.add_argument("--preset", help=f"x264 speed preset (default {d.preset})")
    g.add_argument(
        "--tune", help="x264 tune; fastdecode makes every training read cheaper for a few %% more bytes (default: none)"
    )
    g.add_argument("--max-seconds", type=float, help=f"cut sources after this many seconds (default {d.max_seconds:g})")
    g = p.add_argument_group("shards")
    g.add_argument("--max-samples", type=int, help=f"samples per shard at most (default {d.max_samples})")
    g.add_argument(
        "--max-bytes",
        type=_bytes,
        help=f"video bytes per shard at most, e.g. 512MB "
        f"(default {d.max_bytes // 2**20}MiB; one larger video gets a shard of its own)",
    )
    g.add_argument("--prefix", help=f"shard name prefix (default {d.prefix})")
    g = p.add_argument_group("execution")
    g.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="local transcoding processes (default: all cores)"
    )
    g.add_argument(
        "--ray",
        action="store_true",
        help="transcode on a Ray cluster instead (RAY_ADDRESS, or a local one); inputs must be "
        "readable from every node (shared file system or s3:// manifest rows)",
    )
    g.add_argument(
        "--input-timeout",
        type=float,
        metavar="SECONDS",
        help=f"reject an input not transcoded after this long (default {d.input_timeout:g})",
    )
    g.add_argument("--overwrite", action="store_true", help="replace an existing packing in OUT")
    g.add_argument(
        "--reuse",
        nargs="+",
        default=[],
        metavar="PACKED",
        help="finished packings (folders or s3://) whose encodings of the same source files (by sha256) are "
        "copied instead of transcoded again, e.g. the first fold's train and test when packing the others",
    )
    g.add_argument(
        "--verify",
        action="store_true",
        help="when OUT holds this packing finished, check every shard's sha256 against index.json "
        "(reads every byte; without it, sizes are checked). Resuming an interrupted packing always checks",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in batch logs)")
    return p


_FLAGS = (
    "short_side",
    "fps",
    "crf",
    "gop",
    "preset",
    "tune",
    "max_seconds",
    "max_samples",
    "max_bytes",
    "prefix",
    "input_timeout",
)


def _pack(argv: list[str]) -> int:
    from dclr_dist.shard import datasets
    from dclr_dist.shard.pack import PackError, pack

    parser = _pack_parser()
    args = parser.parse_args(argv)
    if args.dataset is None and (args.annotations or args.fold is not None):
        parser.error("--annotations and --fold go with --dataset (ucf101, hmdb51, kinetics or ssv2)")
    try:
        overrides = [f"shard.{k}={getattr(args, k)}" for k in _FLAGS if getattr(args, k) is not None]
        cfg = load_config(args.config, overrides).shard
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("error: --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        source, split = args.input, args.split
        if args.dataset is not None:
            source = datasets.spec(args.dataset, args.input, annotations=args.annotations or (), fold=args.fold)
            split = datasets.canonical_split(args.dataset, args.split)
        result = pack(
            source,
            args.output,
            cfg,
            split=split,
            workers=args.workers,
            use_ray=args.ray,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            verify=args.verify,
            reuse=tuple(args.reuse),
        )
    except (PackError, OSError) as e:  # StorageError is an OSError; each message names the thing and the fix
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume (finished shards are kept)", file=sys.stderr)
        return 130
    return _report_pack(result, args.output)


def _report_pack(result, output: str) -> int:
    """Print what a packing did; return the exit code (1 when nothing was packed)."""
    index = result.index
    if index["samples"] == 0:
        # Exit 0 would let a script go on to train on an empty corpus.
        reasons = ", ".join(f"{n} {kind}" for kind, n in index["reject_reasons"].items())
        print(
            f"error: nothing packed: all {index['inputs']} inputs were rejected ({reasons}); "
            f"see {storage.join(output, 'rejects.jsonl')}",
            file=sys.stderr,
        )
        return 1
    mb = index["bytes"] / 1e6
    line = (
        f"packed {index['samples']} of {index['inputs']} inputs into {len(index['shards'])} shards "
        f"({mb:.1f} MB, {len(index['classes'])} classes) at {output}"
    )
    if result.already_complete:
        line += " (already complete: nothing to do)"
    elif result.resumed_shards:
        line += f"; kept {result.resumed_shards} shards from an earlier run"
    if result.reused:
        line += f"; {result.reused} encodings copied from --reuse"
    print(line)
    if result.redone:
        print(result.redone)
    if index["rejected"]:
        reasons = ", ".join(f"{n} {kind}" for kind, n in index["reject_reasons"].items())
        print(f"rejected {index['rejected']} inputs ({reasons}); see {storage.join(output, 'rejects.jsonl')}")
    return 0


def _synth_parser() -> argparse.ArgumentParser:
    from dclr_dist.shard.family import VARIANTS
    from dclr_dist.shard.synth import MIN_FRAMES, MOTIONS, write_corpus

    d = write_corpus.__kwdefaults__
    p = argparse.ArgumentParser(
        prog="python -m dclr_dist.shard synth",
        description="Write the synthetic scene-bias corpus: class folders of mp4s where the class is the "
        "motion of a foreground object and the background scene is drawn independently of "
        "the class, from train and test scene pools that do not overlap. Pack it with "
        "`python -m dclr_dist.shard --input OUT/manifest.csv --split train ...`.",
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="folder to write: DIR/train/<motion>/*.mp4, DIR/test/<motion>/*.mp4 and "
        "DIR/manifest.csv (path,label,split,scene); re-running completes an "
        "interrupted corpus",
    )
    p.add_argument(
        "--variant",
        choices=list(VARIANTS),
        help="a corpus of the motion family (dclr_dist/shard/family.py): "
        + "; ".join(f"{name}: {v.note}" for name, v in VARIANTS.items())
        + " (default: the scene-bias corpus)",
    )
    p.add_argument(
        "--classes",
        type=int,
        default=d["num_classes"],
        metavar="N",
        help=f"number of motion classes, the first N of: {', '.join(MOTIONS)}, or of the variant's "
        "(default: 6, or all of the variant's)",
    )
    p.add_argument(
        "--train-per-class",
        type=int,
        default=d["train_per_class"],
        metavar="N",
        help=f"training videos per class (default {d['train_per_class']})",
    )
    p.add_argument(
        "--test-per-class",
        type=int,
        default=d["test_per_class"],
        metavar="N",
        help=f"test videos per class (default {d['test_per_class']})",
    )
    p.add_argument(
        "--train-scenes",
        type=int,
        default=d["train_scenes"],
        metavar="N",
        help=f"size of the pool of background scenes for training videos, ids 0..N-1 (default {d['train_scenes']})",
    )
    p.add_argument(
        "--test-scenes",
        type=int,
        default=d["test_scenes"],
        metavar="N",
        help=f"size of the pool for test videos, the ids after the training pool, so "
        f"no test video shows a training scene (default {d['test_scenes']})",
    )
    p.add_argument(
        "--val-per-class",
        type=int,
        default=d["val_per_class"],
        metavar="N",
        help="validation videos per class, in scenes of their own (default: none)",
    )
    p.add_argument(
        "--val-scenes",
        type=int,
        default=d["val_scenes"],
        metavar="N",
        help="size of the pool for validation videos, after the test pool (default: none)",
    )
    p.add_argument(
        "--frames",
        type=int,
        default=d["frames"],
        help=f"frames per video, at least {MIN_FRAMES}; 32 hold one 16-frame clip at stride 2 (default {d['frames']})",
    )
    p.add_argument(
        "--size",
        type=int,
        default=d["size"],
        metavar="PIXELS",
        help=f"frame width and height, even (default {d['size']})",
    )
    p.add_argument(
        "--fps",
        type=int,
        default=d["fps"],
        help=f"frame rate written in the files; motion is defined per frame (default {d['fps']})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d["seed"],
        help=f"the same seed and options write byte-identical files (default {d['seed']})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=d["workers"],
        help=f"processes rendering and encoding in parallel (default {d['workers']})",
    )
    return p


def _synth(argv: list[str]) -> int:
    from dclr_dist.shard.family import VARIANTS
    from dclr_dist.shard.synth import write_corpus

    args = _synth_parser().parse_args(argv)
    try:
        manifest = write_corpus(
            args.output,
            variant=args.variant,
            num_classes=args.classes,
            train_per_class=args.train_per_class,
            test_per_class=args.test_per_class,
            train_scenes=args.train_scenes,
            test_scenes=args.test_scenes,
            val_per_class=args.val_per_class,
            val_scenes=args.val_scenes,
            frames=args.frames,
            size=args.size,
            fps=args.fps,
            seed=args.seed,
            workers=args.workers,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    classes = args.classes or (len(VARIANTS[args.variant].motions) if args.variant else 6)
    print(
        f"synthetic corpus: {classes * args.train_per_class} train + "
        f"{classes * args.test_per_class} test videos, {classes} motion classes, "
        f"{args.train_scenes} train + {args.test_scenes} test scenes; manifest {manifest}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "synth":
        return _synth(argv[1:])
    return _pack(argv)


if __name__ == "__main__":
    sys.exit(main())
