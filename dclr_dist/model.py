"""DCLR model: a shared video backbone, its momentum copy, five heads, activation maps.

Ding, Qian, Xiong, "Dual Contrastive Learning for Spatio-temporal Representation",
ACM MM 2022 (arXiv 2207.05340). Each clip v is decoupled into a static view s (one
frame repeated) and a dynamic view d (temporal difference); one backbone f encodes all
three. The RGB features are split in feature space by the activation maps of s and d:
F_s(v) = GAP(f(v) * A_s), F_d(v) = GAP(f(v) * A_d).

Split between model and loss (`dclr_dist.loss`): the model computes embeddings and maps
for one worker's batch and knows nothing of other workers; the loss normalises (fp32),
gathers across workers, keeps the queues and returns each term. The trainer calls

    out = model(batch)                  # dict below
    losses = criterion(out)             # dict: "loss" and every term
    ... backward, optimizer step ...
    model.momentum_update()             # after the optimizer step

Under DeepSpeed (ZeRO 0-2, fp32 or bf16 autocast): give it only the trainable parameters
(the key encoder's are frozen); ZeRO-3 is out, as momentum_update needs whole parameters.

Decisions (docs/design.md: section 1 the maps, pooling and alignment; section 3 batch norm;
section 8 every difference from the released code): activation maps from the key encoder
without gradient; soft pooling or a decoupling threshold; L_align on the maps themselves;
one backbone pass per encoder with batch norm per view type and group; in-batch mode
sends the k-side views through the query encoder.
"""

import copy

import torch
from torch import nn
from torchvision.models import video

from dclr_dist import batchnorm

# The five projection heads, in the order of the embedding axis of out["q"] and out["k"].
HEADS = ("vv", "vs", "vd", "sv", "dv")
VV, VS, VD, SV, DV = range(len(HEADS))

# Batch keys of the data pipeline: RGB clips, static views, dynamic views, (B, 3, T, H, W) each.
VIEWS = ("q", "k", "static_q", "static_k", "dynamic_q", "dynamic_k")

ARCHS = ("tiny", "r2plus1d_18", "r3d_18", "mc3_18", "s3d")


def tiny_backbone(width: int) -> nn.Sequential:
    """A four-layer 3D CNN for CPU tests and the demo.

    Downsamples like R(2+1)D-18 (T/8, H/16, W/16) so the maps keep their meaning;
    ends in ReLU so activation maps are non-negative, like every backbone here.
    """
    layers, c_in = [], 3
    for c, stride in ((width, (1, 2, 2)), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
        layers += [nn.Conv3d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm3d(c), nn.ReLU(inplace=True)]
        c_in = c
    return nn.Sequential(*layers)


def backbone(arch: str, width: int) -> tuple[nn.Module, int]:
    """Backbone f as a feature extractor, and its channel count C.

    f maps (B, 3, T, H, W) to the final-stage feature maps (B, C, T', H', W'): the
    torchvision networks without their pooling and classifier, randomly initialised
    (self-supervised from scratch). torchvision's r2plus1d_18 has two blocks per stage
    (the released code's had one). The torchvision networks exist only at base width 64.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not one of {ARCHS}")
    if arch == "tiny":
        return tiny_backbone(width), 8 * width
    if width != 64:
        raise ValueError(f"{arch} has a fixed base width of 64, got width={width}")
    net = getattr(video, arch)(weights=None)
    if arch == "s3d":
        return net.features, 1024
    return nn.Sequential(net.stem, net.layer1, net.layer2, net.layer3, net.layer4), 512


def fp32_or_wider(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or unchanged when wider (fp64 in the exactness tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def activation_map(f: torch.Tensor) -> torch.Tensor:
    """A = sum_c f normalised by its mean over positions: (B, C, T', H', W') -> (B, T', H', W').

    Summed in fp32: under bf16 a 512-term sum loses the map's contrast.
    """
    A = fp32_or_wider(f).sum(1)
    return A / A.mean((1, 2, 3), keepdim=True).clamp_min(1e-6)


def pool(f: torch.Tensor, A: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """F(v) = GAP(f(v) * A), the part of f(v) where A is active: (B, C, T', H', W') -> (B, C).

    threshold None: soft weights, A itself (mean 1). Otherwise the binary map
    [A >= threshold] normalised to mean 1, a plain average over the kept positions
    (the peak alone where the threshold is above a sample's peak).
    """
    if threshold is not None:
        keep = (A >= A.amax((1, 2, 3), keepdim=True).clamp(max=threshold)).to(A.dtype)
        A = keep / keep.mean((1, 2, 3), keepdim=True)
    return (f * A.unsqueeze(1).to(f.dtype)).mean((2, 3, 4))


def gap(f: torch.Tensor) -> torch.Tensor:
    """Global average pooling: (B, C, T', H', W') -> (B, C)."""
    return f.mean((2, 3, 4))


class Encoder(nn.Module):
    """Backbone f and the five heads g: one of the two encoders (query, momentum key)."""

    def __init__(self, arch: str, width: int, dim: int):
        super().__init__()
        f, C = backbone(arch, width)
        self.f = batchnorm.convert(f)  # per-segment statistics; the same state_dict as f's
        # 2-layer MLPs C-C-ReLU-dim (paper: 512-512-128), one per embedding type.
        self.g = nn.ModuleDict(
            {h: nn.Sequential(nn.Linear(C, C), nn.ReLU(inplace=True), nn.Linear(C, dim)) for h in HEADS}
        )

    def embed(
        self,
        f_v: torch.Tensor,
        f_s: torch.Tensor,
        f_d: torch.Tensor,
        A_s: torch.Tensor,
        A_d: torch.Tensor,
        threshold: float | None,
    ) -> torch.Tensor:
        """g_vv(GAP f(v)), g_vs(F_s(v)), g_vd(F_d(v)), g_sv(GAP f(s)), g_dv(GAP f(d)): (B, 5, dim).

        f_*: (B, C, T', H', W') feature maps; A_*: (B, T', H', W') maps. Not normalised:
        the loss normalises in fp32.
        """
        x = {
            "vv": gap(f_v),
            "vs": pool(f_v, A_s, threshold),
            "vd": pool(f_v, A_d, threshold),
            "sv": gap(f_s),
            "dv": gap(f_d),
        }
        return torch.stack([self.g[h](x[h]) for h in HEADS], 1)


class DCLR(nn.Module):
    """DCLR: query encoder, momentum key encoder (MoCo, arXiv 1911.05722), activation maps.

    forward(batch) takes the data pipeline's dict (VIEWS, each (B, 3, T, H, W)) and returns
        q:   (B, 5, dim) queries, query encoder on (v_q, s_q, d_q), HEADS order
        k:   (B, 5, dim) keys from (v_k, s_k, d_k): key encoder without gradient, or in
             in-batch mode the query encoder with gradient
        p:   (B, 2, dim) key-encoder g_sv(GAP f(s_q)), g_dv(GAP f(d_q)): the probes of the
             cross-video neighbour search (static, dynamic)
        A_v: (B, T', H', W') query-encoder map of v_q, with gradient (alignment term)
        A_s, A_d: (B, T', H', W') key-encoder maps of s_q and d_q, no gradient
    Maps are fp32 and mean-normalised; embeddings are in the parameters' dtype.
    """

    def __init__(
        self,
        arch: str = "r2plus1d_18",
        width: int = 64,
        dim: int = 128,
        m: float = 0.999,
        threshold: float | None = None,
        per_view_bn: bool = True,
        bn_groups: int = 2,
        in_batch: bool = False,
    ):
        """
        arch: backbone, one of ARCHS
        width: base channel width (tiny only; the torchvision networks exist only at 64)
        dim: embedding dimension of the heads (paper: 128)
        m: momentum of the key encoder (paper: 0.999)
        threshold: decoupling threshold on the mean-normalised activation map; None for soft weights
        per_view_bn: batch norm statistics per view type, so they never mix RGB, static and
            dynamic inputs (module docstring); False: joint statistics, as the released code
        bn_groups: G, groups of videos with batch norm statistics of their own, arranged
            differently in the two encoders (queue mode; in-batch mode uses one group)
        in_batch: k-side views through the query encoder (in-batch negatives, see module docstring)
        """
        super().__init__()
        self.m = m
        self.threshold = threshold
        self.per_view_bn = per_view_bn
        self.bn_groups = 1 if in_batch else bn_groups
        self.in_batch = in_batch
        self._inverse: dict[tuple, torch.Tensor] = {}  # cached output orders of _features
        # Layout of the backbones' input batches (the trainer's engine.channels_last). With
        # torch.channels_last_3d (NDHWC, what cuDNN's tensor-core kernels work in) every
        # convolution, and so every activation, follows the input; the parameters keep theirs
        # (DeepSpeed broadcasts them as bytes and ZeRO 1-2 flatten them: they must stay NCDHW).
        self.memory_format = torch.contiguous_format
        self.encoder_q = Encoder(arch, width, dim)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False  # updated by momentum only
        # fp32 accumulator of the key parameters, see momentum_update.
        self._theta_k: list[torch.Tensor] | None = None
        self.register_load_state_dict_post_hook(_drop_accumulator)

    @classmethod
    def from_config(cls, cfg, in_batch: bool) -> "DCLR":
        """The model of a ``ModelConfig`` (bn_sync is the trainer's: it needs the process groups)."""
        return cls(cfg.arch, cfg.width, cfg.dim, cfg.momentum, cfg.threshold, cfg.per_view_bn, cfg.bn_groups, in_batch)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Under DeepSpeed bf16 the parameters are bf16 and the loader's views fp32.
        dtype = next(self.encoder_q.parameters()).dtype
        v_q, v_k, s_q, s_k, d_q, d_k = (batch[name].to(dtype) for name in VIEWS)  # (B, 3, T, H, W) each

        with torch.no_grad():
            # Key encoder: activation maps (no gradient, as designed), probes, and the keys in queue mode.
            x_k = [s_q, d_q, s_k, d_k] + ([] if self.in_batch else [v_k])
            f_sq, f_dq, f_sk, f_dk, *f_vk = self._features(self.encoder_k.f, x_k, "sdsdv", transposed=True)
            if f_sq[0, 0].numel() == 1:
                raise ValueError(f"input {tuple(v_q.shape[2:])} leaves a 1x1x1 feature map: too small to decouple")
            A_s, A_d = activation_map(f_sq), activation_map(f_dq)  # (B, T', H', W')
            A_sk, A_dk = activation_map(f_sk), activation_map(f_dk)
            p = torch.stack([self.encoder_k.g["sv"](gap(f_sq)), self.encoder_k.g["dv"](gap(f_dq))], 1)  # (B, 2, dim)
            if not self.in_batch:
                k = self.encoder_k.embed(f_vk[0], f_sk, f_dk, A_sk, A_dk, self.threshold)  # (B, 5, dim)

        x_q = [v_q, s_q, d_q] + ([v_k, s_k, d_k] if self.in_batch else [])
        f_q = self._features(self.encoder_q.f, x_q, "vsdvsd", transposed=False)  # (B, C, T', H', W') each
        q = self.encoder_q.embed(f_q[0], f_q[1], f_q[2], A_s, A_d, self.threshold)  # (B, 5, dim)
        if self.in_batch:
            k = self.encoder_q.embed(f_q[3], f_q[4], f_q[5], A_sk, A_dk, self.threshold)
        return {"q": q, "k": k, "p": p, "A_v": activation_map(f_q[0]), "A_s": A_s, "A_d": A_d}

    def _features(self, f: nn.Module, xs: list[torch.Tensor], kinds: str, transposed: bool) -> list[torch.Tensor]:
        """f over the views xs, (B, 3, T, H, W) each, in one pass; kinds[i] is the type of xs[i].

        The views are stacked in batch-norm segments (``batchnorm.bn_layout``) and the
        features put back in the order of xs; transposed: the key encoder's groups.
        """
        B, kinds = xs[0].shape[0], kinds[: len(xs)]
        pieces, segments, rgb = batchnorm.bn_layout(kinds, B, self.bn_groups, transposed, self.per_view_bn)
        key = (kinds, B, self.bn_groups, transposed, self.per_view_bn, xs[0].device)
        if key not in self._inverse:  # built once per layout: a host-to-device copy per step would sync
            position = torch.empty(len(xs) * B, dtype=torch.long)
            position[torch.cat([torch.arange(B)[sl] + i * B for i, sl in pieces])] = torch.arange(len(xs) * B)
            self._inverse[key] = position.to(xs[0].device)
        x = torch.cat([xs[i][sl] for i, sl in pieces]).contiguous(memory_format=self.memory_format)
        with batchnorm.layout(f, segments, rgb):
            y = f(x)  # (len(xs) * B, C, T', H', W')
        return list(y.index_select(0, self._inverse[key]).chunk(len(xs)))

    def compile_backbones(self, **options) -> None:
        """torch.compile both encoders' backbones in place, stage by stage (``options``: torch.compile's).

        In place (Module.compile), so the state_dict keys stay the plain modules' (no
        ``_orig_mod.`` prefix): checkpoints, best/ and exported backbones are unchanged. Stage
        by stage (the backbone's top-level children), so each stage's parameter gradients
        exist when its compiled backward ends and the gradient all-reduce overlaps the rest of
        backward (one graph per backbone gives them all at its end: tested by hook order on
        CPU). Every stage shares nn.Module's call code, whose compiled versions are capped by
        torch._dynamo's recompile limit (8): raised to fit 2 encoders x their stages x a few
        input shapes, else most stages would silently run uncompiled.
        """
        import torch._dynamo

        stages = [m for encoder in (self.encoder_q, self.encoder_k) for m in encoder.f.children()]
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 4 * len(stages))
        for stage in stages:
            stage.compile(**options)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q (MoCo eq. 2); call after each optimizer step.

        Accumulates in fp32. Under DeepSpeed bf16 the key parameters are bf16, where a
        step of (1 - m) = 1e-3 of the gap is below half an ulp (2^-9 relative), so an
        in-place bf16 update would freeze the key encoder. The fp32 accumulator is the
        parameters themselves when they are fp32, else a copy; it is not checkpointed:
        after loading a state dict it is rebuilt from the saved weights (one rounding).
        """
        theta_k = list(self.encoder_k.parameters())
        acc = self._theta_k
        wide = torch.promote_types(theta_k[0].dtype, torch.float32)
        if acc is None or acc[0].dtype != wide or acc[0].device != theta_k[0].device:
            acc = self._theta_k = [fp32_or_wider(p) for p in theta_k]  # p itself when already fp32
        for p_k, a, p_q in zip(theta_k, acc, self.encoder_q.parameters()):
            a.lerp_(fp32_or_wider(p_q), 1.0 - self.m)
            if a is not p_k:
                p_k.copy_(a)


def _drop_accumulator(model: DCLR, incompatible_keys) -> None:
    """After load_state_dict the fp32 key accumulator is stale; momentum_update rebuilds it."""
    model._theta_k = None
