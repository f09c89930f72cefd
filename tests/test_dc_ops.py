"""Distribution-correction ops (``bn_stat_loss``, ``bn_stat_loss_backward``, ``dc_adam_step``):
C++ kernels against the references, on every SIMD path, both memory formats, ragged shapes.

Budgets:

* ``bn_stat_loss``: per (sample, channel) mean and unbiased std over H*W, summed in float64 by
  the kernel; checked against the reference evaluated in float64: ``m``, ``s`` within 2 ulp32 of
  the float64 values, the loss within ``1e-6`` relative, ``grad_x`` within
  ``2e-6 * max |grad_x|`` (its per-element terms are rounded to float32 once each);
* ``dc_adam_step``: ``m`` and ``v`` bit-exact (the same float32 operations in the same order);
  ``x_new`` within 2 ulp32 of ``|x| + |step * m / denom|``: the kernel's ``sqrt`` is the correctly
  rounded IEEE one and PyTorch's CPU ``sqrt`` is not always (it differs by 1 ulp on some inputs),
  which moves ``denom`` by 1 ulp; ``close`` (a reduction, float64 in the kernel) within
  ``1e-6`` relative.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _calib_cases import isa_fixture  # noqa: E402

from pdquant_fast import ops  # noqa: E402
from pdquant_fast.ops import reference as R  # noqa: E402

_C = pytest.importorskip("pdquant_fast._C", reason="C++ extension pdquant_fast._C not built")
if not hasattr(_C, "dc_adam_step_cpu"):
    pytest.skip("pdquant_fast._C lacks the DC kernels (rebuild)", allow_module_level=True)


isa = isa_fixture(_C)  # pins one SIMD path and forces the cpp backend for the test


SHAPES = [(2, 3, 4, 5), (3, 17, 7, 9), (1, 1, 1, 2), (4, 16, 32, 32), (2, 33, 3, 1), (5, 7, 2, 2)]
EPS32 = 2.0**-23


def _fmt(t, cl):
    return t.contiguous(memory_format=torch.channels_last) if cl else t.contiguous()


def _stats_inputs(shape, cl, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 0.7
    mean = torch.randn(shape[1], generator=g)
    std = torch.rand(shape[1], generator=g) + 0.2
    return _fmt(x, cl), mean, std


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_bn_stat_loss_forward_backward(isa, shape, cl):
    x, mean, std = _stats_inputs(shape, cl)
    loss, m, s = ops.bn_stat_loss(x, mean, std)
    l64, m64, s64 = R.bn_stat_loss_reference(x.double(), mean.double(), std.double())
    assert loss.dtype == m.dtype == s.dtype == torch.float32
    assert ((m.double() - m64).abs() <= 2 * EPS32 * m64.abs() + 1e-12).all()
    assert ((s.double() - s64).abs() <= 2 * EPS32 * s64.abs()).all()
    assert torch.allclose(loss.double(), l64, rtol=1e-6, atol=0)
    g = torch.randn(shape[0], generator=torch.Generator().manual_seed(1))
    gx = ops.bn_stat_loss_backward(g, x, mean, std, m, s)
    gx64 = R.bn_stat_loss_backward_reference(
        g.double(), x.double(), mean.double(), std.double(), m64, s64
    )
    assert gx.stride() == x.stride()  # keeps x's memory format
    assert ((gx.double() - gx64).abs() <= 2e-6 * gx64.abs().max()).all()


@pytest.mark.parametrize("cl", [False, True])
def test_bn_stat_loss_autograd_matches_the_reference_formula(isa, cl):
    """Through autograd (what distribution correction does): the op's gradient equals the
    gradient PyTorch derives from the plain mean/var formula."""
    x, mean, std = _stats_inputs((3, 8, 6, 5), cl, seed=3)
    w = torch.tensor([0.5, -1.0, 2.0])
    xa = x.clone().requires_grad_(True)
    (ops.bn_stat_loss(xa, mean, std)[0] * w).sum().backward()
    xr = x.double().requires_grad_(True)
    mr = xr.mean(dim=(2, 3))
    sr = torch.sqrt(xr.var(dim=(2, 3), unbiased=True) + 1e-6)
    lr = ((mean.double()[None] - mr) ** 2).sum(1) + ((std.double()[None] - sr) ** 2).sum(1)
    (lr * w.double()).sum().backward()
    assert torch.allclose(xa.grad.double(), xr.grad, rtol=0, atol=2e-6 * xr.grad.abs().max())


def test_bn_stat_loss_reference_backend_is_the_formula():
    ops.force("reference")
    try:
        x, mean, std = _stats_inputs((2, 3, 4, 4), False)
        loss, m, s = ops.bn_stat_loss(x, mean, std)
    finally:
        ops.force(None)
    ref = ((mean - x.mean((2, 3))) ** 2).sum(1) + (
        (std - torch.sqrt(x.var((2, 3)) + 1e-6)) ** 2
    ).sum(1)
    assert torch.equal(loss, ref)


def _adam_inputs(shape, cl, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x0 = x + 0.1 * torch.randn(shape, generator=g)
    gr = 1e-3 * torch.randn(shape, generator=g)
    m = 1e-3 * torch.randn(shape, generator=g)
    v = 1e-6 * torch.rand(shape, generator=g)
    kc = torch.rand(shape[0], generator=g)
    step = 1e-3 * torch.rand(shape[0], generator=g)
    return [_fmt(t, cl) for t in (x, x0, gr, m, v)] + [kc, step]


@pytest.mark.parametrize("t", [1, 7, 500])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_dc_adam_step_matches_the_reference(isa, shape, cl, t):
    x, x0, g, m, v, kc, step = _adam_inputs(shape, cl, seed=t)
    consts = (0.9, 0.999, math.sqrt(1 - 0.999**t), 1e-8)
    m_r, v_r = m.clone(), v.clone()
    xr, cr = R.dc_adam_step_reference(x, x0, g, m_r, v_r, kc, step, *consts)
    xk, ck = ops.dc_adam_step(x, x0, g, m, v, kc, step, *consts)
    assert torch.equal(m, m_r) and torch.equal(v, v_r)  # updated in place, bit for bit
    assert xk.stride() == x.stride()
    upd = (step.view(-1, 1, 1, 1) * m_r / (v_r.sqrt() / consts[2] + consts[3])).abs()
    assert ((xk - xr).abs() <= 2 * EPS32 * (x.abs() + upd)).all()
    assert torch.allclose(ck.double(), cr.double(), rtol=1e-6, atol=1e-30)
    d = (x - x0).double()
    assert torch.allclose(ck.double(), (d * d).sum((1, 2, 3)) / (shape[2] * shape[3]), rtol=1e-6)


def test_dc_adam_step_equals_autograd_and_torch_adam_formulation():
    """The fused step is the closeness gradient (what autograd derives for
    ``(x - x0).pow(2).sum(1).mean over positions * inv / lamb_c``) plus one Adam step."""
    shape, lamb_c = (4, 3, 5, 6), 0.02
    x, x0, g, _, _, _, _ = _adam_inputs(shape, False, seed=9)
    inv = torch.tensor([0.5, 0.5, 1.0, 0.25])
    lr = torch.tensor([1e-3, 1e-3, 1e-2, 1e-3])
    xa = x.clone().requires_grad_(True)
    close = (xa - x0).pow(2).sum(1).reshape(4, -1).mean(1)
    (gc,) = torch.autograd.grad((close / lamb_c * inv).sum(), xa)
    gt = (g + gc).double()
    t, b1, b2, eps = 1, 0.9, 0.999, 1e-8
    m_e = (1 - b1) * gt
    v_e = (1 - b2) * gt * gt
    step = lr / (1 - b1**t)
    x_e = x.double() - step.double().view(-1, 1, 1, 1) * m_e / (
        v_e.sqrt() / math.sqrt(1 - b2**t) + eps
    )
    m, v = torch.zeros(shape), torch.zeros(shape)
    kc = (2.0 * inv / (lamb_c * shape[2] * shape[3])).float()
    xk, ck = ops.dc_adam_step(x, x0, g, m, v, kc, step.float(), b1, b2, math.sqrt(1 - b2**t), eps)
    assert torch.allclose(ck, close.detach(), rtol=1e-6)
    assert torch.allclose(m.double(), m_e, rtol=1e-5, atol=1e-12)
    assert torch.allclose(xk.double(), x_e, rtol=0, atol=1e-6)


def test_opcheck_dc_ops():
    for backend in ("cpp", "reference"):
        ops.force(backend)
        try:
            x, mean, std = _stats_inputs((2, 3, 4, 5), False)
            loss, m, s = ops.bn_stat_loss(x, mean, std)
            torch.library.opcheck(torch.ops.pdquant.bn_stat_loss.default, (x, mean, std))
            torch.library.opcheck(
                torch.ops.pdquant.bn_stat_loss.default,
                (x.clone().requires_grad_(), mean, std),
            )
            torch.library.opcheck(
                torch.ops.pdquant.bn_stat_loss_backward.default,
                (torch.randn(2), x, mean, std, m, s),
            )
            a = _adam_inputs((2, 3, 4, 5), True)
            torch.library.opcheck(
                torch.ops.pdquant.dc_adam_step.default, (*a, 0.9, 0.999, 0.5, 1e-8)
            )
        finally:
            ops.force(None)


def test_dc_ops_reject_bad_inputs():
    x, mean, std = _stats_inputs((2, 3, 4, 5), False)
    with pytest.raises(ops.OpInputError, match="H \\* W must be >= 2"):
        ops.bn_stat_loss(torch.randn(2, 3, 1, 1), mean, std)
    with pytest.raises(ops.OpInputError, match=r"mean must be \[C\] = \[3\]"):
        ops.bn_stat_loss(x, torch.zeros(4), std)
    with pytest.raises(ops.OpInputError, match="x must be torch.float32"):
        ops.bn_stat_loss(x.double(), mean, std)
    with pytest.raises(ops.OpInputError, match="or channels_last"):
        ops.bn_stat_loss(x.transpose(2, 3), mean, std)
    _, m, s = ops.bn_stat_loss(x, mean, std)
    with pytest.raises(ops.OpInputError, match=r"grad must be \[B\] = \[2\]"):
        ops.bn_stat_loss_backward(torch.ones(3), x, mean, std, m, s)
    a = _adam_inputs((2, 3, 4, 5), False)
    with pytest.raises(ops.OpInputError, match="same memory format"):
        ops.dc_adam_step(a[0], _fmt(a[1], True), *a[2:], 0.9, 0.999, 0.5, 1e-8)
    with pytest.raises(ops.OpInputError, match=r"step must be \[B\]"):
        ops.dc_adam_step(*a[:6], torch.ones(3), 0.9, 0.999, 0.5, 1e-8)
    with pytest.raises(ops.OpInputError, match="b2 must be in"):
        ops.dc_adam_step(*a, 0.9, 1.0, 0.5, 1e-8)
    # the kernels check what they rely on themselves
    with pytest.raises(ValueError, match="H \\* W must be >= 2"):
        _C.bn_stat_loss_cpu(torch.randn(2, 3, 1, 1), mean, std)
    with pytest.raises(ValueError, match="x's shape and strides"):
        _C.dc_adam_step_cpu(a[0], a[1][:, :, :, :4], *a[2:], 0.9, 0.999, 0.5, 1e-8)


@pytest.mark.parametrize("forced", ["cuda", "triton"])
def test_forcing_a_backend_the_dc_ops_lack_leaves_them_on_their_default(forced):
    """The DC ops have a C++ kernel and the reference only: PDQUANT_KERNELS=cuda/triton (for
    the quantizer ops) must not make distribution correction fail; cpp and reference are still
    honoured, and a forced backend that an op has but cannot run stays an error."""
    from pdquant_fast.ops import backends

    ops.force(forced)
    try:
        for op in ("bn_stat_loss", "bn_stat_loss_backward", "dc_adam_step"):
            assert ops.choose(op, "cpu")[0] == "cpp"
            assert ops.choose(op, "cuda")[0] == "reference"
        if forced == "cuda":  # an op that has the forced backend but cannot run it here
            with pytest.raises(backends.BackendError):
                ops.choose("fake_quant_act", "cpu", 4)
    finally:
        ops.force(None)
    ops.force("reference")
    try:
        assert ops.choose("dc_adam_step", "cpu")[0] == "reference"
    finally:
        ops.force(None)
    rows = [r for r in ops.explain(("cpu",)) if r["op"] == "dc_adam_step"]
    why = {r["backend"]: r["reason"] for r in rows}
    assert why["cpp"] == "ok" and "no cuda kernel for dc_adam_step" in why["cuda"]
