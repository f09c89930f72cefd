"""Op contracts, references and the kernel backend chooser (see :mod:`.library`, :mod:`.backends`).

``import pdquant_fast.ops`` registers the ``torch.library`` schemas (``torch.ops.pdquant.*``); it
imports neither the compiled extension nor Triton, and never initialises CUDA.
"""

from .backends import BACKENDS, BackendError, choose, explain, force
from .library import (
    OP_BITS,
    OpInputError,
    adaround_hard,
    adaround_soft,
    adaround_soft_backward,
    adaround_soft_eager,
    bn_stat_loss,
    bn_stat_loss_backward,
    check_deferred,
    dc_adam_step,
    deferred_checks,
    dequantize_codes,
    fake_quant_act,
    fake_quant_act_backward,
    fake_quant_act_eager,
    max_pool2d_codes,
    mse_search_2d,
    pack,
    qconv2d,
    qlinear,
    quantize_codes,
    unpack,
)

__all__ = [
    "BACKENDS",
    "BackendError",
    "OP_BITS",
    "OpInputError",
    "adaround_hard",
    "adaround_soft",
    "adaround_soft_backward",
    "adaround_soft_eager",
    "bn_stat_loss",
    "bn_stat_loss_backward",
    "check_deferred",
    "choose",
    "dc_adam_step",
    "deferred_checks",
    "dequantize_codes",
    "explain",
    "fake_quant_act",
    "fake_quant_act_backward",
    "fake_quant_act_eager",
    "force",
    "max_pool2d_codes",
    "mse_search_2d",
    "pack",
    "qconv2d",
    "qlinear",
    "quantize_codes",
    "unpack",
]
