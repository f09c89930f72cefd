"""Triton kernels for packed low-bit linear layers (deployment, GPU).

Two families, both reading the storage format of :func:`pdquant_fast.ops.reference.pack_reference`
(little-endian within a byte, rows padded to whole bytes)::

    w_packed uint8 [N, ceil(K * bits / 8)], row n = output channel n
    4-bit byte:  bit 7 .. 4 | 3 .. 0         2-bit byte:  7 6 | 5 4 | 3 2 | 1 0
                 [ k + 1   ] [ k  ]                       [k+3] [k+2] [k+1] [k]

Read as little-endian int32 words (when a row is a whole number of words), word ``j`` of row
``n`` holds ``E = 32 / bits`` consecutive elements of one output column::

    int32 word j of row n:  bit 31 ............................................ 0
      4-bit (E = 8):        [k+7][k+6][k+5][k+4][k+3][k+2][k+1][k+0]     k = 8 j
      2-bit (E = 16):       [k+15] .................... [k+1][k+0]        k = 16 j

so one 32-bit load feeds 8 (4-bit) or 16 (2-bit) elements of one column and no reorder is needed:
the kernels take the contract's plain layout. :func:`linear_wa16_prepack` optionally transposes
the words to ``[K / E, N]`` (N contiguous, the tile rows of a column block lie side by side);
the kernels take either (they are stride-generic).

1. :func:`linear_wa16_triton`: weight-only ``y = x @ ((w_code - zero) * scale)^T`` for fp16/bf16
   ``x [M, K]``, 2/4-bit codes, per-channel (``scale [N]``) or grouped (``scale [N, ceil(K/g)]``)
   scale and zero point, fp32 accumulation. Two kernels:

   * ``fma`` (GEMV, M <= 4): CUDA-core FMAs over a ``[BLOCK_M, BLOCK_KW, BLOCK_N]`` register
     tile, split-K over programs; codes become float32 with the exponent trick
     ``float(bits(c | 0x4B000000)) - 2**23 == c`` (one logic op + one add per element, no
     int-to-float conversion, which runs at a quarter of the FP32 rate);
   * ``dot`` (M > 4): ``tl.dot`` on tensor cores with ``x`` in fp16/bf16 and the codes converted
     to the same type, one ``tl.dot`` per bit slice of a word (slice ``i`` of words ``j`` is the
     K-subset ``E * j + i``; ``x`` is loaded at the same subset).

   Both fold the zero point and the scale out of the inner loop (exact algebra)::

       y[m, n] = sum_g s[n, g] * (sum_{k in g} x[m, k] * c[n, k]  -  z[n, g] * sum_{k in g} x[m, k])

   so the per-element work is: extract the code, convert, multiply-add; the group terms are
   applied once per tile (each K tile lies in one group: ``group % BLOCK_K == 0``).

2. :func:`qlinear_triton`: the ``pdquant::qlinear`` contract (uint8 activation codes x int8
   weight offsets -> exact int32, fused requantisation), int8 ``tl.dot`` (see the function).

Accuracy of ``linear_wa16``: the codes, ``x`` and every product are exact; only the fp32 sums
(tensor-core or FMA order), the per-group scaling in fp32 and the final rounding to fp16/bf16
differ from a float64 computation (tests: ``tests/test_deploy_triton.py``). One exception: the
``dot`` kernel rounds ``c - z`` to x's dtype before the tensor-core product, which is exact for
integer zero points (as in the tests) and one rounding per weight otherwise.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

#: ``PDQUANT_TRITON_TUNE=0`` disables the one-off timing of candidate configs per shape (the
#: heuristic default is used); on by default on a GPU, always off under ``TRITON_INTERPRET=1``.
TUNE_ENV = "PDQUANT_TRITON_TUNE"

_MAGIC_F32 = tl.constexpr(0x4B000000)  # float32 bits of 2**23: bits(c | magic) == 2**23 + c
_TWO23 = tl.constexpr(8388608.0)
# Round-half-even for |t| <= 2**22: (t + 1.5 * 2**23) - 1.5 * 2**23 in float32 (no FMA, no
# reassociation: the kernels are compiled with enable_fp_fusion=False).
_RNE_MAGIC = tl.constexpr(12582912.0)
_RNE_LIMIT = tl.constexpr(4194304.0)


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


# ---------------------------------------------------------------------------------------------
# one-off per-shape tuning (explicit, so that split-K workspaces and int8 paths stay correct)

_TUNED: dict = {}
#: The configuration each kernel family (``key[0]``) ran with last (benchmarks report it).
LAST_CONFIG: dict = {}


def pick_config(key: tuple, candidates, launch, *, rep_ms: float = 20.0):
    """The fastest of ``candidates`` for ``key`` (timed once per key and cached), else the first.

    ``candidates``: a list, or a zero-argument callable returning one (built only on a cache
    miss, so that a cached call costs one dict look-up: the wrappers' Python time adds to the
    latency of these microsecond kernels). ``launch(cfg)`` runs the kernel with ``cfg`` writing
    the real output (every kernel here overwrites its whole output, so timing runs leave no
    trace). Timing happens only on a GPU, not under the interpreter, and not with
    ``PDQUANT_TRITON_TUNE=0`` (then the first candidate, the heuristic default, is used). A
    candidate that fails to compile (e.g. out of shared memory) is skipped; if all fail, the
    first error is raised.
    """
    tune = not interpret_mode() and os.environ.get(TUNE_ENV, "1") != "0"
    full_key = key + (tune,)
    best = _TUNED.get(full_key)
    if best is None:
        cands = candidates() if callable(candidates) else list(candidates)
        if len(cands) == 1 or not tune:
            best = cands[0]
        else:
            from triton.testing import do_bench

            best_t, first_err = math.inf, None
            for cfg in cands:
                try:
                    t = do_bench(
                        lambda cfg=cfg: launch(cfg), warmup=5, rep=rep_ms, return_mode="median"
                    )
                except Exception as exc:  # compile/resource failure of one candidate
                    first_err = first_err or exc
                    continue
                if t < best_t:
                    best, best_t = cfg, t
            if best is None:
                raise first_err
        _TUNED[full_key] = best
    LAST_CONFIG[key[0]] = best
    return best


@triton.jit
def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n), GROUP_M row tiles at a time (L2 reuse of the B tiles)."""
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


# ---------------------------------------------------------------------------------------------
# W4A16 / W2A16: weight-only low-bit linear


@triton.jit
def _fma_slice(words, hi, xi, BITS: tl.constexpr, I0: tl.constexpr, i: tl.constexpr):
    """Slice i of every word as float32 ``c * 2**b`` (b its bit offset, b < 23) and x * 2**-b.

    bits(word & (mask << b) | 0x4B000000) is the float 2**23 + c * 2**b: one logic op, one add,
    no int-to-float conversion (a quarter-rate instruction). Slices at b >= 23 come from
    ``hi = word >> (BITS * I0)`` (one shift per word, not per element). Both scalings are exact.
    """
    MASK: tl.constexpr = (1 << BITS) - 1
    if i < I0:
        c = ((words & (MASK << (BITS * i))) | _MAGIC_F32).to(tl.float32, bitcast=True)
        xs = xi * (1.0 / (1 << (BITS * i)))
    else:
        c = ((hi & (MASK << (BITS * (i - I0)))) | _MAGIC_F32).to(tl.float32, bitcast=True)
        xs = xi * (1.0 / (1 << (BITS * (i - I0))))
    return c - _TWO23, xs


@triton.jit
def _slice_k(j0, jj, i: tl.constexpr, EPW: tl.constexpr, ILV: tl.constexpr):
    """Input index k of bit slice i of words jj (tile starting at word j0).

    Plain layout: word j holds k = E j .. E j + E - 1. Interleaved (:func:`linear_wa16_prepack`
    with ``interleave=True``): in the tile of B = len(jj) words starting at j0, slice i of word
    j holds k = E j0 + i B + (j - j0), so each slice is a contiguous run of B inputs.
    """
    if ILV:
        return j0 * EPW + i * jj.shape[0] + (jj - j0)
    else:
        return jj * EPW + i


@triton.jit
def _fma_row(
    acc,
    xsum_acc,
    words,
    hi,
    x_row,
    j0,
    jj,
    j_end,
    K,
    sg,
    szg,
    EPW: tl.constexpr,
    BITS: tl.constexpr,
    I0: tl.constexpr,
    GROUP: tl.constexpr,
    EVEN_K: tl.constexpr,
    ILV: tl.constexpr,
):
    """One activation row: acc[j, n] += sum_i x[k_i(j)] c_i[j, n], with the group fold.

    k_i(j) = E j + i (plain layout) or E j0 + i BLOCK_KW + (j - j0) (``ILV``, interleaved).
    """
    part = tl.zeros(acc.shape, tl.float32)
    xsum = tl.zeros(xsum_acc.shape, tl.float32)
    for i in tl.static_range(EPW):
        kk = _slice_k(j0, jj, i, EPW, ILV)
        if EVEN_K:
            xi = tl.load(x_row + kk).to(tl.float32)
        else:
            k_ok = (jj < j_end) & (kk < K)
            xi = tl.load(x_row + kk, mask=k_ok, other=0.0).to(tl.float32)
        xsum += xi
        c, xs = _fma_slice(words, hi, xi, BITS, I0, i)
        part += xs[:, None] * c
    if GROUP > 0:
        acc += part * sg[None, :] - xsum[:, None] * szg[None, :]
    else:
        acc += part
        xsum_acc += xsum
    return acc, xsum_acc


@triton.jit
def _wa16_fma_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    M,
    N,
    K,
    KW,
    words_per_split,
    stride_xm,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    stride_os,
    stride_om,
    BITS: tl.constexpr,
    EPW: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr,
    I0: tl.constexpr,
    EVEN_K: tl.constexpr,
    ILV: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """GEMV-style W{2,4}A16 on CUDA cores (M <= 4 rows per program, one 2-D accumulator each).

    Grid (N / BLOCK_N, splits, M / BLOCK_M); out[split, m, n] = this K split's partial y. Per K
    step reads BLOCK_KW x BLOCK_N packed words and BLOCK_KW * EPW activations per row (L1/L2).
    Per element: a logic op and an add (:func:`_fma_slice`) and one FMA per row; the zero point
    and scale are applied per (word, column) once per step (fold, module docstring). ``EVEN_K``:
    every step is a whole tile inside K (no masks). Rows/columns past M/N wrap (never stored).
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_KW)
    cols = offs_n % N
    m0 = pid_m * BLOCK_M
    x0 = x_ptr + (m0 % M) * stride_xm
    x1 = x_ptr + ((m0 + 1) % M) * stride_xm
    x2 = x_ptr + ((m0 + 2) % M) * stride_xm
    x3 = x_ptr + ((m0 + 3) % M) * stride_xm
    j_begin = pid_s * words_per_split  # a multiple of BLOCK_KW (the launcher rounds it)
    j_end = j_begin + words_per_split
    if j_end > KW:  # (not tl.minimum: Triton 3.6's interpreter makes that a 1-element block)
        j_end = KW
    acc0 = tl.zeros((BLOCK_KW, BLOCK_N), tl.float32)
    acc1 = tl.zeros((BLOCK_KW, BLOCK_N), tl.float32)
    acc2 = tl.zeros((BLOCK_KW, BLOCK_N), tl.float32)
    acc3 = tl.zeros((BLOCK_KW, BLOCK_N), tl.float32)
    xs0 = tl.zeros((BLOCK_KW,), tl.float32)
    xs1 = tl.zeros((BLOCK_KW,), tl.float32)
    xs2 = tl.zeros((BLOCK_KW,), tl.float32)
    xs3 = tl.zeros((BLOCK_KW,), tl.float32)
    sg = tl.zeros((BLOCK_N,), tl.float32)
    szg = tl.zeros((BLOCK_N,), tl.float32)
    w_cols = w_ptr + cols[None, :] * stride_wn
    if PREFETCH:  # the first step's words; each step then loads the next one's before computing
        jj = j_begin + offs_j
        nxt = tl.load(w_cols + jj[:, None] * stride_wk, mask=(jj < j_end)[:, None], other=0)
        nxt = nxt.to(tl.int32)
    for j0 in range(j_begin, j_end, BLOCK_KW):
        jj = j0 + offs_j
        if PREFETCH:
            # register double buffering: the DRAM latency of step t+1 overlaps the math of step
            # t (Triton's pipeliner only stages loads that feed tl.dot). The last step re-reads
            # its own rows instead of reading past the split (no mask: vector loads stay).
            words = nxt
            jn = jj + BLOCK_KW
            jn = tl.where(jn < j_end, jn, jj)
            if EVEN_K:
                nxt = tl.load(w_cols + jn[:, None] * stride_wk).to(tl.int32)
            else:
                nxt = tl.load(w_cols + jn[:, None] * stride_wk, mask=(jn < j_end)[:, None], other=0)
                nxt = nxt.to(tl.int32)
        elif EVEN_K:
            words = tl.load(w_cols + jj[:, None] * stride_wk).to(tl.int32)
        else:
            j_ok = jj < j_end
            words = tl.load(w_cols + jj[:, None] * stride_wk, mask=j_ok[:, None], other=0)
            words = words.to(tl.int32)
        hi = words >> (BITS * I0)
        if GROUP > 0:
            g = (j0 * EPW) // GROUP
            sg = tl.load(s_ptr + cols * stride_sn + g * stride_sg).to(tl.float32)
            szg = sg * tl.load(z_ptr + cols * stride_sn + g * stride_sg).to(tl.float32)
        acc0, xs0 = _fma_row(
            acc0, xs0, words, hi, x0, j0, jj, j_end, K, sg, szg, EPW, BITS, I0, GROUP, EVEN_K, ILV
        )
        if BLOCK_M > 1:
            acc1, xs1 = _fma_row(
                acc1,
                xs1,
                words,
                hi,
                x1,
                j0,
                jj,
                j_end,
                K,
                sg,
                szg,
                EPW,
                BITS,
                I0,
                GROUP,
                EVEN_K,
                ILV,
            )
        if BLOCK_M > 2:
            acc2, xs2 = _fma_row(
                acc2,
                xs2,
                words,
                hi,
                x2,
                j0,
                jj,
                j_end,
                K,
                sg,
                szg,
                EPW,
                BITS,
                I0,
                GROUP,
                EVEN_K,
                ILV,
            )
            acc3, xs3 = _fma_row(
                acc3,
                xs3,
                words,
                hi,
                x3,
                j0,
                jj,
                j_end,
                K,
                sg,
                szg,
                EPW,
                BITS,
                I0,
                GROUP,
                EVEN_K,
                ILV,
            )
    if GROUP == 0:
        s = tl.load(s_ptr + cols * stride_sn).to(tl.float32)
        z = tl.load(z_ptr + cols * stride_sn).to(tl.float32)
    n_ok = offs_n < N
    out = out_ptr + pid_s * stride_os + offs_n
    for r in tl.static_range(BLOCK_M):
        if r == 0:
            acc, xs = acc0, xs0
        elif r == 1:
            acc, xs = acc1, xs1
        elif r == 2:
            acc, xs = acc2, xs2
        else:
            acc, xs = acc3, xs3
        y = tl.sum(acc, axis=0)
        if GROUP == 0:
            y = (y - tl.sum(xs, axis=0) * z) * s
        row_ok = (offs_n * 0 + (m0 + r)) < M
        tl.store(out + (m0 + r) * stride_om, y.to(out_ptr.dtype.element_ty), mask=n_ok & row_ok)


@triton.jit
def _wa16_dot_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    M,
    N,
    K,
    KW,
    words_per_split,
    stride_xm,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    stride_os,
    stride_om,
    BITS: tl.constexpr,
    EPW: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr,
    I0: tl.constexpr,
    EVEN_K: tl.constexpr,
    ILV: tl.constexpr,
    HALF_MAGIC: tl.constexpr,
):
    """Tensor-core W{2,4}A16, computed transposed: y^T[n, m] = sum_k (c - z)[n, k] x^T[k, m].

    The dequantized weights are the *left* operand (``swap AB``: a 64/128-row weight tile fills
    the MMA's M side while the few activation rows are its N side). Grid (N / BLOCK_N, splits,
    M / BLOCK_M). Per K step: BLOCK_N x BLOCK_KW words, then for each bit slice i one ``tl.dot``
    of K = BLOCK_KW between (c_i - z) in x's type and the activation columns E*j + i. c - z is
    computed in fp32 (exact) and rounded once to fp16/bf16: exact for integer zero points (codes
    and zeros < 2^8). Per group the fp32 partial is scaled once; fp32 accumulation throughout.

    ``HALF_MAGIC`` (fp16 x and fp16 zero points): the code becomes fp16 without a float
    conversion instruction (fp32 -> fp16 conversions run at a fraction of the FP32 rate):
    ``bits(c | 0x6400)`` is the fp16 ``1024 + c``, minus 1024 is ``c`` exactly, and ``c - z`` is
    then one fp16 subtraction: the same single rounding of the exact ``c - z`` as the fp32 path,
    so both give the same operand bits (tests/test_deploy_triton.py checks the outputs are
    equal). Not offered for bf16: Triton's interpreter does not support bf16 arithmetic (it keeps
    bf16 as uint16 bit patterns; its debugging guide says so, triton-lang/triton#11584), so a
    bf16 variant could not be checked without a GPU.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_KW)
    cols = offs_n % N
    rows = offs_m % M
    j_begin = pid_s * words_per_split  # a multiple of BLOCK_KW (the launcher rounds it)
    j_end = j_begin + words_per_split
    if j_end > KW:  # (not tl.minimum: Triton 3.6's interpreter makes that a 1-element block)
        j_end = KW
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    w_rows = w_ptr + cols[:, None] * stride_wn
    x_rows = x_ptr + rows[:, None] * stride_xm
    if HALF_MAGIC:  # fp16 zero points stay fp16 (the launcher checks x and zero are fp16)
        ZT = tl.float16
    else:
        ZT = tl.float32
    if GROUP == 0:
        z = tl.load(z_ptr + cols * stride_sn).to(ZT)
    for j0 in range(j_begin, j_end, BLOCK_KW):
        jj = j0 + offs_j
        if EVEN_K:
            words = tl.load(w_rows + jj[None, :] * stride_wk).to(tl.int32)
        else:
            words = tl.load(w_rows + jj[None, :] * stride_wk, mask=(jj < j_end)[None, :], other=0)
            words = words.to(tl.int32)
        if GROUP > 0:
            g = (j0 * EPW) // GROUP
            z = tl.load(z_ptr + cols * stride_sn + g * stride_sg).to(ZT)
            part = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        hi = words >> (BITS * I0)
        for i in tl.static_range(EPW):
            kk = _slice_k(j0, jj, i, EPW, ILV)
            if EVEN_K:
                xi = tl.load(x_rows + kk[None, :])
            else:
                k_ok = (jj < j_end) & (kk < K)
                xi = tl.load(x_rows + kk[None, :], mask=k_ok[None, :], other=0.0)
            if HALF_MAGIC:
                # low 16 bits (c | 0x6400): the fp16 1024 + c; minus 1024: c, exactly
                c16 = (((words >> (BITS * i)) & MASK) | 0x6400).to(tl.int16)
                c = c16.to(tl.float16, bitcast=True) - 1024.0
                a = c - z[:, None]
            elif i < I0:
                # c * 2**b in place (no shift), then c = that * 2**-b - 2**(23-b), exact (FFMA)
                cb = ((words & (MASK << (BITS * i))) | _MAGIC_F32).to(tl.float32, bitcast=True)
                c = cb * (1.0 / (1 << (BITS * i))) - (8388608.0 / (1 << (BITS * i)))
                a = (c - z[:, None]).to(x_ptr.dtype.element_ty)
            else:
                cb = ((hi & (MASK << (BITS * (i - I0)))) | _MAGIC_F32).to(tl.float32, bitcast=True)
                c = cb * (1.0 / (1 << (BITS * (i - I0)))) - (8388608.0 / (1 << (BITS * (i - I0))))
                a = (c - z[:, None]).to(x_ptr.dtype.element_ty)
            if GROUP > 0:
                part = tl.dot(a, tl.trans(xi), part)
            else:
                acc = tl.dot(a, tl.trans(xi), acc)
        if GROUP > 0:
            sg = tl.load(s_ptr + cols * stride_sn + g * stride_sg).to(tl.float32)
            acc += part * sg[:, None]
    if GROUP == 0:
        acc = acc * tl.load(s_ptr + cols * stride_sn).to(tl.float32)[:, None]
    out = out_ptr + pid_s * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
    ok = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _splitk_sum_kernel(ws_ptr, out_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum_s ws[s, i] (fp32, fixed order) cast to out's dtype; reads SPLIT*MN*4 bytes."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(ws_ptr + s * MN + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@dataclass(frozen=True)
class WA16Packed:
    """Weights prepacked for :func:`linear_wa16_triton` (from :func:`linear_wa16_prepack`).

    ``words``: int32 (``word_bits`` 32) or uint8 (8) ``[KW, N]``, N contiguous: entry ``[j, n]``
    is word ``j`` of output column ``n``. ``block_kw == 0``: the words of the plain contract
    layout (module docstring), transposed. ``block_kw = B > 0``: interleaved in tiles of B
    words (K padded with zero codes to a multiple of B * E, E = word_bits / bits)::

        tile t = words j = tB .. tB + B - 1; slice i (bits [i*bits, (i+1)*bits)) of word tB + j'
        holds input k = t B E + i B + j'

        4-bit, B = 16, E = 8:   word tB+0: [k=112][k=96] ... [k=16][k=0]      (slice 7 .. 0)
                                word tB+1: [k=113][k=97] ... [k=17][k=1]

    so each slice of a tile is a contiguous run of B inputs (the kernel reads the activations
    of a slice as one contiguous vector instead of a stride-E gather). The kernels must then
    run with ``block_kw == B``.
    """

    words: torch.Tensor
    bits: int
    k: int
    n: int
    block_kw: int = 0

    @property
    def word_bits(self) -> int:
        return 32 if self.words.dtype == torch.int32 else 8


def linear_wa16_prepack(
    w_packed: torch.Tensor, bits: int, k: int, word_bits: int = 32, interleave_kw: int = 0
) -> WA16Packed:
    """One-off weight reorder for :func:`linear_wa16_triton` (optional: it takes the plain
    layout too). Transposes the words to N-major and, with ``interleave_kw = B > 0``,
    interleaves each tile of B words (see :class:`WA16Packed`). ``word_bits`` 32 (int32 words;
    plain rows must be whole words unless interleaving, which pads) or 8 (bytes).
    """
    _check_wa16_packed(w_packed, bits, k)
    if word_bits not in (8, 32):
        raise ValueError(f"linear_wa16_prepack: word_bits must be 8 or 32, got {word_bits}")
    n = w_packed.shape[0]
    if interleave_kw:
        from pdquant_fast.ops.reference import pack_reference, unpack_reference

        b = interleave_kw
        if b & (b - 1):
            raise ValueError(f"linear_wa16_prepack: interleave_kw must be a power of two, got {b}")
        e = word_bits // bits
        tiles = triton.cdiv(k, b * e)
        codes = torch.zeros((n, tiles * b * e), dtype=torch.uint8, device=w_packed.device)
        codes[:, :k] = unpack_reference(w_packed, bits, k)
        codes = codes.reshape(n, tiles, e, b).transpose(2, 3).reshape(n, tiles * b * e)
        plain = pack_reference(codes.contiguous(), bits)
        words = plain.view(torch.int32) if word_bits == 32 else plain
        return WA16Packed(words.t().contiguous(), bits, k, n, b)
    views = _word_views(w_packed)
    if word_bits not in views:
        raise ValueError(
            f"linear_wa16_prepack: rows of {w_packed.shape[1]} bytes are not whole "
            f"{word_bits}-bit words; use word_bits=8 or interleave_kw > 0"
        )
    return WA16Packed(views[word_bits].t().contiguous(), bits, k, n)


def _check_wa16_packed(w_packed: torch.Tensor, bits: int, k: int) -> None:
    if bits not in (2, 4):
        raise ValueError(f"linear_wa16: bits must be 2 or 4, got {bits!r}")
    if (
        not isinstance(w_packed, torch.Tensor)
        or w_packed.dtype != torch.uint8
        or w_packed.dim() != 2
    ):
        raise ValueError(
            f"linear_wa16: w_packed must be uint8 [N, ceil(K*bits/8)], got "
            f"{getattr(w_packed, 'dtype', type(w_packed).__name__)} "
            f"{tuple(getattr(w_packed, 'shape', ()))}"
        )
    if w_packed.shape[1] != (k * bits + 7) // 8:
        raise ValueError(
            f"linear_wa16: w_packed has {w_packed.shape[1]} bytes per row, K={k} at {bits} bits "
            f"needs {(k * bits + 7) // 8}"
        )


def _word_views(w_packed: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{8: uint8 [N, RB]}`` plus ``{32: int32 [N, RB/4]}`` when rows are whole int32 words."""
    w_packed = w_packed.contiguous()
    views = {8: w_packed}
    if w_packed.shape[1] % 4 == 0 and w_packed.shape[1] > 0 and w_packed.data_ptr() % 4 == 0:
        views[32] = w_packed.view(torch.int32)
    return views


@dataclass(frozen=True)
class WA16Config:
    """One launch configuration of the W{2,4}A16 kernels.

    ``kernel``: ``"fma"`` (CUDA cores) or ``"dot"`` (tensor cores); ``word_bits``: 32 reads the
    packed rows as int32 words, 8 as bytes; ``block_kw``: words per column per K step.
    """

    kernel: str
    word_bits: int
    block_m: int
    block_n: int
    block_kw: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3
    prefetch: bool = False  # fma only: load step t+1's words before step t's math
    half_magic: bool = False  # dot only: codes to fp16 by bit pattern (fp16 x and zero)


@dataclass(frozen=True)
class _WA16Problem:
    m: int
    n: int
    k: int
    bits: int
    group: int
    fp16_zero: bool = False  # fp16 x and zero points: the dot kernel's half_magic variant


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_CACHE:
        _SM_CACHE[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_CACHE[index]


_SM_CACHE: dict = {}


def _pow2_floor(v: int) -> int:
    return 1 << (max(int(v), 1).bit_length() - 1)


def _split_for(n: int, kw: int, block_n: int, block_kw: int, sms: int, want: int) -> int:
    """Split-K factor so that about ``want`` x SMs programs run (1 when N alone gives enough)."""
    progs = triton.cdiv(n, block_n)
    steps = triton.cdiv(kw, block_kw)
    split = 1
    while progs * split < want * sms and split * 2 <= min(steps, 16):
        split *= 2
    return split


def wa16_candidates(
    p: _WA16Problem, word_bits: tuple[int, ...], device, block_kw: int = 0
) -> list[WA16Config]:
    """Launch configurations worth timing for this problem (the heuristic default first).

    A K step must lie in one group: ``block_kw * E <= group`` (E = word_bits / bits elements per
    word); a ``dot`` needs K = ``block_kw`` >= 16, so 2-bit groups of 128 use byte words there.
    ``block_kw > 0`` fixes it (interleaved prepacked weights).
    """
    sms = _num_sms(device)

    def kw_of(wb: int) -> int:
        return triton.cdiv(p.k * p.bits, wb)

    def max_kw(wb: int) -> int:
        return p.group // (wb // p.bits) if p.group else 1 << 30

    fma, dot = [], []
    for wb in sorted(word_bits, reverse=True):
        # fma: 64 bytes of one column per K step
        bkw = min(_pow2_floor(max_kw(wb)), 64 * 8 // wb, triton.next_power_of_2(kw_of(wb)))
        bkw = block_kw or bkw
        bm = min(triton.next_power_of_2(p.m), 4)
        for bn in (64, 32):  # 16 never won on the H200 (16384^2 sweep)
            split = _split_for(p.n, kw_of(wb), bn, bkw, sms, 4)
            fma.append(WA16Config("fma", wb, bm, bn, bkw, split, 4, 3))
        bkw = block_kw or min(_pow2_floor(max_kw(wb)), 64 * 8 // wb)
        if bkw < 16:
            continue
        bm = 16 if p.m <= 16 else (32 if p.m <= 32 else 64)
        for bn in (128, 64):  # 128 won every 16384^2 case on the H200
            split = _split_for(p.n, kw_of(wb), bn, bkw, sms, 2) if p.m <= 64 else 1
            dot.append(WA16Config("dot", wb, bm, bn, bkw, split, 4, 3))
    fma += [replace(c, prefetch=True) for c in fma[:2]]
    # the same tiles without the fp32 -> fp16 conversions (after the heuristic default,
    # which stays the first candidate: untuned runs keep the path timed so far)
    half = [replace(c, half_magic=True) for c in dot] if p.fp16_zero else []
    if p.m <= 4 or not dot:
        return fma + dot[:3] + half[:3]
    return dot + half + (fma[:2] if p.m <= 8 else [])


def _launch_wa16(x, views, scale, zero, y, p: _WA16Problem, cfg: WA16Config, ilv: bool):
    """Run one configuration; ``views[word_bits] = (words, stride_wn, stride_wk, kw)``."""
    words, stride_wn, stride_wk, kw = views[cfg.word_bits]
    m, n = p.m, p.n
    epw = cfg.word_bits // p.bits
    wps = triton.cdiv(triton.cdiv(kw, cfg.split_k), cfg.block_kw) * cfg.block_kw
    split = triton.cdiv(kw, wps)
    out = y if split == 1 else torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    kernel = _wa16_fma_kernel if cfg.kernel == "fma" else _wa16_dot_kernel
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
    kernel[grid](
        x,
        words,
        scale,
        zero,
        out,
        m,
        n,
        p.k,
        kw,
        wps,
        x.stride(0),
        stride_wn,
        stride_wk,
        scale.stride(0),
        scale.stride(1) if scale.dim() == 2 else 0,
        out.stride(0) if split > 1 else 0,
        out.stride(-2),
        BITS=p.bits,
        EPW=epw,
        GROUP=p.group,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_KW=cfg.block_kw,
        I0=min(23 // p.bits, epw),
        EVEN_K=kw % cfg.block_kw == 0 and p.k == kw * epw,
        ILV=ilv,
        **({"PREFETCH": cfg.prefetch} if cfg.kernel == "fma" else {"HALF_MAGIC": cfg.half_magic}),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split > 1:
        block = 1024
        _splitk_sum_kernel[(triton.cdiv(m * n, block),)](out, y, m * n, SPLIT=split, BLOCK=block)
    return y


def linear_wa16_triton(
    x: torch.Tensor,
    w_packed: torch.Tensor | WA16Packed,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group: int,
    *,
    config: WA16Config | None = None,
) -> torch.Tensor:
    """Weight-only low-bit linear ``y = x @ ((w_code - zero) * scale)^T`` (fp32 accumulation).

    ``x`` fp16/bf16 ``[M, K]``; ``w_packed`` uint8 ``[N, ceil(K*bits/8)]`` in the contract's
    layout (module docstring) or a :class:`WA16Packed`; ``scale``/``zero`` (fp16, bf16 or fp32,
    one dtype) ``[N]`` when ``group == 0`` (per output channel) or ``[N, ceil(K/group)]`` with
    ``group`` a power of two >= 16 (the last group may be partial); ``bits`` 2 or 4. Returns
    ``[M, N]`` in x's dtype (the fp32 result rounded to nearest even once). ``config`` forces
    one launch configuration (benchmarks); by default a shape's candidates are timed once on a
    GPU and the fastest is kept (:func:`pick_config`).
    """
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"linear_wa16: x must be fp16/bf16 [M, K], got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    if isinstance(w_packed, WA16Packed):
        if w_packed.bits != bits or w_packed.k != k:
            raise ValueError(
                f"linear_wa16: prepacked weights are {w_packed.bits}-bit with K={w_packed.k}, "
                f"called with bits={bits}, K={k}"
            )
        wds = w_packed.words
        views = {w_packed.word_bits: (wds, wds.stride(1), wds.stride(0), wds.shape[0])}
        n = w_packed.n
        fixed_kw = w_packed.block_kw
    else:
        _check_wa16_packed(w_packed, bits, k)
        views = {
            b: (v, v.stride(0), v.stride(1), v.shape[1]) for b, v in _word_views(w_packed).items()
        }
        n = w_packed.shape[0]
        fixed_kw = 0
    if (
        isinstance(group, bool)
        or not isinstance(group, int)
        or group < 0
        or (group and (group < 16 or group & (group - 1)))
    ):
        raise ValueError(f"linear_wa16: group must be 0 or a power of two >= 16, got {group!r}")
    want = (n,) if group == 0 else (n, triton.cdiv(k, group))
    if tuple(scale.shape) != want or tuple(zero.shape) != want or scale.dtype != zero.dtype:
        raise ValueError(
            f"linear_wa16: scale and zero must both be {list(want)} of one dtype for group="
            f"{group}, got {tuple(scale.shape)} {scale.dtype} and {tuple(zero.shape)} {zero.dtype}"
        )
    x = x.contiguous()
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    p = _WA16Problem(m, n, k, bits, group, x.dtype == zero.dtype == torch.float16)

    if fixed_kw and group and group % (fixed_kw * (w_packed.word_bits // bits)):
        raise ValueError(
            f"linear_wa16: weights interleaved in tiles of {fixed_kw} words "
            f"({fixed_kw * (w_packed.word_bits // bits)} inputs) do not divide group {group}"
        )

    def launch(cfg):
        return _launch_wa16(x, views, scale, zero, y, p, cfg, bool(fixed_kw))

    if config is None:
        key = (
            "wa16",
            triton.next_power_of_2(m),
            n,
            k,
            bits,
            group,
            tuple(sorted(views)),
            isinstance(w_packed, WA16Packed),
            x.dtype,
            zero.dtype,
            str(x.device),
        )
        config = pick_config(
            key + (fixed_kw,),
            lambda: wa16_candidates(p, tuple(views), x.device, fixed_kw),
            launch,
        )
    elif config.half_magic and (config.kernel != "dot" or not p.fp16_zero):
        raise ValueError(
            f"linear_wa16: half_magic is a dot-kernel option for fp16 x and fp16 zero points; "
            f"got kernel {config.kernel!r}, x {x.dtype}, zero {zero.dtype}"
        )
    elif config.word_bits not in views or (fixed_kw and config.block_kw != fixed_kw):
        raise ValueError(
            f"linear_wa16: config reads {config.word_bits}-bit words in steps of "
            f"{config.block_kw}; the weights offer {sorted(views)}-bit words"
            + (f" interleaved in tiles of {fixed_kw}" if fixed_kw else "")
        )
    return launch(config)


# ---------------------------------------------------------------------------------------------
# qlinear: uint8 activation codes x int8 weight offsets -> int32 -> fused requantisation


@triton.jit
def _requant_epilogue(acc, scale, bias, res, ACT: tl.constexpr, HAS_RES: tl.constexpr):
    """y = float32(acc) * scale + bias (+ res), then ReLU/ReLU6; two roundings, never an FMA."""
    y = acc.to(tl.float32) * scale[None, :]
    y = y + bias[None, :]
    if HAS_RES:
        y = y + res
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:
        y = tl.minimum(tl.maximum(y, 0.0), 6.0)
    return y


@triton.jit
def _to_codes(y, out_scale, out_zp, OUT_BITS: tl.constexpr):
    """uint8 clamp(round_half_even(y / out_scale) + out_zp, 0, 2^OUT_BITS - 1), IEEE division."""
    t = tl.math.div_rn(y, out_scale)
    t = tl.minimum(tl.maximum(t, -_RNE_LIMIT), _RNE_LIMIT)
    t = (t + _RNE_MAGIC) - _RNE_MAGIC
    t = t + out_zp
    t = tl.minimum(tl.maximum(t, 0.0), (1 << OUT_BITS) - 1.0)
    return t.to(tl.uint8)


@triton.jit
def _qmm_kernel(
    x_ptr,
    w_ptr,
    wsum_ptr,
    scale_ptr,
    bias_ptr,
    res_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_ym,
    x_zp,
    out_scale,
    out_zp,
    X_XOR: tl.constexpr,
    W16: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RES: tl.constexpr,
    OUT_BITS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """acc = sum_k (x - x_zp) * w exactly in int32 with int8 ``tl.dot``, then requantise.

    Every int8 ``tl.dot`` passes ``out_dtype=tl.int32``: Triton 3.6 defaults ``out_dtype`` to
    float32 and rejects an int32 accumulator otherwise (3.9 infers it; seen on the H200).

    ``X_XOR``: x is uint8 (any code 0..255) and enters the dot as x - 128 = bits(x ^ 0x80) as
    int8; else x is read through an int8 view (valid when every code is < 128, a_bits <= 7).
    With BC = 128 or 0 the offset used, sum (x - BC) w + (BC - x_zp) * wsum = sum (x - x_zp) w.
    ``W16``: int16 weights w = 256 * hi + lo' + 128 with hi = w >> 8 and lo' = (w & 255) - 128
    both int8, so acc = 256 * dot(x, hi) + dot(x, lo') + 128 * rowsum(x), exact modulo 2**32.
    Reads M*K + N*K bytes (+ residual), writes M*N codes or floats.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M  # wrapped rows/cols are computed and never stored: no load masks needed
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    b_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None]
    A_NEUTRAL: tl.constexpr = 128 if X_XOR else 0  # loads as 0 after the offset
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    if W16:
        acc_hi = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        asum = tl.zeros((BLOCK_M,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=A_NEUTRAL)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0)
        if X_XOR:
            a = (a ^ 0x80).to(tl.int8, bitcast=True)
        if W16:
            b_hi = (b >> 8).to(tl.int8)
            b_lo = ((b & 255) - 128).to(tl.int8)
            acc_hi = tl.dot(a, b_hi, acc_hi, out_dtype=tl.int32)
            acc = tl.dot(a, b_lo, acc, out_dtype=tl.int32)
            asum += tl.sum(a.to(tl.int32), axis=1)
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if W16:
        acc = acc_hi * 256 + acc + asum[:, None] * 128
    BC: tl.constexpr = 128 if X_XOR else 0
    wsum = tl.load(wsum_ptr + cols)
    acc = acc + (BC - x_zp) * wsum[None, :]
    scale = tl.load(scale_ptr + cols)
    bias = tl.load(bias_ptr + cols)
    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    res = 0.0
    if HAS_RES:
        res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=ok, other=0.0)
    y = _requant_epilogue(acc, scale, bias, res, ACT, HAS_RES)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if OUT_BITS == 0:
        tl.store(y_ptrs, y, mask=ok)
    else:
        tl.store(y_ptrs, _to_codes(y, out_scale, out_zp, OUT_BITS), mask=ok)


@dataclass(frozen=True)
class QLinearPacked:
    """``w`` int8/int16 ``[O, K]`` contiguous, its row sums ``wsum`` int32 ``[O]``, and whether
    activations are promised below 128 (``a_bits <= 7``: the int8-view fast path)."""

    w: torch.Tensor
    wsum: torch.Tensor
    x_below_128: bool = False


def qlinear_prepack_triton(w: torch.Tensor, a_bits: int = 8) -> QLinearPacked:
    """Once per layer: contiguous weights and their row sums (the zero-point correction).

    ``a_bits <= 7`` promises activation codes below 128 (the caller's quantizer guarantees it);
    the kernel then reads x through an int8 view with no per-element work. Default 8: any code.
    """
    if w.dtype not in (torch.int8, torch.int16) or w.dim() != 2:
        raise ValueError(f"qlinear_prepack_triton: w must be int8/int16 [O, K], got {w.dtype}")
    w = w.contiguous()
    return QLinearPacked(w, w.sum(dim=1, dtype=torch.int32), a_bits <= 7)


@dataclass(frozen=True)
class QMMConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


def qmm_candidates(m: int, n: int, k: int, w16: bool) -> list[QMMConfig]:
    if interpret_mode():
        return [QMMConfig(16, 16, 32, 4, 1)]
    bk = 128 if k >= 128 else max(32, triton.next_power_of_2(k))
    if m <= 64:
        return [QMMConfig(64, 64, bk, 4, 4), QMMConfig(64, 128, bk, 4, 4)]
    cands = [
        QMMConfig(128, 128, bk, 8, 4),
        QMMConfig(128, 256, bk, 8, 3),
        QMMConfig(256, 128, bk, 8, 3),
        QMMConfig(128, 64, bk, 4, 4),
    ]
    if w16:
        cands = [replace(c, num_stages=3) for c in cands[:2]] + [QMMConfig(64, 128, 64, 4, 3)]
    return cands


def run_qmm(
    x: torch.Tensor,
    x_zp: int,
    w: torch.Tensor,
    wsum: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    act: int,
    residual: torch.Tensor | None,
    out_scale: float,
    out_zp: int,
    out_bits: int,
    *,
    x_below_128: bool,
    config: QMMConfig | None = None,
    tune_key: tuple = (),
) -> torch.Tensor:
    """Launch :func:`_qmm_kernel` on x uint8 ``[M, K]`` (row stride any, K contiguous) and
    w int8/int16 ``[N, K]``; shared by :func:`qlinear_triton` and the 1x1-conv path."""
    m, k = x.shape
    n = w.shape[0]
    dtype = torch.float32 if out_bits == 0 else torch.uint8
    y = torch.empty((m, n), device=x.device, dtype=dtype)
    if m == 0 or n == 0:
        return y
    fast = x_below_128 and x_zp < 128
    xv = x.view(torch.int8) if fast else x
    res = residual if residual is not None else y
    if residual is not None and residual.stride(1) != 1:
        res = residual.contiguous()
    w16 = w.dtype == torch.int16

    def launch(cfg: QMMConfig):
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        _qmm_kernel[grid](
            xv,
            w,
            wsum,
            scale,
            bias,
            res,
            y,
            m,
            n,
            k,
            x.stride(0),
            w.stride(0),
            res.stride(0),
            y.stride(0),
            x_zp,
            float(out_scale),
            out_zp,
            X_XOR=not fast,
            W16=w16,
            ACT=act,
            HAS_RES=residual is not None,
            OUT_BITS=out_bits,
            EVEN_K=k % cfg.block_k == 0,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            enable_fp_fusion=False,
        )
        return y

    if config is None:
        key = (
            "qmm",
            triton.next_power_of_2(m),
            n,
            k,
            fast,
            w16,
            out_bits,
            act,
            residual is not None,
            str(x.device),
        ) + tuple(tune_key)
        config = pick_config(key, lambda: qmm_candidates(m, n, k, w16), launch)
    return launch(config)


def dequantize_residual(
    residual: torch.Tensor | None, res_scale: float, res_zp: int
) -> torch.Tensor | None:
    """uint8 residual codes -> float32 ``(float32(code) - res_zp) * res_scale`` (separate
    rounding steps, as ``pdquant_fast.ops.reference.dequantize_residual``); anything else as is."""
    if residual is None or residual.dtype != torch.uint8:
        return residual
    zp = torch.tensor(float(res_zp), dtype=torch.float32, device=residual.device)
    s = torch.tensor(float(res_scale), dtype=torch.float32, device=residual.device)
    return (residual.to(torch.float32) - zp) * s


def qlinear_triton(
    x: torch.Tensor,
    x_zp: int,
    w: torch.Tensor | QLinearPacked,
    scale: torch.Tensor,
    bias: torch.Tensor,
    act: int,
    residual: torch.Tensor | None,
    out_scale: float,
    out_zp: int,
    out_bits: int,
    res_scale: float = 0.0,
    res_zp: int = 0,
    *,
    config: QMMConfig | None = None,
) -> torch.Tensor:
    """``pdquant::qlinear`` on GPU: see :func:`pdquant_fast.ops.reference.qlinear_reference`.

    ``x`` uint8 codes ``[N, K]``; ``w`` int8/int16 offsets ``[O, K]`` or a
    :class:`QLinearPacked` from :func:`qlinear_prepack_triton`; ``scale``/``bias`` float32
    ``[O]``; ``residual`` ``[N, O]``: None, float32, or uint8 codes (dequantized to float32 by
    :func:`dequantize_residual` before the launch: the kernel reads float32). Returns float32
    (``out_bits == 0``) or
    uint8 codes ``[N, O]``, bit-exact with the reference (int32 acc exact; requant in float32
    with the reference's operation order, IEEE division, round half to even).
    """
    if isinstance(w, QLinearPacked):
        pk = w
    else:
        pk = qlinear_prepack_triton(w)
    if x.dim() != 2 or x.dtype != torch.uint8 or pk.w.shape[1] != x.shape[1]:
        raise ValueError(
            f"qlinear_triton: x must be uint8 [N, K] with K = {pk.w.shape[1]}, got {x.dtype} "
            f"{tuple(x.shape)}"
        )
    if x.stride(-1) != 1:
        x = x.contiguous()
    residual = dequantize_residual(residual, res_scale, res_zp)
    return run_qmm(
        x,
        x_zp,
        pk.w,
        pk.wsum,
        scale.contiguous(),
        bias.contiguous(),
        act,
        residual,
        out_scale,
        out_zp,
        out_bits,
        x_below_128=pk.x_below_128,
        config=config,
    )
