"""Two fake nodes on one machine (ray.cluster_utils.Cluster): one worker per node, shared queues."""

from __future__ import annotations

import os

import pytest
from helpers import TINY

from dclr_dist.config import load_config


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_TMPDIR"] = "/tmp/rt-nodes"
    os.environ.pop("RAY_ADDRESS", None)
    if ray.is_initialized():
        ray.shutdown()
    # A head without CPUs: the two 1-CPU nodes must each take one training worker.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address)
    yield nodes
    ray.shutdown()
    cluster.shutdown()


def test_workers_on_two_nodes_share_negatives(two_nodes, shards, tmp_path):
    from dclr_dist.train import fit

    cfg = load_config(
        None,
        [
            *TINY,
            f"data.train=[{shards['train']}]",
            f"train.storage_path={tmp_path}",
            "train.name=nodes",
            "train.epochs=2",
        ],
    )
    result = fit(cfg)
    assert result.error is None
    m = result.metrics
    assert m["nodes"] == 2 and m["world_size"] == 2
    # 2 epochs x 2 steps x 4 keys from each of the 2 nodes: the queue holds both nodes' keys
    assert m["queue_filled"] == 2 * 2 * 4 * 2
