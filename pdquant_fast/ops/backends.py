"""Backend chooser: which implementation of an op runs for a given device and bit-width.

Every op in :mod:`pdquant_fast.ops.library` has a reference (plain PyTorch, every device) and any
of three fast kernels, with one signature and one naming scheme (STYLE.md)::

    reference  pdquant_fast.ops.reference.<op>_reference    any device
    cpp        pdquant_fast._C.<op>_cpu                      CPU tensors, needs the C++ extension
    cuda       pdquant_fast._C.<op>_cuda                     CUDA tensors, extension built with CUDA
    triton     pdquant_fast.kernels.<op>_triton              CUDA tensors (CPU: TRITON_INTERPRET=1)

Default order: CPU ``cpp`` then ``reference``; CUDA ``cuda``, ``triton``, ``reference``. The
environment variable ``PDQUANT_KERNELS=reference|cpp|triton|cuda`` (or :func:`force`) forces one
backend for every op; if it cannot run a call, :class:`BackendError` names every candidate and why
it was rejected. There is no silent fallback from a forced backend. (An op may implement only some
backends, e.g. the distribution-correction ops: C++ and the reference. Forcing a backend such an op
does not have at all leaves it on the default order; ``explain`` lists what each op has.)

Availability is probed lazily (importing this module imports neither the extension nor Triton)
and cached; :func:`explain` gives the table that ``pdquant info`` prints.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

BACKENDS = ("reference", "cpp", "triton", "cuda")
ENV = "PDQUANT_KERNELS"
DEFAULT_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}


class BackendError(RuntimeError):
    """A requested kernel backend cannot run this call (the message names every candidate)."""


@dataclass(frozen=True)
class OpInfo:
    """What each op's fast kernels support, beyond device: the bit-widths, and which backends
    implement it at all (None: every one)."""

    name: str
    bits: tuple[int, ...] | None  # None: the op takes no bit-width
    backends: tuple[str, ...] | None = None


#: Ops whose kernels this chooser dispatches; ``library.py`` holds their schemas.
OPS: dict[str, OpInfo] = {}


def register_op(
    name: str, bits: tuple[int, ...] | None, backends: tuple[str, ...] | None = None
) -> None:
    """Register ``name``. ``backends``: the backends that implement it, when not all of them
    (the distribution-correction ops have a C++ kernel and the reference only). Forcing a
    backend that an op does not implement at all leaves that op on its default order (C++ on
    CPU tensors, else the reference); forcing one it implements but cannot run for a call is an
    error, as for every op."""
    if backends is not None:
        unknown = set(backends) - set(BACKENDS)
        if unknown or "reference" not in backends:
            raise ValueError(f"op {name}: backends {backends} must include 'reference'")
    OPS[name] = OpInfo(name, bits, backends)


_forced: str | None = None


def force(backend: str | None) -> None:
    """Force ``backend`` for every op (``None``: back to the environment / default order)."""
    global _forced
    if backend is not None and backend not in BACKENDS:
        raise BackendError(f"unknown kernel backend {backend!r}; choose one of {list(BACKENDS)}")
    _forced = backend
    _choose.cache_clear()


def forced_backend() -> str | None:
    """The backend forced by :func:`force` or ``PDQUANT_KERNELS`` (``None`` when not forced)."""
    if _forced is not None:
        return _forced
    value = os.environ.get(ENV, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise BackendError(
            f"{ENV}={value!r} is not a kernel backend; choose one of {list(BACKENDS)} or unset it"
        )
    return value


@cache
def _extension():
    """``(module, None)`` or ``(None, reason)`` for the compiled extension."""
    try:
        return importlib.import_module("pdquant_fast._C"), None
    except ImportError as exc:
        return None, f"extension pdquant_fast._C not built ({exc})"


@cache
def _triton_kernels():
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return None, f"triton not installed ({exc})"
    try:
        return importlib.import_module("pdquant_fast.kernels"), None
    except Exception as exc:  # a broken Triton install must not break the package
        return None, f"pdquant_fast.kernels failed to import ({type(exc).__name__}: {exc})"


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def candidate(
    op: str, backend: str, device_type: str, bits: int | None
) -> tuple[Callable | None, str]:
    """``(function, "")`` if ``backend`` can run ``op`` on ``device_type`` at ``bits``, else
    ``(None, reason)``."""
    info = OPS[op]
    if info.backends is not None and backend not in info.backends:
        return None, f"no {backend} kernel for {op} (has {list(info.backends)})"
    if (
        bits is not None
        and info.bits is not None
        and bits not in info.bits
        and backend != "reference"
    ):
        return None, f"{bits}-bit not supported (supports {list(info.bits)})"
    if backend == "reference":
        from . import reference

        return getattr(reference, f"{op}_reference"), ""
    if backend == "cpp":
        if device_type != "cpu":
            return None, f"CPU only, tensors are on {device_type}"
        mod, why = _extension()
        fn = getattr(mod, f"{op}_cpu", None) if mod is not None else None
        return (fn, "") if fn is not None else (None, why or f"no {op}_cpu in the extension")
    if backend == "cuda":
        if device_type != "cuda":
            return None, f"CUDA only, tensors are on {device_type}"
        mod, why = _extension()
        if mod is None:
            return None, why
        fn = getattr(mod, f"{op}_cuda", None)
        return (fn, "") if fn is not None else (None, "extension built without CUDA kernels")
    if backend == "triton":
        if device_type != "cuda" and not (device_type == "cpu" and _triton_interpret()):
            return None, f"GPU only (CPU needs TRITON_INTERPRET=1), tensors are on {device_type}"
        mod, why = _triton_kernels()
        if mod is None:
            return None, why
        try:
            fn = getattr(mod, f"{op}_triton")
        except AttributeError:
            return None, f"no Triton kernel for {op}"
        return fn, ""
    raise BackendError(f"unknown kernel backend {backend!r}")


@cache
def _choose(
    op: str, device_type: str, bits: int | None, forced: str | None
) -> tuple[str, Callable]:
    implemented = OPS[op].backends
    if forced is not None and (implemented is None or forced in implemented):
        fn, why = candidate(op, forced, device_type, bits)
        if fn is not None:
            return forced, fn
        rejected = [
            f"{b}: {candidate(op, b, device_type, bits)[1] or 'available'}" for b in BACKENDS
        ]
        raise BackendError(
            f"kernel backend {forced!r} was forced ({ENV} or ops.force) but cannot run {op} on "
            f"{device_type} at bits={bits}: {why}. Candidates: " + "; ".join(rejected)
        )
    for backend in DEFAULT_ORDER.get(device_type, ("reference",)):
        fn, _ = candidate(op, backend, device_type, bits)
        if fn is not None:
            return backend, fn
    raise BackendError(f"no backend for {op} on {device_type}")  # unreachable: reference runs


def choose(op: str, device_type: str, bits: int | None = None) -> tuple[str, Callable]:
    """``(backend name, function)`` that runs ``op`` for tensors on ``device_type``."""
    return _choose(op, device_type, bits, forced_backend())


def explain(device_types: tuple[str, ...] = ("cpu", "cuda")) -> list[dict]:
    """One row per (op, backend, device type): available or why not (for ``pdquant info``)."""
    rows = []
    for op, info in sorted(OPS.items()):
        bits = info.bits[0] if info.bits else None
        for dev in device_types:
            for backend in BACKENDS:
                fn, why = candidate(op, backend, dev, bits)
                rows.append(
                    {
                        "op": op,
                        "device": dev,
                        "backend": backend,
                        "available": fn is not None,
                        "reason": why if fn is None else "ok",
                    }
                )
    return rows
