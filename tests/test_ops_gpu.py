"""CUDA and Triton calibration kernels on a GPU vs the references (issue 3). Skips without one.

Every op, both GPU backends (``cuda`` = ``pdquant_fast._C.<op>_cuda``, ``triton`` =
``pdquant_fast.kernels.<op>_triton``): forward values, grad_x, AdaRound weights/codes/gradients
bit-exact against the reference run on the same GPU (the GPU kernels call the same libdevice
``expf``/``powf`` as torch's CUDA kernels, so nothing is filtered here); float64-accumulated
reductions within the budget of ``tests/_calib_cases.py``; the MSE search within its score budget
against the CPU reference; ``torch.library.opcheck`` with the backend forced; and a CUDA-graph
capture of a fake-quant forward + backward step (a host sync inside capture raises, so this
proves there is none), replayed with a new input and a new seed written in place.
"""

from __future__ import annotations

import pytest
import torch
from _calib_cases import (
    BITS,
    RAGGED,
    adaround_inputs,
    assert_bit_exact,
    assert_sum_budget,
    check_fake_quant,
    check_mse,
    fq_inputs,
)

from pdquant_fast import ops
from pdquant_fast.ops import backends
from pdquant_fast.ops import reference as R

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DEV = "cuda"
GPU_BACKENDS = ["cuda", "triton"]


@pytest.fixture(autouse=True)
def _no_forced_backend():
    yield
    ops.force(None)


def triton_libdevice_is_torchs() -> bool:
    """Whether the Triton kernels link the libdevice of torch's CUDA toolkit (exact exp/pow)."""
    from pdquant_fast.kernels import _common

    return _common.LIBDEVICE is not None


def kernel(op: str, backend: str):
    fn, why = backends.candidate(op, backend, "cuda", 4)
    if fn is None:
        pytest.skip(f"{backend} {op} unavailable: {why}")
    return fn


# ------------------------------------------------------------------------------------------
# fake_quant_act

PER_CHANNEL = [
    ((3, 7, 5), 1),
    ((4, 127), 0),
    ((2, 3, 7), -1),
    ((64, 33), -1),
    ((7,), 0),
    ((8, 64, 28, 28), 1),  # activation, channel axis 1, inner % 4 == 0 (float4 path)
    ((512, 3, 3, 3), 0),  # weight, per output channel, inner 27 (scalar path)
    ((256, 1152), 0),
]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("drop", ["none", "seed", "mask"])
@pytest.mark.parametrize("numel", RAGGED + (1 << 20, (1 << 20) + 3))
def test_fake_quant_per_tensor(backend, drop, numel):
    fwd, bwd = kernel("fake_quant_act", backend), kernel("fake_quant_act_backward", backend)
    check_fake_quant(fwd, bwd, (numel,), False, 0, 4, drop, DEV, gen_seed=numel)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("bits", BITS)
def test_fake_quant_bits(backend, bits):
    fwd, bwd = kernel("fake_quant_act", backend), kernel("fake_quant_act_backward", backend)
    for drop in ("none", "seed", "mask"):
        check_fake_quant(fwd, bwd, (4, 16, 9, 9), True, 1, bits, drop, DEV, gen_seed=bits)
        check_fake_quant(fwd, bwd, (3001,), False, 0, bits, drop, DEV, gen_seed=bits)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("drop", ["none", "seed", "mask"])
@pytest.mark.parametrize(("shape", "axis"), PER_CHANNEL)
def test_fake_quant_per_channel(backend, drop, shape, axis):
    fwd, bwd = kernel("fake_quant_act", backend), kernel("fake_quant_act_backward", backend)
    check_fake_quant(fwd, bwd, shape, True, axis, 4, drop, DEV)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fake_quant_unaligned_input(backend):
    """A view that starts 1 element into its storage: the float4 path must not be taken."""
    fwd = kernel("fake_quant_act", backend)
    x, d, z, kp, seed, _ = fq_inputs((4097,), False, 0, 4, "seed", DEV)
    xu = torch.empty(4098, device=DEV)[1:]
    xu.copy_(x)
    assert_bit_exact(
        fwd(xu, d, z, 4, 0, kp, seed, None),
        R.fake_quant_act_reference(x, d, z, 4, 0, kp, seed, None),
    )


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fake_quant_backward_deterministic(backend):
    bwd = kernel("fake_quant_act_backward", backend)
    x, d, z, kp, seed, _ = fq_inputs((64, 64, 56, 56), True, 1, 4, "seed", DEV)
    g = torch.randn_like(x)
    a = bwd(g, x, d, z, 4, 1, kp, seed, None)
    b = bwd(g, x, d, z, 4, 1, kp, seed, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].view(torch.int32), b[1].view(torch.int32))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fake_quant_opcheck(backend):
    kernel("fake_quant_act", backend)
    ops.force(backend)
    x, d, z, kp, seed, _ = fq_inputs((3, 4, 5), True, 1, 4, "seed", DEV)
    x = x.nan_to_num(0.0, 1.0, -1.0)
    torch.library.opcheck(torch.ops.pdquant.fake_quant_act, (x, d, z, 4, 1, kp, seed, None))
    g = torch.randn_like(x)
    torch.library.opcheck(
        torch.ops.pdquant.fake_quant_act_backward, (g, x, d, z, 4, 1, kp, seed, None)
    )


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quant_cuda_graph_step(backend, per_channel):
    """Capture forward + backward (through the op and autograd) in a CUDA graph; replay with a new
    x and a new seed written in place; compare with the eager reference."""
    kernel("fake_quant_act", backend)
    ops.force(backend)
    shape, axis = (8, 16, 14, 14), 1
    x0, d, z, kp, seed, _ = fq_inputs(shape, per_channel, axis, 4, "seed", DEV)
    x_static = x0.nan_to_num(0.0, 1.0, -1.0).clone()
    d_param = d.clone().requires_grad_()
    g_static = torch.randn_like(x_static)

    def step():
        xx = x_static.detach().requires_grad_()
        y = ops.fake_quant_act(xx, d_param, z, 4, axis, kp, seed, None)
        gx, gd = torch.autograd.grad(y, (xx, d_param), g_static)
        return y, gx, gd

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, gx, gd = step()
    x_static.copy_(torch.randn_like(x_static) * 2)
    seed.fill_(424242)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        y_ref = R.fake_quant_act_reference(x_static, d, z, 4, axis, kp, seed, None)
        gx_ref, gd_ref = R.fake_quant_act_backward_reference(
            g_static, x_static, d, z, 4, axis, kp, seed, None
        )
    assert_bit_exact(y, y_ref, "graph forward")
    assert_bit_exact(gx, gx_ref, "graph grad_x")
    torch.testing.assert_close(gd, gd_ref, rtol=2**-20, atol=0)


# ------------------------------------------------------------------------------------------
# AdaRound

ADA_SHAPES = [(1, 1), (7, 3), (4, 127), (3, 4097), (64, 64, 3, 3), (512, 512, 3, 3), (10, 27)]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", ADA_SHAPES)
def test_adaround_soft_and_backward(backend, bits, shape):
    soft = kernel("adaround_soft", backend)
    soft_bwd = kernel("adaround_soft_backward", backend)
    for beta in (20.0, 2.0, 1.0):
        w_floor, alpha, delta, zp, b = adaround_inputs(shape, bits, DEV, gen_seed=bits, beta=beta)
        w_q, reg = soft(w_floor, alpha, delta, zp, bits, b)
        w_q_ref, reg_ref = R.adaround_soft_reference(w_floor, alpha, delta, zp, bits, b)
        assert_bit_exact(w_q, w_q_ref, f"w_q beta={beta}")
        h = R.rectified_sigmoid(alpha)
        terms = (1 - (2 * h - 1).abs().pow(b)).double().abs().sum()
        assert_sum_budget(reg, reg_ref, terms, alpha.numel(), f"reg beta={beta}")
        g_wq = torch.randn_like(w_floor)
        g_reg = torch.tensor(0.37, device=DEV)
        got = soft_bwd(g_wq, g_reg, w_floor, alpha, delta, zp, bits, b)
        want = R.adaround_soft_backward_reference(g_wq, g_reg, w_floor, alpha, delta, zp, bits, b)
        if backend == "cuda" or triton_libdevice_is_torchs():
            assert_bit_exact(got, want, f"grad_alpha beta={beta}")
        else:  # Triton's bundled powf: an ulp or two off torch's in the regulariser term
            s = torch.sigmoid(alpha)
            dh = (R.ZETA - R.GAMMA) * s * (1 - s)
            scale = (g_wq * delta.reshape((-1,) + (1,) * (alpha.dim() - 1))).abs() * dh
            scale = scale + g_reg.abs() * beta * 2 * dh
            assert ((got - want).abs() <= 2.0**-20 * scale + 2.0**-126).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", ADA_SHAPES)
def test_adaround_hard(backend, bits, shape):
    hard = kernel("adaround_hard", backend)
    w_floor, alpha, _, zp, _ = adaround_inputs(shape, bits, DEV, gen_seed=bits)
    assert_bit_exact(
        hard(w_floor, alpha, zp, bits), R.adaround_hard_reference(w_floor, alpha, zp, bits)
    )


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_adaround_opcheck(backend):
    kernel("adaround_soft", backend)
    ops.force(backend)
    w_floor, alpha, delta, zp, beta = adaround_inputs((4, 9), 4, DEV)
    alpha.requires_grad_()
    torch.library.opcheck(torch.ops.pdquant.adaround_soft, (w_floor, alpha, delta, zp, 4, beta))
    torch.library.opcheck(torch.ops.pdquant.adaround_hard, (w_floor, alpha.detach(), zp, 4))


# ------------------------------------------------------------------------------------------
# MSE search


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(
    ("c", "k", "bits", "steps"),
    [
        (5, 1, 4, 20),
        (5, 7, 2, 20),
        (5, 127, 3, 50),
        (6, 4097, 4, 30),
        (64, 576, 4, 100),
        (8, 1152, 8, 20),
    ],
)
def test_mse_search_2d(backend, c, k, bits, steps):
    check_mse(kernel("mse_search_2d", backend), c, k, bits, steps, DEV, gen_seed=k)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("c,k,bits", [(5, 7, 2), (6, 4097, 4), (1, 65536, 8)])
def test_mse_search_2d_given_range(backend, c, k, bits):
    check_mse(kernel("mse_search_2d", backend), c, k, bits, 20, DEV, gen_seed=k, bounded=True)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_mse_search_opcheck(backend):
    kernel("mse_search_2d", backend)
    ops.force(backend)
    x = torch.randn(3, 40, device=DEV)
    torch.library.opcheck(
        torch.ops.pdquant.mse_search_2d, (x, 4, 10), test_utils=("test_schema", "test_faketensor")
    )


# ------------------------------------------------------------------------------------------
# no host sync in a reconstruction step's ops (the engine runs them inside deferred_checks)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_step_ops_make_no_host_sync_inside_deferred_checks(backend):
    """A QDrop activation fake-quant through ActQuantizer (seed from the engine's CPU generator)
    and an AdaRound soft weight, forward and backward, inside ``ops.deferred_checks()``:
    ``torch.cuda.set_sync_debug_mode("error")`` raises on any host sync, so none happens. An
    invalid step inside the block is still reported, when the block ends, and not before."""
    from pdquant_fast.quant import ActQuantizer

    kernel("fake_quant_act", backend)
    kernel("adaround_soft", backend)
    ops.force(backend)
    aq = ActQuantizer(4, "a").to(DEV)
    aq.init_from(torch.randn(4096, device=DEV).abs())
    aq.enabled, aq.keep_prob, aq.generator = True, 0.5, torch.Generator().manual_seed(3)
    aq.delta.requires_grad_(True)
    w_floor, alpha, delta, zp, beta = adaround_inputs((64, 32, 3, 3), 4, DEV, gen_seed=1)
    alpha.requires_grad_(True)
    x = torch.randn(8, 32, 14, 14, device=DEV, requires_grad=True)
    torch.cuda.synchronize()
    with ops.deferred_checks():
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                y = aq(x)
                w_q, reg = ops.adaround_soft(w_floor, alpha, delta, zp, 4, beta)
                loss = (y * y).sum() + (w_q * w_q).sum() + reg
                loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and aq.delta.grad is not None and alpha.grad is not None
    assert torch.isfinite(aq.delta.grad).all() and torch.isfinite(alpha.grad).all()

    bad = delta.clone()
    bad[5] = -1.0
    with pytest.raises(ops.OpInputError, match=r"invalid value reached .* on cuda"):
        with ops.deferred_checks():
            ops.adaround_soft(w_floor, alpha.detach(), bad, zp, 4, beta)  # no raise here
            ops.fake_quant_act(x.detach(), aq.delta.detach(), aq.zp, 4, -1, 1.0, None, None)
    with pytest.raises(ops.OpInputError, match=r"finite and > 0; got 1 invalid"):
        ops.adaround_soft(w_floor, alpha.detach(), bad, zp, 4, beta)  # outside: at the call
