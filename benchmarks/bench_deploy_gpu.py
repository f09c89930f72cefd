"""Packed low-bit deployment kernels on a GPU (Triton) vs cuBLAS/cuDNN fp16 and cuBLAS int8.

Sections (all timings in one process, baselines moments apart, ``benchmarks.common.measure``
with ``device="cuda"``: ``triton.testing.do_bench`` median, L2 flushed before every call):

* ``wa16``: weight-only W4A16 and W2A16 linear (``linear_wa16_triton``, groups of 128, fp16
  scale and zero) at M = 1, 4, 16 on Llama-sized (N, K): 8192x8192, 11008x4096, 4096x11008,
  16384x16384, vs ``F.linear`` in fp16 (cuBLAS). Reported: speed-up, achieved bytes/s (packed
  weights + scales + zeros + x + y over the time) as a fraction of the card's HBM peak.
  Goals (KERNEL_ANCHORS.md §0): W4A16 >= 2.6x and W2A16 >= 3.5x fp16 at 16384^2.
  With ``--sweep`` every candidate configuration of the 16384^2 cases is timed too.
* ``qmm``: W4A4 (activation codes < 16: int8-view path) and W4A8 (any code: x ^ 0x80 path)
  ``qlinear_triton`` with the fused bias + ReLU + requantisation to codes, at M = 4096 and 32768
  on SAM ViT-B MLP/QKV shapes (K, N) = (768, 3072), (3072, 768), (768, 2304), vs ``F.linear``
  fp16 and ``torch._int_mm`` (cuBLAS int8, int32 output, no epilogue). Reported: TOPS
  (2 M N K / t) and the fraction of the dense INT8 tensor peak (1979 TOPS on H100/H200 SXM).
  Goal: W4A4 >= 1.6x fp16.
* ``conv``: ``qconv2d_triton`` on ResNet-18 3x3 convs at batch 256 (and one EfficientNet-Lite0
  depthwise conv), channels-last input and NCHW input (the NCHW -> NHWC conversion is inside the
  timed call), vs ``F.conv2d`` fp16 channels-last (cuDNN).

Every case is validated against the reference before it is timed (``wa16``: float64 on a slice
of output columns, error budget of ``tests/_deploy_cases.py``; ``qmm``/``conv``: bit-exact
codes on the first rows / images); a failing case becomes an ``error`` row and the run goes on.

Usage::

    python benchmarks/bench_deploy_gpu.py [--sections wa16,qmm,conv] [--quick] [--sweep]
        [--out DIR]

Rows go to ``<out>/deploy_gpu.jsonl`` (default ``$PDQUANT_BENCH_OUT`` or benchmarks/results/).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import gpu_hbm_peak, measure, ratio, record  # noqa: E402

#: Dense INT8 / FP16 tensor-core peaks of H100/H200 SXM (KERNEL_ANCHORS.md §4), ops/s.
INT8_PEAK = 1978.9e12
FP16_PEAK = 989.4e12
WA16_SHAPES = [(16384, 16384), (8192, 8192), (11008, 4096), (4096, 11008)]  # (N, K)
QMM_SHAPES = [(768, 3072), (3072, 768), (768, 2304)]  # (K, N), SAM ViT-B
QMM_M = (4096, 32768)
SWEEP_NK = (16384, 16384)  # --sweep times every wa16 candidate at this (N, K)
CONV_CASES = [
    # name, batch, C, H, W, O, k, stride, pad, groups
    ("r18-layer1-3x3", 256, 64, 56, 56, 64, 3, 1, 1, 1),
    ("r18-layer2-3x3", 256, 128, 28, 28, 128, 3, 1, 1, 1),
    ("r18-layer3-3x3", 256, 256, 14, 14, 256, 3, 1, 1, 1),
    ("effl0-dw3x3", 256, 144, 56, 56, 144, 3, 1, 1, 144),
]


def measure_graph(fn):
    """Time ``fn`` captured once in a CUDA graph (replays timed by :func:`measure`, L2 flushed
    before each): the kernel time without Python/launch overhead, which for these 0.05-0.3 ms
    kernels is not negligible (a Triton launch from Python costs tens of microseconds). None if
    the capture fails (printed)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return measure(graph.replay, device="cuda")
    except Exception as exc:  # noqa: BLE001
        print(f"CUDA graph capture failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _err_row(section: str, case: dict, exc: BaseException) -> dict:
    msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    print(f"[{section}] {case}: ERROR {msg}", file=sys.stderr)
    traceback.print_exc()
    return {"section": section, **case, "error": msg[-500:]}


# ---------------------------------------------------------------------------------------------
# W4A16 / W2A16


def _wa16_check(y, x, codes, scale, zero, group, cols=512):
    """Max |y - y64| / budget over the first ``cols`` output columns (<= 1 passes)."""
    n = min(cols, codes.shape[0])
    k = x.shape[1]
    c = codes[:n].double()
    s, z = scale[:n].double(), zero[:n].double()
    if group:
        s = s.repeat_interleave(group, 1)[:, :k]
        z = z.repeat_interleave(group, 1)[:, :k]
    else:
        s, z = s[:, None], z[:, None]
    xd = x.double()
    y64 = xd @ ((c - z) * s).t()
    scale_sum = xd.abs() @ ((c.abs() + z.abs()) * s.abs()).t()
    budget = 2.0**-11 * y64.abs() + 2.0**-24 + (k + 2) * 2.0**-24 * scale_sum
    return ((y[:, :n].double() - y64).abs() / budget).max().item()


#: Weight layouts timed per case: the contract's plain rows, and interleaved N-major prepacks
#: (:func:`linear_wa16_prepack`): (name, word_bits, interleave_kw) per bit-width.
WA16_LAYOUTS = {
    4: [("plain", 0, 0), ("ilv32x16", 32, 16)],
    2: [("plain", 0, 0), ("ilv8x32", 8, 32), ("ilv32x8", 32, 8)],
}


def _over_budget(args, t_start) -> bool:
    return args.max_s > 0 and time.perf_counter() - t_start > args.max_s


def bench_wa16(args, dev, peak_bw) -> list[dict]:
    from pdquant_fast.kernels import deploy_linear as dl
    from pdquant_fast.ops.reference import pack_reference

    rows = []
    shapes = WA16_SHAPES[:2] if args.quick else WA16_SHAPES
    group = 128
    t_start = time.perf_counter()
    for n, k in shapes:
        for bits in (4, 2):
            if _over_budget(args, t_start):
                rows.append({"section": "wa16", "N": n, "K": k, "bits": bits, "error": "skipped"})
                continue
            try:
                gen = torch.Generator(device=dev).manual_seed(n + k + bits)
                codes = torch.randint(0, 1 << bits, (n, k), device=dev, generator=gen)
                codes = codes.to(torch.uint8)
                wp = pack_reference(codes, bits)
                scale = (torch.rand(n, k // group, device=dev, generator=gen) * 0.02 + 1e-3).half()
                zero = torch.randint(0, 1 << bits, (n, k // group), device=dev, generator=gen)
                zero = zero.half()
                # the fp16 baseline multiplies the dequantized weights (same values)
                w16 = (
                    (codes.float() - zero.float().repeat_interleave(group, 1))
                    * scale.float().repeat_interleave(group, 1)
                ).half()
                layouts = {}
                for name, wb, ilv in WA16_LAYOUTS[bits]:
                    layouts[name] = (
                        wp
                        if not ilv
                        else dl.linear_wa16_prepack(wp, bits, k, wb, interleave_kw=ilv)
                    )
            except Exception as exc:  # noqa: BLE001
                rows.append(_err_row("wa16", {"N": n, "K": k, "bits": bits}, exc))
                continue
            for m in (1, 4, 16):
                x = torch.randn(m, k, device=dev, generator=gen).half()
                t_fp16 = measure(partial(F.linear, x, w16), device="cuda")
                g_fp16 = measure_graph(partial(F.linear, x, w16))
                for lname, w in layouts.items():
                    case = {"case": f"W{bits}A16", "layout": lname, "M": m, "N": n, "K": k}
                    try:
                        t0 = time.perf_counter()
                        y = dl.linear_wa16_triton(x, w, scale, zero, bits, group)  # tunes once
                        torch.cuda.synchronize()
                        tune_s = time.perf_counter() - t0
                        err = _wa16_check(y, x, codes, scale, zero, group)
                        if not err <= 1.0:
                            raise AssertionError(f"error {err:.3g} x budget vs float64")
                        cfg = dl.LAST_CONFIG.get("wa16")
                        call = partial(dl.linear_wa16_triton, x, w, scale, zero, bits, group)
                        t_ours = measure(call, device="cuda")
                        g_ours = measure_graph(call)
                        nbytes = wp.numel() + 2 * 2 * scale.numel() + 2 * m * k + 2 * m * n
                        rows.append(
                            {
                                "section": "wa16",
                                **case,
                                "ours": t_ours,
                                "fp16": t_fp16,
                                "speedup": ratio(t_fp16, t_ours),
                                "ours_graph": g_ours,
                                "fp16_graph": g_fp16,
                                "speedup_graph": ratio(g_fp16, g_ours)
                                if g_ours and g_fp16
                                else None,
                                "graph_hbm_frac": nbytes / g_ours.median_s / peak_bw
                                if g_ours and peak_bw
                                else None,
                                "GBps": nbytes / t_ours.median_s / 1e9,
                                "hbm_frac": nbytes / t_ours.median_s / peak_bw if peak_bw else None,
                                "fp16_hbm_frac": (2 * n * k) / t_fp16.median_s / peak_bw
                                if peak_bw
                                else None,
                                "TFLOPS": 2 * m * n * k / t_ours.median_s / 1e12,
                                "err_budget_frac": err,
                                "config": _cfg_str(cfg),
                                "tune_s": tune_s,
                            }
                        )
                        if args.sweep and (n, k) == SWEEP_NK:
                            rows += _wa16_sweep(dl, case, x, w, scale, zero, bits, group, t_fp16)
                    except Exception as exc:  # noqa: BLE001
                        rows.append(_err_row("wa16", case, exc))
            torch.cuda.empty_cache()
    return rows


def _cfg_str(cfg) -> str:
    if cfg is None:
        return "default"
    d = dict(cfg.__dict__)
    return ",".join(f"{k}={v}" for k, v in d.items())


def _wa16_sweep(dl, case, x, w, scale, zero, bits, group, t_fp16) -> list[dict]:
    """Time every candidate configuration of this case (what the tuner chose among)."""
    rows = []
    m, k = x.shape
    if isinstance(w, dl.WA16Packed):
        n, wbs, fixed = w.n, (w.word_bits,), w.block_kw
    else:
        n, wbs, fixed = w.shape[0], tuple(dl._word_views(w)), 0
    p = dl._WA16Problem(m, n, k, bits, group, x.dtype == zero.dtype == torch.float16)
    for cfg in dict.fromkeys(dl.wa16_candidates(p, wbs, x.device, fixed)):
        try:
            t = measure(
                partial(dl.linear_wa16_triton, x, w, scale, zero, bits, group, config=cfg),
                device="cuda",
            )
            rows.append(
                {
                    "section": "wa16-sweep",
                    **case,
                    "ours": t,
                    "speedup": ratio(t_fp16, t),
                    "config": _cfg_str(cfg),
                }
            )
        except Exception as exc:  # noqa: BLE001
            rows.append(_err_row("wa16-sweep", {**case, "config": _cfg_str(cfg)}, exc))
    return rows


# ---------------------------------------------------------------------------------------------
# W4A4 / W4A8 GEMM (qlinear)


def bench_qmm(args, dev) -> list[dict]:
    from pdquant_fast.kernels import deploy_linear as dl
    from pdquant_fast.ops.reference import qlinear_reference

    rows = []
    ms = QMM_M[:1] if args.quick else QMM_M
    t_start = time.perf_counter()
    for m in ms:
        for k, n in QMM_SHAPES:
            if _over_budget(args, t_start):
                rows.append({"section": "qmm", "M": m, "K": k, "N": n, "error": "skipped"})
                continue
            gen = torch.Generator(device=dev).manual_seed(m + k + n)
            try:
                w = torch.randint(-8, 8, (n, k), device=dev, generator=gen).to(torch.int8)
                scale = torch.rand(n, device=dev, generator=gen) * 1e-3 + 1e-4
                bias = torch.randn(n, device=dev, generator=gen)
                x16 = torch.randn(m, k, device=dev, generator=gen).half()
                w16 = w.half()
                xi8 = torch.randint(-8, 8, (m, k), device=dev, generator=gen).to(torch.int8)
                t_fp16 = measure(partial(F.linear, x16, w16), device="cuda")
                try:
                    t_i8 = measure(partial(torch._int_mm, xi8, w.t()), device="cuda")
                except Exception as exc:  # noqa: BLE001
                    print(f"torch._int_mm failed: {exc}", file=sys.stderr)
                    t_i8 = None
            except Exception as exc:  # noqa: BLE001
                rows.append(_err_row("qmm", {"M": m, "K": k, "N": n}, exc))
                continue
            for name, a_bits, out_bits in (("W4A4", 4, 4), ("W4A8", 8, 8)):
                case = {"case": name, "M": m, "N": n, "K": k}
                try:
                    x = torch.randint(0, 1 << a_bits, (m, k), device=dev, generator=gen)
                    x = x.to(torch.uint8)
                    x_zp = (1 << a_bits) // 2 - 1
                    pk = dl.qlinear_prepack_triton(w, a_bits=a_bits)
                    call = (x_zp, pk, scale, bias, 1, None, 0.05, 0, out_bits)
                    y = dl.qlinear_triton(x, *call)
                    cfg = _cfg_str(dl.LAST_CONFIG.get("qmm"))
                    rows_chk = min(m, 256)
                    ref = qlinear_reference(
                        x[:rows_chk], x_zp, w, scale, bias, 1, None, 0.05, 0, out_bits
                    )
                    if not torch.equal(y[:rows_chk], ref):
                        bad = int((y[:rows_chk] != ref).sum())
                        raise AssertionError(f"{bad} codes differ from the reference")
                    t = measure(partial(dl.qlinear_triton, x, *call), device="cuda")
                    ops_ = 2 * m * n * k
                    rows.append(
                        {
                            "section": "qmm",
                            **case,
                            "ours": t,
                            "fp16": t_fp16,
                            "int8_mm": t_i8,
                            "speedup": ratio(t_fp16, t),
                            "vs_int8": ratio(t_i8, t) if t_i8 else None,
                            "TOPS": ops_ / t.median_s / 1e12,
                            "int8_peak_frac": ops_ / t.median_s / INT8_PEAK,
                            "fp16_TFLOPS": ops_ / t_fp16.median_s / 1e12,
                            "int8_mm_TOPS": ops_ / t_i8.median_s / 1e12 if t_i8 else None,
                            "config": cfg,
                        }
                    )
                except Exception as exc:  # noqa: BLE001
                    rows.append(_err_row("qmm", case, exc))
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# conv


def bench_conv(args, dev) -> list[dict]:
    from pdquant_fast.kernels import deploy_conv as dc
    from pdquant_fast.kernels import deploy_linear as dl
    from pdquant_fast.ops.reference import qconv2d_reference

    rows = []
    cases = CONV_CASES[1:2] if args.quick else CONV_CASES
    t_start = time.perf_counter()
    for name, nb, c, h, wd, o, ks, s, p, g in cases:
        case = {"case": name, "batch": nb, "C": c, "HW": h, "O": o, "k": ks, "groups": g}
        if _over_budget(args, t_start):
            rows.append({"section": "conv", **case, "error": "skipped"})
            continue
        try:
            gen = torch.Generator(device=dev).manual_seed(c + o + h)
            x = torch.randint(0, 16, (nb, c, h, wd), device=dev, generator=gen).to(torch.uint8)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            w = torch.randint(-8, 8, (o, c // g, ks, ks), device=dev, generator=gen)
            w = w.to(torch.int8)
            scale = torch.rand(o, device=dev, generator=gen) * 1e-3 + 1e-4
            bias = torch.randn(o, device=dev, generator=gen)
            x16 = torch.randn(nb, c, h, wd, device=dev, generator=gen).half()
            x16 = x16.contiguous(memory_format=torch.channels_last)
            w16 = w.half().contiguous(memory_format=torch.channels_last)
            t_fp16 = measure(partial(F.conv2d, x16, w16, None, s, p, 1, g), device="cuda")
            pk = dc.qconv2d_prepack_triton(w, g, a_bits=4)
            tail = (scale, bias, [s, s], [p, p], g, 1, None, 0.05, 0, 4)
            ref = qconv2d_reference(x[:2], 7, w, *tail)
            ho = (h + 2 * p - ks) // s + 1
            ops_ = 2 * nb * ho * ho * o * (c // g) * ks * ks
            for variant, xin in (("channels-last", x_cl), ("nchw", x)):
                y = dc.qconv2d_triton(xin, 7, pk, *tail)
                cfg = _cfg_str(dl.LAST_CONFIG.get("qconv"))
                if not torch.equal(y[:2].contiguous(), ref):
                    bad = int((y[:2].contiguous() != ref).sum())
                    raise AssertionError(f"{variant}: {bad} codes differ from the reference")
                t = measure(partial(dc.qconv2d_triton, xin, 7, pk, *tail), device="cuda")
                rows.append(
                    {
                        "section": "conv",
                        **case,
                        "variant": variant,
                        "ours": t,
                        "fp16": t_fp16,
                        "speedup": ratio(t_fp16, t),
                        "TOPS": ops_ / t.median_s / 1e12,
                        "int8_peak_frac": ops_ / t.median_s / INT8_PEAK,
                        "fp16_TFLOPS": ops_ / t_fp16.median_s / 1e12,
                        "config": cfg,
                    }
                )
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001
            rows.append(_err_row("conv", case, exc))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default="wa16,qmm,conv")
    ap.add_argument("--quick", action="store_true", help="one or two shapes per section")
    ap.add_argument("--sweep", action="store_true", help="time every wa16 candidate at 16384^2")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--max-s",
        type=float,
        default=0.0,
        help="per section: skip the remaining cases once this many seconds have passed (0: off)",
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_deploy_gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak_bw = gpu_hbm_peak(name)
    print(f"device: {name}, HBM peak {peak_bw and peak_bw / 1e12} TB/s (common.GPU_HBM_PEAK)")
    t0 = time.perf_counter()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    all_rows = []
    cols = {
        "wa16": (
            "section case layout M N K ours fp16 speedup ours_graph fp16_graph speedup_graph "
            "hbm_frac graph_hbm_frac fp16_hbm_frac err_budget_frac config error"
        ).split(),
        "qmm": (
            "section case M N K ours fp16 int8_mm speedup vs_int8 TOPS int8_peak_frac "
            "fp16_TFLOPS int8_mm_TOPS config error"
        ).split(),
        "conv": (
            "section case variant ours fp16 speedup TOPS int8_peak_frac fp16_TFLOPS config error"
        ).split(),
    }
    for sec in sections:
        ts = time.perf_counter()
        if sec == "wa16":
            rows = bench_wa16(args, dev, peak_bw)
        elif sec == "qmm":
            rows = bench_qmm(args, dev)
        elif sec == "conv":
            rows = bench_conv(args, dev)
        else:
            print(f"unknown section {sec!r}", file=sys.stderr)
            return 2
        print(f"[{sec}] {len(rows)} rows in {time.perf_counter() - ts:.1f} s")
        if rows:
            record("deploy_gpu", rows, device="cuda", out_dir=args.out, columns=cols[sec])
        all_rows += rows
    print(f"total {time.perf_counter() - t0:.1f} s")
    _summary(all_rows)
    return 0


def _summary(rows: list[dict]) -> None:
    """Headline ratios against the goals of the brief (printed last)."""
    print("\nsummary (speed-up over fp16 in the same run; goal in brackets):")
    for r in rows:
        if r.get("section") == "wa16" and r.get("N") == r.get("K") == 16384 and "speedup" in r:
            goal = 2.6 if r["case"] == "W4A16" else 3.5
            graph = r.get("speedup_graph")
            print(
                f"  {r['case']} {r['layout']} M={r['M']} 16384^2: {r['speedup']:.2f}x eager, "
                f"{graph or float('nan'):.2f}x CUDA graph  [>= {goal}]"
            )
        if r.get("section") == "qmm" and r.get("case") == "W4A4" and "speedup" in r:
            print(
                f"  W4A4 M={r['M']} K={r['K']} N={r['N']}: {r['speedup']:.2f}x fp16, "
                f"{r['vs_int8'] or float('nan'):.2f}x int8_mm  [>= 1.6x fp16]"
            )
    errors = [r for r in rows if "error" in r]
    print(f"  {len(errors)} error rows")


if __name__ == "__main__":
    sys.exit(main())
