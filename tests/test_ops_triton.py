"""Triton calibration kernels vs the references (issue 3), under ``TRITON_INTERPRET=1`` on CPU.

``tests/conftest.py`` turns the interpreter on when no CUDA device is present (before any kernel
module is imported); on a GPU machine the same tests run compiled, on the GPU. Sizes stay small:
the interpreter runs every program in numpy. Budgets are in ``tests/_calib_cases.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from _calib_cases import (  # noqa: E402
    BITS,
    RAGGED,
    adaround_inputs,
    assert_bit_exact,
    assert_sum_budget,
    check_fake_quant,
    check_mse,
    fq_inputs,
    libm_agreeing,
    ulp32,
)

from pdquant_fast import ops  # noqa: E402
from pdquant_fast.ops import reference as R  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip(
        "Triton needs a CUDA device or TRITON_INTERPRET=1 (set by conftest.py on CPU machines)",
        allow_module_level=True,
    )
DEVICE = "cpu" if INTERPRET else "cuda"
# numpy warns about lanes the kernels compute and then discard with tl.where (log2(0), inf - inf)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

from pdquant_fast.kernels import (  # noqa: E402
    adaround_hard_triton,
    adaround_soft_backward_triton,
    adaround_soft_triton,
    fake_quant_act_backward_triton,
    fake_quant_act_triton,
    mse_search_2d_triton,
)


@pytest.fixture(autouse=True)
def _no_forced_backend():
    yield
    ops.force(None)


# ------------------------------------------------------------------------------------------
# fake_quant_act


@pytest.mark.parametrize("drop", ["none", "seed", "mask"])
@pytest.mark.parametrize("numel", RAGGED)
def test_fake_quant_per_tensor_ragged(numel, drop):
    check_fake_quant(
        fake_quant_act_triton, fake_quant_act_backward_triton, (numel,), False, 0, 4, drop, DEVICE
    )


@pytest.mark.parametrize("bits", BITS)
def test_fake_quant_every_bit_width(bits):
    for drop in ("none", "seed"):
        check_fake_quant(
            fake_quant_act_triton,
            fake_quant_act_backward_triton,
            (5, 31),
            False,
            0,
            bits,
            drop,
            DEVICE,
            gen_seed=bits,
        )
    check_fake_quant(
        fake_quant_act_triton,
        fake_quant_act_backward_triton,
        (3, 9, 5),
        True,
        1,
        bits,
        "mask",
        DEVICE,
        gen_seed=bits,
    )


# (shape, axis): general [outer, C, inner] layout, channel first (outer 1), channel last
# (inner 1), 1-d per channel, a single channel.
PER_CHANNEL = [
    ((3, 7, 5), 1),
    ((4, 127), 0),
    ((2, 3, 7), -1),
    ((7,), 0),
    ((2, 1, 33), 1),
    ((1, 4097), 0),
]


@pytest.mark.parametrize("drop", ["none", "seed", "mask"])
@pytest.mark.parametrize(("shape", "axis"), PER_CHANNEL)
def test_fake_quant_per_channel(shape, axis, drop):
    check_fake_quant(
        fake_quant_act_triton, fake_quant_act_backward_triton, shape, True, axis, 3, drop, DEVICE
    )


def test_fake_quant_empty():
    x = torch.empty(0, 3, device=DEVICE)
    d, z = torch.rand(3, device=DEVICE) + 0.1, torch.zeros(3, device=DEVICE)
    assert fake_quant_act_triton(x, d, z, 4, 1, 1.0, None, None).shape == (0, 3)
    gx, gd = fake_quant_act_backward_triton(x, x, d, z, 4, 1, 1.0, None, None)
    assert gx.shape == (0, 3) and torch.equal(gd, torch.zeros(3, device=DEVICE))


def test_fake_quant_backward_is_deterministic():
    x, d, z, kp, seed, mask = fq_inputs((4097,), False, 0, 4, "seed", DEVICE)
    g = torch.randn(4097, device=DEVICE)
    runs = [fake_quant_act_backward_triton(g, x, d, z, 4, 0, kp, seed, mask) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1].view(torch.int32).item() == runs[1][1].view(torch.int32).item()


def test_fake_quant_seed_is_read_from_the_tensor():
    """Different seed values give different masks (and the reference's) without re-launching on a
    host copy: the kernel loads the seed itself."""
    x, d, z, kp, seed, _ = fq_inputs((127,), False, 0, 4, "seed", DEVICE)
    ys = []
    for s in (1, 2, -(2**40) + 5):
        sd = torch.tensor(s, dtype=torch.int64, device=DEVICE)
        y = fake_quant_act_triton(x, d, z, 4, 0, 0.5, sd, None)
        assert_bit_exact(y, R.fake_quant_act_reference(x, d, z, 4, 0, 0.5, sd, None), f"seed {s}")
        ys.append(y)
    assert not torch.equal(ys[0], ys[1])


def test_fake_quant_through_the_op_with_autograd():
    ops.force("triton")
    assert ops.choose("fake_quant_act", DEVICE, 4)[0] == "triton"
    x, d, z, kp, seed, mask = fq_inputs((2, 3, 7), True, 1, 4, "seed", DEVICE)
    x = x.nan_to_num(0.0, 1.0, -1.0).requires_grad_()
    d = d.clone().requires_grad_()
    y = ops.fake_quant_act(x, d, z, 4, 1, kp, seed, mask)
    g = torch.randn_like(y)
    y.backward(g)
    with torch.no_grad():
        y_ref = R.fake_quant_act_reference(x, d, z, 4, 1, kp, seed, mask)
        gx_ref, gd_ref = R.fake_quant_act_backward_reference(g, x, d, z, 4, 1, kp, seed, mask)
    assert_bit_exact(y.detach(), y_ref)
    assert_bit_exact(x.grad, gx_ref)
    torch.testing.assert_close(d.grad, gd_ref, rtol=2**-22, atol=0)


def test_fake_quant_opcheck_with_triton_forced():
    ops.force("triton")
    x, d, z, kp, seed, _ = fq_inputs((3, 4, 5), True, 1, 4, "seed", DEVICE)
    x = x.nan_to_num(0.0, 1.0, -1.0)
    torch.library.opcheck(torch.ops.pdquant.fake_quant_act, (x, d, z, 4, 1, kp, seed, None))
    g = torch.randn_like(x)
    torch.library.opcheck(
        torch.ops.pdquant.fake_quant_act_backward, (g, x, d, z, 4, 1, kp, seed, None)
    )


def test_int64_index_path(monkeypatch):
    """The int64 indexing used from 2**31 elements, run on small tensors (threshold lowered)."""
    from pdquant_fast.kernels import _common

    monkeypatch.setattr(_common, "INT64_INDEX_FROM", 0)
    for shape, per_channel, axis in [((127,), False, 0)] + [(s, True, a) for s, a in PER_CHANNEL]:
        check_fake_quant(
            fake_quant_act_triton,
            fake_quant_act_backward_triton,
            shape,
            per_channel,
            axis,
            4,
            "seed",
            DEVICE,
        )
    w_floor, alpha, delta, zp, beta = _exact_where_libm_agrees((3, 130), 4, 4.0)
    w_q, _ = adaround_soft_triton(w_floor, alpha, delta, zp, 4, beta)
    assert_bit_exact(w_q, R.adaround_soft_reference(w_floor, alpha, delta, zp, 4, beta)[0])
    g = torch.randn_like(w_floor)
    assert_bit_exact(
        adaround_soft_backward_triton(g, beta, w_floor, alpha, delta, zp, 4, beta),
        R.adaround_soft_backward_reference(g, beta, w_floor, alpha, delta, zp, 4, beta),
    )
    assert_bit_exact(
        adaround_hard_triton(w_floor, alpha, zp, 4),
        R.adaround_hard_reference(w_floor, alpha, zp, 4),
    )


# ------------------------------------------------------------------------------------------
# AdaRound

ADA_SHAPES = [(1, 1), (7, 3), (4, 127), (3, 4097), (5, 3, 3, 3)]


def _skip_unless_torch_libm():
    if not INTERPRET:
        from pdquant_fast.kernels import _common

        if _common.LIBDEVICE is None:
            pytest.skip("Triton links its bundled libdevice, not torch's: exp/pow not torch's bits")


def _exact_where_libm_agrees(shape, bits, beta, gen_seed=0):
    """Inputs whose alphas the two libms agree on (others set to 0, where both are exact).

    On a GPU the kernels' exp/pow are torch's only when they link torch's libdevice
    (``kernels/_common.py``); otherwise the exact AdaRound tests skip (tests/test_ops_gpu.py
    checks that case against a budget)."""
    _skip_unless_torch_libm()
    w_floor, alpha, delta, zp, b = adaround_inputs(shape, bits, "cpu", gen_seed, beta)
    alpha = torch.where(libm_agreeing(alpha, beta), alpha, torch.zeros_like(alpha))
    return [t.to(DEVICE) for t in (w_floor, alpha, delta, zp, b)]


@pytest.mark.parametrize("shape", ADA_SHAPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_adaround_soft_exact(shape, bits):
    w_floor, alpha, delta, zp, beta = _exact_where_libm_agrees(shape, bits, 4.0, bits)
    w_q, reg = adaround_soft_triton(w_floor, alpha, delta, zp, bits, beta)
    w_q_ref, reg_ref = R.adaround_soft_reference(w_floor, alpha, delta, zp, bits, beta)
    assert_bit_exact(w_q, w_q_ref, "w_q")
    assert reg.shape == () and reg.dtype == torch.float32
    h = R.rectified_sigmoid(alpha)
    terms = (1 - (2 * h - 1).abs().pow(beta)).double().abs().sum()
    assert_sum_budget(reg, reg_ref, terms, alpha.numel(), "reg")


@pytest.mark.parametrize("shape", ADA_SHAPES)
@pytest.mark.parametrize("beta", [20.0, 2.0, 1.0])
def test_adaround_soft_backward_exact(shape, beta):
    bits = 4
    w_floor, alpha, delta, zp, b = _exact_where_libm_agrees(shape, bits, beta)
    g_wq = torch.randn(shape, device=DEVICE)
    g_reg = torch.tensor(0.37, device=DEVICE)
    got = adaround_soft_backward_triton(g_wq, g_reg, w_floor, alpha, delta, zp, bits, b)
    want = R.adaround_soft_backward_reference(g_wq, g_reg, w_floor, alpha, delta, zp, bits, b)
    assert_bit_exact(got, want, f"grad_alpha beta={beta}")


def test_adaround_soft_all_alphas_within_libm_budget():
    """Every alpha (libms not filtered): elements the libms agree on are bit-exact; the others
    differ only by what a few-ulp exp/pow difference can cause (budgets below)."""
    _skip_unless_torch_libm()
    shape, bits, beta = (6, 300), 4, 4.0
    w_floor, alpha, delta, zp, b = (t.to(DEVICE) for t in adaround_inputs(shape, bits, beta=beta))
    agree = libm_agreeing(alpha.cpu(), beta).to(DEVICE)
    w_q, reg = adaround_soft_triton(w_floor, alpha, delta, zp, bits, b)
    w_q_ref, reg_ref = R.adaround_soft_reference(w_floor, alpha, delta, zp, bits, b)
    assert_bit_exact(w_q[agree], w_q_ref[agree], "w_q where the libms agree")
    # h off by <= 8 ulp(1) -> k = w_floor + h + z off by that plus 2 roundings -> times delta
    h_err = 8 * 2.0**-24
    d = delta[:, None].expand(shape)
    budget = (
        d * (h_err + 3 * ulp32(w_floor.abs() + zp[:, None].abs() + 2).float())
        + ulp32(w_q_ref).float()
    )
    assert ((w_q - w_q_ref).abs() <= budget).all()
    # each regulariser term moves by <= beta * 2 h_err + 2 ulp(1); plus the summation budget
    n = alpha.numel()
    terms = (1 - (2 * R.rectified_sigmoid(alpha) - 1).abs().pow(b)).double().abs().sum()
    libm = n * (2 * beta * h_err + 2.0**-23)
    assert abs(reg.double() - reg_ref.double()) <= libm + ulp32(reg_ref) + 2 * n * 2.0**-53 * terms
    g_wq, g_reg = torch.randn(shape, device=DEVICE), torch.tensor(0.37, device=DEVICE)
    got = adaround_soft_backward_triton(g_wq, g_reg, w_floor, alpha, delta, zp, bits, b)
    want = R.adaround_soft_backward_reference(g_wq, g_reg, w_floor, alpha, delta, zp, bits, b)
    assert_bit_exact(got[agree], want[agree], "grad_alpha where the libms agree")
    # elsewhere: relative 2**-12 of the magnitude of the two contributions (grad_wq and reg)
    s = torch.sigmoid(alpha)
    dh = (R.ZETA - R.GAMMA) * s * (1 - s)
    scale = (g_wq * delta[:, None]).abs() * dh + g_reg.abs() * beta * 2 * dh
    assert ((got - want).abs() <= 2.0**-12 * scale + 2.0**-126).all()


@pytest.mark.parametrize("shape", ADA_SHAPES)
@pytest.mark.parametrize("bits", BITS)
def test_adaround_hard_exact(shape, bits):
    w_floor, alpha, _, zp, _ = (t.to(DEVICE) for t in adaround_inputs(shape, bits, gen_seed=bits))
    codes = adaround_hard_triton(w_floor, alpha, zp, bits)
    assert_bit_exact(codes, R.adaround_hard_reference(w_floor, alpha, zp, bits), "codes")


def test_adaround_through_the_ops():
    ops.force("triton")
    w_floor, alpha, delta, zp, beta = _exact_where_libm_agrees((4, 9), 4, 3.0)
    alpha = alpha.clone().requires_grad_()
    w_q, reg = ops.adaround_soft(w_floor, alpha, delta, zp, 4, beta)
    (w_q.sum() + 0.5 * reg).backward()
    want = R.adaround_soft_backward_reference(
        torch.ones_like(w_q), torch.tensor(0.5), w_floor, alpha.detach(), delta, zp, 4, beta
    )
    assert_bit_exact(alpha.grad, want)
    assert_bit_exact(
        ops.adaround_hard(w_floor, alpha.detach(), zp, 4),
        R.adaround_hard_reference(w_floor, alpha.detach(), zp, 4),
    )
    torch.library.opcheck(torch.ops.pdquant.adaround_soft, (w_floor, alpha, delta, zp, 4, beta))


# ------------------------------------------------------------------------------------------
# MSE search


@pytest.mark.parametrize("k", [1, 7, 127])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_search_2d_within_budget(bits, k):
    check_mse(mse_search_2d_triton, 5, k, bits, 12, DEVICE, gen_seed=bits * 100 + k)


def test_mse_search_2d_8bit():
    check_mse(mse_search_2d_triton, 2, 300, 8, 5, DEVICE)


@pytest.mark.parametrize("bits", [2, 4])
def test_mse_search_2d_given_range(bits):
    check_mse(mse_search_2d_triton, 4, 37, bits, 12, DEVICE, gen_seed=bits, bounded=True)


def test_mse_search_2d_through_the_op():
    ops.force("triton")
    x = torch.randn(3, 40, device=DEVICE)
    d, z = ops.mse_search_2d(x, 4, 10)
    d_ref, z_ref = R.mse_search_2d_reference(x.cpu(), 4, 10)
    assert d.shape == d_ref.shape and z.shape == z_ref.shape


# ------------------------------------------------------------------------------------------
# packaging


def test_libdevice_lookup_matches_torchs_toolkit(tmp_path, monkeypatch):
    """The AdaRound kernels link the libdevice of the toolkit torch was built with (found by
    CUDA_VERSION in cuda.h); another version is not used; PDQUANT_LIBDEVICE overrides."""
    from pdquant_fast.kernels import _common

    home = tmp_path / "cuda-13.0"
    (home / "include").mkdir(parents=True)
    (home / "nvvm" / "libdevice").mkdir(parents=True)
    (home / "include" / "cuda.h").write_text("#pragma once\n#define CUDA_VERSION 13000\n")
    bc = home / "nvvm" / "libdevice" / "libdevice.10.bc"
    bc.write_bytes(b"BC")
    monkeypatch.delenv("PDQUANT_LIBDEVICE", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert _common._toolkit_version(home) == (13, 0)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert _common._torch_libdevice() == str(bc)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    found = _common._torch_libdevice()
    assert found != str(bc)  # a 13.0 toolkit is not torch 12.8's
    monkeypatch.setattr(torch.version, "cuda", None)
    assert _common._torch_libdevice() is None
    monkeypatch.setenv("PDQUANT_LIBDEVICE", "/some/libdevice.10.bc")
    assert _common._torch_libdevice() == "/some/libdevice.10.bc"


def test_kernels_package_imports_no_triton():
    code = (
        "import sys, pdquant_fast.kernels as k; "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "assert 'fake_quant_act_triton' in dir(k); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
