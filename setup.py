"""Build script: packages, kernels/ mapped to ``pdquant_fast.kernels``, and ``pdquant_fast._C``.

Metadata (name, version, dependencies) lives in pyproject.toml; this file holds what needs logic.

Install with

    pip install --no-build-isolation -e ".[test,dev]"

``--no-build-isolation`` is required for the extension: with build isolation pip would build in a
fresh environment and install a new torch there (a multi-GB CUDA build, which the cap in
pyproject.toml cannot prevent), and the extension would be compiled against a torch other than
the one it is loaded beside. Without it, setup.py builds against the torch already installed.

What is built (one line is printed saying what and why):

* ``pdquant_fast._C``, a ``CppExtension`` from ``csrc/**/*.cpp`` (except ``csrc/cuda/``), with
  ``-O3 -fopenmp``, compiled with ninja (``MAX_JOBS`` caps ninja's parallel jobs);
* it becomes a ``CUDAExtension`` that also compiles ``csrc/cuda/**/*.cu`` (and the torch glue in
  ``csrc/cuda/**/*.cpp``) when torch is a CUDA build (``torch.version.cuda``) and a CUDA toolkit
  is found (``CUDA_HOME``), for the architectures in ``TORCH_CUDA_ARCH_LIST``. Whether a GPU is
  present is irrelevant (``torch.cuda.is_available()`` is never consulted): wheels are built on
  machines without one. The macro ``PDQUANT_WITH_CUDA`` is defined in that case.

Environment switches:

* ``PDQUANT_BUILD_EXT=0``: pure-Python install, nothing compiled, torch not even imported.
* ``PDQUANT_BUILD_CUDA=1``: build the CUDA part even where the checks above say no (fails loudly
  if no toolkit is found); ``PDQUANT_BUILD_CUDA=0``: never build it.

No sources under ``csrc/`` gives a pure-Python install. The package works either way: every op has
a plain-PyTorch reference registered for every device.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CUDA_DIR = CSRC / "cuda"
EXT_NAME = "pdquant_fast._C"


def _env_switch(name: str) -> bool | None:
    """Read a 0/1 environment switch: True, False, or None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"setup.py: {name}={value!r} is not understood; use 0 or 1")


def _sources(pattern: str, *, exclude: Path | None = None, under: Path = CSRC) -> list[str]:
    """Sources matching ``pattern`` under ``under``, sorted, as paths relative to the project."""
    found = []
    for path in sorted(under.glob(pattern)):
        if exclude is not None and path.is_relative_to(exclude):
            continue
        found.append(path.relative_to(ROOT).as_posix())
    return found


def _packages() -> tuple[list[str], dict[str, str]]:
    """The pdquant_fast packages, plus kernels/ installed as pdquant_fast.kernels."""
    packages = find_packages(where=str(ROOT), include=["pdquant_fast", "pdquant_fast.*"])
    kernel_subpackages = find_packages(where=str(ROOT / "kernels"))
    packages += ["pdquant_fast.kernels"] + [f"pdquant_fast.kernels.{p}" for p in kernel_subpackages]
    # Only the mapping for pdquant_fast.kernels: `kernels` itself is never a top-level package
    # (a PyPI project of that name exists).
    return packages, {"pdquant_fast.kernels": "kernels"}


def _decide_cuda(cuda_sources: list[str]) -> tuple[bool, str]:
    """Whether to build the CUDA part of the extension, and the reason, in words."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    forced = _env_switch("PDQUANT_BUILD_CUDA")
    if forced is False:
        return False, "PDQUANT_BUILD_CUDA=0"
    if not cuda_sources:
        return False, "no sources in csrc/cuda/"
    if forced:
        if CUDA_HOME is None:
            raise SystemExit(
                "setup.py: PDQUANT_BUILD_CUDA=1 but no CUDA toolkit was found "
                f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda}); "
                "set CUDA_HOME to the toolkit and use a CUDA build of torch"
            )
        return True, "forced by PDQUANT_BUILD_CUDA=1"
    if not torch.version.cuda:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"torch CUDA {torch.version.cuda}, toolkit at {CUDA_HOME}"


def _extensions() -> tuple[list, dict, str]:
    """(ext_modules, cmdclass, one-line summary) for this machine and environment."""
    if _env_switch("PDQUANT_BUILD_EXT") is False:
        return [], {}, "pure-Python install: PDQUANT_BUILD_EXT=0, no extension built"

    cpp_sources = _sources("**/*.cpp", exclude=CUDA_DIR)
    cuda_sources = _sources("**/*.cu", under=CUDA_DIR)
    if not cpp_sources and not cuda_sources:
        return [], {}, "pure-Python install: no C++/CUDA sources in csrc/, no extension built"

    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            "setup.py: building pdquant_fast._C needs torch in the build environment. Install "
            'torch first, then `pip install --no-build-isolation -e ".[test]"`; or set '
            f"PDQUANT_BUILD_EXT=0 for a pure-Python install. ({exc})"
        ) from exc
    from torch.utils.cpp_extension import (
        BuildExtension,
        CppExtension,
        CUDAExtension,
        is_ninja_available,
    )

    with_cuda, cuda_reason = _decide_cuda(cuda_sources)
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # Apple clang has no -fopenmp
    cxx_flags = ["-O3", *openmp]
    common = {
        "name": EXT_NAME,
        "include_dirs": [str(CSRC)],
        "extra_link_args": list(openmp),
    }
    if with_cuda:
        sources = cpp_sources + cuda_sources + _sources("**/*.cpp", under=CUDA_DIR)
        extension = CUDAExtension(
            sources=sources,
            define_macros=[("PDQUANT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            **common,
        )
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "torch default")
        what = f"C++ + CUDA ({len(sources)} sources; arch {arch}; {cuda_reason})"
    elif cpp_sources:
        sources = cpp_sources
        extension = CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)
        what = f"C++ ({len(sources)} sources); CUDA skipped: {cuda_reason}"
    else:
        return [], {}, f"pure-Python install: no C++ sources in csrc/, CUDA skipped: {cuda_reason}"

    ninja = "ninja" if is_ninja_available() else "NO ninja found: slow serial build"
    jobs = os.environ.get("MAX_JOBS", "default")
    summary = f"building {EXT_NAME}: {what}; {ninja}, MAX_JOBS={jobs}"
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    return [extension], cmdclass, summary


packages, package_dir = _packages()
ext_modules, cmdclass, summary = _extensions()
print(f"pdquant_fast setup: {summary}", file=sys.stderr)

setup(
    packages=packages,
    package_dir=package_dir,
    # Data files shipped inside the package (tables, configs); `**` reaches non-package folders.
    package_data={"pdquant_fast": ["**/*.txt", "**/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
