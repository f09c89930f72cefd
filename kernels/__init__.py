"""Triton kernels for pdquant_fast.

This top-level folder is installed as the subpackage ``pdquant_fast.kernels`` (setup.py maps it
with ``package_dir``); it is never importable as a top-level ``kernels`` package, because a PyPI
project of that name exists. Import it as ``pdquant_fast.kernels``.

Triton is optional (the ``triton`` extra): this package and every module in it must import on a
machine without Triton, without a GPU and without initialising CUDA. Do not import ``triton`` at
module level here; kernel modules import it themselves, and the dispatch layer imports those
modules only after checking that Triton is available. Kernel names follow ``<op>_triton``.

The ``<op>_triton`` names below are resolved lazily (module ``__getattr__``): importing this
package imports no kernel module and no Triton; the first attribute access imports the module
that defines it (and Triton with it).
"""

from __future__ import annotations

import importlib

#: ``<op>_triton`` -> the submodule that defines it.
_KERNELS = {
    "fake_quant_act_triton": "fake_quant",
    "fake_quant_act_backward_triton": "fake_quant",
    "adaround_soft_triton": "adaround",
    "adaround_soft_backward_triton": "adaround",
    "adaround_hard_triton": "adaround",
    "mse_search_2d_triton": "mse_search",
    "linear_wa16_triton": "deploy_linear",
    "linear_wa16_prepack": "deploy_linear",
    "qlinear_triton": "deploy_linear",
    "qlinear_prepack_triton": "deploy_linear",
    "qconv2d_triton": "deploy_conv",
    "qconv2d_prepack_triton": "deploy_conv",
}

__all__ = sorted(_KERNELS)


def __getattr__(name: str):
    module = _KERNELS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    fn = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = fn  # cache: later look-ups skip __getattr__
    return fn


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_KERNELS))
