"""One PD-Quant reconstruction iteration, timed with the reference ops and with the fused kernels.

The iteration is the one of ``Calibrator._optimise`` (spec §2.3): sample 32 cached unit inputs,
QDrop-mix quantized and FP inputs, run the quantized unit on ``cat([x_drop, x_q])`` (64 images),
reconstruction loss on the first half, the FP remainder of the network on the second half and the
KL prediction-difference loss, AdaRound regulariser, backward, Adam steps on the rounding
variables and the activation steps. Variants, all in the same process, same unit, same data:

* ``reference``: every quantizer op through the plain-PyTorch reference (``PDQUANT_KERNELS=
  reference``), eager;
* ``fused``: the default backend (C++ on CPU; CUDA/Triton on GPU), eager; on a GPU the ops'
  step checks run inside ``ops.deferred_checks()`` as in the engine (no host sync per call);
* ``fused+graph`` (CUDA only): the whole step captured once in a CUDA graph and replayed. The
  QDrop seeds come from device counters and the batch indices from the device generator, so the
  replay draws fresh masks and batches with no host synchronisation; Adam is ``capturable``. The
  learning-rate schedule of the step size is held constant in this variant (a Python-side
  scheduler cannot change a captured graph); the timing is otherwise the same work.

Usage::

    python benchmarks/bench_calib_step.py [--device cpu|cuda] [--model resnet20|resnet18]
        [--unit K] [--iters N] [--out DIR]

Writes rows to ``<out>/calib_step.jsonl`` (default ``benchmarks/results/``). Random weights and
random images: speed does not depend on them, and the GPU machine has no shared data. The
variants are timed in interleaved rounds (one iteration of each in turn), so that a change of
load on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

# PyTorch's CPU allocator on huge pages, as the pdquant CLI runs it (docs/KERNELS.md, "large
# activations and page faults"): set before torch's first allocation; a value already set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Timing, ratio, record, tune_malloc_like_cli  # noqa: E402
from pdquant_fast import ops  # noqa: E402
from pdquant_fast.config import make_config  # noqa: E402
from pdquant_fast.engine import Calibrator  # noqa: E402
from pdquant_fast.qmodel import unit_act_quantizers, unit_layers  # noqa: E402
from pdquant_fast.quant import kl_prediction_loss, lp_loss  # noqa: E402


def build_model(name: str):
    if name == "resnet20":
        from pdquant_fast.models.cifar_resnet import CifarResNet

        return CifarResNet(20).eval(), (3, 32, 32)
    if name == "resnet18":
        # the model definitions only (a CPU torch cannot load torchvision's compiled ops)
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from _torchvision import import_torchvision_models

        tvm = import_torchvision_models()
        if tvm is None:
            raise SystemExit("torchvision is not installed: resnet18 needs its model definition")
        return tvm.resnet18(weights=None).eval(), (3, 224, 224)
    raise SystemExit(f"unknown model {name!r}: choose resnet20 or resnet18")


class Step:
    """The per-iteration math of ``Calibrator._optimise`` on unit ``k``, on ``device``."""

    def __init__(self, model, shape, k: int, device: str, n_calib: int, graph_safe: bool):
        torch.manual_seed(0)
        dev = torch.device(device)
        self.dev = dev
        x = torch.randn(n_calib, *shape).to(dev)
        cfg = make_config("pdquant", preset="resnet", w_bits=2, a_bits=4, iters=1000, seed=1005)
        self.cfg = cfg
        # model and images on the device before the engine sees them, as a GPU calibration runs
        cal = Calibrator(model.to(dev), x, cfg, log=None, progress=False)
        self.fp, self.q = cal.fp.to(dev), cal.q.to(dev)
        self.fp_tail = cal._fp_tail().to(dev)  # the engine's BN-folded remainder
        self.fp_exec = cal.fp_exec
        x = x.to(dev)
        with torch.no_grad():
            self.z_fp = self.fp(x)
            x_in = cal.fp_exec.run_between(self.fp, -1, x, k)
        self.k = k
        self.q_unit = self.q.get_submodule(f"unit_{k}")
        fp_unit = self.fp.get_submodule(f"unit_{k}")
        self.layers = unit_layers(self.q_unit)
        self.acts = unit_act_quantizers(self.q_unit)
        for ql in self.layers:
            ql.wq.init_from(ql.org_weight)
            ql.weight_quant = True
        cal.q = self.q
        cal._init_acts(self.q_unit, x_in)
        self.x_q = x_in.contiguous()
        self.x_c = x_in.clone()
        with torch.no_grad():
            self.y_c = fp_unit(self.x_c)
        alphas = []
        for ql in self.layers:
            ql.wq.init_adaround(ql.org_weight)
            alphas.append(ql.wq.alpha)
        deltas = []
        for a in self.acts:
            a.delta.requires_grad_(True)
            deltas.append(a.delta)
            a.keep_prob = cfg.keep_prob
            a.generator = cal.gen
            if graph_safe:
                a.seed_counter = torch.zeros((), dtype=torch.int64, device=dev)
        cap = dict(capturable=True) if graph_safe else {}
        self.opts = [
            torch.optim.Adam(alphas, lr=cfg.lr_alpha, **cap),
            torch.optim.Adam(deltas, lr=cfg.lr_delta, **cap),
        ]
        self.gen = cal.gen
        self.cal = cal
        self.graph_safe = graph_safe
        self.bs = 32

    def step(self) -> torch.Tensor:
        cfg, bs, n = self.cfg, self.bs, self.x_q.shape[0]
        if self.graph_safe:
            idx = torch.randint(0, n, (bs,), device=self.dev)
            u = torch.rand((bs, *self.x_q.shape[1:]), device=self.dev)
        else:  # as Calibrator._optimise draws them: no host sync on a GPU
            idx = torch.randint(0, n, (bs,), generator=self.gen).to(self.dev, non_blocking=True)
            u = self.cal._uniform((bs, *self.x_q.shape[1:]), self.dev)
        xq = self.x_q[idx]
        xin = torch.where(u < cfg.keep_prob, xq, self.x_c[idx])
        out = self.q_unit(torch.cat([xin, xq]))
        o_drop, o_q = out[:bs], out[bs:]
        rec = lp_loss(o_drop, self.y_c[idx])
        z_q = self.fp_exec.run_from(self.fp_tail, self.k, o_q)
        pd = kl_prediction_loss(z_q, self.z_fp[idx], cfg.temperature)
        rl = cfg.round_weight * sum(ql.wq.last_reg for ql in self.layers)
        total = rec + pd / cfg.lamb_r + rl
        for o in self.opts:
            o.zero_grad(set_to_none=not self.graph_safe)
        total.backward()
        for o in self.opts:
            o.step()
        return total.detach()

    def __call__(self) -> torch.Tensor:
        # the engine's loop runs inside ops.deferred_checks() on a GPU (no host sync per op call);
        # here the verdict is read after every iteration, which the timing syncs after anyway
        if self.dev.type == "cpu":
            return self.step()
        with ops.deferred_checks():
            return self.step()


def build_variant(args, backend: str | None, graph: bool):
    """A callable running one iteration of the variant (under its forced backend)."""
    ops.force(backend)
    try:
        model, shape = build_model(args.model)
        step = Step(model, shape, args.unit, args.device, args.n_calib, graph_safe=graph)
        if not graph:
            return step
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        return g.replay
    finally:
        ops.force(None)


def time_interleaved(args, variants):
    """Median seconds per iteration of each variant, timed in rounds (A, B, C, A, B, C, ...) so
    that a change in machine load during the run hits every variant alike."""
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    runs, times, errors = {}, {}, {}
    for name, backend, graph in variants:
        try:
            runs[name] = (backend, build_variant(args, backend, graph))
            times[name] = []
        except Exception as exc:  # record and go on: one broken variant must not hide the rest
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
            traceback.print_exc()  # the whole trace in the log: the row keeps only the message
    for r in range(args.iters + 3):
        for name, (backend, run) in list(runs.items()):
            ops.force(backend)
            try:
                t0 = time.perf_counter()
                run()
                sync()
                if r >= 3:  # three warm-up rounds
                    times[name].append(time.perf_counter() - t0)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                traceback.print_exc()
                del runs[name]
            finally:
                ops.force(None)
    out = {}
    for name, ts in times.items():
        if name in errors or not ts:
            continue
        ts.sort()
        out[name] = Timing(ts[len(ts) // 2], ts[len(ts) // 10], ts[(9 * len(ts)) // 10], len(ts))
    return out, errors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default=None, help="resnet20 (CPU default) or resnet18 (GPU default)")
    p.add_argument("--unit", type=int, default=1, help="unit index (1 = first residual block)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--n-calib", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.model = args.model or ("resnet18" if args.device == "cuda" else "resnet20")
    if args.device == "cpu":
        tune_malloc_like_cli()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [("reference", "reference", False), ("fused", None, False)]
    if args.device == "cuda":
        variants.append(("fused+graph", None, True))
    timings, errors = time_interleaved(args, variants)
    rows, base = [], timings.get("reference")
    for name, backend, _ in variants:
        if name in errors:
            rows.append({"variant": name, "error": errors[name]})
            continue
        t = timings[name]
        chosen = ops.choose("fake_quant_act", args.device, 4)[0] if backend is None else backend
        rows.append(
            {
                "model": args.model,
                "unit": args.unit,
                "variant": name,
                "backend": chosen,
                "ms_per_iter": t.median_s * 1e3,
                "p10_ms": t.p10_s * 1e3,
                "p90_ms": t.p90_s * 1e3,
                "speedup_vs_reference": ratio(base, t) if base else None,
            }
        )
    record(
        "calib_step",
        rows,
        device=args.device,
        out_dir=args.out,
        columns=[
            "model",
            "unit",
            "variant",
            "backend",
            "ms_per_iter",
            "p10_ms",
            "p90_ms",
            "speedup_vs_reference",
            "error",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
