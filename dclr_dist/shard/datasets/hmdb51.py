"""HMDB-51: ``<class>_test_splitN.txt`` files (1 train, 2 test, 0 unused) of three folds."""

from __future__ import annotations

import re
from pathlib import Path

from dclr_dist.shard.common import Input, PackError
from dclr_dist.shard.datasets.common import Dataset, _annotation_dir, _Finder, _lines

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
            raise PackError(
                f"{ann / f'{cls}_test_split{ds.fold}.txt'}: not found, though {cls} has split files "
                f"for other folds; --annotations must be the complete {_HMDB_WHAT}"
            )
        for n, line in _lines(path):
            parts = line.split()
            where = f"{path.name} line {n}"
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                # Unreadable: it may belong to this split, so it is a reject here rather than lost.
                rel = f"{cls}/{parts[0]}"
                inputs.append(
                    Input(
                        rel,
                        str(root / rel),
                        cls,
                        split,
                        {"fold": str(ds.fold)},
                        f"{where}: expected '<video> <0|1|2>', got {line!r}",
                    )
                )
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
