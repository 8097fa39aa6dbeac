"""The inputs of a packing: class folders, CSV/JSONL manifests and public datasets listed as
``Input``s in a stable order, with the dataset's class list, and each sample's WebDataset key."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dclr_dist import storage
from dclr_dist.shard.common import Input, PackError


def list_inputs(input_url: str, split: str | None = None) -> tuple[list[Input], list[str]]:
    """Inputs in a stable order and the class names of the whole dataset.

    A folder is read as ``IN/<class>/<file>`` (UCF-101/HMDB-51 layout; deeper files take the
    class of their top folder; symbolic links to folders and files are followed). A ``.csv``
    or ``.jsonl`` file is a manifest with ``path,label[,split]`` and any extra columns, kept
    as ``meta``. A public dataset in its official layout is named by ``datasets.spec()``
    (``ucf101:...``, ``hmdb51:...``, ``kinetics:...``, ``ssv2:...``) and read from its own
    split files. Whatever cannot be packed is still an input, with a ``problem``: a hidden
    file or folder, a broken link, a link loop, a manifest row that cannot be read.

    The class list never depends on ``split``: it comes from every class folder, from every
    row of a manifest (all splits), or from the dataset's own class list, so the train and
    test packings of one dataset share one numbering even when a split lacks a class.
    Manifest and folder labels are sorted (integer labels as numbers).
    """
    from dclr_dist.shard import datasets

    dataset = datasets.parse(input_url)
    if dataset is not None:
        inputs, classes = datasets.list_dataset(dataset, split)
        _mark_duplicates(inputs)
        return inputs, classes
    manifest = input_url.lower().endswith((".csv", ".jsonl"))
    if storage.is_s3(input_url) and not manifest:
        raise PackError(
            f"{input_url}: an S3 input must be a manifest file (.csv or .jsonl) "
            "whose rows point at the videos; class folders are read from local disk"
        )
    path = None if storage.is_s3(input_url) else storage.local_path(input_url)
    if path is not None and path.is_dir():
        inputs, classes = _list_folder(path)
        if _split_first(path, classes):
            if split is None:
                raise PackError(
                    f"{input_url}: holds split folders ({', '.join(sorted(classes))}), each with class folders: "
                    f"pack one split at a time with --split (e.g. --split {sorted(classes)[-1]})"
                )
            inputs, classes = _split_first_inputs(inputs)
    elif manifest and (path is None or path.exists()):
        inputs = _list_manifest(input_url if path is None else str(path))
        # Before the split is chosen: a class that one split lacks must not shift the labels of the rest.
        classes = list({i.label for i in inputs if i.problem is None})
    elif not path.exists():
        raise PackError(f"{input_url}: no such file or folder")
    else:
        raise PackError(f"{input_url}: expected a class folder or a .csv/.jsonl manifest")
    return _choose_split(input_url, inputs, classes, split)


def _choose_split(
    input_url: str, inputs: list[Input], classes: list[str], split: str | None
) -> tuple[list[Input], list[str]]:
    """The inputs of ``split`` (all without one), duplicates marked, and the sorted classes."""
    if split is not None:
        # Split names are matched without case: "Train" rows are --split train's, not left out.
        for i in inputs:
            if i.split is not None and i.split.casefold() == split.casefold():
                i.split = split
        if not any(i.split == split for i in inputs):
            found = sorted({i.split for i in inputs if i.split})
            raise PackError(
                f"{input_url}: no inputs with split '{split}' "
                + (f"(splits found: {', '.join(found)})" if found else "(it names no splits)")
            )
        # A row whose split is unknown may belong to this one: a reject here, not silently left out.
        inputs = [i for i in inputs if i.split == split or i.split is None]
        for i in inputs:
            if i.problem is None and i.split is None:
                i.problem = f"no split: {i.where} names none, and --split {split} packs the rows of split {split}"
    _mark_duplicates(inputs)
    return inputs, _sorted_classes(set(classes))


# Top folders that name splits, not classes (IN/train/<class>/..., as Kinetics and many exports ship).
_SPLIT_FOLDERS = {"train", "training", "val", "valid", "validation", "test", "testing"}


def _split_first(root: Path, top: list[str]) -> bool:
    """Whether ``root`` is ``IN/<split>/<class>/<file>``: every top folder a split name holding folders."""
    if not top or not all(t.casefold() in _SPLIT_FOLDERS for t in top):
        return False
    return all(any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(root / t)) for t in top)


def _split_first_inputs(inputs: list[Input]) -> tuple[list[Input], list[str]]:
    """Inputs of a split-first tree: the split from the top folder, the class from the next; the
    classes of every split together, so each split's packing numbers them alike."""
    classes: set[str] = set()
    for i in inputs:
        parts = i.source.split("/")
        i.split = parts[0]
        if len(parts) >= 3:
            i.label = parts[1]
            classes.add(parts[1])
        elif i.problem is None:
            i.problem = (
                f"not inside a class folder (expected IN/{parts[0]}/<class>/<video>); move it into its class folder"
            )
    return inputs, sorted(classes)


def _printable(name: str) -> str:
    # A name that is not UTF-8 (an old Latin-1 archive) arrives with surrogate escapes, which
    # JSON and the key's hash cannot encode: records show those bytes as \xNN.
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _list_folder(root: Path) -> tuple[list[Input], list[str]]:
    inputs: list[Input] = []
    classes: list[str] = []
    _walk_folder(root, str(root), "", "", (os.path.realpath(root),), inputs, classes)
    if not inputs:
        raise PackError(f"{root}: no files found (expected IN/<class>/<video files>)")
    inputs.sort(key=lambda i: i.source)
    return inputs, classes


def _walk_folder(
    root: Path, folder: str, rel: str, label: str, ancestors: tuple[str, ...], inputs: list[Input], classes: list[str]
) -> None:
    """Append the files under ``folder`` to ``inputs`` (and the class folders to ``classes``).

    ``ancestors``: the real paths of ``folder`` (last) and the folders above it.
    """
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        if not rel:
            raise PackError(f"{root}: cannot list the folder ({e.strerror or e})") from None
        inputs.append(Input(f"{rel}/", folder, label, problem=f"unreadable folder: {e.strerror or e}"))
        return
    for entry in entries:
        _walk_entry(root, entry, rel, label, ancestors, inputs, classes)


def _walk_entry(
    root: Path,
    entry: os.DirEntry,
    rel: str,
    label: str,
    ancestors: tuple[str, ...],
    inputs: list[Input],
    classes: list[str],
) -> None:
    """Append one entry of a folder to ``inputs``, with a problem if it cannot be packed, or walk into it."""
    name = _printable(entry.name)
    sub = f"{rel}/{name}" if rel else name
    try:
        is_dir = entry.is_dir()  # follows links: a class folder linked in from elsewhere is read
    except OSError:
        is_dir = False  # a link that cannot be followed: the transcoder says why
    if entry.name.startswith("."):
        what = "folder, not read" if is_dir else "file"
        inputs.append(
            Input(
                sub,
                entry.path,
                label,
                problem=f"hidden: a hidden {what} (.DS_Store, .git, ._ files: names starting with '.' are not packed)",
            )
        )
    elif is_dir:
        real = os.path.realpath(entry.path)
        if real in ancestors:
            inputs.append(
                Input(
                    sub,
                    entry.path,
                    label,
                    problem="symlink loop: a link back to a folder that contains it; not followed",
                )
            )
        else:
            if not rel:
                classes.append(name)
            _walk_folder(root, entry.path, sub, label or name, (*ancestors, real), inputs, classes)
    else:
        inp = _file_input(entry, sub, rel, label, ancestors)
        raw = entry.path[len(str(root)) + 1 :]
        inp.raw = raw if raw != sub else None
        inputs.append(inp)


def _file_input(entry: os.DirEntry, sub: str, rel: str, label: str, ancestors: tuple[str, ...]) -> Input:
    """The input of a file in the tree, with a problem if it is a broken link or outside a class folder."""
    if entry.is_symlink() and not os.path.exists(entry.path):
        return Input(
            sub,
            entry.path,
            label,
            problem=f"file not found: a broken symbolic link (to {_printable(os.readlink(entry.path))})",
        )
    # The file a link names: a video linked into the tree twice is one sample and one duplicate.
    real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(ancestors[-1], entry.name)
    return Input(
        sub,
        real,
        label,
        problem=None
        if rel
        else "not inside a class folder (expected IN/<class>/<video>); move it into its class folder",
    )


_KNOWN_COLUMNS = ("path", "label", "split")
_DELIMITERS = (",", ";", "\t")  # spreadsheets in many locales write ';' ("CSV"), or tabs


def _column(name: str) -> str:
    # Spreadsheets write "Path", " label" or a byte-order mark (removed by utf-8-sig).
    name = name.strip()
    return name.lower() if name.lower() in _KNOWN_COLUMNS else name


def _read_text(path: str) -> str:
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise PackError(f"{path}: no such manifest") from None
    except storage.StorageError as e:
        raise PackError(f"cannot read the manifest: {e}") from None
    except OSError as e:
        raise PackError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PackError(
            f"{path}: line {line} is not UTF-8 (byte 0x{data[e.start]:02x}); save the manifest as "
            "UTF-8 (Excel: 'CSV UTF-8') or convert it, e.g. iconv -f cp1252 -t utf-8"
        ) from None


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _csv_rows(path: str, text: str) -> Iterator[tuple[int, dict[str, Any], str | None]]:
    """(line, row, problem) for every non-blank row; the header is checked here, up front."""
    for delimiter in _DELIMITERS:
        # strict: a stray quote is an error here, not a value that silently swallows the rows after it.
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        header = next((row for row in reader if any(f.strip() for f in row)), [])
        columns = [_column(h) for h in header]
        if {"path", "label"} <= set(columns):
            break
    else:
        first = next((line.strip() for line in text.split("\n") if line.strip()), "")
        raise PackError(
            f"{path}: the header must name the columns path,label[,split]; missing "
            f"{', '.join(sorted({'path', 'label'} - set(columns)))} (first line: {first[:80]!r})"
        )
    for n, name in enumerate(columns):
        if name and columns.index(name) != n:
            raise PackError(
                f"{path}: the header names the column '{name}' twice (columns {columns.index(name) + 1} "
                f"and {n + 1}); rename one"
            )
    end = reader.line_num
    try:
        for fields in reader:
            n, end = end + 1, reader.line_num
            if not any(f.strip() for f in fields):
                continue  # blank lines, and the empty rows spreadsheets write
            if end > n:
                raise PackError(
                    f"{path}: line {n}: a quoted value runs on to line {end}, taking the rows between "
                    "with it; check the quotes on that line"
                )
            where = f"{_basename(path)} line {n}"
            problem = None
            if any(f.strip() for f in fields[len(columns) :]):
                problem = (
                    f"bad row: {where} has {len(fields)} fields where the header has {len(columns)} (a "
                    f"'{delimiter}' inside a value? quote the value)"
                )
            elif any(f.strip() for name, f in zip(columns, fields) if not name):
                problem = (
                    f"bad row: {where} has a value in a column the header does not name (a "
                    f"'{delimiter}' inside a value? quote the value)"
                )
            yield n, {name: f for name, f in zip(columns, fields) if name}, problem
    except csv.Error as e:
        raise PackError(f"{path}: line {end + 1}: {e}; check the quotes on that line") from None


def _jsonl_rows(path: str, text: str) -> Iterator[tuple[int, dict[str, Any], str | None]]:
    # Split on newlines only: str.splitlines() would also cut at U+2028 inside a JSON string.
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{_basename(path)} line {n}"
        try:
            row = json.loads(line)
        except ValueError as e:
            yield n, {}, f"bad row: {where} is not a JSON object ({e})"
            continue
        if not isinstance(row, dict):
            yield n, {}, f"bad row: {where} is not a JSON object (found a {type(row).__name__})"
            continue
        columns = [_column(k) for k in row]
        twice = sorted({c for c in columns if columns.count(c) > 1})
        yield (
            n,
            dict(zip(columns, row.values())),
            (f"bad row: {where} names {', '.join(twice)} twice (ignoring case and spaces)" if twice else None),
        )


def _text(value: Any) -> str | None:
    """A cell as text; None for what cannot be one (a list, a number with a fraction, true)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _list_manifest(path: str) -> list[Input]:
    """The rows of a local or S3 manifest; relative paths are relative to its folder."""
    base = path.rsplit("/", 1)[0] if storage.is_s3(path) else str(Path(path).parent)
    text = _read_text(path)
    rows = list(_csv_rows(path, text) if path.lower().endswith(".csv") else _jsonl_rows(path, text))
    inputs = []
    for n, row, problem in rows:
        where = f"{_basename(path)} line {n}"
        src, label, split = (_text(row.get(k)) for k in _KNOWN_COLUMNS)
        for key, value in (("path", src), ("label", label), ("split", split)):
            if problem is None and value is None:
                problem = f"bad row: {where}: {key} must be text, got {json.dumps(row[key])}"
        # A bad row's fields may be shifted: its split is unknown, so every split's packing rejects it.
        bad = problem is not None
        if not bad and not src:
            problem = f"empty path: {where}"
        elif not bad and not label:
            problem = f"empty label: {where}"
        meta = {
            k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
            for k, v in row.items()
            if k not in _KNOWN_COLUMNS and v is not None
        }
        src = src or f"<{where}>"
        url = src if storage.is_s3(src) or os.path.isabs(src) else storage.join(base, src)
        inputs.append(Input(src, url, label or "", None if bad else split or None, meta, problem, where))
    if not inputs:
        raise PackError(f"{path}: the manifest has no rows")
    # Manifest order is the user's; keep it (stable, and what they expect to see in shards).
    return inputs


def _mark_duplicates(inputs: list[Input]) -> None:
    # By the file itself: a manifest may name one file relatively, absolutely, through a link or '..'.
    seen: dict[str, Input] = {}
    for i in inputs:
        if i.problem is not None:
            continue
        same = i.url if storage.is_s3(i.url) else os.path.realpath(i.url)
        if same in seen:
            first = seen[same]
            labels = "" if first.label == i.label else f" (labelled {first.label!r} there, {i.label!r} here)"
            i.problem = f"duplicate: the same file as {first.source}, listed earlier{labels}"
        else:
            seen[same] = i


def _sorted_classes(labels: set[str]) -> list[str]:
    # Integer labels ("1", "2", "10") sort as numbers, so label index follows the user's numbering;
    # labels equal as numbers ("1", "01") then by text, so no order depends on the hash seed.
    # ASCII digits only: "²" is a digit to str.isdigit but not a number to int().
    if labels and all(label.isascii() and label.isdigit() for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))
    return sorted(labels)


def canonical_input(input_url: str) -> str:
    """One spelling of an input for its packing's fingerprint: ``DIR``, ``DIR/``, ``./DIR``, an
    absolute path or a link to it are the same input (and a dataset's root and annotations)."""
    from dclr_dist.shard import datasets

    def local(path: str) -> str:
        return path if storage.is_s3(path) else os.path.realpath(os.path.expanduser(path))

    dataset = datasets.parse(input_url)
    if dataset is not None:
        return datasets.spec(
            dataset.name, local(dataset.root), annotations=[local(a) for a in dataset.annotations], fold=dataset.fold
        )
    return local(input_url)


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _slug(text: str, limit: int) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return _UNSAFE.sub("_", ascii_text).strip("_")[:limit] or "x"


def sample_key(inp: Input) -> str:
    """A WebDataset key for any file name.

    WebDataset cuts keys at the first dot and treats '/' as folders, so the key keeps only
    [A-Za-z0-9_-] from the class and file stem for readability, and a hash of the source
    path for uniqueness (the same file name in two class folders stays two samples).
    """
    digest = hashlib.sha1((inp.raw or inp.source).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    stem = inp.source.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return f"{_slug(inp.label, 24)}-{_slug(stem, 40)}-{digest}"
