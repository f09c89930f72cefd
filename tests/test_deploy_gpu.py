"""Triton deployment kernels compiled on a CUDA GPU vs the references (marked ``gpu``).

Skips cleanly without a GPU or under ``TRITON_INTERPRET=1`` (then ``test_deploy_triton.py``
covers the same kernels on the CPU). Shapes here are real layer sizes (Llama-style linears,
ViT-B MLP, ResNet-18 and EfficientNet-Lite0 convs) at small batch, so the compiled tensor-core
paths (fp16/bf16 ``tl.dot``, int8 ``tl.dot``) and the tuned configurations are the ones checked.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1: compiled kernels not available", allow_module_level=True)
pytest.importorskip("triton")

from _deploy_cases import assert_wa16_close, q_inputs, wa16_inputs  # noqa: E402

from pdquant_fast.kernels import deploy_conv as dc  # noqa: E402
from pdquant_fast.kernels import deploy_linear as dl  # noqa: E402
from pdquant_fast.ops import backends  # noqa: E402
from pdquant_fast.ops.reference import (  # noqa: E402
    linear_wa16_reference,
    qconv2d_reference,
    qlinear_reference,
)

CUDA = "cuda"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "m,n,k,bits,group",
    [
        (1, 4096, 4096, 4, 128),
        (4, 4096, 4096, 2, 128),
        (16, 4096, 4096, 4, 0),
        (3, 1000, 4100, 2, 64),  # ragged N and K, partial group
        (9, 777, 1024, 4, 32),
    ],
)
def test_linear_wa16_gpu_default_path(m, n, k, bits, group, dtype):
    x, wp, scale, zero = wa16_inputs(m, n, k, bits, group, dtype=dtype, device=CUDA, seed=k + m)
    y = dl.linear_wa16_triton(x, wp, scale, zero, bits, group)
    assert_wa16_close(y, x, wp, scale, zero, bits, group)
    assert_wa16_close(
        linear_wa16_reference(x, wp, scale, zero, bits, group), x, wp, scale, zero, bits, group
    )


@pytest.mark.parametrize("bits,group", [(4, 128), (2, 128), (4, 0), (2, 32)])
def test_linear_wa16_gpu_every_candidate(bits, group):
    n, k = 2048, 2048
    x, wp, scale, zero = wa16_inputs(16, n, k, bits, group, device=CUDA, seed=bits + group)
    for m in (1, 4, 16):
        p = dl._WA16Problem(m, n, k, bits, group)
        xm = x[:m].contiguous()
        for cfg in dict.fromkeys(dl.wa16_candidates(p, (32, 8), x.device)):
            y = dl.linear_wa16_triton(xm, wp, scale, zero, bits, group, config=cfg)
            assert_wa16_close(y, xm, wp, scale, zero, bits, group)
    pk = dl.linear_wa16_prepack(wp, bits, k)
    assert_wa16_close(
        dl.linear_wa16_triton(x, pk, scale, zero, bits, group), x, wp, scale, zero, bits, group
    )


def test_linear_wa16_op_on_gpu_uses_triton():
    x, wp, scale, zero = wa16_inputs(2, 256, 512, 4, 128, device=CUDA)
    name, _ = backends.choose("linear_wa16", "cuda", 4)
    assert name in ("triton", "cuda")
    y = torch.ops.pdquant.linear_wa16(x, wp, scale, zero, 4, 128)
    assert_wa16_close(y, x, wp, scale, zero, 4, 128)


@pytest.mark.parametrize(
    "m,n,k,wdt,a_bits,out_bits,act,res",
    [
        (1000, 3072, 768, torch.int8, 4, 4, 1, False),  # ViT-B fc1, W4A4, int8-view path
        (1000, 768, 3072, torch.int8, 8, 8, 0, True),  # ViT-B fc2 + residual, W4A8, xor path
        (333, 1000, 512, torch.int16, 8, 0, 0, False),  # 8-bit classifier, float logits
        (77, 130, 100, torch.int8, 2, 2, 2, True),  # ragged everything, W2A2
    ],
)
def test_qlinear_gpu_bit_exact(m, n, k, wdt, a_bits, out_bits, act, res):
    args = q_inputs(
        m, n, k, wdt, a_bits, seed=m + k, device=CUDA, act=act, res=res, out_bits=out_bits
    )
    ref = qlinear_reference(*args)
    for a in (8, a_bits):
        pk = dl.qlinear_prepack_triton(args[2], a_bits=a)
        y = dl.qlinear_triton(args[0], args[1], pk, *args[3:])
        assert torch.equal(y, ref), (a, (y.float() - ref.float()).abs().max().item())


def _conv(nb, c, h, w_, o, k, s, p, g, wdt, a_bits, out_bits, act, res, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 1 << a_bits, (nb, c, h, w_), generator=gen, dtype=torch.uint8)
    x_zp = int(torch.randint(0, 1 << a_bits, (), generator=gen))
    shape = (o, c // g, k, k)
    lim = 8 if wdt == torch.int8 else 256
    w = torch.randint(-lim + (wdt == torch.int16), lim, shape, generator=gen).to(wdt)
    scale = torch.pow(2.0, -torch.randint(4, 10, (o,), generator=gen).float())
    bias = torch.randint(-8, 9, (o,), generator=gen).float() * 0.5
    ho, wo = (h + 2 * p - k) // s + 1, (w_ + 2 * p - k) // s + 1
    r = torch.randn(nb, o, ho, wo, generator=gen) if res else None
    args = (x, x_zp, w, scale, bias, [s, s], [p, p], g, act, r)
    tail = (1.0 if out_bits else 0.0, (1 << out_bits) // 2 if out_bits else 0, out_bits)
    return tuple(a.to(CUDA) if isinstance(a, torch.Tensor) else a for a in args) + tail


@pytest.mark.parametrize(
    "case",
    [
        (2, 64, 56, 56, 64, 3, 1, 1, 1, torch.int8, 4, 4, 1, True),  # ResNet-18 layer1
        (2, 128, 28, 28, 256, 3, 2, 1, 1, torch.int8, 8, 8, 1, False),  # layer3 downsample 3x3
        (2, 128, 28, 28, 256, 1, 2, 0, 1, torch.int8, 4, 0, 0, False),  # 1x1 shortcut
        (2, 3, 224, 224, 64, 7, 2, 3, 1, torch.int16, 8, 4, 1, False),  # 8-bit stem
        (2, 144, 28, 28, 144, 3, 1, 1, 144, torch.int8, 4, 4, 2, False),  # EffNet dw 3x3
        (2, 240, 14, 14, 240, 5, 2, 2, 240, torch.int8, 4, 4, 2, False),  # EffNet dw 5x5 s2
    ],
    ids=["r18-l1", "r18-l3-s2", "r18-1x1", "stem", "dw3", "dw5s2"],
)
def test_qconv2d_gpu_bit_exact(case):
    args = _conv(*case, seed=sum(case[:8]))
    ref = qconv2d_reference(*args)
    a_bits = case[10]
    for cl, a in ((False, 8), (True, a_bits)):
        x = args[0].contiguous(memory_format=torch.channels_last) if cl else args[0]
        pk = dc.qconv2d_prepack_triton(args[2], args[7], a_bits=a)
        y = dc.qconv2d_triton(x, args[1], pk, *args[3:])
        assert torch.equal(y, ref), (cl, a, (y.float() - ref.float()).abs().max().item())


def test_cuda_tensor_division_is_ieee():
    """The reference divides by a 0-d CUDA tensor, which is IEEE division on CUDA (torch's
    ``y / python_float`` multiplies by a reciprocal there; the kernels use ``div_rn``)."""
    y = torch.randn(1 << 20, device=CUDA) * 100
    s = 0.0371
    true = y / torch.tensor(s, device=CUDA)
    assert torch.equal(true, (y.double() / torch.tensor(s).double()).float())
    print("y / python float differs from IEEE in", int((y / s != true).sum()), "of", y.numel())
