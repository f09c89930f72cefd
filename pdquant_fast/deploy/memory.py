"""Keep freed activation memory in the process between forwards of a packed model (glibc).

A packed forward allocates every feature map afresh (uint8 codes, int32 tiles, padded copies),
frees it a layer later, and allocates the same sizes again on the next forward. With glibc's
default malloc, allocations of a few MB (PyTorch's CPU allocator with
``THP_MEM_ALLOC_ENABLE=1`` asks for 2 MB-aligned blocks, which glibc serves with ``mmap`` or at
the top of the heap) go back to the kernel when freed and are faulted in again, one 4 KB page at a
time, on the next forward: on this project's VM a ResNet-20 batch-256 forward took about 6,000
minor page faults and 96 ms alone in a process, 78 ms with none (``docs/DEPLOY.md``, Latency).

:func:`tune_malloc` sets glibc's ``M_MMAP_THRESHOLD`` to 32 MiB (blocks below it come from the
heap, which also fixes the threshold that glibc otherwise moves at run time) and
``M_TRIM_THRESHOLD`` to 512 MiB (free memory at the top of the heap is kept up to that much), so
the second forward reuses the first one's pages. The cost is memory: up to 512 MiB of freed heap
may stay mapped in the process. It changes process-wide malloc settings, so
:func:`~pdquant_fast.deploy.load_packed` applies it only for CPU models and only unless
``PDQUANT_TUNE_MALLOC=0`` (or ``tune_malloc=False``). Elsewhere than glibc it does nothing.

``pdquant calibrate`` applies it too on the CPU (same variable): a reconstruction step allocates
its activations and gradients afresh every iteration, and a ResNet-18 step (unit 1, one thread)
took 3.30-3.33 s with glibc's defaults and 2.88-2.98 s with these settings (``docs/KERNELS.md``).
The Python API leaves the process's malloc alone; call :func:`tune_malloc` to get the same.
"""

from __future__ import annotations

import ctypes
import os
import platform

#: glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 512 << 20

ENV = "PDQUANT_TUNE_MALLOC"

_state: dict | None = None


def tune_malloc_enabled(value: bool | None = None) -> bool:
    """``value`` if given, else ``PDQUANT_TUNE_MALLOC`` (``1``/``0``; unset means on).

    Raises ValueError for any other setting of the variable."""
    if value is not None:
        if not isinstance(value, bool):
            raise ValueError(f"tune_malloc must be True, False or None, got {value!r}")
        return value
    raw = os.environ.get(ENV, "").strip()
    if raw in ("", "1"):
        return True
    if raw == "0":
        return False
    raise ValueError(f"{ENV}={raw!r}: use 1 (keep freed memory, the default) or 0 (glibc defaults)")


def tune_malloc() -> dict:
    """Apply the settings above once per process; returns ``{"applied": bool, "reason": str,
    "mmap_threshold": int, "trim_threshold": int}`` (the same dict on later calls)."""
    global _state
    if _state is not None:
        return _state
    out = {"applied": False, "reason": "", "mmap_threshold": None, "trim_threshold": None}
    lib, _ = platform.libc_ver()
    if lib != "glibc":
        out["reason"] = f"not glibc ({lib or 'unknown libc'})"
    else:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError) as exc:
            out["reason"] = f"mallopt unavailable ({exc})"
        else:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallopt.restype = ctypes.c_int
            ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
            out.update(
                applied=ok,
                reason="" if ok else "mallopt refused the settings",
                mmap_threshold=MMAP_THRESHOLD,
                trim_threshold=TRIM_THRESHOLD,
            )
    _state = out
    return out


def malloc_state() -> dict | None:
    """What :func:`tune_malloc` did in this process (None: not called)."""
    return _state
