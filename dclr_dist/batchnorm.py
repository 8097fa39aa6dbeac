"""Batch norm for DCLR's stacked views: one backbone pass, statistics per segment.

Each encoder runs its backbone once per step over all its views stacked into one batch,
ordered in *segments*; every BN layer normalises each segment with that segment's own
statistics. ``DCLR`` chooses the segments (``bn_layout``):

- one per view type (RGB, static, dynamic): a dynamic view is near zero except where
  something moves, and normalised with RGB statistics its features come out alike for
  every video (the released code's joint pass; README, "Does DCLR follow the motion?");
- within a view type, ``G`` groups of videos, and in queue (MoCo) mode the key encoder's
  groups cut across the query encoder's: query groups are contiguous runs of the batch,
  key group h holds videos h, h + G, h + 2G, ... So a query and its positive key are
  normalised over different sets of videos, which share B / G**2 of their B / G (a fraction
  1/G), while the queue's negatives come from earlier batches. This reduces the
  batch-statistics shortcut that MoCo's shuffle-BN reduces; it does not remove it: at G = 2
  half of each group is shared (3 of a query's 7 batch-mates at B = 16). With G >= sqrt(B)
  the two groups share no video but the query's own on a worker; synced over N workers
  (``model.bn_sync``) they share N of N * B / G, still 1/G. MoCo's shuffle across GPUs
  shares about 1/N_gpu, which falls with workers; this guard's share falls with G only. It
  needs no exchange of inputs between workers and no permutation of maps or probes (the
  released code's shuffle-BN left the key maps unshuffled).

Running statistics (used in eval mode, by evaluation and the exported backbone) are
updated only by the RGB segments, so evaluation normalises RGB clips as training did; the
static and dynamic segments use batch statistics only. The buffers are BatchNorm3d's own,
so the backbone's state_dict loads into a plain network.

Synchronised statistics (``model.bn_sync``): with a process group set, each segment's
statistics are summed over the group's workers with one all-reduce per BN layer per pass
(and one in backward), with no host synchronisation: sizes are known from shapes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class ViewBatchNorm(nn.BatchNorm3d):
    """BatchNorm3d whose training batch is a stack of segments, each normalised on its own.

    ``segments`` (sizes along the batch, in order; None: one segment, plain BatchNorm3d),
    ``rgb`` (how many leading segments update the running statistics) and ``group`` (a
    process group to synchronise statistics over, None: this worker) are set by
    :func:`layout` and :func:`set_sync`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.segments: list[int] | None = None
        self.rgb = 1
        self.group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        sizes = self.segments or [x.shape[0]]
        if self.group is not None:
            return self._synced(x, sizes)
        out = [
            F.batch_norm(part, *self._running(i), self.weight, self.bias, True, self.momentum, self.eps)
            for i, part in enumerate(x.split(sizes))
        ]
        return torch.cat(out) if len(out) > 1 else out[0]

    def _running(self, segment: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The running statistics segment i updates: RGB segments only."""
        return (self.running_mean, self.running_var) if segment < self.rgb else (None, None)

    def _synced(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        import torch.distributed as dist

        # Functional collectives: differentiable, traceable by torch.compile (the older
        # torch.distributed.nn.functional.all_reduce is deprecated and refuses compile).
        from torch.distributed._functional_collectives import all_reduce

        wide = torch.promote_types(x.dtype, torch.float32)
        parts = x.split(sizes)
        dims = (0, 2, 3, 4)
        # (S, 2, C): each segment's sum and sum of squares over videos and positions, all
        # segments in one collective (differentiable: backward all-reduces the gradient).
        moments = torch.stack([torch.stack([p.to(wide).sum(dims), p.to(wide).square().sum(dims)]) for p in parts])
        moments = all_reduce(moments, "sum", self.group)
        positions = x[0, 0].numel() * dist.get_world_size(self.group)
        out = []
        for i, p in enumerate(parts):
            n = sizes[i] * positions  # a Python number: no device-to-host read
            mean = moments[i, 0] / n
            var = (moments[i, 1] / n - mean.square()).clamp_min(0)
            scale = torch.rsqrt(var + self.eps) * self.weight.to(wide)  # (C,)
            shift = self.bias.to(wide) - mean * scale
            if i < self.rgb:
                with torch.no_grad():
                    self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                    self.running_var.lerp_((var.detach() * n / max(n - 1, 1)).to(self.running_var.dtype), self.momentum)
                    self.num_batches_tracked.add_(1)
            out.append(p * scale.view(-1, 1, 1, 1).to(p.dtype) + shift.view(-1, 1, 1, 1).to(p.dtype))
        return torch.cat(out)


def convert(module: nn.Module) -> nn.Module:
    """Every BatchNorm3d of ``module`` as a ViewBatchNorm with the same parameters and buffers."""
    if isinstance(module, nn.BatchNorm3d) and not isinstance(module, ViewBatchNorm):
        bn = ViewBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        bn.load_state_dict(module.state_dict())
        return bn
    for name, child in module.named_children():
        module.add_module(name, convert(child))
    return module


@contextlib.contextmanager
def layout(module: nn.Module, segments: list[int], rgb: int):
    """Within the block, module's ViewBatchNorm layers split their batch into ``segments``."""
    bns = [m for m in module.modules() if isinstance(m, ViewBatchNorm)]
    for bn in bns:
        bn.segments, bn.rgb = segments, rgb
    try:
        yield
    finally:
        for bn in bns:
            bn.segments, bn.rgb = None, 1


def set_sync(module: nn.Module, group) -> None:
    """Synchronise module's ViewBatchNorm statistics over ``group`` (None: per worker)."""
    for m in module.modules():
        if isinstance(m, ViewBatchNorm):
            m.group = group


def bn_layout(kinds: str, B: int, groups: int, transposed: bool, per_view: bool):
    """Where each (view, video) goes in the stacked batch of one backbone pass.

    kinds: one letter per view ('v' RGB, 's' static, 'd' dynamic), each view a batch of B
    videos; groups: G, dividing B; transposed: key-encoder groups (video i in group i % G)
    instead of contiguous ones (i // (B / G)); per_view: a segment per view type and group,
    else per group only (the released code's joint statistics).
    Returns (pieces, segments, rgb): pieces, a list of (view index, slice of its batch) whose
    concatenation is the stacked batch; segment sizes; how many leading segments are RGB.
    """
    if B % groups:
        raise ValueError(f"batch of {B} videos does not split into model.bn_groups={groups} equal groups")
    n = B // groups
    members = [slice(h, None, groups) if transposed else slice(h * n, (h + 1) * n) for h in range(groups)]
    types = sorted(set(kinds), key="vsd".index) if per_view else [None]
    pieces, segments = [], []
    for t in types:
        for sl in members:
            views = [i for i, k in enumerate(kinds) if t is None or k == t]
            pieces += [(i, sl) for i in views]
            segments.append(n * len(views))
    rgb = groups if (per_view and "v" in kinds) or not per_view else 0
    return pieces, segments, rgb
