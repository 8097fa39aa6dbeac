"""NCCL fabric gate, to run once on a new cluster before the first real training run:
does NCCL between GPU nodes go over the fabric (EFA through aws-ofi-nccl, or InfiniBand),
and at what bus bandwidth?

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python cluster/nccl_check.py --nodes 2

Places --ranks-per-node ranks (one GPU each) on each of --nodes distinct nodes of the
cluster, sets up torch.distributed as Ray Train does for training (the environment the node's
raylet was started with, every GPU of the node visible to its ranks, MASTER_ADDR on rank 0),
with NCCL_DEBUG=INFO written to a file per rank, and times all-reduce and all-gather at
4 KiB (latency) and 100 MiB (bandwidth). Bus bandwidth is nccl-tests' definition, so the
figures compare with theirs: all-reduce 2(n-1)/n x size / time, all-gather (n-1)/n x size /
time, size being the reduced or gathered tensor.

Exits 1 with one line saying why when NCCL chose TCP sockets between the nodes (its
network plugin was not found: a silent fallback to a fraction of the fabric's bandwidth),
when the log names no network, or when a rank fails (e.g. a CUDA driver too old for pip's
torch). --backend gloo runs the same on CPUs, without NCCL and so without the transport
check: the CPU form that tests/test_cluster.py runs on a local multi-node cluster.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import re
import socket
import sys
import tempfile
import time
import uuid

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

_UNITS = {
    "": 1,
    "B": 1,
    "K": 2**10,
    "KB": 2**10,
    "KIB": 2**10,
    "M": 2**20,
    "MB": 2**20,
    "MIB": 2**20,
    "G": 2**30,
    "GB": 2**30,
    "GIB": 2**30,
}


def parse_size(text: str) -> int:
    """Bytes in '4KiB', '100MB', '1048576' (K, M, G are powers of 1024, as in nccl-tests)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4KiB, 100MiB, 1048576)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def human(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def bus_bandwidth(op: str, nbytes: int, seconds: float, world: int) -> float:
    """Bytes per second on the busiest link, nccl-tests' busbw."""
    factor = 2 * (world - 1) / world if op == "all_reduce" else (world - 1) / world
    return nbytes / seconds * factor


_NETWORK = re.compile(r"NCCL INFO Using network (.+?)\s*$")
_VIA = re.compile(r"via NET/([A-Za-z]+)")
# How NCCL set up its network (plugin loaded or not, provider, devices), without the channel lines.
_NET_SETUP = re.compile(r"NET/(Plugin|OFI|IB|Socket)\b(?!/)")


def network_of(lines: list[str]) -> tuple[str | None, list[str]]:
    """The network NCCL chose, from one rank's INFO log ("Socket", "IB", "Libfabric", "AWS
    Libfabric", ...), and the log lines about it; None when the log names none."""
    evidence = [ln for ln in lines if "Using network" in ln or _NET_SETUP.search(ln)]
    names = [m.group(1) for ln in lines if (m := _NETWORK.search(ln))]
    # Channels to other nodes name their transport too: one over sockets is enough to fail.
    if any(m.group(1) == "Socket" for ln in lines if (m := _VIA.search(ln))):
        return "Socket", evidence
    return (names[-1] if names else None), evidence


def is_fabric(network: str) -> bool:
    """EFA (aws-ofi-nccl registers as Libfabric or OFI) or InfiniBand/RoCE, not TCP sockets."""
    return re.search(r"libfabric|ofi|efa|\bib\b", network, re.IGNORECASE) is not None


def verdict(networks: list[str | None]) -> str | None:
    """None if every rank's NCCL uses the fabric, else the reason, for one line of output."""
    missing = [r for r, n in enumerate(networks) if n is None]
    if missing:
        return (
            f"NCCL's log names no network on rank(s) {missing[:8]}: was NCCL_DEBUG_FILE written? "
            "(run again; see the ranks' logs in the Ray dashboard)"
        )
    socket_ranks = [r for r, n in enumerate(networks) if n == "Socket"]
    if socket_ranks:
        return (
            f"NCCL uses TCP sockets between nodes (Using network Socket on {len(socket_ranks)} of {len(networks)} "
            "ranks), not the fabric: aws-ofi-nccl was not loaded (on the workers: LD_LIBRARY_PATH with "
            "/opt/amazon/ofi-nccl/lib, FI_PROVIDER=efa; cluster/README.md, NCCL fabric gate)"
        )
    other = sorted({n for n in networks if not is_fabric(n)})
    if other:
        return f"NCCL uses network(s) {other}, which are neither EFA (Libfabric/OFI) nor InfiniBand"
    return None


@ray.remote
class Rank:
    """One rank of the benchmark, an actor in one placement-group bundle (one node)."""

    def where(self) -> dict:
        with socket.socket() as s:  # rank 0's port for torch.distributed's rendezvous
            s.bind(("", 0))
            port = s.getsockname()[1]
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "port": port,
        }

    def run(self, spec: dict) -> dict:
        import torch
        import torch.distributed as dist

        nccl = spec["backend"] == "nccl"
        if nccl:
            # As Ray Train: the ranks of a node see all of its GPUs, so NCCL finds its NVLink peers.
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(spec["node_gpus"])
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"CUDA is not available on {ray.util.get_node_ip_address()}: torch "
                    f"{torch.__version__} is built for CUDA {torch.version.cuda}, whose NVIDIA driver "
                    "this node lacks"
                )
            torch.cuda.set_device(spec["local_rank"])
            device = torch.device("cuda", spec["local_rank"])
        else:
            device = torch.device("cpu")
        os.environ.update(MASTER_ADDR=spec["master_addr"], MASTER_PORT=str(spec["master_port"]))
        dist.init_process_group(
            spec["backend"],
            rank=spec["rank"],
            world_size=spec["world"],
            timeout=datetime.timedelta(seconds=spec["timeout"]),
        )
        world = spec["world"]

        def sync() -> None:
            if nccl:
                torch.cuda.synchronize()

        times = {}
        for nbytes in spec["sizes"]:
            full = torch.ones(max(nbytes // 4, world), device=device)
            part = full[: full.numel() // world].clone()
            gathered = torch.empty(part.numel() * world, device=device)
            ops = {
                "all_reduce": lambda full=full: dist.all_reduce(full),
                "all_gather": lambda gathered=gathered, part=part: dist.all_gather_single(gathered, part),
            }
            for op, fn in ops.items():
                for _ in range(spec["warmup"]):
                    fn()
                sync()
                dist.barrier()
                start = time.perf_counter()
                for _ in range(spec["iters"]):
                    fn()
                sync()
                times[f"{op} {nbytes}"] = (time.perf_counter() - start) / spec["iters"]
        dist.destroy_process_group()

        lines = []
        if nccl:
            pattern = spec["log_pattern"].replace("%h", "*").replace("%p", str(os.getpid()))
            for path in glob.glob(pattern):
                with open(path, errors="replace") as f:
                    lines += [ln.rstrip("\n") for ln in f if "NCCL INFO" in ln]
                os.unlink(path)
        return {
            "rank": spec["rank"],
            "times": times,
            "nccl_lines": lines,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if nccl else None,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python cluster/nccl_check.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nodes", type=int, default=2, help="distinct nodes to span (>= 2; default 2)")
    parser.add_argument(
        "--ranks-per-node",
        type=int,
        default=8,
        help="ranks on each node, one GPU each with nccl (default 8: a p4d or p5 node)",
    )
    parser.add_argument(
        "--backend",
        choices=("nccl", "gloo"),
        default="nccl",
        help="nccl (default, GPUs) or gloo (CPUs: no transport check)",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        default=[4 * 2**10, 100 * 2**20],
        metavar="SIZE",
        help="message sizes (default 4KiB 100MiB)",
    )
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per operation and size (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first (default 5)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="seconds to wait for the nodes (GPU nodes take 10-15 minutes to come up) and for "
        "the process group (default 900)",
    )
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.ranks_per_node < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--nodes must be >= 2, --ranks-per-node and --iters >= 1, --warmup >= 0")

    nccl = args.backend == "nccl"
    ray.init(log_to_driver=False)
    bundle = {"CPU": args.ranks_per_node, **({"GPU": args.ranks_per_node} if nccl else {})}
    pg = placement_group([bundle] * args.nodes, strategy="STRICT_SPREAD")
    try:
        if not pg.wait(timeout_seconds=args.timeout):
            print(
                f"nccl_check: FAIL: could not place {args.ranks_per_node} rank(s) of {bundle} on each of "
                f"{args.nodes} distinct nodes within {args.timeout:g} s; the cluster has {ray.cluster_resources()}",
                file=sys.stderr,
            )
            return 1
        log_pattern = os.path.join(tempfile.gettempdir(), f"dclr-nccl-check-{uuid.uuid4().hex[:8]}.%h.%p.log")
        env = {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET", "NCCL_DEBUG_FILE": log_pattern} if nccl else {}
        ranks = [
            Rank.options(
                num_cpus=1,
                num_gpus=1 if nccl else 0,
                runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=b),
            ).remote()
            for b in range(args.nodes)
            for _ in range(args.ranks_per_node)
        ]
        where = ray.get([r.where.remote() for r in ranks])
        node_gpus = {}
        for w in where:
            node_gpus.setdefault(w["node"], []).extend(w["gpus"])
        specs = []
        for rank, w in enumerate(where):
            gpus = sorted(node_gpus[w["node"]], key=int)
            specs.append(
                {
                    "rank": rank,
                    "world": len(ranks),
                    "backend": args.backend,
                    "node_gpus": gpus,
                    "local_rank": gpus.index(w["gpus"][0]) if nccl else 0,
                    "master_addr": where[0]["ip"],
                    "master_port": where[0]["port"],
                    "sizes": args.sizes,
                    "iters": args.iters,
                    "warmup": args.warmup,
                    "timeout": args.timeout,
                    "log_pattern": log_pattern,
                }
            )
        try:
            results = ray.get([r.run.remote(s) for r, s in zip(ranks, specs)])
        except ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None) or e
            print(
                f"nccl_check: FAIL: a rank failed: {type(cause).__name__}: {str(cause).strip().splitlines()[-1]}",
                file=sys.stderr,
            )
            return 1
    finally:
        remove_placement_group(pg)

    world = len(results)
    nodes = len({w["node"] for w in where})
    print(
        f"nccl_check: {nodes} nodes x {args.ranks_per_node} ranks, backend {args.backend}"
        + (f", NCCL {results[0]['nccl']}" if nccl else "")
    )
    print(f"{'operation':<11} {'size':>9} {'time':>11} {'bus bandwidth':>14}")
    bandwidth = {}
    for nbytes in args.sizes:
        for op in ("all_reduce", "all_gather"):
            seconds = max(r["times"][f"{op} {nbytes}"] for r in results)  # the slowest rank sets the pace
            bandwidth[op, nbytes] = bus_bandwidth(op, nbytes, seconds, world)
            took = f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"
            print(f"{op:<11} {human(nbytes):>9} {took:>11} {bandwidth[op, nbytes] / 1e9:>9.3g} GB/s")
    largest = max(args.sizes)
    summary = f"all-reduce {human(largest)}: {bandwidth['all_reduce', largest] / 1e9:.3g} GB/s bus bandwidth"
    if not nccl:
        print(f"nccl_check: ok ({summary}); transport not checked: gloo does not use NCCL")
        return 0
    networks, shown = [], set()
    for r in results:
        network, evidence = network_of(r["nccl_lines"])
        networks.append(network)
        # Rank 0's lines and those of the first rank of every other node.
        if r["rank"] % args.ranks_per_node == 0:
            for line in evidence:
                text = line.split("NCCL INFO", 1)[-1].strip()
                if text not in shown:
                    shown.add(text)
                    print(f"  rank {r['rank']}: {text}")
    reason = verdict(networks)
    if reason:
        print(f"nccl_check: FAIL: {reason}; {summary}", file=sys.stderr)
        return 1
    print(f"nccl_check: ok: NCCL uses {networks[0]} on all {world} ranks; {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
