"""Packed deployment: pack/unpack, qconv2d/qlinear references, export/load, bad files, parity.

Exactness: packing, accumulators and output codes are compared with ``torch.equal`` (atol 0)
against independent computations (bit loops in numpy, int64 shifted-window sums, numpy float32
requantisation). Parity with the fake-quant simulation is measured with
:func:`pdquant_fast.deploy.parity.compare`; its budgets are stated where they are asserted.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pdquant_fast import ops
from pdquant_fast.deploy import DeployError, export_packed, load_packed
from pdquant_fast.deploy.format import FORMAT_VERSION, MANIFEST_FILE, TENSOR_FILE
from pdquant_fast.deploy.parity import compare, quick_quantize
from pdquant_fast.ops import OpInputError
from pdquant_fast.ops import reference as ref

#: A teacher-forced output code may differ from the simulation's only where the exact value
#: ``y / out_scale`` lies this close to a rounding boundary (k + 0.5), in code units. The float32
#: error of the simulation's convolution is ~K * 2^-24 relative (K <= 4608 here): <= 3e-4 of a
#: code at 8 bits. Measured: at most 2e-6 (ResNet-20), no flips at all (EfficientNet-Lite0).
TIE_TOL = 1e-3


# ------------------------------------------------------------------------------------ packing


def _pack_bitwise(codes: np.ndarray, bits: int) -> np.ndarray:
    """Independent packing: OR each code into its byte at its bit offset (numpy)."""
    o, k = codes.shape
    per = 8 // bits
    out = np.zeros((o, (k * bits + 7) // 8), dtype=np.uint8)
    for j in range(k):
        out[:, j // per] |= (codes[:, j].astype(np.uint8) << ((j % per) * bits)).astype(np.uint8)
    return out


def test_pack_layout_known_bytes():
    c4 = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    assert ops.pack(c4, 4).tolist() == [[0x21, 0x03]]  # low nibble first, row padded
    c2 = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert ops.pack(c2, 2).tolist() == [[0b00111001, 0b00000011]]
    c8 = torch.tensor([[7, 255]], dtype=torch.uint8)
    assert ops.pack(c8, 8).tolist() == [[7, 255]]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k", [1, 7, 127, 4097])
@pytest.mark.parametrize("o", [1, 3, 17])
def test_pack_unpack_round_trip(bits, k, o):
    g = torch.Generator().manual_seed(k * 31 + o * 7 + bits)
    codes = torch.randint(0, 1 << bits, (o, k), generator=g, dtype=torch.uint8)
    codes[0, 0] = (1 << bits) - 1  # both clamp bounds present
    codes[-1, -1] = 0
    packed = ops.pack(codes, bits)
    assert packed.shape == (o, (k * bits + 7) // 8) and packed.dtype == torch.uint8
    assert np.array_equal(packed.numpy(), _pack_bitwise(codes.numpy(), bits))
    assert torch.equal(ops.unpack(packed, bits, k), codes)
    assert torch.equal(ref.unpack_reference(ref.pack_reference(codes, bits), bits, k), codes)


def test_pack_rejects_bad_input():
    with pytest.raises(OpInputError, match="0..3 for 2-bit"):
        ops.pack(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(OpInputError, match="bits must be one of"):
        ops.pack(torch.zeros(2, 2, dtype=torch.uint8), 3)
    with pytest.raises(OpInputError, match="must be torch.uint8"):
        ops.pack(torch.zeros(2, 2, dtype=torch.int32), 4)
    with pytest.raises(OpInputError, match=r"packed must be 2-d \[O, 2\]"):
        ops.unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 4)


# ------------------------------------------------------------------------------ qconv/qlinear


def _acc_int64(x, x_zp, w, stride, padding, groups):
    """Independent exact accumulator: int64 sums over shifted windows (no convolution call)."""
    xi = x.to(torch.int64) - x_zp
    xi = F.pad(xi, (padding[1], padding[1], padding[0], padding[0]))  # zero = x_zp in codes
    n, c, h, wd = xi.shape
    o, cg, kh, kw = w.shape
    og = o // groups
    ho = (h - kh) // stride[0] + 1
    wo = (wd - kw) // stride[1] + 1
    acc = torch.zeros(n, o, ho, wo, dtype=torch.int64)
    wi = w.to(torch.int64)
    for g in range(groups):
        xs = xi[:, g * cg : (g + 1) * cg]
        ws = wi[g * og : (g + 1) * og]
        for i in range(kh):
            for j in range(kw):
                win = xs[
                    :, :, i : i + stride[0] * ho : stride[0], j : j + stride[1] * wo : stride[1]
                ]
                acc[:, g * og : (g + 1) * og] += torch.einsum("nchw,oc->nohw", win, ws[:, :, i, j])
    return acc


def _requant_np(acc, scale, bias, act, residual, out_scale, out_zp, out_bits, axis=1):
    """Independent float32 requantisation in numpy (IEEE float32 ops, true division)."""
    shape = [1] * acc.dim()
    shape[axis] = -1
    y = acc.numpy().astype(np.float32) * scale.numpy().reshape(shape)
    y = (y + bias.numpy().reshape(shape)).astype(np.float32)
    if residual is not None:
        y = (y + residual.numpy()).astype(np.float32)
    if act == 1:
        y = np.maximum(y, np.float32(0))
    elif act == 2:
        y = np.minimum(np.maximum(y, np.float32(0)), np.float32(6))
    if out_bits == 0:
        return torch.from_numpy(y)
    q = np.rint(y / np.float32(out_scale)) + np.float32(out_zp)  # rint: half to even
    return torch.from_numpy(np.clip(q, 0, (1 << out_bits) - 1).astype(np.uint8))


CONV_CASES = [
    # n, c, h, w, o, k, stride, padding, groups, wdtype
    (2, 16, 9, 9, 8, 3, 1, 1, 1, torch.int8),  # 3x3
    (1, 7, 8, 11, 5, 3, 2, 1, 1, torch.int8),  # ragged channels, strided, odd sizes
    (2, 12, 7, 7, 12, 3, 2, 1, 12, torch.int8),  # depthwise 3x3 s2
    (1, 10, 9, 9, 10, 5, 1, 2, 10, torch.int8),  # depthwise 5x5
    (3, 6, 5, 5, 4, 1, 1, 0, 2, torch.int8),  # 1x1 grouped
    (1, 3, 8, 8, 4, 3, 1, 1, 1, torch.int16),  # 8-bit weights
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("out_bits", [0, 2, 4, 8])
def test_qconv2d_exact(case, act, out_bits):
    n, c, h, w_, o, k, s, p, g, wdt = case
    gen = torch.Generator().manual_seed(hash((case, act, out_bits)) % 2**31)
    a_bits = 4
    x = torch.randint(0, 1 << a_bits, (n, c, h, w_), generator=gen, dtype=torch.uint8)
    lim = 255 if wdt == torch.int16 else 7
    w = torch.randint(-lim, lim + 1, (o, c // g, k, k), generator=gen).to(wdt)
    scale = torch.rand(o, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(o, generator=gen) * 0.5
    ho = (h + 2 * p - k) // s + 1
    wo = (w_ + 2 * p - k) // s + 1
    res = torch.randn(n, o, ho, wo, generator=gen) if act != 2 else None
    out_scale = 0.05 if out_bits else 0.0
    out_zp = 3 if out_bits else 0
    acc = _acc_int64(x, 5, w, (s, s), (p, p), g)
    assert torch.equal(ref.qconv2d_acc_reference(x, 5, w, [s, s], [p, p], g).long(), acc)
    y = ops.qconv2d(x, 5, w, scale, bias, [s, s], [p, p], g, act, res, out_scale, out_zp, out_bits)
    want = _requant_np(acc, scale, bias, act, res, out_scale, out_zp, out_bits)
    assert y.dtype == want.dtype and torch.equal(y, want)


@pytest.mark.parametrize("k", [1, 7, 127, 4097])
@pytest.mark.parametrize("out_bits", [0, 4, 8])
def test_qlinear_exact(k, out_bits):
    gen = torch.Generator().manual_seed(k + out_bits)
    n, o = 3, 17
    x = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8)
    w = torch.randint(-8, 8, (o, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(o, generator=gen) * 1e-4
    bias = torch.randn(o, generator=gen)
    res = torch.randn(n, o, generator=gen)
    acc = (x.long() - 128) @ w.long().t()
    y = ops.qlinear(x, 128, w, scale, bias, 1, res, 0.02 if out_bits else 0.0, 1, out_bits)
    assert torch.equal(y, _requant_np(acc, scale, bias, 1, res, 0.02, 1, out_bits))


def test_requant_rounds_half_to_even_and_clamps():
    # acc = 1..6 with scale 0.5, out_scale 1: y/s = 0.5, 1.0, ..., 3.0 -> 0, 1, 2, 2, 2, 3 + zp
    x = torch.tensor([[1, 2, 3, 4, 5, 6]], dtype=torch.uint8).t().contiguous()  # [6, 1]
    w = torch.ones(1, 1, dtype=torch.int8)
    y = ops.qlinear(x, 0, w, torch.tensor([0.5]), torch.zeros(1), 0, None, 1.0, 0, 8)
    assert y.flatten().tolist() == [0, 1, 2, 2, 2, 3]
    y = ops.qlinear(x, 0, w, torch.tensor([0.5]), torch.zeros(1), 0, None, 1.0, 2, 2)
    assert y.flatten().tolist() == [2, 3, 3, 3, 3, 3]  # clamped at 2^2 - 1


def test_qconv2d_rejects_bad_input():
    x = torch.zeros(1, 4, 5, 5, dtype=torch.uint8)
    w = torch.zeros(2, 4, 3, 3, dtype=torch.int8)
    s, b = torch.ones(2), torch.zeros(2)
    args = ([1, 1], [1, 1], 1, 0, None, 0.1, 0, 4)
    with pytest.raises(OpInputError, match="int8 .* or int16"):
        ops.qconv2d(x, 0, w.float(), s, b, *args)
    with pytest.raises(OpInputError, match="groups=2 does not fit"):
        ops.qconv2d(x, 0, w, s, b, [1, 1], [1, 1], 2, 0, None, 0.1, 0, 4)
    with pytest.raises(OpInputError, match="out_zp must be an int in 0..15"):
        ops.qconv2d(x, 0, w, s, b, [1, 1], [1, 1], 1, 0, None, 0.1, 16, 4)
    with pytest.raises(OpInputError, match="out_scale must be finite and > 0"):
        ops.qconv2d(x, 0, w, s, b, [1, 1], [1, 1], 1, 0, None, 0.0, 0, 4)
    with pytest.raises(OpInputError, match="residual must have the output's shape"):
        ops.qconv2d(x, 0, w, s, b, [1, 1], [1, 1], 1, 0, torch.zeros(1, 2, 4, 4), 0.1, 0, 4)
    with pytest.raises(OpInputError, match="act must be one of"):
        ops.qconv2d(x, 0, w, s, b, [1, 1], [1, 1], 1, 3, None, 0.1, 0, 4)
    codes = torch.zeros(1, 2, 5, 5, dtype=torch.uint8)
    with pytest.raises(OpInputError, match="residual must be float32 values or uint8"):
        ops.qconv2d(x, 0, w, s, b, [1, 1], [1, 1], 1, 0, codes.int(), 0.1, 0, 4)
    with pytest.raises(OpInputError, match="uint8 residual needs res_scale"):
        ops.qconv2d(x, 0, w, s, b, [1, 1], [1, 1], 1, 0, codes, 0.1, 0, 4)
    with pytest.raises(OpInputError, match="res_zp must be an int in 0..255"):
        ops.qconv2d(x, 0, w, s, b, [1, 1], [1, 1], 1, 0, codes, 0.1, 0, 4, 0.5, 256)
    # valid: codes with their step and zero point, the same as their float32 dequantization
    got = ops.qconv2d(x, 0, w, s, b, [1, 1], [1, 1], 1, 0, codes + 3, 0.0, 0, 0, 0.5, 1)
    assert torch.equal(got, torch.full((1, 2, 5, 5), 1.0))
    big = torch.full((1, 40000), 255, dtype=torch.int16)
    with pytest.raises(OpInputError, match="int32 accumulator could overflow"):
        ops.qlinear(
            torch.zeros(1, 40000, dtype=torch.uint8),
            0,
            big,
            torch.ones(1),
            torch.zeros(1),
            0,
            None,
            0.0,
            0,
            0,
        )


def test_opcheck_deployment_ops():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 9), generator=g, dtype=torch.uint8)
    torch.library.opcheck(ops.pack, (codes, 4))
    torch.library.opcheck(ops.unpack, (ops.pack(codes, 4), 4, 9))
    x = torch.randint(0, 16, (2, 4, 6, 6), generator=g, dtype=torch.uint8)
    w = torch.randint(-7, 8, (6, 2, 3, 3), generator=g, dtype=torch.int8)
    torch.library.opcheck(
        ops.qconv2d,
        (x, 2, w, torch.rand(6), torch.randn(6), [2, 2], [1, 1], 2, 1, None, 0.1, 1, 4),
    )
    xl = torch.randint(0, 16, (2, 9), generator=g, dtype=torch.uint8)
    wl = torch.randint(-7, 8, (5, 9), generator=g, dtype=torch.int8)
    torch.library.opcheck(
        ops.qlinear, (xl, 1, wl, torch.rand(5), torch.randn(5), 2, torch.randn(2, 5), 0.0, 0, 0)
    )
    # residual as uint8 codes with their step and zero point
    rq = torch.randint(0, 16, (2, 6, 3, 3), generator=g, dtype=torch.uint8)
    torch.library.opcheck(
        ops.qconv2d,
        (x, 2, w, torch.rand(6), torch.randn(6), [2, 2], [1, 1], 2, 1, rq, 0.1, 1, 4, 0.05, 3),
    )
    rl = torch.randint(0, 16, (2, 5), generator=g, dtype=torch.uint8)
    torch.library.opcheck(
        ops.qlinear, (xl, 1, wl, torch.rand(5), torch.randn(5), 2, rl, 0.0, 0, 0, 0.05, 3)
    )
    torch.library.opcheck(ops.quantize_codes, (torch.randn(2, 4, 5, 5, generator=g), 0.1, 3, 4))
    torch.library.opcheck(
        ops.quantize_codes, (torch.randn(2, 3, 5, 5, generator=g), 0.1, 3, 4, True)
    )
    torch.library.opcheck(ops.max_pool2d_codes, (x, [3, 3], [2, 2], [1, 1]))
    xcl = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(ops.max_pool2d_codes, (xcl, [3, 3], [2, 2], [1, 1]))
    torch.library.opcheck(ops.dequantize_codes, (x, 0.1, 3))


# ------------------------------------------------------------------------- export / load


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """ResNet-8 (random init, no data needed), quick W4A4 quantization, exported once."""
    from pdquant_fast.models.registry import build_model

    torch.manual_seed(0)
    model, _ = build_model("cifar_resnet8")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 32, 32, generator=g)
    q = quick_quantize(model, x, 4, 4)
    out = tmp_path_factory.mktemp("packed") / "r8"
    man = export_packed(
        q, out, fp_model=model, model_info={"name": "cifar_resnet8", "input_size": [3, 32, 32]}
    )
    return model, q, out, man, x


def test_export_load_round_trip(small):
    from safetensors.torch import load_file

    model, q, out, man, _ = small
    assert (out / MANIFEST_FILE).is_file() and (out / TENSOR_FILE).is_file()
    disk = json.loads((out / MANIFEST_FILE).read_text())
    assert disk == json.loads(json.dumps(man))
    assert disk["version"] == FORMAT_VERSION and disk["format"] == "pdquant-packed"
    layers = disk["layers"]
    assert len(layers) == 8  # stem, 3 blocks x 2 convs, classifier
    assert layers["conv1"]["w_bits"] == 8 and layers["linear"]["w_bits"] == 8
    assert layers["layer1.0.conv1"]["w_bits"] == 4 and layers["layer1.0.conv1"]["storage_bits"] == 4
    ops_by_layer = {n["layer"]: n["op"] for n in disk["graph"] if "layer" in n}
    assert ops_by_layer["conv1"] == "layer_float" and ops_by_layer["linear"] == "layer_float"
    assert sum(v == "layer_packed" for v in ops_by_layer.values()) == 6
    # tensors on disk are exactly what the simulation holds
    t = load_file(str(out / TENSOR_FILE))
    qls = {m.name: m for m in q.modules() if type(m).__name__ == "QuantLayer"}
    for name, spec in layers.items():
        ql = qls[name]
        codes = ql.wq.int_weight(ql.org_weight).to(torch.uint8)
        k = codes[0].numel()
        got = ops.unpack(t[spec["tensors"]["weight"]], spec["storage_bits"], k)
        assert torch.equal(got, codes.reshape(codes.shape[0], -1))
        assert torch.equal(t[spec["tensors"]["w_delta"]], ql.wq.delta.reshape(-1))
        assert torch.equal(t[spec["tensors"]["w_zp"]].float(), ql.wq.zp.reshape(-1))
        assert torch.equal(t[spec["tensors"]["bias"]], ql.org_bias)
    for name, a in disk["acts"].items():
        aq = next(m for m in q.modules() if getattr(m, "name", None) == name and hasattr(m, "zp"))
        assert torch.tensor(a["delta"], dtype=torch.float32) == aq.delta.detach()
        assert a["zp"] == int(aq.zp) and a["bits"] == aq.bits
    s = disk["sizes"]
    assert s["packed_bytes"] == (out / TENSOR_FILE).stat().st_size
    assert s["ratio"] > 4  # 4-bit body, 8-bit first/last layer, fp32 scales and biases
    pm = load_packed(out)
    for name in layers:  # the loaded model holds the same weights
        mod = pm.layers[name.replace(".", "_")]
        if hasattr(mod, "w"):
            ql = qls[name]
            codes = ql.wq.int_weight(ql.org_weight)
            assert torch.equal(mod.w.float(), codes - ql.wq.zp)


def test_small_model_parity(small):
    """Exact accumulators, teacher-forced logits bit-identical, flips only at ties."""
    _, q, out, _, x = small
    pm = load_packed(out)
    rep = compare(q, pm, x[:8])
    assert rep.layers and rep.acc_all_equal
    assert rep.teacher_logits_equal
    assert all(la.flip_max_tie_dist < TIE_TOL for la in rep.layers)
    # free running: float32 rounding differences near ties flip a few codes; budget 5% of the
    # largest logit (measured 0 on this model)
    assert rep.logits_max_abs_diff <= 0.05 * rep.logits_max_abs


def test_activation_layouts_give_identical_codes_and_logits(small):
    """channels_last codes (``auto`` on the C++ kernels) and NCHW codes: every quantizer's codes
    and the logits are identical (float layers and float glue run NCHW in both)."""
    _, q, out, _, x = small
    runs = {}
    for fmt in ("contiguous", "channels_last"):
        pm = load_packed(out, memory_format=fmt)
        cap: dict = {}
        runs[fmt] = (pm(x[:8], capture=cap), cap["codes"])
        assert pm.layout == fmt
        # feature maps: several channels and pixels (a [N, C, 1, 1] tensor is both layouts)
        maps = [
            c for c in cap["codes"].values() if c.dim() == 4 and c.shape[1] > 1 < c[0, 0].numel()
        ]
        assert maps and all(
            c.is_contiguous(memory_format=torch.channels_last) != (fmt == "contiguous")
            for c in maps
        )
    assert torch.equal(runs["contiguous"][0], runs["channels_last"][0])
    assert runs["contiguous"][1].keys() == runs["channels_last"][1].keys()
    for name, c in runs["contiguous"][1].items():
        assert torch.equal(c, runs["channels_last"][1][name]), name
    # channels_last asked for explicitly while a backend without it runs (the reference here):
    # the layers get NCHW copies of codes and residuals, the results do not change
    pm = load_packed(out, memory_format="channels_last")
    ops.force("reference")
    try:
        assert torch.equal(pm(x[:8]), runs["contiguous"][0])
    finally:
        ops.force(None)
    auto = load_packed(out)
    auto(x[:2])
    cpp = ops.choose("qconv2d", "cpu")[0] == "cpp"
    assert auto.layout == ("channels_last" if cpp else "contiguous")
    with pytest.raises(DeployError, match=r"memory_format 'nhwc' is not one of \['auto'"):
        load_packed(out, memory_format="nhwc")


def _copy(src, tmp_path):
    dst = tmp_path / "p"
    shutil.copytree(src, dst)
    return dst


def test_bad_files_give_clear_errors(small, tmp_path):
    out = small[2]
    # corrupted tensor payload: one byte flipped in the data section
    d = _copy(out, tmp_path / "a")
    raw = bytearray((d / TENSOR_FILE).read_bytes())
    raw[-3] ^= 0xFF
    (d / TENSOR_FILE).write_bytes(bytes(raw))
    with pytest.raises(DeployError, match=r"weights.safetensors: tensor '.*' fails its sha256"):
        load_packed(d)
    # truncated tensor file (size recorded in the manifest no longer matches, and it won't parse)
    d = _copy(out, tmp_path / "b")
    raw = (d / TENSOR_FILE).read_bytes()
    (d / TENSOR_FILE).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(
        DeployError, match=r"safetensors: \d+ bytes, the manifest recorded \d+ \(trunc"
    ):
        load_packed(d)
    man = json.loads((d / MANIFEST_FILE).read_text())
    man["tensor_file_bytes"] = len(raw) // 2
    (d / MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(DeployError, match="weights.safetensors: not a readable safetensors"):
        load_packed(d)
    # wrong manifest version
    d = _copy(out, tmp_path / "c")
    man = json.loads((d / MANIFEST_FILE).read_text())
    man["version"] = FORMAT_VERSION + 1
    (d / MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(DeployError, match=r"manifest.json: format version 2 is not supported"):
        load_packed(d)
    # manifest / tensor shape mismatch (layer says more input channels than the tensor holds)
    d = _copy(out, tmp_path / "d")
    man = json.loads((d / MANIFEST_FILE).read_text())
    man["layers"]["layer1.0.conv1"]["weight_shape"][1] *= 2
    (d / MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(DeployError, match=r"manifest.json: layer layer1.0.conv1: packed weight"):
        load_packed(d)
    # recorded tensor shape differs from the file
    d = _copy(out, tmp_path / "e")
    man = json.loads((d / MANIFEST_FILE).read_text())
    man["tensors"]["conv1.bias"]["shape"] = [3]
    (d / MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(DeployError, match=r"tensor 'conv1.bias' is float32 \[16\], the manifest"):
        load_packed(d)
    # missing files, corrupted JSON
    d = _copy(out, tmp_path / "f")
    (d / TENSOR_FILE).unlink()
    with pytest.raises(DeployError, match=r"weights.safetensors: missing"):
        load_packed(d)
    (d / MANIFEST_FILE).unlink()
    with pytest.raises(DeployError, match=r"manifest.json: missing"):
        load_packed(d)
    d = _copy(out, tmp_path / "g")
    (d / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(DeployError, match=r"manifest.json: not valid JSON"):
        load_packed(d)
    # graph referring to an unknown glue function
    d = _copy(out, tmp_path / "h")
    man = json.loads((d / MANIFEST_FILE).read_text())
    glue = next(n for n in man["graph"] if n["op"] == "glue")
    glue["fn"] = "exec"
    (d / MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(DeployError, match="unknown glue function 'exec'"):
        load_packed(d)


def test_cli_export_and_bench_latency(small, tmp_path):
    """``pdquant export RUN --out DIR`` from a run folder, then ``pdquant bench-latency``."""
    from pdquant_fast.api import save_quant_state
    from pdquant_fast.cli import main
    from pdquant_fast.config import make_config

    model, q, _, _, x = small
    run = tmp_path / "run"
    run.mkdir()
    torch.save(model.state_dict(), run / "weights.pt")
    save_quant_state(q, run / "quant_state.pt")
    cfg = make_config("rtn", w_bits=4, a_bits=4)
    (run / "result.json").write_text(
        json.dumps(
            {
                "model": "cifar_resnet8",
                "weights": str(run / "weights.pt"),
                "method": "rtn",
                "config": cfg.to_dict(),
            }
        )
    )
    out = tmp_path / "packed"
    assert main(["export", str(run), "--out", str(out)]) == 0
    pm = load_packed(out)
    assert pm.manifest["model"]["name"] == "cifar_resnet8"
    assert pm.manifest["source"]["w_bits"] == 4
    assert torch.equal(pm(x[:4]), load_packed(small[2])(x[:4]))
    res = tmp_path / "results"
    rc = main(
        [
            "bench-latency",
            str(out),
            "--batch",
            "1",
            "2",
            "--repeat",
            "2",
            "--warmup",
            "0",
            "--out",
            str(res),
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (res / "packed_latency.jsonl").read_text().splitlines()]
    impls = {(r["batch"], r["impl"]) for r in rows}
    assert {(1, "packed"), (1, "fp32"), (2, "packed"), (2, "fp32")} <= impls
    assert all(r["median_ms"] > 0 and "device" in r and "git_sha" in r for r in rows)
    # a folder that is not a run
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


def test_export_rejects_unexportable(small):
    with pytest.raises(DeployError, match="expected a quantized model"):
        export_packed(small[0], "/tmp/never-written")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_model_cuda_parity(small, monkeypatch):
    """On CUDA (whatever backend the chooser picks: Triton, CUDA or the reference): every packed
    layer gives bit-identical outputs to the CPU reference on the same inputs, and parity with
    the simulation run on the GPU holds (TF32 off: with TF32 the simulation's float32 conv is
    not the float32 computation the tie tolerance assumes)."""
    import copy

    _, q, out, _, x = small
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cpu = load_packed(out)
    gpu = load_packed(out, device="cuda")
    cap: dict = {}
    cpu(x, capture=cap)
    for name, c in cap.items():
        if name in ("codes", "flips"):
            continue
        res = c["residual"].cuda() if c["residual"] is not None else None
        got = gpu.layers[name.replace(".", "_")](c["x"].cuda(), res)
        assert torch.equal(got.cpu(), c["out"]), name
    rep = compare(copy.deepcopy(q).cuda(), gpu, x.cuda())
    assert rep.acc_all_equal and rep.teacher_logits_equal
    assert rep.summary()["flip_max_tie_dist"] < TIE_TOL
    # channels-last activations on the GPU: the same logits as NCHW
    gpu_cl = load_packed(out, device="cuda", memory_format="channels_last")
    assert torch.equal(gpu_cl(x.cuda()), gpu(x.cuda()))


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def resnet20_data(shared_data):
    from pdquant_fast.data import open_image_source
    from pdquant_fast.models.registry import build_model

    model, _ = build_model(
        "cifar_resnet20", shared_data / "cifar10/models/akamaster_resnet/resnet20-12fca82f.th"
    )
    folder = shared_data / "cifar10/convnetjs_png"
    train = open_image_source(folder, "cifar", split="train")
    test = open_image_source(folder, "cifar", split="test")
    xc = torch.stack([train[i][0] for i in range(128)])
    xt = torch.stack([test[i][0] for i in range(1000)])
    yt = torch.tensor([test[i][1] for i in range(1000)])
    return model, xc, xt, yt


@pytest.mark.slow
@pytest.mark.parametrize("method,w_bits", [("rtn", 4), ("adaround", 2)])
def test_resnet20_parity(resnet20_data, tmp_path, method, w_bits):
    """ResNet-20 W4A4 (RTN) and W2A4 (AdaRound, 5 iterations/layer): 128 real calibration
    images; per-layer checks on 64 test images, end to end on the 1,000 lossless test images."""
    from pdquant_fast import quantize

    model, xc, xt, yt = resnet20_data
    q, _ = quantize(
        model, xc, method=method, w_bits=w_bits, a_bits=4, iters=5, log=None, progress=False
    )
    man = export_packed(q, tmp_path / "p", fp_model=model)
    assert man["sizes"]["ratio"] > 5
    rep = compare(q, load_packed(tmp_path / "p"), xt, layer_images=64)
    s = rep.summary()
    acc_sim = (torch.tensor(rep.sim_pred) == yt).float().mean().item()
    acc_packed = (torch.tensor(rep.packed_pred) == yt).float().mean().item()
    print(json.dumps({k: v for k, v in s.items() if k != "top1_disagreements"}))
    print(
        f"top-1 vs labels: simulation {acc_sim:.2%}, packed {acc_packed:.2%}; sizes", man["sizes"]
    )
    assert len(rep.layers) == 18 and rep.acc_all_equal
    assert rep.teacher_logits_equal
    assert s["flip_max_tie_dist"] < TIE_TOL
    assert s["teacher_forced_flips"] <= 1e-5 * s["output_elements"]
    # budget: code flips at ties cascade through 19 layers; the logits stay within 10% of the
    # largest logit (measured 4.9% W4A4, 1.5% W2A4) and top-1 agrees on >= 99% of the images
    # (measured 996 and 1000 of 1000)
    assert rep.logits_max_abs_diff <= 0.10 * rep.logits_max_abs
    assert rep.top1_agree >= 990
    # every disagreement is explained by tie rounding: on that image alone, all accumulators are
    # exact, every code that differs when teacher-forced lies at a rounding tie and the logits are
    # bit-identical once the simulation's codes are fed; and either the free-running packed model
    # flipped codes (at ties, cascading), or the simulation's own float32 convolution rounds
    # differently in a batch of 1,000 than alone (its top-1 alone differs from its top-1 in the
    # batch; the packed model's integer path does not depend on the batch)
    pm = load_packed(tmp_path / "p")
    for d in rep.disagreements:
        one = compare(q, pm, xt[d["image"] : d["image"] + 1])
        flips = sum(one.free_running_flips.values())
        print(
            d,
            f"alone: free-running flips {flips}, sim top-1 {one.sim_pred[0]}, packed "
            f"top-1 {one.packed_pred[0]}",
        )
        assert one.acc_all_equal and one.teacher_logits_equal, d
        assert one.summary()["flip_max_tie_dist"] < TIE_TOL, d
        assert flips > 0 or one.sim_pred[0] != d["sim_top1"], d


@pytest.mark.slow
def test_efficientnet_lite0_parity(shared_data, tmp_path):
    """EfficientNet-Lite0 W4A4 (quick ranges on 8 calibration images), 2 real val images."""
    from pdquant_fast.data import open_image_source
    from pdquant_fast.models.registry import build_model

    model, info = build_model("efficientnet_lite0")
    cal = open_image_source(shared_data / "imagenet/eliSchwartz_samples_even", info.preprocess)
    val = open_image_source(shared_data / "imagenet/verisilicon_val1300", info.preprocess)
    q = quick_quantize(model, torch.stack([cal[i][0] for i in range(8)]), 4, 4)
    man = export_packed(q, tmp_path / "p", fp_model=model)
    assert man["sizes"]["ratio"] > 4
    kinds = [n["op"] for n in man["graph"]]
    assert kinds.count("layer_packed") == 48 and kinds.count("layer_float") == 2
    fused = [n for n in man["graph"] if n["op"] == "layer_packed" and n["residual"]]
    assert len(fused) == 9 and all(n["act"] == "none" for n in fused)  # MBConv skips
    rep = compare(q, load_packed(tmp_path / "p"), torch.stack([val[i][0] for i in range(2)]))
    assert rep.acc_all_equal and rep.teacher_logits_equal
    assert rep.summary()["flip_max_tie_dist"] < TIE_TOL
    assert rep.logits_max_abs_diff <= 0.10 * rep.logits_max_abs and rep.top1_agree == 2


def test_torchvision_resnet18_structure_and_parity(tmp_path):
    """torchvision ResNet-18 (random init, 32x32 inputs to keep it quick): the stem's max-pool
    runs on codes, each downsample conv is a packed op with float output feeding the fused
    conv2 + add + ReLU + quantizer; accumulators exact, teacher-forced logits bit-identical."""
    from _torchvision import import_torchvision_models

    tvm = import_torchvision_models()
    if tvm is None:
        pytest.skip("torchvision is not installed")
    torch.manual_seed(0)
    model = tvm.resnet18().eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q = quick_quantize(model, x, 4, 4)
    man = export_packed(q, tmp_path / "p", fp_model=model)
    g = {n["name"]: n for n in man["graph"]}
    assert g["maxpool"]["op"] == "glue" and g["maxpool"]["codes_act"] == "conv1.out"
    down = [n for n in man["graph"] if n.get("layer", "").endswith("downsample.0")]
    assert len(down) == 3 and all(n["op"] == "layer_packed" and not n["out_act"] for n in down)
    fused = [n for n in man["graph"] if n["op"] == "layer_packed" and n["residual"]]
    assert len(fused) == 8 and all(n["act"] == "relu" and n["out_act"] for n in fused)
    assert sum(n["residual"] in {d["name"] for d in down} for n in fused) == 3
    rep = compare(q, load_packed(tmp_path / "p"), x[:2])
    assert len(rep.layers) == 19 and rep.acc_all_equal and rep.teacher_logits_equal
    assert rep.summary()["flip_max_tie_dist"] < TIE_TOL


def test_runtime_uses_a_backend_prepack_once(small, monkeypatch):
    """A backend offering ``<op>_prepack_<backend>`` gets each weight prepacked once per device
    and receives the prepacked object in place of ``w``; results equal the reference path."""
    from types import SimpleNamespace

    from pdquant_fast.ops import backends

    _, _, out, _, x = small
    want = load_packed(out)(x[:2])
    calls = {"conv_prepack": 0, "linear_prepack": 0, "conv": 0}

    class Packed:
        def __init__(self, w):
            self.w = w

    def conv_prepack(w, groups, a_bits=8):
        calls["conv_prepack"] += 1
        assert a_bits == 4  # the runtime passes the input quantizer's bit-width when accepted
        return Packed(w)

    def conv(x, x_zp, w, *args):
        calls["conv"] += 1
        assert isinstance(w, Packed)
        return ref.qconv2d_reference(x, x_zp, w.w, *args)

    fake = SimpleNamespace(
        qconv2d_cpu=conv,
        qconv2d_prepack_cpu=conv_prepack,
        qlinear_cpu=lambda x, x_zp, w, *a: ref.qlinear_reference(x, x_zp, w.w, *a),
        qlinear_prepack_cpu=lambda w: calls.__setitem__("linear_prepack", 1) or Packed(w),
    )
    monkeypatch.delenv("PDQUANT_KERNELS", raising=False)  # the default order picks "cpp"
    monkeypatch.setattr(backends, "_extension", lambda: (fake, None))
    backends._choose.cache_clear()
    try:
        pm = load_packed(out)
        assert torch.equal(pm(x[:2]), want) and torch.equal(pm(x[:2]), want)
        assert calls["conv_prepack"] == 6 and calls["conv"] == 12  # 6 packed convs, 2 runs
    finally:
        monkeypatch.undo()
        backends._choose.cache_clear()


def test_runtime_calls_the_cpu_extension_directly(small, monkeypatch):
    """On CPU with the C++ backend, the graph's quantize / dequantize / max-pool nodes call the
    extension's functions straight (no torch.library dispatch): the same logits as through
    ``ops.*``, and the direct functions are the ones that ran."""
    from pdquant_fast.deploy import runtime
    from pdquant_fast.ops import backends

    if backends.choose("quantize_codes", "cpu")[0] != "cpp":
        pytest.skip("the C++ extension is not the chosen CPU backend")
    _, _, out, _, x = small
    pm = load_packed(out)
    want = pm(x[:4])
    assert set(pm._direct) == set(runtime.DIRECT_OPS)
    calls = {}

    def counted(op, fn):
        def f(*a):
            calls[op] = calls.get(op, 0) + 1
            return fn(*a)

        return f

    direct = runtime._direct_fns(x)
    monkeypatch.setattr(
        runtime, "_direct_fns", lambda x: {k: counted(k, f) for k, f in direct.items()}
    )
    assert torch.equal(pm(x[:4]), want)
    assert calls.get("quantize_codes", 0) >= 1 and calls.get("dequantize_codes", 0) >= 1
    monkeypatch.setattr(runtime, "_direct_fns", lambda x: {})  # the ops.* path
    assert torch.equal(pm(x[:4]), want)
    monkeypatch.undo()
    # a forced backend other than cpp: no direct calls
    monkeypatch.setenv("PDQUANT_KERNELS", "reference")
    assert runtime._direct_fns(x) == {}
    # the direct functions check their inputs themselves
    act = next(iter(pm.acts.values()))
    with pytest.raises(ValueError, match="float32"):
        direct["quantize_codes"](x.double(), act.delta_value, act.zp_int, act.bits, False)
    with pytest.raises(ValueError, match="uint8"):
        direct["dequantize_codes"](x, act.delta_value, act.zp_int)
