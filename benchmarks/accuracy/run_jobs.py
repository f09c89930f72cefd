"""Run accuracy jobs (each one `pdquant calibrate` call) for the committed tables.

Usage: python benchmarks/accuracy/run_jobs.py SET --out DIR [--workers 2] [--iters 60]
       [--dc-iters 10] [--seeds 1005 1006]

Sets: ``resnet20_table`` (5 methods x W4A4/W2A4/W2A2 x seeds), ``resnet20_ablations`` (PD-Quant
switches at W2A4), ``resnet20_long`` (QDrop and PD-Quant at W2A4, run with more iterations),
``efficientnet`` (QDrop and PD-Quant at W4A4 and W2A4, 500 calibration
images, evaluated on the 1,300 VeriSilicon val images).

Every job writes OUT/<job>/result.json (atomically, last); jobs whose result.json exists are
skipped, so an interrupted run resumes. Jobs are ordered so that the most informative cells
(W2A4, then W4A4, then W2A2; first seed of every method before the second) finish first.
Each worker runs with one torch thread. Needs ../shared/data (the CIFAR-10 sprites and weights).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("PDQUANT_SHARED_DATA", ROOT.parent / "shared" / "data"))
METHODS = ["rtn", "adaround", "brecq", "qdrop", "pdquant"]
BITS = [(2, 4), (4, 4), (2, 2)]


# The table runs used a 262,144-element activation-init subsample; ablations keep it so that
# they differ from the table's PD-Quant rows in one switch only.
ABLATIONS = {
    "dc_only": ["pd_loss=false", "act_init_max_elems=262144"],
    "pd_no_dc": ["dist_correction=false", "act_init_max_elems=262144"],
    "t1": ["temperature=1.0", "act_init_max_elems=262144"],
    "lambr1": ["lamb_r=1.0", "act_init_max_elems=262144"],
    "pd_alone": ["rec_loss=false", "act_init_max_elems=262144"],
}


def jobs(name: str, seeds: list[int]) -> list[tuple[str, str, int, int, int, list[str]]]:
    out = []
    if name == "resnet20_table":
        for seed in seeds:
            for w, a in BITS:
                for m in METHODS:
                    out.append((f"{m}_w{w}a{a}_s{seed}", m, w, a, seed, []))
    elif name == "resnet20_ablations":
        for seed in seeds:
            for tag, sets in ABLATIONS.items():
                out.append((f"pdquant-{tag}_w2a4_s{seed}", "pdquant", 2, 4, seed, sets))
    elif name == "resnet20_long":  # the iterations ablation: same as the table, more iters
        for seed in seeds:
            for m in ["qdrop", "pdquant"]:
                out.append((f"{m}_w2a4_s{seed}", m, 2, 4, seed, ["act_init_max_elems=262144"]))
            out.append(
                (f"pdquant-lambr1_w2a4_s{seed}", "pdquant", 2, 4, seed, ABLATIONS["lambr1"])
            )
    elif name == "efficientnet":
        for seed in seeds:
            for w, a in [(4, 4), (2, 4)]:
                for m in ["qdrop", "pdquant"]:
                    out.append((f"{m}_w{w}a{a}_s{seed}", m, w, a, seed, []))
    else:
        raise SystemExit(f"unknown job set {name!r}")
    return out


def command(set_name: str, job, args) -> list[str]:
    name, m, w, a, seed, sets = job
    if set_name == "efficientnet":
        base = [
            "--model",
            "efficientnet_lite0",
            "--data",
            str(SHARED / "imagenet/eliSchwartz_samples_even"),
            "--calib-size",
            "500",
            "--eval-data",
            str(SHARED / "imagenet/verisilicon_val1300/dataset.txt"),
        ]
    else:
        sprites = SHARED / "cifar10/convnetjs_png"
        base = [
            "--model",
            "cifar_resnet20",
            "--weights",
            str(SHARED / "cifar10/models/akamaster_resnet/resnet20-12fca82f.th"),
            "--data",
            str(sprites),
            "--split",
            "train",
            "--calib-size",
            "1024",
            "--eval-data",
            str(sprites),
            "--eval-split",
            "test",
        ]
    cmd = [sys.executable, "-m", "pdquant_fast.cli", "calibrate", *base]
    cmd += ["--method", m, "--w-bits", str(w), "--a-bits", str(a), "--iters", str(args.iters)]
    cmd += ["--dc-iters", str(args.dc_iters), "--seed", str(seed), "--threads", str(args.threads)]
    cmd += ["--no-progress", "--out", str(Path(args.out) / name)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "set", choices=["resnet20_table", "resnet20_ablations", "resnet20_long", "efficientnet"]
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--dc-iters", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1005, 1006])
    args = ap.parse_args()
    if not SHARED.is_dir():
        print(f"needs {SHARED} (the shared data; set PDQUANT_SHARED_DATA)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs(args.set, args.seeds) if not (out / j[0] / "result.json").exists()]
    print(f"{len(todo)} jobs to run in {out}", flush=True)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                job = todo.pop(0)
            name = job[0]
            cmd = command(args.set, job, args)
            with open(out / f"{name}.log", "w") as log:
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
            print(f"{name}: exit {rc}", flush=True)

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
