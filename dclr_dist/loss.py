"""DCLR loss: multi-positive InfoNCE over queues of keys from every worker, and alignment.

Ding, Qian, Xiong, "Dual Contrastive Learning for Spatio-temporal Representation",
ACM MM 2022 (arXiv 2207.05340):

    L = w_vv L_vv + w_s (L_v->s + L_s->v) + w_d (L_v->d + L_d->v) + w_align L_align

Each contrastive term is InfoNCE at temperature tau with several positives (MIL-NCE
form, as the released code): -log(sum_{p in P} exp(q.p / tau) / sum_j exp(q.k_j / tau)).
P holds the paired key and the top-k candidates nearest to the query's probe
("cross-video search"): its static embedding for L_v->s and L_s->v, its dynamic one
for L_v->d and L_d->v. For L_vv, ``vv_positives`` chooses: "static+dynamic" (released
code: the sum of the two softmaxes over the candidates, temperature 1), "dynamic" (the
dynamic neighbours only) or "none" (the paired key only). On data whose scene is
independent of the action, static+dynamic neighbours are mostly same-scene videos, and
L_vv then pulls RGB embeddings together by scene. The probes are the key encoder's
g_sv(s_q), g_dv(d_q); candidates are compared with the static (dynamic) keys at the same
index, so one neighbour set serves both directions. L_vv takes no cross-video positive in
the first ``topk_warmup`` optimizer steps (training forwards / ``grad_accum``): until the
embeddings have learned something, its neighbours are noise (the static ones: scene). The
decoupling terms' neighbours are not gated: they compare static with static and dynamic
with dynamic embeddings, which is what those terms train.

Own-video keys: a queue much shorter than an epoch still holds an older key of the query's
own video for a fair share of queries (16-25% on the synthetic corpora). As a negative it
is a false negative for every method; as a top-k candidate it is a near-certain "cross-video"
positive for DCLR only, which would favour DCLR for a reason that is not the method. With
``video`` ids (the loader's, one per sample key) every queue slot remembers its video, and
slots of the query's own video are neither negatives nor candidates, for every method.

    term    query     candidate keys
    L_vv    g_vv(v)   g_vv(v')
    L_v->s  g_vs(v)   g_sv(s')        L_s->v  g_sv(s)   g_vs(v')
    L_v->d  g_vd(v)   g_dv(d')        L_d->v  g_dv(d)   g_vd(v')

L_align = MSE(A_v, (A_s + A_d) / 2) on the mean-normalised maps (each has mean 1, so
the target has too): the query encoder's RGB map against the key encoder's static and
dynamic maps of the same clip, a gradient path into f.

Negatives, chosen by `in_batch` (which must match the model's):
- queue (paper, MoCo): the candidates are the paired key plus one queue per embedding
  type. Every step, the keys of every worker are all-gathered (no gradient) and written
  into the queues in rank order, so every rank holds the same queues.
- in-batch: the candidates are the keys of the whole global batch, all-gathered with
  gradient (they come from the query encoder); no queues.

Baseline (the clip-contrastive formulation the paper argues against): w_s = w_d =
w_align = 0 and topk = 0, i.e. L_vv with the two clips of one video as the only
positive pair. Same model and code path; the other terms are still computed and logged.

Checkpointing: the queues are buffers (state_dict) of DCLRLoss, which stays outside the
DeepSpeed engine so they remain fp32 under bf16; the trainer saves
`criterion.state_dict()` with the checkpoint (client_state) and loads it back. The
queues are identical on every rank (all-gathered keys, seeded initialisation), so one
copy serves any world size.

Collectives degrade to the identity at world size 1 (no process group), so model and
loss run in one process.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dclr_dist.model import DV, HEADS, SV, VD, VS, VV, fp32_or_wider

# Loss term -> (query embedding, key embedding) as indices into the HEADS axis, and the
# similarity that picks its cross-video positives: static, dynamic or their sum.
# "vv" is chosen by DCLRLoss.vv_positives.
TERMS = {"vv": (VV, VV, "vv"), "v_s": (VS, SV, "s"), "s_v": (SV, VS, "s"), "v_d": (VD, DV, "d"), "d_v": (DV, VD, "d")}
VV_POSITIVES = ("static+dynamic", "dynamic", "none")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...) in rank order. Every rank must send the same B."""
    out = x.new_empty((world()[1] * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous())
    return out


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather without gradient (queue keys)."""
    return x if world()[1] == 1 else _all_gather(x)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward all_gather; backward all-reduce (sum) then this rank's slice.

    Every rank's loss reaches every rank's keys, so the gradient of a rank's keys is
    the sum over ranks of their losses' gradients. With data-parallel averaging of the
    parameter gradients this gives the gradient of the mean loss over the global batch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.B = world()[0], x.shape[0]
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # autograd may still hold the incoming buffer
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.B : (ctx.rank + 1) * ctx.B]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather with gradient (in-batch negatives)."""
    return x if world()[1] == 1 else _AllGatherWithGrad.apply(x)


def info_nce(logits: torch.Tensor, pos: torch.Tensor, tau: float) -> torch.Tensor:
    """Multi-positive InfoNCE, -log(sum_{p in P} exp(l_p / tau) / sum_j exp(l_j / tau)), batch mean.

    logits: (B, N) cosine similarities; pos: (B, N) bool, at least one True per row.
    """
    logits = logits / tau
    return (logits.logsumexp(1) - logits.masked_fill(~pos, float("-inf")).logsumexp(1)).mean()


def top_k_mask(sim: torch.Tensor, k: int, valid: torch.Tensor) -> torch.Tensor:
    """The k most similar valid candidates of each row: (B, N) -> (B, N) bool.

    Fewer than k when a row has fewer valid candidates (a queue still filling).
    """
    mask = torch.zeros_like(valid)
    if k == 0:
        return mask
    idx = sim.masked_fill(~valid, float("-inf")).topk(min(k, sim.shape[1]), dim=1).indices
    return mask.scatter_(1, idx, True) & valid


class DCLRLoss(nn.Module):
    """The DCLR objective; forward(out) takes DCLR's output and returns a dict with
    "loss" and the terms "vv", "v_s", "s_v", "v_d", "d_v", "align" (unweighted).
    In training mode a queue-mode forward also enqueues the gathered keys.
    """

    def __init__(
        self,
        dim: int = 128,
        queue_size: int = 16384,
        tau: float = 0.07,
        topk: int = 5,
        w_vv: float = 1.0,
        w_s: float = 1.0,
        w_d: float = 1.0,
        w_align: float = 0.1,
        vv_positives: str = "static+dynamic",
        topk_warmup: int = 0,
        in_batch: bool = False,
        grad_accum: int = 1,
    ):
        """
        dim: embedding dimension (the model's)
        queue_size: keys per queue, queue mode (paper: 16384 Kinetics-400, 2048 UCF-101)
        tau: InfoNCE temperature (paper: 0.07)
        topk: cross-video positives per query (paper: 5; 0 for the baseline)
        w_vv, w_s, w_d, w_align: loss weights (released code: 1, 1, 1, 0.1)
        vv_positives: how L_vv's cross-video positives are chosen, one of VV_POSITIVES
        topk_warmup: optimizer steps before L_vv takes cross-video positives
        in_batch: negatives from the global batch, gathered with gradient, instead of queues
        grad_accum: training forwards per optimizer step (the trainer's train.grad_accum)
        """
        super().__init__()
        if vv_positives not in VV_POSITIVES:
            raise ValueError(f"vv_positives {vv_positives!r} is not one of {VV_POSITIVES}")
        self.tau, self.topk, self.in_batch = tau, topk, in_batch
        self.vv_positives, self.warmup_forwards = vv_positives, topk_warmup * grad_accum
        self.w = {"vv": w_vv, "v_s": w_s, "s_v": w_s, "v_d": w_d, "d_v": w_d, "align": w_align}
        # Random unit keys (MoCo) from a fixed seed, so all ranks start with the same queues.
        # Negatives only: unfilled entries are never chosen as neighbours.
        g = torch.Generator().manual_seed(0)
        K = 0 if in_batch else queue_size
        queue = F.normalize(torch.randn(K, len(HEADS), dim, generator=g), dim=-1)  # (K, 5, dim)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next slot of the ring
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))  # slots holding real keys
        self.register_buffer("queue_video", torch.full((K,), -1, dtype=torch.long))  # each slot's video id; -1: none
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training forwards, for topk_warmup
        self.register_load_state_dict_pre_hook(_no_video_ids)

    def forward(self, out: dict[str, torch.Tensor], video: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``video``: (B,) non-negative int64 ids of the batch's videos (the loader's "video");
        None: no own-video masking (each query only knows its paired key)."""
        # fp32 whatever the model's dtype and whichever autocast region the caller is in: bf16
        # cosines divided by tau = 0.07 are off by up to ~0.03.
        with torch.autocast(out["q"].device.type, enabled=False):
            return self._forward({n: fp32_or_wider(x) for n, x in out.items()}, video)

    def _forward(self, out: dict[str, torch.Tensor], video: torch.Tensor | None) -> dict[str, torch.Tensor]:
        q, k, p = (F.normalize(out[n], dim=-1) for n in ("q", "k", "p"))  # (B, 5, D) (B, 5, D) (B, 2, D)
        B = q.shape[0]
        if self.in_batch != k.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"in_batch={self.in_batch} but the keys {'lack' if self.in_batch else 'carry'} "
                "a gradient: the model's in_batch must match the loss's"
            )
        if self.in_batch:
            rank = world()[0]
            bank = all_gather_with_grad(k)  # (N, 5, D), this rank's keys at rows rank * B ...
            # (B, N): a comparison, not one_hot, whose range check reads the device on the host.
            paired = (
                torch.arange(bank.shape[0], device=q.device) == (torch.arange(B, device=q.device) + rank * B)[:, None]
            )
            valid, own = ~paired, None
        else:
            # A copy: the enqueue below must not overwrite what backward still reads.
            bank = self.queue.clone()  # (K, 5, D)
            valid = (torch.arange(bank.shape[0], device=q.device) < self.queue_filled).expand(B, -1)  # (B, K)
            own = None if video is None else self.queue_video == video[:, None]  # (B, K): older keys of its video
            if own is not None:
                valid = valid & ~own

        # Cross-video search, no gradient: probes against the static and dynamic candidate keys.
        cand = bank.detach()
        sim_s, sim_d = p[:, 0] @ cand[:, SV].T, p[:, 1] @ cand[:, DV].T  # (B, N)
        near = {"s": top_k_mask(sim_s, self.topk, valid), "d": top_k_mask(sim_d, self.topk, valid)}  # (B, N)
        # L_vv after its warm-up only; a tensor comparison, so no host sync.
        valid_vv = valid & (self.steps >= self.warmup_forwards)
        if self.vv_positives == "static+dynamic":
            both = sim_s.masked_fill(~valid_vv, float("-inf")).softmax(1) + sim_d.masked_fill(
                ~valid_vv, float("-inf")
            ).softmax(1)
            near["vv"] = top_k_mask(both.nan_to_num(0.0), self.topk, valid_vv)
        elif self.vv_positives == "dynamic":
            near["vv"] = top_k_mask(sim_d, self.topk, valid_vv)
        else:
            near["vv"] = torch.zeros_like(valid)

        terms = {}
        for name, (a, b, by) in TERMS.items():
            nbr = near[by]
            if self.in_batch:
                logits, pos = q[:, a] @ bank[:, b].T, paired | nbr  # (B, N)
            else:
                l_pos = (q[:, a] * k[:, b]).sum(-1, keepdim=True)  # (B, 1)
                l_neg = q[:, a] @ bank[:, b].T  # (B, K)
                if own is not None:  # neither negative nor positive
                    l_neg = l_neg.masked_fill(own, float("-inf"))
                logits = torch.cat([l_pos, l_neg], 1)  # (B, 1 + K)
                pos = torch.cat([torch.ones_like(l_pos, dtype=torch.bool), nbr], 1)
            terms[name] = info_nce(logits, pos, self.tau)
        terms["align"] = F.mse_loss(out["A_v"], (out["A_s"] + out["A_d"]) / 2)

        if self.training:
            self.steps.add_(1)
            if not self.in_batch:
                ids = torch.full((B,), -1, dtype=torch.long, device=q.device) if video is None else video
                self._enqueue(all_gather(k), all_gather(ids))
        return {"loss": sum(self.w[n] * t for n, t in terms.items()), **terms}

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor, video: torch.Tensor) -> None:
        """Write keys (N, 5, D) and their video ids (N,), in order, into the ring at queue_ptr;
        with N > K the last K remain."""
        N, K = keys.shape[0], self.queue.shape[0]
        j = torch.arange(max(0, N - K), N, device=keys.device)
        slots = (self.queue_ptr + j) % K
        self.queue[slots] = keys[j]
        self.queue_video[slots] = video[j]
        self.queue_ptr.copy_((self.queue_ptr + N) % K)
        self.queue_filled.add_(N).clamp_(max=K)


def _no_video_ids(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before queues remembered their videos: no slot has a known video."""
    if prefix + "queue" in state_dict and prefix + "queue_video" not in state_dict:
        state_dict[prefix + "queue_video"] = torch.full_like(module.queue_video, -1)
