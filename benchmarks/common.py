"""The one shared benchmark helper: timing, baselines, hardware limits, and result rows.

Every ``benchmarks/bench_*.py`` uses it so that all numbers are taken the same way:

* :func:`measure` validates nothing itself (benchmarks check against the reference *before*
  timing), warms up, then times ``repeat`` calls and reports the median and the 10th/90th
  percentiles. On CPU it uses ``time.perf_counter``; on CUDA ``triton.testing.do_bench``
  (L2 flushed between calls) when Triton is there, else CUDA events.
* :func:`ratio` is always against a baseline timed in the same process, moments apart.
* :func:`hardware` gives the limits used for "fraction of the hardware limit": CPU memory
  bandwidth measured in the same run (a large ``copy_``, bytes read + written), GPU HBM peak from
  the card's name (H100 SXM 3.35 TB/s, H200 4.8 TB/s; KERNEL_ANCHORS.md §4).
* :func:`resnet20_cifar` loads ResNet-20 and CIFAR-10 image sources from the shared data.
* :func:`record` appends rows (with device name, versions, git SHA, timestamp, command) to
  ``benchmarks/results/<suite>.jsonl`` and prints a table.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Dense HBM peak (bytes/s) by a substring of the CUDA device name (KERNEL_ANCHORS.md §4).
GPU_HBM_PEAK = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12}


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median, 10th and 90th percentile, and how many calls were timed."""

    median_s: float
    p10_s: float
    p90_s: float
    n: int

    def ms(self) -> str:
        return f"{self.median_s * 1e3:.3f} ms [{self.p10_s * 1e3:.3f}, {self.p90_s * 1e3:.3f}]"


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 3,
    repeat: int = 20,
    device: str = "cpu",
    min_time_s: float = 0.0,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeat`` timed ones (more while the total is
    under ``min_time_s``). CUDA: ``triton.testing.do_bench`` median/quantiles in ms."""
    if device == "cuda":
        try:
            from triton.testing import do_bench

            med, p10, p90 = do_bench(fn, quantiles=[0.5, 0.1, 0.9], return_mode="median")
            return Timing(med / 1e3, p10 / 1e3, p90 / 1e3, -1)
        except ImportError:
            pass
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(warmup):
            fn()
        times = []
        total = 0.0
        while len(times) < repeat or total < min_time_s:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times.append(dt)
            total += dt
    return Timing(
        statistics.median(times), _percentile(times, 0.1), _percentile(times, 0.9), len(times)
    )


def ratio(baseline: Timing, candidate: Timing) -> float:
    """Speed-up of ``candidate`` over ``baseline`` (> 1 means faster), from the medians."""
    return baseline.median_s / candidate.median_s


@cache
def cpu_copy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes/s of a large ``dst.copy_(src)`` on this CPU now (read + write counted), all threads.

    The elementwise roofline of this machine: a fused kernel that reads R and writes W bytes
    cannot beat ``(R + W) / cpu_copy_bandwidth()`` seconds.
    """
    n = nbytes // 4
    src = torch.ones(n)
    dst = torch.empty(n)
    t = measure(lambda: dst.copy_(src), warmup=2, repeat=10)
    return 2 * n * 4 / t.median_s


def gpu_hbm_peak(name: str) -> float | None:
    for key, peak in GPU_HBM_PEAK.items():
        if key in name:
            return peak
    return None


def device_name(device: str = "cpu") -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model or platform.processor()} ({os.cpu_count()} logical cores, "
        f"{torch.get_num_threads()} torch threads)"
    )


@cache
def git_sha() -> str:
    """Short SHA of HEAD (``-dirty`` if tracked code differs), or ``$PDQUANT_GIT_SHA`` where
    set: a copy of the tree on another machine (the lent GPU) can carry stale git metadata, so
    the caller names the commit it sent."""
    given = os.environ.get("PDQUANT_GIT_SHA", "").strip()
    if given:
        return given
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=True,
        )
        # results files appended by this or an earlier benchmark run do not make the code dirty
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ":(top)",
                ":(top,exclude)benchmarks/results",
            ],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line() -> str:
    """How this process was started, repository-relative where possible (``python
    benchmarks/bench_x.py --flag``): recorded in every row so reports can name the command that
    reproduces it."""
    import shlex
    import sys

    root = Path(__file__).resolve().parents[1]
    argv = list(sys.argv)
    if argv and ("pytest" in Path(argv[0]).name or Path(argv[0]).parent.name == "pytest"):
        return shlex.join(["python", "-m", "pytest", *argv[1:]])
    if argv and argv[0].endswith(".py"):
        try:
            argv[0] = str(Path(argv[0]).resolve().relative_to(root))
        except ValueError:
            pass
        return shlex.join(["python", *argv])
    return shlex.join(argv)


def environment(device: str = "cpu") -> dict:
    """Device name, versions, git SHA, timestamp: embedded in every result row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        # PyTorch's CPU allocator on huge pages (docs/KERNELS.md: large activations)
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        # glibc keeps freed blocks in the process (pdquant_fast.deploy.memory)
        "malloc_tuned": _malloc_tuned(),
    }


def _malloc_tuned() -> bool:
    from pdquant_fast.deploy import memory

    return bool((memory.malloc_state() or {}).get("applied"))


def tune_malloc_like_cli() -> dict:
    """The glibc settings ``pdquant calibrate`` applies on the CPU (``PDQUANT_TUNE_MALLOC=0``
    keeps glibc's defaults), so that CPU calibration benchmarks time what the command runs; rows
    record it as ``malloc_tuned``. Process-wide: every candidate of the run shares it."""
    from pdquant_fast.deploy import memory

    if not memory.tune_malloc_enabled():
        return {"applied": False, "reason": f"{memory.ENV}=0"}
    return memory.tune_malloc()


def resnet20_cifar(data: Path | str, *splits: str):
    """``(model, source, ...)``: ResNet-20 with akamaster's CIFAR-10 weights and the lossless
    CIFAR-10 image source of each split in ``splits`` ("train", "test"), from the shared data
    folder ``data``."""
    from pdquant_fast.data import open_image_source
    from pdquant_fast.models.registry import build_model

    data = Path(data)
    model, _ = build_model(
        "cifar_resnet20", data / "cifar10/models/akamaster_resnet/resnet20-12fca82f.th"
    )
    folder = data / "cifar10/convnetjs_png"
    return (model, *(open_image_source(folder, "cifar", split=sp) for sp in splits))


def record(
    suite: str,
    rows: Iterable[dict],
    *,
    device: str = "cpu",
    out_dir: Path | str | None = None,
    columns: list[str] | None = None,
) -> Path:
    """Append ``rows`` (plus :func:`environment`) to ``<out_dir>/<suite>.jsonl`` and print them.

    ``out_dir`` defaults to ``$PDQUANT_BENCH_OUT`` or ``benchmarks/results/``. Returns the path.
    """
    rows = [dict(r) for r in rows]
    env = environment(device)
    out = Path(out_dir or os.environ.get("PDQUANT_BENCH_OUT") or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{suite}.jsonl"
    with path.open("a") as fh:
        for row in rows:
            fh.write(json.dumps({**row, **env}, default=_jsonable) + "\n")
    print_table(rows, columns)
    print(f"[{suite}] {len(rows)} rows appended to {path} ({env['device']}, {env['git_sha']})")
    return path


def _jsonable(obj):
    if isinstance(obj, Timing):
        return asdict(obj)
    return str(obj)


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    if not rows:
        return
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, Timing):
            return v.ms()
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
