"""Resumable calibration, determinism and cache modes.

Real calibrations (``pdquant calibrate`` in a subprocess, PD-Quant W2A4 with QDrop and
distribution correction, on real CIFAR-10 images) are killed with SIGKILL at random moments and
in the middle of checkpoint writes (the ``PDQUANT_TEST_KILL_AT`` hook: between the fsync of the
temporary file and its rename), resumed with ``--resume DIR``, and compared with an
uninterrupted run: the saved quantizer state must be bit-identical, the per-unit losses equal,
and the resumed run's log and the manifest must show that no finished unit was reconstructed
again.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pdquant_fast.api import quant_state, quantize
from pdquant_fast.checkpoint import KILL_HOOK_ENV
from pdquant_fast.models.registry import build_model

pytest.importorskip("PIL")

N_UNITS_R8 = 5  # ResNet-8: stem, 3 residual blocks, classifier


def _argv(shared_data, out, model="cifar_resnet8", extra=()):
    return [
        sys.executable,
        "-m",
        "pdquant_fast.cli",
        "calibrate",
        "--model",
        model,
        *(
            ["--weights", str(shared_data / "cifar10/models/akamaster_resnet/resnet20-12fca82f.th")]
            if model == "cifar_resnet20"
            else []
        ),
        "--data",
        str(shared_data / "cifar10/convnetjs_png"),
        "--calib-size",
        "32",
        "--iters",
        "3",
        "--dc-iters",
        "2",
        "--w-bits",
        "2",
        "--a-bits",
        "4",
        "--seed",
        "7",
        "--threads",
        "1",
        "--set",
        "act_init_max_elems=4096",  # a quicker activation init: this is about resuming
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def _env(kill_at=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop(KILL_HOOK_ENV, None)
    if kill_at:
        env[KILL_HOOK_ENV] = kill_at
    return env


def _run(argv, kill_at=None, timeout=300):
    p = subprocess.run(argv, env=_env(kill_at), capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def _resume(out, timeout=300):
    return _run([sys.executable, "-m", "pdquant_fast.cli", "calibrate", "--resume", str(out)])


def _manifest(out):
    return json.loads((Path(out) / "checkpoint" / "manifest.json").read_text())


def _units_reconstructed(log):
    """1-based indices of the units a run reconstructed, from its ``[unit k/N]`` lines."""
    return [
        int(line.split()[1].split("/")[0]) for line in log.splitlines() if line.startswith("[unit ")
    ]


def _assert_same(a, b, path="state"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    else:
        assert a == b, (path, a, b)


def _strip_times(units):
    drop = {"seconds", "dc_seconds", "opt_seconds"}
    return [{k: v for k, v in u.items() if k not in drop} for u in units]


def _assert_matches_reference(ref, out):
    sa = torch.load(ref / "quant_state.pt", weights_only=True)
    sb = torch.load(Path(out) / "quant_state.pt", weights_only=True)
    _assert_same(sa, sb)
    ra = json.loads((ref / "result.json").read_text())
    rb = json.loads((Path(out) / "result.json").read_text())
    assert _strip_times(ra["units"]) == _strip_times(rb["units"])  # losses equal, float-exact
    assert ra["config"] == rb["config"]
    leftovers = [p.name for p in (Path(out) / "checkpoint").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def reference_run(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    rc, log = _run(_argv(shared_data, out))
    assert rc == 0, log
    assert _units_reconstructed(log) == list(range(1, N_UNITS_R8 + 1))
    m = _manifest(out)
    assert m["complete"] and m["units_done"] == N_UNITS_R8
    return out


def _kill_then_resume(shared_data, tmp_path, ref, kill_at, expect_done, check_killed=None):
    out = tmp_path / "run"
    rc, log = _run(_argv(shared_data, out), kill_at=kill_at)
    assert rc == -signal.SIGKILL, log
    if check_killed is not None:
        check_killed(out / "checkpoint")
    assert not (out / "result.json").exists() and not (out / "quant_state.pt").exists()
    m = _manifest(out)
    assert m["units_done"] == expect_done and not m["complete"]
    assert _units_reconstructed(log) == list(range(1, expect_done + 2))
    rc, log2 = _resume(out)
    assert rc == 0, log2
    assert "resuming from" in log2
    # finished units are restored, never reconstructed again
    assert _units_reconstructed(log2) == list(range(expect_done + 1, N_UNITS_R8 + 1))
    runs = [u["run"] for u in _manifest(out)["units"]]
    assert runs == [0] * expect_done + [1] * (N_UNITS_R8 - expect_done)
    _assert_matches_reference(ref, out)
    return out


def test_sigkill_between_state_write_and_rename(shared_data, tmp_path, reference_run):
    """Killed after unit 3's state reached its temp file (fsync'ed), before the rename."""

    def check(ck):
        names = sorted(p.name for p in ck.iterdir())
        assert any(n.startswith(".state_0003.pt.") and n.endswith(".tmp") for n in names), names
        assert "state_0003.pt" not in names and "state_0002.pt" in names

    _kill_then_resume(
        shared_data, tmp_path, reference_run, "state-tmp:3", expect_done=2, check_killed=check
    )


def test_sigkill_between_manifest_write_and_rename(shared_data, tmp_path, reference_run):
    """State file of unit 4 renamed, manifest not: the resume must use unit 3's checkpoint."""

    def check(ck):
        names = sorted(p.name for p in ck.iterdir())
        assert "state_0004.pt" in names and any(n.startswith(".manifest.json.") for n in names)

    out = _kill_then_resume(
        shared_data, tmp_path, reference_run, "manifest-tmp:4", expect_done=3, check_killed=check
    )
    assert sorted(p.name for p in (out / "checkpoint").glob("state_*.pt")) == ["state_0005.pt"]


def _kill_at_random_moment(argv, out, rng, min_done=1):
    """Start ``argv``; once ``min_done`` units are checkpointed, SIGKILL it after a random delay.

    Returns (killed, log, units_done_at_kill).
    """
    env = _env()
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    man = out / "checkpoint" / "manifest.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:
        try:
            if json.loads(man.read_text())["units_done"] >= min_done:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.8))
    killed = p.poll() is None
    if killed:
        p.send_signal(signal.SIGKILL)
    log, _ = p.communicate(timeout=60)
    return killed, log, _manifest(out)["units_done"]


def test_sigkill_at_a_random_moment_then_resume(shared_data, tmp_path, reference_run):
    seed = int(os.environ.get("PDQUANT_TEST_SEED", "0")) or random.randrange(1 << 30)
    rng = random.Random(seed)
    out = tmp_path / "run"
    killed, log, done = _kill_at_random_moment(_argv(shared_data, out), out, rng)
    if not killed:
        pytest.skip(f"the run finished before the random kill (seed {seed})")
    if (out / "result.json").exists():
        # The kill landed after the last (atomic) write, during interpreter teardown: the run
        # is complete, and what it left must be the finished result, not a partial one.
        assert "wrote " in log and _manifest(out)["complete"], f"seed {seed}\n{log}"
        _assert_matches_reference(reference_run, out)
        return
    rc, log2 = _resume(out)
    assert rc == 0, log2
    assert _units_reconstructed(log2) == list(range(done + 1, N_UNITS_R8 + 1)), f"seed {seed}"
    _assert_matches_reference(reference_run, out)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(4))
def test_resnet20_repeated_random_kills(shared_data, tmp_path, trial):
    """ResNet-20 (pretrained), killed at random moments several times in a row (the resumed run
    is itself killed), plus kills in the first checkpoint write and in the final one."""
    ref = tmp_path / "ref"
    rc, log = _run(_argv(shared_data, ref, model="cifar_resnet20"))
    assert rc == 0, log
    rng = random.Random(1000 + trial)
    out = tmp_path / "run"
    hook = ["state-tmp:0", "manifest-tmp:11", "saved:6", None][trial]
    if hook:
        rc, _ = _run(_argv(shared_data, out, model="cifar_resnet20"), kill_at=hook)
        assert rc == -signal.SIGKILL
        argv = [sys.executable, "-m", "pdquant_fast.cli", "calibrate", "--resume", str(out)]
    else:
        argv = _argv(shared_data, out, model="cifar_resnet20")
    seen_done, kills = [], 0
    for _ in range(3):
        if (out / "result.json").exists():
            break
        min_done = min(11, (seen_done[-1] + 1) if seen_done else 1)
        killed, _, done = _kill_at_random_moment(argv, out, rng, min_done=min_done)
        kills += killed
        if seen_done:
            assert done >= seen_done[-1]  # progress is never lost
        seen_done.append(done)
        argv = [sys.executable, "-m", "pdquant_fast.cli", "calibrate", "--resume", str(out)]
    assert kills >= 1, "no random kill landed before the run finished"
    if not (out / "result.json").exists():
        rc, log = _resume(out)
        assert rc == 0, log
    _assert_matches_reference(ref, out)


# --------------------------------------------------------------------------------------------
# in-process: the Python API, determinism and cache modes


@pytest.fixture(scope="module")
def small(shared_data):
    from pdquant_fast.data import open_image_source

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _ = build_model("cifar_resnet8")
    src = open_image_source(shared_data / "cifar10/convnetjs_png", "cifar", split="train")
    x = torch.stack([src[i][0] for i in range(16)])
    torch.set_num_threads(1)
    return model, x


KW = dict(
    method="pdquant",
    w_bits=2,
    a_bits=4,
    iters=3,
    dc_iters=2,
    act_init_max_elems=4096,
    seed=5,
    log=None,
    progress=False,
)


@pytest.fixture(scope="module")
def small_ref(small):
    """Uninterrupted run, seed 5, cache on the device."""
    q, rep = quantize(*small, cache="device", **KW)
    assert rep.cache_mode == "device"
    return quant_state(q)


def test_api_resume_after_interruption_is_bit_identical(small, small_ref, tmp_path):
    ck = tmp_path / "ck"

    def stop_after_unit_3(msg):
        if msg.startswith("[unit 3/"):  # unit 3 reconstructed but not yet checkpointed
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(*small, checkpoint_dir=ck, **dict(KW, log=stop_after_unit_3))
    assert json.loads((ck / "manifest.json").read_text())["units_done"] == 2
    logs = []
    q, rep = quantize(*small, resume=ck, **dict(KW, log=logs.append))
    assert [m.split("]")[0] for m in logs if m.startswith("[unit ")] == [
        "[unit 3/5",
        "[unit 4/5",
        "[unit 5/5",
    ]
    assert [u.index for u in rep.units] == list(range(N_UNITS_R8))
    _assert_same(small_ref, quant_state(q))


def test_cache_modes_and_reruns_are_bit_identical(small, small_ref, tmp_path):
    """Determinism: independent runs with the same seed (host, disk cache) equal the reference."""
    for mode in ("host", "disk"):
        q, rep = quantize(*small, cache=mode, cache_dir=tmp_path, **KW)
        assert rep.cache_mode == mode
        _assert_same(small_ref, quant_state(q))
    assert not list(tmp_path.iterdir())  # disk cache files are unlinked as soon as mapped


def test_another_seed_gives_another_result(small, small_ref):
    """The seed reaches the result (so the bit-identity checks above can fail)."""
    q, _ = quantize(*small, **dict(KW, seed=6))
    s = quant_state(q)
    assert any(
        not torch.equal(small_ref["acts"][k]["delta"], s["acts"][k]["delta"]) for k in s["acts"]
    ) or any(
        not torch.equal(small_ref["layers"][k]["round_up"], s["layers"][k]["round_up"])
        for k in s["layers"]
        if s["layers"][k]["round_up"] is not None
    )


def test_auto_cache_mode_choice():
    from pdquant_fast.cache import choose_mode, estimate_peak_bytes

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    gib = 1 << 30
    assert choose_mode(gib, cpu, host_free=3 * gib)[0] == "device"
    assert choose_mode(gib, cpu, host_free=gib)[0] == "disk"
    assert choose_mode(gib, gpu, host_free=3 * gib, device_free=3 * gib)[0] == "device"
    assert choose_mode(gib, gpu, host_free=3 * gib, device_free=gib)[0] == "host"
    assert choose_mode(gib, gpu, host_free=gib, device_free=gib)[0] == "disk"
    # Lite0 stem: 1,024 images, input 3x224x224 -> 32x112x112 (X_q, X_fp, X_c, Y_c)
    need = estimate_peak_bytes(1024, [(3, 224, 224)], [(32, 112, 112)], dc=True)
    assert need == 4 * 1024 * (3 * 3 * 224 * 224 + 32 * 112 * 112)


def test_disk_cache_drops_resident_pages(tmp_path):
    from pdquant_fast.cache import UnitCache

    def rss_file_kb():
        for line in open("/proc/self/status"):
            if line.startswith("RssFile:"):
                return int(line.split()[1])
        pytest.skip("no RssFile in /proc/self/status")

    c = UnitCache("disk", torch.device("cpu"), tmp_path)
    before = rss_file_kb()
    t = c.empty((64, 1 << 18))  # 64 MiB
    t.fill_(1.5)
    assert rss_file_kb() - before > 50_000
    c.trim()
    assert rss_file_kb() - before < 10_000
    assert float(t[37, 1234]) == 1.5 and float(t.sum()) == 1.5 * t.numel()  # data kept


def test_staged_view_and_batched_into_match_plain_tensors(tmp_path):
    """The off-device wrapper used with a GPU model (host/disk cache) indexes like the tensor,
    and batched_into writes the same values as concatenating the batches."""
    from pdquant_fast.cache import Staged, UnitCache, batched_into
    from pdquant_fast.engine import batched

    x = torch.randn(300, 3, 4, generator=torch.Generator().manual_seed(0))
    s = Staged(x, torch.device("cpu"))
    idx = torch.tensor([5, 299, 0, 5])
    assert s.shape == x.shape and len(s) == 300 and s.dim() == 3
    assert torch.equal(s[idx], x[idx]) and torch.equal(s[10:20], x[10:20])
    for mode in ("device", "host", "disk"):
        c = UnitCache(mode, torch.device("cpu"), tmp_path)
        got = batched_into(lambda t: t.sum(-1) * 2, s, c, bs=128)
        assert torch.equal(got, batched(lambda t: t.sum(-1) * 2, x, bs=128))
