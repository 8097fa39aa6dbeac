"""UCF-101: ``classInd.txt`` numbering, ``trainlist0N.txt``/``testlist0N.txt`` of three folds."""

from __future__ import annotations

from pathlib import Path

from dclr_dist.shard.common import Input, PackError
from dclr_dist.shard.datasets.common import Dataset, _annotation_dir, _Finder, _lines, _require_file

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
    listing = _require_file(
        ann / f"{split}list{ds.fold:02d}.txt", f"--annotations must be {_UCF_WHAT} (it holds {split}list01-03.txt)"
    )
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
                problem = (
                    f"{where}: class number {number} is {numbered[int(number)]} in classInd.txt, "
                    f"but the video is in {folder}/"
                )
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
