"""The trainer's DeepSpeed engine on CPU (gloo, one process): each precision and ZeRO stage trains."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from dclr_dist.config import load_config
from dclr_dist.model import VIEWS
from dclr_dist.train import build


@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                           "LOCAL_RANK": "0"})
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()  # later tests expect a process without one


@pytest.mark.parametrize("precision, stage", [("fp32", 0), ("fp32", 2), ("bf16", 1), ("bf16", 2)])
def test_engine_steps_in_each_precision_and_zero_stage(process_group, precision, stage):
    cfg = load_config(None, ["model.arch=tiny", "model.width=8", "model.dim=16", "loss.queue_size=32",
                             "data.batch_size=4", f"train.precision={precision}", f"train.zero_stage={stage}",
                             "train.grad_clip=1.0", "train.lr=0.1", "train.ref_batch=4"])
    torch.manual_seed(0)
    engine, criterion = build(cfg, world_size=1, steps_per_epoch=4, device=torch.device("cpu"))
    batch = {name: torch.randn(4, 3, 4, 32, 32) for name in VIEWS}
    key_before = [p.detach().clone() for p in engine.module.encoder_k.parameters()]
    query_before = [p.detach().clone() for p in engine.module.encoder_q.parameters()]
    losses = []
    for _ in range(3):
        out = engine(batch)
        loss = criterion(out)["loss"]
        engine.backward(loss)
        engine.step()
        engine.module.momentum_update()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    # master weights stay fp32 (autocast), the query encoder moved, the key encoder followed by momentum
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(query_before, engine.module.encoder_q.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(key_before, engine.module.encoder_k.parameters()))
    assert int(criterion.queue_filled) == 12
