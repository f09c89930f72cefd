"""Quantized model construction: BN folding, fused quant layers, quantizer placement.

Given the split top-level graph of :mod:`pdquant_fast.graph`, :func:`build_quant_model` makes
the *quantized copy* (``qnn`` in the official code): in every unit, each conv/linear with the
BatchNorm and activation that follow it becomes one :class:`QuantLayer` (BN folded into the
weights, spec §1 step 4), and activation quantizers sit on op outputs as in the official code
(spec §1.1):

* a layer's output is quantized after its activation, unless the output feeds a residual add
  (conv2 of a BasicBlock, conv3 of a bottleneck, projection of an inverted residual, a
  downsample/shortcut conv);
* a residual unit's output is quantized after the add (and the activation after it, if any);
* the network output (logits) is not quantized; the input image is not quantized.

The full-precision copy (``fp_model``) is the same split graph without any change: BN modules
stay real ``nn.BatchNorm2d`` so that distribution correction can read their running statistics.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import UnitSpec, act_module_for, is_add, is_bn, is_quant_layer, layer_chain
from .quant import ActQuantizer, QuantConfigError, WeightQuantizer


def fold_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d | nn.BatchNorm1d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold eval-mode BN into the preceding layer (per output channel).

    ``W' = W * g / sqrt(var + eps)``, ``b' = beta + (b - mean) * g / sqrt(var + eps)`` with
    ``g = bn.weight`` (1 if not affine), ``beta = bn.bias`` (0 if not affine).
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    w = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    b0 = bias if bias is not None else torch.zeros_like(std)
    b = beta + (b0 - bn.running_mean) * scale
    return w.detach().clone(), b.detach().clone()


class QuantLayer(nn.Module):
    """Conv2d/Linear (+ folded BN) (+ activation) + output activation quantizer.

    Tensors: ``org_weight`` float32 ``[C_out, C_in/groups, kh, kw]`` or ``[C_out, C_in]`` (BN
    folded), ``org_bias`` float32 ``[C_out]``. The bias stays in full precision (as in the
    official code). ``wq`` quantizes the weight per output channel; ``aq`` is the output
    quantizer (disabled where the official code has none, see the module docstring).
    """

    def __init__(
        self,
        layer: nn.Module,
        bn: nn.Module | None,
        act: nn.Module | None,
        w_bits: int,
        a_bits: int,
        name: str,
    ):
        super().__init__()
        self.name = name
        self.layer = copy.deepcopy(layer)
        w = layer.weight.detach().float()
        b = layer.bias.detach().float() if layer.bias is not None else None
        if bn is not None:
            w, b = fold_bn(w, b, bn)
        if b is None:
            b = torch.zeros(w.shape[0], device=w.device)
        self.register_buffer("org_weight", w.clone())
        self.register_buffer("org_bias", b.clone())
        # The copied layer keeps only its hyper-parameters (stride, padding, static padding).
        self.layer.weight = None
        self.layer.bias = None
        self.is_conv = isinstance(layer, nn.Conv2d)
        self._plain_conv = self.is_conv and type(layer).forward is nn.Conv2d.forward
        self.act = act
        self.wq = WeightQuantizer(w_bits)
        self.aq = ActQuantizer(a_bits, name=name + ".out")
        self.has_out_quant = True
        self.weight_quant = False

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.is_conv:
            return F.linear(x, w, b)
        if self._plain_conv:
            return self.layer._conv_forward(x, w, b)
        return torch.func.functional_call(self.layer, {"weight": w, "bias": b}, (x,))

    def weight(self) -> torch.Tensor:
        return self.wq(self.org_weight) if self.weight_quant else self.org_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._op(x, self.weight(), self.org_bias)
        if self.act is not None:
            y = self.act(y)
        if self.has_out_quant:
            y = self.aq(y)
        return y

    def extra_repr(self) -> str:
        return f"name={self.name}, out_quant={self.has_out_quant}"


class OutQuant(nn.Module):
    """Holder for a unit-output activation quantizer placed after a residual add."""

    def __init__(self, a_bits: int, name: str):
        super().__init__()
        self.aq = ActQuantizer(a_bits, name=name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aq(x)


@dataclass
class QuantSettings:
    """Bit-widths and the 8-bit overrides of spec §1 step 5 (visible and overridable)."""

    w_bits: int
    a_bits: int
    first_layer_w_bits: int | None = 8  # None: same as w_bits
    last_layer_w_bits: int | None = 8
    head_input_a_bits: int | None = 8  # the activation quantizer feeding the classifier
    input_a_bits: int | None = None  # a quantizer on the network input (None: float input)


def _quantize_unit(unit_gm: fx.GraphModule, name: str, s: QuantSettings) -> fx.GraphModule:
    """Fuse conv/linear + BN + act into QuantLayers inside one unit GraphModule."""
    g = unit_gm.graph
    for n in list(g.nodes):
        if not is_quant_layer(unit_gm, n):
            continue
        layer = unit_gm.get_submodule(n.target)
        chain = layer_chain(unit_gm, n)  # the layer, then its BN and activation if present
        bn = None
        act = None
        for c in chain[1:]:
            if is_bn(unit_gm, c):
                bn = unit_gm.get_submodule(c.target)
            else:
                act = copy.deepcopy(act_module_for(unit_gm, c))
        qname = str(n.target)
        mod_name = "q_" + qname.replace(".", "_")
        unit_gm.add_submodule(mod_name, QuantLayer(layer, bn, act, s.w_bits, s.a_bits, qname))
        with g.inserting_after(chain[-1]):
            new = g.call_module(mod_name, (n.args[0],))
        chain[-1].replace_all_uses_with(new)
        for c in reversed(chain):
            g.erase_node(c)
    # Output quantizers: disabled where the output feeds a residual add.
    out_node = next(n for n in g.nodes if n.op == "output")
    final = out_node.args[0]
    for n in g.nodes:
        if n.op == "call_module" and isinstance(unit_gm.get_submodule(n.target), QuantLayer):
            ql = unit_gm.get_submodule(n.target)
            if any(is_add(u) for u in n.users):
                ql.has_out_quant = False
    if not (
        final.op == "call_module" and isinstance(unit_gm.get_submodule(final.target), QuantLayer)
    ):
        unit_gm.add_submodule("out_quant", OutQuant(s.a_bits, name + ".out"))
        with g.inserting_before(out_node):
            oq = g.call_module("out_quant", (final,))
        out_node.args = (oq,)
    g.eliminate_dead_code()
    unit_gm.delete_all_unused_submodules()
    unit_gm.recompile()
    return unit_gm


def unit_layers(unit_gm: nn.Module) -> list[QuantLayer]:
    """QuantLayers of a unit in forward order."""
    return [m for m in unit_gm.modules() if isinstance(m, QuantLayer)]


def unit_act_quantizers(unit_gm: nn.Module) -> list[ActQuantizer]:
    """Activation quantizers of a unit that are in use, in forward order."""
    out = []
    for n in unit_gm.graph.nodes:
        if n.op != "call_module":
            continue
        m = unit_gm.get_submodule(n.target)
        if isinstance(m, QuantLayer) and m.has_out_quant:
            out.append(m.aq)
        elif isinstance(m, OutQuant):
            out.append(m.aq)
    return out


def build_quant_model(
    top_fp: fx.GraphModule, units: list[UnitSpec], s: QuantSettings
) -> fx.GraphModule:
    """The quantized copy of a split model, with the 8-bit overrides applied."""
    top = copy.deepcopy(top_fp)
    for i, u in enumerate(units):
        _quantize_unit(top.get_submodule(f"unit_{i}"), u.name, s)
    top.recompile()
    n_units = len(units)
    layers = [ql for i in range(n_units) for ql in unit_layers(top.get_submodule(f"unit_{i}"))]
    acts = [
        aq for i in range(n_units) for aq in unit_act_quantizers(top.get_submodule(f"unit_{i}"))
    ]
    # The network output (logits) is never quantized: the last unit's output quantizer goes.
    last_unit = top.get_submodule(f"unit_{n_units - 1}")
    if _unit_output_is_network_output(top, n_units - 1):
        for n in last_unit.graph.nodes:
            if n.op == "output":
                src = n.args[0]
                m = last_unit.get_submodule(src.target) if src.op == "call_module" else None
                if isinstance(m, QuantLayer):
                    m.has_out_quant = False
                elif isinstance(m, OutQuant):
                    n.args = (src.args[0],)
                    last_unit.graph.erase_node(src)
                    last_unit.delete_all_unused_submodules()
                    last_unit.recompile()
        acts = [
            aq for i in range(n_units) for aq in unit_act_quantizers(top.get_submodule(f"unit_{i}"))
        ]
    if s.first_layer_w_bits is not None:
        layers[0].wq.set_bits(s.first_layer_w_bits)
    if s.last_layer_w_bits is not None:
        layers[-1].wq.set_bits(s.last_layer_w_bits)
    if s.head_input_a_bits is not None and acts:
        acts[-1].set_bits(s.head_input_a_bits)
    if s.input_a_bits is not None:
        _add_input_quantizer(top, s.input_a_bits)
    return top


def _add_input_quantizer(top: fx.GraphModule, bits: int) -> None:
    """Put an activation quantizer named ``input`` on the network input, first thing in unit 0
    (it is then initialised and learned with unit 0's other quantizers)."""
    ph = next(n for n in top.graph.nodes if n.op == "placeholder")
    users = list(ph.users)
    if len(users) != 1 or users[0].op != "call_module" or users[0].target != "unit_0":
        raise QuantConfigError(
            "input quantization (input_a_bits) needs the network input to feed only the first "
            f"reconstruction unit; here it feeds {[u.name for u in users]}"
        )
    u0 = top.get_submodule("unit_0")
    u0.add_submodule("in_quant", OutQuant(bits, "input"))
    uph = next(n for n in u0.graph.nodes if n.op == "placeholder")
    with u0.graph.inserting_after(uph):
        iq = u0.graph.call_module("in_quant", (uph,))
    for u in list(uph.users):
        if u is not iq:
            u.replace_input_with(uph, iq)
    u0.recompile()


def _unit_output_is_network_output(top: fx.GraphModule, k: int) -> bool:
    """True when unit k's output reaches the graph output through no other unit or layer."""
    node = next(n for n in top.graph.nodes if n.op == "call_module" and n.target == f"unit_{k}")
    frontier = [node]
    seen = set()
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u.op == "output":
                return True
            if u in seen or (u.op == "call_module" and str(u.target).startswith("unit_")):
                continue
            seen.add(u)
            frontier.append(u)
    return False


def all_quant_layers(top: fx.GraphModule) -> list[QuantLayer]:
    return [m for m in top.modules() if isinstance(m, QuantLayer)]


def set_quant_state(top: nn.Module, weight: bool, act: bool) -> None:
    """Switch weight and activation quantization on/off everywhere in ``top``."""
    for m in top.modules():
        if isinstance(m, QuantLayer):
            m.weight_quant = weight
        if isinstance(m, ActQuantizer):
            m.enabled = act and m.initialised
