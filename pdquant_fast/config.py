"""Calibration settings: methods, per-architecture presets (spec §4), validation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .quant import QuantConfigError, check_bits

METHODS = ("rtn", "adaround", "brecq", "qdrop", "pdquant")

# Per-architecture PD-Quant hyper-parameters from the official run script (spec §4).
PRESETS: dict[str, dict[str, float]] = {
    "resnet": {"round_weight": 0.01, "temperature": 4.0, "lamb_r": 0.1, "lamb_c": 0.02},
    "regnet": {"round_weight": 0.01, "temperature": 4.0, "lamb_r": 0.1, "lamb_c": 0.01},
    "mobilenet": {"round_weight": 0.1, "temperature": 1.0, "lamb_r": 0.1, "lamb_c": 0.005},
    "mnasnet": {"round_weight": 0.2, "temperature": 1.0, "lamb_r": 0.1, "lamb_c": 0.001},
}


#: Allowed ``CalibConfig.pd_tail_dtype`` values.
PD_TAIL_DTYPES = ("float32", "bfloat16")


@dataclass
class CalibConfig:
    """Every setting of a calibration run. Defaults are the official PD-Quant values.

    Method switches (``method`` sets them; each can be overridden afterwards):

    ========  ===========  ===========  ======  ========  ======  ==============
    method    granularity  learn alpha  learn   QDrop     PD      distribution
                                        delta   (0.5)     loss    correction
    ========  ===========  ===========  ======  ========  ======  ==============
    rtn       (none: init only, round-to-nearest weights)
    adaround  layer        yes          no      no        no      no
    brecq     block        yes          yes     no        no      no
    qdrop     block        yes          yes     yes       no      no
    pdquant   block        yes          yes     yes       yes     yes
    ========  ===========  ===========  ======  ========  ======  ==============
    """

    method: str = "pdquant"
    w_bits: int = 4
    a_bits: int = 4
    iters: int = 20000
    batch_size: int = 32
    seed: int = 1005
    preset: str = "resnet"
    # quantizer placement overrides (spec §1 step 5); None = same as the main bit-width
    first_layer_w_bits: int | None = 8
    last_layer_w_bits: int | None = 8
    head_input_a_bits: int | None = 8
    # quantize the network input (the image) at this many bits before the first layer; None
    # (the official setting) feeds the first layer the float image. With it, a deployed model
    # is integer end to end (the packed stem is an integer conv instead of a float one).
    input_a_bits: int | None = None
    # optimisation (spec §2.2, §2.3)
    round_weight: float = 0.01  # AdaRound lambda
    warmup: float = 0.2
    b_start: float = 20.0
    b_end: float = 2.0
    lr_alpha: float = 3e-3
    lr_delta: float = 4e-5
    keep_prob: float = 0.5  # QDrop: probability of keeping the quantized value
    act_init_samples: int = 256
    act_init_max_elems: int | None = 65536  # None: score all elements (exact official init)
    # PD-Quant
    pd_loss: bool = True
    temperature: float = 4.0
    lamb_r: float = 0.1
    # dtype of the PD loss's full-precision tail (the rest of the network after the unit, forward
    # and input-gradient backward, frozen weights): "float32" (official) or "bfloat16" (autocast:
    # its convolutions and matmuls in bf16; the unit, its quantizers and the losses stay float32)
    pd_tail_dtype: str = "float32"
    rec_loss: bool = True  # ablation: PD loss alone when False
    # GPU: capture each unit's reconstruction step once in a CUDA graph and replay it (needs the
    # model and images on a CUDA device and the unit caches there; batch draws and QDrop masks
    # from the device RNG, seeded from ``seed``; same algorithm, other random draws than the
    # eager loop)
    cuda_graph: bool = False
    round_loss: bool = True  # ablation: AdaRound regulariser off when False
    dist_correction: bool = True
    lamb_c: float = 0.02
    dc_lr: float = 1e-3
    dc_iters: int = 500
    dc_chunk: int = 32  # the official per-image-group semantics (loss normalisation, scheduler)
    dc_batch: int = 256  # how many images are optimised at once (multiple of dc_chunk)
    # switches derived from method (None = method default)
    granularity: str | None = None  # "block" | "layer"
    learn_alpha: bool | None = None
    learn_delta: bool | None = None
    qdrop: bool | None = None

    def resolved(self) -> CalibConfig:
        """Validate and fill method-derived switches; returns a new config."""
        c = CalibConfig(**asdict(self))
        if c.method not in METHODS:
            raise QuantConfigError(f"unknown method {c.method!r}: choose one of {list(METHODS)}")
        check_bits(c.w_bits, "weight bit-width (--w-bits)")
        check_bits(c.a_bits, "activation bit-width (--a-bits)")
        for name in (
            "first_layer_w_bits",
            "last_layer_w_bits",
            "head_input_a_bits",
            "input_a_bits",
        ):
            v = getattr(c, name)
            if v is not None:
                check_bits(v, name)
        if c.preset not in PRESETS:
            raise QuantConfigError(f"unknown preset {c.preset!r}: choose one of {list(PRESETS)}")
        _positive_int(c.iters, "iters (--iters)")
        if isinstance(c.seed, bool) or not isinstance(c.seed, int) or not 0 <= c.seed < 2**63:
            raise QuantConfigError(
                f"seed (--seed) must be an integer in 0..2**63-1, got {c.seed!r}"
            )
        _positive_int(c.batch_size, "batch_size")
        _positive_int(c.act_init_samples, "act_init_samples")
        _positive_int(c.dc_chunk, "dc_chunk")
        if c.dc_iters < 0:
            raise QuantConfigError(f"dc_iters must be >= 0, got {c.dc_iters}")
        if c.dc_batch % c.dc_chunk:
            raise QuantConfigError(
                f"dc_batch ({c.dc_batch}) must be a multiple of dc_chunk ({c.dc_chunk})"
            )
        if not 0.0 < c.keep_prob <= 1.0:
            raise QuantConfigError(f"keep_prob must be in (0, 1], got {c.keep_prob}")
        if not 0.0 <= c.warmup < 1.0:
            raise QuantConfigError(f"warmup must be in [0, 1), got {c.warmup}")
        if c.pd_tail_dtype not in PD_TAIL_DTYPES:
            raise QuantConfigError(
                f"pd_tail_dtype must be one of {list(PD_TAIL_DTYPES)}, got {c.pd_tail_dtype!r}"
            )
        for name in ("temperature", "lamb_r", "lamb_c", "lr_alpha", "lr_delta", "dc_lr"):
            if not getattr(c, name) > 0:
                raise QuantConfigError(f"{name} must be > 0, got {getattr(c, name)}")
        m = c.method
        defaults = {
            "rtn": ("block", False, False, False),
            "adaround": ("layer", True, False, False),
            "brecq": ("block", True, True, False),
            "qdrop": ("block", True, True, True),
            "pdquant": ("block", True, True, True),
        }[m]
        for key, val in zip(
            ("granularity", "learn_alpha", "learn_delta", "qdrop"), defaults, strict=True
        ):
            if getattr(c, key) is None:
                setattr(c, key, val)
        if m != "pdquant":
            c.pd_loss = False
            c.dist_correction = False
        if c.granularity not in ("block", "layer"):
            raise QuantConfigError(f"granularity must be 'block' or 'layer', got {c.granularity}")
        if c.granularity == "layer" and c.pd_loss:
            raise QuantConfigError("the PD loss needs block granularity (the network tail)")
        if not c.rec_loss and not c.pd_loss:
            raise QuantConfigError("rec_loss=False needs pd_loss=True (nothing to optimise)")
        return c

    def to_dict(self) -> dict:
        return asdict(self)


def _positive_int(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise QuantConfigError(f"{name} must be a positive integer, got {v!r}")


def make_config(method: str = "pdquant", preset: str | None = None, **overrides) -> CalibConfig:
    """Config for ``method`` with the named architecture preset, then explicit overrides.

    Unknown keys raise :class:`QuantConfigError` listing the valid ones.
    """
    names = {f.name for f in fields(CalibConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise QuantConfigError(f"unknown setting(s) {bad}; valid settings: {sorted(names)}")
    base: dict = {"method": method}
    if preset is not None:
        if preset not in PRESETS:
            raise QuantConfigError(f"unknown preset {preset!r}: choose one of {list(PRESETS)}")
        base["preset"] = preset
        base.update(PRESETS[preset])
    base.update(overrides)
    return CalibConfig(**base).resolved()
