"""C++ CPU kernels of the deployment ops ``qconv2d`` / ``qlinear`` (``csrc/cpu/q*.cpp``).

Every kernel is compared with the exact references in :mod:`pdquant_fast.ops.reference`
(integer accumulation in float64, then the op-for-op float32 requantisation) with
``torch.equal``: uint8 output codes, float32 outputs and the int32 accumulators are bit-exact,
on every ISA level this CPU has (AVX-512 VNNI, AVX2, scalar; forced with
``qkernels_set_isa_cpu`` / ``PDQUANT_CPU_ISA``), for NCHW and channels_last inputs, the
on-the-fly and the prepacked entry points.
"""

from __future__ import annotations

import os

import pytest
import torch

from pdquant_fast.ops import backends
from pdquant_fast.ops.reference import (
    qconv2d_acc_reference,
    qconv2d_reference,
    qlinear_acc_reference,
    qlinear_reference,
)

_C, _why = backends._extension()
if _C is None or not hasattr(_C, "qconv2d_cpu"):
    pytest.skip(f"C++ qconv2d_cpu not built: {_why}", allow_module_level=True)

ISA_ORDER = ("scalar", "avx2", "avx512vnni")
ISAS = ISA_ORDER[: ISA_ORDER.index(_C.qkernels_best_isa_cpu()) + 1]

#: (w_bits, a_bits) pairs the deployment uses; 7-bit weights with 8-bit activations take the
#: AVX2 split-activation path (|w| > 64 could saturate vpmaddubsw).
BITS = [(8, 8), (4, 8), (4, 4), (2, 4), (2, 2), (7, 8)]

#: residual / act / out_bits / channels_last variants (each conv case runs all of them).
VARIANTS = [
    dict(act=0, res=False, out_bits=0, cl=False),
    dict(act=1, res=True, out_bits=4, cl=False),
    dict(act=2, res=False, out_bits=8, cl=True),
    dict(act=1, res=True, out_bits=0, cl=True),
    dict(act=0, res=False, out_bits=2, cl=False),
    # residual as uint8 activation codes with (res_scale, res_zp), dequantized in the epilogue
    dict(act=2, res="codes", out_bits=4, cl=False),
    dict(act=0, res="codes", out_bits=0, cl=True),
]


def _residual(g, shape, res):
    """(residual, res_scale, res_zp) for a VARIANTS ``res``: None, float32, or 4-bit codes."""
    if res == "codes":
        zp = int(torch.randint(0, 16, (1,), generator=g))
        return torch.randint(0, 16, shape, generator=g, dtype=torch.uint8), 0.0731, zp
    return (torch.randn(*shape, generator=g) if res else None), 0.0, 0


@pytest.fixture(autouse=True)
def _restore_isa():
    yield
    _C.qkernels_set_isa_cpu("")


def _weights(g, shape, w_bits):
    """Offsets ``code - zp[o]`` as the deployment stores them: int8, int16 for 8-bit."""
    hi = (1 << w_bits) - 1
    codes = torch.randint(0, hi + 1, shape, generator=g)
    zp = torch.randint(0, hi + 1, (shape[0],) + (1,) * (len(shape) - 1), generator=g)
    return (codes - zp).to(torch.int16 if w_bits == 8 else torch.int8)


def _conv_case(g, n, c, h, w, o, k, s, p, groups, w_bits, a_bits, act, res, out_bits, cl):
    x = torch.randint(0, 1 << a_bits, (n, c, h, w), generator=g, dtype=torch.uint8)
    wt = _weights(g, (o, c // groups, k, k), w_bits)
    x_zp = int(torch.randint(0, 1 << a_bits, (1,), generator=g))
    scale = torch.rand(o, generator=g) * 0.02 + 1e-3
    bias = torch.randn(o, generator=g)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    r, rs, rzp = _residual(g, (n, o, ho, wo), res)
    out_scale = 0.05 if out_bits else 0.0
    out_zp = int(torch.randint(0, 1 << out_bits, (1,), generator=g)) if out_bits else 0
    args = (x_zp, wt, scale, bias, [s, s], [p, p], groups, act, r, out_scale, out_zp, out_bits)
    if res == "codes":
        args += (rs, rzp)
    ref = qconv2d_reference(x, *args)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, args, ref


# (N, C, H, W, O, k, stride, pad, groups): ragged channel counts 1, 3, 7, 17, 127; the layer
# kinds of ResNet-20/18 and EfficientNet-Lite0 (3x3, 1x1, 7x7 stem, strided, depthwise 3x3/5x5).
CONV_SHAPES = [
    (2, 16, 8, 8, 16, 3, 1, 1, 1),
    (1, 3, 9, 7, 17, 3, 2, 1, 1),
    (2, 7, 5, 6, 127, 1, 1, 0, 1),
    (1, 1, 6, 5, 3, 3, 1, 1, 1),
    (1, 17, 9, 9, 17, 5, 2, 2, 17),
    (2, 32, 6, 6, 32, 3, 1, 1, 32),
    (1, 7, 5, 5, 7, 3, 1, 1, 7),
    (2, 8, 6, 6, 12, 3, 1, 1, 2),
    (1, 64, 7, 7, 64, 1, 2, 0, 1),
    (3, 3, 17, 17, 16, 7, 2, 3, 1),
    (1, 20, 4, 4, 100, 3, 1, 0, 1),
    # NCHW-native GEMM (VNNI, NCHW input): 1x1 of a shallow input, KxK from 32 output columns
    # (dropped padding columns, a ragged last block of 4 output channels)
    (1, 5, 34, 33, 9, 3, 1, 1, 1),
    (2, 6, 12, 36, 8, 5, 1, 2, 1),
    (1, 300, 3, 3, 20, 1, 1, 0, 1),
    # dense kernel rows (Cg < 4, KW > 1): no padding on channels_last input (the buffer is still
    # copied: rows read 3 bytes past the last pixel), KW * Cg a multiple of 4, wide stems
    (2, 3, 9, 9, 20, 3, 1, 0, 1),
    (1, 2, 7, 8, 5, 2, 1, 0, 1),
    (2, 1, 12, 11, 33, 5, 3, 2, 1),
    # 3-channel stems wider than one 16-pixel vector (8-bit weights: the receptive-field sums'
    # AVX-512 passes, ragged last vectors at stride 2 and 1)
    (1, 3, 40, 45, 16, 7, 2, 3, 1),
    (1, 3, 20, 37, 16, 3, 1, 1, 1),
    # im2col stems (the whole window as one run of k-groups, copied per tile pixel): 7x7 stride
    # 2 with 64 and a ragged 50 output channels, 3x3 with 64
    (2, 3, 23, 21, 64, 7, 2, 3, 1),
    (1, 3, 19, 20, 50, 7, 2, 3, 1),
    (2, 3, 12, 10, 64, 3, 1, 1, 1),
    # 49-64 output channels: one 4-block superblock, 6 rows per micro-kernel call (tiles of
    # 16 rows = 6 + 6 + 4; ragged last tiles)
    (2, 16, 5, 7, 64, 3, 1, 1, 1),
    # edge rows (kernel rows in the vertical padding skipped): padding 3 > the 3x3 kernel's
    # reach, so some output rows read nothing but padding; stride 2 with padding 2
    (1, 8, 2, 5, 20, 3, 1, 3, 1),
    (2, 12, 9, 6, 33, 3, 2, 2, 1),
    # edge columns too (deep input, output at most 14 wide, channels_last): corner, edge and
    # interior blocks of scattered pixels; stride 2
    (2, 128, 7, 6, 40, 3, 1, 1, 1),
    (1, 120, 9, 11, 24, 3, 2, 1, 1),
    # several superblocks: pixel-major (127 and 100 channels above: panels of a few KB) and,
    # above 256 KB of panel (2304 x 128 bytes here), superblock-major
    (2, 256, 3, 5, 128, 3, 1, 1, 1),
    # edge blocks across the batch (superblock-major: tiles need not run image by image): a
    # 7x7 output's corners, edges and interior gathered over 3 images; 144 channels = 331 KB of
    # panel, three superblocks
    (3, 256, 7, 7, 144, 3, 1, 1, 1),
    # 64 input channels: columns from 1% of saved work (3.3% here), per image, with the 4-block
    # superblock's 6-row calls on scattered pixels
    (2, 64, 20, 20, 64, 3, 1, 1, 1),
    # 16 output channels: four NHWC rows leave the epilogue in one 64-byte store (P = 35: a
    # ragged last tile of 3 rows)
    (2, 16, 5, 7, 16, 3, 1, 1, 1),
    (1, 8, 6, 9, 49, 3, 2, 1, 1),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_qconv2d_bit_exact(isa, shape):
    _C.qkernels_set_isa_cpu(isa)
    assert _C.qkernels_isa_cpu() == isa
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    groups = shape[-1]
    for w_bits, a_bits in BITS:
        for v in VARIANTS:
            x, args, ref = _conv_case(g, *shape, w_bits, a_bits, **v)
            out = _C.qconv2d_cpu(x, *args)
            assert out.dtype == ref.dtype and out.shape == ref.shape
            # the output takes x's memory format (a C = 1 tensor is both: NCHW then)
            cl = v["cl"] and not x.is_contiguous()
            assert out.is_contiguous(
                memory_format=torch.channels_last if cl else torch.contiguous_format
            )
            assert torch.equal(out, ref), (isa, shape, w_bits, a_bits, v)
            packed = _C.qconv2d_prepack_cpu(args[1], groups)
            prepacked_args = (args[0], packed) + args[2:]
            assert torch.equal(_C.qconv2d_cpu(x, *prepacked_args), ref)
            assert torch.equal(_C.qconv2d_packed_cpu(x, *prepacked_args), ref)


@pytest.mark.parametrize("isa", ISAS)
def test_qconv2d_accumulator_extremes(isa):
    """int32 acc exact at the largest magnitudes the op allows: K = 512*9 terms of 255 * 127
    (int8) and 255 * 255 (int16), against the reference accumulator, read back through scale 1,
    bias 0 and float32 output (exact below 2**24, so the sums are kept under it here)."""
    _C.qkernels_set_isa_cpu(isa)
    g = torch.Generator().manual_seed(3)
    # int16 within [-128, 127] (8-bit offsets near a zero point of 128) runs the int8 kernel
    cases = ((torch.int8, 127, 512), (torch.int16, 255, 24), (torch.int16, 127, 64))
    for wdtype, wmax, c in cases:
        x = torch.randint(250, 256, (1, c, 5, 5), generator=g, dtype=torch.uint8)
        w = torch.full((16, c, 3, 3), wmax, dtype=wdtype)
        w[1::2] = -wmax - (1 if wmax == 127 else 0)
        w[2] = torch.randint(-wmax, wmax + 1, (c, 3, 3), generator=g).to(wdtype)
        assert _C.qconv2d_prepack_cpu(w, 1).int16 == (wmax == 255)
        acc = qconv2d_acc_reference(x, 0, w, [1, 1], [1, 1], 1)
        ones, zeros = torch.ones(16), torch.zeros(16)
        y = _C.qconv2d_cpu(x, 0, w, ones, zeros, [1, 1], [1, 1], 1, 0, None, 0.0, 0, 0)
        big = acc.abs() >= 2**24
        assert torch.equal(y[~big], acc.to(torch.float32)[~big])
        # beyond 2**24 float(acc) rounds; the kernel must round the same int32 the same way
        assert torch.equal(y, acc.to(torch.float32))


@pytest.mark.parametrize("isa", ISAS)
def test_qconv2d_shifted_int8_weights(isa):
    """8-bit weight offsets (int16, per-channel span <= 256 values, one group) are shifted into
    int8 at prepack and corrected in the epilogue: exact at the extremes (codes 255 and x_zp
    255/0, offsets all at one end of [-255, 255], padding and strides, the 7x7/2 stem shape);
    a channel spanning more, or groups > 1, keeps the int16 kernels."""
    _C.qkernels_set_isa_cpu(isa)
    g = torch.Generator().manual_seed(11)
    c, o = 40, 48
    w = torch.empty((o, c, 3, 3), dtype=torch.int16)
    w[0::3] = 255  # code 255, zp 0
    w[1::3] = -255  # code 0, zp 255
    w[2::3] = torch.randint(-100, 156, (o // 3, c, 3, 3), generator=g).to(torch.int16)
    packed = _C.qconv2d_prepack_cpu(w, 1)
    assert packed.shifted and not packed.int16, repr(packed)
    ones, zeros = torch.ones(o), torch.zeros(o)
    for x_fill, x_zp, stride, pad in ((255, 0, 1, 1), (255, 255, 2, 2), (0, 255, 1, 0)):
        x = torch.full((2, c, 6, 7), x_fill, dtype=torch.uint8)
        x[1] = torch.randint(0, 256, (c, 6, 7), generator=g, dtype=torch.uint8)
        for xin in (x, x.contiguous(memory_format=torch.channels_last)):
            args = (x_zp, w, ones, zeros, [stride] * 2, [pad] * 2, 1, 0, None, 0.0, 0, 0)
            acc = qconv2d_acc_reference(x, x_zp, w, [stride] * 2, [pad] * 2, 1)
            assert torch.equal(_C.qconv2d_cpu(xin, *args), acc.to(torch.float32))
            assert torch.equal(_C.qconv2d_cpu(xin, x_zp, packed, *args[2:]), acc.to(torch.float32))
    # the stem: 3 channels, 7x7 stride 2, padding 3, per-channel zero points, codes out
    x = torch.randint(0, 256, (2, 3, 23, 21), generator=g, dtype=torch.uint8)
    w = _weights(g, (64, 3, 7, 7), 8)
    assert _C.qconv2d_prepack_cpu(w, 1).shifted
    scale, bias = torch.rand(64, generator=g) * 1e-4, torch.randn(64, generator=g)
    args = (7, w, scale, bias, [2, 2], [3, 3], 1, 1, None, 0.05, 3, 8)
    assert torch.equal(_C.qconv2d_cpu(x, *args), qconv2d_reference(x, *args))
    # <= 48 output channels (one weight panel): each thread pads and sums image by image; the
    # ResNet-20 integer stem (3 -> 16, 3x3) and a 7x7/2 one, NCHW and channels_last, with
    # residual codes, on 1-3 threads (a thread may start or stop inside an image)
    before = torch.get_num_threads()
    try:
        for o, k, st, pd in ((16, 3, 1, 1), (48, 7, 2, 3), (24, 5, 1, 0)):
            w = _weights(g, (o, 3, k, k), 8)
            assert _C.qconv2d_prepack_cpu(w, 1).shifted
            x = torch.randint(0, 256, (3, 3, 13, 11), generator=g, dtype=torch.uint8)
            scale, bias = torch.rand(o, generator=g) * 1e-4, torch.randn(o, generator=g)
            ho, wo = (13 + 2 * pd - k) // st + 1, (11 + 2 * pd - k) // st + 1
            res = torch.randint(0, 16, (3, o, ho, wo), generator=g, dtype=torch.uint8)
            args = (131, w, scale, bias, [st] * 2, [pd] * 2, 1, 1, res, 0.05, 3, 4, 0.07, 2)
            want = qconv2d_reference(x, *args)
            packed = _C.qconv2d_prepack_cpu(w, 1)
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                for cl in (False, True):
                    fmt = torch.channels_last if cl else torch.contiguous_format
                    xin, rin = x.contiguous(memory_format=fmt), res.contiguous(memory_format=fmt)
                    pargs = (131, packed) + args[2:8] + (rin,) + args[9:]
                    got = _C.qconv2d_cpu(xin, *pargs)
                    assert torch.equal(got, want), (o, k, threads, cl)
    finally:
        torch.set_num_threads(before)
    # not shiftable: one channel spans 257 values; or more than one group
    w = _weights(g, (16, 8, 3, 3), 8)
    w[5, 0, 0, 0], w[5, 0, 0, 1] = -128, 128
    assert _C.qconv2d_prepack_cpu(w, 1).int16 and not _C.qconv2d_prepack_cpu(w, 1).shifted
    assert _C.qconv2d_prepack_cpu(_weights(g, (16, 4, 3, 3), 8), 2).int16


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_qconv2d_threads_split_images_and_tiles_exactly(threads):
    """Threads take ranges of (superblock, image, tile) items, so a thread can start or stop
    inside an image and several threads pad the same image into their own buffers (one weight
    panel: <= 48 output channels) or share the batch copy (more): exact either way."""
    g = torch.Generator().manual_seed(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for o, cl, s, p in (
            (16, True, 1, 1),
            (40, False, 1, 1),
            (100, True, 2, 1),
            (17, True, 1, 0),
        ):
            x, args, ref = _conv_case(g, 7, 16, 9, 11, o, 3, s, p, 1, 4, 4, 1, True, 4, cl)
            assert torch.equal(_C.qconv2d_cpu(x, *args), ref), (threads, o, cl, s, p)
    finally:
        torch.set_num_threads(before)


def test_qconv2d_dense_rows_are_chosen_for_shallow_inputs_only():
    """Kernel rows packed densely as (kw, c) exactly for one group, int8 panels, fewer than 4
    input channels and a kernel wider than 1 (the 3-channel stems); the shifted 8-bit stem too."""
    g = torch.Generator().manual_seed(5)
    dense = lambda w, groups=1: _C.qconv2d_prepack_cpu(w, groups).dense_rows  # noqa: E731
    assert dense(_weights(g, (64, 3, 7, 7), 4))
    assert dense(_weights(g, (64, 3, 7, 7), 8))  # shifted int8
    assert dense(_weights(g, (8, 1, 3, 3), 2))
    assert not dense(_weights(g, (8, 4, 3, 3), 4))  # 4 channels fill a group already
    assert not dense(_weights(g, (8, 3, 1, 1), 4))  # one tap per row
    assert not dense(_weights(g, (6, 1, 3, 3), 4), 2)  # groups
    w = _weights(g, (8, 3, 3, 3), 8)
    w[0, 0, 0, 0], w[0, 0, 0, 1] = -200, 200  # spans > 256: the int16 kernel, no dense rows
    assert not dense(w)


def test_qconv2d_im2col_is_chosen_where_it_saves_work():
    """Dense stems whose saved k-groups x blocks per call outweigh the per-pixel copies."""
    g = torch.Generator().manual_seed(6)
    im2col = lambda w: _C.qconv2d_prepack_cpu(w, 1).im2col  # noqa: E731
    assert im2col(_weights(g, (64, 3, 7, 7), 8))  # ResNet-18's stem: 37 groups, not 42
    assert im2col(_weights(g, (50, 3, 7, 7), 4))
    assert im2col(_weights(g, (64, 3, 3, 3), 4))  # 7 groups, not 9, x 4 blocks
    assert not im2col(_weights(g, (16, 3, 3, 3), 8))  # ResNet-20's stem: one block
    assert not im2col(_weights(g, (16, 3, 7, 7), 4))
    assert not im2col(_weights(g, (64, 4, 3, 3), 4))  # not dense


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("c_out", [24, 16])
def test_qconv2d_rounding_ties_and_clamps(isa, act, c_out):
    """y exactly on .5 (half to even), codes below 0 and above 2^b - 1 (clamped), after each
    activation (the epilogue drops the lower clamp after ReLU), zero points from 0 to 2^b - 1;
    16 output channels take the NHWC epilogue's one-store path for four rows."""
    _C.qkernels_set_isa_cpu(isa)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 16, (2, 8, 6, 6), generator=g, dtype=torch.uint8)
    w = torch.randint(-7, 8, (c_out, 8, 3, 3), generator=g, dtype=torch.int8)
    scale = torch.full((c_out,), 0.5)  # odd acc -> y = k + 0.5: a tie at out_scale 1
    bias = torch.zeros(c_out)
    cases = ((4, 8, 1.0), (8, 128, 1.0), (2, 1, 1.0), (4, 0, 1.0), (4, 15, 1.0), (2, 3, 1.0))
    # act 2 clamps y to 6: out_scale 0.25 puts 6 at code 24 + zp, beyond 4 bits
    cases += ((4, 2, 0.25), (8, 250, 1e-30))  # 1e-30: y / s overflows int32 (and to inf)
    for out_bits, out_zp, out_scale in cases:
        for cl in (False, True):
            xx = x.contiguous(memory_format=torch.channels_last) if cl else x
            args = (5, w, scale, bias, [1, 1], [1, 1], 1, act, None, out_scale, out_zp, out_bits)
            ref = qconv2d_reference(x, *args)
            out = _C.qconv2d_cpu(xx, *args)
            assert torch.equal(out, ref), (out_bits, out_zp, out_scale, cl)
        if act == 0 and out_scale == 1.0 and 0 < out_zp < (1 << out_bits) - 1:
            assert int(ref.min()) == 0 and int(ref.max()) == (1 << out_bits) - 1  # both clamps
        if (act == 1 and out_scale == 1.0 and out_zp < 8) or (act == 2 and out_scale == 0.25):
            assert int(ref.max()) == (1 << out_bits) - 1  # the upper clamp after the activation
    y = qconv2d_acc_reference(x, 5, w, [1, 1], [1, 1], 1).float() * 0.5
    assert bool(((y - y.floor()) == 0.5).any())  # ties really occur


# (N, K, O): GEMV (N = 1), ragged K and O, a batch that is not a multiple of the 16-row tile.
LINEAR_SHAPES = [(1, 17, 7), (3, 64, 16), (20, 127, 50), (1, 1024, 100), (9, 8, 1), (33, 300, 130)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_qlinear_bit_exact(isa, shape):
    _C.qkernels_set_isa_cpu(isa)
    n, k, o = shape
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    for w_bits, a_bits in BITS + [(3, 3)]:
        for v in VARIANTS:
            x = torch.randint(0, 1 << a_bits, (n, k), generator=g, dtype=torch.uint8)
            w = _weights(g, (o, k), w_bits)
            x_zp = int(torch.randint(0, 1 << a_bits, (1,), generator=g))
            scale = torch.rand(o, generator=g) * 0.02
            bias = torch.randn(o, generator=g)
            r, rs, rzp = _residual(g, (n, o), v["res"])
            ob = v["out_bits"]
            args = (x_zp, w, scale, bias, v["act"], r, 0.07 if ob else 0.0, 1 if ob else 0, ob)
            if v["res"] == "codes":
                args += (rs, rzp)
            ref = qlinear_reference(x, *args)
            assert torch.equal(_C.qlinear_cpu(x, *args), ref), (isa, shape, w_bits, a_bits, v)
            # sub-byte storage (2-/4-bit lines, unpacked in the kernel), inferred and explicit
            for pb in (0, w_bits):
                packed = _C.qlinear_prepack_cpu(w, pb)
                assert packed.store_bits == (2 if w_bits <= 2 else 4 if w_bits <= 4 else 8)
                pargs = (args[0], packed) + args[2:]
                assert torch.equal(_C.qlinear_cpu(x, *pargs), ref), (isa, shape, w_bits, pb, v)
                assert torch.equal(_C.qlinear_packed_cpu(x, *pargs), ref)


def test_qlinear_packed_storage_size():
    """4-bit lines hold K/2 bytes per output channel (plus padding to the 16-channel block)."""
    g = torch.Generator().manual_seed(5)
    w = _weights(g, (64, 512), 4)
    assert _C.qlinear_prepack_cpu(w, 4).weight_nbytes == 64 * 512 // 2
    assert _C.qlinear_prepack_cpu(_weights(g, (64, 512), 2), 2).weight_nbytes == 64 * 512 // 4
    assert _C.qlinear_prepack_cpu(w, 8).weight_nbytes == 64 * 512


@pytest.mark.parametrize("isa", ISAS)
def test_qlinear_accumulator(isa):
    _C.qkernels_set_isa_cpu(isa)
    g = torch.Generator().manual_seed(6)
    x = torch.randint(0, 256, (5, 1000), generator=g, dtype=torch.uint8)
    for w in (_weights(g, (40, 1000), 8), _weights(g, (40, 1000), 4)):
        acc = qlinear_acc_reference(x, 17, w)
        for pw in (w, _C.qlinear_prepack_cpu(w)):
            y = _C.qlinear_cpu(x, 17, pw, torch.ones(40), torch.zeros(40), 0, None, 0.0, 0, 0)
            assert torch.equal(y, acc.to(torch.float32))


def test_isa_forcing_env_and_errors(monkeypatch):
    best = _C.qkernels_best_isa_cpu()
    monkeypatch.setenv("PDQUANT_CPU_ISA", "scalar")
    assert _C.qkernels_isa_cpu() == "scalar"
    monkeypatch.setenv("PDQUANT_CPU_ISA", "auto")
    assert _C.qkernels_isa_cpu() == best
    monkeypatch.setenv("PDQUANT_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="PDQUANT_CPU_ISA=sse9 is not a CPU ISA level"):
        _C.qkernels_isa_cpu()
    monkeypatch.delenv("PDQUANT_CPU_ISA")
    _C.qkernels_set_isa_cpu("avx2" if "avx2" in ISAS else "scalar")
    assert _C.qkernels_isa_cpu() in ("avx2", "scalar")
    with pytest.raises(ValueError, match="allowed: scalar, avx2, avx512vnni"):
        _C.qkernels_set_isa_cpu("neon")
    if best != "avx512vnni":
        with pytest.raises(ValueError, match="only supports up to"):
            _C.qkernels_set_isa_cpu("avx512vnni")


def _good_conv_args():
    x = torch.zeros(1, 4, 5, 5, dtype=torch.uint8)
    w = torch.zeros(8, 4, 3, 3, dtype=torch.int8)
    return [x, 0, w, torch.ones(8), torch.zeros(8), [1, 1], [1, 1], 1, 0, None, 0.1, 0, 4]


@pytest.mark.parametrize(
    ("index", "value", "message"),
    [
        (0, torch.zeros(1, 4, 5, 5), "x must be uint8"),
        (0, torch.zeros(1, 5, 5, 5, dtype=torch.uint8), "x has C = 5 channels"),
        (1, 256, "x_zp must be a uint8 code"),
        (2, torch.zeros(8, 4, 3, 3, dtype=torch.int32), "w must be int8"),
        (3, torch.ones(7), "scale must be a contiguous float32"),
        (4, torch.zeros(8, dtype=torch.float64), "bias must be a contiguous float32"),
        (5, [0, 1], "stride must be >= 1"),
        (7, 3, "O = 8 is not divisible by groups = 3"),
        (8, 3, "act must be 0"),
        (9, torch.zeros(1, 8, 4, 4), "residual must have the output's shape"),
        (10, 0.0, "out_scale must be finite and > 0"),
        (12, 9, "out_bits must be 0"),
        (11, 16, "out_zp must be in 0..15 for out_bits = 4"),
        (11, -1, "out_zp must be in 0..15"),
    ],
)
def test_qconv2d_bad_input(index, value, message):
    args = _good_conv_args()
    _C.qconv2d_cpu(*args)  # the unmodified call is fine
    args[index] = value
    with pytest.raises(ValueError, match=message):
        _C.qconv2d_cpu(*args)


@pytest.mark.parametrize(
    ("residual", "res_scale", "res_zp", "message"),
    [
        (torch.zeros(1, 8, 5, 5, dtype=torch.int32), 0.1, 0, "residual must be a float32"),
        (torch.zeros(1, 8, 5, 5, dtype=torch.uint8), 0.0, 0, "need res_scale finite and > 0"),
        (torch.zeros(1, 8, 5, 5, dtype=torch.uint8), float("nan"), 0, "res_scale finite"),
        (torch.zeros(1, 8, 5, 5, dtype=torch.uint8), 0.1, 256, "res_zp must be a uint8 code"),
        (torch.zeros(1, 8, 4, 5, dtype=torch.uint8), 0.1, 0, "residual must have the output's"),
    ],
)
def test_residual_codes_bad_input(residual, res_scale, res_zp, message):
    args = _good_conv_args()
    args[9] = residual
    with pytest.raises(ValueError, match=message):
        _C.qconv2d_cpu(*args, res_scale, res_zp)
    x = torch.zeros(2, 16, dtype=torch.uint8)
    w = torch.ones(8, 16, dtype=torch.int8)
    lin = [x, 0, w, torch.ones(8), torch.zeros(8), 0, None, 0.1, 0, 4, res_scale, res_zp]
    bad_shape = residual.shape[2] != 5
    lin[6] = torch.zeros((3, 8) if bad_shape else (2, 8), dtype=residual.dtype)
    with pytest.raises(ValueError, match=message.replace("have the output's", "have")):
        _C.qlinear_cpu(*lin)


def test_residual_codes_equal_dequantized_float_residual():
    """A uint8 residual with (res_scale, res_zp) gives exactly the output of the float32
    residual the packed runtime's dequantize makes of it (so the runtime may pass codes)."""
    from pdquant_fast.deploy.runtime import ActParams

    g = torch.Generator().manual_seed(17)
    act = ActParams(4, 0.0731, 5)
    x, args, _ = _conv_case(g, 2, 16, 9, 9, 16, 3, 1, 1, 1, 4, 4, 1, False, 4, False)
    codes = torch.randint(0, 16, (2, 16, 9, 9), generator=g, dtype=torch.uint8)
    a = list(args)
    a[8] = act.dequantize(codes)
    want = _C.qconv2d_cpu(x, *a)
    a[8] = codes
    got = _C.qconv2d_cpu(x, *a, act.delta_value, act.zp_int)
    assert torch.equal(got, want)
    assert torch.equal(qconv2d_reference(x, *a, act.delta_value, act.zp_int), want)


def test_prepacked_blob_checks():
    args = _good_conv_args()
    args[2] = _C.qconv2d_prepack_cpu(args[2], 1)
    args[7] = 2
    with pytest.raises(ValueError, match="prepacked for groups = 1"):
        _C.qconv2d_cpu(*args)
    w = torch.randint(-8, 8, (16, 40), dtype=torch.int8)
    with pytest.raises(ValueError, match="2-bit offsets span at most 3"):
        _C.qlinear_prepack_cpu(w, 2)
    packed = _C.qlinear_prepack_cpu(w)
    x = torch.zeros(2, 41, dtype=torch.uint8)
    with pytest.raises(ValueError, match="x has K = 41 but w has K = 40"):
        _C.qlinear_cpu(x, 0, packed, torch.ones(16), torch.zeros(16), 0, None, 0.0, 0, 0)


def test_chooser_and_op_run_the_cpp_kernels():
    """``pdquant::qconv2d`` / ``qlinear`` on CPU dispatch to these kernels by default, and the
    packed runtime's call (prepack, then the blob in place of ``w``) matches the op."""
    from pdquant_fast import ops

    if backends.forced_backend() not in (None, "cpp"):
        pytest.skip(f"{backends.ENV} forces {backends.forced_backend()}")
    name, fn = backends.choose("qconv2d", "cpu")
    assert name == "cpp" and fn is _C.qconv2d_cpu
    name, fn = backends.choose("qlinear", "cpu")
    assert name == "cpp" and fn is _C.qlinear_cpu
    g = torch.Generator().manual_seed(7)
    x, args, ref = _conv_case(g, 2, 16, 8, 8, 24, 3, 1, 1, 1, 4, 4, 1, True, 4, False)
    assert torch.equal(ops.qconv2d(x, *args), ref)
    packed = _C.qconv2d_prepack_cpu(args[1], 1)
    assert torch.equal(_C.qconv2d_cpu(x, args[0], packed, *args[2:]), ref)


@pytest.mark.parametrize("isa", ISAS)
def test_qconv2d_random_sweep(isa):
    """Random shapes (channels 1..80, kernels 1..5, strides 1..3, any groups)."""
    _C.qkernels_set_isa_cpu(isa)
    g = torch.Generator().manual_seed(int(os.environ.get("PDQUANT_TEST_SEED", "11")))
    for _ in range(150):
        groups = int(torch.randint(1, 5, (1,), generator=g))
        cg = int(torch.randint(1, 21, (1,), generator=g))
        og = int(torch.randint(1, 21, (1,), generator=g))
        if bool(torch.rand(1, generator=g) < 0.3):  # depthwise
            groups, cg, og = cg * 2, 1, 1
        k = int(torch.randint(1, 6, (1,), generator=g))
        s = int(torch.randint(1, 4, (1,), generator=g))
        p = int(torch.randint(0, k // 2 + 1, (1,), generator=g))
        h = int(torch.randint(k, 14, (1,), generator=g))
        w_bits, a_bits = BITS[int(torch.randint(0, len(BITS), (1,), generator=g))]
        v = VARIANTS[int(torch.randint(0, len(VARIANTS), (1,), generator=g))]
        shape = (2, cg * groups, h, h + 1, og * groups, k, s, p, groups)
        x, args, ref = _conv_case(g, *shape, w_bits, a_bits, **v)
        assert torch.equal(_C.qconv2d_cpu(x, *args), ref), (shape, w_bits, a_bits, v)


@pytest.mark.parametrize("isa", ISAS)
def test_quantize_codes_bit_exact(isa):
    """float32 -> codes equals the reference on ragged sizes (SIMD body + masked tail), exact
    .5 ties (round half to even), both clamps, huge values, channels_last and strided inputs."""
    from pdquant_fast.ops.reference import quantize_codes_reference

    _C.qkernels_set_isa_cpu(isa)
    g = torch.Generator().manual_seed(29)
    delta = 0.0731
    for n in (1, 15, 16, 17, 63, 64, 65, 1000, 4099):
        x = torch.randn(n, generator=g) * 0.6
        x[::7] = (torch.randint(-20, 20, (len(x[::7]),), generator=g) + 0.5) * 0.25  # ties
        x[::11] = torch.tensor(3e38)
        x[::13] = -1e30
        for bits, zp in ((2, 1), (4, 0), (4, 7), (8, 128)):
            d = 0.25 if n % 2 else delta
            ref = quantize_codes_reference(x, d, zp, bits)
            assert torch.equal(_C.quantize_codes_cpu(x, d, zp, bits), ref), (n, bits, zp)
    x = torch.randn(3, 17, 9, 7, generator=g)
    cl = x.contiguous(memory_format=torch.channels_last)
    q = _C.quantize_codes_cpu(cl, delta, 3, 4)
    assert q.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(q, quantize_codes_reference(x, delta, 3, 4))
    strided = x[:, ::2, 1:]
    assert torch.equal(
        _C.quantize_codes_cpu(strided, delta, 3, 4), quantize_codes_reference(strided, delta, 3, 4)
    )


@pytest.mark.parametrize("isa", ISAS)
def test_quantize_codes_channels_last_bit_exact(isa):
    """``channels_last=True``: channels_last codes equal to the reference's codes of the same x,
    from NCHW input (1-4 channels: the row interleave with vpermb, masked tails; more: codes then
    a layout copy), channels_last input and strided input; ties, clamps, huge values."""
    from pdquant_fast.ops.reference import quantize_codes_reference

    _C.qkernels_set_isa_cpu(isa)
    g = torch.Generator().manual_seed(37)
    for c, h, w in (
        (1, 3, 5),
        (2, 2, 16),
        (3, 4, 17),
        (3, 32, 32),
        (4, 3, 33),
        (5, 2, 9),
        (16, 3, 7),
    ):
        x = torch.randn(2, c, h, w, generator=g) * 0.6
        flat = x.view(-1)
        flat[::7] = (torch.randint(-20, 20, (len(flat[::7]),), generator=g) + 0.5) * 0.25
        flat[::11] = 3e38
        flat[::13] = -1e30
        for bits, zp in ((2, 1), (4, 7), (8, 128)):
            d = 0.25 if w % 2 else 0.0731
            want = quantize_codes_reference(x, d, zp, bits)
            for xin in (x, x.contiguous(memory_format=torch.channels_last)):
                q = _C.quantize_codes_cpu(xin, d, zp, bits, True)
                assert q.is_contiguous(memory_format=torch.channels_last), (c, h, w)
                assert torch.equal(q, want), (c, h, w, bits, zp)
    x = torch.randn(2, 6, 5, 8, generator=g)[:, ::2, :, 1:]  # strided, 3 channels
    q = _C.quantize_codes_cpu(x, 0.1, 3, 4, True)
    assert q.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(q, quantize_codes_reference(x, 0.1, 3, 4))


def test_quantize_codes_op_matches_runtime_formula_and_rejects_bad_input():
    """The op (C++ kernel by default) gives exactly the packed runtime's former
    ``clamp(round(x / delta_t) + zp_t, 0, n)`` on 0-d float32 tensors; bad arguments raise."""
    from pdquant_fast import ops

    g = torch.Generator().manual_seed(31)
    x = torch.randn(2, 16, 11, 11, generator=g) * 2
    delta_t, zp_t = torch.tensor(0.0731), torch.tensor(5.0)
    want = torch.clamp(torch.round(x / delta_t) + zp_t, 0, 15).to(torch.uint8)
    assert torch.equal(ops.quantize_codes(x, 0.0731, 5, 4), want)
    with pytest.raises(ops.OpInputError, match="bits must be an int in 2..8"):
        ops.quantize_codes(x, 0.1, 0, 9)
    with pytest.raises(ops.OpInputError, match="delta must be finite and > 0"):
        ops.quantize_codes(x, 0.0, 0, 4)
    with pytest.raises(ops.OpInputError, match="delta must be finite and > 0"):
        ops.quantize_codes(x, 1e-50, 0, 4)  # 0 in float32
    with pytest.raises(ops.OpInputError, match="zp must be an int in 0..15"):
        ops.quantize_codes(x, 0.1, 16, 4)
    with pytest.raises(ops.OpInputError, match="x must be"):
        ops.quantize_codes(x.double(), 0.1, 0, 4)
    with pytest.raises(ValueError, match="bits must be 2..8"):
        _C.quantize_codes_cpu(x, 0.1, 0, 1)
    with pytest.raises(ValueError, match="zp must be a code 0..3"):
        _C.quantize_codes_cpu(x, 0.1, 4, 2)
    with pytest.raises(
        ops.OpInputError, match=r"channels_last codes need a 4-d .* got shape \(16, 11\)"
    ):
        ops.quantize_codes(x[0, :, :, 0], 0.1, 0, 4, channels_last=True)
    with pytest.raises(ValueError, match="channels_last codes need a 4-d"):
        _C.quantize_codes_cpu(x[0], 0.1, 0, 4, True)


def test_quantize_codes_op_keeps_channels_last():
    from pdquant_fast import ops
    from pdquant_fast.ops.reference import quantize_codes_reference

    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    q = ops.quantize_codes(x, 0.05, 2, 4)
    assert q.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(q, quantize_codes_reference(x, 0.05, 2, 4))


def test_residual_is_checked_for_an_empty_batch_too():
    """An empty batch returns an empty output, but a bad residual is still an error."""
    args = _good_conv_args()
    args[0] = torch.zeros(0, 4, 5, 5, dtype=torch.uint8)
    assert _C.qconv2d_cpu(*args).shape == (0, 8, 5, 5)
    args[9] = torch.zeros(1, 8, 5, 5, dtype=torch.uint8)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        _C.qconv2d_cpu(*args, 0.1, 0)
    x = torch.zeros(0, 16, dtype=torch.uint8)
    w = torch.ones(8, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="qlinear: res_zp must be a uint8 code"):
        _C.qlinear_cpu(
            x,
            0,
            w,
            torch.ones(8),
            torch.zeros(8),
            0,
            torch.zeros(0, 8, dtype=torch.uint8),
            0.1,
            0,
            4,
            0.1,
            300,
        )


@pytest.mark.parametrize(
    "shape, k, s, p",
    [
        ((2, 3, 9, 10), (3, 3), (2, 2), (1, 1)),  # ResNet stem pool, odd/even sizes
        ((1, 5, 8, 8), (2, 2), (2, 2), (0, 0)),
        ((1, 2, 7, 5), (3, 1), (1, 2), (1, 0)),
        ((2, 4, 1, 6), (1, 3), (1, 1), (0, 1)),
        ((1, 1, 4, 4), (4, 4), (1, 1), (2, 2)),  # padding = half the kernel: border windows
    ],
)
@pytest.mark.parametrize("isa", ISAS)
def test_max_pool2d_codes_bit_exact(shape, k, s, p, isa):
    from pdquant_fast import ops
    from pdquant_fast.ops.reference import max_pool2d_codes_reference

    _C.qkernels_set_isa_cpu(isa)
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    ref = max_pool2d_codes_reference(x, list(k), list(s), list(p))
    assert torch.equal(_C.max_pool2d_codes_cpu(x, list(k), list(s), list(p)), ref)
    wide = torch.randint(0, 256, (1, 2, 7, 150), generator=g, dtype=torch.uint8)  # > 64 lanes
    assert torch.equal(
        _C.max_pool2d_codes_cpu(wide, list(k), list(s), list(p)),
        max_pool2d_codes_reference(wide, list(k), list(s), list(p)),
    )
    assert torch.equal(ops.max_pool2d_codes(x, list(k), list(s), list(p)), ref)
    # channels_last in, channels_last out (the NHWC kernel), through the op and the extension
    cl = x.contiguous(memory_format=torch.channels_last)
    for out in (
        _C.max_pool2d_codes_cpu(cl, list(k), list(s), list(p)),
        ops.max_pool2d_codes(cl, list(k), list(s), list(p)),
    ):
        assert torch.equal(out, ref)
        assert out.is_contiguous(memory_format=torch.channels_last)
    wide_cl = torch.randint(0, 256, (2, 150, 9, 7), generator=g, dtype=torch.uint8)  # > 64 lanes
    assert torch.equal(
        _C.max_pool2d_codes_cpu(
            wide_cl.contiguous(memory_format=torch.channels_last), list(k), list(s), list(p)
        ),
        max_pool2d_codes_reference(wide_cl, list(k), list(s), list(p)),
    )


def test_max_pool2d_codes_rejects_bad_input():
    from pdquant_fast import ops

    x = torch.zeros(1, 2, 4, 4, dtype=torch.uint8)
    with pytest.raises(ops.OpInputError, match="x must be"):
        ops.max_pool2d_codes(x.float(), [2, 2], [2, 2], [0, 0])
    with pytest.raises(ops.OpInputError, match="at most half the kernel"):
        ops.max_pool2d_codes(x, [2, 2], [2, 2], [2, 0])
    with pytest.raises(ops.OpInputError, match="stride must be two ints >= 1"):
        ops.max_pool2d_codes(x, [2, 2], [0, 2], [0, 0])
    with pytest.raises(ops.OpInputError, match="smaller than the kernel"):
        ops.max_pool2d_codes(x, [5, 5], [1, 1], [0, 0])
    with pytest.raises(ValueError, match="padding must be >= 0 and at most half"):
        _C.max_pool2d_codes_cpu(x, [2, 2], [2, 2], [2, 0])


def test_runtime_pools_codes_with_the_op_only_for_what_it_computes():
    from pdquant_fast.deploy.runtime import _pool_on_codes

    x = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    kw = dict(kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=False)
    assert _pool_on_codes([x], kw) == ([3, 3], [2, 2], [1, 1])
    assert _pool_on_codes([x], dict(kernel_size=[2, 3])) == ([2, 3], [2, 3], [0, 0])
    assert _pool_on_codes([x], dict(kw, ceil_mode=True)) is None
    assert _pool_on_codes([x], dict(kw, dilation=2)) is None
    assert _pool_on_codes([x, 3], {}) is None


def test_relu_before_a_zero_point_0_quantizer_changes_no_code():
    """Why the packed runtime may skip a float layer's ReLU that feeds a quantizer with zero
    point 0: every negative value (and -0.0) gets code 0 either way."""
    from pdquant_fast import ops

    g = torch.Generator().manual_seed(37)
    x = torch.randn(4, 8, 9, 9, generator=g) * 3
    x[0, 0, 0, :4] = torch.tensor([-0.0, -1e-30, -0.05, 0.05])
    for bits in (2, 4, 8):
        assert torch.equal(
            ops.quantize_codes(torch.relu(x), 0.1, 0, bits), ops.quantize_codes(x, 0.1, 0, bits)
        )
    # with a positive zero point it would change codes: the runtime must not skip then
    assert not torch.equal(
        ops.quantize_codes(torch.relu(x), 0.1, 3, 4), ops.quantize_codes(x, 0.1, 3, 4)
    )


@pytest.mark.parametrize("isa", ISAS)
def test_dequantize_codes_bit_exact(isa):
    """codes -> float32 equals the reference (and the runtime's former formula on 0-d float32
    tensors) on ragged sizes, every code, channels_last and strided inputs; bad input raises."""
    from pdquant_fast import ops
    from pdquant_fast.ops.reference import dequantize_codes_reference

    _C.qkernels_set_isa_cpu(isa)
    g = torch.Generator().manual_seed(41)
    for n in (1, 15, 16, 17, 64, 65, 256, 4099):
        q = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
        for delta, zp in ((0.0731, 0), (0.25, 7), (1e-3, 255)):
            ref = dequantize_codes_reference(q, delta, zp)
            assert torch.equal(_C.dequantize_codes_cpu(q, delta, zp), ref), (n, delta, zp)
    q = torch.randint(0, 16, (3, 17, 9, 7), generator=g, dtype=torch.uint8)
    old = (q.to(torch.float32) - torch.tensor(5.0)) * torch.tensor(0.0731)
    cl = q.contiguous(memory_format=torch.channels_last)
    y = _C.dequantize_codes_cpu(cl, 0.0731, 5)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, old)
    assert torch.equal(ops.dequantize_codes(q[:, ::2], 0.0731, 5), old[:, ::2])
    with pytest.raises(ops.OpInputError, match="codes must be a uint8 tensor"):
        ops.dequantize_codes(q.float(), 0.1, 0)
    with pytest.raises(ops.OpInputError, match="zp must be an int in 0..255"):
        ops.dequantize_codes(q, 0.1, 256)
    with pytest.raises(ops.OpInputError, match="delta must be finite and > 0"):
        ops.dequantize_codes(q, float("inf"), 0)
    with pytest.raises(ValueError, match="zp must be a code 0..255"):
        _C.dequantize_codes_cpu(q, 0.1, -1)
