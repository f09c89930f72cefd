"""Load and verify a packed model folder: ``load_packed(dir) -> PackedModel``.

Checks, in order, each failure a :class:`DeployError` naming the file and what is wrong:
the manifest exists, is JSON, is a ``pdquant-packed`` manifest of a supported version with every
field; the tensor file exists, has the recorded size and parses as safetensors (truncated files
fail here); it holds exactly the recorded tensors, each with the recorded dtype, shape and
sha256; every layer's tensors are consistent with its recorded weight shape and bit-width; every
graph node names known ops, layers, quantizers and earlier nodes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from . import memory
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LAYER_KEYS,
    MANIFEST_FILE,
    MANIFEST_KEYS,
    DeployError,
    check_keys,
    dtype_name,
    packed_shape,
    storage_bits,
    tensor_sha256,
)
from .runtime import FLOAT_ACTS, GLUE, PACKED_ACTS, PackedModel, _refs


def read_manifest(folder: Path) -> dict:
    """Parse and check ``folder/manifest.json`` (format, version, fields)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise DeployError(f"{path}: missing (not a packed model folder written by export)")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeployError(f"{path}: not valid JSON ({exc}); the file is corrupted") from exc
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise DeployError(f"{path}: format is {got!r}, expected {FORMAT_NAME!r}")
    if m.get("version") != FORMAT_VERSION:
        raise DeployError(
            f"{path}: format version {m.get('version')!r} is not supported (this library "
            f"reads version {FORMAT_VERSION}); re-export the model with this library"
        )
    check_keys(m, MANIFEST_KEYS, str(path))
    for name, spec in m["layers"].items():
        check_keys(spec, LAYER_KEYS, f"{path}: layer {name}")
    return m


def _check_layers(m: dict, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Each layer's tensors must match its weight shape and bit-width."""
    for name, spec in m["layers"].items():
        shape = spec["weight_shape"]
        if spec["kind"] not in ("conv2d", "linear") or len(shape) != (
            4 if spec["kind"] == "conv2d" else 2
        ):
            raise DeployError(
                f"{where}: layer {name}: kind {spec['kind']!r} with weight shape "
                f"{shape} is not a conv2d [O, C/g, kh, kw] or linear [O, K]"
            )
        if storage_bits(spec["w_bits"]) != spec["storage_bits"]:
            raise DeployError(
                f"{where}: layer {name}: {spec['w_bits']}-bit weights cannot be "
                f"stored in {spec['storage_bits']}-bit containers"
            )
        t = spec["tensors"]
        for key in ("weight", "w_delta", "w_zp", "bias"):
            if t.get(key) not in tensors:
                raise DeployError(
                    f"{where}: layer {name}: tensor '{t.get(key)}' ({key}) is "
                    "missing from the tensor file"
                )
        want = packed_shape(shape, spec["storage_bits"])
        got = list(tensors[t["weight"]].shape)
        if got != want:
            raise DeployError(
                f"{where}: layer {name}: packed weight '{t['weight']}' has shape {got}, but "
                f"weight_shape {shape} at {spec['storage_bits']} bits needs {want}"
            )
        for key in ("w_delta", "w_zp", "bias"):
            if list(tensors[t[key]].shape) != [shape[0]]:
                raise DeployError(
                    f"{where}: layer {name}: '{t[key]}' has shape "
                    f"{list(tensors[t[key]].shape)}, expected [{shape[0]}] (one per output)"
                )
        if spec["kind"] == "conv2d":
            cin_g = shape[1]
            if spec["groups"] < 1 or len(spec["stride"]) != 2 or len(spec["padding"]) != 2:
                raise DeployError(f"{where}: layer {name}: bad stride/padding/groups")
            if math.prod(shape[1:]) != cin_g * shape[2] * shape[3]:
                raise DeployError(f"{where}: layer {name}: inconsistent weight shape {shape}")


def _check_graph(m: dict, where: str) -> None:
    seen: set[str] = set()
    for i, node in enumerate(m["graph"]):
        if not isinstance(node, dict) or "name" not in node or "op" not in node:
            raise DeployError(f"{where}: graph node {i} lacks a name or op")
        op = node["op"]
        refs = []
        if op in ("quantize", "dequantize"):
            refs = [node["input"]]
            if node["act"] not in m["acts"]:
                raise DeployError(f"{where}: node {node['name']}: unknown quantizer {node['act']}")
        elif op in ("layer_packed", "layer_float"):
            if node["layer"] not in m["layers"]:
                raise DeployError(f"{where}: node {node['name']}: unknown layer {node['layer']}")
            acts = PACKED_ACTS if op == "layer_packed" else FLOAT_ACTS
            if node["act"] not in acts:
                raise DeployError(
                    f"{where}: node {node['name']}: activation {node['act']!r} "
                    f"not one of {sorted(acts)}"
                )
            refs = [node["input"]] + ([node["residual"]] if node.get("residual") else [])
            for key in ("in_act", "out_act"):
                if node.get(key) and node[key] not in m["acts"]:
                    raise DeployError(
                        f"{where}: node {node['name']}: unknown quantizer {node[key]}"
                    )
            if op == "layer_packed" and not node.get("in_act"):
                raise DeployError(f"{where}: node {node['name']}: packed layer without in_act")
        elif op == "glue":
            if node["fn"] not in GLUE:
                raise DeployError(
                    f"{where}: node {node['name']}: unknown glue function {node['fn']!r}"
                )
            refs = _refs(node["args"]) + _refs(list(node["kwargs"].values()))
        elif op != "input":
            raise DeployError(f"{where}: node {node['name']}: unknown op {op!r}")
        for r in refs:
            if r not in seen:
                raise DeployError(f"{where}: node {node['name']} uses '{r}' before it is defined")
        seen.add(node["name"])
    if m["output"] not in seen:
        raise DeployError(f"{where}: output '{m['output']}' is not a graph node")


def read_tensors(folder: Path, m: dict) -> dict[str, torch.Tensor]:
    """Read and verify the tensor file against the manifest (size, parse, names, dtype, shape,
    sha256)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(folder) / m["tensor_file"]
    if not path.is_file():
        raise DeployError(f"{path}: missing (the manifest refers to it)")
    data = path.read_bytes()
    if len(data) != m["tensor_file_bytes"]:
        raise DeployError(
            f"{path}: {len(data)} bytes, the manifest recorded {m['tensor_file_bytes']} "
            "(truncated or replaced file)"
        )
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise DeployError(f"{path}: not a readable safetensors file ({exc})") from exc
    want, got = set(m["tensors"]), set(tensors)
    if want - got:
        raise DeployError(f"{path}: tensors {sorted(want - got)[:4]} are missing")
    if got - want:
        raise DeployError(f"{path}: tensors {sorted(got - want)[:4]} are not in the manifest")
    for name, rec in m["tensors"].items():
        t = tensors[name]
        if dtype_name(t) != rec["dtype"] or list(t.shape) != rec["shape"]:
            raise DeployError(
                f"{path}: tensor '{name}' is {dtype_name(t)} {list(t.shape)}, the manifest "
                f"says {rec['dtype']} {rec['shape']}"
            )
        if tensor_sha256(t) != rec["sha256"]:
            raise DeployError(f"{path}: tensor '{name}' fails its sha256 check (corrupted data)")
    return tensors


def load_packed(
    folder,
    device: str | torch.device = "cpu",
    memory_format: str = "auto",
    tune_malloc: bool | None = None,
) -> PackedModel:
    """Verify ``folder`` (see the module docstring) and build the :class:`PackedModel` on
    ``device`` (``memory_format``: its activation layout, see :class:`PackedModel`). Raises
    :class:`DeployError` naming the file and the problem.

    ``tune_malloc`` (default: ``PDQUANT_TUNE_MALLOC``, on unless ``0``): for a CPU model, keep
    freed feature-map memory in the process between forwards (glibc ``mallopt``, process-wide;
    :mod:`pdquant_fast.deploy.memory`), which removes thousands of page faults per forward."""
    try:
        want_tune = memory.tune_malloc_enabled(tune_malloc)
    except ValueError as exc:
        raise DeployError(str(exc)) from None
    folder = Path(folder)
    if not folder.is_dir():
        raise DeployError(f"{folder}: not a folder (expected a packed model folder)")
    m = read_manifest(folder)
    tensors = read_tensors(folder, m)
    where = str(folder / MANIFEST_FILE)
    _check_layers(m, tensors, where)
    _check_graph(m, where)
    model = PackedModel(m, tensors, memory_format=memory_format).to(device).eval()
    if want_tune and torch.device(device).type == "cpu":
        memory.tune_malloc()
    return model
