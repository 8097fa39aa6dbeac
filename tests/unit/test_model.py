"""DCLR model: backbones as feature extractors, activation maps, pooling, momentum update."""

import pytest
import torch

from dclr_dist import batchnorm
from dclr_dist.loss import DCLRLoss
from dclr_dist.model import DCLR, VIEWS, VV, activation_map, backbone, gap, pool


def views(B=2, T=8, S=32):
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(B, 3, T, S, S, generator=g) for name in VIEWS}


@pytest.mark.parametrize(
    "arch, width, x, fmap",
    [
        ("tiny", 8, (2, 3, 8, 64, 64), (2, 64, 1, 4, 4)),
        ("r2plus1d_18", 64, (1, 3, 8, 32, 32), (1, 512, 1, 2, 2)),
        ("r3d_18", 64, (1, 3, 8, 32, 32), (1, 512, 1, 2, 2)),
        ("mc3_18", 64, (1, 3, 8, 32, 32), (1, 512, 8, 2, 2)),
        ("s3d", 64, (1, 3, 16, 64, 64), (1, 1024, 2, 2, 2)),
    ],
)
def test_backbone_returns_final_stage_maps(arch, width, x, fmap):
    f, C = backbone(arch, width)
    with torch.no_grad():
        y = f.eval()(torch.randn(x))
    assert y.shape == fmap and C == fmap[1]
    assert y.min() >= 0  # every backbone ends in ReLU: maps are non-negative


def test_r2plus1d_has_torchvisions_two_blocks_per_stage():
    # The released code's r2plus1d_18 had one block per stage.
    f, _ = backbone("r2plus1d_18", 64)
    assert [len(stage) for stage in list(f)[1:]] == [2, 2, 2, 2]


def test_backbone_rejects_unknown_arch_and_width():
    with pytest.raises(ValueError, match="arch"):
        backbone("resnet50", 64)
    with pytest.raises(ValueError, match="fixed base width"):
        backbone("r3d_18", 32)


def test_activation_map_is_channel_sum_over_its_mean():
    f = torch.tensor([[1.0, 2.0, 3.0, 2.0], [1.0, 0.0, 1.0, 2.0]]).view(1, 2, 1, 1, 4)  # (B, C, T', H', W')
    # channel sum [2, 2, 4, 4], mean 3
    torch.testing.assert_close(activation_map(f), torch.tensor([2 / 3, 2 / 3, 4 / 3, 4 / 3]).view(1, 1, 1, 4))


def test_pool_soft_weights_is_gap_of_weighted_map():
    f = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 1, 4)
    A = torch.tensor([0.0, 0.0, 2.0, 2.0]).view(1, 1, 1, 4)
    assert pool(f, A, None).item() == pytest.approx((3 * 2 + 4 * 2) / 4)


@pytest.mark.parametrize(
    "A, threshold, expected",
    [
        ([0.5, 0.5, 1.5, 1.5], 1.0, (3 + 4) / 2),  # average over the kept positions
        ([0.5, 0.5, 1.5, 1.5], 0.0, (1 + 2 + 3 + 4) / 4),  # everything kept: GAP
        ([0.2, 0.8, 1.6, 1.4], 2.0, 3.0),  # above the peak: the peak alone, never an empty set
    ],
)
def test_pool_threshold_keeps_positions_at_or_above_it(A, threshold, expected):
    f = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 1, 4)
    assert pool(f, torch.tensor(A).view(1, 1, 1, 4), threshold).item() == pytest.approx(expected)


@pytest.mark.parametrize("in_batch", [False, True])
@pytest.mark.parametrize("threshold", [None, 1.0])
def test_forward_shapes_and_gradient_paths(in_batch, threshold):
    model = DCLR("tiny", width=4, dim=8, threshold=threshold, in_batch=in_batch)
    out = model(views(B=2, S=64))
    assert {n: tuple(t.shape) for n, t in out.items()} == {
        "q": (2, 5, 8),
        "k": (2, 5, 8),
        "p": (2, 2, 8),
        "A_v": (2, 1, 4, 4),
        "A_s": (2, 1, 4, 4),
        "A_d": (2, 1, 4, 4),
    }
    assert out["q"].requires_grad and out["A_v"].requires_grad
    assert out["k"].requires_grad == in_batch  # keys from the query encoder only in in-batch mode
    assert not (out["p"].requires_grad or out["A_s"].requires_grad or out["A_d"].requires_grad)
    for name in ("A_v", "A_s", "A_d"):
        torch.testing.assert_close(out[name].mean((1, 2, 3)), torch.ones(2))


@pytest.mark.parametrize("in_batch", [False, True])
@pytest.mark.parametrize("per_view_bn", [True, False])
def test_batch_norm_statistics_per_view_type(per_view_bn, in_batch):
    # Other RGB clips change the BN statistics of a joint pass, so the dynamic embeddings
    # move; with one pass per view type they do not.
    model = DCLR("tiny", width=4, dim=8, per_view_bn=per_view_bn, in_batch=in_batch)
    x = views(B=2, S=64)
    before = model(x)
    other = torch.randn(4, 3, 8, 64, 64, generator=torch.Generator().manual_seed(1))
    after = model({**x, "q": other[:2], "k": other[2:]})
    same = {
        name: torch.allclose(before[name][:, i], after[name][:, i], atol=1e-5)
        for name, i in (("q", 4), ("k", 4), ("p", 1))
    }  # g_dv(d) of both encoders, the dynamic probe
    # In-batch mode the key encoder sees no RGB clip, so its probes never move.
    assert same == {"q": per_view_bn, "k": per_view_bn, "p": per_view_bn or in_batch}
    assert torch.allclose(before["A_d"], after["A_d"], atol=1e-5) == (per_view_bn or in_batch)
    assert not torch.allclose(before["A_v"], after["A_v"], atol=1e-5)  # the RGB map does follow its input


def test_input_too_small_to_decouple_is_refused():
    with pytest.raises(ValueError, match="too small"):
        DCLR("tiny", width=4, dim=8)(views(B=4, S=16))  # 16 / 16 = one position per frame, T' = 1


def test_key_encoder_starts_as_frozen_copy():
    model = DCLR("tiny", width=4, dim=8)
    for p_q, p_k in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(p_q, p_k) and p_q.requires_grad and not p_k.requires_grad


def test_alignment_term_trains_the_query_backbone_only():
    model = DCLR("tiny", width=4, dim=8)
    DCLRLoss(dim=8, queue_size=8)(model(views()))["align"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_q.f.parameters())
    assert all(p.grad is None for p in model.encoder_q.g.parameters())  # maps, not projections
    assert all(p.grad is None for p in model.encoder_k.parameters())


def test_momentum_update_is_ema_of_query_weights():
    model = DCLR("tiny", width=4, dim=8, m=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    theta_q = [p.clone() for p in model.encoder_q.parameters()]
    theta_k = [p.clone() for p in model.encoder_k.parameters()]
    model.momentum_update()
    for p_k, k0, q in zip(model.encoder_k.parameters(), theta_k, theta_q):
        torch.testing.assert_close(p_k, 0.9 * k0 + 0.1 * q)
    assert all(torch.equal(p, q) for p, q in zip(model.encoder_q.parameters(), theta_q))


def test_momentum_update_in_bf16_follows_fp32_ema():
    # DeepSpeed bf16 makes every parameter bf16; an in-place bf16 EMA at m = 0.999 never moves.
    model = DCLR("tiny", width=4, dim=8, m=0.999).bfloat16()
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(0.05)
    theta_q = [p.float() for p in model.encoder_q.parameters()]
    ref = [p.float() for p in model.encoder_k.parameters()]
    naive = [p.clone() for p in model.encoder_k.parameters()]
    for _ in range(300):
        model.momentum_update()
        for r, q in zip(ref, theta_q):
            r.lerp_(q, 0.001)
        for n, q in zip(naive, model.encoder_q.parameters()):
            n.lerp_(q, 0.001)
    # The EMA moved 0.05 * (1 - 0.999^300) = 0.013 towards theta_q; a naive bf16 update stays behind.
    assert max((n.float() - r).abs().max() for n, r in zip(naive, ref)) > 0.01
    for p_k, r in zip(model.encoder_k.parameters(), ref):
        assert p_k.dtype == torch.bfloat16
        torch.testing.assert_close(p_k.float(), r, rtol=2**-8, atol=1e-6)


def test_load_state_dict_resets_the_bf16_accumulator():
    model = DCLR("tiny", width=4, dim=8, m=0.5).bfloat16()
    model.momentum_update()  # builds the fp32 accumulator
    state = {n: torch.ones_like(t) if n.startswith("encoder_k.") else t for n, t in model.state_dict().items()}
    model.load_state_dict(state)
    model.momentum_update()
    for p_k, p_q in zip(model.encoder_k.parameters(), model.encoder_q.parameters()):
        torch.testing.assert_close(p_k, (0.5 + 0.5 * p_q.float()).bfloat16())


def groups_of(B: int, G: int, transposed: bool, world: int = 1) -> list[set]:
    """For each video (rank, i), the videos whose RGB clips share its batch norm statistics.

    Read off bn_layout's segments; with statistics synchronised over ``world`` workers a
    segment is the union of that segment on every worker (the same layout on each).
    """
    pieces, segments, rgb = batchnorm.bn_layout("vsd", B, G, transposed, per_view=True)
    videos, members = [], []
    for view, sl in pieces:
        videos += [(view, i) for i in range(B)[sl]]
    start = 0
    for size in segments[:rgb]:
        members.append({i for view, i in videos[start : start + size] if view == 0})
        start += size
    of = {}
    for seg in members:
        for i in seg:
            of[i] = {(r, j) for r in range(world) for j in seg}
    return [of[i] for i in range(B)]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("B, G", [(4, 2), (8, 2), (16, 4), (6, 3), (10, 2)])
def test_a_query_never_shares_batch_norm_statistics_with_its_positive_key(B, G, world):
    query, key = groups_of(B, G, False, world), groups_of(B, G, True, world)
    for i in range(B):
        assert (0, i) in query[i] and (0, i) in key[i]
        assert query[i] != key[i]
        if (B // G) % G == 0:  # spread evenly: B / G**2 of a group's videos are shared
            assert len(query[i] & key[i]) == world * B // G**2
    assert len(groups_of(B, 1, True)[0]) == B  # bn_groups=1: the guard is off


def test_model_normalises_queries_and_keys_in_the_groups_of_the_layout():
    # B = 4, G = 2: query groups {0, 1}, {2, 3}; key groups {0, 2}, {1, 3}.
    model = DCLR("tiny", width=4, dim=8, bn_groups=2)
    x = views(B=4, S=64)
    base = model(x)

    def moved(view: str, j: int, out: str) -> list[bool]:
        y = {**x, view: x[view].clone()}
        y[view][j] += 1.0
        return [not torch.allclose(model(y)[out][i, VV], base[out][i, VV], atol=1e-6) for i in range(4)]

    assert moved("q", 1, "q") == [True, True, False, False]
    assert moved("k", 2, "k") == [True, False, True, False]
    with pytest.raises(ValueError, match="bn_groups"):
        DCLR("tiny", width=4, dim=8, bn_groups=3)(x)


def test_running_statistics_come_from_rgb_clips_only():
    # Two models see the same RGB clips and very different static and dynamic views: their
    # running statistics must be equal, and eval-mode features of RGB clips must match
    # train-mode features normalised with RGB statistics alone.
    g = torch.Generator().manual_seed(0)
    rgb = [0.5 + 0.8 * torch.randn(8, 3, 8, 64, 64, generator=g) for _ in range(40)]
    torch.manual_seed(0)
    models = [DCLR("tiny", width=4, dim=8) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    with torch.no_grad():
        for x in rgb:
            for scale, model in ((1.0, models[0]), (5.0, models[1])):
                other = scale * torch.randn(8, 3, 8, 64, 64, generator=g)
                model(
                    {
                        "q": x,
                        "k": x.flip(0),
                        "static_q": other,
                        "static_k": other,
                        "dynamic_q": other / 10,
                        "dynamic_k": other / 10,
                    }
                )
    f0, f1 = models[0].encoder_q.f, models[1].encoder_q.f
    for a, b in zip(f0.state_dict().values(), f1.state_dict().values()):
        torch.testing.assert_close(a, b)
    # The audit's counterfactual: the same weights with running statistics of all three view types.
    mixed, _ = backbone("tiny", 4)
    mixed.load_state_dict(f0.state_dict())
    with torch.no_grad():
        for x in rgb:
            for y in (x, torch.randn(8, 3, 8, 64, 64, generator=g), torch.randn(8, 3, 8, 64, 64, generator=g) / 10):
                mixed.train()(y[:4]), mixed(y[4:])
    test = 0.5 + 0.8 * torch.randn(16, 3, 8, 64, 64, generator=g)
    with torch.no_grad():
        train_mode = gap(f0.train()(test))  # batch statistics of 16 RGB clips
        error = {
            name: ((gap(f.eval()(test)) - train_mode).norm() / train_mode.norm()).item()
            for name, f in (("rgb", f0), ("mixed", mixed))
        }
    # What remains is the noise of statistics over groups of 4 small clips (1 x 4 x 4 positions at the last layer).
    assert error["rgb"] < 0.15 and error["mixed"] > 3 * error["rgb"], error
    # The buffers are BatchNorm3d's: the backbone loads into a plain network.
    plain, _ = backbone("tiny", 4)
    plain.load_state_dict(f0.state_dict())
