"""Read and publish files on a local disk or S3-compatible object storage, by URL.

URLs are plain paths (``shards/demo``, ``/data/x``, ``file:///data/x``) or ``s3://bucket/key``.
S3 goes through boto3 with the standard AWS environment, so any S3-compatible store works
without project flags: ``AWS_ENDPOINT_URL`` (MinIO, Ceph, R2, moto), the credential chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles),
``AWS_DEFAULT_REGION``.

Publication is atomic: a reader never sees half a file. Locally we write a temporary name
in the same folder and ``os.replace`` it; on S3 an object (single or multipart upload)
only becomes visible once the upload completes.

The streaming reader WebDataset uses for s3:// shards is in ``dclr_dist.s3stream``.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

T = TypeVar("T")

_client_cache: tuple[tuple[int, str | None], object] | None = None


class StorageError(OSError):
    """A storage operation failed for good; the message names the URL and what to do."""


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    parsed = urlparse(str(url))
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{url}: not an s3://bucket/key URL")
    return parsed.netloc, parsed.path.lstrip("/")


def local_path(url: str) -> Path:
    url = str(url)
    if url.startswith("file://"):
        return Path(unquote(urlparse(url).path))
    return Path(url)


def absolute(url: str) -> str:
    """``url`` as every process reads it: local paths resolved (Ray workers and Tune trials run
    in other working directories), s3:// URLs as they are."""
    return url if is_s3(url) else str(Path(url).resolve())


def join(base: str, name: str) -> str:
    base = str(base)
    if is_s3(base):
        return base.rstrip("/") + "/" + name
    return str(local_path(base) / name)


def s3_client():
    """A boto3 S3 client for this process, created on first use.

    boto3 sessions are not fork-safe, so a client made before a fork (DataLoader or pool
    workers) must not be reused in the child: the cache is keyed by process id (and by the
    endpoint, so a changed ``AWS_ENDPOINT_URL`` takes effect).
    """
    global _client_cache
    ident = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL"))
    if _client_cache is None or _client_cache[0] != ident:
        import boto3
        from botocore.config import Config

        # botocore's "standard" mode retries throttling, 5xx and dropped or refused
        # connections itself (AWS_MAX_ATTEMPTS, default 5 here); retry() below covers what it
        # cannot: a response body that breaks off after the headers arrived.
        config = Config(
            retries={"max_attempts": max_attempts(), "mode": "standard"}, connect_timeout=10, read_timeout=60
        )
        _client_cache = (ident, boto3.session.Session().client("s3", config=config))
    return _client_cache[1]


def max_attempts() -> int:
    """``AWS_MAX_ATTEMPTS`` (default 5), checked: botocore's own parse is a traceback."""
    raw = os.environ.get("AWS_MAX_ATTEMPTS", "5")
    try:
        attempts = int(raw)
    except ValueError:
        attempts = 0
    if not 1 <= attempts <= 100:
        raise StorageError(
            f"AWS_MAX_ATTEMPTS={raw!r}: must be a whole number of attempts from 1 to 100 "
            "(e.g. AWS_MAX_ATTEMPTS=5, the default here); set it so or unset it"
        )
    return attempts


def _broken_stream() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import ProtocolError

    # A body that stalls past the read timeout is as broken as one that was cut.
    return (ResponseStreamingError, IncompleteReadError, ProtocolError, ReadTimeoutError)


def retry(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Call ``fn``; retry a broken response stream with jittered exponential back-off.

    Every other failure is turned into an error that names ``what`` and the likely fix.
    """
    broken = _broken_stream()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except broken as e:
            if attempt == attempts:
                raise StorageError(
                    f"{what}: the connection broke off {attempts} times ({type(e).__name__}: {e}). {_endpoint_hint()}"
                ) from e
            time.sleep(base_delay * 2 ** (attempt - 1) * (0.5 + random.random()))
        except Exception as e:
            explained = _explain(e, what)
            if explained is e:
                raise
            raise explained from e
    raise AssertionError("unreachable")


def _endpoint_hint() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        return f"Check that the S3 endpoint {endpoint} (AWS_ENDPOINT_URL) is up and reachable."
    return "Check the network, or set AWS_ENDPOINT_URL for an S3-compatible store."


def _explain(e: Exception, what: str) -> Exception:
    from botocore.exceptions import ClientError, NoCredentialsError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(e, BotoConnectionError):
        return StorageError(f"{what}: cannot reach S3 after retries ({e}). {_endpoint_hint()}")
    if isinstance(e, NoCredentialsError):
        return StorageError(
            f"{what}: no AWS credentials found. Set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment."
        )
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return StorageError(
                f"{what}: the bucket does not exist. Create it first (e.g. `aws s3 mb s3://BUCKET`) or fix the URL."
            )
        if code in ("NoSuchKey", "404", "NotFound"):
            return FileNotFoundError(f"{what}: no such object")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(
                f"{what}: access denied ({code}). Check the credentials in "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the bucket policy."
            )
        return StorageError(f"{what}: S3 error {code}: {e}")
    return e


def head_object(url: str) -> dict | None:
    """An S3 object's HeadObject answer (ETag, ContentLength, ...); None if there is none."""
    bucket, key = split_s3(url)
    try:
        return retry(lambda: s3_client().head_object(Bucket=bucket, Key=key), f"stat {url}")
    except FileNotFoundError:
        return None


def exists(url: str) -> bool:
    if not is_s3(url):
        return local_path(url).exists()
    return head_object(url) is not None


def read_bytes(url: str) -> bytes:
    if not is_s3(url):
        path = local_path(url)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{url}: no such file") from None
    bucket, key = split_s3(url)
    # The whole GET is retried, so a connection dropped mid-body restarts the read.
    return retry(lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read(), f"read {url}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def local_temp(folder: str | Path, name: str) -> tuple[int, str]:
    """A temporary file beside ``name`` in ``folder``, with the permissions a plain open() gives.

    mkstemp makes files private (0600); a published shard must be as readable as any other.
    """
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def write_bytes(url: str, data: bytes) -> None:
    """Publish ``data`` at ``url`` atomically."""
    if is_s3(url):
        bucket, key = split_s3(url)
        retry(lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data), f"write {url}")
        return
    path = local_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = local_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class BackgroundWrites:
    """Writes the training step need not wait for (best/, the metrics files), in order, on one
    thread: an S3 round trip at an epoch end would otherwise hold every rank at the next
    collective. At most ``limit`` wait at once (then the caller waits for the oldest); an
    error surfaces at the next write or at ``close``, which waits for all of them."""

    def __init__(self, limit: int = 4):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dclr-writes")
        self._pending: deque = deque()
        self.limit = limit

    def write(self, url: str, data: bytes) -> None:
        while self._pending and (self._pending[0].done() or len(self._pending) >= self.limit):
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(write_bytes, url, data))

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown()


def publish_file(src: str | Path, url: str) -> None:
    """Move a finished local file to ``url`` atomically (the source is consumed)."""
    src = Path(src)
    if is_s3(url):
        bucket, key = split_s3(url)
        # upload_file switches to multipart above 8 MB; the object appears only on completion.
        retry(lambda: s3_client().upload_file(str(src), bucket, key), f"upload {src} to {url}")
        src.unlink()
        return
    dst = local_path(url)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError:
        # Different file systems: copy next to the destination, then rename there.
        fd, tmp = local_temp(dst.parent, dst.name)
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        src.unlink()


def list_names(url: str) -> Iterator[str]:
    """Names (relative to ``url``, one level, files only) under a folder or S3 prefix."""
    if not is_s3(url):
        path = local_path(url)
        if path.is_dir():
            yield from sorted(p.name for p in path.iterdir() if p.is_file())
        return
    bucket, key = split_s3(url)
    prefix = key.rstrip("/") + "/" if key else ""

    def pages():
        paginator = s3_client().get_paginator("list_objects_v2")
        return list(paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"))

    for page in retry(pages, f"list {url}"):
        for obj in page.get("Contents", []):
            yield obj["Key"][len(prefix) :]


def delete(url: str) -> None:
    if is_s3(url):
        bucket, key = split_s3(url)
        retry(lambda: s3_client().delete_object(Bucket=bucket, Key=key), f"delete {url}")
    else:
        local_path(url).unlink(missing_ok=True)


def ensure_writable(url: str) -> None:
    """Fail before hours of work if the destination cannot be written."""
    if is_s3(url):
        bucket, _ = split_s3(url)
        try:
            retry(lambda: s3_client().head_bucket(Bucket=bucket), f"open {url}")
        except FileNotFoundError:
            raise StorageError(
                f"{url}: bucket '{bucket}' does not exist. Create it first "
                "(e.g. `aws s3 mb s3://BUCKET`) or fix the URL."
            ) from None
        return
    path = local_path(url)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"{url}: cannot create the output folder ({e.strerror})") from e
    if not os.access(path, os.W_OK):
        raise StorageError(f"{url}: the output folder is not writable")


def bucket_region(url: str) -> str:
    """The region to sign requests to the bucket of ``url`` with, for S3 clients that do not
    follow S3's region redirects as boto3 does (pyarrow's, which Ray uses for checkpoints).

    The bucket's own answer first (HeadBucket's x-amz-bucket-region, which AWS gives even
    when it refuses the request): a configured region that differs passes every boto3 call
    and fails pyarrow's. Then the region configured as boto3 and the AWS CLI read it
    (AWS_REGION, AWS_DEFAULT_REGION, the profile's), then us-east-1.
    """
    from botocore.exceptions import ClientError

    bucket, _ = split_s3(url)

    def head() -> dict:
        try:
            return s3_client().head_bucket(Bucket=bucket)["ResponseMetadata"]["HTTPHeaders"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                raise
            return e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})

    try:
        headers = retry(head, f"open {url}")
    except FileNotFoundError:
        raise StorageError(
            f"{url}: bucket '{bucket}' does not exist. Create it first (e.g. `aws s3 mb s3://BUCKET`) or fix the URL."
        ) from None
    if headers.get("x-amz-bucket-region"):
        return headers["x-amz-bucket-region"]
    import boto3

    return os.environ.get("AWS_REGION") or boto3.session.Session().region_name or "us-east-1"


def pyarrow_filesystem(path: str):
    """(storage_path, filesystem) for Ray Train's RunConfig: S3 through pyarrow with AWS_ENDPOINT_URL honoured
    and the bucket's region (pyarrow does not follow region redirects: a wrong one would fail
    only at the first checkpoint). The filesystem pickles no credentials: each node uses its own."""
    if not is_s3(path):
        return absolute(path), None
    import pyarrow.fs

    bucket, key = split_s3(path)
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    fs = pyarrow.fs.S3FileSystem(
        endpoint_override=endpoint,
        region=bucket_region(path),
        scheme="http" if endpoint and endpoint.startswith("http://") else "https",
    )
    return f"{bucket}/{key}".rstrip("/"), fs
