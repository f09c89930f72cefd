"""Reports from calibration run folders and benchmark rows: tables (CSV, Markdown) and plots.

Inputs, all written by the project's own tools, never typed by hand:

* run folders ``*/result.json`` from ``pdquant calibrate`` (plus ``predictions.json``,
  ``eval_*.json`` from ``pdquant eval --out-json`` and, for ``pdquant sweep`` jobs,
  ``config.json``, whose ``job.label`` names the row; older folders are labelled by their name
  ``<label>_w<W>a<A>_s<seed>``);
* benchmark rows ``benchmarks/results/*.jsonl`` appended by ``benchmarks/common.record`` (every
  row carries ``device``, ``torch``, ``triton``, ``python``, ``git_sha``, ``timestamp`` and, from
  this issue on, ``command``).

Statistics over seeds: mean, and the spread as min..max (with only 2–3 seeds a standard
deviation says little; the CSV has the sample standard deviation too). Paired comparisons of
two methods on the same images and seeds use the exact two-sided McNemar test on the discordant
counts. Plots use matplotlib's Agg backend (no display), PNG without a timestamp, so that
regenerating from the same results gives the same bytes.

Latency rows (for the latency-vs-batch plot and table) need, besides the environment keys:
a format (``format``, or ``impl`` with ``bits``/``backend`` as
``benchmarks/bench_packed_latency.py`` writes them), ``batch`` (or ``batch_size``), and a timing:
a :class:`benchmarks.common.Timing` dict (``median_s``, ``p10_s``, ``p90_s``) under any key, or
scalars ``median_s``/``p10_s``/``p90_s`` or ``median_ms``/``p10_ms``/``p90_ms``; ``model`` and
``threads`` are optional. Rows without these are skipped (and counted).
"""

from __future__ import annotations

import csv
import glob
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

METHOD_ORDER = ["fp32", "rtn", "adaround", "brecq", "qdrop", "pdquant"]
ENV_KEYS = ("device", "torch", "triton", "python", "git_sha", "timestamp", "command")


# ----------------------------------------------------------------------------- loading runs


@dataclass
class EvalScore:
    top1: float
    n: int
    fp_top1: float | None


@dataclass
class Run:
    """One finished calibration: the fields the tables need, from its folder's files."""

    folder: Path
    label: str
    model: str
    method: str
    w_bits: int
    a_bits: int
    iters: int
    seed: int
    calib_size: int | None
    calib_seconds: float
    threads: Any
    config: dict
    versions: dict
    finished: str | None
    resumed: bool = False  # continued from a checkpoint: calib_seconds covers the rest only
    evals: dict[str, EvalScore] = field(default_factory=dict)
    preds: dict[str, dict] = field(default_factory=dict)

    @property
    def dc_steps(self) -> int | None:
        """Distribution-correction steps actually run (None when the method has none)."""
        return self.config.get("dc_iters") if self.config.get("dist_correction") else None

    @property
    def bits(self) -> tuple[int, int]:
        return (self.w_bits, self.a_bits)


def eval_set_name(source: str, n: int | None = None) -> str:
    """A readable name for an evaluation set, from the ``source`` string the loader recorded."""
    count = f"{n:,}" if isinstance(n, int) else ""
    if "cifar10_batch_50" in source:
        return f"CIFAR-10 test {count} (lossless)".replace("  ", " ")
    if "yoongikim_jpeg" in source or source.rstrip("/").endswith("test"):
        return f"CIFAR-10 test {count} (JPEG q75)".replace("  ", " ")
    if "verisilicon" in source:
        return f"ImageNet val subset {count}".strip()
    if "foolbox" in source:
        return f"foolbox samples {count}".strip()
    return source


def load_run(folder: Path) -> Run | None:
    """The run in ``folder``, or None when it has no complete ``result.json``."""
    folder = Path(folder)
    try:
        r = json.loads((folder / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(r, dict) or "top1" not in r or "config" not in r:
        return None
    label = folder.name.rsplit("_w", 1)[0]
    cfg_path = folder / "config.json"
    if cfg_path.exists():
        try:
            label = json.loads(cfg_path.read_text())["job"]["label"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            pass
    run = Run(
        folder=folder,
        label=label,
        model=r["model"],
        method=r["method"],
        w_bits=r["w_bits"],
        a_bits=r["a_bits"],
        iters=r["iters"],
        seed=r["seed"],
        calib_size=r.get("calib_size"),
        calib_seconds=float(r["calib_seconds"]),
        threads=r.get("threads", "?"),
        config=r["config"],
        versions=r.get("versions") or {},
        finished=r.get("finished"),
        resumed=bool(r.get("resumed")),
    )
    spec_name = {}
    for spec, ev in (r.get("evals") or {}).items():
        name = eval_set_name(ev["source"], ev.get("n"))
        spec_name[spec] = name
        run.evals[name] = EvalScore(ev["top1"], ev["n"], ev.get("fp_top1"))
    preds = folder / "predictions.json"
    if preds.exists():
        for spec, p in json.loads(preds.read_text()).items():
            if spec in spec_name:
                run.preds[spec_name[spec]] = p
    for ej in sorted(folder.glob("eval_*.json")):
        e = json.loads(ej.read_text())
        name = eval_set_name(e["source"], e.get("n"))
        run.evals[name] = EvalScore(e["top1"], e["n"], e.get("fp_top1"))
        run.preds[name] = e
    return run


def load_runs(dirs: Iterable[str | Path]) -> list[Run]:
    """Every finished run in ``DIR/*/`` for each directory given, sorted by folder."""
    runs = []
    for d in dirs:
        for res in sorted(Path(d).glob("*/result.json")):
            run = load_run(res.parent)
            if run is not None:
                runs.append(run)
    return runs


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stats:
    """Mean and spread of one quantity over seeds."""

    n: int
    mean: float
    min: float
    max: float
    std: float | None  # sample standard deviation; None for one value

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        if not values:
            raise ValueError("no values")
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(len(values), statistics.fmean(values), min(values), max(values), std)


def fmt_stats(vals: list[float]) -> str:
    """``mean (min..max)`` with two decimals; the mean alone for one value; ``–`` for none."""
    if not vals:
        return "–"
    s = Stats.of(vals)
    if s.n == 1:
        return f"{s.mean:.2f}"
    return f"{s.mean:.2f} ({s.min:.2f}..{s.max:.2f})"


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for discordant counts ``b`` and ``c``."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def _label_key(label: str) -> tuple:
    method = label.split("-", 1)[0]
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else 99, label)


@dataclass
class Group:
    """Runs that differ only in their seed."""

    model: str
    label: str
    w_bits: int
    a_bits: int
    iters: int
    dc_steps: int | None
    calib_size: int | None
    runs: list[Run]

    def values(self, eval_set: str) -> list[float]:
        return [r.evals[eval_set].top1 for r in self.runs if eval_set in r.evals]


def group_runs(runs: list[Run]) -> list[Group]:
    """Group by (model, label, bits, iterations, DC steps, calibration size), in table order:
    model, then bits from widest to narrowest, then method order, then iterations."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.model, r.label, r.w_bits, r.a_bits, r.iters, r.dc_steps, r.calib_size)].append(r)
    out = [Group(*k, runs=sorted(v, key=lambda r: r.seed)) for k, v in groups.items()]
    out.sort(
        key=lambda g: (
            g.model,
            -g.w_bits,
            -g.a_bits,
            _label_key(g.label),
            g.iters,
            g.dc_steps or 0,
            g.calib_size or 0,
        )
    )
    return out


def eval_sets(runs: list[Run]) -> list[str]:
    sets: list[str] = []
    for r in runs:
        for s in r.evals:
            if s not in sets:
                sets.append(s)
    return sets


def fp_top1(runs: list[Run], eval_set: str) -> float | None:
    """The FP32 top-1 the runs measured on ``eval_set`` (identical across runs of a model)."""
    fps = sorted({r.evals[eval_set].fp_top1 for r in runs if eval_set in r.evals} - {None})
    return fps[0] if fps else None


def summary_rows(runs: list[Run]) -> list[dict]:
    """One CSV row per (group, evaluation set): mean, min, max, std over seeds."""
    rows = []
    sets = eval_sets(runs)
    for g in group_runs(runs):
        secs = Stats.of([r.calib_seconds for r in g.runs])
        for s in sets:
            vals = g.values(s)
            if not vals:
                continue
            st = Stats.of(vals)
            rows.append(
                {
                    "model": g.model,
                    "label": g.label,
                    "method": g.runs[0].method,
                    "w_bits": g.w_bits,
                    "a_bits": g.a_bits,
                    "iters": g.iters,
                    "dc_steps": "" if g.dc_steps is None else g.dc_steps,
                    "calib_size": "" if g.calib_size is None else g.calib_size,
                    "eval_set": s,
                    "eval_n": g.runs[0].evals[s].n,
                    "n_seeds": st.n,
                    "seeds": " ".join(str(r.seed) for r in g.runs if s in r.evals),
                    "top1_mean": round(st.mean, 4),
                    "top1_min": st.min,
                    "top1_max": st.max,
                    "top1_std": "" if st.std is None else round(st.std, 4),
                    "fp_top1": "" if fp_top1(g.runs, s) is None else fp_top1(g.runs, s),
                    "calib_s_mean": round(secs.mean, 2),
                    "calib_s_min": round(secs.min, 2),
                    "calib_s_max": round(secs.max, 2),
                    "threads": " ".join(sorted({str(r.threads) for r in g.runs})),
                }
            )
    return rows


def run_rows(runs: list[Run]) -> list[dict]:
    """One CSV row per (run, evaluation set)."""
    rows = []
    for r in sorted(runs, key=lambda r: r.folder.name):
        for s, ev in r.evals.items():
            rows.append(
                {
                    "job": r.folder.name,
                    "model": r.model,
                    "label": r.label,
                    "method": r.method,
                    "w_bits": r.w_bits,
                    "a_bits": r.a_bits,
                    "iters": r.iters,
                    "dc_steps": "" if r.dc_steps is None else r.dc_steps,
                    "calib_size": "" if r.calib_size is None else r.calib_size,
                    "seed": r.seed,
                    "eval_set": s,
                    "eval_n": ev.n,
                    "top1": ev.top1,
                    "fp_top1": "" if ev.fp_top1 is None else ev.fp_top1,
                    "calib_seconds": round(r.calib_seconds, 2),
                    "threads": r.threads,
                    "resumed": int(r.resumed),
                    "finished": r.finished or "",
                }
            )
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return path


# ----------------------------------------------------------------------------- Markdown


def _changed(cfg: dict) -> str:
    """Settings that differ from the method's defaults (ablation switches)."""
    from .config import make_config

    base = make_config(
        cfg["method"], preset=cfg["preset"], w_bits=cfg["w_bits"], a_bits=cfg["a_bits"]
    ).to_dict()
    skip = {"iters", "seed", "dc_iters", "w_bits", "a_bits", "act_init_max_elems"}
    diff = [f"{k}={cfg[k]}" for k in sorted(cfg) if k not in skip and cfg[k] != base.get(k)]
    return ", ".join(diff) or "–"


def machine(runs: list[Run]) -> str:
    """The machine(s) and software the runs were made on, from their result.json."""
    seen = []
    for r in runs:
        v = r.versions
        cpu = v.get("cpu") or {}
        parts = [f"{cpu.get('model', '?')} CPU ({cpu.get('logical_cores', '?')} logical cores)"]
        if v.get("gpu") or v.get("cuda_device"):
            parts.append(str(v.get("gpu") or v.get("cuda_device")))
        parts.append(f"torch {v.get('torch', '?')}")
        parts.append(f"{r.threads} torch thread(s) per job")
        text = ", ".join(parts)
        if text not in seen:
            seen.append(text)
    dates = sorted(r.finished[:10] for r in runs if r.finished)
    when = f"; finished {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else "")
    return "; ".join(seen) + (when if dates else "")


def accuracy_markdown(
    runs: list[Run], title: str, ref: str, cmps: Iterable[str], command: str
) -> str:
    """The full accuracy table per model (every evaluation set, mean (min..max) over seeds),
    then paired McNemar comparisons of each label in ``cmps`` against ``ref``."""
    lines = [f"# {title}", "", f"Generated by `{command}` from the run folders; do not edit.", ""]
    groups = group_runs(runs)
    sets = eval_sets(runs)
    for model in sorted({g.model for g in groups}):
        mruns = [r for r in runs if r.model == model]
        mgroups = [g for g in groups if g.model == model]
        lines += [f"## {model}", "", f"Machine: {machine(mruns)}.", ""]
        msets = [s for s in sets if any(s in r.evals for r in mruns)]
        hdr = ["method", "W/A", "seeds"] + [f"top-1 % {s}" for s in msets]
        hdr += ["iters/unit", "DC steps", "calib images", "changed settings", "calib s (mean)"]
        hdr += ["threads"]
        lines.append("| " + " | ".join(hdr) + " |")
        lines.append("|" + "---|" * len(hdr))
        fp_row = ["FP32", "32/32", "–"]
        for s in msets:
            fp = fp_top1(mruns, s)
            fp_row.append("–" if fp is None else f"{fp:.2f}")
        lines.append("| " + " | ".join(fp_row + ["–"] * 6) + " |")
        for g in mgroups:
            row = [g.label, f"{g.w_bits}/{g.a_bits}", str(len(g.runs))]
            for s in msets:
                vals = g.values(s)
                cell = fmt_stats(vals)
                if vals and len(vals) < len(g.runs):
                    cell += f" [{len(vals)} of {len(g.runs)} seeds]"
                row.append(cell)
            row.append(f"{g.iters}" + (" (official 20000)" if g.iters != 20000 else ""))
            row.append("–" if g.dc_steps is None else str(g.dc_steps))
            row.append("–" if g.calib_size is None else f"{g.calib_size:,}")
            row.append(_changed(g.runs[0].config))
            secs = f"{statistics.fmean(r.calib_seconds for r in g.runs):.0f}"
            resumed = sum(1 for r in g.runs if r.resumed)
            row.append(secs + (f" [{resumed} resumed: time after the restart]" if resumed else ""))
            row.append(",".join(sorted({str(r.threads) for r in g.runs})))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        for cmp in cmps:
            lines += paired_markdown(mgroups, msets, ref, cmp)
    return "\n".join(lines)


def paired_markdown(groups: list[Group], sets: list[str], ref: str, cmp: str) -> list[str]:
    """Paired comparison of label ``cmp`` against ``ref`` on the same images and seeds."""
    by = {(g.w_bits, g.a_bits, g.iters, g.label): g for g in groups}
    pair_lines = []
    keys = sorted(
        {(g.w_bits, g.a_bits, g.iters) for g in groups}, key=lambda k: (-k[0], -k[1], k[2])
    )
    multi_iters = len({k[2] for k in keys}) > 1
    for wb, ab, it in keys:
        ga, gb = by.get((wb, ab, it, ref)), by.get((wb, ab, it, cmp))
        if ga is None or gb is None:
            continue
        a = {r.seed: r for r in ga.runs}
        b = {r.seed: r for r in gb.runs}
        for s in sets:
            tot_b = tot_c = n_pairs = 0
            for seed in sorted(set(a) & set(b)):
                pa, pb = a[seed].preds.get(s), b[seed].preds.get(s)
                if not pa or not pb or pa["labels"] != pb["labels"]:
                    continue
                ok_a = [p == y for p, y in zip(pa["pred"], pa["labels"], strict=True)]
                ok_b = [p == y for p, y in zip(pb["pred"], pb["labels"], strict=True)]
                tot_b += sum(1 for x, y in zip(ok_a, ok_b, strict=True) if y and not x)
                tot_c += sum(1 for x, y in zip(ok_a, ok_b, strict=True) if x and not y)
                n_pairs += 1
            if n_pairs:
                wa = f"{wb}/{ab}" + (f" ({it} it)" if multi_iters else "")
                pair_lines.append(
                    f"| {wa} | {s} | {n_pairs} | {tot_b} | {tot_c} | "
                    f"{tot_b - tot_c:+d} | {mcnemar_p(tot_b, tot_c):.3g} |"
                )
    if not pair_lines:
        return []
    return [
        f"Paired comparison, {cmp} vs {ref}, same images and seeds (summed over seeds): "
        f"images only {cmp} gets right, only {ref} gets right, and the exact two-sided "
        "McNemar p-value on those discordant counts.",
        "",
        f"| W/A | images | seeds | only {cmp} right | only {ref} right | net | p |",
        "|---|---|---|---|---|---|---|",
        *pair_lines,
        "",
    ]


def accuracy_pivot_markdown(runs: list[Run], eval_set: str | None = None) -> str:
    """Compact table for one model and one evaluation set: a row per label, a column per W/A,
    cells ``mean (min..max)`` over seeds; FP32 first."""
    if not runs:
        return "_no finished runs_"
    if len({r.model for r in runs}) != 1:
        raise ValueError("accuracy_pivot_markdown takes the runs of one model")
    eval_set = eval_set or eval_sets(runs)[0]
    groups = group_runs(runs)
    bits = sorted({(g.w_bits, g.a_bits) for g in groups}, key=lambda b: (-b[0], -b[1]))
    labels = sorted({g.label for g in groups}, key=_label_key)
    by = {(g.label, g.w_bits, g.a_bits): g for g in groups}
    hdr = ["method"] + [f"W{w}A{a}" for w, a in bits]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    fp = fp_top1(runs, eval_set)
    lines.append("| FP32 | " + " | ".join(["–" if fp is None else f"{fp:.2f}"] * len(bits)) + " |")
    for label in labels:
        cells = []
        for w, a in bits:
            g = by.get((label, w, a))
            cells.append(fmt_stats(g.values(eval_set)) if g else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    _pyplot().close(fig)
    return path


def plot_accuracy_vs_bits(runs: list[Run], path: Path, title: str) -> Path:
    """Top-1 vs bit-width, one line per method (label), error bars min..max over seeds, one
    panel per evaluation set; the FP32 accuracy dashed."""
    plt = _pyplot()
    sets = eval_sets(runs)
    groups = group_runs(runs)
    bits = sorted({(g.w_bits, g.a_bits) for g in groups}, key=lambda b: (-b[0], -b[1]))
    multi_iters = len({g.iters for g in groups}) > 1
    series = sorted({(g.label, g.iters) for g in groups}, key=lambda k: (_label_key(k[0]), k[1]))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 4.0), squeeze=False)
    for ax, s in zip(axes[0], sets, strict=True):
        for i, (label, iters) in enumerate(series):
            xs, ys, lo, hi = [], [], [], []
            for g in groups:
                if (g.label, g.iters) != (label, iters) or not g.values(s):
                    continue
                st = Stats.of(g.values(s))
                xs.append(bits.index((g.w_bits, g.a_bits)) + 0.04 * (i - (len(series) - 1) / 2))
                ys.append(st.mean)
                lo.append(st.mean - st.min)
                hi.append(st.max - st.mean)
            if xs:
                name = label + (f" ({iters} it)" if multi_iters else "")
                ax.errorbar(
                    xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name, color=f"C{i % 10}"
                )
        fp = fp_top1(runs, s)
        if fp is not None:
            ax.axhline(fp, color="gray", linestyle="--", linewidth=1, label="FP32")
        ax.set_xticks(range(len(bits)), [f"W{w}A{a}" for w, a in bits])
        ax.set_xlim(-0.5, len(bits) - 0.5)
        ax.set_xlabel("bit-width (weights / activations)")
        ax.set_ylabel("top-1 %")
        ax.set_title(s, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title} (bars: min..max over seeds)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_calib_time(runs: list[Run], path: Path, title: str) -> Path:
    """Mean calibration seconds per method (label), one bar per bit-width, min..max whiskers."""
    plt = _pyplot()
    groups = group_runs(runs)
    bits = sorted({(g.w_bits, g.a_bits) for g in groups}, key=lambda b: (-b[0], -b[1]))
    multi_iters = len({g.iters for g in groups}) > 1
    series = sorted({(g.label, g.iters) for g in groups}, key=lambda k: (_label_key(k[0]), k[1]))
    by = {(g.label, g.iters, g.w_bits, g.a_bits): g for g in groups}
    width = 0.8 / max(1, len(bits))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(series) + 2), 4.0))
    for j, (w, a) in enumerate(bits):
        xs, ys, lo, hi = [], [], [], []
        for i, (label, iters) in enumerate(series):
            g = by.get((label, iters, w, a))
            if g is None:
                continue
            st = Stats.of([r.calib_seconds for r in g.runs])
            xs.append(i + (j - (len(bits) - 1) / 2) * width)
            ys.append(st.mean)
            lo.append(st.mean - st.min)
            hi.append(st.max - st.mean)
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=3, label=f"W{w}A{a}")
    ax.set_xticks(
        range(len(series)), [lb + (f"\n{it} it" if multi_iters else "") for lb, it in series]
    )
    ax.set_ylabel("calibration time (s)")
    ax.set_title(f"{title} (bars: min..max over seeds)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- benchmark rows


def load_bench_rows(paths: Iterable[str | Path]) -> list[dict]:
    """Rows of ``.jsonl`` files (each row gets ``_file``: the file's stem, the suite name, and
    ``_path``: the file it came from)."""
    rows = []
    for p in paths:
        p = Path(p)
        for i, line in enumerate(p.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}:{i + 1} is not a JSON row: {exc}") from exc
            row["_file"] = p.stem
            row["_path"] = str(p)
            rows.append(row)
    return rows


def expand_globs(patterns: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for pat in patterns:
        for p in sorted(glob.glob(pat)):
            if Path(p) not in out:
                out.append(Path(p))
    return out


def _is_timing(v: Any) -> bool:
    return isinstance(v, dict) and "median_s" in v


def latest_rows(rows: list[dict]) -> list[dict]:
    """Drop superseded measurements: of rows from the same file and device that agree on every
    parameter (string, integer and boolean fields, outside the environment), keep the last."""
    keep: dict[tuple, dict] = {}
    for row in rows:
        params = tuple(
            (k, v)
            for k, v in row.items()
            if k not in ENV_KEYS
            and not k.startswith("_")
            and isinstance(v, (str, int, bool))
            and not _is_timing(v)
        )
        keep[(row.get("_file"), row.get("device"), params)] = row
    return list(keep.values())


@dataclass(frozen=True)
class LatencyPoint:
    model: str
    format: str
    batch: int
    median_s: float
    p10_s: float | None
    p90_s: float | None
    device: str


def _row_format(row: dict) -> str | None:
    """``format``, else ``impl`` (+ ``bits`` for packed formats, + ``backend`` unless torch): the
    ``benchmarks/bench_packed_latency.py`` rows give e.g. "packed W4A4 (cpp)", "fp32",
    "int8_ao (x86/fbgemm)"."""
    if isinstance(row.get("format"), str):
        return row["format"]
    impl = row.get("impl")
    if not isinstance(impl, str):
        return None
    name = impl
    if "packed" in impl and isinstance(row.get("bits"), str):
        name += f" {row['bits']}"
    if isinstance(row.get("backend"), str) and row["backend"] != "torch":
        name += f" ({row['backend']})"
    return name


def _row_timing(row: dict) -> tuple[float | None, float | None, float | None]:
    """(median, p10, p90) seconds from a Timing dict, ``*_s`` or ``*_ms`` fields."""
    timing = next((v for v in row.values() if _is_timing(v)), None)
    if timing is not None:
        return timing["median_s"], timing.get("p10_s"), timing.get("p90_s")
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        med = row.get(f"median_{unit}", row.get(f"latency_{unit}"))
        if isinstance(med, (int, float)):
            p10, p90 = row.get(f"p10_{unit}"), row.get(f"p90_{unit}")
            return (
                med * scale,
                p10 * scale if isinstance(p10, (int, float)) else None,
                p90 * scale if isinstance(p90, (int, float)) else None,
            )
    return None, None, None


def latency_point(row: dict) -> LatencyPoint | None:
    """The latency point of one row (see the module docstring), or None when the row has no
    format, batch or timing. A ``threads`` field is folded into the device name."""
    batch = row.get("batch", row.get("batch_size"))
    fmt = _row_format(row)
    med, p10, p90 = _row_timing(row)
    if not isinstance(batch, int) or fmt is None or med is None:
        return None
    return LatencyPoint(
        model=str(row.get("model", "")),
        format=fmt,
        batch=batch,
        median_s=float(med),
        p10_s=p10,
        p90_s=p90,
        device=device_label(row),
    )


def latency_points(rows: list[dict]) -> tuple[list[LatencyPoint], int]:
    """Latency points from benchmark rows (see the module docstring); returns (points, skipped).
    A ``threads`` field is folded into the device name (one panel per thread count)."""
    pts, skipped = [], 0
    for row in latest_rows(rows):
        pt = latency_point(row)
        if pt is None:
            skipped += 1
        else:
            pts.append(pt)
    return pts, skipped


def plot_latency(points: list[LatencyPoint], path: Path, title: str = "") -> Path:
    """Latency (ms per batch, median, p10..p90 whiskers) vs batch size, one line per format,
    one panel per (model, device)."""
    plt = _pyplot()
    panels = sorted({(p.model, p.device) for p in points})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.0), squeeze=False)
    for ax, (model, device) in zip(axes[0], panels, strict=True):
        fmts = sorted({p.format for p in points if (p.model, p.device) == (model, device)})
        for fmt in fmts:
            ps = sorted(
                (p for p in points if (p.model, p.device, p.format) == (model, device, fmt)),
                key=lambda p: p.batch,
            )
            ys = [p.median_s * 1e3 for p in ps]
            lo = [(p.median_s - (p.p10_s if p.p10_s is not None else p.median_s)) * 1e3 for p in ps]
            hi = [((p.p90_s if p.p90_s is not None else p.median_s) - p.median_s) * 1e3 for p in ps]
            ax.errorbar([p.batch for p in ps], ys, yerr=[lo, hi], marker="o", capsize=3, label=fmt)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("latency per batch (ms)")
        ax.set_title(f"{model} on {device}".strip(), fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _baseline_format(fmts: Iterable[str]) -> str | None:
    for f in fmts:
        if "fp32" in f.lower() or "float" in f.lower():
            return f
    return None


def _fmt_ms(ms: float) -> str:
    """Three significant digits without exponents: 0.0123, 1.23, 12.3, 123, 1,234."""
    if ms >= 100:
        return f"{ms:,.0f}"
    return f"{ms:.3g}" if ms >= 0.001 else f"{ms:.2e}"


def latency_markdown(points: list[LatencyPoint]) -> str:
    """Per (model, device): a row per format, a column per batch size, median ms per batch and,
    where an ``fp32``/``float`` format was measured in the same rows, the speed-up over it."""
    lines: list[str] = []
    for model, device in sorted({(p.model, p.device) for p in points}):
        ps = [p for p in points if (p.model, p.device) == (model, device)]
        batches = sorted({p.batch for p in ps})
        fmts = sorted({p.format for p in ps})
        base = _baseline_format(fmts)
        at = {(p.format, p.batch): p for p in ps}
        lines += [f"{model or 'model not recorded'} on {device}, ms per batch (median)"]
        if base:
            lines[-1] += f", speed-up over {base} in brackets"
        lines += ["", "| format | " + " | ".join(f"batch {b}" for b in batches) + " |"]
        lines.append("|" + "---|" * (len(batches) + 1))
        for f in fmts:
            cells = []
            for b in batches:
                p = at.get((f, b))
                if p is None:
                    cells.append("–")
                    continue
                cell = _fmt_ms(p.median_s * 1e3)
                if base and f != base and (base, b) in at:
                    cell += f" (x{at[(base, b)].median_s / p.median_s:.2f})"
                cells.append(cell)
            lines.append(f"| {f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def _fmt_cell(v: Any) -> str:
    if _is_timing(v):
        return f"{v['median_s'] * 1e3:.4g} ms"
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "–"
    return str(v).replace("|", "/")


def bench_table_markdown(rows: list[dict]) -> str:
    """A generic table of benchmark rows: every non-environment column, in first-seen order;
    Timing dicts shown as their median in ms."""
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in ENV_KEYS and not k.startswith("_") and k not in cols:
                cols.append(k)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def rows_environment(rows: list[dict]) -> str:
    """``device; torch X, triton Y; git SHA(s); date(s)`` for a set of rows."""

    def uniq(key):
        return sorted({str(r.get(key)) for r in rows if r.get(key) is not None})

    parts = ["; ".join(uniq("device")) or "device not recorded"]
    sw = [f"torch {', '.join(uniq('torch'))}"]
    if uniq("triton") and uniq("triton") != ["None"]:
        sw.append(f"triton {', '.join(uniq('triton'))}")
    parts.append(", ".join(sw))
    if uniq("git_sha"):
        parts.append("git " + ", ".join(uniq("git_sha")))
    dates = sorted({str(r["timestamp"])[:10] for r in rows if r.get("timestamp")})
    if dates:
        parts.append(dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}")
    return "; ".join(parts)


def rows_commands(rows: list[dict], root: Path | None = None) -> list[str]:
    """The commands that produced the rows: their ``command`` field, else the
    ``benchmarks/bench_*.py`` script that names the suite (file stem) in its source."""
    cmds = sorted({r["command"] for r in rows if r.get("command")})
    if cmds:
        return cmds
    root = root or Path.cwd()
    scripts = [
        (p, p.read_text(errors="replace")) for p in sorted(root.glob("benchmarks/bench_*.py"))
    ]
    out = []
    for suite in sorted({r.get("_file", "") for r in rows} - {""}):
        prefix = suite.split("_cpu")[0].split("_cuda")[0].split("_gpu")[0]
        for needle in (f'"{suite}"', prefix):  # the exact suite name first, then its stem
            hit = next((p for p, text in scripts if needle in text), None)
            if hit is not None:
                out.append(f"python {hit.relative_to(root)}")
                break
    return sorted(set(out))


# ----------------------------------------------------------------------------- README speed tables
# Compact tables of the committed benchmark rows for README.md's "Speed" section
# (benchmarks/make_readme_tables.py). Every number is a field of a row, or a ratio of two fields of
# rows of the same run; nothing is typed in.

KERNEL_BASELINES = ("ste_compile", "torch_learnable", "reference", "ste_eager")
"""Calibration-kernel candidates that are baselines; every other candidate (``cpp``, ``cuda``,
``triton``, ``cuda+graph``, ``triton+graph``, ...) is one of the library's fused kernels."""

_OP_NAMES = {"fq": "fake-quant", "ada": "AdaRound", "init": "init search"}


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt_num(v: Any) -> str:
    """Three significant digits, thousands separators, no exponent (0.0659, 1.62, 74.8, 3,980);
    ``–`` for a missing value."""
    if not _num(v):
        return "–"
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    r = round(v, 2 - mag)
    if r != 0 and math.floor(math.log10(abs(r))) > mag:  # 9.996 -> 10.0
        mag += 1
    return f"{r:,.{max(0, 2 - mag)}f}"


def fmt_ratio(r: Any) -> str:
    """A speed ratio, truncated (never rounded up) to what is shown: ``172×``, ``5.6×``,
    ``0.98×`` for 0.9987, ``0.057×``; ``–`` for a missing value."""
    if not _num(r) or r <= 0:
        return "–"
    if r >= 10:
        return f"{math.floor(r + 1e-9):,d}×"
    d = 1 if r >= 1 else 1 - math.floor(math.log10(r))  # two significant digits below 1
    return f"{math.floor(r * 10**d + 1e-9) / 10**d:.{d}f}×"


def fmt_pct(frac: Any) -> str:
    return fmt_num(frac * 100) + "%" if _num(frac) else "–"


def _when(row: dict) -> datetime:
    """The row's ``timestamp`` (its run), oldest possible when missing or unreadable."""
    try:
        when = datetime.fromisoformat(str(row.get("timestamp")))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def same_run(a: dict, b: dict) -> bool:
    """Rows written by one benchmark process (``benchmarks.common.record`` stamps all the rows of
    a run with one timestamp)."""
    return (a.get("timestamp"), a.get("git_sha"), a.get("_file")) == (
        b.get("timestamp"),
        b.get("git_sha"),
        b.get("_file"),
    )


def device_label(row: dict) -> str:
    """``device``, with ``threads`` appended when the device string does not name them."""
    device = str(row.get("device", "?"))
    if isinstance(row.get("threads"), int) and "thread" not in device:
        device += f", {row['threads']} thread(s)"
    return device


def latest_per_key(rows: list[dict], key: Callable[[dict], Any]) -> list[dict]:
    """One row per ``key(row)``: the one of the newest run (``timestamp``; of equally new rows the
    later one), in input order."""
    best: dict[Any, int] = {}
    for i, row in enumerate(rows):
        k = key(row)
        if k not in best or _when(row) >= _when(rows[best[k]]):
            best[k] = i
    return [rows[i] for i in sorted(best.values())]


def latest_run_rows(rows: list[dict], group: Callable[[dict], Any]) -> list[dict]:
    """Every row of the newest run (``timestamp``) of each ``group(row)``, in input order."""
    newest: dict[Any, datetime] = {}
    for row in rows:
        g, w = group(row), _when(row)
        if g not in newest or w > newest[g]:
            newest[g] = w
    return [r for r in rows if _when(r) == newest[group(r)]]


def _cell(v: Any) -> str:
    return "–" if v is None else str(v).replace("|", "/")


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in body]


# --- calibration kernels (benchmarks/bench_calib_kernels_{cpu,gpu}.py)


def _kernel_ok(row: dict) -> bool:
    return str(row.get("status", "ok")).startswith("ok") and _num(row.get("ms"))


@dataclass
class KernelCase:
    """One case of a calibration-kernel suite on one device (and thread count): the fastest fused
    candidate that ran and passed its check, and the baselines."""

    case: str
    shape: str | None
    kind: str | None
    bits: Any
    per_channel: bool | None
    keep_prob: float | None
    inferred: bool  # kind / per_channel read from the case name (rows without those fields)
    fused: dict | None  # the fastest fused candidate's row
    eager: dict | None  # the fastest fused candidate without a CUDA graph, when ``fused`` has one
    baselines: dict[str, dict]  # candidate -> row (status ok)
    failed: list[tuple[str, str]]  # (candidate, status) of rows without a validated timing

    @property
    def op(self) -> str:
        name = _OP_NAMES.get(self.kind or "", self.kind or "–")
        if _num(self.keep_prob) and self.keep_prob < 1:
            name += f" + QDrop {self.keep_prob:g}"
        return name

    def ms(self, candidate: str) -> float | None:
        row = self.baselines.get(candidate)
        return row["ms"] if row else None

    def ratio(self, candidate: str, field: str = "ms") -> float | None:
        """Baseline time ÷ our time, both of the same run (None otherwise)."""
        base, ours = self.baselines.get(candidate), self.fused
        if base is None or ours is None or not same_run(base, ours):
            return None
        if not (_num(base.get(field)) and _num(ours.get(field)) and ours[field] > 0):
            return None
        return base[field] / ours[field]


def _case_meta(case: str, rows: list[dict]) -> tuple[str | None, bool | None, bool]:
    kind = next((r["kind"] for r in rows if isinstance(r.get("kind"), str)), None)
    pc = next((r["per_channel"] for r in rows if isinstance(r.get("per_channel"), bool)), None)
    inferred = False
    tokens = case.lower().split("_")
    if kind is None:
        kind = next((k for k in ("fq", "ada", "init") if case.lower().startswith(k)), None)
        inferred = inferred or kind is not None
    if pc is None and ("channel" in tokens or "tensor" in tokens):
        pc, inferred = "channel" in tokens, True
    return kind, pc, inferred


def kernel_cases(rows: list[dict]) -> dict[tuple[str, str], list[KernelCase]]:
    """Calibration-kernel rows -> {(suite, device label): cases in benchmark order}. Only the
    newest row of each (suite, device and threads, case, candidate) is used; ratios are only taken
    between rows of the same run."""
    rows = latest_per_key(
        rows, lambda r: (r.get("_file"), device_label(r), r.get("case"), r.get("candidate"))
    )
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in rows:
        g = groups.setdefault((str(r.get("_file", "")), device_label(r)), {})
        g.setdefault(str(r.get("case")), []).append(r)
    out: dict[tuple[str, str], list[KernelCase]] = {}
    for gk in sorted(groups):
        cases = []
        for case, crs in groups[gk].items():
            fused = [r for r in crs if r.get("candidate") not in KERNEL_BASELINES]
            good = [r for r in fused if _kernel_ok(r)]
            best = min(good, key=lambda r: r["ms"]) if good else None
            eager = None
            if best is not None and "graph" in str(best.get("candidate")):
                no_graph = [r for r in good if "graph" not in str(r.get("candidate"))]
                eager = min(no_graph, key=lambda r: r["ms"]) if no_graph else None
            kind, pc, inferred = _case_meta(case, crs)
            cases.append(
                KernelCase(
                    case=case,
                    shape=next((r["shape"] for r in crs if r.get("shape")), None),
                    kind=kind,
                    bits=next((r["bits"] for r in crs if r.get("bits") is not None), None),
                    per_channel=pc,
                    keep_prob=next((r["keep_prob"] for r in crs if _num(r.get("keep_prob"))), None),
                    inferred=inferred,
                    fused=best,
                    eager=eager,
                    baselines={
                        r["candidate"]: r
                        for r in crs
                        if r.get("candidate") in KERNEL_BASELINES and _kernel_ok(r)
                    },
                    failed=[
                        (str(r.get("candidate")), str(r.get("status", "no timing")))
                        for r in crs
                        if not _kernel_ok(r)
                    ],
                )
            )
        out[gk] = cases
    return out


def _bandwidth_limit(fused: list[dict]) -> tuple[str, str, str | None]:
    """(fraction field, column header, sentence naming the limit) for the fused rows."""
    hbm = [r for r in fused if _num(r.get("hbm_frac"))]
    if hbm:
        peaks = sorted({r["hbm_peak_GBs"] for r in hbm if _num(r.get("hbm_peak_GBs"))})
        peak = " / ".join(fmt_num(p) for p in peaks) or "not recorded"
        return "hbm_frac", "% of HBM peak", f"HBM peak {peak} GB/s (the rows' `hbm_peak_GBs`)"
    copy = [r for r in fused if _num(r.get("copy_frac")) and _num(r.get("GB/s")) and r["copy_frac"]]
    if copy:
        bws = sorted({fmt_num(r["GB/s"] / r["copy_frac"]) for r in copy})
        return (
            "copy_frac",
            "% of copy BW",
            f"copy bandwidth measured in the same run, {' / '.join(bws)} GB/s (GB/s ÷ copy_frac)",
        )
    return "", "% of BW limit", None


def kernel_markdown(cases: list[KernelCase]) -> str:
    """The step table (fake-quant / AdaRound cases) and the init-search table of one group."""
    steps = [c for c in cases if c.kind != "init" and c.fused is not None]
    inits = [c for c in cases if c.kind == "init" and c.fused is not None]
    lines: list[str] = []
    if steps:
        names = sorted({str(c.fused["candidate"]) for c in steps if c.fused})
        one = len(names) == 1
        field, bw_head, bw_text = _bandwidth_limit([c.fused for c in steps if c.fused])
        graphs = any(c.eager is not None for c in steps)
        head = ["case", "shape", "op", "bits", "per-channel"]
        head += [f"ours (`{names[0]}`) ms"] if one else ["ours", "ours ms"]
        if graphs:
            head.append("ours without graph, ms")
        head += ["torch.compile ms", "learnable op ms", "reference ms"]
        head += ["× compile", "× learnable", "× reference", "GB/s", bw_head]
        body = []
        for c in steps:
            f = c.fused or {}
            row = [c.case, c.shape, c.op, c.bits, _yes_no(c.per_channel)]
            row += [fmt_num(f["ms"])] if one else [f"`{f['candidate']}`", fmt_num(f["ms"])]
            if graphs:
                e = c.eager
                row.append(f"{fmt_num(e['ms'])} (`{e['candidate']}`)" if e else "–")
            row += [fmt_num(c.ms(k)) for k in ("ste_compile", "torch_learnable", "reference")]
            row += [fmt_ratio(c.ratio(k)) for k in ("ste_compile", "torch_learnable", "reference")]
            row += [fmt_num(f.get("GB/s")), fmt_pct(f.get(field)) if field else "–"]
            body.append(row)
        text = (
            "Forward + backward of one step, median ms; × = baseline ms ÷ ours, from the same run "
            "(> 1× = ours faster)"
        )
        if not one:
            text += "; ours = the fastest fused candidate that passed its check"
        if bw_text:
            text += f". GB/s = bytes a fused step must move ÷ time; limit: {bw_text}"
        lines += [text + ".", "", *_md_table(head, body), ""]
        if graphs:
            lines += [
                "`+graph`: our step captured once in a CUDA graph and replayed; torch.compile, the "
                "learnable op and the reference are launched eagerly, so part of those ratios is "
                "launch overhead (compare `ours without graph`).",
                "",
            ]
    if inits:
        head = ["layer", "shape", "bits", "ours s (whole layer)", "reference s (est. whole layer)"]
        head += ["reference rows timed", "× reference"]
        body = []
        for c in inits:
            f, ref = c.fused or {}, c.baselines.get("reference")
            rows_total = _layer_rows(c.shape, f)
            ours_s = f["ms_per_row"] * rows_total / 1e3 if _num(f.get("ms_per_row")) else None
            if ours_s is None and _num(f.get("ms")):
                ours_s = f["ms"] / 1e3
            ref_s = None
            if ref is not None and _num(ref.get("ms_per_row")) and rows_total:
                ref_s = ref["ms_per_row"] * rows_total / 1e3
            body.append(
                [
                    c.case,
                    c.shape,
                    c.bits,
                    fmt_num(ours_s),
                    fmt_num(ref_s),
                    "–" if ref is None else _cell(ref.get("rows")),
                    fmt_ratio(c.ratio("reference", "ms_per_row")),
                ]
            )
        name = sorted({str(c.fused["candidate"]) for c in inits if c.fused})
        lines += [
            f"MSE init search of a whole weight layer (ours: {', '.join(f'`{n}`' for n in name)}); "
            "the reference is timed on its first rows only and extrapolated per row "
            "(× = reference ms per row ÷ ours, same run).",
            "",
            *_md_table(head, body),
            "",
        ]
    inferred = [c.case for c in cases if c.inferred]
    if inferred:
        lines += [
            "These rows record no `kind` / `bits` / `per_channel` / `keep_prob`: op and "
            "per-channel are read from the case name; bits and QDrop are not shown.",
            "",
        ]
    failed = [(c.case, n, st) for c in cases for n, st in c.failed]
    if failed:
        items = "; ".join(f"`{n}` on {case} ({st})" for case, n, st in failed)
        lines += [f"Not in the table (no validated timing in this run): {items}.", ""]
    return "\n".join(lines).rstrip()


def _yes_no(v: bool | None) -> str:
    return "–" if v is None else ("yes" if v else "no")


def _layer_rows(shape: str | None, row: dict) -> int | None:
    """Output rows of a 2-D weight ``OxI`` (the init search runs per row)."""
    try:
        return int(str(shape).split("x")[0])
    except ValueError:
        return row.get("rows") if isinstance(row.get("rows"), int) else None


# --- whole calibration and one reconstruction step (bench_calibration.py, bench_calib_step.py)


def _command_settings(cmd: str) -> str:
    """A benchmark command without its ``--out DIR`` (where the rows were written does not
    change what was measured: a rerun elsewhere supersedes the older run)."""
    return re.sub(r"\s--out(?:=|\s+)\S+", "", cmd).strip()


def run_groups(rows: list[dict]) -> list[list[dict]]:
    """The newest run per (suite, device and threads, command without ``--out``), each as its
    rows in order."""

    def key(r):
        cmd = _command_settings(str(r.get("command", "")))
        return (str(r.get("_file", "")), device_label(r), cmd)

    rows = latest_run_rows(rows, key)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return [groups[k] for k in sorted(groups)]


def _vs_reference(row: dict, rows: list[dict], field: str, value: str) -> float | None:
    """``row[field]``, else the reference row's ``value`` ÷ this row's, from the same run."""
    if _num(row.get(field)):
        return row[field]
    ref = next(
        (
            r
            for r in rows
            if "reference" in (r.get("variant"), r.get("backend")) and same_run(r, row)
        ),
        None,
    )
    if ref is None or not _num(ref.get(value)) or not _num(row.get(value)) or not row[value]:
        return None
    return ref[value] / row[value]


def calib_step_markdown(rows: list[dict]) -> str:
    """One reconstruction iteration per variant (bench_calib_step.py rows of one run)."""
    head = ["model", "unit", "variant", "backend", "ms / iteration (p10–p90)", "× reference"]
    body = []
    for r in rows:
        spread = ""
        if _num(r.get("p10_ms")) and _num(r.get("p90_ms")):
            spread = f" ({fmt_num(r['p10_ms'])}–{fmt_num(r['p90_ms'])})"
        body.append(
            [
                r.get("model"),
                r.get("unit"),
                r.get("variant"),
                r.get("backend"),
                fmt_num(r.get("ms_per_iter")) + spread,
                fmt_ratio(_vs_reference(r, rows, "speedup_vs_reference", "ms_per_iter")),
            ]
        )
    return "\n".join(_md_table(head, body))


def calibration_markdown(rows: list[dict]) -> str:
    """A whole calibration per backend (bench_calibration.py rows of one run)."""
    head = ["model", "method", "bits", "iters", "seed", "backend", "PD tail", "wall s", "DC s"]
    head += ["reconstruction s", "ms / iteration", "top-1 %", "× wall", "× per iteration"]
    head += ["same predictions as reference"]
    body = []
    for r in rows:
        body.append(
            [
                r.get("model"),
                r.get("method"),
                r.get("bits"),
                r.get("iters"),
                r.get("seed"),
                r.get("backend"),
                r.get("pd_tail_dtype", "float32"),
                fmt_num(r.get("wall_s")),
                fmt_num(r.get("dc_s")) if r.get("dc_s") is not None else "–",
                fmt_num(r.get("opt_s")),
                fmt_num(r.get("ms_per_iter")),
                fmt_num(r.get("top1")),
                fmt_ratio(_vs_reference(r, rows, "speedup_wall", "wall_s")),
                fmt_ratio(_vs_reference(r, rows, "speedup_iters", "ms_per_iter")),
                r.get("pred_agreement"),
            ]
        )
    return "\n".join(_md_table(head, body))


# --- packed-model latency (bench_packed_latency.py)


def _latency_kind(row: dict) -> str:
    name = str(row.get("impl") or row.get("format") or "").lower()
    if "fp32" in name or "float" in name:
        return "fp32"
    if "int8" in name:
        return "int8"
    if "packed" in name:
        return "packed"
    return "other"


def _hardware(row: dict) -> str:
    """The device string without its thread count ("AMD EPYC (2 logical cores, 1 torch threads)"
    -> "AMD EPYC (2 logical cores)")."""
    return re.sub(r",?\s*\d+\s+torch threads?", "", str(row.get("device", "?"))).strip()


def _bits_key(fmt: str) -> tuple:
    m = re.search(r"W(\d+)A(\d+)", fmt)
    return (-int(m.group(1)), -int(m.group(2))) if m else (0, 0)


@dataclass
class LatencyCell:
    row: dict
    ms: float
    x_fp32: float | None  # fp32 ms ÷ this, same run and batch
    x_int8: float | None  # int8 ms ÷ this, same run and batch (packed formats only)


@dataclass
class LatencyTable:
    model: str
    device: str
    batches: list[int]
    formats: list[str]
    cells: dict[tuple[str, int], LatencyCell]

    @property
    def rows(self) -> list[dict]:
        return [c.row for c in self.cells.values()]


LATENCY_RULE = (
    "Each cell is the newest measurement of its (model, device, threads, format, bit-width, "
    "backend, batch); the ratios divide by the fp32 / int8 time of the same run and batch. "
    "Packed rows of the `reference` backend (the unfused PyTorch fallback) are left out for a "
    "model that has packed rows of a kernel backend on the same CPU/GPU."
)


def latency_tables(rows: list[dict]) -> tuple[list[LatencyTable], list[str]]:
    """Latency rows -> one table per (model, device and threads) with a row per format (fp32,
    int8, each packed bit-width and backend) and a column per batch size; and notes on what was
    left out (see :data:`LATENCY_RULE`)."""
    valid, notes = [], []
    skipped = 0
    for r in rows:
        if latency_point(r) is None:
            skipped += 1
        else:
            valid.append(r)
    kernel_backends = {
        (r.get("model"), _hardware(r))
        for r in valid
        if _latency_kind(r) == "packed" and r.get("backend") not in (None, "reference")
    }

    def dropped(r):
        return (
            _latency_kind(r) == "packed"
            and r.get("backend") == "reference"
            and (r.get("model"), _hardware(r)) in kernel_backends
        )

    gone = [r for r in valid if dropped(r)]
    valid = [r for r in valid if not dropped(r)]
    if gone:
        runs = sorted({(str(r.get("model")), device_label(r), str(r.get("git_sha"))) for r in gone})
        notes.append(
            f"Left out: {len(gone)} `reference`-backend packed row(s) ("
            + "; ".join(f"{m} on {d}, git {s}" for m, d, s in runs)
            + ")."
        )
    if skipped:
        notes.append(f"{skipped} row(s) without format/batch/timing were left out.")
    sel = latest_per_key(
        valid,
        lambda r: (r.get("model"), device_label(r), _row_format(r), latency_point(r).batch),
    )
    tables = []
    empty = []
    for model, device in sorted({(str(r.get("model", "")), device_label(r)) for r in sel}):
        trs = [r for r in sel if (str(r.get("model", "")), device_label(r)) == (model, device)]
        if not any(_latency_kind(r) == "packed" for r in trs):
            empty.append(f"{model or 'model not recorded'} on {device}")
            continue
        cells: dict[tuple[str, int], LatencyCell] = {}
        for r in trs:
            pt = latency_point(r)
            ms = pt.median_s * 1e3
            kind = _latency_kind(r)
            x_fp32 = x_int8 = None
            if kind != "fp32":
                x_fp32 = _same_run_ratio(r, valid, "fp32", ms)
                if x_fp32 is None and _num(r.get("speedup_vs_fp32")):
                    x_fp32 = r["speedup_vs_fp32"]
            if kind == "packed":
                x_int8 = _same_run_ratio(r, valid, "int8", ms)
            cells[(pt.format, pt.batch)] = LatencyCell(r, ms, x_fp32, x_int8)
        order = {"fp32": 0, "int8": 1, "packed": 2, "other": 3}
        formats = sorted(
            {f for f, _ in cells},
            key=lambda f: (
                order[_latency_kind(next(c.row for (g, _), c in cells.items() if g == f))],
                _bits_key(f),
                f,
            ),
        )
        batches = sorted({b for _, b in cells})
        tables.append(LatencyTable(model, device, batches, formats, cells))
    if empty:
        notes.append(
            "No table for " + "; ".join(empty) + " (no packed row left: fp32 / int8 only)."
        )
    return tables, notes


def _same_run_ratio(row: dict, rows: list[dict], kind: str, ms: float) -> float | None:
    """Baseline (``kind``) ms ÷ ``ms`` for the baseline row of the same run, model, device and
    batch (the one with the same ``bits`` label when the run has several)."""
    pt = latency_point(row)
    base = [
        r
        for r in rows
        if _latency_kind(r) == kind
        and same_run(r, row)
        and r.get("model") == row.get("model")
        and device_label(r) == device_label(row)
        and latency_point(r).batch == pt.batch
    ]
    if not base or ms <= 0:
        return None
    b = next((r for r in base if r.get("bits") == row.get("bits")), base[-1])
    return latency_point(b).median_s * 1e3 / ms


def latency_table_markdown(t: LatencyTable) -> str:
    """Cells ``ms (×fp32, ×int8)``; † marks a packed row whose output differed from the reference
    backend's in its run (``validated: false``)."""
    head = ["format"] + [f"batch {b}" for b in t.batches]
    body, flagged = [], False
    for f in t.formats:
        row = [f]
        for b in t.batches:
            c = t.cells.get((f, b))
            if c is None:
                row.append("–")
                continue
            pairs = ((c.x_fp32, "fp32"), (c.x_int8, "int8"))
            extra = [f"{fmt_ratio(x)} {n}" for x, n in pairs if x is not None]
            cell = fmt_num(c.ms) + (f" ({', '.join(extra)})" if extra else "")
            if c.row.get("validated") is False:
                cell, flagged = cell + " †", True
            row.append(cell)
        body.append(row)
    lines = _md_table(head, body)
    if flagged:
        lines += ["", "† output differed from the reference backend's in that run (not validated)."]
    return "\n".join(lines)


def latency_table_points(tables: list[LatencyTable]) -> list[LatencyPoint]:
    return [pt for t in tables for c in t.cells.values() if (pt := latency_point(c.row))]


# --- GPU deployment kernels (bench_deploy_gpu.py)

_DEPLOY_SHAPE = ("M", "N", "K", "batch", "C", "HW", "O", "k", "groups")

DEPLOY_RULE = (
    "Only the newest run per (section, case, layout, shape, device) is shown; a case that a newer "
    "run skipped or failed replaces the older timings it stands for."
)

DEPLOY_GOALS_TEXT = (
    "Goals for comparison (the issue's): W4A16 ≥ 2.6× and W2A16 ≥ 3.5× cuBLAS fp16 at batch 1–16 "
    "on Llama-sized shapes; W4A4 conv/GEMM ≥ 1.6× fp16 at large batch."
)


@dataclass(frozen=True)
class DeployGoal:
    label: str
    section: str
    case: str | None  # None: every case of the section
    target: float  # speed-up over fp16
    max_m: int | None = None  # batch (M) range 1..max_m; None: every row of the section


DEPLOY_GOALS = (
    DeployGoal("W4A16", "wa16", "W4A16", 2.6, 16),
    DeployGoal("W2A16", "wa16", "W2A16", 3.5, 16),
    DeployGoal("W4A4 GEMM (`qmm`)", "qmm", "W4A4", 1.6),
    DeployGoal("W4A4 conv (`conv`)", "conv", None, 1.6),
)


def fmt_x(r: Any) -> str:
    """A ratio to three significant digits: ``1.25×``, ``0.946×``, ``12.3×``; ``–`` if missing."""
    return fmt_num(r) + "×" if _num(r) and r > 0 else "–"


def deploy_case(row: dict) -> str | None:
    """The row's ``case``; a wa16 row without one (a skipped shape) is named from ``bits``."""
    if row.get("case"):
        return str(row["case"])
    if str(row.get("section", "")).startswith("wa16") and _num(row.get("bits")):
        return f"W{row['bits']}A16"
    return None


def _deploy_fields(row: dict) -> dict[str, Any]:
    layout = row.get("layout", row.get("variant"))
    return {"case": deploy_case(row), "layout": layout, **{k: row.get(k) for k in _DEPLOY_SHAPE}}


def _deploy_covers(a: dict, b: dict) -> bool:
    """Same section and device, and no field on which the two rows name different values (a
    field a row leaves out, as a skipped shape's row leaves out M and layout, stands for all)."""
    if (a.get("section"), device_label(a)) != (b.get("section"), device_label(b)):
        return False
    fa, fb = _deploy_fields(a), _deploy_fields(b)
    return all(fa[k] is None or fb[k] is None or fa[k] == fb[k] for k in fa)


def _t_ms(row: dict, key: str) -> float | None:
    t = row.get(key)
    return t["median_s"] * 1e3 if _is_timing(t) and _num(t["median_s"]) else None


def deploy_speedup(row: dict) -> float | None:
    """fp16 ms ÷ ours of the row (one run); a sweep row has only ours: its ``speedup`` field (the
    same ratio, against its case's fp16 time in that run)."""
    ours, fp16 = _t_ms(row, "ours"), _t_ms(row, "fp16")
    if ours and fp16:
        return fp16 / ours
    return row["speedup"] if _num(row.get("speedup")) else None


def deploy_latest(rows: list[dict]) -> list[dict]:
    """Rows of ``bench_deploy_gpu.py`` (any number of runs) -> the rows of the newest run per
    (section, case, layout, shape, device), in input order (see :data:`DEPLOY_RULE`). Sweep rows
    are kept per candidate ``config``: all the candidates of the newest sweep run of a case."""
    rows = [r for r in rows if r.get("section")]

    def exact(r):
        cfg = r.get("config") if r.get("section") == "wa16-sweep" else None
        return (r.get("section"), device_label(r), tuple(_deploy_fields(r).items()), cfg)

    rows = latest_per_key(rows, exact)
    return [r for r in rows if not any(_when(s) > _when(r) and _deploy_covers(s, r) for s in rows)]


@dataclass
class DeployBest:
    row: dict  # the fastest timed row of its (case, shape, device)
    others: list[dict]  # the other timed layouts / input variants of it, fastest first


def deploy_fastest(rows: list[dict], section: str) -> list[DeployBest]:
    """Per (device, case, shape) of ``section``: the timed row with the smallest median of
    ``ours`` over its layouts (wa16) or input variants (conv), in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("section") == section and _t_ms(r, "ours") is not None:
            key = (device_label(r), deploy_case(r), *(r.get(k) for k in _DEPLOY_SHAPE))
            groups.setdefault(key, []).append(r)
    out = []
    for g in groups.values():
        g = sorted(g, key=lambda r: _t_ms(r, "ours"))
        out.append(DeployBest(g[0], g[1:]))
    return out


@dataclass
class SweepSummary:
    best: dict | None  # the candidate with the smallest median (None: every candidate failed)
    timed: int
    failed: int
    layouts: list[str]
    tuned: dict | None  # the wa16 row of the best candidate's layout (what the tuner chose)


def deploy_sweep_summaries(rows: list[dict]) -> list[SweepSummary]:
    """Per (device, case, M, N, K) of the ``wa16-sweep`` rows: the fastest candidate over every
    layout, how many candidates were timed and how many failed."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("section") == "wa16-sweep":
            key = (device_label(r), deploy_case(r), r.get("M"), r.get("N"), r.get("K"))
            groups.setdefault(key, []).append(r)
    out = []
    for g in groups.values():
        timed = sorted(
            (r for r in g if _t_ms(r, "ours") is not None), key=lambda r: _t_ms(r, "ours")
        )
        best = timed[0] if timed else None
        tuned = None
        if best is not None:
            tuned = next(
                (
                    r
                    for r in rows
                    if r.get("section") == "wa16"
                    and _t_ms(r, "ours") is not None
                    and device_label(r) == device_label(best)
                    and _deploy_fields(r) == _deploy_fields(best)
                ),
                None,
            )
        layouts = list(dict.fromkeys(str(r.get("layout")) for r in g if r.get("layout")))
        out.append(SweepSummary(best, len(timed), len(g) - len(timed), layouts, tuned))
    return out


def _nk(row: dict) -> str:
    return f"{row.get('N')}×{row.get('K')}" if row.get("N") and row.get("K") else "–"


def _conv_shape(row: dict) -> str:
    """``batch×C×H×W → O, k×k`` (and the groups when not 1)."""
    if not all(row.get(k) for k in ("batch", "C", "HW", "O", "k")):
        return "–"
    hw, k = row["HW"], row["k"]
    text = f"{row['batch']}×{row['C']}×{hw}×{hw} → {row['O']}, {k}×{k}"
    return text + (f", groups {row['groups']}" if row.get("groups") not in (None, 1) else "")


def _code(text: Any) -> str:
    return "`" + str(text).replace("`", "'") + "`"


def _deploy_error(err: Any) -> str:
    """What went wrong, shortly: the last line of the recorded exception text (the caret lines of
    a compile error dropped)."""
    text = str(err).strip()
    if text == "skipped":
        return "skipped, the run's per-section time cap (`--max-s`) was reached"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().strip("^~ ")]
    last = lines[-1] if lines else text
    return "failed, the recorded error ends in " + _code(last[:160])


def _deploy_cases(rows: list[dict]) -> str:
    """``12 case(s) (W4A4, W4A8; M 4096, 32768; N×K 3072×768, 768×3072)``."""

    def uniq(f):
        return list(dict.fromkeys(v for r in rows if (v := f(r)) not in (None, "–")))

    if rows and rows[0].get("section") == "conv":
        fields = [("", deploy_case), ("input", lambda r: r.get("variant"))]
    else:
        fields = [
            ("", deploy_case),
            ("layout", lambda r: r.get("layout")),
            ("M", lambda r: r.get("M")),
            ("N×K", lambda r: _nk(r) if r.get("N") else None),
        ]
    parts = []
    for name, f in fields:
        vals = uniq(f)
        if vals:
            parts.append((f"{name} " if name else "") + ", ".join(map(str, vals)))
    return f"{len(rows)} case(s) (" + "; ".join(parts) + ")"


def deploy_not_timed(rows: list[dict], section: str) -> list[str]:
    """One line per kind of error of ``section``'s error rows (``error`` field)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("section") == section and r.get("error") is not None:
            groups.setdefault(_deploy_error(r["error"]), []).append(r)
    return [f"Not timed, {_deploy_cases(g)}: {why}." for why, g in groups.items()]


def deploy_goal_status(rows: list[dict]) -> list[str]:
    """Per :data:`DEPLOY_GOALS`: the speed-ups of the timed rows in its scope (the fastest layout
    or input per case and shape) against the target; 'met' only if every timed one reaches it."""
    out = []
    for g in DEPLOY_GOALS:

        def scope(r, g=g):
            m = r.get("M")
            return (
                r.get("section") == g.section
                and (g.case is None or deploy_case(r) in (g.case, None))
                and (g.max_m is None or m is None or 1 <= m <= g.max_m)
            )

        best = [b.row for b in deploy_fastest(rows, g.section) if scope(b.row)]
        xs = [x for r in best if (x := deploy_speedup(r)) is not None]
        missing = len([r for r in rows if scope(r) and r.get("error") is not None])
        untimed = f"; {missing} case(s) not timed" if missing else ""
        if not xs:
            out.append(f"{g.label}: no timed row{untimed}: not shown to reach {g.target}×.")
            continue
        span = fmt_x(min(xs)) if len(xs) == 1 else f"{fmt_x(min(xs))} to {fmt_x(max(xs))}"
        below = sum(x < g.target for x in xs)
        verdict = (
            f"{below} below the {g.target}× goal: not met"
            if below
            else f"all at or above the {g.target}× goal"
        )
        out.append(f"{g.label}: {span} over {len(xs)} timed shape(s), {verdict}{untimed}.")
    return out


def deploy_markdown(rows: list[dict]) -> str:
    """The tables of one device's newest rows (:func:`deploy_latest`): goals status, wa16
    (fastest layout per shape), the wa16 sweep summary, qmm, conv; and what was not timed."""
    lines = ["Against the goals, from these rows:", ""]
    lines += [f"* {s}" for s in deploy_goal_status(rows)] + [""]
    wa16 = deploy_fastest(rows, "wa16")
    if wa16 or deploy_not_timed(rows, "wa16"):
        lines += [
            "**Weight-only linear, W4A16 / W2A16 (`wa16`)**: fp16 `F.linear` (cuBLAS) on the "
            "dequantized weights vs ours; per shape the fastest weight layout timed (the "
            "others' speed-ups in brackets) and its kernel configuration. HBM: bytes moved "
            "(ours: packed weights, scales, zeros, x and y; fp16: the fp16 weight) per "
            "second, as a fraction of the card's HBM peak" + _peak_text(rows) + ".",
            "",
        ]
    if wa16:
        head = ["case", "M", "N×K", "ours ms", "fp16 ms", "speed-up", "HBM ours", "HBM fp16"]
        head += ["layout (others)", "config"]
        body = []
        for b in wa16:
            r = b.row
            layout = _code(r.get("layout"))
            if b.others:
                others = ", ".join(
                    f"{o.get('layout')} {fmt_x(deploy_speedup(o))}" for o in b.others
                )
                layout += f" ({others})"
            body.append(
                [
                    deploy_case(r),
                    r.get("M"),
                    _nk(r),
                    fmt_num(_t_ms(r, "ours")),
                    fmt_num(_t_ms(r, "fp16")),
                    fmt_x(deploy_speedup(r)),
                    fmt_pct(r.get("hbm_frac")),
                    fmt_pct(r.get("fp16_hbm_frac")),
                    layout,
                    _code(r["config"]) if r.get("config") else "–",
                ]
            )
        lines += [*_md_table(head, body), ""]
    lines += [*(f"{s}\n" for s in deploy_not_timed(rows, "wa16"))]
    sweeps = deploy_sweep_summaries(rows)
    if sweeps:
        total = sum(s.timed for s in sweeps)
        failed = sum(s.failed for s in sweeps)
        lines += [
            f"**Configuration sweep (`wa16-sweep`, `--sweep`)**: {total} candidate configurations "
            f"timed ({failed} failed); per case and M the fastest, its speed-up over the case's "
            "fp16 time of the same run, and how many it was chosen from:",
            "",
        ]
        for s in sweeps:
            lines.append("* " + _sweep_line(s))
        lines.append("")
    for section, title, shape_head, shape in (
        (
            "qmm",
            "**Int8 tensor-core GEMM, W4A4 / W4A8 (`qmm`)**: fp16 `F.linear` (cuBLAS) vs "
            "ours (fused bias, ReLU and requantisation to codes).",
            ["M", "N", "K"],
            lambda r: [r.get("M"), r.get("N"), r.get("K")],
        ),
        (
            "conv",
            "**Conv (`conv`)**: fp16 `F.conv2d` channels-last (cuDNN) vs ours, from a "
            "channels-last or an NCHW input (the conversion timed inside the call).",
            ["shape (N×C×H×W → O, k×k)", "input"],
            lambda r: [_conv_shape(r), r.get("variant")],
        ),
    ):
        timed = [r for r in rows if r.get("section") == section and _t_ms(r, "ours") is not None]
        errors = deploy_not_timed(rows, section)
        if not timed and not errors:
            continue
        lines += [title, ""]
        if timed:
            head = ["case", *shape_head, "ours ms", "fp16 ms", "speed-up"]
            body = [
                [
                    deploy_case(r),
                    *shape(r),
                    fmt_num(_t_ms(r, "ours")),
                    fmt_num(_t_ms(r, "fp16")),
                    fmt_x(deploy_speedup(r)),
                ]
                for r in timed
            ]
            lines += [*_md_table(head, body), ""]
        else:
            lines += ["No timed row.", ""]
        lines += [*(f"{s}\n" for s in errors)]
    return "\n".join(lines).rstrip()


def _peak_text(rows: list[dict]) -> str:
    peaks = sorted(
        {
            round(r["GBps"] / r["hbm_frac"], -1)
            for r in rows
            if _num(r.get("GBps")) and _num(r.get("hbm_frac")) and r["hbm_frac"] > 0
        }
    )
    if not peaks:
        return ""
    return f" ({', '.join(fmt_num(p) for p in peaks)} GB/s: `benchmarks/common.GPU_HBM_PEAK`)"


def _sweep_line(s: SweepSummary) -> str:
    ref = s.best if s.best is not None else {}
    head = f"{ref.get('case', '–')} M = {ref.get('M', '–')}, {_nk(ref)}"
    if s.best is None:
        return f"{head}: all {s.failed} candidate(s) failed."
    b = s.best
    text = (
        f"{head}: {fmt_x(deploy_speedup(b))} ({fmt_num(_t_ms(b, 'ours'))} ms), layout "
        f"{_code(b.get('layout'))}, {_code(b.get('config'))}; best of {s.timed} timed"
    )
    if len(s.layouts) > 1:
        text += f" over layouts {', '.join(s.layouts)}"
    if s.failed:
        text += f", {s.failed} failed"
    t = s.tuned
    if t is not None:
        if t.get("config") == b.get("config"):
            text += (
                f". The table's `{t.get('layout')}` row ran the same config: "
                f"{fmt_x(deploy_speedup(t))} ({fmt_num(_t_ms(t, 'ours'))} ms)"
            )
        else:
            text += (
                f". The tuner chose {_code(t.get('config'))} for that layout: "
                f"{fmt_x(deploy_speedup(t))}"
            )
    return text + "."


# ----------------------------------------------------------------------------- sweep report


def write_sweep_report(grid, out: Path, *, failed: dict[str, str] | None = None) -> list[Path]:
    """``out/summary.csv``, ``runs.csv``, ``summary.md`` and ``plots/*.png`` for a grid's jobs.

    Only the grid's own job folders are read; jobs without a finished result are listed in
    summary.md (with the reason when this run saw them fail).
    """
    out = Path(out)
    failed = failed or {}
    runs, missing = [], []
    for j in grid.jobs:
        run = load_run(out / j.name)
        if run is None:
            missing.append(j.name)
        else:
            runs.append(run)
    written = [
        write_csv(out / "summary.csv", summary_rows(runs)),
        write_csv(out / "runs.csv", run_rows(runs)),
    ]
    gpath = grid.path if grid.path is not None else Path(f"{grid.name}.yaml")
    command = f"pdquant sweep {gpath} --out {out}"
    if runs:
        text = accuracy_markdown(
            runs, f"Sweep {grid.name}", grid.compare_ref, grid.compare_with, command
        )
    else:
        text = f"# Sweep {grid.name}\n\nGenerated by `{command}`; no job has finished yet."
    if grid.description:
        text = text.replace("\n\n", f"\n\n{grid.description.strip()}\n\n", 1)
    plots: list[Path] = []
    for model in sorted({r.model for r in runs}):
        mruns = [r for r in runs if r.model == model]
        plots.append(
            plot_accuracy_vs_bits(
                mruns, out / "plots" / f"accuracy_vs_bits_{model}.png", f"{grid.name}: {model}"
            )
        )
        plots.append(
            plot_calib_time(
                mruns,
                out / "plots" / f"calib_time_{model}.png",
                f"{grid.name}: {model}, calibration time per method",
            )
        )
    lat_files = expand_globs(grid.latency_globs)
    if lat_files:
        rows = load_bench_rows(lat_files)
        tables, notes = latency_tables(rows)
        if tables:  # bench_packed_latency rows: the README's tables (same rule, vs-int8 ratios)
            plots.append(
                plot_latency(latency_table_points(tables), out / "plots" / "latency_vs_batch.png")
            )
            text += "\n## Latency\n\n" + LATENCY_RULE + "\n"
            for t in tables:
                text += f"\n### {t.model or 'model not recorded'} on {t.device}\n\n"
                text += latency_table_markdown(t) + "\n"
            text += "".join(f"\n{n}\n" for n in notes)
        else:  # other latency rows: one generic table per model and device
            pts, skipped = latency_points(rows)
            if pts:
                plots.append(plot_latency(pts, out / "plots" / "latency_vs_batch.png"))
                text += "\n## Latency\n\n" + latency_markdown(pts) + "\n"
            if skipped:
                text += f"\n{skipped} latency row(s) without format/batch/timing were skipped.\n"
    if plots:
        text += "\n## Plots\n\n" + "\n".join(
            f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots
        )
        text += "\n"
    if missing:
        text += f"\n## Unfinished jobs ({len(missing)} of {len(grid.jobs)})\n\n"
        for name in missing:
            text += f"* {name}" + (f": {failed[name]}" if name in failed else "") + "\n"
    (out / "summary.md").write_text(text.rstrip() + "\n")
    return [*written, out / "summary.md", *plots]
