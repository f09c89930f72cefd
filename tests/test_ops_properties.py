"""Property tests (hypothesis) of the reference ops and of the public ops' input validation.

The references in :mod:`pdquant_fast.ops.reference` are the contract every fast kernel must
match, so here they are checked against properties that do not restate their code: results on
the quantization grid, monotone, idempotent, nearest grid point inside the range, exact
agreement between soft and hard AdaRound where the soft rounding saturates, exact power-of-two
scale equivariance of the initialisation search, gradients against float64 autograd of the
plain formula within stated error budgets. Inputs cover random shapes, every op bit-width
(2..8) and extreme values (0, -0, subnormals, +-1e30, +-inf). Fast kernels are compared with
these references in the kernel test files (``tests/test_ops_*.py``).
"""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pdquant_fast import ops  # noqa: E402
from pdquant_fast.ops import OP_BITS, OpInputError  # noqa: E402
from pdquant_fast.ops import reference as R  # noqa: E402

EPS32 = 2.0**-24  # float32 unit roundoff
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

EXTREMES = [0.0, -0.0, 1e-45, -1e-45, 1e-30, -1e-30, 1e30, -1e30, math.inf, -math.inf]


@st.composite
def shapes(draw, max_dims=4, max_side=9):
    return tuple(draw(st.lists(st.integers(1, max_side), min_size=1, max_size=max_dims)))


@st.composite
def tensors(draw, shape, extremes=True):
    """float32 tensor: normal values at a random scale, with extreme values sprinkled in."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0, 1e3]))
    x = torch.randn(shape, generator=g) * scale
    if extremes and x.numel() and draw(st.booleans()):
        k = draw(st.integers(1, max(1, x.numel() // 3)))
        idx = torch.randint(0, x.numel(), (k,), generator=g)
        vals = torch.tensor(EXTREMES)[torch.randint(0, len(EXTREMES), (k,), generator=g)]
        x.view(-1)[idx] = vals
    return x


@st.composite
def qparams(draw, x, per_channel):
    """(delta, zero_point, bits, axis): steps in [1e-6, 1e3], zero points on the grid."""
    bits = draw(st.sampled_from(OP_BITS))
    n = 2**bits - 1
    axis = draw(st.integers(-x.dim(), x.dim() - 1)) if per_channel else 0
    c = x.shape[axis] if per_channel else None
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = (c,) if per_channel else ()
    delta = torch.exp(torch.empty(shape).uniform_(math.log(1e-6), math.log(1e3), generator=g))
    zp = torch.randint(0, n + 1, shape, generator=g).float()
    return delta, zp, bits, axis


def _grid(delta, zp, bits):
    """All representable values ``(k - z) * d`` for ``k = 0..n``: ``[n + 1, ...]`` float32."""
    k = torch.arange(2**bits, dtype=torch.float32).reshape((-1,) + (1,) * delta.dim())
    return (k - zp) * delta


def _cv(t, x, axis):
    return R._channel_view(t, x, axis)


# --------------------------------------------------------------------------------------------
# fake_quant_act_reference


@SETTINGS
@given(data=st.data(), shape=shapes(), per_channel=st.booleans())
def test_fake_quant_output_on_grid_monotone_and_idempotent(data, shape, per_channel):
    x = data.draw(tensors(shape))
    delta, zp, bits, axis = data.draw(qparams(x, per_channel))
    y = R.fake_quant_act_reference(x, delta, zp, bits, axis, 1.0, None, None)
    assert y.dtype == torch.float32 and y.shape == x.shape
    nan = torch.isnan(x)
    assert torch.equal(torch.isnan(y), nan)  # NaN in, NaN out; nothing else becomes NaN
    # every output is one of the n + 1 grid values of its channel
    d, z = _cv(delta, x, axis), _cv(zp, x, axis)
    lo, hi = (0 - z) * d, (2**bits - 1 - z) * d
    k = torch.round(y / d) + z
    assert torch.all(nan | ((k >= 0) & (k <= 2**bits - 1)))
    assert torch.equal(torch.where(nan, 0.0, (k - z) * d), torch.where(nan, 0.0, y))
    # +inf and -inf saturate at the bounds
    assert torch.all(torch.where(x == math.inf, y == hi.expand_as(y), True))
    assert torch.all(torch.where(x == -math.inf, y == lo.expand_as(y), True))
    # idempotent: a grid value maps to itself
    y2 = R.fake_quant_act_reference(y, delta, zp, bits, axis, 1.0, None, None)
    assert torch.equal(torch.where(nan, 0.0, y2), torch.where(nan, 0.0, y))
    # monotone along every channel (sorting x sorts y)
    xm = x.movedim(axis, 0).reshape(x.shape[axis], -1) if per_channel else x.reshape(1, -1)
    ym = y.movedim(axis, 0).reshape(xm.shape) if per_channel else y.reshape(1, -1)
    fin = ~torch.isnan(xm)
    for r in range(xm.shape[0]):
        order = torch.argsort(xm[r][fin[r]], stable=True)
        ys = ym[r][fin[r]][order]
        assert torch.all(ys[1:] >= ys[:-1])


@SETTINGS
@given(data=st.data(), shape=shapes(), per_channel=st.booleans())
def test_fake_quant_is_nearest_grid_point_inside_the_range(data, shape, per_channel):
    x = data.draw(tensors(shape, extremes=False))
    delta, zp, bits, axis = data.draw(qparams(x, per_channel))
    y = R.fake_quant_act_reference(x, delta, zp, bits, axis, 1.0, None, None)
    d, z = _cv(delta, x, axis).double(), _cv(zp, x, axis).double()
    n = 2**bits - 1
    x64, y64 = x.double(), y.double()
    lo, hi = -z * d, (n - z) * d
    inside = (x64 >= lo) & (x64 <= hi)
    # inside: within half a step (+ float32 rounding of x / d and of (k - z) * d: a few ulps of
    # the larger of |x| and one step)
    budget = d / 2 + 4 * EPS32 * torch.maximum(x64.abs(), d)
    assert torch.all(torch.where(inside, (y64 - x64).abs() <= budget, True))
    # outside: the nearer bound, exactly
    below, above = x64 < lo, x64 > hi
    assert torch.all(torch.where(below, y == ((0 - _cv(zp, x, axis)) * _cv(delta, x, axis)), True))
    assert torch.all(torch.where(above, y == ((n - _cv(zp, x, axis)) * _cv(delta, x, axis)), True))


@SETTINGS
@given(data=st.data(), shape=shapes(max_dims=3), keep=st.floats(0.05, 0.95))
def test_fake_quant_mask_and_seed_select_per_element(data, shape, keep):
    x = data.draw(tensors(shape))
    delta, zp, bits, axis = data.draw(qparams(x, True))
    full = R.fake_quant_act_reference(x, delta, zp, bits, axis, 1.0, None, None)
    seed = torch.tensor(data.draw(st.integers(-(2**63), 2**63 - 1)), dtype=torch.int64)
    mask = R.qdrop_mask_reference(seed, x.numel(), keep).reshape(x.shape)
    y_seed = R.fake_quant_act_reference(x, delta, zp, bits, axis, keep, seed, None)
    y_mask = R.fake_quant_act_reference(x, delta, zp, bits, axis, keep, None, mask)
    expect = torch.where(mask, full, x)
    assert torch.equal(y_seed.nan_to_num(), expect.nan_to_num())
    assert torch.equal(y_mask.nan_to_num(), expect.nan_to_num())


def test_qdrop_mask_keeps_the_stated_fraction_and_depends_on_the_seed():
    n = 1 << 20
    for keep in (0.1, 0.5, 0.9):
        m = R.qdrop_mask_reference(torch.tensor(1005), n, keep)
        sigma = math.sqrt(keep * (1 - keep) / n)
        assert abs(m.float().mean().item() - keep) < 5 * sigma
    a = R.qdrop_mask_reference(torch.tensor(1), 4096, 0.5)
    b = R.qdrop_mask_reference(torch.tensor(2), 4096, 0.5)
    assert torch.equal(a, R.qdrop_mask_reference(torch.tensor(1), 4096, 0.5))
    assert 0.4 < (a != b).float().mean().item() < 0.6  # independent-looking masks per seed


@SETTINGS
@given(data=st.data(), shape=shapes(max_dims=3), per_channel=st.booleans(), drop=st.booleans())
def test_fake_quant_backward_matches_float64_autograd(data, shape, per_channel, drop):
    """grad_x exactly; grad_delta against autograd of the straight-through formula in float64
    using the reference's own float32 rounding decisions, within
    ``numel * 2**-22 * (n + 1) * sum|g|``: the float32 ``round(t) - t`` of each element is off by
    at most a couple of ulps of ``|t| <= n + 1`` (the reference then sums in float64)."""
    x = data.draw(tensors(shape, extremes=False))
    delta, zp, bits, axis = data.draw(qparams(x, per_channel))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    grad = torch.randn(shape, generator=g)
    mask = (torch.rand(shape, generator=g) < 0.5) if drop else None
    kp = 0.5 if drop else 1.0
    gx, gd = R.fake_quant_act_backward_reference(grad, x, delta, zp, bits, axis, kp, None, mask)
    n = 2**bits - 1
    d, z = _cv(delta, x, axis), _cv(zp, x, axis)
    t = x / d
    r = torch.round(t)  # the float32 decisions
    k = r + z
    inside = (k >= 0) & (k <= n)
    m = mask if mask is not None else torch.ones_like(x, dtype=torch.bool)
    assert torch.equal(gx, torch.where(m & ~inside, torch.zeros_like(grad), grad))
    # float64 autograd of y = (clamp(r + z, 0, n) - z) * d with r = t + stop_grad(round(t) - t)
    d64 = delta.double().requires_grad_(True)
    dd = _cv(d64, x, axis)
    t64 = x.double() / dd
    r64 = t64 + (r.double() - t64).detach()
    y = (torch.clamp(r64 + z.double(), 0, n) - z.double()) * dd
    y = torch.where(m, y, x.double())
    (ref,) = torch.autograd.grad((y * grad.double()).sum(), d64)
    if per_channel:
        dims = [i for i in range(x.dim()) if i != axis % x.dim()]
        g_abs = grad.double().abs().sum(dim=dims) if dims else grad.double().abs()
    else:
        g_abs = grad.double().abs().sum()
    budget = (n + 1) * 2.0**-21 * g_abs + 1e-30
    assert gd.dtype == torch.float32 and gd.shape == delta.shape
    assert torch.all((gd.double() - ref).abs() <= budget), (gd, ref, budget)


# --------------------------------------------------------------------------------------------
# AdaRound


@st.composite
def adaround_inputs(draw, saturate=False):
    shape = draw(shapes(max_dims=4, max_side=7))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    bits = draw(st.sampled_from(OP_BITS))
    n = 2**bits - 1
    c = shape[0]
    delta = torch.exp(torch.empty(c).uniform_(math.log(1e-4), math.log(10.0), generator=g))
    zp = torch.randint(0, n + 1, (c,), generator=g).float()
    # w_floor: integer offsets around the grid, some far outside it
    w_floor = torch.randint(-n - 3, n + 3, shape, generator=g).float()
    if saturate:
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
        alpha = sign * torch.empty(shape).uniform_(3.5, 1e4, generator=g)
    else:
        alpha = torch.randn(shape, generator=g) * draw(st.sampled_from([0.1, 1.0, 3.0]))
    beta = torch.tensor(draw(st.floats(2.0, 20.0)), dtype=torch.float32)
    return w_floor, alpha, delta, zp, bits, beta


@SETTINGS
@given(inp=adaround_inputs(saturate=True))
def test_adaround_soft_equals_hard_where_rounding_saturates(inp):
    """|alpha| >= 3.5 gives h(alpha) exactly 0 or 1: soft weight == dequantized hard codes."""
    w_floor, alpha, delta, zp, bits, beta = inp
    w_q, reg = R.adaround_soft_reference(w_floor, alpha, delta, zp, bits, beta)
    codes = R.adaround_hard_reference(w_floor, alpha, zp, bits)
    d, z = _cv(delta, w_floor, 0), _cv(zp, w_floor, 0)
    assert torch.equal(w_q, (codes.float() - z) * d)
    assert reg.item() == 0.0  # a fully decided rounding costs nothing


@SETTINGS
@given(inp=adaround_inputs())
def test_adaround_hard_codes_are_exact_integers(inp):
    w_floor, alpha, _, zp, bits, _ = inp
    alpha = alpha.clone()
    alpha.view(-1)[0] = -0.0  # -0.0 >= 0: rounds up, as 0.0 does
    codes = R.adaround_hard_reference(w_floor, alpha, zp, bits)
    n = 2**bits - 1
    up = (alpha >= 0).long()
    expect = torch.clamp(w_floor.long() + up + _cv(zp, w_floor, 0).long(), 0, n)
    assert codes.dtype == torch.uint8 and torch.equal(codes.long(), expect)
    assert int(up.view(-1)[0]) == 1


@SETTINGS
@given(inp=adaround_inputs())
def test_adaround_soft_and_backward_match_float64(inp):
    """Soft weight and regulariser vs the float64 formula; grad_alpha vs float64 autograd.

    Budgets: the soft weight is within ``4 eps32 * (|w_floor| + n + 2) * d`` (the float32 sum
    ``w_floor + h + z`` is rounded at its own magnitude, then scaled by ``d``); each regulariser
    term is within ``(beta + 4) * 2**-22`` (``|2h - 1| ** beta`` amplifies the relative error of
    ``h`` by ``beta``), the sum ``numel`` times that; grad_alpha per element within
    ``(beta + 8) * 2**-21`` times ``|g_wq| d 0.3 + 1.2 beta |g_reg| + 1``, bounds of its two
    terms (``h' <= 0.3``).
    """
    w_floor, alpha, delta, zp, bits, beta = inp
    n = 2**bits - 1
    w_q, reg = R.adaround_soft_reference(w_floor, alpha, delta, zp, bits, beta)
    a64 = alpha.double().requires_grad_(True)
    d64, z64 = _cv(delta, w_floor, 0).double(), _cv(zp, w_floor, 0).double()
    h = torch.clamp(torch.sigmoid(a64) * (R.ZETA - R.GAMMA) + R.GAMMA, 0, 1)
    wq64 = (torch.clamp(w_floor.double() + h + z64, 0, n) - z64) * d64
    reg64 = (1 - (2 * h - 1).abs().pow(beta.double())).sum()
    b = beta.item()
    mag = (w_floor.double().abs() + n + 2) * d64  # size of the float32 intermediates
    assert torch.all((w_q.double() - wq64).abs() <= 4 * EPS32 * mag)
    assert abs(reg.item() - reg64.item()) <= w_floor.numel() * (b + 4) * 2.0**-22 + 1e-30
    g = torch.Generator().manual_seed(7)
    gw = torch.randn(w_floor.shape, generator=g)
    gr = torch.tensor(0.37)
    ga = R.adaround_soft_backward_reference(gw, gr, w_floor, alpha, delta, zp, bits, beta)
    (ref,) = torch.autograd.grad((wq64 * gw.double()).sum() + reg64 * gr.double(), a64)
    scale = gw.double().abs() * d64 * 0.3 + b * 1.2 * 0.37 + 1.0
    assert torch.all((ga.double() - ref).abs() <= (b + 8) * 2.0**-21 * scale)


# --------------------------------------------------------------------------------------------
# initialisation search


def _l24(x, delta, zp, bits):
    y = R.fake_quant_act_reference(x, delta, zp, bits, 0, 1.0, None, None)
    return (x.double() - y.double()).abs().pow(2.4).mean(dim=1)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    c=st.integers(1, 4),
    k=st.integers(1, 40),
    bits=st.sampled_from([2, 3, 4]),
    shift=st.integers(-20, 20),
    offset=st.sampled_from([0.0, 0.7, -2.0]),
)
def test_mse_search_properties(seed, c, k, bits, shift, offset):
    """Valid parameters, no worse than the min/max quantizer, exact power-of-two equivariance."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c, k, generator=g) + offset
    steps = 20
    delta, zp = R.mse_search_2d_reference(x, bits, steps)
    n = 2**bits - 1
    assert torch.all(delta > 0) and torch.all(torch.isfinite(delta))
    assert torch.equal(zp, torch.round(zp)) and torch.all((zp >= 0) & (zp <= n))
    # the plain min/max quantizer (range i = steps) is among the candidates
    lo, hi = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
    d_mm = torch.clamp((hi - lo) / n, min=1e-8)
    z_mm = torch.clamp(-torch.round(lo / d_mm), 0, n)
    best, mm = _l24(x, delta, zp, bits), _l24(x, d_mm, z_mm, bits)
    # the search scores in float32 and returns calculate_qparams of the winning interval (a step
    # within a few ulps of the scored one): each element's error may move by
    # dl = 8 eps32 max|x|, so each |e| ** 2.4 by at most 2.4 (|e| + dl) ** 1.4 dl, |e| <= d_mm
    dl = 8 * EPS32 * x.abs().amax(1).double()
    budget = 2.4 * (d_mm.double() + dl) ** 1.4 * dl
    assert torch.all(best <= mm + budget), (best, mm, budget)
    # scaling the data by 2**shift scales every candidate exactly: same choice, scaled step
    s = 2.0**shift
    if (x.abs().amax() * s) > 1e-30 * 1e8:  # stay clear of the 1e-8 step floor
        d2, z2 = R.mse_search_2d_reference(x * s, bits, steps)
        assert torch.equal(z2, zp) and torch.equal(d2, delta * s)


# --------------------------------------------------------------------------------------------
# pack / unpack


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    o=st.integers(1, 9),
    k=st.integers(0, 37),
    bits=st.sampled_from([2, 4, 8]),
)
def test_pack_unpack_round_trip_and_size(seed, o, k, bits):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (o, k), generator=g, dtype=torch.uint8)
    packed = R.pack_reference(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (o, (k * bits + 7) // 8)
    assert torch.equal(R.unpack_reference(packed, bits, k), codes)


# --------------------------------------------------------------------------------------------
# public op validation: anything outside the contract raises OpInputError naming the argument


@SETTINGS
@given(
    data=st.data(),
    shape=shapes(max_dims=3),
    dtype=st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int32]),
    which=st.sampled_from(["x", "delta", "zero_point"]),
)
def test_fake_quant_rejects_any_wrong_dtype(data, shape, dtype, which):
    x = data.draw(tensors(shape, extremes=False))
    delta, zp, bits, axis = data.draw(qparams(x, True))
    args = {"x": x, "delta": delta, "zero_point": zp}
    args[which] = args[which].to(dtype)
    with pytest.raises(OpInputError, match=rf"{which} must be torch.float32, got {dtype}"):
        ops.fake_quant_act(
            args["x"], args["delta"], args["zero_point"], bits, axis, 1.0, None, None
        )


@SETTINGS
@given(data=st.data(), shape=shapes(max_dims=3).filter(lambda s: max(s) > 1))
def test_fake_quant_rejects_any_non_contiguous_x(data, shape):
    x = data.draw(tensors(shape, extremes=False))
    delta, zp, bits, axis = data.draw(qparams(x, False))
    view = torch.stack([x, x], -1)[..., 1]
    if view.is_contiguous():
        return
    with pytest.raises(OpInputError, match=r"x must be contiguous"):
        ops.fake_quant_act(view, delta, zp, bits, axis, 1.0, None, None)
    # and a valid call on the contiguous copy goes through, with the reference's result
    y = ops.fake_quant_act(view.contiguous(), delta, zp, bits, axis, 1.0, None, None)
    ref = R.fake_quant_act_reference(x, delta, zp, bits, axis, 1.0, None, None)
    assert torch.equal(y.nan_to_num(), ref.nan_to_num())


@SETTINGS
@given(
    data=st.data(),
    shape=shapes(max_dims=3),
    bad=st.sampled_from([0.0, -0.0, -1e-30, -3.0, math.nan, math.inf, -math.inf]),
)
def test_ops_reject_any_non_positive_or_non_finite_step(data, shape, bad):
    x = data.draw(tensors(shape, extremes=False))
    delta, zp, bits, axis = data.draw(qparams(x, True))
    d = delta.clone()
    d[data.draw(st.integers(0, d.numel() - 1))] = bad
    with pytest.raises(
        OpInputError, match=r"delta \(the quantization step\) must be finite and > 0"
    ):
        ops.fake_quant_act(x, d, zp, bits, axis, 1.0, None, None)
    w_floor = torch.zeros(d.numel(), 3)
    with pytest.raises(OpInputError, match=r"must be finite and > 0"):
        ops.adaround_soft(w_floor, torch.zeros(d.numel(), 3), d, zp, bits, torch.tensor(2.0))


@SETTINGS
@given(bits=st.one_of(st.integers(-3, 1), st.integers(9, 40), st.just(True)))
def test_ops_reject_unsupported_bits(bits):
    x = torch.randn(3, 4)
    with pytest.raises(OpInputError, match=r"bits must be one of \[2, 3, 4, 5, 6, 7, 8\]"):
        ops.fake_quant_act(x, torch.tensor(0.1), torch.tensor(0.0), bits, 0, 1.0, None, None)
    with pytest.raises(OpInputError, match=r"bits must be one of"):
        ops.mse_search_2d(x, bits, 10)
