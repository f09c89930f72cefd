"""Triton kernels for the ``pdquant::qconv2d`` contract (packed low-bit conv, GPU).

``acc[n, o, p] = sum over the receptive field of (x - x_zp) * w`` exactly in int32 (padding is
the code ``x_zp``), then the fused requantisation of
:func:`pdquant_fast.ops.reference.requant_reference` (bit-exact). Two kernels:

* ``_qconv_gemm_kernel``: implicit GEMM on int8 ``tl.dot`` (tensor cores) for ``C/groups > 1``::

      GEMM  [M = N*Ho*Wo, K = kh*kw*C/g] x [K, O/g]   per group g (grid axis 2)
      k  ->  (r, t, c) with c fastest:  k = (r * kw + t) * C/g + c

  The activation tile ``A[m, k] = x[n, g*C/g + c, ho*sh - ph + r, wo*sw - pw + t]`` is gathered
  (``x_zp`` outside the image) and the weight tile ``B[k, o] = w[g*O/g + o, c, r, t]``. With
  channels-last activations (NHWC memory) and ``C/g`` a multiple of ``BLOCK_K`` the K loop runs
  over taps ``(r, t)`` and channel blocks, so every row of the A tile is ``BLOCK_K`` contiguous
  bytes (vector loads); otherwise ``k`` is decomposed per element (small ``C/g``, e.g. the
  3-channel stem). The uint8 -> int8 offset and the 8-bit weight split are those of
  :func:`pdquant_fast.kernels.deploy_linear._qmm_kernel`.
* ``_qdw_kernel``: depthwise (``C/groups == 1``, any channel multiplier), direct int32 MACs on
  CUDA cores over a ``[BLOCK_M pixels, BLOCK_C channels]`` tile (3x3, 5x5 taps in a loop).

Layout: both kernels are stride-generic (NCHW or NHWC activations, residual and output). The
fast layout is channels-last: :func:`qconv2d_triton` converts a contiguous-NCHW ``x`` to
channels-last once per call (one read + write of ``x``; pass a channels-last ``x`` to skip it,
``layout="native"`` to gather from NCHW directly) and writes the output in ``x``'s memory format
(NCHW in, NCHW out). Weights are prepacked once (:func:`qconv2d_prepack_triton`) to channels-last
``[O, kh, kw, C/g]`` memory plus per-channel sums for the zero-point correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .deploy_linear import (
    _requant_epilogue,
    _to_codes,
    dequantize_residual,
    interpret_mode,
    pick_config,
)


@triton.jit
def _qconv_gemm_kernel(
    x_ptr,
    w_ptr,
    wsum_ptr,
    scale_ptr,
    bias_ptr,
    res_ptr,
    y_ptr,
    M,
    HO,
    WO,
    H,
    W,
    CG,
    OG,
    KTOT,
    sxn,
    sxc,
    sxh,
    sxw,
    swo,
    swc,
    swh,
    sww,
    srn,
    src,
    srh,
    srw,
    syn,
    syc,
    syh,
    syw,
    SH,
    SW,
    PH,
    PW,
    x_zp,
    out_scale,
    out_zp,
    KH: tl.constexpr,
    KW: tl.constexpr,
    FLAT_K: tl.constexpr,
    X_XOR: tl.constexpr,
    W16: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RES: tl.constexpr,
    OUT_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Implicit-GEMM int8 conv of one group (grid: M tiles, O/g tiles, groups).

    Reads the receptive fields of BLOCK_M output pixels (each input byte about kh*kw/stride^2
    times, from L2) and the group's weights; writes BLOCK_M x BLOCK_N codes or floats.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mw = offs_m % M  # wrapped rows/cols: computed, never stored
    ow = offs_o % OG
    n_img = mw // (HO * WO)
    p = mw % (HO * WO)
    h0 = (p // WO) * SH - PH
    w0 = (p % WO) * SW - PW
    x_base = x_ptr + n_img * sxn + (g * CG) * sxc
    w_base = w_ptr + (g * OG + ow) * swo
    # A's pad value before the offset: x_zp; its value for k beyond K: 0 after the offset
    A_NEUTRAL: tl.constexpr = 128 if X_XOR else 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    if W16:
        acc_hi = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        asum = tl.zeros((BLOCK_M,), tl.int32)
    if FLAT_K:
        for k0 in range(0, KTOT, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < KTOT
            rt = kk // CG
            c = kk % CG
            r = rt // KW
            t = rt % KW
            hi = h0[:, None] + r[None, :]
            wi = w0[:, None] + t[None, :]
            inb = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            a = tl.load(
                x_base[:, None] + hi * sxh + wi * sxw + c[None, :] * sxc,
                mask=inb & k_ok[None, :],
                other=x_zp,
            )
            a = tl.where(k_ok[None, :], a, A_NEUTRAL)
            b = tl.load(
                w_base[None, :] + c[:, None] * swc + r[:, None] * swh + t[:, None] * sww,
                mask=k_ok[:, None],
                other=0,
            )
            if X_XOR:
                a = (a.to(tl.uint8) ^ 0x80).to(tl.int8, bitcast=True)
            else:
                a = a.to(tl.int8)
            if W16:
                b_hi = (b >> 8).to(tl.int8)
                b_lo = ((b & 255) - 128).to(tl.int8)
                acc_hi = tl.dot(a, b_hi, acc_hi, out_dtype=tl.int32)
                acc = tl.dot(a, b_lo, acc, out_dtype=tl.int32)
                asum += tl.sum(a.to(tl.int32), axis=1)
            else:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    else:
        # one flat loop over (tap, channel block): long enough for the software pipeliner
        NCB = CG // BLOCK_K
        for it in range(0, KH * KW * NCB):
            rt = it // NCB
            c0 = (it % NCB) * BLOCK_K
            r = rt // KW
            t = rt % KW
            hi = h0 + r
            wi = w0 + t
            inb = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            cc = c0 + offs_k
            a_row = x_base + hi * sxh + wi * sxw
            a = tl.load(a_row[:, None] + cc[None, :] * sxc, mask=inb[:, None], other=x_zp)
            b = tl.load(w_base[None, :] + r * swh + t * sww + cc[:, None] * swc)
            if X_XOR:
                a = (a ^ 0x80).to(tl.int8, bitcast=True)
            if W16:
                b_hi = (b >> 8).to(tl.int8)
                b_lo = ((b & 255) - 128).to(tl.int8)
                acc_hi = tl.dot(a, b_hi, acc_hi, out_dtype=tl.int32)
                acc = tl.dot(a, b_lo, acc, out_dtype=tl.int32)
                asum += tl.sum(a.to(tl.int32), axis=1)
            else:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    if W16:
        acc = acc_hi * 256 + acc + asum[:, None] * 128
    BC: tl.constexpr = 128 if X_XOR else 0
    oc = g * OG + ow
    oc_st = g * OG + offs_o  # unwrapped (masked): channels-last stores stay contiguous
    wsum = tl.load(wsum_ptr + oc)
    acc = acc + (BC - x_zp) * wsum[None, :]
    scale = tl.load(scale_ptr + oc)
    bias = tl.load(bias_ptr + oc)
    ok = (offs_m < M)[:, None] & (offs_o < OG)[None, :]
    ho = p // WO
    wo = p % WO
    res = 0.0
    if HAS_RES:
        r_ptrs = res_ptr + (n_img * srn + ho * srh + wo * srw)[:, None] + oc_st[None, :] * src
        res = tl.load(r_ptrs, mask=ok, other=0.0)
    y = _requant_epilogue(acc, scale, bias, res, ACT, HAS_RES)
    y_ptrs = y_ptr + (n_img * syn + ho * syh + wo * syw)[:, None] + oc_st[None, :] * syc
    if OUT_BITS == 0:
        tl.store(y_ptrs, y, mask=ok)
    else:
        tl.store(y_ptrs, _to_codes(y, out_scale, out_zp, OUT_BITS), mask=ok)


@triton.jit
def _qdw_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    res_ptr,
    y_ptr,
    M,
    HO,
    WO,
    H,
    W,
    OC,
    MULT,
    sxn,
    sxc,
    sxh,
    sxw,
    swo,
    swh,
    sww,
    srn,
    src,
    srh,
    srw,
    syn,
    syc,
    syh,
    syw,
    SH,
    SW,
    PH,
    PW,
    x_zp,
    out_scale,
    out_zp,
    KH: tl.constexpr,
    KW: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RES: tl.constexpr,
    OUT_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Depthwise conv, output channel o reads input channel o // MULT; exact int32 acc.

    acc = sum_taps x * w - x_zp * sum_taps w (padding loads x_zp, so padded taps cancel): one
    integer multiply-add per tap and output instead of a subtract and a multiply-add. Channels
    are masked, not wrapped, so that channels-last rows stay contiguous (vector loads/stores).
    Reads each input byte about kh*kw/stride^2 times (L1/L2) and kh*kw weights per channel.
    """
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ow = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_ok = ow < OC
    mw = offs_m % M
    n_img = mw // (HO * WO)
    p = mw % (HO * WO)
    ho = p // WO
    wo = p % WO
    h0 = ho * SH - PH
    w0 = wo * SW - PW
    c_off = (ow // MULT) * sxc
    x_base = x_ptr + n_img * sxn
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.int32)
    wsum = tl.zeros((BLOCK_C,), tl.int32)
    for rt in range(0, KH * KW):  # a loop, not unrolled: 5x5 unrolled compiles for ~30 s
        r = rt // KW
        t = rt % KW
        hi = h0 + r
        wi = w0 + t
        inb = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        xv = tl.load(
            (x_base + hi * sxh + wi * sxw)[:, None] + c_off[None, :],
            mask=inb[:, None] & o_ok[None, :],
            other=x_zp,
        )
        wv = tl.load(w_ptr + ow * swo + r * swh + t * sww, mask=o_ok, other=0).to(tl.int32)
        wsum += wv
        acc += xv.to(tl.int32) * wv[None, :]
    acc = acc - x_zp * wsum[None, :]
    scale = tl.load(scale_ptr + ow, mask=o_ok, other=0.0)
    bias = tl.load(bias_ptr + ow, mask=o_ok, other=0.0)
    ok = (offs_m < M)[:, None] & o_ok[None, :]
    res = 0.0
    if HAS_RES:
        r_ptrs = res_ptr + (n_img * srn + ho * srh + wo * srw)[:, None] + ow[None, :] * src
        res = tl.load(r_ptrs, mask=ok, other=0.0)
    y = _requant_epilogue(acc, scale, bias, res, ACT, HAS_RES)
    y_ptrs = y_ptr + (n_img * syn + ho * syh + wo * syw)[:, None] + ow[None, :] * syc
    if OUT_BITS == 0:
        tl.store(y_ptrs, y, mask=ok)
    else:
        tl.store(y_ptrs, _to_codes(y, out_scale, out_zp, OUT_BITS), mask=ok)


@dataclass(frozen=True)
class QConvPacked:
    """Prepacked conv weights: ``w`` int8/int16 ``[O, C/g, kh, kw]`` in channels-last memory
    (``[O, kh, kw, C/g]``), ``wsum`` int32 ``[O]`` (sum over the receptive field), ``groups``,
    and whether activation codes are promised below 128 (int8-view fast path)."""

    w: torch.Tensor
    wsum: torch.Tensor
    groups: int
    x_below_128: bool = False


def qconv2d_prepack_triton(w: torch.Tensor, groups: int, a_bits: int = 8) -> QConvPacked:
    """Once per layer: channels-last weights and their per-channel sums.

    ``a_bits <= 7`` promises activation codes below 128 (see :func:`qlinear_prepack_triton`).
    """
    if w.dtype not in (torch.int8, torch.int16) or w.dim() != 4:
        raise ValueError(
            f"qconv2d_prepack_triton: w must be int8/int16 [O, C/g, kh, kw], got {w.dtype} "
            f"{tuple(w.shape)}"
        )
    wsum = w.sum(dim=(1, 2, 3), dtype=torch.int32)
    return QConvPacked(w.contiguous(memory_format=torch.channels_last), wsum, groups, a_bits <= 7)


#: Smallest K of an int8 ``tl.dot`` that Triton compiles for NVIDIA GPUs ("Input shapes should
#: have M >= 1, N >= 1 and K >= 32"); the interpreter does not check it, so launch does.
DOT_MIN_K = 32


@dataclass(frozen=True)
class QConvConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _conv_candidates(cg: int, og: int, depthwise: bool) -> list[QConvConfig]:
    if depthwise:
        if interpret_mode():
            return [QConvConfig(16, 16, 0, 4, 1)]
        return [QConvConfig(64, 64, 0, 4, 1), QConvConfig(128, 32, 0, 4, 1)]
    # An int8 tl.dot needs K >= 32 on the GPU (the interpreter accepts less, so the candidates
    # here keep to it too): a group of 16 channels takes the flat-K loop over (tap, channel).
    blocked_bk = next((bk for bk in (128, 64, 32) if cg % bk == 0), 0)
    if interpret_mode():
        return [QConvConfig(16, 16, DOT_MIN_K, 4, 1)]
    bn = 128 if og >= 128 else 64
    bk = min(blocked_bk, 64) if blocked_bk else 32
    cands = [
        QConvConfig(128, bn, bk, 8 if bn == 128 else 4, 3),
        QConvConfig(128, 64, bk, 4, 4),
        QConvConfig(64, bn, bk, 4, 4),
    ]
    if blocked_bk >= 128:
        cands.append(QConvConfig(128, bn, 128, 8, 3))
    return cands


def qconv2d_triton(
    x: torch.Tensor,
    x_zp: int,
    w: torch.Tensor | QConvPacked,
    scale: torch.Tensor,
    bias: torch.Tensor,
    stride,
    padding,
    groups: int,
    act: int,
    residual: torch.Tensor | None,
    out_scale: float,
    out_zp: int,
    out_bits: int,
    res_scale: float = 0.0,
    res_zp: int = 0,
    *,
    config: QConvConfig | None = None,
    layout: str = "auto",
) -> torch.Tensor:
    """``pdquant::qconv2d`` on GPU: see :func:`pdquant_fast.ops.reference.qconv2d_reference`.

    ``x`` uint8 codes ``[N, C, H, W]`` (NCHW or channels-last memory); ``w`` int8/int16
    ``[O, C/groups, kh, kw]`` offsets or a :class:`QConvPacked`; ``scale``/``bias`` float32
    ``[O]``; ``residual`` ``[N, O, Ho, Wo]`` (any memory format): None, float32, or uint8 codes
    with ``res_scale``/``res_zp`` (dequantized to float32 before the launch). Returns float32
    (``out_bits == 0``) or uint8 codes ``[N, O, Ho, Wo]`` in ``x``'s memory format, bit-exact
    with the reference. ``layout``: ``"auto"`` computes on channels-last activations (converting
    an NCHW ``x`` first), ``"native"`` gathers from ``x`` as it is laid out.
    """
    residual = dequantize_residual(residual, res_scale, res_zp)
    pk = w if isinstance(w, QConvPacked) else qconv2d_prepack_triton(w, groups)
    if pk.groups != groups:
        raise ValueError(
            f"qconv2d_triton: weights were prepacked for groups={pk.groups}, got {groups}"
        )
    if x.dim() != 4 or x.dtype != torch.uint8:
        raise ValueError(
            f"qconv2d_triton: x must be uint8 [N, C, H, W], got {x.dtype} {tuple(x.shape)}"
        )
    if layout not in ("auto", "native"):
        raise ValueError(f"qconv2d_triton: layout must be 'auto' or 'native', got {layout!r}")
    wt = pk.w
    nb, c, h, wd = x.shape
    o, cg, kh, kw = wt.shape
    if cg * groups != c or o % groups:
        raise ValueError(
            f"qconv2d_triton: w {tuple(wt.shape)} and groups={groups} do not fit x with {c} "
            "channels"
        )
    sh, sw = int(stride[0]), int(stride[1])
    ph, pw = int(padding[0]), int(padding[1])
    ho = (h + 2 * ph - kh) // sh + 1
    wo = (wd + 2 * pw - kw) // sw + 1
    channels_last_in = (
        x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not (x.is_contiguous())
    )
    fmt = torch.channels_last if channels_last_in else torch.contiguous_format
    dtype = torch.float32 if out_bits == 0 else torch.uint8
    y = torch.empty((nb, o, ho, wo), device=x.device, dtype=dtype, memory_format=fmt)
    m = nb * ho * wo
    if m == 0 or o == 0:
        return y
    if layout == "auto" and not channels_last_in:
        x = x.contiguous(memory_format=torch.channels_last)
    elif not (x.is_contiguous() or channels_last_in):
        x = x.contiguous()
    res = residual if residual is not None else y
    og = o // groups
    depthwise = cg == 1
    fast = pk.x_below_128 and x_zp < 128
    w16 = wt.dtype == torch.int16
    common_strides = (
        *res.stride(),
        *y.stride(),
        sh,
        sw,
        ph,
        pw,
        x_zp,
        float(out_scale),
        out_zp,
    )

    def launch(cfg: QConvConfig):
        if depthwise:
            grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(o, cfg.block_n))
            _qdw_kernel[grid](
                x,
                wt,
                scale,
                bias,
                res,
                y,
                m,
                ho,
                wo,
                h,
                wd,
                o,
                o // c,
                *x.stride(),
                wt.stride(0),
                wt.stride(2),
                wt.stride(3),
                *common_strides,
                KH=kh,
                KW=kw,
                ACT=act,
                HAS_RES=residual is not None,
                OUT_BITS=out_bits,
                BLOCK_M=cfg.block_m,
                BLOCK_C=cfg.block_n,
                num_warps=cfg.num_warps,
                enable_fp_fusion=False,
            )
            return y
        if cfg.block_k < DOT_MIN_K or cfg.block_k & (cfg.block_k - 1):
            raise ValueError(
                f"qconv2d_triton: config block_k={cfg.block_k}; an int8 dot needs a power of two "
                f">= {DOT_MIN_K}"
            )
        flat = cg % cfg.block_k != 0
        xv = x.view(torch.int8) if fast else x
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(og, cfg.block_n), groups)
        _qconv_gemm_kernel[grid](
            xv,
            wt,
            pk.wsum,
            scale,
            bias,
            res,
            y,
            m,
            ho,
            wo,
            h,
            wd,
            cg,
            og,
            cg * kh * kw,
            *x.stride(),
            *wt.stride(),
            *common_strides,
            KH=kh,
            KW=kw,
            FLAT_K=flat,
            X_XOR=not fast,
            W16=w16,
            ACT=act,
            HAS_RES=residual is not None,
            OUT_BITS=out_bits,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            enable_fp_fusion=False,
        )
        return y

    if config is None:
        key = (
            "qconv",
            nb,
            c,
            h,
            wd,
            o,
            kh,
            kw,
            sh,
            sw,
            ph,
            pw,
            groups,
            fast,
            w16,
            out_bits,
            act,
            residual is not None,
            x.stride(1) == 1,
            str(x.device),
        )
        config = pick_config(key, lambda: _conv_candidates(cg, og, depthwise), launch)
    return launch(config)
