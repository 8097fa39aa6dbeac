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
shard sizes and inputs, and refused if either changed. Those checks live in ``resume``.

The steps live in their own modules: ``inputs`` (listing, sample keys), ``workers`` (the
transcoding pools), ``writer`` (tar shards, hashing, upload), ``resume`` (fingerprint, state
files and the checks on them); this one runs them and writes the resume state. ``PackError``,
``Input``, ``list_inputs`` and ``sample_key`` are imported from here too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dclr_dist import __version__, storage
from dclr_dist.config import ShardConfig
from dclr_dist.shard.common import Input, PackError
from dclr_dist.shard.inputs import canonical_input, list_inputs, sample_key
from dclr_dist.shard.resume import (
    STATE_DIR,
    _digest,
    _encoding,
    _fingerprint,
    _load_states,
    _read_json,
    _recorded_fingerprints,
    _verify_finished,
)
from dclr_dist.shard.reuse import ReusePool
from dclr_dist.shard.transcode import Encoded, Rejected
from dclr_dist.shard.workers import _LocalPool, _ordered, _RayPool
from dclr_dist.shard.writer import _ShardWriter

FORMAT_VERSION = 1


@dataclass
class PackResult:
    index: dict
    resumed_shards: int  # shards kept from an interrupted earlier run
    already_complete: bool = False  # OUT held this exact packing: nothing was done
    redone: str | None = None  # the kept shard found damaged, from which the rest was redone, and why
    reused: int = 0  # encodings copied from --reuse packings instead of transcoded


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
    verify: bool = False,
    reuse: tuple[str, ...] = (),
) -> PackResult:
    """Pack ``input_url`` into shards under ``output``; see the module docstring. ``verify``: a
    finished packing is checked by every shard's sha256, not by sizes only. ``reuse``: finished
    packings whose encodings of the same source bytes are copied, not made again (the output is
    the same byte for byte; ``dclr_dist.shard.reuse``)."""
    inputs, classes = list_inputs(input_url, split)
    if cfg.shuffle:
        # Listings are class-sorted: shards in that order give class-correlated batches and a
        # reader's shuffle buffer cannot undo it at scale. Seeded, so resume sees the same order.
        order = np.random.default_rng(cfg.seed).permutation(len(inputs))
        inputs = [inputs[i] for i in order]
    _check_output(input_url, output)
    storage.ensure_writable(output)
    fingerprint = _fingerprint(canonical_input(input_url), split, cfg, inputs, classes)
    if not overwrite:
        # Packings begun before inputs had one spelling were fingerprinted with the string as typed.
        as_typed = _fingerprint(input_url, split, cfg, inputs, classes)
        if as_typed in _recorded_fingerprints(output):
            fingerprint = as_typed

    def make_pool():
        pool = _RayPool(cfg) if use_ray else _LocalPool(workers, cfg)
        try:
            return ReusePool(pool, list(reuse), _encoding(cfg)) if reuse else pool
        except BaseException:
            pool.close()
            raise

    with _exclusive(output) as tmp_dir:
        index_url = storage.join(output, "index.json")
        if overwrite:
            _clear(output, cfg.prefix)
        elif storage.exists(index_url):
            existing = _read_json(index_url)
            if existing.get("fingerprint") == fingerprint:
                _verify_finished(output, existing, inputs, verify)
                return PackResult(existing, resumed_shards=len(existing["shards"]), already_complete=True)
            raise PackError(
                f"{output} already holds a packing of other inputs or options (index.json). "
                "Choose another --output, or pass --overwrite to replace it."
            )
        try:
            return _run(input_url, output, cfg, split, classes, inputs, fingerprint, tmp_dir, make_pool, progress)
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


@contextlib.contextmanager
def _exclusive(output: str) -> Iterator[str]:
    """Hold ``output`` against other packings (a lock) and give the folder its shards are assembled in.

    Local: the output folder itself, so publishing a shard is a rename. S3: a private folder
    of this user under $TMPDIR named after the output, so a killed run's temporaries are
    found and removed by the next run to that output (on this machine; the lock is this
    machine's too: two machines packing into one bucket prefix are not stopped).
    """
    if storage.is_s3(output):
        digest = hashlib.sha256(output.encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / f"dclr-pack-{os.getuid()}-{digest}"
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PackError(
                f"{folder}: not a private folder of this user, so shards are not assembled there; "
                "remove it, or set TMPDIR to another folder"
            )
    else:
        folder = storage.local_path(output)
    lock = folder / ".pack.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PackError(
                f"{output}: another packing is writing there now (it holds {lock}); wait for it to end, "
                "or choose another --output"
            ) from None
        try:
            yield str(folder)
        finally:
            lock.unlink(missing_ok=True)
            if storage.is_s3(output):
                with contextlib.suppress(OSError):  # not empty: a failed run's, for the next one to clear
                    folder.rmdir()
    finally:
        os.close(fd)


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


def _run(
    input_url: str,
    output: str,
    cfg: ShardConfig,
    split: str | None,
    classes: list[str],
    inputs: list[Input],
    fingerprint: str,
    tmp_dir: str,
    make_pool,
    progress: bool,
) -> PackResult:
    states, redone = _load_states(output, cfg.prefix, fingerprint, inputs)
    storage.write_bytes(
        storage.join(output, f"{STATE_DIR}/run.json"), json.dumps({"fingerprint": fingerprint}).encode()
    )
    resumed = len(states)
    # A killed run leaves its half-written temporaries behind, which nothing will ever finish;
    # the folder is this output's alone (see _exclusive), so they are the previous run's.
    for stale in Path(tmp_dir).glob(f".{cfg.prefix}-*.tmp"):
        stale.unlink()

    done = states[-1]["next_input"] if states else 0
    bar = _progress(len(inputs), done, progress)
    start = time.monotonic()
    pool = make_pool()
    pending_rejects, pending_ids = _write_shards(
        output, cfg, classes, inputs, done, fingerprint, tmp_dir, states, pool, bar
    )
    index = _finish(
        output, input_url, split, cfg, classes, fingerprint, states, pending_rejects, pending_ids, len(inputs)
    )
    index["elapsed_s"] = round(time.monotonic() - start, 3)
    return PackResult(
        index, resumed_shards=resumed, redone=redone, reused=pool.reused if isinstance(pool, ReusePool) else 0
    )


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
            if isinstance(result, Rejected) and result.passing:
                raise PackError(
                    f"{inp.source}: {result.reason}. Not rejected, as the cause may pass: fix it and re-run the "
                    f"same command; the {len(states)} shards finished so far are kept and the run resumes here"
                )
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
    # "no video stream (found: audio)" is of the kind "no video stream".
    return reason.split(":", 1)[0].split(" line ")[0].split(" (", 1)[0].strip()


def _clear(output: str, prefix: str) -> None:
    for name in storage.list_names(output):
        if name.startswith(f"{prefix}-") and name.endswith(".tar") or name in ("index.json", "rejects.jsonl"):
            storage.delete(storage.join(output, name))
    for name in storage.list_names(storage.join(output, STATE_DIR)):
        storage.delete(storage.join(output, f"{STATE_DIR}/{name}"))


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="video", disable=not enabled, dynamic_ncols=True, desc="packing")
