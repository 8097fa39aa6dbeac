"""What makes the host wait for the GPU in one training step, counted on any device.

    with watch(device) as w:
        step(scope)            # phases marked with torch.profiler.record_function
    w.counts()                 # {"total", "by_kind", "by_phase"}, and "cuda_sync_debug" on a GPU

A host sync costs nothing on CPU and a pipeline stall on a GPU, so CI must count them on CPU.
Four kinds are counted inside the profiled region, each attributed to the phase it falls in:

- ``read``: a device value read on the host (``.item()``, ``if tensor``, boolean-mask
  indexing): the ops ``aten::_local_scalar_dense`` and ``aten::nonzero``;
- ``python data``: a tensor built from Python numbers or lists (``torch.tensor([...])``,
  ``aten::lift_fresh``): on a GPU, a blocking copy from pageable host memory;
- ``to host``: ``Tensor.cpu()``, ``.tolist()``, ``.numpy()`` (on a GPU tensor, a blocking copy);
- ``synchronize``: an explicit device synchronisation, ``torch.cuda.synchronize`` or
  DeepSpeed's ``get_accelerator().synchronize()`` (its timers call it), counted once when
  one calls the other.

The method calls are wrapped for the duration (each call still runs, inside a
``record_function`` that marks it). On CUDA, ``torch.cuda.set_sync_debug_mode("warn")``
is on as well and every warning it gives is counted: the device's own account, which also
sees what the CPU count cannot (a copy to the host by ``.to("cpu")``, a blocking copy of a
CPU tensor made without ``pin_memory``).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import Counter
from collections.abc import Iterator

import torch

OPS = {"aten::_local_scalar_dense": "read", "aten::nonzero": "read", "aten::lift_fresh": "python data"}
MARK = "host_sync/"
_TO_HOST = ("cpu", "tolist", "numpy")


class Watch:
    def __init__(self):
        self.prof = None
        self.cuda_warnings = 0

    def counts(self, phase_prefix: str = "gpu_check/") -> dict:
        """Counts by kind and by the phase (a ``record_function`` named ``phase_prefix + name``) they fall in."""
        events = list(self.prof.events())
        spans = {
            e.name[len(phase_prefix) :]: (e.time_range.start, e.time_range.end)
            for e in events
            if e.name.startswith(phase_prefix)
        }
        by_kind, by_phase = Counter(), Counter()
        for e in events:
            kind = OPS.get(e.name) or (e.name[len(MARK) :].split(":")[0] if e.name.startswith(MARK) else None)
            if kind is None:
                continue
            by_kind[kind] += 1
            by_phase[next((p for p, (a, b) in spans.items() if a <= e.time_range.start <= b), "other")] += 1
        out = {"total": sum(by_kind.values()), "by_kind": dict(by_kind), "by_phase": dict(by_phase)}
        if torch.cuda.is_available():
            out["cuda_sync_debug"] = self.cuda_warnings
        return out


@contextlib.contextmanager
def watch(device: torch.device) -> Iterator[Watch]:
    """Profile the block with the host-sync calls marked; see the module docstring."""
    from deepspeed.accelerator import get_accelerator

    w, local = Watch(), threading.local()

    def marked(kind: str, name: str, fn):
        def call(*args, **kwargs):
            if getattr(local, "inside", False):  # one synchronize calling another counts once
                return fn(*args, **kwargs)
            local.inside = True
            try:
                with torch.profiler.record_function(f"{MARK}{kind}:{name}"):
                    return fn(*args, **kwargs)
            finally:
                local.inside = False

        return call

    accelerator = get_accelerator()
    saved = [(torch.Tensor, n, getattr(torch.Tensor, n)) for n in _TO_HOST]
    saved.append((torch.cuda, "synchronize", torch.cuda.synchronize))
    for owner, name, fn in saved:
        setattr(owner, name, marked("to host" if owner is torch.Tensor else "synchronize", name, fn))
    # A bound method of the accelerator instance: shadowed on the instance, restored by deleting it.
    accelerator.synchronize = marked("synchronize", "accelerator.synchronize", accelerator.synchronize)
    debug = device.type == "cuda"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if debug:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as w.prof:
                    yield w
            finally:
                if debug:
                    torch.cuda.set_sync_debug_mode("default")
        w.cuda_warnings = sum("synchroniz" in str(c.message) for c in caught)
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
        del accelerator.synchronize
