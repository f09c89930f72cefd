"""Distribution correction (spec §3) on real ResNet-20 units: the straightforward implementation
against the engine's, in one process.

* ``plain``: the batched official-semantics loop as the engine ran it before the DC kernels
  (git c1457ed, kept below as :func:`plain_distribution_correction`): NCHW, every BN's
  statistics through ``Tensor.var``, the forward run to the end of the unit, the closeness term
  and Adam as eager PyTorch ops under autograd;
* ``engine-reference``: :func:`pdquant_fast.engine.distribution_correction` with every op forced
  to its plain-PyTorch reference (what channels-last and stopping the forward at the last BN
  give on their own);
* ``engine``: the same with the default (fastest) kernels: ``bn_stat_loss`` and
  ``dc_adam_step`` in C++.

Inputs: the unit's real inputs for ``--images`` CIFAR-10 training images (lossless PNGs under
``$PDQUANT_SHARED_DATA``), ``--iters`` DC steps, the resnet preset's lamb_c and learning rate.
Each variant runs ``--rounds`` times, interleaved; the table gives the median wall time, the
ratio against ``plain`` and the mean BN-statistic loss before/after, and the largest difference
of the corrected inputs from ``plain``'s (the variants differ only in float rounding).

    PDQUANT_SHARED_DATA=../shared/data python benchmarks/bench_dc.py --threads 1

Rows go to ``<out>/dc.jsonl``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

# PyTorch's CPU allocator on huge pages, as the pdquant CLI runs it (docs/KERNELS.md)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import record, resnet20_cifar  # noqa: E402
from pdquant_fast import ops  # noqa: E402
from pdquant_fast.config import make_config  # noqa: E402
from pdquant_fast.engine import distribution_correction, reduce_lr_on_plateau  # noqa: E402
from pdquant_fast.graph import UnitExecutor, build_unit_model  # noqa: E402


def _plain_stat_loss(acts, bns):
    total = None
    for a, bn in zip(acts, bns, strict=True):
        mean = a.mean(dim=(2, 3))
        std = torch.sqrt(a.var(dim=(2, 3), unbiased=True) + 1e-6)
        mu = bn.running_mean[None]
        sig = torch.sqrt(bn.running_var + 1e-6)[None]
        term = ((mu - mean) ** 2).sum(1) + ((sig - std) ** 2).sum(1)
        total = term if total is None else total + term
    return total


def plain_distribution_correction(fp_unit, x_fp, cfg):
    """The engine's DC loop before the DC kernels (git c1457ed), unchanged but for the
    plateau rule, which calls the engine's :func:`reduce_lr_on_plateau` (the same operations,
    on [groups]-sized tensors)."""
    bns = [m for m in fp_unit.modules() if isinstance(m, nn.BatchNorm2d)]
    captured = []
    hooks = [bn.register_forward_hook(lambda m, i, o: captured.append(i[0])) for bn in bns]
    out = torch.empty_like(x_fp)
    before, after = [], []
    b1, b2, eps = 0.9, 0.999, 1e-8
    try:
        for s in range(0, x_fp.shape[0], cfg.dc_batch):
            x0 = x_fp[s : s + cfg.dc_batch]
            nb = x0.shape[0]
            gid = torch.arange(nb) // cfg.dc_chunk
            ng = int(gid[-1]) + 1
            gsize = torch.bincount(gid, minlength=ng).float()
            inv = (1.0 / gsize)[gid]
            bshape = (nb,) + (1,) * (x0.dim() - 1)
            x = x0.clone()
            m = torch.zeros_like(x)
            v = torch.zeros_like(x)
            lr = torch.full((ng,), cfg.dc_lr)
            best = torch.full((ng,), math.inf)
            bad = torch.zeros(ng, dtype=torch.long)
            for t in range(1, cfg.dc_iters + 1):
                x.requires_grad_(True)
                captured.clear()
                fp_unit(x)
                lbn = _plain_stat_loss(captured, bns)
                close = (x - x0).pow(2).sum(1).reshape(nb, -1).mean(1)
                per_sample = (lbn + close / cfg.lamb_c) * inv
                group_loss = torch.zeros(ng).index_add(0, gid, per_sample.detach())
                (g,) = torch.autograd.grad(per_sample.sum(), x)
                with torch.no_grad():
                    if t == 1:
                        before.append(lbn.detach())
                    x = x.detach()
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    bc1 = 1 - b1**t
                    bc2 = 1 - b2**t
                    denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
                    step = (lr[gid] / bc1).reshape(bshape)
                    x = x - step * m / denom
                    best, bad, lr = reduce_lr_on_plateau(group_loss, best, bad, lr)
            with torch.no_grad():
                captured.clear()
                fp_unit(x)
                after.append(_plain_stat_loss(captured, bns))
            out[s : s + nb] = x
    finally:
        for h in hooks:
            h.remove()
    return out, float(torch.cat(before).mean()), float(torch.cat(after).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("PDQUANT_SHARED_DATA", "../shared/data"))
    p.add_argument("--units", type=int, nargs="+", default=[1, 4, 7])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, train = resnet20_cifar(args.data, "train")
    xc = torch.stack([train[i][0] for i in range(args.images)])
    top, _ = build_unit_model(model.eval())
    top.requires_grad_(False)
    ex = UnitExecutor(top, tuple(xc.shape[1:]))
    cfg = make_config("pdquant", preset="resnet", dc_iters=args.iters)
    rows = []
    for k in args.units:
        unit = top.get_submodule(f"unit_{k}")
        with torch.no_grad():
            x_fp = ex.run_between(top, -1, xc, k)

        def engine(backend, unit=unit, x_fp=x_fp):
            ops.force(backend)
            try:
                return distribution_correction(unit, x_fp, cfg)
            finally:
                ops.force(None)

        variants = {
            "plain": lambda unit=unit, x_fp=x_fp: plain_distribution_correction(unit, x_fp, cfg),
            "engine-reference": lambda: engine("reference"),
            "engine": lambda: engine(None),
        }
        times = {name: [] for name in variants}
        results = {}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["plain"])
        for name in variants:
            med = statistics.median(times[name])
            x_c, before, after = results[name]
            rows.append(
                {
                    "unit": k,
                    "input": "x".join(map(str, x_fp.shape)),
                    "variant": name,
                    "backend": ops.choose("dc_adam_step", "cpu")[0]
                    if name == "engine"
                    else "reference",
                    "iters": args.iters,
                    "ms": med * 1e3,
                    "ms_per_iter": med * 1e3 / args.iters,
                    "speedup": base / med,
                    "bn_before": before,
                    "bn_after": after,
                    "max_dx_vs_plain": float((x_c - results["plain"][0]).abs().max()),
                    "threads": torch.get_num_threads(),
                    "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
                }
            )
    record(
        "dc",
        rows,
        out_dir=args.out,
        columns=[
            "unit",
            "input",
            "variant",
            "iters",
            "ms",
            "speedup",
            "bn_before",
            "bn_after",
            "max_dx_vs_plain",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
