"""Compile every Triton kernel launch of the library for an NVIDIA Hopper GPU (sm_90), on a
machine without one. Run as a script by ``tests/test_triton_gpu_compile.py`` (a fresh process:
``TRITON_INTERPRET`` must be unset before the kernels are imported, since ``triton.jit`` decides
at decoration time).

How: Triton's driver is replaced by one that names the target ``cuda``/sm_90 and launches
nothing, and ``JITFunction.run`` compiles without launching (``warmup=True``): the whole
compile pipeline runs (Triton front end, TTIR/TTGIR/LLVM passes, PTX, ``ptxas`` to a cubin), so
every error the GPU would raise at compile time is raised here. ``pick_config`` is replaced by
one that compiles *every* candidate configuration, not only the one a GPU would pick, and
records each failure (the real one skips a candidate that fails and raises only if all do).
Outputs are never computed: nothing here checks values (the interpreter tests and the GPU tests
do that).

What the interpreter cannot see and this does: Triton's shape rules for tensor-core dots (an
int8 ``tl.dot`` with K < 32 compiled under the interpreter and failed on the H200), type rules
of the compiled front end, and ptxas errors. What it cannot see either: shared-memory or register
limits at load time, and anything about speed or values.

Usage: ``python tests/_triton_gpu_compile.py [deploy|deploy-full] [calib]`` (default: deploy
calib), or ``selftest`` (exit 0 only if a known-bad launch fails to compile). ``deploy`` is a
subset of the deployment launches (each code path and the shapes that failed on a GPU before);
``deploy-full`` every case here (about 250 compiles, minutes). Prints a summary and exits with
status 1 listing the failures.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ["PDQUANT_TRITON_TUNE"] = "1"  # pick_config is replaced below anyway

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
TARGET = GPUTarget("cuda", 90, 32)


class CompileOnlyDriver:
    """Triton's active driver, minus the GPU: target sm_90, device 0, stream 0."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def is_active(self):
        return True


COMPILED: list[str] = []
FAILED: list[str] = []
_orig_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    t0 = time.perf_counter()
    kernel = _orig_run(self, *args, grid=grid, warmup=True, **kwargs)
    COMPILED.append(f"{self.fn.__name__} ({time.perf_counter() - t0:.2f} s)")
    return kernel


def _every_candidate(key, candidates, launch, **_):
    """Compile each candidate; keep going past failures (recorded); return the first."""
    cands = candidates() if callable(candidates) else list(candidates)
    for cfg in cands:
        try:
            launch(cfg)
        except Exception as exc:  # noqa: BLE001
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
            FAILED.append(f"{key[0]} {key[1:]} {cfg}: {type(exc).__name__}: {last[:300]}")
    return cands[0]


def case(name, fn, *args):
    """Run ``fn(*args)`` (compiling its launches); record a failure under ``name``."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001
        FAILED.append(f"{name}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
        traceback.print_exc(limit=4)


def deploy_cases(full: bool):
    from _deploy_cases import q_inputs, wa16_inputs

    from pdquant_fast.kernels import deploy_conv as dc
    from pdquant_fast.kernels import deploy_linear as dl

    for mod in (dl, dc):
        mod.interpret_mode = lambda: False
    dl.pick_config = _every_candidate
    dc.pick_config = _every_candidate

    # conv: (nb, c, h, w, o, k, stride, pad, groups, w dtype, a_bits, out_bits, act, residual)
    convs = [
        (2, 3, 16, 16, 16, 3, 1, 1, 1, torch.int16, 8, 4, 1, False),  # 8-bit stem, 3 channels
        (2, 3, 32, 32, 64, 7, 2, 3, 1, torch.int16, 8, 4, 1, False),  # ResNet-18 stem
        (2, 16, 8, 8, 16, 3, 1, 1, 1, torch.int8, 4, 4, 1, True),  # 16 ch: the H200 failure
        (2, 16, 8, 8, 32, 3, 2, 1, 1, torch.int8, 4, 4, 1, False),
        (2, 32, 8, 8, 32, 3, 1, 1, 1, torch.int8, 4, 4, 1, True),  # channel-blocked K
        (2, 64, 8, 8, 128, 1, 2, 0, 1, torch.int8, 4, 0, 0, False),  # 1x1 downsample, float out
        (1, 256, 4, 4, 256, 3, 1, 1, 1, torch.int8, 2, 2, 1, True),  # block_k 128 candidate
        (1, 32, 8, 8, 32, 3, 1, 1, 32, torch.int8, 4, 4, 2, False),  # depthwise
        (1, 24, 8, 8, 48, 5, 2, 2, 24, torch.int8, 4, 4, 2, False),  # depthwise 5x5, mult. 2
        (1, 64, 8, 8, 64, 3, 1, 1, 2, torch.int8, 4, 4, 1, True),  # grouped, C/g = 32
    ]
    quick = {0, 2, 4, 5, 7, 9}  # stem, 16 ch, blocked K, 1x1 float out, depthwise, grouped
    for i, (nb, c, h, w_, o, k, s, p, g, wdt, a_bits, out_bits, act, res) in enumerate(convs):
        if not full and i not in quick:
            continue
        x = torch.randint(0, 1 << a_bits, (nb, c, h, w_), dtype=torch.uint8)
        lim = 8 if wdt == torch.int8 else 256
        w = torch.randint(-lim, lim, (o, c // g, k, k), dtype=wdt)
        scale, bias = torch.full((o,), 0.01), torch.zeros(o)
        ho, wo = (h + 2 * p - k) // s + 1, (w_ + 2 * p - k) // s + 1
        r = torch.randn(nb, o, ho, wo) if res else None
        tail = (scale, bias, [s, s], [p, p], g, act, r, 0.05 if out_bits else 0.0, 0, out_bits)
        # int8-view (codes < 128) and x ^ 0x80 paths; channels-last and NCHW input
        variants = [(True, True), (True, False), (False, True), (False, False)]
        if not full:
            variants = [(True, True)] if i else [(True, True), (False, False)]
        for fast, cl in variants:
            xx = x.contiguous(memory_format=torch.channels_last) if cl else x
            pk = dc.qconv2d_prepack_triton(w, g, a_bits=a_bits if fast else 8)
            name = f"qconv2d c{c} o{o} k{k} g{g} {wdt} fast={fast} cl={cl}"
            case(name, dc.qconv2d_triton, xx, 3, pk, *tail)

    # int8 GEMM (qlinear): small and large M, int8 and int16 weights, float and code outputs
    qmm = [
        (8, 64, 96, torch.int8, 4, 4),
        (300, 128, 256, torch.int16, 8, 8),
        (300, 128, 256, torch.int8, 4, 0),
        (5, 17, 40, torch.int8, 8, 4),
    ]
    for m, n, k, wdt, a_bits, out_bits in qmm if full else qmm[:2]:
        args = q_inputs(m, n, k, wdt, a_bits, out_bits=out_bits)
        case(f"qlinear {m}x{n}x{k} {wdt}", dl.qlinear_triton, *args)
        if not full:
            continue
        pk = dl.qlinear_prepack_triton(args[2], a_bits=a_bits)
        a2 = (args[0], args[1], pk, *args[3:])
        case(f"qlinear prepacked {m}x{n}x{k}", dl.qlinear_triton, *a2)

    # weight-only linear: bits 4 and 2, per-channel and grouped, plain and prepacked layouts
    wa16 = [
        (m, bits, group)
        for m in (1, 16, 64)
        for bits, group in ((4, 128), (2, 128), (4, 0), (2, 64))
    ]
    for m, bits, group in wa16 if full else [(1, 4, 128), (16, 2, 128)]:
        x, wp, scale, zero = wa16_inputs(m, 256, 512, bits, group)
        name = f"wa16 m{m} w{bits} g{group}"
        case(f"{name} plain", dl.linear_wa16_triton, x, wp, scale, zero, bits, group)
        layouts = ((32, 0), (32, 16 if bits == 4 else 8), (8, 32))
        for word_bits, ilv in layouts if full else layouts[1:2]:
            if group and group % (ilv * (word_bits // bits) if ilv else 1):
                continue
            pk = dl.linear_wa16_prepack(wp, bits, 512, word_bits, ilv)
            name_l = f"{name} words{word_bits} ilv{ilv}"
            case(name_l, dl.linear_wa16_triton, x, pk, scale, zero, bits, group)


def calib_cases():
    from _calib_cases import adaround_inputs, fq_inputs

    from pdquant_fast.kernels import adaround as ka
    from pdquant_fast.kernels import fake_quant as kf
    from pdquant_fast.kernels import mse_search as km

    for per_channel, shape, axis in ((False, (4, 8, 6, 6), -1), (True, (4, 8, 6, 6), 1)):
        for drop in ("none", "seed", "mask"):
            for bits in (2, 4, 8):
                x, d, z, kp, seed, mask = fq_inputs(shape, per_channel, axis, bits, drop)
                name = f"fake_quant pc={per_channel} drop={drop} bits={bits}"
                case(name, kf.fake_quant_act_triton, x, d, z, bits, axis, kp, seed, mask)
                g = torch.randn_like(x)
                fq_bwd = kf.fake_quant_act_backward_triton
                case(f"{name} backward", fq_bwd, g, x, d, z, bits, axis, kp, seed, mask)
    for shape in ((16, 8, 3, 3), (7, 3)):
        for bits in (2, 4, 8):
            w_floor, alpha, delta, zp, beta = adaround_inputs(shape, bits)
            name = f"adaround {shape} bits={bits}"
            case(f"{name} soft", ka.adaround_soft_triton, w_floor, alpha, delta, zp, bits, beta)
            g, g_reg = torch.randn_like(w_floor), torch.tensor(0.5)
            bwd = ka.adaround_soft_backward_triton
            case(f"{name} backward", bwd, g, g_reg, w_floor, alpha, delta, zp, bits, beta)
            case(f"{name} hard", ka.adaround_hard_triton, w_floor, alpha, zp, bits)
    for c, k, bits in ((4, 300, 4), (2, 5000, 8), (3, 64, 2)):
        x = torch.randn(c, k)
        case(f"mse_search {c}x{k} bits={bits}", km.mse_search_2d_triton, x, bits, 100)
        lo, hi = x.amin(dim=1) - 0.1, x.amax(dim=1) + 0.1
        name = f"mse_search bounded {c}x{k} bits={bits}"
        case(name, km.mse_search_2d_triton, x, bits, 100, lo, hi)


def selftest() -> int:
    """The harness must fail on the bug the H200 found: the channel-blocked conv loop with
    block_k = 16 (an int8 dot with K = 16). The launch guard that now rejects it is lowered for
    this one call, so the kernel itself reaches the compiler."""
    from pdquant_fast.kernels import deploy_conv as dc

    x = torch.randint(0, 16, (1, 16, 6, 6), dtype=torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    pk = dc.qconv2d_prepack_triton(torch.randint(-8, 8, (16, 16, 3, 3), dtype=torch.int8), 1, 4)
    tail = (torch.ones(16), torch.zeros(16), [1, 1], [1, 1], 1, 1, None, 0.05, 0, 4)
    dc.DOT_MIN_K = 16
    try:
        dc.qconv2d_triton(x, 3, pk, *tail, config=dc.QConvConfig(64, 64, 16, 4, 4))
    except Exception as exc:  # noqa: BLE001
        print(f"selftest: the K=16 int8 dot failed to compile, as on the H200: {exc}"[:400])
        return 0
    print("selftest: the K=16 int8 dot compiled: this harness would not catch the H200 failure")
    return 1


def main() -> int:
    driver.set_active(CompileOnlyDriver())
    JITFunction.run = _compile_only
    t0 = time.perf_counter()
    which = sys.argv[1:] or ["deploy", "calib"]
    if which == ["selftest"]:
        return selftest()
    if "deploy" in which or "deploy-full" in which:
        deploy_cases(full="deploy-full" in which)
    if "calib" in which:
        calib_cases()
    print(
        f"{len(COMPILED)} kernel compiles for {TARGET} (Triton {triton.__version__}) in "
        f"{time.perf_counter() - t0:.0f} s; {len(FAILED)} failed"
    )
    for f in FAILED:
        print("FAILED:", f)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
