"""What this install has: versions, the machine, and which kernel backend is available for each op.

Run ``python -m pdquant_fast.info`` (``--json`` for machine-readable output). Importing this module
imports nothing heavy and never touches CUDA; :func:`main` asks ``torch.cuda.is_available()``, which
counts devices without creating a CUDA context (``torch.cuda.is_initialized()`` stays False).

``collect_info()`` gives the dict that result.json / benchmark writers embed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._version import __version__

#: Kernel backends: the values of PDQUANT_KERNELS (STYLE.md).
BACKENDS = ("reference", "cpp", "triton", "cuda")

#: x86 ISA extensions that decide which CPU kernels are fast (names as in /proc/cpuinfo).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni")

EXTENSION = "pdquant_fast._C"


@dataclass(frozen=True)
class KernelRow:
    """One row of :func:`kernels_table`: can ``backend`` run ``op`` here, and if not, why not."""

    op: str
    backend: str
    available: bool
    reason: str


@dataclass(frozen=True)
class Status:
    """Whether a component is usable here, with the reason (or where it was found)."""

    available: bool
    reason: str


def registered_ops() -> list[str]:
    """Names of the ops that have a contract (``torch.library`` schema in ``ops/library.py``)."""
    from .ops import backends, library  # noqa: F401  (importing library registers the ops)

    return sorted(backends.OPS)


def cpu_info() -> dict[str, Any]:
    """CPU model, the ISA flags in :data:`ISA_FLAGS`, and the logical core count."""
    model = ""
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # "Features" on Arm
            flags = set(value.split())
    return {
        "model": model or platform.processor() or platform.machine(),
        "flags": {flag: flag in flags for flag in ISA_FLAGS},
        "logical_cores": os.cpu_count(),
    }


def _numpy_version() -> str | None:
    try:
        import numpy
    except ImportError:
        return None
    return numpy.__version__


def collect_info() -> dict[str, Any]:
    """Versions and machine, JSON-serialisable, for result files.

    Keys: ``pdquant_fast``, ``torch``, ``python``, ``platform``, ``numpy`` (version strings;
    ``numpy`` is None if it is missing) and ``cpu`` (a dict: ``model``, ``flags`` mapping each of
    :data:`ISA_FLAGS` to a bool, ``logical_cores``), ``thp_mem_alloc`` (the
    ``THP_MEM_ALLOC_ENABLE`` setting, None if unset). Does not touch CUDA.
    """
    import torch

    return {
        "pdquant_fast": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "numpy": _numpy_version(),
        # PyTorch's CPU allocator on huge pages (the pdquant CLI turns it on, see cli.py)
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
    }


def cuda_status() -> Status:
    """Whether a CUDA device is usable. Counts devices; does not create a CUDA context."""
    import torch

    if not torch.version.cuda:
        return Status(False, f"torch {torch.__version__} is a CPU build")
    if not torch.cuda.is_available():
        return Status(False, f"torch is built for CUDA {torch.version.cuda} but sees no device")
    return Status(True, f"{torch.cuda.device_count()} device(s), CUDA {torch.version.cuda}")


def extension_status() -> Status:
    """Whether ``pdquant_fast._C`` is built and loads; reason is its path or why not."""
    spec = importlib.util.find_spec(EXTENSION)
    if spec is None:
        return Status(
            False,
            "not built: pure-Python install (PDQUANT_BUILD_EXT=0, no sources in csrc/, or not "
            "installed with `pip install --no-build-isolation -e .`)",
        )
    import torch  # noqa: F401  (the extension links against libtorch, loaded by this import)

    try:
        importlib.import_module(EXTENSION)
    except Exception as exc:  # a stale or ABI-mismatched build: report it, do not fail
        return Status(False, f"built but fails to load ({type(exc).__name__}: {exc}); rebuild")
    return Status(True, str(spec.origin))


def extension_has_cuda() -> bool:
    """Whether the built extension was linked with the CUDA part (it needs libc10_cuda)."""
    spec = importlib.util.find_spec(EXTENSION)
    if spec is None or not spec.origin:
        return False
    try:
        return b"libc10_cuda" in Path(spec.origin).read_bytes()
    except OSError:
        return False


def triton_status() -> Status:
    """Whether Triton imports, and its version or the error."""
    if importlib.util.find_spec("triton") is None:
        return Status(False, "not installed (pip install pdquant-fast[triton])")
    try:
        triton = importlib.import_module("triton")
    except Exception as exc:
        return Status(False, f"installed but fails to import ({type(exc).__name__}: {exc})")
    return Status(True, f"triton {getattr(triton, '__version__', '?')}")


def backend_status() -> dict[str, Status]:
    """Availability of each backend in :data:`BACKENDS` on this machine, with the reason."""
    cuda = cuda_status()
    ext = extension_status()
    triton = triton_status()

    if ext.available:
        cpp = Status(True, "pdquant_fast._C built")
    else:
        cpp = Status(False, f"pdquant_fast._C {ext.reason}")

    if not triton.available:
        triton_backend = Status(False, f"triton {triton.reason}")
    elif not cuda.available:
        triton_backend = Status(False, f"no CUDA device ({cuda.reason})")
    else:
        triton_backend = Status(True, triton.reason)

    if not ext.available:
        cuda_backend = Status(False, f"pdquant_fast._C {ext.reason}")
    elif not extension_has_cuda():
        cuda_backend = Status(False, "pdquant_fast._C was built without its CUDA part")
    elif not cuda.available:
        cuda_backend = Status(False, f"no CUDA device ({cuda.reason})")
    else:
        cuda_backend = Status(True, "pdquant_fast._C built with CUDA")

    return {
        "reference": Status(True, "plain PyTorch, registered for every device"),
        "cpp": cpp,
        "triton": triton_backend,
        "cuda": cuda_backend,
    }


def kernels_table(ops: list[str] | None = None) -> list[KernelRow]:
    """One :class:`KernelRow` per (op, backend): can it run here, and if not, why not.

    Asked per op of the backend chooser (:mod:`pdquant_fast.ops.backends`), for CUDA tensors when
    a CUDA device is usable and for CPU tensors otherwise.
    """
    from .ops import backends

    ops = registered_ops() if ops is None else ops
    device = "cuda" if cuda_status().available else "cpu"
    rows = []
    for op in ops:
        info = backends.OPS[op]
        bits = info.bits[0] if info.bits else None
        for name in BACKENDS:
            fn, why = backends.candidate(op, name, device, bits)
            rows.append(KernelRow(op, f"{name}", fn is not None, f"{device}: {why or 'ok'}"))
    return rows


def _format_report(
    info: dict[str, Any], cuda: Status, ext: Status, triton: Status, rows: list[KernelRow]
) -> str:
    import torch

    cpu = info["cpu"]
    isa = ", ".join(f"{flag} {'yes' if ok else 'no'}" for flag, ok in cpu["flags"].items())
    capability = torch.backends.cpu.get_cpu_capability()
    extension = f"built, {ext.reason}" if ext.available else ext.reason
    lines = [
        f"pdquant_fast  {info['pdquant_fast']}",
        f"torch         {info['torch']} (CUDA build: {torch.version.cuda or 'no'})",
        f"python        {info['python']} ({platform.python_implementation()}, {sys.executable})",
        f"numpy         {info['numpy'] or 'not installed'}",
        f"platform      {info['platform']}",
        f"cpu           {cpu['model']} ({cpu['logical_cores']} logical cores)",
        f"cpu isa       {isa}; torch CPU capability {capability}",
        f"cuda          {'available' if cuda.available else 'not available'}: {cuda.reason}",
        f"extension     {EXTENSION}: {extension}",
        f"triton        {'importable' if triton.available else 'not importable'}: {triton.reason}",
    ]
    if not rows:
        lines.append("kernels       no ops registered yet")
    else:
        width = max(len(row.op) for row in rows)
        lines.append("kernels")
        lines.append(f"  {'op':<{width}}  {'backend':<9}  {'avail':<5}  reason")
        for row in rows:
            mark = "yes" if row.available else "no"
            lines.append(f"  {row.op:<{width}}  {row.backend:<9}  {mark:<5}  {row.reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the report (or JSON with ``--json``); return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m pdquant_fast.info", description="Versions, device and kernel availability."
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)

    info = collect_info()
    cuda, ext, triton = cuda_status(), extension_status(), triton_status()
    rows = kernels_table()
    if args.json:
        payload = {
            **info,
            "cuda": dataclasses.asdict(cuda),
            "extension": dataclasses.asdict(ext),
            "triton": dataclasses.asdict(triton),
            "kernels": [dataclasses.asdict(row) for row in rows],
        }
        print(json.dumps(payload, indent=2))
    else:
        print(_format_report(info, cuda, ext, triton, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
