"""Per-tensor activation init search (spec §1.3) on real EfficientNet-Lite0 activations: the
vectorised PyTorch search against the ``mse_search_2d`` op with a given clip range, in one process.

The signed activation tensors are the ones a real calibration initialises: the quickstart job
(EfficientNet-Lite0, the foolbox wheel's ImageNet images 0..9, W4A8) is run with
``init_qparams`` wrapped to record every per-tensor input whose search is two-dimensional
(``--record-iters`` iterations per unit, no DC steps; a unit's activations are the quantized
model's, so those of later units depend on how earlier units were reconstructed: real
activations of a short real calibration, not of the 10-iteration one). Then, for each
recorded tensor, ``--rounds`` interleaved rounds time

* ``pytorch``: :func:`pdquant_fast.quant.mse_search_2d` with ``score_on`` (the loop the engine
  ran before the op took a clip range), and
* ``op``: :func:`pdquant_fast.quant.init_qparams`, which now calls ``ops.mse_search_2d`` on the
  same subsample with the whole tensor's range (C++ kernel on CPU);

and checks that both choose the same ``(delta, zero_point)`` (else the op's choice must not score
worse in float64). With ``--whole`` the quickstart calibration itself (``--iters``, ``--dc-iters``)
also runs twice, first with the PyTorch search patched back in, then as shipped.

    python benchmarks/bench_init_search.py --threads 2 --whole

Rows go to ``<out>/init_search.jsonl``. Needs ``foolbox==3.3.4`` (images only, never imported).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import record  # noqa: E402
from pdquant_fast import cli  # noqa: E402
from pdquant_fast import quant as Q  # noqa: E402

_ORIGINAL_INIT = Q.init_qparams


def _subsample(x: torch.Tensor, max_elems: int | None) -> torch.Tensor | None:
    """The strided subsample :func:`~pdquant_fast.quant.init_qparams` scores on."""
    if max_elems is None or x.numel() <= max_elems:
        return None
    flat = x.reshape(-1)
    return flat[:: -(-flat.numel() // max_elems)]


def pytorch_init(x, bits, channel_wise, max_score_elems=None):
    """``init_qparams`` with the signed per-tensor search done by the PyTorch loop (before)."""
    if channel_wise or x.min() >= 0 or x.max() <= 0:
        return _ORIGINAL_INIT(x, bits, channel_wise, max_score_elems)
    if not torch.isfinite(x).all():
        raise ValueError("cannot initialise a quantizer on a tensor containing NaN or Inf")
    d, z = Q.mse_search_2d(x, bits, False, score_on=_subsample(x, max_score_elems))
    return d, z, "no"


def _calibrate(out: str, iters: int, dc_iters: int) -> float:
    argv = ["calibrate", "--model", "efficientnet_lite0", "--method", "pdquant"]
    argv += ["--w-bits", "4", "--a-bits", "8", "--iters", str(iters)]
    argv += ["--dc-iters", str(dc_iters), "--out", out]
    t0 = time.perf_counter()
    if cli.main(argv) != 0:
        raise SystemExit(f"calibration failed: {argv}")
    return time.perf_counter() - t0


def record_inputs(iters: int) -> list[dict]:
    recs: list[dict] = []

    def wrapped(x, bits, channel_wise, max_score_elems=None):
        out = _ORIGINAL_INIT(x, bits, channel_wise, max_score_elems)
        if not channel_wise and out[2] == "no":
            recs.append({"x": x.detach().cpu().clone(), "bits": bits, "max": max_score_elems})
        return out

    Q.init_qparams = wrapped
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _calibrate(tmp, iters, 0)
    finally:
        Q.init_qparams = _ORIGINAL_INIT
    return recs


def _score64(row: torch.Tensor, d: torch.Tensor, z: torch.Tensor, bits: int) -> float:
    n = 2**bits - 1
    r, d64, z64 = row.double(), d.double(), z.double()
    q = (torch.clamp(torch.round(r / d64) + z64, 0, n) - z64) * d64
    return (r - q).abs().pow(2.4).mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--record-iters", type=int, default=1)
    p.add_argument("--whole", action="store_true", help="also time the whole calibration")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dc-iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recs = record_inputs(args.record_iters)
    if not recs:
        raise SystemExit("no signed per-tensor activation was initialised")
    # one untimed call each (first-use set-up of the op and the extension)
    Q.init_qparams(recs[-1]["x"], recs[-1]["bits"], False, recs[-1]["max"])
    rows = []
    for k, r in enumerate(recs):
        x, bits, mx = r["x"], r["bits"], r["max"]
        t_py, t_op = [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            d_py, z_py, _ = pytorch_init(x, bits, False, mx)
            t_py.append(time.perf_counter() - t)
            t = time.perf_counter()
            d_op, z_op, _ = Q.init_qparams(x, bits, False, mx)
            t_op.append(time.perf_counter() - t)
        same = torch.equal(d_py, d_op) and torch.equal(z_py, z_op)
        sample = _subsample(x, mx)
        row = x.reshape(-1) if sample is None else sample
        s_py, s_op = _score64(row, d_py, z_py, bits), _score64(row, d_op, z_op, bits)
        if not same and s_op > s_py * (1 + 1e-5):
            raise SystemExit(f"tensor {k}: the op's choice scores {s_op} > PyTorch's {s_py}")
        py_ms, op_ms = statistics.median(t_py) * 1e3, statistics.median(t_op) * 1e3
        rows.append(
            {
                "case": f"lite0_act{k}",
                "shape": list(x.shape),
                "bits": bits,
                "scored_elems": row.numel(),
                "pytorch_ms": round(py_ms, 2),
                "op_ms": round(op_ms, 2),
                "ratio": round(py_ms / op_ms, 1),
                "same_choice": same,
                "score64_op_over_pytorch": s_op / s_py,
                "threads": torch.get_num_threads(),
                "rounds": args.rounds,
            }
        )
    tot_py = sum(r["pytorch_ms"] for r in rows)
    tot_op = sum(r["op_ms"] for r in rows)
    rows.append(
        {
            "case": "lite0_all",
            "tensors": len(recs),
            "pytorch_ms": round(tot_py, 1),
            "op_ms": round(tot_op, 1),
            "ratio": round(tot_py / tot_op, 1),
            "same_choice": sum(bool(r["same_choice"]) for r in rows),
            "threads": torch.get_num_threads(),
            "rounds": args.rounds,
        }
    )
    if args.whole:
        with tempfile.TemporaryDirectory() as tmp:
            Q.init_qparams = pytorch_init
            try:
                before = _calibrate(str(Path(tmp) / "pytorch"), args.iters, args.dc_iters)
            finally:
                Q.init_qparams = _ORIGINAL_INIT
            after = _calibrate(str(Path(tmp) / "op"), args.iters, args.dc_iters)
        rows.append(
            {
                "case": f"lite0_w4a8_calibration_iters{args.iters}_dc{args.dc_iters}",
                "pytorch_s": round(before, 1),
                "op_s": round(after, 1),
                "ratio": round(before / after, 2),
                "threads": torch.get_num_threads(),
            }
        )
    record("init_search", rows, out_dir=args.out)


if __name__ == "__main__":
    main()
