"""Reference implementations of every op contract in :mod:`pdquant_fast.ops.library`.

Plain PyTorch, float32, written to be read; each function has exactly the signature of its op.
Rounding is ``torch.round`` (round half to even) everywhere. Division is true IEEE division
``x / delta`` (never ``x * (1 / delta)``), and the operation order written here is the contract:
fast kernels reproduce it op for op, so that everything that is not a reduction is bit-exact.

QDrop mask (the same in every backend, so a seed gives the same mask on CPU and GPU)::

    key  = lowbias32(uint32(seed) ^ 0x9E3779B9)
    h[i] = lowbias32(uint32(i) ^ key)                 i = flat index into contiguous x
    keep[i] = h[i] < thresh,  thresh = floor(keep_prob * 2**32)   (computed in float64)

    lowbias32(v): v ^= v >> 16; v *= 0x7FEB352D; v ^= v >> 15; v *= 0x846CA68B; v ^= v >> 16
    (uint32 arithmetic, multiplications modulo 2**32; C. Wellons' "lowbias32" integer hash)

``keep[i]`` true means element ``i`` takes its quantized value (QDrop: keep_prob = probability of
quantizing, spec §6.2 item 6).
"""

from __future__ import annotations

import torch

ZETA, GAMMA = 1.1, -0.1  # AdaRound rectified-sigmoid stretch (spec §7.2)
HASH_KEY_XOR = 0x9E3779B9
_M32 = 0xFFFFFFFF


def _mul32(v: torch.Tensor, c: int) -> torch.Tensor:
    """``(v * c) mod 2**32`` for int64 ``v`` in ``[0, 2**32)``, without int64 overflow.

    The constant is split into 16-bit halves so that every product stays below ``2**48``.
    """
    lo, hi = c & 0xFFFF, c >> 16
    return (v * lo + (((v * hi) & 0xFFFF) << 16)) & _M32


def lowbias32(v: torch.Tensor) -> torch.Tensor:
    """C. Wellons' lowbias32 hash of int64 tensors holding uint32 values (uint32 in int64)."""
    v = v ^ (v >> 16)
    v = _mul32(v, 0x7FEB352D)
    v = v ^ (v >> 15)
    v = _mul32(v, 0x846CA68B)
    return v ^ (v >> 16)


def keep_threshold(keep_prob: float) -> int:
    """``floor(keep_prob * 2**32)`` in float64: an element is quantized when its hash is below."""
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob!r}")
    return int(keep_prob * 4294967296.0)


def qdrop_mask_reference(seed: torch.Tensor, numel: int, keep_prob: float) -> torch.Tensor:
    """Bool mask of ``numel`` elements, True = quantize; see the module docstring for the hash."""
    s = seed.to(torch.int64).reshape(()) & _M32
    key = lowbias32(s ^ HASH_KEY_XOR)
    idx = torch.arange(numel, dtype=torch.int64, device=seed.device)
    return lowbias32(idx ^ key) < keep_threshold(keep_prob)


def _channel_view(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Reshape a per-channel ``[C]`` parameter so it broadcasts along ``axis`` of ``x``."""
    if t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _mask_for(
    x: torch.Tensor, keep_prob: float, seed: torch.Tensor | None, mask: torch.Tensor | None
) -> torch.Tensor | None:
    if mask is not None:
        return mask
    if seed is not None and keep_prob < 1.0:
        return qdrop_mask_reference(seed, x.numel(), keep_prob).reshape(x.shape)
    return None


def fake_quant_act_reference(
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    axis: int,
    keep_prob: float,
    seed: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """``y = m * dq(q(x)) + (1 - m) * x``, ``dq(q(x)) = (clamp(round(x / d) + z, 0, n) - z) * d``.

    Shapes: ``x`` float32, any shape; ``delta``/``zero_point`` float32 ``[]`` (per tensor) or
    ``[C]`` with ``C = x.shape[axis]`` (per channel); ``mask`` bool, ``x``'s shape; ``seed`` int64
    ``[]``. ``n = 2**bits - 1``. Operation order: ``t = x / d``; ``r = round(t)``; ``k = r + z``;
    ``c = clamp(k, 0, n)``; ``y = (c - z) * d``.
    """
    n = 2**bits - 1
    d = _channel_view(delta, x, axis)
    z = _channel_view(zero_point, x, axis)
    y = (torch.clamp(torch.round(x / d) + z, 0, n) - z) * d
    m = _mask_for(x, keep_prob, seed, mask)
    return y if m is None else torch.where(m, y, x)


def fake_quant_act_backward_reference(
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
    """``(grad_x, grad_delta)`` of :func:`fake_quant_act_reference` (spec §7.1).

    Per element, with ``t = x / d``, ``k = round(t) + z``:

    ============================  ===========  ==========================
    element                       grad_x       grad_delta term
    ============================  ===========  ==========================
    not quantized (mask false)    ``g``        0
    ``0 <= k <= n``               ``g``        ``g * (round(t) - t)``
    ``k < 0``                     0            ``g * (0 - z)``
    ``k > n``                     0            ``g * (n - z)``
    ============================  ===========  ==========================

    ``grad_delta`` is the sum of the terms over the whole tensor (``[]``) or over all axes but
    ``axis`` (``[C]``). This is the straight-through LSQ step gradient without LSQ's gradient
    scale, what autograd gives for the official quantizer. The reference sums in float64 and
    rounds once to float32; fast kernels sum in float32 with their own order (error budget in
    the tests).
    """
    n = 2**bits - 1
    d = _channel_view(delta, x, axis)
    z = _channel_view(zero_point, x, axis)
    t = x / d
    r = torch.round(t)
    k = r + z
    inside = (k >= 0) & (k <= n)
    term = torch.where(inside, r - t, torch.where(k < 0, -z, n - z).expand_as(t))
    gx = torch.where(inside, grad, torch.zeros_like(grad))
    m = _mask_for(x, keep_prob, seed, mask)
    if m is not None:
        gx = torch.where(m, gx, grad)
        term = torch.where(m, term, torch.zeros_like(term))
    prod = grad.double() * term.double()
    if delta.dim() == 0:
        gd = prod.sum()
    else:
        dims = [i for i in range(x.dim()) if i != axis % x.dim()]
        gd = prod.sum(dim=dims) if dims else prod
    return gx, gd.to(delta.dtype)


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """AdaRound ``h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)


def adaround_soft_reference(
    w_floor: torch.Tensor,
    alpha: torch.Tensor,
    delta: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    beta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaRound soft-quantized weight and rounding regulariser (AdaRound eq. 22-24, spec §7.2).

    Shapes: ``w_floor = floor(W / delta)`` and ``alpha`` float32 ``[C_out, ...]``; ``delta`` and
    ``zero_point`` float32 ``[C_out]`` (per output channel, axis 0); ``beta`` float32 ``[]``.
    Returns ``w_q = (clamp(w_floor + h(alpha) + z, 0, n) - z) * d`` (``[C_out, ...]``) and
    ``reg = sum(1 - |2 h(alpha) - 1| ** beta)`` (``[]``, summed in float64, rounded once).
    """
    n = 2**bits - 1
    d = _channel_view(delta, w_floor, 0)
    z = _channel_view(zero_point, w_floor, 0)
    h = rectified_sigmoid(alpha)
    w_q = (torch.clamp(w_floor + h + z, 0, n) - z) * d
    reg = (1 - (2 * h - 1).abs().pow(beta)).double().sum().float()
    return w_q, reg


def adaround_soft_backward_reference(
    grad_wq: torch.Tensor,
    grad_reg: torch.Tensor,
    w_floor: torch.Tensor,
    alpha: torch.Tensor,
    delta: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    beta: torch.Tensor,
) -> torch.Tensor:
    """``grad_alpha`` of :func:`adaround_soft_reference` for output grads ``(grad_wq, grad_reg)``.

    With ``s = sigmoid(alpha)``, ``u = s * (zeta - gamma) + gamma``, ``h = clamp(u, 0, 1)``,
    ``h' = (zeta - gamma) * s * (1 - s)`` where ``0 <= u <= 1`` else 0 (clamp bounds inclusive,
    as torch's clamp backward), ``k = w_floor + h + z``::

        grad_alpha = grad_wq * d * [0 <= k <= n] * h'
                   - grad_reg * beta * |2h - 1| ** (beta - 1) * sign(2h - 1) * 2 * h'
    """
    n = 2**bits - 1
    d = _channel_view(delta, w_floor, 0)
    z = _channel_view(zero_point, w_floor, 0)
    s = torch.sigmoid(alpha)
    u = s * (ZETA - GAMMA) + GAMMA
    h = torch.clamp(u, 0, 1)
    dh = torch.where((u >= 0) & (u <= 1), (ZETA - GAMMA) * s * (1 - s), torch.zeros_like(s))
    k = w_floor + h + z
    inside = (k >= 0) & (k <= n)
    g_q = torch.where(inside, grad_wq * d, torch.zeros_like(grad_wq)) * dh
    v = 2 * h - 1
    g_r = -grad_reg * beta * v.abs().pow(beta - 1) * torch.sign(v) * 2 * dh
    return g_q + g_r


def adaround_hard_reference(
    w_floor: torch.Tensor, alpha: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """Final AdaRound integer codes ``clamp(w_floor + [alpha >= 0] + z, 0, n)`` as uint8.

    Exact: every backend returns the same codes. ``zero_point`` is ``[C_out]`` (axis 0).
    """
    n = 2**bits - 1
    z = _channel_view(zero_point, w_floor, 0)
    codes = torch.clamp(w_floor + (alpha >= 0).to(w_floor.dtype) + z, 0, n)
    return codes.to(torch.uint8)


def mse_search_2d_reference(
    x: torch.Tensor,
    bits: int,
    steps: int,
    x_min: torch.Tensor | None = None,
    x_max: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official 2-D L2.4 init search (spec §1.3) per row of ``x`` ``[C, K]``.

    For each row: ``R = max(x_max, 0) - min(x_min, 0)``, where ``x_min``/``x_max`` are the row's
    own minimum and maximum, or the given ``[C]`` bounds (the range of the whole tensor a row was
    subsampled from: they must contain the row); for range ``i = 1..steps`` and zero point
    ``z = 0..n``, candidate step ``d_i = max(R * i / steps / n, 1e-8)``, codes
    ``v = clamp(round(x / d_i), -z, n - z)``, score ``mean(|x - v * d_i| ** 2.4)``; the row keeps
    the first (lowest ``(i, z)``) candidate with the lowest score and returns
    the ``calculate_qparams``
    of its interval ``[-z d_i, R i / steps - z d_i]``: ``(delta [C], zero_point [C])`` float32.
    """
    from ..quant import mse_search_2d

    return mse_search_2d(x, bits, channel_wise=True, steps=steps, x_min=x_min, x_max=x_max)


# --------------------------------------------------------------------------------------------
# distribution correction


def bn_stat_loss_reference(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample BatchNorm-statistic loss of distribution correction (spec §3).

    ``x`` ``[B, C, H, W]`` float32 (a BN's input; contiguous or channels_last, ``H*W >= 2``),
    ``mean``/``std`` ``[C]``: the BN's running mean and ``sqrt(running_var + 1e-6)``. Per sample
    and channel, ``m = mean of x over H*W`` and ``s = sqrt(unbiased var over H*W + 1e-6)``;
    returns ``(loss [B], m [B, C], s [B, C])`` with
    ``loss[b] = sum_c (mean[c] - m[b, c])**2 + (std[c] - s[b, c])**2`` (a sum over the sample's
    channels, not a batch mean). ``m`` and ``s`` are returned for the backward.
    """
    m = x.mean(dim=(2, 3))
    s = torch.sqrt(x.var(dim=(2, 3), unbiased=True) + 1e-6)
    loss = ((mean[None] - m) ** 2).sum(1) + ((std[None] - s) ** 2).sum(1)
    return loss, m, s


def bn_stat_loss_backward_reference(
    grad: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    m: torch.Tensor,
    s: torch.Tensor,
) -> torch.Tensor:
    """``grad_x`` of :func:`bn_stat_loss_reference` given ``grad = dL/dloss`` ``[B]`` and the
    forward's ``m``, ``s``: ``grad[b] * (2 (m - mean) / N + 2 (s - std) / (s (N - 1)) * (x - m))``
    per element, ``N = H*W``. Same shape and memory format as ``x``."""
    n = x.shape[2] * x.shape[3]
    g = grad[:, None]
    a = g * 2 * (m - mean[None]) / n
    k = g * 2 * (s - std[None]) / (s * (n - 1))
    return a[:, :, None, None] + k[:, :, None, None] * (x - m[:, :, None, None])


def dc_adam_step_reference(
    x: torch.Tensor,
    x0: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    kc: torch.Tensor,
    step: torch.Tensor,
    b1: float,
    b2: float,
    sqrt_bc2: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One distribution-correction update of the unit input ``x`` ``[B, C, H, W]`` (spec §3).

    ``g`` is the gradient of the (group-normalised) BN-statistic loss; the closeness term
    ``L_close / lamb_c`` adds ``d * kc[b]`` (``d = x - x0``, ``kc = 2 * inv / (lamb_c * H*W)``
    per sample) before Adam, whose moments ``m`` and ``v`` are updated **in place**; ``step[b]``
    is the sample's ``lr / (1 - b1**t)`` and ``sqrt_bc2 = sqrt(1 - b2**t)``. Returns ``(x_new,
    close)`` with ``close[b] = sum over the sample of d**2 / (H*W)`` (L_close before the
    update). The operation order below is the contract (fast kernels are bit-exact in
    ``x_new``, ``m``, ``v``; ``close`` is a reduction).
    """
    shp = (-1, 1, 1, 1)
    d = x - x0
    close = (d * d).sum(dim=(1, 2, 3)) / (x.shape[2] * x.shape[3])
    gg = g + d * kc.view(shp)
    m.mul_(b1).add_(gg * (1 - b1))
    v.mul_(b2).add_(gg * gg * (1 - b2))
    denom = v.sqrt() / sqrt_bc2 + eps
    return x - step.view(shp) * m / denom, close


# --------------------------------------------------------------------------------------------
# deployment (packed low-bit inference)


def pack_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[O, K]`` (each in ``0..2^bits-1``) into uint8 ``[O, ceil(K*bits/8)]``.

    Little-endian within a byte: element ``j`` of a row sits in byte ``j // (8 // bits)`` at bit
    offset ``(j % (8 // bits)) * bits``. Each row is padded with zero bits to a whole byte, so rows
    start on byte boundaries (a conv weight ``[O, C/g, kh, kw]`` is packed as ``[O, C/g*kh*kw]``)::

        4-bit, one byte:   bit 7 ......... 4 3 ......... 0
                               [ elem j+1  ] [ elem j    ]     j even
        2-bit, one byte:   bit 7   6 5   4 3   2 1   0
                               [j+3] [j+2] [j+1] [ j ]         j % 4 == 0

    8-bit packing is the identity (a copy).
    """
    per = 8 // bits
    o, k = codes.shape
    nbytes = (k * bits + 7) // 8
    padded = torch.zeros((o, nbytes * per), dtype=torch.int32, device=codes.device)
    padded[:, :k] = codes.to(torch.int32)
    lanes = padded.reshape(o, nbytes, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (lanes << shifts).sum(dim=2).to(torch.uint8)


def unpack_reference(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_reference`: uint8 ``[O, ceil(k*bits/8)]`` -> uint8 ``[O, k]``."""
    per = 8 // bits
    mask = (1 << bits) - 1
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    lanes = (packed.to(torch.int32)[:, :, None] >> shifts) & mask  # [O, B, per]
    return lanes.reshape(packed.shape[0], -1)[:, :k].to(torch.uint8).contiguous()


def qconv2d_acc_reference(
    x: torch.Tensor, x_zp: int, w: torch.Tensor, stride, padding, groups: int
) -> torch.Tensor:
    """Exact int32 accumulator ``acc[n, o, i, j] = sum (x - x_zp) * w`` over the receptive field.

    ``x`` uint8 ``[N, C, H, W]``, ``w`` int8/int16 ``[O, C/groups, kh, kw]``; padding is the code
    ``x_zp`` (0 after subtracting the zero point). Computed as a float64 convolution of the
    integer values: every product and partial sum is an integer below ``2**53`` in magnitude
    (validation bounds ``|acc| < 2**31``), so the float64 sum is exact in any order; cuDNN is
    switched off (no FFT/Winograd algorithms) so the CUDA path is im2col + GEMM, exact too.
    Returns int32 ``[N, O, Ho, Wo]``.
    """
    xi = x.to(torch.float64) - float(x_zp)
    wi = w.to(torch.float64)
    with torch.backends.cudnn.flags(enabled=False):
        acc = torch.nn.functional.conv2d(xi, wi, None, tuple(stride), tuple(padding), 1, groups)
    return acc.to(torch.int32)


def qlinear_acc_reference(x: torch.Tensor, x_zp: int, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``acc[n, o] = sum_k (x[n, k] - x_zp) * w[o, k]`` (float64 matmul of integers,
    exact as in :func:`qconv2d_acc_reference`). ``x`` uint8 ``[N, K]``, ``w`` int8/int16
    ``[O, K]`` -> int32 ``[N, O]``."""
    xi = x.to(torch.float64) - float(x_zp)
    return (xi @ w.to(torch.float64).t()).to(torch.int32)


def quantize_codes_reference(
    x: torch.Tensor, delta: float, zp: int, bits: int, channels_last: bool = False
) -> torch.Tensor:
    """``clamp(round_half_even(x / delta) + zp, 0, 2^bits - 1)`` as uint8, in float32 with true
    division by the float32 ``delta`` (the simulation's ``round(x / delta) + zp``). Keeps ``x``'s
    memory format, or (``channels_last``, 4-d ``x``) returns channels_last codes."""
    d = torch.tensor(float(delta), dtype=torch.float32, device=x.device)
    q = torch.clamp(torch.round(x / d) + float(zp), 0, (1 << bits) - 1).to(torch.uint8)
    return q.contiguous(memory_format=torch.channels_last) if channels_last else q


def max_pool2d_codes_reference(x: torch.Tensor, kernel_size, stride, padding) -> torch.Tensor:
    """``F.max_pool2d`` of the codes as float32 (exact for integers; -inf padding, so only
    in-bounds taps count), cast back to uint8."""
    y = torch.nn.functional.max_pool2d(
        x.to(torch.float32), tuple(kernel_size), tuple(stride), tuple(padding)
    )
    return y.to(torch.uint8)


def dequantize_codes_reference(codes: torch.Tensor, delta: float, zp: int) -> torch.Tensor:
    """``(float32(code) - zp) * delta`` in float32 (a subtraction, exact for small integers, and
    one rounded multiplication: the packed runtime's and the simulation's dequantization)."""
    z = torch.tensor(float(zp), dtype=torch.float32, device=codes.device)
    d = torch.tensor(float(delta), dtype=torch.float32, device=codes.device)
    return (codes.to(torch.float32) - z) * d


def dequantize_residual(residual: torch.Tensor, res_scale: float, res_zp: int) -> torch.Tensor:
    """A float32 residual as it is; uint8 codes as ``(float32(code) - res_zp) * res_scale``
    (:func:`dequantize_codes_reference`)."""
    if residual.dtype != torch.uint8:
        return residual
    return dequantize_codes_reference(residual, res_scale, res_zp)


def requant_reference(
    acc: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    act: int,
    residual: torch.Tensor | None,
    out_scale: float,
    out_zp: int,
    out_bits: int,
    res_scale: float = 0.0,
    res_zp: int = 0,
) -> torch.Tensor:
    """The fused requantisation of ``qconv2d``/``qlinear`` (channel axis 1 of ``acc``).

    Float32, in this order, each a separate rounding (no FMA)::

        y = float32(acc) * scale[o]          # int32 -> float32 rounds to nearest even
        y = y + bias[o]
        y = y + residual                     # if given; uint8 residual codes first become
                                             #   (float32(code) - res_zp) * float32(res_scale)
        y = max(y, 0)  (act 1)  |  min(max(y, 0), 6)  (act 2)
        out_bits == 0:  return y (float32)
        else:           q = clamp(round_half_even(y / s) + out_zp, 0, 2^out_bits - 1) as uint8

    with ``s = float32(out_scale)`` and true IEEE division (not a multiply by ``1 / s``: the
    divisor is a 0-d tensor, as in the simulation's ``x / delta``).
    """
    shape = [1] * acc.dim()
    shape[1] = -1
    y = acc.to(torch.float32) * scale.reshape(shape)
    y = y + bias.reshape(shape)
    if residual is not None:
        y = y + dequantize_residual(residual, res_scale, res_zp)
    if act == 1:
        y = torch.clamp_min(y, 0.0)
    elif act == 2:
        y = torch.clamp(y, 0.0, 6.0)
    if out_bits == 0:
        return y
    s = torch.tensor(out_scale, dtype=torch.float32, device=y.device)
    q = torch.clamp(torch.round(y / s) + out_zp, 0, (1 << out_bits) - 1)
    return q.to(torch.uint8)


def qconv2d_reference(
    x: torch.Tensor,
    x_zp: int,
    w: torch.Tensor,
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
) -> torch.Tensor:
    """Quantized conv2d: exact integer accumulation + :func:`requant_reference`.

    ``x`` uint8 activation codes ``[N, C, H, W]`` (contiguous NCHW) with zero point ``x_zp``;
    ``w`` int8 (or int16 for 8-bit weights) signed offsets ``w_code - w_zp[o]``
    ``[O, C/groups, kh, kw]``; ``scale = act_delta * w_delta`` and ``bias`` (BN-folded) float32
    ``[O]``; ``residual`` ``[N, O, Ho, Wo]``: None, float32, or uint8 codes with
    ``res_scale``/``res_zp``. Returns float32 ``y`` (out_bits 0) or uint8 codes,
    ``[N, O, Ho, Wo]``.
    """
    acc = qconv2d_acc_reference(x, x_zp, w, stride, padding, groups)
    return requant_reference(
        acc, scale, bias, act, residual, out_scale, out_zp, out_bits, res_scale, res_zp
    )


def qlinear_reference(
    x: torch.Tensor,
    x_zp: int,
    w: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    act: int,
    residual: torch.Tensor | None,
    out_scale: float,
    out_zp: int,
    out_bits: int,
    res_scale: float = 0.0,
    res_zp: int = 0,
) -> torch.Tensor:
    """Quantized linear: ``x`` uint8 ``[N, K]``, ``w`` int8/int16 ``[O, K]``, ``residual``
    ``[N, O]`` (None, float32, or uint8 codes with ``res_scale``/``res_zp``); exact int32
    accumulation + :func:`requant_reference`."""
    acc = qlinear_acc_reference(x, x_zp, w)
    return requant_reference(
        acc, scale, bias, act, residual, out_scale, out_zp, out_bits, res_scale, res_zp
    )


# --------------------------------------------------------------------------------------------
# weight-only low-bit linear (GPU)


def linear_wa16_reference(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group: int,
) -> torch.Tensor:
    """Weight-only low-bit linear ``y = x @ ((w_code - zero) * scale)^T``.

    ``x`` float16/bfloat16 ``[M, K]``; ``w_packed`` uint8 ``[N, ceil(K*bits/8)]`` (the
    :func:`pack_reference` layout of codes ``w_code`` in ``0..2^bits-1``, ``bits`` 2 or 4);
    ``scale``/``zero`` (float16, bfloat16 or float32) ``[N]`` for ``group == 0`` (per output
    channel) or ``[N, ceil(K/group)]`` (input ``k`` uses column ``k // group``). Unpacks,
    dequantizes ``w = (float32(code) - float32(zero)) * float32(scale)`` in float32, multiplies
    ``float32(x) @ w^T`` in float32 (no TF32: torch's default for float32 matmul) and rounds once
    to x's dtype (nearest even). Returns ``[M, N]``.
    """
    k = x.shape[1]
    codes = unpack_reference(w_packed, bits, k).to(torch.float32)
    s = scale.to(torch.float32)
    z = zero.to(torch.float32)
    if group:
        s = s.repeat_interleave(group, dim=1)[:, :k]
        z = z.repeat_interleave(group, dim=1)[:, :k]
    else:
        s = s[:, None]
        z = z[:, None]
    w = (codes - z) * s
    return (x.to(torch.float32) @ w.t()).to(x.dtype)
