"""Generic model graph: tracing, reconstruction-unit discovery, and partial execution.

The official PD-Quant code hard-codes, per architecture, which modules are blocks and how to get
from a block's output to the logits (spec §6.2 item 4). Here both are derived from the torch.fx
graph of any ``nn.Module`` classifier:

* **Residual units.** Every residual ``add`` node, together with every node on a path from its
  immediate dominator (the block input) to the add, plus a trailing activation that is the add's
  only user. This finds BasicBlocks (including the CIFAR "option A" shortcut), bottlenecks and
  inverted-residual / MBConv blocks with a skip connection.
* **Chain units.** Conv/linear layers not in a residual unit that share their deepest enclosing
  module (other than the root) with other such layers, when together they form a single-input,
  single-output chain: inverted-residual / MBConv blocks without a skip connection.
* **Single-layer units.** Every other conv/linear layer, with the BatchNorm and activation that
  follow it.

The traced graph is then rewritten into a *top-level graph* in which each unit is one
``call_module`` node (``unit_<i>``, itself a small ``GraphModule``) and everything between units
(pooling, flatten, dropout, padding) stays as glue. Because each unit has exactly one input and
one output, "the rest of the network from unit k's output" is just the top-level nodes after
``unit_k``, executed by :class:`UnitExecutor`.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn


class GraphError(ValueError):
    """The model cannot be traced or partitioned into reconstruction units."""


CONV_TYPES = (nn.Conv2d,)
LINEAR_TYPES = (nn.Linear,)
BN_TYPES = (nn.BatchNorm2d, nn.BatchNorm1d)
ACT_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.SiLU,
    nn.Hardswish,
    nn.GELU,
    nn.LeakyReLU,
    nn.Mish,
)
ACT_FUNCTIONS = {
    F.relu: nn.ReLU,
    torch.relu: nn.ReLU,
    F.relu6: nn.ReLU6,
    F.silu: nn.SiLU,
    F.hardswish: nn.Hardswish,
    F.gelu: nn.GELU,
}
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
SHAPE_METHODS = ("size", "dim")


class _LeafTracer(fx.Tracer):
    """Treat every conv/linear/BN (including user subclasses) and torch.nn module as a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, CONV_TYPES + LINEAR_TYPES + BN_TYPES + ACT_MODULES):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` (in eval mode) with conv/linear/BN subclasses as leaves.

    Raises :class:`GraphError` naming the failing module and what to do when tracing fails.
    """
    model = model.eval()
    tracer = _LeafTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError, ...)
        where = _innermost_module_in_traceback(exc, model)
        raise GraphError(
            f"torch.fx could not trace the model{where}: {type(exc).__name__}: {exc}. "
            "Data-dependent Python control flow (if/for on tensor values) cannot be traced; "
            "rewrite that module's forward without it, or wrap the offending module so that "
            "tracing treats it as a leaf (it is then run in full precision)."
        ) from exc
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def _innermost_module_in_traceback(exc: BaseException, model: nn.Module) -> str:
    """Best effort: name the module whose forward raised during tracing."""
    tb = exc.__traceback__
    name = ""
    by_code = {}
    for qual, m in model.named_modules():
        code = getattr(type(m).forward, "__code__", None)
        if code is not None:
            by_code.setdefault(code, qual or type(m).__name__)
    while tb is not None:
        code = tb.tb_frame.f_code
        if code in by_code:
            name = by_code[code]
        tb = tb.tb_next
    return f" (in module '{name}')" if name else ""


# ----------------------------------------------------------------------------- node predicates


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    return None


def is_quant_layer(gm, node) -> bool:
    return isinstance(_module(gm, node), CONV_TYPES + LINEAR_TYPES)


def is_bn(gm, node) -> bool:
    return isinstance(_module(gm, node), BN_TYPES)


def act_module_for(gm, node) -> nn.Module | None:
    """The activation module a node applies (a copy for functional calls), or None."""
    m = _module(gm, node)
    if m is not None:
        return m if isinstance(m, ACT_MODULES) else None
    if node.op == "call_function":
        if node.target in ACT_FUNCTIONS:
            return ACT_FUNCTIONS[node.target]()
        if node.target is F.hardtanh:
            lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
            hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
            return nn.Hardtanh(lo, hi)
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return nn.ReLU()
    return None


def is_add(node: fx.Node) -> bool:
    is_call = (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    if not is_call:
        return False
    tensor_args = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    return len(tensor_args) == 2 and "alpha" not in node.kwargs


def _sole_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


# ----------------------------------------------------------------------------- units


@dataclass
class UnitSpec:
    """One reconstruction unit: a set of fx nodes with one input node and one output node."""

    kind: str  # "residual" | "chain" | "layer"
    nodes: list[fx.Node]  # in graph order
    input: fx.Node
    output: fx.Node
    layers: list[fx.Node] = field(default_factory=list)  # conv/linear nodes, in order

    @property
    def name(self) -> str:
        first = self.layers[0].target if self.layers else self.output.name
        if self.kind == "layer":
            return str(first)
        prefix = _common_prefix([str(n.target) for n in self.layers])
        return prefix or str(first)


def _common_prefix(targets: list[str]) -> str:
    parts = [t.split(".") for t in targets]
    out = []
    for items in zip(*parts, strict=False):  # shortest path wins
        if all(i == items[0] for i in items):
            out.append(items[0])
        else:
            break
    return ".".join(out)


def layer_chain(gm, node: fx.Node) -> list[fx.Node]:
    """The layer node followed by its BN and activation when each is the only consumer."""
    chain = [node]
    nxt = _sole_user(node)
    if nxt is not None and is_bn(gm, nxt):
        chain.append(nxt)
        nxt = _sole_user(nxt)
    if nxt is not None and act_module_for(gm, nxt) is not None:
        chain.append(nxt)
    return chain


def _dominators(nodes: list[fx.Node]) -> dict[fx.Node, fx.Node | None]:
    """Immediate dominators over the data graph of a DAG given in topological order."""
    order = {n: i for i, n in enumerate(nodes)}
    idom: dict[fx.Node, fx.Node | None] = {}
    for n in nodes:
        preds = [p for p in n.all_input_nodes]
        if not preds:
            idom[n] = None  # child of the virtual root
            continue
        cur = preds[0]
        for p in preds[1:]:
            a, b = cur, p
            while a is not b:
                if a is None or b is None:
                    a = b = None
                    break
                if order[a] > order[b]:
                    a = idom[a]
                else:
                    b = idom[b]
            cur = a
            if cur is None:
                break
        idom[n] = cur
    return idom


def _between(src: fx.Node, dst: fx.Node, nodes: list[fx.Node]) -> list[fx.Node]:
    """Nodes after ``src`` reachable from ``src`` that reach ``dst`` (``dst`` included)."""
    order = {n: i for i, n in enumerate(nodes)}
    fwd = {src}
    for n in nodes[order[src] + 1 : order[dst] + 1]:
        if any(p in fwd for p in n.all_input_nodes):
            fwd.add(n)
    bwd = {dst}
    for n in reversed(nodes[order[src] + 1 : order[dst] + 1]):
        if n in bwd:
            bwd.update(n.all_input_nodes)
    return [n for n in nodes[order[src] + 1 : order[dst] + 1] if n in fwd and n in bwd]


def _external_inputs(region: list[fx.Node]) -> list[fx.Node]:
    rs = set(region)
    ext = []
    for n in region:
        for p in n.all_input_nodes:
            if p not in rs and p not in ext and p.op != "get_attr":
                ext.append(p)
    return ext


def _escaping(region: list[fx.Node]) -> list[fx.Node]:
    rs = set(region)
    return [n for n in region if any(u not in rs for u in n.users)]


def _check_single_io(region: list[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    ext = _external_inputs(region)
    esc = _escaping(region)
    if len(ext) != 1 or len(esc) != 1 or esc[0] is not region[-1]:
        return None
    return ext[0], esc[0]


def discover_units(gm: fx.GraphModule) -> list[UnitSpec]:
    """Partition the traced graph into reconstruction units (see the module docstring)."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    layers = [n for n in nodes if is_quant_layer(gm, n)]
    if not layers:
        raise GraphError(
            "the model has no quantizable layers (nn.Conv2d or nn.Linear modules); "
            "functional convolutions/linears (F.conv2d with a parameter) are not supported"
        )
    claimed: dict[fx.Node, int] = {}
    units: list[UnitSpec] = []
    idom = _dominators(nodes)

    # residual units
    for n in nodes:
        if not is_add(n) or n in claimed:
            continue
        src = idom.get(n)
        if src is None:
            continue
        region = _between(src, n, nodes)
        act = _sole_user(n)
        if act is not None and act_module_for(gm, act) is not None:
            region.append(act)
        rl = [x for x in region if is_quant_layer(gm, x)]
        if not rl:
            continue  # an add with no weights (e.g. positional constants): leave as glue
        io = _check_single_io(region)
        if io is None:
            continue
        if any(x in claimed for x in region):
            raise GraphError(
                f"nested residual connections around '{n.name}' are not supported as units"
            )
        for x in region:
            claimed[x] = len(units)
        units.append(UnitSpec("residual", region, io[0], io[1], rl))

    # chain units (blocks without a skip connection) from the module hierarchy
    free = [n for n in layers if n not in claimed]
    parent_of = {n: str(n.target).rsplit(".", 1)[0] if "." in str(n.target) else "" for n in free}

    def group_for(layer: fx.Node) -> list[fx.Node]:
        path = parent_of[layer]
        while path:
            members = [m for m in layers if str(m.target).startswith(path + ".")]
            if len(members) >= 2:
                return members
            path = path.rsplit(".", 1)[0] if "." in path else ""
        return [layer]

    for layer in free:
        if layer in claimed:
            continue
        group = group_for(layer)
        ok = len(group) >= 2 and all(g not in claimed for g in group)
        if ok:
            end = layer_chain(gm, group[-1])[-1]
            src = group[0].args[0] if group[0].args else None
            region = _between(src, end, nodes) if isinstance(src, fx.Node) else []
            io = _check_single_io(region) if region else None
            ok = io is not None and all(g in region for g in group)
            if ok:
                for x in region:
                    claimed[x] = len(units)
                units.append(UnitSpec("chain", region, io[0], io[1], group))
                continue
        region = layer_chain(gm, layer)
        io = _check_single_io(region)
        if io is None or any(x in claimed for x in region):
            raise GraphError(
                f"layer '{layer.target}' cannot form a single-input, single-output unit"
            )
        for x in region:
            claimed[x] = len(units)
        units.append(UnitSpec("layer", region, io[0], io[1], [layer]))

    order = {n: i for i, n in enumerate(nodes)}
    units.sort(key=lambda u: order[u.output])
    return units


# ----------------------------------------------------------------------------- splitting


def _region_graph_module(gm: fx.GraphModule, unit: UnitSpec) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    env[unit.input] = g.placeholder("x")
    region = set(unit.nodes)
    for n in unit.nodes:
        for p in n.all_input_nodes:
            if p not in region and p is not unit.input and p not in env:
                env[p] = g.node_copy(p, lambda a: env[a])  # get_attr constants
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[unit.output])
    return fx.GraphModule(gm, g, f"Unit_{unit.kind}")


def split_into_units(gm: fx.GraphModule, units: list[UnitSpec]) -> fx.GraphModule:
    """Rewrite ``gm`` so that each unit is one ``call_module`` node ``unit_<i>``."""
    top = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    node_unit = {n: i for i, u in enumerate(units) for n in u.nodes}
    root = nn.Module()
    for i, u in enumerate(units):
        root.add_module(f"unit_{i}", _region_graph_module(gm, u))
    for n in gm.graph.nodes:
        if n in node_unit:
            i = node_unit[n]
            if n is units[i].output:
                env[n] = top.call_module(f"unit_{i}", (env[units[i].input],))
            continue
        if n.op in ("call_module", "get_attr"):
            _copy_attr(gm, root, str(n.target))
        env[n] = top.node_copy(n, lambda a: env[a])
    out = fx.GraphModule(root, top, gm.__class__.__name__)
    return out


def _copy_attr(src: nn.Module, dst: nn.Module, target: str) -> None:
    *path, last = target.split(".")
    s, d = src, dst
    for p in path:
        s = getattr(s, p)
        if not hasattr(d, p):
            d.add_module(p, nn.Module())
        d = getattr(d, p)
    val = getattr(s, last)
    if isinstance(val, nn.Module):
        d.add_module(last, val)
    elif isinstance(val, nn.Parameter):
        d.register_parameter(last, val)
    elif isinstance(val, torch.Tensor):
        d.register_buffer(last, val)
    else:
        setattr(d, last, val)


# ----------------------------------------------------------------------------- partial execution


class UnitExecutor:
    """Runs pieces of a top-level unit graph: up to a unit's input, or from a unit's output.

    ``run(top, x)`` is the full forward. ``run_from(top, k, y)`` resumes after ``unit_k`` given its
    output ``y`` and returns the network output (used for the PD loss). ``run_between(top, k, y,
    j)`` resumes after ``unit_k`` and stops at the input of ``unit_j``. ``k = -1`` means "start
    from the network input". Tensors that are live across a cut must be the unit output itself;
    the only exception is the network input used solely for its shape (``x.size(0)``), which is
    replaced by a zero-memory expanded tensor of the right shape.
    """

    def __init__(self, top: fx.GraphModule, input_shape: tuple[int, ...] | None = None):
        self.nodes = list(top.graph.nodes)
        self.unit_nodes = [n for n in self.nodes if n.op == "call_module" and _is_unit(n)]
        self.unit_pos = {
            int(str(n.target).split("_")[1]): self.nodes.index(n) for n in self.unit_nodes
        }
        self.placeholder = next(n for n in self.nodes if n.op == "placeholder")
        self.input_shape = input_shape
        self._check_cuts()

    def _check_cuts(self) -> None:
        ph_shape_only = all(
            (u.op == "call_method" and u.target in SHAPE_METHODS)
            or (u.op == "call_function" and u.target is getattr and u.args[1] == "shape")
            for u in self.placeholder.users
            if not (u.op == "call_module" and _is_unit(u))
        )
        self._ph_shape_only = ph_shape_only
        for k, pos in self.unit_pos.items():
            before = set(self.nodes[:pos])
            for n in self.nodes[pos + 1 :]:
                for p in n.all_input_nodes:
                    if p in before and not self._recomputable(p):
                        raise GraphError(
                            f"cannot resume the network after unit_{k}: tensor '{p.name}' computed "
                            f"before that unit is used after it by '{n.name}'; only networks whose "
                            "units form a chain (one live tensor between units) are supported"
                        )

    def _recomputable(self, node: fx.Node) -> bool:
        """A pre-cut node that only depends on the input's shape or on constants."""
        if node.op == "get_attr":
            return True
        if node.op == "placeholder":
            return self._ph_shape_only
        if node.op == "call_module":
            return False
        shape_op = (node.op == "call_method" and node.target in SHAPE_METHODS) or (
            node.op == "call_function"
            and node.target in (getattr, operator.getitem, operator.mul, operator.floordiv)
        )
        return shape_op and all(self._recomputable(p) for p in node.all_input_nodes)

    def _exec(self, top: fx.GraphModule, n: fx.Node, env: dict) -> object:
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        if n.op == "call_module":
            return top.get_submodule(n.target)(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "get_attr":
            return _fetch_attr(top, str(n.target))
        raise RuntimeError(f"unexpected node op {n.op}")

    def _start_env(self, top, k: int, value: torch.Tensor) -> tuple[dict, int]:
        env: dict = {}
        if k < 0:
            env[self.placeholder] = value
            return env, self.nodes.index(self.placeholder) + 1
        pos = self.unit_pos[k]
        shape = self.input_shape
        if shape is None:
            dummy = None
        else:
            dummy = torch.zeros((), dtype=value.dtype, device=value.device).expand(
                value.shape[0], *shape
            )
        env[self.placeholder] = dummy
        for n in self.nodes[:pos]:
            if n.op != "placeholder" and self._recomputable(n) and dummy is not None:
                env[n] = self._exec(top, n, env)
        env[self.nodes[pos]] = value
        return env, pos + 1

    def run_between(self, top, k: int, value: torch.Tensor, stop: int | None) -> torch.Tensor:
        env, start = self._start_env(top, k, value)
        stop_node = self.nodes[self.unit_pos[stop]] if stop is not None else None
        for n in self.nodes[start:]:
            if n is stop_node:
                return env[n.args[0]]
            if n.op == "output":
                return fx.node.map_arg(n.args[0], lambda a: env[a])
            env[n] = self._exec(top, n, env)
        raise RuntimeError("graph has no output node")

    def run_from(self, top, k: int, value: torch.Tensor) -> torch.Tensor:
        return self.run_between(top, k, value, None)


def _is_unit(n: fx.Node) -> bool:
    t = str(n.target)
    return t.startswith("unit_") and t[5:].isdigit()


def _fetch_attr(mod: nn.Module, target: str):
    for a in target.split("."):
        mod = getattr(mod, a)
    return mod


def build_unit_model(model: nn.Module) -> tuple[fx.GraphModule, list[UnitSpec]]:
    """Trace ``model``, discover its units and return the split top-level GraphModule."""
    model = copy.deepcopy(model).eval()
    gm = trace(model)
    units = discover_units(gm)
    return split_into_units(gm, units), units
