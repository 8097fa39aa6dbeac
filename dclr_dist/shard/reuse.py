"""Encodings another packing already made: an input whose source bytes (sha256) were packed
there with the same encoding options is copied, not transcoded again.

Public datasets come in folds that partition the same videos differently (UCF-101 and
HMDB-51: three train/test splits): the first fold's two packings hold every video, and the
other folds' packings reuse them (``--reuse``). The reused packings are read once, their
mp4s spilled to a private temporary folder; every other input is transcoded as usual.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from dclr_dist import storage
from dclr_dist.shard.common import PackError
from dclr_dist.shard.transcode import Encoded, input_identity
from dclr_dist.shard.writer import sha256

# The options that decide an mp4's bytes (shard sizes, order and names do not).
_ENCODES = ("short_side", "fps", "crf", "gop", "preset", "tune", "max_seconds")


class ReusePool:
    """The transcoding pool's interface over ``pool``: a source already encoded in one of
    ``packings`` comes from there, the rest from ``pool``."""

    def __init__(self, pool, packings: list[str], encoding: dict):
        self.pool, self.slots = pool, pool.slots
        self.dir = Path(tempfile.mkdtemp(prefix="dclr-reuse-"))
        self.cache: dict[str, dict] = {}  # source sha256 -> its record there
        try:
            for url in packings:
                self._load(url, encoding)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.hits: dict[int, tuple[str | None, str | int]] = {}  # task -> (sha, source), or (None, pool task)
        self.last_id = 0
        self.reused = 0

    def _load(self, url: str, encoding: dict) -> None:
        try:
            index = json.loads(storage.read_bytes(storage.join(url, "index.json")))
        except FileNotFoundError:
            raise PackError(f"--reuse {url}: no index.json there (a finished packing is needed)") from None
        theirs = index.get("encoding", {})
        differ = [k for k in _ENCODES if encoding.get(k) != theirs.get(k)]
        if differ:
            raise PackError(
                f"--reuse {url}: packed with other encoding options ({', '.join(differ)}); "
                "reuse needs the same ones, or leave it out"
            )
        for shard in index["shards"]:
            with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(storage.join(url, shard["name"])))) as tar:
                members = {m.name: m for m in tar if m.isreg()}
                for name, m in members.items():
                    if not name.endswith(".json"):
                        continue
                    record = json.loads(tar.extractfile(m).read())
                    mp4 = members.get(name[: -len(".json")] + ".mp4")
                    if mp4 is None or record.get("sha256") in self.cache:
                        continue
                    (self.dir / f"{record['sha256']}.mp4").write_bytes(tar.extractfile(mp4).read())
                    self.cache[record["sha256"]] = record

    def submit(self, source: str) -> int:
        self.last_id += 1
        try:
            # Read once more for a source not found here (the transcoder hashes what it reads):
            # the price of knowing, before any transcoding, which inputs are already encoded.
            sha = sha256(source)
        except OSError:  # unreadable: the transcoder says why
            sha = None
        if sha in self.cache:
            self.hits[self.last_id] = (sha, source)
            return self.last_id
        self.hits[self.last_id] = (None, self.pool.submit(source))
        return self.last_id

    def result(self, task_id: int):
        sha, other = self.hits.pop(task_id)
        if sha is None:
            return self.pool.result(other)
        r = self.cache[sha]
        self.reused += 1
        mp4 = (self.dir / f"{sha}.mp4").read_bytes()
        fields = ("fps", "frames", "width", "height", "duration")
        return Encoded(mp4, sha, *(r[k] for k in fields), partial=r.get("partial")), input_identity(other)

    def close(self) -> None:
        try:
            self.pool.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
