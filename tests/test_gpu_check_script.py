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


def _time_limits() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(limits that always apply, limits inside ``if`` blocks), each as (stage or command, worst
    case seconds): a stage inside ``for V in a b c; do ... done`` counts once per item, and every
    plain ``timeout N`` command counts too."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    always, conditional = [], []
    repeat, in_if = 1, 0
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        loop = re.match(r"for \w+ in (.+?); do$", line)
        if loop:
            repeat = len(loop.group(1).split())
            continue
        if line == "done":
            repeat = 1
            continue
        if re.match(r"if .*; then$", line):
            in_if += 1
        stage = re.search(r"\bstage ([\w-]+) (?:\$\{[A-Z_]+_S:-(\d+)\}|(\d+)) ", line)
        plain = re.search(r"(?:^|[;&|]\s*)timeout (\d+) ", line)
        for name, secs in (
            [(stage.group(1), int(stage.group(2) or stage.group(3)))] if stage else []
        ) + ([("timeout", int(plain.group(1)))] if plain else []):
            (conditional if in_if else always).extend([(name, secs)] * repeat)
        if line == "fi" or line.endswith("; fi"):
            in_if -= 1
    return always, conditional


def test_gpu_check_budget_under_ten_minutes():
    """The device tool runs one command for at most 600 s: the stages' worst case (every stage
    at its limit, a looped stage once per item) must fit. A failed CUDA build adds the
    ``build-without-cuda`` fallback on top; the stages run in priority order, so the limit
    then cuts the last ones (their rows are missing, the log says so)."""
    always, conditional = _time_limits()
    names = [n for n, _ in always]
    assert names.count("packed-latency") == 2, always  # the layout loop
    assert {"build", "gpu-tests", "calibration", "calib-kernels"} <= set(names), always
    assert [n for n, _ in conditional] == ["build-without-cuda"], conditional
    total = sum(s for _, s in always)
    assert total < 600, f"worst case {total} s: {always}"


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
