"""Cluster deployment (cluster/): the AWS launcher config against the schema Ray ships, the
KubeRay manifests' structure, and a real `ray job submit` of a short training run to a
multi-node cluster on this machine started by cluster/local.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import psutil
import pytest
import ray
import yaml

from dclr_dist.config import load_config
from test_train import TINY, shards  # noqa: F401  (the module-scoped shard fixture)

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAY = str(Path(sys.executable).parent / "ray")

# cluster/ holds scripts, not a package: load local.py by path.
_spec = importlib.util.spec_from_file_location("cluster_local", CLUSTER / "local.py")
local = sys.modules["cluster_local"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)


def test_aws_yaml_passes_rays_launcher_schema_and_holds_the_k400_run():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    jsonschema.validate(cfg, schema)
    # The schema is strict, so passing it means something: a misspelt key fails.
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate({**cfg, "max_worker": 4}, schema)

    assert cfg["provider"]["type"] == "aws"
    nodes = cfg["available_node_types"]
    head, gpu = nodes[cfg["head_node_type"]], nodes["gpu"]
    assert head["resources"] == {"CPU": 0}
    # The GPU nodes hold configs/k400_r2plus1d.yaml: 32 workers of 1 GPU and 11 CPUs.
    k400 = load_config(REPO / "configs" / "k400_r2plus1d.yaml").train
    per_node = gpu["resources"]["GPU"] // k400.gpus_per_worker
    assert per_node * k400.cpus_per_worker <= gpu["resources"]["CPU"]
    assert min(gpu["max_workers"], cfg["max_workers"]) * per_node >= k400.workers
    # EFA: one interface per network card, the primary one on card 0, device 0.
    nics = gpu["node_config"]["NetworkInterfaces"]
    assert [n["NetworkCardIndex"] for n in nics] == [0, 1, 2, 3]
    assert all(n["InterfaceType"] == "efa" for n in nics) and nics[0]["DeviceIndex"] == 0

    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        for command in cfg[key]:
            r = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert r.returncode == 0, f"{key}: {command}\n{r.stderr}"
    # The raylet, and so every training worker, inherits NCCL's environment and token auth.
    start = " ".join(cfg["worker_start_ray_commands"])
    for setting in ("RAY_AUTH_MODE=token", "NCCL_SOCKET_IFNAME=", "FI_PROVIDER=efa", "FI_EFA_USE_DEVICE_RDMA=1"):
        assert setting in start and start.index(setting) < start.index("ray start"), setting
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["head_start_ray_commands"])


def test_kuberay_manifests_run_the_trainer_on_a_cluster_that_holds_its_config():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    # One cluster: the RayJob creates exactly what raycluster.yaml describes.
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True

    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__, "the image's Ray must be the project's pinned Ray"
    assert spec["authOptions"] == {"mode": "token"}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "dclr_dist.train"]
    config = Path(argv[argv.index("--config") + 1])
    # The image holds the checkout at /home/ray/dclr-dist (cluster/README.md, the Dockerfile).
    cfg = load_config(REPO / config.relative_to("/home/ray/dclr-dist"), argv[argv.index("--config") + 2:]).train

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (group,) = spec["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    requests, limits = worker["resources"]["requests"], worker["resources"]["limits"]
    # Requests equal limits: Ray sizes itself from the limits, and a guaranteed pod is the
    # last to be evicted.
    assert requests == limits
    per_pod = int(limits["nvidia.com/gpu"]) // cfg.gpus_per_worker
    assert group["replicas"] * per_pod >= cfg.workers
    assert per_pod * cfg.cpus_per_worker <= float(limits["cpu"])
    assert int(limits["vpc.amazonaws.com/efa"]) >= 1
    env = {e["name"]: e["value"] for e in worker["env"]}
    assert env["FI_PROVIDER"] == "efa" and env["NCCL_SOCKET_IFNAME"]
    assert "/dev/shm" in {m["mountPath"] for m in worker["volumeMounts"]}
    pods = [head, *spec["workerGroupSpecs"]]
    assert len({c["image"] for p in pods for c in p["template"]["spec"]["containers"]}) == 1


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def local_cluster():
    """A head and two 1-CPU nodes, started and stopped with the CLI a developer uses."""
    # Short on purpose: Ray's unix sockets live under it.
    root = Path(tempfile.mkdtemp(prefix="dclr-lc-", dir="/tmp"))
    cli = [sys.executable, str(CLUSTER / "local.py")]
    try:
        r = subprocess.run([*cli, "start", "--nodes", "2", "--cpus-per-node", "1", "--root", str(root)],
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        printed = re.search(r"export RAY_ADDRESS=(\S+) RAY_AUTH_MODE=token", r.stdout)
        assert printed, r.stdout
        yield root, printed.group(1)
    finally:
        recorded = local.load(root)
        # Each node's `ray start` leads a session; Ray's processes stay in it even as orphans.
        sessions = {n.pid for n in recorded.nodes} if recorded else set()
        started = local.processes(root)
        subprocess.run([*cli, "stop", "--root", str(root)], capture_output=True, timeout=120)
        local.stop(root)  # nothing left to do when the CLI worked; the safety net when it did not
        left = {p.pid: p for p in started if _alive(p)}
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) in sessions and _alive(p):
                    left[p.pid] = p
            except (ProcessLookupError, PermissionError):
                pass
        for p in left.values():
            p.kill()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes outlived `local.py stop`: {list(left.values())}"


def _client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return {**env, **local.CLIENT_ENV}


@pytest.mark.slow
def test_ray_job_submit_trains_across_two_nodes_and_resubmitting_resumes(local_cluster, shards, tmp_path):
    root, address = local_cluster
    status = subprocess.run([sys.executable, str(CLUSTER / "local.py"), "status", "--root", str(root)],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "the head sees 3 alive node(s) of 3" in status.stdout, status.stdout

    runs = tmp_path / "runs"

    def submit(job_id: str, epochs: int) -> str:
        # What cluster/README.md tells users to run, from the checkout: the code and
        # configs/ travel as the working dir; shards and runs are paths all nodes share here.
        argv = [RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", ".",
                "--runtime-env", "cluster/runtime_env.yaml", "--",
                "python", "-m", "dclr_dist.train", "--config", "configs/demo.yaml", *TINY, "eval.every=0",
                f"data.train=[{shards['train']}]", f"data.eval=[{shards['test']}]",
                f"train.storage_path={runs}", "train.name=submitted", f"train.epochs={epochs}"]
        r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, env=_client_env())
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        s = subprocess.run([RAY, "job", "status", "--address", address, job_id], capture_output=True, text=True,
                           timeout=60, env=_client_env())
        assert f"Job '{job_id}' succeeded" in s.stdout + s.stderr, s.stdout + s.stderr
        return r.stdout + r.stderr

    logs = submit("dclr-first", epochs=2)
    assert "done: 2 epochs" in logs
    run = runs / "submitted"
    latest = json.loads((run / "latest.json").read_text())
    assert (latest["epoch"], latest["world_size"]) == (2, 2)
    checkpoints = sorted(p for p in run.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert checkpoints and (checkpoints[-1] / "backbone.pt").exists()
    # One worker on each of the two worker nodes (the head offers no CPU).
    assert [(r["epoch"], r["nodes"]) for r in _metrics(run) if r["kind"] == "epoch"] == [(1, 2), (2, 2)]

    # The same command with more epochs continues the run from its checkpoint: epoch 3
    # follows epoch 2 instead of the run starting over.
    logs = submit("dclr-resumed", epochs=3)
    assert "done: 3 epochs" in logs
    rows = _metrics(run)
    assert [r["epoch"] for r in rows if r["kind"] == "resume"] == [2]
    assert [(r["epoch"], r["nodes"]) for r in rows if r["kind"] == "epoch"] == [(1, 2), (2, 2), (3, 2)]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics" / "metrics.jsonl").read_text().splitlines()]
