"""Pack a video corpus into WebDataset tar shards, resumably, with nothing lost.

Data flow: list inputs (class folders or a manifest) -> transcode in parallel (local
processes or Ray tasks, results consumed in input order) -> append to the open shard ->
publish each finished shard atomically -> ``index.json`` last, as the mark of completion.

Invariant: every input ends up either in a shard or in ``rejects.jsonl``, so
``index.samples + index.rejected == index.inputs == len(inputs)``.

Inputs are written in a seeded random order (``shard.shuffle``, ``shard.seed``), so a
shard holds a sample of every class rather than a run of one.

Resume: after each shard is published (fsynced first), a small state file
``_partial/<shard>.json`` records which input range it consumed (samples and rejects), the
shard's size and sha256 (ETag on S3), and each input's size and modification time. A re-run
with the same inputs and options keeps those shards that still match their state and redoes
the rest; it refuses when a kept input has changed since. Because the input order is fixed,
transcoding is deterministic and tar headers carry no clock, the result is byte-identical
to an uninterrupted run. A finished packing (``index.json``) re-run is checked the same way,
shard sizes and inputs, and refused if either changed.

The steps live in their own modules: ``inputs`` (listing, sample keys), ``workers`` (the
transcoding pools), ``writer`` (tar shards, hashing, upload); this one runs them and keeps
the resume state. ``PackError``, ``Input``, ``list_inputs`` and ``sample_key`` are imported
from here too.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dclr_dist import __version__, storage
from dclr_dist.config import ShardConfig
from dclr_dist.shard.common import Input, PackError
from dclr_dist.shard.inputs import list_inputs, sample_key
from dclr_dist.shard.transcode import Encoded, Rejected, input_identity
from dclr_dist.shard.workers import _LocalPool, _ordered, _RayPool
from dclr_dist.shard.writer import _head, _sha256, _ShardWriter

FORMAT_VERSION = 1
STATE_DIR = "_partial"


def _shard_problem(output: str, state: dict) -> str | None:
    """Why a shard an earlier run finished cannot be kept as it is; None if it can."""
    url = storage.join(output, state["name"])
    if storage.is_s3(url):
        # An object is all or nothing; what can happen to it is deletion or replacement.
        head = _head(url)
        if head is None:
            return "is missing"
        return None if head["ETag"] == state.get("etag") else "was replaced since it was uploaded (ETag)"
    path = storage.local_path(url)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    if size != state["bytes"]:
        return f"has {size} bytes where {state['bytes']} were written"
    if _sha256(str(path)) != state["sha256"]:
        return "does not hold the bytes that were written (sha256)"
    return None


def _identities(inputs: list[Input]) -> list[list[int] | None]:
    return [None if i.problem else input_identity(i.url) for i in inputs]


def _digest(identities: list) -> str:
    return hashlib.sha256(json.dumps(identities).encode()).hexdigest()


def _change(before: list[int] | None, now: list[int] | None) -> str:
    if before is None:
        return "it was absent or unreadable then, and is a file now"
    if now is None:
        return "it is gone or unreadable now"
    if before[0] != now[0]:
        return f"{before[0]} bytes then, {now[0]} now"
    return "modified since (same size, other modification time)"


def _encoding(cfg: ShardConfig) -> dict:
    # The time limit decides nothing about how a video is encoded, and raising it to let a
    # long video through must not make an interrupted run unresumable.
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "input_timeout"}


def _fingerprint(input_url: str, split: str | None, cfg: ShardConfig, inputs: list[Input], classes: list[str]) -> str:
    # The classes too: they come from every split, so a row added to another split can renumber this one.
    digest = hashlib.sha256(json.dumps([input_url, split, _encoding(cfg), classes], sort_keys=True).encode())
    for i in inputs:
        digest.update(json.dumps([i.source, i.url, i.label, i.split, i.meta, i.problem], sort_keys=True).encode())
    return digest.hexdigest()


@dataclass
class PackResult:
    index: dict
    resumed_shards: int  # shards kept from an interrupted earlier run
    already_complete: bool = False  # OUT held this exact packing: nothing was done
    redone: str | None = None  # the kept shard found damaged, from which the rest was redone, and why


def pack(
    input_url: str,
    output: str,
    cfg: ShardConfig,
    *,
    split: str | None = None,
    workers: int = 1,
    use_ray: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> PackResult:
    """Pack ``input_url`` into shards under ``output``; see the module docstring."""
    inputs, classes = list_inputs(input_url, split)
    if cfg.shuffle:
        # Listings are class-sorted: shards in that order give class-correlated batches and a
        # reader's shuffle buffer cannot undo it at scale. Seeded, so resume sees the same order.
        order = np.random.default_rng(cfg.seed).permutation(len(inputs))
        inputs = [inputs[i] for i in order]
    _check_output(input_url, output)
    storage.ensure_writable(output)
    fingerprint = _fingerprint(input_url, split, cfg, inputs, classes)
    index_url = storage.join(output, "index.json")
    if overwrite:
        _clear(output, cfg.prefix)
    elif storage.exists(index_url):
        existing = _read_json(index_url)
        if existing.get("fingerprint") == fingerprint:
            _verify_finished(output, existing, inputs)
            return PackResult(existing, resumed_shards=len(existing["shards"]), already_complete=True)
        raise PackError(
            f"{output} already holds a packing of other inputs or options (index.json). "
            "Choose another --output, or pass --overwrite to replace it."
        )
    tmp_dir = tempfile.gettempdir() if storage.is_s3(output) else str(storage.local_path(output))
    try:
        return _run(input_url, output, cfg, split, classes, inputs, fingerprint, tmp_dir, workers, use_ray, progress)
    except OSError as e:
        if isinstance(e, storage.StorageError) or e.errno is None:
            raise
        # A full disk, a file system gone read-only: what was finished is kept for the re-run.
        hint = "free some space" if e.errno == errno.ENOSPC else "fix that"
        if e.errno == errno.ENOSPC and storage.is_s3(output):
            hint = "free some space there or set TMPDIR to a disk with room (shards are assembled there)"
        raise PackError(
            f"{e.filename or tmp_dir}: {e.strerror} while writing the shards; {hint}, then re-run the "
            "same command: the shards finished so far are kept"
        ) from None


def _check_output(input_url: str, output: str) -> None:
    if storage.is_s3(output):
        return
    out = storage.local_path(output)
    if out.exists() and not out.is_dir():
        raise PackError(f"{output}: is a file, not a folder; choose another --output")
    source = storage.local_path(input_url)
    if not storage.is_s3(input_url) and source.is_dir():
        inside = os.path.realpath(out) + os.sep
        if inside.startswith(os.path.realpath(source) + os.sep):
            raise PackError(
                f"{output}: inside the input folder {input_url}, so the next run would read its shards "
                "as videos; choose an --output outside it"
            )


def _read_json(url: str) -> dict:
    try:
        value = json.loads(storage.read_bytes(url))
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise PackError(f"{url}: damaged (not a JSON object); pass --overwrite to pack again")
    return value


def _verify_finished(output: str, index: dict, inputs: list[Input]) -> None:
    """Refuse to call a finished packing complete when a shard or an input has changed since."""
    for shard in index["shards"]:
        url = storage.join(output, shard["name"])
        if storage.is_s3(url):
            head = _head(url)
            size = head["ContentLength"] if head else None
        else:
            path = storage.local_path(url)
            size = path.stat().st_size if path.is_file() else None
        if size != shard["bytes"]:
            found = "is missing" if size is None else f"has {size} bytes"
            raise PackError(
                f"{url} {found} where index.json says {shard['bytes']}: the packing was damaged after "
                "it finished; pass --overwrite to pack again"
            )
    if index.get("inputs_digest") != _digest(_identities(inputs)):
        raise PackError(
            f"{output} was packed from other contents of these inputs (a file's size or modification "
            "time has changed since); pass --overwrite to pack the current files"
        )


def _run(
    input_url: str,
    output: str,
    cfg: ShardConfig,
    split: str | None,
    classes: list[str],
    inputs: list[Input],
    fingerprint: str,
    tmp_dir: str,
    workers: int,
    use_ray: bool,
    progress: bool,
) -> PackResult:
    states, redone = _load_states(output, cfg.prefix, fingerprint, inputs)
    storage.write_bytes(
        storage.join(output, f"{STATE_DIR}/run.json"), json.dumps({"fingerprint": fingerprint}).encode()
    )
    resumed = len(states)
    if not storage.is_s3(output):
        # Shards are assembled next to their final name so publishing is a rename; a killed
        # run leaves its half-written temporaries behind, which nothing will ever finish.
        for stale in Path(tmp_dir).glob(f".{cfg.prefix}-*.tmp"):
            stale.unlink()

    done = states[-1]["next_input"] if states else 0
    bar = _progress(len(inputs), done, progress)
    start = time.monotonic()
    pool = _RayPool(cfg) if use_ray else _LocalPool(workers, cfg)
    pending_rejects, pending_ids = _write_shards(
        output, cfg, classes, inputs, done, fingerprint, tmp_dir, states, pool, bar
    )
    index = _finish(
        output, input_url, split, cfg, classes, fingerprint, states, pending_rejects, pending_ids, len(inputs)
    )
    index["elapsed_s"] = round(time.monotonic() - start, 3)
    return PackResult(index, resumed_shards=resumed, redone=redone)


def _write_shards(
    output: str,
    cfg: ShardConfig,
    classes: list[str],
    inputs: list[Input],
    done: int,
    fingerprint: str,
    tmp_dir: str,
    states: list[dict],
    pool: _LocalPool | _RayPool,
    bar,
) -> tuple[list[dict], list[list[int] | None]]:
    """Pack ``inputs[done:]`` adding to ``states``, then close ``pool``, ``bar``; return the rejects and ids after."""
    label_index = {c: n for n, c in enumerate(classes)}
    rejected = sum(len(s["rejects"]) for s in states)
    pending_rejects: list[dict] = []
    pending_ids: list[list[int] | None] = []  # identities of the inputs since the last shard
    writer: _ShardWriter | None = None
    first = done
    try:
        for n, (inp, result, identity) in enumerate(_ordered(inputs[done:], pool), start=done):
            if isinstance(result, Rejected):
                pending_rejects.append({"source": inp.source, "label": inp.label, "reason": result.reason})
                pending_ids.append(identity)
                rejected += 1
            else:
                if writer is not None and writer.bytes + len(result.mp4) > cfg.max_bytes:
                    states.append(_close(writer, output, fingerprint, first, n, pending_rejects, pending_ids))
                    writer, first, pending_rejects, pending_ids = None, n, [], []
                if writer is None:
                    name = f"{cfg.prefix}-{len(states):06d}.tar"
                    writer = _ShardWriter(output, name, tmp_dir)
                key = sample_key(inp)
                writer.add(key, result.mp4, _record(inp, result, label_index, key))
                pending_ids.append(identity)
                if writer.samples >= cfg.max_samples:
                    states.append(_close(writer, output, fingerprint, first, n + 1, pending_rejects, pending_ids))
                    writer, first, pending_rejects, pending_ids = None, n + 1, [], []
            bar.update(1)
            bar.set_postfix(rejected=rejected, shards=len(states), refresh=False)
        if writer is not None:
            states.append(_close(writer, output, fingerprint, first, len(inputs), pending_rejects, pending_ids))
            writer, pending_rejects, pending_ids = None, [], []
    finally:
        if writer is not None:
            writer.discard()
        pool.close()
        bar.close()
    return pending_rejects, pending_ids


def _record(inp: Input, enc: Encoded, label_index: dict[str, int], key: str) -> dict:
    record = {
        "key": key,
        "label": label_index[inp.label],
        "class": inp.label,
        "source": inp.source,
        "sha256": enc.sha256,
        "fps": enc.fps,
        "frames": enc.frames,
        "width": enc.width,
        "height": enc.height,
        "duration": round(enc.duration, 6),
    }
    if inp.split is not None:
        record["split"] = inp.split
    if inp.meta:
        record["meta"] = inp.meta
    if enc.partial:
        record["partial"] = enc.partial
    return record


def _close(
    writer: _ShardWriter,
    output: str,
    fingerprint: str,
    first: int,
    next_input: int,
    rejects: list[dict],
    identities: list,
) -> dict:
    shard = writer.publish()
    state = {
        **shard,
        "first_input": first,
        "next_input": next_input,
        "rejects": rejects,
        "inputs": identities,
        "fingerprint": fingerprint,
    }
    storage.write_bytes(storage.join(output, f"{STATE_DIR}/{writer.name}.json"), json.dumps(state).encode())
    return state


def _load_states(output: str, prefix: str, fingerprint: str, inputs: list[Input]) -> tuple[list[dict], str | None]:
    """States of the shards an interrupted run finished that can be kept, and why the first
    one that cannot was dropped (it and the rest are redone)."""
    run_url = storage.join(output, f"{STATE_DIR}/run.json")
    if not storage.exists(run_url):
        return [], None
    if _read_json(run_url).get("fingerprint") != fingerprint:
        raise PackError(
            f"{output} holds an interrupted packing of other inputs or options "
            f"({STATE_DIR}/). Re-run with the original inputs and options to resume it, "
            "choose another --output, or pass --overwrite to start again."
        )
    names = set(storage.list_names(output))
    state_names = set(storage.list_names(storage.join(output, STATE_DIR)))
    states: list[dict] = []
    redone = None
    # Only a gap-free run of shards counts: shard k+1 may exist without k's state if the
    # process died between publishing it and writing its state; it is then redone.
    while True:
        name = f"{prefix}-{len(states):06d}.tar"
        if name not in names or f"{name}.json" not in state_names:
            break
        try:
            state = json.loads(storage.read_bytes(storage.join(output, f"{STATE_DIR}/{name}.json")))
        except ValueError:
            redone = f"{name}: its state file is damaged"
            break
        if state.get("fingerprint") != fingerprint or state.get("first_input") != (
            states[-1]["next_input"] if states else 0
        ):
            break
        problem = _shard_problem(output, state)
        if problem is not None:
            redone = f"{name} {problem}"
            break
        # Refused rather than repacked from here: an input that changes under a packing is
        # usually a corpus still being copied or downloaded, and since inputs are shuffled,
        # redoing from the first affected shard would redo about half the work anyway.
        for inp, before in zip(inputs[state["first_input"] : state["next_input"]], state["inputs"]):
            now = None if inp.problem else input_identity(inp.url)
            if now != before:
                raise PackError(
                    f"{inp.source} changed since the interrupted run packed it into {name} "
                    f"({_change(before, now)}); pass --overwrite to pack the current files"
                )
        states.append(state)
    # Those past the kept ones describe shards that will be written again: a later resume
    # must not take them for the new ones.
    if redone is not None:
        redone += "; packed it and the shards after it again"
    kept = {f"{s['name']}.json" for s in states} | {"run.json"}
    for stale in state_names - kept:
        storage.delete(storage.join(output, f"{STATE_DIR}/{stale}"))
    return states, redone


def _finish(
    output: str,
    input_url: str,
    split: str | None,
    cfg: ShardConfig,
    classes: list[str],
    fingerprint: str,
    states: list[dict],
    tail_rejects: list[dict],
    tail_ids: list,
    num_inputs: int,
) -> dict:
    rejects = [r for s in states for r in s["rejects"]] + tail_rejects
    storage.write_bytes(
        storage.join(output, "rejects.jsonl"),
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode(),
    )
    shards = [{k: s[k] for k in ("name", "samples", "bytes", "sha256")} for s in states]
    samples = sum(s["samples"] for s in shards)
    identities = [i for s in states for i in s["inputs"]] + tail_ids
    if samples + len(rejects) != num_inputs or len(identities) != num_inputs:
        raise PackError(
            f"internal error: {samples} packed + {len(rejects)} rejected != {num_inputs} inputs; "
            f"the shards in {output} are not trustworthy, re-run with --overwrite"
        )
    index = {
        "format": "dclr-dist-shards",
        "version": FORMAT_VERSION,
        "tool": f"dclr-dist {__version__}",
        "source": input_url,
        "split": split,
        "inputs": num_inputs,
        "samples": samples,
        "rejected": len(rejects),
        "bytes": sum(s["bytes"] for s in shards),
        "classes": classes,
        "reject_reasons": dict(Counter(_reason_kind(r["reason"]) for r in rejects).most_common()),
        "encoding": _encoding(cfg),
        "shards": shards,
        "fingerprint": fingerprint,
        # What a re-run compares, to notice inputs changed since: [size, mtime_ns] of each.
        "inputs_digest": _digest(identities),
    }
    # index.json last: its presence means every shard it lists is complete.
    storage.write_bytes(storage.join(output, "index.json"), json.dumps(index, indent=1, ensure_ascii=False).encode())
    # Shards of an earlier, longer attempt than this one (a damaged shard redone differently)
    # would otherwise lie next to the index that does not list them.
    listed = {s["name"] for s in shards}
    for name in storage.list_names(output):
        if re.fullmatch(rf"{re.escape(cfg.prefix)}-\d{{6}}\.tar", name) and name not in listed:
            storage.delete(storage.join(output, name))
    for name in storage.list_names(storage.join(output, STATE_DIR)):
        storage.delete(storage.join(output, f"{STATE_DIR}/{name}"))
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

    return tqdm(total=total, initial=initial, unit="video", disable=not enabled, dynamic_ncols=True, desc="packing")
