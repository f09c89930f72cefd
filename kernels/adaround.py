"""Triton AdaRound kernels: soft weight + regulariser, its backward, and the hard codes.

Signatures and math: :func:`pdquant_fast.ops.reference.adaround_soft_reference`,
:func:`~pdquant_fast.ops.reference.adaround_soft_backward_reference`,
:func:`~pdquant_fast.ops.reference.adaround_hard_reference` (AdaRound eq. 22-24, spec §7.2).

Layout: ``w_floor``/``alpha`` float32 ``[C_out, ...]`` contiguous, viewed as ``[C_out, inner]``;
``delta``/``zero_point`` ``[C_out]``. Grid ``(C_out, P)``; program ``(c, p)`` walks row ``c`` in
tiles ``p, p + P, ...``. Per element, with the reference's operation order (no FMA, IEEE
division, ``zeta - gamma`` and ``gamma`` rounded to float32 as torch does with Python scalars)::

    s = 1 / (1 + exp(-alpha))          u = s * 1.2 + (-0.1)          h = clamp(u, 0, 1)
    w_q = (clamp(w_floor + h + z, 0, n) - z) * d
    reg = sum(1 - |2h - 1| ** beta)    (float64 partials per program, fixed-order second stage)

Traffic: soft forward reads 8 bytes/element, writes 4; backward reads 12, writes 4; hard reads
8, writes 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    BLOCK,
    EXACT_LIBM,
    cdiv,
    clamp_nan,
    pow_exact,
    programs_per_channel,
    sigmoid_exact,
    sum_partials_kernel,
)


@triton.jit
def _rectified(alpha, EXACT: tl.constexpr):
    """``(s, u, h)``: sigmoid, stretched value, and ``h = clamp(u, 0, 1)`` (AdaRound eq. 23)."""
    s = sigmoid_exact(alpha, EXACT)
    u = s * 1.2000000000000002 + -0.1
    return s, u, clamp_nan(u, 0.0, 1.0)


@triton.jit
def _adaround_soft_kernel(
    wf_ptr,
    alpha_ptr,
    delta_ptr,
    zp_ptr,
    beta_ptr,
    wq_ptr,
    part_ptr,
    inner,
    n_f,
    I64: tl.constexpr,
    EXACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    p = tl.program_id(1)
    num_p = tl.num_programs(1)
    d = tl.load(delta_ptr + c)
    z = tl.load(zp_ptr + c)
    beta = tl.load(beta_ptr)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for tile in range(p, tl.cdiv(inner, BLOCK), num_p):
        if I64:
            j = (tl.full((), 0, tl.int64) + tile) * BLOCK + tl.arange(0, BLOCK)
            flat = c.to(tl.int64) * inner + j
        else:
            j = tile * BLOCK + tl.arange(0, BLOCK)
            flat = c * inner + j
        valid = j < inner
        wf = tl.load(wf_ptr + flat, mask=valid, other=0.0)
        a = tl.load(alpha_ptr + flat, mask=valid, other=0.0)
        _, _, h = _rectified(a, EXACT)
        wq = (clamp_nan(wf + h + z, 0.0, n_f) - z) * d
        tl.store(wq_ptr + flat, wq, mask=valid)
        reg = 1.0 - pow_exact(tl.abs(2.0 * h - 1.0), beta, EXACT)
        acc += tl.where(valid, reg.to(tl.float64), 0.0)
    tl.store(part_ptr + c * num_p + p, tl.sum(acc, axis=0))


@triton.jit
def _adaround_soft_backward_kernel(
    gwq_ptr,
    greg_ptr,
    wf_ptr,
    alpha_ptr,
    delta_ptr,
    zp_ptr,
    beta_ptr,
    out_ptr,
    inner,
    n_f,
    I64: tl.constexpr,
    EXACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    p = tl.program_id(1)
    num_p = tl.num_programs(1)
    d = tl.load(delta_ptr + c)
    z = tl.load(zp_ptr + c)
    beta = tl.load(beta_ptr)
    reg_scale = -tl.load(greg_ptr) * beta  # the reference's (-grad_reg) * beta, a 0-d product
    for tile in range(p, tl.cdiv(inner, BLOCK), num_p):
        if I64:
            j = (tl.full((), 0, tl.int64) + tile) * BLOCK + tl.arange(0, BLOCK)
            flat = c.to(tl.int64) * inner + j
        else:
            j = tile * BLOCK + tl.arange(0, BLOCK)
            flat = c * inner + j
        valid = j < inner
        wf = tl.load(wf_ptr + flat, mask=valid, other=0.0)
        a = tl.load(alpha_ptr + flat, mask=valid, other=0.0)
        gwq = tl.load(gwq_ptr + flat, mask=valid, other=0.0)
        s, u, h = _rectified(a, EXACT)
        dh = tl.where((u >= 0.0) & (u <= 1.0), (1.2000000000000002 * s) * (1.0 - s), 0.0)
        k = wf + h + z
        inside = (k >= 0.0) & (k <= n_f)
        g_q = tl.where(inside, gwq * d, 0.0) * dh
        v = 2.0 * h - 1.0
        sign = tl.where(v > 0.0, 1.0, tl.where(v < 0.0, -1.0, 0.0))
        g_r = reg_scale * pow_exact(tl.abs(v), beta - 1.0, EXACT) * sign * 2.0 * dh
        tl.store(out_ptr + flat, g_q + g_r, mask=valid)


@triton.jit
def _adaround_hard_kernel(
    wf_ptr, alpha_ptr, zp_ptr, out_ptr, inner, n_f, I64: tl.constexpr, BLOCK: tl.constexpr
):
    c = tl.program_id(0)
    p = tl.program_id(1)
    num_p = tl.num_programs(1)
    z = tl.load(zp_ptr + c)
    for tile in range(p, tl.cdiv(inner, BLOCK), num_p):
        if I64:
            j = (tl.full((), 0, tl.int64) + tile) * BLOCK + tl.arange(0, BLOCK)
            flat = c.to(tl.int64) * inner + j
        else:
            j = tile * BLOCK + tl.arange(0, BLOCK)
            flat = c * inner + j
        valid = j < inner
        wf = tl.load(wf_ptr + flat, mask=valid, other=0.0)
        a = tl.load(alpha_ptr + flat, mask=valid, other=0.0)
        up = tl.where(a >= 0.0, 1.0, 0.0)
        codes = clamp_nan(wf + up + z, 0.0, n_f)
        tl.store(out_ptr + flat, codes.to(tl.uint8), mask=valid)


def _grid(w_floor: torch.Tensor, reduce: bool) -> tuple[int, int, int, bool]:
    """``(C, P, inner, int64 indexing)`` for a ``[C_out, ...]`` weight."""
    c = w_floor.shape[0]
    inner = w_floor.numel() // c if c else 0
    tiles = cdiv(inner, BLOCK)
    num_p = programs_per_channel(c, tiles) if reduce else max(1, min(tiles, 65535))
    return c, num_p, inner, _common.needs_int64(w_floor.numel())


def adaround_soft_triton(
    w_floor: torch.Tensor,
    alpha: torch.Tensor,
    delta: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    beta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_q [C_out, ...] float32, reg [] float32)`` in one pass over the weight."""
    w_q = torch.empty_like(w_floor)
    if w_floor.numel() == 0:
        return w_q, w_floor.new_zeros(())
    c, num_p, inner, i64 = _grid(w_floor, reduce=True)
    part = torch.empty(c * num_p, dtype=torch.float64, device=w_floor.device)
    _adaround_soft_kernel[(c, num_p)](
        w_floor,
        alpha,
        delta,
        zero_point,
        beta,
        w_q,
        part,
        inner,
        float(2**bits - 1),
        I64=i64,
        EXACT=EXACT_LIBM,
        BLOCK=BLOCK,
        enable_fp_fusion=False,
        **_common.LIBM_OPTIONS,
    )
    reg = torch.empty(1, dtype=torch.float32, device=w_floor.device)
    total = c * num_p
    sum_partials_kernel[(1,)](part, reg, total, BLOCK_P=min(1024, triton.next_power_of_2(total)))
    return w_q, reg.reshape(())


def adaround_soft_backward_triton(
    grad_wq: torch.Tensor,
    grad_reg: torch.Tensor,
    w_floor: torch.Tensor,
    alpha: torch.Tensor,
    delta: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    beta: torch.Tensor,
) -> torch.Tensor:
    """``grad_alpha`` ``[C_out, ...]`` float32 (elementwise; no reduction)."""
    out = torch.empty_like(alpha)
    if w_floor.numel() == 0:
        return out
    c, num_p, inner, i64 = _grid(w_floor, reduce=False)
    _adaround_soft_backward_kernel[(c, num_p)](
        grad_wq,
        grad_reg,
        w_floor,
        alpha,
        delta,
        zero_point,
        beta,
        out,
        inner,
        float(2**bits - 1),
        I64=i64,
        EXACT=EXACT_LIBM,
        BLOCK=BLOCK,
        enable_fp_fusion=False,
        **_common.LIBM_OPTIONS,
    )
    return out


def adaround_hard_triton(
    w_floor: torch.Tensor, alpha: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """Integer codes ``clamp(w_floor + [alpha >= 0] + z, 0, n)``, uint8 ``[C_out, ...]``."""
    out = torch.empty_like(w_floor, dtype=torch.uint8)
    if w_floor.numel() == 0:
        return out
    c, num_p, inner, i64 = _grid(w_floor, reduce=False)
    _adaround_hard_kernel[(c, num_p)](
        w_floor,
        alpha,
        zero_point,
        out,
        inner,
        float(2**bits - 1),
        I64=i64,
        BLOCK=BLOCK,
        enable_fp_fusion=False,
    )
    return out
