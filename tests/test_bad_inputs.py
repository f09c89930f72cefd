"""The bad-input corpus: every case gets a clear error naming what was wrong and what is allowed.

Through the Python API: the exception type and message. Through the CLI: exit status 2, one
``error:`` line on stderr, no traceback, and no partial file that looks complete in the output
folder (``result.json``, ``quant_state.pt``, ``predictions.json``, a complete checkpoint, a
packed ``manifest.json``); where the folder already held a finished or resumable run, the
failed command leaves it byte-for-byte unchanged.

``tests/test_cli.py`` holds the first CLI cases (``--w-bits`` 0/1/5/9/16, ``--iters 0``,
empty and missing data folders, ``--calib-size`` larger than the foolbox samples, an output
folder under a file, unknown model/method/setting, ResNet-56 weights for ResNet-20);
``tests/test_deploy.py::test_bad_files_give_clear_errors`` the packed-file cases through the
API. They are not repeated here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pdquant_fast import ops
from pdquant_fast.api import quantize
from pdquant_fast.cache import CacheError
from pdquant_fast.checkpoint import CheckpointError
from pdquant_fast.cli import main
from pdquant_fast.graph import GraphError
from pdquant_fast.models.registry import build_model
from pdquant_fast.ops import OpInputError
from pdquant_fast.quant import QuantConfigError

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

COMPLETE_LOOKING = ("result.json", "quant_state.pt", "predictions.json", "manifest.json")
R20 = "cifar10/models/akamaster_resnet/resnet20-12fca82f.th"


def _snapshot(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _assert_nothing_complete(folder: Path) -> None:
    if not folder.exists():
        return
    found = [str(p) for p in folder.rglob("*") if p.name in COMPLETE_LOOKING]
    assert not found, f"a failed command left complete-looking files: {found}"


def _cli_error(argv, capsys, *needles, out: Path | None = None, keep: Path | None = None):
    """Run the CLI; expect exit 2, one ``error:`` line naming every needle, no traceback."""
    before = _snapshot(keep) if keep is not None else None
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    if out is not None:
        _assert_nothing_complete(out)
    if keep is not None:
        assert _snapshot(keep) == before, "a failed command changed an existing run folder"
    return err


@pytest.fixture(scope="module")
def r8():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _ = build_model("cifar_resnet8")
    return model


X4 = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
QUICK = dict(iters=1, dc_iters=1, log=None, progress=False)


def _calib(tmp_path, *extra, data=None, model="cifar_resnet8"):
    """``pdquant calibrate`` arguments into ``tmp_path/o``."""
    base = ["calibrate", "--model", model, "--calib-size", "2", "--iters", "1", "--no-progress"]
    return [*base, "--data", str(data), *extra, "--out", str(tmp_path / "o")]


@pytest.fixture
def few(tmp_path):
    """A flat folder of three 32x32 RGB PNGs (unlabelled)."""
    d = tmp_path / "few"
    d.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    return d


# --------------------------------------------------------------------------------------------
# settings: bit-widths, iterations, seeds, cache, threads (API and CLI)


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_api_unsupported_weight_bits(r8, bits):
    with pytest.raises(
        QuantConfigError, match=rf"weight bit-width \(--w-bits\) {bits}.*\[2, 3, 4, 8\]"
    ):
        quantize(r8, X4, w_bits=bits, **QUICK)


def test_api_unsupported_activation_bits_and_bool_bits(r8):
    with pytest.raises(
        QuantConfigError, match=r"activation bit-width \(--a-bits\) 16.*\[2, 3, 4, 8\]"
    ):
        quantize(r8, X4, a_bits=16, **QUICK)
    with pytest.raises(QuantConfigError, match=r"weight bit-width \(--w-bits\) True"):
        quantize(r8, X4, w_bits=True, **QUICK)


def test_cli_unsupported_activation_and_override_bits(tmp_path, few, capsys):
    _cli_error(
        _calib(tmp_path, "--a-bits", "16", data=few), capsys, "(--a-bits) 16", "[2, 3, 4, 8]"
    )
    _cli_error(
        _calib(tmp_path, "--set", "first_layer_w_bits=5", data=few),
        capsys,
        "first_layer_w_bits 5",
        "[2, 3, 4, 8]",
        out=tmp_path / "o",
    )
    _cli_error(
        _calib(tmp_path, "--set", "input_a_bits=6", data=few),
        capsys,
        "input_a_bits 6",
        "[2, 3, 4, 8]",
        out=tmp_path / "o",
    )


@pytest.mark.parametrize("iters", [-5, 0, 2.5])
def test_api_bad_iterations(r8, iters):
    with pytest.raises(
        QuantConfigError, match=rf"iters \(--iters\) must be a positive integer, got {iters}"
    ):
        quantize(r8, X4, **dict(QUICK, iters=iters))


def test_cli_negative_iterations_and_dc_iters_and_batch(tmp_path, few, capsys):
    o = tmp_path / "o"
    _cli_error(
        _calib(tmp_path, "--iters", "-5", data=few),
        capsys,
        "iters (--iters) must be a positive integer, got -5",
        out=o,
    )
    _cli_error(
        _calib(tmp_path, "--dc-iters", "-1", data=few),
        capsys,
        "dc_iters must be >= 0, got -1",
        out=o,
    )
    _cli_error(
        _calib(tmp_path, "--batch-size", "0", data=few),
        capsys,
        "batch_size must be a positive integer, got 0",
        out=o,
    )


def test_cli_setting_out_of_range_and_malformed_set(tmp_path, few, capsys):
    _cli_error(
        _calib(tmp_path, "--set", "keep_prob=0", data=few),
        capsys,
        "keep_prob must be in (0, 1], got 0",
    )
    _cli_error(
        _calib(tmp_path, "--set", "temperature=-1", data=few), capsys, "temperature must be > 0"
    )
    _cli_error(_calib(tmp_path, "--set", "keep_prob", data=few), capsys, "--set expects KEY=VALUE")


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_api_seed_out_of_range(r8, seed):
    with pytest.raises(
        QuantConfigError, match=r"seed \(--seed\) must be an integer in 0..2\*\*63-1"
    ):
        quantize(r8, X4, seed=seed, **QUICK)


def test_cli_negative_seed(tmp_path, few, capsys):
    _cli_error(
        _calib(tmp_path, "--seed", "-3", data=few), capsys, "seed (--seed)", "0..2**63-1, got -3"
    )


def test_cache_mode_unknown(r8, tmp_path, few, capsys):
    with pytest.raises(
        CacheError,
        match=r"unknown cache mode 'gpu': choose one of \['auto', 'device', 'host', 'disk'\]",
    ):
        quantize(r8, X4, cache="gpu", **QUICK)
    _cli_error(
        _calib(tmp_path, "--cache", "gpu", data=few),
        capsys,
        "--cache 'gpu'",
        "['auto', 'device', 'host', 'disk']",
    )


def test_cli_threads_not_positive(tmp_path, few, capsys):
    _cli_error(
        _calib(tmp_path, "--threads", "0", data=few),
        capsys,
        "--threads must be a positive integer, got 0",
    )


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("gpu0", "--device 'gpu0' is not a device: use cpu, cuda or cuda:N"),
        ("meta", "--device 'meta': calibration runs on cpu or cuda[:N]"),
        pytest.param(
            "cuda",
            "--device cuda: no CUDA device is available here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
        ("cuda:99", "--device cuda:99"),
    ],
)
def test_cli_bad_device(tmp_path, few, capsys, spec, needle):
    """Checked before the model or the images are loaded; nothing is written."""
    _cli_error(_calib(tmp_path, "--device", spec, data=few), capsys, needle, out=tmp_path / "o")


def test_cli_missing_model(tmp_path, few, capsys):
    _cli_error(
        ["calibrate", "--data", few, "--out", tmp_path / "o"],
        capsys,
        "--model and --out",
        "--resume",
    )


# --------------------------------------------------------------------------------------------
# data folders and calibration tensors


def test_cli_folder_of_non_image_files(tmp_path, capsys):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("x")
    (d / "b.csv").write_text("1,2")
    _cli_error(
        _calib(tmp_path, data=d),
        capsys,
        f"no images found in {d}",
        "2 non-image file(s) (.csv, .txt)",
        "accepted sources",
    )


def test_cli_file_with_image_extension_that_is_not_an_image(tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.jpg").write_text("this is text")
    _cli_error(
        _calib(tmp_path, "--calib-size", "1", data=d),
        capsys,
        f"cannot decode image file {d / 'a.jpg'}",
        "must be images Pillow can decode",
        out=tmp_path / "o",
    )


def test_cli_unreadable_image_file(tmp_path, capsys):
    """A listed image that cannot be opened (a dangling link: unreadable even for root)."""
    d = tmp_path / "dangling"
    d.mkdir()
    os.symlink(tmp_path / "gone.png", d / "a.png")
    _cli_error(
        _calib(tmp_path, "--calib-size", "1", data=d),
        capsys,
        "image file",
        "gone.png",
        "cannot be opened",
        "must be a readable file",
    )


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads a mode-000 folder"
)
def test_cli_unreadable_data_folder(tmp_path, few, capsys):
    few.chmod(0)
    try:
        err = _cli_error(_calib(tmp_path, data=few), capsys)
        assert str(few) in err
    finally:
        few.chmod(0o755)


def test_grayscale_and_cmyk_images_are_converted_to_rgb(tmp_path):
    """Not an error: every decodable image is converted to RGB (grayscale: R = G = B)."""
    from pdquant_fast.data import open_image_source

    d = tmp_path / "modes"
    d.mkdir()
    Image.fromarray(np.full((32, 32), 100, np.uint8), "L").save(d / "g.png")
    Image.new("CMYK", (32, 32), (10, 20, 30, 40)).save(d / "c.jpg")
    src = open_image_source(d, None)
    imgs = {Path(p).name: src[i][0] for i, p in enumerate(src.paths)}
    assert all(t.shape == (3, 32, 32) and t.dtype == torch.uint8 for t in imgs.values())
    g = imgs["g.png"]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2]) and int(g[0, 0, 0]) == 100


def test_cli_calib_size_larger_than_folder_zero_and_negative(tmp_path, few, capsys):
    o = tmp_path / "o"
    _cli_error(
        _calib(tmp_path, data=few)[:-2] + ["--calib-size", "5", "--out", o],
        capsys,
        "--calib-size 5 is larger than the 3 images",
        out=o,
    )
    _cli_error(
        _calib(tmp_path, data=few)[:-2] + ["--calib-size", "0", "--out", o],
        capsys,
        "--calib-size must be a positive integer, got 0",
        out=o,
    )
    _cli_error(
        _calib(tmp_path, data=few)[:-2] + ["--calib-size", "-3", "--out", o],
        capsys,
        "--calib-size must be a positive integer, got -3",
        out=o,
    )


def test_cli_eval_data_without_labels(tmp_path, few, capsys):
    _cli_error(
        _calib(tmp_path, "--eval-data", few, data=few),
        capsys,
        f"evaluation data {few} has no labels",
        out=tmp_path / "o",
    )


@pytest.mark.parametrize(
    "bad, needle",
    [
        (torch.randn(4, 32, 32), r"float tensor \[N, C, H, W\], got \(4, 32, 32\)"),
        (torch.zeros(4, 3, 32, 32, dtype=torch.uint8), r"float tensor \[N, C, H, W\], got .*uint8"),
        (torch.zeros(0, 3, 32, 32), r"holds 0 images; at least 1 is needed"),
    ],
)
def test_api_calibration_tensor_shape_dtype_empty(r8, bad, needle):
    with pytest.raises(ValueError, match=needle):
        quantize(r8, bad, **QUICK)


def test_api_calibration_images_wrong_size_for_model(r8):
    with pytest.raises(
        ValueError,
        match=r"cannot run on calibration images of shape \[1, 32, 32\].*3 channels.*preprocessed",
    ):
        quantize(r8, torch.randn(4, 1, 32, 32), **QUICK)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_api_nan_or_inf_in_inputs(r8, value):
    x = X4.clone()
    x[1, 2, 3, 4] = value
    with pytest.raises(
        ValueError,
        match=r"calibration images contain NaN or Inf \(1 values\); images must be finite",
    ):
        quantize(r8, x, **QUICK)


# --------------------------------------------------------------------------------------------
# weights and models


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_api_nan_or_inf_in_weights(r8, value):
    import copy

    m = copy.deepcopy(r8)
    with torch.no_grad():
        m.layer2[0].conv1.weight[0, 0, 0, 0] = value
    with pytest.raises(
        ValueError,
        match=r"model weight 'layer2.0.conv1.weight' contains NaN or Inf; all weights must be "
        r"finite",
    ):
        quantize(m, X4, **QUICK)


def test_api_model_and_images_on_different_devices(r8):
    """Without a second real device here, the model goes to ``meta``: the error names both
    devices before anything runs on either."""
    import copy

    m = copy.deepcopy(r8).to("meta")
    with pytest.raises(
        ValueError, match=r"the model is on \['meta'\] but the calibration images are on cpu"
    ):
        quantize(m, X4, **QUICK)


def test_cli_nan_in_weights_file(shared_data, tmp_path, few, capsys):
    sd = torch.load(shared_data / R20, map_location="cpu", weights_only=True)
    sd["state_dict"]["module.linear.weight"][3, 5] = float("nan")
    torch.save(sd, tmp_path / "nan.th")
    argv = _calib(tmp_path, "--weights", tmp_path / "nan.th", data=few, model="cifar_resnet20")
    _cli_error(
        argv,
        capsys,
        "model weight 'linear.weight' contains NaN or Inf",
        "must be finite",
        out=tmp_path / "o",
    )


def test_cli_weights_for_another_depth(shared_data, tmp_path, few, capsys):
    argv = _calib(tmp_path, "--weights", shared_data / R20, data=few, model="cifar_resnet32")
    _cli_error(
        argv,
        capsys,
        "resnet20-12fca82f.th",
        "20-layer CIFAR ResNet",
        "cifar_resnet32",
        "missing keys",
    )


def test_cli_weights_for_another_model(shared_data, tmp_path, few, capsys):
    argv = _calib(tmp_path, "--weights", shared_data / R20, data=few, model="efficientnet_lite0")
    _cli_error(argv, capsys, "resnet20-12fca82f.th", "but the model is efficientnet_lite0")


def test_cli_truncated_and_non_torch_weights_files(shared_data, tmp_path, few, capsys):
    (tmp_path / "trunc.th").write_bytes((shared_data / R20).read_bytes()[:5000])
    (tmp_path / "text.th").write_text("not a state dict")
    for name in ("trunc.th", "text.th"):
        argv = _calib(tmp_path, "--weights", tmp_path / name, data=few, model="cifar_resnet20")
        _cli_error(
            argv,
            capsys,
            f"cannot read weights file {tmp_path / name}",
            "expected a PyTorch state dict",
        )


def test_api_model_without_quantizable_layers():
    with pytest.raises(
        GraphError, match=r"no quantizable layers \(nn.Conv2d or nn.Linear modules\)"
    ):
        quantize(nn.Sequential(nn.ReLU(), nn.Flatten()), X4, **QUICK)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.conv(x)
        return self.conv(-x)


def test_api_untraceable_model():
    with pytest.raises(
        GraphError, match=r"could not trace the model \(in module '_DataDependent'\).*control flow"
    ):
        quantize(_DataDependent(), X4, **QUICK)


# --------------------------------------------------------------------------------------------
# output folders


def test_api_checkpoint_folder_not_writable(r8, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint folder .*file/ck is not writable.*give a folder you can write to",
    ):
        quantize(r8, X4, checkpoint_dir=blocker / "ck", **QUICK)


def test_cli_output_folder_is_a_file(tmp_path, few, capsys):
    f = tmp_path / "taken"
    f.write_text("x")
    _cli_error(
        _calib(tmp_path, data=few)[:-2] + ["--out", f],
        capsys,
        f"output folder {f} is an existing file",
        "--out must name a folder",
    )


def test_disk_cache_folder_not_writable(r8, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match=r"disk cache folder .* is not writable"):
        quantize(r8, X4, cache="disk", cache_dir=blocker / "sub", **QUICK)


# --------------------------------------------------------------------------------------------
# resume folders


@pytest.fixture(scope="module")
def finished_run(shared_data, tmp_path_factory):
    """A real (tiny) CLI calibration into a folder: result.json + checkpoint + args.json."""
    out = tmp_path_factory.mktemp("resume") / "run"
    argv = [
        "calibrate",
        "--model",
        "cifar_resnet8",
        "--data",
        str(shared_data / "cifar10/convnetjs_png"),
        "--calib-size",
        "4",
        "--iters",
        "1",
        "--dc-iters",
        "1",
        "--set",
        "act_init_max_elems=1024",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_cli_resume_with_different_settings_names_the_keys(finished_run, capsys):
    err = _cli_error(
        ["calibrate", "--resume", finished_run, "--iters", "2"],
        capsys,
        "was written by a different calibration",
        "config.iters (checkpoint: 1, this run: 2)",
        keep=finished_run,
    )
    assert "config.seed" not in err  # only the keys that differ
    _cli_error(
        ["calibrate", "--resume", finished_run, "--seed", "9"],
        capsys,
        "config.seed (checkpoint: 1005, this run: 9)",
        keep=finished_run,
    )


def test_cli_resume_with_other_calibration_images(finished_run, capsys):
    _cli_error(
        ["calibrate", "--resume", finished_run, "--calib-size", "3"],
        capsys,
        "calib_sha256",
        "calib_shape (checkpoint: [4, 3, 32, 32], this run: [3, 3, 32, 32])",
        keep=finished_run,
    )


def test_api_resume_from_a_different_config(r8, tmp_path):
    ck = tmp_path / "ck"
    quantize(r8, X4, checkpoint_dir=ck, seed=1, **QUICK)
    with pytest.raises(
        CheckpointError, match=r"differing keys: config.seed \(checkpoint: 1, this run: 2\)"
    ):
        quantize(r8, X4, resume=ck, seed=2, **QUICK)
    with pytest.raises(CheckpointError, match=r"calib_sha256"):
        quantize(r8, X4 + 1, resume=ck, seed=1, **QUICK)
    with pytest.raises(ValueError, match="resume=.* and checkpoint_dir=.* differ"):
        quantize(r8, X4, resume=ck, checkpoint_dir=tmp_path / "other", seed=1, **QUICK)


def test_cli_resume_folder_that_is_not_a_run(tmp_path, few, capsys):
    _cli_error(
        ["calibrate", "--resume", few],
        capsys,
        "checkpoint/args.json is missing",
        "--out folder of an interrupted pdquant calibrate run",
        keep=few,
    )


def test_cli_resume_with_another_out(finished_run, tmp_path, capsys):
    _cli_error(
        ["calibrate", "--resume", finished_run, "--out", tmp_path / "elsewhere"],
        capsys,
        "differs from --resume",
        keep=finished_run,
    )


def test_cli_resume_damaged_state_file(finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    state = next((run / "checkpoint").glob("state_*.pt"))
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    state.write_bytes(bytes(raw))
    (run / "result.json").unlink()
    _cli_error(
        ["calibrate", "--resume", run],
        capsys,
        f"checkpoint state file {state} does not match the sha256",
        "calibrate again into a new folder",
        out=run / "x",
        keep=run,
    )
    assert not (run / "result.json").exists()


def test_cli_resume_corrupted_or_future_manifest(finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    man = run / "checkpoint" / "manifest.json"
    good = json.loads(man.read_text())
    man.write_text("{not json")
    _cli_error(
        ["calibrate", "--resume", run], capsys, f"checkpoint manifest {man} is unreadable", keep=run
    )
    man.write_text(json.dumps(dict(good, version=99)))
    _cli_error(
        ["calibrate", "--resume", run],
        capsys,
        "has version 99; this library reads version 1",
        keep=run,
    )


# --------------------------------------------------------------------------------------------
# run folders and packed files through the CLI (the API side is in tests/test_deploy.py)


def test_cli_eval_of_a_truncated_quant_state(finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    qs = run / "quant_state.pt"
    qs.write_bytes(qs.read_bytes()[:1000])
    _cli_error(
        ["eval", run, "--data", "foolbox:cifar10"],
        capsys,
        f"{run} is not a finished calibration folder",
    )


def test_cli_export_of_a_folder_that_is_not_a_run(tmp_path, few, capsys):
    out = tmp_path / "packed"
    _cli_error(
        ["export", few, "--out", out],
        capsys,
        "result.json: missing",
        "not a finished `pdquant calibrate` folder",
        out=out,
    )


@pytest.fixture(scope="module")
def packed(r8, tmp_path_factory):
    from pdquant_fast.deploy import export_packed

    q, _ = quantize(r8, X4, **QUICK)
    out = tmp_path_factory.mktemp("packed") / "r8"
    export_packed(
        q, out, fp_model=r8, model_info={"name": "cifar_resnet8", "input_size": [3, 32, 32]}
    )
    return out


def _bench(folder):
    return [
        "bench-latency",
        folder,
        "--batch",
        "1",
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--no-baselines",
    ]


def _damage(packed, dst, how):
    from pdquant_fast.deploy.format import MANIFEST_FILE, TENSOR_FILE

    d = _copy_run(packed, dst)
    if how == "corrupted":
        raw = bytearray((d / TENSOR_FILE).read_bytes())
        raw[-3] ^= 0xFF
        (d / TENSOR_FILE).write_bytes(bytes(raw))
    elif how == "truncated":
        raw = (d / TENSOR_FILE).read_bytes()
        (d / TENSOR_FILE).write_bytes(raw[: len(raw) // 2])
    else:
        man = json.loads((d / MANIFEST_FILE).read_text())
        if how == "version":
            man["version"] += 1
        else:  # mismatched: the manifest promises more input channels than the tensor holds
            man["layers"]["layer1.0.conv1"]["weight_shape"][1] *= 2
        (d / MANIFEST_FILE).write_text(json.dumps(man))
    return d


@pytest.mark.parametrize(
    "how, needles",
    [
        ("corrupted", ("weights.safetensors: tensor", "fails its sha256")),
        ("truncated", ("weights.safetensors:", "the manifest recorded", "trunc")),
        ("version", ("manifest.json: format version 2 is not supported",)),
        ("mismatched", ("layer layer1.0.conv1: packed weight",)),
    ],
)
def test_cli_bad_packed_file(packed, tmp_path, capsys, how, needles):
    d = _damage(packed, tmp_path / how, how)
    _cli_error(_bench(d), capsys, *needles, keep=d)


# --------------------------------------------------------------------------------------------
# public ops: wrong dtype, device, contiguity, and bad steps


def _op_cases() -> dict:
    """Valid arguments for every public op: ``{name: (fn, args, tensor_arg_names)}``."""
    g = torch.Generator().manual_seed(0)
    f = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, zp6, d6 = f(4, 6), torch.full((6,), 3.0), torch.rand(6, generator=g) + 0.1
    mask = torch.rand(4, 6, generator=g) < 0.5
    wf, alpha, d3, zp3 = (
        torch.floor(f(3, 4) * 4),
        f(3, 4),
        torch.rand(3, generator=g) + 0.1,
        torch.full((3,), 2.0),
    )
    beta = torch.tensor(4.0)
    xu = torch.randint(0, 16, (1, 4, 5, 5), dtype=torch.uint8, generator=g)
    w8 = torch.randint(-8, 8, (2, 4, 3, 3), dtype=torch.int8, generator=g)
    xl = torch.randint(0, 16, (2, 8), dtype=torch.uint8, generator=g)
    wl = torch.randint(-8, 8, (3, 8), dtype=torch.int8, generator=g)
    cases = {
        "fake_quant_act": (
            ops.fake_quant_act,
            [x, d6, zp6, 4, 1, 0.5, None, mask],
            ["x", "delta", "zero_point", None, None, None, None, "mask"],
        ),
        "fake_quant_act_backward": (
            ops.fake_quant_act_backward,
            [f(4, 6), x, d6, zp6, 4, 1, 0.5, None, mask],
            ["grad", "x", "delta", "zero_point", None, None, None, None, "mask"],
        ),
        "adaround_soft": (
            ops.adaround_soft,
            [wf, alpha, d3, zp3, 4, beta],
            ["w_floor", "alpha", "delta", "zero_point", None, "beta"],
        ),
        "adaround_soft_backward": (
            ops.adaround_soft_backward,
            [f(3, 4), torch.tensor(1.0), wf, alpha, d3, zp3, 4, beta],
            ["grad_wq", "grad_reg", "w_floor", "alpha", "delta", "zero_point", None, "beta"],
        ),
        "adaround_hard": (
            ops.adaround_hard,
            [wf, alpha, zp3, 4],
            ["w_floor", "alpha", "zero_point", None],
        ),
        "mse_search_2d": (ops.mse_search_2d, [f(3, 8), 4, 10], ["x", None, None]),
        "bn_stat_loss": (ops.bn_stat_loss, [f(2, 3, 4, 5), f(3), f(3).abs()], ["x", "mean", "std"]),
        "bn_stat_loss_backward": (
            ops.bn_stat_loss_backward,
            [f(2), f(2, 3, 4, 5), f(3), f(3).abs(), f(2, 3), f(2, 3).abs() + 0.1],
            ["grad", "x", "mean", "std", "m", "s"],
        ),
        "dc_adam_step": (
            ops.dc_adam_step,
            [
                f(2, 3, 4, 5),
                f(2, 3, 4, 5),
                f(2, 3, 4, 5),
                f(2, 3, 4, 5),
                f(2, 3, 4, 5).abs(),
                f(2).abs(),
                f(2).abs(),
                0.9,
                0.999,
                0.5,
                1e-8,
            ],
            ["x", "x0", "g", "m", "v", "kc", "step", None, None, None, None],
        ),
        "pack": (
            ops.pack,
            [torch.randint(0, 16, (3, 8), dtype=torch.uint8, generator=g), 4],
            ["codes", None],
        ),
        "unpack": (
            ops.unpack,
            [torch.randint(0, 255, (3, 4), dtype=torch.uint8, generator=g), 4, 8],
            ["packed", None, None],
        ),
        "qconv2d": (
            ops.qconv2d,
            [
                xu,
                3,
                w8,
                torch.rand(2, generator=g) + 0.1,
                f(2),
                [1, 1],
                [1, 1],
                1,
                0,
                f(1, 2, 5, 5),
                0.1,
                0,
                4,
            ],
            ["x", None, "w", "scale", "bias", None, None, None, None, "residual", None, None, None],
        ),
        "dequantize_codes": (ops.dequantize_codes, [xu, 0.1, 3], ["codes", None, None]),
        "max_pool2d_codes": (
            ops.max_pool2d_codes,
            [xu, [3, 3], [2, 2], [1, 1]],
            ["x", None, None, None],
        ),
        "quantize_codes": (ops.quantize_codes, [f(2, 3, 4, 4), 0.1, 3, 4], ["x", None, None, None]),
        "qlinear": (
            ops.qlinear,
            [xl, 3, wl, torch.rand(3, generator=g) + 0.1, f(3), 0, f(2, 3), 0.1, 0, 4],
            ["x", None, "w", "scale", "bias", None, "residual", None, None, None],
        ),
    }
    from pdquant_fast.ops import library

    if hasattr(library, "linear_wa16"):
        xh = f(2, 16).half()
        cases["linear_wa16"] = (
            library.linear_wa16,
            [
                xh,
                torch.randint(0, 255, (3, 8), dtype=torch.uint8, generator=g),
                torch.rand(3, generator=g).half() + 0.1,
                torch.full((3,), 7.0).half(),
                4,
                0,
            ],
            ["x", "w_packed", "scale", "zero", None, None],
        )
    return cases


OP_CASES = _op_cases()


def test_every_public_op_has_a_case():
    from torch._library.custom_ops import CustomOpDef

    from pdquant_fast.ops import library

    defined = {n for n, v in vars(library).items() if isinstance(v, CustomOpDef)}
    missing = defined - set(OP_CASES)
    assert not missing, f"add valid arguments for {sorted(missing)} to _op_cases() here"


@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_op_valid_arguments_pass_validation(name):
    from pdquant_fast.ops.backends import BackendError

    fn, args, _ = OP_CASES[name]
    try:
        fn(*args)
    except BackendError:
        pass  # no kernel for this device here (e.g. a GPU-only op): validation passed


_WRONG_DTYPE = {
    torch.float32: torch.float64,
    torch.float16: torch.float64,
    torch.uint8: torch.int32,
    torch.int8: torch.int32,
    torch.bool: torch.uint8,
    torch.int64: torch.int32,
}


def _wrong_dtype(t: torch.Tensor) -> torch.Tensor:
    return t.to(_WRONG_DTYPE[t.dtype])


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    big = torch.stack([t, t], dim=-1)  # [..., 2]
    out = big[..., 0]
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


_ARG_CASES = [
    (name, i, arg)
    for name, (_, args, names) in sorted(OP_CASES.items())
    for i, arg in enumerate(names)
    if arg is not None
]


@pytest.mark.parametrize("name, i, arg", _ARG_CASES, ids=[f"{n}-{a}" for n, _, a in _ARG_CASES])
def test_op_rejects_wrong_dtype(name, i, arg):
    fn, args, _ = OP_CASES[name]
    bad = list(args)
    bad[i] = _wrong_dtype(args[i])
    with pytest.raises(OpInputError) as e:
        fn(*bad)
    msg = str(e.value)
    assert arg in msg and ("must be" in msg or "must have" in msg), msg


# ops with one tensor argument (mse_search_2d, pack, unpack) cannot mix devices
_DEVICE_CASES = [c for c in _ARG_CASES if sum(n is not None for n in OP_CASES[c[0]][2]) > 1]


@pytest.mark.parametrize(
    "name, i, arg", _DEVICE_CASES, ids=[f"{n}-{a}" for n, _, a in _DEVICE_CASES]
)
def test_op_rejects_wrong_device(name, i, arg):
    """One argument on another device than the others.

    Without a second real device here, the other device is ``meta``. A meta argument makes the
    dispatcher run the op's fake kernel instead of its body, so the body (validation, then the
    backend) is called directly: it is exactly what runs for CPU and CUDA tensors. The same
    mismatch through the public op with real CUDA tensors: ``test_op_rejects_cuda_cpu_mix``.
    """
    fn, args, _ = OP_CASES[name]
    bad = list(args)
    bad[i] = args[i].to("meta")
    with pytest.raises(
        OpInputError, match=r"is on (meta|cpu) but the input is on (cpu|meta); use one device"
    ):
        fn._init_fn(*bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "name, i, arg", _DEVICE_CASES, ids=[f"{n}-{a}" for n, _, a in _DEVICE_CASES]
)
def test_op_rejects_cuda_cpu_mix(name, i, arg):
    fn, args, _ = OP_CASES[name]
    cuda = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    bad = list(cuda)
    bad[i] = args[i]  # this one stays on the CPU
    with pytest.raises(OpInputError, match="but the input is on|is on cpu"):
        fn(*bad)


#: ops that take any strides (they keep their input's memory format)
_ANY_STRIDES = {"quantize_codes", "dequantize_codes", "max_pool2d_codes"}
_NONCONTIG_CASES = [
    c for c in _ARG_CASES if OP_CASES[c[0]][1][c[1]].dim() > 0 and c[0] not in _ANY_STRIDES
]


@pytest.mark.parametrize(
    "name, i, arg", _NONCONTIG_CASES, ids=[f"{n}-{a}" for n, _, a in _NONCONTIG_CASES]
)
def test_op_rejects_non_contiguous(name, i, arg):
    fn, args, _ = OP_CASES[name]
    bad = list(args)
    bad[i] = _non_contiguous(args[i])
    with pytest.raises(
        OpInputError, match=rf"{arg} must be contiguous \(call .contiguous\(\) first\)"
    ):
        fn(*bad)


_DELTA_OPS = [
    "fake_quant_act",
    "fake_quant_act_backward",
    "adaround_soft",
    "adaround_soft_backward",
]


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf")])
@pytest.mark.parametrize("name", _DELTA_OPS)
def test_op_rejects_zero_negative_nan_inf_step(name, value):
    fn, args, names = OP_CASES[name]
    i = names.index("delta")
    bad = list(args)
    d = args[i].clone()
    d[1] = value
    bad[i] = d
    with pytest.raises(
        OpInputError, match=r"delta \(the quantization step\) must be finite and > 0; got 1 invalid"
    ):
        fn(*bad)


def test_op_per_tensor_zero_step_and_mse_search_nan():
    x = torch.randn(4, 6)
    with pytest.raises(OpInputError, match=r"must be finite and > 0.*\[0.0\]"):
        ops.fake_quant_act(x, torch.tensor(0.0), torch.tensor(0.0), 4, 0, 1.0, None, None)
    x[0, 0] = float("nan")
    with pytest.raises(OpInputError, match="x contains NaN or Inf; the search needs finite values"):
        ops.mse_search_2d(x, 4, 10)


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_op_invalid_step_inside_deferred_checks_is_reported_when_the_block_ends(bad):
    """Inside ``ops.deferred_checks()`` a step is checked without reading it back (on a GPU:
    without a host sync): the call runs, and the outermost block raises when it ends. Nested
    blocks check once, at the outermost; an exception raised inside is not masked by it; a
    clean block raises nothing and leaves nothing pending."""
    x = torch.randn(4, 6)
    z = torch.tensor(0.0)
    with ops.deferred_checks():
        ops.fake_quant_act(x, torch.tensor(0.25), z, 4, 0, 1.0, None, None)
    with pytest.raises(
        OpInputError, match=r"an invalid value reached a fake-quant or AdaRound op on cpu"
    ):
        with ops.deferred_checks():
            with ops.deferred_checks():
                y = ops.fake_quant_act(x, torch.tensor(bad), z, 4, 0, 1.0, None, None)
            assert y.shape == x.shape  # the inner block ended: nothing raised yet
    with pytest.raises(KeyError):  # the caller's own error wins; the pending verdict is dropped
        with ops.deferred_checks():
            ops.fake_quant_act(x, torch.tensor(bad), z, 4, 0, 1.0, None, None)
            raise KeyError("first")
    ops.check_deferred()  # nothing pending after either block


@pytest.mark.parametrize(
    "x_min,x_max,match",
    [
        ("lo", None, "give both x_min and x_max"),
        (None, "hi", "give both x_min and x_max"),
        ("lo64", "hi", r"x_min must be torch.float32"),
        ("short", "hi", r"x_min must have shape \[C\] = \(4,\)"),
        ("lo", "hi2d", r"x_max must have shape \[C\]"),
        ("nan", "hi", "x_min contains NaN or Inf"),
        ("lo", "inf", "x_max contains NaN or Inf"),
        ("inside", "hi", "must contain every element of their row"),
        ("lo", "inside_hi", "must contain every element of their row"),
    ],
)
def test_mse_search_bad_range(x_min, x_max, match):
    """The optional clip range of ``mse_search_2d``: both or neither, float32 ``[C]``, finite,
    containing its row; each mistake is named, none reaches a kernel."""
    x = torch.randn(4, 6)
    lo, hi = x.amin(dim=1) - 1, x.amax(dim=1) + 1
    pick = {
        None: None,
        "lo": lo,
        "hi": hi,
        "lo64": lo.double(),
        "short": lo[:3],
        "hi2d": hi[None],
        "nan": torch.where(torch.arange(4) == 2, float("nan"), lo),
        "inf": torch.where(torch.arange(4) == 1, float("inf"), hi),
        "inside": x.amin(dim=1) + 0.01,
        "inside_hi": x.amax(dim=1) - 0.01,
    }
    with pytest.raises(OpInputError, match=match):
        ops.mse_search_2d(x, 4, 10, pick[x_min], pick[x_max])
