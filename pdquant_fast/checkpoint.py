"""Per-unit checkpoints of a calibration, and resuming from them bit-identically.

A checkpoint folder holds::

    manifest.json          written last, atomically: which units are finished, the fingerprint
                           of the run (resolved config, calibration data, model), the name and
                           sha256 of the state file, the per-unit reports
    state_NNNN.pt          torch.save of {quant_state, generator state} after NNNN finished
                           units (NNNN = 0: after weight initialisation); only the latest kept

Every file is written to a hidden temporary file in the same folder, flushed, ``fsync``-ed and
renamed over its final name, then the folder is ``fsync``-ed. The manifest is written after the
state file it names, so a manifest only ever points at a complete state file; a kill at any
point leaves the previous manifest and its state file intact (plus a hidden ``.*.tmp`` or an
orphan newer state file, both removed on resume).

What a unit boundary needs to continue (see :meth:`pdquant_fast.engine.Calibrator.run`):

* the quantizer state of the whole model (:func:`pdquant_fast.api.quant_state`): the weight
  quantizer steps/zero points of every layer (so the weight initialisation is not redone) and
  the final rounding decisions and activation steps of the finished units;
* the engine's ``torch.Generator`` state (batch indices and QDrop masks of later units);
* the cached unit inputs ``X_q``/``X_fp``: not stored; they are rebuilt by forward passes of
  the restored (finished, frozen) units over the calibration images, with the same batches and
  ops as the uninterrupted run, hence bit-identical on CPU. No unit is reconstructed again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
from dataclasses import asdict
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "pdquant-checkpoint"
CHECKPOINT_VERSION = 1
MANIFEST = "manifest.json"
#: Test hook: ``"<where>:<units_done>"`` SIGKILLs this process at that point of a checkpoint
#: write (``state-tmp``: state written to its temporary file, not yet renamed;
#: ``manifest-tmp``: state renamed, manifest written to its temporary file, not renamed;
#: ``saved``: checkpoint complete).
KILL_HOOK_ENV = "PDQUANT_TEST_KILL_AT"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, damaged, or from a different calibration."""


def _kill_hook(where: str, units_done: int) -> None:
    spec = os.environ.get(KILL_HOOK_ENV)
    if spec and spec == f"{where}:{units_done}":
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, hook: tuple[str, int] | None = None) -> None:
    """Write ``data`` to ``path``: hidden temp file in the same folder, fsync, rename, fsync dir.

    ``hook`` names a :data:`KILL_HOOK_ENV` point between the fsync and the rename (tests).
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if hook is not None:
            _kill_hook(*hook)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (contiguous CPU copy, in chunks)."""
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}".encode())
    flat = t.detach().reshape(-1)
    step = 1 << 24
    for i in range(0, flat.numel(), step):
        chunk = flat[i : i + step].cpu().contiguous()
        h.update(chunk.view(torch.uint8).numpy().tobytes() if chunk.numel() else b"")
    return h.hexdigest()


def model_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) of ``model``."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_sha256(t).encode())
    return h.hexdigest()


#: The ops a calibration runs; the kernel backend chosen for each is part of the fingerprint.
CALIB_OPS = (
    "fake_quant_act",
    "fake_quant_act_backward",
    "adaround_soft",
    "adaround_soft_backward",
    "adaround_hard",
    "mse_search_2d",
)


def kernel_backends(device_type: str, w_bits: int, a_bits: int) -> dict[str, str]:
    """``{op: backend}`` that will run each calibration op (the fast kernels and the
    reference reduce in different orders, so a resume with other kernels is not bit-identical).
    """
    from .ops import backends

    out = {}
    for op in CALIB_OPS:
        names = set()
        for bits in sorted({w_bits, a_bits, 8}):
            try:
                names.add(backends.choose(op, device_type, bits)[0])
            except (backends.BackendError, KeyError) as exc:
                names.add(f"unavailable ({exc})")
        out[op] = "+".join(sorted(names))
    return out


def fingerprint(config: dict, calib: torch.Tensor, model: torch.nn.Module, units: list) -> dict:
    """Everything a calibration result depends on, as flat JSON-able keys.

    ``config.<field>`` for each resolved config field, ``calib_sha256``/``calib_shape`` for the
    calibration images, ``model_sha256`` for the FP weights, ``units`` for the unit partition,
    ``device``, ``kernels.<op>`` for the kernel backend of each op, ``torch``/``pdquant`` for the
    software versions. Not included (they do not change the result): cache mode, progress,
    logging. Nor the thread count: bit-identity is guaranteed for the same count (``pdquant
    calibrate --resume`` reuses the saved ``--threads``); 1 and 2 threads gave identical
    ResNet-20 states here, but that is not promised for every CPU and model.
    """
    from . import __version__

    fp = {f"config.{k}": v for k, v in config.items()}
    fp["calib_shape"] = list(calib.shape)
    fp["calib_sha256"] = tensor_sha256(calib)
    fp["model_sha256"] = model_sha256(model)
    fp["units"] = [f"{u.name}:{u.kind}" for u in units]
    fp["device"] = calib.device.type
    kernels = kernel_backends(calib.device.type, config["w_bits"], config["a_bits"])
    fp.update({f"kernels.{op}": b for op, b in kernels.items()})
    fp["torch"] = torch.__version__
    fp["pdquant"] = __version__
    fp["checkpoint_version"] = CHECKPOINT_VERSION
    return fp


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def diff_fingerprints(saved: dict, now: dict) -> list[str]:
    """``["key (checkpoint: a, this run: b)", ...]`` for every key whose value differs."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, "<absent>"), now.get(key, "<absent>")
        if a != b:
            out.append(f"{key} (checkpoint: {_short(a)}, this run: {_short(b)})")
    return out


class Checkpointer:
    """Writes and reads the checkpoints of one calibration in ``folder``.

    Args:
        folder: the checkpoint folder (created if missing).
        fp: :func:`fingerprint` of this run.
    """

    def __init__(self, folder: str | Path, fp: dict):
        self.folder = Path(folder)
        self.fp = fp
        self.fp_sha = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
        self.run_index = 0  # 0: first attempt; +1 per resume
        self.unit_runs: list[int] = []  # which attempt finished each unit
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".probe.{os.getpid()}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CheckpointError(
                f"checkpoint folder {self.folder} is not writable: {exc.strerror or exc}; "
                "give a folder you can write to"
            ) from exc

    # ----------------------------------------------------------------------------- reading
    def read_manifest(self) -> dict:
        """The manifest, checked for format and fingerprint; raises :class:`CheckpointError`."""
        path = self.folder / MANIFEST
        if not path.is_file():
            raise CheckpointError(
                f"{self.folder} holds no checkpoint ({MANIFEST} is missing); resume needs the "
                "output folder of an interrupted calibration"
            )
        try:
            man = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint manifest {path} is unreadable: {exc}") from exc
        if not isinstance(man, dict) or man.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not a pdquant checkpoint manifest")
        if man.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"checkpoint {path} has version {man.get('version')!r}; this library reads "
                f"version {CHECKPOINT_VERSION} (calibrate again into a new folder)"
            )
        diffs = diff_fingerprints(man.get("fingerprint", {}), self.fp)
        if diffs:
            raise CheckpointError(
                f"resume folder {self.folder} was written by a different calibration; "
                f"differing keys: {'; '.join(diffs)}. Resume with the settings, data and "
                "weights of the interrupted run, or calibrate into a new folder"
            )
        return man

    def load(self) -> tuple[dict, dict]:
        """``(manifest, state)`` of the last complete checkpoint; removes leftovers."""
        man = self.read_manifest()
        path = self.folder / man["state_file"]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"checkpoint state file {path} is unreadable: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != man["state_sha256"]:
            raise CheckpointError(
                f"checkpoint state file {path} does not match the sha256 in its manifest "
                "(damaged or replaced); calibrate again into a new folder"
            )
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        self.run_index = int(man.get("runs", 1))
        self.unit_runs = [int(u["run"]) for u in man.get("units", [])]
        self._remove_leftovers(keep=man["state_file"])
        return man, state

    def _remove_leftovers(self, keep: str | None) -> None:
        for p in self.folder.iterdir():
            orphan = p.name.startswith("state_") and p.name.endswith(".pt") and p.name != keep
            if orphan or (p.name.startswith(".") and p.name.endswith(".tmp")):
                p.unlink()

    def clear(self) -> None:
        """Start over: remove the manifest first (so no stale checkpoint is ever trusted)."""
        m = self.folder / MANIFEST
        if m.exists():
            m.unlink()
            _fsync_dir(self.folder)
        self._remove_leftovers(keep=None)

    # ----------------------------------------------------------------------------- writing
    def save(
        self,
        units_done: int,
        units_total: int,
        quant_state: dict,
        generator: torch.Generator,
        reports: list,
        names: list[str],
    ) -> None:
        """Checkpoint after ``units_done`` finished units (0: after weight initialisation)."""
        buf = io.BytesIO()
        torch.save({"quant_state": quant_state, "generator": generator.get_state()}, buf)
        data = buf.getvalue()
        name = f"state_{units_done:04d}.pt"
        atomic_write(self.folder / name, data, hook=("state-tmp", units_done))
        while len(self.unit_runs) < units_done:
            self.unit_runs.append(self.run_index)
        man = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "units_done": units_done,
            "units_total": units_total,
            "complete": units_done == units_total,
            "state_file": name,
            "state_sha256": hashlib.sha256(data).hexdigest(),
            "runs": self.run_index + 1,
            "units": [
                {"index": i, "name": names[i], "run": self.unit_runs[i]} for i in range(units_done)
            ],
            "reports": [asdict(r) for r in reports],
            "fingerprint_sha256": self.fp_sha,
            "fingerprint": self.fp,
        }
        text = json.dumps(man, indent=1, sort_keys=True) + "\n"
        atomic_write(self.folder / MANIFEST, text.encode(), hook=("manifest-tmp", units_done))
        self._remove_leftovers(keep=name)
        _kill_hook("saved", units_done)
