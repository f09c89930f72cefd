"""``benchmarks/bench_calib_kernels_cpu.py``: a whole ``--quick`` run (tiny shapes) writes one
validated row per case and candidate, and a candidate that fails validation becomes a row with its
error instead of stopping the run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_calib_kernels_cpu as bench  # noqa: E402

_C = pytest.importorskip("pdquant_fast._C", reason="C++ extension pdquant_fast._C not built")
if not all(
    hasattr(_C, f) for f in ("fake_quant_act_cpu", "adaround_soft_cpu", "mse_search_2d_cpu")
):
    pytest.skip("pdquant_fast._C lacks the calibration kernels", allow_module_level=True)


def test_bytes_model():
    by_name = {c.name: c for c in bench.CASES}
    assert by_name["fq_r18_l1"].shape == (32, 64, 56, 56)  # the 6.4M-element anchor
    assert by_name["fq_r18_l1"].bytes_moved() == 20 * 32 * 64 * 56 * 56
    assert by_name["ada_r18"].bytes_moved() == 28 * 512 * 512 * 9
    assert by_name["init_lite0_fc_8b"].bytes_moved() == 0


def test_quick_run_writes_validated_rows(tmp_path):
    old = torch.get_num_threads()
    try:
        rows = bench.main(["--quick", "--no-compile", "--repeat", "3", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(old)
    assert rows and all(r["status"].startswith("ok") for r in rows), [
        (r["case"], r["candidate"], r["status"]) for r in rows if not r["status"].startswith("ok")
    ]
    got = {(r["case"], r["candidate"]) for r in rows}
    for case in bench.CASES:
        assert (case.name, "cpp") in got and (case.name, "reference") in got
    written = [json.loads(line) for line in (tmp_path / "calib_kernels_cpu.jsonl").open()]
    assert len(written) == len(rows) and all("git_sha" in r and "loadavg_1m" in r for r in written)
    fq = next(r for r in rows if r["case"] == "fq_r18_l1" and r["candidate"] == "cpp")
    assert fq["ms"] > 0 and fq["GB/s"] > 0 and fq["x_learnable"] > 0


def test_failing_candidate_becomes_a_row(monkeypatch):
    case = bench.Case("t", "fq", (3, 4, 5), keep_prob=0.5)
    real = bench.candidates_for

    def broken(c, compile_):
        cands = real(c, compile_)
        good = cands["cpp"]

        def wrong():
            y, gx, gd = good()
            return y + 1, gx, gd

        cands["cpp"] = wrong
        return cands

    monkeypatch.setattr(bench, "candidates_for", broken)
    rows = bench.run_elementwise(case, repeat=2, compile_=False)
    cpp = next(r for r in rows if r["candidate"] == "cpp")
    assert cpp["status"].startswith("AssertionError") and "ms" not in cpp
    assert all(r["status"] == "ok" for r in rows if r["candidate"] != "cpp")
