"""Packed-model latency: packed W4A4/W2A4/W2A2 vs FP32 and PyTorch int8 (torch.ao x86/FBGEMM).

For each model and format: a quick quantization (per-channel min/max weight ranges, activation
ranges from the library's search on 8 random images: latency does not depend on the values),
export to a temporary packed folder, then :func:`pdquant_fast.deploy.bench.bench_latency`
(validates the chosen kernel backend against the reference, then times packed, FP32 and int8 in
one process, per batch one after the other, so every packed row has its own baselines).
Rows go to ``benchmarks/results/packed_latency.jsonl`` (suite ``packed_latency``).

    python benchmarks/bench_packed_latency.py --models cifar_resnet20 resnet18 --batch 1 32
    python benchmarks/bench_packed_latency.py --formats w4a4 w2a2 --threads 1
    python benchmarks/bench_packed_latency.py --device cuda --models resnet18 --batch 1 32 256

The same measurement for an exported run: ``pdquant bench-latency PACKED_DIR``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

# PyTorch's CPU allocator on huge pages, as the pdquant CLI runs it (docs/KERNELS.md, "large
# activations and page faults"): set before torch's first allocation; a value already set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import record  # noqa: E402
from pdquant_fast.deploy import export_packed  # noqa: E402
from pdquant_fast.deploy.bench import bench_latency  # noqa: E402
from pdquant_fast.deploy.parity import quick_quantize  # noqa: E402
from pdquant_fast.deploy.runtime import MEMORY_FORMATS  # noqa: E402

COLUMNS = [
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


def build(name: str) -> tuple[torch.nn.Module, list[int]]:
    """FP32 model (eval) and its input shape ``[C, H, W]``."""
    if name == "resnet18":
        sys.path.insert(0, str(ROOT / "tests"))
        from _torchvision import import_torchvision_models

        tvm = import_torchvision_models()
        if tvm is None:
            raise SystemExit("torchvision is not installed: resnet18 needs its model definition")
        torch.manual_seed(0)
        return tvm.resnet18().eval(), [3, 224, 224]
    from pdquant_fast.models.registry import build_model

    weights = None
    if name == "cifar_resnet20":
        w = ROOT.parent / "shared/data/cifar10/models/akamaster_resnet/resnet20-12fca82f.th"
        weights = w if w.is_file() else None
    torch.manual_seed(0)
    model, info = build_model(name, weights)
    return model, list(info.input_size)


def export_quick(
    name: str,
    model: torch.nn.Module,
    shape: list[int],
    w_bits: int,
    a_bits: int,
    input_bits: int | None,
    folder,
) -> dict:
    """Quick-quantize ``model`` (activation ranges from 8 seeded random images) and export it to
    ``folder`` as a packed model; returns the manifest."""
    x8 = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
    q = quick_quantize(model, x8, w_bits, a_bits, input_a_bits=input_bits)
    label = f"torchvision:{name}" if name == "resnet18" else name
    return export_packed(
        q,
        folder,
        fp_model=model,
        model_info={"name": label, "input_size": shape},
        source={"w_bits": w_bits, "a_bits": a_bits, "input_a_bits": input_bits, "method": "quick"},
    )


def parse_format(text: str, parser: argparse.ArgumentParser) -> tuple[int, int]:
    """``"w4a4"`` -> ``(4, 4)``; anything else is a usage error naming what is allowed."""
    t = text.lower()
    try:
        w, a = t[1:].split("a")
        w_bits, a_bits = int(w), int(a)
    except ValueError:
        parser.error(f"--formats: {text!r} is not of the form wNaM (e.g. w4a4, w2a2)")
    if not t.startswith("w") or w_bits not in (2, 4, 8) or a_bits not in (2, 4, 8):
        parser.error(f"--formats: {text!r}: weight and activation bits must be 2, 4 or 8")
    return w_bits, a_bits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["cifar_resnet20", "resnet18"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--formats",
        nargs="+",
        default=["w4a4", "w2a4", "w2a2"],
        help="packed formats wNaM (weight / activation bits), default w4a4 w2a4 w2a2",
    )
    p.add_argument(
        "--input-bits",
        type=int,
        help="also quantize the network input at this many bits (CalibConfig.input_a_bits: an "
        "integer stem); rows are labelled e.g. W4A4-in8",
    )
    p.add_argument(
        "--memory-format",
        default="auto",
        choices=MEMORY_FORMATS,
        help="the packed model's activation layout (default auto: channels_last on the C++ "
        "kernels)",
    )
    p.add_argument("--out", help="results folder (default benchmarks/results/)")
    args = p.parse_args(argv)
    formats = [parse_format(f, p) for f in args.formats]
    rows = []
    for name, (w_bits, a_bits) in [(m, f) for m in args.models for f in formats]:
        model, shape = build(name)
        with tempfile.TemporaryDirectory() as tmp:
            man = export_quick(name, model, shape, w_bits, a_bits, args.input_bits, tmp)
            sizes = man["sizes"]
            print(
                f"{name} W{w_bits}A{a_bits}: packed {sizes['packed_bytes']:,} bytes vs FP32 "
                f"{sizes['fp32_state_dict_bytes']:,} ({sizes['ratio']:.2f}x)"
            )
            rows += bench_latency(
                tmp,
                batches=tuple(args.batch),
                threads=args.threads,
                warmup=args.warmup,
                repeat=args.repeat,
                device=args.device,
                fp_model=model,
                memory_format=args.memory_format,
            )
    record("packed_latency", rows, device=args.device, out_dir=args.out, columns=COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
