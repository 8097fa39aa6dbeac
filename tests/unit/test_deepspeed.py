"""The trainer's DeepSpeed engine on CPU (gloo): each precision and ZeRO stage trains, gradients are
reduced in fp32 while backward runs, the speed switches apply, and on two processes every engine
configuration trains as plain data parallelism does."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from dclr_dist.config import load_config
from dclr_dist.engine import BUCKET_ELEMENTS, build
from dclr_dist.model import VIEWS


@pytest.mark.parametrize("precision, stage", [("fp32", 0), ("fp32", 2), ("bf16", 1), ("bf16", 2)])
def test_engine_steps_in_each_precision_and_zero_stage(process_group, precision, stage):
    cfg = load_config(
        None,
        [
            "model.arch=tiny",
            "model.width=8",
            "model.dim=16",
            "loss.queue_size=32",
            "data.batch_size=4",
            f"engine.precision={precision}",
            f"engine.zero_stage={stage}",
            "optim.grad_clip=1.0",
            "optim.lr=0.1",
            "optim.ref_batch=4",
        ],
    )
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


def _tiny(*extra):
    return load_config(
        None,
        [
            "model.arch=tiny",
            "model.width=8",
            "model.dim=16",
            "loss.queue_size=32",
            "data.batch_size=4",
            "optim.lr=0.1",
            "optim.ref_batch=4",
            *extra,
        ],
    )


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_gradients_are_reduced_in_fp32_overlapped_with_backward(process_group, stage):
    cfg = _tiny("engine.precision=bf16", f"engine.zero_stage={stage}")
    engine, _ = build(cfg, world_size=1, steps_per_epoch=4, device=torch.device("cpu"))
    # DeepSpeed would mark Linear/Conv parameters for bf16 reduction under autocast
    assert not any(hasattr(p, "comm_dtype") for p in engine.module.parameters())
    if stage == 0:
        # DeepSpeed's own stage-0 reduction, after backward, is replaced by the overlapped one
        assert not engine.enable_backward_allreduce
    else:
        zero = engine.optimizer
        assert zero.overlap_comm and zero.reduce_bucket_size == BUCKET_ELEMENTS
        assert set(zero.ipg_buckets) == {torch.float32}


def test_speed_switches_apply_and_leave_the_state_dict_keys(process_group):
    from dclr_dist.model import DCLR

    keys = list(DCLR("tiny", width=8, dim=16).state_dict())
    try:
        engine, _ = build(
            _tiny("engine.cudnn_benchmark=true", "engine.channels_last=true", "engine.compile=true"),
            world_size=1,
            steps_per_epoch=4,
            device=torch.device("cpu"),
        )
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = False
    model = engine.module
    assert model.memory_format == torch.channels_last_3d
    stages = [m for e in (model.encoder_q, model.encoder_k) for m in e.f.children()]  # compiled stage by stage
    assert stages and all(m._compiled_call_impl is not None for m in stages)
    # what checkpoints, best/ and exports are made of (tests/test_speed_switches.py runs the compiled step)
    assert list(model.state_dict()) == keys and list(engine.module_state_dict()) == keys


@pytest.mark.parametrize("compiled", [False, True])
def test_stage_0_reduces_each_bucket_while_backward_runs(process_group, monkeypatch, compiled):
    """In eager mode and under engine.compile (stage by stage, so each stage's gradients exist
    when its compiled backward ends; one graph per backbone gave them all at its end)."""
    import torch.distributed as dist

    import dclr_dist.engine
    from dclr_dist.model import DCLR

    monkeypatch.setattr(dclr_dist.engine, "BUCKET_ELEMENTS", 20_000)  # several buckets on the tiny model
    compile_backbones = DCLR.compile_backbones
    monkeypatch.setattr(DCLR, "compile_backbones", lambda m: compile_backbones(m, backend="aot_eager"))  # CPU
    engine, criterion = build(
        _tiny("train.grad_accum=2", f"engine.compile={str(compiled).lower()}"),
        world_size=1,
        steps_per_epoch=4,
        device=torch.device("cpu"),
    )
    events = []
    reduce = dist.all_reduce
    monkeypatch.setattr(
        dist, "all_reduce", lambda t, *a, **kw: events.append(("reduce", t.numel())) or reduce(t, *a, **kw)
    )
    first = next(p for p in engine.module.parameters() if p.requires_grad)  # the first layer: the last gradient
    first.register_post_accumulate_grad_hook(lambda p: events.append(("first layer's gradient", p.numel())))
    batch = {name: torch.randn(4, 3, 4, 32, 32) for name in VIEWS}
    trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    for micro in range(2):
        events.clear()
        engine.backward(criterion(engine(batch))["loss"])
        if micro == 0:  # inside an accumulation: gradients stay local
            assert [e for e in events if e[0] == "reduce"] == []
        else:
            reduced = [n for kind, n in events if kind == "reduce"]
            assert sum(reduced) == trainable and len(reduced) > 2
            kinds = [kind for kind, _ in events]
            assert kinds[0] == "reduce"  # a bucket went out before backward reached the first layer
            assert kinds[-2:] == ["reduce", "first layer's gradient"]  # and its own as its gradient came
        engine.step()


def _dp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Two ranks train 2 steps with each engine configuration and with a hand-written data-parallel
    reference (same weights, local gradients averaged with one all-reduce, torch SGD)."""
    import torch.distributed as dist

    from dclr_dist.loss import DCLRLoss
    from dclr_dist.model import DCLR

    torch.set_num_threads(1)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": "0",
        }
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(1 + rank)  # each rank its own batches
    batches = [{n: torch.randn(4, 3, 4, 32, 32, generator=g) for n in VIEWS} for _ in range(4)]
    results = {}
    try:
        for name, stage, accum, channels_last in DP_CASES:
            cfg = _tiny(
                f"engine.zero_stage={stage}",
                f"train.grad_accum={accum}",
                f"engine.channels_last={str(channels_last).lower()}",
            )
            torch.manual_seed(0)
            engine, criterion = build(cfg, world_size=world, steps_per_epoch=4, device=torch.device("cpu"))
            torch.manual_seed(0)
            model = DCLR.from_config(cfg.model, in_batch=False)
            model.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
            ref_loss = DCLRLoss(dim=cfg.model.dim, queue_size=cfg.loss.queue_size)
            params = [p for p in model.parameters() if p.requires_grad]
            sgd = torch.optim.SGD(params, lr=engine.get_lr()[0], momentum=0.9, weight_decay=1e-4)
            for step in range(2):
                micro = batches[step * accum : (step + 1) * accum]
                for batch in micro:
                    engine.backward(criterion(engine(batch))["loss"])
                    engine.step()
                    (ref_loss(model(batch))["loss"] / accum).backward()
                for p in params:
                    dist.all_reduce(p.grad)
                    p.grad /= world
                sgd.step()
                sgd.zero_grad()
                engine.module.momentum_update()
                model.momentum_update()
            results[name] = {
                "engine": {k: v.clone() for k, v in engine.module.state_dict().items()},
                "reference": model.state_dict(),
                "queue": (criterion.queue.clone(), ref_loss.queue),
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# (name, zero stage, gradient accumulation steps, channels_last)
DP_CASES = [("stage 0", 0, 1, False), ("stage 0, accumulation 2, channels_last", 0, 2, True), ("stage 2", 2, 1, False)]


def test_engines_on_two_ranks_train_like_plain_data_parallelism(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, *_ in DP_CASES:
        engine, reference = ranks[0][name]["engine"], ranks[0][name]["reference"]
        assert engine.keys() == reference.keys()
        for k in reference:
            torch.testing.assert_close(
                engine[k], reference[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k, name=name: f"{name}, {k}: {m}"
            )
            if "running" not in k:  # the weights agree across ranks; batch norm statistics are each rank's own
                torch.testing.assert_close(ranks[1][name]["engine"][k], engine[k], rtol=0, atol=0)
        torch.testing.assert_close(*ranks[0][name]["queue"])


def test_deepspeed_s_throughput_timer_is_off():
    from dclr_dist.engine import deepspeed_config

    # On by default, it synchronises the device twice per step.
    assert deepspeed_config(load_config(None))["timers"]["throughput"] == {"enabled": False, "synchronized": False}


@pytest.mark.parametrize("user_env", [{}, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}])
def test_resume_loads_weights_only_whatever_the_user_s_torch_environment(
    process_group, tmp_path, monkeypatch, user_env
):
    """torch refuses FORCE_WEIGHTS_ONLY together with FORCE_NO_WEIGHTS_ONLY: the loader sets the
    user's aside for the call and gives it back after."""
    from dclr_dist.checkpoint import CHECKPOINT_TAG, load_checkpoint

    for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        monkeypatch.delenv(k, raising=False)
    for k, v in user_env.items():
        monkeypatch.setenv(k, v)
    torch.manual_seed(0)
    engine, criterion = build(_tiny(), world_size=1, steps_per_epoch=4, device=torch.device("cpu"))
    engine.save_checkpoint(str(tmp_path), tag=CHECKPOINT_TAG, client_state={"epoch": 3})
    saved = {k: v.clone() for k, v in engine.module.state_dict().items()}
    with torch.no_grad():
        for p in engine.module.parameters():
            p.zero_()
    assert load_checkpoint(engine, str(tmp_path), "run")["epoch"] == 3
    assert all(torch.equal(saved[k], v) for k, v in engine.module.state_dict().items())
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    assert {k: os.environ.get(k) for k in user_env} == user_env


@pytest.mark.parametrize("throughput_timer", [False, True])
def test_the_trainer_s_step_has_no_host_sync_and_deepspeed_s_timer_would_add_them(
    process_group, throughput_timer, monkeypatch
):
    """benchmarks/syncs.py (the GPU check's counter) on the trainer's engine: nothing in a step as
    configured; with DeepSpeed's default throughput timer, its device synchronisations."""
    from helpers import benchmark_script

    from dclr_dist import engine as engine_module

    syncs = benchmark_script("syncs")
    if throughput_timer:  # DeepSpeed's default, which deepspeed_config turns off
        config = engine_module.deepspeed_config
        monkeypatch.setattr(
            engine_module, "deepspeed_config", lambda c: {**config(c), "timers": {"throughput": {"enabled": True}}}
        )
    torch.manual_seed(0)
    engine, criterion = build(_tiny(), world_size=1, steps_per_epoch=8, device=torch.device("cpu"))
    batch = {name: torch.randn(4, 3, 4, 32, 32) for name in VIEWS}
    for _ in range(4):  # the timer starts timing at its third step
        with syncs.watch(torch.device("cpu")) as w:
            engine.backward(criterion(engine(batch))["loss"])
            engine.step()
            engine.module.momentum_update()
    counts = w.counts()
    if throughput_timer:
        assert counts["by_kind"].get("synchronize", 0) == 2, counts
    else:
        assert counts["total"] == 0, counts


def test_stage_0_buckets_go_out_in_bucket_order_and_a_failed_backward_leaves_no_trace(process_group, monkeypatch):
    """Every rank issues the bucket all-reduces in one order (NCCL hangs otherwise), and a
    backward that raised half-way does not leave half-counted buckets for the next one."""
    import torch.distributed as dist

    import dclr_dist.engine

    monkeypatch.setattr(dclr_dist.engine, "BUCKET_ELEMENTS", 20_000)
    engine, criterion = build(_tiny(), world_size=1, steps_per_epoch=4, device=torch.device("cpu"))
    sizes = []
    reduce = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **kw: sizes.append(t.numel()) or reduce(t, *a, **kw))
    batch = {name: torch.randn(4, 3, 4, 32, 32) for name in VIEWS}
    params = [p for p in engine.module.parameters() if p.requires_grad][::-1]
    middle = params[len(params) // 2]
    fail = {"once": True}

    def boom(p):
        if fail.pop("once", False):
            raise RuntimeError("a fault half-way through backward")

    middle.register_post_accumulate_grad_hook(boom)
    with pytest.raises(RuntimeError, match="half-way"):
        engine.backward(criterion(engine(batch))["loss"])
    engine.zero_grad()
    sizes.clear()
    engine.backward(criterion(engine(batch))["loss"])
    trainable = sum(p.numel() for p in params)
    assert sum(sizes) == trainable and len(sizes) > 2  # each gradient reduced once, none stale
    # in the buckets' own order: reverse parameter order, about 20k elements each
    expected, size = [], 0
    for p in params:
        if size >= 20_000:
            expected.append(size)
            size = 0
        size += p.numel()
    assert sizes == [*expected, size]
    engine.step()
