"""Reference quantizers: bit-exact values, gradients, init searches, losses, schedules."""

import pytest
import torch

from pdquant_fast.quant import (
    GAMMA,
    ZETA,
    ActQuantizer,
    LinearTempDecay,
    QuantConfigError,
    WeightQuantizer,
    calculate_qparams,
    check_bits,
    fake_quant,
    init_qparams,
    kl_prediction_loss,
    lp_loss,
    mse_search_1d,
    mse_search_2d,
)


def test_fake_quant_hand_computed_ties_and_clamping():
    # delta 0.5, zp 2, 2 bits (grid 0..3): x/delta = -2,-1,0,0.5,1,1.5,3,5,20,-7
    x = torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.5, 2.5, 10.0, -3.5])
    y = fake_quant(x, torch.tensor(0.5), torch.tensor(2.0), 2)
    # round half to even: 0.5 -> 0, 1.5 -> 2; then +2, clamp to [0, 3], -2, *0.5
    expect = torch.tensor([-1.0, -0.5, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5, -1.0])
    assert torch.equal(y, expect)


def test_fake_quant_8bit_per_channel_exact():
    x = torch.tensor([[0.1, -0.2, 300.0], [1.0, 2.5, -1.0]])
    delta = torch.tensor([[0.1], [0.5]])
    zp = torch.tensor([[128.0], [0.0]])
    y = fake_quant(x, delta, zp, 8)
    # row 0: 1+128, -2+128, 3000+128 -> clamp 255 => (255-128)*0.1
    # row 1: 2, 5, -2 -> clamp 0
    expect = torch.tensor([[1 * 0.1, -2 * 0.1, 127 * 0.1], [1.0, 2.5, 0.0]])
    assert torch.equal(y, expect.float()) or torch.allclose(y, expect, atol=0, rtol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quant_gradients_match_spec(bits):
    """grad x: 1 inside [0, n] (inclusive), 0 outside; grad delta: r - v / -zp / n - zp."""
    torch.manual_seed(bits)
    n = 2**bits - 1
    x = (torch.randn(500) * 3).requires_grad_(True)
    delta = torch.tensor(0.7, requires_grad=True)
    zp = torch.tensor(float(n // 3))
    g = torch.randn(500)
    fake_quant(x, delta, zp, bits).backward(g)
    v = x.detach() / 0.7
    r = torch.round(v)
    t = r + zp
    inside = (t >= 0) & (t <= n)
    # (g / delta) * delta: equal to g up to one float rounding, exactly zero outside
    assert torch.allclose(x.grad, torch.where(inside, g, torch.zeros_like(g)), rtol=1e-6, atol=0)
    assert torch.all(x.grad[~inside] == 0)
    dd = torch.where(inside, r - v, torch.where(t < 0, -zp, n - zp))
    assert torch.allclose(delta.grad, (g * dd).sum(), rtol=1e-5, atol=1e-5)


def test_calculate_qparams_matches_official_formula():
    d, z = calculate_qparams(torch.tensor(-1.0), torch.tensor(2.0), 4)
    assert torch.equal(d, torch.tensor(3.0 / 15))
    assert torch.equal(z, torch.round(torch.tensor(1.0) / torch.tensor(3.0 / 15)))
    d, z = calculate_qparams(torch.tensor(0.5), torch.tensor(0.5), 2)  # min clipped to 0
    assert torch.allclose(d, torch.tensor(0.5 / 3)) and z == 0
    d, _ = calculate_qparams(torch.tensor(0.0), torch.tensor(0.0), 2)
    assert d == 1e-8  # degenerate range: step clamped, not zero


def _naive_2d(x, bits, steps=100):
    """Loop version of the official 2-D search (spec §1.3), per channel."""
    n = 2**bits - 1
    out = []
    for row in x.reshape(x.shape[0], -1):
        xmin, xmax = min(row.min().item(), 0.0), max(row.max().item(), 0.0)
        best, best_mm = float("inf"), (xmin, xmax)
        rng = torch.tensor(xmax) - torch.tensor(xmin)
        for i in range(1, steps + 1):
            r = rng * i / steps
            d = r / n
            for zp in range(n + 1):
                cmin = -zp * d
                cmax = r + cmin
                delta, z = calculate_qparams(cmin, cmax, bits)
                xh = fake_quant(row, delta, z, bits)
                s = (row - xh).abs().pow(2.4).mean().item()
                if s < best:
                    best, best_mm = s, (cmin, cmax)
        out.append(
            calculate_qparams(torch.as_tensor(best_mm[0]), torch.as_tensor(best_mm[1]), bits)
        )
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


@pytest.mark.parametrize("bits", [2, 3])
def test_mse_search_2d_equals_official_loop(bits):
    torch.manual_seed(0)
    w = torch.randn(3, 2, 3, 3) * torch.tensor([0.1, 1.0, 3.0]).reshape(3, 1, 1, 1) + 0.05
    d, z = mse_search_2d(w, bits, channel_wise=True, steps=25)
    dn, zn = _naive_2d(w, bits, steps=25)
    assert torch.allclose(d, dn, rtol=1e-6, atol=0) and torch.equal(z, zn)


def test_mse_search_1d_pos_equals_loop():
    torch.manual_seed(1)
    x = torch.relu(torch.randn(4000)) ** 1.5
    d, z = mse_search_1d(x, 4, channel_wise=False, one_side="pos")
    best, bd = float("inf"), None
    for i in range(1, 101):
        t = x.max() * i / 100
        delta, zz = calculate_qparams(torch.tensor(0.0), t, 4)
        s = (x - fake_quant(x, delta, zz, 4)).abs().pow(2.4).mean().item()
        if s < best:
            best, bd = s, delta
    assert z == 0 and torch.allclose(d, bd, rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_init_qparams_per_tensor_subsample_uses_the_op(bits):
    """Per-tensor signed init scores a strided subsample over the whole tensor's range through
    ``ops.mse_search_2d`` (C++/Triton/CUDA kernel where built); its choice must be the vectorised
    PyTorch search's (``mse_search_2d(..., score_on=)``) or no worse in float64 L2.4 score."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(8, 16, 30, 30, generator=g) * torch.linspace(0.2, 3.0, 16).reshape(1, 16, 1, 1)
    x[0, 0, 0, 1:5] = torch.tensor([-40.0, 25.0, 30.0, -12.0])  # extremes the subsample misses
    d, z, side = init_qparams(x, bits, False, max_score_elems=5000)
    assert side == "no"
    flat = x.reshape(-1)
    sample = flat[:: -(-flat.numel() // 5000)]
    assert sample.amin() > -40.0  # the range really comes from outside the subsample
    d_ref, z_ref = mse_search_2d(x, bits, False, score_on=sample)

    def score(dd, zz):
        n = 2**bits - 1
        s = sample.double()
        q = torch.clamp(torch.round(s / dd.double()) + zz.double(), 0, n) - zz.double()
        return (s - q * dd.double()).abs().pow(2.4).mean().item()

    same = torch.equal(z, z_ref) and torch.equal(d, d_ref)
    assert same or score(d, z) <= score(d_ref, z_ref) * (1 + 1e-5)
    # and the range is the tensor's: a search over the subsample's own range differs
    d_own, _ = mse_search_2d(sample, bits, False)
    assert not torch.equal(d, d_own)


def test_init_qparams_sides_and_nan_rejected():
    assert init_qparams(torch.rand(100), 4, False)[2] == "pos"
    assert init_qparams(-torch.rand(100), 4, False)[2] == "neg"
    assert init_qparams(torch.randn(100), 4, False)[2] == "no"
    with pytest.raises(ValueError, match="NaN or Inf"):
        init_qparams(torch.tensor([1.0, float("nan")]), 4, False)


def test_act_init_subsample_keeps_full_range():
    torch.manual_seed(2)
    x = torch.relu(torch.randn(256, 16, 32, 32))
    q = ActQuantizer(4)
    q.max_score_elems = 1 << 18
    q.init_from(x)
    exact = ActQuantizer(4)
    exact.max_score_elems = None
    exact.init_from(x)
    # same candidate grid (range from the whole tensor); the chosen clip is within 2 steps
    assert abs(q.delta.item() - exact.delta.item()) <= 2 * x.max().item() / 100 / 15 + 1e-7


@pytest.mark.parametrize("bad", [0, 1, 5, 9, 16, -4, 2.0, "4", True])
def test_unsupported_bits_rejected(bad):
    with pytest.raises(QuantConfigError, match=r"supported bit-widths are \[2, 3, 4, 8\]"):
        check_bits(bad)


def test_adaround_init_soft_equals_weight_and_hard_rounding():
    torch.manual_seed(3)
    w = torch.randn(8, 4, 3, 3) * 0.2
    wq = WeightQuantizer(4)
    wq.init_from(w)
    wq.init_adaround(w)
    # h(alpha0) = frac(W / delta): soft weight equals W wherever W is inside the clip range
    v = w / wq.delta
    inside = ((torch.floor(v) + (v - torch.floor(v)) + wq.zp) >= 0) & (
        (torch.floor(v) + (v - torch.floor(v)) + wq.zp) <= wq.n
    )
    soft = wq(w)
    assert torch.allclose(soft[inside], w[inside], atol=1e-5)
    wq.mode = "hard"
    hard = wq(w)
    expect = (
        torch.clamp(torch.floor(v) + (wq.alpha >= 0).float() + wq.zp, 0, wq.n) - wq.zp
    ) * wq.delta
    assert torch.equal(hard, expect)
    assert torch.equal(
        wq.int_weight(w), torch.clamp(torch.floor(v) + (wq.alpha >= 0) + wq.zp, 0, wq.n)
    )


def test_adaround_alpha_gradient_matches_spec_formula():
    torch.manual_seed(4)
    w = torch.randn(6, 10) * 0.3
    wq = WeightQuantizer(2)
    wq.init_from(w)
    wq.init_adaround(w)
    wq.alpha.data += torch.randn_like(wq.alpha) * 2  # spread over both clamp regions
    g = torch.randn_like(w)
    wq(w).backward(g)
    a = wq.alpha.detach()
    s = torch.sigmoid(a) * (ZETA - GAMMA) + GAMMA
    h = s.clamp(0, 1)
    t = torch.floor(w / wq.delta) + h + wq.zp
    mask = ((t >= 0) & (t <= wq.n) & (s >= 0) & (s <= 1)).float()
    expect = g * wq.delta * mask * (ZETA - GAMMA) * torch.sigmoid(a) * (1 - torch.sigmoid(a))
    assert torch.allclose(wq.alpha.grad, expect, rtol=1e-5, atol=1e-7)


def test_round_loss_value_and_gradient():
    wq = WeightQuantizer(4)
    wq.alpha = torch.nn.Parameter(torch.tensor([-3.0, -0.3, 0.0, 0.4, 3.0]))
    beta = 7.0
    loss = wq.round_loss(beta)
    h = wq.h().detach()
    assert torch.allclose(loss, (1 - (2 * h - 1).abs() ** beta).sum())
    loss.backward()
    a = wq.alpha.detach()
    s = torch.sigmoid(a) * (ZETA - GAMMA) + GAMMA
    dh = ((s >= 0) & (s <= 1)).float() * (ZETA - GAMMA) * torch.sigmoid(a) * (1 - torch.sigmoid(a))
    dr = -2 * beta * (2 * h - 1).abs() ** (beta - 1) * torch.sign(2 * h - 1)
    assert torch.allclose(wq.alpha.grad, dr * dh, atol=1e-6)


def test_qdrop_mixing_probability_and_reproducibility():
    q = ActQuantizer(2)
    q.init_from(torch.rand(1000))
    q.enabled = True
    q.keep_prob = 0.5
    x = torch.rand(20000) * 0.9 + 0.05
    q.generator = torch.Generator().manual_seed(0)
    y1 = q(x)
    q.generator = torch.Generator().manual_seed(0)
    y2 = q(x)
    assert torch.equal(y1, y2)
    xq = fake_quant(x, q.delta, q.zp, 2)
    kept_q = (y1 == xq) & (xq != x)
    kept_fp = (y1 == x) & (xq != x)
    assert torch.all(kept_q | kept_fp | (xq == x))
    frac = kept_q.sum() / (kept_q.sum() + kept_fp.sum())
    assert 0.48 < frac < 0.52  # keep-probability of the *quantized* value


def test_losses_match_torch_definitions():
    torch.manual_seed(5)
    zq, zf = torch.randn(8, 10), torch.randn(8, 10)
    t = 4.0
    ref = torch.nn.KLDivLoss(reduction="batchmean")(
        torch.log_softmax(zq / t, 1), torch.softmax(zf / t, 1)
    )
    assert torch.allclose(kl_prediction_loss(zq, zf, t), ref, atol=1e-6)
    a, b = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    assert torch.allclose(lp_loss(a, b), ((a - b) ** 2).sum(1).mean())


def test_beta_schedule():
    s = LinearTempDecay(1000, warmup=0.2, start_b=20, end_b=2)
    assert s(1) == 20 and s(200) == 20
    assert s(1000) == 2
    assert abs(s(600) - (2 + 18 * 0.5)) < 1e-9


def test_weight_quantizer_int_roundtrip_all_bits():
    for bits in (2, 3, 4, 8):
        w = torch.randn(7, 127)
        wq = WeightQuantizer(bits)
        wq.init_from(w)
        q = wq.int_weight(w)
        assert q.min() >= 0 and q.max() <= 2**bits - 1
        assert torch.equal((q - wq.zp) * wq.delta, wq(w))


# ---------------------------------------------------------------------------------------------
# the eager fast path of the differentiable ops (what the quantizer modules call)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("case", ["tensor-seed", "tensor-mask", "channel", "tensor-nodrop"])
def test_eager_fast_path_is_the_op_bit_for_bit(backend, case):
    """``ops.fake_quant_act_eager`` / ``ops.adaround_soft_eager`` (a plain autograd.Function
    around the same chosen kernels) give the ``torch.library`` op's outputs and gradients bit for
    bit, on each CPU backend."""
    from pdquant_fast import ops
    from pdquant_fast.ops import backends

    fn, why = backends.candidate("fake_quant_act", backend, "cpu", 4)
    if fn is None:
        pytest.skip(why)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 6, 5, 5, generator=gen) * 3
    g = torch.randn(x0.shape, generator=gen)
    if case == "channel":
        delta, zp, axis = torch.rand(6, generator=gen) * 0.5 + 0.1, torch.full((6,), 7.0), 1
    else:
        delta, zp, axis = torch.tensor(0.3), torch.tensor(7.0), -1
    kp, seed, mask = 1.0, None, None
    if case == "tensor-seed":
        kp, seed = 0.5, torch.tensor(12345)
    elif case == "tensor-mask":
        kp, mask = 0.5, torch.rand(x0.shape, generator=gen) < 0.5
    ops.force(backend)
    try:
        got = []
        for f in (ops.fake_quant_act, ops.fake_quant_act_eager):
            x, d = x0.clone().requires_grad_(), delta.clone().requires_grad_()
            y = f(x, d, zp, 4, axis, kp, seed, mask)
            gx, gd = torch.autograd.grad(y, (x, d), g)
            got.append((y, gx, gd))
        for a, b in zip(*got, strict=True):
            assert torch.equal(a, b)
        w_floor = torch.floor(torch.randn(8, 6, 3, 3, generator=gen) * 4)
        alpha0 = torch.randn(w_floor.shape, generator=gen) * 3
        wd, wz, beta = torch.rand(8, generator=gen) + 0.05, torch.full((8,), 7.0), torch.tensor(4.0)
        gw = torch.randn(w_floor.shape, generator=gen)
        got = []
        for f in (ops.adaround_soft, ops.adaround_soft_eager):
            alpha = alpha0.clone().requires_grad_()
            w_q, reg = f(w_floor, alpha, wd, wz, 4, beta)
            (ga,) = torch.autograd.grad((w_q * gw).sum() + 0.37 * reg, (alpha,))
            (ga_reg,) = torch.autograd.grad(f(w_floor, alpha, wd, wz, 4, beta)[1], (alpha,))
            got.append((w_q, reg, ga, ga_reg))
        for a, b in zip(*got, strict=True):
            assert torch.equal(a, b)
    finally:
        ops.force(None)


def test_eager_fast_path_checks_inputs_like_the_op():
    from pdquant_fast import ops
    from pdquant_fast.ops import OpInputError

    x = torch.randn(3, 4)
    with pytest.raises(OpInputError, match=r"must be finite and > 0"):
        ops.fake_quant_act_eager(x, torch.tensor(0.0), torch.tensor(0.0), 4, -1, 1.0, None, None)
    with pytest.raises(OpInputError, match=r"x must be torch.float32"):
        ops.fake_quant_act_eager(
            x.double(), torch.tensor(0.1), torch.tensor(0.0), 4, -1, 1.0, None, None
        )
    with pytest.raises(OpInputError, match=r"keep_prob must be in \(0, 1\]"):
        ops.fake_quant_act_eager(x, torch.tensor(0.1), torch.tensor(0.0), 4, -1, 0.0, None, None)
    with pytest.raises(OpInputError, match=r"bits must be one of"):
        ops.adaround_soft_eager(x, x, torch.ones(3), torch.zeros(3), 9, torch.tensor(2.0))


def test_quantizers_trace_under_torch_compile():
    """Under ``torch.compile`` the quantizer modules go through the ``torch.library`` ops (the
    eager fast path steps aside): a QDrop activation quantizer and a soft AdaRound weight,
    forward and backward, give the eager values (backend ``aot_eager``: Dynamo tracing and
    AOTAutograd without Inductor's C++ build)."""
    x0 = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    w = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    a = ActQuantizer(4, "a")
    a.init_from(x0)
    a.enabled, a.keep_prob = True, 0.5
    a.delta.requires_grad_(True)
    wq = WeightQuantizer(4)
    wq.init_from(w)
    wq.init_adaround(w)

    def step(x, seed):
        a.seed_counter = seed
        y = torch.nn.functional.conv2d(a(x), wq(w)) + 0.01 * wq.last_reg
        return y.square().sum()

    results = []
    for f in (step, torch.compile(step, backend="aot_eager")):
        for p in (a.delta, wq.alpha):
            p.grad = None
        loss = f(x0.clone(), torch.tensor(41))
        loss.backward()
        results.append((loss.detach(), a.delta.grad.clone(), wq.alpha.grad.clone()))
    for e, c in zip(*results, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)
