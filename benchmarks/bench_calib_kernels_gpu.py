"""Calibration kernels on the GPU: fake-quant and AdaRound forward + backward, against baselines.

Cases (shapes of real layers; PD-Quant reconstructs with a batch of 64):

* ``fq_tensor_resnet18_l1``: activation fake-quant, per tensor, QDrop with an in-kernel seed,
  ResNet-18 layer1 activation ``[64, 64, 56, 56]``;
* ``fq_tensor_effnet_lite0``: the same on EfficientNet-Lite0's stem output ``[64, 32, 112, 112]``;
* ``fq_channel_resnet18_l1``: per-channel (axis 1) fake-quant of ``[64, 64, 56, 56]``, no QDrop;
* ``fq_channel_weight``: per-output-channel weight fake-quant of ``[512, 512, 3, 3]`` (axis 0);
* ``adaround_weight``: AdaRound soft weight + regulariser and its gradient, ``[512, 512, 3, 3]``.

Each step is one forward and one backward (``autograd.grad`` of the output with a fixed upstream
gradient, giving grad_x and grad_delta / grad_alpha). Candidates, timed in the same process:

* ``cuda`` / ``triton``: the op with that backend forced (``pdquant_fast.ops.force``), eager,
  timed inside ``ops.deferred_checks()`` as the engine calls it (no host sync per call);
* ``cuda-eager`` / ``triton-eager``: the same op through ``ops.*_eager`` (no ``torch.library``
  dispatch), as the engine's quantizer modules call it;
* ``cuda+graph`` / ``triton+graph``: the same step captured once in a CUDA graph, replayed;
* ``reference``: the op with the plain-PyTorch reference backend (float64 grad_delta sum);
* ``ste_eager``: the straight-through composite a PyTorch user writes (round-STE, clamp, QDrop
  mask from ``rand_like``), autograd — the baseline of the ``speedup`` column;
* ``ste_compile``: ``torch.compile`` of that composite (forward + backward);
* ``torch_learnable``: ``torch._fake_quantize_learnable_per_{tensor,channel}_affine`` (no QDrop;
  multiplies by 1/scale, so not bit-exact with the contract; also returns a zero-point grad).

Before timing, every ``cuda``/``triton`` candidate is checked against the reference (forward and
grad_x / grad_alpha bit-exact, reductions to 1e-5 relative); a candidate that fails or cannot
run becomes a row with its error, and the run goes on.

Bandwidth (the roofline of these elementwise kernels), ``N`` elements of 4 bytes:
fake-quant ``fwd reads x, writes y`` + ``bwd reads x, grad, writes grad_x`` = 20 N bytes;
AdaRound ``fwd reads w_floor, alpha, writes w_q`` + ``bwd reads grad_wq, w_floor, alpha, writes
grad_alpha`` = 28 N bytes. ``GB/s = bytes / median time``; ``hbm_frac = GB/s / HBM peak``
(``benchmarks.common.gpu_hbm_peak``).

Usage::

    python benchmarks/bench_calib_kernels_gpu.py [--out DIR] [--device cuda|cpu] [--quick]
        [--no-compile] [--cases NAME,...]

Rows go to ``<out>/calib_kernels_gpu.jsonl`` (default ``benchmarks/results/``) and a table is
printed. ``--device cpu --quick`` runs tiny shapes on the CPU (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.calib_steps import (  # noqa: E402
    ada_op_step,
    fq_learnable_step,
    fq_op_step,
    ste_adaround,
)
from benchmarks.common import Timing, gpu_hbm_peak, measure, record  # noqa: E402
from pdquant_fast import ops  # noqa: E402
from pdquant_fast.ops import backends  # noqa: E402
from pdquant_fast.ops import reference as R  # noqa: E402

SUITE = "calib_kernels_gpu"
BASELINE = "ste_eager"
COLUMNS = [
    "case",
    "shape",
    "candidate",
    "kind",
    "bits",
    "per_channel",
    "ms",
    "p10_ms",
    "p90_ms",
    "speedup",
    "vs_compile",
    "GB/s",
    "hbm_frac",
    "status",
]


@dataclass(frozen=True)
class Case:
    """One benchmark case: an op family, a real layer shape, its quantizer settings."""

    name: str
    kind: str  # "fq" (fake_quant_act) or "ada" (adaround_soft)
    shape: tuple[int, ...]
    per_channel: bool = False
    axis: int = 0
    bits: int = 4
    keep_prob: float = 1.0  # < 1: QDrop with an in-kernel seed

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def bytes_moved(self) -> int:
        """Bytes a fused forward + backward must read and write (see the module docstring)."""
        return (20 if self.kind == "fq" else 28) * self.numel


CASES = [
    Case("fq_tensor_resnet18_l1", "fq", (64, 64, 56, 56), keep_prob=0.5),
    Case("fq_tensor_effnet_lite0", "fq", (64, 32, 112, 112), keep_prob=0.5),
    Case("fq_channel_resnet18_l1", "fq", (64, 64, 56, 56), per_channel=True, axis=1),
    Case("fq_channel_weight", "fq", (512, 512, 3, 3), per_channel=True, axis=0),
    Case("adaround_weight", "ada", (512, 512, 3, 3), bits=4),
]
QUICK_SHAPES = {  # --quick: same cases, tiny shapes (CPU smoke test)
    "fq_tensor_resnet18_l1": (2, 4, 6, 6),
    "fq_tensor_effnet_lite0": (2, 3, 7, 7),
    "fq_channel_resnet18_l1": (2, 4, 6, 6),
    "fq_channel_weight": (8, 4, 3, 3),
    "adaround_weight": (8, 4, 3, 3),
}


# ------------------------------------------------------------------------------------------
# inputs and steps


def fq_inputs(case: Case, device: str) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    n = 2**case.bits - 1
    x = torch.randn(case.shape, generator=g).to(device)
    if case.per_channel:
        c = case.shape[case.axis]
        delta = (torch.rand(c, generator=g) * 0.05 + 0.02).to(device)
        zp = torch.randint(0, n + 1, (c,), generator=g).float().to(device)
    else:
        delta = torch.tensor(0.05, device=device)
        zp = torch.tensor(float(n // 2), device=device)
    seed = torch.tensor(1234, dtype=torch.int64, device=device) if case.keep_prob < 1 else None
    return {"x": x, "delta": delta, "zp": zp, "seed": seed, "grad": torch.randn_like(x)}


def ada_inputs(case: Case, device: str) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    n = 2**case.bits - 1
    c = case.shape[0]
    w = torch.randn(case.shape, generator=g) * 0.05
    delta = (w.reshape(c, -1).abs().amax(dim=1) / (n / 2)).clamp(min=1e-6)
    view = (c,) + (1,) * (len(case.shape) - 1)
    w_floor = torch.floor(w / delta.reshape(view))
    alpha = torch.randn(case.shape, generator=g) * 2
    zp = torch.full((c,), float((n + 1) // 2))
    out = {"w_floor": w_floor, "alpha": alpha, "delta": delta, "zp": zp}
    out = {k: v.to(device) for k, v in out.items()}
    out["beta"] = torch.tensor(8.0, device=device)
    out["grad_wq"] = torch.randn(case.shape, generator=g).to(device)
    out["grad_reg"] = torch.tensor(0.01, device=device)
    return out


def _bview(t: torch.Tensor, case: Case) -> torch.Tensor:
    if t.dim() == 0:
        return t
    shape = [1] * len(case.shape)
    shape[case.axis] = -1
    return t.reshape(shape)


def ste_fake_quant(x, delta, zp, n: int, keep_prob: float):
    """The plain-PyTorch straight-through fake-quant with QDrop (what the engine did before)."""
    t = x / delta
    x_int = (torch.round(t) - t).detach() + t + zp
    y = (torch.clamp(x_int, 0, n) - zp) * delta
    if keep_prob < 1:
        y = torch.where(torch.rand_like(x) < keep_prob, y, x)
    return y


def fq_ste_step(case: Case, inp: dict, compiled: bool) -> Callable:
    n = 2**case.bits - 1
    d_param = inp["delta"].clone().requires_grad_()
    zp = _bview(inp["zp"], case)
    fn = ste_fake_quant
    if compiled:
        fn = torch.compile(ste_fake_quant, fullgraph=True, dynamic=False)

    def step():
        x = inp["x"].detach().requires_grad_()
        y = fn(x, _bview(d_param, case), zp, n, case.keep_prob)
        gx, gd = torch.autograd.grad(y, (x, d_param), inp["grad"])
        return y, gx, gd

    return step


def ada_ste_step(case: Case, inp: dict, compiled: bool) -> Callable:
    n = 2**case.bits - 1
    alpha = inp["alpha"].clone().requires_grad_()
    view = (-1,) + (1,) * (len(case.shape) - 1)
    d, z = inp["delta"].reshape(view), inp["zp"].reshape(view)
    fn = torch.compile(ste_adaround, fullgraph=True, dynamic=False) if compiled else ste_adaround

    def step():
        w_q, reg = fn(inp["w_floor"], alpha, d, z, n, inp["beta"])
        (ga,) = torch.autograd.grad((w_q, reg), (alpha,), (inp["grad_wq"], inp["grad_reg"]))
        return w_q, reg, ga

    return step


# ------------------------------------------------------------------------------------------
# validation


def _exact(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape or not torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)):
        bad = (a != b).sum().item() if a.shape == b.shape else "shape"
        raise AssertionError(f"{what} differs from the reference ({bad} elements)")


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    err = (a.double() - b.double()).abs()
    if (err > rtol * b.double().abs().clamp(min=1e-30)).any():
        raise AssertionError(f"{what}: max error {float(err.max()):.3e} over rtol {rtol}")


def validate(case: Case, inp: dict, out) -> None:
    """Forward and grad_x / grad_alpha bit-exact vs the reference; reductions to 1e-5."""
    if case.kind == "fq":
        y, gx, gd = out
        args = (inp["delta"], inp["zp"], case.bits, case.axis, case.keep_prob, inp["seed"], None)
        y_ref = R.fake_quant_act_reference(inp["x"], *args)
        gx_ref, gd_ref = R.fake_quant_act_backward_reference(inp["grad"], inp["x"], *args)
        _exact(y, y_ref, "forward")
        _exact(gx, gx_ref, "grad_x")
        _close(gd, gd_ref, "grad_delta")
    else:
        w_q, reg, ga = out
        a = (inp["w_floor"], inp["alpha"], inp["delta"], inp["zp"], case.bits, inp["beta"])
        w_q_ref, reg_ref = R.adaround_soft_reference(*a)
        ga_ref = R.adaround_soft_backward_reference(inp["grad_wq"], inp["grad_reg"], *a)
        _exact(w_q, w_q_ref, "w_q")
        _close(reg, reg_ref, "reg")
        _exact(ga, ga_ref, "grad_alpha")


# ------------------------------------------------------------------------------------------
# running


def capture_graph(step: Callable, device: str) -> Callable:
    """Capture ``step`` in a CUDA graph (after warm-up on a side stream); returns ``replay``."""
    if device != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def candidates(case: Case, inp: dict, device: str, with_compile: bool) -> list[tuple]:
    """``(name, backend to force or None, step factory, validate?)`` for this case."""
    op_step = fq_op_step if case.kind == "fq" else ada_op_step
    ste_step = fq_ste_step if case.kind == "fq" else ada_ste_step
    out = [
        (BASELINE, None, lambda: ste_step(case, inp, compiled=False), False),
        ("reference", "reference", lambda: op_step(case, inp), False),
    ]
    if with_compile:
        out.append(("ste_compile", None, lambda: ste_step(case, inp, compiled=True), False))
    if case.kind == "fq":
        out.append(("torch_learnable", None, lambda: fq_learnable_step(case, inp), False))
    for backend in ("cuda", "triton"):
        out.append((backend, backend, lambda: op_step(case, inp), True))
        out.append((f"{backend}-eager", backend, lambda: op_step(case, inp, eager=True), True))
        out.append((f"{backend}+graph", backend, lambda: op_step(case, inp), True))
    return out


def _unavailable(case: Case, name: str, backend: str | None, device: str) -> str | None:
    if name.endswith("+graph") and device != "cuda":
        return "CUDA graphs need a CUDA device"
    if backend is None:
        return None
    op = "fake_quant_act" if case.kind == "fq" else "adaround_soft"
    fn, why = backends.candidate(op, backend, device, case.bits)
    return None if fn is not None else why


def run_case(case: Case, device: str, with_compile: bool, peak: float | None) -> list[dict]:
    inp = fq_inputs(case, device) if case.kind == "fq" else ada_inputs(case, device)
    rows: list[dict] = []
    timings: dict[str, Timing] = {}
    for name, backend, factory, check in candidates(case, inp, device, with_compile):
        row = {
            "case": case.name,
            "shape": "x".join(map(str, case.shape)),
            "candidate": name,
            # the case's settings, as the CPU suite records them (report tables read them)
            "kind": case.kind,
            "bits": case.bits,
            "per_channel": case.per_channel,
            "keep_prob": case.keep_prob,
        }
        rows.append(row)
        why = _unavailable(case, name, backend, device)
        if why is not None:
            row["status"] = f"unavailable: {why}"
            continue
        try:
            ops.force(backend if backend in ("cuda", "triton", "reference") else None)
            step = factory()
            out = step()  # first call: compiles (Triton, torch.compile)
            if check:
                validate(case, inp, out)
            del out
            if name.endswith("+graph"):
                # a fresh step (fresh leaves): an autograd graph made on the default stream and
                # kept alive would make the capture wait on the legacy stream
                step = factory()
                fn = capture_graph(step, device)
            else:
                fn = step
            # eager GPU calls as the engine makes them: step checks without a host sync
            checks = ops.deferred_checks() if device == "cuda" else contextlib.nullcontext()
            with checks:
                t = measure(fn, device=device, warmup=2, repeat=5 if device == "cpu" else 20)
            timings[name] = t
            row.update(ms=t.median_s * 1e3, p10_ms=t.p10_s * 1e3, p90_ms=t.p90_s * 1e3)
            gbs = case.bytes_moved() / t.median_s / 1e9
            row["GB/s"] = gbs
            if peak:
                row["hbm_frac"] = gbs * 1e9 / peak
            row["status"] = "ok" + (" (validated)" if check else "")
        except Exception as exc:  # a failing candidate is a row, not a crash
            row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            traceback.print_exc(limit=3, file=sys.stderr)
        finally:
            ops.force(None)
            if device == "cuda":
                torch.cuda.synchronize()
    base, comp = timings.get(BASELINE), timings.get("ste_compile")
    for row in rows:
        t = timings.get(row["candidate"])
        if t is None:
            continue
        if base is not None:
            row["speedup"] = base.median_s / t.median_s
        if comp is not None:
            row["vs_compile"] = comp.median_s / t.median_s
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for calib_kernels_gpu.jsonl")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--cases", default="", help="comma-separated case names (default all)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark (use --device cpu --quick for a smoke test)")
        return 2
    cases = CASES
    if args.cases:
        wanted = set(args.cases.split(","))
        unknown = wanted - {c.name for c in CASES}
        if unknown:
            raise SystemExit(
                f"unknown cases {sorted(unknown)}; choose from {[c.name for c in CASES]}"
            )
        cases = [c for c in CASES if c.name in wanted]
    if args.quick:
        cases = [Case(**{**c.__dict__, "shape": QUICK_SHAPES[c.name]}) for c in cases]
    peak = gpu_hbm_peak(torch.cuda.get_device_name()) if args.device == "cuda" else None
    t0 = time.perf_counter()
    for case in cases:
        # Appended case by case: a run stopped at its time limit keeps the cases it finished.
        rows = run_case(case, args.device, not args.no_compile, peak)
        for row in rows:
            row["hbm_peak_GBs"] = peak / 1e9 if peak else None
        record(SUITE, rows, device=args.device, out_dir=args.out, columns=COLUMNS)
    print(f"[{SUITE}] {len(cases)} cases in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
