"""Negatives across workers: 2 gloo processes, then 2 Ray nodes, against one process.

Each worker takes its slice of the global batch; the loss gathers keys from every
worker (into the queues, or with gradient in in-batch mode) and the parameter
gradients are averaged as data parallelism does. That must equal the gradient of one
process on the concatenated batch. Batch norm runs either in eval mode (running
statistics: a sample's features do not depend on the rest of its worker's batch) or in
training mode with statistics summed over the workers (model.bn_sync=global, one BN
group), where the running statistics must match too. Everything runs in fp64 so
"equal" can mean equal to 1e-12: in fp32 the convolution gradients, summed over 2 + 2
samples instead of 4, already differ by rounding (about 1e-6 of the largest gradient).
"""

import os
import socket
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dclr_dist.batchnorm import ViewBatchNorm, set_sync
from dclr_dist.loss import DCLRLoss, all_gather
from dclr_dist.model import DCLR, VIEWS

MODES = [(negatives, bn) for negatives in ("queue", "in_batch") for bn in ("eval", "sync")]

B, T, S, STEPS, WORLD = 2, 8, 32, 2, 2  # per-worker batch; two steps so gathered keys are used as negatives


def run(mode: tuple[str, str], rank: int = 0, world: int = 1) -> dict:
    """Gradients (averaged over workers) and losses of each step, the final queue and BN running means."""
    in_batch, sync = mode[0] == "in_batch", mode[1] == "sync"
    torch.manual_seed(0)
    model = DCLR("tiny", width=4, dim=8, in_batch=in_batch, bn_groups=1).double().train(sync)
    if sync and world > 1:
        set_sync(model, dist.group.WORLD)
    # queue of 6 < 2 steps x 4 keys: the ring wraps across the workers' keys
    criterion = DCLRLoss(dim=8, queue_size=6, topk=2, in_batch=in_batch).double()
    g = torch.Generator().manual_seed(1)
    batches = [
        {n: torch.randn(WORLD * B, 3, T, S, S, generator=g, dtype=torch.float64) for n in VIEWS} for _ in range(STEPS)
    ]
    grads, losses = [], []
    for batch in batches:
        model.zero_grad()
        rows = slice(rank * B, (rank + 1) * B) if world > 1 else slice(None)
        loss = criterion(model({n: x[rows] for n, x in batch.items()}))["loss"]
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.encoder_q.parameters()])
        loss = loss.detach()
        if world > 1:  # what DDP / DeepSpeed do with the parameter gradients
            dist.all_reduce(grad)
            dist.all_reduce(loss)
        grads.append(grad / world)
        losses.append(loss / world)
    running = torch.cat([m.running_mean for m in model.encoder_q.f.modules() if isinstance(m, ViewBatchNorm)])
    return {"grads": grads, "losses": losses, "queue": criterion.queue.clone(), "running_mean": running}


def check_gather(rank: int, world: int) -> None:
    """All ranks' keys are present, in rank order."""
    gathered = all_gather(torch.full((B, 3), float(rank)))
    assert gathered[:, 0].tolist() == [r for r in range(world) for _ in range(B)]


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        check_gather(rank, world)
        torch.save({mode: run(mode, rank, world) for mode in MODES}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_matches_one_process(result: dict, mode: tuple[str, str]) -> None:
    ref = run(mode)
    for step in range(STEPS):
        torch.testing.assert_close(result["grads"][step], ref["grads"][step], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(result["losses"][step], ref["losses"][step], rtol=1e-12, atol=0.0)
    torch.testing.assert_close(result["queue"], ref["queue"])  # same keys in the same ring order
    torch.testing.assert_close(result["running_mean"], ref["running_mean"], rtol=1e-10, atol=1e-12)


def test_gathered_negatives_give_one_process_gradient_on_gloo():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(WORLD, free_port(), out_dir), nprocs=WORLD)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
    for mode in MODES:
        assert_matches_one_process(results[0][mode], mode)
        torch.testing.assert_close(results[1][mode], results[0][mode])  # every rank holds the same queues


def ray_worker(rank: int, world: int, port: int) -> tuple[str, dict]:
    import ray

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        check_gather(rank, world)
        result = {mode: run(mode, rank, world) for mode in MODES}
    finally:
        dist.destroy_process_group()
    return ray.get_runtime_context().get_node_id(), result


@pytest.mark.slow
def test_gathered_negatives_across_two_fake_ray_nodes(monkeypatch):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(WORLD):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        # The workers cannot import this test file by name: ship its functions by value.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        port = free_port()
        task = ray.remote(num_cpus=1)(ray_worker)  # one CPU per node: one worker per node
        (node0, result), (node1, _) = ray.get([task.remote(r, WORLD, port) for r in range(WORLD)])
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert node0 != node1
    for mode in MODES:
        assert_matches_one_process(result[mode], mode)
