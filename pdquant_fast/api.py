"""One-call Python API: ``quantize(model, calib, method=..., w_bits=..., a_bits=...)``."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import fx, nn

from .config import CalibConfig, make_config
from .engine import Calibrator, CalibReport
from .graph import build_unit_model
from .qmodel import QuantLayer, QuantSettings, build_quant_model
from .quant import ActQuantizer

STATE_VERSION = 1


def collect_images(calib, limit: int | None = None) -> torch.Tensor:
    """Stack calibration images into float32 ``[N, C, H, W]``.

    Accepts a tensor, a ``Dataset`` of ``image`` or ``(image, label)`` items, or an iterable of
    batches (e.g. a ``DataLoader``).
    """
    if isinstance(calib, torch.Tensor):
        x = calib
    elif hasattr(calib, "__getitem__") and hasattr(calib, "__len__"):
        # filled in place: the images never exist twice in memory
        n = len(calib) if limit is None else min(limit, len(calib))
        if n == 0:
            raise ValueError("the calibration data is empty")
        x = None
        for i in range(n):
            it = calib[i]
            img = it[0] if isinstance(it, (tuple, list)) else it
            if not isinstance(img, torch.Tensor):
                raise ValueError(
                    f"calibration item {i} is a {type(img).__name__}, not an image tensor"
                )
            if x is None:
                x = torch.empty((n, *img.shape), dtype=img.dtype, device=img.device)
            elif img.shape != x.shape[1:]:
                raise ValueError(
                    f"calibration image {i} has shape {tuple(img.shape)} but image 0 has "
                    f"{tuple(x.shape[1:])}; all images must have one shape"
                )
            x[i] = img
    else:
        items = []
        for batch in calib:
            b = batch[0] if isinstance(batch, (tuple, list)) else batch
            items.append(b if b.dim() == 4 else b[None])
        if not items:
            raise ValueError("the calibration data is empty")
        x = torch.cat(items)
    if limit is not None:
        x = x[:limit]
    if x.dim() >= 1 and x.shape[0] == 0:
        raise ValueError("the calibration data holds 0 images; at least 1 is needed")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            f"calibration images must be a float tensor [N, C, H, W], got {tuple(x.shape)} "
            f"{x.dtype}"
        )
    return x.float().contiguous()


def quantize(
    model: nn.Module,
    calib,
    method: str = "pdquant",
    w_bits: int = 4,
    a_bits: int = 4,
    *,
    preset: str | None = None,
    log: Callable[[str], None] | None = print,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    cache: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    **overrides,
) -> tuple[fx.GraphModule, CalibReport]:
    """Calibrate ``model`` with ``method`` and return ``(quantized_model, report)``.

    Args:
        model: an ``nn.Module`` classifier (not modified).
        calib: calibration images: float32 ``[N, C, H, W]`` tensor, Dataset or DataLoader,
            preprocessed as the model expects. The calibration runs where the model and images
            are: on a GPU, put the model there (``model.cuda()``); images from a Dataset or
            DataLoader follow it, a tensor must be on the model's device already.
        method: ``rtn`` | ``adaround`` | ``brecq`` | ``qdrop`` | ``pdquant``.
        w_bits, a_bits: 2, 3, 4 or 8.
        preset: ``resnet`` | ``regnet`` | ``mobilenet`` | ``mnasnet`` hyper-parameters (spec §4).
        checkpoint_dir: write a checkpoint into this folder after weight initialisation and
            after every reconstruction unit (atomic; see :mod:`pdquant_fast.checkpoint`).
        resume: a ``checkpoint_dir`` of an interrupted call with the same model, images and
            settings: continue from its last finished unit (and keep checkpointing there). The
            result is bit-identical (CPU) to an uninterrupted run; a folder from a different
            calibration raises :class:`~pdquant_fast.checkpoint.CheckpointError` naming the
            differing keys.
        cache: where per-unit inputs and targets live: ``auto`` (from free memory), ``device``,
            ``host`` or ``disk`` (see :mod:`pdquant_fast.cache`); ``cache_dir``: scratch
            folder for ``disk``.
        **overrides: any :class:`~pdquant_fast.config.CalibConfig` field (``iters``, ``seed``,
            ``temperature``, ``pd_loss``, ``dist_correction``, ...).

    The returned model is a ``torch.fx.GraphModule`` that runs with fake-quantized weights and
    activations (weights: hard AdaRound rounding; activations: learned steps, no QDrop).
    """
    cfg = make_config(method, preset=preset, w_bits=w_bits, a_bits=a_bits, **overrides)
    if resume is not None:
        if checkpoint_dir is not None and Path(checkpoint_dir) != Path(resume):
            raise ValueError(
                f"resume={str(resume)!r} and checkpoint_dir={str(checkpoint_dir)!r} differ; "
                "a resumed run keeps checkpointing into the folder it resumes from"
            )
        checkpoint_dir = resume
    images = collect_images(calib)
    if not isinstance(calib, torch.Tensor):
        # images gathered from a Dataset/DataLoader go where the model is (a tensor the caller
        # passed is taken as it is: the engine names a device mismatch)
        devs = {t.device for t in model.parameters()}
        if len(devs) == 1:
            images = images.to(devs.pop())
    cal = Calibrator(
        model,
        images,  # not kept here, so that a disk cache can drop it
        cfg,
        log=log,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
        resume=resume is not None,
        cache=cache,
        cache_dir=cache_dir,
    )
    return cal.run()


def build_quantized_skeleton(model: nn.Module, cfg: CalibConfig) -> fx.GraphModule:
    """The quantized model structure for ``cfg`` (uninitialised), for loading a saved state."""
    top, units = build_unit_model(model)
    s = QuantSettings(
        cfg.w_bits,
        cfg.a_bits,
        cfg.first_layer_w_bits,
        cfg.last_layer_w_bits,
        cfg.head_input_a_bits,
        input_a_bits=cfg.input_a_bits,
    )
    return build_quant_model(top, units, s)


def quant_state(q: nn.Module) -> dict:
    """Quantizer parameters of a calibrated model (no FP weights): a plain dict of tensors."""
    out: dict = {"version": STATE_VERSION, "layers": {}, "acts": {}}
    for name, m in q.named_modules():
        if isinstance(m, QuantLayer):
            wq = m.wq
            out["layers"][name] = {
                "bits": wq.bits,
                "mode": wq.mode,
                "delta": wq.delta.clone(),
                "zp": wq.zp.clone(),
                "round_up": (wq.alpha >= 0).to(torch.uint8) if wq.alpha is not None else None,
            }
        elif isinstance(m, ActQuantizer):
            out["acts"][name] = {
                "bits": m.bits,
                "initialised": m.initialised,
                "enabled": m.enabled,
                "signed": m.signed,
                "delta": m.delta.detach().clone(),
                "zp": m.zp.clone(),
            }
    return out


def load_quant_state(q: nn.Module, state: dict) -> nn.Module:
    """Install a :func:`quant_state` into a skeleton from :func:`build_quantized_skeleton`."""
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"quantizer state version {state.get('version')!r} is not supported "
            f"(this library reads version {STATE_VERSION})"
        )
    mods = dict(q.named_modules())
    missing = [k for k in list(state["layers"]) + list(state["acts"]) if k not in mods]
    if missing:
        raise ValueError(f"quantizer state does not match the model: unknown modules {missing[:4]}")
    # a state read with map_location="cpu" (files, checkpoints) goes to where each module is
    for name, st in state["layers"].items():
        m = mods[name]
        dev = m.org_weight.device
        m.wq.bits = st["bits"]
        m.wq.delta = st["delta"].to(dev, copy=True)
        m.wq.zp = st["zp"].to(dev, copy=True)
        if st["mode"] == "hard":
            up = st["round_up"].to(dev).float()
            m.wq.alpha = nn.Parameter(up * 2 - 1, requires_grad=False)  # sign encodes rounding
        m.wq.mode = st["mode"]
        m.weight_quant = True
    for name, st in state["acts"].items():
        a = mods[name]
        dev = a.delta.device
        a.bits = st["bits"]
        a.delta.data = st["delta"].to(dev, copy=True)
        a.zp = st["zp"].to(dev, copy=True)
        a.initialised = st["initialised"]
        a.enabled = st["enabled"]
        a.signed = st["signed"]
    return q.eval()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename (no partial file is left)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_quant_state(q: nn.Module, path: Path) -> None:
    import io

    buf = io.BytesIO()
    torch.save(quant_state(q), buf)
    atomic_write_bytes(Path(path), buf.getvalue())
