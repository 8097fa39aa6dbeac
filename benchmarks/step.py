"""CPU micro-benchmark of one DCLR step: forward, loss, gather, backward, at world size 1 and 2.

    python benchmarks/step.py [--batch 4 --frames 8 --size 64 --width 16 --steps 10]

Each world size runs as gloo processes on this machine, one thread per worker, the
small backbone. "gather" is the time spent inside the loss's collectives (the queue
keys' all-gather; in in-batch mode also the gather with gradient and its backward
all-reduce), waiting for the other worker included; "loss" and "backward" exclude it.
The parameter-gradient all-reduce belongs to the trainer (DeepSpeed) and is not timed.

"host syncs" counts, in one profiled step that starts from the loader's uint8 frames (views,
forward, loss, backward, momentum update), what would make the host wait for the device on
CUDA (benchmarks/syncs.py: device values read on the host, tensors built from Python data,
copies to the host, explicit synchronisations). On CPU they cost nothing; counted here so
that none creeps into the GPU path unseen.
"""

import argparse
import socket
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dclr_dist import loss as loss_module
from dclr_dist import views
from dclr_dist.config import ViewsConfig
from dclr_dist.loss import DCLRLoss
from dclr_dist.model import DCLR, VIEWS

PARTS = ("forward", "loss", "gather", "backward")


class TimedCollectives:
    """torch.distributed with a stopwatch on the two collectives the loss calls."""

    def __init__(self):
        self.seconds = 0.0

    def __getattr__(self, name):
        return getattr(dist, name)

    def _timed(self, op, *args, **kwargs):
        t = time.perf_counter()
        result = op(*args, **kwargs)
        self.seconds += time.perf_counter() - t
        return result

    def all_gather_single(self, *args, **kwargs):
        return self._timed(dist.all_gather_single, *args, **kwargs)

    def all_reduce(self, *args, **kwargs):
        return self._timed(dist.all_reduce, *args, **kwargs)


def worker(rank: int, world: int, port: int, in_batch: bool, args, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    clock = loss_module.dist = TimedCollectives()
    torch.manual_seed(0)
    model = DCLR("tiny", width=args.width, in_batch=in_batch)
    criterion = DCLRLoss(queue_size=args.queue, in_batch=in_batch)
    batch = {n: torch.randn(args.batch, 3, args.frames, args.size, args.size) for n in VIEWS}
    # Video ids as the loader gives them, so the own-video mask and its gather are in the step;
    # one step's ids recur a few steps later, as videos recur across epochs.
    ids = [torch.arange(args.batch) + args.batch * (rank + world * (s % 4)) for s in range(4)]
    times = {part: [] for part in PARTS}
    for step in range(args.warmup + args.steps):
        model.zero_grad()
        dist.barrier()  # start aligned, so a step's gather waits only for this step's imbalance
        t0 = time.perf_counter()
        out = model(batch)
        t1, clock.seconds = time.perf_counter(), 0.0
        loss = criterion(out, ids[step % 4])["loss"]
        t2, gather_fwd, clock.seconds = time.perf_counter(), clock.seconds, 0.0
        loss.backward()
        t3, gather_bwd = time.perf_counter(), clock.seconds
        model.momentum_update()
        if step >= args.warmup:
            seconds = (t1 - t0, t2 - t1 - gather_fwd, gather_fwd + gather_bwd, t3 - t2 - gather_bwd)
            for part, s in zip(PARTS, seconds):
                times[part].append(1e3 * s)
    times["syncs"] = host_syncs(model, criterion, args)
    if rank == 0:
        results.put(times)
    dist.destroy_process_group()


def host_syncs(model: DCLR, criterion: DCLRLoss, args) -> int:
    """Host-synchronising ops in one whole step from uint8 frames, after one (module docstring)."""
    cfg = ViewsConfig(frames=args.frames, size=args.size)
    rng = np.random.default_rng(0)
    frames = torch.randint(0, 256, (args.batch, 3, args.frames + 1, args.size, args.size), dtype=torch.uint8)
    raw = {
        "q": frames,
        "k": frames.clone(),
        "aug": torch.from_numpy(np.stack([views.draw(rng, cfg, args.size, args.size) for _ in range(args.batch)])),
    }
    from syncs import watch  # this folder is on sys.path when run as a script

    views.dclr_views(raw, cfg)  # the steady state: constants built once per device are built here
    with watch(torch.device("cpu")) as w:
        model.zero_grad()
        criterion(model(views.dclr_views(raw, cfg)))["loss"].backward()
        model.momentum_update()
    return w.counts()["total"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="clips per worker")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16, help="tiny backbone base width")
    parser.add_argument("--queue", type=int, default=4096, help="keys per queue")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    print(
        f"DCLR step on CPU (gloo, 1 thread per worker): tiny backbone width {args.width}, "
        f"{args.batch} x 3 x {args.frames} x {args.size} x {args.size} per view per worker, "
        f"queue {args.queue}; median of {args.steps} steps, rank 0, ms"
    )
    print(
        f"{'negatives':<10}{'world':>6}" + "".join(f"{p:>10}" for p in PARTS) + f"{'step':>10}{'gather share':>14}"
        f"{'host syncs':>12}"
    )
    ctx = mp.get_context("spawn")
    for in_batch in (False, True):
        for world in args.worlds:
            results = ctx.SimpleQueue()
            mp.spawn(worker, args=(world, free_port(), in_batch, args, results), nprocs=world)
            times = results.get()
            syncs = times.pop("syncs")
            median = {part: statistics.median(ts) for part, ts in times.items()}
            step = statistics.median(map(sum, zip(*times.values())))
            print(
                f"{'in-batch' if in_batch else 'queue':<10}{world:>6}"
                + "".join(f"{median[p]:>10.1f}" for p in PARTS)
                + f"{step:>10.1f}{median['gather'] / step:>14.1%}{syncs:>12d}"
            )


if __name__ == "__main__":
    main()
