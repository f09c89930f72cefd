"""benchmarks/bench_model_layers.py: a packed model's per-layer times (in the model, warm, cold)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_model_layers  # noqa: E402


def test_times_chosen_layers_with_their_real_inputs(tmp_path):
    argv = "--model cifar_resnet20 --batch 2 --repeat 2 --layers layer1.0.conv1 layer1.0.conv2"
    rows = bench_model_layers.main(argv.split() + ["--out", str(tmp_path)])
    assert [r["layer"] for r in rows] == ["layer1.0.conv1", "layer1.0.conv2"]
    # conv2 of a CIFAR block gets the block input as residual codes, conv1 none
    assert [r["residual"] for r in rows] == [False, True]
    assert all(r["x_shape"] == "2x16x32x32" for r in rows)
    for r in rows:
        assert r["bits"] == "W4A4-in8"
        assert 0 < r["warm_ms"] and 0 < r["cold_ms"] and 0 < r["in_model_ms"]
    lines = (tmp_path / "model_layers.jsonl").read_text().splitlines()
    written = [json.loads(line) for line in lines]
    assert [w["layer"] for w in written] == ["layer1.0.conv1", "layer1.0.conv2"]


def test_rejects_unknown_layers_and_bad_counts(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_model_layers.main(["--batch", "2", "--layers", "nope", "--out", str(tmp_path)])
    assert "are not packed layers of cifar_resnet20" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_model_layers.main(["--batch", "0", "--out", str(tmp_path)])
    assert "must be >= 1" in capsys.readouterr().err
