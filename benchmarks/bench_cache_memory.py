"""Peak memory of a calibration in each cache mode (``--cache device|host|disk|auto``).

Runs ``pdquant calibrate`` once per mode in a child process and records:

* ``peak_rss_gib``: the child's peak resident set (``ru_maxrss`` from ``wait4``), which counts
  anonymous memory and resident file-backed pages (a disk cache's mapped pages count while they
  are resident, though the kernel can drop them under pressure);
* ``peak_anon_gib``: the largest ``RssAnon`` seen when sampling ``/proc/<pid>/status`` every
  0.1 s: the memory that cannot be reclaimed without swap (a sampled peak: may miss spikes
  shorter than the interval);
* ``peak_file_gib``: the largest sampled ``RssFile`` (libraries, mapped cache files);
* the wall time and the mode the run reports in ``result.json``.

Default job: EfficientNet-Lite0, 1,024 calibration images from
``../shared/data/imagenet/verisilicon_val1300`` (1,300 distinct ILSVRC2012 val images),
PD-Quant W2A4 with a short budget (``--iters 2 --dc-iters 1``; first/last layers at 2 bits so
that the 8-bit weight search does not dominate the time). Memory depends on the image count,
the unit shapes and ``dc_batch`` (256 images per DC step), not on the iteration count.

    python benchmarks/bench_cache_memory.py                      # all modes, 1,024 images
    python benchmarks/bench_cache_memory.py --modes disk --calib-size 256
    python benchmarks/bench_cache_memory.py --stop-after 4 --set dc_batch=32   # first 4 units

``--stop-after K`` SIGKILLs each run once K units are checkpointed (through the checkpoint test
hook): for EfficientNet-Lite0 the 112x112 and 56x56 tensors, hence the peak, are in units 0-3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import record  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenet" / "verisilicon_val1300"


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _phase(log_path: Path) -> str:
    """Which unit the run is in: the unit after the last finished one in its log."""
    done = re.findall(r"^\[unit (\d+)/(\d+)\]", log_path.read_text(), flags=re.M)
    if not done:
        return "before unit 1 (init, caching)"
    k, n = done[-1]
    return f"unit {int(k) + 1}/{n}" if int(k) < int(n) else "after the last unit"


def run_mode(mode: str, args, out_root: Path) -> dict:
    out = out_root / mode
    argv = [
        sys.executable,
        "-m",
        "pdquant_fast.cli",
        "calibrate",
        "--model",
        args.model,
        "--data",
        str(args.data),
        "--calib-size",
        str(args.calib_size),
        "--method",
        "pdquant",
        "--w-bits",
        "2",
        "--a-bits",
        "4",
        "--iters",
        str(args.iters),
        "--dc-iters",
        str(args.dc_iters),
        "--set",
        "first_layer_w_bits=null",
        "--set",
        "last_layer_w_bits=null",
        "--cache",
        mode,
        "--no-progress",
        "--out",
        str(out),
    ]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    for kv in args.set or []:
        argv += ["--set", kv]
    env = dict(os.environ)
    if args.stop_after:  # SIGKILL right after this many units are checkpointed
        env["PDQUANT_TEST_KILL_AT"] = f"saved:{args.stop_after}"
    log_path = out_root / f"{mode}.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        peak_anon = peak_file = 0
        peak_during = ""
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                break
            s = _status_kb(p.pid)
            if s.get("RssAnon", 0) > peak_anon:
                peak_anon = s["RssAnon"]
                peak_during = _phase(log_path)
            peak_file = max(peak_file, s.get("RssFile", 0))
            time.sleep(0.1)
    wall = time.perf_counter() - t0
    text = log_path.read_text()
    stopped = args.stop_after and p.returncode == -9
    if p.returncode != 0 and not stopped:
        raise SystemExit(f"{mode}: pdquant calibrate failed ({p.returncode}); see {log_path}")
    if stopped:
        man = json.loads((out / "checkpoint" / "manifest.json").read_text())
        result = {"cache_mode": mode, "calib_seconds": float("nan"), "threads": args.threads}
        m_mode = re.search(r"cache mode (\w+)", text)
        if m_mode:
            result["cache_mode"] = m_mode.group(1)
        units = f"{man['units_done']}/{man['units_total']}"
    else:
        result = json.loads((out / "result.json").read_text())
        units = "all"
    m = re.search(r"cache mode (\w+) \(auto: ([0-9.]+) GiB needed", text)
    gib = 1 << 20  # kB per GiB
    return {
        "mode": mode,
        "resolved_mode": result["cache_mode"],
        "auto_estimate_gib": float(m.group(2)) if m else None,
        "model": args.model,
        "calib_size": args.calib_size,
        "units": units,
        "set": " ".join(args.set or []),
        "peak_rss_gib": round(ru.ru_maxrss / gib, 3),
        "peak_anon_gib": round(peak_anon / gib, 3),
        "peak_file_gib": round(peak_file / gib, 3),
        "peak_anon_during": peak_during,
        "wall_s": round(wall, 1),
        "calib_s": round(result["calib_seconds"], 1),
        "threads": result["threads"],
        "iters": args.iters,
        "dc_iters": args.dc_iters,
        "data": str(args.data),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=["device", "host", "disk", "auto"])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--dc-iters", type=int, default=1)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--set", action="append", help="extra KEY=VALUE settings (e.g. dc_batch=32)")
    ap.add_argument(
        "--stop-after",
        type=int,
        help="stop each run after this many units (the largest tensors are in the first units)",
    )
    ap.add_argument("--out", help="results folder (default benchmarks/results/)")
    args = ap.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found (pass --data)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pdq-mem-") as tmp:
        for mode in args.modes:
            rows.append(run_mode(mode, args, Path(tmp)))
            print(rows[-1], flush=True)
    record(
        "cache_memory",
        rows,
        out_dir=args.out,
        columns=[
            "mode",
            "resolved_mode",
            "calib_size",
            "units",
            "set",
            "peak_rss_gib",
            "peak_anon_gib",
            "peak_file_gib",
            "peak_anon_during",
            "auto_estimate_gib",
            "calib_s",
            "wall_s",
        ],
    )


if __name__ == "__main__":
    main()
