"""Shared inputs and float64 checks for the deployment-kernel tests (no Triton import here)."""

from __future__ import annotations

import torch

from pdquant_fast.ops.reference import pack_reference, unpack_reference

#: fp16 / bf16 unit roundoff (half an ulp at 1.0): the final rounding of the kernel's fp32 result.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
#: smallest fp16 / bf16 subnormal spacing: absolute rounding error near zero.
TINY = {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}


def wa16_inputs(m, n, k, bits, group, dtype=torch.float16, device="cpu", seed=0):
    """Random x, codes, packed weights, scale and zero point (scale/zero fp16 like a checkpoint)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    shape = (n,) if group == 0 else (n, -(-k // group))
    scale = (torch.rand(shape, generator=g) * 0.02 + 0.001).half()
    zero = torch.randint(0, 1 << bits, shape, generator=g).half()
    wp = pack_reference(codes, bits)
    return tuple(t.to(device) for t in (x, wp, scale, zero))


def wa16_float64(x, wp, scale, zero, bits, group):
    """``(y64, scale)``: the float64 result and, per element, ``sum_k |x| (|c| + |z|) |s|``.

    The kernels fold the zero point out of the sum (they accumulate ``x * c`` and ``x``
    separately, then apply ``s`` and ``s * z`` per group), so their fp32 error scales with that
    sum, not with ``sum |x| |w|`` (which is smaller when codes sit near the zero point)."""
    k = x.shape[1]
    c = unpack_reference(wp, bits, k).double()
    s, z = scale.double(), zero.double()
    if group:
        s = s.repeat_interleave(group, 1)[:, :k]
        z = z.repeat_interleave(group, 1)[:, :k]
    else:
        s, z = s[:, None], z[:, None]
    w = (c - z) * s
    xd = x.double()
    return xd @ w.t(), xd.abs() @ ((c.abs() + z.abs()) * s.abs()).t()


def wa16_budget(y64, absdot, k, dtype):
    """Allowed |y - y64|: the final rounding to ``dtype`` (u |y|, plus the subnormal spacing)
    plus fp32 summation error, bounded by (k + 2) * 2^-24 * sum |x| (|c| + |z|) |s| (the
    worst-case bound of a k-term fp32 sum in any order, plus the two roundings of the fold)."""
    return UNIT_ROUNDOFF[dtype] * y64.abs() + TINY[dtype] + (k + 2) * 2.0**-24 * absdot


def assert_wa16_close(y, x, wp, scale, zero, bits, group):
    assert y.dtype == x.dtype and y.shape == (x.shape[0], wp.shape[0])
    assert torch.isfinite(y).all()
    y64, absdot = wa16_float64(x.cpu(), wp.cpu(), scale.cpu(), zero.cpu(), bits, group)
    err = (y.cpu().double() - y64).abs()
    budget = wa16_budget(y64, absdot, x.shape[1], x.dtype)
    worst = (err / budget).max().item()
    assert worst <= 1.0, f"error {worst:.3f} x budget (max abs err {err.max().item():.3e})"


def q_inputs(m, n, k, w_dtype, a_bits, *, seed=0, device="cpu", act=1, res=True, out_bits=4):
    """Inputs of a qlinear call: codes below 2^a_bits, weight offsets in the 4-bit (int8) or
    8-bit (int16) range, scales that put y/out_scale across the output range (clamps on both
    ends and exact .5 ties for round-half-even)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 1 << a_bits, (m, k), generator=g, dtype=torch.uint8)
    x_zp = int(torch.randint(0, 1 << a_bits, (), generator=g))
    if w_dtype == torch.int8:
        w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    else:
        w = torch.randint(-255, 256, (n, k), generator=g, dtype=torch.int16)
    # scale 2^-e (exact products: y = acc * 2^-e is often a tie at the output step 1.0)
    scale = torch.pow(2.0, -torch.randint(2, 8, (n,), generator=g).float())
    bias = torch.randint(-8, 9, (n,), generator=g).float() * 0.5
    residual = torch.randn(m, n, generator=g) if res else None
    out_scale = 1.0 if out_bits else 0.0
    out_zp = (1 << out_bits) // 2 if out_bits else 0
    args = (x, x_zp, w, scale, bias, act, residual, out_scale, out_zp, out_bits)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
