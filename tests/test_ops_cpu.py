"""C++ CPU calibration kernels (issue 3) vs the references, through the public ops, cpp forced.

Every test runs on each SIMD path this CPU has (AVX-512, AVX2, scalar; pinned with
``pdquant_fast._C.calib_cpu_isa``). Budgets (``tests/_calib_cases.py`` has the shared ones):

* fake-quant forward, grad_x, AdaRound hard codes: bit-exact (``atol = rtol = 0``, NaN == NaN);
* grad_delta: float32 products summed in float64 in another order, rounded once:
  ``|got - ref| <= ulp32(ref) + 2 N 2**-53 sum |g * term|``;
* AdaRound soft: our sigmoid is within 3 ulp of the correctly rounded one (measured 3; torch's,
  not the same bits, 2), so ``|h_cpp - h_ref| <= 1.2 (3 + 2) ulp(s) + ulp(h) < 2**-21`` (h, s in
  [0, 1]); every later float32 op is the
  reference's, and an op whose inputs differ by e returns values that differ by at most
  e (times its Lipschitz factor) + 1 ulp of its result; the per-element budgets below follow that
  rule;
* our pow x^p is within (1.5 + 0.7 p) 1e-7 relative of float64 (measured 1.8e-7 at p = 2.4,
  9.6e-7 at p = 19);
* MSE search: the chosen quantizer's float64 L2.4 score <= (1 + 1e-5) x the reference's.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _calib_cases import (  # noqa: E402
    BITS,
    RAGGED,
    adaround_inputs,
    assert_bit_exact,
    assert_sum_budget,
    calib_isas,
    check_fake_quant,
    check_mse,
    fq_grad_terms_abs_sum,
    fq_inputs,
    isa_fixture,
    mse_inputs,
    mse_rows_not_worse,
    ulp32,
)

from pdquant_fast import ops  # noqa: E402
from pdquant_fast.ops import reference as R  # noqa: E402

_C = pytest.importorskip("pdquant_fast._C", reason="C++ extension pdquant_fast._C not built")
NEEDED = (
    "fake_quant_act_cpu",
    "fake_quant_act_backward_cpu",
    "adaround_soft_cpu",
    "adaround_soft_backward_cpu",
    "adaround_hard_cpu",
    "mse_search_2d_cpu",
    "calib_cpu_isa",
)
_missing = [f for f in NEEDED if not hasattr(_C, f)]
if _missing:
    pytest.skip(f"pdquant_fast._C lacks {_missing}", allow_module_level=True)


ISAS = calib_isas(_C)
isa = isa_fixture(_C)  # pins one SIMD path and forces the cpp backend for the test


@pytest.fixture
def cpp():
    ops.force("cpp")
    yield
    ops.force(None)


def test_every_path_is_tested_and_auto_picks_the_best():
    assert "scalar" in ISAS
    best = _C.calib_cpu_isa("auto")
    assert best == ISAS[0]
    with pytest.raises((RuntimeError, ValueError), match="unknown ISA"):
        _C.calib_cpu_isa("sse9")


def test_cpp_backend_is_chosen():
    ops.force("cpp")
    try:
        name, fn = ops.choose("fake_quant_act", "cpu", 4)
    finally:
        ops.force(None)
    assert name == "cpp" and fn is _C.fake_quant_act_cpu


# ------------------------------------------------------------------------------------------
# fake_quant_act


def _fq_public(x, delta, zp, bits, axis, kp, seed, mask):
    return ops.fake_quant_act(x, delta, zp, bits, axis, kp, seed, mask)


def _fq_bwd_public(grad, x, delta, zp, bits, axis, kp, seed, mask):
    return ops.fake_quant_act_backward(grad, x, delta, zp, bits, axis, kp, seed, mask)


@pytest.mark.parametrize("drop", ["none", "seed", "mask"])
@pytest.mark.parametrize("numel", RAGGED)
def test_fake_quant_per_tensor_ragged(isa, numel, drop):
    check_fake_quant(_fq_public, _fq_bwd_public, (numel,), False, 0, 4, drop)


@pytest.mark.parametrize("bits", BITS)
def test_fake_quant_every_bit_width(isa, bits):
    for drop in ("none", "seed", "mask"):
        check_fake_quant(_fq_public, _fq_bwd_public, (6, 37), False, 0, bits, drop, gen_seed=bits)
        check_fake_quant(_fq_public, _fq_bwd_public, (6, 37), True, 1, bits, drop, gen_seed=bits)


@pytest.mark.parametrize("axis", [0, 1, -1, 2])
# (8, 16, 24, 24): several chunks of partial sums (73,728 elements, 32,768 per chunk); on axis 1
# its backward sums row by row with more channels than rows (>= 8 rows), while (4, 16, 8, 8) and
# (3, 40, 1, 1) take the channel-by-channel path (fewer rows)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (4, 16, 8, 8), (3, 40, 1, 1), (8, 16, 24, 24)])
def test_fake_quant_per_channel_4d(isa, shape, axis):
    for drop in ("none", "seed", "mask"):
        check_fake_quant(_fq_public, _fq_bwd_public, shape, True, axis, 3, drop, gen_seed=axis)


@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quant_zero_point_at_both_ends(isa, per_channel):
    """zero_point = 0 and = n: the grid is all-positive / all-negative; clamps on both sides."""
    bits, n = 4, 15
    for z in (0.0, float(n)):
        x, delta, _, kp, seed, mask = fq_inputs((8, 33), per_channel, 1, bits, "seed", gen_seed=3)
        zp = torch.full_like(delta, z)
        d_b = delta.reshape(1, -1) if per_channel else delta
        # values exactly on the clamp bounds and one step beyond them
        x[0] = torch.tensor([-z, n - z, -z - 1, n - z + 1] * 9)[: x.shape[1]] * d_b.reshape(-1)
        y = _fq_public(x, delta, zp, bits, 1, kp, seed, mask)
        assert_bit_exact(y, R.fake_quant_act_reference(x, delta, zp, bits, 1, kp, seed, mask))
        g = torch.randn_like(x)
        gx, gd = _fq_bwd_public(g, x, delta, zp, bits, 1, kp, seed, mask)
        gx_r, gd_r = R.fake_quant_act_backward_reference(g, x, delta, zp, bits, 1, kp, seed, mask)
        assert_bit_exact(gx, gx_r)
        s, nt = fq_grad_terms_abs_sum(g, x, delta, zp, bits, 1, kp, seed, mask)
        assert_sum_budget(gd, gd_r, s, nt, "grad_delta")


@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quant_autograd(isa, per_channel):
    """Autograd of the public op (its backward op runs): grads of x and delta."""
    shape, axis, bits = (4, 8, 6, 6), 1, 4
    x, delta, zp, kp, seed, mask = fq_inputs(shape, per_channel, axis, bits, "seed", gen_seed=5)
    x = x.nan_to_num(posinf=1e3, neginf=-1e3).requires_grad_()
    delta = delta.clone().requires_grad_()
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    y = ops.fake_quant_act(x, delta, zp, bits, axis, kp, seed, None)
    y.backward(g)
    with torch.no_grad():
        gx_r, gd_r = R.fake_quant_act_backward_reference(
            g, x, delta, zp, bits, axis, kp, seed, None
        )
        s, nt = fq_grad_terms_abs_sum(g, x, delta, zp, bits, axis, kp, seed, None)
    assert_bit_exact(x.grad, gx_r, "x.grad")
    assert_sum_budget(delta.grad, gd_r, s, nt, "delta.grad")


def test_fake_quant_exact_ties(isa):
    """x = (k + 1/2) d exactly: torch.round's half-to-even decides, and so must the kernel."""
    d = torch.tensor(0.25)  # a power of two: (k + 0.5) * d is exact, x / d gives k + 0.5 exactly
    k = torch.arange(-20, 20, dtype=torch.float32)
    x = (k + 0.5) * d
    y = _fq_public(x, d, torch.tensor(8.0), 4, 0, 1.0, None, None)
    assert_bit_exact(y, R.fake_quant_act_reference(x, d, torch.tensor(8.0), 4, 0, 1.0, None, None))
    # the codes themselves: round(k + 0.5) is the even neighbour
    codes = torch.round(y / d) + 8
    even = torch.where(k % 2 == 0, k, k + 1) + 8
    inside = (even >= 0) & (even <= 15)
    assert torch.equal(codes[inside], even[inside])


def test_fake_quant_grad_delta_is_deterministic_across_thread_counts(cpp):
    x, delta, zp, kp, seed, mask = fq_inputs((8, 16, 20, 20), True, 1, 4, "seed", gen_seed=9)
    g = torch.randn(x.shape)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.fake_quant_act_backward(g, x, delta, zp, 4, 1, kp, seed, mask)[1]
        torch.set_num_threads(max(2, old))
        two = ops.fake_quant_act_backward(g, x, delta, zp, 4, 1, kp, seed, mask)[1]
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_fake_quant_paths_agree_bit_for_bit():
    """All SIMD paths: identical y and grad_x (exact ops), on inputs with every special value."""
    x, delta, zp, kp, seed, mask = fq_inputs((5, 7, 11), True, 2, 5, "seed", gen_seed=11)
    g = torch.randn(x.shape)
    outs = []
    try:
        for isa in ISAS:
            _C.calib_cpu_isa(isa)
            y = _C.fake_quant_act_cpu(x, delta, zp, 5, 2, kp, seed, mask)
            gx, _ = _C.fake_quant_act_backward_cpu(g, x, delta, zp, 5, 2, kp, seed, mask)
            outs.append((y, gx))
    finally:
        _C.calib_cpu_isa("auto")
    for y, gx in outs[1:]:
        assert_bit_exact(y, outs[0][0])
        assert_bit_exact(gx, outs[0][1])


# ------------------------------------------------------------------------------------------
# AdaRound


def _ada_budgets(w_floor, alpha, delta, zp, bits, beta, wq_ref):
    """Per-element w_q budget: |dh| <= 2**-21, then k = (w_floor + h) + z, clamp, - z, * d
    (each may round once more on the other side): d (2**-21 + 3 ulp(|w_floor| + |z| + n + 1))
    + ulp(w_q)."""
    n = 2**bits - 1
    d = delta.reshape(-1, *[1] * (w_floor.dim() - 1)).double()
    z = zp.reshape(d.shape).double()
    mag = w_floor.double().abs() + z.abs() + n + 1
    return d * (2.0**-21 + 3 * ulp32(mag)) + ulp32(wq_ref)


def test_sigmoid_within_3_ulp_and_h_budget(isa):
    """w_floor = z = 0, d = 1 makes w_q = h exactly: h vs the reference, and our sigmoid vs the
    correctly rounded one (float64 then one rounding), over the normal float range."""
    a = torch.cat([torch.linspace(-20, 20, 400_001), torch.randn(20_000) * 4, torch.zeros(1)])
    a = a[None].contiguous()
    wf, d, z = torch.zeros_like(a), torch.ones(1), torch.zeros(1)
    h, _ = ops.adaround_soft(wf, a, d, z, 8, torch.tensor(2.0))
    h_ref = R.rectified_sigmoid(a)
    assert (h - h_ref).abs().max().item() <= 2.0**-21
    if hasattr(_C, "_calib_sigmoid_cpu"):
        a = torch.cat([a[0], torch.linspace(-87, 100, 200_001)])
        s = _C._calib_sigmoid_cpu(a)
        exact = torch.sigmoid(a.double()).float()
        normal = exact >= 2.0**-126
        ulps = ((s.double() - exact.double()).abs() / ulp32(exact))[normal]
        assert ulps.max().item() <= 3.0


@pytest.mark.skipif(not hasattr(_C, "_calib_pow_cpu"), reason="no _calib_pow_cpu test hook")
def test_pow_relative_error(isa):
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.rand(100_000, generator=g),
            torch.rand(10_000, generator=g) * 1e30,
            torch.rand(10_000, generator=g) * 1e-30,
            torch.tensor([0.0, 1.0, 1e-45, 2.0**-126, 3.4e38]),
        ]
    )
    for p in (2.4, 1.2, 1.0, 2.0, 7.3, 19.0, 0.5):
        got = _C._calib_pow_cpu(x, p).double()
        want = x.double().pow(torch.tensor(p, dtype=torch.float32).double())
        normal = (want >= 2.0**-126) & (want <= 3.4e38)
        rel = ((got - want).abs() / want)[normal]
        assert rel.max().item() <= (1.5 + 0.7 * p) * 1e-7, f"p={p}: {rel.max().item():.3e}"
        assert got[x == 0].eq(0).all() and got[x == 1].eq(1).all()


def _ada_grad_budget(grad_wq, grad_reg, w_floor, alpha, delta, zp, bits, beta, g_ref):
    """Per-element grad_alpha budget and the elements it covers (see the module docstring).

    With dv <= 2**-19 the difference of v = 2h - 1 and ddh <= 2**-20 that of
    dh = 1.2 s (1 - s) between two float32 evaluations (sigmoids 5 ulp apart, 3 roundings):
    |d g_q| <= |grad_wq d| ddh + 2 ulp(g_q);
    |d g_r| <= 2 |grad_reg beta| (ddh |v|^(b-1) + dh ((b-1) |v|^(b-2) dv + 2**-19 |v|^(b-1)))
               + 2**-21 |g_r|.
    Elements whose rectified-sigmoid clamp or grid clamp decision sits within those margins of
    its threshold (u or k on a bound) can flip and are left out (they are counted)."""
    n = 2**bits - 1
    shape = (-1,) + (1,) * (w_floor.dim() - 1)
    d, z = delta.double().reshape(shape), zp.double().reshape(shape)
    s = torch.sigmoid(alpha.double())
    u = s * 1.2 - 0.1
    h = u.clamp(0, 1)
    dh = torch.where((u >= 0) & (u <= 1), 1.2 * s * (1 - s), torch.zeros_like(s))
    k = w_floor.double() + h + z
    inside = (k >= 0) & (k <= n)
    v = 2 * h - 1
    b = float(beta)
    gq = torch.where(inside, grad_wq.double() * d, torch.zeros_like(d * s)) * dh
    av = v.abs()
    gr_mag = 2 * abs(float(grad_reg) * b) * av.pow(b - 1) * dh
    dv, ddh = 2.0**-19, 2.0**-20
    budget = (grad_wq.double() * d).abs() * ddh + 2 * ulp32(gq)
    budget += (
        2
        * abs(float(grad_reg) * b)
        * (ddh * av.pow(b - 1) + dh * ((b - 1) * av.pow(b - 2) * dv + 2.0**-19 * av.pow(b - 1)))
    )
    budget += 2.0**-21 * gr_mag + 2 * ulp32(g_ref)
    margin_k = 2.0**-20 + 3 * ulp32(w_floor.double().abs() + z.abs() + n + 1)
    flip = ((k.abs() <= margin_k) | ((k - n).abs() <= margin_k)) & (dh > 0)
    flip |= (u.abs() <= 2.0**-20) | ((u - 1).abs() <= 2.0**-20)
    flip |= ~torch.isfinite(budget)
    return budget, ~flip


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    "shape", [(1,), (7,), (127,), (4097,), (16, 8, 3, 3), (10, 64), (130, 257)]
)
def test_adaround_soft_forward_backward(isa, shape, bits):
    c = shape[0]
    w_floor, alpha, delta, zp, beta = adaround_inputs(shape, bits, gen_seed=bits + c)
    w_q, reg = ops.adaround_soft(w_floor, alpha, delta, zp, bits, beta)
    wq_ref, reg_ref = R.adaround_soft_reference(w_floor, alpha, delta, zp, bits, beta)
    assert w_q.dtype == torch.float32 and reg.dtype == torch.float32 and reg.dim() == 0
    budget = _ada_budgets(w_floor, alpha, delta, zp, bits, beta, wq_ref)
    err = (w_q.double() - wq_ref.double()).abs()
    assert (err <= budget).all(), f"w_q: worst {float((err / budget).max()):.3g}x budget"
    # reg: per term t = 1 - |v|^b with dv <= 2**-19 and pow within 2**-19 relative (both sides)
    h = R.rectified_sigmoid(alpha).double()
    av, b = (2 * h - 1).abs(), float(beta)
    reg_budget = (
        ulp32(reg_ref.double())
        + (b * av.pow(b - 1) * 2.0**-19 + 2.0**-19 * av.pow(b) + 2.0**-23).sum()
    )
    assert abs(float(reg) - float(reg_ref)) <= float(reg_budget)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    gr = torch.tensor(0.7)
    ga = ops.adaround_soft_backward(g, gr, w_floor, alpha, delta, zp, bits, beta)
    ga_ref = R.adaround_soft_backward_reference(g, gr, w_floor, alpha, delta, zp, bits, beta)
    budget, covered = _ada_grad_budget(g, gr, w_floor, alpha, delta, zp, bits, beta, ga_ref)
    assert covered.float().mean() > 0.95
    err = (ga.double() - ga_ref.double()).abs()
    bad = (err > budget) & covered
    assert not bad.any(), f"grad_alpha: {int(bad.sum())} over budget, worst {float(err.max()):.3e}"


def test_adaround_autograd(isa):
    w_floor, alpha, delta, zp, beta = adaround_inputs((8, 4, 3, 3), 4, gen_seed=1)
    alpha = alpha.clone().requires_grad_()
    w_q, reg = ops.adaround_soft(w_floor, alpha, delta, zp, 4, beta)
    g = torch.randn_like(w_q)
    (w_q * g).sum().add(0.3 * reg).backward()
    ga_ref = R.adaround_soft_backward_reference(
        g, torch.tensor(0.3), w_floor, alpha.detach(), delta, zp, 4, beta
    )
    budget, covered = _ada_grad_budget(
        g, torch.tensor(0.3), w_floor, alpha.detach(), delta, zp, 4, beta, ga_ref
    )
    err = (alpha.grad.double() - ga_ref.double()).abs()
    assert not ((err > budget) & covered).any()


def test_adaround_paths_agree_bit_for_bit():
    """Our exp/pow are the same V-op sequence on every path: soft values and grads are identical."""
    w_floor, alpha, delta, zp, beta = adaround_inputs((9, 5, 3, 3), 6, gen_seed=4)
    g = torch.randn(w_floor.shape)
    outs = []
    try:
        for isa in ISAS:
            _C.calib_cpu_isa(isa)
            wq, _ = _C.adaround_soft_cpu(w_floor, alpha, delta, zp, 6, beta)
            ga = _C.adaround_soft_backward_cpu(
                g, torch.tensor(0.5), w_floor, alpha, delta, zp, 6, beta
            )
            outs.append((wq, ga))
    finally:
        _C.calib_cpu_isa("auto")
    for wq, ga in outs[1:]:
        assert_bit_exact(wq, outs[0][0])
        assert_bit_exact(ga, outs[0][1])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1,), (7,), (127,), (4097,), (16, 8, 3, 3), (33, 1)])
def test_adaround_hard_exact(isa, shape, bits):
    w_floor, alpha, delta, zp, beta = adaround_inputs(shape, bits, gen_seed=bits)
    codes = ops.adaround_hard(w_floor, alpha, zp, bits)
    assert_bit_exact(codes, R.adaround_hard_reference(w_floor, alpha, zp, bits))
    assert int(codes.max()) <= 2**bits - 1


# ------------------------------------------------------------------------------------------
# MSE search


def _mse_public(x, bits, steps, x_min=None, x_max=None):
    return ops.mse_search_2d(x, bits, steps, x_min, x_max)


@pytest.mark.parametrize("bits", BITS)
def test_mse_search_random_rows(isa, bits):
    check_mse(_mse_public, 5, 61, bits, 9, gen_seed=bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_search_given_range(isa, bits):
    """x_min/x_max wider than the rows (the per-tensor activation init: a subsample row, the
    whole tensor's range): the range, not the row, sets R."""
    check_mse(_mse_public, 5, 61, bits, 20, gen_seed=bits, bounded=True)
    x = mse_inputs(3, 50, gen_seed=bits)
    wide = ops.mse_search_2d(x, bits, 20, x.amin(dim=1) - 5.0, x.amax(dim=1) + 5.0)
    assert not torch.equal(wide[0], ops.mse_search_2d(x, bits, 20)[0])


def test_mse_search_given_range_long_row_split(cpp):
    """One long row with a given range, ranges split over threads (the per-tensor init path)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 40_000, generator=g)
    lo, hi = torch.tensor([-9.0]), torch.tensor([7.0])
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, old))
        split = ops.mse_search_2d(x, 4, 100, lo, hi)
        torch.set_num_threads(1)
        rows = ops.mse_search_2d(x, 4, 100, lo, hi)
    finally:
        torch.set_num_threads(old)
    assert_bit_exact(split[0], rows[0])
    assert_bit_exact(split[1], rows[1])
    _assert_scores_within(x, split, R.mse_search_2d_reference(x, 4, 100, lo, hi), 4, "split")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_search_full_steps(isa, bits):
    check_mse(_mse_public, 4, 96, bits, 100, gen_seed=bits)


def _assert_scores_within(x, got, want, bits, what):
    ok, s, s_ref = mse_rows_not_worse(x, got, want, bits)
    over = ~ok
    assert not over.any(), (
        f"{what}: rows {over.nonzero().flatten().tolist()} {s[over]} > {s_ref[over]}"
    )


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_search_resnet20_weights(cpp, shared_data, bits):
    """Real conv weights (ResNet-20 layer3.1.conv1, [64, 64, 3, 3] as [64, 576]): a few rows at 8
    bits (the reference takes ~1 s per row there), all 64 at 2 and 4 bits."""
    path = shared_data / "cifar10/models/akamaster_resnet/resnet20-12fca82f.th"
    if not path.exists():
        pytest.skip(f"{path} not found")
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    w = sd["module.layer3.1.conv1.weight"].reshape(64, -1)
    x = (w[:3] if bits == 8 else w).contiguous()
    got = ops.mse_search_2d(x, bits, 100)
    _assert_scores_within(x, got, R.mse_search_2d_reference(x, bits, 100), bits, "resnet20")


def test_mse_search_long_row_split_over_threads(cpp):
    """Fewer rows than 2 x threads and K >= 16384: each row's ranges are split over the threads;
    the choice must not depend on that (same merge rule), and must meet the budget."""
    g = torch.Generator().manual_seed(3)
    x = torch.stack([torch.randn(20_000, generator=g), torch.randn(20_000, generator=g).relu()])
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, old))
        split = ops.mse_search_2d(x, 2, 100)
        torch.set_num_threads(1)
        rows = ops.mse_search_2d(x, 2, 100)
    finally:
        torch.set_num_threads(old)
    assert_bit_exact(split[0], rows[0])
    assert_bit_exact(split[1], rows[1])
    _assert_scores_within(x, split, R.mse_search_2d_reference(x, 2, 100), 2, "split")


@pytest.mark.parametrize(
    "rows",
    [
        "huge",  # |x| ~ 1e30: float32 pow of the errors overflows; scores must not
        "subnormal",
        "constant",
        "one_element",
        "one_sided",
    ],
)
def test_mse_search_extremes(isa, rows):
    g = torch.Generator().manual_seed(7)
    x = {
        "huge": torch.randn(3, 40, generator=g) * 1e30,
        "subnormal": torch.randn(3, 40, generator=g) * 1e-42,
        "constant": torch.full((3, 40), 0.75),
        "one_element": torch.randn(4, 1, generator=g),
        "one_sided": torch.rand(3, 40, generator=g) + 0.5,
    }[rows].contiguous()
    for bits in (2, 5, 8):
        got = ops.mse_search_2d(x, bits, 13)
        assert torch.isfinite(got[0]).all() and (got[0] > 0).all()
        _assert_scores_within(x, got, R.mse_search_2d_reference(x, bits, 13), bits, rows)


# ------------------------------------------------------------------------------------------
# contracts: opcheck, input errors


def test_opcheck_with_cpp_forced(cpp):
    x, delta, zp, kp, seed, mask = fq_inputs((3, 4, 5), True, 1, 4, "seed")
    x = x.nan_to_num(nan=0.0, posinf=9.0, neginf=-9.0)
    g = torch.randn(x.shape)
    wf, al, d, z, beta = adaround_inputs((4, 3, 3), 4)
    cases = [
        (torch.ops.pdquant.fake_quant_act.default, (x, delta, zp, 4, 1, kp, seed, None)),
        (torch.ops.pdquant.fake_quant_act.default, (x, delta[0], zp[0], 4, 0, 0.5, None, mask)),
        (
            torch.ops.pdquant.fake_quant_act_backward.default,
            (g, x, delta, zp, 4, 1, kp, seed, None),
        ),
        (torch.ops.pdquant.adaround_soft.default, (wf, al, d, z, 4, beta)),
        (
            torch.ops.pdquant.adaround_soft_backward.default,
            (torch.randn(wf.shape), torch.tensor(0.5), wf, al, d, z, 4, beta),
        ),
        (torch.ops.pdquant.adaround_hard.default, (wf, al, z, 4)),
        (torch.ops.pdquant.mse_search_2d.default, (torch.randn(3, 20), 4, 5)),
        (
            torch.ops.pdquant.mse_search_2d.default,
            (torch.randn(3, 20), 4, 5, torch.full((3,), -9.0), torch.full((3,), 9.0)),
        ),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    # the differentiable ops with their inputs requiring grad (autograd registration)
    torch.library.opcheck(
        torch.ops.pdquant.fake_quant_act.default,
        (x.requires_grad_(), delta.clone().requires_grad_(), zp, 4, 1, kp, seed, None),
    )
    torch.library.opcheck(
        torch.ops.pdquant.adaround_soft.default, (wf, al.clone().requires_grad_(), d, z, 4, beta)
    )


def test_kernels_reject_what_they_rely_on():
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        _C.fake_quant_act_cpu(x.t(), torch.tensor(0.1), torch.tensor(0.0), 4, 0, 1.0, None, None)
    with pytest.raises(RuntimeError, match="bits must be in 2..8"):
        _C.fake_quant_act_cpu(x, torch.tensor(0.1), torch.tensor(0.0), 9, 0, 1.0, None, None)
    with pytest.raises(RuntimeError, match="per-channel delta|entries"):
        _C.fake_quant_act_cpu(x, torch.ones(5), torch.zeros(5), 4, 1, 1.0, None, None)
    with pytest.raises(RuntimeError, match="zero_point must be"):
        _C.adaround_hard_cpu(x, x, torch.zeros(3), 4)
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        _C.mse_search_2d_cpu(torch.tensor([[1.0, math.nan]]), 4, 10)
    with pytest.raises(RuntimeError, match=r"\[C, K\]"):
        _C.mse_search_2d_cpu(torch.randn(8), 4, 10)
    x = torch.randn(2, 10)
    with pytest.raises(RuntimeError, match="both x_min and x_max"):
        _C.mse_search_2d_cpu(x, 4, 10, torch.full((2,), -9.0), None)
    with pytest.raises(RuntimeError, match=r"\[C\] = \[2\]"):
        _C.mse_search_2d_cpu(x, 4, 10, torch.full((3,), -9.0), torch.full((3,), 9.0))
    with pytest.raises(RuntimeError, match="must contain its row"):
        _C.mse_search_2d_cpu(x, 4, 10, torch.zeros(2) + 0.5 * x.amin(1), x.amax(1))
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        _C.mse_search_2d_cpu(x, 4, 10, torch.full((2,), -math.inf), x.amax(1))


# ------------------------------------------------------------------------------------------
# property test


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SPECIAL = [0.0, -0.0, 1e30, -1e30, 1e-40, -1e-40, 1e-45, 3.0e38, -3.0e38]


@st.composite
def _fq_case(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    bits = draw(st.integers(2, 8))
    per_channel = draw(st.booleans())
    axis = draw(st.integers(-ndim, ndim - 1))
    drop = draw(st.sampled_from(["none", "seed", "mask"]))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]))
    seed = draw(st.integers(0, 2**31))
    return shape, bits, per_channel, axis, drop, scale, seed


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=_fq_case())
def test_property_fake_quant_and_adaround(cpp, case):
    shape, bits, per_channel, axis, drop, scale, seed = case
    g = torch.Generator().manual_seed(seed)
    n = 2**bits - 1
    numel = math.prod(shape)
    x = torch.randn(shape, generator=g) * scale
    flat = x.view(-1)
    picks = torch.randint(0, len(_SPECIAL), (numel,), generator=g)
    use = torch.rand(numel, generator=g) < 0.2
    flat[use] = torch.tensor(_SPECIAL)[picks[use]]
    c = shape[axis] if per_channel else 1
    delta = (torch.rand(c, generator=g) + 0.01) * scale
    delta = delta.clamp(min=1e-38, max=1e38)
    zp = torch.randint(0, n + 1, (c,), generator=g).float()
    if not per_channel:
        delta, zp = delta[0], zp[0]
    kp, sd, mask = 1.0, None, None
    if drop == "seed":
        kp, sd = 0.7, torch.tensor(seed - 2**30)
    elif drop == "mask":
        kp, mask = 0.5, torch.rand(shape, generator=g) < 0.5
    args = (delta, zp, bits, axis, kp, sd, mask)
    assert_bit_exact(ops.fake_quant_act(x, *args), R.fake_quant_act_reference(x, *args))
    grad = torch.randn(shape, generator=g)
    gx, gd = ops.fake_quant_act_backward(grad, x, *args)
    gx_r, gd_r = R.fake_quant_act_backward_reference(grad, x, *args)
    assert_bit_exact(gx, gx_r)
    s, nt = fq_grad_terms_abs_sum(grad, x, *args)
    assert_sum_budget(gd, gd_r, s, nt, "grad_delta")
    # AdaRound on a weight of the same shape (axis 0): hard codes exact, soft within budget
    w = x.nan_to_num(0.0).clamp(-1e6, 1e6)
    cw = shape[0]
    dw = (torch.rand(cw, generator=g) + 0.01).clamp(min=1e-3)
    zw = torch.randint(0, n + 1, (cw,), generator=g).float()
    wf = torch.floor(w / dw.reshape(-1, *[1] * (len(shape) - 1)))
    alpha = torch.randn(shape, generator=g) * 5
    assert_bit_exact(
        ops.adaround_hard(wf, alpha, zw, bits), R.adaround_hard_reference(wf, alpha, zw, bits)
    )
    beta = torch.tensor(float(torch.randint(2, 20, (), generator=g)))
    wq, _ = ops.adaround_soft(wf, alpha, dw, zw, bits, beta)
    wq_ref, _ = R.adaround_soft_reference(wf, alpha, dw, zw, bits, beta)
    err = (wq.double() - wq_ref.double()).abs()
    assert (err <= _ada_budgets(wf, alpha, dw, zw, bits, beta, wq_ref)).all()


@st.composite
def _mse_case(draw):
    c = draw(st.integers(1, 3))
    k = draw(st.integers(1, 40))
    bits = draw(st.integers(2, 6))
    steps = draw(st.integers(1, 30))
    scale = draw(st.sampled_from([1e-38, 1e-6, 1.0, 1e6, 1e30]))
    seed = draw(st.integers(0, 2**31))
    return c, k, bits, steps, scale, seed


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=_mse_case())
def test_property_mse_search(cpp, case):
    c, k, bits, steps, scale, seed = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c, k, generator=g) * scale
    x[torch.rand(c, k, generator=g) < 0.2] = 0.0
    x = x.contiguous()
    got = ops.mse_search_2d(x, bits, steps)
    _assert_scores_within(x, got, R.mse_search_2d_reference(x, bits, steps), bits, "property")
