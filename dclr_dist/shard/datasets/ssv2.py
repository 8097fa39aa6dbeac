"""Something-Something v2: ``labels.json`` indices, ``train.json``/``validation.json`` entries."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dclr_dist.shard.common import Input, PackError
from dclr_dist.shard.datasets.common import Dataset, _require_file

_SSV2_WHAT = "the folder holding labels.json, train.json and validation.json (or their 20BN names)"
# Each file under the current package's name, then the original 20BN name (PySlowFast reads those).
_SSV2_FILES = {
    "labels": ("labels.json", "something-something-v2-labels.json"),
    "train": ("train.json", "something-something-v2-train.json"),
    "val": ("validation.json", "something-something-v2-validation.json"),
    "test": ("test.json", "something-something-v2-test.json"),
    "answers": ("test-answers.csv", "something-something-v2-test-answers.csv"),
}


def _find(ann: Path, role: str) -> Path:
    """The annotation file of ``role`` in ``ann``, under either of its names (the first if neither)."""
    names = _SSV2_FILES[role]
    return next((ann / n for n in names if (ann / n).is_file()), ann / names[0])


def _test_answers(path: Path) -> dict[str, str]:
    """``id;class`` lines of the test split's answers (shipped with the current SSv2 package)."""
    answers = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        video_id, sep, label = line.partition(";")
        if not sep:
            raise PackError(f"{path} line {n}: expected 'id;class', got {line[:80]!r}")
        answers[video_id.strip()] = label.strip()
    return answers


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
    labels_path = _find(ann, "labels")
    labels = _load_json(labels_path, f"--annotations is {_SSV2_WHAT}")
    try:
        numbered = {int(v): k for k, v in labels.items()}
    except (AttributeError, TypeError, ValueError):
        raise PackError(f'{labels_path}: expected {{"<class>": "<index>", ...}}') from None
    if sorted(numbered) != list(range(len(labels))):
        raise PackError(f"{labels_path}: the class indices must run 0..{len(labels) - 1}, each once")
    classes = [numbered[k] for k in range(len(numbered))]
    known = set(classes)
    listing = _find(ann, split)
    entries = _load_json(listing, f"--annotations is {_SSV2_WHAT}")
    if not isinstance(entries, list) or not entries:
        raise PackError(f'{listing}: expected a list of {{"id", "template", ...}} objects')
    answers = None
    if not any(isinstance(e, dict) and e.get("template") for e in entries):
        answers_path = _find(ann, "answers")
        if not answers_path.is_file():
            raise PackError(
                f"{listing}: no templates, so no labels; the test split's are in {answers_path.name} (shipped "
                "with the current SSv2 package): put it beside it, or pack train or val"
            )
        answers = _test_answers(answers_path)
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
        # The class is the template without its brackets: "Holding [something]" -> "Holding something";
        # the test split's class is its answer, already without them.
        if answers is not None:
            label = answers.get(video_id, "")
        else:
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
            problem = f"bad entry: {where} ({video_id}) has no " + ("answer" if answers is not None else "template")
        elif label not in known:
            problem = f"unknown class: {label!r} ({where}, the template without brackets) is not in labels.json"
        elif rel not in on_disk:
            problem = f"missing: {rel} is not in {root} ({where})"
        inputs.append(Input(rel, str(root / rel), label, split, meta, problem))
    return inputs, classes
