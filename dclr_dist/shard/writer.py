"""Shards on disk or S3: reproducible tar members, fsync before publishing, sha256, upload."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

from dclr_dist import storage
from dclr_dist.shard.common import PackError


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    # No clock, no owner: the same samples always give the same bytes.
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o444, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def sha256(url: str) -> str:
    """sha256 of a local file or an S3 object, read in 1 MiB pieces."""
    from dclr_dist.s3stream import gopen_s3

    digest = hashlib.sha256()
    with gopen_s3(url) if storage.is_s3(url) else open(storage.local_path(url), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            hint = (
                "access denied; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and that the bucket policy "
                "allows s3:PutObject"
            )
        else:
            hint = f"{e}; check the store"
        raise PackError(
            f"{url}: upload failed ({code or type(e).__name__}): {hint}, then re-run the same command to resume"
        ) from None
    head = storage.head_object(url)
    if head is None:
        raise PackError(
            f"{url}: not found right after its upload; check the store (AWS_ENDPOINT_URL), then re-run "
            "the same command to resume"
        )
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
        shard = {
            "name": self.name,
            "samples": self.samples,
            "bytes": os.path.getsize(self.tmp),
            "sha256": sha256(self.tmp),
        }
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
