"""Build an accuracy table (Markdown) from calibration run folders; nothing is typed by hand.

Usage:
    python benchmarks/accuracy/make_table.py RESULTS_DIR [RESULTS_DIR ...] --out docs/FILE.md
        [--title TEXT] [--ref-method qdrop --cmp-method pdquant] [--only-bits W/A]
        [--only-seeds S ...]

A thin command line over :mod:`pdquant_fast.report` (the same code writes ``pdquant sweep``'s
summary.md): rows are (model, bits, method) with the mean and the spread (min..max) over seeds
on every evaluation set (``result.json`` evals plus ``eval_*.json`` from ``pdquant eval
--out-json``), then paired McNemar comparisons of ``--cmp-method`` against ``--ref-method``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pdquant_fast.report import accuracy_markdown, load_runs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="Accuracy")
    ap.add_argument("--ref-method", default="qdrop")
    ap.add_argument("--cmp-method", nargs="+", default=["pdquant"])
    ap.add_argument("--only-bits", help="keep only runs at W/A, e.g. 2/4")
    ap.add_argument("--only-seeds", type=int, nargs="+", help="keep only these seeds")
    args = ap.parse_args()
    runs = load_runs(args.dirs)
    if args.only_bits:
        wb, ab = (int(v) for v in args.only_bits.split("/"))
        runs = [r for r in runs if r.bits == (wb, ab)]
    if args.only_seeds:
        runs = [r for r in runs if r.seed in args.only_seeds]
    if not runs:
        raise SystemExit(f"no */result.json under {args.dirs}")
    cmd = "python benchmarks/accuracy/make_table.py " + " ".join(str(d) for d in args.dirs)
    cmd += f" --out {args.out}"
    for flag, val in (("--title", args.title), ("--only-bits", args.only_bits)):
        if val:
            cmd += f' {flag} "{val}"'
    if args.only_seeds:
        cmd += " --only-seeds " + " ".join(map(str, args.only_seeds))
    if args.cmp_method != ["pdquant"]:
        cmd += " --cmp-method " + " ".join(args.cmp_method)
    text = accuracy_markdown(runs, args.title, args.ref_method, args.cmp_method, cmd)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
