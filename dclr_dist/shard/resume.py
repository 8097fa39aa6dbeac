"""Resume state of a packing: what a re-run checks before it keeps earlier work.

A packing is identified by a fingerprint of its inputs and options; each finished shard has
a state file ``_partial/<shard>.json`` (the input range it consumed, its size and sha256 or
ETag, each input's size and modification time), and a finished packing's ``index.json`` a
digest of those identities. The functions here read and check them; ``pack`` runs the
packing and writes them. Apart from ``pack`` because they decide only whether earlier work
still stands, not how shards are made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from dclr_dist import storage
from dclr_dist.config import ShardConfig
from dclr_dist.shard.common import Input, PackError
from dclr_dist.shard.transcode import input_identity
from dclr_dist.shard.writer import sha256

STATE_DIR = "_partial"


def _shard_problem(output: str, state: dict) -> str | None:
    """Why a shard an earlier run finished cannot be kept as it is; None if it can."""
    url = storage.join(output, state["name"])
    if storage.is_s3(url):
        # An object is all or nothing; what can happen to it is deletion or replacement.
        head = storage.head_object(url)
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
    if sha256(str(path)) != state["sha256"]:
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


def _recorded_fingerprints(output: str) -> set:
    """The fingerprints a finished (index.json) or interrupted (run.json) packing in ``output`` records."""
    found = set()
    for url in (storage.join(output, "index.json"), storage.join(output, f"{STATE_DIR}/run.json")):
        if storage.exists(url):
            try:
                found.add(json.loads(storage.read_bytes(url)).get("fingerprint"))
            except (ValueError, AttributeError):
                pass  # damaged: the checks that follow say so
    return found


def _read_json(url: str) -> dict:
    try:
        value = json.loads(storage.read_bytes(url))
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise PackError(f"{url}: damaged (not a JSON object); pass --overwrite to pack again")
    return value


def _verify_finished(output: str, index: dict, inputs: list[Input], verify: bool = False) -> None:
    """Refuse to call a finished packing complete when a shard or an input has changed since:
    by size, and with ``verify`` by each shard's sha256 (every byte read again)."""
    for shard in index["shards"]:
        url = storage.join(output, shard["name"])
        if storage.is_s3(url):
            head = storage.head_object(url)
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
        if verify and sha256(url) != shard["sha256"]:
            raise PackError(
                f"{url} does not hold the bytes index.json records (sha256): the packing was damaged after "
                "it finished; pass --overwrite to pack again"
            )
    if index.get("inputs_digest") != _digest(_identities(inputs)):
        raise PackError(
            f"{output} was packed from other contents of these inputs (a file's size or modification "
            "time has changed since); pass --overwrite to pack the current files"
        )


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
