"""The op contracts: every ``torch.library`` schema of pdquant-fast, in this one file.

Each op here has a fake (meta) kernel, so it traces under ``torch.compile`` / ``torch.export``;
the differentiable ones have autograd formulas that call their backward op; every op validates its
inputs (dtype, device, contiguity, shapes, bit-width) with an error that names what was wrong and
what is allowed. The implementation that runs is picked by :mod:`pdquant_fast.ops.backends`
(reference, C++, Triton or CUDA; ``PDQUANT_KERNELS`` forces one); all of them have the signature of
the reference in :mod:`pdquant_fast.ops.reference`, where the exact math is written down.

Ops (namespace ``pdquant``):

* ``fake_quant_act(x, delta, zero_point, bits, axis, keep_prob, seed?, mask?) -> y`` and its
  ``fake_quant_act_backward(grad, ...) -> (grad_x, grad_delta)``: learnable-step fake-quant with
  QDrop, per tensor or per channel (used for activations and round-to-nearest weights);
* ``adaround_soft(w_floor, alpha, delta, zero_point, bits, beta) -> (w_q, reg)`` and
  ``adaround_soft_backward(grad_wq, grad_reg, ...) -> grad_alpha``: AdaRound soft weight and its
  regulariser in one pass;
* ``adaround_hard(w_floor, alpha, zero_point, bits) -> codes``: final integer codes (uint8);
* ``mse_search_2d(x, bits, steps, x_min?, x_max?) -> (delta, zero_point)``: the L2.4
  initialisation search (optionally over a given clip range per row);
* ``bn_stat_loss(x, mean, std) -> (loss, m, s)`` and ``bn_stat_loss_backward(grad, x, mean, std,
  m, s) -> grad_x``: the per-sample BatchNorm-statistic loss of distribution correction;
* ``dc_adam_step(x, x0, g, m, v, kc, step, b1, b2, sqrt_bc2, eps) -> (x_new, close)``: its input
  update (closeness gradient + Adam, ``m`` and ``v`` in place) in one pass.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import backends

OP_BITS = (2, 3, 4, 5, 6, 7, 8)
backends.register_op("fake_quant_act", OP_BITS)
backends.register_op("fake_quant_act_backward", OP_BITS)
backends.register_op("adaround_soft", OP_BITS)
backends.register_op("adaround_soft_backward", OP_BITS)
backends.register_op("adaround_hard", OP_BITS)
backends.register_op("mse_search_2d", OP_BITS)
# distribution correction: a C++ CPU kernel and the reference (which runs on GPU as it is)
_DC_BACKENDS = ("reference", "cpp")
backends.register_op("bn_stat_loss", None, _DC_BACKENDS)
backends.register_op("bn_stat_loss_backward", None, _DC_BACKENDS)
backends.register_op("dc_adam_step", None, _DC_BACKENDS)

#: Largest tensor the in-kernel QDrop hash can index (flat uint32 index).
MAX_HASH_NUMEL = 1 << 32


class OpInputError(ValueError):
    """An op was called with a tensor or argument it does not accept."""


def _check_tensor(
    name: str,
    t: Tensor,
    dtype: torch.dtype,
    device: torch.device,
    channels_last_ok: bool = False,
) -> None:
    """``t`` a contiguous tensor of ``dtype`` on ``device`` (or, with ``channels_last_ok``, a
    4-d channels_last one)."""
    if not isinstance(t, Tensor):
        raise OpInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise OpInputError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise OpInputError(f"{name} is on {t.device} but the input is on {device}; use one device")
    if t.is_contiguous():
        return
    if channels_last_ok:
        if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
            return
        raise OpInputError(f"{name} must be contiguous (call .contiguous() first) or channels_last")
    raise OpInputError(f"{name} must be contiguous (call .contiguous() first)")


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in OP_BITS:
        raise OpInputError(f"bits must be one of {list(OP_BITS)}, got {bits!r}")


# Deferred step checks (see deferred_checks): nesting depth, and per device a 0-d bool tensor on
# that device, "every step seen so far was valid".
_DEFER_DEPTH = 0
_PENDING: dict[torch.device, Tensor] = {}


@contextlib.contextmanager
def deferred_checks():
    """Check quantization steps without a host sync inside this block.

    Outside it, the fake-quant and AdaRound ops check that every step (``delta``) is finite and
    > 0 before they run, which on a GPU costs a host sync per call: the host waits for the GPU,
    then launches the next kernels while the GPU idles. Inside it, the verdict is computed on the
    device (four tiny kernels, no sync) and accumulated; :func:`check_deferred` reads it, once,
    when the outermost block ends normally (and wherever a caller calls it), and raises
    :class:`OpInputError` if any step seen was invalid. The offending call is then not known,
    and ops run on the invalid steps until the check (their outputs are NaN or Inf, nothing
    crashes). A step-size check inside a CUDA-graph capture is skipped either way. The
    calibration engine runs its reconstruction loop on a GPU inside this block."""
    global _DEFER_DEPTH
    _DEFER_DEPTH += 1
    ok = False
    try:
        yield
        ok = True
    finally:
        _DEFER_DEPTH -= 1
        if not ok and _DEFER_DEPTH == 0:
            _PENDING.clear()  # an exception is already on its way: do not mask it
    if _DEFER_DEPTH == 0:
        check_deferred()


def check_deferred() -> None:
    """Raise :class:`OpInputError` if a step checked inside :func:`deferred_checks` since the
    last call was invalid (one host sync per device with pending verdicts; none without)."""
    if any(d.type == "cuda" for d in _PENDING) and torch.cuda.is_current_stream_capturing():
        return
    pending = list(_PENDING.items())
    _PENDING.clear()
    for dev, ok in pending:
        if not bool(ok):
            raise OpInputError(
                f"delta (the quantization step) must be finite and > 0; an invalid value reached "
                f"a fake-quant or AdaRound op on {dev} (checked without a host sync inside "
                "ops.deferred_checks(), so the call is not known; outside that block every call "
                "is checked as it is made)"
            )


def _check_delta_values(delta: Tensor) -> None:
    """Every step must be finite and > 0 (a zero step divides by zero, a negative one flips
    the grid). One reduction; on a GPU it costs one host sync, skipped while a CUDA graph is
    being captured (where a sync is not allowed) and deferred inside :func:`deferred_checks`."""
    if delta.numel() == 0:
        return
    if delta.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    if _DEFER_DEPTH:
        # log: NaN below 0, -inf at 0, +inf at +inf, NaN at NaN; finite exactly where valid
        ok = torch.isfinite(torch.log(delta.detach())).all()
        prev = _PENDING.get(delta.device)
        _PENDING[delta.device] = ok if prev is None else prev.logical_and_(ok)
        return
    ok = (delta > 0) & (delta < float("inf"))  # NaN fails both comparisons
    if not bool(ok.all()):
        bad = delta[~ok].reshape(-1)[:3].tolist()
        raise OpInputError(
            f"delta (the quantization step) must be finite and > 0; got {int((~ok).sum())} "
            f"invalid value(s), e.g. {bad}"
        )


def _check_qparams(x: Tensor, delta: Tensor, zero_point: Tensor, axis: int, bits: int) -> None:
    """``delta``/``zero_point``: float32, ``[]`` or ``[x.shape[axis]]``; ``axis`` valid;
    ``delta`` finite and > 0."""
    _check_tensor("x", x, torch.float32, x.device)
    _check_tensor("delta", delta, torch.float32, x.device)
    _check_tensor("zero_point", zero_point, torch.float32, x.device)
    _check_bits(bits)
    if delta.shape != zero_point.shape:
        raise OpInputError(
            f"delta {tuple(delta.shape)} and zero_point {tuple(zero_point.shape)} "
            "must have one shape"
        )
    if delta.dim() == 1:
        if x.dim() == 0 or not -x.dim() <= axis < x.dim():
            raise OpInputError(f"axis {axis} is out of range for x of shape {tuple(x.shape)}")
        if delta.shape[0] != x.shape[axis]:
            raise OpInputError(
                f"per-channel delta has {delta.shape[0]} entries but x.shape[{axis}] is "
                f"{x.shape[axis]}"
            )
    elif delta.dim() != 0:
        raise OpInputError(
            f"delta must be 0-d (per tensor) or 1-d (per channel), got {delta.dim()}-d"
        )
    if x.numel() >= MAX_HASH_NUMEL:
        raise OpInputError(
            f"x has {x.numel()} elements; at most {MAX_HASH_NUMEL - 1} are supported"
        )
    _check_delta_values(delta)


def _check_drop(x: Tensor, keep_prob: float, seed: Tensor | None, mask: Tensor | None) -> None:
    if not 0.0 < keep_prob <= 1.0:
        raise OpInputError(f"keep_prob must be in (0, 1], got {keep_prob!r}")
    if seed is not None and mask is not None:
        raise OpInputError("give either seed (mask drawn in the kernel) or mask, not both")
    if mask is not None:
        _check_tensor("mask", mask, torch.bool, x.device)
        if mask.shape != x.shape:
            raise OpInputError(f"mask {tuple(mask.shape)} must have x's shape {tuple(x.shape)}")
    if seed is not None:
        _check_tensor("seed", seed, torch.int64, x.device)
        if seed.dim() != 0:
            raise OpInputError(f"seed must be a 0-d int64 tensor, got shape {tuple(seed.shape)}")
        if keep_prob >= 1.0:
            raise OpInputError(
                "a seed was given with keep_prob=1 (nothing to drop); pass seed=None"
            )


def _run(op: str, device: torch.device, bits: int | None):
    return backends.choose(op, device.type, bits)[1]


# --------------------------------------------------------------------------------------------
# fake_quant_act


@torch.library.custom_op("pdquant::fake_quant_act", mutates_args=())
def fake_quant_act(
    x: Tensor,
    delta: Tensor,
    zero_point: Tensor,
    bits: int,
    axis: int,
    keep_prob: float,
    seed: Tensor | None,
    mask: Tensor | None,
) -> Tensor:
    """Fake-quant with QDrop: see :func:`~pdquant_fast.ops.reference.fake_quant_act_reference`."""
    _check_qparams(x, delta, zero_point, axis, bits)
    _check_drop(x, keep_prob, seed, mask)
    return _run("fake_quant_act", x.device, bits)(
        x, delta, zero_point, bits, axis, keep_prob, seed, mask
    )


@fake_quant_act.register_fake
def _(x, delta, zero_point, bits, axis, keep_prob, seed, mask):
    return torch.empty_like(x)


@torch.library.custom_op("pdquant::fake_quant_act_backward", mutates_args=())
def fake_quant_act_backward(
    grad: Tensor,
    x: Tensor,
    delta: Tensor,
    zero_point: Tensor,
    bits: int,
    axis: int,
    keep_prob: float,
    seed: Tensor | None,
    mask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_delta)``: see :func:`~.reference.fake_quant_act_backward_reference`."""
    _check_qparams(x, delta, zero_point, axis, bits)
    _check_drop(x, keep_prob, seed, mask)
    _check_tensor("grad", grad, torch.float32, x.device)
    if grad.shape != x.shape:
        raise OpInputError(f"grad {tuple(grad.shape)} must have x's shape {tuple(x.shape)}")
    return _run("fake_quant_act_backward", x.device, bits)(
        grad, x, delta, zero_point, bits, axis, keep_prob, seed, mask
    )


@fake_quant_act_backward.register_fake
def _(grad, x, delta, zero_point, bits, axis, keep_prob, seed, mask):
    return torch.empty_like(x), torch.empty_like(delta)


def _fq_setup(ctx, inputs, output):
    x, delta, zero_point, bits, axis, keep_prob, seed, mask = inputs
    ctx.save_for_backward(x, delta, zero_point, seed, mask)
    ctx.bits, ctx.axis, ctx.keep_prob = bits, axis, keep_prob


def _fq_grads(ctx, grad, backward):
    """The inputs' gradients from ``backward`` (the op, or the chosen kernel directly)."""
    x, delta, zero_point, seed, mask = ctx.saved_tensors
    gx, gd = backward(
        grad.contiguous(), x, delta, zero_point, ctx.bits, ctx.axis, ctx.keep_prob, seed, mask
    )
    return gx, gd, None, None, None, None, None, None


def _fq_backward(ctx, grad):
    return _fq_grads(ctx, grad, fake_quant_act_backward)


fake_quant_act.register_autograd(_fq_backward, setup_context=_fq_setup)


# --------------------------------------------------------------------------------------------
# adaround


def _check_adaround(
    w_floor: Tensor, alpha: Tensor | None, delta: Tensor | None, zero_point: Tensor, bits: int
) -> None:
    _check_tensor("w_floor", w_floor, torch.float32, w_floor.device)
    if w_floor.dim() < 1:
        raise OpInputError("w_floor must have an output-channel axis 0, got a 0-d tensor")
    if alpha is not None:
        _check_tensor("alpha", alpha, torch.float32, w_floor.device)
        if alpha.shape != w_floor.shape:
            raise OpInputError(
                f"alpha {tuple(alpha.shape)} must have w_floor's shape {tuple(w_floor.shape)}"
            )
    c = w_floor.shape[0]
    for name, t in (("delta", delta), ("zero_point", zero_point)):
        if t is None:
            continue
        _check_tensor(name, t, torch.float32, w_floor.device)
        if t.shape != (c,):
            raise OpInputError(
                f"{name} must have shape [{c}] (one per output channel), got {tuple(t.shape)}"
            )
    _check_bits(bits)
    if delta is not None:
        _check_delta_values(delta)


def _check_beta(beta: Tensor, device: torch.device) -> None:
    _check_tensor("beta", beta, torch.float32, device)
    if beta.dim() != 0:
        raise OpInputError(f"beta must be a 0-d float32 tensor, got shape {tuple(beta.shape)}")


@torch.library.custom_op("pdquant::adaround_soft", mutates_args=())
def adaround_soft(
    w_floor: Tensor, alpha: Tensor, delta: Tensor, zero_point: Tensor, bits: int, beta: Tensor
) -> tuple[Tensor, Tensor]:
    """``(w_q, reg)``: see :func:`~pdquant_fast.ops.reference.adaround_soft_reference`."""
    _check_adaround(w_floor, alpha, delta, zero_point, bits)
    _check_beta(beta, w_floor.device)
    return _run("adaround_soft", w_floor.device, bits)(
        w_floor, alpha, delta, zero_point, bits, beta
    )


@adaround_soft.register_fake
def _(w_floor, alpha, delta, zero_point, bits, beta):
    return torch.empty_like(w_floor), w_floor.new_empty(())


@torch.library.custom_op("pdquant::adaround_soft_backward", mutates_args=())
def adaround_soft_backward(
    grad_wq: Tensor,
    grad_reg: Tensor,
    w_floor: Tensor,
    alpha: Tensor,
    delta: Tensor,
    zero_point: Tensor,
    bits: int,
    beta: Tensor,
) -> Tensor:
    """``grad_alpha``: see :func:`~.reference.adaround_soft_backward_reference`."""
    _check_adaround(w_floor, alpha, delta, zero_point, bits)
    _check_beta(beta, w_floor.device)
    _check_tensor("grad_wq", grad_wq, torch.float32, w_floor.device)
    _check_tensor("grad_reg", grad_reg, torch.float32, w_floor.device)
    if grad_wq.shape != w_floor.shape or grad_reg.dim() != 0:
        raise OpInputError("grad_wq must have w_floor's shape and grad_reg must be 0-d")
    return _run("adaround_soft_backward", w_floor.device, bits)(
        grad_wq, grad_reg, w_floor, alpha, delta, zero_point, bits, beta
    )


@adaround_soft_backward.register_fake
def _(grad_wq, grad_reg, w_floor, alpha, delta, zero_point, bits, beta):
    return torch.empty_like(alpha)


def _ada_setup(ctx, inputs, output):
    w_floor, alpha, delta, zero_point, bits, beta = inputs
    ctx.save_for_backward(w_floor, alpha, delta, zero_point, beta)
    ctx.bits = bits


def _ada_grads(ctx, grad_wq, grad_reg, backward):
    """The inputs' gradients from ``backward`` (the op, or the chosen kernel directly)."""
    w_floor, alpha, delta, zero_point, beta = ctx.saved_tensors
    if grad_wq is None:
        grad_wq = torch.zeros_like(w_floor)
    if grad_reg is None:
        grad_reg = w_floor.new_zeros(())
    g = backward(
        grad_wq.contiguous(),
        grad_reg.contiguous(),
        w_floor,
        alpha,
        delta,
        zero_point,
        ctx.bits,
        beta,
    )
    return None, g, None, None, None, None


def _ada_backward(ctx, grad_wq, grad_reg):
    return _ada_grads(ctx, grad_wq, grad_reg, adaround_soft_backward)


adaround_soft.register_autograd(_ada_backward, setup_context=_ada_setup)


# --------------------------------------------------------------------------------------------
# eager fast path of the differentiable calibration ops


def _fq_backward_kernel(grad, x, delta, zero_point, bits, axis, keep_prob, seed, mask):
    # the step was checked in the forward, and autograd's saved-tensor version check guarantees
    # it has not changed since (no second check, no second sync on a GPU)
    _check_tensor("grad", grad, torch.float32, x.device)
    fn = _run("fake_quant_act_backward", x.device, bits)
    return fn(grad, x, delta, zero_point, bits, axis, keep_prob, seed, mask)


def _ada_backward_kernel(grad_wq, grad_reg, w_floor, alpha, delta, zero_point, bits, beta):
    fn = _run("adaround_soft_backward", w_floor.device, bits)
    return fn(grad_wq, grad_reg, w_floor, alpha, delta, zero_point, bits, beta)


def _eager_function(name: str, op: str, setup, grads, backward_kernel):
    """A plain ``torch.autograd.Function`` (the eager fast path of ``op``): the op's own setup
    and gradient formula (``setup``, ``grads``) around the chosen kernels, called directly."""

    def forward(ctx, *inputs):
        setup(ctx, inputs, None)
        return _run(op, inputs[0].device, ctx.bits)(*inputs)

    def backward(ctx, *grad_outputs):
        return grads(ctx, *grad_outputs, backward_kernel)

    # type(): the Function's name also names its autograd node (``<name>Backward`` in profiles)
    return type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )


_FakeQuantEager = _eager_function(
    "_FakeQuantEager", "fake_quant_act", _fq_setup, _fq_grads, _fq_backward_kernel
)
_AdaRoundSoftEager = _eager_function(
    "_AdaRoundSoftEager", "adaround_soft", _ada_setup, _ada_grads, _ada_backward_kernel
)


def fake_quant_act_eager(
    x: Tensor,
    delta: Tensor,
    zero_point: Tensor,
    bits: int,
    axis: int,
    keep_prob: float,
    seed: Tensor | None,
    mask: Tensor | None,
) -> Tensor:
    """:func:`fake_quant_act` for eager autograd, without ``torch.library``'s dispatch.

    The same input checks, the same chosen kernels (forward and backward) and the same gradients
    bit for bit, through a plain ``torch.autograd.Function``: a custom op's Python dispatch and
    autograd wrapper cost more host time per call than the kernel itself (this CPU, one forward
    + backward of a small tensor: 190 -> 82 us; AdaRound 227 -> 120 us; on the H200 the eager
    op took 0.6-0.9 ms for 0.08 ms of GPU work). Under ``torch.compile`` it is the op itself
    (traceable), so the quantizer modules can call this in every mode."""
    if torch.compiler.is_compiling():
        return fake_quant_act(x, delta, zero_point, bits, axis, keep_prob, seed, mask)
    _check_qparams(x, delta, zero_point, axis, bits)
    _check_drop(x, keep_prob, seed, mask)
    return _FakeQuantEager.apply(x, delta, zero_point, bits, axis, keep_prob, seed, mask)


def adaround_soft_eager(
    w_floor: Tensor, alpha: Tensor, delta: Tensor, zero_point: Tensor, bits: int, beta: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`adaround_soft` for eager autograd, without ``torch.library``'s dispatch (see
    :func:`fake_quant_act_eager`); the op itself under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return adaround_soft(w_floor, alpha, delta, zero_point, bits, beta)
    _check_adaround(w_floor, alpha, delta, zero_point, bits)
    _check_beta(beta, w_floor.device)
    return _AdaRoundSoftEager.apply(w_floor, alpha, delta, zero_point, bits, beta)


@torch.library.custom_op("pdquant::adaround_hard", mutates_args=())
def adaround_hard(w_floor: Tensor, alpha: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """uint8 codes: see :func:`~pdquant_fast.ops.reference.adaround_hard_reference`."""
    _check_adaround(w_floor, alpha, None, zero_point, bits)
    return _run("adaround_hard", w_floor.device, bits)(w_floor, alpha, zero_point, bits)


@adaround_hard.register_fake
def _(w_floor, alpha, zero_point, bits):
    return torch.empty_like(w_floor, dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# initialisation search


@torch.library.custom_op("pdquant::mse_search_2d", mutates_args=())
def mse_search_2d(
    x: Tensor,
    bits: int,
    steps: int,
    x_min: Tensor | None = None,
    x_max: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(delta [C], zero_point [C])``: see :func:`~.reference.mse_search_2d_reference`.

    ``x_min``/``x_max`` (float32 ``[C]``, both or neither): the clip range of each row instead of
    its own minimum and maximum, e.g. the range of a whole tensor whose subsample is the row.
    They must contain the row (``x_min[c] <= min(x[c])``, ``x_max[c] >= max(x[c])``).
    """
    _check_tensor("x", x, torch.float32, x.device)
    _check_bits(bits)
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise OpInputError(f"x must be a non-empty 2-d [C, K] tensor, got {tuple(x.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise OpInputError(f"steps must be a positive int, got {steps!r}")
    if not torch.isfinite(x).all():
        raise OpInputError("x contains NaN or Inf; the search needs finite values")
    if (x_min is None) != (x_max is None):
        raise OpInputError("give both x_min and x_max (the clip range of each row), or neither")
    if x_min is not None:
        for name, t in (("x_min", x_min), ("x_max", x_max)):
            _check_tensor(name, t, torch.float32, x.device)
            if t.shape != (x.shape[0],):
                raise OpInputError(
                    f"{name} must have shape [C] = ({x.shape[0]},), got {tuple(t.shape)}"
                )
            if not torch.isfinite(t).all():
                raise OpInputError(f"{name} contains NaN or Inf; the range must be finite")
        if bool((x_min > x.amin(dim=1)).any()) or bool((x_max < x.amax(dim=1)).any()):
            raise OpInputError(
                "x_min/x_max must contain every element of their row "
                "(x_min[c] <= min(x[c]) and x_max[c] >= max(x[c]))"
            )
    return _run("mse_search_2d", x.device, bits)(x, bits, steps, x_min, x_max)


@mse_search_2d.register_fake
def _(x, bits, steps, x_min=None, x_max=None):
    return x.new_empty(x.shape[0]), x.new_empty(x.shape[0])


# --------------------------------------------------------------------------------------------
# distribution correction


def _check_dense4(name: str, t: Tensor, device: torch.device) -> None:
    """A float32 ``[B, C, H, W]`` tensor on ``device``, contiguous or channels_last."""
    _check_tensor(name, t, torch.float32, device, channels_last_ok=True)
    if t.dim() != 4:
        raise OpInputError(f"{name} must be 4-d [B, C, H, W], got shape {tuple(t.shape)}")


def _check_bn_stat(x: Tensor, mean: Tensor, std: Tensor) -> None:
    _check_dense4("x", x, x.device if isinstance(x, Tensor) else None)
    if x.shape[2] * x.shape[3] < 2:
        raise OpInputError(
            f"H * W must be >= 2 for the unbiased variance, got {tuple(x.shape[2:])}"
        )
    for name, t in (("mean", mean), ("std", std)):
        _check_tensor(name, t, torch.float32, x.device)
        if t.dim() != 1 or t.shape[0] != x.shape[1]:
            raise OpInputError(
                f"{name} must be [C] = [{x.shape[1]}] (one value per channel of x), "
                f"got {tuple(t.shape)}"
            )


@torch.library.custom_op("pdquant::bn_stat_loss", mutates_args=())
def bn_stat_loss(x: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss [B], m [B, C], s [B, C])``: see :func:`~.reference.bn_stat_loss_reference`.
    Differentiable in ``x`` through ``loss`` (``m`` and ``s`` are not differentiable)."""
    _check_bn_stat(x, mean, std)
    return _run("bn_stat_loss", x.device, None)(x, mean, std)


@bn_stat_loss.register_fake
def _(x, mean, std):
    b, c = x.shape[0], x.shape[1]
    return x.new_empty(b), x.new_empty(b, c), x.new_empty(b, c)


@torch.library.custom_op("pdquant::bn_stat_loss_backward", mutates_args=())
def bn_stat_loss_backward(
    grad: Tensor, x: Tensor, mean: Tensor, std: Tensor, m: Tensor, s: Tensor
) -> Tensor:
    """``grad_x``: see :func:`~.reference.bn_stat_loss_backward_reference`."""
    _check_bn_stat(x, mean, std)
    b, c = x.shape[0], x.shape[1]
    _check_tensor("grad", grad, torch.float32, x.device)
    if grad.shape != (b,):
        raise OpInputError(f"grad must be [B] = [{b}], got {tuple(grad.shape)}")
    for name, t in (("m", m), ("s", s)):
        _check_tensor(name, t, torch.float32, x.device)
        if t.shape != (b, c):
            raise OpInputError(f"{name} must be [B, C] = [{b}, {c}], got {tuple(t.shape)}")
    return _run("bn_stat_loss_backward", x.device, None)(grad, x, mean, std, m, s)


@bn_stat_loss_backward.register_fake
def _(grad, x, mean, std, m, s):
    return torch.empty_like(x)


def _bn_stat_setup(ctx, inputs, output):
    x, mean, std = inputs
    _, m, s = output
    ctx.mark_non_differentiable(m, s)
    ctx.save_for_backward(x, mean, std, m, s)


def _bn_stat_backward(ctx, grad_loss, grad_m, grad_s):
    x, mean, std, m, s = ctx.saved_tensors
    return bn_stat_loss_backward(grad_loss.contiguous(), x, mean, std, m, s), None, None


bn_stat_loss.register_autograd(_bn_stat_backward, setup_context=_bn_stat_setup)


@torch.library.custom_op("pdquant::dc_adam_step", mutates_args=("m", "v"))
def dc_adam_step(
    x: Tensor,
    x0: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    kc: Tensor,
    step: Tensor,
    b1: float,
    b2: float,
    sqrt_bc2: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """``(x_new, close [B])``, ``m`` and ``v`` updated in place: see
    :func:`~.reference.dc_adam_step_reference`."""
    _check_dense4("x", x, x.device if isinstance(x, Tensor) else None)
    for name, t in (("x0", x0), ("g", g), ("m", m), ("v", v)):
        _check_dense4(name, t, x.device)
        if t.shape != x.shape or t.stride() != x.stride():
            raise OpInputError(
                f"{name} must have x's shape {tuple(x.shape)} and strides {x.stride()} (the same "
                f"memory format), got {tuple(t.shape)} / {t.stride()}"
            )
    for name, t in (("kc", kc), ("step", step)):
        _check_tensor(name, t, torch.float32, x.device)
        if t.shape != (x.shape[0],):
            raise OpInputError(f"{name} must be [B] = [{x.shape[0]}], got {tuple(t.shape)}")
    for name, val in (("b1", b1), ("b2", b2)):
        if not 0.0 <= val < 1.0:
            raise OpInputError(f"{name} must be in [0, 1), got {val!r}")
    if not sqrt_bc2 > 0.0 or not eps > 0.0:
        raise OpInputError(f"sqrt_bc2 and eps must be > 0, got {sqrt_bc2!r} and {eps!r}")
    return _run("dc_adam_step", x.device, None)(
        x, x0, g, m, v, kc, step, float(b1), float(b2), float(sqrt_bc2), float(eps)
    )


@dc_adam_step.register_fake
def _(x, x0, g, m, v, kc, step, b1, b2, sqrt_bc2, eps):
    return torch.empty_like(x), x.new_empty(x.shape[0])


# --------------------------------------------------------------------------------------------
# deployment (packed low-bit inference)
#
# pack(codes, bits) -> packed, unpack(packed, bits, k) -> codes: the storage format of weight
# codes (little-endian within a byte, rows padded to whole bytes; see reference.pack_reference).
# qconv2d / qlinear: integer accumulation of (x - x_zp) * w in int32 (exact), then the fused
# requantisation y = float(acc) * scale + bias (+ residual), activation, and either float32 y
# (out_bits = 0) or uint8 codes clamp(round_half_even(y / out_scale) + out_zp, 0, 2^out_bits - 1).
# The residual is float32 values or uint8 activation codes with (res_scale, res_zp): the kernel
# then dequantizes it as (float32(code) - res_zp) * res_scale, the runtime's dequantize bit for
# bit, so a skip connection stays low-bit in memory.
# The exact math is in reference.qconv2d_reference; backends: <op>_cpu (pdquant_fast._C),
# <op>_triton (pdquant_fast.kernels), <op>_cuda. A backend may offer a weight prepack (not an op):
# ``qconv2d_prepack_<backend>(w, groups) -> object`` / ``qlinear_prepack_<backend>(w) -> object``;
# the packed runtime calls it once per device (pdquant_fast.deploy.runtime) and passes its result
# in place of ``w`` to that backend's own entry point ``<op>_<backend>``, which must then accept
# it; the ops below always take the plain int8/int16 ``w``.

PACK_BITS = (2, 4, 8)
QOUT_BITS = (0, 2, 3, 4, 5, 6, 7, 8)  # 0: float32 output
QACT = {0: "none", 1: "relu", 2: "relu6"}
#: Largest |acc| the int32 accumulator holds; validation rejects shapes that could exceed it.
ACC_LIMIT = (1 << 31) - 1

backends.register_op("pack", PACK_BITS)
backends.register_op("unpack", PACK_BITS)
backends.register_op("qconv2d", None)
backends.register_op("qlinear", None)
backends.register_op("quantize_codes", None)
backends.register_op("max_pool2d_codes", None)
backends.register_op("dequantize_codes", None)


def _check_pack_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in PACK_BITS:
        raise OpInputError(f"pack bits must be one of {list(PACK_BITS)}, got {bits!r}")


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes per packed row of ``k`` codes at ``bits``: ``ceil(k * bits / 8)``."""
    return (k * bits + 7) // 8


@torch.library.custom_op("pdquant::pack", mutates_args=())
def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 ``[O, K]`` codes in ``0..2^bits-1`` -> uint8 ``[O, ceil(K*bits/8)]``.

    See :func:`~pdquant_fast.ops.reference.pack_reference` for the bit layout.
    """
    _check_tensor("codes", codes, torch.uint8, codes.device)
    _check_pack_bits(bits)
    if codes.dim() != 2:
        raise OpInputError(f"codes must be 2-d [O, K], got shape {tuple(codes.shape)}")
    if bits < 8 and codes.numel() and int(codes.max()) >= 1 << bits:
        raise OpInputError(
            f"codes must lie in 0..{(1 << bits) - 1} for {bits}-bit packing, "
            f"found {int(codes.max())}"
        )
    return _run("pack", codes.device, bits)(codes, bits)


@pack.register_fake
def _(codes, bits):
    return codes.new_empty((codes.shape[0], packed_row_bytes(codes.shape[1], bits)))


@torch.library.custom_op("pdquant::unpack", mutates_args=())
def unpack(packed: Tensor, bits: int, k: int) -> Tensor:
    """uint8 ``[O, ceil(k*bits/8)]`` -> uint8 codes ``[O, k]`` (inverse of :func:`pack`)."""
    _check_tensor("packed", packed, torch.uint8, packed.device)
    _check_pack_bits(bits)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise OpInputError(f"k must be a non-negative int, got {k!r}")
    if packed.dim() != 2 or packed.shape[1] != packed_row_bytes(k, bits):
        raise OpInputError(
            f"packed must be 2-d [O, {packed_row_bytes(k, bits)}] for k={k} at {bits} bits, "
            f"got shape {tuple(packed.shape)}"
        )
    return _run("unpack", packed.device, bits)(packed, bits, k)


@unpack.register_fake
def _(packed, bits, k):
    return packed.new_empty((packed.shape[0], k))


def _check_dtype_any_strides(name: str, t, dtype: torch.dtype, what: str) -> None:
    """``t`` a tensor of ``dtype`` (any strides: the op keeps its memory format)."""
    if not isinstance(t, Tensor) or t.dtype != dtype:
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise OpInputError(f"{name} must be a {what}, got {got}")


def _check_step(delta) -> None:
    """An activation quantizer's step: a Python number, finite and > 0 once in float32."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)):
        raise OpInputError(f"delta must be a float, got {type(delta).__name__}")
    d32 = float(torch.tensor(float(delta), dtype=torch.float32))
    if not (0.0 < d32 < float("inf")):
        raise OpInputError(f"delta must be finite and > 0 in float32, got {delta!r}")


@torch.library.custom_op("pdquant::quantize_codes", mutates_args=())
def quantize_codes(
    x: Tensor, delta: float, zp: int, bits: int, channels_last: bool = False
) -> Tensor:
    """float32 activations -> uint8 codes ``clamp(round_half_even(x / delta) + zp, 0,
    2^bits - 1)`` (float32, true division): the activation quantizer's codes, as the packed
    runtime feeds them to ``qconv2d``/``qlinear``. Output: ``x``'s shape and memory format, or
    with ``channels_last`` (4-d ``x`` only) channels_last codes (the image -> integer-stem
    step of a channels_last runtime, without a separate layout copy). See
    :func:`~.reference.quantize_codes_reference`. Any strides are accepted."""
    _check_dtype_any_strides("x", x, torch.float32, "float32 tensor")
    if channels_last and x.dim() != 4:
        raise OpInputError(
            f"channels_last codes need a 4-d [N, C, H, W] x, got shape {tuple(x.shape)}"
        )
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise OpInputError(f"bits must be an int in 2..8, got {bits!r}")
    _check_step(delta)
    if isinstance(zp, bool) or not isinstance(zp, int) or not 0 <= zp < (1 << bits):
        raise OpInputError(f"zp must be an int in 0..{(1 << bits) - 1} for {bits} bits, got {zp!r}")
    return _run("quantize_codes", x.device, None)(x, float(delta), zp, bits, channels_last)


@quantize_codes.register_fake
def _(x, delta, zp, bits, channels_last=False):
    if channels_last:
        return torch.empty_like(x, dtype=torch.uint8, memory_format=torch.channels_last)
    return torch.empty_like(x, dtype=torch.uint8)


@torch.library.custom_op("pdquant::dequantize_codes", mutates_args=())
def dequantize_codes(codes: Tensor, delta: float, zp: int) -> Tensor:
    """uint8 activation codes -> float32 ``(float32(code) - zp) * delta`` (a subtraction and a
    multiplication, each rounded: the simulation's dequantization bit for bit). Output: the codes'
    shape and memory format; any strides are accepted. See
    :func:`~.reference.dequantize_codes_reference`."""
    _check_dtype_any_strides("codes", codes, torch.uint8, "uint8 tensor")
    _check_step(delta)
    if isinstance(zp, bool) or not isinstance(zp, int) or not 0 <= zp <= 255:
        raise OpInputError(f"zp must be an int in 0..255, got {zp!r}")
    return _run("dequantize_codes", codes.device, None)(codes, float(delta), zp)


@dequantize_codes.register_fake
def _(codes, delta, zp):
    return torch.empty_like(codes, dtype=torch.float32)


@torch.library.custom_op("pdquant::max_pool2d_codes", mutates_args=())
def max_pool2d_codes(
    x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]
) -> Tensor:
    """Max-pool of uint8 activation codes ``[N, C, H, W]``: the max over each window's in-bounds
    taps (padding never wins), no dilation, floor output size; exact, and equal to pooling the
    dequantized values (the dequantization is increasing). Output: ``x``'s memory format
    (channels_last stays channels_last); any strides are accepted. See
    :func:`~.reference.max_pool2d_codes_reference`."""
    _check_dtype_any_strides("x", x, torch.uint8, "uint8 tensor of codes")
    if x.dim() != 4:
        raise OpInputError(f"x must be 4-d [N, C, H, W] codes, got shape {tuple(x.shape)}")
    for name, v, lo in (
        ("kernel_size", kernel_size, 1),
        ("stride", stride, 1),
        ("padding", padding, 0),
    ):
        if len(v) != 2 or any(isinstance(i, bool) or not isinstance(i, int) or i < lo for i in v):
            raise OpInputError(f"{name} must be two ints >= {lo}, got {list(v)!r}")
    if any(2 * p > k for p, k in zip(padding, kernel_size, strict=True)):
        raise OpInputError(
            f"padding {list(padding)} must be at most half the kernel size {list(kernel_size)}"
        )
    if any(x.shape[2 + i] + 2 * padding[i] < kernel_size[i] for i in range(2)):
        raise OpInputError(
            f"the padded input {tuple(x.shape[2:])} + 2 x {list(padding)} is smaller than the "
            f"kernel {list(kernel_size)}"
        )
    return _run("max_pool2d_codes", x.device, None)(x, kernel_size, stride, padding)


@max_pool2d_codes.register_fake
def _(x, kernel_size, stride, padding):
    n, c, h, w = x.shape
    ho = (h + 2 * padding[0] - kernel_size[0]) // stride[0] + 1
    wo = (w + 2 * padding[1] - kernel_size[1]) // stride[1] + 1
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)


def _check_requant(
    x: Tensor,
    x_zp: int,
    w: Tensor,
    scale: Tensor,
    bias: Tensor,
    act: int,
    out_scale: float,
    out_zp: int,
    out_bits: int,
    k_per_out: int,
) -> None:
    """Shared checks of qconv2d/qlinear (everything but the spatial arguments)."""
    _check_tensor("x", x, torch.uint8, x.device)
    if not isinstance(w, Tensor) or w.dtype not in (torch.int8, torch.int16):
        got = w.dtype if isinstance(w, Tensor) else type(w).__name__
        raise OpInputError(
            f"w must be int8 (weight bits <= 7) or int16 (8-bit weights) offsets w_code - w_zp, "
            f"got {got}"
        )
    _check_tensor("w", w, w.dtype, x.device)
    o = w.shape[0]
    for name, t in (("scale", scale), ("bias", bias)):
        _check_tensor(name, t, torch.float32, x.device)
        if t.shape != (o,):
            raise OpInputError(
                f"{name} must be float32 [{o}] (one per output channel), got {tuple(t.shape)}"
            )
    if isinstance(x_zp, bool) or not isinstance(x_zp, int) or not 0 <= x_zp <= 255:
        raise OpInputError(f"x_zp must be an int in 0..255, got {x_zp!r}")
    if act not in QACT:
        raise OpInputError(f"act must be one of {QACT} , got {act!r}")
    if isinstance(out_bits, bool) or out_bits not in QOUT_BITS:
        raise OpInputError(
            f"out_bits must be one of {list(QOUT_BITS)} (0 = float32), got {out_bits!r}"
        )
    if out_bits:
        if not (out_scale > 0.0 and out_scale < float("inf")):
            raise OpInputError(f"out_scale must be finite and > 0, got {out_scale!r}")
        if (
            isinstance(out_zp, bool)
            or not isinstance(out_zp, int)
            or not (0 <= out_zp <= (1 << out_bits) - 1)
        ):
            raise OpInputError(
                f"out_zp must be an int in 0..{(1 << out_bits) - 1} for out_bits={out_bits}, "
                f"got {out_zp!r}"
            )
    w_max = 128 if w.dtype == torch.int8 else (int(w.abs().max()) if w.numel() else 0)
    if k_per_out * 255 * w_max > ACC_LIMIT:
        raise OpInputError(
            f"int32 accumulator could overflow: {k_per_out} terms x |x - x_zp| <= 255 x "
            f"|w| <= {w_max} exceeds {ACC_LIMIT}"
        )


def _check_residual(
    residual: Tensor | None, x: Tensor, shape: tuple[int, ...], res_scale: float, res_zp: int
) -> None:
    if residual is None:
        return
    if not isinstance(residual, Tensor) or residual.dtype not in (torch.float32, torch.uint8):
        got = residual.dtype if isinstance(residual, Tensor) else type(residual).__name__
        raise OpInputError(
            f"residual must be float32 values or uint8 activation codes (with res_scale and "
            f"res_zp), got {got}"
        )
    _check_tensor("residual", residual, residual.dtype, x.device)
    if tuple(residual.shape) != shape:
        raise OpInputError(
            f"residual must have the output's shape {shape}, got {tuple(residual.shape)}"
        )
    if residual.dtype == torch.uint8:
        if isinstance(res_scale, bool) or not (
            isinstance(res_scale, (int, float)) and 0.0 < res_scale < float("inf")
        ):
            raise OpInputError(
                f"a uint8 residual needs res_scale (its step) finite and > 0, got {res_scale!r}"
            )
        if isinstance(res_zp, bool) or not isinstance(res_zp, int) or not 0 <= res_zp <= 255:
            raise OpInputError(f"res_zp must be an int in 0..255, got {res_zp!r}")


def qconv2d_out_shape(x_shape, w_shape, stride, padding) -> tuple[int, int, int, int]:
    """``[N, O, Ho, Wo]`` with ``Ho = (H + 2 ph - kh) // sh + 1`` (no dilation)."""
    n, _, h, wd = x_shape
    o, _, kh, kw = w_shape
    return (
        n,
        o,
        (h + 2 * padding[0] - kh) // stride[0] + 1,
        (wd + 2 * padding[1] - kw) // stride[1] + 1,
    )


def _check_conv_args(x: Tensor, w: Tensor, stride, padding, groups: int) -> None:
    if x.dim() != 4 or w.dim() != 4:
        raise OpInputError(
            f"qconv2d needs x [N, C, H, W] and w [O, C/groups, kh, kw], got x "
            f"{tuple(x.shape)} and w {tuple(w.shape)}"
        )
    for name, v, lo in (("stride", stride, 1), ("padding", padding, 0)):
        if len(v) != 2 or any(isinstance(i, bool) or not isinstance(i, int) or i < lo for i in v):
            raise OpInputError(f"{name} must be two ints >= {lo}, got {list(v)!r}")
    c, o = x.shape[1], w.shape[0]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise OpInputError(f"groups must be a positive int, got {groups!r}")
    if c % groups or o % groups or w.shape[1] * groups != c:
        raise OpInputError(
            f"groups={groups} does not fit x with {c} channels and w {tuple(w.shape)}: need "
            f"C % groups == 0, O % groups == 0 and w.shape[1] == C / groups"
        )
    _, _, ho, wo = qconv2d_out_shape(x.shape, w.shape, stride, padding)
    if ho < 1 or wo < 1:
        raise OpInputError(
            f"output would be empty: input {tuple(x.shape[2:])}, kernel {tuple(w.shape[2:])}, "
            f"stride {list(stride)}, padding {list(padding)}"
        )


@torch.library.custom_op("pdquant::qconv2d", mutates_args=())
def qconv2d(
    x: Tensor,
    x_zp: int,
    w: Tensor,
    scale: Tensor,
    bias: Tensor,
    stride: list[int],
    padding: list[int],
    groups: int,
    act: int,
    residual: Tensor | None,
    out_scale: float,
    out_zp: int,
    out_bits: int,
    res_scale: float = 0.0,
    res_zp: int = 0,
) -> Tensor:
    """Packed conv with fused requant: see :func:`~.reference.qconv2d_reference`.

    ``x`` uint8 ``[N, C, H, W]``, ``w`` int8/int16 ``[O, C/groups, kh, kw]``, ``scale``/``bias``
    float32 ``[O]``, ``residual`` ``[N, O, Ho, Wo]``: None, float32 values, or uint8 codes of
    value ``(code - res_zp) * res_scale``; returns float32 (out_bits=0) or uint8
    ``[N, O, Ho, Wo]``.
    """
    _check_conv_args(x, w, stride, padding, groups)
    k = w.shape[1] * w.shape[2] * w.shape[3]
    _check_requant(x, x_zp, w, scale, bias, act, out_scale, out_zp, out_bits, k)
    shape = qconv2d_out_shape(x.shape, w.shape, stride, padding)
    _check_residual(residual, x, shape, res_scale, res_zp)
    return _run("qconv2d", x.device, None)(
        x,
        x_zp,
        w,
        scale,
        bias,
        stride,
        padding,
        groups,
        act,
        residual,
        out_scale,
        out_zp,
        out_bits,
        res_scale,
        res_zp,
    )


@qconv2d.register_fake
def _(
    x,
    x_zp,
    w,
    scale,
    bias,
    stride,
    padding,
    groups,
    act,
    residual,
    out_scale,
    out_zp,
    out_bits,
    res_scale=0.0,
    res_zp=0,
):
    dtype = torch.float32 if out_bits == 0 else torch.uint8
    return x.new_empty(qconv2d_out_shape(x.shape, w.shape, stride, padding), dtype=dtype)


@torch.library.custom_op("pdquant::qlinear", mutates_args=())
def qlinear(
    x: Tensor,
    x_zp: int,
    w: Tensor,
    scale: Tensor,
    bias: Tensor,
    act: int,
    residual: Tensor | None,
    out_scale: float,
    out_zp: int,
    out_bits: int,
    res_scale: float = 0.0,
    res_zp: int = 0,
) -> Tensor:
    """Packed linear with fused requant: see :func:`~.reference.qlinear_reference`.

    ``x`` uint8 ``[N, K]``, ``w`` int8/int16 ``[O, K]``, ``scale``/``bias`` float32 ``[O]``,
    ``residual`` ``[N, O]``: None, float32 values, or uint8 codes of value
    ``(code - res_zp) * res_scale``; returns float32 (out_bits=0) or uint8 ``[N, O]``.
    """
    if x.dim() != 2 or not isinstance(w, Tensor) or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise OpInputError(
            f"qlinear needs x [N, K] and w [O, K] with one K, got x {tuple(x.shape)} and w "
            f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}"
        )
    _check_requant(x, x_zp, w, scale, bias, act, out_scale, out_zp, out_bits, w.shape[1])
    _check_residual(residual, x, (x.shape[0], w.shape[0]), res_scale, res_zp)
    return _run("qlinear", x.device, None)(
        x, x_zp, w, scale, bias, act, residual, out_scale, out_zp, out_bits, res_scale, res_zp
    )


@qlinear.register_fake
def _(x, x_zp, w, scale, bias, act, residual, out_scale, out_zp, out_bits, res_scale=0.0, res_zp=0):
    dtype = torch.float32 if out_bits == 0 else torch.uint8
    return x.new_empty((x.shape[0], w.shape[0]), dtype=dtype)


# --------------------------------------------------------------------------------------------
# weight-only low-bit linear (GPU)
#
# linear_wa16(x, w_packed, scale, zero, bits, group) -> y = x @ ((w_code - zero) * scale)^T for
# fp16/bf16 x [M, K] and 2/4-bit weight codes in the pack() storage format [N, ceil(K*bits/8)];
# scale and zero per output channel [N] (group 0) or per group of `group` inputs along K
# [N, ceil(K/group)] (group a power of two >= 16; the last group may be partial). Exact math:
# reference.linear_wa16_reference; fast kernel: pdquant_fast.kernels.linear_wa16_triton (it also
# offers an optional weight transpose, linear_wa16_prepack, not an op).

WA16_BITS = (2, 4)
WA16_DTYPES = (torch.float16, torch.bfloat16)
WA16_QPARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
backends.register_op("linear_wa16", WA16_BITS)


def _check_wa16(
    x: Tensor, w_packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int
) -> None:
    if not isinstance(x, Tensor) or x.dtype not in WA16_DTYPES:
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise OpInputError(f"x must be float16 or bfloat16, got {got}")
    _check_tensor("x", x, x.dtype, x.device)
    if x.dim() != 2:
        raise OpInputError(f"x must be 2-d [M, K], got shape {tuple(x.shape)}")
    if isinstance(bits, bool) or bits not in WA16_BITS:
        raise OpInputError(f"bits must be one of {list(WA16_BITS)}, got {bits!r}")
    if (
        isinstance(group, bool)
        or not isinstance(group, int)
        or group < 0
        or (group and (group < 16 or group & (group - 1)))
    ):
        raise OpInputError(
            f"group must be 0 (per output channel) or a power of two >= 16, got {group!r}"
        )
    _check_tensor("w_packed", w_packed, torch.uint8, x.device)
    k = x.shape[1]
    if w_packed.dim() != 2 or w_packed.shape[1] != packed_row_bytes(k, bits):
        raise OpInputError(
            f"w_packed must be uint8 [N, {packed_row_bytes(k, bits)}] for K={k} at {bits} bits, "
            f"got shape {tuple(w_packed.shape)}"
        )
    n = w_packed.shape[0]
    want = (n,) if group == 0 else (n, -(-k // group))
    if not isinstance(scale, Tensor) or scale.dtype not in WA16_QPARAM_DTYPES:
        got = scale.dtype if isinstance(scale, Tensor) else type(scale).__name__
        raise OpInputError(f"scale must be float16, bfloat16 or float32, got {got}")
    _check_tensor("scale", scale, scale.dtype, x.device)
    _check_tensor("zero", zero, scale.dtype, x.device)
    for name, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != want:
            raise OpInputError(
                f"{name} must have shape {list(want)} for group={group} (N={n}, K={k}), got "
                f"{tuple(t.shape)}"
            )


@torch.library.custom_op("pdquant::linear_wa16", mutates_args=())
def linear_wa16(
    x: Tensor, w_packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int
) -> Tensor:
    """``[M, N]`` in x's dtype: see :func:`~pdquant_fast.ops.reference.linear_wa16_reference`."""
    _check_wa16(x, w_packed, scale, zero, bits, group)
    return _run("linear_wa16", x.device, bits)(x, w_packed, scale, zero, bits, group)


@linear_wa16.register_fake
def _(x, w_packed, scale, zero, bits, group):
    return x.new_empty((x.shape[0], w_packed.shape[0]))
