"""A multi-node Ray cluster on one machine, for development and the tests.

    python cluster/local.py start --nodes 2 --cpus-per-node 1   # a head + 2 worker nodes
    python cluster/local.py status
    python cluster/local.py stop

Each node is a real ``ray start --block`` process with its own resources, ports and temp
dir, so ``ray job submit`` talks to a real head's job server and Ray Train places workers on
distinct nodes, as on AWS or Kubernetes. The head offers no CPUs by default: training
workers then land on the worker nodes, one per node with ``--cpus-per-node 1``.

Every port is chosen free, and none twice, so several clusters (other people's tests) can
share the machine; the job server listens on 127.0.0.1 only, the nodes on this machine's own
address (Ray replaces a loopback ``--node-ip-address`` with it). Token authentication is on,
as for any cluster reachable over a network: the token is Ray's default one (``ray
get-auth-token --generate`` makes it on first use), and clients need ``RAY_AUTH_MODE=token``,
which ``start`` prints with the addresses.

``stop`` ends only the processes this cluster started (each node's ``ray start``, recorded
in ``ROOT/cluster.json``, with its descendants and its session), by pid; never ``ray stop``,
which kills every Ray process on the machine.

As a library (what the tests do)::

    with local.start(nodes=2, cpus_per_node=1, root=root) as cluster:
        subprocess.run(["ray", "job", "submit", "--address", cluster.job_address, ...],
                       env={**os.environ, **local.CLIENT_ENV})
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

# Short on purpose: Ray puts unix sockets under the temp dir, and their paths must stay
# under the 107-byte limit of sun_path.
DEFAULT_ROOT = Path("/tmp/dclr-local")
STATE_FILE = "cluster.json"
HOST = "127.0.0.1"
# What a client (ray job submit, ray.init) of this cluster needs in its environment.
CLIENT_ENV = {"RAY_AUTH_MODE": "token"}


class ClusterError(RuntimeError):
    """The local cluster could not be started or queried; the message says what to do."""


@dataclass
class Node:
    name: str
    pid: int
    cpus: float
    temp_dir: str
    log: str


@dataclass
class LocalCluster:
    root: str
    # RAY_ADDRESS for `ray job submit/status/logs`: the job server inside the head's dashboard.
    job_address: str
    # For ray.init(address=...) or `ray status --address` on this machine.
    gcs_address: str = ""
    nodes: list[Node] = field(default_factory=list)

    def stop(self, timeout: float = 30.0) -> int:
        return stop(self.root, timeout)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _ray_bin() -> str:
    # The `ray` beside this interpreter: the venv's, whatever PATH says.
    ray = Path(sys.executable).parent / "ray"
    if not ray.exists():
        raise ClusterError(
            f"no `ray` command beside {sys.executable}: pip install 'ray[default]' into this environment"
        )
    return str(ray)


def _token() -> str:
    """Ray's default auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), made if missing."""
    r = subprocess.run([_ray_bin(), "get-auth-token", "--generate"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0 or not r.stdout.strip():
        raise ClusterError(f"`ray get-auth-token --generate` failed: {r.stderr.strip()[-500:]}")
    return r.stdout.strip()


# Ports this process has handed out. A node binds its ports only once its processes are up,
# so until then the kernel may offer the same port again: the head's dashboard port came back
# as its metrics-export port once, and `ray start` refused to start.
_HANDED_OUT: set[int] = set()


def _free_ports(n: int) -> list[int]:
    """n ports free right now that this process has not handed out before."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)  # held open until the end, so the kernel offers another port next
            if (port := s.getsockname()[1]) not in _HANDED_OUT:
                ports.append(port)
        _HANDED_OUT.update(ports)
        return ports
    finally:
        for s in socks:
            s.close()


def _node_args(temp_dir: Path, cpus: float, object_store_mb: int) -> list[str]:
    # Per-node services default to fixed ports (e.g. the dashboard agent's 52365), which two
    # nodes on one machine, or someone else's cluster, would fight over: choose them all.
    node_manager, object_manager, agent_http, agent_grpc, runtime_env, metrics = _free_ports(6)
    return [
        "--block",
        "--temp-dir",
        str(temp_dir),
        "--num-cpus",
        f"{cpus:g}",
        # Every fake node would otherwise claim all of this machine's GPUs.
        "--num-gpus",
        "0",
        # Ray's default is 30% of memory per node; several nodes on a shared box need far less.
        "--object-store-memory",
        str(object_store_mb * 2**20),
        "--node-manager-port",
        str(node_manager),
        "--object-manager-port",
        str(object_manager),
        "--dashboard-agent-listen-port",
        str(agent_http),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(runtime_env),
        "--metrics-export-port",
        str(metrics),
        "--disable-usage-stats",
    ]


def _launch(name: str, args: list[str], root: Path, job_address: str) -> subprocess.Popen:
    # The caller's RAY_ADDRESS (another cluster) must not leak into this one's processes.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env.update(
        CLIENT_ENV,
        RAY_USAGE_STATS_ENABLED="0",
        # Draining on SIGTERM lets Serve quiesce; here it would only make `stop` wait 30 s.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        # State-API clients inside the cluster (Ray Train's placement-group cleaner) find their
        # cluster through this; without it they scan the machine for GCS processes and give up
        # when other clusters run here too.
        RAY_API_SERVER_ADDRESS=job_address,
        # Job entrypoints say `python`: it must be this environment's (with torch and the
        # project), not whatever a non-activated shell finds first on PATH.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    with open(root / f"{name}.log", "wb") as log:
        # A session of its own: the node outlives `local.py start` and a Ctrl-C in its terminal.
        return subprocess.Popen(
            [_ray_bin(), "start", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def _get(url: str, token: str):
    """GET a JSON document from the head's dashboard; None while it does not answer."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise ClusterError(
                f"{url} refused the token of this machine ({e.code}): was the cluster started by "
                "another user, or with RAY_AUTH_TOKEN set to something else?"
            ) from None
        return None
    except OSError:
        return None


def alive_nodes(job_address: str, token: str) -> list[dict]:
    """The nodes the head reports alive: node_id, is_head_node, resources_total, ..."""
    reply = _get(
        f"{job_address}/api/v0/nodes?limit=1000&filter_keys=state&filter_predicates=%3D&filter_values=ALIVE", token
    )
    return reply["data"]["result"]["result"] if reply else []


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _wait(what: str, ready, procs: dict[str, subprocess.Popen], root: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                log = root / f"{name}.log"
                raise ClusterError(
                    f"{name} exited with code {p.returncode} while waiting for {what}; {log} ends with:\n{_tail(log)}"
                )
        if ready():
            return
        time.sleep(0.5)
    raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}; the logs are in {root}")


def start(
    nodes: int = 2,
    cpus_per_node: float = 1,
    head_cpus: float = 0,
    root: str | Path = DEFAULT_ROOT,
    object_store_mb: int = 128,
    timeout: float = 120.0,
) -> LocalCluster:
    """Start a head and ``nodes`` worker nodes; return once the head sees all of them alive.

    If anything fails on the way, whatever was started is stopped before the error is raised.
    """
    if nodes < 0 or cpus_per_node < 0 or head_cpus < 0:
        raise ClusterError(
            f"--nodes, --cpus-per-node and --head-cpus must be >= 0, got {nodes}, {cpus_per_node}, {head_cpus}"
        )
    root = Path(root)
    if (root / STATE_FILE).exists():
        raise ClusterError(
            f"a local cluster is already recorded in {root / STATE_FILE}: stop it with "
            f"`python cluster/local.py stop --root {root}`, or choose another --root"
        )
    root.mkdir(parents=True, exist_ok=True)
    token = _token()
    gcs_port, dashboard_port, client_port = _free_ports(3)
    cluster = LocalCluster(root=str(root), job_address=f"http://{HOST}:{dashboard_port}")
    procs: dict[str, subprocess.Popen] = {}

    def launch(name: str, args: list[str], cpus: float) -> None:
        procs[name] = _launch(name, args + _node_args(root / name, cpus, object_store_mb), root, cluster.job_address)
        cluster.nodes.append(Node(name, procs[name].pid, cpus, str(root / name), str(root / f"{name}.log")))
        # Written after every launch, so `stop` finds whatever got started if we fail half-way.
        (root / STATE_FILE).write_text(json.dumps(asdict(cluster), indent=2))

    try:
        launch(
            "head",
            [
                "--head",
                "--port",
                str(gcs_port),
                "--include-dashboard",
                "true",
                "--dashboard-host",
                HOST,
                "--dashboard-port",
                str(dashboard_port),
                "--ray-client-server-port",
                str(client_port),
            ],
            head_cpus,
        )
        # `ray start --head` writes the GCS address it published (this machine's IP) last, over
        # the one a previous cluster in the same root may have left.
        published = root / "head" / "ray_current_cluster"

        def head_up() -> bool:
            if not published.exists() or not published.read_text().strip().endswith(f":{gcs_port}"):
                return False
            return _get(f"{cluster.job_address}/api/version", token) is not None

        _wait(f"the head's job server at {cluster.job_address}", head_up, procs, root, timeout)
        cluster.gcs_address = published.read_text().strip()
        for i in range(1, nodes + 1):
            launch(f"node{i}", ["--address", cluster.gcs_address], cpus_per_node)
        _wait(
            f"{nodes + 1} alive nodes",
            lambda: len(alive_nodes(cluster.job_address, token)) == nodes + 1,
            procs,
            root,
            timeout,
        )
    except BaseException:
        stop(root)
        raise
    return cluster


def load(root: str | Path = DEFAULT_ROOT) -> LocalCluster | None:
    path = Path(root) / STATE_FILE
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    state["nodes"] = [Node(**n) for n in state["nodes"]]
    return LocalCluster(**state)


def _ours(node: Node) -> psutil.Process | None:
    """The `ray start` process launched for this node, or None (gone, or its pid now belongs to another)."""
    try:
        p = psutil.Process(node.pid)
        cmdline = p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return p if "start" in cmdline and node.temp_dir in cmdline else None


def _in_sessions(sessions: set[int]) -> list[psutil.Process]:
    """Processes whose session is one of ``sessions``."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) in sessions:
                found.append(p)
        except (ProcessLookupError, PermissionError):
            pass
    return found


def processes(root: str | Path = DEFAULT_ROOT) -> list[psutil.Process]:
    """Every process of the cluster under ``root``: each node's ``ray start``, its descendants,
    and whatever else runs in its session.

    Most Ray processes rename themselves (``ray::RayTrainWorker``...), so what identifies them
    is where they come from: each ``ray start`` leads a session of its own (``_launch``),
    which its children inherit and keep even when their parent dies before them.
    """
    cluster = load(root)
    starters = [p for n in cluster.nodes if (p := _ours(n)) is not None] if cluster else []
    found = {p.pid: p for p in _in_sessions({p.pid for p in starters})}
    for p in starters:
        try:
            found.update((c.pid, c) for c in [p, *p.children(recursive=True)])
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def stop(root: str | Path = DEFAULT_ROOT, timeout: float = 30.0) -> int:
    """Stop the cluster recorded under ``root``, worker nodes first; return how many processes it had.

    Each ``ray start --block`` shuts its node down on SIGTERM; whatever outlives that (its
    processes as they were before the signal, and anything still in its session) is killed
    by pid. Stopping a cluster that is not there does nothing.
    """
    cluster = load(root)
    if cluster is None:
        return 0
    family = processes(root)
    starters = {n.name: p for n in cluster.nodes if (p := _ours(n)) is not None}
    sessions = {p.pid for p in starters.values()}
    head = starters.pop("head", None)
    for group in (list(starters.values()), [head] if head else []):
        for p in group:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(group, timeout=timeout)
    _, left = psutil.wait_procs(family, timeout=5)
    left += [p for p in _in_sessions(sessions) if p.pid not in {q.pid for q in left}]
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=5)
    (Path(root) / STATE_FILE).unlink()
    return len(family)


def _print_addresses(cluster: LocalCluster) -> None:
    print(f"  export RAY_ADDRESS={cluster.job_address} RAY_AUTH_MODE=token")
    print(f"  job server and dashboard: {cluster.job_address} (ray job submit/status/logs/stop)")
    print(f"  GCS: {cluster.gcs_address} (ray.init(address=...), ray status --address; with RAY_AUTH_MODE=token)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python cluster/local.py",
        description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start a head and N worker nodes, print the addresses to use")
    p_start.add_argument("--nodes", type=int, default=2, help="worker nodes besides the head (default 2)")
    p_start.add_argument("--cpus-per-node", type=float, default=1, help="CPUs each worker node offers (default 1)")
    p_start.add_argument(
        "--head-cpus",
        type=float,
        default=0,
        help="CPUs the head offers (default 0: no training worker lands on the head)",
    )
    p_start.add_argument("--object-store-mb", type=int, default=128, help="object store per node (default 128)")
    for p in (
        p_start,
        sub.add_parser("status", help="the recorded nodes and what the head sees"),
        sub.add_parser("stop", help="stop every process of the cluster"),
    ):
        p.add_argument(
            "--root",
            default=str(DEFAULT_ROOT),
            help=f"state, logs and Ray temp dirs; keep the path short (default {DEFAULT_ROOT})",
        )
    args = parser.parse_args(argv)

    try:
        if args.command == "start":
            cluster = start(args.nodes, args.cpus_per_node, args.head_cpus, args.root, args.object_store_mb)
            print(
                f"local Ray cluster up: a head with {args.head_cpus:g} CPU and {args.nodes} worker node(s) of "
                f"{args.cpus_per_node:g} CPU; state and logs in {args.root}"
            )
            _print_addresses(cluster)
            print(f"stop it with: python cluster/local.py stop --root {args.root}")
            return 0
        if args.command == "stop":
            n = stop(args.root)
            print(
                f"stopped the local cluster in {args.root} ({n} processes)"
                if n
                else f"no local cluster running in {args.root}"
            )
            return 0
        cluster = load(args.root)
        if cluster is None:
            print(f"no local cluster recorded in {args.root}: start one with `python cluster/local.py start`")
            return 1
        for n in cluster.nodes:
            print(f"{n.name}: pid {n.pid} {'running' if _ours(n) else 'GONE'}, {n.cpus:g} CPU, log {n.log}")
        alive = alive_nodes(cluster.job_address, _token())
        print(f"the head sees {len(alive)} alive node(s) of {len(cluster.nodes)}")
        _print_addresses(cluster)
        return 0 if len(alive) == len(cluster.nodes) else 1
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
