"""Tar shards -> samples, and the damage each stream skips and counts.

A sample is the regular tar members sharing a key (WebDataset's convention: the path up to
the first dot of the file name), each read whole into memory: {"__key__", "__url__",
"__gop__", "__counted__", <extension>: bytes, ...}. What a sample must hold, and which
other tools' shards therefore work: dclr_dist.data.decode.

Damage. A sample whose mp4 does not decode, whose JSON is missing or broken, or whose tar
member is cut short is skipped with a warning naming it, and counted; so is a shard that
cannot be opened (after ``data.retries`` more attempts), that breaks off, that ends before
the samples its index.json lists, or that does not end as a tar should (no end-of-archive
marker, a damaged header, trailing data, a second tar appended: tar readers stop there
without a word). A damaged sample is replaced by reading on past the stream's range, and
each loss is counted once, by the stream whose range holds it. A shard no index.json lists
cannot say how many samples followed a break; the warning says so. S3 streams that break
mid-shard are resumed at the byte where they broke (a ranged GET), so a flaky link costs
neither data nor duplicates; every resuming GET is pinned to the first response's ETag
(If-Match), so a shard replaced mid-read is skipped and counted, never spliced from two
versions (``s3stream.gopen_s3``, WebDataset's s3:// handler here). Each batch carries the
stream's count since its previous batch (``skipped_samples``, ``skipped_shards``); summing
them over the batches of all ranks gives the run's total. Training stops with an error only
when nothing can be read: every shard in a row failing, or a stream's first 50 samples all
damaged.
"""

from __future__ import annotations

import logging
import re
import tarfile
import time
from collections.abc import Iterable, Iterator

from webdataset.gopen import gopen, gopen_schemes

from dclr_dist import s3stream, storage
from dclr_dist.data.errors import DamagedSample, DataError
from dclr_dist.data.shards import _REPACK, Part, Shard

log = logging.getLogger(__name__)

# WebDataset 1.0.2 reads s3:// only through `pipe:aws s3 cp ...` (a CLI and a process per shard).
gopen_schemes["s3"] = s3stream.gopen_s3

# A stream whose first this-many samples are all damaged is reading something that is not
# our shard format (or hit a bug): stop instead of skipping forever.
_MAX_DAMAGED_FIRST = 50
# A member is read whole into memory: one larger than this (a 10-minute 4K clip is well under)
# is damage, not a sample. Sparse members are refused at any size: a few kB of tar declare
# gigabytes of zeros.
MAX_MEMBER_BYTES = 1 << 30


class _Skips:
    """Damage one stream skipped; each batch carries the increase since the previous batch."""

    def __init__(self, num_shards: int):
        self.samples = self.shards = 0
        self.reported = (0, 0)
        self.good_samples = self.damaged = 0
        self.failed_in_a_row = 0
        self.num_shards = num_shards

    def lost(self, part: Part, at: int, reason: str, cut: bool) -> None:
        """Samples ``at`` on of the part's shard are lost (``cut``: sample ``at`` broke off mid-read)."""
        url = part.shard.url
        if not part.counted:
            log.debug("%s: read past this stream's range: %s", url, reason)
            return
        end = part.end if part.end is not None else part.shard.samples
        if end is None:
            self.shards += 1
            self.samples += cut
            log.warning(
                "%s: skipped: %s; %s an unknown number of samples after it (no index.json lists this shard)",
                url,
                reason,
                "lost the sample being read and" if cut else "lost",
            )
            return
        lost = end - max(at, part.first)
        self.samples += lost
        # The shard is counted by the one stream whose range holds its first lost sample.
        self.shards += at >= part.first
        log.warning("%s: skipped: %s (%d samples lost)", url, reason, lost)

    def sample(self, sample: dict, error: Exception) -> None:
        self.damaged += 1
        if sample["__counted__"]:
            self.samples += 1
            log.warning("%s in %s: damaged sample skipped: %s", sample["__key__"], sample["__url__"], error)
        else:
            log.debug(
                "%s in %s: damaged sample read past this stream's range: %s",
                sample["__key__"],
                sample["__url__"],
                error,
            )
        if self.good_samples == 0 and self.damaged >= _MAX_DAMAGED_FIRST:
            raise DataError(
                f"the first {self.damaged} samples read were all damaged (last: "
                f"{sample['__key__']} in {sample['__url__']}: {error}). Are these shards of "
                "videos (an .mp4 and a .json per sample, see dclr_dist.data)?"
            )

    def take(self) -> tuple[int, int]:
        previous, self.reported = self.reported, (self.samples, self.shards)
        return self.samples - previous[0], self.shards - previous[1]


def read_shards(shards: Iterable[Shard], skips: _Skips, retries: int) -> Iterator[dict]:
    """The samples of each shard, whole (see read_parts)."""
    return read_parts((Part(shard) for shard in shards), skips, retries)


def read_parts(parts: Iterable[Part], skips: _Skips, retries: int) -> Iterator[dict]:
    """Samples {"__key__", "__url__", "__gop__", "__counted__", <extension>: bytes, ...} of each part,
    in tar order."""
    for part in parts:
        shard = part.shard
        try:
            stream = _open_shard(shard.url, retries)
        except OSError as e:  # StorageError is an OSError
            skips.lost(part, 0, f"cannot be opened: {e}", cut=False)
            _fail(skips, shard, e)
            continue
        tar = _Tar(stream, shard)
        with stream:
            try:
                for sample in tar.samples(part.first, part.end):
                    sample["__counted__"] = part.counted
                    yield sample
                problem = tar.ending() if part.to_end else None
            except (OSError, tarfile.TarError) as e:
                # The sample being read is lost, and with it the rest of the part.
                skips.lost(part, tar.done, f"broke off after {tar.done} samples: {type(e).__name__}: {e}", cut=True)
                if tar.done > part.first:
                    skips.failed_in_a_row = 0
                else:
                    _fail(skips, shard, e)
                continue
        expected = shard.samples if part.to_end else part.end
        if expected is not None and tar.done < expected:
            skips.lost(
                part,
                tar.done,
                f"it ended after {tar.done} of the {shard.samples} samples its index.json "
                f"lists" + (f": {problem}" if problem else " (truncated?)"),
                cut=False,
            )
        elif problem and shard.samples is None:
            skips.lost(part, tar.done, f"after {tar.done} samples, {problem}", cut=False)
        elif problem:
            log.warning("%s: %s; the %d samples its index.json lists were read", shard.url, problem, shard.samples)
        skips.failed_in_a_row = 0


def _fail(skips: _Skips, shard: Shard, error: Exception) -> None:
    skips.failed_in_a_row += 1
    if skips.failed_in_a_row >= skips.num_shards:
        raise DataError(
            f"{skips.failed_in_a_row} shards in a row could not be read; the last, {shard.url}: "
            f"{type(error).__name__}: {error}"
        ) from error


class _Tar:
    """The samples of one tar stream, in order; ``done`` counts those passed (read or skipped)."""

    def __init__(self, stream, shard: Shard):
        self.stream, self.shard = stream, shard
        self.seekable = getattr(stream, "seekable", lambda: False)()  # files and S3; not pipes
        self.done, self.more, self.tar = 0, False, None

    def samples(self, first: int, end: int | None) -> Iterator[dict]:
        """Samples ``first`` to ``end`` - 1; on a seekable stream those before ``first`` are seeked past."""
        self.tar = tarfile.open(fileobj=self.stream, mode="r:" if self.seekable else "r|")
        key, sample = None, None
        for member in self.tar:
            if not member.isreg():
                continue
            # WebDataset's convention: the key is the path up to the first dot of the file name.
            folder, _, name = member.name.rpartition("/")
            stem, dot, ext = name.partition(".")
            if not dot:
                continue
            if (f"{folder}/{stem}" if folder else stem) != key:
                if key is not None:
                    if sample is not None:
                        yield sample
                    self.done += 1
                if self.done == end:
                    self.more = True
                    return
                key = f"{folder}/{stem}" if folder else stem
                sample = (
                    {"__key__": key, "__url__": self.shard.url, "__gop__": self.shard.gop}
                    if self.done >= first
                    else None
                )
            if sample is not None and "__damage__" not in sample:
                if member.issparse() or member.size > MAX_MEMBER_BYTES:
                    what = "a sparse member" if member.issparse() else f"a member of {member.size} bytes"
                    sample["__damage__"] = (
                        f"{member.name}: {what}; members are read whole, so they must be plain and at most "
                        f"{MAX_MEMBER_BYTES} bytes"
                    )
                else:
                    sample[ext.lower()] = self.tar.extractfile(member).read()
        if key is not None:
            if sample is not None:
                yield sample
            self.done += 1

    def ending(self) -> str | None:
        """Why the tar does not end where its last sample did, or None: it ends as a tar should.

        tarfile stops without a word at a damaged or cut header, at trailing garbage, and at
        the end of the first of two concatenated tars.
        """
        if self.more:
            return f"it holds more than the {self.done} samples its index.json lists"
        if not self.seekable:
            return None
        offset = self.tar.offset
        self.stream.seek(offset)
        head = self.stream.read(tarfile.BLOCKSIZE)
        if not head:
            return f"it ends at byte {offset} without an end-of-archive marker (truncated?)"
        if head.strip(b"\0"):
            return (
                f"unreadable data at byte {offset}, where a tar header should be (a damaged or cut header, or garbage)"
            )
        while chunk := self.stream.read(1 << 16):
            if chunk.strip(b"\0"):
                return f"data after its end-of-archive marker at byte {offset} (a second tar appended?)"
        return None


# First bytes of a gzip, bzip2 or xz stream (bzip2's with its block magic: "BZh" alone could
# begin a tar member's name).
_COMPRESSED_MAGIC = {
    "gzip": re.compile(rb"\x1f\x8b"),
    "bzip2": re.compile(rb"BZh[1-9]1AY&SY"),
    "xz": re.compile(rb"\xfd7zXZ\x00"),
}


def _refuse_compressed(stream, url: str) -> None:
    # A shard named .tar may still be compressed; say so rather than report a damaged tar.
    # Pipes cannot be peeked at; they are opt-in (DCLR_ALLOW_PIPE) and the user's to vouch for.
    head = stream.peek(10)[:10] if hasattr(stream, "peek") else b""
    for kind, magic in _COMPRESSED_MAGIC.items():
        if magic.match(head):
            raise DataError(f"{url}: a {kind}-compressed tar; compressed shards are not supported, {_REPACK}")


def _open_shard(url: str, retries: int):
    for attempt in range(retries + 1):
        try:
            stream = gopen(url, attempts=retries + 1) if storage.is_s3(url) else gopen(url)
            try:
                _refuse_compressed(stream, url)
            except BaseException:
                stream.close()
                raise
            return stream
        except OSError:
            # A shard can be missing for a moment (a sync in progress, an NFS hiccup): retry a
            # few times, then let read_parts skip it.
            if attempt == retries:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def decoded(samples: Iterator[dict], fn, skips: _Skips) -> Iterator[dict]:
    """``fn(sample)`` for each sample; damaged samples are skipped and counted."""
    for sample in samples:
        try:
            if "__damage__" in sample:
                raise DamagedSample(sample["__damage__"])
            item = fn(sample)
        except DamagedSample as e:
            skips.sample(sample, e)
            continue
        skips.good_samples += 1
        yield item
