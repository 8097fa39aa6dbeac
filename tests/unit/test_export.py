"""``python -m dclr_dist.export``: a DCLR backbone as torchvision.models.video weights."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import video

from dclr_dist.checkpoint import checkpoint_meta
from dclr_dist.config import Config
from dclr_dist.export import CLASSIFIER, ExportError, main, to_torchvision
from dclr_dist.model import backbone, gap

REPO = Path(__file__).resolve().parents[2]

# Every torchvision arch the project trains, with a clip that leaves a feature map of more than one position.
INPUTS = {
    "r2plus1d_18": (1, 3, 8, 32, 32),
    "r3d_18": (1, 3, 8, 32, 32),
    "mc3_18": (1, 3, 8, 32, 32),
    "s3d": (1, 3, 16, 64, 64),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny forwards: intra-op threads only cost (seconds, not milliseconds, on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_torchvision_arch_is_covered():
    from dclr_dist.model import ARCHS

    assert set(INPUTS) == set(CLASSIFIER) == set(ARCHS) - {"tiny"}


@torch.no_grad()
def _randomised(arch: str, width: int = 64, seed: int = 0) -> nn.Module:
    """The project's backbone with every BN statistic, BN affine and conv weight moved off its init."""
    g = torch.Generator().manual_seed(seed)
    f, _ = backbone(arch, width)
    for m in f.modules():
        if isinstance(m, nn.BatchNorm3d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.mul_(1 + 0.1 * torch.randn(n, generator=g))
            m.bias.copy_(0.1 * torch.randn(n, generator=g))
            m.num_batches_tracked.fill_(7)
        elif isinstance(m, nn.Conv3d):
            m.weight.mul_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
    return f.eval()


_CACHE: dict[str, nn.Module] = {}


def _backbone(arch: str) -> nn.Module:
    if arch not in _CACHE:
        _CACHE[arch] = _randomised(arch)
    return _CACHE[arch]


def _checkpoint(folder: Path, f: nn.Module, arch: str, width: int = 64) -> Path:
    """A checkpoint folder as the trainer writes it: backbone.pt + meta.json (checkpoint.checkpoint_meta)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(f.state_dict(), folder / "backbone.pt")
    cfg = Config()
    cfg.model.arch, cfg.model.width = arch, width
    (folder / "meta.json").write_text(json.dumps(checkpoint_meta(cfg, 1, 0)))
    return folder


def _tv_features(net: nn.Module, arch: str, x: torch.Tensor) -> torch.Tensor:
    """Globally average-pooled features of a torchvision video model: (B, C)."""
    if arch == "s3d":
        # S3D.forward pools with AvgPool3d((2, 7, 7), stride 1) before a conv classifier: not
        # global pooling at this clip size (it would fail), so pool its features ourselves.
        return net.features(x).mean((2, 3, 4))
    fc, net.fc = net.fc, nn.Identity()  # forward: stem, layer1-4, AdaptiveAvgPool3d(1), flatten
    try:
        return net(x)
    finally:
        net.fc = fc


def _load_and_compare(state: dict, arch: str, f: nn.Module) -> None:
    """state loads into torchvision's arch with only the classifier missing and gives f's GAP features."""
    assert all(type(v) is torch.Tensor for v in state.values())
    net = getattr(video, arch)(num_classes=10).eval()
    x = torch.randn(INPUTS[arch], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = gap(f(x))
        fresh = _tv_features(net, arch, x)
        missing, unexpected = net.load_state_dict(state, strict=False)
        assert unexpected == []
        assert sorted(missing) == sorted(CLASSIFIER[arch])
        got = _tv_features(net, arch, x)
    # the comparison can tell weights apart: torchvision's own initialisation gives other features
    assert not torch.allclose(fresh, want, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", list(INPUTS))
def test_to_torchvision_loads_and_gives_the_backbones_features(arch):
    f = _backbone(arch)
    state = to_torchvision(f.state_dict(), arch)
    assert len(state) == len(f.state_dict())
    _load_and_compare(state, arch, f)


def test_cli_exports_a_run_for_torchvision(tmp_path, monkeypatch):
    arch = "mc3_18"
    f = _backbone(arch)
    run = tmp_path / "run"
    _checkpoint(run / "best", f, arch)  # the run folder: resolve_checkpoint finds best/
    out = tmp_path / "export" / "mc3_18_dclr.pt"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "dclr_dist.export",
            "--checkpoint",
            str(run),
            "--format",
            "torchvision",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert "fc.weight and fc.bias" in p.stdout and "mc3_18_dclr.json" in p.stdout
    _load_and_compare(torch.load(out, weights_only=True), arch, f)

    # The sidecar: the clips the weights expect, and loading lines that run as written.
    side = json.loads((out.parent / "mc3_18_dclr.json").read_text())
    views = Config().views
    assert side["arch"] == arch and side["checkpoint"].endswith("best")
    assert side["input"] == {
        "layout": "(batch, 3, frames, height, width), RGB",
        "frames": views.frames,
        "stride": views.stride,
        "size": [views.size, views.size],
        "value_range": "[0, 1] (uint8 / 255), then per channel (x - mean) / std",
        "mean": views.mean,
        "std": views.std,
    }
    scope = {"NUM_CLASSES": 7}
    monkeypatch.chdir(out.parent)
    exec("\n".join(side["load"]), scope)
    assert scope["net"].fc.out_features == 7


def test_plain_format_is_backbone_pt(tmp_path, capsys):
    arch = "r3d_18"
    f = _backbone(arch)
    folder = _checkpoint(tmp_path / "checkpoint_000001", f, arch)
    out = tmp_path / "plain.pt"
    assert main(["--checkpoint", str(folder), "--format", "plain", "--out", str(out)]) == 0
    got, want = torch.load(out, weights_only=True), torch.load(folder / "backbone.pt", weights_only=True)
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_tiny_has_no_torchvision_format(tmp_path, capsys):
    tiny, _ = backbone("tiny", 8)
    folder = _checkpoint(tmp_path / "tiny", tiny, "tiny", 8)
    out = tmp_path / "tiny.pt"
    assert main(["--checkpoint", str(folder), "--format", "torchvision", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "tiny" in err and "--format plain" in err
    assert not out.exists()
    # plain works for tiny
    assert main(["--checkpoint", str(folder), "--format", "plain", "--out", str(out)]) == 0
    assert out.exists()
    with pytest.raises(ExportError, match="tiny backbone has no torchvision equivalent"):
        to_torchvision(tiny.state_dict(), "tiny")


def test_a_state_dict_of_another_backbone_is_refused():
    r3d = _backbone("r3d_18").state_dict()
    # same keys as mc3_18's, other kernel shapes (mc3 has 1x3x3 convolutions in layers 2-4)
    with pytest.raises(ExportError, match="does not fit torchvision's mc3_18 .*shape"):
        to_torchvision(r3d, "mc3_18")
    with pytest.raises(ExportError, match="does not fit torchvision's r2plus1d_18"):
        to_torchvision(r3d, "r2plus1d_18")
    with pytest.raises(ExportError, match="not one of the r3d_18 backbone's"):
        to_torchvision({"fc.weight": torch.zeros(1)}, "r3d_18")


def test_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no backbone.pt here or in best/" in err


def test_help_explains_loading(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "strict=False" in text and "weights_only=True" in text and "--format" in text
