"""Pack a video corpus into WebDataset tar shards, resumably, with nothing lost.

Data flow: list inputs (class folders or a manifest) -> transcode in parallel (local
processes or Ray tasks, results consumed in input order) -> append to the open shard ->
publish each finished shard atomically -> ``index.json`` last, as the mark of completion.

Invariant: every input ends up either in a shard or in ``rejects.jsonl``, so
``index.samples + index.rejected == index.inputs == len(inputs)``.

Inputs are written in a seeded random order (``shard.shuffle``, ``shard.seed``), so a
shard holds a sample of every class rather than a run of one.

Resume: after each shard is published, a small state file ``_partial/<shard>.json`` records
which input range it consumed (samples and rejects). A re-run with the same inputs and
options keeps those shards and redoes the rest; because the input order is fixed, transcoding is
deterministic and tar headers carry no clock, the result is byte-identical to an
uninterrupted run.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import time
import unicodedata
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dclr_dist import __version__, storage
from dclr_dist.config import ShardConfig
from dclr_dist.shard.transcode import Encoded, Rejected, transcode

FORMAT_VERSION = 1
STATE_DIR = "_partial"


class PackError(RuntimeError):
    """The packing run cannot start or continue; the message says what to do."""


@dataclass
class Input:
    """One accepted input: a row of the manifest or a file in a class folder."""

    source: str  # as the user named it (relative to IN), kept in the record for tracing
    url: str  # where to read it
    label: str
    split: str | None = None
    meta: dict[str, str] = field(default_factory=dict)
    # Set when the input is unusable before any decoding (bad manifest row, duplicate).
    problem: str | None = None


# --------------------------------------------------------------------------- inputs

def list_inputs(input_url: str, split: str | None = None) -> tuple[list[Input], list[str]]:
    """Inputs in a stable order and the class names of the whole dataset.

    A folder is read as ``IN/<class>/<file>`` (UCF-101/HMDB-51 layout; deeper files take the
    class of their top folder; hidden files are skipped). A ``.csv`` or ``.jsonl`` file is a
    manifest with ``path,label[,split]`` and any extra columns, kept as ``meta``. A public
    dataset in its official layout is named by ``datasets.spec()`` (``ucf101:...``,
    ``hmdb51:...``, ``kinetics:...``, ``ssv2:...``) and read from its own split files.

    The class list never depends on ``split``: it comes from every row of a manifest (all
    splits), or from the dataset's own class list, so the train and test packings of one
    dataset share one numbering even when a split lacks a class. Manifest and folder labels
    are sorted (integer labels as numbers).
    """
    from dclr_dist.shard import datasets

    dataset = datasets.parse(input_url)
    if dataset is not None:
        inputs, classes = datasets.list_dataset(dataset, split)
        _mark_duplicates(inputs)
        return inputs, classes
    if storage.is_s3(input_url):
        raise PackError(f"{input_url}: an S3 input must be a manifest file (.csv or .jsonl) "
                        "whose rows point at the videos; class folders are read from local disk")
    path = storage.local_path(input_url)
    if path.is_dir():
        inputs = _list_folder(path)
    elif path.suffix.lower() in (".csv", ".jsonl"):
        inputs = _list_manifest(path)
    elif not path.exists():
        raise PackError(f"{input_url}: no such file or folder")
    else:
        raise PackError(f"{input_url}: expected a class folder or a .csv/.jsonl manifest")
    # Before the split is chosen: a class that one split lacks must not shift the labels of the rest.
    classes = _sorted_classes({i.label for i in inputs if i.problem is None})
    if split is not None:
        inputs = [i for i in inputs if i.split == split]
        if not inputs:
            raise PackError(f"{input_url}: no inputs with split '{split}'")
    _mark_duplicates(inputs)
    return inputs, classes


def _list_folder(root: Path) -> list[Input]:
    inputs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = (rel_dir / name).as_posix()
            if rel_dir == Path("."):
                inputs.append(Input(rel, str(root / rel), "", problem="not inside a class folder "
                                    "(expected IN/<class>/<video>); move it into its class folder"))
            else:
                inputs.append(Input(rel, str(root / rel), rel_dir.parts[0]))
    if not inputs:
        raise PackError(f"{root}: no files found (expected IN/<class>/<video files>)")
    inputs.sort(key=lambda i: i.source)
    return inputs


def _list_manifest(path: Path) -> list[Input]:
    base = path.parent
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"path", "label"} - set(reader.fieldnames or [])
            if missing:
                raise PackError(f"{path}: the header must name the columns path,label[,split]; "
                                f"missing {', '.join(sorted(missing))}")
            rows = [(n, row) for n, row in enumerate(reader, start=2)]
    else:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("not an object")
                except ValueError as e:
                    row = {"__error__": f"line {n} is not a JSON object ({e})"}
                rows.append((n, row))
    inputs = []
    for n, row in rows:
        src = str(row.get("path") or "").strip()
        label = str(row.get("label") if row.get("label") is not None else "").strip()
        split = str(row["split"]).strip() if row.get("split") not in (None, "") else None
        meta = {k: str(v) for k, v in row.items() if k not in ("path", "label", "split", "__error__")
                and v is not None}
        url = src if storage.is_s3(src) or os.path.isabs(src) else str(base / src)
        problem = row.get("__error__")
        if problem is None and not src:
            problem = f"{path.name} line {n}: empty path"
        elif problem is None and not label:
            problem = f"{path.name} line {n}: empty label"
        inputs.append(Input(src or f"<{path.name} line {n}>", url, label, split, meta, problem))
    if not inputs:
        raise PackError(f"{path}: the manifest has no rows")
    # Manifest order is the user's; keep it (stable, and what they expect to see in shards).
    return inputs


def _mark_duplicates(inputs: list[Input]) -> None:
    seen: dict[str, str] = {}
    for i in inputs:
        if i.problem is not None:
            continue
        if i.url in seen:
            i.problem = f"duplicate of an earlier input with the same path ({seen[i.url]})"
        else:
            seen[i.url] = i.source


def _sorted_classes(labels: set[str]) -> list[str]:
    # Integer labels ("1", "2", "10") sort as numbers, so label index follows the user's numbering.
    if labels and all(l.isdigit() for l in labels):
        return sorted(labels, key=int)
    return sorted(labels)


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
    digest = hashlib.sha1(inp.source.encode("utf-8")).hexdigest()[:12]
    stem = inp.source.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return f"{_slug(inp.label, 24)}-{_slug(stem, 40)}-{digest}"


# --------------------------------------------------------------------------- workers

def _work(source: str, cfg: ShardConfig) -> Encoded | Rejected:
    try:
        return transcode(source, cfg)
    except Exception as e:  # a decoder bug on one file must not end a day-long run
        return Rejected(f"unexpected error while transcoding: {type(e).__name__}: {e}")


def _local_executor(workers: int) -> tuple[Callable[[str, ShardConfig], Future], Callable[[], None], int]:
    import multiprocessing as mp

    # spawn: boto3 and FFmpeg state must not be inherited across fork.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    return (lambda src, cfg: pool.submit(_work, src, cfg)), lambda: pool.shutdown(cancel_futures=True), workers


def _ray_executor() -> tuple[Callable[[str, ShardConfig], Future], Callable[[], None], int]:
    import ray

    # Honours RAY_ADDRESS (e.g. `ray job submit` or a running cluster); otherwise starts one here.
    ray.init(ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(num_cpus=1, max_retries=3)(_work)
    slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return (lambda src, cfg: remote.remote(src, cfg).future()), (lambda: None), slots


def _ordered(inputs: Iterable[Input], submit, slots: int, cfg: ShardConfig) -> Iterator[tuple[Input, Encoded | Rejected]]:
    """Results in input order with at most ``2 * slots`` in flight: memory stays flat."""
    window: deque[tuple[Input, Future | Rejected]] = deque()
    for inp in inputs:
        window.append((inp, Rejected(inp.problem) if inp.problem else submit(inp.url, cfg)))
        if len(window) >= 2 * slots:
            inp0, fut = window.popleft()
            yield inp0, fut if isinstance(fut, Rejected) else fut.result()
    while window:
        inp0, fut = window.popleft()
        yield inp0, fut if isinstance(fut, Rejected) else fut.result()


# --------------------------------------------------------------------------- shards

def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    # No clock, no owner: the same samples always give the same bytes.
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o444, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


class _ShardWriter:
    def __init__(self, output: str, name: str, tmp_dir: str):
        self.url = storage.join(output, name)
        self.name = name
        fd, self.tmp = storage.local_temp(tmp_dir, name)
        self.file = os.fdopen(fd, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0
        self.bytes = 0

    def add(self, key: str, mp4: bytes, record: dict) -> None:
        _tar_member(self.tar, f"{key}.mp4", mp4)
        _tar_member(self.tar, f"{key}.json", json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
        self.samples += 1
        self.bytes += len(mp4)

    def publish(self) -> dict:
        self.tar.close()
        self.file.close()
        digest = hashlib.sha256()
        with open(self.tmp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        size = os.path.getsize(self.tmp)
        storage.publish_file(self.tmp, self.url)
        return {"name": self.name, "samples": self.samples, "bytes": size, "sha256": digest.hexdigest()}

    def discard(self) -> None:
        self.tar.close()
        self.file.close()
        Path(self.tmp).unlink(missing_ok=True)


def _fingerprint(input_url: str, split: str | None, cfg: ShardConfig, inputs: list[Input], classes: list[str]) -> str:
    # The classes too: they come from every split, so a row added to another split can renumber this one.
    digest = hashlib.sha256(json.dumps([input_url, split, dataclasses.asdict(cfg), classes], sort_keys=True).encode())
    for i in inputs:
        digest.update(json.dumps([i.source, i.url, i.label, i.split, i.meta, i.problem], sort_keys=True).encode())
    return digest.hexdigest()


@dataclass
class PackResult:
    index: dict
    resumed_shards: int  # shards kept from an interrupted earlier run
    already_complete: bool = False  # OUT held this exact packing: nothing was done


def pack(input_url: str, output: str, cfg: ShardConfig, *, split: str | None = None, workers: int = 1,
         use_ray: bool = False, overwrite: bool = False, progress: bool = True) -> PackResult:
    """Pack ``input_url`` into shards under ``output``; see the module docstring."""
    inputs, classes = list_inputs(input_url, split)
    if cfg.shuffle:
        # Listings are class-sorted: shards in that order give class-correlated batches and a
        # reader's shuffle buffer cannot undo it at scale. Seeded, so resume sees the same order.
        order = np.random.default_rng(cfg.seed).permutation(len(inputs))
        inputs = [inputs[i] for i in order]
    storage.ensure_writable(output)
    fingerprint = _fingerprint(input_url, split, cfg, inputs, classes)
    index_url = storage.join(output, "index.json")
    if overwrite:
        _clear(output, cfg.prefix)
    elif storage.exists(index_url):
        existing = json.loads(storage.read_bytes(index_url))
        if existing.get("fingerprint") == fingerprint:
            return PackResult(existing, resumed_shards=len(existing["shards"]), already_complete=True)
        raise PackError(f"{output} already holds a packing of other inputs or options (index.json). "
                        "Choose another --output, or pass --overwrite to replace it.")
    states = _load_states(output, cfg.prefix, fingerprint)
    if states is None:
        raise PackError(f"{output} holds an interrupted packing of other inputs or options "
                        f"({STATE_DIR}/). Re-run with the original inputs and options to resume it, "
                        "choose another --output, or pass --overwrite to start again.")
    storage.write_bytes(storage.join(output, f"{STATE_DIR}/run.json"),
                        json.dumps({"fingerprint": fingerprint}).encode())
    resumed = len(states)
    if storage.is_s3(output):
        tmp_dir = tempfile.gettempdir()
    else:
        # Shards are assembled next to their final name so publishing is a rename; a killed
        # run leaves its half-written temporaries behind, which nothing will ever finish.
        tmp_dir = str(storage.local_path(output))
        for stale in Path(tmp_dir).glob(f".{cfg.prefix}-*.tmp"):
            stale.unlink()

    label_index = {c: n for n, c in enumerate(classes)}
    done = states[-1]["next_input"] if states else 0
    submit, shutdown, slots = _ray_executor() if use_ray else _local_executor(workers)
    bar = _progress(len(inputs), done, progress)
    rejected = sum(len(s["rejects"]) for s in states)
    pending_rejects: list[dict] = []
    writer: _ShardWriter | None = None
    first = done
    start = time.monotonic()
    try:
        for n, (inp, result) in enumerate(_ordered(inputs[done:], submit, slots, cfg), start=done):
            if isinstance(result, Rejected):
                pending_rejects.append({"source": inp.source, "label": inp.label, "reason": result.reason})
                rejected += 1
            else:
                if writer is not None and writer.bytes + len(result.mp4) > cfg.max_bytes:
                    states.append(_close(writer, output, fingerprint, first, n, pending_rejects))
                    writer, first, pending_rejects = None, n, []
                if writer is None:
                    name = f"{cfg.prefix}-{len(states):06d}.tar"
                    writer = _ShardWriter(output, name, tmp_dir)
                key = sample_key(inp)
                writer.add(key, result.mp4, _record(inp, result, label_index, key))
                if writer.samples >= cfg.max_samples:
                    states.append(_close(writer, output, fingerprint, first, n + 1, pending_rejects))
                    writer, first, pending_rejects = None, n + 1, []
            bar.update(1)
            bar.set_postfix(rejected=rejected, shards=len(states), refresh=False)
        if writer is not None:
            states.append(_close(writer, output, fingerprint, first, len(inputs), pending_rejects))
            writer, pending_rejects = None, []
    finally:
        if writer is not None:
            writer.discard()
        shutdown()
        bar.close()
    index = _finish(output, input_url, split, cfg, classes, fingerprint, states, pending_rejects, len(inputs))
    index["elapsed_s"] = round(time.monotonic() - start, 3)
    return PackResult(index, resumed_shards=resumed)


def _record(inp: Input, enc: Encoded, label_index: dict[str, int], key: str) -> dict:
    record = {"key": key, "label": label_index[inp.label], "class": inp.label, "source": inp.source,
              "sha256": enc.sha256, "fps": enc.fps, "frames": enc.frames, "width": enc.width,
              "height": enc.height, "duration": round(enc.duration, 6)}
    if inp.split is not None:
        record["split"] = inp.split
    if inp.meta:
        record["meta"] = inp.meta
    if enc.partial:
        record["partial"] = enc.partial
    return record


def _close(writer: _ShardWriter, output: str, fingerprint: str, first: int, next_input: int,
           rejects: list[dict]) -> dict:
    shard = writer.publish()
    state = {**shard, "first_input": first, "next_input": next_input, "rejects": rejects,
             "fingerprint": fingerprint}
    storage.write_bytes(storage.join(output, f"{STATE_DIR}/{writer.name}.json"), json.dumps(state).encode())
    return state


def _load_states(output: str, prefix: str, fingerprint: str) -> list[dict] | None:
    """States of the shards an interrupted run finished; None if that run was a different one."""
    run_url = storage.join(output, f"{STATE_DIR}/run.json")
    if not storage.exists(run_url):
        return []
    if json.loads(storage.read_bytes(run_url)).get("fingerprint") != fingerprint:
        return None
    names = set(storage.list_names(output))
    states = []
    # Only a gap-free run of shards counts: shard k+1 may exist without k's state if the
    # process died between publishing it and writing its state; it is then redone.
    for n in range(len(names) + 1):
        name = f"{prefix}-{n:06d}.tar"
        state_url = storage.join(output, f"{STATE_DIR}/{name}.json")
        if name not in names or not storage.exists(state_url):
            break
        state = json.loads(storage.read_bytes(state_url))
        if state.get("fingerprint") != fingerprint:
            break
        states.append(state)
    return states


def _finish(output: str, input_url: str, split: str | None, cfg: ShardConfig, classes: list[str],
            fingerprint: str, states: list[dict], tail_rejects: list[dict], num_inputs: int) -> dict:
    rejects = [r for s in states for r in s["rejects"]] + tail_rejects
    storage.write_bytes(storage.join(output, "rejects.jsonl"),
                        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode())
    shards = [{k: s[k] for k in ("name", "samples", "bytes", "sha256")} for s in states]
    samples = sum(s["samples"] for s in shards)
    if samples + len(rejects) != num_inputs:
        raise PackError(f"internal error: {samples} packed + {len(rejects)} rejected != {num_inputs} inputs; "
                        f"the shards in {output} are not trustworthy, re-run with --overwrite")
    index = {
        "format": "dclr-dist-shards", "version": FORMAT_VERSION, "tool": f"dclr-dist {__version__}",
        "source": input_url, "split": split, "inputs": num_inputs, "samples": samples,
        "rejected": len(rejects), "bytes": sum(s["bytes"] for s in shards), "classes": classes,
        "reject_reasons": dict(Counter(_reason_kind(r["reason"]) for r in rejects).most_common()),
        "encoding": dataclasses.asdict(cfg), "shards": shards, "fingerprint": fingerprint,
    }
    # index.json last: its presence means every shard it lists is complete.
    storage.write_bytes(storage.join(output, "index.json"), json.dumps(index, indent=1, ensure_ascii=False).encode())
    for s in states:
        storage.delete(storage.join(output, f"{STATE_DIR}/{s['name']}.json"))
    storage.delete(storage.join(output, f"{STATE_DIR}/run.json"))
    if not storage.is_s3(output):
        storage.local_path(storage.join(output, STATE_DIR)).rmdir()
    return index


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0].split(" line ")[0].strip()


def _clear(output: str, prefix: str) -> None:
    for name in storage.list_names(output):
        if name.startswith(f"{prefix}-") and name.endswith(".tar") or name in ("index.json", "rejects.jsonl"):
            storage.delete(storage.join(output, name))
    for name in storage.list_names(storage.join(output, STATE_DIR)):
        storage.delete(storage.join(output, f"{STATE_DIR}/{name}"))


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="video", disable=not enabled, dynamic_ncols=True,
                desc="packing")
