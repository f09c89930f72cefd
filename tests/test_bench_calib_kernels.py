"""The CPU-safe parts of ``benchmarks/bench_calib_kernels_gpu.py`` (the GPU numbers come from a
lent GPU): the bandwidth model, the baselines' semantics, a whole ``--device cpu --quick`` run
(Triton under the interpreter), and that a failing candidate becomes a row, not a crash."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_calib_kernels_gpu as bench  # noqa: E402
from pdquant_fast.ops import reference as R  # noqa: E402


def test_cases_and_bytes_model():
    names = [c.name for c in bench.CASES]
    assert len(set(names)) == len(names) and set(names) == set(bench.QUICK_SHAPES)
    by_name = {c.name: c for c in bench.CASES}
    l1 = by_name["fq_tensor_resnet18_l1"]
    assert l1.shape == (64, 64, 56, 56) and l1.keep_prob < 1 and not l1.per_channel
    assert by_name["fq_tensor_effnet_lite0"].shape == (64, 32, 112, 112)
    assert by_name["adaround_weight"].shape == (512, 512, 3, 3)
    # fake-quant: fwd 4N read + 4N write, bwd 8N read + 4N write
    assert l1.bytes_moved() == 20 * 64 * 64 * 56 * 56
    # AdaRound: fwd 8N read + 4N write, bwd 12N read + 4N write
    assert by_name["adaround_weight"].bytes_moved() == 28 * 512 * 512 * 9


def test_ste_baselines_compute_the_contract():
    """The eager baselines are the same math as the reference (so their timings are of the same
    work): forward and gradients match the reference with QDrop off. (Autograd's grad_x of the
    composite is ``(g * d) / d``, equal to ``g`` only to rounding: close, not bit-exact.)"""
    case = bench.Case("t", "fq", (3, 4, 5), per_channel=True, axis=1, bits=4)
    inp = bench.fq_inputs(case, "cpu")
    y, gx, gd = bench.fq_ste_step(case, inp, compiled=False)()
    args = (inp["delta"], inp["zp"], 4, 1, 1.0, None, None)
    assert torch.equal(y, R.fake_quant_act_reference(inp["x"], *args))
    gx_ref, gd_ref = R.fake_quant_act_backward_reference(inp["grad"], inp["x"], *args)
    torch.testing.assert_close(gx, gx_ref, rtol=2**-22, atol=0)
    torch.testing.assert_close(gd, gd_ref, rtol=1e-5, atol=1e-6)
    ada = bench.Case("a", "ada", (4, 3, 3, 3))
    ai = bench.ada_inputs(ada, "cpu")
    w_q, reg, ga = bench.ada_ste_step(ada, ai, compiled=False)()
    a = (ai["w_floor"], ai["alpha"], ai["delta"], ai["zp"], ada.bits, ai["beta"])
    w_q_ref, reg_ref = R.adaround_soft_reference(*a)
    assert torch.equal(w_q, w_q_ref)
    torch.testing.assert_close(reg, reg_ref, rtol=1e-5, atol=1e-5)
    ga_ref = R.adaround_soft_backward_reference(ai["grad_wq"], ai["grad_reg"], *a)
    torch.testing.assert_close(ga, ga_ref, rtol=1e-5, atol=1e-7)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / f"{bench.SUITE}.jsonl").read_text().splitlines()]


def test_quick_cpu_run(tmp_path):
    pytest.importorskip("triton")
    rc = bench.main(
        [
            "--device",
            "cpu",
            "--quick",
            "--no-compile",
            "--out",
            str(tmp_path),
            "--cases",
            "fq_tensor_resnet18_l1,fq_channel_weight",
        ]
    )
    assert rc == 0
    rows = _rows(tmp_path)
    got = {(r["case"], r["candidate"]): r for r in rows}
    for case in ("fq_tensor_resnet18_l1", "fq_channel_weight"):
        base = got[(case, "ste_eager")]
        assert base["status"] == "ok" and base["speedup"] == 1.0
        assert got[(case, "cuda")]["status"].startswith("unavailable")
        assert got[(case, "cuda+graph")]["status"].startswith("unavailable")
        assert got[(case, "reference")]["status"] == "ok"
        tri = got[(case, "triton")]
        assert tri["status"] == "ok (validated)", tri["status"]
        shape = tuple(int(s) for s in tri["shape"].split("x"))
        nbytes = 20 * torch.Size(shape).numel()
        assert tri["GB/s"] == pytest.approx(nbytes / (tri["ms"] / 1e3) / 1e9)
        assert tri["speedup"] == pytest.approx(base["ms"] / tri["ms"])
        assert {"device", "torch", "git_sha"} <= set(tri)
        # the case's settings travel with every row (the README tables show them)
        assert tri["kind"] == "fq" and tri["bits"] == 4
        assert tri["per_channel"] == (case == "fq_channel_weight")
        assert tri["keep_prob"] == (0.5 if case == "fq_tensor_resnet18_l1" else 1.0)


def test_failing_candidate_becomes_a_row(tmp_path, monkeypatch):
    pytest.importorskip("triton")

    def broken(case, inp, out):
        raise AssertionError("planted mismatch")

    monkeypatch.setattr(bench, "validate", broken)
    rc = bench.main(
        ["--device", "cpu", "--quick", "--no-compile", "--out", str(tmp_path)]
        + ["--cases", "adaround_weight"]
    )
    assert rc == 0
    got = {r["candidate"]: r for r in _rows(tmp_path)}
    assert got["triton"]["status"] == "error: AssertionError: planted mismatch"
    assert "ms" not in got["triton"]
    assert got["ste_eager"]["status"] == "ok" and got["reference"]["status"] == "ok"


def test_unknown_case_is_rejected():
    with pytest.raises(SystemExit, match="unknown cases"):
        bench.main(["--device", "cpu", "--cases", "nope"])
