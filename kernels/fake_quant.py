"""Triton fake-quant with QDrop, forward and backward (``pdquant::fake_quant_act[_backward]``).

Signatures and math are those of
:func:`pdquant_fast.ops.reference.fake_quant_act_reference` /
:func:`~pdquant_fast.ops.reference.fake_quant_act_backward_reference`; validation happens in
:mod:`pdquant_fast.ops.library` before these are called.

Layout: ``x`` (float32, contiguous) is viewed as ``[outer, C, inner]`` around the channel axis
(per tensor: ``outer = C = 1``, ``inner = numel``)::

    flat index = (o * C + c) * inner + i        o < outer, c < C, i < inner

The grid is ``(C, P)``: program ``(c, p)`` walks channel ``c``'s ``outer * inner`` elements in
tiles of :data:`~._common.BLOCK`, tiles ``p, p + P, p + 2P, ...`` (grid-stride), so ``delta[c]``
and ``zero_point[c]`` are two scalar loads per program. Per element (rounding: half to even)::

    t = x / d  (IEEE)     r = round(t)     k = r + z     y = (clamp(k, 0, n) - z) * d
    QDrop: y = keep ? y : x,  keep = mask[flat]  or  lowbias32(uint32(flat) ^ key) < thresh

Backward, in the same pass: ``grad_x`` per element, and ``grad_delta`` as a deterministic two-stage
reduction: each program sums ``float64(g) * float64(term)`` (exact products) in float64 lanes, then
a tree, into ``partials[c, p]``; a second kernel sums the ``P`` partials of each channel in a fixed
order and rounds once to float32. No atomics: the result is bit-reproducible run to run, and ``P``
depends on the shape only, so it is the same on every GPU.

Traffic: forward reads ``4 N`` bytes (+ ``N`` with a mask), writes ``4 N``; backward reads ``8 N``
(+ ``N``), writes ``4 N`` + ``8 C P`` partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    BLOCK,
    cdiv,
    clamp_nan,
    programs_per_channel,
    qdrop_keep,
    qdrop_key,
    rint_even,
    sum_partials_kernel,
)

#: Element layout of one channel's elements, picked on the host (no division where avoidable).
LAYOUT_CONTIG = 0  # outer == 1: flat = c * inner + j (also per tensor)
LAYOUT_LAST = 1  # inner == 1 (channel is the last axis): flat = j * C + c
LAYOUT_GENERAL = 2  # o = j // inner: flat = (o * C + c) * inner + j % inner

DROP_NONE, DROP_SEED, DROP_MASK = 0, 1, 2


# C, inner and thresh are not specialised (Triton would compile a variant for each value that is
# 1 or a multiple of 16); per_channel stays specialised: it sets the alignment of channel starts.
@triton.jit(do_not_specialize=["C", "inner", "thresh"])
def _fake_quant_kernel(
    x_ptr,
    g_ptr,
    out_ptr,
    delta_ptr,
    zp_ptr,
    mask_ptr,
    seed_ptr,
    part_ptr,
    C,
    inner,
    per_channel,
    n_f,
    thresh,
    DROP: tl.constexpr,
    BACKWARD: tl.constexpr,
    LAYOUT: tl.constexpr,
    I64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Forward (``out = y``) or backward (``out = grad_x``, ``part[c, p]`` = float64 partial)."""
    c = tl.program_id(0)
    p = tl.program_id(1)
    num_p = tl.num_programs(1)
    d = tl.load(delta_ptr + c)
    z = tl.load(zp_ptr + c)
    if I64:
        c = c.to(tl.int64)
    key = 0
    if DROP == 1:
        key = qdrop_key(seed_ptr)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    tiles = tl.cdiv(per_channel, BLOCK)
    for tile in range(p, tiles, num_p):
        if I64:
            j = (tl.full((), 0, tl.int64) + tile) * BLOCK + tl.arange(0, BLOCK)
        else:
            j = tile * BLOCK + tl.arange(0, BLOCK)
        valid = j < per_channel
        if LAYOUT == 0:
            flat = c * per_channel + j
        elif LAYOUT == 1:
            flat = j * C + c
        else:
            o = j // inner
            flat = (o * C + c) * inner + (j - o * inner)
        x = tl.load(x_ptr + flat, mask=valid, other=0.0)
        t = tl.math.div_rn(x, d)
        r = rint_even(t)
        k = r + z
        if DROP == 1:
            keep = qdrop_keep(flat, key, thresh)
        elif DROP == 2:
            keep = tl.load(mask_ptr + flat, mask=valid, other=0) != 0
        if BACKWARD:
            g = tl.load(g_ptr + flat, mask=valid, other=0.0)
            inside = (k >= 0.0) & (k <= n_f)
            term = tl.where(inside, r - t, tl.where(k < 0.0, -z, n_f - z))
            gx = tl.where(inside, g, 0.0)
            if DROP != 0:
                gx = tl.where(keep, gx, g)
                term = tl.where(keep, term, 0.0)
            tl.store(out_ptr + flat, gx, mask=valid)
            acc += tl.where(valid, g.to(tl.float64) * term.to(tl.float64), 0.0)
        else:
            y = (clamp_nan(k, 0.0, n_f) - z) * d
            if DROP != 0:
                y = tl.where(keep, y, x)
            tl.store(out_ptr + flat, y, mask=valid)
    if BACKWARD:
        tl.store(part_ptr + c * num_p + p, tl.sum(acc, axis=0))


def _layout(x: torch.Tensor, delta: torch.Tensor, axis: int) -> tuple[int, int, int]:
    """``(outer, C, inner)`` of ``x`` around the channel axis (per tensor: ``(1, 1, numel)``)."""
    if delta.dim() == 0:
        return 1, 1, x.numel()
    ax = axis % x.dim()
    outer = 1
    for s in x.shape[:ax]:
        outer *= s
    inner = 1
    for s in x.shape[ax + 1 :]:
        inner *= s
    return outer, x.shape[ax], inner


def _launch(grad, x, delta, zero_point, bits, axis, keep_prob, seed, mask, backward):
    from pdquant_fast.ops.reference import keep_threshold

    outer, c, inner = _layout(x, delta, axis)
    per_channel = outer * inner
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out, torch.zeros_like(delta)
    if mask is not None:
        drop, thresh = DROP_MASK, 0
    elif seed is not None and keep_prob < 1.0:
        drop, thresh = DROP_SEED, keep_threshold(keep_prob)
    else:
        drop, thresh = DROP_NONE, 0
    layout = LAYOUT_CONTIG if outer == 1 else (LAYOUT_LAST if inner == 1 else LAYOUT_GENERAL)
    tiles = cdiv(per_channel, BLOCK)
    num_p = programs_per_channel(c, tiles) if backward else max(1, min(tiles, 65535))
    part = torch.empty(c * num_p if backward else 1, dtype=torch.float64, device=x.device)
    _fake_quant_kernel[(c, num_p)](
        x,
        grad if backward else x,
        out,
        delta,
        zero_point,
        mask.view(torch.uint8) if mask is not None else x,
        seed if seed is not None else x,
        part,
        c,
        inner,
        per_channel,
        float(2**bits - 1),
        thresh,
        DROP=drop,
        BACKWARD=backward,
        LAYOUT=layout,
        I64=_common.needs_int64(x.numel()),
        BLOCK=BLOCK,
        enable_fp_fusion=False,
    )
    if not backward:
        return out, None
    grad_delta = torch.empty(c, dtype=torch.float32, device=x.device)
    sum_partials_kernel[(c,)](
        part, grad_delta, num_p, BLOCK_P=min(1024, triton.next_power_of_2(num_p))
    )
    return out, grad_delta.reshape(delta.shape)


def fake_quant_act_triton(
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    axis: int,
    keep_prob: float,
    seed: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Fake-quant with QDrop (see the module docstring); ``x``'s shape, float32."""
    return _launch(None, x, delta, zero_point, bits, axis, keep_prob, seed, mask, False)[0]


def fake_quant_act_backward_triton(
    grad: torch.Tensor,
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    axis: int,
    keep_prob: float,
    seed: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_delta)``: ``grad_x`` like ``x``; ``grad_delta`` like ``delta``."""
    return _launch(grad, x, delta, zero_point, bits, axis, keep_prob, seed, mask, True)
