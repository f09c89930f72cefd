"""The PD-Quant engine on a CUDA device (issue 3): a whole calibration runs there, with the
default (fused GPU) kernels, and reaches the accuracy the CPU run reaches. Skips without a GPU
or without the shared data (``$PDQUANT_SHARED_DATA`` points the GPU check at a carried copy)."""

from __future__ import annotations

import pytest
import torch
from _accuracy_floor import check_accuracy_floor, load_floor_data

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "cuda-graph"])
def test_pdquant_w2a4_resnet20_on_cuda_reaches_the_cpu_accuracy_floor(shared_data, cuda_graph):
    """The accuracy-floor configuration of tests/_accuracy_floor.py (W2A4, 256 real calibration
    images, 10 iterations/unit, 2 DC steps, seed 1005; top-1 on 1,000 lossless test images),
    calibrated on the GPU: the CPU's floors (PD-Quant >= 26%, >= RTN + 10 points; the CPU run
    gives 28.4%, RTN 15.8%). ``cuda-graph``: each unit's step captured in a CUDA graph and
    replayed (``cuda_graph=True``; its loop, run eagerly on the CPU, gives 30.7%)."""
    model, xc, xt, yt = load_floor_data(shared_data, "cuda")
    check_accuracy_floor(
        model, xc, xt, yt, cuda_graph=cuda_graph, label=f"cuda (cuda_graph={cuda_graph})"
    )
