"""``pdquant sweep GRID.yaml --out DIR``: run a grid of calibrations, resumably, then report.

A grid file (YAML) names the jobs; every job is one ``pdquant calibrate`` run in its own
subprocess (a crash or an out-of-memory kill stays inside that job) writing ``DIR/<job>/``::

    DIR/<job>/config.json      the resolved job (written first): options, command line
    DIR/<job>/calibrate.log    the job's stdout + stderr
    DIR/<job>/result.json      written atomically, last, by ``pdquant calibrate``
    DIR/<job>/eval_<name>.json one per ``extra_evals`` entry (``pdquant eval --out-json``)
    DIR/summary.csv, summary.md, runs.csv, plots/*.png    (pdquant_fast.report)

A job whose folder holds a complete ``result.json`` for the same resolved job is skipped, so an
interrupted sweep, rerun, finishes only what was missing; a job interrupted after
``pdquant calibrate`` wrote a checkpoint (``<job>/checkpoint/args.json``) is continued with
``calibrate --resume``. A folder written for a different job is an error that names both; so is
a grid key or value that is not allowed. Folders made before ``pdquant sweep`` existed (a
``result.json`` without ``config.json``, e.g. ``benchmarks/results/*``) are checked against the
job on what result.json records: model, method, bits, iterations, seed, DC steps, calibration
size, batch size, preset, every ``set`` value, and the weights (path or sha256).

Grid file
=========

Scalars apply to every job; the plural keys are axes whose product is the job list::

    name: smoke                       # optional (default: the file name)
    model: cifar_resnet20             # or `models:` (below)
    weights: ${PDQUANT_SHARED_DATA:-../shared/data}/cifar10/models/akamaster_resnet/...th
    data: ${PDQUANT_SHARED_DATA:-../shared/data}/cifar10/convnetjs_png
    split: train                      # calibrate --split
    calib_size: 64                    # int or list (axis)
    eval_data: [.../convnetjs_png]    # str or list: every job is evaluated on each
    eval_split: test
    eval_size: 100
    eval_offset: 0
    preset: null                      # default: per model
    batch_size: 32
    threads: 1                        # torch threads per job (default: cores // workers)
    methods: [qdrop, pdquant]         # axis: rtn | adaround | brecq | qdrop | pdquant
    bits: ["4/4", "2/4"]              # axis: "W/A", "W4A4" or [W, A]
    iters: 20                         # int or list (axis); iterations per unit
    dc_iters: 5                       # int or list (axis); distribution-correction steps
    seeds: [1005, 1006]               # int or list (axis)
    set: {act_init_max_elems: 262144} # extra `--set KEY=VALUE` for every job
    variants:                         # optional named override sets (ablations)
      lambr1: {set: {lamb_r: 1.0}, methods: [pdquant]}   # job label "pdquant-lambr1"
    variants_only: false              # true: run only the variants, not the plain methods
    extra_evals:                      # optional `pdquant eval` after calibration
      jpeg10k: {data: ..., split: test, eval_size: null, skip_fp: false, methods: [...]}
    models:                           # optional: several models, each with its own options
      - {model: cifar_resnet20, weights: ..., data: ..., tag: r20}
    compare: {ref: qdrop, with: [pdquant]}   # paired McNemar tests in summary.md
    latency_results: benchmarks/results/*latency*.jsonl  # rows for the latency plot (glob/list)

``${VAR}`` and ``${VAR:-default}`` are expanded in path values (weights, data, eval_data,
extra_evals data); relative paths are taken from the current directory (run from the
repository root). Paths are checked before anything runs; ``foolbox:<set>`` needs no path.

Job folders are named ``<label>_w<W>a<A>_s<seed>`` (label = method, or ``method-variant``),
with ``_<model tag>``, ``_it<iters>``, ``_dc<steps>``, ``_n<calib size>`` appended for the axes
that have more than one value. Jobs run seed by seed (every method of the first seed before
the second), in the order the grid lists bits and methods.

Testing hook: ``PDQUANT_SWEEP_CLI`` (a shell-quoted command prefix) replaces
``python -m pdquant_fast.cli``; the sweep appends ``calibrate ...`` / ``eval ...`` to it.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "GridError",
    "Grid",
    "Job",
    "SweepOutcome",
    "load_grid",
    "parse_grid",
    "job_status",
    "run_sweep",
]

CLI_ENV = "PDQUANT_SWEEP_CLI"

# Keys a job option may take, at the top level and in each `models:` entry.
_JOB_OPTION_KEYS = (
    "model",
    "weights",
    "preset",
    "data",
    "split",
    "calib_size",
    "eval_data",
    "eval_split",
    "eval_size",
    "eval_offset",
    "batch_size",
    "threads",
)
_TOP_KEYS = (
    *_JOB_OPTION_KEYS,
    "name",
    "description",
    "models",
    "methods",
    "bits",
    "iters",
    "dc_iters",
    "seeds",
    "set",
    "variants",
    "variants_only",
    "extra_evals",
    "compare",
    "latency_results",
)
_MODEL_ENTRY_KEYS = (*_JOB_OPTION_KEYS, "tag")
_VARIANT_KEYS = ("set", "methods")
_EXTRA_EVAL_KEYS = ("data", "split", "eval_size", "skip_fp", "methods")
_COMPARE_KEYS = ("ref", "with")
_PATH_KEYS = ("weights", "data", "eval_data")
DEFAULT_LATENCY_GLOB = "benchmarks/results/*latency*.jsonl"


class GridError(ValueError):
    """A grid file that cannot be run: names the bad key or value and what is allowed."""


@dataclass(frozen=True)
class ExtraEval:
    """A ``pdquant eval RUN --data DATA --out-json RUN/eval_<name>.json`` after calibration."""

    name: str
    data: str
    split: str | None = None
    eval_size: int | None = None
    skip_fp: bool = False
    methods: tuple[str, ...] | None = None  # None: every method

    def argv(self, run_dir: Path) -> list[str]:
        cmd = ["eval", str(run_dir), "--data", self.data]
        if self.split:
            cmd += ["--split", self.split]
        if self.eval_size is not None:
            cmd += ["--eval-size", str(self.eval_size)]
        if self.skip_fp:
            cmd.append("--skip-fp")
        return cmd + ["--out-json", str(run_dir / f"eval_{self.name}.json")]


@dataclass(frozen=True)
class Job:
    """One ``pdquant calibrate`` run of a grid; :meth:`spec` is its identity."""

    name: str
    label: str  # method, or "method-variant"
    model: str
    method: str
    w_bits: int
    a_bits: int
    iters: int
    dc_iters: int | None
    seed: int
    calib_size: int | None
    variant: str | None = None
    weights: str | None = None
    preset: str | None = None
    data: str | None = None
    split: str | None = None
    eval_data: tuple[str, ...] = ()
    eval_split: str | None = None
    eval_size: int | None = None
    eval_offset: int = 0
    batch_size: int | None = None
    threads: int | None = None
    settings: tuple[tuple[str, Any], ...] = ()  # merged `set` + variant overrides, sorted
    extra_evals: tuple[ExtraEval, ...] = ()

    def spec(self) -> dict:
        """The resolved options that decide the job's result (config.json ``job``).

        ``threads`` is left out: it changes the speed, not what is computed.
        """
        return {
            "label": self.label,
            "model": self.model,
            "weights": self.weights,
            "preset": self.preset,
            "data": self.data,
            "split": self.split,
            "calib_size": self.calib_size,
            "eval_data": list(self.eval_data),
            "eval_split": self.eval_split,
            "eval_size": self.eval_size,
            "eval_offset": self.eval_offset,
            "method": self.method,
            "variant": self.variant,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "iters": self.iters,
            "dc_iters": self.dc_iters,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "set": dict(self.settings),
        }

    def calibrate_argv(self, out_dir: Path, threads: int) -> list[str]:
        """Arguments after ``pdquant`` for this job's ``calibrate`` call."""
        cmd = ["calibrate", "--model", self.model]
        for flag, val in (
            ("--weights", self.weights),
            ("--data", self.data),
            ("--split", self.split),
            ("--calib-size", self.calib_size),
        ):
            if val is not None:
                cmd += [flag, str(val)]
        for spec in self.eval_data:
            cmd += ["--eval-data", spec]
        for flag, val in (
            ("--eval-split", self.eval_split),
            ("--eval-size", self.eval_size),
            ("--eval-offset", self.eval_offset or None),
            ("--preset", self.preset),
            ("--batch-size", self.batch_size),
        ):
            if val is not None:
                cmd += [flag, str(val)]
        cmd += ["--method", self.method, "--w-bits", str(self.w_bits)]
        cmd += ["--a-bits", str(self.a_bits), "--iters", str(self.iters)]
        if self.dc_iters is not None:
            cmd += ["--dc-iters", str(self.dc_iters)]
        cmd += ["--seed", str(self.seed), "--threads", str(threads), "--no-progress"]
        for key, val in self.settings:
            cmd += ["--set", f"{key}={json.dumps(val)}"]
        return cmd + ["--out", str(out_dir)]


@dataclass
class Grid:
    """A parsed grid: its jobs (in run order) and the reporting options."""

    name: str
    path: Path | None
    jobs: list[Job]
    description: str = ""
    compare_ref: str = "qdrop"
    compare_with: tuple[str, ...] = ("pdquant",)
    latency_globs: tuple[str, ...] = (DEFAULT_LATENCY_GLOB,)


# ----------------------------------------------------------------------------- grid parsing


def load_grid(path: str | Path, *, check_paths: bool = True) -> Grid:
    """Read and validate a grid file; see the module docstring for its keys.

    Raises :class:`GridError` naming the file, the key and the allowed values.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise GridError(f"cannot read grid file {path}: {exc.strerror or exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GridError(f"grid {path} is not valid YAML: {exc}") from exc
    return parse_grid(raw, source=str(path), path=path, check_paths=check_paths)


def parse_grid(
    raw: Any,
    *,
    source: str = "grid",
    path: Path | None = None,
    check_paths: bool = True,
    env: dict[str, str] | None = None,
) -> Grid:
    """Validate a grid mapping (as loaded from YAML) and expand it into jobs."""
    from .config import METHODS

    env = dict(os.environ if env is None else env)
    where = f"grid {source}"
    if not isinstance(raw, dict):
        raise GridError(f"{where}: the file must hold a mapping of keys (got {_tname(raw)})")
    _check_keys(raw, _TOP_KEYS, where)

    name = _opt_str(raw, "name", where) or (path.stem if path else "sweep")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise GridError(f"{where}: key 'name' must be letters, digits, '_', '-', '.': {name!r}")
    methods = _str_list(raw, "methods", where, required=True)
    for i, m in enumerate(methods):
        if m not in METHODS:
            raise GridError(f"{where}: methods[{i}] is {m!r}; allowed: {', '.join(METHODS)}")
    bits = _bits_list(raw, where)
    iters = _int_list(raw, "iters", where, required=True, minimum=1)
    dc_iters = _int_list(raw, "dc_iters", where, required=False, minimum=0) or [None]
    seeds = _int_list(raw, "seeds", where, required=True, minimum=0)
    settings = _settings(raw.get("set"), "set", where)
    variants = _variants(raw.get("variants"), where, METHODS)
    variants_only = raw.get("variants_only", False)
    if not isinstance(variants_only, bool):
        raise GridError(
            f"{where}: key 'variants_only' must be true or false, got {variants_only!r}"
        )
    if variants_only and not variants:
        raise GridError(f"{where}: key 'variants_only' is true but 'variants' is empty")
    extra = _extra_evals(raw.get("extra_evals"), where, env, check_paths, METHODS)
    ref, cmps = _compare(raw.get("compare"), where)
    lat = raw.get("latency_results", DEFAULT_LATENCY_GLOB)
    lat_globs = [lat] if isinstance(lat, str) else lat
    if not isinstance(lat_globs, list) or not all(isinstance(g, str) for g in lat_globs):
        raise GridError(f"{where}: key 'latency_results' must be a glob or a list of globs")

    base = {k: raw[k] for k in _JOB_OPTION_KEYS if k in raw}
    if "models" in raw:
        entries = raw["models"]
        if not isinstance(entries, list) or not entries:
            raise GridError(f"{where}: key 'models' must be a non-empty list of mappings")
        models = []
        for i, e in enumerate(entries):
            w = f"{where}: models[{i}]"
            if not isinstance(e, dict):
                raise GridError(f"{w} must be a mapping of job options, got {_tname(e)}")
            _check_keys(e, _MODEL_ENTRY_KEYS, w)
            models.append((w, {**base, **e}))
    else:
        models = [(where, base)]
    options = [_job_options(opts, w, env, check_paths) for w, opts in models]
    tags = [o["tag"] for o in options]
    dup = sorted({t for t in tags if tags.count(t) > 1})
    if dup:
        raise GridError(
            f"{where}: models {dup} appear more than once; give each entry a distinct 'tag'"
        )
    calib_sizes = sorted({c for o in options for c in o["calib_sizes"]}, key=str)

    labels: list[tuple[str, str | None, dict]] = []
    for m in methods:
        if not variants_only:
            labels.append((m, None, {}))
        for vname, (vset, vmethods) in variants.items():
            if vmethods is None or m in vmethods:
                labels.append((m, vname, vset))

    option_keys = ("weights", "preset", "data", "split", "eval_data", "eval_split", "eval_size")
    option_keys += ("eval_offset", "batch_size", "threads")
    jobs: list[Job] = []
    # seed outermost: every method of the first seed finishes before the second seed starts
    for seed, opts, (wb, ab), it, dc in itertools.product(seeds, options, bits, iters, dc_iters):
        for cs, (m, vname, vset) in itertools.product(opts["calib_sizes"], labels):
            label = m if vname is None else f"{m}-{vname}"
            job_name = f"{label}_w{wb}a{ab}_s{seed}"
            for many, suffix in (
                (len(options) > 1, f"_{opts['tag']}"),
                (len(iters) > 1, f"_it{it}"),
                (len(dc_iters) > 1, f"_dc{dc}"),
                (len(calib_sizes) > 1, f"_n{cs}"),
            ):
                if many:
                    job_name += suffix
            jobs.append(
                Job(
                    name=job_name,
                    label=label,
                    model=opts["model"],
                    method=m,
                    variant=vname,
                    w_bits=wb,
                    a_bits=ab,
                    iters=it,
                    dc_iters=dc,
                    seed=seed,
                    calib_size=cs,
                    settings=tuple(sorted({**settings, **vset}.items())),
                    extra_evals=tuple(e for e in extra if e.methods is None or m in e.methods),
                    **{k: opts[k] for k in option_keys},
                )
            )
    seen: dict[str, Job] = {}
    for j in jobs:
        if j.name in seen:
            raise GridError(
                f"{where}: two jobs would share the folder {j.name!r} "
                "(a method, bit-width, seed or variant listed twice?)"
            )
        seen[j.name] = j
    _validate_configs(jobs, where)
    return Grid(
        name=name,
        path=path,
        jobs=jobs,
        description=_opt_str(raw, "description", where) or "",
        compare_ref=ref,
        compare_with=cmps,
        latency_globs=tuple(lat_globs),
    )


def _tname(v: Any) -> str:
    return "nothing" if v is None else type(v).__name__


def _check_keys(d: dict, allowed: tuple[str, ...], where: str) -> None:
    for k in d:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise GridError(f"{where}: unknown key {k!r}{hint}; allowed keys: {', '.join(allowed)}")


def _opt_str(d: dict, key: str, where: str) -> str | None:
    v = d.get(key)
    if v is not None and not isinstance(v, str):
        raise GridError(f"{where}: key {key!r} must be a string, got {v!r}")
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(d: dict, key: str, where: str, *, required: bool, minimum: int) -> list[int]:
    if key not in d or d[key] is None:
        if required:
            raise GridError(f"{where}: key {key!r} is required (an integer or a list of them)")
        return []
    v = d[key]
    vals = v if isinstance(v, list) else [v]
    if not vals:
        raise GridError(f"{where}: key {key!r} is an empty list")
    for i, x in enumerate(vals):
        if not _is_int(x) or x < minimum:
            at = f"{key}[{i}]" if isinstance(v, list) else key
            raise GridError(
                f"{where}: key {at!r} must be an integer >= {minimum} (or a list of them), "
                f"got {x!r}"
            )
    return vals


def _str_list(d: dict, key: str, where: str, *, required: bool) -> list[str]:
    if key not in d or d[key] is None:
        if required:
            raise GridError(f"{where}: key {key!r} is required (a string or a list of them)")
        return []
    v = d[key]
    vals = v if isinstance(v, list) else [v]
    if not vals:
        raise GridError(f"{where}: key {key!r} is an empty list")
    for i, x in enumerate(vals):
        if not isinstance(x, str):
            raise GridError(f"{where}: {key}[{i}] must be a string, got {x!r}")
    return vals


_BITS_RE = re.compile(r"^\s*[Ww]?(\d+)\s*(?:/|[Aa]|\s*x\s*)\s*(\d+)\s*$")


def _bits_list(d: dict, where: str) -> list[tuple[int, int]]:
    allowed = 'each entry "W/A" (e.g. "4/4"), "W4A4" or [W, A]'
    if "bits" not in d or d["bits"] is None:
        raise GridError(f"{where}: key 'bits' is required: a list, {allowed}")
    v = d["bits"]
    vals = v if isinstance(v, list) and (not v or isinstance(v[0], (list, str))) else [v]
    if not vals:
        raise GridError(f"{where}: key 'bits' is an empty list")
    out = []
    for i, x in enumerate(vals):
        pair = None
        if isinstance(x, str):
            m = _BITS_RE.match(x)
            if m:
                pair = (int(m.group(1)), int(m.group(2)))
        elif isinstance(x, list) and len(x) == 2 and all(_is_int(b) for b in x):
            pair = (x[0], x[1])
        if pair is None:
            raise GridError(f"{where}: bits[{i}] is {x!r}; {allowed}")
        out.append(pair)
    return out


def _settings(v: Any, key: str, where: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise GridError(
            f"{where}: key {key!r} must be a mapping of config settings to values "
            f"(e.g. {{pd_loss: false}}), got {v!r}"
        )
    for k, x in v.items():
        if not isinstance(k, str):
            raise GridError(f"{where}: key {key!r} has a non-string setting name {k!r}")
        if x is not None and not isinstance(x, (bool, int, float, str)):
            raise GridError(f"{where}: {key}.{k} must be a scalar (or null), got {x!r}")
    return dict(v)


def _variants(v: Any, where: str, methods: tuple[str, ...]) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise GridError(f"{where}: key 'variants' must map a name to {{set: ..., methods: ...}}")
    out = {}
    for name, body in v.items():
        w = f"{where}: variants.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.]+", name):
            raise GridError(f"{w}: a variant name must be letters, digits, '_' or '.'")
        if not isinstance(body, dict):
            raise GridError(f"{w} must be a mapping with keys {', '.join(_VARIANT_KEYS)}")
        _check_keys(body, _VARIANT_KEYS, w)
        if not body.get("set"):
            raise GridError(f"{w}: key 'set' (the settings this variant changes) is required")
        vm = _str_list(body, "methods", w, required=False) or None
        for i, m in enumerate(vm or []):
            if m not in methods:
                raise GridError(f"{w}: methods[{i}] is {m!r}; allowed: {', '.join(methods)}")
        out[name] = (_settings(body["set"], f"variants.{name}.set", where), vm)
    return out


def _extra_evals(v: Any, where: str, env: dict, check: bool, methods) -> list[ExtraEval]:
    if v is None:
        return []
    if not isinstance(v, dict):
        raise GridError(f"{where}: key 'extra_evals' must map a name to {{data: ..., ...}}")
    out = []
    for name, body in v.items():
        w = f"{where}: extra_evals.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise GridError(f"{w}: a name must be letters, digits, '_', '-' or '.'")
        if not isinstance(body, dict):
            raise GridError(f"{w} must be a mapping with keys {', '.join(_EXTRA_EVAL_KEYS)}")
        _check_keys(body, _EXTRA_EVAL_KEYS, w)
        if not isinstance(body.get("data"), str):
            raise GridError(f"{w}: key 'data' (a labelled image folder or list) is required")
        data = _resolve_path(body["data"], f"extra_evals.{name}.data", where, env, check)
        size = body.get("eval_size")
        if size is not None and (not _is_int(size) or size < 1):
            raise GridError(f"{w}: key 'eval_size' must be a positive integer, got {size!r}")
        skip_fp = body.get("skip_fp", False)
        if not isinstance(skip_fp, bool):
            raise GridError(f"{w}: key 'skip_fp' must be true or false, got {skip_fp!r}")
        em = _str_list(body, "methods", w, required=False) or None
        for i, m in enumerate(em or []):
            if m not in methods:
                raise GridError(f"{w}: methods[{i}] is {m!r}; allowed: {', '.join(methods)}")
        out.append(
            ExtraEval(
                name=name,
                data=data,
                split=_opt_str(body, "split", w),
                eval_size=size,
                skip_fp=skip_fp,
                methods=tuple(em) if em else None,
            )
        )
    return out


def _compare(v: Any, where: str) -> tuple[str, tuple[str, ...]]:
    if v is None:
        return "qdrop", ("pdquant",)
    if not isinstance(v, dict):
        raise GridError(f"{where}: key 'compare' must be a mapping {{ref: LABEL, with: [LABEL]}}")
    _check_keys(v, _COMPARE_KEYS, f"{where}: compare")
    ref = v.get("ref", "qdrop")
    if not isinstance(ref, str):
        raise GridError(f"{where}: compare.ref must be a job label (e.g. qdrop), got {ref!r}")
    return ref, tuple(_str_list(v, "with", f"{where}: compare", required=False) or ["pdquant"])


_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: str, key: str, where: str, env: dict) -> str:
    def sub(m: re.Match) -> str:
        var, default = m.group(1), m.group(2)
        if env.get(var):
            return env[var]
        if default is not None:
            return default
        raise GridError(
            f"{where}: key {key!r} uses ${{{var}}}, which is not set; set it or write "
            f"${{{var}:-DEFAULT}}"
        )

    return _VAR_RE.sub(sub, value)


def _resolve_path(value: str, key: str, where: str, env: dict, check: bool) -> str:
    if value.startswith("foolbox:"):
        return value
    expanded = _expand(value, key, where, env)
    p = Path(expanded).expanduser()
    p = p.resolve() if p.is_absolute() else (Path.cwd() / p).resolve()
    if check and not p.exists():
        note = ""
        if "PDQUANT_SHARED_DATA" in value:
            note = (
                " (PDQUANT_SHARED_DATA is "
                + (f"{env['PDQUANT_SHARED_DATA']!r}" if env.get("PDQUANT_SHARED_DATA") else "unset")
                + "; relative paths are taken from the current directory "
                f"{Path.cwd()})"
            )
        raise GridError(f"{where}: key {key!r}: {p} does not exist{note}")
    return str(p)


def _job_options(opts: dict, where: str, env: dict, check: bool) -> dict:
    from .models.cifar_resnet import check_cifar_depth

    model = opts.get("model")
    if not isinstance(model, str):
        raise GridError(
            f"{where}: key 'model' is required: cifar_resnet<6n+2> (e.g. cifar_resnet20) or "
            "efficientnet_lite0"
        )
    m = re.fullmatch(r"cifar_resnet(\d+)", model)
    if m:
        try:
            check_cifar_depth(int(m.group(1)))
        except ValueError as exc:
            raise GridError(f"{where}: key 'model': {exc}") from exc
    elif model != "efficientnet_lite0":
        raise GridError(
            f"{where}: key 'model' is {model!r}; allowed: cifar_resnet<6n+2> (e.g. "
            "cifar_resnet20, cifar_resnet56) or efficientnet_lite0"
        )
    out: dict[str, Any] = {"model": model, "tag": opts.get("tag", model)}
    if not isinstance(out["tag"], str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", out["tag"]):
        raise GridError(f"{where}: key 'tag' must be letters, digits, '_', '-' or '.'")
    for key in ("weights", "data"):
        v = opts.get(key)
        if v is not None and not isinstance(v, str):
            raise GridError(f"{where}: key {key!r} must be a path string, got {v!r}")
        out[key] = None if v is None else _resolve_path(v, key, where, env, check)
    ev = opts.get("eval_data")
    evs = [] if ev is None else ev if isinstance(ev, list) else [ev]
    for i, e in enumerate(evs):
        if not isinstance(e, str):
            raise GridError(f"{where}: eval_data[{i}] must be a path string, got {e!r}")
    out["eval_data"] = tuple(
        _resolve_path(e, f"eval_data[{i}]", where, env, check) for i, e in enumerate(evs)
    )
    for key in ("preset", "split", "eval_split"):
        out[key] = _opt_str(opts, key, where)
    if out["preset"] is not None:
        from .config import PRESETS

        if out["preset"] not in PRESETS:
            raise GridError(
                f"{where}: key 'preset' is {out['preset']!r}; allowed: {', '.join(PRESETS)}"
            )
    for key, minimum in (("eval_size", 1), ("batch_size", 1), ("threads", 1)):
        v = opts.get(key)
        if v is not None and (not _is_int(v) or v < minimum):
            raise GridError(f"{where}: key {key!r} must be an integer >= {minimum}, got {v!r}")
        out[key] = v
    off = opts.get("eval_offset", 0)
    if not _is_int(off) or off < 0:
        raise GridError(f"{where}: key 'eval_offset' must be an integer >= 0, got {off!r}")
    out["eval_offset"] = off
    out["calib_sizes"] = _int_list(opts, "calib_size", where, required=False, minimum=1) or [None]
    return out


def _validate_configs(jobs: list[Job], where: str) -> None:
    """Every (method, bits, settings) must make a valid CalibConfig: checked before running."""
    from .config import make_config
    from .quant import QuantConfigError

    seen = set()
    for j in jobs:
        key = (j.method, j.w_bits, j.a_bits, j.preset, j.settings, j.variant)
        if key in seen:
            continue
        seen.add(key)
        overrides = dict(j.settings)
        overrides.update(iters=j.iters, seed=j.seed)
        if j.dc_iters is not None:
            overrides["dc_iters"] = j.dc_iters
        if j.batch_size is not None:
            overrides["batch_size"] = j.batch_size
        try:
            make_config(j.method, preset=j.preset, w_bits=j.w_bits, a_bits=j.a_bits, **overrides)
        except (QuantConfigError, TypeError, ValueError) as exc:
            origin = f"variants.{j.variant}.set / set" if j.variant else "set / bits"
            raise GridError(
                f"{where}: job {j.name} ({origin}) is not a valid configuration: {exc}"
            ) from exc


# ----------------------------------------------------------------------------- job folders


def _result_complete(path: Path) -> dict | None:
    """The parsed result.json if it is a finished run's, else None."""
    try:
        r = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    needed = ("top1", "calib_seconds", "config", "finished", "method", "w_bits", "a_bits")
    if not isinstance(r, dict) or any(k not in r for k in needed):
        return None
    return r


def _describe_diff(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    diffs = [
        f"{k}: {a.get(k)!r} there, {b.get(k)!r} in this grid" for k in keys if a.get(k) != b.get(k)
    ]
    return "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")


def _legacy_mismatch(job: Job, r: dict) -> dict:
    """Fields where a result.json without config.json (runs made before ``pdquant sweep``)
    disagrees with ``job``: {field: (recorded, wanted)}."""
    cfg = r.get("config", {})
    out = {}
    pairs = {
        "model": (r.get("model"), job.model),
        "method": (r.get("method"), job.method),
        "w_bits": (r.get("w_bits"), job.w_bits),
        "a_bits": (r.get("a_bits"), job.a_bits),
        "iters": (r.get("iters"), job.iters),
        "seed": (r.get("seed"), job.seed),
    }
    if job.dc_iters is not None:
        pairs["dc_iters"] = (cfg.get("dc_iters"), job.dc_iters)
    if job.calib_size is not None:
        pairs["calib_size"] = (r.get("calib_size"), job.calib_size)
    if job.batch_size is not None:
        pairs["batch_size"] = (cfg.get("batch_size"), job.batch_size)
    if job.preset is not None:
        pairs["preset"] = (cfg.get("preset"), job.preset)
    for k, v in job.settings:
        pairs[f"set.{k}"] = (cfg.get(k), v)
    for k, (have, want) in pairs.items():
        if have != want:
            out[k] = (have, want)
    if job.weights is not None and r.get("weights") != job.weights:
        want_sha = _sha256(job.weights) if Path(job.weights).is_file() else None
        if want_sha is None or want_sha != r.get("weights_sha256"):
            out["weights"] = (r.get("weights"), job.weights)
    return out


def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def job_status(job: Job, folder: Path) -> str:
    """``"done"``, ``"evals"`` (calibrated, some extra evaluation missing) or ``"todo"``.

    Raises :class:`GridError` when the folder was written for a different job.
    """
    cfg_path = folder / "config.json"
    result = _result_complete(folder / "result.json")
    if cfg_path.exists():
        try:
            have = json.loads(cfg_path.read_text())["job"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise GridError(
                f"{cfg_path} is unreadable ({exc}); move the folder away or delete it"
            ) from exc
        if have != job.spec():
            raise GridError(
                f"{folder} holds a different job than this grid's {job.name}: "
                f"{_describe_diff(have, job.spec())}. Use another --out folder, or delete "
                f"{folder} to rerun it"
            )
    elif result is not None:
        bad = _legacy_mismatch(job, result)
        if bad:
            desc = "; ".join(f"{k}: {h!r} there, {w!r} in this grid" for k, (h, w) in bad.items())
            raise GridError(
                f"{folder}/result.json is from a different job than this grid's {job.name}: "
                f"{desc}. Use another --out folder, or delete {folder} to rerun it"
            )
    if result is None:
        return "todo"
    if any(not (folder / f"eval_{e.name}.json").exists() for e in job.extra_evals):
        return "evals"
    return "done"


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- running


@dataclass
class SweepOutcome:
    """What a sweep did: job names by what happened to them, and the wall time."""

    skipped: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> reason
    wall_s: float = 0.0
    report_files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def cli_prefix() -> list[str]:
    """``python -m pdquant_fast.cli``, or ``$PDQUANT_SWEEP_CLI`` (tests inject a stub)."""
    env = os.environ.get(CLI_ENV)
    if env:
        return shlex.split(env)
    return [sys.executable, "-m", "pdquant_fast.cli"]


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


@dataclass
class _Running:
    job: Job
    index: int
    steps: list[tuple[str, list[str]]]  # (log name, argv)
    step: int
    proc: subprocess.Popen
    log: Any
    t0: float


def run_sweep(
    grid: Grid,
    out: str | Path,
    *,
    workers: int = 1,
    dry_run: bool = False,
    report: bool = True,
    cli: list[str] | None = None,
    echo: Callable[[str], None] = print,
    poll_s: float = 0.2,
) -> SweepOutcome:
    """Run the grid's unfinished jobs (``workers`` at a time), then write the report.

    Every job folder is checked before anything starts (a folder holding a different job raises
    :class:`GridError`). ``cli`` overrides the command prefix (default :func:`cli_prefix`).
    On KeyboardInterrupt or SIGTERM the running jobs are terminated and the exception propagates;
    their folders keep no result.json, so the next run redoes them.
    """
    if workers < 1:
        raise GridError(f"--workers must be >= 1, got {workers}")
    out = Path(out)
    prefix = list(cli) if cli is not None else cli_prefix()
    t_start = time.perf_counter()
    outcome = SweepOutcome()
    statuses = {j.name: job_status(j, out / j.name) for j in grid.jobs}
    todo = [j for j in grid.jobs if statuses[j.name] != "done"]
    outcome.skipped = [j.name for j in grid.jobs if statuses[j.name] == "done"]
    threads_default = default_threads(workers)
    echo(
        f"sweep {grid.name}: {len(grid.jobs)} jobs, {len(outcome.skipped)} already finished, "
        f"{len(todo)} to run in {out} ({workers} at a time)"
    )
    if dry_run:
        for j in grid.jobs:
            threads = j.threads or threads_default
            argv = j.calibrate_argv(out / j.name, threads)
            state = statuses[j.name]
            echo(f"  [{state}] {j.name}: pdquant {shlex.join(argv)}")
            for e in j.extra_evals:
                echo(f"          then: pdquant {shlex.join(e.argv(out / j.name))}")
        return outcome
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GridError(f"output folder {out} cannot be created: {exc.strerror or exc}") from exc

    pending = list(enumerate(todo, 1))
    running: list[_Running] = []

    def start(index: int, job: Job) -> _Running:
        folder = out / job.name
        folder.mkdir(parents=True, exist_ok=True)
        threads = job.threads or threads_default
        steps = []
        if statuses[job.name] == "todo":
            argv = job.calibrate_argv(folder, threads)
            _write_json_atomic(
                folder / "config.json",
                {
                    "job": job.spec(),
                    "name": job.name,
                    "grid": str(grid.path) if grid.path else None,
                    "grid_name": grid.name,
                    "command": ["pdquant", *argv],
                    "threads": threads,
                    "extra_evals": [e.__dict__ for e in job.extra_evals],
                    "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                },
            )
            if (folder / "checkpoint" / "args.json").is_file():
                # an interrupted calibrate left a checkpoint: continue from its last unit
                argv += ["--resume", str(folder)]
            steps.append(("calibrate", argv))
        for e in job.extra_evals:
            if not (folder / f"eval_{e.name}.json").exists():
                steps.append((f"eval_{e.name}", [*e.argv(folder), "--threads", str(threads)]))
        echo(f"[{index}/{len(todo)}] {job.name}: start ({', '.join(s for s, _ in steps)})")
        return _launch(_Running(job, index, steps, 0, None, None, time.perf_counter()))

    def _launch(r: _Running) -> _Running:
        name, argv = r.steps[r.step]
        r.log = open(out / r.job.name / f"{name}.log", "w")  # noqa: SIM115 (closed in finish)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            r.proc = subprocess.Popen(
                [*prefix, *argv], stdout=r.log, stderr=subprocess.STDOUT, env=env
            )
        except OSError as exc:
            r.log.close()
            raise GridError(f"cannot start {shlex.join([*prefix, argv[0]])}: {exc}") from exc
        return r

    def finish(r: _Running, rc: int) -> bool:
        """Step ended with ``rc``; True when the job is over (done or failed)."""
        r.log.close()
        name = r.steps[r.step][0]
        if rc != 0:
            log = out / r.job.name / f"{name}.log"
            outcome.failed[r.job.name] = f"{name} exited {rc}: {_last_line(log)} (log: {log})"
            echo(f"[{r.index}/{len(todo)}] {r.job.name}: FAILED, {outcome.failed[r.job.name]}")
            return True
        r.step += 1
        if r.step < len(r.steps):
            _launch(r)
            return False
        res = _result_complete(out / r.job.name / "result.json")
        if res is None:
            outcome.failed[r.job.name] = "exited 0 but wrote no complete result.json"
            echo(f"[{r.index}/{len(todo)}] {r.job.name}: FAILED, {outcome.failed[r.job.name]}")
            return True
        outcome.ran.append(r.job.name)
        top1 = res.get("top1")
        acc = f", top-1 {top1:.2f}%" if isinstance(top1, (int, float)) else ""
        echo(
            f"[{r.index}/{len(todo)}] {r.job.name}: done in {time.perf_counter() - r.t0:.1f} s "
            f"(calibration {res['calib_seconds']:.1f} s{acc})"
        )
        return True

    # SIGTERM/SIGINT only set a flag, checked between launches and polls, so the interrupt never
    # lands inside Popen (which could leave a started job untracked and running on).
    stop: list[int] = []
    old_handlers = {}
    if _in_main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old_handlers[sig] = signal.signal(sig, lambda signum, frame: stop.append(signum))
    try:
        while pending or running:
            while pending and len(running) < workers and not stop:
                running.append(start(*pending.pop(0)))
            if stop:
                raise KeyboardInterrupt(f"signal {stop[0]}")
            for r in list(running):
                rc = r.proc.poll()
                if rc is not None and finish(r, rc):
                    running.remove(r)
            if running:
                time.sleep(poll_s)
    except BaseException:
        for r in running:
            _stop(r.proc)
            r.log.close()
        echo(f"sweep interrupted: {len(running)} running job(s) stopped; rerun to finish them")
        raise
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    outcome.wall_s = time.perf_counter() - t_start
    echo(
        f"sweep {grid.name}: ran {len(outcome.ran)}, skipped {len(outcome.skipped)}, "
        f"failed {len(outcome.failed)} in {outcome.wall_s:.1f} s"
    )
    if report:
        from .report import write_sweep_report

        outcome.report_files = write_sweep_report(grid, out, failed=outcome.failed)
        for p in outcome.report_files:
            echo(f"  wrote {p}")
    return outcome


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip()[:300] if lines else "(empty log)"
