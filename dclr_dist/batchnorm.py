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

One pass (``ViewBatchNorm._segmented``): per-video means and variances in one reduction,
combined per segment, and one broadcast scale and shift; no per-segment kernels, no cat.

Synchronised statistics (``model.bn_sync``): with a process group set, each segment's
statistics are summed over the group's workers with one all-reduce per BN layer per pass
(and one in backward), with no host synchronisation: sizes are known from shapes.
"""

from __future__ import annotations

import contextlib

import torch
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
        if not self.training or (self.segments is None and self.group is None):
            return super().forward(x)
        return self._segmented(x, self.segments or [x.shape[0]])

    def _segmented(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Each segment normalised by its own statistics in one pass: per-video means and
        variances (one reduction over x), combined per segment, summed over ``group`` if set,
        then one scale and shift broadcast over the whole batch. No split, no cat: per segment,
        F.batch_norm and a cat would read and write the activations twice more."""
        import torch.distributed as dist

        wide = torch.promote_types(x.dtype, torch.float32)
        seg, n_seg = self._layout(sizes, x.device, wide)  # (N,) segment of each video, (S, 1) videos per segment
        var_v, mean_v = torch.var_mean(x.to(wide), dim=(2, 3, 4), correction=0)  # (N, C) each
        # Per segment: the sum of the videos' means and of their second moments (positions per
        # video are equal, so the segment's moments are the averages of its videos').
        moments = torch.zeros(2, len(sizes), x.shape[1], dtype=wide, device=x.device)
        moments[0].index_add_(0, seg, mean_v)
        moments[1].index_add_(0, seg, var_v + mean_v.square())
        videos = n_seg
        if self.group is not None:
            # Functional collectives: differentiable, traceable by torch.compile (the older
            # torch.distributed.nn.functional.all_reduce is deprecated and refuses compile).
            from torch.distributed._functional_collectives import all_reduce

            moments = all_reduce(moments, "sum", self.group)
            videos = n_seg * dist.get_world_size(self.group)
        mean = moments[0] / videos  # (S, C)
        var = (moments[1] / videos - mean.square()).clamp_min(0)
        scale = torch.rsqrt(var + self.eps) * self.weight.to(wide)  # (S, C)
        shift = self.bias.to(wide) - mean * scale
        if self.rgb:
            n = x[0, 0].numel() * videos[: self.rgb]  # values per RGB segment, (rgb, 1)
            self._update_running(mean[: self.rgb].detach(), (var[: self.rgb] * n / (n - 1).clamp_min(1)).detach())
        shape = (-1, x.shape[1], 1, 1, 1)
        return torch.addcmul(shift[seg].view(shape).to(x.dtype), x, scale[seg].view(shape).to(x.dtype))

    @torch.no_grad()
    def _update_running(self, means: torch.Tensor, variances: torch.Tensor) -> None:
        """The running statistics as F.batch_norm on each RGB segment in turn would leave them."""
        for mean, var in zip(means, variances):
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
        self.num_batches_tracked.add_(1)  # one batch, as BatchNorm3d counts

    @staticmethod
    def _layout(sizes: list[int], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment index per video and videos per segment, built once per layout and device (a
        tensor made from Python numbers on a GPU is a blocking copy)."""
        key = (tuple(sizes), device, dtype)
        if key not in _LAYOUTS:
            seg = torch.tensor([i for i, n in enumerate(sizes) for _ in range(n)])
            _LAYOUTS[key] = (seg.to(device), torch.tensor(sizes, dtype=dtype).view(-1, 1).to(device))
        return _LAYOUTS[key]


# (segment sizes, device, dtype) -> ViewBatchNorm._layout's tensors; shared by every layer.
_LAYOUTS: dict = {}


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
