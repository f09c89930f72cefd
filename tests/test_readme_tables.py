"""The README speed tables (pdquant_fast.report, benchmarks/make_readme_tables.py) on small
synthetic benchmark rows: newest-run selection, the fused-candidate choice, ratios only within a
run, the vs-int8 ratio, several packed bit-widths, the reference-backend rule, and the
calibration tables."""

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
    assert "| 1.60 (5.0× fp32, 3.8× int8) † |" in md and "not validated" in md
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
        "| resnet20 | pdquant | W2A4 | 60 | 1 | cpp | 600 | 200 | 320 | 68.1 | 1.3× | 2.0× |"
        " 923/1000 |" in md
    )


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
    blocks = ("accuracy", "kernels", "calibration", "latency")
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
