"""The packed runtime: :class:`PackedModel`, a graph of packed conv/linear ops and float glue.

It needs only ``torch`` and :mod:`pdquant_fast.ops` (no calibration code, no model definition):
the network is rebuilt from the manifest's ``graph``, a list of nodes in execution order. Each
node has a ``name`` and an ``op``; values are float32 tensors, uint8 activation codes of a named
activation quantizer (``acts``), or small Python values (sizes):

==============  =================================================================================
op              meaning
==============  =================================================================================
input           the float32 image batch ``[N, C, H, W]``
quantize        codes = clamp(round_half_even(x / delta) + zp, 0, 2^bits - 1)  (float -> uint8,
                ``ops.quantize_codes``)
dequantize      x = (float32(codes) - zp) * delta                              (uint8 -> float,
                ``ops.dequantize_codes``)
layer_packed    ``ops.qconv2d`` / ``ops.qlinear`` on codes of ``in_act``: exact int32
                accumulation, then y = float(acc) * (in_delta * w_delta[o]) + bias[o]
                (+ ``residual``: float32, or, when the residual node is a ``dequantize``,
                its uint8 codes, dequantized inside the kernel), activation, then codes of
                ``out_act`` (or float32 y when ``out_act`` is null)
layer_float     F.conv2d / F.linear on float32 x with the dequantized weight
                (code - w_zp) * w_delta and the float bias, activation, then optionally
                ``quantize`` to ``out_act`` (the first layer on the image, the classifier on
                pooled features: what the simulation runs in float runs in float here)
glue            a whitelisted torch function (:data:`GLUE`) on its ``args``/``kwargs``; with
                ``codes_act`` set it is applied to codes directly (slicing, zero padding with the
                zero point, flatten/view, max-pool: all commute with dequantization)
==============  =================================================================================

Activation codes are uint8 ``[N, C, H, W]`` or ``[N, K]``; feature maps of codes are
channels_last where the C++ kernels run (:attr:`PackedModel.memory_format` ``"auto"``: no
transposes in their NHWC GEMM, an NHWC max-pool), NCHW elsewhere; float32 tensors are always
NCHW, so float layers and float glue sum in the simulation's order. Weights are held
unpacked at run time as int8 offsets ``code - w_zp[o]`` (int16 for 8-bit weights), the layout
``qconv2d``/``qlinear`` take; a backend with a weight prepack (``<op>_prepack_<backend>``, see
:mod:`pdquant_fast.ops.library`) gets it prepacked once per device.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import backends
from .format import DeployError, unpack_weight_codes

#: Activation codes for the packed ops' ``act`` argument.
PACKED_ACTS = {"none": 0, "relu": 1, "relu6": 2}


def _relu6(x):
    return F.hardtanh(x, 0.0, 6.0)  # what nn.ReLU6 runs


FLOAT_ACTS = {
    "none": lambda x: x,
    "relu": F.relu,
    "relu6": _relu6,
    "silu": F.silu,
    "hardswish": F.hardswish,
}


#: The same activations applied in place (bit-identical results), for a fresh layer output:
#: saves one full-size allocation and pass (ResNet-18's float stem: 25.7 MB at batch 8).
FLOAT_ACTS_INPLACE = {
    "none": lambda x: x,
    "relu": torch.relu_,
    "relu6": lambda x: F.hardtanh_(x, 0.0, 6.0),
    "silu": lambda x: F.silu(x, inplace=True),
    "hardswish": lambda x: F.hardswish(x, inplace=True),
}


def _identity(x, *args, **kwargs):
    return x


#: Float (or code-preserving) glue functions a manifest may name.
GLUE = {
    "getitem": operator.getitem,
    "add": operator.add,
    "mul": operator.mul,
    "pad": F.pad,
    "flatten": torch.flatten,
    "view": torch.Tensor.view,
    "reshape": torch.reshape,
    "contiguous": torch.Tensor.contiguous,
    "size": torch.Tensor.size,
    "identity": _identity,
    "relu": F.relu,
    "relu6": _relu6,
    "hardtanh": F.hardtanh,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "hardswish": F.hardswish,
    "adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "avg_pool2d": F.avg_pool2d,
    "max_pool2d": F.max_pool2d,
    "mean": torch.mean,
}

#: Glue that may run on activation codes (commutes with a per-tensor affine dequantization whose
#: step is positive; zero padding becomes padding with the zero point).
CODE_GLUE = {
    "getitem",
    "pad",
    "flatten",
    "view",
    "reshape",
    "contiguous",
    "identity",
    "max_pool2d",
    "size",
}


def _decode(v, env):
    """Manifest argument -> Python value (node references looked up in ``env``)."""
    if isinstance(v, list):
        return [_decode(i, env) for i in v]
    if isinstance(v, dict):
        if "ref" in v:
            return env[v["ref"]]
        if "slice" in v:
            return slice(*v["slice"])
        if "tuple" in v:
            return tuple(_decode(i, env) for i in v["tuple"])
        if "ellipsis" in v:
            return Ellipsis
        raise DeployError(f"unknown argument encoding {v!r} in the manifest graph")
    return v


def _refs(v) -> list[str]:
    """Node names referenced (``{"ref": name}``) anywhere inside a manifest argument."""
    if isinstance(v, list):
        return [r for i in v for r in _refs(i)]
    if isinstance(v, dict):
        if "ref" in v:
            return [v["ref"]]
        return [r for i in v.values() for r in _refs(i)]
    return []


def node_inputs(node: dict) -> list[str]:
    """Names of the graph nodes whose values ``node`` reads."""
    if node["op"] == "glue":
        return _refs(node["args"]) + _refs(list(node["kwargs"].values()))
    return [r for r in (node.get("input"), node.get("residual")) if r]


class ActParams(nn.Module):
    """One per-tensor activation quantizer: ``delta``/``zp`` float32 0-d buffers, ``bits``."""

    def __init__(self, bits: int, delta: float, zp: int):
        super().__init__()
        self.bits = bits
        self.zp_int = int(zp)
        self.delta_value = float(delta)
        self.register_buffer("delta", torch.tensor(delta, dtype=torch.float32))
        self.register_buffer("zp", torch.tensor(float(zp), dtype=torch.float32))

    def quantize(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """float32 -> uint8 codes, the simulation's ``clamp(round(x / delta) + zp, 0, n)``
        (``ops.quantize_codes``: one fused pass where a kernel backend has it); with
        ``channels_last`` (4-d ``x``) the codes come out channels_last."""
        return ops.quantize_codes(x, self.delta_value, self.zp_int, self.bits, channels_last)

    def dequantize(self, c: torch.Tensor) -> torch.Tensor:
        """uint8 codes -> float32 ``(c - zp) * delta`` (bit-identical to the simulation;
        ``ops.dequantize_codes``: one fused pass where a kernel backend has it)."""
        return ops.dequantize_codes(c, self.delta_value, self.zp_int)


_NONE = object()  # "no entry" for dict.get where None is a value


def _accepts(fn, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (Python signature or pybind11 docstring)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin (pybind11): its docstring starts with the signature
        first = (getattr(fn, "__doc__", None) or "").split("\n", 1)[0]
        return f"{name}:" in first or f"{name}=" in first


def _merge_padding(pre_pad, padding) -> tuple[list[int] | None, list[int]]:
    """Fold a static (left, right, top, bottom) zero pad into symmetric conv padding if it is
    symmetric, else return it as an explicit pre-pad and conv padding 0."""
    if not pre_pad:
        return None, list(padding)
    left, right, top, bottom = pre_pad
    ph, pw = padding
    if left == right and top == bottom:
        return None, [ph + top, pw + left]
    return [left + pw, right + pw, top + ph, bottom + ph], [0, 0]


class PackedLayer(nn.Module):
    """A conv/linear layer with fused requantisation on activation codes.

    Buffers: ``w`` int8 (int16 for 8-bit weights) ``[O, C/g, kh, kw]`` or ``[O, K]`` holding
    ``code - w_zp[o]``; ``scale = in_delta * w_delta`` and ``bias`` float32 ``[O]``.
    """

    def __init__(
        self,
        spec: dict,
        codes: torch.Tensor,
        w_zp,
        w_delta,
        bias,
        in_act: ActParams,
        node: dict,
        out_act: ActParams | None,
    ):
        super().__init__()
        self.name = node["layer"]
        self.kind = spec["kind"]
        off = codes.to(torch.int16) - w_zp.to(torch.int16).reshape((-1,) + (1,) * (codes.dim() - 1))
        self.register_buffer("w", off.to(torch.int8) if spec["w_bits"] <= 7 else off)
        self.register_buffer("scale", in_act.delta * w_delta)
        self.register_buffer("bias", bias.clone())
        self.x_zp = in_act.zp_int
        self.in_bits = in_act.bits
        self.w_bits = int(spec["w_bits"])
        self.act = PACKED_ACTS[node["act"]]
        self.out_scale = out_act.delta_value if out_act is not None else 0.0
        self.out_zp = out_act.zp_int if out_act is not None else 0
        self.out_bits = out_act.bits if out_act is not None else 0
        if self.kind == "conv2d":
            self.pre_pad, self.padding = _merge_padding(spec["pre_pad"], spec["padding"])
            self.stride = list(spec["stride"])
            self.groups = int(spec["groups"])
        self._prepacked: dict = {}

    def _apply(self, fn, *args, **kwargs):
        self._prepacked = {}  # device or dtype change: prepack again
        return super()._apply(fn, *args, **kwargs)

    def _backend_call(self, x: torch.Tensor):
        """The chosen backend's entry point with a prepacked weight, if it offers a prepack."""
        op = "qconv2d" if self.kind == "conv2d" else "qlinear"
        name, fn = backends.choose(op, x.device.type)
        key = (name, x.device)
        got = self._prepacked.get(key, _NONE)
        if got is not _NONE:
            return got
        mod = None
        if name in ("cpp", "cuda"):
            mod = backends._extension()[0]
        elif name == "triton":
            mod = backends._triton_kernels()[0]
        suffix = {"cpp": "cpu"}.get(name, name)
        prepack = getattr(mod, f"{op}_prepack_{suffix}", None) if mod is not None else None
        if prepack is None:
            self._prepacked[key] = None
        else:
            # optional hints a prepack may take: the activation and weight bit-widths
            hints = {"a_bits": self.in_bits, "w_bits": self.w_bits}
            kw = {k: v for k, v in hints.items() if _accepts(prepack, k)}
            if self.kind == "conv2d":
                self._prepacked[key] = (fn, prepack(self.w, self.groups, **kw))
            else:
                self._prepacked[key] = (fn, prepack(self.w, **kw))
        return self._prepacked[key]

    def acc(self, x: torch.Tensor) -> torch.Tensor:
        """float32 of the int32 accumulator for input codes ``x``, through the op that runs this
        layer (scale 1, bias 0, no activation, float output; exact while ``|acc| < 2**24``)."""
        o = self.w.shape[0]
        keep = (self.scale, self.bias, self.act, self.out_bits)
        self.scale = torch.ones(o, device=x.device)
        self.bias = torch.zeros(o, device=x.device)
        self.act, self.out_bits = 0, 0
        try:
            return self.forward(x, None)
        finally:
            self.scale, self.bias, self.act, self.out_bits = keep

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        res_act: ActParams | None = None,
    ) -> torch.Tensor:
        """Output for input codes ``x``; ``residual`` float32, or uint8 codes of ``res_act``
        (dequantized inside the kernel's epilogue, bit-identical to ``res_act.dequantize``)."""
        pre = self._backend_call(x)
        rs, rzp = (res_act.delta_value, res_act.zp_int) if res_act is not None else (0.0, 0)
        if self.kind == "conv2d":
            if self.pre_pad is not None:
                x = F.pad(x, self.pre_pad, value=self.x_zp)
            # the C++ kernels (a prepacked CPU call) take channels_last codes as they are and
            # return channels_last; everything else gets NCHW
            if not (pre is not None and x.device.type == "cpu" and _is_cl(x)):
                x = x.contiguous()
                if residual is not None:
                    residual = residual.contiguous()
            if pre is not None:
                fn, wp = pre
                return fn(
                    x,
                    self.x_zp,
                    wp,
                    self.scale,
                    self.bias,
                    self.stride,
                    self.padding,
                    self.groups,
                    self.act,
                    residual,
                    self.out_scale,
                    self.out_zp,
                    self.out_bits,
                    rs,
                    rzp,
                )
            return ops.qconv2d(
                x,
                self.x_zp,
                self.w,
                self.scale,
                self.bias,
                self.stride,
                self.padding,
                self.groups,
                self.act,
                residual,
                self.out_scale,
                self.out_zp,
                self.out_bits,
                rs,
                rzp,
            )
        x = x.contiguous()
        if pre is not None:
            fn, wp = pre
            return fn(
                x,
                self.x_zp,
                wp,
                self.scale,
                self.bias,
                self.act,
                residual,
                self.out_scale,
                self.out_zp,
                self.out_bits,
                rs,
                rzp,
            )
        return ops.qlinear(
            x,
            self.x_zp,
            self.w,
            self.scale,
            self.bias,
            self.act,
            residual,
            self.out_scale,
            self.out_zp,
            self.out_bits,
            rs,
            rzp,
        )


class FloatLayer(nn.Module):
    """A conv/linear layer run in float32 with its dequantized weight (first/last layers).

    Buffers: ``weight`` float32 ``(code - w_zp) * w_delta`` (the simulation's weight, bit for
    bit) and ``bias`` float32 ``[O]``.
    """

    def __init__(self, spec: dict, codes: torch.Tensor, w_zp, w_delta, bias, node: dict):
        super().__init__()
        self.name = node["layer"]
        self.kind = spec["kind"]
        shape = (-1,) + (1,) * (codes.dim() - 1)
        w = (codes.to(torch.float32) - w_zp.to(torch.float32).reshape(shape)) * w_delta.reshape(
            shape
        )
        self.register_buffer("weight", w)
        self.register_buffer("bias", bias.clone())
        self.act = FLOAT_ACTS_INPLACE[node["act"]]
        if self.kind == "conv2d":
            self.pre_pad = spec["pre_pad"]
            self.padding = list(spec["padding"])
            self.stride = list(spec["stride"])
            self.groups = int(spec["groups"])

    def forward(self, x: torch.Tensor, act: bool = True) -> torch.Tensor:
        """float32 output; ``act=False`` leaves out the activation (the caller has shown it to be
        a no-op for what follows)."""
        if self.kind == "conv2d":
            x = x.contiguous()  # the simulation's layout: the same float conv, the same sums
            if self.pre_pad:
                x = F.pad(x, self.pre_pad)
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        else:
            y = F.linear(x, self.weight, self.bias)
        return self.act(y) if act else y  # y is a fresh tensor: in place is safe


def _is_cl(x: torch.Tensor) -> bool:
    """4-d and channels_last (not also NCHW-contiguous, as a C = 1 or 1x1 tensor is)."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return cl and not x.is_contiguous()


#: Activation layouts the packed model can run in (:attr:`PackedModel.memory_format`).
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


def _safe(name: str) -> str:
    return name.replace(".", "_")


class PackedModel(nn.Module):
    """The packed network: float32 images ``[N, C, H, W]`` -> float32 logits ``[N, classes]``.

    Build it with :func:`pdquant_fast.deploy.load_packed` (which verifies the files) or from an
    already verified manifest and tensor dict. Runs on any device the ops support
    (``.to("cuda")``); the kernel is chosen per call by :mod:`pdquant_fast.ops.backends`.
    """

    def __init__(
        self, manifest: dict, tensors: dict[str, torch.Tensor], memory_format: str = "auto"
    ):
        super().__init__()
        if memory_format not in MEMORY_FORMATS:
            raise DeployError(
                f"memory_format {memory_format!r} is not one of {list(MEMORY_FORMATS)}"
            )
        #: Layout of the activation codes between packed layers: ``"contiguous"`` (NCHW),
        #: ``"channels_last"`` (the C++ kernels read and write it directly: no transposes in
        #: their NHWC GEMM, the NHWC max-pool), or ``"auto"``: channels_last where the C++
        #: kernels run the convolutions (CPU), NCHW elsewhere. Float tensors (float layers,
        #: float glue) stay NCHW in all three, so that float sums run in the simulation's order:
        #: the logits are identical whichever layout runs.
        self.memory_format = memory_format
        self._cl = False  # the last forward's choice (see layout)
        self._direct: dict = {}  # the last forward's direct C++ calls (see _direct_fns)
        self.manifest = manifest
        self.graph_nodes = manifest["graph"]
        self.output_name = manifest["output"]
        self.acts = nn.ModuleDict(
            {
                _safe(k): ActParams(v["bits"], v["delta"], v["zp"])
                for k, v in manifest["acts"].items()
            }
        )
        self.layers = nn.ModuleDict()
        for node in self.graph_nodes:
            if node["op"] not in ("layer_packed", "layer_float"):
                continue
            lname = node["layer"]
            spec = manifest["layers"][lname]
            t = spec["tensors"]
            codes = unpack_weight_codes(
                tensors[t["weight"]], spec["storage_bits"], spec["weight_shape"]
            )
            args = (spec, codes, tensors[t["w_zp"]], tensors[t["w_delta"]], tensors[t["bias"]])
            if node["op"] == "layer_packed":
                out = self._act(node["out_act"]) if node["out_act"] else None
                mod = PackedLayer(*args, self._act(node["in_act"]), node, out)
            else:
                mod = FloatLayer(*args, node)
            self.layers[_safe(lname)] = mod

        # A residual that is a dequantize of activation codes is passed to the packed op as the
        # codes (the kernel dequantizes them in its epilogue, bit for bit): the skip connection
        # stays uint8 in memory, and a dequantize read by nothing else is never computed.
        producer = {n["name"]: n for n in self.graph_nodes}
        self._res_codes: dict[str, tuple[str, str]] = {}
        for node in self.graph_nodes:
            if node["op"] == "layer_packed" and node["residual"]:
                src = producer.get(node["residual"])
                if src is not None and src["op"] == "dequantize":
                    self._res_codes[node["name"]] = (src["input"], src["act"])
        readers: dict[str, set[str]] = {}
        for node in self.graph_nodes:
            for r in node_inputs(node):
                readers.setdefault(r, set()).add(node["name"])
        self._skip = {
            n["name"]
            for n in self.graph_nodes
            if n["op"] == "dequantize"
            and n["name"] != self.output_name
            and all(
                r in self._res_codes
                and producer[r]["residual"] == n["name"]
                and producer[r]["input"] != n["name"]
                for r in readers.get(n["name"], ())
            )
        }
        # per packed-layer node: its module and, for a residual read as codes, (the codes'
        # node, their ActParams); looked up once here instead of by name in every forward
        self._packed_plan = {
            n["name"]: (
                self.layers[_safe(n["layer"])],
                (rc[0], self._act(rc[1])) if (rc := self._res_codes.get(n["name"])) else None,
            )
            for n in self.graph_nodes
            if n["op"] == "layer_packed"
        }

    @property
    def layout(self) -> str:
        """The activation layout the last forward ran: ``"channels_last"`` or ``"contiguous"``."""
        return "channels_last" if self._cl else "contiguous"

    def _act(self, name: str) -> ActParams:
        return self.acts[_safe(name)]

    def packed_layers(self) -> list[PackedLayer]:
        return [m for m in self.layers.values() if isinstance(m, PackedLayer)]

    def forward(
        self, x: torch.Tensor, capture: dict | None = None, teacher: dict | None = None
    ) -> torch.Tensor:
        """Logits float32 ``[N, classes]`` for float32 images ``x`` ``[N, C, H, W]``.

        Parity tools (both optional): ``capture`` (a dict) receives, per packed layer name,
        ``{"x": input codes, "residual": float32 or None, "out": output}`` and ``capture["codes"]``
        each quantizer's codes (before any teacher replacement); ``teacher`` maps
        activation-quantizer names to uint8 codes that replace this model's own codes for that
        quantizer after they are computed (``capture["flips"][name]`` then counts the elements
        where they differed), so that each layer can be compared on the reference's inputs.
        """
        env: dict = {}
        self._cl = self.memory_format == "channels_last" or (
            self.memory_format == "auto"
            and x.device.type == "cpu"
            and backends.choose("qconv2d", "cpu")[0] == "cpp"
        )
        self._direct = _direct_fns(x)
        for node in self.graph_nodes:
            op = node["op"]
            out_act = None
            if op == "input":
                val = x
            elif op == "quantize":
                val = self._quantize_codes(self._act(node["act"]), env[node["input"]])
                out_act = node["act"]
            elif op == "dequantize":
                if node["name"] in self._skip:
                    continue  # only read as residual codes (see __init__)
                # float values are NCHW (the simulation's layout, see memory_format)
                act = self._act(node["act"])
                codes = env[node["input"]].contiguous()
                fn = self._direct.get("dequantize_codes")
                val = fn(codes, act.delta_value, act.zp_int) if fn else act.dequantize(codes)
            elif op == "layer_packed":
                xin = env[node["input"]]
                layer, rc = self._packed_plan[node["name"]]
                if rc is not None:
                    res, res_act = env[rc[0]], rc[1]
                else:
                    res, res_act = (env[node["residual"]] if node["residual"] else None), None
                val = layer(xin, res, res_act)
                out_act = node["out_act"]
                if capture is not None:
                    res_f = res_act.dequantize(res) if res_act is not None else res
                    capture[node["layer"]] = {"x": xin, "residual": res_f, "out": val}
            elif op == "layer_float":
                out_q = self._act(node["out_act"]) if node["out_act"] else None
                # ReLU straight into a quantizer with zero point 0 changes no code (a negative
                # value's code is already clamped to 0): skip the pass
                skip = node["act"] == "relu" and out_q is not None and out_q.zp_int == 0
                val = self.layers[_safe(node["layer"])](env[node["input"]], act=not skip)
                if out_q is not None:
                    val = self._quantize_codes(out_q, val)
                    out_act = node["out_act"]
            elif op == "glue":
                val = self._glue(node, env)
            else:
                raise DeployError(f"unknown graph op {op!r} in node {node['name']!r}")
            if capture is not None and out_act:
                capture.setdefault("codes", {})[out_act] = val
            if teacher is not None and out_act in teacher:
                ref = teacher[out_act]
                if capture is not None:
                    capture.setdefault("flips", {})[out_act] = int((ref != val).sum())
                val = ref
            env[node["name"]] = val
        return env[self.output_name]

    def _quantize_codes(self, act: ActParams, x: torch.Tensor) -> torch.Tensor:
        """Fresh activation codes in the model's :attr:`memory_format` (channels_last codes come
        straight out of ``ops.quantize_codes``, not from a layout copy of NCHW codes)."""
        cl = self._cl and x.dim() == 4
        fn = self._direct.get("quantize_codes")
        if fn is not None:
            return fn(x, act.delta_value, act.zp_int, act.bits, cl)
        return act.quantize(x, channels_last=cl)

    def _glue(self, node: dict, env: dict):
        fn = GLUE[node["fn"]]
        args = _decode(node["args"], env)
        kwargs = {k: _decode(v, env) for k, v in node["kwargs"].items()}
        code_act = node.get("codes_act")
        if code_act is None:  # float glue runs on NCHW, as in the simulation (reduction order)
            args = [
                a.contiguous() if isinstance(a, torch.Tensor) and _is_cl(a) else a for a in args
            ]
            return fn(*args, **kwargs)
        if node["fn"] == "pad":  # zero padding in value space = the zero point in code space
            kwargs = dict(kwargs, value=self._act(code_act).zp_int)
            return fn(*args, **kwargs)
        if node["fn"] == "max_pool2d":  # max commutes with the increasing dequantization
            x = args[0]
            pool = _pool_on_codes(args, kwargs) if x.dim() == 4 else None
            if pool is not None:  # ops.max_pool2d_codes: uint8 in, uint8 out (C++ kernel)
                pool_fn = self._direct.get("max_pool2d_codes") or ops.max_pool2d_codes
                return pool_fn(x if _is_cl(x) else x.contiguous(), *pool)
            # Other arguments (dilation, ceil_mode): pooled in float32 (exact: small integers;
            # max ignores order), through channels-last, which PyTorch's CPU max-pool runs ~10x
            # faster than NCHW (ResNet-18 stem pool, batch 8, one thread: 49 -> 4.8 ms).
            if x.dim() == 4:
                f = x.to(torch.float32, memory_format=torch.channels_last)
                y = fn(f, *args[1:], **kwargs)
                return y.to(torch.uint8, memory_format=torch.contiguous_format)
            return fn(x.to(torch.float32), *args[1:], **kwargs).to(torch.uint8)
        return fn(*args, **kwargs)


#: Ops the forward calls straight into the C++ extension on CPU (see _direct_fns).
DIRECT_OPS = ("quantize_codes", "dequantize_codes", "max_pool2d_codes")


def _direct_fns(x: torch.Tensor) -> dict:
    """``{op: C++ function}`` for the :data:`DIRECT_OPS` whose chosen backend is ``cpp``, when
    ``x`` is on the CPU and nothing is being traced: the packed graph then calls them without
    ``torch.library``'s dispatch (a custom op's Python-side dispatch took 50-110 us per call in
    the ResNet-18 forward at batch 1, against 20-80 us of kernel; with code and data evicted by
    the convolutions in between, it runs cold). Same functions, same arguments, same results;
    they check their inputs themselves (``ValueError``). Empty otherwise (the ``ops.*`` path,
    which ``torch.compile`` can trace)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return {}
    out = {}
    for op in DIRECT_OPS:
        name, fn = backends.choose(op, "cpu")
        if name == "cpp":
            out[op] = fn
    return out


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


def _pool_on_codes(args: list, kwargs: dict) -> tuple[list[int], list[int], list[int]] | None:
    """``(kernel_size, stride, padding)`` of a ``max_pool2d`` glue call that
    ``ops.max_pool2d_codes`` computes (keyword arguments only; no dilation, no ceil mode, no
    indices), else None."""
    allowed = {"kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"}
    if len(args) != 1 or not set(kwargs) <= allowed or "kernel_size" not in kwargs:
        return None
    if kwargs.get("ceil_mode") or kwargs.get("return_indices"):
        return None
    if _pair(kwargs.get("dilation", 1)) != [1, 1]:
        return None
    k = _pair(kwargs["kernel_size"])
    stride = kwargs.get("stride")
    s = k if stride is None or stride == [] else _pair(stride)
    p = _pair(kwargs.get("padding", 0))
    if (
        len(k) != 2
        or len(s) != 2
        or len(p) != 2
        or any(2 * pi > ki for pi, ki in zip(p, k, strict=True))
    ):
        return None
    return k, s, p


def glue_names() -> list[str]:
    return sorted(GLUE)
