"""Triton deployment kernels (W{2,4}A16 linear, qlinear, qconv2d) on CPU under the interpreter.

``TRITON_INTERPRET=1`` is set here before the kernels are imported (``triton.jit`` decides at
decoration time) unless a CUDA GPU is present and the variable is unset: then the same tests run
compiled on the GPU. The interpreter supports int8 ``tl.dot`` (int32 result) and fp16 dots, so
every kernel path is exercised here; bf16 arithmetic is GPU-only (``test_deploy_gpu.py``).
Small shapes only (the interpreter runs numpy per program).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from _deploy_cases import assert_wa16_close, q_inputs, wa16_inputs  # noqa: E402

from pdquant_fast.ops import backends  # noqa: E402
from pdquant_fast.ops import library as L  # noqa: E402
from pdquant_fast.ops.reference import (  # noqa: E402
    linear_wa16_reference,
    qconv2d_reference,
    qlinear_reference,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from pdquant_fast.kernels import deploy_conv as dc  # noqa: E402
from pdquant_fast.kernels import deploy_linear as dl  # noqa: E402


def _configs(m, n, k, bits, group, wp):
    """Every candidate launch configuration of this shape (fma/dot, int32/byte words, split,
    the dot kernel's half_magic variants: the inputs here are fp16 x and fp16 zero points)."""
    p = dl._WA16Problem(m, n, k, bits, group, fp16_zero=True)
    cfgs = dl.wa16_candidates(p, tuple(dl._word_views(wp)), wp.device)
    if not any(c.kernel == "fma" for c in cfgs):  # M > 8: not a candidate, but must be right
        bkw = min(64, group // (8 // bits)) if group else 64
        cfgs.append(dl.WA16Config("fma", 8, 4, 16, bkw, 2))
    return list(dict.fromkeys(cfgs))


# ---------------------------------------------------------------------------------------------
# linear_wa16

WA16_CASES = [
    # m, n, k, bits, group
    (1, 7, 127, 4, 0),  # ragged K: rows are not whole int32 words -> byte words
    (1, 33, 256, 2, 128),
    (3, 17, 300, 2, 64),  # partial last group
    (4, 40, 512, 4, 128),
    (5, 16, 256, 4, 32),
    (16, 9, 130, 2, 0),
    (2, 24, 96, 4, 16),  # group 16: only the fma kernel fits (dot needs 16 words per step)
]


@pytest.mark.parametrize("m,n,k,bits,group", WA16_CASES)
def test_linear_wa16_every_config_within_budget(m, n, k, bits, group):
    x, wp, scale, zero = wa16_inputs(m, n, k, bits, group, device=DEVICE, seed=m * 1000 + k)
    cfgs = _configs(m, n, k, bits, group, wp)
    kinds = {(c.kernel, c.word_bits) for c in cfgs}
    assert any(c.kernel == "fma" for c in cfgs)
    if group == 0 or group >= 64:
        assert any(c.kernel == "dot" for c in cfgs), kinds
    for cfg in cfgs:
        y = dl.linear_wa16_triton(x, wp, scale, zero, bits, group, config=cfg)
        assert_wa16_close(y, x, wp, scale, zero, bits, group)
    # the default path (heuristic or tuned) too, and the reference within the same budget
    assert_wa16_close(
        dl.linear_wa16_triton(x, wp, scale, zero, bits, group), x, wp, scale, zero, bits, group
    )
    assert_wa16_close(
        linear_wa16_reference(x, wp, scale, zero, bits, group), x, wp, scale, zero, bits, group
    )


def test_linear_wa16_split_k_and_layouts_agree():
    """Split-K partials, byte vs int32 words and the N-major prepack compute one function."""
    m, n, k, bits, group = 2, 40, 1024, 4, 128
    x, wp, scale, zero = wa16_inputs(m, n, k, bits, group, device=DEVICE, seed=7)
    base = dl.WA16Config("fma", 32, 2, 32, 16, 1)
    y1 = dl.linear_wa16_triton(x, wp, scale, zero, bits, group, config=base)
    for cfg in (
        dl.WA16Config("fma", 32, 2, 32, 16, 4),
        dl.WA16Config("fma", 8, 2, 16, 64, 2),
        dl.WA16Config("dot", 32, 16, 32, 16, 8),
    ):
        y = dl.linear_wa16_triton(x, wp, scale, zero, bits, group, config=cfg)
        assert_wa16_close(y, x, wp, scale, zero, bits, group)
    for wb in (32, 8):
        pk = dl.linear_wa16_prepack(wp, bits, k, word_bits=wb)
        assert pk.words.stride(1) == 1 and pk.words.shape[1] == n
        cfg = dl.WA16Config("fma", wb, 2, 32, 16 if wb == 32 else 64, 1)
        y2 = dl.linear_wa16_triton(x, pk, scale, zero, bits, group, config=cfg)
        if wb == 32:  # same words, same order of operations: bitwise equal
            assert torch.equal(y2, y1)
        assert_wa16_close(y2, x, wp, scale, zero, bits, group)


@pytest.mark.parametrize(
    "bits,group,word_bits,block_kw,k",
    [(4, 128, 32, 16, 512), (2, 128, 8, 32, 300), (2, 64, 32, 4, 256), (4, 0, 8, 16, 200)],
)
def test_linear_wa16_interleaved_prepack(bits, group, word_bits, block_kw, k):
    """Interleaved tiles (each bit slice a contiguous run of inputs): every candidate config."""
    m, n = 3, 24
    x, wp, scale, zero = wa16_inputs(m, n, k, bits, group, device=DEVICE, seed=k + block_kw)
    pk = dl.linear_wa16_prepack(wp, bits, k, word_bits=word_bits, interleave_kw=block_kw)
    assert pk.block_kw == block_kw and pk.words.stride(1) == 1
    p = dl._WA16Problem(m, n, k, bits, group)
    cfgs = dl.wa16_candidates(p, (word_bits,), x.device, block_kw)
    assert cfgs and all(c.block_kw == block_kw for c in cfgs)
    for cfg in dict.fromkeys(cfgs):
        y = dl.linear_wa16_triton(x, pk, scale, zero, bits, group, config=cfg)
        assert_wa16_close(y, x, wp, scale, zero, bits, group)
    assert_wa16_close(
        dl.linear_wa16_triton(x, pk, scale, zero, bits, group), x, wp, scale, zero, bits, group
    )
    with pytest.raises(ValueError, match="steps of"):
        bad = dl.WA16Config("fma", word_bits, 4, 32, block_kw * 2, 1)
        dl.linear_wa16_triton(x, pk, scale, zero, bits, group, config=bad)


def test_linear_wa16_zero_point_fold_is_exact_for_integer_inputs():
    """Integer x, unit scale: every sum is an exact small integer, so y matches exactly."""
    m, n, k, bits, group = 3, 20, 256, 2, 64
    _, wp, _, _ = wa16_inputs(m, n, k, bits, group, seed=3)
    x = torch.randint(-4, 5, (m, k)).half()
    scale = torch.ones(n, k // group).half()
    zero = torch.randint(0, 4, (n, k // group)).half()
    ref = linear_wa16_reference(x, wp, scale, zero, bits, group)
    dev = [t.to(DEVICE) for t in (x, wp, scale, zero)]
    for cfg in _configs(m, n, k, bits, group, dev[1]):
        y = dl.linear_wa16_triton(*dev, bits, group, config=cfg)
        assert torch.equal(y.cpu(), ref), cfg


@pytest.mark.parametrize(
    "m,n,k,bits,group,layout",
    [
        (3, 40, 512, 4, 128, "plain"),
        (16, 24, 256, 2, 0, "plain"),  # int32 and byte words
        (5, 33, 300, 2, 64, "plain"),  # ragged K: byte words, partial last group
        (9, 20, 512, 4, 0, "interleaved"),
    ],
)
def test_linear_wa16_half_magic_is_the_dot_kernel_bit_for_bit(m, n, k, bits, group, layout):
    """The dot kernel's ``half_magic`` variant (codes to fp16 by bit pattern, ``c - z`` in one
    fp16 subtraction) gives the same output bits as the same tiles through fp32, also with zero
    points that are not integers (both round the exact ``c - z`` to fp16 once; that rounding is
    outside ``assert_wa16_close``'s budget, which holds for integer zero points)."""
    from dataclasses import replace

    x, wp, scale, zero = wa16_inputs(m, n, k, bits, group, device=DEVICE, seed=k + m)
    zero_frac = (zero.float() + torch.rand(zero.shape, device=zero.device)).half()
    w = wp
    if layout == "interleaved":
        w = dl.linear_wa16_prepack(wp, bits, k, word_bits=32, interleave_kw=16)
        p = dl._WA16Problem(m, n, k, bits, group, fp16_zero=True)
        cfgs = dl.wa16_candidates(p, (32,), x.device, 16)
    else:
        cfgs = _configs(m, n, k, bits, group, wp)
    half = [c for c in cfgs if c.half_magic]
    assert half and all(c.kernel == "dot" for c in half)
    for cfg in half:
        for z in (zero, zero_frac):
            y_half = dl.linear_wa16_triton(x, w, scale, z, bits, group, config=cfg)
            y_f32 = dl.linear_wa16_triton(
                x, w, scale, z, bits, group, config=replace(cfg, half_magic=False)
            )
            assert torch.equal(y_half, y_f32), cfg
        y_half = dl.linear_wa16_triton(x, w, scale, zero, bits, group, config=cfg)
        assert_wa16_close(y_half, x, wp, scale, zero, bits, group)


def test_linear_wa16_half_magic_only_for_fp16_zero_points():
    m, n, k, bits, group = 16, 24, 256, 4, 0
    x, wp, scale, zero = wa16_inputs(m, n, k, bits, group, device=DEVICE, seed=5)
    views = tuple(dl._word_views(wp))
    fp16 = dl.wa16_candidates(dl._WA16Problem(m, n, k, bits, group, True), views, x.device)
    other = dl.wa16_candidates(dl._WA16Problem(m, n, k, bits, group, False), views, x.device)
    assert any(c.half_magic for c in fp16) and not any(c.half_magic for c in other)
    assert fp16[0] == other[0]  # the untuned default is unchanged
    cfg = next(c for c in fp16 if c.half_magic)
    for z in (zero.float(), zero.to(torch.bfloat16)):
        s = scale.to(z.dtype)
        with pytest.raises(ValueError, match="half_magic is a dot-kernel option for fp16"):
            dl.linear_wa16_triton(x, wp, s, z, bits, group, config=cfg)
    y = dl.linear_wa16_triton(x, wp, scale.float(), zero.float(), bits, group)  # tuner's pick
    assert_wa16_close(y, x, wp, scale, zero, bits, group)


def test_linear_wa16_op_dispatches_to_triton():
    x, wp, scale, zero = wa16_inputs(3, 12, 64, 4, 0, device=DEVICE, seed=11)
    backends.force("triton")
    try:
        assert backends.choose("linear_wa16", x.device.type, 4)[0] == "triton"
        y = torch.ops.pdquant.linear_wa16(x, wp, scale, zero, 4, 0)
    finally:
        backends.force(None)
    assert_wa16_close(y, x, wp, scale, zero, 4, 0)


def test_linear_wa16_opcheck_reference():
    x, wp, scale, zero = wa16_inputs(3, 12, 64, 2, 32, seed=12)
    backends.force("reference")
    try:
        torch.library.opcheck(torch.ops.pdquant.linear_wa16, (x, wp, scale, zero, 2, 32))
    finally:
        backends.force(None)


@pytest.mark.parametrize(
    "change,needle",
    [
        (dict(bits=3), "bits must be one of [2, 4]"),
        (dict(group=48), "power of two >= 16"),
        (dict(group=8), "power of two >= 16"),
        (dict(scale_shape=(12, 3)), "scale must have shape [12, 2]"),
        (dict(w_cols=31), "w_packed must be uint8 [N, 32]"),
        (dict(x_dtype=torch.float32), "x must be float16 or bfloat16"),
        (dict(zero_dtype=torch.float32), "zero must be"),
    ],
)
def test_linear_wa16_rejects_bad_input(change, needle):
    x, wp, scale, zero = wa16_inputs(3, 12, 64, 4, 32, seed=13)
    bits, group = change.get("bits", 4), change.get("group", 32)
    if "scale_shape" in change:
        scale = torch.ones(change["scale_shape"]).half()
    if "w_cols" in change:
        wp = wp[:, : change["w_cols"]].contiguous()
    if "x_dtype" in change:
        x = x.to(change["x_dtype"])
    if "zero_dtype" in change:
        zero = zero.to(change["zero_dtype"])
    with pytest.raises(L.OpInputError) as err:
        L.linear_wa16(x, wp, scale, zero, bits, group)
    assert needle in str(err.value)


def test_linear_wa16_triton_rejects_bad_group_directly():
    x, wp, scale, zero = wa16_inputs(2, 8, 64, 4, 0, device=DEVICE)
    with pytest.raises(ValueError, match="power of two >= 16"):
        dl.linear_wa16_triton(x, wp, scale, zero, 4, 24)
    with pytest.raises(ValueError, match="bytes per row"):
        dl.linear_wa16_triton(x[:, :60].contiguous(), wp, scale, zero, 4, 0)


# ---------------------------------------------------------------------------------------------
# qlinear


QLINEAR_CASES = [
    # m, n, k, w dtype, a_bits, out_bits, act, residual
    (5, 17, 40, torch.int8, 4, 4, 1, True),
    (33, 20, 64, torch.int8, 8, 8, 2, False),
    (7, 9, 33, torch.int16, 8, 0, 0, True),
    (20, 40, 100, torch.int8, 7, 0, 1, False),
    (1, 3, 1, torch.int8, 2, 2, 0, True),
    (18, 35, 96, torch.int16, 4, 8, 1, False),
]


@pytest.mark.parametrize("m,n,k,wdt,a_bits,out_bits,act,res", QLINEAR_CASES)
def test_qlinear_bit_exact(m, n, k, wdt, a_bits, out_bits, act, res):
    args = q_inputs(
        m, n, k, wdt, a_bits, seed=m + n + k, device=DEVICE, act=act, res=res, out_bits=out_bits
    )
    x, x_zp, w = args[:3]
    ref = qlinear_reference(*args)
    for a in (8, a_bits):  # xor path (any code), then the int8-view path (codes < 2^a_bits)
        pk = dl.qlinear_prepack_triton(w, a_bits=a)
        y = dl.qlinear_triton(x, x_zp, pk, *args[3:])
        assert y.dtype == ref.dtype and y.shape == ref.shape
        assert torch.equal(y, ref), (a, (y.float() - ref.float()).abs().max().item())
    assert torch.equal(dl.qlinear_triton(*args), ref)  # plain int8/int16 weight


def test_qlinear_extreme_zero_points_and_clamps():
    """x_zp at 0 and 255, codes at both ends, large |y|: saturating codes, exact acc."""
    for x_zp in (0, 255):
        x = torch.tensor([[0, 255, 255, 0] * 8, [255] * 32, [0] * 32], dtype=torch.uint8)
        w = torch.tensor([[-128] * 32, [127] * 32, [1, -1] * 16], dtype=torch.int8)
        scale, bias = torch.full((3,), 0.25), torch.tensor([0.0, -3.0, 7.5])
        for out_bits in (0, 2, 8):
            args = (
                x,
                x_zp,
                w,
                scale,
                bias,
                0,
                None,
                1.0 if out_bits else 0.0,
                1 if out_bits else 0,
                out_bits,
            )
            ref = qlinear_reference(*args)
            dev = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
            assert torch.equal(dl.qlinear_triton(*dev).cpu(), ref)


# ---------------------------------------------------------------------------------------------
# qconv2d

CONV_CASES = [
    # nb, c, h, w, o, k, stride, pad, groups, w dtype, a_bits, out_bits, act, residual
    (2, 16, 6, 5, 20, 3, 1, 1, 1, torch.int8, 4, 4, 1, True),  # 3x3, 16 ch: flat K over taps
    (1, 32, 5, 4, 20, 3, 1, 1, 1, torch.int8, 4, 4, 1, True),  # 3x3, channel-blocked K loop
    (1, 3, 9, 9, 16, 7, 2, 3, 1, torch.int16, 8, 0, 0, False),  # 8-bit stem, flat K loop
    (2, 32, 5, 5, 17, 1, 2, 0, 1, torch.int8, 8, 8, 2, False),  # 1x1 stride 2 (downsample)
    (2, 8, 7, 6, 8, 3, 2, 1, 8, torch.int8, 4, 4, 2, True),  # depthwise 3x3 stride 2
    (1, 6, 7, 7, 12, 5, 1, 2, 6, torch.int8, 8, 0, 1, False),  # depthwise 5x5, multiplier 2
    (1, 16, 5, 6, 16, 3, 1, 1, 2, torch.int8, 2, 2, 1, True),  # grouped, C/g = 8
]


def _conv_args(case, seed):
    nb, c, h, w_, o, k, s, p, g, wdt, a_bits, out_bits, act, res = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 1 << a_bits, (nb, c, h, w_), generator=gen, dtype=torch.uint8)
    x_zp = int(torch.randint(0, 1 << a_bits, (), generator=gen))
    shape = (o, c // g, k, k)
    if wdt == torch.int8:
        w = torch.randint(-8, 8, shape, generator=gen, dtype=torch.int8)
    else:
        w = torch.randint(-255, 256, shape, generator=gen, dtype=torch.int16)
    scale = torch.pow(2.0, -torch.randint(3, 9, (o,), generator=gen).float())
    bias = torch.randint(-8, 9, (o,), generator=gen).float() * 0.5
    ho, wo = (h + 2 * p - k) // s + 1, (w_ + 2 * p - k) // s + 1
    r = torch.randn(nb, o, ho, wo, generator=gen) if res else None
    return (
        x,
        x_zp,
        w,
        scale,
        bias,
        [s, s],
        [p, p],
        g,
        act,
        r,
        1.0 if out_bits else 0.0,
        (1 << out_bits) // 2 if out_bits else 0,
        out_bits,
    ), a_bits


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"c{c[1]}o{c[4]}k{c[5]}s{c[6]}g{c[8]}")
def test_qconv2d_bit_exact(case):
    args, a_bits = _conv_args(case, seed=sum(case[:9]))
    ref = qconv2d_reference(*args)
    dev = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    x, x_zp, w = dev[:3]
    groups = dev[7]
    for variant in ("nchw", "nchw-native", "channels-last", "int8-view"):
        xx = x.contiguous(memory_format=torch.channels_last) if variant == "channels-last" else x
        pk = dc.qconv2d_prepack_triton(w, groups, a_bits=a_bits if variant == "int8-view" else 8)
        layout = "native" if variant == "nchw-native" else "auto"
        y = dc.qconv2d_triton(xx, x_zp, pk, *dev[3:], layout=layout)
        assert y.dtype == ref.dtype and y.shape == ref.shape
        assert torch.equal(y.cpu(), ref), variant
        want_cl = variant == "channels-last" and not xx.is_contiguous()
        assert y.is_contiguous(memory_format=torch.channels_last) == want_cl or y.is_contiguous()
    assert torch.equal(dc.qconv2d_triton(*dev).cpu(), ref)  # plain weight, runtime-style call


@pytest.mark.parametrize("cg", [1, 3, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512])
def test_qconv2d_gpu_candidates_keep_the_dot_minimum(monkeypatch, cg):
    """The configs a GPU would time: every int8 dot has K >= 32 (Triton refuses less on NVIDIA
    GPUs; the interpreter accepts it, which let 16-channel layers fail only on a GPU), and
    the channel-blocked loop is taken only where block_k divides the group's channels."""
    monkeypatch.setattr(dc, "interpret_mode", lambda: False)
    for og in (16, 64, 256):
        for cfg in dc._conv_candidates(cg, og, depthwise=cg == 1):
            if cg == 1:
                continue
            assert cfg.block_k >= dc.DOT_MIN_K and cfg.block_k & (cfg.block_k - 1) == 0, cfg
            if cg % cfg.block_k == 0:
                assert cfg.block_k <= cg


def test_qconv2d_rejects_a_dot_below_its_minimum_k():
    args, _ = _conv_args(CONV_CASES[0], seed=5)
    dev = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(ValueError, match="block_k=16"):
        dc.qconv2d_triton(*dev, config=dc.QConvConfig(16, 16, 16, 4, 1))


def test_residual_codes_bit_exact():
    """uint8 residual codes with (res_scale, res_zp): the kernels read the reference's float32
    dequantization of them, so conv and linear stay bit-exact."""
    gen = torch.Generator().manual_seed(23)
    args, _ = _conv_args(CONV_CASES[0], seed=5)
    args = list(args)
    args[9] = torch.randint(0, 16, tuple(args[9].shape), generator=gen, dtype=torch.uint8)
    ref = qconv2d_reference(*args, 0.0731, 3)
    dev = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    assert torch.equal(dc.qconv2d_triton(*dev, 0.0731, 3).cpu(), ref)
    largs = list(
        q_inputs(5, 17, 40, torch.int8, 4, seed=9, device="cpu", act=1, res=True, out_bits=4)
    )
    largs[6] = torch.randint(0, 16, (5, 17), generator=gen, dtype=torch.uint8)
    ref = qlinear_reference(*largs, 0.0731, 3)
    dev = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in largs]
    assert torch.equal(dl.qlinear_triton(*dev, 0.0731, 3).cpu(), ref)


def test_qconv2d_padding_is_the_zero_point():
    """All-zero-point image: every tap (inside or padding) is 0 after the offset -> acc 0."""
    x = torch.full((1, 16, 4, 4), 9, dtype=torch.uint8)
    w = torch.randint(-8, 8, (16, 16, 3, 3), dtype=torch.int8)
    scale, bias = torch.ones(16), torch.zeros(16)
    args = (x, 9, w, scale, bias, [1, 1], [1, 1], 1, 0, None, 0.0, 0, 0)
    dev = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    assert torch.equal(dc.qconv2d_triton(*dev).cpu(), torch.zeros(1, 16, 4, 4))


def test_qconv2d_through_the_op_with_triton_forced():
    args, _ = _conv_args(CONV_CASES[0], seed=5)
    dev = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    backends.force("triton")
    try:
        assert backends.choose("qconv2d", dev[0].device.type)[0] == "triton"
        y = torch.ops.pdquant.qconv2d(*dev)
        yl = torch.ops.pdquant.qlinear(*q_inputs(4, 8, 32, torch.int8, 4, device=DEVICE))
    finally:
        backends.force(None)
    assert torch.equal(y.cpu(), qconv2d_reference(*args))
    assert torch.equal(yl.cpu(), qlinear_reference(*q_inputs(4, 8, 32, torch.int8, 4)))


# ---------------------------------------------------------------------------------------------
# a whole packed model on the Triton kernels


def test_packed_model_on_triton_in_both_layouts(tmp_path, monkeypatch):
    """A packed ResNet-8 (W4A4 with an 8-bit integer stem, downsampling blocks, residuals,
    pooling; the classifier stays float, as its input is not quantized) run as on a GPU: the
    convolutions on the Triton kernels, every other packed op on the
    reference (the GPU has no other kernels for them). Bit-identical logits to the all-reference
    run, with NCHW and with channels-last activations (the layout the GPU check now also
    times)."""
    from pdquant_fast.deploy import export_packed, load_packed
    from pdquant_fast.deploy.parity import quick_quantize
    from pdquant_fast.models.registry import build_model

    torch.manual_seed(0)
    model, _ = build_model("cifar_resnet8")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    q = quick_quantize(model.eval(), x, 4, 4, input_a_bits=8)
    export_packed(q, tmp_path / "p", fp_model=model, model_info={"input_size": [3, 32, 32]})
    backends.force("reference")
    try:
        ref = load_packed(tmp_path / "p", memory_format="contiguous")(x)
    finally:
        backends.force(None)
    chosen = set()

    def gpu_like_choice(op, device_type, bits=None):
        backend = "triton" if op == "qconv2d" else "reference"
        fn, why = backends.candidate(op, backend, device_type, bits)
        assert fn is not None, why
        chosen.add((op, backend))
        return backend, fn

    monkeypatch.setattr(backends, "choose", gpu_like_choice)
    for fmt in ("contiguous", "channels_last"):
        pm = load_packed(tmp_path / "p", device=DEVICE, memory_format=fmt)
        got = pm(x.to(DEVICE))
        assert torch.equal(got.cpu(), ref), fmt
    assert ("qconv2d", "triton") in chosen
