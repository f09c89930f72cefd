"""Latency of each implementation alone in a fresh process, with and without the packed runtime's
allocator settings (``PDQUANT_TUNE_MALLOC``, pdquant_fast/deploy/memory.py).

``bench_packed_latency.py`` times packed, FP32 and torch.ao int8 interleaved in one process, so
all three share one allocator history. A deployed model usually runs alone; there, glibc's
defaults hand every multi-MB feature map back to the kernel after each forward and fault it in
again on the next. This script starts one process per (model, batch, implementation, setting),
each with ``THP_MEM_ALLOC_ENABLE=1`` as the CLI sets it, builds the model (the packed one from
:func:`~pdquant_fast.deploy.parity.quick_quantize` + export + :func:`load_packed`, which applies
the setting unless ``PDQUANT_TUNE_MALLOC=0``; the torch models get the same ``mallopt`` call
when the setting is on), runs ``--warmup`` forwards, then times ``--repeat`` forwards and counts
their minor page faults (``getrusage``). The settings alternate within each round, ``--rounds``
rounds.

    python benchmarks/bench_alone_latency.py --models cifar_resnet20 --batch 256 --input-bits 8

Rows go to ``<out>/standalone.jsonl`` (not a ``*latency*`` file: these rows are not interleaved, so
the README's latency tables leave them out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_CHILD = r"""
import json, os, resource, sys, tempfile, time
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import torch
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, os.path.join(sys.argv[1], "benchmarks"))
name, batch, impl, w_bits, a_bits, in_bits, warmup, repeat, threads = sys.argv[2:11]
batch, w_bits, a_bits = int(batch), int(w_bits), int(a_bits)
warmup, repeat, threads = int(warmup), int(repeat), int(threads)
in_bits = int(in_bits) or None
torch.set_num_threads(threads)
from bench_packed_latency import build, export_quick
from pdquant_fast.deploy import memory
model, shape = build(name)
x8 = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
if impl == "packed":
    from pdquant_fast.deploy import load_packed
    tmp = tempfile.mkdtemp()
    export_quick(name, model, shape, w_bits, a_bits, in_bits, tmp)
    f = load_packed(tmp)
else:
    if memory.tune_malloc_enabled():
        memory.tune_malloc()
    if impl == "int8_ao":
        from pdquant_fast.deploy.bench import int8_ao_model
        f, why = int8_ao_model(model, x8)
        if f is None:
            raise SystemExit(why)
    else:
        f = model
x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
times, faults = [], []
with torch.no_grad():
    for _ in range(warmup):
        f(x)
    for _ in range(repeat):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        f(x)
        times.append(time.perf_counter() - t)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
state = memory.malloc_state() or {}
print(json.dumps({"times": times, "faults": faults, "tuned": bool(state.get("applied"))}))
"""


def run_child(args, name: str, batch: int, impl: str, tune: bool) -> dict:
    env = dict(os.environ, PDQUANT_TUNE_MALLOC="1" if tune else "0")
    cmd = [sys.executable, "-c", _CHILD, str(ROOT), name, str(batch), impl]
    cmd += [str(args.w_bits), str(args.a_bits), str(args.input_bits or 0)]
    cmd += [str(args.warmup), str(args.repeat), str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{name} b{batch} {impl} tune={tune} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from benchmarks.common import record

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["cifar_resnet20"])
    p.add_argument("--batch", type=int, nargs="+", default=[256])
    p.add_argument("--impls", nargs="+", default=["packed", "int8_ao"])
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--input-bits", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)  # as the children run (the rows' device string says it)
    results: dict[tuple, list[dict]] = {}
    for _ in range(args.rounds):
        for name in args.models:
            for b in args.batch:
                for impl in args.impls:
                    for tune in (True, False):
                        r = run_child(args, name, b, impl, tune)
                        if r["tuned"] != tune:
                            raise SystemExit(f"{name} {impl}: asked tune={tune}, got {r}")
                        results.setdefault((name, b, impl, tune), []).append(r)
    rows = []
    for (name, b, impl, tune), runs in results.items():
        med = [statistics.median(r["times"]) * 1e3 for r in runs]
        flt = [statistics.median(r["faults"]) for r in runs]
        rows.append(
            {
                "model": name,
                "batch": b,
                "impl": impl,
                "bits": f"W{args.w_bits}A{args.a_bits}"
                + (f"-in{args.input_bits}" if args.input_bits else ""),
                "malloc_tuned": tune,
                "median_ms": round(statistics.median(med), 2),
                "median_ms_per_round": [round(m, 2) for m in med],
                "faults_per_forward": statistics.median(flt),
                "threads": args.threads,
                "repeat": args.repeat,
                "rounds": args.rounds,
            }
        )
    for r in rows:  # ratio against int8 with the same setting, and the setting's own gain
        base = next(
            (
                o
                for o in rows
                if (o["model"], o["batch"], o["malloc_tuned"], o["impl"])
                == (r["model"], r["batch"], r["malloc_tuned"], "int8_ao")
            ),
            None,
        )
        r["x_int8_same_setting"] = round(base["median_ms"] / r["median_ms"], 3) if base else None
        untuned = next(
            (
                o
                for o in rows
                if (o["model"], o["batch"], o["impl"]) == (r["model"], r["batch"], r["impl"])
                and not o["malloc_tuned"]
            ),
            None,
        )
        r["x_untuned"] = round(untuned["median_ms"] / r["median_ms"], 3) if untuned else None
    record("standalone", rows, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
