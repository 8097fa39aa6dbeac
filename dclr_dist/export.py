"""``python -m dclr_dist.export``: a pretrained DCLR backbone as a torchvision video model's weights.

    python -m dclr_dist.export --checkpoint runs/ucf --out r2plus1d_18_dclr.pt
    python -m dclr_dist.export --checkpoint s3://bucket/runs/ucf/best --format plain --out backbone.pt

Formats:

- ``torchvision`` (default): the backbone under the parameter names of
  ``torchvision.models.video.<arch>``, for the torchvision archs the trainer uses
  (r2plus1d_18, r3d_18, mc3_18, s3d). The file holds every weight and batch-norm buffer
  except the classifier's (``fc.*``; ``classifier.*`` for s3d), which pretraining does not
  train: build the network with the number of classes of the downstream task and load with
  ``strict=False``; the classifier's keys are then the only missing ones::

      net = torchvision.models.video.r2plus1d_18(num_classes=101)
      missing, unexpected = net.load_state_dict(torch.load("r2plus1d_18_dclr.pt", weights_only=True), strict=False)
      assert not unexpected and set(missing) == {"fc.weight", "fc.bias"}

  (s3d: ``{"classifier.1.weight", "classifier.1.bias"}``, see :data:`CLASSIFIER`.) For
  features instead of logits, replace the classifier: ``net.fc = nn.Identity()`` gives the
  globally average-pooled features of r2plus1d_18, r3d_18 and mc3_18, (B, 512), the features
  DCLR's evaluation uses. For s3d use ``net.features(x).mean((2, 3, 4))``, (B, 1024):
  torchvision's S3D pools with a fixed AvgPool3d((2, 7, 7), stride 1) before its
  convolutional classifier, which is global pooling only where the feature map is 2x7x7
  (16x224x224 clips) and fails on smaller ones.
- ``plain``: the checkpoint's ``backbone.pt`` as the trainer wrote it, a state_dict of
  ``dclr_dist.model.backbone(arch, width)`` (keys ``0.0.weight``, ...). The only format
  for the ``tiny`` backbone, which has no torchvision counterpart.

Both are state_dicts of tensors only: ``torch.load(path, weights_only=True)`` reads them.
The backbone is the query encoder's, with batch-norm running statistics from RGB clips, so
feed clips prepared as in pretraining. A sidecar JSON beside the weights (``FILE.json`` for
``FILE.pt``) says how: clip length, temporal stride, crop size, the layout and value range,
the per-channel mean and std, the arch and the checkpoint it came from, and the lines that
load it for fine-tuning with a new classifier head.

``--checkpoint`` is what ``python -m dclr_dist.eval`` takes: a checkpoint folder
(``backbone.pt`` + ``meta.json``), a run's ``best/`` or the run folder itself (its
``best/``), local or s3://. ``--out`` may be an s3:// URL too.
"""

from __future__ import annotations

import argparse
import io
import json
import sys

import torch

from dclr_dist import storage
from dclr_dist.checkpoint import CHECKPOINT_HELP, CheckpointError, load_backbone, load_meta, resolve_checkpoint

FORMATS = ("torchvision", "plain")

# The backbone's top-level modules (nn.Sequential indices) under torchvision's names.
_PREFIXES = {
    "r2plus1d_18": ("stem", "layer1", "layer2", "layer3", "layer4"),
    "r3d_18": ("stem", "layer1", "layer2", "layer3", "layer4"),
    "mc3_18": ("stem", "layer1", "layer2", "layer3", "layer4"),
    "s3d": None,  # the backbone is S3D.features itself: every key gets "features."
}

# The keys of each torchvision model the export leaves out: its classifier, not pretrained.
CLASSIFIER = {
    "r2plus1d_18": ("fc.weight", "fc.bias"),
    "r3d_18": ("fc.weight", "fc.bias"),
    "mc3_18": ("fc.weight", "fc.bias"),
    "s3d": ("classifier.1.weight", "classifier.1.bias"),
}

TORCHVISION_ARCHS = tuple(CLASSIFIER)


class ExportError(RuntimeError):
    """The export cannot be made; the message names what and says what to do."""


def check_torchvision_arch(arch: str) -> None:
    if arch not in TORCHVISION_ARCHS:
        raise ExportError(
            f"the {arch} backbone has no torchvision equivalent (torchvision format: "
            f"{', '.join(TORCHVISION_ARCHS)}); export it with --format plain"
        )


def to_torchvision(state_dict: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """``state_dict`` of ``dclr_dist.model.backbone(arch, 64)`` under ``torchvision.models.video.<arch>``'s keys.

    Every key of the torchvision model but its classifier's (:data:`CLASSIFIER`), the same
    tensors (not copied). Raises ExportError for an arch without a torchvision model, and
    when ``state_dict`` is not that backbone's (keys or shapes differ).
    """
    check_torchvision_arch(arch)
    prefixes = _PREFIXES[arch]
    out = {}
    for key, value in state_dict.items():
        if prefixes is None:
            out[f"features.{key}"] = value
            continue
        head, _, rest = key.partition(".")
        if not head.isdigit() or int(head) >= len(prefixes) or not rest:
            raise ExportError(
                f"state_dict key {key!r} is not one of the {arch} backbone's (keys 0.* to "
                f"{len(prefixes) - 1}.*): pass the backbone.pt of a {arch} checkpoint"
            )
        out[f"{prefixes[int(head)]}.{rest}"] = value

    from torchvision.models import video

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        want = {
            k: v.shape for k, v in getattr(video, arch)(weights=None).state_dict().items() if k not in CLASSIFIER[arch]
        }
    missing, unexpected = sorted(want.keys() - out.keys()), sorted(out.keys() - want.keys())
    wrong = sorted(k for k in want.keys() & out.keys() if tuple(out[k].shape) != tuple(want[k]))
    if missing or unexpected or wrong:
        what = (
            f"missing {missing[0]}"
            if missing
            else f"unexpected {unexpected[0]}"
            if unexpected
            else f"{wrong[0]} has shape {tuple(out[wrong[0]].shape)}, torchvision's {tuple(want[wrong[0]])}"
        )
        raise ExportError(
            f"the state_dict does not fit torchvision's {arch} ({what}; {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong)} of another shape): pass the backbone.pt "
            f"of a {arch} checkpoint"
        )
    return out


def export(checkpoint: str, out: str, fmt: str = "torchvision") -> dict:
    """Write the backbone of ``checkpoint`` (a URL as ``--checkpoint`` takes) to ``out`` in ``fmt``.

    Returns what was written: {"folder", "arch", "format", "tensors", "missing"} (missing:
    the torchvision model's keys the file leaves out).
    """
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    folder = resolve_checkpoint(checkpoint)
    meta = load_meta(folder)
    arch = meta["model"]["arch"]
    if fmt == "torchvision":
        check_torchvision_arch(arch)  # before reading the weights
    f, _ = load_backbone(folder, meta)  # refuses a backbone.pt that does not fit meta.json
    state = f.state_dict()  # backbone.pt's tensors, loaded into the backbone meta.json names
    if fmt == "torchvision":
        state = to_torchvision(state, arch)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    storage.write_bytes(out, buf.getvalue())
    storage.write_bytes(sidecar(out), json.dumps(preprocessing(meta, folder, fmt, out), indent=2).encode())
    return {
        "folder": folder,
        "arch": arch,
        "format": fmt,
        "tensors": len(state),
        "missing": list(CLASSIFIER[arch]) if fmt == "torchvision" else [],
    }


def sidecar(out: str) -> str:
    """Where the preprocessing record of the weights at ``out`` goes: FILE.json for FILE.pt."""
    return (out[: -len(".pt")] if out.endswith(".pt") else out) + ".json"


def preprocessing(meta: dict, folder: str, fmt: str, out: str) -> dict:
    """What a user of the exported weights must do to their clips, and how to load them."""
    from dclr_dist.config import config_from_dict

    views = config_from_dict(meta["config"], where=f"{folder}/meta.json").views
    arch, name = meta["model"]["arch"], out.rsplit("/", 1)[-1]
    load = (
        [
            "import torch, torchvision",
            f"net = torchvision.models.video.{arch}(num_classes=NUM_CLASSES)  # a new classifier head",
            f'missing, unexpected = net.load_state_dict(torch.load("{name}", weights_only=True), strict=False)',
            f"assert not unexpected and set(missing) == {set(CLASSIFIER[arch])}",
        ]
        if fmt == "torchvision"
        else [
            "import torch",
            "from dclr_dist.model import backbone",
            f'f, channels = backbone("{arch}", {meta["model"]["width"]})',
            f'f.load_state_dict(torch.load("{name}", weights_only=True))',
        ]
    )
    return {
        "arch": arch,
        "format": fmt,
        "checkpoint": folder,
        "epoch": meta.get("epoch"),
        "input": {
            "layout": "(batch, 3, frames, height, width), RGB",
            "frames": views.frames,
            "stride": views.stride,
            "size": [views.size, views.size],
            "value_range": "[0, 1] (uint8 / 255), then per channel (x - mean) / std",
            "mean": views.mean,
            "std": views.std,
        },
        "load": load,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dclr_dist.export",
        description="Export the pretrained backbone of a DCLR checkpoint as a state_dict for "
        "torchvision.models.video.<arch> (default) or as the trainer's plain backbone.pt. "
        "The file is tensors only: torch.load(path, weights_only=True).",
        epilog="formats:\n"
        "  torchvision  the keys of torchvision.models.video.<arch> (r2plus1d_18, r3d_18, mc3_18,\n"
        "               s3d) without its classifier (fc.*; classifier.* for s3d), which is not\n"
        "               pretrained. Load it into a network with your number of classes:\n"
        "                 net = torchvision.models.video.r2plus1d_18(num_classes=101)\n"
        "                 missing, unexpected = net.load_state_dict(\n"
        '                     torch.load("FILE.pt", weights_only=True), strict=False)\n'
        '                 assert not unexpected and set(missing) == {"fc.weight", "fc.bias"}\n'
        "               For pooled features: net.fc = nn.Identity() (s3d: net.features(x).mean((2, 3, 4))).\n"
        "  plain        backbone.pt as the trainer wrote it: a state_dict of\n"
        "               dclr_dist.model.backbone(arch, width); the only format for tiny.\n\n"
        "s3:// URLs use AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY / AWS_PROFILE.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, metavar="URL", help=CHECKPOINT_HELP)
    parser.add_argument(
        "--format", default="torchvision", choices=FORMATS, help="torchvision (default) or plain, see below"
    )
    parser.add_argument("--out", required=True, metavar="FILE.pt", help="where the state_dict goes; local or s3://")
    args = parser.parse_args(argv)
    try:
        done = export(args.checkpoint, args.out, args.format)
    except (ExportError, CheckpointError, storage.StorageError, FileNotFoundError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line
        return 1
    left_out = f", without {' and '.join(done['missing'])}" if done["missing"] else ""
    print(
        f"wrote {args.out}: {done['arch']} backbone of {done['folder']}, {done['format']} format, "
        f"{done['tensors']} tensors{left_out}; preprocessing and loading: {sidecar(args.out)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
