"""The reconstruction engine: PD-Quant and its baselines (AdaRound, BRECQ, QDrop) on one loop.

Per unit, in forward order (spec §2):

1. cache the unit input from the quantized model (``X_q``, earlier units finalised) and from the
   full-precision model (``X_fp``), incrementally (unit k's inputs are computed from unit k-1's
   outputs, not by re-running the network from the image);
2. distribution correction of ``X_fp`` towards the BN running statistics of the FP unit (spec §3),
   batched over many 32-image groups at once with per-group loss normalisation, Adam and plateau
   scheduler, so that each group follows exactly the trajectory of the official per-group loop;
   skipped where the unit has no BatchNorm;
3. the reconstruction target ``Y_c = FP_unit(X_c)``;
4. activation-quantizer init on ``X_q[:256]`` (spec §1.4);
5. AdaRound alpha + learnable activation steps, ``iters`` iterations of spec §2.3: QDrop input
   mixing, one pass over ``[X_mix; X_q]``, reconstruction loss on the first half, PD loss on the
   second half through the full-precision rest of the network, AdaRound regulariser;
6. hard rounding, QDrop off, unit frozen.

The full-precision logits ``Z_fp`` are computed once per calibration set (the official code
recomputes them for every unit, spec §6.2 item 3).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from . import ops
from .cache import (
    Staged,
    UnitCache,
    batched_into,
    check_cache_mode,
    choose_mode,
    estimate_peak_bytes,
)
from .checkpoint import Checkpointer, fingerprint
from .config import CalibConfig
from .graph import UnitExecutor, UnitSpec, build_unit_model
from .qmodel import (
    QuantLayer,
    QuantSettings,
    all_quant_layers,
    build_quant_model,
    unit_act_quantizers,
    unit_layers,
)
from .quant import LinearTempDecay, draw_seed, kl_prediction_loss, lp_loss


@dataclass
class UnitReport:
    index: int
    name: str
    kind: str
    n_layers: int
    seconds: float = 0.0
    dc_seconds: float = 0.0
    dc_bn_loss_before: float | None = None
    dc_bn_loss_after: float | None = None
    losses: dict[str, float] = field(default_factory=dict)  # mean over the last 10% of iters
    opt_seconds: float = 0.0  # wall time of the reconstruction iterations alone
    opt_iters: int = 0


@dataclass
class CalibReport:
    config: dict
    units: list[UnitReport]
    calib_seconds: float
    num_calib: int
    cache_mode: str = "device"  # where unit inputs/targets were kept (see pdquant_fast.cache)

    def to_dict(self) -> dict:
        return asdict(self)


class _Stop(Exception):
    pass


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, bs: int = 256):
    """Apply ``fn`` to ``x`` in batches of ``bs`` rows and concatenate (no grad)."""
    return torch.cat([fn(x[i : i + bs]) for i in range(0, x.shape[0], bs)])


def bn_targets(bns: list[nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each BN's DC targets: its running mean and ``sqrt(running_var + 1e-6)`` (spec §3)."""
    return [(bn.running_mean.contiguous(), torch.sqrt(bn.running_var + 1e-6)) for bn in bns]


def bn_stat_loss_per_sample(
    acts: list[torch.Tensor], targets: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Per-sample DC statistic loss: sum over BNs and channels of the squared mean/std gaps.

    ``acts[j]`` is the input ``[B, C, H, W]`` of BN ``j`` and ``targets[j]`` its
    :func:`bn_targets`; per-sample, per-channel mean and unbiased std (``sqrt(var + 1e-6)``)
    over H*W against them (spec §3), through the ``bn_stat_loss`` op (one pass per BN with the
    C++ kernel; the reference is the plain ``mean``/``var`` formula). Returns ``[B]``.
    """
    total = None
    for a, (mean, std) in zip(acts, targets, strict=True):
        term = ops.bn_stat_loss(a, mean, std)[0]
        total = term if total is None else total + term
    return total


def reduce_lr_on_plateau(
    group_loss: torch.Tensor, best: torch.Tensor, bad: torch.Tensor, lr: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of ReduceLROnPlateau(mode=min, factor=0.1, patience=100, threshold=1e-4 rel,
    min_lr=1e-5) for every DC group at once: returns the new ``(best, bad, lr)``."""
    better = group_loss < best * (1 - 1e-4)
    best = torch.where(better, group_loss, best)
    bad = torch.where(better, torch.zeros_like(bad), bad + 1)
    reduce = bad > 100
    new_lr = torch.clamp(lr * 0.1, min=1e-5)
    lr = torch.where(reduce & (lr - new_lr > 1e-8), new_lr, lr)
    bad = torch.where(reduce, torch.zeros_like(bad), bad)
    return best, bad, lr


def _bn_inputs(fp_unit: nn.Module, bns: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The inputs of ``bns`` when ``fp_unit`` runs on ``x``, in ``bns``' order. The forward
    stops as soon as every BN has its input: the last BN and whatever follows it (its
    normalisation, residual add, ReLU) would feed nothing the DC loss reads."""
    got: dict[nn.Module, torch.Tensor] = {}

    def hook(mod, inp):
        got[mod] = inp[0]
        if len(got) == len(bns):
            raise _Stop

    hooks = [bn.register_forward_pre_hook(hook) for bn in bns]
    try:
        fp_unit(x)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    missing = [i for i, bn in enumerate(bns) if bn not in got]
    if missing:
        raise RuntimeError(f"distribution correction: BatchNorm(s) {missing} of the unit never ran")
    return [got[bn] for bn in bns]


def distribution_correction(
    fp_unit: nn.Module, x_fp: torch.Tensor, cfg: CalibConfig, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, float | None, float | None]:
    """Distribution correction of spec §3, batched with the official per-group semantics.

    Args:
        fp_unit: the full-precision unit (real BatchNorm2d modules inside).
        x_fp: ``[N, ...]`` float32 FP unit inputs (a tensor or a :class:`~.cache.Staged`).
        out: optional storage for the result (e.g. from a :class:`~.cache.UnitCache`).
    Returns:
        ``(x_c, bn_loss_before, bn_loss_after)``: corrected inputs (same shape) and the mean
        per-sample BN-statistic loss before and after (None when the unit has no BN).

    Each group of ``dc_chunk`` consecutive images has its own loss ``L_BN + L_close / lamb_c``
    normalised by the group size, its own Adam learning rate and its own ReduceLROnPlateau state
    (factor 0.1, patience 100, rel threshold 1e-4, min lr 1e-5), exactly like the official loop
    that optimises one 32-image group at a time; ``dc_batch`` groups' worth of images run at once.
    """
    bns = [m for m in fp_unit.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns or cfg.dc_iters == 0:
        return x_fp, None, None
    if x_fp.dim() != 4:
        raise ValueError(
            "distribution correction needs 4-d unit inputs [N, C, H, W] (a unit with "
            f"BatchNorm2d), got shape {tuple(x_fp.shape)}"
        )
    if out is None:
        out = torch.empty_like(x_fp)
    before, after = [], []
    b1, b2, eps = 0.9, 0.999, 1e-8
    targets = bn_targets(bns)
    # Channels-last on CPU: oneDNN's convolutions on a 16-channel unit run 1.7x (forward) and
    # 1.5x (backward) faster than on NCHW, and the DC kernels take either layout (KERNELS.md).
    fmt = torch.channels_last if x_fp.device.type == "cpu" else None
    dev = x_fp.device  # every per-sample / per-group tensor lives with the images
    hw = x_fp.shape[2] * x_fp.shape[3]
    for s in range(0, x_fp.shape[0], cfg.dc_batch):
        x0 = x_fp[s : s + cfg.dc_batch]
        if fmt is not None:
            x0 = x0.contiguous(memory_format=fmt)
        nb = x0.shape[0]
        gid = torch.arange(nb, device=dev) // cfg.dc_chunk
        ng = int(gid[-1]) + 1
        gsize = torch.bincount(gid, minlength=ng).float()
        inv = (1.0 / gsize)[gid]  # per-sample group normaliser
        # d(L_close / lamb_c * inv) / dx = (x - x0) * kc: L_close is the squared distance
        # summed over channels and averaged over the H*W positions
        kc = (2.0 * inv / (cfg.lamb_c * hw)).float()
        x = x0.clone()
        m = torch.zeros_like(x)
        v = torch.zeros_like(x)
        lr = torch.full((ng,), cfg.dc_lr, device=dev)
        best = torch.full((ng,), math.inf, device=dev)
        bad = torch.zeros(ng, dtype=torch.long, device=dev)
        for t in range(1, cfg.dc_iters + 1):
            x.requires_grad_(True)
            lbn = bn_stat_loss_per_sample(_bn_inputs(fp_unit, bns, x), targets)
            (g,) = torch.autograd.grad((lbn * inv).sum(), x)
            with torch.no_grad():
                x = x.detach()
                lbn = lbn.detach()
                if t == 1:
                    before.append(lbn)
                if g.stride() != x.stride():
                    g = g.contiguous(memory_format=fmt or torch.contiguous_format)
                step = (lr[gid] / (1 - b1**t)).float()
                # the closeness gradient and Adam in one pass; close = L_close before the step
                x, close = ops.dc_adam_step(
                    x, x0, g, m, v, kc, step, b1, b2, math.sqrt(1 - b2**t), eps
                )
                per_sample = (lbn + close / cfg.lamb_c) * inv
                group_loss = torch.zeros(ng, device=dev).index_add(0, gid, per_sample)
                best, bad, lr = reduce_lr_on_plateau(group_loss, best, bad, lr)
        with torch.no_grad():
            after.append(bn_stat_loss_per_sample(_bn_inputs(fp_unit, bns, x), targets))
        out[s : s + nb] = x
    return out, float(torch.cat(before).mean()), float(torch.cat(after).mean())


class Calibrator:
    """Runs one calibration of ``model`` on ``calib`` images with config ``cfg``.

    Args:
        model: any ``nn.Module`` classifier (eval mode is forced); it is not modified.
        calib: float32 ``[N, C, H, W]`` preprocessed calibration images.
        cfg: a resolved :class:`CalibConfig`.
        log: callable for one-line progress messages (``print`` by default).
        progress: show a tqdm bar per unit.
        checkpoint_dir: write a checkpoint there after weight initialisation and after every
            unit (see :mod:`pdquant_fast.checkpoint`); None: no checkpoints.
        resume: continue from the checkpoint in ``checkpoint_dir`` (which must hold one from a
            calibration with the same fingerprint: config, images, weights); finished units
            are restored, not reconstructed again, and the result is bit-identical on CPU.
        cache: where unit inputs/targets live: ``auto`` | ``device`` | ``host`` | ``disk``
            (see :mod:`pdquant_fast.cache`).
        cache_dir: scratch folder for ``disk`` (default: the system temp folder).
    """

    def __init__(
        self,
        model: nn.Module,
        calib: torch.Tensor,
        cfg: CalibConfig,
        log: Callable[[str], None] | None = print,
        progress: bool = True,
        *,
        checkpoint_dir: str | None = None,
        resume: bool = False,
        cache: str = "auto",
        cache_dir: str | None = None,
    ):
        check_cache_mode(cache)
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (the folder to resume from)")
        if not isinstance(calib, torch.Tensor) or calib.dim() < 2:
            raise ValueError("calibration data must be a float tensor [N, C, H, W]")
        if calib.shape[0] == 0:
            raise ValueError("the calibration data holds 0 images; at least 1 is needed")
        if not torch.isfinite(calib).all():
            n_bad = int((~torch.isfinite(calib)).sum())
            raise ValueError(
                f"calibration images contain NaN or Inf ({n_bad} values); images must be finite"
            )
        model_devs = {t.device for t in (*model.parameters(), *model.buffers())}
        if model_devs - {calib.device}:
            raise ValueError(
                f"the model is on {sorted(str(d) for d in model_devs)} but the calibration images "
                f"are on {calib.device}; put both on one device (model.to(dev), images.to(dev))"
            )
        if cfg.cuda_graph and cache not in ("auto", "device"):
            raise ValueError(
                f"cuda_graph=True replays a step that indexes the unit caches on the GPU: use "
                f"cache='device' (or 'auto'), not {cache!r}"
            )
        if cfg.cuda_graph and calib.device.type != "cuda":
            raise ValueError(
                f"cuda_graph=True captures the reconstruction step in a CUDA graph: the model and "
                f"images must be on a CUDA device, they are on {calib.device}"
            )
        self.cfg = cfg
        self.calib = calib.float().contiguous()
        self.log = log or (lambda s: None)
        self.progress = progress
        for name, p in model.named_parameters():
            if not torch.isfinite(p).all():
                raise ValueError(
                    f"model weight '{name}' contains NaN or Inf; all weights must be finite"
                )
        self.fp, self.units = build_unit_model(model)
        self.fp.requires_grad_(False)
        shape = tuple(self.calib.shape[1:])
        self.fp_exec = UnitExecutor(self.fp, shape)
        settings = QuantSettings(
            cfg.w_bits,
            cfg.a_bits,
            cfg.first_layer_w_bits,
            cfg.last_layer_w_bits,
            cfg.head_input_a_bits,
            input_a_bits=cfg.input_a_bits,
        )
        # the quantizers' own tensors (steps, zero points, AdaRound beta) are made on the device
        # of the model and images
        with torch.device(self.calib.device):
            self.q = build_quant_model(self.fp, self.units, settings).to(self.calib.device)
        self.q.requires_grad_(False)
        self.q_exec = UnitExecutor(self.q, shape)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self._device_gens: dict[torch.device, torch.Generator] = {}  # see _uniform
        self.device = self.calib.device
        self.cache_mode, self.cache_dir = cache, cache_dir
        self._in_shapes, self._out_shapes = self._probe_unit_shapes()
        self.ckpt: Checkpointer | None = None
        self._restored: tuple[dict, dict] | None = None
        if checkpoint_dir is not None:
            fp = fingerprint(cfg.to_dict(), self.calib, model, self.units)
            self.ckpt = Checkpointer(checkpoint_dir, fp)
            if resume:  # validate (fingerprint, sha256) before any work is done
                self._restored = self.ckpt.load()

    @torch.no_grad()
    def _probe_unit_shapes(self) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """Per-unit input and output shapes (without the batch axis) from one image."""
        ins: dict[int, tuple] = {}
        outs: dict[int, tuple] = {}
        hooks = []
        for k in range(len(self.units)):
            m = self.unit(self.fp, k)

            def hook(mod, inp, out, k=k):
                ins[k], outs[k] = tuple(inp[0].shape[1:]), tuple(out.shape[1:])

            hooks.append(m.register_forward_hook(hook))
        try:
            self.fp(self.calib[:1])
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ValueError(
                f"the model cannot run on calibration images of shape "
                f"{list(self.calib.shape[1:])} (per image): {str(exc).splitlines()[0]}; "
                "give images preprocessed to the model's input size and channels"
            ) from exc
        finally:
            for h in hooks:
                h.remove()
        n = len(self.units)
        return [ins[k] for k in range(n)], [outs[k] for k in range(n)]

    def _make_cache(self) -> UnitCache:
        """The :class:`UnitCache` for this run (``auto`` resolved from free memory)."""
        mode = self.cache_mode
        if mode == "auto":
            n = int(self.calib.shape[0])
            need = estimate_peak_bytes(
                n, self._in_shapes, self._out_shapes, self.cfg.dist_correction
            )
            need += self.calib.numel() * 4
            mode, why = choose_mode(need, self.device)
            self.log(f"cache mode {mode} (auto: {why})")
        return UnitCache(mode, self.device, self.cache_dir)

    def _checkpoint(self, units_done: int, reports: list[UnitReport]) -> None:
        if self.ckpt is None:
            return
        from .api import quant_state

        names = [u.name for u in self.units]
        self.ckpt.save(units_done, len(self.units), quant_state(self.q), self.gen, reports, names)

    # ------------------------------------------------------------------ helpers
    def unit(self, model: fx.GraphModule, k: int) -> nn.Module:
        return model.get_submodule(f"unit_{k}")

    def _init_weights(self) -> None:
        layers = all_quant_layers(self.q)
        cand = sum(100 * 2**ql.wq.bits * ql.org_weight.numel() for ql in layers)
        self.log(
            f"initialising {len(layers)} weight quantizers: L2.4 search, "
            f"{cand / 1e9:.1f}G candidate element evaluations"
        )
        t = time.perf_counter()
        for ql in layers:
            ql.wq.init_from(ql.org_weight)
            ql.weight_quant = True
        self.log(f"weight init took {time.perf_counter() - t:.1f}s")

    @torch.no_grad()
    def _init_acts(self, q_unit: nn.Module, x_q: torch.Tensor) -> None:
        acts = unit_act_quantizers(q_unit)
        for a in acts:
            a.observe = True
            a.enabled = True
            a.max_score_elems = self.cfg.act_init_max_elems
        try:
            q_unit(x_q[: self.cfg.act_init_samples])
        finally:
            for a in acts:
                a.observe = False

    # ------------------------------------------------------------------ main loop
    def run(self) -> tuple[fx.GraphModule, CalibReport]:
        cfg = self.cfg
        t0 = time.perf_counter()
        n_units = len(self.units)
        reports: list[UnitReport] = []
        start = 0  # units finished by an earlier, interrupted run
        if self._restored is not None:
            from .api import load_quant_state

            man, state = self._restored
            self._restored = None
            load_quant_state(self.q, state["quant_state"])
            self.gen.set_state(state["generator"])
            start = int(man["units_done"])
            reports = [UnitReport(**r) for r in man["reports"]]
            self.log(
                f"resuming from {self.ckpt.folder}: {start}/{n_units} units finished and "
                f"restored (not reconstructed); weight init restored; continuing at unit "
                f"{min(start + 1, n_units)}"
            )
        else:
            if self.ckpt is not None:
                self.ckpt.clear()
            self._init_weights()
            self._checkpoint(0, reports)
        cache = self._make_cache()
        self.calib = cache.put(self.calib)
        with torch.no_grad():
            z_fp = batched(self.fp, cache.view(self.calib))
        x_q = x_fp = self.calib
        self._iters_total = 0 if cfg.method == "rtn" else cfg.iters * self._n_opt_units()
        self._iters_done = 0 if cfg.method == "rtn" else cfg.iters * self._n_opt_units(start)
        self._t_opt_start = time.perf_counter()
        todo = self.units if start < n_units else []  # a finished run needs no replay
        for k, spec in enumerate(todo):
            if k > 0:
                # unit k's inputs from unit k-1's, written batch by batch into the cache
                prev_q, prev_fp = self.unit(self.q, k - 1), self.unit(self.fp, k - 1)
                step_q = self._advance(self.q, self.q_exec, prev_q, k)
                x_q = batched_into(step_q, cache.view(x_q), cache)
                step_fp = self._advance(self.fp, self.fp_exec, prev_fp, k)
                x_fp = batched_into(step_fp, cache.view(x_fp), cache)
            if k < start:
                continue  # finished before the interruption: only its outputs are replayed
            rep = UnitReport(k, spec.name, spec.kind, len(spec.layers))
            tu = time.perf_counter()
            self._reconstruct_unit(k, spec, cache.view(x_q), cache.view(x_fp), z_fp, rep, cache)
            rep.seconds = time.perf_counter() - tu
            reports.append(rep)
            loss_txt = " ".join(f"{a}={b:.4g}" for a, b in rep.losses.items())
            self.log(
                f"[unit {k + 1}/{n_units}] {spec.name} ({spec.kind}, {rep.n_layers} layer(s)) "
                f"{rep.seconds:.1f}s {loss_txt}"
            )
            self._checkpoint(k + 1, reports)
            cache.trim()
        del x_q, x_fp
        self.q.eval()
        total = time.perf_counter() - t0
        report = CalibReport(cfg.to_dict(), reports, total, int(self.calib.shape[0]), cache.mode)
        return self.q, report

    @staticmethod
    def _advance(top, executor, prev_unit, k):
        """Map unit k-1's inputs to unit k's inputs: run unit k-1, then the glue up to unit k."""
        return lambda t: executor.run_between(top, k - 1, prev_unit(t), k)

    def _n_opt_units(self, upto: int | None = None) -> int:
        units = self.units if upto is None else self.units[:upto]
        if self.cfg.granularity == "layer":
            return sum(len(u.layers) for u in units)
        return len(units)

    def _reconstruct_unit(
        self, k, spec: UnitSpec, x_q, x_fp, z_fp, rep: UnitReport, cache: UnitCache | None = None
    ) -> None:
        cfg = self.cfg
        cache = cache or UnitCache("device", self.device)
        q_unit, fp_unit = self.unit(self.q, k), self.unit(self.fp, k)
        x_c = x_fp
        if cfg.dist_correction:
            td = time.perf_counter()
            out = cache.empty(tuple(x_fp.shape))
            x_c, rep.dc_bn_loss_before, rep.dc_bn_loss_after = distribution_correction(
                fp_unit, x_fp, cfg, out=out
            )
            x_c = cache.view(x_c)
            cache.trim()
            rep.dc_seconds = time.perf_counter() - td
        self._init_acts(q_unit, x_q)
        if cfg.method == "rtn":
            return
        if cfg.granularity == "layer":
            self._reconstruct_layers(k, q_unit, x_q, x_c, rep)
            return
        y_c = cache.view(batched_into(fp_unit, x_c, cache))
        layers = unit_layers(q_unit)
        acts = unit_act_quantizers(q_unit)
        tail = (lambda o: self._run_tail(k, o)) if cfg.pd_loss else None
        self._optimise(q_unit, layers, acts, x_q, x_c, y_c, z_fp, tail, rep, f"{spec.name}")

    def _run_tail(self, k: int, o: torch.Tensor) -> torch.Tensor:
        """FP logits of the network resumed after unit ``k`` on its output ``o`` (float32),
        under bf16 autocast when ``cfg.pd_tail_dtype == "bfloat16"``."""
        if self.cfg.pd_tail_dtype == "bfloat16":
            with torch.autocast(device_type=o.device.type, dtype=torch.bfloat16):
                z = self.fp_exec.run_from(self._fp_tail(), k, o)
            return z.float()
        return self.fp_exec.run_from(self._fp_tail(), k, o)

    def _fp_tail(self) -> fx.GraphModule:
        """The FP model with every conv->BN pair folded (eval-mode BN is affine): the same
        function, two fewer elementwise passes per BN in the PD tail's forward and backward.
        Built once; DC and the cached FP activations keep using the unfolded ``self.fp``."""
        if getattr(self, "_fp_folded", None) is None:
            from torch.fx.experimental.optimization import fuse

            folded = copy.deepcopy(self.fp)
            for i in range(len(self.units)):
                name = f"unit_{i}"
                setattr(folded, name, fuse(folded.get_submodule(name), no_trace=True))
            self._fp_folded = folded.requires_grad_(False)
        return self._fp_folded

    def _reconstruct_layers(self, k, q_unit, x_q, x_c, rep: UnitReport) -> None:
        """Layer-wise (AdaRound) reconstruction of every layer of the unit, in order."""
        for ql in unit_layers(q_unit):
            lx_q = self._capture_input(q_unit, ql, x_q, quant=True)
            lx_fp = self._capture_input(q_unit, ql, x_c, quant=False)
            with torch.no_grad():
                state = (ql.weight_quant, ql.aq.enabled)
                ql.weight_quant, ql.aq.enabled = False, False
                y = batched(ql, lx_fp)
                ql.weight_quant, ql.aq.enabled = state
            acts = [ql.aq] if ql.has_out_quant else []
            sub = UnitReport(k, ql.name, "layer", 1)
            self._optimise(ql, [ql], acts, lx_q, lx_fp, y, None, None, sub, ql.name)
            for key, val in sub.losses.items():
                rep.losses[f"{ql.name}.{key}"] = val
            rep.opt_seconds += sub.opt_seconds
            rep.opt_iters += sub.opt_iters

    @torch.no_grad()
    def _capture_input(self, q_unit, ql: QuantLayer, x: torch.Tensor, quant: bool):
        """Inputs of ``ql`` when ``q_unit`` runs on ``x`` (quantization on or off)."""
        saved = [(m, m.weight_quant, m.aq.enabled) for m in unit_layers(q_unit)]
        others = [(a, a.enabled) for a in unit_act_quantizers(q_unit)]
        if not quant:
            for m, _, _ in saved:
                m.weight_quant = False
                m.aq.enabled = False
            for a, _ in others:
                a.enabled = False
        got = []

        def hook(mod, inp):
            got.append(inp[0])
            raise _Stop

        h = ql.register_forward_pre_hook(hook)
        try:
            for i in range(0, x.shape[0], 256):
                try:
                    q_unit(x[i : i + 256])
                except _Stop:
                    pass
        finally:
            h.remove()
            for m, wq, aq in saved:
                m.weight_quant, m.aq.enabled = wq, aq
            for a, e in others:
                a.enabled = e
        return torch.cat(got)

    def _uniform(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """QDrop's uniform draw. On the CPU it comes from the engine generator (the stream the
        CPU results were always drawn from). On another device it comes from a generator on that
        device, reseeded every call from the engine generator: no host->device copy of the
        batch-sized draw, and the run stays reproducible and resumable from the engine
        generator's state alone."""
        if device.type == "cpu":
            return torch.rand(shape, generator=self.gen, device="cpu")
        seed = draw_seed(self.gen)
        g = self._device_gens.get(device)
        if g is None:
            g = self._device_gens[device] = torch.Generator(device=device)
        g.manual_seed(seed)
        return torch.rand(shape, generator=g, device=device)

    def _start_learning(self, layers, acts) -> tuple[list, list]:
        """Both loops' start: weight quantizers on, AdaRound variables installed, activation
        steps learnable (as the config says); returns ``(alphas, deltas)``."""
        cfg = self.cfg
        alphas, deltas = [], []
        for ql in layers:
            ql.weight_quant = True
            if cfg.learn_alpha:
                ql.wq.init_adaround(ql.org_weight)
                alphas.append(ql.wq.alpha)
        if cfg.learn_delta:
            for a in acts:
                a.delta.requires_grad_(True)
                deltas.append(a.delta)
        return alphas, deltas

    def _finish_learning(self, layers, acts, hist: dict, rep, seconds: float) -> None:
        """Both loops' end: hard rounding, QDrop and learning off, the time and the mean losses
        of the last iterations into ``rep``."""
        rep.opt_seconds += seconds
        rep.opt_iters += self.cfg.iters
        for ql in layers:
            if ql.wq.mode == "soft":
                ql.wq.mode = "hard"
                ql.wq.alpha.requires_grad_(False)
        for a in acts:
            a.keep_prob = 1.0
            a.delta.requires_grad_(False)
        rep.losses = {
            k: sum(v) / len(v) for k, v in ((k, _floats(v)) for k, v in hist.items()) if v
        }

    def _progress_bar(self, label: str):
        """A tqdm bar over one unit's iterations, or None without ``progress``."""
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.cfg.iters, desc=label[:28], unit="it", leave=False, dynamic_ncols=True
        )

    def _optimise(self, module, layers, acts, x_q, x_c, y_c, z_fp, tail, rep, label) -> None:
        """The per-iteration loop of spec §2.3 on ``module`` (a unit or a single layer)."""
        cfg = self.cfg
        if cfg.cuda_graph:
            self._optimise_static(
                module,
                layers,
                acts,
                x_q,
                x_c,
                y_c,
                z_fp,
                tail,
                rep,
                label,
                capture=self.device.type == "cuda",
            )
            return
        alphas, deltas = self._start_learning(layers, acts)
        if cfg.qdrop:
            for a in acts:
                a.keep_prob = cfg.keep_prob
                a.generator = self.gen
        opts = []
        if alphas:
            opts.append(torch.optim.Adam(alphas, lr=cfg.lr_alpha))
        sched = None
        if deltas:
            opt_d = torch.optim.Adam(deltas, lr=cfg.lr_delta)
            opts.append(opt_d)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_d, T_max=cfg.iters, eta_min=0.0)
        beta_of = LinearTempDecay(cfg.iters, cfg.warmup, cfg.b_start, cfg.b_end)
        n = x_q.shape[0]
        bs = min(cfg.batch_size, n)  # a batch never exceeds the calibration set
        dev = self.device
        hist: dict[str, list] = {"rec": [], "pd": [], "round": [], "total": []}
        keep_last = max(1, cfg.iters // 10)
        bar = self._progress_bar(label)
        t_opt = time.perf_counter()
        # On a GPU the ops check the learned steps without a host sync per call; the verdict is
        # read once, after the loop (ops.deferred_checks). On the CPU a check costs no sync.
        checks = ops.deferred_checks() if dev.type != "cpu" else contextlib.nullcontext()
        try:
            with checks:
                for it in range(1, cfg.iters + 1):
                    if alphas:
                        beta = beta_of(it)
                        for ql in layers:
                            ql.wq.beta.fill_(beta)
                    at = _Batch(torch.randint(0, n, (bs,), generator=self.gen, device="cpu"), dev)
                    xq = at(x_q)
                    if cfg.qdrop:
                        u = self._uniform(xq.shape, dev)
                        xin = torch.where(u < cfg.keep_prob, xq, at(x_c))
                    else:
                        xin = xq
                    if tail is not None:
                        out = module(torch.cat([xin, xq]))
                        o_drop, o_q = out[:bs], out[bs:]
                    else:
                        o_drop = module(xin)
                    rec = lp_loss(o_drop, at(y_c))
                    total = rec if cfg.rec_loss else rec.detach() * 0
                    pd_val = 0.0
                    if tail is not None:
                        z_q = tail(o_q)
                        pd = kl_prediction_loss(z_q, at(z_fp), cfg.temperature)
                        total = total + pd / cfg.lamb_r
                        pd_val = pd
                    round_val = 0.0
                    if alphas and cfg.round_loss and it >= cfg.warmup * cfg.iters:
                        # the fused soft forward above already computed each layer's regulariser
                        # with this iteration's beta
                        rl = cfg.round_weight * sum(ql.wq.last_reg for ql in layers)
                        total = total + rl
                        round_val = rl
                    for o in opts:
                        o.zero_grad(set_to_none=True)
                    total.backward()
                    for o in opts:
                        o.step()
                    if sched is not None:
                        sched.step()
                    if it > cfg.iters - keep_last:
                        # kept on the device, read after the loop: no host sync per iteration
                        hist["rec"].append(rec.detach())
                        hist["pd"].append(pd_val.detach() if torch.is_tensor(pd_val) else pd_val)
                        hist["round"].append(
                            round_val.detach() if torch.is_tensor(round_val) else round_val
                        )
                        hist["total"].append(total.detach())
                    self._iters_done += 1
                    if bar is not None:
                        bar.update(1)
                        if it % 50 == 0 or it == cfg.iters:
                            bar.set_postfix_str(
                                self._eta_text() + f" rec={float(rec.detach()):.3g}"
                            )
        finally:
            if bar is not None:
                bar.close()
        self._finish_learning(layers, acts, hist, rep, time.perf_counter() - t_opt)

    def _optimise_static(
        self, module, layers, acts, x_q, x_c, y_c, z_fp, tail, rep, label, capture: bool
    ) -> None:
        """The loop of :meth:`_optimise` as one static step, captured in a CUDA graph and
        replayed (``cfg.cuda_graph``; ``capture=False`` runs the same step eagerly, which is how
        the CPU tests check it).

        The same math per iteration, arranged so that one captured step serves every iteration:
        batch indices and QDrop's uniform draw come from the device RNG inside the step (seeded
        from the engine generator; the global RNG state is restored afterwards), QDrop seeds from
        device counters, the AdaRound exponent, the regulariser's weight (0 before the warm-up
        ends: the same gradients as leaving it out) and the step size's learning rate are device
        tensors written in place before each replay (the rate from a CPU copy of the official
        cosine schedule), Adam is ``capturable`` and gradients are zeroed, not freed. Three
        iterations run eagerly on a side stream before the capture (CUDA's requirement)."""
        cfg, dev = self.cfg, self.device
        if any(isinstance(t, Staged) for t in (x_q, x_c, y_c, z_fp)):
            raise ValueError("cuda_graph=True needs the unit caches on the device (cache='device')")
        alphas, deltas = self._start_learning(layers, acts)
        if cfg.qdrop:
            for a in acts:
                a.keep_prob = cfg.keep_prob
                a.seed_counter = torch.full((), draw_seed(self.gen), dtype=torch.int64, device=dev)
        opts, lr_d = [], None
        if alphas:
            opts.append(torch.optim.Adam(alphas, lr=cfg.lr_alpha, capturable=capture))
        shadow = probe = None
        if deltas:
            lr_d = torch.tensor(cfg.lr_delta, device=dev) if capture else cfg.lr_delta
            opt_d = torch.optim.Adam(deltas, lr=lr_d, capturable=capture)
            opts.append(opt_d)
            # the official schedule, stepped on a CPU stand-in: its rate is copied in each step
            probe = torch.optim.SGD([torch.zeros(1, device="cpu")], lr=cfg.lr_delta)
            shadow = torch.optim.lr_scheduler.CosineAnnealingLR(probe, T_max=cfg.iters, eta_min=0.0)
        beta_of = LinearTempDecay(cfg.iters, cfg.warmup, cfg.b_start, cfg.b_end)
        n = x_q.shape[0]
        bs = min(cfg.batch_size, n)
        round_w = torch.zeros((), device=dev)
        use_round = bool(alphas and cfg.round_loss)

        def step():
            idx = torch.randint(0, n, (bs,), device=dev)
            xq = x_q[idx]
            xin = xq
            if cfg.qdrop:
                u = torch.rand(xq.shape, device=dev)
                xin = torch.where(u < cfg.keep_prob, xq, x_c[idx])
            if tail is not None:
                out = module(torch.cat([xin, xq]))
                o_drop, o_q = out[:bs], out[bs:]
            else:
                o_drop = module(xin)
            rec = lp_loss(o_drop, y_c[idx])
            total = rec if cfg.rec_loss else rec.detach() * 0
            pd = rec.new_zeros(())
            if tail is not None:
                pd = kl_prediction_loss(tail(o_q), z_fp[idx], cfg.temperature)
                total = total + pd / cfg.lamb_r
            rl = rec.new_zeros(())
            if use_round:
                rl = round_w * sum(ql.wq.last_reg for ql in layers)
                total = total + rl
            for o in opts:
                o.zero_grad(set_to_none=False)
            total.backward()
            for o in opts:
                o.step()
            return rec.detach(), pd.detach(), rl.detach(), total.detach()

        def set_iteration(it: int) -> None:
            if alphas:
                beta = beta_of(it)
                for ql in layers:
                    ql.wq.beta.fill_(beta)
            if use_round:
                round_w.fill_(cfg.round_weight if it >= cfg.warmup * cfg.iters else 0.0)
            if shadow is not None:
                lr = shadow.get_last_lr()[0]
                if capture:
                    lr_d.fill_(lr)
                else:
                    opt_d.param_groups[0]["lr"] = lr

        def after_iteration(it: int, losses) -> None:
            if shadow is not None:
                probe.step()  # no gradient: changes nothing; the scheduler wants it before its step
                shadow.step()
            if it > cfg.iters - keep_last:
                for key, v in zip(("rec", "pd", "round", "total"), losses, strict=True):
                    hist[key].append(v.clone())
            self._iters_done += 1
            if bar is not None:
                bar.update(1)
                if it % 50 == 0 or it == cfg.iters:  # a read of the loss: one sync per 50
                    bar.set_postfix_str(self._eta_text() + f" rec={float(losses[0]):.3g}")

        hist: dict[str, list] = {"rec": [], "pd": [], "round": [], "total": []}
        keep_last = max(1, cfg.iters // 10)
        bar = self._progress_bar(label)
        warm = min(3, cfg.iters) if capture else cfg.iters
        t_opt = time.perf_counter()
        index = (
            (dev.index if dev.index is not None else torch.cuda.current_device()) if capture else 0
        )
        seed = draw_seed(self.gen)
        graph = None
        with contextlib.ExitStack() as stack:
            # the device RNG is seeded for this loop and restored afterwards (CPU: the CPU one)
            stack.enter_context(torch.random.fork_rng(devices=[index] if capture else []))
            if capture:
                stack.enter_context(torch.cuda.device(index))
                torch.cuda.default_generators[index].manual_seed(seed)
            else:
                torch.random.default_generator.manual_seed(seed)
            stack.enter_context(ops.deferred_checks())
            side = torch.cuda.Stream() if capture else None
            if capture:
                side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side) if capture else contextlib.nullcontext():
                for it in range(1, warm + 1):
                    set_iteration(it)
                    after_iteration(it, step())
            if capture and warm < cfg.iters:
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static = step()
                for it in range(warm + 1, cfg.iters + 1):
                    set_iteration(it)
                    graph.replay()
                    after_iteration(it, static)
            if capture:
                torch.cuda.synchronize()
        del graph
        if bar is not None:
            bar.close()
        for a in acts:
            a.seed_counter = None
        self._finish_learning(layers, acts, hist, rep, time.perf_counter() - t_opt)

    def _eta_text(self) -> str:
        done = self._iters_done
        if not done or not self._iters_total:
            return ""
        # time since the first reconstruction iteration (so one-off weight init is excluded;
        # per-unit caching and DC are included, since every remaining unit pays them too)
        el = time.perf_counter() - self._t_opt_start
        rem = el / done * (self._iters_total - done)
        return f"run ETA {int(rem // 60)}m{int(rem % 60):02d}s"


class _Batch:
    """Rows ``idx`` (drawn on the CPU) of the engine's cached tensors, returned on ``dev``. A
    tensor on ``dev`` gets the index sent there once, without a host sync (``non_blocking``); a
    :class:`~pdquant_fast.cache.Staged` host/disk cache is indexed on the host and the rows are
    copied to ``dev``."""

    def __init__(self, idx: torch.Tensor, dev: torch.device):
        self.idx, self.dev, self.on = idx, dev, {idx.device: idx}

    def __call__(self, t: torch.Tensor | Staged) -> torch.Tensor:
        if isinstance(t, Staged):  # host or disk cache: indexed on the host, copied to dev
            return t[self.idx]
        i = self.on.get(t.device)
        if i is None:
            i = self.on[t.device] = self.idx.to(t.device, non_blocking=True)
        return t[i].to(self.dev, non_blocking=True)


def _floats(vals: list) -> list[float]:
    """``[float(v) for v in vals]`` with one device-to-host transfer for the tensors."""
    tens = [v for v in vals if torch.is_tensor(v)]
    if not tens:
        return [float(v) for v in vals]
    got = iter(torch.stack([t.reshape(()).float() for t in tens]).tolist())
    return [next(got) if torch.is_tensor(v) else float(v) for v in vals]


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, bs: int = 256) -> dict:
    """Top-1 and top-5 accuracy (percent) of ``model`` on preprocessed ``images``.

    ``images`` float32 ``[N, C, H, W]``; ``labels`` int64 ``[N]``. Returns a dict with ``top1``,
    ``top5``, ``correct``, ``n`` and ``pred`` (int64 ``[N]`` predicted classes).
    """
    model.eval()
    preds, top5 = [], 0
    for i in range(0, images.shape[0], bs):
        logits = model(images[i : i + bs])
        preds.append(logits.argmax(1))
        k = min(5, logits.shape[1])
        top5 += (logits.topk(k, dim=1).indices == labels[i : i + bs, None]).any(1).sum().item()
    pred = torch.cat(preds)
    correct = int((pred == labels).sum())
    n = int(labels.numel())
    return {
        "top1": 100.0 * correct / n,
        "top5": 100.0 * top5 / n,
        "correct": correct,
        "n": n,
        "pred": pred,
    }
