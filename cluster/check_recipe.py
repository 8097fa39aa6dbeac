"""Check a Ray launcher config for AWS (cluster/aws.yaml) before `ray up`: what Ray's
launcher would refuse, and what it would launch but that could never boot or hold the run.

    python cluster/check_recipe.py [cluster/aws.yaml] [--config dclr_dist/configs/k400_r2plus1d.yaml ...]

- Ray's JSON schema for launcher configs (a misspelt key fails there, not on the cloud).
- Each node type's InstanceType is one this file knows: its resources claim no more CPUs
  than the instance has vCPUs and exactly its GPUs, and an EFA node lists one interface per
  network card.
- The network declared in ``metadata.network`` (``default_route``: nat, igw or none;
  ``s3_gateway_endpoint``): every node reaches what its setup commands fetch and S3, and
  Ray's launcher accepts the subnet.
- Each pretraining config given (default: dclr_dist/configs/k400_r2plus1d.yaml) fits: its workers
  per GPU node times ``cluster.cpus_per_worker`` within the node's CPUs, and enough GPU nodes
  for ``cluster.workers``.

Prints one line per problem and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# vCPUs, GPUs and network cards of the instance types the recipes name (AWS's instance type
# pages; on EFA instances each card takes one EFA interface). Add a type before using it.
INSTANCES = {
    "m6i.2xlarge": (8, 0, 1),
    "m6i.4xlarge": (16, 0, 1),
    "p4d.24xlarge": (96, 8, 4),
    "p4de.24xlarge": (96, 8, 4),
    "p5.48xlarge": (192, 8, 32),
}

# Setup commands that download: the uv installer and uv's Python builds, pip and apt, and
# the project's make rule, which pip-installs the pinned set from PyPI. node_check.sh
# without --offline probes the internet and fails where there is none.
_FETCHES = re.compile(
    r"\b(curl|wget)\b|\bpip3?\b.*\binstall\b|\buv\b.*\b(install|sync)\b|\bapt(-get)?\b.*\binstall\b"
    r"|\bmake\b|node_check\.sh(?!.*--offline)"
)


def _setup_commands(cfg: dict, name: str) -> list[str]:
    """The setup commands Ray runs on node type ``name``."""
    node = cfg["available_node_types"][name]
    if name == cfg["head_node_type"]:
        return cfg.get("setup_commands", []) + cfg.get("head_setup_commands", [])
    if "worker_setup_commands" in node:  # replaces both global lists for this type
        return node["worker_setup_commands"]
    return cfg.get("setup_commands", []) + cfg.get("worker_setup_commands", [])


def _has_public_ip(node_config: dict) -> bool:
    # AWS assigns no public IPv4 to an instance launched with several network interfaces.
    nics = node_config.get("NetworkInterfaces", [])
    if len(nics) > 1:
        return False
    return nics[0].get("AssociatePublicIpAddress", True) if nics else True


def network_problems(cfg: dict) -> list[str]:
    """Why a node of ``cfg`` would not boot or not reach S3 under its metadata.network."""
    network = cfg.get("metadata", {}).get("network")
    if not isinstance(network, dict):
        return [
            "metadata.network is missing: declare the nodes' default_route (nat, igw or none) and "
            "s3_gateway_endpoint (cluster/README.md, Network)"
        ]
    route, endpoint = network.get("default_route"), network.get("s3_gateway_endpoint")
    if route not in ("nat", "igw", "none"):
        return [f"metadata.network.default_route must be nat, igw or none, got {route!r}"]
    if not isinstance(endpoint, bool):
        return [f"metadata.network.s3_gateway_endpoint must be true or false, got {endpoint!r}"]
    problems = []
    if route != "igw" and not cfg["provider"].get("use_internal_ips", False):
        problems.append(
            f"default_route {route} is a private subnet, which Ray's launcher refuses unless "
            "provider.use_internal_ips is true"
        )
    for name, node in cfg["available_node_types"].items():
        internet = route == "nat" or (route == "igw" and _has_public_ip(node["node_config"]))
        why = (
            "it has no public address (several network interfaces) and its subnet's default route is an "
            "internet gateway"
            if route == "igw"
            else "its subnet has no route out (default_route none)"
        )
        if not internet:
            fetching = [c for c in _setup_commands(cfg, name) if _FETCHES.search(c)]
            if fetching:
                problems.append(
                    f"node type {name}: setup fetches from the internet ({fetching[0]!r}) but {why}: "
                    "put the nodes in a private subnet behind a NAT gateway (default_route: nat), or "
                    "bake the environment into the AMI and fetch nothing"
                )
            if not endpoint:
                problems.append(
                    f"node type {name}: no path to S3 (shards, checkpoints): {why} and there is no "
                    "S3 gateway VPC endpoint (s3_gateway_endpoint: true)"
                )
    return problems


def instance_problems(cfg: dict) -> list[str]:
    problems = []
    for name, node in cfg["available_node_types"].items():
        itype = node["node_config"].get("InstanceType")
        if itype not in INSTANCES:
            problems.append(
                f"node type {name}: instance type {itype!r} is not in check_recipe.INSTANCES: "
                "add its vCPUs, GPUs and network cards"
            )
            continue
        vcpus, gpus, cards = INSTANCES[itype]
        res = node["resources"]
        if res.get("CPU", vcpus) > vcpus:
            problems.append(f"node type {name}: resources.CPU {res['CPU']} > the {vcpus} vCPUs of {itype}")
        if res.get("GPU", 0) != gpus:
            problems.append(f"node type {name}: resources.GPU {res.get('GPU', 0)} but {itype} has {gpus} GPUs")
        nics = node["node_config"].get("NetworkInterfaces", [])
        if any(n.get("InterfaceType") == "efa" for n in nics):
            indices = sorted(n.get("NetworkCardIndex", 0) for n in nics)
            if indices != list(range(cards)):
                problems.append(
                    f"node type {name}: EFA interfaces on network cards {indices}, but {itype} has "
                    f"{cards} cards: one interface per card, 0 to {cards - 1}"
                )
    return problems


def fit_problems(cfg: dict, config_path: str | Path) -> list[str]:
    """Does the pretraining config at ``config_path`` fit on the GPU node types of ``cfg``?"""
    from dclr_dist.config import load_config

    cluster = load_config(config_path).cluster
    gpu_types = {n: t for n, t in cfg["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}
    if cluster.gpus_per_worker <= 0:
        return [f"{config_path}: cluster.gpus_per_worker is 0, a CPU config; this recipe is for GPU runs"]
    if not gpu_types:
        return ["no node type offers GPUs"]
    problems, capacity = [], 0
    for name, node in gpu_types.items():
        res = node["resources"]
        per_node = int(res["GPU"] // cluster.gpus_per_worker)
        cpus = per_node * cluster.cpus_per_worker
        if cpus > res.get("CPU", 0):
            problems.append(
                f"{config_path}: {per_node} workers x cluster.cpus_per_worker {cluster.cpus_per_worker:g} "
                f"= {cpus:g} CPUs, but node type {name} has {res.get('CPU', 0)}: workers would wait "
                "for CPUs that never come"
            )
        capacity += per_node * min(node.get("max_workers", cfg["max_workers"]), cfg["max_workers"])
    if capacity < cluster.workers:
        problems.append(f"{config_path}: cluster.workers {cluster.workers}, but the GPU nodes hold {capacity} workers")
    return problems


def check(cfg: dict, configs: list[str | Path]) -> list[str]:
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    try:
        jsonschema.validate(cfg, schema)
    except jsonschema.ValidationError as e:
        return [f"Ray's launcher schema: {e.message} (at {'/'.join(map(str, e.absolute_path)) or 'top level'})"]
    if cfg["provider"].get("type") != "aws":
        return [f"provider.type is {cfg['provider'].get('type')!r}: this checks AWS recipes"]
    return instance_problems(cfg) + network_problems(cfg) + [p for c in configs for p in fit_problems(cfg, c)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python cluster/check_recipe.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", nargs="?", default=str(REPO / "cluster" / "aws.yaml"))
    parser.add_argument(
        "--config",
        action="append",
        metavar="FILE.yaml",
        help="a pretraining config the cluster must hold (repeatable; default dclr_dist/configs/k400_r2plus1d.yaml)",
    )
    args = parser.parse_args(argv)
    cfg = yaml.safe_load(Path(args.recipe).read_text())
    problems = check(cfg, args.config or [REPO / "dclr_dist" / "configs" / "k400_r2plus1d.yaml"])
    for p in problems:
        print(f"{args.recipe}: {p}")
    if not problems:
        print(f"{args.recipe}: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
