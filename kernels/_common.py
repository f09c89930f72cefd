"""Shared Triton helpers of the calibration kernels: exact rounding, QDrop hash, launch shapes.

Bit-exactness rules (the contract in :mod:`pdquant_fast.ops.reference`), and how they are kept:

* IEEE division: Triton's ``/`` on fp32 is ``div.full.f32`` (approximate, 2 ulp) on NVIDIA, so
  every division here is ``tl.math.div_rn`` (present in Triton 3.6 and 3.9; numpy's IEEE divide
  under the interpreter).
* round half to even: :func:`rint_even`, an exact add/subtract formulation that needs no libdevice
  (libdevice is unavailable under ``TRITON_INTERPRET=1``), so one code path runs on CPU and GPU.
* no fused multiply-add where the reference multiplies then adds: every launch passes
  ``enable_fp_fusion=False`` (a Triton compile option in 3.6 and 3.9; the interpreter ignores it and
  numpy never fuses).
* ``exp`` / ``pow`` (AdaRound only): on GPU libdevice ``__nv_expf`` / ``__nv_powf``, the functions
  nvcc uses for ``expf`` / ``powf``, which is what torch's CUDA ``sigmoid`` and ``pow`` call. Their
  bits depend on the libdevice version: Triton 3.6 bundles its own, whose ``powf`` differed in the
  last bit from torch 2.11+cu130's for ~10% of the AdaRound backward's inputs (H200, measured).
  So those launches link the libdevice of the CUDA toolkit torch was built with when it is
  installed (:data:`LIBM_OPTIONS`; ``PDQUANT_LIBDEVICE`` names another file), and turn off
  libdevice's flush-to-zero variants (torch and nvcc use the non-FTZ ones); under
  the interpreter float64 numpy then one rounding to float32 (torch's CPU kernels use SLEEF, so
  CPU results may differ from the CPU reference by an ulp there; the tests state that budget).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import triton
import triton.language as tl
from triton.language.extra import libdevice

#: True when kernels run under the Triton interpreter (numpy on CPU); fixed at import, as
#: ``triton.jit`` itself decides at decoration time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
#: Use libdevice exp/pow (GPU). The interpreter has no libdevice (extern calls are unsupported).
EXACT_LIBM = not INTERPRET

#: Elements per tile of the elementwise kernels: 1024 fp32 = 4 KiB per operand, 8 per thread
#: at 4 warps (two 128-bit accesses), the usual memory-bound Triton tile.
BLOCK = 1024
#: Total programs (over all channels) a reduction kernel is split into. A function of the shape
#: only, never of the device, so the fp64 partial sums and their order are the same on every GPU.
TARGET_PROGRAMS = 2048
HASH_KEY_XOR = 0x9E3779B9
#: Tensors with at least this many elements index in int64 (int32 offsets would overflow). A
#: module attribute, read at each launch, so a test can lower it to run the int64 path on small
#: tensors.
INT64_INDEX_FROM = 2**31 - 2 * BLOCK


def needs_int64(numel: int) -> bool:
    return numel >= INT64_INDEX_FROM


def _toolkit_version(home: Path) -> tuple[int, int] | None:
    """``(major, minor)`` of the CUDA toolkit at ``home``, from ``CUDA_VERSION`` in ``cuda.h``."""
    try:
        text = (home / "include" / "cuda.h").read_text(errors="replace")
    except OSError:
        return None
    found = re.search(r"#define\s+CUDA_VERSION\s+(\d+)", text)
    if not found:
        return None
    v = int(found.group(1))
    return v // 1000, (v % 1000) // 10


def _torch_libdevice() -> str | None:
    """Path of ``libdevice.10.bc`` of the CUDA toolkit torch was built with, if installed.

    ``$PDQUANT_LIBDEVICE`` wins; else the first of ``$CUDA_HOME``, ``$CUDA_PATH``,
    ``/usr/local/cuda-<torch.version.cuda>``, ``/usr/local/cuda`` whose ``cuda.h`` has torch's CUDA
    major.minor. ``None``: Triton's bundled libdevice is used (exp/pow may then differ from
    torch's by an ulp).
    """
    env = os.environ.get("PDQUANT_LIBDEVICE")
    if env:
        return env
    import torch

    want = torch.version.cuda
    if not want:
        return None
    want_v = tuple(int(p) for p in want.split(".")[:2])
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    homes += [f"/usr/local/cuda-{want}", "/usr/local/cuda"]
    for home in homes:
        if not home:
            continue
        bc = Path(home) / "nvvm" / "libdevice" / "libdevice.10.bc"
        if bc.is_file() and _toolkit_version(Path(home)) == want_v:
            return str(bc)
    return None


#: The libdevice linked into the kernels that call exp/pow (None: Triton's own).
LIBDEVICE = None if INTERPRET else _torch_libdevice()
#: Launch options of those kernels (Triton 3.6 and 3.9 both accept them as launch keywords).
LIBM_OPTIONS = {"enable_reflect_ftz": False}
if LIBDEVICE is not None:
    LIBM_OPTIONS["extern_libs"] = (("libdevice", LIBDEVICE),)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def programs_per_channel(channels: int, tiles_per_channel: int) -> int:
    """Programs along grid axis 1 for each channel (grid-stride over that channel's tiles)."""
    want = max(1, cdiv(TARGET_PROGRAMS, max(channels, 1)))
    return max(1, min(tiles_per_channel, want, 65535))


@triton.jit
def rint_even(v):
    """Round half to even, exact, for fp32 ``v`` (what ``torch.round`` does).

    For ``|v| < 2**23``, ``(|v| + 2**23) - 2**23`` lies in ``[2**23, 2**24)`` where the ulp is 1,
    so the addition rounds ``|v|`` to an integer with the hardware's round-to-nearest-even; the
    subtraction is exact. ``|v| >= 2**23`` (and Inf/NaN) is already integral and passes through.
    The sign is copied back bitwise, so ``-0.3 -> -0.0`` as in torch.
    """
    a = tl.abs(v)
    r = tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)
    bits = r.to(tl.uint32, bitcast=True) | (v.to(tl.uint32, bitcast=True) & 0x80000000)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def clamp_nan(v, lo, hi):
    """``torch.clamp(v, lo, hi)``: NaN stays NaN (comparisons with NaN are false)."""
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def lowbias32(v):
    """C. Wellons' lowbias32 on uint32 (multiplications wrap modulo 2**32, shifts logical)."""
    v = v ^ (v >> 16)
    v = v * 0x7FEB352D
    v = v ^ (v >> 15)
    v = v * 0x846CA68B
    return v ^ (v >> 16)


@triton.jit
def qdrop_key(seed_ptr):
    """``lowbias32(uint32(seed) ^ 0x9E3779B9)`` from the int64 seed in device memory (no sync)."""
    s = tl.load(seed_ptr)
    return lowbias32((s & 0xFFFFFFFF).to(tl.uint32) ^ 0x9E3779B9)


@triton.jit
def qdrop_keep(flat, key, thresh):
    """Keep (quantize) element ``flat`` when ``lowbias32(uint32(flat) ^ key) < thresh``."""
    h = lowbias32(flat.to(tl.uint32) ^ key)
    return h.to(tl.int64) < thresh


@triton.jit
def sigmoid_exact(a, EXACT: tl.constexpr):
    """``1 / (1 + exp(-a))`` with IEEE division, as torch's CUDA sigmoid kernel computes it."""
    if EXACT:
        e = libdevice.exp(-a)
    else:
        e = tl.exp((-a).to(tl.float64)).to(tl.float32)
    return tl.math.div_rn(tl.full(a.shape, 1.0, tl.float32), 1.0 + e)


@triton.jit
def pow_exact(a, b, EXACT: tl.constexpr):
    """``powf(a, b)`` for ``a >= 0`` (libdevice on GPU; float64 exp2/log2 under the interpreter)."""
    if EXACT:
        return libdevice.pow(a, b)
    else:
        r = tl.exp2(b.to(tl.float64) * tl.log2(a.to(tl.float64)))
        return tl.where(b == 0.0, 1.0, r).to(tl.float32)


@triton.jit
def sum_partials_kernel(part_ptr, out_ptr, P, BLOCK_P: tl.constexpr):
    """Second stage of the deterministic reductions: ``out[c] = float32(sum_p part[c, p])``.

    One program per output; float64 partials summed in a fixed order (blocked, then a tree).
    Reads ``8 * P`` bytes, writes 4 bytes per output.
    """
    c = tl.program_id(0)
    acc = tl.zeros([BLOCK_P], dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(part_ptr + c * P + offs, mask=offs < P, other=0.0)
    tl.store(out_ptr + c, tl.sum(acc, axis=0).to(tl.float32))
