"""Unit discovery, generic rest-of-network execution and quantizer placement."""

import pytest
import torch
from _torchvision import import_torchvision_models
from torch import nn

from pdquant_fast.graph import GraphError, UnitExecutor, build_unit_model
from pdquant_fast.models.cifar_resnet import CifarResNet
from pdquant_fast.qmodel import (
    QuantSettings,
    all_quant_layers,
    build_quant_model,
    set_quant_state,
    unit_act_quantizers,
)

TVM = import_torchvision_models()
needs_tv = pytest.mark.skipif(TVM is None, reason="torchvision is not installed")


def _randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("depth,expected", [(8, 5), (20, 11), (56, 29)])
def test_cifar_resnet_units(depth, expected):
    _, units = build_unit_model(CifarResNet(depth))
    kinds = [u.kind for u in units]
    assert len(units) == expected
    assert kinds[0] == "layer" and kinds[-1] == "layer"
    assert all(k == "residual" for k in kinds[1:-1])
    assert units[1].name == "layer1.0" and units[-1].name == "linear"


@needs_tv
@pytest.mark.parametrize(
    "name,expected,n_res",
    [("resnet18", 10, 8), ("resnet50", 18, 16), ("mobilenet_v2", 20, 10)],
)
def test_torchvision_units(name, expected, n_res):
    _, units = build_unit_model(getattr(TVM, name)())
    assert len(units) == expected  # spec §1.2: R18 10, R50 18, MBV2 20
    assert sum(u.kind == "residual" for u in units) == n_res
    if name == "mobilenet_v2":  # the 7 inverted residuals without a skip are chain units
        assert sum(u.kind == "chain" for u in units) == 7


def test_efficientnet_lite0_units():
    pytest.importorskip("efficientnet_lite_pytorch")
    from pdquant_fast.models.registry import build_model

    model, _ = build_model("efficientnet_lite0")
    _, units = build_unit_model(model)
    names = [u.name for u in units]
    assert len(units) == 19  # stem, 16 MBConv blocks, head conv, classifier
    assert names[0] == "_conv_stem" and names[-2:] == ["_conv_head", "_fc"]
    assert names[1:17] == [f"_blocks.{i}" for i in range(16)]
    assert sum(u.kind == "residual" for u in units) == 9


def _check_rest_of_network(model, x):
    top, units = build_unit_model(model)
    ex = UnitExecutor(top, tuple(x.shape[1:]))
    ref = model(x)
    assert torch.equal(top(x), ref)
    for k in range(len(units)):
        inp = ex.run_between(top, -1, x, k)
        out = top.get_submodule(f"unit_{k}")(inp)
        assert torch.allclose(ex.run_from(top, k, out), ref, rtol=1e-5, atol=1e-5), k


def test_rest_of_network_equals_logits_cifar():
    torch.manual_seed(0)
    _check_rest_of_network(_randomize_bn(CifarResNet(20)), torch.randn(3, 3, 32, 32))


def test_rest_of_network_equals_logits_efficientnet():
    pytest.importorskip("efficientnet_lite_pytorch")
    from pdquant_fast.models.registry import build_model

    model, _ = build_model("efficientnet_lite0")  # forward uses x.size(0) across all units
    torch.manual_seed(0)
    _check_rest_of_network(model, torch.randn(2, 3, 224, 224))


@needs_tv
def test_rest_of_network_equals_logits_mobilenet_v2():
    torch.manual_seed(0)
    _check_rest_of_network(_randomize_bn(TVM.mobilenet_v2()), torch.randn(2, 3, 96, 96))


def test_quant_model_placement_resnet20():
    top, units = build_unit_model(CifarResNet(20))
    q = build_quant_model(top, units, QuantSettings(2, 4))
    layers = all_quant_layers(q)
    assert layers[0].name == "conv1" and layers[0].wq.bits == 8  # first layer W8
    assert layers[-1].name == "linear" and layers[-1].wq.bits == 8  # last layer W8
    assert not layers[-1].has_out_quant  # logits are never quantized
    for ql in layers[1:-1]:
        assert ql.wq.bits == 2
        # conv2 feeds the residual add: not quantized (spec §1.1); conv1 is
        assert ql.has_out_quant == ql.name.endswith("conv1")
    acts = [a for i in range(len(units)) for a in unit_act_quantizers(q.get_submodule(f"unit_{i}"))]
    assert acts[0].name == "conv1.out" and acts[0].bits == 4  # stem output stays low-bit
    assert acts[-1].name == "layer3.2.out" and acts[-1].bits == 8  # classifier input 8 bit
    assert sum(a.bits == 8 for a in acts) == 1
    assert len(acts) == 1 + 9 * 2  # stem out + (conv1 out, block out) per block


def test_quant_model_overrides_visible():
    top, units = build_unit_model(CifarResNet(8))
    q = build_quant_model(top, units, QuantSettings(4, 4, None, None, None))
    assert {ql.wq.bits for ql in all_quant_layers(q)} == {4}


def test_folded_quant_model_matches_fp_when_quantization_off():
    torch.manual_seed(1)
    model = _randomize_bn(CifarResNet(20))
    top, units = build_unit_model(model)
    q = build_quant_model(top, units, QuantSettings(4, 4))
    set_quant_state(q, weight=False, act=False)
    x = torch.randn(4, 3, 32, 32)
    ref = model(x)
    assert torch.allclose(q(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # tensor-valued control flow: not traceable
            return self.conv(x)
        return self.conv(-x)


class _Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _DataDependent()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def test_untraceable_model_error_names_module():
    with pytest.raises(GraphError, match=r"module 'body'.*leaf"):
        build_unit_model(_Wrapper())


def test_model_without_quantizable_layers():
    with pytest.raises(GraphError, match="no quantizable layers"):
        build_unit_model(nn.Sequential(nn.ReLU(), nn.Flatten()))
