"""Import torchvision's *model definitions* beside a CPU-only torch.

PyPI's torchvision wheel is built against CUDA torch; its compiled ops (``torchvision::nms``
...) cannot load beside the CPU wheel, and ``import torchvision`` then fails while registering
fake kernels for ``nms``/``qnms``. Declaring those two schemas first lets the pure-Python model
definitions import; no detection op is ever called. Returns None where torchvision is absent.
"""

import torch


def import_torchvision_models():
    try:
        import torchvision.models as tvm  # noqa: F401

        return tvm
    except ImportError:
        return None
    except RuntimeError:
        pass
    try:
        lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - must stay alive
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(lib)
        import sys

        for mod in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[mod]
        import torchvision.models as tvm

        return tvm
    except Exception:
        return None


_KEEP: list = []
