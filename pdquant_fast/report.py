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
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
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
    """Rows of ``.jsonl`` files (each row gets ``_file``: the file's stem, the suite name)."""
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
            if k not in ENV_KEYS and isinstance(v, (str, int, bool)) and not _is_timing(v)
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


def latency_points(rows: list[dict]) -> tuple[list[LatencyPoint], int]:
    """Latency points from benchmark rows (see the module docstring); returns (points, skipped).
    A ``threads`` field is folded into the device name (one panel per thread count)."""
    pts, skipped = [], 0
    for row in latest_rows(rows):
        batch = row.get("batch", row.get("batch_size"))
        fmt = _row_format(row)
        med, p10, p90 = _row_timing(row)
        if not isinstance(batch, int) or fmt is None or med is None:
            skipped += 1
            continue
        device = str(row.get("device", "?"))
        if isinstance(row.get("threads"), int) and "thread" not in device:
            device += f", {row['threads']} thread(s)"
        pts.append(
            LatencyPoint(
                model=str(row.get("model", "")),
                format=fmt,
                batch=batch,
                median_s=float(med),
                p10_s=p10,
                p90_s=p90,
                device=device,
            )
        )
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
        pts, skipped = latency_points(load_bench_rows(lat_files))
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
