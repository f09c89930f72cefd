"""Allocator settings of the packed runtime (pdquant_fast/deploy/memory.py): freed feature maps
stay in the process, so a second forward does not fault its pages in again."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from pdquant_fast.deploy import DeployError, load_packed, memory

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc mallopt only")

# A forward-like chain of multi-MB tensors (PyTorch's allocator on huge pages, as the CLI and the
# benchmarks run it); prints the minor page faults per chain after three warm-up chains.
_CHAIN = textwrap.dedent(
    """
    import os, resource, sys
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    import torch
    if sys.argv[1] == "1":
        from pdquant_fast.deploy import memory
        assert memory.tune_malloc()["applied"], memory.malloc_state()
    def chain():
        a = torch.empty(4 << 20, dtype=torch.uint8).fill_(1)
        for _ in range(6):
            b = torch.empty(4 << 20, dtype=torch.uint8)
            b.copy_(a)
            a = b
        c = torch.empty(3 << 20, dtype=torch.int32).fill_(2)
        return int(a[0]) + int(c[0])
    for _ in range(3):
        chain()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        chain()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 10)
    """
)


def _faults_per_chain(tuned: bool) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _CHAIN, "1" if tuned else "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_tuned_malloc_reuses_freed_feature_maps():
    """With the settings, a repeated chain of 4-12 MB tensors takes (almost) no page faults;
    glibc's defaults fault hundreds of 4 KB pages per chain on this project's machines."""
    tuned = _faults_per_chain(True)
    default = _faults_per_chain(False)
    assert tuned <= 2, f"{tuned} minor faults per chain with tune_malloc (default: {default})"


def test_tune_malloc_setting(monkeypatch):
    monkeypatch.delenv(memory.ENV, raising=False)
    assert memory.tune_malloc_enabled() is True
    monkeypatch.setenv(memory.ENV, "0")
    assert memory.tune_malloc_enabled() is False
    assert memory.tune_malloc_enabled(True) is True
    monkeypatch.setenv(memory.ENV, "yes")
    with pytest.raises(ValueError, match=r"PDQUANT_TUNE_MALLOC='yes': use 1 .* or 0"):
        memory.tune_malloc_enabled()
    with pytest.raises(ValueError, match="tune_malloc must be True, False or None"):
        memory.tune_malloc_enabled("on")


def test_load_packed_bad_setting_is_a_deploy_error(monkeypatch, tmp_path):
    monkeypatch.setenv(memory.ENV, "2")
    with pytest.raises(DeployError, match="PDQUANT_TUNE_MALLOC='2'"):
        load_packed(tmp_path)


def test_load_packed_applies_it_unless_told_not_to(monkeypatch, tmp_path):
    """load_packed calls tune_malloc for a CPU model by default, not with tune_malloc=False."""
    from pdquant_fast.deploy import load as load_mod

    calls = []
    monkeypatch.setattr(load_mod.memory, "tune_malloc", lambda: calls.append(1) or {})
    monkeypatch.setattr(load_mod, "read_manifest", lambda folder: {})
    monkeypatch.setattr(load_mod, "read_tensors", lambda folder, m: {})
    monkeypatch.setattr(load_mod, "_check_layers", lambda *a: None)
    monkeypatch.setattr(load_mod, "_check_graph", lambda *a: None)

    class Dummy:
        def __init__(self, *a, **k):
            pass

        def to(self, device):
            return self

        def eval(self):
            return self

    monkeypatch.setattr(load_mod, "PackedModel", Dummy)
    monkeypatch.delenv(memory.ENV, raising=False)
    load_packed(tmp_path)
    assert calls == [1]
    load_packed(tmp_path, tune_malloc=False)
    monkeypatch.setenv(memory.ENV, "0")
    load_packed(tmp_path)
    assert calls == [1]
