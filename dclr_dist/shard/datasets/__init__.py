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

import os
import re
from urllib.parse import parse_qsl, quote, unquote, urlencode

from dclr_dist import storage
from dclr_dist.shard.common import Input, PackError
from dclr_dist.shard.datasets.common import _SYNONYMS, TITLES, Dataset
from dclr_dist.shard.datasets.hmdb51 import _hmdb51
from dclr_dist.shard.datasets.kinetics import _kinetics
from dclr_dist.shard.datasets.ssv2 import _ssv2
from dclr_dist.shard.datasets.ucf101 import _ucf101

NAMES = ("ucf101", "hmdb51", "kinetics", "ssv2")
SPLITS = {
    "ucf101": ("train", "test"),
    "hmdb51": ("train", "test"),
    "kinetics": ("train", "val", "test"),
    "ssv2": ("train", "val", "test"),
}
_FOLDS = (1, 2, 3)
_SPEC = re.compile(r"^(ucf101|hmdb51|kinetics|ssv2):(.*)$", re.DOTALL)


def spec(
    name: str, root: str | os.PathLike, *, annotations: str | os.PathLike | list | tuple = (), fold: int | None = None
) -> str:
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
                raise PackError(
                    f"--fold {value!r}: not a number; {TITLES[m.group(1)]} has the folds 1, 2 and 3"
                ) from None
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
            raise PackError(
                f"--fold {ds.fold}: {TITLES[ds.name]} has the official splits 1, 2 and 3; pass --fold 1, 2 or 3"
            )
    elif ds.fold is not None:
        raise PackError(f"--fold applies to ucf101 and hmdb51; {TITLES[ds.name]} has one official split: drop --fold")
    if storage.is_s3(ds.root):
        raise PackError(
            f"{ds.root}: --dataset reads videos from local disk (or a mounted file system); "
            "for videos in S3 write a .csv manifest whose rows point at them"
        )
    root = storage.local_path(ds.root)
    if not root.is_dir():
        raise PackError(f"{ds.root}: no such folder; --input is the {TITLES[ds.name]} video folder")
    return _LISTERS[ds.name](root, ds, split)


_LISTERS = {"ucf101": _ucf101, "hmdb51": _hmdb51, "kinetics": _kinetics, "ssv2": _ssv2}
