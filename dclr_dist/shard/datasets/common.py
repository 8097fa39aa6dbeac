"""What the dataset listers share: the choice of dataset, split names, finding files and annotations."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dclr_dist.shard.common import PackError

TITLES = {"ucf101": "UCF-101", "hmdb51": "HMDB-51", "kinetics": "Kinetics", "ssv2": "Something-Something v2"}
_SYNONYMS = {"validation": "val", "validate": "val", "valid": "val", "training": "train", "testing": "test"}


@dataclass(frozen=True)
class Dataset:
    name: str
    root: str  # the video folder
    annotations: tuple[str, ...] = ()
    fold: int | None = None


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
    raise PackError(
        f"{root / default} (or {root.parent / default}): not found; pass --annotations PATH/{default} ({what})"
    )
