"""Reference quantizers: uniform affine fake-quant, learnable activation step, QDrop, AdaRound.

Everything here is plain PyTorch in float32, written to be read. Rounding is ``torch.round``
(round half to even) everywhere, as in the official PD-Quant code (spec §6.2 item 10).

Notation (spec §7): ``n = 2**bits - 1``; integer grid ``0 .. n``; ``delta`` the step (scale),
``zp`` the integer zero point; ``x_hat = delta * (clamp(round(x / delta) + zp, 0, n) - zp)``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops

SUPPORTED_BITS = (2, 3, 4, 8)
ZETA, GAMMA = 1.1, -0.1  # AdaRound rectified-sigmoid stretch (spec §7.2)


class QuantConfigError(ValueError):
    """A quantization setting is outside what the library supports."""


def check_bits(bits: int, what: str = "bit-width") -> int:
    """Return ``bits`` if supported, else raise :class:`QuantConfigError` naming what is allowed."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise QuantConfigError(
            f"unsupported {what} {bits!r}: supported bit-widths are {list(SUPPORTED_BITS)}"
        )
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through)."""
    return (torch.round(x) - x).detach() + x


def fake_quant(x: torch.Tensor, delta: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Uniform affine fake quantization with STE on the rounding (reference op).

    Args:
        x: float32 tensor of any shape.
        delta: step size broadcastable to ``x`` (scalar, or ``[C, 1, ...]`` per channel).
        zp: integer-valued zero point (float tensor), broadcastable to ``x``.
        bits: grid is ``0 .. 2**bits - 1``.

    Returns ``delta * (clamp(round(x / delta) + zp, 0, n) - zp)``. Gradients: identity to ``x``
    inside the clamp range (inclusive bounds) and zero outside; to ``delta`` the LSQ step gradient
    without LSQ's gradient scale, ``round(v) - v`` inside and ``-zp`` / ``n - zp`` below / above
    (spec §7.1), all produced by autograd of this expression.
    """
    n = 2**bits - 1
    if torch.is_grad_enabled() and (x.requires_grad or delta.requires_grad):
        x_int = round_ste(x / delta) + zp
    else:  # same values, without the straight-through bookkeeping
        x_int = torch.round(x / delta) + zp
    x_q = torch.clamp(x_int, 0, n)
    return (x_q - zp) * delta


def quantize_int(x: torch.Tensor, delta: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(x / delta) + zp, 0, n)`` as float32 (no gradient)."""
    n = 2**bits - 1
    return torch.clamp(torch.round(x / delta) + zp, 0, n)


def calculate_qparams(
    x_min: torch.Tensor, x_max: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero point that map ``[min(x_min, 0), max(x_max, 0)]`` onto ``0 .. n``.

    ``delta = max((max+ - min-) / n, 1e-8)``, ``zp = clamp(-round(min- / delta), 0, n)``
    (the official ``calculate_qparams``).
    """
    n = 2**bits - 1
    x_min = torch.clamp(x_min, max=0.0)
    x_max = torch.clamp(x_max, min=0.0)
    delta = torch.clamp((x_max - x_min) / n, min=1e-8)
    zp = torch.clamp(-torch.round(x_min / delta), 0, n)
    return delta, zp


def _lp_score(x: torch.Tensor, x_hat: torch.Tensor, reduce_dims: tuple[int, ...]) -> torch.Tensor:
    """Mean ``|x - x_hat| ** 2.4`` over ``reduce_dims`` (the official L2.4 init score)."""
    return (x - x_hat).abs().pow(2.4).mean(dim=reduce_dims)


@torch.no_grad()
def mse_search_2d(
    x: torch.Tensor,
    bits: int,
    channel_wise: bool,
    steps: int = 100,
    chunk_elems: int = 1 << 21,  # ~8 MB per temporary: cache-resident, 1.8x faster than 64 MB
    score_on: torch.Tensor | None = None,
    x_min: torch.Tensor | None = None,
    x_max: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2-D (range x zero point) L2.4 search of spec §1.3, vectorised.

    For every clip range ``r_i = R * i / steps`` (``R = max(x_max, 0) - min(x_min, 0)``) and every
    zero point ``zp in 0..n``, the candidate interval is ``[-zp * d, r_i - zp * d]`` with
    ``d = r_i / n``; each channel (or the whole tensor) keeps the candidate with the lowest mean
    ``|x - x_hat| ** 2.4``. Ties keep the first candidate in (i, zp) order, as the official loop
    (strict ``<``) does.

    Args:
        x: float32 ``[C, ...]`` (channel_wise) or any shape (per tensor).
        score_on: optional per-tensor subsample of ``x`` on which candidates are scored (the
            range still comes from all of ``x``); see :func:`init_qparams`.
        x_min, x_max: optional ``[C]`` (channel_wise) or ``[1]`` bounds that replace the
            minimum and maximum of ``x`` in ``R`` (``ops.mse_search_2d`` passes the range of
            the tensor a row was sampled from); both or neither.
    Returns:
        ``(delta, zp)`` each of shape ``[C]`` (channel_wise) or ``[]``.
    """
    n = 2**bits - 1
    xf = x.reshape(x.shape[0], -1) if channel_wise else x.reshape(1, -1)
    xf = xf.float()
    if (x_min is None) != (x_max is None):
        raise ValueError("give both x_min and x_max, or neither")
    if x_min is None:
        x_min, x_max = xf.amin(dim=1), xf.amax(dim=1)
    x_min = x_min.reshape(-1).float().clamp(max=0.0)
    x_max = x_max.reshape(-1).float().clamp(min=0.0)
    if score_on is not None:
        xf = score_on.reshape(1, -1).float()
    rng = x_max - x_min  # [C]
    c, k = xf.shape
    best_score = torch.full((c,), float("inf"), device=xf.device)
    best_min = x_min.clone()
    best_max = x_max.clone()
    zps = torch.arange(n + 1, dtype=torch.float32, device=xf.device)  # [Z]
    # For range i every zero point shares the step d = r_i / n (calculate_qparams of the
    # candidate interval [-zp d, r_i - zp d] gives back d and zp), so the integer code
    # k = round(x / d) is computed once per range and each zero point only changes the clamp:
    # x_hat - ... = d * clamp(k, -zp, n - zp). Candidates are scored in chunks of at most
    # ``chunk_elems`` elements ([ranges, zero points, C, K]), in place, to bound memory.
    per_range = (n + 1) * c * k
    ranges_per_chunk = max(1, chunk_elems // max(per_range, 1))
    zp_chunk = n + 1 if per_range <= chunk_elems else max(1, chunk_elems // (c * k))
    for i0 in range(1, steps + 1, ranges_per_chunk):
        i_idx = torch.arange(
            i0, min(steps, i0 + ranges_per_chunk - 1) + 1, dtype=torch.float32, device=xf.device
        )
        r = rng[None, :] * i_idx[:, None] / steps  # [I, C]
        d = torch.clamp(r / n, min=1e-8)
        codes = torch.round(xf[None] / d[..., None])  # [I, C, K]
        for z0 in range(0, n + 1, zp_chunk):
            zz = zps[z0 : z0 + zp_chunk]
            lo = (-zz)[None, :, None, None]
            hi = (n - zz)[None, :, None, None]
            v = torch.clamp(codes[:, None], lo, hi)  # [I, Z, C, K]
            err = torch.addcmul(xf[None, None], v, d[:, None, :, None], value=-1.0)
            score = err.abs_().pow_(2.4).mean(dim=3).reshape(-1, c)  # [I*Z, C]
            s_arg = score.argmin(dim=0)  # first minimum, as the official strict "<" loop
            s_min = score.gather(0, s_arg[None])[0]
            cand_min = (-zz[None, :, None] * d[:, None, :]).reshape(-1, c)  # [I*Z, C]
            cand_max = (r[:, None, :] + cand_min.reshape(len(i_idx), -1, c)).reshape(-1, c)
            better = s_min < best_score
            best_score = torch.where(better, s_min, best_score)
            best_min = torch.where(better, cand_min.gather(0, s_arg[None])[0], best_min)
            best_max = torch.where(better, cand_max.gather(0, s_arg[None])[0], best_max)
    delta, zp = calculate_qparams(best_min, best_max, bits)
    if not channel_wise:
        return delta[0], zp[0]
    return delta, zp


@torch.no_grad()
def mse_search_1d(
    x: torch.Tensor,
    bits: int,
    channel_wise: bool,
    one_side: str,
    steps: int = 100,
    score_on: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1-D clip search of spec §1.3 for one-sided tensors (``pos``/``neg``) or ``no``.

    Thresholds ``t_i = max(|x_min|, x_max) * i / steps``; candidate interval ``[0, t_i]`` (pos),
    ``[-t_i, 0]`` (neg) or ``[-t_i, t_i]``; L2.4 score, first minimum kept.
    """
    n = 2**bits - 1
    xf = x.reshape(x.shape[0], -1) if channel_wise else x.reshape(1, -1)
    xf = xf.float()
    x_min = xf.amin(dim=1)
    x_max = xf.amax(dim=1)
    t_max = torch.maximum(x_min.abs(), x_max)
    if score_on is not None:
        xf = score_on.reshape(1, -1).float()
    i_idx = torch.arange(1, steps + 1, dtype=torch.float32, device=xf.device)
    t = t_max[None, :] * i_idx[:, None] / steps  # [I, C]
    if one_side == "pos":
        cmin, cmax = torch.zeros_like(t), t
    elif one_side == "neg":
        cmin, cmax = -t, torch.zeros_like(t)
    else:
        cmin, cmax = -t, t
    delta, zp = calculate_qparams(cmin, cmax, bits)
    x_hat = (
        torch.clamp(torch.round(xf / delta[..., None]) + zp[..., None], 0, n) - zp[..., None]
    ) * delta[..., None]
    score = _lp_score(xf, x_hat, (2,))  # [I, C]
    arg = score.argmin(dim=0)  # first minimum, as the official strict "<" loop
    bmin = cmin.gather(0, arg[None])[0]
    bmax = cmax.gather(0, arg[None])[0]
    delta, zp = calculate_qparams(bmin, bmax, bits)
    if not channel_wise:
        return delta[0], zp[0]
    return delta, zp


def init_qparams(
    x: torch.Tensor, bits: int, channel_wise: bool, max_score_elems: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Official MSE init: one-sidedness from the whole tensor, then the 1-D or 2-D search.

    ``max_score_elems`` (per-tensor only): score the candidates on an evenly strided
    deterministic subsample of at most this many elements instead of all of ``x``. The clip
    range and one-sidedness still come from the whole tensor. The official code scores all
    elements (256 images' worth: 19M elements x 1,600 candidates for a 4-bit signed EfficientNet
    activation), which takes minutes per quantizer on a CPU. ``None`` scores everything (the exact
    official init).
    """
    if not torch.isfinite(x).all():
        raise ValueError("cannot initialise a quantizer on a tensor containing NaN or Inf")
    x_lo, x_hi = torch.aminmax(x)  # one pass: the sides here, the 2-D search's range below
    if x_lo >= 0:
        side = "pos"
    elif x_hi <= 0:
        side = "neg"
    else:
        side = "no"
    sample = None
    if not channel_wise and max_score_elems is not None and x.numel() > max_score_elems:
        flat = x.reshape(-1)
        stride = -(-flat.numel() // max_score_elems)
        sample = flat[::stride]
    if side == "no" and channel_wise:
        # the 2-D search per channel as one op (C++/Triton/CUDA kernel where built)
        xf = x.reshape(x.shape[0], -1).float().contiguous()
        d, z = ops.mse_search_2d(xf, bits, 100)
    elif side == "no":
        # per tensor: one row (the subsample, or all of x) searched over the whole tensor's range
        row = (x if sample is None else sample).reshape(1, -1).float().contiguous()
        lo, hi = x_lo.float().reshape(1), x_hi.float().reshape(1)
        d, z = ops.mse_search_2d(row, bits, 100, lo, hi)
        d, z = d[0], z[0]
    else:
        d, z = mse_search_1d(x, bits, channel_wise, side, score_on=sample)
    return d, z, side


class WeightQuantizer(nn.Module):
    """Per-output-channel asymmetric weight quantizer with optional AdaRound soft rounding.

    Modes: ``"nearest"`` (round-to-nearest), ``"soft"`` (AdaRound: ``floor(W/delta) + h(alpha)``),
    ``"hard"`` (AdaRound final: ``floor(W/delta) + [alpha >= 0]``). ``delta``/``zp`` have shape
    ``[C_out, 1, ...]`` and are buffers (never learned, spec §2.4).
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits, "weight bit-width")
        self.register_buffer("delta", torch.empty(0))
        self.register_buffer("zp", torch.empty(0))
        self.alpha: nn.Parameter | None = None
        self.w_floor: torch.Tensor | None = None  # floor(W / delta), fixed once AdaRound starts
        # AdaRound regulariser exponent, set by the engine (a buffer: it follows .to(device))
        self.register_buffer("beta", torch.tensor(20.0), persistent=False)
        self.last_reg: torch.Tensor | None = None  # regulariser of the last soft forward
        self.mode = "nearest"
        self.enabled = True

    @property
    def n(self) -> int:
        return 2**self.bits - 1

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        """L2.4 2-D search per output channel on the (folded) weight ``w`` ``[C_out, ...]``."""
        d, z, _ = init_qparams(w, self.bits, channel_wise=True)
        shape = (-1,) + (1,) * (w.dim() - 1)
        self.delta = d.reshape(shape).clone()
        self.zp = z.reshape(shape).clone()

    def set_bits(self, bits: int) -> None:
        self.bits = check_bits(bits, "weight bit-width")
        self.delta = torch.empty(0)

    @torch.no_grad()
    def init_adaround(self, w: torch.Tensor) -> None:
        """Install alpha so that ``h(alpha) = frac(W / delta)`` (spec §7.2 init) and go soft."""
        v = w / self.delta
        self.w_floor = torch.floor(v).contiguous()
        frac = v - self.w_floor
        alpha = -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)
        self.alpha = nn.Parameter(alpha.contiguous())
        self.mode = "soft"

    def h(self) -> torch.Tensor:
        """Rectified sigmoid ``clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)``."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def round_loss(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h - 1| ** beta)`` (AdaRound regulariser, before the lambda factor).

        Plain PyTorch (for inspection and tests); the engine uses :attr:`last_reg`, which the
        fused ``adaround_soft`` op computes in the same pass as the soft weight.
        """
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def _per_channel(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Quantized weight through the op contracts (``pdquant_fast.ops``), any backend.

        ``nearest``: ``fake_quant_act`` per output channel (axis 0); ``soft``: the fused
        ``adaround_soft`` (soft weight + regulariser, stored in :attr:`last_reg`, with exponent
        :attr:`beta`); ``hard``: ``adaround_hard`` codes, dequantized.
        """
        if not self.enabled:
            return w
        delta = self._per_channel(self.delta)
        zp = self._per_channel(self.zp)
        if self.mode == "nearest":
            return ops.fake_quant_act_eager(
                w.contiguous(), delta, zp, self.bits, 0, 1.0, None, None
            )
        if self.mode == "soft":
            w_floor = self.w_floor
            if w_floor is None or w_floor.shape != w.shape:
                w_floor = torch.floor(w / self.delta).contiguous()
            w_q, self.last_reg = ops.adaround_soft_eager(
                w_floor, self.alpha, delta, zp, self.bits, self.beta
            )
            return w_q
        if self.mode == "hard":
            return (self._hard_codes(w).to(w.dtype) - self.zp) * self.delta
        raise ValueError(f"unknown weight quantizer mode {self.mode!r}")

    @torch.no_grad()
    def int_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes ``0..n`` (float32) of the current (non-soft) quantization of ``w``."""
        if self.mode == "soft":
            raise RuntimeError("finalise AdaRound (hard rounding) before exporting integer weights")
        if self.mode == "hard":
            return self._hard_codes(w).to(w.dtype)
        return quantize_int(w, self.delta, self.zp, self.bits)

    def _hard_codes(self, w: torch.Tensor) -> torch.Tensor:
        """uint8 codes of hard AdaRound rounding (the ``adaround_hard`` op)."""
        w_floor = torch.floor(w / self.delta).contiguous()
        zp = self._per_channel(self.zp)
        return ops.adaround_hard(w_floor, self.alpha.detach().contiguous(), zp, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}, enabled={self.enabled}"


class ActQuantizer(nn.Module):
    """Per-tensor activation fake-quant with a learnable step and QDrop (spec §7.1).

    ``delta`` is a scalar ``nn.Parameter`` after :meth:`init_from`; ``zp`` a fixed scalar buffer.
    In QDrop mode each element keeps its quantized value with probability ``keep_prob`` and its
    full-precision value otherwise, with a fresh mask every forward (spec §6.2 item 6: the
    probability is of *keeping* the quantized value).
    """

    def __init__(self, bits: int, name: str = ""):
        super().__init__()
        self.bits = check_bits(bits, "activation bit-width")
        self.name = name
        self.delta = nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.register_buffer("zp", torch.tensor(0.0))
        self.initialised = False
        self.enabled = False  # switched on by the engine
        self.observe = False  # collect inputs for init
        self.keep_prob = 1.0  # 1.0 = no QDrop
        self.generator: torch.Generator | None = None
        # Optional device-resident int64 counter used as the QDrop seed (incremented in place
        # every forward) instead of the CPU generator: no host->device copy, so a whole
        # reconstruction step can be captured in a CUDA graph and replayed with fresh masks.
        self.seed_counter: torch.Tensor | None = None
        self.signed = False
        self.max_score_elems: int | None = 1 << 16

    @property
    def n(self) -> int:
        return 2**self.bits - 1

    def set_bits(self, bits: int) -> None:
        self.bits = check_bits(bits, "activation bit-width")
        self.initialised = False

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """Official activation init (spec §1.4): per tensor, 1-D search if one-sided, else 2-D.

        Scores on at most ``self.max_score_elems`` elements (see :func:`init_qparams`).
        """
        d, z, side = init_qparams(x, self.bits, False, self.max_score_elems)
        self.delta.data = d.reshape(()).clone()
        self.zp = z.reshape(()).clone()
        self.signed = side != "pos"
        self.initialised = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe:
            self.init_from(x.detach())
        if not self.enabled:
            return x
        if not self.initialised:
            raise RuntimeError(f"activation quantizer {self.name} used before initialisation")
        seed = None
        if self.keep_prob < 1.0:
            # A fresh QDrop mask every forward: the kernel hashes (seed, element index); the
            # seed comes from the engine's CPU generator (no device sync), or from a device
            # counter (see seed_counter).
            if self.seed_counter is not None:
                seed = self.seed_counter.add_(1).clone()
            else:
                s = draw_seed(self.generator)
                # a fill kernel on x's device, not a copy from host memory (which would make the
                # host wait for the GPU)
                seed = torch.full((), s, dtype=torch.int64, device=x.device)
        return ops.fake_quant_act_eager(
            x.contiguous(), self.delta, self.zp, self.bits, -1, self.keep_prob, seed, None
        )

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, enabled={self.enabled}, signed={self.signed}, "
            f"keep_prob={self.keep_prob}"
        )


def draw_seed(gen: torch.Generator) -> int:
    """One seed in [0, 2**62) from the CPU generator ``gen`` (QDrop masks, device generators):
    a host-side draw, so no tensor on an accelerator is read back for it."""
    return int(torch.randint(0, 2**62, (), generator=gen, device="cpu"))


def lp_loss(pred: torch.Tensor, target: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Official ``lp_loss``: ``|pred - target|^p`` summed over dim 1, averaged over the rest."""
    return (pred - target).abs().pow(p).sum(1).mean()


def kl_prediction_loss(z_q: torch.Tensor, z_fp: torch.Tensor, temperature: float) -> torch.Tensor:
    """PD loss: ``KL(softmax(z_fp/T) || softmax(z_q/T))``, batchmean, no ``T**2`` (spec §2.3)."""
    log_q = torch.log_softmax(z_q / temperature, dim=1)
    log_p = torch.log_softmax(z_fp / temperature, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum() / z_q.shape[0]


class LinearTempDecay:
    """AdaRound beta: ``end + (start - end) * max(0, 1 - (t - wN) / ((1 - w)N))`` after warm-up."""

    def __init__(self, t_max: int, warmup: float = 0.2, start_b: float = 20.0, end_b: float = 2.0):
        self.t_max = t_max
        self.start_decay = warmup * t_max
        self.start_b = start_b
        self.end_b = end_b

    def __call__(self, t: int) -> float:
        if t < self.start_decay:
            return self.start_b
        rel_t = (t - self.start_decay) / (self.t_max - self.start_decay)
        return self.end_b + (self.start_b - self.end_b) * max(0.0, 1 - rel_t)
