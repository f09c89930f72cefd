"""Per-layer times of a packed model: inside the model, alone with a warm input, alone with a
cold one.

A packed layer can run slower inside the model than the per-layer microbenchmark says
(``bench_qconv_cpu.py`` times each shape in a loop on one input, which then sits in cache). This
script quick-quantizes and exports a model as ``bench_packed_latency.py`` does, wraps every
chosen packed layer's call (keeping the arguments of its last call in a model forward: the real
input codes and residual), then times, per layer:

* ``in_model_ms``: the layer's share of whole forwards (each packed layer's call wrapped with a
  wall clock; median over ``--repeat`` forwards);
* ``warm_ms``: the same call on the captured input, ``--repeat`` times in a row (input, weights
  and output buffer stay in cache);
* ``cold_ms``: the same, with a 64 MB buffer swept (``add_(1)``) before each call, so the input,
  the weights and the output block come from memory.

One thread by default; ``THP_MEM_ALLOC_ENABLE=1`` as the CLI sets it. Rows go to
``<out>/model_layers.jsonl`` (not a ``*latency*`` file, so the README's latency tables leave them
out). Used for the A/B measurements of the NHWC GEMM changes in docs/DEPLOY.md, run once per
build in alternating processes:

    python benchmarks/bench_model_layers.py --model resnet18 --batch 8 \
        --layers layer2.0.conv1 layer2.0.downsample.0
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_packed_latency import build, export_quick, parse_format  # noqa: E402
from benchmarks.common import record  # noqa: E402
from pdquant_fast.deploy import load_packed  # noqa: E402

COLUMNS = ["model", "batch", "bits", "layer", "x_shape", "residual", "in_model_ms", "warm_ms",
           "cold_ms"]  # fmt: skip


def _median_ms(fn, repeat: int, before=None) -> float:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cifar_resnet20",
                   choices=["cifar_resnet20", "resnet18", "efficientnet_lite0"])  # fmt: skip
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--format", default="w4a4", help="wNaM (default w4a4)")
    p.add_argument("--input-bits", type=int, default=8, help="the integer stem (0: float stem)")
    p.add_argument("--layers", nargs="*", help="packed layer names (default: all)")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="results folder (default benchmarks/results/)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeat < 1 or args.threads < 1:
        p.error("--batch, --repeat and --threads must be >= 1")
    w_bits, a_bits = parse_format(args.format, p)
    torch.set_num_threads(args.threads)
    model, shape = build(args.model)
    with tempfile.TemporaryDirectory() as d:
        export_quick(args.model, model, shape, w_bits, a_bits, args.input_bits or None, d)
        pm = load_packed(d)
    x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0))
    nodes = [n["layer"] for n in pm.graph_nodes if n["op"] == "layer_packed"]
    names = args.layers or nodes
    unknown = [n for n in names if n not in nodes]
    if unknown:
        p.error(f"--layers: {unknown} are not packed layers of {args.model}; allowed: {nodes}")

    # in the model: wrap every chosen packed layer's forward with a clock; keep its arguments
    spent: dict[str, list[float]] = {n: [] for n in names}
    last_args: dict[str, tuple] = {}
    originals = {}
    for name in names:
        layer = pm.layers[name.replace(".", "_")]
        originals[name] = layer.forward

        def timed(*a, _f=layer.forward, _n=name, **k):
            t = time.perf_counter()
            out = _f(*a, **k)
            spent[_n][-1] += time.perf_counter() - t
            last_args[_n] = (a, k)
            return out

        layer.forward = timed
    with torch.no_grad():
        for _ in range(3):
            for n in names:
                spent[n].append(0.0)
            pm(x)
        for n in names:
            spent[n].clear()
        for _ in range(args.repeat):
            for n in names:
                spent[n].append(0.0)
            pm(x)
    for name, f in originals.items():
        pm.layers[name.replace(".", "_")].forward = f

    bits = args.format.upper() + (f"-in{args.input_bits}" if args.input_bits else "")
    sweep = torch.empty(64 << 20, dtype=torch.uint8)
    rows = []
    with torch.no_grad():
        for name in names:
            layer = pm.layers[name.replace(".", "_")]
            a, k = last_args[name]
            xin = a[0]
            res = a[1] if len(a) > 1 else k.get("residual")

            def call(layer=layer, a=a, k=k):
                layer(*a, **k)

            for _ in range(3):
                call()
            rows.append(
                {
                    "model": args.model,
                    "batch": args.batch,
                    "bits": bits,
                    "threads": args.threads,
                    "layer": name,
                    "x_shape": "x".join(map(str, xin.shape)),
                    "residual": res is not None,
                    "in_model_ms": statistics.median(spent[name]) * 1e3,
                    "warm_ms": _median_ms(call, args.repeat),
                    "cold_ms": _median_ms(call, args.repeat, before=lambda: sweep.add_(1)),
                }
            )
    record("model_layers", rows, out_dir=args.out, columns=COLUMNS)
    return rows


if __name__ == "__main__":
    main()
