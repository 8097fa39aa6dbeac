"""Streaming reads of s3:// shards for WebDataset: a GET that resumes where the connection broke.

Apart from ``storage`` (whole-file reads, atomic publication, the S3 client and its error
handling, which this builds on) because only the data loader streams shards this way.
"""

from __future__ import annotations

import io

from dclr_dist.storage import StorageError, retry, s3_client, split_s3

# Streaming reads of s3:// shards; dclr_dist.data registers gopen_s3 as WebDataset's s3:// handler.


class ShardReplaced(StorageError):
    """An S3 object was replaced while it was being read."""


# Forward seeks up to this far read through the open body; farther ones start a ranged GET
# (a request costs about what a few MB of transfer does).
_SKIP_BY_READING = 8 << 20


class _S3Reader(io.RawIOBase):
    """A streaming GET of one version of an s3:// object that resumes where the connection broke.

    A body that breaks off mid-shard is reopened with a ranged GET from the current offset
    (retry()'s back-off), so nothing is read twice and no sample is delivered twice.
    Every later GET carries If-Match with the first response's ETag: an object replaced in
    between answers 412 (ShardReplaced) instead of splicing two versions. Seekable, so tar
    members before a stream's range are skipped, not decoded.
    """

    def __init__(self, url: str, attempts: int):
        super().__init__()
        self.url, self.attempts = url, attempts
        self.bucket, self.key = split_s3(url)
        self.pos, self.body, self.etag, self.size = 0, None, None, None
        retry(self._open, f"open {url}", attempts)  # a missing shard fails here, by name

    def _open(self) -> None:
        from botocore.exceptions import ClientError

        client = s3_client()
        if self.etag is None:
            response = client.get_object(Bucket=self.bucket, Key=self.key)
            self.etag, self.size = response["ETag"], response["ContentLength"]
        else:
            try:
                response = client.get_object(
                    Bucket=self.bucket, Key=self.key, Range=f"bytes={self.pos}-", IfMatch=self.etag
                )
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
                    raise
                raise ShardReplaced(
                    f"{self.url}: replaced while it was being read, at byte {self.pos} (it is no "
                    f"longer version {self.etag}); the rest would come from another version"
                ) from None
        self.body = response["Body"]

    def _drop(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = (offset, self.pos + offset, self.size + offset)[whence]
        if 0 < target - self.pos <= _SKIP_BY_READING and self.body is not None:
            scratch = memoryview(bytearray(min(target - self.pos, 1 << 20)))
            while self.pos < target and self.readinto(scratch[: target - self.pos]):
                pass
        elif target != self.pos:
            self._drop()  # the next read opens at the target
            self.pos = target
        return self.pos

    def readinto(self, buffer) -> int:
        if self.pos >= self.size:
            return 0  # a ranged GET there would be refused (416)

        def read() -> int:
            if self.body is None:
                self._open()
            try:
                return self.body.readinto(buffer)
            except BaseException:
                self.body = None  # the next attempt reopens at self.pos
                raise

        n = retry(read, f"read {self.url} at byte {self.pos}", self.attempts)
        self.pos += n
        return n

    def close(self) -> None:
        self._drop()
        super().close()


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, attempts: int = 5, **_) -> io.BufferedReader:
    """WebDataset gopen handler for s3:// URLs: boto3 with the standard AWS environment.

    The boto3 client is made lazily in each process (``s3_client``): clients do
    not survive the fork into DataLoader workers.
    """
    if mode != "rb":
        raise ValueError(f"{url}: s3:// shards are read-only here (mode {mode!r})")
    return io.BufferedReader(_S3Reader(url, attempts), buffer_size=max(bufsize, 1 << 20))
