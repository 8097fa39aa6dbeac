"""Kinetics: the annotation CSVs, videos found by ``<youtube_id>_<start>_<end>`` at any depth."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from dclr_dist.shard.common import Input, PackError
from dclr_dist.shard.datasets.common import _SYNONYMS, Dataset

_VIDEO_EXTS = {"mp4", "mkv", "webm", "avi", "mov", "m4v", "flv", "3gp", "mpg", "mpeg", "ogv"}

_KINETICS_WHAT = (
    "the annotation CSVs (label,youtube_id,time_start,time_end,split: train.csv, validate.csv, ...) "
    "or their folder; give every split's CSV so that all splits share one class list"
)


def _split_from_name(path: Path) -> str | None:
    stem = path.stem.lower()
    for key, split in (("train", "train"), ("val", "val"), ("test", "test")):
        if key in stem:
            return split
    return None


def _read_kinetics_csvs(ds: Dataset) -> list[tuple[Path, list[str], list[tuple[int, dict[str, str]]]]]:
    if not ds.annotations:
        raise PackError(f"--dataset kinetics needs --annotations: {_KINETICS_WHAT}")
    candidates: list[tuple[Path, bool]] = []  # (file, named by the user)
    for given in ds.annotations:
        path = Path(given)
        if path.is_dir():
            found = [
                p
                for p in sorted(path.iterdir())
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in (".csv", ".txt")
            ]
            if not found:
                raise PackError(f"{path}: no .csv files; --annotations is {_KINETICS_WHAT}")
            candidates += [(p, False) for p in found]
        elif path.is_file():
            candidates.append((path, True))
        else:
            raise PackError(f"{given}: no such file or folder; --annotations is {_KINETICS_WHAT}")
    tables = []
    for path, named in candidates:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if "youtube_id" not in header:
                if named:
                    raise PackError(f"{path}: no youtube_id column; --annotations is {_KINETICS_WHAT}")
                continue  # some other file in the folder (a class list, a readme)
            rows = [
                (n, {k: v.strip() for k, v in zip(header, row)})
                for n, row in enumerate(reader, start=2)
                if any(v.strip() for v in row)
            ]
        tables.append((path, header, rows))
    if not tables:
        raise PackError(
            f"{', '.join(ds.annotations)}: no CSV with a youtube_id column; --annotations is {_KINETICS_WHAT}"
        )
    return tables


def _norm(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def _index_videos(root: Path) -> dict[str, list[str]]:
    """``<youtube_id>_<start>_<end>`` -> the files of that name, at any depth (flat or in label folders).

    Only ``<name>.<video extension>``: a downloader's ``.mp4.part`` or ``.f137.mp4`` is not the video.
    """
    index: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            stem, dot, ext = name.partition(".")
            if name.startswith(".") or not dot or ext.lower() not in _VIDEO_EXTS:
                continue
            index.setdefault(stem, []).append((rel_dir / name).as_posix())
    return index


def _kinetics(root: Path, ds: Dataset, split: str) -> tuple[list[Input], list[str]]:
    tables = _read_kinetics_csvs(ds)
    # Every label of every CSV given, sorted: the usual Kinetics numbering, the same for every split.
    classes = sorted(
        {row["label"] for _, header, rows in tables if "label" in header for _, row in rows if row.get("label")}
    )
    selected = []
    for path, header, rows in tables:
        by_name = _split_from_name(path)
        for n, row in rows:
            row_split = row.get("split") or by_name
            if row_split is None:
                raise PackError(
                    f"{path} line {n}: no split column and the file name does not say which split; "
                    f"--annotations is {_KINETICS_WHAT}"
                )
            if _SYNONYMS.get(row_split.lower(), row_split.lower()) != split:
                continue
            if "label" not in header:
                raise PackError(
                    f"{path}: the {split} rows have no label column (Kinetics-600/700 test labels "
                    "are not public); pack train or val"
                )
            selected.append((path, n, row))
    if not selected:
        raise PackError(
            f"no rows of split '{split}' in {', '.join(str(p) for p, _, _ in tables)}; pass the "
            f"{split} CSV to --annotations"
        )
    return _kinetics_inputs(root, selected, split), classes


def _kinetics_inputs(root: Path, selected: list[tuple[Path, int, dict[str, str]]], split: str) -> list[Input]:
    """The inputs of the selected annotation rows: each row's video under ``root``, or why it cannot be packed."""
    videos = _index_videos(root)
    inputs = []
    for path, n, row in selected:
        where = f"{path.name} line {n}"
        label, youtube_id = row.get("label", ""), row.get("youtube_id", "")
        meta = {k: v for k, v in row.items() if k not in ("label", "split") and k}
        try:
            stem = f"{youtube_id}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
        except (KeyError, ValueError):
            stem = youtube_id or f"<{where}>"
            inputs.append(
                Input(
                    f"{stem}.mp4",
                    str(root / f"{stem}.mp4"),
                    label,
                    split,
                    meta,
                    f"{where}: time_start/time_end are not numbers",
                )
            )
            continue
        problem = None
        if not youtube_id:
            problem = f"{where}: empty youtube_id"
        elif not label:
            problem = f"{where}: empty label"
        found = videos.get(stem, [])
        if len(found) > 1:  # the same clip twice: the copy in its label's folder
            in_label = [r for r in found if "/" in r and _norm(r.rsplit("/", 2)[-2]) == _norm(label)]
            found = in_label or found
        if problem is None and not found:
            problem = f"missing: {stem}.mp4 is not under {root} ({where})"
        rel = found[0] if found else f"{stem}.mp4"
        inputs.append(Input(rel, str(root / rel), label, split, meta, problem))
    return inputs
