"""CLI: a real end-to-end run on packaged images, and clear errors for bad input."""

import json
import os
import platform

import pytest

from pdquant_fast.cli import main

pytest.importorskip("PIL")


def _has_foolbox():
    from pdquant_fast.data import DataError, foolbox_samples_dir

    try:
        foolbox_samples_dir("cifar10")
        return True
    except DataError:
        return False


needs_foolbox = pytest.mark.skipif(not _has_foolbox(), reason="foolbox sample images missing")


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@needs_foolbox
def test_calibrate_writes_result_json_with_required_fields(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "calibrate",
        "--model",
        "cifar_resnet8",
        "--data",
        "foolbox:cifar10",
        "--calib-size",
        "12",
        "--eval-data",
        "foolbox:cifar10",
        "--method",
        "qdrop",
        "--w-bits",
        "4",
        "--a-bits",
        "4",
        "--iters",
        "2",
        "--seed",
        "3",
        "--no-progress",
        "--out",
        str(out),
    ]
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    r = json.loads((out / "result.json").read_text())
    for key in (
        "method",
        "w_bits",
        "a_bits",
        "iters",
        "seed",
        "fp_top1",
        "top1",
        "calib_seconds",
        "config",
        "versions",
        "weights_sha256",
        "calib_list_sha256",
    ):
        assert key in r, key
    assert r["method"] == "qdrop" and r["iters"] == 2 and r["seed"] == 3
    assert r["device"] == "cpu"  # --device's default
    # glibc keeps freed blocks between iterations on the CPU (PDQUANT_TUNE_MALLOC=0: defaults)
    if os.environ.get("PDQUANT_TUNE_MALLOC", "") != "0" and platform.libc_ver()[0] == "glibc":
        assert r["malloc"]["applied"] is True, r["malloc"]
    assert r["config"]["keep_prob"] == 0.5 and r["versions"]["torch"]
    assert len(r["units"]) == 5  # ResNet-8: stem, 3 blocks, classifier
    assert "top-1" in stdout
    # random-init FP weights are not saved: re-evaluation is refused with a clear message
    _expect_error(["eval", str(out), "--data", "foolbox:cifar10"], capsys, "randomly initialised")


def test_calibrate_then_eval_reproduces_accuracy(shared_data, tmp_path, capsys):
    sprites = shared_data / "cifar10/convnetjs_png"
    w = shared_data / "cifar10/models/akamaster_resnet/resnet20-12fca82f.th"
    out = tmp_path / "run"
    argv = [
        "calibrate",
        "--model",
        "cifar_resnet20",
        "--weights",
        str(w),
        "--data",
        str(sprites),
        "--calib-size",
        "64",
        "--eval-data",
        "foolbox:cifar10",
        "--method",
        "rtn",
        "--w-bits",
        "4",
        "--a-bits",
        "4",
        "--iters",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    rc, _, err = _run(argv, capsys)
    assert rc == 0, err
    r = json.loads((out / "result.json").read_text())
    rc, stdout, err = _run(["eval", str(out), "--data", "foolbox:cifar10"], capsys)
    assert rc == 0, err
    correct = r["evals"]["foolbox:cifar10"]["correct"]
    assert f"({correct}/20)" in stdout  # the saved quantizer state gives the same predictions


def _expect_error(argv, capsys, *needles):
    rc, _, err = _run(argv, capsys)
    assert rc == 2
    assert err.startswith("error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    return err


BASE = ["calibrate", "--model", "cifar_resnet8", "--calib-size", "4", "--iters", "1"]


@pytest.mark.parametrize("bits", ["0", "1", "9", "16", "5"])
def test_unsupported_bits(bits, tmp_path, capsys):
    _expect_error(
        [*BASE, "--data", "foolbox:cifar10", "--w-bits", bits, "--out", str(tmp_path / "o")],
        capsys,
        f"unsupported weight bit-width (--w-bits) {bits}",
        "[2, 3, 4, 8]",
    )
    assert not (tmp_path / "o" / "result.json").exists()


def _calib(tmp_path, *extra):
    """``calibrate`` of cifar_resnet8 on the foolbox CIFAR samples into ``tmp_path/o``."""
    base = ["calibrate", "--model", "cifar_resnet8", "--data", "foolbox:cifar10"]
    return [*base, *extra, "--out", str(tmp_path / "o")]


def test_zero_iterations(tmp_path, capsys):
    _expect_error(_calib(tmp_path, "--iters", "0"), capsys, "iters", "positive integer")


def test_empty_and_missing_data(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_error([*BASE, "--data", str(empty), "--out", str(tmp_path / "o")], capsys, str(empty))
    _expect_error(
        [*BASE, "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys, "nope"
    )


@needs_foolbox
def test_calib_size_larger_than_data(tmp_path, capsys):
    _expect_error(_calib(tmp_path, "--calib-size", "21"), capsys, "--calib-size 21", "20")


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _expect_error(
        [*BASE, "--data", "foolbox:cifar10", "--out", str(blocker / "sub")], capsys, "not writable"
    )


def test_unknown_model_method_and_setting(tmp_path, capsys):
    o = str(tmp_path / "o")
    _expect_error(
        ["calibrate", "--model", "cifar_resnet21", "--data", "x", "--out", o], capsys, "6n+2"
    )
    _expect_error(
        [*BASE, "--data", "foolbox:cifar10", "--method", "gptq", "--out", o],
        capsys,
        "unknown method 'gptq'",
        "pdquant",
    )
    _expect_error(
        [*BASE, "--data", "foolbox:cifar10", "--set", "temprature=2", "--out", o],
        capsys,
        "temprature",
        "temperature",
    )


def test_weights_for_another_model(shared_data, tmp_path, capsys):
    w56 = shared_data / "cifar10/models/akamaster_resnet/resnet56-4bfd9763.th"
    argv = [
        "calibrate",
        "--model",
        "cifar_resnet20",
        "--weights",
        str(w56),
        "--data",
        str(shared_data / "cifar10/convnetjs_png"),
        "--out",
        str(tmp_path / "o"),
    ]
    _expect_error(argv, capsys, "resnet56-4bfd9763.th")


@needs_foolbox
def test_calibrate_names_a_bad_malloc_setting(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PDQUANT_TUNE_MALLOC", "yes")
    argv = ["calibrate", "--model", "cifar_resnet8", "--data", "foolbox:cifar10"]
    argv += ["--calib-size", "4", "--iters", "1", "--no-progress", "--out", str(tmp_path / "o")]
    _expect_error(argv, capsys, "PDQUANT_TUNE_MALLOC='yes': use 1")
    assert not (tmp_path / "o").exists()  # refused before the output folder is made


def test_cli_puts_torchs_cpu_allocator_on_huge_pages_unless_told_otherwise():
    """``pdquant`` sets THP_MEM_ALLOC_ENABLE=1 before torch's first allocation (a user's own
    value wins), and the runs record the setting (``collect_info()["thp_mem_alloc"]``)."""
    import os
    import subprocess
    import sys

    code = (
        "import os, pdquant_fast.cli, torch; from pdquant_fast.info import collect_info; "
        "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), collect_info()['thp_mem_alloc'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    for given, want in ((None, "1 1"), ("0", "0 0")):
        e = dict(env, THP_MEM_ALLOC_ENABLE=given) if given else env
        out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-2:] == want.split(), out.stdout
