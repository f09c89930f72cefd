"""``pdquant export`` and ``pdquant bench-latency`` (registered by :mod:`pdquant_fast.cli`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_commands(sub) -> None:
    """Add the deployment sub-commands to the ``pdquant`` argument parser."""
    from .runtime import MEMORY_FORMATS

    e = sub.add_parser("export", help="write a calibrated run as a packed 2/4-bit model")
    e.add_argument("run", help="folder written by pdquant calibrate")
    e.add_argument("--out", required=True, help="output folder (manifest.json + safetensors)")
    e.set_defaults(func=cmd_export)
    b = sub.add_parser("bench-latency", help="packed model vs FP32 vs torch.ao int8 latency")
    b.add_argument("packed", help="folder written by pdquant export")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    b.add_argument("--threads", type=int)
    b.add_argument("--repeat", type=int, default=10, help="timed calls per row (median)")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--no-baselines", action="store_true", help="time the packed model only")
    b.add_argument(
        "--memory-format",
        default="auto",
        choices=MEMORY_FORMATS,
        help="layout of the packed model's activation codes (default auto: channels_last where "
        "the C++ kernels run)",
    )
    b.add_argument("--out", help="results folder (default benchmarks/results/)")
    b.set_defaults(func=cmd_bench_latency)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_packed

    m = export_packed(Path(args.run), Path(args.out))
    s = m["sizes"]
    n_packed = sum(1 for n in m["graph"] if n["op"] == "layer_packed")
    n_float = sum(1 for n in m["graph"] if n["op"] == "layer_float")
    print(
        f"wrote {args.out}: {m['model'].get('name')} {n_packed} packed + {n_float} float layers; "
        f"{s['packed_bytes']:,} bytes packed vs {s['fp32_state_dict_bytes']:,} bytes FP32 "
        f"state_dict ({s['ratio']:.2f}x smaller)"
    )
    return 0


def cmd_bench_latency(args: argparse.Namespace) -> int:
    from .bench import bench_latency
    from .format import DeployError

    for b in args.batch:
        if b < 1:
            raise DeployError(f"--batch values must be positive, got {b}")
    if args.threads is not None and args.threads < 1:
        raise DeployError(f"--threads must be positive, got {args.threads}")
    if args.device not in ("cpu", "cuda"):
        raise DeployError(f"--device must be cpu or cuda, got {args.device!r}")
    rows = bench_latency(
        args.packed,
        batches=tuple(args.batch),
        threads=args.threads,
        warmup=args.warmup,
        repeat=args.repeat,
        device=args.device,
        baselines=not args.no_baselines,
        memory_format=args.memory_format,
    )
    record = _recorder()
    cols = [
        "model",
        "bits",
        "batch",
        "threads",
        "impl",
        "backend",
        "layout",
        "validated",
        "median_ms",
        "p10_ms",
        "p90_ms",
        "images_per_s",
        "speedup_vs_fp32",
    ]
    if record is not None:
        record("packed_latency", rows, device=args.device, out_dir=args.out, columns=cols)
        return 0
    # installed without the repository's benchmarks/ folder: plain JSON lines, printed table
    import json
    import platform

    import torch

    out = Path(args.out or ".")
    out.mkdir(parents=True, exist_ok=True)
    with (out / "packed_latency.jsonl").open("a") as fh:
        for r in rows:
            fh.write(
                json.dumps({**r, "torch": torch.__version__, "python": platform.python_version()})
                + "\n"
            )
    for r in rows:
        print("  ".join(f"{c}={r.get(c)}" for c in cols))
    print(f"[packed_latency] {len(rows)} rows appended to {out / 'packed_latency.jsonl'}")
    return 0


def _recorder():
    """``benchmarks.common.record`` from the repository this package was installed from (an
    editable install), or None."""
    try:
        from benchmarks.common import record

        return record
    except ImportError:
        pass
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "common.py").is_file():
        return None
    sys.path.insert(0, str(root))
    try:
        from benchmarks.common import record
    except ImportError:
        return None
    return record
