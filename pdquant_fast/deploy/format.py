"""The packed deployment format: weight packing helpers, manifest schema and version.

A packed model is a folder with two files::

    DIR/manifest.json          what the model is (schema below), versioned
    DIR/weights.safetensors    every tensor: packed weight codes, per-channel scales, biases

Weight storage (one row per output channel, rows padded to whole bytes; conv weights
``[O, C/g, kh, kw]`` are stored as ``[O, C/g*kh*kw]``), little-endian within a byte::

    4-bit   byte b of row o:  bit 7 ... 4 | 3 ... 0        = codes[o, 2b+1] | codes[o, 2b]
    2-bit   byte b of row o:  7 6 | 5 4 | 3 2 | 1 0        = codes[o, 4b+3] | ... | codes[o, 4b]
    8-bit   one code per byte

A weight code ``c`` in ``0 .. 2^w_bits - 1`` dequantizes to ``(c - w_zp[o]) * w_delta[o]``;
3-bit weights are stored in 4-bit containers (``storage_bits``). An activation code ``a`` in
``0 .. 2^a_bits - 1`` dequantizes to ``(a - zp) * delta`` (per tensor).

Manifest (JSON, ``FORMAT_VERSION`` 1)::

    format              "pdquant-packed"
    version             1
    library             pdquant-fast version that wrote it
    model               {name, num_classes, input_size, weights_sha256}  (reference only: the
                        packed runtime rebuilds the network from "graph", not from the name)
    source              {method, w_bits, a_bits, run_dir, config}  (what produced it; may be {})
    tensor_file         "weights.safetensors"
    tensor_file_bytes   size of that file
    tensors             {tensor name: {dtype, shape, sha256}}  sha256 of the raw little-endian bytes
    layers              {layer name: {kind: conv2d|linear, weight_shape, w_bits, storage_bits,
                         stride, padding, pre_pad, groups, tensors: {weight, w_delta, w_zp, bias}}}
    acts                {quantizer name: {bits, delta, zp}}  delta: float32 value as a JSON number
    graph               [node, ...] in execution order (see pdquant_fast.deploy.runtime)
    output              name of the graph node holding the logits
    sizes               {packed_bytes, fp32_state_dict_bytes, fp32_checkpoint_bytes, ratio}
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..ops.library import packed_row_bytes

FORMAT_NAME = "pdquant-packed"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSOR_FILE = "weights.safetensors"

#: Storage container for each weight bit-width (3-bit codes go into 4-bit nibbles).
STORAGE_BITS = {2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}

#: Top-level manifest keys and their JSON types (checked on load).
MANIFEST_KEYS = {
    "format": str,
    "version": int,
    "library": str,
    "model": dict,
    "source": dict,
    "tensor_file": str,
    "tensor_file_bytes": int,
    "tensors": dict,
    "layers": dict,
    "acts": dict,
    "graph": list,
    "output": str,
    "sizes": dict,
}

#: Per-layer manifest keys.
LAYER_KEYS = {
    "kind": str,
    "weight_shape": list,
    "w_bits": int,
    "storage_bits": int,
    "stride": list,
    "padding": list,
    "pre_pad": (list, type(None)),
    "groups": int,
    "tensors": dict,
}

DTYPE_NAMES = {
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.float32: "float32",
}


class DeployError(ValueError):
    """A packed model cannot be written or read (the message names the file and the problem)."""


def storage_bits(w_bits: int) -> int:
    """Container width for ``w_bits``-bit weight codes: 2 -> 2, 3/4 -> 4, 5..8 -> 8."""
    if w_bits not in STORAGE_BITS:
        raise DeployError(
            f"weight bit-width {w_bits} cannot be packed; supported: {sorted(STORAGE_BITS)}"
        )
    return STORAGE_BITS[w_bits]


def pack_weight_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer weight codes ``[O, ...]`` (any integer or integer-valued float dtype) into
    uint8 ``[O, ceil(K * bits / 8)]`` with ``K = prod(shape[1:])`` (:func:`pdquant_fast.ops.pack`).
    """
    from .. import ops

    c = codes.reshape(codes.shape[0], -1)
    if c.is_floating_point():
        if not torch.equal(c, torch.round(c)):
            raise DeployError("weight codes must be integers")
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > (1 << bits) - 1):
        raise DeployError(
            f"weight codes must lie in 0..{(1 << bits) - 1} for {bits}-bit storage, found "
            f"{int(c.min())}..{int(c.max())}"
        )
    return ops.pack(c.to(torch.uint8).contiguous().cpu(), bits)


def unpack_weight_codes(packed: torch.Tensor, bits: int, shape: list[int]) -> torch.Tensor:
    """Inverse of :func:`pack_weight_codes`: uint8 codes of ``shape`` ``[O, ...]``."""
    from .. import ops

    k = math.prod(shape[1:])
    return ops.unpack(packed.contiguous(), bits, k).reshape(shape)


def packed_shape(weight_shape: list[int], bits: int) -> list[int]:
    """Shape of the stored packed weight: ``[O, ceil(prod(weight_shape[1:]) * bits / 8)]``."""
    return [weight_shape[0], packed_row_bytes(math.prod(weight_shape[1:]), bits)]


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of the tensor's raw bytes (contiguous, native little-endian, row-major)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def dtype_name(t: torch.Tensor) -> str:
    if t.dtype not in DTYPE_NAMES:
        raise DeployError(f"tensor dtype {t.dtype} is not part of the packed format")
    return DTYPE_NAMES[t.dtype]


def check_keys(obj: dict, schema: dict, where: str) -> None:
    """Raise :class:`DeployError` naming ``where`` if ``obj`` lacks a key or has a wrong type."""
    if not isinstance(obj, dict):
        raise DeployError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key, typ in schema.items():
        if key not in obj:
            raise DeployError(f"{where}: missing field '{key}'")
        if not isinstance(obj[key], typ) or (typ is int and isinstance(obj[key], bool)):
            raise DeployError(
                f"{where}: field '{key}' has type {type(obj[key]).__name__}, expected "
                f"{getattr(typ, '__name__', typ)}"
            )
