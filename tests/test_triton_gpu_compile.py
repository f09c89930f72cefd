"""Every Triton kernel launch of the library compiles for an NVIDIA Hopper GPU (sm_90), checked
on a machine without a GPU (``tests/_triton_gpu_compile.py``: Triton's real compiler down to a
cubin, with a driver that launches nothing).

The interpreter tests check values but not the compiled front end's rules; the first H200 run
failed on one of those (an int8 ``tl.dot`` with K = 16 in the 16-channel convolutions). This
check compiles every candidate configuration the GPU would time, for the shapes of each code
path, so such a failure shows up in CI. It runs in a subprocess because ``TRITON_INTERPRET``,
which the other Triton tests set, is read when the kernels are imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "_triton_gpu_compile.py"


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _nvidia_backend_available(), reason="Triton without its NVIDIA backend"
)


def _run(*which: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *which],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=HERE.parent,
        env=env,
    )


def test_harness_catches_the_dot_that_failed_on_the_h200():
    out = _run("selftest", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_every_kernel_compiles_for_sm90():
    """Each deployment code path (stem, 16-channel and channel-blocked convs, 1x1 float output,
    depthwise, grouped; int8 GEMM with int8/int16 weights; weight-only linear, 4 and 2 bits,
    plain and interleaved) with every candidate configuration, and every calibration kernel
    (fake-quant forward/backward per tensor and per channel with each QDrop mode, AdaRound
    soft/backward/hard, the MSE search): about 70 compiles, 41 s on the 2-core CI machine."""
    out = _run("deploy", "calib", timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert " 0 failed" in out.stdout


@pytest.mark.slow
def test_every_deploy_case_compiles_for_sm90_full():
    """Every case of the harness (about 250 compiles: each conv in four input variants, more
    GEMM and weight-only shapes and layouts)."""
    out = _run("deploy-full", timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
