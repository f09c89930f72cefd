"""Latency of a packed model against FP32 PyTorch and PyTorch int8 (torch.ao, x86/FBGEMM).

All three run on the same architecture, the same input shape and the same thread count, timed
in one process in interleaved rounds (packed, FP32, int8, packed, ...: a change of load on a
shared machine hits them alike; median and 10th/90th percentiles over ``repeat`` calls after
``warmup``); speed-ups are ratios of medians against the FP32 row of the same batch. The FP32
network is rebuilt from the manifest's model name (weights do not change latency: random ones
are used where no packaged weights exist); the int8 baseline is that network through
``torch.ao.quantization.quantize_fx`` with the ``x86`` qconfig (FBGEMM kernels), calibrated on
the same random inputs. Before timing, the packed model's output on the chosen kernel backend is
checked against the reference backend (``validated``: identical logits).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from .. import ops
from . import memory
from .format import DeployError
from .load import load_packed


def _stats(times: list[float]) -> dict:
    """Median and 10th/90th percentiles (ms) of a list of seconds."""
    times = sorted(times)

    def pct(q):
        k = (len(times) - 1) * q
        lo, hi = int(k), min(int(k) + 1, len(times) - 1)
        return times[lo] + (times[hi] - times[lo]) * (k - lo)

    return {
        "median_ms": statistics.median(times) * 1e3,
        "p10_ms": pct(0.1) * 1e3,
        "p90_ms": pct(0.9) * 1e3,
        "n": len(times),
    }


def _time_interleaved(
    fns: dict[str, Callable[[torch.Tensor], object]], x: torch.Tensor, warmup: int, repeat: int
) -> dict[str, dict]:
    """Seconds of each ``fn(x)`` (CUDA: synchronised), timed in rounds (A, B, C, A, B, C, ...)
    so that a change of load on a shared machine hits every implementation alike."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            sync()
            times[name].append(time.perf_counter() - t0)
    return {k: _stats(v) for k, v in times.items()}


def fp32_model(manifest: dict) -> nn.Module | None:
    """The FP32 network named in ``manifest["model"]["name"]``, or None if it cannot be built."""
    name = manifest.get("model", {}).get("name")
    if not name:
        return None
    if name.startswith("torchvision:"):
        try:
            import torchvision.models as tvm
        except Exception:
            return None
        return getattr(tvm, name.split(":", 1)[1])().eval()
    from ..models.registry import build_model

    try:
        return build_model(name, None)[0].eval()
    except Exception:
        return None


def int8_ao_model(fp: nn.Module, example: torch.Tensor) -> tuple[nn.Module | None, str]:
    """``(torch.ao int8 model, "")`` or ``(None, why not)`` (x86 qconfig, FBGEMM kernels)."""
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError as exc:
        return None, f"torch.ao.quantization unavailable ({exc})"
    try:
        torch.backends.quantized.engine = "x86"
        qmap = get_default_qconfig_mapping("x86")
        prepared = prepare_fx(copy.deepcopy(fp), qmap, example_inputs=(example[:1],))
        with torch.no_grad():
            prepared(example)
        return convert_fx(prepared).eval(), ""
    except Exception as exc:  # tracing or an unsupported op: report instead of failing
        return None, f"torch.ao int8 conversion failed ({type(exc).__name__}: {exc})"


@torch.no_grad()
def bench_latency(
    packed_dir,
    batches=(1, 32, 256),
    threads: int | None = None,
    warmup: int = 2,
    repeat: int = 10,
    device: str = "cpu",
    baselines: bool = True,
    fp_model: nn.Module | None = None,
    log: Callable[[str], None] | None = print,
    memory_format: str = "auto",
) -> list[dict]:
    """One row per (batch, implementation): median/p10/p90 ms, images/s, speed-up vs FP32.

    ``fp_model``: the FP32 network to compare with (default: rebuilt from the manifest).
    ``memory_format``: the packed model's activation layout (:class:`PackedModel`); the packed
    rows record the one that ran as ``layout``."""
    log = log or (lambda s: None)
    if threads:
        torch.set_num_threads(threads)
    pm = load_packed(packed_dir, device=device, memory_format=memory_format)
    m = pm.manifest
    shape = m.get("model", {}).get("input_size")
    if not shape:
        raise DeployError(f"{packed_dir}: the manifest records no model.input_size")
    gen = torch.Generator().manual_seed(0)
    backend = ops.choose("qconv2d", device)[0]
    fp = (fp_model if fp_model is not None else fp32_model(m)) if baselines else None
    q8, why = None, "no FP32 model"
    if fp is not None:
        fp = fp.to(device).eval()
        if device == "cpu":
            q8, why = int8_ao_model(fp, torch.randn(8, *shape, generator=gen))
    rows: list[dict] = []
    name = m.get("model", {}).get("name", "?")
    src = m.get("source", {})
    bits = f"W{src.get('w_bits', '?')}A{src.get('a_bits', '?')}"
    if src.get("input_a_bits"):  # the image quantized too: an integer stem
        bits += f"-in{src['input_a_bits']}"
    for b in batches:
        x = torch.randn(b, *shape, generator=gen).to(device)
        validated = None
        if backend != "reference":
            ops.force("reference")
            try:
                ref = pm(x[:2])
            finally:
                ops.force(None)
            validated = bool(torch.equal(pm(x[:2]), ref))
        common = {
            "model": name,
            "bits": bits,
            "batch": b,
            "threads": torch.get_num_threads(),
            "device": device,
            # glibc keeps freed feature maps (load_packed; PDQUANT_TUNE_MALLOC): every
            # implementation in this process runs with the same allocator settings
            "malloc_tuned": bool((memory.malloc_state() or {}).get("applied")),
        }
        fns = {"packed": pm}
        if fp is not None:
            fns["fp32"] = fp
            if device == "cpu" and q8 is not None:
                fns["int8_ao"] = q8
        t = _time_interleaved(fns, x, warmup, repeat)
        layout = pm.layout
        rows.append(
            {
                **common,
                "impl": "packed",
                "backend": backend,
                "layout": layout,
                "validated": validated,
                **t["packed"],
            }
        )
        log(f"batch {b}: packed ({backend}, {layout}) {t['packed']['median_ms']:.2f} ms")
        if "fp32" in t:
            rows.append(
                {**common, "impl": "fp32", "backend": "torch", "validated": None, **t["fp32"]}
            )
            log(f"batch {b}: fp32 {t['fp32']['median_ms']:.2f} ms")
        if "int8_ao" in t:
            row = {**common, "impl": "int8_ao", "backend": "x86/fbgemm", "validated": None}
            rows.append({**row, **t["int8_ao"]})
            log(f"batch {b}: int8 torch.ao {t['int8_ao']['median_ms']:.2f} ms")
        elif fp is not None and device == "cpu":
            log(f"batch {b}: int8 torch.ao skipped: {why}")
    for r in rows:
        r["images_per_s"] = r["batch"] / (r["median_ms"] / 1e3)
        base = next((o for o in rows if o["batch"] == r["batch"] and o["impl"] == "fp32"), None)
        r["speedup_vs_fp32"] = base["median_ms"] / r["median_ms"] if base else None
    return rows
