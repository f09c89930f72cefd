"""Inputs and checks shared by the calibration-kernel tests (Triton on CPU, CUDA/Triton on GPU).

Checks (the standards of the project):

* quantized values, clamps, hard codes, grad_x: bit-exact (``atol = rtol = 0``; NaN == NaN);
* float64-accumulated reductions (``grad_delta``, the AdaRound regulariser): every kernel and the
  reference sum the same float32 terms in float64 (the products ``g * term`` are exact there) in
  different orders, then round once to float32. Budget, per output::

      |got - ref| <= ulp32(ref) + 2 * N * 2**-53 * sum |terms|

  (one float32 rounding apart, plus the worst-case float64 summation error of each side);
* the MSE search: the chosen candidate's float64 score <= (1 + 1e-5) x the reference's.
"""

from __future__ import annotations

import math

import pytest
import torch

from pdquant_fast import ops
from pdquant_fast.ops import reference as R

RAGGED = (1, 7, 127, 4097)
BITS = (2, 3, 4, 5, 6, 7, 8)


def calib_isas(C) -> list[str]:
    """The SIMD paths of the C++ calibration kernels (extension module ``C``) this CPU runs,
    best first."""
    out = []
    for isa in ("avx512", "avx2", "scalar"):
        try:
            C.calib_cpu_isa(isa)
            out.append(isa)
        except (RuntimeError, ValueError):
            pass
    C.calib_cpu_isa("auto")
    return out


def isa_fixture(C):
    """A fixture over :func:`calib_isas`: pins one SIMD path and forces the cpp backend for the
    test (``isa = isa_fixture(_C)`` at module level)."""

    @pytest.fixture(params=calib_isas(C))
    def isa(request):
        C.calib_cpu_isa(request.param)
        ops.force("cpp")
        yield request.param
        ops.force(None)
        C.calib_cpu_isa("auto")

    return isa


def assert_bit_exact(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    torch.testing.assert_close(
        got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}" if what else m
    )


def ulp32(t: torch.Tensor) -> torch.Tensor:
    """Spacing of float32 at ``|t|`` (float64), at least the smallest subnormal."""
    a = t.abs().to(torch.float32)
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).to(torch.float64)


def assert_sum_budget(got, want, terms_abs_sum, n_terms, what=""):
    """``|got - want| <= ulp32(want) + 2 N 2**-53 sum|terms|`` elementwise (see module doc)."""
    got64, want64 = got.double().cpu(), want.double().cpu()
    budget = ulp32(want64) + 2 * n_terms * 2.0**-53 * terms_abs_sum.double().cpu()
    err = (got64 - want64).abs()
    bad = err > budget
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} outputs over budget; worst error {float(err.max()):.3e}, "
        f"budget there {float(budget[err.argmax()] if budget.dim() else budget):.3e}"
    )


def fq_inputs(shape, per_channel, axis, bits, drop, device="cpu", gen_seed=0):
    """``(x, delta, zero_point, keep_prob, seed, mask)`` with ties, clamp edges and specials.

    ``x`` mixes random values, exact ties ``(k + 0.5) * d`` of the integer grid, values beyond
    both clamp bounds and (when large enough) +-Inf, NaN, -0.0.
    """
    g = torch.Generator().manual_seed(gen_seed)
    n = 2**bits - 1
    numel = math.prod(shape)
    if per_channel:
        c = shape[axis]
        delta = torch.rand(c, generator=g) * 0.4 + 0.02
        zp = torch.randint(0, n + 1, (c,), generator=g).float()
        view = [1] * len(shape)
        view[axis] = c
        d_b, z_b = delta.reshape(view), zp.reshape(view)
    else:
        delta = torch.tensor(0.3, dtype=torch.float32) * (1 + torch.rand((), generator=g))
        zp = torch.tensor(float(n // 2))
        d_b, z_b = delta, zp
    span = (n + 4) * d_b
    x = (torch.rand(shape, generator=g) * 2 - 1) * span - z_b * d_b * 0.5
    # exact ties of the grid: (k + 0.5) * d rounds to k or k + 1 by half-to-even
    k = torch.randint(-n - 3, n + 3, shape, generator=g).float()
    tie = torch.rand(shape, generator=g) < 0.3
    x = torch.where(tie, (k + 0.5) * d_b, x).contiguous()
    flat = x.view(-1)
    if numel >= 8:
        flat[:5] = torch.tensor([math.inf, -math.inf, math.nan, -0.0, 0.0])
        flat[5] = 1e30  # far above the clamp bound
        flat[6] = -1e30
    keep_prob, seed, mask = 1.0, None, None
    if drop == "seed":
        keep_prob, seed = 0.6, torch.tensor(987654321123 + gen_seed, dtype=torch.int64)
    elif drop == "mask":
        keep_prob = 0.5
        mask = torch.rand(shape, generator=g) < 0.5
    out = [x, delta, zp, keep_prob, seed, mask]
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in out]


def fq_grad_terms_abs_sum(grad, x, delta, zp, bits, axis, keep_prob, seed, mask):
    """``(sum |g * term|`` per output of grad_delta (float64), terms per output)``."""
    n = 2**bits - 1
    d = R._channel_view(delta, x, axis)
    z = R._channel_view(zp, x, axis)
    t = x / d
    r = torch.round(t)
    k = r + z
    inside = (k >= 0) & (k <= n)
    term = torch.where(inside, r - t, torch.where(k < 0, -z, n - z).expand_as(t))
    m = R._mask_for(x, keep_prob, seed, mask)
    if m is not None:
        term = torch.where(m, term, torch.zeros_like(term))
    prod = (grad.double() * term.double()).abs()
    if delta.dim() == 0:
        return prod.sum(), x.numel()
    dims = [i for i in range(x.dim()) if i != axis % x.dim()]
    return (prod.sum(dim=dims) if dims else prod), x.numel() // max(delta.numel(), 1)


def check_fake_quant(fwd, bwd, shape, per_channel, axis, bits, drop, device="cpu", gen_seed=0):
    """Run ``fwd``/``bwd`` (kernels with the reference signatures) against the reference."""
    x, delta, zp, kp, seed, mask = fq_inputs(shape, per_channel, axis, bits, drop, device, gen_seed)
    y = fwd(x, delta, zp, bits, axis, kp, seed, mask)
    y_ref = R.fake_quant_act_reference(x, delta, zp, bits, axis, kp, seed, mask)
    assert_bit_exact(y, y_ref, f"forward {shape} axis={axis} bits={bits} {drop}")
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(gen_seed + 1)).to(device)
    gx, gd = bwd(grad, x, delta, zp, bits, axis, kp, seed, mask)
    gx_ref, gd_ref = R.fake_quant_act_backward_reference(
        grad, x, delta, zp, bits, axis, kp, seed, mask
    )
    assert_bit_exact(gx, gx_ref, f"grad_x {shape} axis={axis} bits={bits} {drop}")
    assert gd.shape == gd_ref.shape and gd.dtype == torch.float32
    # +-Inf and NaN in x give finite terms (they fall outside the grid: -z or n - z), so
    # grad_delta stays finite and under the same budget
    abs_sum, n_terms = fq_grad_terms_abs_sum(grad, x, delta, zp, bits, axis, kp, seed, mask)
    assert_sum_budget(gd, gd_ref, abs_sum, n_terms, f"grad_delta {shape} bits={bits} {drop}")


def adaround_inputs(shape, bits, device="cpu", gen_seed=0, beta=4.0):
    """``(w_floor, alpha, delta, zero_point, beta)`` for a ``[C_out, ...]`` weight.

    ``alpha`` covers both saturations of the rectified sigmoid (|alpha| up to 12), exact zeros
    (the hard threshold) and the stretch boundaries; ``w_floor + z`` sits on and beyond both clamp
    bounds for some elements.
    """
    g = torch.Generator().manual_seed(gen_seed)
    n = 2**bits - 1
    c = shape[0]
    w = torch.randn(shape, generator=g)
    delta = (w.reshape(c, -1).abs().amax(dim=1) / (n / 2)).clamp(min=1e-3)
    zp = torch.randint(0, n + 1, (c,), generator=g).float()
    view = (c,) + (1,) * (len(shape) - 1)
    w_floor = torch.floor(w / delta.reshape(view))
    w_floor = w_floor + torch.randint(-2, 3, shape, generator=g).float() * (
        torch.rand(shape, generator=g) < 0.1
    )
    alpha = torch.randn(shape, generator=g) * 4
    alpha.view(-1)[:: max(1, alpha.numel() // 7)] = 0.0
    pick = torch.rand(shape, generator=g) < 0.05
    alpha = torch.where(pick, torch.sign(alpha) * 12.0, alpha)
    out = (w_floor, alpha, delta, zp, torch.tensor(beta))
    return tuple(t.to(device) for t in out)


def libm_agreeing(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """Bool mask of the elements of ``alpha`` (CPU) where torch's CPU sigmoid / pow agree with the
    interpreter's float64 exp / exp2(log2) rounded once to float32.

    The Triton interpreter has no libdevice, so ``exp``/``pow`` come from numpy in float64 (then
    one rounding); torch's CPU kernels use SLEEF (<= 1 ulp). Where both give the same bits the
    kernel must reproduce the reference's bits exactly, which tests its arithmetic (operation
    order, clamps, no FMA) in isolation from the libm.
    """
    s_t = torch.sigmoid(alpha)
    s_e = 1 / (1 + torch.exp(-alpha.double()).float())
    h = torch.clamp(s_e * (R.ZETA - R.GAMMA) + R.GAMMA, 0, 1)
    v = (2 * h - 1).abs()
    ok = s_t == s_e
    b = torch.tensor(beta, dtype=torch.float32)
    for e in (b, b - 1):
        p_t = v.pow(e)
        p_e = torch.exp2(e.double() * torch.log2(v.double())).float()
        p_e = torch.where(e == 0, torch.ones_like(p_e), p_e)
        ok &= (p_t == p_e) | (p_t.isnan() & p_e.isnan())
    return ok


def mse_inputs(c, k, device="cpu", gen_seed=0):
    """Rows of different shapes: two-sided normal, one-sided (ReLU-like), heavy-tailed, all-zero."""
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(c, k, generator=g)
    if c > 1:
        x[1] = x[1].abs()
    if c > 2:
        x[2] = torch.randn(k, generator=g) ** 3
    if c > 3:
        x[3] = 0.0
    return x.to(device)


def lp_score64(x, delta, zp, bits):
    """float64 mean ``|x - dq(q(x))| ** 2.4`` per row of ``x`` ``[C, K]`` for given qparams."""
    n = 2**bits - 1
    x64 = x.double().cpu()
    d = delta.double().cpu()[:, None]
    z = zp.double().cpu()[:, None]
    xq = (torch.clamp(torch.round(x64 / d) + z, 0, n) - z) * d
    return (x64 - xq).abs().pow(2.4).mean(dim=1)


def lp_score_floor64(x):
    """Per row of ``x``: mean of ``(one float32 ulp of |x|) ** 2.4``. Scores closer than this
    cannot rank two searches: a step one ulp away moves each reconstruction by about an ulp, and
    float32 dequantization rounds to half an ulp anyway (e.g. K = 1 and |x| ~ 1e30, where one
    step reproduces x exactly and its neighbour misses by an ulp)."""
    return (x.double().cpu().abs() * 2.0**-23).pow(2.4).mean(dim=1)


def mse_rows_not_worse(x, got, want, bits):
    """Rows where the searched ``got = (delta, zp)`` is no worse than the reference's ``want``:
    the same zero point and a step within one float32 ulp of the reference's (the same candidate,
    its step rounded differently: at |x| ~ 1e30 the kernel's and PyTorch's float32 sequences
    differ by an ulp), or an L2.4 score within 1e-5 relative (+ :func:`lp_score_floor64`)."""
    (d, z), (d_ref, z_ref) = got, want
    same = (z.cpu() == z_ref.cpu()) & (
        (d.double().cpu() - d_ref.double().cpu()).abs() <= ulp32(d_ref.cpu())
    )
    s, s_ref = lp_score64(x, d, z, bits), lp_score64(x, d_ref, z_ref, bits)
    return same | (s <= s_ref * (1 + 1e-5) + lp_score_floor64(x)), s, s_ref


def mse_bounds(x, gen_seed=0):
    """``(x_min, x_max)`` ``[C]`` that contain each row of ``x`` and are wider than it on
    random sides (the range of a whole tensor whose subsample is the row): 0 to 2 row spans
    below the minimum and above the maximum, one row's bounds exactly its own extremes."""
    g = torch.Generator().manual_seed(gen_seed + 1)
    lo, hi = x.amin(dim=1).cpu(), x.amax(dim=1).cpu()
    span = (hi - lo).clamp(min=1.0)
    x_min = lo - span * 2 * torch.rand(x.shape[0], generator=g)
    x_max = hi + span * 2 * torch.rand(x.shape[0], generator=g)
    x_min[0], x_max[0] = lo[0], hi[0]
    return x_min.to(x.device), x_max.to(x.device)


def check_mse(fn, c, k, bits, steps, device="cpu", gen_seed=0, bounded=False):
    """``fn(x, bits, steps[, x_min, x_max])`` (with ``bounded``: the clip range from
    :func:`mse_bounds`) against the reference's choice, within the score budget."""
    x = mse_inputs(c, k, device, gen_seed)
    extra = mse_bounds(x, gen_seed) if bounded else ()
    delta, zp = fn(x, bits, steps, *extra)
    d_ref, z_ref = R.mse_search_2d_reference(x.cpu(), bits, steps, *(t.cpu() for t in extra))
    assert delta.shape == (c,) and zp.shape == (c,)
    assert delta.dtype == torch.float32 and zp.dtype == torch.float32
    assert torch.equal(zp, torch.round(zp)) and (zp >= 0).all() and (zp <= 2**bits - 1).all()
    ok, s, s_ref = mse_rows_not_worse(x, (delta, zp), (d_ref, z_ref), bits)
    over = ~ok
    assert not over.any(), (
        f"mse_search_2d c={c} k={k} bits={bits}: rows {over.nonzero().flatten().tolist()} score "
        f"{s[over].tolist()} > reference {s_ref[over].tolist()}"
    )
