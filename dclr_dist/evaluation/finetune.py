"""The ``finetune`` protocol (Ding, Qian, Xiong, arXiv 2207.05340, evaluation section;
docs/design.md, section 7): the paper's protocol.

The backbone and a linear classifier are trained end to end on the train split (lr
``finetune.lr`` per ``finetune.ref_batch`` samples, scaled with the global batch like
pretraining, ``finetune.epochs`` epochs, cosine schedule, augmented RGB clips of the
training pipeline), distributed on Ray Train with the pretraining's scaling
(``cluster.workers`` ...: DDP over gloo on CPU, nccl on GPU; no DeepSpeed, a backbone fits
every GPU), then tested with the softmax averaged over the clips of each test video.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dclr_dist import launch, storage
from dclr_dist.checkpoint import load_backbone, load_meta
from dclr_dist.config import Config, config_from_dict
from dclr_dist.engine import scaled_lr
from dclr_dist.evaluation import EvalError
from dclr_dist.evaluation.probes import accuracy
from dclr_dist.model import gap


class Classifier(nn.Module):
    """Backbone f, GAP and a linear layer: (B, 3, T, H, W) -> (B, K) logits."""

    def __init__(self, f: nn.Module, channels: int, num_classes: int):
        super().__init__()
        self.f, self.fc = f, nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(gap(self.f(x)))


def finetune_loop(loop_config: dict) -> None:
    """Ray Train worker entry point: one rank of the fine-tuning."""
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(loop_config["config"], where="finetune_loop_config")
    folder, num_classes = loop_config["checkpoint"], loop_config["num_classes"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # the same classifier init everywhere (DDP also broadcasts it)
    f, C = load_backbone(folder, load_meta(folder))
    model = Classifier(f, C, num_classes).train()
    if device.type == "cuda":  # SyncBatchNorm refuses CPU tensors once a process group exists
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model)
    torch.manual_seed(cfg.train.seed + rank)

    train_loss, train_top1 = _train_epochs(model, cfg, device, rank, world)

    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    pred, y = _clip_averaged_predictions(net, cfg, loop_config["test"], device, rank, world)
    if len(y) == 0:
        raise EvalError(f"no test video of {loop_config['test']} could be read: see the warnings")
    metrics = {
        "epoch": cfg.finetune.epochs,
        "loss": train_loss,
        "train_top1": train_top1,
        **accuracy(pred, y, loop_config["classes"]),
        "videos": len(y),
    }
    # Ray Train keeps the metrics of checkpointed reports only: rank 0's checkpoint is the
    # fine-tuned network, a state_dict of f.* (backbone) and fc.* (classifier).
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            torch.save({k: v.cpu() for k, v in net.state_dict().items()}, Path(d) / "model.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def _train_epochs(model: nn.Module, cfg: Config, device: torch.device, rank: int, world: int) -> tuple[float, float]:
    """The ``finetune.epochs`` epochs of this rank on ``cfg.data.train`` (SGD, scaled lr, cosine
    schedule), each reported to Ray Train; the last epoch's mean loss and top-1 on its batches."""
    import ray.train

    from dclr_dist import data

    batches = data.batches_per_epoch(cfg.data, data.resolve_shards(cfg.data.train), world)
    epochs = cfg.finetune.epochs
    lr = scaled_lr(cfg.finetune.lr, cfg.data.batch_size * world, cfg.finetune.ref_batch)
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=cfg.finetune.momentum, weight_decay=cfg.finetune.weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * batches)
    # One loader for every epoch (no re-fork at epoch boundaries); unlabelled shards are an error.
    it = iter(data.train_loader(cfg.data, cfg.views, rank=rank, world_size=world, epochs=epochs, labelled=True))
    for epoch in range(epochs):
        model.train()
        # Summed on the device: a float() per step would make the host wait for the GPU every step.
        total = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for _ in range(batches):
            # The first augmented RGB clip of the pretraining pipeline: random resized crop,
            # colour, blur, flip (its static and dynamic views are made and left unused).
            batch = data.to_device(next(it), device, cfg.views)
            logits = model(batch["q"])
            loss = F.cross_entropy(logits, batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(logits)
            correct += (logits.argmax(1) == batch["label"]).sum()
            seen += len(logits)
        train_loss, train_top1 = float(total) / seen, int(correct) / seen
        ray.train.report({"epoch": epoch + 1, "loss": train_loss, "train_top1": train_top1})
    return train_loss, train_top1


def _clip_averaged_predictions(
    net: nn.Module, cfg: Config, test: list[str], device: torch.device, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each test video's class by the softmax averaged over its clips, and its label, gathered
    from every rank: (pred (V,), y (V,)) on the CPU."""
    import torch.distributed as dist

    from dclr_dist import data

    net.eval()
    keys, preds, labels = [], [], []
    with torch.no_grad():
        for batch in data.eval_loader(dataclasses.replace(cfg.data, eval=test), cfg.views, rank=rank, world_size=world):
            if not batch["key"]:  # damage counts only
                continue
            batch = data.to_device(batch, device, cfg.views)
            clips = batch["clips"]  # (B, N, 3, T, S, S)
            B, N = clips.shape[:2]
            p = net(clips.flatten(0, 1)).softmax(1).view(B, N, -1).mean(1)  # clip-averaged (B, K)
            keys += batch["key"]
            preds += p.argmax(1).tolist()
            labels += batch["label"].tolist()
    everyone: list = [None] * world
    if world > 1:
        dist.all_gather_object(everyone, (keys, preds, labels))
    else:
        everyone = [(keys, preds, labels)]
    pred = torch.tensor([p for e in everyone for p in e[1]])
    y = torch.tensor([label for e in everyone for label in e[2]])
    return pred, y


def finetune(cfg: Config, folder: str, test: list[str], classes: list[str]) -> dict:
    """Fine-tune the checkpoint's backbone on ``cfg.data.train`` with Ray Train and test it on ``test``."""
    # A new run each time, beside the pretraining runs (train.storage_path, which every node
    # reaches): the same name would make Ray Train resume a finished fine-tuning.
    name = f"{cfg.train.name}-finetune-{time.strftime('%Y%m%d-%H%M%S')}"
    loop_config = {
        "config": cfg.to_dict(),
        "checkpoint": folder,
        "test": test,
        "classes": classes,
        "num_classes": len(classes),
    }
    try:
        result = launch.run(launch.torch_trainer(finetune_loop, loop_config, cfg, name))
    except launch.TrainingFailed as e:
        raise EvalError(f"fine-tuning failed: {e}") from None
    path = result.checkpoint.path  # pyarrow's paths lack the s3://
    where = f"s3://{path}" if storage.is_s3(cfg.train.storage_path) else path
    return {
        **result.metrics,
        "model": storage.join(where, "model.pt"),
        "epochs": cfg.finetune.epochs,
        "chance": 1 / len(classes),
    }
