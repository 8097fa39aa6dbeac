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

Transcoding runs in processes watched one input each (``_LocalPool``): one that dies or
runs past ``shard.input_timeout`` costs that input (after one retry for a death), not the run.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import signal
import sys
import tarfile
import tempfile
import time
import unicodedata
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dclr_dist import __version__, storage
from dclr_dist.config import ShardConfig
from dclr_dist.shard.transcode import Encoded, Rejected, input_identity, transcode

FORMAT_VERSION = 1
STATE_DIR = "_partial"


class PackError(RuntimeError):
    """The packing run cannot start or continue; the message says what to do."""


@dataclass
class Input:
    """One input: a row of the manifest, or an entry of a class folder."""

    source: str  # as the user named it (relative to IN), kept in the record for tracing
    url: str  # where to read it
    label: str
    split: str | None = None
    meta: dict[str, str] = field(default_factory=dict)
    # Set when the input is unusable before any decoding (bad manifest row, hidden file, duplicate).
    problem: str | None = None
    where: str | None = None  # "m.csv line 7": named in the reasons of a manifest row's rejects


# --------------------------------------------------------------------------- inputs

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
    if storage.is_s3(input_url):
        raise PackError(f"{input_url}: an S3 input must be a manifest file (.csv or .jsonl) "
                        "whose rows point at the videos; class folders are read from local disk")
    path = storage.local_path(input_url)
    if path.is_dir():
        inputs, classes = _list_folder(path)
    elif path.suffix.lower() in (".csv", ".jsonl"):
        inputs = _list_manifest(path)
        # Before the split is chosen: a class that one split lacks must not shift the labels of the rest.
        classes = list({i.label for i in inputs if i.problem is None})
    elif not path.exists():
        raise PackError(f"{input_url}: no such file or folder")
    else:
        raise PackError(f"{input_url}: expected a class folder or a .csv/.jsonl manifest")
    if split is not None:
        if not any(i.split == split for i in inputs):
            found = sorted({i.split for i in inputs if i.split})
            raise PackError(f"{input_url}: no inputs with split '{split}' "
                            + (f"(splits found: {', '.join(found)})" if found else "(it names no splits)"))
        # A row whose split is unknown may belong to this one: a reject here, not silently left out.
        inputs = [i for i in inputs if i.split == split or i.split is None]
        for i in inputs:
            if i.problem is None and i.split is None:
                i.problem = f"no split: {i.where} names none, and --split {split} packs the rows of split {split}"
    _mark_duplicates(inputs)
    return inputs, _sorted_classes(set(classes))


def _printable(name: str) -> str:
    # A name that is not UTF-8 (an old Latin-1 archive) arrives with surrogate escapes, which
    # JSON and the key's hash cannot encode: records show those bytes as \xNN.
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _list_folder(root: Path) -> tuple[list[Input], list[str]]:
    inputs: list[Input] = []
    classes: list[str] = []

    def walk(folder: str, rel: str, label: str, ancestors: tuple[str, ...]) -> None:
        """``ancestors``: the real paths of ``folder`` (last) and the folders above it."""
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if not rel:
                raise PackError(f"{root}: cannot list the folder ({e.strerror or e})") from None
            inputs.append(Input(f"{rel}/", folder, label, problem=f"unreadable folder: {e.strerror or e}"))
            return
        for entry in entries:
            name = _printable(entry.name)
            sub = f"{rel}/{name}" if rel else name
            try:
                is_dir = entry.is_dir()  # follows links: a class folder linked in from elsewhere is read
            except OSError:
                is_dir = False  # a link that cannot be followed: the transcoder says why
            if entry.name.startswith("."):
                what = "folder, not read" if is_dir else "file"
                inputs.append(Input(sub, entry.path, label, problem=f"hidden: a hidden {what} (.DS_Store, .git, "
                                    "._ files: names starting with '.' are not packed)"))
            elif is_dir:
                real = os.path.realpath(entry.path)
                if real in ancestors:
                    inputs.append(Input(sub, entry.path, label, problem="symlink loop: a link back to a folder "
                                        "that contains it; not followed"))
                else:
                    if not rel:
                        classes.append(name)
                    walk(entry.path, sub, label or name, (*ancestors, real))
            elif entry.is_symlink() and not os.path.exists(entry.path):
                inputs.append(Input(sub, entry.path, label, problem="file not found: a broken symbolic link "
                                    f"(to {_printable(os.readlink(entry.path))})"))
            else:
                # The file a link names: a video linked into the tree twice is one sample and one duplicate.
                real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(ancestors[-1], entry.name)
                inputs.append(Input(sub, real, label, problem=None if rel else "not inside a class folder "
                                    "(expected IN/<class>/<video>); move it into its class folder"))

    walk(str(root), "", "", (os.path.realpath(root),))
    if not inputs:
        raise PackError(f"{root}: no files found (expected IN/<class>/<video files>)")
    inputs.sort(key=lambda i: i.source)
    return inputs, classes


_KNOWN_COLUMNS = ("path", "label", "split")
_DELIMITERS = (",", ";", "\t")  # spreadsheets in many locales write ';' ("CSV"), or tabs


def _column(name: str) -> str:
    # Spreadsheets write "Path", " label" or a byte-order mark (removed by utf-8-sig).
    name = name.strip()
    return name.lower() if name.lower() in _KNOWN_COLUMNS else name


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PackError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PackError(f"{path}: line {line} is not UTF-8 (byte 0x{data[e.start]:02x}); save the manifest as "
                        "UTF-8 (Excel: 'CSV UTF-8') or convert it, e.g. iconv -f cp1252 -t utf-8") from None


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any], str | None]]:
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
        raise PackError(f"{path}: the header must name the columns path,label[,split]; missing "
                        f"{', '.join(sorted({'path', 'label'} - set(columns)))} (first line: {first[:80]!r})")
    for n, name in enumerate(columns):
        if name and columns.index(name) != n:
            raise PackError(f"{path}: the header names the column '{name}' twice (columns {columns.index(name) + 1} "
                            f"and {n + 1}); rename one")
    end = reader.line_num
    try:
        for fields in reader:
            n, end = end + 1, reader.line_num
            if not any(f.strip() for f in fields):
                continue  # blank lines, and the empty rows spreadsheets write
            if end > n:
                raise PackError(f"{path}: line {n}: a quoted value runs on to line {end}, taking the rows between "
                                "with it; check the quotes on that line")
            where = f"{path.name} line {n}"
            problem = None
            if any(f.strip() for f in fields[len(columns):]):
                problem = (f"bad row: {where} has {len(fields)} fields where the header has {len(columns)} (a "
                           f"'{delimiter}' inside a value? quote the value)")
            elif any(f.strip() for name, f in zip(columns, fields) if not name):
                problem = (f"bad row: {where} has a value in a column the header does not name (a "
                           f"'{delimiter}' inside a value? quote the value)")
            yield n, {name: f for name, f in zip(columns, fields) if name}, problem
    except csv.Error as e:
        raise PackError(f"{path}: line {end + 1}: {e}; check the quotes on that line") from None


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any], str | None]]:
    # Split on newlines only: str.splitlines() would also cut at U+2028 inside a JSON string.
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
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
        yield n, dict(zip(columns, row.values())), (
            f"bad row: {where} names {', '.join(twice)} twice (ignoring case and spaces)" if twice else None)


def _text(value: Any) -> str | None:
    """A cell as text; None for what cannot be one (a list, a number with a fraction, true)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _list_manifest(path: Path) -> list[Input]:
    base = path.parent
    text = _read_text(path)
    rows = list(_csv_rows(path, text) if path.suffix.lower() == ".csv" else _jsonl_rows(path, text))
    inputs = []
    for n, row, problem in rows:
        where = f"{path.name} line {n}"
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
        meta = {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in row.items()
                if k not in _KNOWN_COLUMNS and v is not None}
        src = src or f"<{where}>"
        url = src if storage.is_s3(src) or os.path.isabs(src) else str(base / src)
        inputs.append(Input(src, url, label or "", None if bad else split or None, meta, problem, where))
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
            i.problem = f"duplicate: the same file as {seen[i.url]}, listed earlier"
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

Outcome = tuple[Encoded | Rejected, list[int] | None]  # and the input's identity (transcode.input_identity)


def _work(source: str, cfg: ShardConfig) -> Outcome:
    # Taken before reading, so a file rewritten while it is read differs at the next run's check.
    identity = input_identity(source)
    try:
        result = transcode(source, cfg)
    except Exception as e:  # a decoder bug on one file must not end a day-long run
        result = Rejected(f"unexpected error while transcoding: {type(e).__name__}: {e}")
    # FFmpeg's messages name the file, which may not be UTF-8; the reason goes into JSON.
    if isinstance(result, Rejected):
        result.reason = _printable(result.reason)
    elif result.partial:
        result.partial = _printable(result.partial)
    return result, identity


def _timed_out(cfg: ShardConfig) -> Rejected:
    return Rejected(f"timed out: not transcoded within shard.input_timeout = {cfg.input_timeout:g} s (a read that "
                    "never returns, or a very long or large video: raise the limit to pack it)")


def _died(how: str) -> Rejected:
    return Rejected(f"transcoder died: the process transcoding it was {how}, twice (out of memory, or a crash "
                    "in the decoder)")


def _serve(conn, cfg: ShardConfig) -> None:
    """A transcoding process: one input at a time, from the packer's end of ``conn``."""
    # Ctrl-C reaches the whole process group; the packer stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send(None)  # ready: an input's time limit counts from its start, not from these imports
    try:
        for task_id, source in iter(conn.recv, None):
            conn.send((task_id, _work(source, cfg)))
    except (EOFError, OSError):  # the packer is gone
        return


@dataclass
class _Worker:
    proc: Any
    conn: Any
    ready: bool = False
    task: tuple[int, str, int] | None = None  # (id, source, attempt)
    started: float = 0.0


class _LocalPool:
    """Local transcoding processes, watched one input each.

    A process that dies (the OOM killer, a crash in a decoder) costs only the input it held:
    that input is tried once more in a fresh process, then rejected. One that runs past
    ``shard.input_timeout`` is killed and its input rejected. (A ProcessPoolExecutor cannot
    do this: one dead worker breaks the whole pool, and its futures do not say which input
    killed it, so the run died, and died again at that input on every resume.)
    """

    def __init__(self, workers: int, cfg: ShardConfig):
        import multiprocessing as mp
        import multiprocessing.connection

        # spawn: boto3 and FFmpeg state must not be inherited across fork.
        self.ctx, self.wait = mp.get_context("spawn"), multiprocessing.connection.wait
        self.cfg, self.slots = cfg, workers
        self.todo: deque[tuple[int, str, int]] = deque()
        self.done: dict[int, Outcome] = {}
        self.last_id = 0
        self.workers = [self._spawn() for _ in range(workers)]

    def _spawn(self) -> _Worker:
        conn, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_serve, args=(child, self.cfg), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, conn)

    def submit(self, source: str) -> int:
        self.last_id += 1
        self.todo.append((self.last_id, source, 1))
        return self.last_id

    def result(self, task_id: int) -> Outcome:
        while task_id not in self.done:
            self._step()
        return self.done.pop(task_id)

    def _step(self) -> None:
        for w in self.workers:
            if w.ready and w.task is None and self.todo:
                w.task, w.started = self.todo.popleft(), time.monotonic()
                try:
                    w.conn.send(w.task[:2])
                except OSError:
                    pass  # it died; its sentinel says so below
        limit = self.cfg.input_timeout
        busy = [w.started + limit for w in self.workers if w.task is not None] if limit else []
        timeout = max(0.0, min(busy) - time.monotonic()) if busy else None
        ready = set(self.wait([w.conn for w in self.workers] + [w.proc.sentinel for w in self.workers], timeout))
        for n, w in enumerate(self.workers):
            if w.conn in ready:
                try:
                    message = w.conn.recv()
                except (EOFError, OSError):
                    self._replace(n, self._how(w))
                    continue
                if message is None:
                    w.ready = True
                else:
                    self.done[message[0]] = message[1]
                    w.task = None
            elif w.proc.sentinel in ready:
                self._replace(n, self._how(w))
            elif w.task is not None and limit and time.monotonic() - w.started > limit:
                w.proc.kill()
                w.proc.join()
                self.done[w.task[0]] = _timed_out(self.cfg), input_identity(w.task[1])
                w.task = None
                self._replace(n, None)

    @staticmethod
    def _how(w: _Worker) -> str:
        w.proc.join()
        code = w.proc.exitcode
        if code >= 0:
            return f"stopped with exit code {code}"
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:  # a real-time signal: no name
            return f"killed by signal {-code}"

    def _replace(self, n: int, how: str | None) -> None:
        w = self.workers[n]
        w.proc.join()
        if how is not None and not w.ready:
            raise PackError(f"a transcoding process {how} while starting; check that "
                            f"`{sys.executable} -c 'import dclr_dist.shard.pack'` works")
        if how is not None and w.task is not None:
            task_id, source, attempt = w.task
            if attempt == 1:
                self.todo.appendleft((task_id, source, 2))
            else:
                self.done[task_id] = _died(how), input_identity(source)
        self.workers[n] = self._spawn()

    def close(self) -> None:
        for w in self.workers:
            if w.ready and w.task is None:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
            else:  # still starting (a replacement), or stopping early: its input is redone on resume
                w.proc.kill()
        for w in self.workers:
            w.proc.join(timeout=10)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()


class _RayPool:
    """Transcoding as Ray tasks, with the local pool's policy for deaths and time limits."""

    def __init__(self, cfg: ShardConfig):
        import ray

        # Honours RAY_ADDRESS (e.g. `ray job submit` or a running cluster); otherwise starts one here.
        ray.init(ignore_reinit_error=True, log_to_driver=False)
        self.ray, self.cfg = ray, cfg
        # Ray runs a task whose worker died once more by itself: one retry, as locally.
        self.remote = ray.remote(num_cpus=1, max_retries=1)(_work)
        self.slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.refs: dict[int, tuple[Any, str]] = {}
        self.last_id = 0

    def submit(self, source: str) -> int:
        self.last_id += 1
        self.refs[self.last_id] = (self.remote.remote(source, self.cfg), source)
        return self.last_id

    def result(self, task_id: int) -> Outcome:
        ref, source = self.refs.pop(task_id)
        # Counted from when the packer needs this result: a Ray task's start is not observable
        # here, and the inputs before it in the window have finished by then.
        ready, _ = self.ray.wait([ref], timeout=self.cfg.input_timeout)
        if not ready:
            self.ray.cancel(ref, force=True)
            return _timed_out(self.cfg), input_identity(source)
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            return _died(f"lost ({type(e).__name__})"), input_identity(source)

    def close(self) -> None:
        for ref, _ in self.refs.values():
            self.ray.cancel(ref, force=True)


def _ordered(inputs: Iterable[Input], pool) -> Iterator[tuple[Input, Encoded | Rejected, list[int] | None]]:
    """Outcomes in input order with at most ``2 * slots`` in flight: memory stays flat."""
    window: deque[tuple[Input, int | None]] = deque()

    def take() -> tuple[Input, Encoded | Rejected, list[int] | None]:
        inp, task = window.popleft()
        if task is None:
            return inp, Rejected(inp.problem), None
        return (inp, *pool.result(task))

    for inp in inputs:
        window.append((inp, None if inp.problem else pool.submit(inp.url)))
        if len(window) >= 2 * pool.slots:
            yield take()
    while window:
        yield take()


# --------------------------------------------------------------------------- shards

def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    # No clock, no owner: the same samples always give the same bytes.
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o444, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _head(url: str) -> dict | None:
    bucket, key = storage.split_s3(url)
    try:
        return storage.retry(lambda: storage.s3_client().head_object(Bucket=bucket, Key=key), f"stat {url}")
    except FileNotFoundError:
        return None


def _upload(tmp: str, url: str) -> str:
    """Upload a finished shard; its ETag, by which resume knows the object is still the one uploaded."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError

    try:
        storage.publish_file(tmp, url)
    except S3UploadFailedError as e:
        # boto3 wraps an upload's S3 error in a type of its own, which storage.retry passes on as is.
        cause = e.__context__
        code = cause.response.get("Error", {}).get("Code", "") if isinstance(cause, ClientError) else ""
        if code == "NoSuchBucket":
            hint = "the bucket does not exist (deleted while packing?); create it"
        elif code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            hint = ("access denied; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and that the bucket policy "
                    "allows s3:PutObject")
        else:
            hint = f"{e}; check the store"
        raise PackError(f"{url}: upload failed ({code or type(e).__name__}): {hint}, then re-run the same command "
                        "to resume") from None
    head = _head(url)
    if head is None:
        raise PackError(f"{url}: not found right after its upload; check the store (AWS_ENDPOINT_URL), then re-run "
                        "the same command to resume")
    return head["ETag"]


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
        # On disk before it is renamed into place and its state file (fsynced) says it is done:
        # after a power loss, a rename that outlived its data leaves an empty or zeroed shard.
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        shard = {"name": self.name, "samples": self.samples, "bytes": os.path.getsize(self.tmp),
                 "sha256": _sha256(self.tmp)}
        if storage.is_s3(self.url):
            shard["etag"] = _upload(self.tmp, self.url)
        else:
            storage.publish_file(self.tmp, self.url)
            _fsync_dir(storage.local_path(self.url).parent)  # the rename itself
        return shard

    def discard(self) -> None:
        # Nothing of it is kept: no end-of-archive, and a full disk must not fail the clean-up.
        with contextlib.suppress(OSError):
            self.file.close()
        Path(self.tmp).unlink(missing_ok=True)


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


def pack(input_url: str, output: str, cfg: ShardConfig, *, split: str | None = None, workers: int = 1,
         use_ray: bool = False, overwrite: bool = False, progress: bool = True) -> PackResult:
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
        raise PackError(f"{output} already holds a packing of other inputs or options (index.json). "
                        "Choose another --output, or pass --overwrite to replace it.")
    tmp_dir = tempfile.gettempdir() if storage.is_s3(output) else str(storage.local_path(output))
    try:
        return _run(input_url, output, cfg, split, classes, inputs, fingerprint, tmp_dir, workers, use_ray,
                    progress)
    except OSError as e:
        if isinstance(e, storage.StorageError) or e.errno is None:
            raise
        # A full disk, a file system gone read-only: what was finished is kept for the re-run.
        hint = "free some space" if e.errno == errno.ENOSPC else "fix that"
        if e.errno == errno.ENOSPC and storage.is_s3(output):
            hint = "free some space there or set TMPDIR to a disk with room (shards are assembled there)"
        raise PackError(f"{e.filename or tmp_dir}: {e.strerror} while writing the shards; {hint}, then re-run the "
                        "same command: the shards finished so far are kept") from None


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
            raise PackError(f"{output}: inside the input folder {input_url}, so the next run would read its shards "
                            "as videos; choose an --output outside it")


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
            raise PackError(f"{url} {found} where index.json says {shard['bytes']}: the packing was damaged after "
                            "it finished; pass --overwrite to pack again")
    if index.get("inputs_digest") != _digest(_identities(inputs)):
        raise PackError(f"{output} was packed from other contents of these inputs (a file's size or modification "
                        "time has changed since); pass --overwrite to pack the current files")


def _run(input_url: str, output: str, cfg: ShardConfig, split: str | None, classes: list[str], inputs: list[Input],
         fingerprint: str, tmp_dir: str, workers: int, use_ray: bool, progress: bool) -> PackResult:
    states, redone = _load_states(output, cfg.prefix, fingerprint, inputs)
    storage.write_bytes(storage.join(output, f"{STATE_DIR}/run.json"),
                        json.dumps({"fingerprint": fingerprint}).encode())
    resumed = len(states)
    if not storage.is_s3(output):
        # Shards are assembled next to their final name so publishing is a rename; a killed
        # run leaves its half-written temporaries behind, which nothing will ever finish.
        for stale in Path(tmp_dir).glob(f".{cfg.prefix}-*.tmp"):
            stale.unlink()

    label_index = {c: n for n, c in enumerate(classes)}
    done = states[-1]["next_input"] if states else 0
    bar = _progress(len(inputs), done, progress)
    rejected = sum(len(s["rejects"]) for s in states)
    pending_rejects: list[dict] = []
    pending_ids: list[list[int] | None] = []  # identities of the inputs since the last shard
    writer: _ShardWriter | None = None
    first = done
    start = time.monotonic()
    pool = _RayPool(cfg) if use_ray else _LocalPool(workers, cfg)
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
    index = _finish(output, input_url, split, cfg, classes, fingerprint, states, pending_rejects, pending_ids,
                    len(inputs))
    index["elapsed_s"] = round(time.monotonic() - start, 3)
    return PackResult(index, resumed_shards=resumed, redone=redone)


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
           rejects: list[dict], identities: list) -> dict:
    shard = writer.publish()
    state = {**shard, "first_input": first, "next_input": next_input, "rejects": rejects, "inputs": identities,
             "fingerprint": fingerprint}
    storage.write_bytes(storage.join(output, f"{STATE_DIR}/{writer.name}.json"), json.dumps(state).encode())
    return state


def _load_states(output: str, prefix: str, fingerprint: str, inputs: list[Input]) -> tuple[list[dict], str | None]:
    """States of the shards an interrupted run finished that can be kept, and why the first
    one that cannot was dropped (it and the rest are redone)."""
    run_url = storage.join(output, f"{STATE_DIR}/run.json")
    if not storage.exists(run_url):
        return [], None
    if _read_json(run_url).get("fingerprint") != fingerprint:
        raise PackError(f"{output} holds an interrupted packing of other inputs or options "
                        f"({STATE_DIR}/). Re-run with the original inputs and options to resume it, "
                        "choose another --output, or pass --overwrite to start again.")
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
                states[-1]["next_input"] if states else 0):
            break
        problem = _shard_problem(output, state)
        if problem is not None:
            redone = f"{name} {problem}"
            break
        # Refused rather than repacked from here: an input that changes under a packing is
        # usually a corpus still being copied or downloaded, and since inputs are shuffled,
        # redoing from the first affected shard would redo about half the work anyway.
        for inp, before in zip(inputs[state["first_input"]:state["next_input"]], state["inputs"]):
            now = None if inp.problem else input_identity(inp.url)
            if now != before:
                raise PackError(f"{inp.source} changed since the interrupted run packed it into {name} "
                                f"({_change(before, now)}); pass --overwrite to pack the current files")
        states.append(state)
    # Those past the kept ones describe shards that will be written again: a later resume
    # must not take them for the new ones.
    if redone is not None:
        redone += "; packed it and the shards after it again"
    kept = {f"{s['name']}.json" for s in states} | {"run.json"}
    for stale in state_names - kept:
        storage.delete(storage.join(output, f"{STATE_DIR}/{stale}"))
    return states, redone


def _finish(output: str, input_url: str, split: str | None, cfg: ShardConfig, classes: list[str],
            fingerprint: str, states: list[dict], tail_rejects: list[dict], tail_ids: list, num_inputs: int) -> dict:
    rejects = [r for s in states for r in s["rejects"]] + tail_rejects
    storage.write_bytes(storage.join(output, "rejects.jsonl"),
                        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode())
    shards = [{k: s[k] for k in ("name", "samples", "bytes", "sha256")} for s in states]
    samples = sum(s["samples"] for s in shards)
    identities = [i for s in states for i in s["inputs"]] + tail_ids
    if samples + len(rejects) != num_inputs or len(identities) != num_inputs:
        raise PackError(f"internal error: {samples} packed + {len(rejects)} rejected != {num_inputs} inputs; "
                        f"the shards in {output} are not trustworthy, re-run with --overwrite")
    index = {
        "format": "dclr-dist-shards", "version": FORMAT_VERSION, "tool": f"dclr-dist {__version__}",
        "source": input_url, "split": split, "inputs": num_inputs, "samples": samples,
        "rejected": len(rejects), "bytes": sum(s["bytes"] for s in shards), "classes": classes,
        "reject_reasons": dict(Counter(_reason_kind(r["reason"]) for r in rejects).most_common()),
        "encoding": _encoding(cfg), "shards": shards, "fingerprint": fingerprint,
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

    return tqdm(total=total, initial=initial, unit="video", disable=not enabled, dynamic_ncols=True,
                desc="packing")
