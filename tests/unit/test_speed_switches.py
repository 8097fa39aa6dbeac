"""engine.channels_last and engine.compile change how the step runs, never what it computes."""

from __future__ import annotations

import torch

from dclr_dist.loss import DCLRLoss
from dclr_dist.model import DCLR, VIEWS, tiny_backbone


def _pair():
    """Two tiny models with the same weights, and one batch."""
    torch.manual_seed(0)
    plain = DCLR("tiny", width=8, dim=16)
    other = DCLR("tiny", width=8, dim=16)
    other.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(1)
    batches = [{n: torch.randn(4, 3, 4, 32, 32, generator=g) for n in VIEWS} for _ in range(2)]
    return plain, other, batches


def _train(model: DCLR, batches: list[dict]) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Losses and query-encoder gradients of SGD steps with momentum updates, one per batch."""
    criterion = DCLRLoss(dim=16, queue_size=16, topk=2)
    params = [p for p in model.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    losses, grads = [], []
    for batch in batches:
        loss = criterion(model(batch))["loss"]
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in params])
        sgd.step()
        sgd.zero_grad()
        model.momentum_update()
    return losses, grads


def _assert_same(a, b, rtol: float, atol: float) -> None:
    (losses_a, grads_a), (losses_b, grads_b) = a, b
    torch.testing.assert_close(losses_a, losses_b, rtol=rtol, atol=atol)
    for step_a, step_b in zip(grads_a, grads_b):
        for ga, gb in zip(step_a, step_b):
            torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol)


def test_channels_last_gives_the_contiguous_loss_and_gradients():
    plain, fast, batches = _pair()
    fast.memory_format = torch.channels_last_3d
    layouts = []
    for m in fast.encoder_q.f:
        m.register_forward_hook(lambda m, x, y: layouts.append((x[0], y)))
    _assert_same(_train(fast, batches), _train(plain, batches), rtol=1e-4, atol=1e-5)
    # every layer ran on NDHWC tensors, from the stacked input on
    assert layouts and all(
        t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()
        for pair in layouts
        for t in pair
    )
    # the parameters keep their layout (DeepSpeed broadcasts them as bytes), so checkpoints do too
    assert all(p.is_contiguous() for p in fast.parameters())


def test_compiled_backbones_keep_state_dict_keys_loss_and_gradients():
    # Compiled in place: no "_orig_mod." in any key, so checkpoints, best/ and exported backbones
    # are unchanged. aot_eager traces forward and backward as inductor would, without the C++
    # code generation that takes minutes on 2 CPU cores (measured: 167 s for one tiny step).
    plain, compiled, batches = _pair()
    keys = list(plain.state_dict())
    compiled.compile_backbones(backend="aot_eager")
    assert list(compiled.state_dict()) == keys
    stages = [m for encoder in (compiled.encoder_q, compiled.encoder_k) for m in encoder.f.children()]
    assert stages and all(m._compiled_call_impl is not None for m in stages)
    # two steps: the second runs after an optimizer step and a momentum update changed the weights in place
    _assert_same(_train(compiled, batches), _train(plain, batches), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.state_dict(), plain.state_dict(), rtol=1e-5, atol=1e-6)
    # the query backbone's state_dict is a plain backbone's
    tiny_backbone(8).load_state_dict(compiled.encoder_q.f.state_dict())
