"""Pieces shared by the CPU and GPU calibration-kernel benchmarks (one copy of each).

* :func:`ste_adaround`: the AdaRound soft weight + regulariser as a PyTorch user writes it (the
  eager / ``torch.compile`` baseline);
* :func:`fq_op_step`: one forward + backward through the public ``pdquant::fake_quant_act`` op
  (whichever backend is forced when it runs). ``case`` needs ``bits``, ``axis`` and
  ``keep_prob``; ``inp`` holds ``x``, ``delta``, ``zp``, ``seed`` and the upstream ``grad``.
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


def fq_op_step(case, inp: dict) -> Callable:
    """One forward + backward through ``pdquant::fake_quant_act`` (backend as currently forced)."""
    d_param = inp["delta"].clone().requires_grad_()

    def step():
        x = inp["x"].detach().requires_grad_()
        y = ops.fake_quant_act(
            x, d_param, inp["zp"], case.bits, case.axis, case.keep_prob, inp["seed"], None
        )
        gx, gd = torch.autograd.grad(y, (x, d_param), inp["grad"])
        return y, gx, gd

    return step
