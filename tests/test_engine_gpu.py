"""The PD-Quant engine on a CUDA device (issue 3): a whole calibration runs there, with the
default (fused GPU) kernels, and reaches the accuracy the CPU run reaches. Skips without a GPU
or without the shared data (``$PDQUANT_SHARED_DATA`` points the GPU check at a carried copy)."""

from __future__ import annotations

import pytest
import torch

from pdquant_fast.config import make_config
from pdquant_fast.engine import Calibrator, evaluate
from pdquant_fast.models.registry import build_model

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "cuda-graph"])
def test_pdquant_w2a4_resnet20_on_cuda_reaches_the_cpu_accuracy_floor(shared_data, cuda_graph):
    """The configuration of test_engine's accuracy-floor test (W2A4, 256 real calibration
    images, 10 iterations/unit, 2 DC steps, seed 1005; top-1 on 1,000 lossless test images),
    calibrated on the GPU: the same floors (PD-Quant >= 26%, >= RTN + 10 points). The CPU run
    gave 30.6% (RTN 15.8%); the GPU's numerics differ, so the floor, not the number, is shared.
    ``cuda-graph``: each unit's step captured in a CUDA graph and replayed (``cuda_graph=True``;
    its loop, run eagerly on the CPU, gave 30.7%)."""
    from pdquant_fast.data import open_image_source

    folder = shared_data / "cifar10/convnetjs_png"
    train = open_image_source(folder, "cifar", split="train")
    test = open_image_source(folder, "cifar", split="test")
    dev = torch.device("cuda")
    xc = torch.stack([train[i][0] for i in range(256)]).to(dev)
    xt = torch.stack([test[i][0] for i in range(1000)]).to(dev)
    yt = torch.tensor([test[i][1] for i in range(1000)]).to(dev)
    w = shared_data / "cifar10/models/akamaster_resnet/resnet20-12fca82f.th"
    model, _ = build_model("cifar_resnet20", w)
    model = model.to(dev)
    cfg = make_config(
        "pdquant", preset="resnet", w_bits=2, a_bits=4, iters=10, dc_iters=2, cuda_graph=cuda_graph
    )
    q, rep = Calibrator(model, xc, cfg, log=None, progress=False).run()
    acc = evaluate(q, xt, yt)["top1"]
    rtn_cfg = make_config("rtn", preset="resnet", w_bits=2, a_bits=4)
    q_rtn, _ = Calibrator(model, xc, rtn_cfg, log=None, progress=False).run()
    rtn = evaluate(q_rtn, xt, yt)["top1"]
    print(f"cuda W2A4 ResNet-20 (cuda_graph={cuda_graph}): PD-Quant {acc:.1f}%, RTN {rtn:.1f}%")
    assert acc >= 26.0, acc
    assert acc >= rtn + 10.0, (acc, rtn)
    assert all(u.dc_bn_loss_after <= u.dc_bn_loss_before for u in rep.units[:-1])
