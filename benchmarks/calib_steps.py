"""Pieces shared by the CPU and GPU calibration-kernel benchmarks (one copy of each).

* :func:`ste_adaround`: the AdaRound soft weight + regulariser as a PyTorch user writes it (the
  eager / ``torch.compile`` baseline);
* :func:`fq_op_step`: one forward + backward through the public ``pdquant::fake_quant_act`` op
  (whichever backend is forced when it runs). ``case`` needs ``bits``, ``axis`` and
  ``keep_prob``; ``inp`` holds ``x``, ``delta``, ``zp``, ``seed`` and the upstream ``grad``;
* :func:`fq_learnable_step`: the same through PyTorch's learnable fake-quant op (the baseline;
  ``case`` also needs ``per_channel``);
* :func:`ada_op_step`: one forward + backward through the public ``pdquant::adaround_soft`` op.
  ``case`` needs ``bits``; ``inp`` holds ``w_floor``, ``alpha``, ``delta``, ``zp``, ``beta`` and
  the upstream ``grad_wq`` and ``grad_reg``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdquant_fast import ops
from pdquant_fast.ops import reference as R


def ste_adaround(w_floor, alpha, delta, zp, n: int, beta):
    h = torch.clamp(torch.sigmoid(alpha) * (R.ZETA - R.GAMMA) + R.GAMMA, 0, 1)
    w_q = (torch.clamp(w_floor + h + zp, 0, n) - zp) * delta
    reg = (1 - (2 * h - 1).abs().pow(beta)).sum()
    return w_q, reg


def fq_op_step(case, inp: dict, eager: bool = False) -> Callable:
    """One forward + backward through ``pdquant::fake_quant_act`` (backend as currently forced);
    ``eager``: through ``ops.fake_quant_act_eager``, the path the quantizer modules take (same
    kernels, no ``torch.library`` dispatch)."""
    d_param = inp["delta"].clone().requires_grad_()
    fq = ops.fake_quant_act_eager if eager else ops.fake_quant_act

    def step():
        x = inp["x"].detach().requires_grad_()
        y = fq(x, d_param, inp["zp"], case.bits, case.axis, case.keep_prob, inp["seed"], None)
        gx, gd = torch.autograd.grad(y, (x, d_param), inp["grad"])
        return y, gx, gd

    return step


def ada_op_step(case, inp: dict, eager: bool = False) -> Callable:
    """One forward + backward through ``pdquant::adaround_soft`` (backend as currently forced);
    ``eager``: through ``ops.adaround_soft_eager``, the path the quantizer modules take. ``alpha``
    is cloned once, so a captured CUDA graph replays on fixed storage."""
    alpha = inp["alpha"].clone().requires_grad_()
    soft = ops.adaround_soft_eager if eager else ops.adaround_soft

    def step():
        w_q, reg = soft(inp["w_floor"], alpha, inp["delta"], inp["zp"], case.bits, inp["beta"])
        (ga,) = torch.autograd.grad((w_q, reg), (alpha,), (inp["grad_wq"], inp["grad_reg"]))
        return w_q, reg, ga

    return step


def fq_learnable_step(case, inp: dict) -> Callable:
    """torch's learnable fake-quant (LSQ/TQT-style): no QDrop, also grads the zero point."""
    n = 2**case.bits - 1
    scale = inp["delta"].clone().reshape(-1).requires_grad_()
    zp = inp["zp"].clone().reshape(-1).requires_grad_()

    def step():
        x = inp["x"].detach().requires_grad_()
        if case.per_channel:
            y = torch._fake_quantize_learnable_per_channel_affine(
                x, scale, zp, case.axis % x.dim(), 0, n, 1.0
            )
        else:
            y = torch._fake_quantize_learnable_per_tensor_affine(x, scale, zp, 0, n, 1.0)
        gx, gs = torch.autograd.grad(y, (x, scale), inp["grad"])
        return y, gx, gs.reshape(inp["delta"].shape)

    return step
