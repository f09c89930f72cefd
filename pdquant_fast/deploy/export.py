"""Export a calibrated model to the packed format: ``export_packed(model_or_run_dir, out_dir)``.

The quantized model (a split ``torch.fx`` graph of units holding :class:`QuantLayer` and
activation quantizers, see :mod:`pdquant_fast.qmodel`) is flattened into the runtime graph of
:mod:`pdquant_fast.deploy.runtime`:

* a QuantLayer whose input is activation codes becomes one ``layer_packed`` node: integer
  conv/linear + BN-folded bias + its activation + its output quantizer. When its output feeds a
  residual add (no activation of its own, no output quantizer), the add, the activation after the
  add and the unit's output quantizer are fused into the same node (``residual`` = the other
  operand, dequantized to float32);
* a QuantLayer whose input is float (the first layer on the image, the classifier on pooled
  features) becomes ``layer_float`` with its dequantized weight, exactly as the simulation runs;
* everything else (pooling, flatten, slicing, padding, unfused adds, activations) becomes ``glue``
  from a whitelist; glue that commutes with dequantization runs on codes, the rest in float.

Anything outside the whitelist raises :class:`DeployError` naming the node.
"""

from __future__ import annotations

import json
import operator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import __version__
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    TENSOR_FILE,
    DeployError,
    dtype_name,
    pack_weight_codes,
    packed_shape,
    storage_bits,
    tensor_sha256,
)
from .runtime import CODE_GLUE, GLUE, PACKED_ACTS

_FN_NAMES = {
    operator.getitem: "getitem",
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.mul: "mul",
    torch.mul: "mul",
    F.pad: "pad",
    torch.flatten: "flatten",
    torch.reshape: "reshape",
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    F.hardtanh: "hardtanh",
    F.silu: "silu",
    torch.sigmoid: "sigmoid",
    F.hardswish: "hardswish",
    F.adaptive_avg_pool2d: "adaptive_avg_pool2d",
    F.avg_pool2d: "avg_pool2d",
    F.max_pool2d: "max_pool2d",
    torch.mean: "mean",
}
_METHOD_NAMES = {
    "view": "view",
    "reshape": "reshape",
    "flatten": "flatten",
    "size": "size",
    "contiguous": "contiguous",
    "mean": "mean",
    "relu": "relu",
    "add": "add",
    "add_": "add",
    "mul": "mul",
    "sigmoid": "sigmoid",
}


def _act_name(mod: nn.Module | None) -> str | None:
    """Manifest name of an activation module, or None if the runtime has no exact equivalent."""
    if mod is None:
        return "none"
    if type(mod) is nn.ReLU:
        return "relu"
    if type(mod) is nn.ReLU6 or (
        type(mod) is nn.Hardtanh and mod.min_val == 0.0 and mod.max_val == 6.0
    ):
        return "relu6"
    if type(mod) is nn.SiLU:
        return "silu"
    if type(mod) is nn.Hardswish:
        return "hardswish"
    return None


def _module_glue(mod: nn.Module, node: fx.Node) -> tuple[str, list, dict]:
    """``(glue fn, extra positional args, kwargs)`` equivalent to a glue module's forward."""
    if isinstance(mod, nn.Identity) or (isinstance(mod, nn.Dropout) and not mod.training):
        return "identity", [], {}
    act = _act_name(mod)
    if act is not None and act != "none":
        return act, [], {}
    if type(mod) is nn.AdaptiveAvgPool2d:
        return "adaptive_avg_pool2d", [_plain(mod.output_size)], {}
    if type(mod) is nn.AvgPool2d:
        return (
            "avg_pool2d",
            [],
            {
                "kernel_size": _plain(mod.kernel_size),
                "stride": _plain(mod.stride),
                "padding": _plain(mod.padding),
                "ceil_mode": mod.ceil_mode,
                "count_include_pad": mod.count_include_pad,
                "divisor_override": mod.divisor_override,
            },
        )
    if type(mod) is nn.MaxPool2d and not mod.return_indices:
        return (
            "max_pool2d",
            [],
            {
                "kernel_size": _plain(mod.kernel_size),
                "stride": _plain(mod.stride),
                "padding": _plain(mod.padding),
                "dilation": _plain(mod.dilation),
                "ceil_mode": mod.ceil_mode,
            },
        )
    if type(mod) is nn.Flatten:
        return "flatten", [mod.start_dim, mod.end_dim], {}
    if type(mod) is nn.ZeroPad2d:
        return "pad", [_plain(mod.padding)], {"mode": "constant", "value": 0.0}
    raise DeployError(
        f"node '{node.name}' calls module {type(mod).__name__} ('{node.target}'), which the "
        f"packed runtime cannot run; supported glue: {sorted(GLUE)}"
    )


def _is_identity(mod: nn.Module) -> bool:
    """True when ``mod`` returns its input object unchanged (an Identity of any package)."""
    probe = torch.zeros(1, 1, 2, 2)
    with torch.no_grad():
        return mod(probe) is probe


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


class _Flattener:
    """Walks the quantized model's unit graphs and emits the runtime graph (module docstring)."""

    def __init__(self, q: nn.Module):
        from ..qmodel import OutQuant, QuantLayer

        self.QuantLayer, self.OutQuant = QuantLayer, OutQuant
        self.q = q
        self.nodes: list[dict] = []
        self.kind: dict[str, str | None] = {}  # runtime name -> act name (codes) / None (float)
        self.layers: dict[str, dict] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.acts: dict[str, dict] = {}
        self.act_names: dict[int, str] = {}
        self.deq: dict[str, str] = {}
        self.pending: dict[fx.Node, tuple] = {}  # add node -> the QuantLayer fused into it
        self.consumed: set[fx.Node] = set()  # act / output-quantizer nodes fused into a layer
        self.scalars: set[str] = set()  # runtime names holding Python ints (x.size(0))

    # ------------------------------------------------------------------ helpers
    def _emit(self, node: dict, kind: str | None) -> str:
        if node["name"] in self.kind:
            node["name"] = f"{node['name']}#{len(self.nodes)}"
        self.nodes.append(node)
        self.kind[node["name"]] = kind
        return node["name"]

    def _act(self, aq) -> str:
        """Register an activation quantizer; returns its manifest name."""
        if id(aq) not in self.act_names:
            name = aq.name or f"act{len(self.acts)}"
            if name in self.acts:
                name = f"{name}#{len(self.acts)}"
            self.act_names[id(aq)] = name
            delta = float(aq.delta.detach().float())
            zp = float(aq.zp)
            if zp != round(zp):
                raise DeployError(f"activation quantizer {name}: zero point {zp} is not an integer")
            self.acts[name] = {"bits": int(aq.bits), "delta": delta, "zp": int(zp)}
        return self.act_names[id(aq)]

    def _float(self, ref: str) -> str:
        """A float32 version of the value ``ref`` (a dequantize node when it holds codes)."""
        act = self.kind.get(ref)
        if act is None:
            return ref
        if ref not in self.deq:
            self.deq[ref] = self._emit(
                {"name": f"{ref}.dq", "op": "dequantize", "input": ref, "act": act}, None
            )
        return self.deq[ref]

    @staticmethod
    def _sole_user(n: fx.Node) -> fx.Node | None:
        users = list(n.users)
        return users[0] if len(users) == 1 else None

    def _module(self, gm, n: fx.Node):
        return gm.get_submodule(n.target) if n.op == "call_module" else None

    # ------------------------------------------------------------------ layers
    def _layer_spec(self, ql) -> str:
        """Pack one QuantLayer's tensors; returns its name. Checks the dequantized weight equals
        the simulation's weight bit for bit."""
        name = ql.name
        if name in self.layers:
            raise DeployError(f"layer {name} appears twice in the graph (shared modules)")
        if not ql.weight_quant:
            raise DeployError(f"layer {name}: weight quantization is off; calibrate first")
        wq = ql.wq
        if wq.mode == "soft":
            raise DeployError(f"layer {name}: AdaRound is not finalised (soft rounding)")
        w_bits = int(wq.bits)
        sbits = storage_bits(w_bits)
        codes = wq.int_weight(ql.org_weight)
        shape = list(codes.shape)
        delta = wq.delta.reshape(-1).float().contiguous()
        zp = wq.zp.reshape(-1).float()
        if not torch.equal(zp, torch.round(zp)):
            raise DeployError(f"layer {name}: weight zero points are not integers")
        view = (-1,) + (1,) * (codes.dim() - 1)
        w_dq = (codes - zp.reshape(view)) * delta.reshape(view)
        if not torch.equal(w_dq, ql.weight()):
            raise DeployError(
                f"layer {name}: dequantized codes differ from the simulation's weight"
            )
        spec: dict = {
            "kind": "conv2d" if ql.is_conv else "linear",
            "weight_shape": shape,
            "w_bits": w_bits,
            "storage_bits": sbits,
            "stride": [],
            "padding": [],
            "pre_pad": None,
            "groups": 1,
        }
        if ql.is_conv:
            spec.update(self._conv_params(ql))
        elif not isinstance(ql.layer, nn.Linear):
            raise DeployError(f"layer {name}: {type(ql.layer).__name__} is not supported")
        t = {k: f"{name}.{k}" for k in ("weight", "w_delta", "w_zp", "bias")}
        self.tensors[t["weight"]] = pack_weight_codes(codes, sbits)
        self.tensors[t["w_delta"]] = delta.cpu()
        self.tensors[t["w_zp"]] = zp.to(torch.uint8).cpu()
        self.tensors[t["bias"]] = ql.org_bias.detach().float().contiguous().cpu()
        spec["tensors"] = t
        self.layers[name] = spec
        return name

    def _conv_params(self, ql) -> dict:
        layer = ql.layer
        name = ql.name
        if layer.padding_mode != "zeros":
            raise DeployError(f"layer {name}: padding_mode {layer.padding_mode!r} (only zeros)")
        if tuple(layer.dilation) != (1, 1):
            raise DeployError(f"layer {name}: dilation {tuple(layer.dilation)} is not supported")
        padding = layer.padding
        if isinstance(padding, str):
            if padding != "valid":
                raise DeployError(f"layer {name}: padding={padding!r} (use explicit padding)")
            padding = (0, 0)
        pre_pad = None
        if not ql._plain_conv:
            sp = getattr(layer, "static_padding", None)
            if isinstance(sp, nn.ZeroPad2d):
                pre_pad = [int(p) for p in sp.padding]
            elif not (isinstance(sp, nn.Module) and _is_identity(sp)):
                raise DeployError(
                    f"layer {name}: conv subclass {type(layer).__name__} has a custom forward "
                    "the packed runtime cannot reproduce (supported: nn.Conv2d, and subclasses "
                    "with a ZeroPad2d/Identity 'static_padding' before F.conv2d)"
                )
        p = {
            "stride": [int(s) for s in layer.stride],
            "padding": [int(s) for s in padding],
            "pre_pad": pre_pad,
            "groups": int(layer.groups),
        }
        # the recorded parameters must reproduce the layer's own forward exactly
        w = ql.weight()
        c_in = w.shape[1] * p["groups"]
        x = torch.randn(
            2,
            c_in,
            2 * w.shape[2] + 3,
            2 * w.shape[3] + 3,
            generator=torch.Generator().manual_seed(0),
        ).to(w.device)
        ref = ql._op(x, w, ql.org_bias)
        xp = F.pad(x, pre_pad) if pre_pad else x
        got = F.conv2d(xp, w, ql.org_bias, p["stride"], p["padding"], 1, p["groups"])
        if ref.shape != got.shape or not torch.equal(ref, got):
            raise DeployError(
                f"layer {name}: could not reproduce its conv forward from its stride/padding/groups"
            )
        return p

    def _emit_layer(self, n: fx.Node, ql, env, prefix: str) -> None:
        """A QuantLayer node: packed (codes in) or float (float in); fuses a following add."""
        src = env[n.args[0]]
        in_act = self.kind.get(src)
        out_aq = ql.aq if (ql.has_out_quant and ql.aq.enabled) else None
        act = _act_name(ql.act)
        packable = in_act is not None and act in PACKED_ACTS
        if packable and out_aq is None and ql.act is None:
            add = self._sole_user(n)
            from ..graph import is_add

            if add is not None and is_add(add) and add not in self.pending:
                self.pending[add] = (n, ql, src, in_act)
                return
        lname = self._layer_spec(ql)
        out = self._act(out_aq) if out_aq is not None else None
        if packable:
            node = {
                "name": prefix + n.name,
                "op": "layer_packed",
                "layer": lname,
                "input": src,
                "in_act": in_act,
                "act": act,
                "residual": None,
                "out_act": out,
            }
        else:
            if act is None:
                raise DeployError(
                    f"layer {lname}: activation {type(ql.act).__name__} has no "
                    "equivalent in the packed runtime"
                )
            node = {
                "name": prefix + n.name,
                "op": "layer_float",
                "layer": lname,
                "input": self._float(src),
                "act": act,
                "out_act": out,
            }
        env[n] = self._emit(node, out)

    def _post_add_act(self, gm, nxt: fx.Node | None) -> str | None:
        """ "relu"/"relu6" if ``nxt`` is exactly that activation applied to the add, else None."""
        if nxt is None:
            return None
        if nxt.op == "call_module":
            act = _act_name(self._module(gm, nxt))
            return act if act in ("relu", "relu6") else None
        if nxt.op == "call_function" and len(nxt.args) == 1:
            act = _FN_NAMES.get(nxt.target)
            if act in ("relu", "relu6") and not nxt.kwargs.get("inplace", False):
                return act
        return None

    def _emit_fused_add(self, gm, add: fx.Node, env, prefix: str) -> None:
        """QuantLayer -> add(residual) [-> ReLU/ReLU6] [-> output quantizer] as one packed op."""
        n, ql, src, in_act = self.pending.pop(add)
        other = next(a for a in add.args[:2] if a is not n)
        residual = self._float(env[other])
        chain = [add]
        act = self._post_add_act(gm, self._sole_user(add))
        if act is not None:
            chain.append(self._sole_user(add))
        else:
            act = "none"
        out = None
        nxt = self._sole_user(chain[-1])
        mod = self._module(gm, nxt) if nxt is not None else None
        if isinstance(mod, self.OutQuant) and mod.aq.enabled:
            out = self._act(mod.aq)
            chain.append(nxt)
        lname = self._layer_spec(ql)
        node = {
            "name": prefix + chain[-1].name,
            "op": "layer_packed",
            "layer": lname,
            "input": src,
            "in_act": in_act,
            "act": act,
            "residual": residual,
            "out_act": out,
        }
        name = self._emit(node, out)
        for c in chain:
            env[c] = name
            self.consumed.add(c)

    # ------------------------------------------------------------------ walk
    def walk(self, gm: fx.GraphModule, env: dict, prefix: str = "") -> str:
        out_ref = None
        for n in gm.graph.nodes:
            if n in self.consumed:
                continue
            if n.op == "placeholder":
                if n not in env:
                    env[n] = self._emit({"name": "input", "op": "input"}, None)
                continue
            if n.op == "output":
                out_ref = env[n.args[0]]
                continue
            if n in self.pending:
                self._emit_fused_add(gm, n, env, prefix)
                continue
            mod = self._module(gm, n)
            if isinstance(mod, fx.GraphModule):  # a unit
                sub_env = {}
                ph = next(p for p in mod.graph.nodes if p.op == "placeholder")
                sub_env[ph] = env[n.args[0]]
                env[n] = self.walk(mod, sub_env, prefix=f"{n.target}.")
                continue
            if isinstance(mod, self.QuantLayer):
                self._emit_layer(n, mod, env, prefix)
                continue
            if isinstance(mod, self.OutQuant):
                src = env[n.args[0]]
                if mod.aq.enabled:
                    a = self._act(mod.aq)
                    env[n] = self._emit(
                        {
                            "name": prefix + n.name,
                            "op": "quantize",
                            "input": self._float(src),
                            "act": a,
                        },
                        a,
                    )
                else:
                    env[n] = src
                continue
            self._emit_glue(gm, n, mod, env, prefix)
        if self.pending:
            raise DeployError(f"internal: unfused adds left {list(self.pending)}")
        return out_ref

    def _emit_glue(self, gm, n: fx.Node, mod, env, prefix: str) -> None:
        if n.op == "call_module":
            fn, extra, kwargs = _module_glue(mod, n)
            args = [n.args[0], *extra]
        elif n.op == "call_function":
            fn = _FN_NAMES.get(n.target)
            if fn is None and n.target is F.dropout:
                if n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True):
                    raise DeployError(f"node '{n.name}': dropout in training mode")
                fn, args, kwargs = "identity", [n.args[0]], {}
            else:
                args, kwargs = list(n.args), dict(n.kwargs)
        elif n.op == "call_method":
            fn = _METHOD_NAMES.get(n.target)
            args, kwargs = list(n.args), dict(n.kwargs)
        else:
            raise DeployError(f"node '{n.name}' ({n.op} {n.target}) is not supported in export")
        if fn is None:
            raise DeployError(
                f"node '{n.name}' calls {getattr(n.target, '__name__', n.target)}, which the "
                f"packed runtime cannot run; supported glue: {sorted(GLUE)}"
            )
        if fn == "pad":
            pad_args = list(args) + [None] * (4 - len(args))
            mode = kwargs.get("mode", pad_args[2] or "constant")
            value = kwargs.get("value", pad_args[3])
            args, kwargs = [args[0], _plain(args[1])], {"mode": mode, "value": value}
        tensor_refs = [
            a
            for a in list(args[1:]) + list(kwargs.values())
            if isinstance(a, fx.Node) and self._is_tensor(env[a])
        ]
        src = env[args[0]] if isinstance(args[0], fx.Node) else None
        codes_act = self.kind.get(src) if src is not None else None
        on_codes = (
            codes_act is not None
            and fn in CODE_GLUE
            and not tensor_refs
            and (fn != "pad" or (kwargs["mode"] == "constant" and not kwargs["value"]))
        )
        if fn == "size":
            on_codes = False
        enc_args = [
            self._encode(a, env, keep_codes=on_codes and i == 0) for i, a in enumerate(args)
        ]
        enc_kwargs = {k: self._encode(v, env, keep_codes=False) for k, v in kwargs.items()}
        if fn == "pad" and on_codes:
            enc_kwargs["value"] = None
        node = {
            "name": prefix + n.name,
            "op": "glue",
            "fn": fn,
            "args": enc_args,
            "kwargs": enc_kwargs,
            "codes_act": codes_act if on_codes else None,
        }
        kind = codes_act if on_codes else None
        name = self._emit(node, kind)
        if fn == "size":
            self.scalars.add(name)
        env[n] = name

    def _is_tensor(self, ref) -> bool:
        return isinstance(ref, str) and ref not in self.scalars

    def _encode(self, v, env, keep_codes: bool):
        if isinstance(v, fx.Node):
            ref = env[v]
            if ref in self.scalars:
                return {"ref": ref}
            return {"ref": ref if keep_codes else self._float(ref)}
        if isinstance(v, slice):
            return {
                "slice": [
                    self._encode(v.start, env, False),
                    self._encode(v.stop, env, False),
                    self._encode(v.step, env, False),
                ]
            }
        if isinstance(v, tuple):
            return {"tuple": [self._encode(i, env, False) for i in v]}
        if isinstance(v, list):
            return [self._encode(i, env, False) for i in v]
        if v is Ellipsis:
            return {"ellipsis": True}
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise DeployError(f"cannot serialise argument {v!r} ({type(v).__name__}) of the graph")


# ---------------------------------------------------------------------------------------------
# writing


def _state_dict_bytes(sd: dict[str, torch.Tensor]) -> int:
    """Size of ``sd`` serialised as safetensors (float tensors as they are: FP32)."""
    from safetensors.torch import save

    flat = {k: v.detach().cpu().contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return len(save(flat))


def _from_run_dir(run: Path) -> tuple[nn.Module, nn.Module, dict, dict]:
    """``(quantized model, fp model, model info dict, source dict)`` of a calibration folder."""
    from ..api import build_quantized_skeleton, load_quant_state
    from ..config import CalibConfig
    from ..models.registry import build_model

    result_path, state_path = run / "result.json", run / "quant_state.pt"
    for p in (result_path, state_path):
        if not p.is_file():
            raise DeployError(f"{p}: missing; {run} is not a finished `pdquant calibrate` folder")
    try:
        result = json.loads(result_path.read_text())
    except json.JSONDecodeError as exc:
        raise DeployError(f"{result_path}: not valid JSON ({exc})") from exc
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DeployError(f"{state_path}: cannot be read ({exc})") from exc
    weights = result.get("weights")
    if weights is None and result.get("model") != "efficientnet_lite0":
        raise DeployError(
            f"{result_path}: the run was calibrated from randomly initialised weights that were "
            "not saved; only runs with a weights file can be exported"
        )
    model, info = build_model(result["model"], weights)
    cfg = CalibConfig(**result["config"])
    q = load_quant_state(build_quantized_skeleton(model, cfg), state)
    model_info = {
        "name": info.name,
        "num_classes": info.num_classes,
        "input_size": list(info.input_size),
        "weights_sha256": result.get("weights_sha256"),
        "weights_bytes": Path(info.weights_path).stat().st_size if info.weights_path else None,
    }
    source = {
        "run_dir": str(run.resolve()),
        "method": result.get("method", cfg.method),
        "w_bits": cfg.w_bits,
        "a_bits": cfg.a_bits,
        "input_a_bits": cfg.input_a_bits,
        "config": result["config"],
    }
    return q, model, model_info, source


def export_packed(
    model_or_run_dir,
    out_dir,
    *,
    fp_model: nn.Module | None = None,
    model_info: dict | None = None,
    source: dict | None = None,
) -> dict:
    """Write ``out_dir/manifest.json`` and ``out_dir/weights.safetensors``; return the manifest.

    Args:
        model_or_run_dir: a calibrated quantized model (the ``GraphModule`` returned by
            :func:`pdquant_fast.quantize`, or a skeleton with a loaded quant state), or a folder
            written by ``pdquant calibrate`` (``result.json`` + ``quant_state.pt``).
        out_dir: created if needed; both files are written atomically (temp file + rename),
            tensors first, so a manifest always describes a complete tensor file.
        fp_model: the FP32 model, for the size comparison (taken from the run folder if given).
        model_info: ``{name, num_classes, input_size, ...}`` recorded as a reference.
        source: what produced the model (method, bits, config), recorded as is.

    Raises :class:`DeployError` naming the layer or graph node that cannot be exported.
    """
    from safetensors.torch import save

    from ..api import atomic_write_bytes, atomic_write_json

    info = dict(model_info or {})
    src = dict(source or {})
    if isinstance(model_or_run_dir, (str, Path)):
        q, fp, info_run, src_run = _from_run_dir(Path(model_or_run_dir))
        info = {**info_run, **info}
        src = {**src_run, **src}
        fp_model = fp_model if fp_model is not None else fp
    else:
        q = model_or_run_dir
    if not isinstance(q, fx.GraphModule):
        raise DeployError(
            f"expected a quantized model (torch.fx.GraphModule from pdquant_fast.quantize) or a "
            f"run folder, got {type(q).__name__}"
        )
    q = q.eval()
    fl = _Flattener(q)
    with torch.no_grad():
        output = fl.walk(q, {})
    if output is None or fl.kind.get(output) is not None:
        output = fl._float(output) if output is not None else None
    if output is None:
        raise DeployError("the model graph has no output")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeployError(f"{out}: cannot create the output folder ({exc})") from exc
    tensors = {k: v.contiguous() for k, v in fl.tensors.items()}
    blob = save(tensors, metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION)})
    if fp_model is not None:
        fp_bytes = _state_dict_bytes(fp_model.state_dict())
        fp_basis = "FP32 model state_dict as safetensors"
    else:
        sd = {}
        for m in q.modules():
            if isinstance(m, fl.QuantLayer):
                sd[m.name + ".weight"] = m.org_weight
                sd[m.name + ".bias"] = m.org_bias
        fp_bytes = _state_dict_bytes(sd)
        fp_basis = "FP32 BN-folded conv/linear weights and biases as safetensors"
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "library": __version__,
        "model": info,
        "source": src,
        "tensor_file": TENSOR_FILE,
        "tensor_file_bytes": len(blob),
        "tensors": {
            k: {"dtype": dtype_name(v), "shape": list(v.shape), "sha256": tensor_sha256(v)}
            for k, v in tensors.items()
        },
        "layers": fl.layers,
        "acts": fl.acts,
        "graph": fl.nodes,
        "output": output,
        "sizes": {
            "packed_bytes": len(blob),
            "fp32_state_dict_bytes": fp_bytes,
            "fp32_basis": fp_basis,
            "fp32_checkpoint_bytes": info.get("weights_bytes"),
            "ratio": fp_bytes / len(blob),
        },
    }
    for name, spec in fl.layers.items():
        want = packed_shape(spec["weight_shape"], spec["storage_bits"])
        assert list(tensors[spec["tensors"]["weight"]].shape) == want, name
    try:
        atomic_write_bytes(out / TENSOR_FILE, blob)
        atomic_write_json(out / MANIFEST_FILE, manifest)
    except OSError as exc:
        raise DeployError(f"{out}: cannot write the packed model ({exc})") from exc
    return manifest
