"""Everything that touches Ray on the driver side: joining a cluster, what the workers'
environment carries, the one TorchTrainer factory that pretraining, fine-tuning and
sweeps start their workers with, and the console a run shows.

The console: the workers' own output (Ray's, DeepSpeed's, each rank's) stays in Ray's logs,
and the driver shows what rank 0 sends it (:class:`Console`): one progress bar per epoch
with rate and ETA on a terminal, one summary line per epoch, checkpoints and errors.
``DCLR_VERBOSE=1`` (``--verbose``) or Ray's own ``RAY_LOG_TO_DRIVER=1`` brings the workers'
output back.
"""

from __future__ import annotations

import os
import re

from dclr_dist import storage
from dclr_dist.config import Config


class TrainingFailed(RuntimeError):
    """A Ray Train run ended in failure after its restarts; the message is one line."""


# The driver's S3 settings reach the workers, so shards and checkpoints resolve the same
# way on every node. Never a credential: a runtime_env is stored in the job table and Train's
# run state and written to runtime_env_agent.log, readable by anyone with the dashboard or a
# shell on a node. Nodes take credentials from their own chain (instance role, IRSA, a
# profile, the environment their raylet was started with; a local cluster started by the
# driver inherits the driver's).
_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_MAX_ATTEMPTS", "AWS_PROFILE")


def forwarded_env() -> dict[str, str]:
    from dclr_dist.storage import max_attempts

    max_attempts()  # a bad value stops the driver with its reason, not every worker with a traceback
    return {k: os.environ[k] for k in _AWS_ENV if k in os.environ}


def connect_ray() -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one, once per process."""
    import socket

    import ray

    if ray.is_initialized():
        return
    env = forwarded_env()
    quiet = {"log_to_driver": verbose()}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env}, **quiet)
        return
    # Ray Train's placement-group cleaner finds its cluster through the state API, whose
    # auto-discovery fails when several Ray clusters share the machine (tests, sweeps next
    # to a dev cluster); placement groups then leak and the next run waits forever. Name
    # the local cluster's API server for it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": env},
        **quiet,
    )


def verbose() -> bool:
    """Whether the workers' output reaches this console (module docstring)."""
    return any(os.environ.get(k, "") not in ("", "0") for k in ("DCLR_VERBOSE", "RAY_LOG_TO_DRIVER"))


class Console:
    """The driver's view of a run: rank 0 sends progress and lines to a small actor, a thread
    here draws them (module docstring). ``handle`` goes to the workers."""

    def __init__(self):
        import ray

        @ray.remote(num_cpus=0)
        class Board:
            def __init__(self):
                self.state, self.lines = None, []

            def update(self, state: dict) -> None:
                self.state = state

            def line(self, text: str) -> None:
                self.lines.append(text)

            def poll(self):
                lines, self.lines = self.lines, []
                return self.state, lines

        self.handle = Board.remote()
        self._bar = self._epoch = None
        self._stop = None

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._draw, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import ray

        self._stop.set()
        self._thread.join(10)
        try:
            self._show()  # what arrived last
        except Exception:  # never in the way of the run's own outcome
            pass
        if self._bar is not None:
            self._bar.close()
        ray.kill(self.handle)

    def _draw(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._show()
            except Exception:  # the run's own errors are what the user must see, not the console's
                return

    def _show(self) -> None:
        import ray
        from tqdm import tqdm

        state, lines = ray.get(self.handle.poll.remote(), timeout=10)
        if state is not None and state["epoch"] != self._epoch:
            if self._bar is not None:
                self._bar.close()
            self._epoch = state["epoch"]
            self._bar = tqdm(
                total=state["batches"],
                desc=f"epoch {state['epoch']}/{state['epochs']}",
                unit="batch",
                leave=False,
                disable=None,
            )
        if state is not None and self._bar is not None:
            self._bar.n = state["batch"]
            self._bar.set_postfix(state.get("postfix", {}), refresh=False)
            self._bar.refresh()
        for line in lines:
            (tqdm.write if self._bar is not None else print)(line)


def make_paths_absolute(cfg: Config) -> None:
    """Workers (and Tune trials) run in other working directories: ship absolute local paths."""
    cfg.data.train = [storage.absolute(u) for u in cfg.data.train]
    cfg.data.eval = [storage.absolute(u) for u in cfg.data.eval]
    cfg.train.storage_path = storage.absolute(cfg.train.storage_path)


def failure_summary(e: Exception) -> str:
    """The last "SomethingError: message" line of a Ray Train failure (whose text holds the
    workers' tracebacks), or its first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    raised = [
        line
        for line in lines
        if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)
        and not line.startswith(("ray.train.", "TrainingFailedError"))
    ]
    return (raised or lines or [type(e).__name__])[-1 if raised else 0]


def torch_trainer(
    loop,
    loop_config: dict,
    cfg: Config,
    name: str,
    callbacks: list | None = None,
    keep_checkpoints: int | None = None,
    max_failures: int = 0,
):
    """A TorchTrainer running ``loop(loop_config)`` on ``cluster.workers`` workers of the cluster in
    RAY_ADDRESS (or a local one), each reserving ``cluster.cpus_per_worker`` CPUs and
    ``cluster.gpus_per_worker`` GPUs (nccl when > 0, else gloo), its run ``name`` under
    ``train.storage_path``, its workers given the driver's S3 settings."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    connect_ray()
    c = cfg.cluster
    use_gpu = c.gpus_per_worker > 0
    resources = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if use_gpu else {})}
    storage_path, fs = storage.pyarrow_filesystem(cfg.train.storage_path)
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=c.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            callbacks=callbacks or [],
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            worker_runtime_env={"env_vars": forwarded_env()},
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )


def run(trainer):
    """``trainer.fit()``; a failure once the restarts are spent raises TrainingFailed with the
    workers' error in one line (their tracebacks are already on the console and in the logs)."""
    from ray.train import TrainingFailedError

    try:
        return trainer.fit()
    except TrainingFailedError as e:
        raise TrainingFailed(failure_summary(e)) from None
