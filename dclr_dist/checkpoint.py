"""The checkpoint format, written by pretraining and read by resumption, evaluation and export.

A Ray checkpoint of a run holds each rank's DeepSpeed state under the tag ``ds`` (the
loss's queues, epoch and best-so-far ride in its client state), and rank 0's
``backbone.pt`` (the query encoder's backbone, a plain state_dict) and ``meta.json`` (world
size, epoch, architecture, the whole config). ``best/`` beside the run's checkpoints holds
the same pair for the best epoch; ``latest.json`` names the newest complete checkpoint for
the driver. Everything here loads tensors and plain data only.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from dclr_dist import storage
from dclr_dist.config import Config
from dclr_dist.model import backbone

# What a --checkpoint argument accepts (resolve_checkpoint), for every command that takes one.
CHECKPOINT_HELP = (
    "checkpoint folder of `python -m dclr_dist.train` (backbone.pt + meta.json), or its run folder "
    "(uses best/); local or s3://"
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and says what to do."""


def resolve_checkpoint(url: str) -> str:
    """The folder holding backbone.pt: ``url`` itself, or a run folder's ``best/``."""
    url = storage.absolute(url.rstrip("/"))
    for folder in (url, storage.join(url, "best")):
        if storage.exists(storage.join(folder, "backbone.pt")):
            return folder
    raise CheckpointError(
        f"{url}: no backbone.pt here or in best/. Pass a checkpoint folder written by "
        "`python -m dclr_dist.train` (backbone.pt + meta.json: a run's checkpoint_*/ or best/), "
        "or the run folder itself"
    )


def load_meta(folder: str) -> dict:
    try:
        meta = json.loads(storage.read_bytes(storage.join(folder, "meta.json")))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: backbone.pt without meta.json; copy the whole checkpoint folder") from None
    except ValueError as e:
        raise CheckpointError(f"{folder}/meta.json: not JSON ({e})") from None
    model = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(model, dict) or not {"arch", "width"} <= model.keys() or not isinstance(meta.get("config"), dict):
        raise CheckpointError(
            f"{folder}/meta.json: not written by `python -m dclr_dist.train` (it needs model.arch, "
            "model.width and config)"
        )
    return meta


def load_backbone(folder: str, meta: dict) -> tuple[nn.Module, int]:
    """The checkpoint's backbone f (the query encoder's) in eval mode, and its channel count C."""
    arch, width = meta["model"]["arch"], meta["model"]["width"]
    f, C = backbone(arch, width)
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(storage.join(folder, "backbone.pt"))), weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{folder}/backbone.pt: refusing to load: it holds objects other than tensors and plain "
            "data (torch's weights-only unpickler refused it, as unpickling could run code); use a "
            "backbone.pt written by the trainer or `python -m dclr_dist.export`"
        ) from None
    try:
        f.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(
            f"{folder}/backbone.pt does not fit the {arch} backbone of width {width} that its "
            f"meta.json names ({first} ...): the folder mixes files of two runs; use a checkpoint "
            "folder as the trainer wrote it"
        ) from None
    return f.eval(), C


CHECKPOINT_TAG = "ds"


def export_backbone(engine) -> bytes:
    """The query encoder's backbone as a plain state_dict, for torch.load(weights_only=True)."""
    state = {k: v.detach().float().cpu() for k, v in engine.module.encoder_q.f.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _checkpoint_classes() -> list:
    """What a DeepSpeed ZeRO 0-2 checkpoint pickles besides tensors and plain data: inert
    records (the loss scaler's settings, an enum, a dataclass of two ints), no callable."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_checkpoint(engine, folder: str, where: str) -> dict:
    """``engine.load_checkpoint`` unpickling tensors and plain data only; returns the client state.

    DeepSpeed calls torch.load(weights_only=False), so a checkpoint could run code on every
    worker, planted by anyone who can write the run's storage. TORCH_FORCE_WEIGHTS_ONLY_LOAD
    overrides that argument in every torch.load the call makes; a TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
    from the user's environment is set aside meanwhile (torch refuses the two together).
    """
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_checkpoint_classes()):
            _, client = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines()
        what = next((line.split("GLOBAL ", 1)[1].split()[0] for line in lines if "GLOBAL " in line), None)
        reason = (
            f"it unpickles {what}"
            if what
            else next((line.strip() for line in lines if "WeightsUnpickler error" in line), lines[0])
        )
        raise RuntimeError(
            f"{where}: refusing to resume: the checkpoint holds more than tensors and plain data ({reason}), "
            "so loading it could run code planted in it. Check who can write the run's storage; choose a new "
            "train.name to start afresh."
        ) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return client


def resume_refusal(saved_workers: int, saved_stage: int, workers: int, stage: int) -> str | None:
    """Why a checkpoint of ``saved_workers`` ranks at ZeRO ``saved_stage`` cannot resume on
    ``workers`` ranks at ``stage`` (a phrase after "the checkpoint ..."), or None.

    Stage 0 checkpoints hold the whole optimizer state and load at any world size. Stages
    1-2 hold one shard per rank, which DeepSpeed re-partitions only through an offline
    conversion to its universal format; one stage's state does not load into another's.
    """
    if saved_stage != stage:
        return (
            f"was written with engine.zero_stage={saved_stage} and this run has {stage}: one ZeRO stage's "
            f"optimizer state does not load into another's. Set engine.zero_stage={saved_stage} to resume it"
        )
    if saved_workers != workers and stage:
        return (
            f"was written by {saved_workers} workers at ZeRO stage {stage} and this run has {workers}: "
            f"ZeRO-{stage} optimizer shards do not re-partition (stage 0 runs resume at any cluster.workers). "
            f"Set cluster.workers={saved_workers} to resume it"
        )
    return None


def checkpoint_meta(cfg: Config, world: int, epoch: int) -> dict:
    """meta.json of a checkpoint and of best/: what `python -m dclr_dist.eval` needs to rebuild f."""
    return {
        "world_size": world,
        "epoch": epoch + 1,
        "model": {"arch": cfg.model.arch, "width": cfg.model.width, "epoch": epoch + 1},
        "config": cfg.to_dict(),
    }


def report_with_checkpoint(
    engine, criterion, cfg: Config, epoch: int, best: dict, world: int, rank: int, run_url: str, metrics: dict
) -> None:
    import ray.train

    # Uploaded in the background while training goes on, so the folder outlives this call;
    # Ray deletes it once uploaded. latest.json follows from Train's controller (latest_json_callback).
    d = tempfile.mkdtemp(prefix=f"dclr-checkpoint-{cfg.train.name}-")
    try:
        engine.save_checkpoint(
            d,
            tag=CHECKPOINT_TAG,
            client_state={"epoch": epoch, "best": best, "criterion": criterion.state_dict(), "metrics": metrics},
        )
        if rank == 0:
            (Path(d) / "backbone.pt").write_bytes(export_backbone(engine))
            (Path(d) / "meta.json").write_text(json.dumps(checkpoint_meta(cfg, world, epoch)))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=True,
        )
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise


def save_best(
    engine, cfg: Config, world: int, epoch: int, run_url: str, metrics: dict, writes: storage.BackgroundWrites
) -> None:
    """best/: the backbone of the best epoch so far, which outlives Ray's keep-the-newest-N.

    Written at every improvement, checkpoint epoch or not, so an improvement between
    checkpoints is not lost; meta.json last, as the mark of a complete pair. The weights are
    taken now, the upload goes on in the background (``writes``, in order).
    """
    writes.write(storage.join(run_url, "best/backbone.pt"), export_backbone(engine))
    writes.write(
        storage.join(run_url, "best/meta.json"),
        json.dumps({**checkpoint_meta(cfg, world, epoch), "metrics": metrics}).encode(),
    )


def latest_json_callback(run_url: str):
    """A Ray Train callback that writes ``<run>/latest.json``, the run's newest checkpoint as
    the driver reads it before starting workers (world size, epoch, metrics).

    It runs in Train's controller once every rank's part of a checkpoint is uploaded and Ray
    has recorded it, so latest.json never names a checkpoint a restart would not resume
    from; rank 0 could not know that, with uploads in the background on every rank.
    """
    from ray.train import UserCallback

    class LatestJson(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if checkpoint is not None:
                m = metrics[0]
                storage.write_bytes(
                    storage.join(run_url, "latest.json"),
                    json.dumps({"world_size": m["world_size"], "epoch": m["epoch"], "metrics": m}).encode(),
                )

    return LatestJson()


def latest(run_url: str, workers: int, zero_stage: int) -> int | None:
    """The epoch of ``run_url``'s newest complete checkpoint (latest.json), None for a new run;
    refuses, before any worker starts, a checkpoint this run's workers could not load."""
    url = storage.join(run_url, "latest.json")
    if not storage.exists(url):
        return None
    saved = json.loads(storage.read_bytes(url))
    # Runs checkpointed before the stage was recorded are judged by the workers, from the
    # checkpoint's own config.
    saved_stage = saved["metrics"].get("zero_stage")
    why = saved_stage is not None and resume_refusal(saved["world_size"], saved_stage, workers, zero_stage)
    if why:
        raise ValueError(
            f"{run_url}: the checkpoint of epoch {saved['epoch']} {why}, or choose a new train.name to start afresh."
        )
    return saved["epoch"]
