"""Triton kernels for pdquant_fast.

This top-level folder is installed as the subpackage ``pdquant_fast.kernels`` (setup.py maps it
with ``package_dir``); it is never importable as a top-level ``kernels`` package, because a PyPI
project of that name exists. Import it as ``pdquant_fast.kernels``.

Triton is optional (the ``triton`` extra): this package and every module in it must import on a
machine without Triton, without a GPU and without initialising CUDA. Do not import ``triton`` at
module level here; kernel modules import it themselves, and the dispatch layer imports those
modules only after checking that Triton is available. Kernel names follow ``<op>_triton``.
"""
