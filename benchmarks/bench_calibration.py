"""A whole calibration, reference ops vs fused kernels, in one process: time and accuracy.

ResNet-20 / CIFAR-10 (``../shared/data``), PD-Quant W2A4 (or ``--method``), fixed iterations and
seed, calibrated twice in the same process: once with every quantizer op forced to the
plain-PyTorch reference (``PDQUANT_KERNELS=reference``), once with the default (fastest
available) backend. Reports the wall time of the whole run, of the reconstruction iterations
alone, ms per iteration, the ratio, and top-1 of both quantized models on the 1,000 lossless test
images (the two runs use the same seed and the same QDrop masks: every backend hashes the same
seed into the same mask, so the runs differ only by floating-point rounding in reductions and
the sigmoid).

    PDQUANT_SHARED_DATA=../shared/data python benchmarks/bench_calibration.py --iters 100
    python benchmarks/bench_calibration.py --device cuda --backends reference,auto,triton

On a GPU (``--device cuda``) the model, images and unit caches live there; ``auto`` picks the
CUDA kernels where the extension has them, ``triton`` forces the Triton ones.

Rows go to ``<out>/calibration.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# PyTorch's CPU allocator on huge pages, as the pdquant CLI runs it (docs/KERNELS.md, "large
# activations and page faults"): set before torch's first allocation; a value already set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import record, resnet20_cifar, tune_malloc_like_cli  # noqa: E402
from pdquant_fast import ops  # noqa: E402
from pdquant_fast.api import quantize  # noqa: E402
from pdquant_fast.engine import evaluate  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("PDQUANT_SHARED_DATA", "../shared/data"))
    p.add_argument("--method", default="pdquant")
    p.add_argument("--w-bits", type=int, default=2)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--dc-iters", type=int, default=10)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--seed", type=int, default=1005)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--backends",
        default="reference,auto",
        help="runs, comma-separated, each BACKEND[:PD_TAIL_DTYPE][+graph] "
        "(reference|cpp|cuda|triton|auto, float32|bfloat16; default float32; +graph: "
        "cuda_graph=True, GPU only), e.g. reference,auto,auto:bfloat16,auto+graph",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the model, images and calibration live (cuda: the GPU kernels)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    dev = torch.device(args.device)
    if dev.type == "cpu":
        tune_malloc_like_cli()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, train, test = resnet20_cifar(args.data, "train", "test")
    model = model.to(dev)
    xc = torch.stack([train[i][0] for i in range(args.calib)]).to(dev)
    xt = torch.stack([test[i][0] for i in range(1000)]).to(dev)
    yt = torch.tensor([test[i][1] for i in range(1000)]).to(dev)
    rows, preds = [], {}
    base = None
    for run in args.backends.split(","):
        graph = run.endswith("+graph")  # the reconstruction step in a CUDA graph
        backend, _, tail = run.removesuffix("+graph").partition(":")
        tail = tail or "float32"
        ops.force(None if backend == "auto" else backend)
        try:
            used = ops.choose("fake_quant_act", args.device, args.a_bits)[0]
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            q, rep = quantize(
                model,
                xc,
                method=args.method,
                w_bits=args.w_bits,
                a_bits=args.a_bits,
                preset="resnet",
                pd_tail_dtype=tail,
                cuda_graph=graph,
                iters=args.iters,
                dc_iters=args.dc_iters,
                seed=args.seed,
                log=None,
                progress=False,
            )
            if args.device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            acc = evaluate(q, xt, yt)
        finally:
            ops.force(None)
        opt_s = sum(u.opt_seconds for u in rep.units)
        dc_s = sum(u.dc_seconds or 0.0 for u in rep.units)
        opt_n = sum(u.opt_iters for u in rep.units)
        preds[run] = acc["pred"]
        row = {
            "model": "resnet20",
            "method": args.method,
            "bits": f"W{args.w_bits}A{args.a_bits}",
            "iters": args.iters,
            "seed": args.seed,
            "backend": used,
            "pd_tail_dtype": tail,
            "cuda_graph": graph,
            "wall_s": wall,
            "dc_s": dc_s,
            "opt_s": opt_s,
            "ms_per_iter": opt_s / max(opt_n, 1) * 1e3,
            "top1": acc["top1"],
        }
        if base is None:
            base = row
        row["speedup_wall"] = base["wall_s"] / wall
        row["speedup_iters"] = base["opt_s"] / opt_s
        rows.append(row)
    names = list(preds)
    for row, name in zip(rows[1:], names[1:], strict=True):  # agreement with the first run
        agree = int((preds[names[0]] == preds[name]).sum())
        row["pred_agreement"] = f"{agree}/1000"
    record(
        "calibration",
        rows,
        device=args.device,
        out_dir=args.out,
        columns=[
            "model",
            "method",
            "bits",
            "iters",
            "backend",
            "pd_tail_dtype",
            "cuda_graph",
            "wall_s",
            "dc_s",
            "opt_s",
            "ms_per_iter",
            "speedup_wall",
            "speedup_iters",
            "top1",
            "pred_agreement",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
