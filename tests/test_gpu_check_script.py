"""benchmarks/gpu_check.sh runs only on a lent GPU machine (minutes of device time, rarely): this
checks on any machine that it cannot fail for a reason a CPU can see first. The script parses
(``bash -n``), every Python script it calls exists, and every ``--flag`` it passes is one that
script's argument parser accepts (``--help`` lists it)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _stage_commands() -> list[list[str]]:
    """The argument lists of ``$PY benchmarks/<script>.py ...`` stage commands (continuation
    lines joined)."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    cmds = []
    for line in text.splitlines():
        m = re.search(r"\bstage [\w-]+ \S+ \$PY (benchmarks/\S+\.py)(.*)$", line)
        if m:
            cmds.append([m.group(1), *m.group(2).split()])
    return cmds


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_check_budget_under_ten_minutes():
    stage_limit = r"\bstage [\w-]+ \$\{[A-Z_]+_S:-(\d+)\}"
    limits = [int(v) for v in re.findall(stage_limit, SCRIPT.read_text())]
    assert len(limits) >= 6 and sum(limits) < 600, limits


@pytest.mark.parametrize("cmd", _stage_commands(), ids=lambda c: Path(c[0]).stem)
def test_gpu_check_flags_exist(cmd):
    script = ROOT / cmd[0]
    assert script.is_file(), f"gpu_check.sh calls {cmd[0]}, which does not exist"
    help_text = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    flags = [a for a in cmd[1:] if a.startswith("--")]
    missing = [f for f in flags if not re.search(rf"(^|\s|\[){re.escape(f)}\b", help_text)]
    assert not missing, f"{cmd[0]} does not accept {missing}"


def test_gpu_check_calls_every_benchmark_it_documents():
    called = {Path(c[0]).name for c in _stage_commands()}
    assert {
        "bench_calib_kernels_gpu.py",
        "bench_deploy_gpu.py",
        "bench_calib_step.py",
        "bench_packed_latency.py",
    } <= called, called
