"""Reconstruction engine: distribution correction, determinism, save/load, end-to-end accuracy."""

import copy

import pytest
import torch
from _accuracy_floor import check_accuracy_floor

from pdquant_fast import ops
from pdquant_fast.api import build_quantized_skeleton, load_quant_state, quant_state, quantize
from pdquant_fast.config import make_config
from pdquant_fast.engine import Calibrator, distribution_correction
from pdquant_fast.graph import UnitExecutor, build_unit_model
from pdquant_fast.models.registry import build_model


@pytest.fixture(scope="module")
def resnet20(shared_data):
    w = shared_data / "cifar10/models/akamaster_resnet/resnet20-12fca82f.th"
    model, _ = build_model("cifar_resnet20", w)
    return model


@pytest.fixture(scope="module")
def cifar(shared_data):
    from pdquant_fast.data import open_image_source

    folder = shared_data / "cifar10/convnetjs_png"
    train = open_image_source(folder, "cifar", split="train")
    test = open_image_source(folder, "cifar", split="test")
    xc = torch.stack([train[i][0] for i in range(256)])
    xt = torch.stack([test[i][0] for i in range(1000)])
    yt = torch.tensor([test[i][1] for i in range(1000)])
    return xc, xt, yt


def _unit_input(model, x, k):
    top, _ = build_unit_model(model)
    ex = UnitExecutor(top, tuple(x.shape[1:]))
    return top, ex.run_between(top, -1, x, k)


def test_distribution_correction_reduces_bn_mismatch_and_batching_is_exact(resnet20, cifar):
    xc = cifar[0][:64]
    top, x_fp = _unit_input(resnet20, xc, 1)
    unit = top.get_submodule("unit_1")
    cfg = make_config("pdquant", preset="resnet", dc_iters=30, dc_batch=64)
    x_c, before, after = distribution_correction(unit, x_fp, cfg)
    assert after < before
    assert not torch.equal(x_c, x_fp)
    # 32-image groups optimised one at a time (the official loop) give the same tensor
    cfg32 = make_config("pdquant", preset="resnet", dc_iters=30, dc_batch=32)
    x_c32, b32, a32 = distribution_correction(unit, x_fp, cfg32)
    assert torch.allclose(x_c, x_c32, rtol=0, atol=1e-5)
    assert abs(after - a32) < 1e-4 * abs(a32)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_distribution_correction_matches_the_straightforward_loop(resnet20, cifar, backend):
    """The engine's DC (channels-last, forward stopped at the last BN, BN statistics and the
    closeness gradient + Adam as ops) against the eager autograd loop it replaced
    (benchmarks/bench_dc.py keeps it): the same optimisation up to float rounding. Adam's first
    steps move each element by about +-lr whatever the gradient's size, so an element whose
    gradient is ~0 can move the other way under a rounding difference: compared are the BN
    losses and the mean difference, and the largest difference against 2 lr per step."""
    from benchmarks.bench_dc import plain_distribution_correction

    xc = cifar[0][:64]
    top, x_fp = _unit_input(resnet20, xc, 1)
    unit = top.get_submodule("unit_1").requires_grad_(False)
    cfg = make_config("pdquant", preset="resnet", dc_iters=10, dc_batch=64)
    x_p, b_p, a_p = plain_distribution_correction(unit, x_fp, cfg)
    ops.force(backend)
    try:
        x_c, b_c, a_c = distribution_correction(unit, x_fp, cfg)
    finally:
        ops.force(None)
    assert abs(b_c - b_p) <= 1e-5 * b_p and abs(a_c - a_p) <= 1e-4 * a_p
    diff = (x_c - x_p).abs()
    assert diff.mean() < 1e-5
    assert diff.max() <= 2 * cfg.dc_lr * cfg.dc_iters
    assert x_c.is_contiguous()  # stored back in the caller's layout


def test_distribution_correction_skipped_without_bn(resnet20, cifar):
    top, x_fp = _unit_input(resnet20, cifar[0][:32], 10)  # the classifier unit
    cfg = make_config("pdquant", preset="resnet", dc_iters=5)
    x_c, before, after = distribution_correction(top.get_submodule("unit_10"), x_fp, cfg)
    assert x_c is x_fp and before is None and after is None


def test_same_seed_bit_identical_and_state_roundtrip(resnet20, cifar):
    xc = cifar[0][:64]
    kw = dict(
        method="pdquant",
        w_bits=2,
        a_bits=4,
        preset="resnet",
        iters=3,
        dc_iters=2,
        log=None,
        progress=False,
    )
    q1, _ = quantize(resnet20, xc, **kw)
    q2, _ = quantize(resnet20, xc, **kw)
    s1, s2 = quant_state(q1), quant_state(q2)
    for part in ("layers", "acts"):
        for name in s1[part]:
            for key, v in s1[part][name].items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, s2[part][name][key]), (name, key)
    cfg = make_config("pdquant", preset="resnet", w_bits=2, a_bits=4)
    q3 = load_quant_state(build_quantized_skeleton(resnet20, cfg), copy.deepcopy(s1))
    x = cifar[1][:50]
    assert torch.equal(q3(x), q1(x))


def test_rtn_and_adaround_run_and_keep_input_model_unchanged(resnet20, cifar):
    before = copy.deepcopy(resnet20.state_dict())
    xc = cifar[0][:64]
    for method in ("rtn", "adaround"):
        q, rep = quantize(
            resnet20, xc, method=method, w_bits=4, a_bits=4, iters=2, log=None, progress=False
        )
        assert len(rep.units) == 11
    for k, v in resnet20.state_dict().items():
        assert torch.equal(v, before[k])


def test_end_to_end_pdquant_resnet20_accuracy_floor(resnet20, cifar):
    """PD-Quant W2A4 on ResNet-20 above the floors of tests/_accuracy_floor.py (PD-Quant >= 26%
    top-1 on the 1,000 lossless test images and >= RTN + 10 points; it gives 28.4%, RTN 15.8%)."""
    check_accuracy_floor(resnet20, *cifar, label="eager loop")


def test_pd_tail_with_folded_bn_is_the_same_function(resnet20, cifar):
    """The PD loss's FP remainder runs on a BN-folded copy: same logits within fp32 rounding."""
    x = cifar[0][:16]
    cal = Calibrator(resnet20, x, make_config("pdquant", preset="resnet"), log=None, progress=False)
    folded = cal._fp_tail()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        ref = cal.fp(x)
        for k in (1, 5):
            out_k = cal.fp.get_submodule(f"unit_{k}")(cal.fp_exec.run_between(cal.fp, -1, x, k))
            got = cal.fp_exec.run_from(folded, k, out_k)  # the tail takes unit k's output
            # fp32 re-association of conv*scale: a few ulp of the logit magnitude
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_bf16_pd_tail_runs_in_bf16_and_stays_close(resnet20, cifar):
    """``pd_tail_dtype="bfloat16"``: the tail's convolutions run under bf16 autocast (the
    logits differ from float32 by bf16 rounding, not by more), the logits come back float32 and
    the input gradient flows; an unknown dtype is refused with the allowed values."""
    from pdquant_fast.config import QuantConfigError

    x = cifar[0][:16]
    cfg32 = make_config("pdquant", preset="resnet")
    cfg16 = make_config("pdquant", preset="resnet", pd_tail_dtype="bfloat16")
    cal32 = Calibrator(resnet20, x, cfg32, log=None, progress=False)
    cal16 = Calibrator(resnet20, x, cfg16, log=None, progress=False)
    with torch.no_grad():
        o = cal32.fp.get_submodule("unit_1")(cal32.fp_exec.run_between(cal32.fp, -1, x, 1))
    o32, o16 = o.clone().requires_grad_(True), o.clone().requires_grad_(True)
    z32, z16 = cal32._run_tail(1, o32), cal16._run_tail(1, o16)
    assert z16.dtype == torch.float32
    err = (z16 - z32).abs().max() / z32.abs().max()
    assert 1e-4 < err < 0.05, err  # bf16 rounding is visible and small
    assert (z16.argmax(1) == z32.argmax(1)).float().mean() >= 0.9
    (g32,) = torch.autograd.grad(z32.logsumexp(1).sum(), o32)
    (g16,) = torch.autograd.grad(z16.logsumexp(1).sum(), o16)
    cos = torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
    assert g16.dtype == torch.float32 and cos > 0.98, cos
    with pytest.raises(QuantConfigError, match=r"pd_tail_dtype must be one of \['float32', "):
        make_config("pdquant", preset="resnet", pd_tail_dtype="float16")


def test_input_quantizer_calibrates_and_deploys_as_an_integer_stem(resnet20, cifar, tmp_path):
    """``input_a_bits=8``: an 8-bit quantizer named ``input`` on the image, first in unit 0,
    initialised and learned with unit 0 (PD-Quant W4A4, 3 iterations, real CIFAR images); the
    packed export then runs the stem as an integer ``layer_packed`` (in_act ``input``) with exact
    accumulators against the simulation; the state round-trips through the skeleton."""
    from pdquant_fast.deploy import export_packed, load_packed
    from pdquant_fast.deploy.parity import compare
    from pdquant_fast.qmodel import unit_act_quantizers

    xc, xt, _ = cifar
    kw = dict(method="pdquant", w_bits=4, a_bits=4, preset="resnet", iters=3, dc_iters=2)
    q, _ = quantize(resnet20, xc[:64], input_a_bits=8, log=None, progress=False, **kw)
    iq = unit_act_quantizers(q.get_submodule("unit_0"))[0]
    assert iq.name == "input" and iq.bits == 8 and iq.enabled
    assert torch.isfinite(iq.delta).all() and float(iq.delta) > 0
    # the image really is quantized: the model differs from one without the input quantizer
    x = xt[:32]
    s = quant_state(q)
    assert "unit_0.in_quant.aq" in s["acts"]
    cfg = make_config("pdquant", preset="resnet", w_bits=4, a_bits=4, input_a_bits=8)
    q2 = load_quant_state(build_quantized_skeleton(resnet20, cfg), copy.deepcopy(s))
    assert torch.equal(q2(x), q(x))
    iq.enabled = False
    y_float_input = q(x)
    iq.enabled = True
    assert not torch.equal(y_float_input, q(x))
    man = export_packed(
        q,
        tmp_path / "p",
        fp_model=resnet20,
        model_info={"name": "cifar_resnet20", "input_size": [3, 32, 32]},
        source={"w_bits": 4, "a_bits": 4, "input_a_bits": 8, "method": "pdquant"},
    )
    stem = next(n for n in man["graph"] if n.get("layer") == "conv1")
    assert stem["op"] == "layer_packed" and stem["in_act"] == "input"
    assert man["graph"][1]["op"] == "quantize" and man["graph"][1]["act"] == "input"
    pm = load_packed(tmp_path / "p")
    rep = compare(q, pm, x[:16])
    assert rep.acc_all_equal and rep.teacher_logits_equal


def test_static_step_resnet20_accuracy_floor(resnet20, cifar):
    """The reconstruction loop of ``cuda_graph=True`` (here run without capture: no GPU) above
    the same floors as the eager loop (tests/_accuracy_floor.py). Its random draws differ from
    the eager loop's, so its number does too (this CPU, 2026-11-27: 30.7%, eager 28.4%, RTN
    15.8%)."""
    check_accuracy_floor(resnet20, *cifar, cuda_graph=True, label="static step")
