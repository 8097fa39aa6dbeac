"""Cluster deployment (cluster/): the AWS launcher config against the schema Ray ships and
check_recipe.py, the network check of its nodes, the KubeRay manifests' structure, the NCCL
fabric gate, the downstream recipe, and real `ray job submit`s (a short training run, the
gate's CPU form) to a multi-node cluster on this machine started by cluster/local.py."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jsonschema
import psutil
import pytest
import ray
import yaml
from helpers import TINY

from dclr_dist.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
K400 = REPO / "dclr_dist" / "configs" / "k400_r2plus1d.yaml"
RAY = str(Path(sys.executable).parent / "ray")


def _script(name: str):
    """A script of cluster/ (scripts, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"cluster_{name}", CLUSTER / f"{name}.py")
    module = sys.modules[f"cluster_{name}"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


local, check_recipe, nccl_check, downstream = (
    _script(n) for n in ("local", "check_recipe", "nccl_check", "downstream")
)


def _aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_aws_yaml_passes_rays_launcher_schema_and_holds_the_k400_run():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = _aws()
    jsonschema.validate(cfg, schema)
    # The schema is strict, so passing it means something: a misspelt key fails.
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate({**cfg, "max_worker": 4}, schema)
    # Instance types against resources and EFA cards, the network against every node's
    # setup, and dclr_dist/configs/k400_r2plus1d.yaml against the GPU nodes: nothing to report.
    assert check_recipe.check(cfg, [K400]) == []
    assert check_recipe.main([str(CLUSTER / "aws.yaml")]) == 0

    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert nodes["gpu"]["node_config"]["InstanceType"] == "p4d.24xlarge"
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        for command in cfg[key]:
            r = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert r.returncode == 0, f"{key}: {command}\n{r.stderr}"
    # The network check runs before anything is fetched.
    assert cfg["setup_commands"][0] == "bash ~/dclr-dist/cluster/node_check.sh"
    # The raylet, and so every training worker, inherits NCCL's environment and token auth.
    start = " ".join(cfg["worker_start_ray_commands"])
    for setting in ("RAY_AUTH_MODE=token", "NCCL_SOCKET_IFNAME=", "FI_PROVIDER=efa", "FI_EFA_USE_DEVICE_RDMA=1"):
        assert setting in start and start.index(setting) < start.index("ray start"), setting
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["head_start_ray_commands"])


def test_check_recipe_refuses_recipes_that_launch_but_cannot_boot_or_hold_the_run(tmp_path):
    def problems(network=None, provider=None, gpu=None, gpu_config=None, **top) -> list[str]:
        cfg = _aws()
        cfg["metadata"]["network"].update(network or {})
        cfg["provider"].update(provider or {})
        cfg["available_node_types"]["gpu"].update(gpu or {})
        cfg["available_node_types"]["gpu"]["node_config"].update(gpu_config or {})
        cfg.update(top)
        return check_recipe.check(cfg, [K400])

    # The recipe as first written: every node in the head's public subnet. The GPU nodes,
    # with four interfaces, get no public address, so neither uv/PyPI nor S3 is reachable
    # from them; the head (one interface, a public address) is fine.
    fetch, s3 = problems({"default_route": "igw", "s3_gateway_endpoint": False}, {"use_internal_ips": False})
    assert fetch.startswith("node type gpu: setup fetches from the internet") and "no public address" in fetch
    assert s3.startswith("node type gpu: no path to S3")
    # An S3 endpoint alone does not make PyPI reachable.
    assert [p.split(":")[0] for p in problems({"default_route": "igw"})] == ["node type gpu"]
    # No route out at all: the environment must come baked into the AMI, and setup fetch nothing.
    assert {p.split(":")[0] for p in problems({"default_route": "none"})} == {"node type head", "node type gpu"}
    baked = ["bash ~/dclr-dist/cluster/node_check.sh --offline"]
    assert problems({"default_route": "none"}, setup_commands=baked) == []
    assert "no path to S3" in problems({"default_route": "none", "s3_gateway_endpoint": False}, setup_commands=baked)[0]
    # Ray's launcher refuses a private subnet unless it may use private addresses.
    (launcher,) = problems(provider={"use_internal_ips": False})
    assert "use_internal_ips" in launcher
    assert "metadata.network is missing" in problems(metadata={})[0]

    # Instance types: a p5 has 32 EFA cards and 192 vCPUs; the GPU count must be the instance's.
    (cards,) = problems(gpu_config={"InstanceType": "p5.48xlarge"})
    assert "network cards [0, 1, 2, 3]" in cards and "has 32 cards" in cards
    efa = _aws()["available_node_types"]["gpu"]["node_config"]["NetworkInterfaces"]
    p5_nics = [{**efa[min(i, 1)], "NetworkCardIndex": i} for i in range(32)]
    assert (
        problems(
            gpu={"resources": {"CPU": 192, "GPU": 8}},
            gpu_config={"InstanceType": "p5.48xlarge", "NetworkInterfaces": p5_nics},
        )
        == []
    )
    assert "resources.CPU 128 > the 96 vCPUs" in problems(gpu={"resources": {"CPU": 128, "GPU": 8}})[0]
    assert "resources.GPU 4 but p4d.24xlarge has 8" in problems(gpu={"resources": {"CPU": 96, "GPU": 4}})[0]
    assert "not in check_recipe.INSTANCES" in problems(gpu_config={"InstanceType": "p9.96xlarge"})[0]

    # A config that asks more CPUs per node than a p4d has, or more workers than the nodes hold.
    def config(**cluster) -> Path:
        tree = yaml.safe_load(K400.read_text())
        tree["cluster"].update(cluster)
        path = tmp_path / f"{'-'.join(cluster)}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return path

    hungry, big = config(cpus_per_worker=22), config(workers=64)
    (cpus,) = check_recipe.check(_aws(), [hungry])
    assert "8 workers x cluster.cpus_per_worker 22 = 176 CPUs, but node type gpu has 96" in cpus
    assert check_recipe.check(_aws(), [big]) == [f"{big}: cluster.workers 64, but the GPU nodes hold 32 workers"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_node_check_names_the_missing_route_in_one_line(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    up, down = f"http://127.0.0.1:{server.server_address[1]}/", f"http://127.0.0.1:{_closed_port()}/"

    def check(*args, internet=up, s3=up):
        env = {**os.environ, "NODE_CHECK_INTERNET": internet, "NODE_CHECK_S3": s3, "NODE_CHECK_TIMEOUT": "3"}
        return subprocess.run(
            ["bash", str(CLUSTER / "node_check.sh"), *args], capture_output=True, text=True, env=env, timeout=60
        )

    try:
        ok = check()
        assert ok.returncode == 0 and "reaches the internet and S3" in ok.stdout, ok.stdout + ok.stderr
        no_nat = check(internet=f"{up} {down}")
        assert no_nat.returncode == 1 and len(no_nat.stderr.splitlines()) == 1
        assert f"cannot reach {down}" in no_nat.stderr and "NAT gateway" in no_nat.stderr
        # A baked image needs only S3.
        assert check("--offline", internet=down).returncode == 0
        no_s3 = check("--offline", s3=down)
        assert no_s3.returncode == 1 and "S3 gateway VPC endpoint" in no_s3.stderr
        assert len(no_s3.stderr.splitlines()) == 1
    finally:
        server.shutdown()


def test_no_recipe_hands_aws_secrets_to_nodes_or_jobs():
    """Nodes use their own credentials (instance role, IRSA); nothing secret goes through env vars."""
    secrets = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    cfg = _aws()
    commands = " ".join(c for key, value in cfg.items() if key.endswith("commands") for c in value)
    assert not {s for s in secrets if s in commands}
    assert "IamInstanceProfile" in cfg["available_node_types"]["gpu"]["node_config"]
    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert not secrets & set(runtime_env.get("env_vars", {}))
    for manifest in ("raycluster.yaml", "rayjob.yaml"):
        doc = yaml.safe_load((CLUSTER / "kuberay" / manifest).read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"], "pods get S3 access from their service account's IAM role"
            for container in pod["containers"]:
                assert not secrets & {e["name"] for e in container.get("env", [])}
                assert "envFrom" not in container


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
    cfg = load_config(REPO / config.relative_to("/home/ray/dclr-dist"), argv[argv.index("--config") + 2 :]).cluster

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


def test_local_cluster_never_hands_out_a_port_twice():
    # A node binds its ports only after they are chosen (local._HANDED_OUT says why that
    # matters): 1200 ports in 200 calls, six at a time as the nodes ask, all distinct.
    ports = [p for _ in range(200) for p in local._free_ports(6)]
    assert len(set(ports)) == len(ports)


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
        r = subprocess.run(
            [*cli, "start", "--nodes", "2", "--cpus-per-node", "1", "--root", str(root)],
            capture_output=True,
            text=True,
            timeout=240,
        )
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
    status = subprocess.run(
        [sys.executable, str(CLUSTER / "local.py"), "status", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0 and "the head sees 3 alive node(s) of 3" in status.stdout, status.stdout

    runs = tmp_path / "runs"

    def submit(job_id: str, epochs: int) -> str:
        # What cluster/README.md tells users to run, from the checkout: the code and
        # dclr_dist/configs/ travel as the working dir; shards and runs are paths all nodes share here.
        argv = [
            RAY,
            "job",
            "submit",
            "--address",
            address,
            "--submission-id",
            job_id,
            "--working-dir",
            ".",
            "--runtime-env",
            "cluster/runtime_env.yaml",
            "--",
            "python",
            "-m",
            "dclr_dist.train",
            "--config",
            "dclr_dist/configs/demo.yaml",
            *TINY,
            "eval.every=0",
            f"data.train=[{shards['train']}]",
            f"data.eval=[{shards['test']}]",
            f"train.storage_path={runs}",
            "train.name=submitted",
            f"train.epochs={epochs}",
        ]
        r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, env=_client_env())
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        s = subprocess.run(
            [RAY, "job", "status", "--address", address, job_id],
            capture_output=True,
            text=True,
            timeout=60,
            env=_client_env(),
        )
        assert f"Job '{job_id}' succeeded" in s.stdout + s.stderr, s.stdout + s.stderr
        return r.stdout + r.stderr

    logs = submit("dclr-first", epochs=2)
    assert "done: 2 epochs" in logs
    # The console: one summary line per epoch from rank 0, through the driver; the workers'
    # own output (Ray's result dictionaries, DeepSpeed's warnings, deprecations) stays in Ray's logs.
    assert [line.split(":")[0] for line in logs.splitlines() if line.startswith("epoch ") and ": loss " in line] == [
        "epoch 1/2",
        "epoch 2/2",
    ], logs[-4000:]
    for noise in ("Reporting training result", "FutureWarning", "Setting accelerator to CPU", "(RayTrainWorker"):
        assert noise not in logs, noise
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


# NCCL's INFO lines as NCCL 2.2x and aws-ofi-nccl write them: the plugin found and EFA chosen,
# InfiniBand, and the silent fallback to TCP sockets when the plugin is not on the library path.
_EFA_LOG = """\
ip-10-0-1-5:2201:2201 [0] NCCL INFO NCCL_SOCKET_IFNAME set by environment to ens32
ip-10-0-1-5:2201:2201 [0] NCCL INFO NET/Plugin: Loaded net plugin Libfabric (v9)
ip-10-0-1-5:2201:2201 [0] NCCL INFO NET/OFI Initializing aws-ofi-nccl 1.14.0
ip-10-0-1-5:2201:2201 [0] NCCL INFO NET/OFI Selected provider is efa, fabric is efa (found 4 nics)
ip-10-0-1-5:2201:2201 [0] NCCL INFO Using network Libfabric
ip-10-0-1-5:2201:2311 [0] NCCL INFO Channel 00/0 : 7[7] -> 8[0] [send] via NET/Libfabric/0/GDRDMA
"""
_IB_LOG = "h1:77:77 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB\nh1:77:77 [0] NCCL INFO Using network IB\n"
_SOCKET_LOG = """\
ip-10-0-1-5:2201:2201 [0] NCCL INFO NET/Plugin: Could not find: libnccl-net.so. Using internal net plugin.
ip-10-0-1-5:2201:2201 [0] NCCL INFO NET/IB : No device found.
ip-10-0-1-5:2201:2201 [0] NCCL INFO NET/Socket : Using [0]ens32:10.0.1.5<0>
ip-10-0-1-5:2201:2201 [0] NCCL INFO Using network Socket
ip-10-0-1-5:2201:2311 [0] NCCL INFO Channel 00/0 : 8[0] -> 7[7] [receive] via NET/Socket/0
"""


def test_nccl_check_tells_the_fabric_from_tcp_sockets():
    efa, evidence = nccl_check.network_of(_EFA_LOG.splitlines())
    assert efa == "Libfabric" and nccl_check.is_fabric(efa)
    # How the network was set up, not every channel.
    assert [line.split("NCCL INFO ")[1] for line in evidence] == [
        "NET/Plugin: Loaded net plugin Libfabric (v9)",
        "NET/OFI Initializing aws-ofi-nccl 1.14.0",
        "NET/OFI Selected provider is efa, fabric is efa (found 4 nics)",
        "Using network Libfabric",
    ]
    ib, _ = nccl_check.network_of(_IB_LOG.splitlines())
    sock, _ = nccl_check.network_of(_SOCKET_LOG.splitlines())
    assert (ib, sock) == ("IB", "Socket") and nccl_check.is_fabric(ib) and not nccl_check.is_fabric(sock)
    assert nccl_check.network_of(["h:1:1 [0] NCCL INFO cudaDriverVersion 13000"])[0] is None
    # A rank whose channels to another node run over sockets fails, whatever else it logged.
    mixed, _ = nccl_check.network_of((_EFA_LOG + _SOCKET_LOG.splitlines()[-1]).splitlines())
    assert mixed == "Socket"

    assert nccl_check.verdict(["Libfabric"] * 16) is None and nccl_check.verdict(["IB", "IB"]) is None
    reason = nccl_check.verdict(["Libfabric"] * 8 + ["Socket"] * 8)
    assert "TCP sockets" in reason and "8 of 16 ranks" in reason and "\n" not in reason
    assert "names no network on rank(s) [1]" in nccl_check.verdict(["IB", None])
    assert "neither EFA" in nccl_check.verdict(["IB", "Carrier pigeon"])

    assert nccl_check.parse_size("4KiB") == 4096 and nccl_check.parse_size("100MB") == 100 * 2**20
    with pytest.raises(Exception, match="not a size"):
        nccl_check.parse_size("4 parsecs")
    # nccl-tests' bus bandwidth: 16 ranks, 100 MiB in 10 ms.
    assert nccl_check.bus_bandwidth("all_reduce", 100 * 2**20, 0.01, 16) == pytest.approx(100 * 2**20 / 0.01 * 30 / 16)
    assert nccl_check.bus_bandwidth("all_gather", 100 * 2**20, 0.01, 16) == pytest.approx(100 * 2**20 / 0.01 * 15 / 16)


@pytest.mark.slow
def test_nccl_check_runs_across_two_nodes_of_a_local_cluster_on_gloo(local_cluster):
    """The gate's CPU form, submitted as cluster/README.md says, so its machinery keeps working."""
    _, address = local_cluster
    argv = [
        RAY,
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        ".",
        "--runtime-env",
        "cluster/runtime_env.yaml",
        "--",
        "python",
        "cluster/nccl_check.py",
        "--nodes",
        "2",
        "--ranks-per-node",
        "1",
        "--backend",
        "gloo",
        "--sizes",
        "4KiB",
        "1MiB",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--timeout",
        "120",
    ]
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, env=_client_env())
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "nccl_check: 2 nodes x 1 ranks, backend gloo" in out
    rows = re.findall(
        r"^(all_reduce|all_gather)\s+(\d+ [KM]iB)\s+([\d.]+) [um]s\s+([\d.e+-]+) GB/s$", out, re.MULTILINE
    )
    assert [(op, size) for op, size, _, _ in rows] == [
        ("all_reduce", "4 KiB"),
        ("all_gather", "4 KiB"),
        ("all_reduce", "1 MiB"),
        ("all_gather", "1 MiB"),
    ], out
    assert all(float(t) > 0 and float(bw) > 0 for _, _, t, bw in rows), out
    assert "nccl_check: ok (all-reduce 1 MiB:" in out and "transport not checked" in out

    # Three nodes' worth of ranks do not fit on two: a one-line failure, not a hang.
    r = subprocess.run(
        [*argv[: argv.index("--nodes") + 1], "3", *argv[argv.index("--nodes") + 2 : -1], "5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=_client_env(),
    )
    assert r.returncode != 0 and "nccl_check: FAIL: could not place 1 rank(s)" in r.stdout + r.stderr


# --------------------------------------------------------------------------- downstream


def _official_layouts(root: Path) -> dict[str, Path]:
    """UCF-101 and HMDB-51 as they unpack (split lists, no videos: a dry run reads no video)."""
    ucf, ann = root / "UCF101" / "UCF-101", root / "UCF101" / "ucfTrainTestlist"
    ann.mkdir(parents=True)
    ucf.mkdir()
    (ann / "classInd.txt").write_text("1 ApplyEyeMakeup\r\n2 YoYo\r\n")
    for fold in (1, 2, 3):
        (ann / f"trainlist0{fold}.txt").write_text(f"YoYo/v_YoYo_g0{fold}_c01.avi 2\r\n")
        (ann / f"testlist0{fold}.txt").write_text(f"ApplyEyeMakeup/v_ApplyEyeMakeup_g0{fold}_c01.avi\r\n")
    hmdb, splits = root / "hmdb51_org", root / "testTrainMulti_7030_splits"
    hmdb.mkdir()
    splits.mkdir()
    for cls in ("brush_hair", "wave"):
        for fold in (1, 2, 3):
            (splits / f"{cls}_test_split{fold}.txt").write_text(
                f"{cls}_a.avi {fold % 2 + 1} \n{cls}_b.avi {2 - fold % 2} \n"
            )
    return {"ucf101": ucf, "hmdb51": hmdb}


def test_downstream_dry_run_packs_every_fold_and_evaluates_it_with_the_downstream_config(tmp_path, capsys):
    from dclr_dist.shard import datasets
    from dclr_dist.shard.__main__ import _pack_parser

    sources = _official_layouts(tmp_path)
    shards, runs = tmp_path / "shards", tmp_path / "runs"
    code = downstream.main(
        [
            "all",
            "--ucf101",
            str(sources["ucf101"]),
            "--hmdb51",
            str(sources["hmdb51"]),
            "--shards",
            str(shards),
            "--checkpoint",
            str(runs),
            "--out",
            str(tmp_path / "reports"),
            "--dry-run",
            "--",
            "cluster.workers=8",
        ]
    )
    assert code == 0
    commands = [shlex.split(line[2:]) for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    packs = [_pack_parser().parse_args(c[3:]) for c in commands if c[1:3] == ["-m", "dclr_dist.shard"]]
    evals = [c for c in commands if c[1:3] == ["-m", "dclr_dist.eval"]]
    assert [(a.dataset, a.fold, a.split) for a in packs] == [
        (d, f, s) for d in ("ucf101", "hmdb51") for f in (1, 2, 3) for s in ("train", "test")
    ]
    # Each video transcoded once: folds 2 and 3 copy fold 1's encodings.
    for a in packs:
        first = [str(shards / f"{a.dataset}-1-{s}") for s in ("train", "test")]
        assert a.reuse == ([] if a.fold == 1 else first)
    assert len(evals) == 6
    for a in packs:
        # Each fold's split lists are found in the official layout, without --annotations.
        ds = datasets.parse(datasets.spec(a.dataset, a.input, fold=a.fold))
        inputs, classes = datasets.list_dataset(ds, a.split)
        assert len(inputs) >= 1 and len(classes) == 2
        assert a.output == str(shards / f"{a.dataset}-{a.fold}-{a.split}")
    for c, (dataset, fold) in zip(evals, [(d, f) for d in ("ucf101", "hmdb51") for f in (1, 2, 3)]):
        arg = {c[i]: c[i + 1] for i in range(3, c.index("--out") + 1, 2)}
        assert arg["--train"] == str(shards / f"{dataset}-{fold}-train")
        assert arg["--test"] == str(shards / f"{dataset}-{fold}-test")
        assert arg["--protocol"] == "linear,finetune" and arg["--checkpoint"] == str(runs)
        overrides = c[c.index("--out") + 2 :]
        assert overrides == [f"train.name=downstream-{dataset}-{fold}", "cluster.workers=8"]
        cfg = load_config(arg["--config"], overrides)
        # The paper's protocol: 10 clips per test video, R(2+1)D-18, the released fine-tuning.
        assert (cfg.data.eval_clips, cfg.model.arch, cfg.finetune.lr, cfg.finetune.epochs) == (
            10,
            "r2plus1d_18",
            0.1,
            10,
        )
        assert cfg.data.epoch_samples is None, "an epoch is one pass over the split, not pretraining's length"


def test_downstream_summary_averages_the_three_splits(tmp_path, capsys):
    top1 = {
        ("ucf101", 1): (0.70, 0.80),
        ("ucf101", 2): (0.72, 0.82),
        ("ucf101", 3): (0.74, 0.84),
        ("hmdb51", 1): (0.40, 0.50),
        ("hmdb51", 2): (0.45, None),
    }
    for (dataset, fold), (linear, finetune) in top1.items():
        folder = tmp_path / f"{dataset}-{fold}"
        folder.mkdir()
        protocols = {"linear": {"top1": linear}, **({"finetune": {"top1": finetune}} if finetune else {})}
        (folder / "report.json").write_text(json.dumps({"clips": 10, "protocols": protocols}))
    assert downstream.main(["summary", "--out", str(tmp_path)]) == 0
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows[("ucf101", "linear")] == ["70.0", "72.0", "74.0", "72.0"]
    assert rows[("ucf101", "finetune")] == ["80.0", "82.0", "84.0", "82.0"]
    # A missing split is shown as such, and the mean says how many it averages.
    assert rows[("hmdb51", "linear")] == ["40.0", "45.0", "-", "42.5", "(2", "of", "3)"]
    assert rows[("hmdb51", "finetune")] == ["50.0", "-", "-", "50.0", "(1", "of", "3)"]
    assert downstream.main(["summary", "--out", str(tmp_path / "nothing")]) == 1
