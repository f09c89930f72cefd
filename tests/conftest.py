"""Shared test fixtures: location of the real data folder, and the ``slow`` marker."""

import os
from pathlib import Path

import pytest

# Triton kernels run under the interpreter (numpy, on CPU) where no CUDA device is present. Set
# before any test module imports a kernel: triton.jit picks interpreter or compiler at decoration.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():  # does not initialise torch's CUDA state
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~10 s on a 2-core CPU")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository, or ``$PDQUANT_SHARED_DATA``; skip if absent."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    root = Path(os.environ.get("PDQUANT_SHARED_DATA", default))
    if not root.is_dir():
        pytest.skip(f"real test data not found at {root} (set PDQUANT_SHARED_DATA to its folder)")
    return root
