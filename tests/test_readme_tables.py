"""The README speed tables (pdquant_fast.report, benchmarks/make_readme_tables.py) on small
synthetic benchmark rows: newest-run selection, the fused-candidate choice, ratios only within a
run, the vs-int8 ratio, several packed bit-widths, the reference-backend rule, the
calibration tables, and the GPU deployment tables (newest run per key, fastest layout, the
sweep summary, the goals)."""

import json
import runpy
from pathlib import Path

import pytest

from pdquant_fast import report

ROOT = Path(__file__).resolve().parents[1]


def _env(ts, device="EPYC (2 logical cores, 1 torch threads)", sha="abc", cmd="python bench.py"):
    return {
        "device": device,
        "torch": "2.x",
        "triton": "3.x",
        "python": "3.11",
        "git_sha": sha,
        "timestamp": f"2026-01-01T{ts}+00:00",
        "command": cmd,
    }


# ----------------------------------------------------------------------------- formatting


def test_numbers_have_three_significant_digits_and_ratios_a_times_sign():
    assert [report.fmt_num(v) for v in (0.65852, 9.996, 74.83, 3984.8, 16205.0)] == [
        "0.659",
        "10.0",
        "74.8",
        "3,980",
        "16,200",
    ]
    assert report.fmt_num(None) == "–" and report.fmt_num(float("nan")) == "–"
    assert [report.fmt_ratio(r) for r in (5.61, 55.46, 172.3, 0.4003, 1.0)] == [
        "5.6×",
        "55×",
        "172×",
        "0.40×",
        "1.0×",
    ]
    # truncated, never rounded up: 0.9987 is not "1.0×", 9.97 not "10×"
    assert [report.fmt_ratio(r) for r in (0.9987, 1.0056, 9.97, 0.987, 0.0579, 12.99)] == [
        "0.99×",
        "1.0×",
        "9.9×",
        "0.98×",
        "0.057×",
        "12×",
    ]
    assert report.fmt_ratio(None) == "–" and report.fmt_pct(1.0483) == "105%"


def test_latest_per_key_takes_the_newest_timestamp_not_the_file_order():
    rows = [
        {"k": 1, "v": "new", **_env("08:00:00")},
        {"k": 1, "v": "old", **_env("07:00:00")},  # appended later, measured earlier
        {"k": 2, "v": "first", **_env("07:00:00")},
        {"k": 2, "v": "second", **_env("07:00:00")},  # same run: the later row wins
    ]
    assert [r["v"] for r in report.latest_per_key(rows, lambda r: r["k"])] == ["new", "second"]
    runs = report.latest_run_rows(rows, lambda r: r["k"])
    assert [r["v"] for r in runs] == ["new", "first", "second"]


# ----------------------------------------------------------------------------- kernels


def _k(case, cand, ms, ts="05:00:00", **extra):
    row = {"case": case, "shape": "64x64x56x56", "candidate": cand, "status": "ok", **extra}
    if ms is not None:
        row.update({"ms": ms, "GB/s": 20.0 / ms, "hbm_frac": 20.0 / ms / 4800})
    row.update({"hbm_peak_GBs": 4800.0, "_file": "calib_kernels_gpu"})
    return {**row, **_env(ts, device="NVIDIA H200")}


def test_gpu_fused_candidate_is_the_fastest_validated_one_and_ratios_stay_in_the_run():
    rows = [
        _k("fq_tensor_x", "ste_compile", 0.40),
        _k("fq_tensor_x", "torch_learnable", 0.25),
        _k("fq_tensor_x", "reference", 4.0),
        _k("fq_tensor_x", "cuda", 0.90, status="ok (validated)"),
        _k("fq_tensor_x", "cuda+graph", 0.08, status="ok (validated)"),
        _k("fq_tensor_x", "triton+graph", None, status="error: grad differs"),
        _k("fq_tensor_x", "triton", 0.01, status="error: grad differs"),  # fast but wrong
        _k("adaround_w", "ste_compile", 0.80, ts="04:00:00"),  # an older run: no ratio
        _k("adaround_w", "cuda", 0.95),
    ]
    groups = report.kernel_cases(rows)
    assert list(groups) == [("calib_kernels_gpu", "NVIDIA H200")]
    fq, ada = groups[("calib_kernels_gpu", "NVIDIA H200")]
    assert fq.fused["candidate"] == "cuda+graph" and fq.eager["candidate"] == "cuda"
    assert fq.ratio("ste_compile") == pytest.approx(0.40 / 0.08)
    assert fq.ratio("torch_learnable") == pytest.approx(0.25 / 0.08)
    assert {n for n, _ in fq.failed} == {"triton", "triton+graph"}
    assert (fq.kind, fq.per_channel, fq.inferred) == ("fq", False, True)  # from the case name
    assert ada.fused["candidate"] == "cuda" and ada.eager is None
    assert ada.ms("ste_compile") == 0.80 and ada.ratio("ste_compile") is None
    md = report.kernel_markdown([fq, ada])
    line = next(x for x in md.splitlines() if x.startswith("| fq_tensor_x"))
    assert "| `cuda+graph` | 0.0800 | 0.900 (`cuda`) | 0.400 | 0.250 | 4.00 | 5.0× |" in line
    assert line.endswith("| 250 | 5.21% |")  # 20/0.08 GB/s of a 4,800 GB/s HBM peak
    assert "HBM peak 4,800 GB/s" in md and "`+graph`" in md
    assert "`triton` on fq_tensor_x (error: grad differs)" in md


def _c(case, cand, ms, ts="07:00:00", threads=2, **extra):
    row = {
        "case": case,
        "shape": "64x576" if case.startswith("init") else "64x16x32x32",
        "candidate": cand,
        "kind": "init" if case.startswith("init") else "fq",
        "bits": 8 if case.startswith("init") else 4,
        "per_channel": False,
        "keep_prob": 1.0 if case.startswith("init") else 0.5,
        "threads": threads,
        "status": "ok",
        "ms": ms,
        "_file": "calib_kernels_cpu",
        **extra,
    }
    return {**row, **_env(ts, device=f"EPYC (2 logical cores, {threads} torch threads)")}


def test_cpu_tables_use_the_newest_run_per_candidate_and_a_separate_init_table():
    rows = [
        _c("fq_a", "cpp", 0.5, ts="06:00:00", **{"GB/s": 40.0, "copy_frac": 1.3}),  # superseded
        _c("fq_a", "cpp", 1.0, **{"GB/s": 20.0, "copy_frac": 0.8}),
        _c("fq_a", "ste_compile", 5.0),
        _c("fq_a", "reference", 50.0),
        _c("fq_a", "cpp", 2.0, threads=1, **{"GB/s": 10.0, "copy_frac": 0.5}),
        _c("init_a", "cpp", 16.0, ms_per_row=0.25, rows=64),
        _c("init_a", "reference", 80.0, ms_per_row=40.0, rows=2),
    ]
    groups = report.kernel_cases(rows)
    assert [d for _, d in groups] == [
        "EPYC (2 logical cores, 1 torch threads)",
        "EPYC (2 logical cores, 2 torch threads)",
    ]
    fq, init = groups[("calib_kernels_cpu", "EPYC (2 logical cores, 2 torch threads)")]
    assert fq.fused["ms"] == 1.0 and fq.ratio("ste_compile") == 5.0
    assert fq.op == "fake-quant + QDrop 0.5" and not fq.inferred
    md = report.kernel_markdown([fq, init])
    assert "ours (`cpp`) ms" in md and "copy bandwidth measured in the same run, 25.0 GB/s" in md
    assert "| fq_a | 64x16x32x32 | fake-quant + QDrop 0.5 | 4 | no | 1.00 | 5.00 | – | 50.0 |" in md
    # whole layer: 64 rows x 0.25 ms = 0.016 s; reference 64 x 40 ms = 2.56 s; 160x per row
    assert "| init_a | 64x576 | 8 | 0.0160 | 2.56 | 2 | 160× |" in md


# ----------------------------------------------------------------------------- latency


def _lat(impl, backend, batch, ms, ts, bits="W4A4", threads=1, model="m", **extra):
    dev = f"EPYC (2 logical cores, {threads} torch threads)"
    row = {"model": model, "bits": bits, "batch": batch, "threads": threads, "impl": impl}
    row.update({"backend": backend, "median_ms": ms, "_file": "packed_latency", **extra})
    return {**row, **_env(ts, device=dev, sha=f"s{ts[:2]}")}


def test_latency_table_has_vs_int8_ratios_and_a_row_per_packed_bit_width():
    rows = [
        _lat("packed", "cpp", 1, 9.0, "06:00:00"),  # an older W4A4 run: superseded
        _lat("fp32", "torch", 1, 99.0, "06:00:00"),
    ]
    for bits, packed_ms in (("W4A4", 2.0), ("W2A4", 1.5), ("W2A2", 1.0)):
        for batch, scale in ((1, 1), (32, 20)):
            rows += [
                _lat("fp32", "torch", batch, 10.0 * scale, "07:00:00", bits=bits),
                _lat("int8_ao", "x86/fbgemm", batch, 4.0 * scale, "07:00:00", bits=bits),
                _lat("packed", "cpp", batch, packed_ms * scale, "07:00:00", bits=bits),
            ]
    tables, notes = report.latency_tables(rows)
    assert len(tables) == 1 and notes == []
    t = tables[0]
    assert t.formats == [
        "fp32",
        "int8_ao (x86/fbgemm)",
        "packed W4A4 (cpp)",
        "packed W2A4 (cpp)",
        "packed W2A2 (cpp)",
    ]
    assert t.batches == [1, 32]
    cell = t.cells[("packed W4A4 (cpp)", 1)]
    assert (cell.ms, cell.x_fp32, cell.x_int8) == (2.0, 5.0, 2.0)
    assert t.cells[("int8_ao (x86/fbgemm)", 32)].x_int8 is None
    md = report.latency_table_markdown(t)
    assert "| packed W2A2 (cpp) | 1.00 (10× fp32, 4.0× int8) | 20.0 (10× fp32, 4.0× int8) |" in md
    assert "| fp32 | 10.0 | 200 |" in md and "| int8_ao (x86/fbgemm) | 4.00 (2.5× fp32) |" in md
    assert {p.format for p in report.latency_table_points(tables)} == set(t.formats)


def test_latency_ratios_use_the_baselines_of_the_packed_rows_own_run():
    rows = [
        _lat("fp32", "torch", 1, 10.0, "07:00:00"),
        _lat("int8_ao", "x86/fbgemm", 1, 5.0, "07:00:00"),
        _lat("packed", "cpp", 1, 2.0, "07:00:00"),
        # a later run of W2A2 alone, under other load: its own baselines
        _lat("fp32", "torch", 1, 20.0, "08:00:00", bits="W2A2"),
        _lat("int8_ao", "x86/fbgemm", 1, 8.0, "08:00:00", bits="W2A2"),
        _lat("packed", "cpp", 1, 4.0, "08:00:00", bits="W2A2"),
    ]
    (t,), _ = report.latency_tables(rows)
    assert t.cells[("fp32", 1)].ms == 20.0  # the newest fp32 measurement is shown
    w4 = t.cells[("packed W4A4 (cpp)", 1)]
    w2 = t.cells[("packed W2A2 (cpp)", 1)]
    assert (w4.x_fp32, w4.x_int8) == (5.0, 2.5)  # vs 10 and 5 ms of its run, not 20 and 8
    assert (w2.x_fp32, w2.x_int8) == (5.0, 2.0)


def test_reference_backend_packed_rows_give_way_to_a_kernel_backend_on_the_same_cpu():
    rows = [
        _lat("fp32", "torch", 1, 160.0, "05:00:00", threads=2),
        _lat("packed", "reference", 1, 230.0, "05:00:00", threads=2),
        _lat("fp32", "torch", 1, 8.0, "07:00:00"),
        _lat("int8_ao", "x86/fbgemm", 1, 6.0, "07:00:00"),
        _lat("packed", "cpp", 1, 1.6, "07:00:00"),
        # another model with only the reference backend keeps it
        _lat("fp32", "torch", 1, 900.0, "05:00:00", threads=2, model="r18"),
        _lat("packed", "reference", 1, 2200.0, "05:00:00", threads=2, model="r18"),
    ]
    tables, notes = report.latency_tables(rows)
    assert [(t.model, t.device[-16:]) for t in tables] == [
        ("m", "1 torch threads)"),
        ("r18", "2 torch threads)"),
    ]
    assert tables[1].formats == ["fp32", "packed W4A4 (reference)"]
    assert "†" not in report.latency_table_markdown(tables[0])
    tables[0].cells[("packed W4A4 (cpp)", 1)].row["validated"] = False
    md = report.latency_table_markdown(tables[0])
    assert "| 1.60 (5.0× fp32, 3.7× int8) † |" in md and "not validated" in md
    assert any("1 `reference`-backend packed row" in n for n in notes)
    assert any(n.startswith("No table for m on EPYC (2 logical cores, 2 torch") for n in notes)


# ----------------------------------------------------------------------------- calibration


def test_calibration_tables_take_the_newest_run_per_command_and_device():
    step = {"model": "resnet20", "unit": 1, "_file": "calib_step"}
    rows = [
        {
            **step,
            "variant": "reference",
            "backend": "reference",
            "ms_per_iter": 900.0,
            **_env("06:00:00"),
        },
        {
            **step,
            "variant": "reference",
            "backend": "reference",
            "ms_per_iter": 600.0,
            "p10_ms": 500.0,
            "p90_ms": 700.0,
            **_env("07:00:00"),
        },
        {**step, "variant": "fused", "backend": "cpp", "ms_per_iter": 200.0, **_env("07:00:00")},
    ]
    (run,) = report.run_groups(rows)
    assert [r["ms_per_iter"] for r in run] == [600.0, 200.0]
    md = report.calib_step_markdown(run)  # no speedup field: computed within the run
    assert "| resnet20 | 1 | reference | reference | 600 (500–700) | 1.0× |" in md
    assert "| resnet20 | 1 | fused | cpp | 200 | 3.0× |" in md
    calib = {"model": "resnet20", "method": "pdquant", "bits": "W2A4", "iters": 60, "seed": 1}
    rows = [
        {
            **calib,
            "backend": "reference",
            "wall_s": 800.0,
            "opt_s": 400.0,
            "ms_per_iter": 640.0,
            "top1": 67.5,
            "speedup_wall": 1.0,
            "speedup_iters": 1.0,
            **_env("07:00:00"),
        },
        {
            **calib,
            "backend": "cpp",
            "wall_s": 600.0,
            "opt_s": 200.0,
            "ms_per_iter": 320.0,
            "top1": 68.1,
            "speedup_wall": 1.333,
            "speedup_iters": 2.0,
            "pred_agreement": "923/1000",
            **_env("07:00:00"),
        },
    ]
    md = report.calibration_markdown(report.run_groups(rows)[0])
    assert (
        "| resnet20 | pdquant | W2A4 | 60 | 1 | cpp | float32 | 600 | – | 200 | 320 | 68.1 | 1.3× "
        "| 2.0× | 923/1000 |" in md
    )
    # rows with the DC time and the PD tail's dtype (bench_calibration.py from 2026-11-26 on)
    rows[1].update(dc_s=30.0, pd_tail_dtype="bfloat16")
    md = report.calibration_markdown(report.run_groups(rows)[0])
    assert "| cpp | bfloat16 | 600 | 30.0 | 200 | 320 |" in md


# ----------------------------------------------------------------------------- GPU deployment


def _t(ms):
    return {"median_s": ms / 1e3, "p10_s": ms / 1e3, "p90_s": ms / 1e3, "n": -1}


def _d(section, ts="07:00:00", ours=None, fp16=None, **fields):
    """A bench_deploy_gpu.py row (NVIDIA H200, git sNN after the hour of ``ts``)."""
    row = {"section": section, **fields, "_file": "deploy_gpu"}
    if ours is not None:
        row["ours"] = _t(ours)
    if fp16 is not None:
        row["fp16"] = _t(fp16)
        row["speedup"] = fp16 / ours if ours else None
    return {**row, **_env(ts, device="NVIDIA H200", sha=f"s{ts[:2]}", cmd="python dep.py")}


def _wa16(layout, m, ours, fp16=0.2, ts="07:00:00", case="W4A16", n=64, **extra):
    extra.setdefault("config", f"cfg-{layout}")
    return _d("wa16", ts, ours, fp16, case=case, layout=layout, M=m, N=n, K=n, **extra)


def _sweep(config, ours, speedup, ts="07:00:00", layout="plain", m=1, case="W4A16", **extra):
    row = _d("wa16-sweep", ts, ours, case=case, layout=layout, M=m, N=64, K=64, config=config)
    return {**row, "speedup": speedup, **extra}


def test_deploy_rows_keep_the_newest_run_per_section_case_layout_shape_and_device():
    rows = [
        _wa16("plain", 1, 0.40, ts="06:00:00"),  # superseded by the 07:00 run of the same key
        _wa16("plain", 1, 0.10),
        _wa16("plain", 4, 0.30, ts="06:00:00"),  # no newer run of M=4: kept
        _wa16("plain", 1, 0.50, ts="06:00:00", n=128),  # a newer run skipped N=K=128 ...
        _d("wa16", "08:00:00", N=128, K=128, bits=4, error="skipped"),  # ... so this stands
        _d("wa16", "05:00:00", N=64, K=64, bits=4, error="skipped"),  # older than its timings
        _wa16("plain", 1, 0.10, ts="06:00:00", case="W2A16"),  # another case: kept
        _wa16("plain", 1, 0.30, ts="09:00:00", fp16=0.3) | {"device": "NVIDIA H100"},
        # a sweep: only the candidates of its newest run, one row per candidate
        _sweep("a", 0.30, 0.7, ts="06:00:00"),
        _sweep("b", 0.05, 4.0, ts="06:00:00"),  # fastest, but an older sweep run
        _sweep("a", 0.20, 1.0),
        _sweep("c", 0.25, 0.8),
    ]
    kept = report.deploy_latest(rows)
    got = [
        (r["section"], report.deploy_case(r), r.get("M"), r.get("N"), r["timestamp"][11:13])
        for r in kept
        if r["device"] == "NVIDIA H200"
    ]
    assert got == [
        ("wa16", "W4A16", 1, 64, "07"),
        ("wa16", "W4A16", 4, 64, "06"),
        ("wa16", "W4A16", None, 128, "08"),
        ("wa16", "W2A16", 1, 64, "06"),
        ("wa16-sweep", "W4A16", 1, 64, "07"),
        ("wa16-sweep", "W4A16", 1, 64, "07"),
    ]
    assert sum(r["device"] == "NVIDIA H100" for r in kept) == 1  # keyed by device too
    (s,) = report.deploy_sweep_summaries(kept)
    assert (s.best["config"], s.timed, s.failed) == ("a", 2, 0)


def test_wa16_table_shows_the_fastest_layout_per_shape_and_names_the_others():
    rows = [
        _wa16("plain", 1, 0.20, fp16=0.25),
        _wa16("ilv32x16", 1, 0.10, fp16=0.25, hbm_frac=0.5, fp16_hbm_frac=0.8),
        _wa16("ilv8x32", 1, 0.40, fp16=0.25),
        _wa16("plain", 4, 0.125, fp16=0.25),
    ]
    rows[0]["speedup"] = 99.0  # the table divides the timings of the row, not this field
    best = report.deploy_fastest(rows, "wa16")
    assert [(b.row["M"], b.row["layout"]) for b in best] == [(1, "ilv32x16"), (4, "plain")]
    assert [o["layout"] for o in best[0].others] == ["plain", "ilv8x32"]
    md = report.deploy_markdown(rows)
    assert (
        "| W4A16 | 1 | 64×64 | 0.100 | 0.250 | 2.50× | 50.0% | 80.0% | "
        "`ilv32x16` (plain 1.25×, ilv8x32 0.625×) | `cfg-ilv32x16` |" in md
    )
    assert "| W4A16 | 4 | 64×64 | 0.125 | 0.250 | 2.00× | – | – | `plain` | `cfg-plain` |" in md
    assert report.fmt_x(1.2549) == "1.25×" and report.fmt_x(0.94606) == "0.946×"
    assert report.fmt_x(None) == "–"


def test_sweep_is_one_line_per_case_and_batch_with_the_best_candidate_and_the_count():
    rows = [
        _wa16("plain", 1, 0.20, config="b"),
        _sweep("a", 0.30, 0.70),
        _sweep("b", 0.18, 1.25),
        _sweep("c", 0.25, 0.90, layout="ilv32x16"),
        _d("wa16-sweep", case="W4A16", layout="plain", M=1, N=64, K=64, config="d", error="x"),
        _sweep("a", 0.50, 0.50, m=4),
    ]
    s1, s4 = report.deploy_sweep_summaries(rows)
    assert (s1.best["config"], s1.timed, s1.failed, s1.layouts) == (
        "b",
        3,
        1,
        ["plain", "ilv32x16"],
    )
    assert s1.tuned is rows[0] and s4.tuned is None and s4.timed == 1
    md = report.deploy_markdown(rows)
    lines = [ln for ln in md.splitlines() if ln.startswith("* W4A16 M = ")]
    assert len(lines) == 2  # not a row per candidate
    assert lines[0].startswith("* W4A16 M = 1, 64×64: 1.25× (0.180 ms), layout `plain`, `b`;")
    assert "best of 3 timed over layouts plain, ilv32x16, 1 failed." in lines[0]
    assert "the same config: 1.00× (0.200 ms)" in lines[0]
    assert "4 candidate configurations timed (1 failed)" in md
    assert "`a`;" in lines[1] and "| W4A16 | 1 | 64×64 | 0.200" in md


def test_goals_are_met_only_when_every_timed_case_reaches_them():
    rows = [
        _wa16("plain", 1, 0.10, fp16=0.30),  # 3.0x
        _wa16("plain", 16, 0.10, fp16=0.27),  # 2.7x
        _wa16("plain", 64, 0.10, fp16=0.10),  # outside batch 1-16: not counted
        _wa16("plain", 1, 0.10, fp16=0.30, case="W2A16"),  # 3.0x < 3.5x
        _d("qmm", case="W4A4", M=4096, N=64, K=64, error="  x\n    acc = tl.dot(a, b)\n ^^^"),
        _d("conv", ours=0.5, fp16=1.0, case="c", batch=8, C=4, HW=8, O=4, k=3, groups=1),
    ]
    status = report.deploy_goal_status(rows)
    assert (
        status[0] == "W4A16: 2.70× to 3.00× over 2 timed shape(s), all at or above the 2.6× goal."
    )
    assert status[1].startswith("W2A16: 3.00× over 1 timed shape(s), 1 below the 3.5× goal: not")
    assert status[2] == (
        "W4A4 GEMM (`qmm`): no timed row; 1 case(s) not timed: not shown to reach 1.6×."
    )
    assert "2.00× over 1 timed shape(s), all at or above" in status[3]
    md = report.deploy_markdown(rows)
    assert "the recorded error ends in `acc = tl.dot(a, b)`" in md and "No timed row." in md
    assert "| c | 8×4×8×8 → 4, 3×3 | – | 0.500 | 1.00 | 2.00× |" in md


# ----------------------------------------------------------------------------- the generator


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "_file"}) + "\n" for r in rows)
    )


def test_generator_builds_every_speed_block_from_synthetic_rows(tmp_path):
    res = tmp_path / "benchmarks" / "results"
    _write(
        res / "calib_kernels_cpu.jsonl",
        [
            _c("fq_a", "cpp", 1.0, **{"GB/s": 20.0, "copy_frac": 0.8}),
            _c("fq_a", "ste_compile", 7.0),
        ],
    )
    _write(
        res / "gpu_run" / "calib_kernels_gpu.jsonl",
        [
            _k("fq_tensor_x", "ste_compile", 0.40),
            _k("fq_tensor_x", "triton", 0.20, status="ok (validated)"),
        ],
    )
    (res / "gpu_run" / "PROVENANCE.md").write_text("how\n")
    _write(
        res / "calib_step.jsonl",
        [
            {
                "model": "resnet20",
                "unit": 1,
                "variant": "fused",
                "backend": "cpp",
                "ms_per_iter": 123.0,
                "speedup_vs_reference": 2.5,
                **_env("07:00:00"),
            },
        ],
    )
    _write(
        res / "packed_latency.jsonl",
        [
            _lat("fp32", "torch", 1, 10.0, "07:00:00"),
            _lat("int8_ao", "x86/fbgemm", 1, 5.0, "07:00:00"),
            _lat("packed", "cpp", 1, 2.0, "07:00:00"),
        ],
    )
    _write(
        res / "deploy_gpu.jsonl",
        [
            _wa16("plain", 1, 0.20, fp16=0.25),
            _wa16("ilv32x16", 1, 0.10, fp16=0.25),
            _sweep("a", 0.30, 0.70),
            _sweep("b", 0.18, 1.25),
        ],
    )
    blocks = ("accuracy", "kernels", "calibration", "latency", "deploy_gpu")
    (tmp_path / "README.md").write_text(
        "".join(
            f"<!-- BEGIN GENERATED: {b} -->\nSTALE-PLACEHOLDER\n<!-- END GENERATED: {b} -->\n"
            for b in blocks
        )
    )
    mod = runpy.run_path(str(ROOT / "benchmarks" / "make_readme_tables.py"))
    text, images = mod["generate"](tmp_path, tmp_path / "img")
    assert "STALE-PLACEHOLDER" not in text
    assert "#### CPU: EPYC (2 logical cores, 2 torch threads)" in text and "| 7.0× |" in text
    assert "#### GPU: NVIDIA H200" in text and "| `triton` | 0.200 |" not in text  # one name
    assert "ours (`triton`) ms" in text and "| 2.0× |" in text
    assert "[benchmarks/results/gpu_run/PROVENANCE.md]" in text
    assert "| resnet20 | 1 | fused | cpp | 123 | 2.5× |" in text
    assert "No calibration" not in text and "`python bench.py`" in text
    assert "| packed W4A4 (cpp) | 2.00 (5.0× fp32, 2.5× int8) |" in text
    assert set(images) == {Path("docs/img/latency_vs_batch.png")}
    deploy = text[text.index("BEGIN GENERATED: deploy_gpu") :]
    assert "#### NVIDIA H200" in deploy and "Command: `python dep.py`" in deploy
    assert "| W4A16 | 1 | 64×64 | 0.100 | 0.250 | 2.50× |" in deploy
    assert "* W4A16 M = 1, 64×64: 1.25× (0.180 ms)" in deploy and "| `b` |" not in deploy
    assert "W4A16 ≥ 2.6× and W2A16 ≥ 3.5× cuBLAS fp16" in deploy
    assert "provenance note" not in deploy  # gpu_run's rows: another git SHA
    # the PROVENANCE.md of another folder with rows of the same device and git SHA
    _write(
        res / "gpu_run" / "calib_kernels_gpu.jsonl", [{**_k("fq", "cuda", 0.2), "git_sha": "s07"}]
    )
    (tmp_path / "README.md").write_text(text)
    text, _ = mod["generate"](tmp_path, tmp_path / "img")
    assert "provenance note: [benchmarks/results/gpu_run/PROVENANCE.md]" in text
    assert "(it does not name these rows)" in text
    # a README with one deploy_gpu marker but not the other is an error, not a skip
    (tmp_path / "README.md").write_text(text.replace("<!-- END GENERATED: deploy_gpu -->", ""))
    with pytest.raises(SystemExit, match="END GENERATED: deploy_gpu"):
        mod["generate"](tmp_path, tmp_path / "img")


def test_a_rerun_with_another_out_folder_supersedes_the_older_run():
    """Calibration-speed runs: the same command with a different ``--out`` is the same
    measurement, so only the newest run is shown; different settings stay separate."""
    base = {"_file": "calib_step", "device": "cpu0", "variant": "fused", "ms_per_iter": 1.0}
    rows = [
        {
            **base,
            "command": "python b.py --iters 15 --out /tmp/a",
            "timestamp": "2026-01-01T01:00:00+00:00",
            "git_sha": "a",
        },
        {
            **base,
            "command": "python b.py --iters 15",
            "timestamp": "2026-01-01T02:00:00+00:00",
            "git_sha": "b",
        },
        {
            **base,
            "command": "python b.py --iters 30",
            "timestamp": "2026-01-01T00:00:00+00:00",
            "git_sha": "c",
        },
    ]
    groups = report.run_groups(rows)
    assert sorted(g[0]["git_sha"] for g in groups) == ["b", "c"]
