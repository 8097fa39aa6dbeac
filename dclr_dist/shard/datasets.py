"""Public video datasets read as they ship: their own split files and class numbering.

``python -m dclr_dist.shard --dataset NAME --input VIDEOS --split S [--fold N] [--annotations PATH]``

========  ==========================================  ===========================================  =================
dataset   --input (the videos)                        --annotations                                class list
========  ==========================================  ===========================================  =================
ucf101    ``UCF-101/<class>/<file>.avi``              ``ucfTrainTestlist/``: ``classInd.txt``,     ``classInd.txt``
                                                      ``trainlist0N.txt``, ``testlist0N.txt``      order
hmdb51    ``hmdb51_org/<class>/<file>.avi``           ``testTrainMulti_7030_splits/``:             class names,
                                                      ``<class>_test_splitN.txt`` (1 train,        sorted
                                                      2 test, 0 unused)
kinetics  ``<split>/[<label>/]<youtube_id>_``         the CSVs ``label,youtube_id,time_start,``    every label of
          ``<start:06d>_<end:06d>.mp4``               ``time_end,split[,is_cc]`` or their folder   the CSVs, sorted
ssv2      ``20bn-something-something-v2/<id>.webm``   the folder with ``labels.json``,             ``labels.json``
                                                      ``train.json``, ``validation.json``          indices
========  ==========================================  ===========================================  =================

Splits: ucf101 and hmdb51 have ``train``/``test`` of ``--fold`` 1-3 (default 1); kinetics and
ssv2 have ``train``/``val`` (``test`` where its labels are public). The class list is always
the whole dataset's, never the packed split's, so every split of one dataset has one
numbering (``label`` = index into ``index.json``'s ``classes``).

Every video the split file lists becomes an input: one that is not on disk is a reject
``missing: ...`` (every Kinetics copy misses some), a line that cannot be read a reject
naming the file and line. Videos of other splits are not inputs. Kinetics videos are found
by file name at any depth under ``--input`` (label folders named as the label, with
underscores, or none); UCF-101 and HMDB-51 paths match ignoring case when the exact one is absent.

``pack()`` and ``list_inputs()`` take the choice as one string, ``spec(...)``, e.g.
``ucf101:/data/UCF-101?annotations=/data/ucfTrainTestlist&fold=1``: it is what
``index.json`` records as ``source``, and it is part of the packing's fingerprint, so
another fold or other annotations are never taken for a resume of this one.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode

from dclr_dist import storage
from dclr_dist.shard.pack import Input, PackError

NAMES = ("ucf101", "hmdb51", "kinetics", "ssv2")
TITLES = {"ucf101": "UCF-101", "hmdb51": "HMDB-51", "kinetics": "Kinetics", "ssv2": "Something-Something v2"}
SPLITS = {"ucf101": ("train", "test"), "hmdb51": ("train", "test"), "kinetics": ("train", "val", "test"),
          "ssv2": ("train", "val", "test")}
_SYNONYMS = {"validation": "val", "validate": "val", "valid": "val", "training": "train", "testing": "test"}
_FOLDS = (1, 2, 3)
_SPEC = re.compile(r"^(ucf101|hmdb51|kinetics|ssv2):(.*)$", re.DOTALL)
_VIDEO_EXTS = {"mp4", "mkv", "webm", "avi", "mov", "m4v", "flv", "3gp", "mpg", "mpeg", "ogv"}


@dataclass(frozen=True)
class Dataset:
    name: str
    root: str  # the video folder
    annotations: tuple[str, ...] = ()
    fold: int | None = None


def spec(name: str, root: str | os.PathLike, *, annotations: str | os.PathLike | list | tuple = (),
         fold: int | None = None) -> str:
    """The input string that names ``name`` in its official layout, for ``pack()``/``list_inputs()``.

    UCF-101 and HMDB-51 default to fold 1, written out so that ``index.json`` says which.
    """
    if name not in NAMES:
        raise PackError(f"unknown dataset {name!r}; known: {', '.join(NAMES)}")
    if isinstance(annotations, (str, os.PathLike)):
        annotations = [annotations]
    if fold is None and name in ("ucf101", "hmdb51"):
        fold = 1
    params = [("annotations", str(a)) for a in annotations]
    if fold is not None:
        params.append(("fold", str(fold)))
    text = f"{name}:{quote(str(root), safe='/:~')}"
    if params:
        text += "?" + urlencode(params, safe="/:~", quote_via=quote)
    return text


def parse(input_url: str) -> Dataset | None:
    """The dataset a ``spec()`` string names; None for anything else (a folder, a manifest)."""
    m = _SPEC.match(str(input_url))
    if m is None:
        return None
    root, _, query = m.group(2).partition("?")
    annotations: list[str] = []
    fold = None
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "annotations":
            annotations.append(value)
        elif key == "fold":
            try:
                fold = int(value)
            except ValueError:
                raise PackError(f"--fold {value!r}: not a number; {TITLES[m.group(1)]} has the folds "
                                "1, 2 and 3") from None
        else:
            raise PackError(f"{input_url}: unknown dataset option {key!r} (known: annotations, fold)")
    if fold is None and m.group(1) in ("ucf101", "hmdb51"):
        fold = 1
    return Dataset(m.group(1), unquote(root), tuple(annotations), fold)


def canonical_split(name: str, split: str | None) -> str:
    """``split`` as the dataset names it (``validation`` -> ``val``); a PackError if it has no such split."""
    allowed = SPLITS[name]
    if split is None:
        raise PackError(f"--dataset {name} needs --split {', '.join(allowed[:-1])} or {allowed[-1]}")
    canonical = _SYNONYMS.get(split.strip().lower(), split.strip().lower())
    if canonical not in allowed:
        raise PackError(f"--split {split}: {TITLES[name]} has the splits {', '.join(allowed)}")
    return canonical


def list_dataset(ds: Dataset, split: str | None) -> tuple[list[Input], list[str]]:
    """The inputs of one split of ``ds`` in the split file's order, and the dataset's class list."""
    split = canonical_split(ds.name, split)
    if ds.name in ("ucf101", "hmdb51"):
        if ds.fold not in _FOLDS:
            raise PackError(f"--fold {ds.fold}: {TITLES[ds.name]} has the official splits 1, 2 and 3; "
                            "pass --fold 1, 2 or 3")
    elif ds.fold is not None:
        raise PackError(f"--fold applies to ucf101 and hmdb51; {TITLES[ds.name]} has one official split: "
                        "drop --fold")
    if storage.is_s3(ds.root):
        raise PackError(f"{ds.root}: --dataset reads videos from local disk (or a mounted file system); "
                        "for videos in S3 write a .csv manifest whose rows point at them")
    root = storage.local_path(ds.root)
    if not root.is_dir():
        raise PackError(f"{ds.root}: no such folder; --input is the {TITLES[ds.name]} video folder")
    return _LISTERS[ds.name](root, ds, split)


# --------------------------------------------------------------------------- helpers

def _lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines with their numbers; the official lists have CRLF endings and trailing spaces."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        return [(n, line.strip()) for n, line in enumerate(f, start=1) if line.strip()]


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise PackError(f"{path}: not found; {what}")
    return path


class _Finder:
    """``root/rel`` if it is a file, else the one whose path matches it ignoring case.

    Copies of UCF-101 differ in case (``HandstandPushups/v_HandStandPushups_g01_c01.avi``).
    """

    def __init__(self, root: Path):
        self.root = root
        self._dirs: dict[Path, dict[str, str]] = {}

    def find(self, rel: str) -> Path | None:
        path = self.root / rel
        if path.is_file():
            return path
        here = self.root
        for part in Path(rel).parts:
            names = self._dirs.get(here)
            if names is None:
                try:
                    # sorted in reverse, so of two names equal but for case the first sorted wins
                    names = {n.lower(): n for n in sorted(os.listdir(here), reverse=True)}
                except OSError:
                    names = {}
                self._dirs[here] = names
            actual = names.get(part.lower())
            if actual is None:
                return None
            here = here / actual
        return here if here.is_file() else None


def _annotation_dir(ds: Dataset, root: Path, default: str, what: str) -> Path:
    """The folder ``--annotations`` names (or the folder of the file it names), else ``default``
    inside or next to the video folder."""
    if len(ds.annotations) > 1:
        raise PackError(f"--annotations: {TITLES[ds.name]} takes one folder ({what}), got {len(ds.annotations)}")
    if ds.annotations:
        path = Path(ds.annotations[0])
        if path.is_file():
            path = path.parent
        if not path.is_dir():
            raise PackError(f"{ds.annotations[0]}: no such folder; --annotations is {what}")
        return path
    for candidate in (root / default, root.parent / default):
        if candidate.is_dir():
            return candidate
    raise PackError(f"{root / default} (or {root.parent / default}): not found; pass --annotations "
                    f"PATH/{default} ({what})")


# --------------------------------------------------------------------------- UCF-101

_UCF_WHAT = "the ucfTrainTestlist/ folder of UCF101TrainTestSplits-RecognitionTask.zip"


def _ucf101(root: Path, ds: Dataset, split: str) -> tuple[list[Input], list[str]]:
    ann = _annotation_dir(ds, root, "ucfTrainTestlist", _UCF_WHAT)
    class_ind = _require_file(ann / "classInd.txt", f"--annotations must be {_UCF_WHAT}")
    numbered: dict[int, str] = {}
    for n, line in _lines(class_ind):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) in numbered:
            raise PackError(f"{class_ind} line {n}: expected '<number> <class>' with a new number, got {line!r}")
        numbered[int(parts[0])] = parts[1]
    if sorted(numbered) != list(range(1, len(numbered) + 1)):
        raise PackError(f"{class_ind}: the class numbers must run 1..{len(numbered)} without gaps")
    # classInd numbers from 1; labels are 0-based indices into the class list: class k is label k-1.
    classes = [numbered[k] for k in sorted(numbered)]
    by_folder = {c.lower(): c for c in classes}
    listing = _require_file(ann / f"{split}list{ds.fold:02d}.txt",
                            f"--annotations must be {_UCF_WHAT} (it holds {split}list01-03.txt)")
    finder = _Finder(root)
    inputs = []
    for n, line in _lines(listing):
        parts = line.split()
        rel = parts[0]
        folder = rel.split("/", 1)[0] if "/" in rel else ""
        label = by_folder.get(folder.lower(), folder)
        where = f"{listing.name} line {n}"
        problem = None
        if not folder or len(parts) > 2:
            problem = f"{where}: expected '<class>/<video>[ <class number>]', got {line!r}"
        elif len(parts) == 2:
            number = parts[1]
            if not number.isdigit() or int(number) not in numbered:
                problem = f"{where}: class number {number} is not in classInd.txt"
            elif numbered[int(number)].lower() != folder.lower():
                problem = (f"{where}: class number {number} is {numbered[int(number)]} in classInd.txt, "
                           f"but the video is in {folder}/")
            else:
                label = numbered[int(number)]
        elif folder.lower() not in by_folder:
            problem = f"{where}: class {folder} is not in classInd.txt"
        path = finder.find(rel) if problem is None else None
        if problem is None and path is None:
            problem = f"missing: {rel} is not under {root} ({where})"
        inputs.append(Input(rel, str(path or root / rel), label, split, {"fold": str(ds.fold)}, problem))
    if not inputs:
        raise PackError(f"{listing}: lists no videos")
    return inputs, classes


# --------------------------------------------------------------------------- HMDB-51

_HMDB_WHAT = "the testTrainMulti_7030_splits/ folder of test_train_splits.rar"
_HMDB_FILE = re.compile(r"^(.+)_test_split(\d+)\.txt$")
_HMDB_CODES = {"train": "1", "test": "2"}


def _hmdb_split_files(folder: Path) -> dict[tuple[str, int], Path]:
    found = {}
    for path in sorted(folder.iterdir()):
        m = _HMDB_FILE.match(path.name)
        if m and path.is_file():
            found[m.group(1), int(m.group(2))] = path
    return found


def _hmdb51(root: Path, ds: Dataset, split: str) -> tuple[list[Input], list[str]]:
    ann = _annotation_dir(ds, root, "testTrainMulti_7030_splits", _HMDB_WHAT)
    files = _hmdb_split_files(ann)
    if not files:  # the folder the archive unpacks into, one level up
        subs = [d for d in sorted(ann.iterdir()) if d.is_dir() and _hmdb_split_files(d)]
        if len(subs) == 1:
            ann, files = subs[0], _hmdb_split_files(subs[0])
    if not files:
        raise PackError(f"{ann}: no <class>_test_split1.txt files; --annotations must be {_HMDB_WHAT}")
    # Every class with a split file, sorted: the usual HMDB-51 numbering (brush_hair = 0 ... wave = 50).
    classes = sorted({c for c, _ in files})
    code = _HMDB_CODES[split]
    finder = _Finder(root)
    inputs = []
    for cls in classes:
        path = files.get((cls, ds.fold))
        if path is None:
            raise PackError(f"{ann / f'{cls}_test_split{ds.fold}.txt'}: not found, though {cls} has split files "
                            f"for other folds; --annotations must be the complete {_HMDB_WHAT}")
        for n, line in _lines(path):
            parts = line.split()
            where = f"{path.name} line {n}"
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                # Unreadable: it may belong to this split, so it is a reject here rather than lost.
                rel = f"{cls}/{parts[0]}"
                inputs.append(Input(rel, str(root / rel), cls, split, {"fold": str(ds.fold)},
                                    f"{where}: expected '<video> <0|1|2>', got {line!r}"))
                continue
            if parts[1] != code:
                continue  # the other split, or not used in this fold
            rel = f"{cls}/{parts[0]}"
            found = finder.find(rel)
            problem = None if found else f"missing: {rel} is not under {root} ({where})"
            inputs.append(Input(rel, str(found or root / rel), cls, split, {"fold": str(ds.fold)}, problem))
    if not inputs:
        raise PackError(f"{ann}: the fold {ds.fold} split files list no {split} videos (code {code})")
    return inputs, classes


# --------------------------------------------------------------------------- Kinetics

_KINETICS_WHAT = ("the annotation CSVs (label,youtube_id,time_start,time_end,split: train.csv, validate.csv, ...) "
                  "or their folder; give every split's CSV so that all splits share one class list")


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
            found = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")
                     and p.suffix.lower() in (".csv", ".txt")]
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
            rows = [(n, {k: v.strip() for k, v in zip(header, row)}) for n, row in enumerate(reader, start=2)
                    if any(v.strip() for v in row)]
        tables.append((path, header, rows))
    if not tables:
        raise PackError(f"{', '.join(ds.annotations)}: no CSV with a youtube_id column; "
                        f"--annotations is {_KINETICS_WHAT}")
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
    classes = sorted({row["label"] for _, header, rows in tables if "label" in header for _, row in rows
                      if row.get("label")})
    selected = []
    for path, header, rows in tables:
        by_name = _split_from_name(path)
        for n, row in rows:
            row_split = row.get("split") or by_name
            if row_split is None:
                raise PackError(f"{path} line {n}: no split column and the file name does not say which split; "
                                f"--annotations is {_KINETICS_WHAT}")
            if _SYNONYMS.get(row_split.lower(), row_split.lower()) != split:
                continue
            if "label" not in header:
                raise PackError(f"{path}: the {split} rows have no label column (Kinetics-600/700 test labels "
                                "are not public); pack train or val")
            selected.append((path, n, row))
    if not selected:
        raise PackError(f"no rows of split '{split}' in {', '.join(str(p) for p, _, _ in tables)}; pass the "
                        f"{split} CSV to --annotations")
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
            inputs.append(Input(f"{stem}.mp4", str(root / f"{stem}.mp4"), label, split, meta,
                                f"{where}: time_start/time_end are not numbers"))
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
    return inputs, classes


# --------------------------------------------------------------------------- Something-Something v2

_SSV2_WHAT = "the folder holding labels.json, train.json and validation.json"
_SSV2_FILES = {"train": "train.json", "val": "validation.json", "test": "test.json"}


def _load_json(path: Path, what: str):
    _require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise PackError(f"{path}: not valid JSON ({e})") from None


def _ssv2(root: Path, ds: Dataset, split: str) -> tuple[list[Input], list[str]]:
    if len(ds.annotations) != 1:
        raise PackError(f"--dataset ssv2 needs one --annotations: {_SSV2_WHAT}")
    ann = Path(ds.annotations[0])
    if ann.is_file():
        ann = ann.parent
    if not ann.is_dir():
        raise PackError(f"{ds.annotations[0]}: no such folder; --annotations is {_SSV2_WHAT}")
    labels_path = ann / "labels.json"
    labels = _load_json(labels_path, f"--annotations is {_SSV2_WHAT}")
    try:
        numbered = {int(v): k for k, v in labels.items()}
    except (AttributeError, TypeError, ValueError):
        raise PackError(f"{labels_path}: expected {{\"<class>\": \"<index>\", ...}}") from None
    if sorted(numbered) != list(range(len(labels))):
        raise PackError(f"{labels_path}: the class indices must run 0..{len(labels) - 1}, each once")
    classes = [numbered[k] for k in range(len(numbered))]
    known = set(classes)
    listing = ann / _SSV2_FILES[split]
    entries = _load_json(listing, f"--annotations is {_SSV2_WHAT}")
    if not isinstance(entries, list) or not entries:
        raise PackError(f"{listing}: expected a list of {{\"id\", \"template\", ...}} objects")
    if not any(isinstance(e, dict) and e.get("template") for e in entries):
        raise PackError(f"{listing}: no templates, so no labels (the SSv2 test labels are not in it); "
                        "pack train or val")
    try:
        on_disk = set(os.listdir(root))
    except OSError as e:
        raise PackError(f"{root}: cannot list the videos ({e})") from None
    inputs = []
    for n, entry in enumerate(entries, start=1):
        where = f"{listing.name} entry {n}"
        entry = entry if isinstance(entry, dict) else {}
        video_id = str(entry.get("id") or "").strip()
        template = entry.get("template")
        # The class is the template without its brackets: "Holding [something]" -> "Holding something".
        label = template.replace("[", "").replace("]", "").strip() if isinstance(template, str) else ""
        meta = {"id": video_id}
        if isinstance(template, str):
            meta["template"] = template
        if entry.get("placeholders") is not None:
            meta["placeholders"] = json.dumps(entry["placeholders"], ensure_ascii=False)
        rel = f"{video_id}.webm"
        problem = None
        # Reasons start with their kind (index.json counts reject_reasons by the text before ':').
        if not video_id:
            problem, rel = f"bad entry: {where} has no id", f"<{where}>"
        elif not label:
            problem = f"bad entry: {where} ({video_id}) has no template"
        elif label not in known:
            problem = f"unknown class: {label!r} ({where}, the template without brackets) is not in labels.json"
        elif rel not in on_disk:
            problem = f"missing: {rel} is not in {root} ({where})"
        inputs.append(Input(rel, str(root / rel), label, split, meta, problem))
    return inputs, classes


_LISTERS = {"ucf101": _ucf101, "hmdb51": _hmdb51, "kinetics": _kinetics, "ssv2": _ssv2}
