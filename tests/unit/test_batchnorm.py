"""Per-view-type batch norm in one pass: the same as F.batch_norm on each segment, without the
per-segment kernels and the cat."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dclr_dist.batchnorm import ViewBatchNorm

SIZES, RGB = [4, 4, 8, 2], 2  # RGB groups first, then static and dynamic segments of other sizes


def _pair(dtype):
    torch.manual_seed(0)
    bn = ViewBatchNorm(5).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    ref = ViewBatchNorm(5).to(dtype)
    ref.load_state_dict(bn.state_dict())
    bn.segments, bn.rgb = SIZES, RGB
    return bn, ref


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_one_pass_equals_batch_norm_on_each_segment(dtype, tol):
    bn, ref = _pair(dtype)
    x = (torch.randn(sum(SIZES), 5, 3, 4, 4, dtype=dtype) * 3 + 1).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = bn(x)
    parts = x_ref.split(SIZES)
    y_ref = torch.cat(
        [
            F.batch_norm(
                p,
                *((ref.running_mean, ref.running_var) if i < RGB else (None, None)),  # RGB only, in turn
                ref.weight,
                ref.bias,
                True,
                ref.momentum,
                ref.eps,
            )
            for i, p in enumerate(parts)
        ]
    )
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    close = dict(atol=tol, rtol=tol)
    torch.testing.assert_close(y, y_ref, **close)
    torch.testing.assert_close(x.grad, x_ref.grad, **close)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(bn, name).grad, getattr(ref, name).grad, **close)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, **close)
    torch.testing.assert_close(bn.running_var, ref.running_var, **close)


def test_no_per_segment_kernel_and_no_cat():
    bn, _ = _pair(torch.float32)
    x = torch.randn(sum(SIZES), 5, 3, 4, 4, requires_grad=True)
    bn(x)  # the layout's index tensors are built once, outside the profiled step
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        bn(x).sum().backward()
    names = [e.name for e in prof.events()]
    assert not [n for n in names if "batch_norm" in n or n == "aten::cat" or n == "aten::split"], sorted(set(names))
    assert "aten::lift_fresh" not in names  # no tensor from Python numbers in the step
