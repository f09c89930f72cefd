"""Where the calibration engine keeps its per-unit tensors: device, host memory or disk.

Per reconstruction unit the engine holds, for all ``N`` calibration images (spec §2):

* ``X_q`` and ``X_fp``: the unit's input from the quantized and from the full-precision model,
  float32 ``[N, *unit_input_shape]``;
* ``X_c``: ``X_fp`` after distribution correction (same shape; absent without DC);
* ``Y_c``: the reconstruction target ``FP_unit(X_c)``, float32 ``[N, *unit_output_shape]``;

and, while it moves on to the next unit, the next unit's ``X_q``/``X_fp``. For EfficientNet-Lite0
with 1,024 images at 224x224 the largest of these is 1.6 GB (the stem output, 32x112x112 floats
per image), so the mode matters:

==========  ==============================================================================
mode        storage
==========  ==============================================================================
``device``  tensors on the compute device (the model's device)
``host``    host RAM (pinned when the compute device is a GPU; batches are copied over
            when the engine indexes them)
``disk``    float32 files memory-mapped ``MAP_SHARED`` in a scratch folder; each file is
            unlinked right after it is mapped, so nothing is left on disk when the process
            ends, however it ends. Resident pages are dropped (``MADV_DONTNEED``) after each
            bulk write and at unit boundaries; they stay reclaimable file pages in between.
``auto``    the first of device, host, disk whose free memory holds twice the estimated
            peak (``torch.cuda.mem_get_info`` on GPU, ``MemAvailable`` of ``/proc/meminfo``
            for host RAM)
==========  ==============================================================================

On a CPU-only machine the device *is* host memory: ``device`` and ``host`` are the same thing.
The values stored are bit-identical in every mode (float32 copies), so the mode never changes a
calibration result (``tests/test_resume.py::test_cache_modes_give_identical_results``).
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

CACHE_MODES = ("auto", "device", "host", "disk")


class CacheError(ValueError):
    """An unsupported cache mode or an unusable scratch folder."""


def check_cache_mode(mode: str) -> str:
    if mode not in CACHE_MODES:
        raise CacheError(f"unknown cache mode {mode!r}: choose one of {list(CACHE_MODES)}")
    return mode


def host_available_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # other POSIX systems: free physical pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_available_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (None for CPU or where it cannot be queried)."""
    if device.type != "cuda":
        return None
    try:
        return int(torch.cuda.mem_get_info(device)[0])
    except (RuntimeError, AssertionError):
        return None


def choose_mode(
    need_bytes: int,
    device: torch.device,
    host_free: int | None = None,
    device_free: int | None = None,
) -> tuple[str, str]:
    """``(mode, reason)`` for ``auto``: device, then host, then disk, each if free >= 2x need.

    The factor 2 leaves room for the model, its activations and the optimiser on top of the
    cached tensors. ``host_free``/``device_free`` default to the measured values.
    """
    if device.type == "cuda":
        free = device_available_bytes(device) if device_free is None else device_free
        if free is not None and free >= 2 * need_bytes:
            return "device", f"{_gb(need_bytes)} needed, {_gb(free)} free on {device}"
    free = host_available_bytes() if host_free is None else host_free
    if free is None or free >= 2 * need_bytes:
        where = "unknown" if free is None else _gb(free)
        mode = "host" if device.type == "cuda" else "device"
        return mode, f"{_gb(need_bytes)} needed, {where} host memory available"
    return "disk", f"{_gb(need_bytes)} needed but only {_gb(free)} host memory available"


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


class Staged:
    """A host-resident tensor that the engine indexes as if it were on the compute device.

    ``staged[idx]`` returns ``data[idx]`` copied to ``device``; ``shape``, ``dim()`` and
    ``len()`` are those of ``data``. Only used when the cache is not on the compute device
    (host or disk mode with a GPU model); on CPU the engine gets plain tensors.
    """

    def __init__(self, data: torch.Tensor, device: torch.device):
        self.data = data
        self.device = device

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dim(self) -> int:
        return self.data.dim()

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu()
        return self.data[idx].to(self.device, non_blocking=True)

    def __setitem__(self, idx, value: torch.Tensor) -> None:
        self.data[idx] = value.to(self.data.device)


class UnitCache:
    """Allocates the engine's per-unit tensors in one storage mode (see the module docstring).

    Args:
        mode: ``device`` | ``host`` | ``disk`` (resolve ``auto`` with :func:`choose_mode` first).
        device: the compute device (where the model runs).
        folder: scratch folder for ``disk`` (default: the system temp folder).
    """

    def __init__(self, mode: str, device: torch.device, folder: str | Path | None = None):
        if mode not in ("device", "host", "disk"):
            raise CacheError(f"cache mode must be device, host or disk here, got {mode!r}")
        self.mode = mode
        self.device = torch.device(device)
        self.folder = Path(folder) if folder is not None else Path(tempfile.gettempdir())
        self._maps: list = []  # weak references to live disk mappings
        if mode == "disk":
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd, probe = tempfile.mkstemp(dir=self.folder, prefix=".pdq-cache-probe-")
                os.close(fd)
                os.unlink(probe)
            except OSError as exc:
                raise CacheError(
                    f"disk cache folder {self.folder} is not writable: {exc.strerror or exc}"
                ) from exc

    @property
    def on_device(self) -> bool:
        """True when stored tensors live where the model runs (no copies when indexing)."""
        return self.mode == "device" or self.device.type == "cpu"

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uninitialised storage tensor of ``shape`` in this cache's mode (contiguous)."""
        if self.mode == "device":
            return torch.empty(shape, dtype=dtype, device=self.device)
        if self.mode == "host":
            pin = self.device.type == "cuda"
            return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=pin)
        return self._disk_empty(shape, dtype)

    def _disk_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * torch.empty((), dtype=dtype, device="cpu").element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype, device="cpu")
        fd, path = tempfile.mkstemp(dir=self.folder, prefix=".pdq-cache-", suffix=".f32")
        try:
            os.unlink(path)  # the mapping keeps the inode; nothing is left after the process
            try:
                os.ftruncate(fd, nbytes)
                mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
            except OSError as exc:
                raise CacheError(
                    f"cannot create a {_gb(nbytes)} disk cache file in {self.folder}: "
                    f"{exc.strerror or exc}"
                ) from exc
        finally:
            os.close(fd)
        t = torch.frombuffer(mm, dtype=dtype, count=numel).view(shape)
        import weakref

        self._maps.append(weakref.ref(mm))  # the tensor keeps ``mm`` alive
        return t

    def put(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of ``x`` in this cache (``x`` itself in device mode when already there)."""
        if self.mode == "device" and x.device == self.device and x.is_contiguous():
            return x
        out = self.empty(tuple(x.shape), x.dtype)
        for i in range(0, x.shape[0], 256):
            out[i : i + 256] = x[i : i + 256].to(out.device)
        self.trim()
        return out

    def view(self, t: torch.Tensor) -> torch.Tensor | Staged:
        """What the engine indexes: ``t`` itself, or a :class:`Staged` wrapper off-device."""
        return t if self.on_device else Staged(t, self.device)

    def trim(self) -> None:
        """Disk mode: drop resident pages of every live mapping (the data stays in the file)."""
        alive = []
        for ref in self._maps:
            mm = ref()
            if mm is None or mm.closed:
                continue
            alive.append(ref)
            if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                mm.madvise(mmap.MADV_DONTNEED)
        self._maps = alive


@torch.no_grad()
def batched_into(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor | Staged,
    cache: UnitCache,
    bs: int = 256,
) -> torch.Tensor:
    """``fn`` applied to ``x`` in batches of ``bs`` rows, written into a new cache tensor.

    Same batches as :func:`pdquant_fast.engine.batched` (so bit-identical values), but the result
    is written batch by batch into storage from ``cache`` instead of concatenated, so that the
    output never exists twice in memory. Returns the storage tensor (not a :class:`Staged`).
    """
    n = x.shape[0]
    out = None
    for i in range(0, n, bs):
        y = fn(x[i : i + bs])
        if out is None:
            out = cache.empty((n, *y.shape[1:]), y.dtype)
        out[i : i + y.shape[0]] = y.to(out.device)
    cache.trim()
    return out


def estimate_peak_bytes(
    n: int, in_shapes: list[tuple[int, ...]], out_shapes: list[tuple[int, ...]], dc: bool
) -> int:
    """Largest number of cached float32 bytes alive at once over all units.

    While reconstructing unit k: ``X_q``, ``X_fp``, ``X_c`` (with DC) and ``Y_c``; while moving
    to unit k+1: unit k's ``X_fp`` plus unit k+1's ``X_q`` and ``X_fp`` (and unit k's ``X_q``
    for the first half of the step).
    """
    peak = 0
    for k, (i_s, o_s) in enumerate(zip(in_shapes, out_shapes, strict=True)):
        a = _numel(i_s)
        rec = (3 if dc else 2) * a + _numel(o_s)
        adv = 0
        if k + 1 < len(in_shapes):
            b = _numel(in_shapes[k + 1])
            adv = max(2 * a + b, a + 2 * b)
        peak = max(peak, rec, adv)
    return 4 * n * peak


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out
