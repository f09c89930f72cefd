"""The install itself: import side effects, the kernels/ mapping, `python -m pdquant_fast.info`.

Checks that depend on ``sys.path`` run in a subprocess started outside the repository, so that
the answer is the installed package's and not the working directory's (``python -m pytest`` puts
the current directory, i.e. the repo root with its top-level ``kernels/`` folder, on ``sys.path``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pdquant_fast
from pdquant_fast import info

REPO = Path(__file__).resolve().parents[1]


def _run_python(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter in ``cwd``, without the repo root on PYTHONPATH."""
    env = dict(os.environ)
    entries = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    kept = [p for p in entries if Path(p).resolve() != REPO]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _require_installed(tmp_path: Path) -> None:
    probe = _run_python("import pdquant_fast", tmp_path)
    if probe.returncode != 0:
        pytest.skip("pdquant_fast is not installed (pip install --no-build-isolation -e .)")


def test_import_does_not_initialise_cuda(tmp_path: Path) -> None:
    result = _run_python(
        """
        import pdquant_fast, torch
        import pdquant_fast.info, pdquant_fast.kernels
        assert not torch.cuda.is_initialized()
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr


def test_top_level_kernels_is_not_ours(tmp_path: Path) -> None:
    """A PyPI project named `kernels` exists: our kernels/ folder must not answer to that name."""
    _require_installed(tmp_path)
    result = _run_python(
        """
        import importlib.util, sys
        from pathlib import Path
        import pdquant_fast.kernels as ours
        ours_dir = Path(ours.__file__).resolve().parent
        spec = importlib.util.find_spec("kernels")
        if spec is None:
            print("absent")
        else:
            places = [spec.origin, *(spec.submodule_search_locations or [])]
            dirs = {Path(p).resolve().parent if p.endswith(".py") else Path(p).resolve()
                    for p in places if p and p != "namespace"}
            assert ours_dir not in dirs, f"`import kernels` resolves to our {ours_dir}"
            print("someone else's:", sorted(map(str, dirs)))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr


def test_kernels_subpackage_imports_without_triton(tmp_path: Path) -> None:
    _require_installed(tmp_path)
    result = _run_python(
        """
        import sys

        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton is blocked in this test")
                return None

        sys.meta_path.insert(0, NoTriton())
        import pdquant_fast.kernels
        assert pdquant_fast.kernels.__name__ == "pdquant_fast.kernels"
        assert "triton" not in sys.modules
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr


def test_kernels_subpackage_is_the_kernels_folder() -> None:
    import pdquant_fast.kernels

    assert pdquant_fast.kernels.__doc__ and "Triton" in pdquant_fast.kernels.__doc__
    if Path(pdquant_fast.__file__).resolve().parent == REPO / "pdquant_fast":  # editable install
        assert Path(pdquant_fast.kernels.__file__).resolve().parent == REPO / "kernels"


def test_info_module_runs_and_prints_torch_version(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pdquant_fast.info"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert torch.__version__ in result.stdout
    assert pdquant_fast.__version__ in result.stdout


def test_info_main_does_not_initialise_cuda(tmp_path: Path) -> None:
    result = _run_python(
        """
        import contextlib, io, json, torch
        from pdquant_fast import info
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert info.main(["--json"]) == 0
        json.loads(out.getvalue())
        assert not torch.cuda.is_initialized()
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr


def test_collect_info_keys_and_json() -> None:
    data = info.collect_info()
    assert {"pdquant_fast", "torch", "python", "platform", "cpu", "numpy"} <= data.keys()
    assert data["torch"] == torch.__version__
    assert data["pdquant_fast"] == pdquant_fast.__version__
    assert set(data["cpu"]["flags"]) == set(info.ISA_FLAGS)
    json.dumps(data)


def test_kernels_table_rows() -> None:
    assert len(info.kernels_table()) == len(info.registered_ops()) * len(info.BACKENDS)
    assert "fake_quant_act" in info.registered_ops()
    rows = info.kernels_table(["fake_quant_act"])
    assert [row.backend for row in rows] == list(info.BACKENDS)
    for row in rows:
        assert dataclasses.is_dataclass(row)
        assert row.op == "fake_quant_act"
        assert isinstance(row.available, bool)
        assert row.reason
    reference = next(row for row in rows if row.backend == "reference")
    assert reference.available
    # a backend that cannot run says why (no CUDA tensors on this machine, or no GPU)
    cuda = next(row for row in rows if row.backend == "cuda")
    assert cuda.available or "CUDA" in cuda.reason or "cuda" in cuda.reason


def test_extension_status_is_consistent() -> None:
    status = info.extension_status()
    assert isinstance(status.available, bool) and status.reason
    cpp = info.backend_status()["cpp"]
    assert cpp.available == status.available
