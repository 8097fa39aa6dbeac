"""DCLR loss on hand-computed cases, in one process (collectives at world size 1)."""

import math

import pytest
import torch
import torch.nn.functional as F

from dclr_dist.loss import DCLRLoss, all_gather, all_gather_with_grad, info_nce, top_k_mask
from dclr_dist.model import DCLR, VIEWS


def test_info_nce_single_positive():
    logits = torch.tensor([[0.5, 0.1, -0.2]])
    pos = torch.tensor([[True, False, False]])
    # -log(e^5 / (e^5 + e^1 + e^-2)) at tau = 0.1
    assert info_nce(logits, pos, 0.1).item() == pytest.approx(math.log(1 + math.exp(-4) + math.exp(-7)), rel=1e-5)


def test_info_nce_multi_positive_sums_positives_inside_the_log():
    logits = torch.tensor([[0.5, 0.1, 0.3], [0.0, 0.2, 0.0]])
    pos = torch.tensor([[True, False, True], [True, False, False]])
    first = -math.log((math.exp(5) + math.exp(3)) / (math.exp(5) + math.exp(1) + math.exp(3)))
    second = -math.log(1 / (2 + math.exp(2)))
    assert info_nce(logits, pos, 0.1).item() == pytest.approx((first + second) / 2, rel=1e-5)


def test_top_k_mask_picks_nearest_valid_candidates():
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.5]])
    valid = torch.tensor([[False, True, True, True]])
    assert top_k_mask(sim, 2, valid).tolist() == [[False, False, True, True]]
    assert top_k_mask(sim, 5, valid).tolist() == [[False, True, True, True]]  # fewer valid than k
    assert not top_k_mask(sim, 0, valid).any()
    assert not top_k_mask(sim, 2, torch.zeros_like(valid)).any()  # empty queue: no neighbours


def enqueue_ids(criterion, ids, videos=None):
    """Enqueue keys whose every entry is its id (video ids: -1, unknown, unless given)."""
    videos = torch.full((len(ids),), -1) if videos is None else torch.tensor(videos)
    criterion._enqueue(torch.tensor(ids, dtype=torch.float).view(-1, 1, 1).expand(-1, 5, 2), videos)


def queue_ids(criterion):
    return criterion.queue[:, 0, 0].tolist()


def test_queue_is_a_ring_in_arrival_order():
    criterion = DCLRLoss(dim=2, queue_size=5)
    enqueue_ids(criterion, [1, 2, 3])
    assert queue_ids(criterion)[:3] == [1, 2, 3]
    assert (criterion.queue_ptr.item(), criterion.queue_filled.item()) == (3, 3)
    enqueue_ids(criterion, [4, 5, 6])  # wraps: 6 overwrites the oldest key
    assert queue_ids(criterion) == [6, 2, 3, 4, 5]
    assert (criterion.queue_ptr.item(), criterion.queue_filled.item()) == (1, 5)
    enqueue_ids(criterion, [7, 8, 9, 10, 11, 12, 13])  # more than K from slot 1: as if written one by one
    assert queue_ids(criterion) == [11, 12, 13, 9, 10]
    assert criterion.queue_ptr.item() == 3


def unit(*xs):
    return F.normalize(torch.tensor(xs, dtype=torch.float), dim=-1)


def hand_case():
    """One query; every embedding type equal, so every term has logits [q.k, q.e0, q.e1] = [1, 0, -1].

    Queue entries e0 = (0, 1), e1 = (-1, 0). The static probe (0, 1) is nearest e0; the
    dynamic probe (-0.8, -0.6) is nearest e1 (0.8 against -0.6), and so is their sum
    (0.8 against 0.4).
    """
    out = {
        "q": unit(1, 0).expand(1, 5, 2),
        "k": unit(1, 0).expand(1, 5, 2),
        "p": torch.stack([unit(0, 1), unit(-0.8, -0.6)]).unsqueeze(0),
        "A_v": torch.ones(1, 1, 1, 2),
        "A_s": torch.ones(1, 1, 1, 2),
        "A_d": torch.tensor([0.0, 2.0]).view(1, 1, 1, 2),
    }
    return out


def test_dclr_loss_hand_computed_multi_positive():
    criterion = DCLRLoss(dim=2, queue_size=2, tau=0.5, topk=1, w_vv=1.0, w_s=2.0, w_d=3.0, w_align=4.0)
    enqueue_ids(criterion, [0, 0])
    criterion.queue.copy_(torch.stack([unit(0, 1), unit(-1, 0)]).unsqueeze(1).expand(2, 5, 2))
    terms = criterion(hand_case())
    e = math.exp  # scaled logits [2, 0, -2]
    with_e0 = -math.log((e(2) + e(0)) / (e(2) + e(0) + e(-2)))
    with_e1 = -math.log((e(2) + e(-2)) / (e(2) + e(0) + e(-2)))
    expected = {
        "vv": with_e1,
        "v_s": with_e0,
        "s_v": with_e0,
        "v_d": with_e1,
        "d_v": with_e1,
        "align": 0.25,
    }  # A_v = (1, 1) against (A_s + A_d) / 2 = (0.5, 1.5)
    assert {n: t.item() for n, t in terms.items() if n != "loss"} == pytest.approx(expected, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(with_e1 + 2 * 2 * with_e0 + 3 * 2 * with_e1 + 4 * 0.25, rel=1e-5)
    # the key entered the queue after the logits were taken, at the ring's next slot (0, e0's)
    torch.testing.assert_close(criterion.queue[:, 0], torch.stack([unit(1, 0), unit(-1, 0)]))


def test_baseline_is_plain_clip_contrast():
    # w_s = w_d = w_align = 0, topk = 0: the loss is L_vv with the other clip as only positive
    criterion = DCLRLoss(dim=2, queue_size=2, tau=0.5, topk=0, w_s=0.0, w_d=0.0, w_align=0.0)
    enqueue_ids(criterion, [0, 0])
    criterion.queue.copy_(torch.stack([unit(0, 1), unit(-1, 0)]).unsqueeze(1).expand(2, 5, 2))
    terms = criterion(hand_case())
    assert terms["loss"].item() == pytest.approx(math.log(1 + math.exp(-2) + math.exp(-4)), rel=1e-5)
    assert terms["loss"].item() == terms["vv"].item()
    assert terms["v_s"].item() > 0  # the other terms are still logged


def test_unfilled_queue_entries_are_negatives_but_never_neighbours():
    criterion = DCLRLoss(dim=2, queue_size=2, tau=0.5, topk=1)
    criterion.queue.copy_(torch.stack([unit(0, 1), unit(-1, 0)]).unsqueeze(1).expand(2, 5, 2))
    terms = criterion(hand_case())  # nothing enqueued yet: single positive everywhere
    assert terms["vv"].item() == pytest.approx(math.log(1 + math.exp(-2) + math.exp(-4)), rel=1e-5)


@pytest.mark.parametrize("vv_positives, positive", [("static+dynamic", "e1"), ("dynamic", "e1"), ("none", None)])
def test_vv_positives_choose_l_vv_neighbours(vv_positives, positive):
    criterion = DCLRLoss(dim=2, queue_size=2, tau=0.5, topk=1, vv_positives=vv_positives)
    enqueue_ids(criterion, [0, 0])
    criterion.queue.copy_(torch.stack([unit(0, 1), unit(-1, 0)]).unsqueeze(1).expand(2, 5, 2))
    e = math.exp
    expected = {"e1": -math.log((e(2) + e(-2)) / (e(2) + e(0) + e(-2))), None: math.log(1 + e(-2) + e(-4))}
    assert criterion(hand_case())["vv"].item() == pytest.approx(expected[positive], rel=1e-5)


def test_vv_neighbours_rank_by_the_sum_of_softmaxes_as_released():
    # The released code ranks L_vv's candidates by softmax(sim_s) + softmax(sim_d); a sum of
    # cosines picks other neighbours for some queries. Checked against the loss by hand.
    g = torch.Generator().manual_seed(0)
    B, K, D, tau = 64, 12, 4, 0.2
    criterion = DCLRLoss(dim=D, queue_size=K, tau=tau, topk=3).eval()
    criterion.queue.copy_(F.normalize(torch.randn(K, 5, D, generator=g), dim=-1))
    criterion.queue_filled.fill_(K)
    out = {
        "q": torch.randn(B, 5, D, generator=g),
        "k": torch.randn(B, 5, D, generator=g),
        "p": torch.randn(B, 2, D, generator=g),
        "A_v": torch.ones(B, 1, 1, 2),
        "A_s": torch.ones(B, 1, 1, 2),
        "A_d": torch.ones(B, 1, 1, 2),
    }
    q, k, p = (F.normalize(out[n], dim=-1) for n in ("q", "k", "p"))
    sim_s, sim_d = p[:, 0] @ criterion.queue[:, 3].T, p[:, 1] @ criterion.queue[:, 4].T
    softmaxes = (sim_s.softmax(1) + sim_d.softmax(1)).topk(3, dim=1).indices
    cosines = (sim_s + sim_d).topk(3, dim=1).indices
    assert (softmaxes.sort(1).values != cosines.sort(1).values).any(1).sum() > 0  # the two rules differ here
    logits = torch.cat([(q[:, 0] * k[:, 0]).sum(-1, keepdim=True), q[:, 0] @ criterion.queue[:, 0].T], 1) / tau
    pos = torch.zeros(B, K + 1, dtype=torch.bool)
    pos[:, 0] = True
    pos[torch.arange(B)[:, None], softmaxes + 1] = True
    expected = (logits.logsumexp(1) - logits.masked_fill(~pos, float("-inf")).logsumexp(1)).mean()
    assert criterion(out)["vv"].item() == pytest.approx(expected.item(), rel=1e-5)


def hand_queue(criterion, videos=None):
    enqueue_ids(criterion, [0, 0], videos)
    criterion.queue.copy_(torch.stack([unit(0, 1), unit(-1, 0)]).unsqueeze(1).expand(2, 5, 2))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_l_vv_takes_no_cross_video_positive_before_its_warm_up_ends(grad_accum):
    criterion = DCLRLoss(dim=2, queue_size=2, tau=0.5, topk=1, topk_warmup=3, grad_accum=grad_accum).eval()
    hand_queue(criterion)
    single = math.log(1 + math.exp(-2) + math.exp(-4))
    criterion.steps.fill_(3 * grad_accum - 1)  # training forwards: one short of 3 optimizer steps
    terms = criterion(hand_case())
    assert terms["vv"].item() == pytest.approx(single, rel=1e-5)
    assert terms["v_s"].item() < single - 0.1  # the decoupling terms' neighbours are not gated
    criterion.steps.fill_(3 * grad_accum)
    with_e1 = math.log(1 + 1 / (math.exp(2) + math.exp(-2)))  # e1 (the sum's nearest) joined the positives
    assert criterion(hand_case())["vv"].item() == pytest.approx(with_e1, rel=1e-5)
    criterion.train()(hand_case())
    assert criterion.steps.item() == 3 * grad_accum + 1  # training forwards are counted


def test_older_keys_of_the_query_s_own_video_are_neither_negatives_nor_neighbours():
    # Baseline (no neighbours): e1 = (-1, 0) is the query's own video (8), so it leaves the
    # denominator: logits [q.k, q.e0] / tau = [2, 0] only.
    baseline = DCLRLoss(dim=2, queue_size=2, tau=0.5, topk=0).eval()
    hand_queue(baseline, videos=[7, 8])
    assert baseline(hand_case(), torch.tensor([8]))["vv"].item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-5)
    three = math.log(1 + math.exp(-2) + math.exp(-4))  # e1 a negative: no ids, or another video's
    assert baseline(hand_case())["vv"].item() == pytest.approx(three, rel=1e-5)
    assert baseline(hand_case(), torch.tensor([9]))["vv"].item() == pytest.approx(three, rel=1e-5)
    # DCLR: without ids e1 is the dynamic neighbour; as the query's own video it is not, and
    # the nearest other video, e0, is: every remaining logit is then a positive.
    dclr = DCLRLoss(dim=2, queue_size=2, tau=0.5, topk=1).eval()
    hand_queue(dclr, videos=[7, 8])
    assert dclr(hand_case())["v_d"].item() == pytest.approx(math.log(1 + 1 / (math.exp(2) + math.exp(-2))), rel=1e-5)
    assert dclr(hand_case(), torch.tensor([8]))["v_d"].item() == pytest.approx(0.0, abs=1e-6)


def test_queues_remember_each_slot_s_video_and_older_checkpoints_load():
    criterion = DCLRLoss(dim=2, queue_size=3).train()
    criterion(hand_case(), torch.tensor([42]))
    assert criterion.queue_video.tolist() == [42, -1, -1]
    old = {k: v for k, v in criterion.state_dict().items() if k != "queue_video"}  # written before ids
    restored = DCLRLoss(dim=2, queue_size=3)
    restored.load_state_dict(old)
    assert restored.queue_video.tolist() == [-1, -1, -1] and torch.equal(restored.queue, criterion.queue)


def test_in_batch_mode_is_cross_entropy_over_the_batch():
    torch.manual_seed(0)
    out = {
        "q": torch.randn(3, 5, 4, requires_grad=True),
        "k": torch.randn(3, 5, 4, requires_grad=True),
        "p": torch.randn(3, 2, 4),
        "A_v": torch.ones(3, 1, 2, 2),
        "A_s": torch.ones(3, 1, 2, 2),
        "A_d": torch.ones(3, 1, 2, 2),
    }
    terms = DCLRLoss(dim=4, tau=0.1, topk=0, in_batch=True)(out)
    q, k = F.normalize(out["q"], dim=-1), F.normalize(out["k"], dim=-1)
    expected = F.cross_entropy(q[:, 1] @ k[:, 3].T / 0.1, torch.arange(3))  # L_v->s: g_vs(v) against g_sv(s')
    assert terms["v_s"].item() == pytest.approx(expected.item(), rel=1e-5)
    terms["loss"].backward()
    assert out["k"].grad.abs().sum() > 0  # negatives carry gradient


def test_mode_mismatch_between_model_and_loss_is_refused():
    batch = {n: torch.randn(2, 3, 8, 32, 32) for n in VIEWS}
    with pytest.raises(ValueError, match="in_batch"):
        DCLRLoss(dim=8, in_batch=True)(DCLR("tiny", width=4, dim=8)(batch))
    with pytest.raises(ValueError, match="in_batch"):
        DCLRLoss(dim=8)(DCLR("tiny", width=4, dim=8, in_batch=True)(batch))


def test_eval_mode_leaves_queue_alone():
    criterion = DCLRLoss(dim=2, queue_size=4).eval()
    before = criterion.queue.clone()
    criterion(hand_case())
    assert torch.equal(criterion.queue, before) and criterion.queue_filled.item() == 0


def test_queues_survive_state_dict_round_trip():
    criterion = DCLRLoss(dim=2, queue_size=4)
    enqueue_ids(criterion, [1, 2, 3])
    restored = DCLRLoss(dim=2, queue_size=4)
    restored.load_state_dict(criterion.state_dict())
    assert queue_ids(restored) == queue_ids(criterion) and restored.queue_ptr.item() == 3


def test_collectives_degrade_to_identity_in_one_process():
    x = torch.randn(3, 5, 4, requires_grad=True)
    assert all_gather(x) is x and all_gather_with_grad(x) is x


@pytest.mark.parametrize("in_batch", [False, True])
def test_a_training_step_never_makes_the_host_wait(in_batch):
    # From the loader's uint8 frames through views, model, loss, backward and the momentum
    # update: no op that reads a device value on the host (each a synchronisation on CUDA).
    import numpy as np

    from dclr_dist import views
    from dclr_dist.config import ViewsConfig

    cfg = ViewsConfig(frames=4, size=32)
    rng = np.random.default_rng(0)
    frames = torch.randint(0, 256, (4, 3, 5, 32, 32), dtype=torch.uint8)
    raw = {
        "q": frames,
        "k": frames.clone(),
        "aug": torch.from_numpy(np.stack([views.draw(rng, cfg, 32, 32) for _ in range(4)])),
    }
    model, criterion = DCLR("tiny", width=4, dim=8, in_batch=in_batch), DCLRLoss(dim=8, queue_size=8, in_batch=in_batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        criterion(model(views.dclr_views(raw, cfg)))["loss"].backward()
        model.momentum_update()
    ops = {e.key: e.count for e in prof.key_averages()}
    assert ops.get("aten::_local_scalar_dense", 0) == 0 and ops.get("aten::nonzero", 0) == 0


def test_loss_computes_in_fp32_inside_a_bf16_autocast_region():
    # Whoever wraps the step in autocast (or moves the loss into the engine's region) must
    # not get bf16 cosines: the loss disables autocast itself. The reference is the fp32
    # computation from the same bf16-rounded embeddings.
    g = torch.Generator().manual_seed(0)
    B, D, K = 8, 32, 64
    out = {
        "q": torch.randn(B, 5, D, generator=g),
        "k": torch.randn(B, 5, D, generator=g),
        "p": torch.randn(B, 2, D, generator=g),
        "A_v": torch.rand(B, 2, 4, 4, generator=g) + 0.5,
        "A_s": torch.rand(B, 2, 4, 4, generator=g) + 0.5,
        "A_d": torch.rand(B, 2, 4, 4, generator=g) + 0.5,
    }
    bf16 = {n: x.bfloat16() for n, x in out.items()}
    criterion = DCLRLoss(dim=D, queue_size=K, topk=2)
    criterion._enqueue(F.normalize(torch.randn(K, 5, D, generator=g), dim=-1), torch.arange(K))
    criterion.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = criterion(bf16)
    reference = criterion({n: x.float() for n, x in bf16.items()})
    assert all(t.dtype == torch.float32 for t in mixed.values())
    for name, t in reference.items():
        torch.testing.assert_close(mixed[name], t, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
