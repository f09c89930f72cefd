"""Parity of a :class:`PackedModel` with the fake-quant simulation it was exported from.

This module uses the calibration side (:mod:`pdquant_fast.qmodel`) to read the simulation; the
packed runtime itself never imports it.

Three measurements, on the same images:

1. **Accumulators, per layer, exact.** For every packed layer the simulation's input ``x_dq``
   (float32, captured at the QuantLayer) is turned into codes ``c = round(x_dq / d) + zp`` (checked
   to dequantize back to ``x_dq`` bit for bit), and the simulation's accumulator is
   ``round(conv_f64(x_dq, w_dq) / (d * w_delta[o]))`` (float64, the distance to the nearest
   integer is reported: it must be tiny). The packed layer's accumulator on ``c`` through the op
   that runs it (reference or a fast kernel) must equal it exactly.
2. **Output codes, per layer, teacher-forced.** The packed model runs with every quantizer's codes
   replaced by the simulation's; each layer's own output codes are compared. Differences can
   only come from the float32 requantisation ``acc * scale + bias`` vs the simulation's float32
   convolution of dequantized values: the flipped elements are counted, and each is checked to
   lie within ``tie_tol`` of a rounding boundary (``|frac(y / s) - 0.5|``, ``y`` computed in
   float64 from the exact accumulator).
3. **End to end.** Free-running logits vs the simulation's: max |difference| relative to the max
   |logit|, and top-1 agreement; each top-1 disagreement is listed with the simulation's top-1
   margin and the number of code flips upstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .runtime import PackedLayer, PackedModel, _safe


@dataclass
class LayerParity:
    name: str
    acc_equal: bool
    acc_max_int_dist: float  # float64 simulation accumulator's distance to an integer
    acc_abs_max: int
    elements: int
    flips: int  # teacher-forced output-code differences
    flip_max_tie_dist: float  # max |frac(y/s) - 0.5| over the flips (0 = exactly on a tie)


@dataclass
class ParityReport:
    layers: list[LayerParity] = field(default_factory=list)
    n_images: int = 0
    n_layer_images: int = 0
    teacher_logits_equal: bool = False
    logits_max_abs_diff: float = 0.0
    logits_max_abs: float = 0.0
    top1_agree: int = 0
    disagreements: list[dict] = field(default_factory=list)
    free_running_flips: dict = field(default_factory=dict)
    sim_pred: list[int] = field(default_factory=list)  # top-1 class per image
    packed_pred: list[int] = field(default_factory=list)

    @property
    def acc_all_equal(self) -> bool:
        return all(la.acc_equal for la in self.layers)

    @property
    def total_flips(self) -> int:
        return sum(la.flips for la in self.layers)

    def summary(self) -> dict:
        return {
            "images": self.n_images,
            "layer_images": self.n_layer_images,
            "teacher_forced_logits_equal": self.teacher_logits_equal,
            "packed_layers": len(self.layers),
            "acc_all_equal": self.acc_all_equal,
            "acc_max_int_dist": max((la.acc_max_int_dist for la in self.layers), default=0.0),
            "teacher_forced_flips": self.total_flips,
            "output_elements": sum(la.elements for la in self.layers),
            "flip_max_tie_dist": max((la.flip_max_tie_dist for la in self.layers), default=0.0),
            "logits_max_abs_diff": self.logits_max_abs_diff,
            "logits_rel_diff": self.logits_max_abs_diff / max(self.logits_max_abs, 1e-30),
            "top1_agree": self.top1_agree,
            "top1_disagreements": self.disagreements,
        }


def _sim_capture(q: nn.Module, x: torch.Tensor) -> tuple[dict, dict, torch.Tensor]:
    """Simulation logits plus each QuantLayer's input and each ActQuantizer's output."""
    from ..qmodel import QuantLayer
    from ..quant import ActQuantizer

    layer_in: dict = {}
    act_out: dict = {}
    hooks = []
    for m in q.modules():
        if isinstance(m, QuantLayer):
            hooks.append(
                m.register_forward_pre_hook(lambda mod, a: layer_in.__setitem__(mod.name, a[0]))
            )
        elif isinstance(m, ActQuantizer):
            hooks.append(
                m.register_forward_hook(lambda mod, a, out: act_out.__setitem__(mod.name, out))
            )
    try:
        with torch.no_grad():
            logits = q(x)
    finally:
        for h in hooks:
            h.remove()
    return layer_in, act_out, logits


@torch.no_grad()
def compare(
    q: nn.Module, packed: PackedModel, x: torch.Tensor, layer_images: int | None = None
) -> ParityReport:
    """Parity report of ``packed`` against the simulation ``q`` on float32 images ``x``
    ``[N, C, H, W]``: per-layer checks (1, 2) on the first ``layer_images`` images (all if
    None), end to end (3) on all of them."""
    from ..qmodel import QuantLayer

    qlayers = {m.name: m for m in q.modules() if isinstance(m, QuantLayer)}
    x_end = x
    x = x if layer_images is None else x[:layer_images]
    layer_in, act_out, sim_logits = _sim_capture(q, x)
    acts = packed.manifest["acts"]
    teacher = {}
    for name in acts:
        if name not in act_out:
            continue
        a = packed.acts[_safe(name)]
        codes = a.quantize(act_out[name])
        if not torch.equal(a.dequantize(codes), act_out[name]):
            raise AssertionError(f"simulation output of {name} is not on its grid")
        teacher[name] = codes
    rep = ParityReport(n_images=int(x_end.shape[0]), n_layer_images=int(x.shape[0]))

    # 2. teacher-forced run: per-layer inputs are the simulation's codes
    cap: dict = {}
    rep.teacher_logits_equal = bool(
        torch.equal(packed(x, capture=cap, teacher=teacher), sim_logits)
    )
    nodes = {n["layer"]: n for n in packed.graph_nodes if n["op"] == "layer_packed"}
    for lname, node in nodes.items():
        pl: PackedLayer = packed.layers[_safe(lname)]
        ql = qlayers[lname]
        # 1. accumulators
        x_dq = layer_in[lname]
        in_act = packed.acts[_safe(node["in_act"])]
        codes = in_act.quantize(x_dq)
        if not torch.equal(in_act.dequantize(codes), x_dq):
            raise AssertionError(f"simulation input of {lname} is not on its input grid")
        if not torch.equal(codes, cap[lname]["x"]):
            raise AssertionError(f"teacher forcing did not reach the input of {lname}")
        w = ql.weight().double()
        z = ql._op(x_dq.double(), w, torch.zeros(w.shape[0], dtype=torch.float64, device=w.device))
        shape = [1, -1] + [1] * (z.dim() - 2)
        denom = in_act.delta.double() * ql.wq.delta.reshape(-1).double()
        a_sim = z / denom.reshape(shape)
        a_int = torch.round(a_sim)
        dist = float((a_sim - a_int).abs().max())
        acc = pl.acc(codes)
        bound = float(a_int.abs().max())
        if bound >= 2**24:
            raise AssertionError(f"{lname}: |acc| {bound} too large for a float32 comparison")
        acc_equal = torch.equal(acc.double(), a_int)
        # output flips, teacher-forced
        out = cap[lname]["out"]
        flips, tie = 0, 0.0
        if node["out_act"] and node["out_act"] in teacher:
            ref = teacher[node["out_act"]]
            diff = ref != out
            flips = int(diff.sum())
            if flips:
                y = a_int * (in_act.delta.double() * ql.wq.delta.reshape(-1).double()).reshape(
                    shape
                ) + ql.org_bias.double().reshape(shape)
                if cap[lname]["residual"] is not None:
                    y = y + cap[lname]["residual"].double()
                if node["act"] == "relu":
                    y = y.clamp_min(0)
                elif node["act"] == "relu6":
                    y = y.clamp(0, 6)
                s = acts[node["out_act"]]["delta"]
                t = y[diff] / s
                tie = float(((t - torch.floor(t)) - 0.5).abs().max())
        rep.layers.append(LayerParity(lname, acc_equal, dist, int(bound), out.numel(), flips, tie))

    # 3. free running
    if x_end is not x:
        del layer_in, act_out
        sim_logits = q(x_end)
    cap_free: dict | None = {} if x_end is x else None  # per-layer captures cost memory
    logits = packed(x_end, capture=cap_free)
    rep.logits_max_abs_diff = float((logits - sim_logits).abs().max())
    rep.logits_max_abs = float(sim_logits.abs().max())
    p_top, s_top = logits.argmax(1), sim_logits.argmax(1)
    rep.top1_agree = int((p_top == s_top).sum())
    rep.sim_pred, rep.packed_pred = s_top.tolist(), p_top.tolist()
    for i in torch.nonzero(p_top != s_top).flatten().tolist():
        top2 = sim_logits[i].topk(2).values
        rep.disagreements.append(
            {
                "image": i,
                "sim_top1": int(s_top[i]),
                "packed_top1": int(p_top[i]),
                "sim_margin": float(top2[0] - top2[1]),
                "packed_margin": float(logits[i, s_top[i]] - logits[i, p_top[i]]),
            }
        )
    for name, codes in (cap_free or {}).get("codes", {}).items():
        if name in teacher:
            rep.free_running_flips[name] = int((codes != teacher[name]).sum())
    return rep


@torch.no_grad()
def quick_quantize(
    model: nn.Module, x: torch.Tensor, w_bits: int, a_bits: int, input_a_bits: int | None = None
) -> nn.Module:
    """A fast stand-in calibration for parity tests and latency benchmarks (not for accuracy).

    Per-channel min/max weight ranges (round to nearest) instead of the L2.4 search, activation
    quantizers initialised by the library's own per-tensor search on one pass over ``x`` (float32
    ``[N, C, H, W]``); 8-bit first/last layers and classifier input as in a real run. Seconds
    instead of the minutes of ``method="rtn"`` on EfficientNet-Lite0's 8-bit classifier.
    ``input_a_bits``: also quantize the network input (see ``CalibConfig.input_a_bits``).
    """
    from ..api import build_quantized_skeleton
    from ..config import make_config
    from ..qmodel import all_quant_layers
    from ..quant import ActQuantizer, calculate_qparams

    cfg = make_config("rtn", w_bits=w_bits, a_bits=a_bits, input_a_bits=input_a_bits)
    q = build_quantized_skeleton(model, cfg)
    for ql in all_quant_layers(q):
        w = ql.org_weight.reshape(ql.org_weight.shape[0], -1)
        d, z = calculate_qparams(w.amin(1), w.amax(1), ql.wq.bits)
        shape = (-1,) + (1,) * (ql.org_weight.dim() - 1)
        ql.wq.delta, ql.wq.zp = d.reshape(shape), z.reshape(shape)
        ql.weight_quant = True
    used = [m for m in q.modules() if isinstance(m, ActQuantizer)]
    for a in used:
        a.observe, a.enabled = True, True
        a.max_score_elems = 4096
    q.eval()(x)
    for a in used:
        a.observe = False
    return q
