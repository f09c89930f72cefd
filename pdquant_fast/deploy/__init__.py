"""Packed 2/4-bit deployment: export a calibrated model, load it, run it with integer kernels.

* :func:`export_packed` (:mod:`.export`): calibrated model or run folder -> ``manifest.json`` +
  ``weights.safetensors`` (format and bit layout in :mod:`.format`, ``docs/DEPLOY.md``);
* :func:`load_packed` (:mod:`.load`): verified load -> :class:`PackedModel` (:mod:`.runtime`),
  which needs neither the calibration code nor the model definition.
"""

from .export import export_packed
from .format import FORMAT_VERSION, DeployError
from .load import load_packed
from .runtime import PackedModel

__all__ = ["FORMAT_VERSION", "DeployError", "PackedModel", "export_packed", "load_packed"]
