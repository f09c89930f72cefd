"""CIFAR-10 ResNets (He et al. 2016, §4.2) in the layout of akamaster/pytorch_resnet_cifar10.

Depth ``6n + 2``: a 3x3 stem (3 -> 16), three stages of ``n`` :class:`BasicBlock` (widths 16, 32,
64; the first block of stages 2 and 3 has stride 2), global average pooling over the final 8x8 map
and ``Linear(64 -> num_classes)``. Shortcuts are "option A": parameter-free, stride-2 subsampling
plus zero channel padding where the shape changes, identity otherwise. Attribute names match the
akamaster checkpoints (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv{1,2}``, ``...bn{1,2}``,
``linear``), so its ``.th`` files load strictly after stripping the ``module.`` prefix.

Every ReLU is its own ``nn.ReLU`` module (``relu`` for the stem, ``relu1``/``relu2`` in each
block) and the shortcut is an ``nn.Module``, so ``torch.fx.symbolic_trace`` sees the whole model
and activation quantizers can be attached per call site.

This file also holds the weight-file helpers shared with :mod:`pdquant_fast.models.efficientnet`:
:class:`WeightsError`, :func:`read_state_dict` and :func:`load_state_dict_strict`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "ShortcutA",
    "WeightsError",
    "check_cifar_depth",
    "load_cifar_resnet_weights",
    "load_state_dict_strict",
    "read_state_dict",
]

BN_EPS = 1e-5


class WeightsError(ValueError):
    """A weights file cannot be read, or does not fit the model it is loaded into."""


def check_cifar_depth(depth: int) -> int:
    """Return ``(depth - 2) // 6`` (blocks per stage), or raise ValueError if depth != 6n + 2."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"unsupported CIFAR ResNet depth {depth!r}: the depth must be 6n+2 with n >= 1 "
            "(8, 14, 20, 26, 32, 38, 44, 50, 56, ..., 110)"
        )
    return (depth - 2) // 6


class ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut for a block that halves H, W and changes width.

    Input ``[N, C, H, W]`` float; output ``[N, C + 2 * pad, ceil(H/2), ceil(W/2)]`` where
    ``pad = planes // 4``: ``x[:, :, ::2, ::2]`` zero-padded by ``pad`` channels on each side.
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN -> (+ shortcut) -> ReLU.

    Input ``[N, in_planes, H, W]`` float32; output ``[N, planes, H / stride, W / stride]``.
    ``shortcut`` is ``nn.Identity`` when shape is unchanged, else :class:`ShortcutA`.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ShortcutA(planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` (ResNet-20: n = 3, ResNet-56: n = 9).

    Input ``[N, 3, 32, 32]`` float32 (RGB in [0, 1], ImageNet mean/std normalised; any H, W
    divisible by 4 works); output logits ``[N, num_classes]`` float32.

    Raises ValueError when ``depth`` is not of the form 6n+2.
    """

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        n = check_cifar_depth(depth)
        self.depth = depth
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16, eps=BN_EPS)
        self.relu = nn.ReLU()
        self._in_planes = 16
        self.layer1 = self._make_stage(16, n, stride=1)
        self.layer2 = self._make_stage(32, n, stride=2)
        self.layer3 = self._make_stage(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self._in_planes, planes, s))
            self._in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.linear(x)

    @property
    def name(self) -> str:
        """Registry name, e.g. ``"cifar_resnet20"``."""
        return f"cifar_resnet{self.depth}"


# ----------------------------------------------------------------------------- weight files

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file into a plain ``{name: tensor}`` dict (CPU, ``weights_only=True``).

    Accepts a plain state dict or a checkpoint dict holding one under ``"state_dict"``,
    ``"model_state_dict"`` or ``"model"``; strips a ``module.`` (DataParallel) prefix.
    Raises :class:`WeightsError` naming the file if it is missing, unreadable or holds no
    tensors.
    """
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"weights file {p} does not exist")
    if not p.is_file():
        raise WeightsError(f"weights path {p} is not a file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/foreign files
        raise WeightsError(
            f"cannot read weights file {p}: {_load_failure(exc)} "
            "(expected a PyTorch state dict saved with torch.save; it is read with "
            "weights_only=True)"
        ) from exc
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            f"weights file {p} does not hold a state dict (found {type(obj).__name__})"
        )
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(
            f"weights file {p} holds no tensors (top-level keys: {_first(list(obj.keys()))})"
        )
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _load_failure(exc: Exception) -> str:
    """One line saying why torch.load failed (its weights-only messages span a paragraph)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = " ".join(text.split(marker, 1)[1].split("Check the documentation")[0].split())
        return f"not a plain tensor checkpoint ({detail})"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first[:200]}"


def _first(items: list, k: int = 4) -> str:
    shown = ", ".join(str(i) for i in items[:k])
    return shown + (f", ... ({len(items)} in all)" if len(items) > k else "")


_LAYER_KEY = re.compile(r"^layer([123])\.(\d+)\.")


def describe_checkpoint(state: Mapping[str, torch.Tensor]) -> str:
    """Guess which architecture a state dict belongs to, for error messages."""
    blocks = [int(m.group(2)) for k in state if (m := _LAYER_KEY.match(k)) and m.group(1) == "1"]
    if blocks and "linear.weight" in state:
        n = max(blocks) + 1
        return f"{6 * n + 2}-layer CIFAR ResNet keys (layer1.{n - 1}...)"
    if "_conv_stem.weight" in state:
        n = len({k.split(".")[1] for k in state if k.startswith("_blocks.")})
        return f"EfficientNet keys (_conv_stem, {n} _blocks)"
    return f"keys {_first(sorted(state))}"


def load_state_dict_strict(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, model_name: str
) -> None:
    """Strictly load ``state`` into ``model``; on any mismatch raise :class:`WeightsError`.

    Missing ``*.num_batches_tracked`` buffers (old checkpoints) are filled from the model. The
    message names the file, what the file looks like, the model name, and summarises missing
    and unexpected keys and shape mismatches (first few of each).
    """
    expected = model.state_dict()
    found = describe_checkpoint(state)
    state = dict(state)
    for k, v in expected.items():
        prefix = k[: -len("num_batches_tracked")]
        if (
            k.endswith("num_batches_tracked")
            and k not in state
            and prefix + "running_mean" in state
        ):
            state[k] = v.clone()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_first(shapes, 3)}")
        raise WeightsError(
            f"weights file {path} has {found} but the model is {model_name}; " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=True)


def load_cifar_resnet_weights(model: CifarResNet, path: str | Path) -> CifarResNet:
    """Load an akamaster-style checkpoint into ``model`` (strict); return the model.

    ``path`` may hold ``{"state_dict": ...}`` or a plain state dict, keys optionally prefixed by
    ``module.``. Raises :class:`WeightsError` if the file is unreadable or its keys/shapes do
    not match, e.g. "weights file X has 56-layer CIFAR ResNet keys (layer1.8...) but the model
    is cifar_resnet20; unexpected keys: ...".
    """
    state = read_state_dict(path)
    name = model.name if isinstance(model, CifarResNet) else type(model).__name__
    load_state_dict_strict(model, state, path, name)
    return model
