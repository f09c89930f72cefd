"""Calibration kernels on the CPU (C++ backend): fake-quant, AdaRound, the MSE init search.

Cases (real layer shapes; PD-Quant reconstructs with a batch of 64 on ResNet-20, 32 here for the
ImageNet nets):

* ``fq_r20_l1`` ``[64, 16, 32, 32]``, ``fq_r20_l3`` ``[64, 64, 8, 8]`` (ResNet-20 activations),
  ``fq_r18_l1`` ``[32, 64, 56, 56]`` (ResNet-18 layer1, the 6.4M-element anchor),
  ``fq_lite0_stem`` ``[32, 32, 112, 112]`` (EfficientNet-Lite0 stem output): per-tensor
  activation fake-quant with QDrop (keep_prob 0.5);
* ``fq_r18_l1_channel``: the ResNet-18 activation per channel (axis 1), no QDrop;
* ``ada_r20`` ``[64, 64, 3, 3]``, ``ada_r18`` ``[512, 512, 3, 3]``, ``ada_lite0_fc``
  ``[1000, 1280]``: AdaRound soft weight + regulariser, forward and backward (4 bits);
* ``init_r20`` ``[64, 576]``, ``init_r18`` ``[512, 4608]``, ``init_lite0_fc`` ``[1000, 1280]``:
  the 2-D L2.4 search at 8 bits (25,600 candidates per row) and 4 bits.

Each fake-quant / AdaRound step is one forward and one backward (``autograd.grad`` with a fixed
upstream gradient: grad_x and grad_delta, or grad_alpha). Candidates, timed in the same process:

* ``cpp``: the public op with the C++ backend forced (QDrop mask drawn in the kernel from a seed);
* ``cpp-eager``: the same kernels through ``ops.fake_quant_act_eager`` /
  ``ops.adaround_soft_eager``, the path the quantizer modules take in an eager calibration (no
  ``torch.library`` dispatch);
* ``reference``: the public op with the plain-PyTorch reference backend (its forward composite
  and its backward composite, float64 grad_delta);
* ``ste_eager``: the straight-through composite a PyTorch user writes,
  ``(round(x/d) - x/d).detach() + x/d``, clamp, ``torch.where(mask, y, x)`` with a precomputed
  bool mask, under autograd;
* ``ste_compile``: ``torch.compile`` of that composite (compiled once, warmed up);
* ``torch_learnable``: ``torch._fake_quantize_learnable_per_{tensor,channel}_affine`` (no QDrop;
  it also returns a zero-point gradient and multiplies by 1/scale).

For the init search: ``cpp`` vs ``reference`` (the vectorised search of pdquant_fast.quant),
the reference on the first ``--ref-rows`` rows only (it takes ~1 s per 8-bit row), both reported
per row (``ms_per_row``) and the ratio from those.

Bandwidth (roofline of the elementwise kernels), N float32 elements: fake-quant fwd reads x and
writes y, bwd reads x and grad and writes grad_x: 20 N bytes (the QDrop seed costs no bytes; the
eager/compiled composites also read a 1 B/element mask, not counted); AdaRound fwd reads w_floor,
alpha, writes w_q, bwd reads grad_wq, w_floor, alpha, writes grad_alpha: 28 N bytes.
``GB/s = bytes / median``; ``copy_frac = GB/s / cpu_copy_bandwidth()`` (a large copy_ measured
in the same run, read + write counted).

The run applies the glibc settings ``pdquant calibrate`` applies on the CPU
(``pdquant_fast.deploy.memory.tune_malloc``; ``PDQUANT_TUNE_MALLOC=0`` keeps the defaults; rows
record ``malloc_tuned``): with glibc's defaults each call's 25 MB outputs were faulted in afresh,
which cost every candidate the same few ms (``fq_r18_l1_channel``, one thread: ours 12.5 -> 5.5
ms, ``torch.compile`` 16.4 -> 9.4 ms).

Two effects dominate on a shared 2-core machine and hit every candidate: (1) with 2 threads each
OpenMP parallel region waits for both threads, and under load (others' jobs) the second one may
wait a scheduler slice (~12 ms measured for a plain ``x + 1`` on 262K elements): run with
``--threads 1`` as well and report the load (``loadavg_1m`` in every row); (2) outputs above
glibc's 32 MB mmap threshold (the Lite0 shape) are fresh pages on every call, so page faults cost
more than the kernels (cpp step 104 ms -> 38 ms with ``THP_MEM_ALLOC_ENABLE=1``, torch's
huge-page switch for its CPU allocator, at 1 thread).

Every candidate is checked against the reference before it is timed (forward and grad_x
bit-exact for the ``cpp`` fake-quant; other outputs within the budgets of tests/test_ops_cpu.py
or, for the composites and torch's op, 1e-4 relative: they are other formulas of the same math).

Usage::

    python benchmarks/bench_calib_kernels_cpu.py [--threads 2] [--cases a,b] [--quick]
        [--no-compile] [--repeat 15] [--ref-rows 2] [--out DIR]
    pytest benchmarks/bench_calib_kernels_cpu.py --benchmark-only

Rows go to ``<out>/calib_kernels_cpu.jsonl`` (default benchmarks/results/) with the machine's
load average; a table is printed. ``--quick`` runs tiny shapes (a smoke test).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

# PyTorch's CPU allocator on huge pages, as the pdquant CLI runs it (docs/KERNELS.md, "large
# activations and page faults"): set before torch's first allocation; a value already set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.calib_steps import (  # noqa: E402
    ada_op_step,
    fq_learnable_step,
    fq_op_step,
    ste_adaround,
)
from benchmarks.common import (  # noqa: E402
    Timing,
    cpu_copy_bandwidth,
    measure,
    ratio,
    record,
    tune_malloc_like_cli,
)
from pdquant_fast import ops  # noqa: E402
from pdquant_fast.ops import reference as R  # noqa: E402

SUITE = "calib_kernels_cpu"
COLUMNS = [
    "case",
    "shape",
    "candidate",
    "ms",
    "p10_ms",
    "p90_ms",
    "x_compile",
    "x_learnable",
    "x_reference",
    "GB/s",
    "copy_frac",
    "status",
]


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "fq", "ada" or "init"
    shape: tuple[int, ...]
    per_channel: bool = False
    axis: int = 0
    bits: int = 4
    keep_prob: float = 1.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def bytes_moved(self) -> int:
        return {"fq": 20, "ada": 28}.get(self.kind, 0) * self.numel


CASES = [
    Case("fq_r20_l1", "fq", (64, 16, 32, 32), keep_prob=0.5),
    Case("fq_r20_l3", "fq", (64, 64, 8, 8), keep_prob=0.5),
    Case("fq_r18_l1", "fq", (32, 64, 56, 56), keep_prob=0.5),
    Case("fq_lite0_stem", "fq", (32, 32, 112, 112), keep_prob=0.5),
    Case("fq_r18_l1_channel", "fq", (32, 64, 56, 56), per_channel=True, axis=1),
    Case("ada_r20", "ada", (64, 64, 3, 3)),
    Case("ada_r18", "ada", (512, 512, 3, 3)),
    Case("ada_lite0_fc", "ada", (1000, 1280)),
    Case("init_r20_8b", "init", (64, 576), bits=8),
    Case("init_r18_8b", "init", (512, 4608), bits=8),
    Case("init_lite0_fc_8b", "init", (1000, 1280), bits=8),
    Case("init_lite0_fc_4b", "init", (1000, 1280), bits=4),
]
QUICK = {
    "fq": (2, 4, 6, 6),
    "ada": (8, 4, 3, 3),
    "init": (4, 64),
}


# ------------------------------------------------------------------------------------------
# inputs, composites, steps


def fq_inputs(case: Case) -> dict:
    g = torch.Generator().manual_seed(0)
    n = 2**case.bits - 1
    x = torch.randn(case.shape, generator=g)
    if case.per_channel:
        c = case.shape[case.axis]
        delta = torch.rand(c, generator=g) * 0.05 + 0.02
        zp = torch.randint(0, n + 1, (c,), generator=g).float()
    else:
        delta, zp = torch.tensor(0.05), torch.tensor(float(n // 2))
    seed = torch.tensor(1234) if case.keep_prob < 1 else None
    mask = None
    if seed is not None:  # the same mask the kernel draws, for the composites
        mask = R.qdrop_mask_reference(seed, x.numel(), case.keep_prob).reshape(case.shape)
    return {
        "x": x,
        "delta": delta,
        "zp": zp,
        "seed": seed,
        "mask": mask,
        "grad": torch.randn(case.shape, generator=g),
    }


def ada_inputs(case: Case) -> dict:
    g = torch.Generator().manual_seed(0)
    n = 2**case.bits - 1
    c = case.shape[0]
    w = torch.randn(case.shape, generator=g) * 0.05
    delta = (w.reshape(c, -1).abs().amax(dim=1) / (n / 2)).clamp(min=1e-6)
    view = (c,) + (1,) * (len(case.shape) - 1)
    return {
        "w_floor": torch.floor(w / delta.reshape(view)),
        "alpha": torch.randn(case.shape, generator=g) * 2,
        "delta": delta,
        "zp": torch.full((c,), float((n + 1) // 2)),
        "beta": torch.tensor(8.0),
        "grad_wq": torch.randn(case.shape, generator=g),
        "grad_reg": torch.tensor(0.01),
    }


def _bview(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    if t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def ste_fake_quant(x, delta, zp, n: int, mask):
    """Straight-through fake-quant with QDrop as a PyTorch user writes it (the reference math)."""
    t = x / delta
    x_int = (torch.round(t) - t).detach() + t + zp
    y = (torch.clamp(x_int, 0, n) - zp) * delta
    return y if mask is None else torch.where(mask, y, x)


def fq_ste_step(case: Case, inp: dict, compiled: bool) -> Callable:
    n = 2**case.bits - 1
    nd = len(case.shape)
    d_param = inp["delta"].clone().requires_grad_()
    zp = _bview(inp["zp"], nd, case.axis)
    fn = torch.compile(ste_fake_quant, dynamic=False) if compiled else ste_fake_quant

    def step():
        x = inp["x"].detach().requires_grad_()
        y = fn(x, _bview(d_param, nd, case.axis), zp, n, inp["mask"])
        gx, gd = torch.autograd.grad(y, (x, d_param), inp["grad"])
        return y, gx, gd

    return step


def ada_ste_step(case: Case, inp: dict, compiled: bool) -> Callable:
    n = 2**case.bits - 1
    nd = len(case.shape)
    fn = torch.compile(ste_adaround, dynamic=False) if compiled else ste_adaround
    d, z = _bview(inp["delta"], nd, 0), _bview(inp["zp"], nd, 0)

    def step():
        alpha = inp["alpha"].detach().requires_grad_()
        w_q, reg = fn(inp["w_floor"], alpha, d, z, n, inp["beta"])
        (ga,) = torch.autograd.grad((w_q, reg), (alpha,), (inp["grad_wq"], inp["grad_reg"]))
        return w_q, reg, ga

    return step


def with_backend(backend: str | None, fn: Callable) -> Callable:
    def run():
        ops.force(backend)
        try:
            return fn()
        finally:
            ops.force(None)

    return run


# ------------------------------------------------------------------------------------------
# validation (before timing)


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    scale = want.double().abs().max().clamp(min=1e-30)
    err = (got.double() - want.double()).abs().max()
    if not err <= rtol * scale:
        raise AssertionError(f"{what}: max error {float(err):.3e} > {rtol} x {float(scale):.3e}")


def validate(case: Case, candidate: str, out, want) -> None:
    if case.kind == "fq":
        (y, gx, gd), (y_r, gx_r, gd_r) = out, want
        if candidate.startswith("cpp"):
            if not (torch.equal(y, y_r) and torch.equal(gx, gx_r)):
                raise AssertionError("cpp forward / grad_x not bit-exact with the reference")
            _close(gd, gd_r, 1e-6, "grad_delta")
        elif candidate != "torch_learnable" or case.keep_prob == 1:
            # composites: grad_x = (g d) / d (close, not exact); learnable: 1/scale products
            _close(y, y_r, 1e-5, "y")
            _close(gx, gx_r, 1e-5, "grad_x")
            _close(gd, gd_r, 1e-3, "grad_delta")
    elif case.kind == "ada":
        (wq, reg, ga), (wq_r, reg_r, ga_r) = out, want
        _close(wq, wq_r, 1e-5, "w_q")
        _close(reg, reg_r, 1e-5, "reg")
        _close(ga, ga_r, 1e-4, "grad_alpha")


# ------------------------------------------------------------------------------------------
# the run


def _row(case: Case, candidate: str, t: Timing | None, status: str = "ok", **extra) -> dict:
    row = {
        "case": case.name,
        "shape": "x".join(map(str, case.shape)),
        "candidate": candidate,
        "kind": case.kind,
        "bits": case.bits,
        "per_channel": case.per_channel,
        "keep_prob": case.keep_prob,
        "threads": torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0],
        "status": status,
    }
    if t is not None:
        row.update(ms=t.median_s * 1e3, p10_ms=t.p10_s * 1e3, p90_ms=t.p90_s * 1e3, n=t.n)
        if case.bytes_moved():
            gbs = case.bytes_moved() / t.median_s / 1e9
            row.update({"GB/s": gbs, "copy_frac": gbs * 1e9 / cpu_copy_bandwidth()})
    row.update(extra)
    return row


def candidates_for(case: Case, compile_: bool) -> dict[str, Callable]:
    if case.kind == "fq":
        inp = fq_inputs(case)
        out = {
            "cpp": with_backend("cpp", fq_op_step(case, inp)),
            "cpp-eager": with_backend("cpp", fq_op_step(case, inp, eager=True)),
            "reference": with_backend("reference", fq_op_step(case, inp)),
            "ste_eager": fq_ste_step(case, inp, compiled=False),
            "torch_learnable": fq_learnable_step(case, inp),
        }
        if compile_:
            out["ste_compile"] = fq_ste_step(case, inp, compiled=True)
        return out
    inp = ada_inputs(case)
    out = {
        "cpp": with_backend("cpp", ada_op_step(case, inp)),
        "cpp-eager": with_backend("cpp", ada_op_step(case, inp, eager=True)),
        "reference": with_backend("reference", ada_op_step(case, inp)),
        "ste_eager": ada_ste_step(case, inp, compiled=False),
    }
    if compile_:
        out["ste_compile"] = ada_ste_step(case, inp, compiled=True)
    return out


def run_elementwise(case: Case, repeat: int, compile_: bool) -> list[dict]:
    cands = candidates_for(case, compile_)
    want = cands["reference"]()
    rows, times = [], {}
    for name, fn in cands.items():
        try:
            out = fn()  # first call: compiles ste_compile
            validate(case, name, out, want)
            slow = name == "reference"  # seconds per call on the large shapes
            times[name] = measure(fn, warmup=1 if slow else 3, repeat=5 if slow else repeat)
            rows.append(_row(case, name, times[name]))
        except Exception as exc:  # a failing candidate is a row, not a crash
            rows.append(_row(case, name, None, status=f"{type(exc).__name__}: {exc}"[:200]))
    for row in rows:
        t = times.get(row["candidate"])
        if t is None:
            continue
        for base, col in (
            ("ste_compile", "x_compile"),
            ("torch_learnable", "x_learnable"),
            ("reference", "x_reference"),
        ):
            if base in times:
                row[col] = ratio(times[base], t)  # base time / this time
    return rows


def init_inputs(case: Case) -> torch.Tensor:
    """Real weights where they are available (ResNet-20 layer3.1.conv1 for init_r20, the
    EfficientNet-Lite0 classifier for init_lite0_fc), else normal rows of the same shape."""
    data = Path(
        os.environ.get(
            "PDQUANT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"
        )
    )
    try:
        if case.name.startswith("init_r20") and case.shape == (64, 576):
            p = data / "cifar10/models/akamaster_resnet/resnet20-12fca82f.th"
            sd = torch.load(p, map_location="cpu", weights_only=True)["state_dict"]
            return sd["module.layer3.1.conv1.weight"].reshape(64, -1).contiguous()
        if case.name.startswith("init_lite0_fc") and case.shape == (1000, 1280):
            p = data / "imagenet/models/efficientnet_lite0/efficientnet-lite0-57934424.pth"
            return torch.load(p, map_location="cpu", weights_only=True)["_fc.weight"].contiguous()
    except (OSError, KeyError):
        pass
    return (torch.randn(case.shape, generator=torch.Generator().manual_seed(0)) * 0.05).contiguous()


def run_init(case: Case, repeat: int, ref_rows: int) -> list[dict]:
    x = init_inputs(case)
    rows = []
    sub = x[:ref_rows].contiguous()
    d_r, z_r = R.mse_search_2d_reference(sub, case.bits, 100)
    ops.force("cpp")
    try:
        d_c, z_c = ops.mse_search_2d(sub, case.bits, 100)
        n = 2**case.bits - 1

        def score(d, z):
            x64 = sub.double()
            xq = (torch.clamp(torch.round(sub / d[:, None]) + z[:, None], 0, n) - z[:, None]) * d[
                :, None
            ]
            return (x64 - xq.double()).abs().pow(2.4).mean(dim=1)

        if (score(d_c, z_c) > score(d_r, z_r) * (1 + 1e-5)).any():
            raise AssertionError("cpp init search scores above the reference's choice")
        t_cpp = measure(
            lambda: ops.mse_search_2d(x, case.bits, 100), warmup=1, repeat=max(3, repeat // 3)
        )
    finally:
        ops.force(None)
    t_ref = measure(lambda: R.mse_search_2d_reference(sub, case.bits, 100), warmup=0, repeat=1)
    per_row_cpp = t_cpp.median_s / x.shape[0]
    per_row_ref = t_ref.median_s / sub.shape[0]
    rows.append(
        _row(
            case,
            "cpp",
            t_cpp,
            ms_per_row=per_row_cpp * 1e3,
            rows=x.shape[0],
            x_reference=per_row_ref / per_row_cpp,
        )
    )
    rows.append(
        _row(
            case,
            "reference",
            t_ref,
            ms_per_row=per_row_ref * 1e3,
            rows=sub.shape[0],
            status=f"ok (first {sub.shape[0]} rows; full layer ~{per_row_ref * x.shape[0]:.0f} s)",
        )
    )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--ref-rows", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    tune_malloc_like_cli()
    torch.set_num_threads(args.threads)
    cases = CASES
    if args.cases:
        want = set(args.cases.split(","))
        cases = [c for c in CASES if c.name in want]
    if args.quick:
        cases = [replace(c, shape=QUICK[c.kind]) for c in cases]
    rows = []
    for case in cases:
        if case.kind == "init":
            rows += run_init(case, args.repeat, args.ref_rows)
        else:
            rows += run_elementwise(case, args.repeat, not args.no_compile)
    print(
        f"threads {torch.get_num_threads()}, copy bandwidth {cpu_copy_bandwidth() / 1e9:.1f} GB/s, "
        f"load average {os.getloadavg()}"
    )
    record(SUITE, rows, out_dir=args.out, columns=COLUMNS + ["ms_per_row"])
    return rows


# ------------------------------------------------------------------------------------------
# pytest-benchmark: `pytest benchmarks/bench_calib_kernels_cpu.py --benchmark-only`


def _pytest_params():
    out = []
    for case in CASES:
        names = (
            ["cpp", "reference"]
            if case.kind == "init"
            else ["cpp", "cpp-eager", "reference", "ste_eager", "ste_compile"]
            + (["torch_learnable"] if case.kind == "fq" else [])
        )
        out += [(case, name) for name in names]
    return out


try:
    import pytest
except ImportError:  # script use without pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize(
        "case,candidate", _pytest_params(), ids=lambda v: v.name if isinstance(v, Case) else v
    )
    def test_calib_kernel(benchmark, case, candidate):
        torch.set_num_threads(int(os.environ.get("PDQUANT_BENCH_THREADS", "2")))
        if case.kind == "init":
            x = init_inputs(case)
            if candidate == "reference":
                x = x[:1].contiguous()
                benchmark.pedantic(R.mse_search_2d_reference, args=(x, case.bits, 100), rounds=1)
                return
            ops.force("cpp")
            try:
                benchmark.pedantic(ops.mse_search_2d, args=(x, case.bits, 100), rounds=3)
            finally:
                ops.force(None)
            return
        fn = candidates_for(case, compile_=candidate == "ste_compile")[candidate]
        want = candidates_for(case, compile_=False)["reference"]()
        validate(case, candidate, fn(), want)
        benchmark.extra_info.update(bytes=case.bytes_moved(), loadavg_1m=os.getloadavg()[0])
        benchmark.pedantic(fn, rounds=10, warmup_rounds=2)


if __name__ == "__main__":
    main()
