"""pdquant sweep: grid parsing and errors, resumable runs (stub and real), aggregation, plots,
and the README table generator."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pdquant_fast import report
from pdquant_fast.cli import main as cli_main
from pdquant_fast.sweep import GridError, job_status, load_grid, parse_grid, run_sweep

ROOT = Path(__file__).resolve().parents[1]

# A stand-in for `python -m pdquant_fast.cli` (the PDQUANT_SWEEP_CLI hook): `calibrate` writes a
# result.json whose top-1 is a known function of the job, `eval` writes eval json; every call is
# appended to $STUB_CALLS. STUB_FAIL=<method> exits 3; STUB_HANG=<method> sleeps (writing its pid).
STUB = r"""
import json, os, sys, time
args = sys.argv[1:]
cmd = args[0]
def opt(name, default=None):
    return args[args.index(name) + 1] if name in args else default
with open(os.environ["STUB_CALLS"], "a") as f:
    f.write(cmd + " " + os.path.basename(opt("--out") if cmd == "calibrate" else args[1]) + "\n")
if cmd == "eval":
    with open(opt("--out-json"), "w") as f:
        json.dump({"source": "stub extra " + opt("--data"), "n": 4, "top1": 25.0,
                   "fp_top1": 50.0, "labels": [0, 1, 2, 3], "pred": [0, 0, 0, 0]}, f)
    sys.exit(0)
method, out = opt("--method"), opt("--out")
if method == os.environ.get("STUB_FAIL"):
    print("boom: stub failure for", method)
    sys.exit(3)
if method == os.environ.get("STUB_HANG"):
    with open(os.path.join(out, "stub.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)
w, a, seed = int(opt("--w-bits")), int(opt("--a-bits")), int(opt("--seed"))
top1 = 10.0 * w + a + (seed % 10) + (0.5 if method == "pdquant" else 0.0)
res = {
    "model": opt("--model"), "method": method, "w_bits": w, "a_bits": a,
    "iters": int(opt("--iters")), "seed": seed, "top1": top1, "fp_top1": 90.0,
    "calib_seconds": 1.0 + w, "calib_size": int(opt("--calib-size", "8")),
    "config": {"method": method, "preset": "resnet", "w_bits": w, "a_bits": a,
               "dc_iters": int(opt("--dc-iters", "500")), "iters": int(opt("--iters")),
               "seed": seed, "dist_correction": method == "pdquant"},
    "evals": {"x": {"source": "stub set", "n": 10, "top1": top1, "fp_top1": 90.0}},
    "threads": int(opt("--threads")), "finished": "2026-01-01T00:00:00+00:00",
}
with open(os.path.join(out, "result.json"), "w") as f:
    json.dump(res, f)
"""


@pytest.fixture
def stub(tmp_path, monkeypatch):
    """The stub CLI as a command prefix; calls() lists what it was asked to run."""
    script = tmp_path / "stub_cli.py"
    script.write_text(STUB)
    calls = tmp_path / "calls.log"
    calls.write_text("")
    monkeypatch.setenv("STUB_CALLS", str(calls))
    monkeypatch.delenv("STUB_FAIL", raising=False)
    monkeypatch.delenv("STUB_HANG", raising=False)

    class Stub:
        cmd = [sys.executable, str(script)]

        @staticmethod
        def calls():
            return calls.read_text().splitlines()

    return Stub


def _grid(**over):
    g = {
        "name": "t",
        "model": "cifar_resnet8",
        "data": "foolbox:cifar10",
        "calib_size": 8,
        "eval_data": "foolbox:cifar10",
        "methods": ["qdrop", "pdquant"],
        "bits": ["4/4"],
        "iters": 2,
        "seeds": [1005],
    }
    g.update(over)
    return {k: v for k, v in g.items() if v is not None}


def _quiet(_msg):
    pass


# ----------------------------------------------------------------------------- parsing


def test_grid_expands_every_axis_seed_by_seed():
    g = parse_grid(
        _grid(bits=["4/4", "W2A4", [2, 2]], seeds=[1, 2], dc_iters=3, set={"temperature": 2.0})
    )
    names = [j.name for j in g.jobs]
    assert len(names) == 2 * 3 * 2
    # the first seed's jobs all come before the second's; bits and methods in grid order
    assert names[:6] == [
        "qdrop_w4a4_s1",
        "pdquant_w4a4_s1",
        "qdrop_w2a4_s1",
        "pdquant_w2a4_s1",
        "qdrop_w2a2_s1",
        "pdquant_w2a2_s1",
    ]
    assert names[6:] == [n.replace("_s1", "_s2") for n in names[:6]]
    j = g.jobs[2]
    assert (j.method, j.w_bits, j.a_bits, j.seed, j.iters, j.dc_iters) == ("qdrop", 2, 4, 1, 2, 3)
    argv = j.calibrate_argv(Path("/o/qdrop_w2a4_s1"), threads=1)
    for flag, val in [("--method", "qdrop"), ("--w-bits", "2"), ("--a-bits", "4"), ("--seed", "1")]:
        assert argv[argv.index(flag) + 1] == val
    assert argv[argv.index("--set") + 1] == "temperature=2.0"
    assert argv[argv.index("--out") + 1] == "/o/qdrop_w2a4_s1"
    assert j.spec()["set"] == {"temperature": 2.0}


def test_grid_variants_and_multi_value_axes_name_the_folders():
    g = parse_grid(
        _grid(
            methods=["qdrop", "pdquant"],
            iters=[5, 10],
            variants={"lambr1": {"set": {"lamb_r": 1.0}, "methods": ["pdquant"]}},
        )
    )
    names = [j.name for j in g.jobs]
    assert names == [
        "qdrop_w4a4_s1005_it5",
        "pdquant_w4a4_s1005_it5",
        "pdquant-lambr1_w4a4_s1005_it5",
        "qdrop_w4a4_s1005_it10",
        "pdquant_w4a4_s1005_it10",
        "pdquant-lambr1_w4a4_s1005_it10",
    ]
    v = g.jobs[2]
    assert (v.label, v.variant, dict(v.settings)) == ("pdquant-lambr1", "lambr1", {"lamb_r": 1.0})
    only = parse_grid(
        _grid(
            methods=["pdquant"], variants={"t1": {"set": {"temperature": 1.0}}}, variants_only=True
        )
    )
    assert [j.name for j in only.jobs] == ["pdquant-t1_w4a4_s1005"]


def test_grid_paths_expand_variables_and_must_exist(tmp_path, monkeypatch):
    (tmp_path / "w.th").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    g = parse_grid(_grid(weights="${MY_DATA:-.}/w.th"), env={})
    assert g.jobs[0].weights == str(tmp_path / "w.th")
    g = parse_grid(_grid(weights="${MY_DATA}/w.th"), env={"MY_DATA": str(tmp_path)})
    assert g.jobs[0].weights == str(tmp_path / "w.th")
    with pytest.raises(GridError, match=r"'weights'.*MY_DATA.*not set"):
        parse_grid(_grid(weights="${MY_DATA}/w.th"), env={})
    with pytest.raises(GridError, match=r"key 'data': .*nope does not exist"):
        parse_grid(_grid(data="nope"), env={})


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"method": ["qdrop"]}, [r"unknown key 'method'", r"did you mean 'methods'", "allowed"]),
        ({"methods": ["qdrop", "fast"]}, [r"methods\[1\] is 'fast'", "pdquant"]),
        ({"bits": ["4-4"]}, [r"bits\[0\] is '4-4'", r"\"W/A\""]),
        ({"bits": ["16/4"]}, ["not a valid configuration", "weight bit-width", "supported"]),
        ({"iters": "ten"}, [r"key 'iters' must be an integer >= 1", "'ten'"]),
        ({"seeds": None}, [r"key 'seeds' is required"]),
        ({"set": {"not_a_setting": 1}}, ["not_a_setting", "valid settings"]),
        ({"set": [1, 2]}, [r"key 'set' must be a mapping"]),
        ({"model": "resnet50"}, [r"key 'model' is 'resnet50'", "efficientnet_lite0"]),
        ({"model": "cifar_resnet21"}, [r"key 'model'", "6n\\+2"]),
        ({"variants": {"v": {"sett": {}}}}, [r"variants.v: unknown key 'sett'"]),
        ({"extra_evals": {"e": {"split": "test"}}}, [r"extra_evals.e: key 'data'"]),
        ({"eval_size": 0}, [r"key 'eval_size' must be an integer >= 1"]),
        ({"models": [{"model": None}]}, [r"models\[0\]: key 'model' is required"]),
        ({"models": [{"tag": "a"}, "cifar_resnet8"]}, [r"models\[1\] must be a mapping"]),
        ({"methods": ["qdrop", "qdrop"]}, ["share the folder 'qdrop_w4a4_s1005'"]),
    ],
)
def test_malformed_grid_names_the_bad_key(change, expected):
    with pytest.raises(GridError) as ei:
        parse_grid(_grid(**change), source="bad.yaml")
    msg = str(ei.value)
    assert msg.startswith("grid bad.yaml")
    for pat in expected:
        assert re.search(pat, msg), (pat, msg)


def test_malformed_grid_file_via_cli_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: cifar_resnet8\nmethods: [qdrop]\nbits: ['4/4']\niters: 2\nseed: [1]\n")
    assert cli_main(["sweep", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: grid ") and "unknown key 'seed'" in err and "'seeds'" in err
    (tmp_path / "syntax.yaml").write_text("methods: [qdrop\n")
    assert cli_main(["sweep", str(tmp_path / "syntax.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(GridError, match="must hold a mapping"):
        load_grid(tmp_path / "list.yaml")


def test_committed_grids_parse():
    for path in sorted((ROOT / "benchmarks" / "grids").glob("*.yaml")):
        g = load_grid(path, check_paths=False)
        assert g.jobs and g.name == path.stem


def test_resnet20_table_grid_matches_the_committed_runs(shared_data, monkeypatch):
    """The grid reproduces benchmarks/results/resnet20_table: every job is recognised as done,
    and changing one value makes the committed folder an error naming the difference."""
    monkeypatch.setenv("PDQUANT_SHARED_DATA", str(shared_data))
    g = load_grid(ROOT / "benchmarks/grids/resnet20_table.yaml")
    out = ROOT / "benchmarks/results/resnet20_table"
    assert len(g.jobs) == 30
    assert {j.name: job_status(j, out / j.name) for j in g.jobs} == {j.name: "done" for j in g.jobs}
    raw = yaml.safe_load((ROOT / "benchmarks/grids/resnet20_table.yaml").read_text())
    raw["iters"] = 61
    g2 = parse_grid(raw, env={"PDQUANT_SHARED_DATA": str(shared_data)})
    with pytest.raises(GridError, match=r"different job.*iters: 60 there, 61 in this grid"):
        job_status(g2.jobs[0], out / g2.jobs[0].name)


# ----------------------------------------------------------------------------- running (stub)


def test_sweep_runs_jobs_then_skips_finished_ones(tmp_path, stub):
    g = parse_grid(_grid(seeds=[1, 2]))
    out = tmp_path / "sweep"
    o = run_sweep(g, out, workers=2, cli=stub.cmd, echo=_quiet)
    assert o.ok and sorted(o.ran) == sorted(j.name for j in g.jobs) and not o.skipped
    assert len(stub.calls()) == 4
    cfg = json.loads((out / "qdrop_w4a4_s1" / "config.json").read_text())
    assert cfg["job"] == g.jobs[0].spec() and cfg["command"][:2] == ["pdquant", "calibrate"]
    o2 = run_sweep(g, out, cli=stub.cmd, echo=_quiet)
    assert o2.ran == [] and len(o2.skipped) == 4
    assert len(stub.calls()) == 4  # nothing was run again
    rows = {r["label"]: r for r in report.summary_rows(report.load_runs([out]))}
    # stub: top1 = 10 w + a + seed % 10 (+0.5 for pdquant); seeds 1 and 2
    assert rows["qdrop"]["top1_mean"] == pytest.approx(45.5)
    assert (rows["pdquant"]["top1_min"], rows["pdquant"]["top1_max"]) == (45.5, 46.5)


def test_a_crashing_job_is_contained_and_rerun_next_time(tmp_path, stub, monkeypatch):
    g = parse_grid(_grid())
    out = tmp_path / "sweep"
    monkeypatch.setenv("STUB_FAIL", "qdrop")
    o = run_sweep(g, out, cli=stub.cmd, echo=_quiet)
    assert o.ran == ["pdquant_w4a4_s1005"] and list(o.failed) == ["qdrop_w4a4_s1005"]
    assert "exited 3" in o.failed["qdrop_w4a4_s1005"] and "boom" in o.failed["qdrop_w4a4_s1005"]
    summary = (out / "summary.md").read_text()
    assert (
        "Unfinished jobs (1 of 2)" in summary and "qdrop_w4a4_s1005: calibrate exited 3" in summary
    )
    monkeypatch.delenv("STUB_FAIL")
    o2 = run_sweep(g, out, cli=stub.cmd, echo=_quiet)
    assert o2.ran == ["qdrop_w4a4_s1005"] and o2.skipped == ["pdquant_w4a4_s1005"]
    assert stub.calls().count("calibrate pdquant_w4a4_s1005") == 1


def test_folder_of_a_different_job_is_an_error_naming_both(tmp_path, stub):
    out = tmp_path / "sweep"
    run_sweep(parse_grid(_grid(methods=["qdrop"])), out, cli=stub.cmd, echo=_quiet)
    with pytest.raises(GridError) as ei:
        run_sweep(parse_grid(_grid(methods=["qdrop"], iters=3)), out, cli=stub.cmd, echo=_quiet)
    msg = str(ei.value)
    assert "qdrop_w4a4_s1005" in msg and "iters: 2 there, 3 in this grid" in msg
    assert len(stub.calls()) == 1  # checked before anything ran


def test_legacy_result_without_config_is_checked_on_recorded_fields(tmp_path, stub):
    out = tmp_path / "sweep"
    g = parse_grid(_grid(methods=["qdrop"]))
    run_sweep(g, out, cli=stub.cmd, echo=_quiet, report=False)
    (out / "qdrop_w4a4_s1005" / "config.json").unlink()  # as in benchmarks/results
    assert job_status(g.jobs[0], out / "qdrop_w4a4_s1005") == "done"
    g_seed = parse_grid(_grid(methods=["qdrop"], seeds=[1005], set={"temperature": 3.0}))
    with pytest.raises(GridError, match=r"result.json is from a different job.*set.temperature"):
        job_status(g_seed.jobs[0], out / "qdrop_w4a4_s1005")


def test_extra_evals_run_after_calibration_and_resume_alone(tmp_path, stub):
    g = parse_grid(_grid(extra_evals={"more": {"data": "foolbox:cifar10", "methods": ["pdquant"]}}))
    out = tmp_path / "sweep"
    run_sweep(g, out, cli=stub.cmd, echo=_quiet)
    assert stub.calls() == [
        "calibrate qdrop_w4a4_s1005",
        "calibrate pdquant_w4a4_s1005",
        "eval pdquant_w4a4_s1005",
    ]
    (out / "pdquant_w4a4_s1005" / "eval_more.json").unlink()
    assert job_status(g.jobs[1], out / g.jobs[1].name) == "evals"
    run_sweep(g, out, cli=stub.cmd, echo=_quiet)
    assert stub.calls()[3:] == ["eval pdquant_w4a4_s1005"]
    assert "foolbox samples 4" in report.load_run(out / "pdquant_w4a4_s1005").evals


def test_dry_run_lists_jobs_and_runs_nothing(tmp_path, stub):
    lines = []
    o = run_sweep(
        parse_grid(_grid()), tmp_path / "s", dry_run=True, cli=stub.cmd, echo=lines.append
    )
    assert o.ran == [] and stub.calls() == [] and not (tmp_path / "s").exists()
    assert any(
        ln.startswith("  [todo] qdrop_w4a4_s1005: pdquant calibrate --model") for ln in lines
    )


def test_killed_sweep_stops_its_jobs_and_the_rerun_finishes_only_the_rest(tmp_path, stub):
    """Kill `pdquant sweep` (SIGTERM) while its second job runs: the job's process goes too,
    and the next sweep runs only that job."""
    grid = tmp_path / "g.yaml"
    grid.write_text(json.dumps(_grid()))  # JSON is YAML
    out = tmp_path / "sweep"
    env = dict(os.environ, PDQUANT_SWEEP_CLI=" ".join(stub.cmd), STUB_HANG="pdquant")
    cmd = [sys.executable, "-m", "pdquant_fast.cli", "sweep", str(grid), "--out", str(out)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid_file = out / "pdquant_w4a4_s1005" / "stub.pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid_file.exists(), p.communicate(timeout=30)[0]
    job_pid = int(pid_file.read_text())
    p.send_signal(signal.SIGTERM)
    log = p.communicate(timeout=30)[0]
    assert p.returncode == 130, log
    assert "1 running job(s) stopped" in log
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(job_pid, 0)  # the hung job was terminated with the sweep
    assert (out / "qdrop_w4a4_s1005" / "result.json").exists()
    assert not (out / "pdquant_w4a4_s1005" / "result.json").exists()
    env.pop("STUB_HANG")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 jobs, 1 already finished, 1 to run" in r.stdout
    assert stub.calls() == [
        "calibrate qdrop_w4a4_s1005",
        "calibrate pdquant_w4a4_s1005",
        "calibrate pdquant_w4a4_s1005",
    ]


# ----------------------------------------------------------------------------- aggregation


def _write_run(folder: Path, method, w, a, seed, top1, preds=None, secs=10.0, label=None):
    folder.mkdir(parents=True)
    cfg = {"method": method, "preset": "resnet", "w_bits": w, "a_bits": a, "dc_iters": 10}
    cfg["dist_correction"] = method == "pdquant"
    res = {
        "model": "cifar_resnet20",
        "method": method,
        "w_bits": w,
        "a_bits": a,
        "iters": 60,
        "seed": seed,
        "top1": top1,
        "fp_top1": 91.5,
        "calib_seconds": secs,
        "calib_size": 1024,
        "config": cfg,
        "evals": {
            "d": {"source": "cifar10_batch_50.png", "n": 1000, "top1": top1, "fp_top1": 91.5}
        },
        "threads": 1,
        "finished": "2026-01-02T00:00:00+00:00",
    }
    (folder / "result.json").write_text(json.dumps(res))
    if preds is not None:
        (folder / "predictions.json").write_text(json.dumps({"d": preds}))
    if label is not None:
        (folder / "config.json").write_text(json.dumps({"job": {"label": label}}))


def test_seed_mean_spread_and_paired_test_on_synthetic_results(tmp_path):
    vals = {("qdrop", 1): 70.0, ("qdrop", 2): 72.5, ("qdrop", 3): 74.0}
    vals |= {("pdquant", 1): 69.0, ("pdquant", 2): 69.0, ("pdquant", 3): 71.0}
    labels = [0] * 10
    for (m, seed), top1 in vals.items():
        # seed 1: qdrop right on images 0..7, pdquant on 5..9; seeds 2, 3: both right everywhere
        pred = [0] * 10
        if seed == 1 and m == "qdrop":
            pred = [0] * 8 + [1, 1]
        if seed == 1 and m == "pdquant":
            pred = [1] * 5 + [0] * 5
        _write_run(
            tmp_path / f"{m}_w2a4_s{seed}",
            m,
            2,
            4,
            seed,
            top1,
            {"labels": labels, "pred": pred},
            secs=seed * 10.0,
        )
    _write_run(tmp_path / "x_w2a4_s1", "pdquant", 2, 4, 1, 50.0, label="pdquant-lambr1")
    runs = report.load_runs([tmp_path])
    assert {r.label for r in runs} == {"qdrop", "pdquant", "pdquant-lambr1"}
    rows = {r["label"]: r for r in report.summary_rows(runs)}
    q = rows["qdrop"]
    assert q["n_seeds"] == 3 and q["seeds"] == "1 2 3"
    assert q["top1_mean"] == pytest.approx((70 + 72.5 + 74) / 3, abs=1e-4)
    assert (q["top1_min"], q["top1_max"]) == (70.0, 74.0)
    mean = (70 + 72.5 + 74) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in (70, 72.5, 74)) / 2)
    assert q["top1_std"] == pytest.approx(std, abs=1e-4)
    assert q["calib_s_mean"] == 20.0 and q["eval_set"] == "CIFAR-10 test 1,000 (lossless)"
    assert rows["pdquant-lambr1"]["n_seeds"] == 1 and rows["pdquant-lambr1"]["top1_std"] == ""
    md = report.accuracy_markdown(runs, "T", "qdrop", ["pdquant"], "cmd")
    assert "| qdrop | 2/4 | 3 | 72.17 (70.00..74.00) |" in md
    assert "| pdquant-lambr1 | 2/4 | 1 | 50.00 |" in md
    # only pdquant right: images 8, 9 (b=2); only qdrop right: 0..4 (c=5); exact two-sided
    # McNemar p = 2 * P(X <= 2), X ~ Binomial(7, 1/2) = 2 * (1 + 7 + 21) / 128
    assert report.mcnemar_p(2, 5) == pytest.approx(58 / 128)
    assert "| 2/4 | CIFAR-10 test 1,000 (lossless) | 3 | 2 | 5 | -3 | 0.453 |" in md
    pivot = report.accuracy_pivot_markdown(runs)
    assert "| FP32 | 91.50 |" in pivot and "| qdrop | 72.17 (70.00..74.00) |" in pivot


def test_mcnemar_exact_values():
    assert report.mcnemar_p(0, 0) == 1.0
    assert report.mcnemar_p(0, 10) == pytest.approx(2 / 2**10)
    assert report.mcnemar_p(5, 1) == pytest.approx(2 * (1 + 6) / 64)
    assert report.mcnemar_p(3, 3) == 1.0


def test_report_writes_csv_markdown_and_plots(tmp_path, stub):
    lat = tmp_path / "packed_latency.jsonl"
    rows = [
        {
            "model": "cifar_resnet20",
            "format": f,
            "batch": b,
            "timing": {"median_s": t * b, "p10_s": t * b * 0.9, "p90_s": t * b * 1.1, "n": 5},
            "device": "cpu0",
            "torch": "x",
            "git_sha": "abc",
            "timestamp": "2026-01-01T00:00:00+00:00",
        }
        for f, t in (("fp32", 1e-3), ("packed W4A4", 4e-4))
        for b in (1, 8, 64)
    ]
    lat.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    g = parse_grid(_grid(bits=["4/4", "2/4"], seeds=[1, 2], latency_results=str(lat)))
    out = tmp_path / "sweep"
    o = run_sweep(g, out, cli=stub.cmd, echo=_quiet)
    names = {p.name for p in o.report_files}
    assert {"summary.csv", "runs.csv", "summary.md"} <= names
    pngs = [p for p in o.report_files if p.suffix == ".png"]
    assert {p.name for p in pngs} == {
        "accuracy_vs_bits_cifar_resnet8.png",
        "calib_time_cifar_resnet8.png",
        "latency_vs_batch.png",
    }
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    csv_text = (out / "summary.csv").read_text().splitlines()
    assert csv_text[0].startswith("model,label,method,w_bits,a_bits,iters")
    assert len(csv_text) == 1 + 4  # 2 methods x 2 bits, one eval set
    md = (out / "summary.md").read_text()
    # the README's latency tables (report.latency_tables): same rule, ratios in the same run
    assert "## Latency" in md and report.LATENCY_RULE in md
    assert "| packed W4A4 | 0.400 (2.5× fp32) | 3.20 (2.5× fp32) | 25.6 (2.5× fp32) |" in md
    # same results -> same plot bytes (no timestamp in the PNG)
    before = {p: p.read_bytes() for p in pngs}
    run_sweep(g, out, cli=stub.cmd, echo=_quiet)
    assert all(p.read_bytes() == b for p, b in before.items())


def test_latency_rows_in_the_packed_latency_schema():
    """Rows as benchmarks/bench_packed_latency.py records them (impl/bits/backend, *_ms)."""
    env = {"device": "EPYC", "torch": "t", "git_sha": "s", "timestamp": "2026-01-01T00:00:00"}
    common = {"model": "cifar_resnet20", "bits": "W4A4", "batch": 32, "threads": 2, **env}
    rows = [
        {
            **common,
            "impl": "packed",
            "backend": "cpp",
            "median_ms": 2.0,
            "p10_ms": 1.5,
            "p90_ms": 2.5,
        },
        {
            **common,
            "impl": "fp32",
            "backend": "torch",
            "median_ms": 5.0,
            "p10_ms": 4.0,
            "p90_ms": 6.0,
        },
        {**common, "impl": "int8_ao", "backend": "x86/fbgemm", "median_ms": 4.0},
        {**common, "batch": 64, "impl": "packed", "backend": "cpp"},  # no timing: skipped
    ]
    points, skipped = report.latency_points(rows)
    assert skipped == 1
    by = {p.format: p for p in points}
    assert set(by) == {"packed W4A4 (cpp)", "fp32", "int8_ao (x86/fbgemm)"}
    packed = by["packed W4A4 (cpp)"]
    assert (packed.median_s, packed.p10_s, packed.p90_s) == (2e-3, 1.5e-3, 2.5e-3)
    assert packed.device == "EPYC, 2 thread(s)" and by["int8_ao (x86/fbgemm)"].p10_s is None
    md = report.latency_markdown(points)
    assert "speed-up over fp32" in md and "| packed W4A4 (cpp) | 2 (x2.50) |" in md


def test_bench_rows_keep_the_latest_measurement_per_parameters():
    rows = [
        {"op": "fq", "n": 4097, "t": {"median_s": 1.0}, "device": "d", "_file": "k"},
        {"op": "fq", "n": 4097, "t": {"median_s": 2.0}, "device": "d", "_file": "k"},
        {"op": "fq", "n": 7, "t": {"median_s": 3.0}, "device": "d", "_file": "k"},
    ]
    latest = report.latest_rows(rows)
    assert [r["t"]["median_s"] for r in latest] == [2.0, 3.0]
    table = report.bench_table_markdown(latest)
    assert table.splitlines()[0] == "| op | n | t |" and "| fq | 4097 | 2000 ms |" in table


# ----------------------------------------------------------------------------- README generator


def test_readme_generator_is_idempotent_and_needs_its_markers(tmp_path):
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    (root / "benchmarks" / "results").symlink_to(ROOT / "benchmarks" / "results")
    names = ("accuracy", "kernels", "calibration", "latency")
    blocks = "".join(
        f"<!-- BEGIN GENERATED: {n} -->\nSTALE-PLACEHOLDER\n<!-- END GENERATED: {n} -->\n"
        for n in names
    )
    (root / "README.md").write_text("# Title\n\nprose stays\n\n" + blocks + "tail\n")
    script = [
        sys.executable,
        str(ROOT / "benchmarks" / "make_readme_tables.py"),
        "--root",
        str(root),
    ]
    r = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = (root / "README.md").read_text()
    assert text.startswith("# Title\n\nprose stays\n\n") and text.endswith("tail\n")
    assert "STALE-PLACEHOLDER" not in text and "| pdquant | 91.15 (90.80..91.50) |" in text
    assert "pdquant sweep benchmarks/grids/resnet20_table.yaml" in text
    assert (root / "docs/img/resnet20_table_accuracy_vs_bits.png").exists()
    r2 = subprocess.run([*script, "--check"], capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0 and "current" in r2.stdout
    (root / "README.md").write_text(text.replace("<!-- END GENERATED: latency -->\n", ""))
    r3 = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert r3.returncode != 0 and "END GENERATED: latency" in r3.stderr


# ----------------------------------------------------------------------------- real runs


def _has_foolbox():
    from pdquant_fast.data import DataError, foolbox_samples_dir

    try:
        foolbox_samples_dir("cifar10")
        return True
    except DataError:
        return False


@pytest.mark.slow  # ~30 s on an idle 2-core CPU: three real calibrate subprocesses
@pytest.mark.skipif(not _has_foolbox(), reason="foolbox sample images missing")
def test_real_sweep_killed_midway_finishes_only_the_missing_job(tmp_path):
    grid = tmp_path / "tiny.yaml"
    grid.write_text(
        json.dumps(
            _grid(
                methods=["rtn", "qdrop"],
                calib_size=8,
                eval_offset=8,
                eval_size=8,
                threads=1,
            )
        )
    )
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "pdquant_fast.cli", "sweep", str(grid), "--out", str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = out / "rtn_w4a4_s1005" / "result.json"
    second_cfg = out / "qdrop_w4a4_s1005" / "config.json"
    deadline = time.monotonic() + 300
    while not second_cfg.exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert first.exists() and second_cfg.exists(), p.communicate()[0]
    p.send_signal(signal.SIGTERM)
    log = p.communicate(timeout=60)[0]
    assert p.returncode == 130, log
    assert not (out / "qdrop_w4a4_s1005" / "result.json").exists()
    mtime = first.stat().st_mtime_ns
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 jobs, 1 already finished, 1 to run" in r.stdout
    assert first.stat().st_mtime_ns == mtime
    res = json.loads((out / "qdrop_w4a4_s1005" / "result.json").read_text())
    assert (res["method"], res["iters"], res["calib_size"]) == ("qdrop", 2, 8)
    assert (out / "summary.md").exists() and (
        out / "plots" / "calib_time_cifar_resnet8.png"
    ).exists()


def test_committed_readme_tables_match_the_committed_results(tmp_path):
    """README.md's generated blocks are what make_readme_tables.py makes from the committed
    results (text only: PNG bytes depend on the matplotlib/freetype build)."""
    import runpy

    mod = runpy.run_path(str(ROOT / "benchmarks" / "make_readme_tables.py"))
    text, _ = mod["generate"](ROOT, tmp_path)
    assert text == (ROOT / "README.md").read_text(), (
        "README.md is stale: run python benchmarks/make_readme_tables.py"
    )
