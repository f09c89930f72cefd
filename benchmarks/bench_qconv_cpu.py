"""Packed low-bit conv/linear on the CPU (C++ kernels of ``qconv2d`` / ``qlinear``).

Per-layer shapes come from the real models: every ``nn.Conv2d`` of a forward pass of CIFAR
ResNet-20 (32x32), torchvision ResNet-18 (224x224) and EfficientNet-Lite0 (224x224) is recorded
(input shape, weight shape, stride, padding, groups; EfficientNet's symmetric TF-"same"
pre-padding folded into the conv padding as the packed runtime does, asymmetric pre-padding
kept as a padded input); identical layers are timed once and counted ``count`` times in the
network totals.

Candidates, timed in the same process, moments apart (``benchmarks.common.measure``, median of
``--repeat`` calls after warm-up; p10/p90 kept):

* ``fp32``: ``torch.nn.functional.conv2d`` on float32 NCHW (oneDNN);
* ``qint8``: PyTorch's own quantized conv, ``torch.ops.quantized.conv2d_relu`` with the ``x86``
  engine (``torch.backends.quantized.engine = "x86"``), quint8 channels_last activations (its
  native layout) with zero point 0 (a ReLU output's, as in the int8 models), per-channel qint8
  weights prepacked once, quint8 output. The zero point matters to FBGEMM: with 8 (what rows
  without ``qint8_x_zp`` used) the same 3x3 convs took 4.37 / 4.51 / 5.41 ms against 4.17 /
  3.79 / 3.49 ms with 0 (ResNet-18 64@56, 256@14, 512@7, batch 8, one thread, 2026-11-26),
  so those older rows understate it by 5-35%;
* ``W4A4``, ``W2A4``, ``W2A2``, ``W8A8``: ours, ``pdquant_fast._C.qconv2d_cpu`` with weights
  from ``qconv2d_prepack_cpu`` (what the packed runtime does), NCHW uint8 codes in (the
  runtime's layout), uint8 codes out (``out_bits`` = a_bits, ReLU). All four run the same
  AVX-512 VNNI u8 x s8 kernel (the values differ, the instructions do not); W8A8 uses weight
  offsets within int8 (zero point 128), offsets beyond +-127 take the int16 path (~2x slower,
  only the first/last layers of a deployment are 8-bit);
* ``W4A4_cl``: ours with channels_last input/output (no layout conversion in the kernel).

Every candidate of ours is checked bit-exact against ``pdquant_fast.ops.reference
.qconv2d_reference`` (on the first two images) before it is timed.

Columns: ``ms`` (median), ``GOPS`` = 2 * MACs / median, ``peak_frac`` = GOPS / VNNI int8 peak
(KERNEL_ANCHORS.md 3.1: 467 GOPS per Zen 4 core, 934 for the 2 cores, measured), ``x_fp32`` and
``x_qint8`` = speed-up over those baselines (>1: faster). Network rows (``layer = "ALL"``) sum
``count x median`` over the layers of one model and batch. On a shared, loaded machine a call
longer than a scheduler tick is often preempted, which inflates medians at random; ``p10_ms``
and ``x_qint8_p10`` (10th percentiles, summed the same way) show the uncontended speed.

Weight-bound linear (batch 1): ``qlinear_cpu`` with 4096 x 4096 weights at W4A8 / W2A8 (2-/4-bit
lines unpacked in the kernel) and W8A8 (int8), against ``F.linear`` (float32) and
``torch.ops.quantized.linear`` (x86, int8 weights). Enough distinct layers are cycled through
that their weights exceed the 32 MiB L3 several times over, so each call streams its weights
from DRAM; ``GBps`` = packed weight bytes / median, ``bw_frac`` = GBps /
``cpu_copy_bandwidth()`` (a large copy_ in the same run, read + write bytes).

Usage::

    python benchmarks/bench_qconv_cpu.py [--threads 2] [--models resnet20,resnet18,lite0]
        [--batches resnet20=1,32,256 ...] [--repeat 10] [--no-linear] [--quick] [--out DIR]
    pytest benchmarks/bench_qconv_cpu.py --benchmark-only

Rows go to ``<out>/qconv_cpu.jsonl`` (default benchmarks/results/) with the load average;
a table is printed. On the shared 2-vCPU VM, with other jobs running, use ``--threads 1``: every
parallel region of a 2-thread call waits for a thread the scheduler has parked, and whole
networks then ran ~10x slower than on one thread for every candidate alike (fp32, qint8 and ours;
the rows with ``threads = 2`` of 2026-11-26 are such runs and do not measure the kernels).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# PyTorch's CPU allocator on huge pages, as the pdquant CLI runs it (docs/KERNELS.md, "large
# activations and page faults"): set before torch's first allocation; a value already set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Timing, cpu_copy_bandwidth, measure, ratio, record  # noqa: E402
from pdquant_fast.ops import backends  # noqa: E402
from pdquant_fast.ops.reference import qconv2d_reference, qlinear_reference  # noqa: E402

SUITE = "qconv_cpu"
#: Zero point of the qint8 baseline's input (rows record it as ``qint8_x_zp``; rows without the
#: key used 8).
QINT8_X_ZP = 0
#: VNNI int8 peak per Zen 4 core (KERNEL_ANCHORS.md 3.1, measured: 934 GOPS on 2 cores).
VNNI_GOPS_PER_CORE = 467.0
BITS = {"W4A4": (4, 4), "W2A4": (2, 4), "W2A2": (2, 2), "W8A8": (8, 8)}
DEFAULT_BATCHES = {"resnet20": (1, 32, 256), "resnet18": (1, 8), "lite0": (1, 8)}
COLUMNS = [
    "model",
    "batch",
    "layer",
    "count",
    "shape",
    "candidate",
    "ms",
    "GOPS",
    "peak_frac",
    "x_fp32",
    "x_qint8",
    "p10_ms",
    "x_qint8_p10",
]

warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")


@dataclass(frozen=True)
class Layer:
    """One conv call: input [n, c, h, w] (already pre-padded), weight [o, c/g, kh, kw]."""

    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int

    def out_hw(self) -> tuple[int, int]:
        return (
            (self.h + 2 * self.padding[0] - self.kh) // self.stride[0] + 1,
            (self.w + 2 * self.padding[1] - self.kw) // self.stride[1] + 1,
        )

    def macs(self, n: int) -> int:
        ho, wo = self.out_hw()
        return n * self.o * ho * wo * (self.c // self.groups) * self.kh * self.kw

    def name(self) -> str:
        kind = "dw" if self.groups == self.c and self.groups > 1 else f"g{self.groups}"
        kind = "" if self.groups == 1 else kind
        return (
            f"{self.c}->{self.o} {self.kh}x{self.kw}/s{self.stride[0]} "
            f"@{self.h}x{self.w}{' ' + kind if kind else ''}"
        )


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def model_layers(model_name: str) -> list[tuple[Layer, int]]:
    """``(layer, count)`` for every distinct conv of one forward pass, in first-use order."""
    if model_name == "resnet20":
        from pdquant_fast.models import build_model

        model, size = build_model("cifar_resnet20")[0], 32
    elif model_name == "lite0":
        from pdquant_fast.models import build_model

        model, size = build_model("efficientnet_lite0")[0], 224
    elif model_name == "resnet18":
        from tests._torchvision import import_torchvision_models

        tvm = import_torchvision_models()
        if tvm is None:
            raise SystemExit("resnet18 needs torchvision's model definitions (not installed)")
        model, size = tvm.resnet18(weights=None).eval(), 224
    else:
        raise SystemExit(f"unknown model {model_name!r}; choose resnet20, resnet18, lite0")
    seen: Counter = Counter()
    order: list[Layer] = []

    def hook(module, inputs):
        # TF-"same" convs (EfficientNet) pad in a ZeroPad2d first: symmetric padding is folded
        # into the conv, as the packed runtime does (deploy.runtime._merge_padding); asymmetric
        # padding stays a pre-pad (the recorded input is the padded one, conv padding 0).
        x = inputs[0]
        h, w = x.shape[2], x.shape[3]
        ph, pw = _pair(module.padding)
        pad = getattr(getattr(module, "static_padding", None), "padding", None)
        if pad is not None:
            left, right, top, bottom = pad
            if left == right and top == bottom:
                ph, pw = ph + top, pw + left
            else:
                h, w = h + top + bottom, w + left + right
        layer = Layer(
            x.shape[1], h, w, module.out_channels, *module.kernel_size,
            _pair(module.stride), (ph, pw), module.groups,
        )  # fmt: skip
        if layer not in seen:
            order.append(layer)
        seen[layer] += 1

    handles = [
        m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    return [(layer, seen[layer]) for layer in order]


def _weights(g: torch.Generator, shape, w_bits: int) -> torch.Tensor:
    """Deployment weight offsets ``code - zp[o]``: int8, int16 for 8-bit (zero point 128)."""
    hi = (1 << w_bits) - 1
    codes = torch.randint(0, hi + 1, shape, generator=g)
    if w_bits == 8:
        return (codes - 128).to(torch.int16)
    zp = torch.randint(0, hi + 1, (shape[0],) + (1,) * (len(shape) - 1), generator=g)
    return (codes - zp).to(torch.int8)


def _qint8_conv(layer: Layer, x: torch.Tensor):
    """PyTorch's quantized conv (x86 engine): prepacked per-channel qint8 weights, quint8 NHWC."""
    torch.backends.quantized.engine = "x86"
    wf = torch.randn(layer.o, layer.c // layer.groups, layer.kh, layer.kw)
    qw = torch.quantize_per_channel(
        wf, wf.abs().amax(dim=(1, 2, 3)) / 127, torch.zeros(layer.o, dtype=torch.long), 0,
        torch.qint8,
    )  # fmt: skip
    packed = torch.ops.quantized.conv2d_prepack(
        qw, None, list(layer.stride), list(layer.padding), [1, 1], layer.groups
    )
    # zero point 0: a ReLU output's, what torch.ao gives the int8 models' post-ReLU activations;
    # FBGEMM runs a nonzero zero point markedly slower (QINT8_X_ZP in the module docstring)
    qx = torch.quantize_per_tensor(
        x.float().contiguous(memory_format=torch.channels_last), 15 / 255, QINT8_X_ZP, torch.quint8
    )
    return lambda: torch.ops.quantized.conv2d_relu(qx, packed, 0.1, 0)


def bench_layer(
    layer: Layer, n: int, repeat: int, g: torch.Generator
) -> dict[str, tuple[Timing, str]]:
    """Timing of every candidate on one layer (ours validated against the reference first)."""
    _C = backends._extension()[0]
    out: dict[str, tuple[Timing, str]] = {}
    min_time = 0.05
    xf = torch.rand(n, layer.c, layer.h, layer.w, generator=g) * 15
    wf = torch.randn(layer.o, layer.c // layer.groups, layer.kh, layer.kw, generator=g)
    st, pd = list(layer.stride), list(layer.padding)
    out["fp32"] = (
        measure(lambda: F.conv2d(xf, wf, None, st, pd, 1, layer.groups), repeat=repeat,
                min_time_s=min_time),
        "",
    )  # fmt: skip
    out["qint8"] = (measure(_qint8_conv(layer, xf), repeat=repeat, min_time_s=min_time), "")
    o = layer.o
    scale = torch.rand(o, generator=g) * 0.01 + 1e-3
    bias = torch.randn(o, generator=g)
    for cand, (wb, ab) in list(BITS.items()) + [("W4A4_cl", (4, 4))]:
        x = torch.randint(0, 1 << ab, (n, layer.c, layer.h, layer.w), generator=g)
        x = x.to(torch.uint8)
        w = _weights(g, (o, layer.c // layer.groups, layer.kh, layer.kw), wb)
        x_zp = (1 << ab) // 2
        args = (x_zp, w, scale, bias, st, pd, layer.groups, 1, None, 0.05, 0, ab)
        want = qconv2d_reference(x[:2], *args)
        packed = _C.qconv2d_prepack_cpu(w, layer.groups)
        pargs = (x_zp, packed) + args[2:]
        if cand.endswith("_cl"):
            x = x.contiguous(memory_format=torch.channels_last)
        got = _C.qconv2d_cpu(x[:2], *pargs)
        if not torch.equal(got, want):
            raise AssertionError(f"{cand} on {layer.name()} differs from the reference")
        path = "int16" if packed.int16 else ("depthwise" if packed.depthwise else "int8")
        out[cand] = (
            measure(lambda x=x, pargs=pargs: _C.qconv2d_cpu(x, *pargs), repeat=repeat,
                    min_time_s=min_time),
            path,
        )  # fmt: skip
    return out


def conv_rows(models, batches, repeat, threads) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    peak = VNNI_GOPS_PER_CORE * threads
    rows = []
    for model in models:
        layers = model_layers(model)
        for n in batches[model]:
            totals: dict[str, float] = Counter()
            totals_p10: dict[str, float] = Counter()
            macs_total = 0
            for layer, count in layers:
                res = bench_layer(layer, n, repeat, g)
                macs = layer.macs(n)
                macs_total += macs * count
                for cand, (t, path) in res.items():
                    totals[cand] += t.median_s * count
                    totals_p10[cand] += t.p10_s * count
                    gops = 2 * macs / t.median_s / 1e9
                    rows.append(
                        {
                            "model": model,
                            "batch": n,
                            "layer": layer.name(),
                            "count": count,
                            "shape": f"{n}x{layer.c}x{layer.h}x{layer.w} w{layer.o}x"
                            f"{layer.c // layer.groups}x{layer.kh}x{layer.kw}",
                            "candidate": cand + (f" ({path})" if path else ""),
                            "ms": t.median_s * 1e3,
                            "p10_ms": t.p10_s * 1e3,
                            "p90_ms": t.p90_s * 1e3,
                            "GOPS": gops,
                            "peak_frac": gops / peak,
                            "x_fp32": ratio(res["fp32"][0], t),
                            "x_qint8": ratio(res["qint8"][0], t),
                            "x_qint8_p10": res["qint8"][0].p10_s / t.p10_s,
                            "macs": macs,
                            "threads": threads,
                            "qint8_x_zp": QINT8_X_ZP,
                            "loadavg_1m": os.getloadavg()[0],
                        }
                    )
            for cand, total in totals.items():
                gops = 2 * macs_total / total / 1e9
                rows.append(
                    {
                        "model": model,
                        "batch": n,
                        "layer": "ALL",
                        "count": sum(c for _, c in layers),
                        "shape": f"{len(layers)} distinct convs",
                        "candidate": cand,
                        "ms": total * 1e3,
                        "GOPS": gops,
                        "peak_frac": gops / peak,
                        "x_fp32": totals["fp32"] / total,
                        "x_qint8": totals["qint8"] / total,
                        "p10_ms": totals_p10[cand] * 1e3,
                        "x_qint8_p10": totals_p10["qint8"] / totals_p10[cand],
                        "macs": macs_total,
                        "threads": threads,
                        "qint8_x_zp": QINT8_X_ZP,
                        "loadavg_1m": os.getloadavg()[0],
                    }
                )
    return rows


def linear_rows(repeat: int, threads: int, o: int = 4096, k: int = 4096) -> list[dict]:
    """Batch-1 weight-bound linear, weights cycled through so they stream from DRAM."""
    _C = backends._extension()[0]
    g = torch.Generator().manual_seed(1)
    bw = cpu_copy_bandwidth()
    rows = []
    scale, bias = torch.rand(o, generator=g) * 1e-3, torch.randn(o, generator=g)
    target = 96 << 20  # bytes of weights cycled per candidate: 3x the 32 MiB L3

    def cycle(fns):
        it = iter(())

        def call():
            nonlocal it
            try:
                next(it)()
            except StopIteration:
                it = iter(fns)
                next(it)()

        return call

    cands = {}
    xf = torch.rand(1, k, generator=g)
    nf = max(2, target // (o * k * 4))
    wfs = [torch.randn(o, k, generator=g) for _ in range(nf)]
    cands["fp32"] = (cycle([lambda w=w: F.linear(xf, w) for w in wfs]), o * k * 4)
    torch.backends.quantized.engine = "x86"
    qx = torch.quantize_per_tensor(xf, 0.01, 0, torch.quint8)
    nq = max(2, target // (o * k))
    qws = []
    for _ in range(nq):
        wq = torch.quantize_per_channel(
            torch.randn(o, k, generator=g), torch.full((o,), 0.02), torch.zeros(o).long(), 0,
            torch.qint8,
        )  # fmt: skip
        qws.append(torch.ops.quantized.linear_prepack(wq, None))
    cands["qint8"] = (
        cycle([lambda p=p: torch.ops.quantized.linear(qx, p, 0.1, 0) for p in qws]),
        o * k,
    )
    x = torch.randint(0, 256, (1, k), generator=g, dtype=torch.uint8)
    for name, wb in (("W4A8", 4), ("W2A8", 2), ("W8A8", 8)):
        w0 = _weights(g, (o, k), wb)
        args = (128, w0, scale, bias, 0, None, 0.05, 0, 8)
        packed0 = _C.qlinear_prepack_cpu(w0, wb)
        if not torch.equal(
            _C.qlinear_cpu(x, *((128, packed0) + args[2:])), qlinear_reference(x, *args)
        ):
            raise AssertionError(f"qlinear {name} differs from the reference")
        nbytes = packed0.weight_nbytes
        packs = [packed0] + [
            _C.qlinear_prepack_cpu(_weights(g, (o, k), wb), wb)
            for _ in range(max(2, target // nbytes) - 1)
        ]
        rest = args[2:]
        fns = [lambda p=p, rest=rest: _C.qlinear_cpu(x, 128, p, *rest) for p in packs]
        cands[name] = (cycle(fns), nbytes)
    timings = {
        name: measure(fn, repeat=repeat * 5, min_time_s=0.2) for name, (fn, _) in cands.items()
    }
    for name, (_, nbytes) in cands.items():
        t = timings[name]
        gbps = nbytes / t.median_s / 1e9
        rows.append(
            {
                "model": "linear",
                "batch": 1,
                "layer": f"{k}->{o}",
                "count": 1,
                "shape": f"1x{k} w{o}x{k}",
                "candidate": name,
                "ms": t.median_s * 1e3,
                "p10_ms": t.p10_s * 1e3,
                "p90_ms": t.p90_s * 1e3,
                "GBps": gbps,
                "bw_frac": gbps * 1e9 / bw,
                "copy_GBps": bw / 1e9,
                "weight_bytes": nbytes,
                "x_fp32": ratio(timings["fp32"], t),
                "x_qint8": ratio(timings["qint8"], t),
                "threads": threads,
                "loadavg_1m": os.getloadavg()[0],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="resnet20,resnet18,lite0")
    p.add_argument(
        "--batches", nargs="*", default=[], help="model=b1,b2 (default resnet20=1,32,256 ...)"
    )
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--no-linear", action="store_true")
    p.add_argument("--quick", action="store_true", help="resnet20 batch 1, few repeats")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    _C, why = backends._extension()
    if _C is None or not hasattr(_C, "qconv2d_cpu"):
        raise SystemExit(f"pdquant_fast._C with qconv2d_cpu is needed: {why}")
    batches = dict(DEFAULT_BATCHES)
    for spec in a.batches:
        name, _, vals = spec.partition("=")
        batches[name] = tuple(int(v) for v in vals.split(","))
    models = [m for m in a.models.split(",") if m]
    if a.quick:
        models, batches, a.repeat = ["resnet20"], {"resnet20": (1,)}, 3
    print(
        f"qconv_cpu: {a.threads} threads, ISA {_C.qkernels_isa_cpu()}, load average "
        f"{os.getloadavg()}",
        flush=True,
    )
    rows = conv_rows(models, batches, a.repeat, a.threads)
    if not a.no_linear and not a.quick:
        rows += linear_rows(a.repeat, a.threads)
    cols = COLUMNS + (["GBps", "bw_frac"] if any("GBps" in r for r in rows) else [])
    record(SUITE, rows, out_dir=a.out, columns=cols)
    return rows


# ------------------------------------------------------------------------------------------
# pytest-benchmark: `pytest benchmarks/bench_qconv_cpu.py --benchmark-only`

try:
    import pytest
except ImportError:  # script use without pytest
    pytest = None

if pytest is not None:
    _PYTEST_LAYERS = {
        "r20_s1": Layer(16, 32, 32, 16, 3, 3, (1, 1), (1, 1), 1),
        "r18_l1": Layer(64, 56, 56, 64, 3, 3, (1, 1), (1, 1), 1),
        "r18_l4": Layer(512, 7, 7, 512, 3, 3, (1, 1), (1, 1), 1),
        "lite0_dw": Layer(144, 56, 56, 144, 3, 3, (1, 1), (1, 1), 144),
    }

    @pytest.mark.parametrize("name", list(_PYTEST_LAYERS))
    @pytest.mark.parametrize("candidate", ["W4A4", "qint8", "fp32"])
    def test_qconv_cpu(benchmark, name, candidate):
        _C = backends._extension()[0]
        if _C is None or not hasattr(_C, "qconv2d_cpu"):
            pytest.skip("pdquant_fast._C with qconv2d_cpu not built")
        torch.set_num_threads(int(os.environ.get("PDQUANT_BENCH_THREADS", "2")))
        layer = _PYTEST_LAYERS[name]
        g = torch.Generator().manual_seed(0)
        xf = torch.rand(1, layer.c, layer.h, layer.w, generator=g) * 15
        if candidate == "qint8":
            fn = _qint8_conv(layer, xf)
        elif candidate == "fp32":
            wf = torch.randn(layer.o, layer.c // layer.groups, layer.kh, layer.kw)
            st, pd = list(layer.stride), list(layer.padding)
            fn = lambda: F.conv2d(xf, wf, None, st, pd, 1, layer.groups)  # noqa: E731
        else:
            x = xf.to(torch.uint8)
            w = _weights(g, (layer.o, layer.c // layer.groups, layer.kh, layer.kw), 4)
            args = (8, w, torch.full((layer.o,), 0.01), torch.zeros(layer.o))
            rest = (list(layer.stride), list(layer.padding), layer.groups, 1, None, 0.05, 0, 4)
            assert torch.equal(_C.qconv2d_cpu(x, *args, *rest), qconv2d_reference(x, *args, *rest))
            packed = _C.qconv2d_prepack_cpu(w, layer.groups)
            fn = lambda: _C.qconv2d_cpu(x, 8, packed, *args[2:], *rest)  # noqa: E731
        benchmark.extra_info.update(macs=layer.macs(1), loadavg_1m=os.getloadavg()[0])
        benchmark.pedantic(fn, rounds=10, warmup_rounds=2)


if __name__ == "__main__":
    main()
