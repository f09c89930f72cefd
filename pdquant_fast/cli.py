"""Command line: ``pdquant calibrate | eval | sweep | info``.

Errors the user can fix (bad bit-width, missing data, mismatched weights, untraceable model,
unwritable output folder) print one ``error:`` line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# PyTorch's CPU allocator on transparent huge pages for blocks of 2 MB and more. glibc serves
# every allocation above 32 MB with fresh mmap pages, faulted in 4 kB at a time on first touch,
# and a calibration step on large activations spends most of its time there (one fake-quant
# forward + backward on [32, 32, 112, 112], EfficientNet-Lite0's stem at batch 32: 68.6 -> 24.2
# ms, one thread, docs/KERNELS.md). torch reads the variable at its first allocation, so it is
# set before torch is imported; a value the user set wins (THP_MEM_ALLOC_ENABLE=0 turns it off).
if "torch" not in sys.modules:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

from . import __version__

EXIT_USAGE = 2


class CliError(Exception):
    pass


def _sha256_file(path: str | None) -> str | None:
    if not path:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _parse_set(items: list[str]) -> dict:
    """``--set key=value`` overrides, values parsed as JSON where possible."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise CliError(f"--set expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _prepare_out(out: str) -> Path:
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise CliError(f"output folder {out} is an existing file; --out must name a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write_probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CliError(f"output folder {out} is not writable: {exc.strerror or exc}") from exc
    return p


def _default_sources(model_name: str, args) -> None:
    """The main job on a fresh machine: foolbox's ImageNet samples for EfficientNet-Lite0."""
    if args.data is None:
        if model_name != "efficientnet_lite0":
            raise CliError(
                "--data is required for this model (a folder of images, a CIFAR sprite PNG "
                "folder, or a dataset.txt list file)"
            )
        args.data = "foolbox:imagenet"
        if args.calib_size is None:
            args.calib_size = 10
        if not args.eval_data:
            args.eval_data = ["foolbox:imagenet"]
            args.eval_offset = args.calib_size
            args.eval_size = args.eval_size or 20 - args.calib_size


def _open(spec: str, pre, split):
    from .data import foolbox_samples, open_image_source

    if spec.startswith("foolbox:"):
        return foolbox_samples(spec.split(":", 1)[1], pre)
    return open_image_source(spec, pre, split=split)


def cmd_calibrate(args) -> int:
    from .api import atomic_write_json, collect_images, save_quant_state
    from .config import make_config
    from .data import sha256_of_ids, stack_dataset, take_subset
    from .engine import Calibrator, evaluate
    from .info import collect_info
    from .models.registry import build_model

    resume = _apply_resume(args)
    if args.model is None or args.out is None:
        raise CliError("calibrate needs --model and --out (or --resume DIR to continue a run)")
    _check_run_options(args)
    out = _prepare_out(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a random initialisation (no --weights) is the same every run
        model, info = build_model(args.model, args.weights)
    dev = _device(args)
    malloc = _tune_malloc_for(dev)
    model = model.to(dev)
    _default_sources(info.name, args)
    overrides = _parse_set(args.set)
    for key in ("iters", "seed", "dc_iters", "batch_size"):
        v = getattr(args, key)
        if v is not None:
            overrides[key] = v
    cfg = make_config(
        args.method,
        preset=args.preset or info.preset,
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        **overrides,
    )
    calib_size = args.calib_size if args.calib_size is not None else 1024
    src = _open(args.data, info.preprocess, args.split or "train")
    calib_ds = take_subset(src, calib_size, option="--calib-size")
    print(
        f"pdquant {__version__}: {cfg.method} W{cfg.w_bits}A{cfg.a_bits} on {info.name} "
        f"({info.weights_path or 'random init'}), {calib_size} calibration images from "
        f"{src.source}, {cfg.iters} iterations/unit, seed {cfg.seed}",
        flush=True,
    )
    x = collect_images(calib_ds).to(dev)
    evals = []
    for spec in args.eval_data or []:
        es = _open(spec, info.preprocess, args.eval_split or "test")
        if args.eval_size is not None or args.eval_offset:
            n = args.eval_size if args.eval_size is not None else len(es) - args.eval_offset
            es = take_subset(es, n, offset=args.eval_offset, option="--eval-size")
        if not es.has_labels:
            raise CliError(f"evaluation data {spec} has no labels")
        evals.append((spec, es))
    cal = Calibrator(
        model,
        x,
        cfg,
        progress=not args.no_progress,
        checkpoint_dir=out / CHECKPOINT_SUBDIR,
        resume=resume,
        cache=args.cache,
        cache_dir=out,
    )
    del x  # the calibrator holds the images (a disk cache can then drop them from memory)
    if not resume:
        _start_fresh(out, args)
    t0 = time.perf_counter()
    q, report = cal.run()
    del cal
    calib_seconds = time.perf_counter() - t0
    save_quant_state(q, out / "quant_state.pt")
    results = {}
    preds = {}
    for spec, es in evals:
        xe, ye = stack_dataset(es)
        xe, ye = xe.to(dev), ye.to(dev)
        fp = evaluate(model, xe, ye)
        qq = evaluate(q, xe, ye)
        results[spec] = {
            "n": qq["n"],
            "fp_top1": fp["top1"],
            "top1": qq["top1"],
            "fp_top5": fp["top5"],
            "top5": qq["top5"],
            "fp_correct": fp["correct"],
            "correct": qq["correct"],
            "source": es.source,
            "list_sha256": sha256_of_ids(es.ids),
        }
        preds[spec] = {
            "labels": ye.tolist(),
            "fp_pred": fp["pred"].tolist(),
            "pred": qq["pred"].tolist(),
        }
        print(
            f"  {es.source}: FP32 top-1 {fp['top1']:.2f}% -> W{cfg.w_bits}A{cfg.a_bits} "
            f"{cfg.method} top-1 {qq['top1']:.2f}% ({qq['correct']}/{qq['n']})",
            flush=True,
        )
    first = results[evals[0][0]] if evals else {}
    result = {
        "model": info.name,
        "method": cfg.method,
        "w_bits": cfg.w_bits,
        "a_bits": cfg.a_bits,
        "iters": cfg.iters,
        "seed": cfg.seed,
        "fp_top1": first.get("fp_top1"),
        "top1": first.get("top1"),
        "calib_seconds": calib_seconds,
        "calib_size": calib_size,
        "calib_source": src.source,
        "calib_list_sha256": sha256_of_ids(calib_ds.ids),
        "weights": info.weights_path,
        "weights_sha256": _sha256_file(info.weights_path),
        "evals": results,
        "config": cfg.to_dict(),
        "units": [u.__dict__ for u in report.units],
        "versions": collect_info(),
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "malloc": malloc,
        "cache_mode": report.cache_mode,
        "resumed": resume,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(out / "predictions.json", preds)
    atomic_write_json(out / "result.json", result)
    print(f"calibration took {calib_seconds:.1f}s; wrote {out / 'result.json'}", flush=True)
    return 0


CHECKPOINT_SUBDIR = "checkpoint"
ARGS_FILE = "args.json"
#: Outputs of a finished run; a fresh run into the same folder removes them before it starts,
#: so that an interrupted or failed run never leaves a complete-looking result behind.
RESULT_FILES = ("result.json", "quant_state.pt", "predictions.json")


def _check_run_options(args) -> None:
    from .cache import CACHE_MODES

    if args.cache not in CACHE_MODES:
        raise CliError(
            f"--cache {args.cache!r} is not a cache mode: choose one of {list(CACHE_MODES)}"
        )
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be a positive integer, got {args.threads}")
    if _device(args).type == "cpu":
        _malloc_enabled()  # a bad PDQUANT_TUNE_MALLOC fails here, before anything loads


def _malloc_enabled() -> bool:
    from .deploy import memory

    try:
        return memory.tune_malloc_enabled()
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _tune_malloc_for(dev: torch.device) -> dict | None:
    """On the CPU, keep freed multi-MB blocks in the process between iterations (glibc; see
    :mod:`pdquant_fast.deploy.memory`): every step allocates its activations and gradients
    afresh, and with glibc's defaults the large ones are faulted in again each time. A
    ResNet-18 reconstruction step (unit 1, one thread) took 3.30-3.33 s with the defaults and
    2.88-2.98 s with the settings, two runs each. ``PDQUANT_TUNE_MALLOC=0`` keeps glibc's
    defaults. Returns what was done, for result.json (None on a GPU)."""
    from .deploy import memory

    if dev.type != "cpu":
        return None
    if not _malloc_enabled():
        return {"applied": False, "reason": f"{memory.ENV}=0"}
    return memory.tune_malloc()


def _device(args) -> torch.device:
    """``--device``: ``cpu`` or ``cuda[:N]``, checked before anything is loaded."""
    spec = getattr(args, "device", None) or "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise CliError(f"--device {spec!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise CliError(f"--device {spec!r}: calibration runs on cpu or cuda[:N]")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {spec}: no CUDA device is available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CliError(
                f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return dev


def _apply_resume(args) -> bool:
    """``--resume DIR``: take the interrupted run's arguments from ``DIR/checkpoint/args.json``.

    Options given explicitly on this command line override the saved ones (a change that
    alters the calibration is then refused by the checkpoint's fingerprint check). Returns
    whether a checkpoint exists to continue from (False: the run died before its first
    checkpoint, so it starts from the beginning with the saved arguments).
    """
    if not args.resume:
        return False
    folder = Path(args.resume)
    saved_path = folder / CHECKPOINT_SUBDIR / ARGS_FILE
    try:
        saved = json.loads(saved_path.read_text())
    except FileNotFoundError as exc:
        raise CliError(
            f"--resume {folder}: {saved_path} is missing; --resume takes the --out folder of an "
            "interrupted pdquant calibrate run"
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CliError(f"--resume {folder}: cannot read {saved_path}: {exc}") from exc
    explicit = getattr(args, "explicit", set())
    if "out" in explicit and Path(args.out).resolve() != folder.resolve():
        raise CliError(
            f"--out {args.out} differs from --resume {folder}; a resumed run writes into the "
            "folder it resumes (leave --out out)"
        )
    for key, value in saved.items():
        if key not in explicit and hasattr(args, key) and key not in ("resume", "explicit"):
            setattr(args, key, value)
    args.out = str(folder)
    if not (folder / CHECKPOINT_SUBDIR / "manifest.json").is_file():
        print(f"{folder}: no checkpoint was written yet; starting from the beginning", flush=True)
        return False
    return True


def _start_fresh(out: Path, args) -> None:
    """Remove a previous run's outputs and record this run's arguments (for ``--resume``)."""
    from .api import atomic_write_json

    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    ck = out / CHECKPOINT_SUBDIR
    ck.mkdir(exist_ok=True)
    saved = {k: v for k, v in vars(args).items() if k not in ("func", "explicit", "resume")}
    atomic_write_json(ck / ARGS_FILE, saved)


def cmd_eval(args) -> int:
    from .api import build_quantized_skeleton, load_quant_state
    from .config import CalibConfig
    from .data import stack_dataset
    from .engine import evaluate
    from .models.registry import build_model

    run = Path(args.run)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = json.loads((run / "result.json").read_text())
        state = torch.load(run / "quant_state.pt", map_location="cpu", weights_only=True)
    except (OSError, json.JSONDecodeError, RuntimeError) as exc:
        raise CliError(f"{run} is not a finished calibration folder: {exc}") from exc
    weights = args.weights or result.get("weights")
    if weights is None:
        raise CliError(
            f"{run} was calibrated from a randomly initialised {result['model']} whose FP "
            "weights were not saved; only runs with a weights file can be re-evaluated"
        )
    model, info = build_model(result["model"], weights)
    cfg = CalibConfig(**result["config"])
    q = load_quant_state(build_quantized_skeleton(model, cfg), state)
    ds = _open(args.data, info.preprocess, args.split or "test")
    if args.eval_size:
        from .data import take_subset

        ds = take_subset(ds, args.eval_size, option="--eval-size")
    x, y = stack_dataset(ds)
    r = evaluate(q, x, y)
    fp = None if args.skip_fp else evaluate(model, x, y)
    fp_txt = "" if fp is None else f"FP32 top-1 {fp['top1']:.2f}%  "
    print(f"{ds.source}: {fp_txt}quantized top-1 {r['top1']:.2f}% ({r['correct']}/{r['n']})")
    if args.out_json:
        from .api import atomic_write_json
        from .data import sha256_of_ids

        atomic_write_json(
            Path(args.out_json),
            {
                "run": str(run),
                "source": ds.source,
                "list_sha256": sha256_of_ids(ds.ids),
                "n": r["n"],
                "fp_top1": None if fp is None else fp["top1"],
                "top1": r["top1"],
                "labels": y.tolist(),
                "fp_pred": None if fp is None else fp["pred"].tolist(),
                "pred": r["pred"].tolist(),
            },
        )
    return 0


def cmd_sweep(args) -> int:
    from .sweep import load_grid, run_sweep

    grid = load_grid(args.grid)
    outcome = run_sweep(
        grid,
        args.out,
        workers=args.workers,
        dry_run=args.dry_run,
        report=not args.no_report,
    )
    return 0 if outcome.ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdquant", description="PD-Quant post-training quantization")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="calibrate a model and write DIR/result.json")
    c.add_argument("--model", help="cifar_resnet<6n+2> or efficientnet_lite0 (required)")
    c.add_argument("--weights", help="state-dict file (default: packaged weights where they exist)")
    c.add_argument("--data", help="calibration images (folder, sprite PNG(s), dataset.txt)")
    c.add_argument("--split", help="train|test for CIFAR sprite folders (default train)")
    c.add_argument("--calib-size", type=int, help="number of calibration images (default 1024)")
    c.add_argument("--eval-data", action="append", help="labelled evaluation images (repeatable)")
    c.add_argument("--eval-split", help="train|test for CIFAR sprite folders (default test)")
    c.add_argument("--eval-size", type=int)
    c.add_argument("--eval-offset", type=int, default=0)
    c.add_argument("--method", default="pdquant", help="rtn|adaround|brecq|qdrop|pdquant")
    c.add_argument("--w-bits", type=int, default=4)
    c.add_argument("--a-bits", type=int, default=4)
    c.add_argument("--iters", type=int, help="iterations per unit (official: 20000)")
    c.add_argument("--dc-iters", type=int, help="distribution-correction steps (official: 500)")
    c.add_argument("--batch-size", type=int)
    c.add_argument("--seed", type=int)
    c.add_argument("--preset", help="resnet|regnet|mobilenet|mnasnet (default: per model)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config field")
    c.add_argument("--threads", type=int)
    c.add_argument(
        "--device",
        default="cpu",
        help="where the model, images and calibration run: cpu (default) | cuda | cuda:N",
    )
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--out", help="output folder (required; checkpoints go to OUT/checkpoint)")
    c.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the interrupted run whose --out was DIR from its last finished unit "
        "(same arguments; options given here override, but must not change the calibration)",
    )
    c.add_argument(
        "--cache",
        default="auto",
        help="where unit inputs/targets live: auto (from free memory) | device | host | disk",
    )
    c.set_defaults(func=cmd_calibrate)
    e = sub.add_parser("eval", help="evaluate a calibrated run folder on labelled images")
    e.add_argument("run", help="folder written by pdquant calibrate")
    e.add_argument("--data", required=True)
    e.add_argument("--split")
    e.add_argument("--weights")
    e.add_argument("--eval-size", type=int)
    e.add_argument("--out-json", help="write accuracy and per-image predictions here")
    e.add_argument("--skip-fp", action="store_true", help="do not evaluate the FP32 model")
    e.add_argument("--threads", type=int)
    e.set_defaults(func=cmd_eval)
    w = sub.add_parser(
        "sweep", help="run a YAML grid of calibrations (resumable), then tables and plots"
    )
    w.add_argument("grid", help="grid file (see pdquant_fast/sweep.py, benchmarks/grids/)")
    w.add_argument("--out", required=True, help="sweep folder: one sub-folder per job")
    w.add_argument("--workers", type=int, default=1, help="jobs run at once (default 1)")
    w.add_argument("--dry-run", action="store_true", help="list the jobs and their state only")
    w.add_argument("--no-report", action="store_true", help="skip summary.csv/md and plots")
    w.set_defaults(func=cmd_sweep)
    i = sub.add_parser("info", help="versions, CPU features, available kernels")
    i.set_defaults(func=lambda a: _info())
    from .deploy.commands import add_commands as add_deploy_commands

    add_deploy_commands(sub)  # export, bench-latency
    return p


def _info() -> int:
    from .info import main as info_main

    return info_main([]) or 0


def _explicit_options(argv: list[str] | None) -> set[str]:
    """Destinations of the options given on the command line (defaults suppressed)."""
    p = build_parser()
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for a in sub._actions:
                    a.default = argparse.SUPPRESS
    ns = p.parse_args(argv)
    return set(vars(ns)) - {"cmd", "func"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "calibrate" and args.resume:
        args.explicit = _explicit_options(argv)
    from .data import DataError
    from .graph import GraphError
    from .models.cifar_resnet import WeightsError
    from .quant import QuantConfigError

    known = (
        CliError,
        DataError,
        GraphError,
        WeightsError,
        QuantConfigError,
        ValueError,
        ImportError,
        FileNotFoundError,
        PermissionError,
    )
    try:
        return int(args.func(args) or 0)
    except known as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
