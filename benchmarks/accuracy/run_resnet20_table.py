"""Run the ResNet-20 CIFAR-10 accuracy table jobs (each one `pdquant calibrate` call).

Usage: python benchmarks/accuracy/run_resnet20_table.py --out benchmarks/results/resnet20_table
       [--workers 2] [--iters 60] [--dc-iters 10] [--seeds 1005 1006]

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


def jobs(seeds: list[int]) -> list[tuple[str, str, int, int, int]]:
    out = []
    for seed in seeds:
        for w, a in BITS:
            for m in METHODS:
                out.append((f"{m}_w{w}a{a}_s{seed}", m, w, a, seed))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/resnet20_table"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--dc-iters", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1005, 1006])
    args = ap.parse_args()
    sprites = SHARED / "cifar10/convnetjs_png"
    weights = SHARED / "cifar10/models/akamaster_resnet/resnet20-12fca82f.th"
    if not sprites.is_dir():
        print(f"needs {sprites} (the shared CIFAR-10 data)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs(args.seeds) if not (out / j[0] / "result.json").exists()]
    print(f"{len(todo)} jobs to run in {out}", flush=True)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                name, m, w, a, seed = todo.pop(0)
            cmd = [
                sys.executable,
                "-m",
                "pdquant_fast.cli",
                "calibrate",
                "--model",
                "cifar_resnet20",
                "--weights",
                str(weights),
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
                "--method",
                m,
                "--w-bits",
                str(w),
                "--a-bits",
                str(a),
                "--iters",
                str(args.iters),
                "--dc-iters",
                str(args.dc_iters),
                "--seed",
                str(seed),
                "--threads",
                "1",
                "--no-progress",
                "--out",
                str(out / name),
            ]
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
