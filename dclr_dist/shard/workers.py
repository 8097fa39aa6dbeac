"""Transcoding pools for the packer: local processes or Ray tasks, outcomes in input order.

Transcoding runs in processes watched one input each (``_LocalPool``): one that dies or
runs past ``shard.input_timeout`` costs that input (after one retry for a death), not the run.
"""

from __future__ import annotations

import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from dclr_dist.config import ShardConfig
from dclr_dist.shard.common import Input, PackError
from dclr_dist.shard.inputs import _printable
from dclr_dist.shard.transcode import Encoded, Rejected, input_identity, transcode

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
    return Rejected(
        f"timed out: not transcoded within shard.input_timeout = {cfg.input_timeout:g} s: a read that never "
        "returns (check the mount or the network) or a very long or large video (raise --input-timeout; "
        "the limit is not part of the packing's identity, so the run still resumes)",
        passing=True,
    )


def _died(how: str) -> Rejected:
    # Twice on one input is taken as the input's doing (a decoder crash repeats), so a run goes on.
    return Rejected(
        f"transcoder died: the process transcoding it was {how}, twice (out of memory, or a crash in the "
        "decoder); to try it again, pack with fewer --workers into a new --output, or with --overwrite"
    )


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
            raise PackError(
                f"a transcoding process {how} while starting; check that "
                f"`{sys.executable} -c 'import dclr_dist.shard.pack'` works"
            )
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
