"""pdquant-fast: PD-Quant post-training quantization (2/4-bit) with fast kernels.

``quantize(model, calib, method="pdquant", w_bits=2, a_bits=4)`` is the one-call API; see
:mod:`pdquant_fast.api`. Importing this package never initialises CUDA and never needs the
compiled extension, Triton or a GPU.
"""

from ._version import __version__

__all__ = ["__version__", "quantize", "make_config", "evaluate"]


def __getattr__(name):  # lazy: keep `import pdquant_fast` light
    if name == "quantize":
        from .api import quantize

        return quantize
    if name == "make_config":
        from .config import make_config

        return make_config
    if name == "evaluate":
        from .engine import evaluate

        return evaluate
    raise AttributeError(f"module 'pdquant_fast' has no attribute {name!r}")
