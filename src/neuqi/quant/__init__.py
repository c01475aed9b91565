"""Pure tensor algorithms: the quantizer, parameter init, GPTQ/LDLQ and MagR.

No I/O and no transformers imports here: everything is testable with torch alone.
"""

from neuqi.quant.gptq import ALGORITHMS, GPTQResult, damp_hessian, gptq_quantize, quant_losses
from neuqi.quant.grid import (
    QuantParams,
    QuantSpec,
    dequantize,
    fake_quantize,
    group_weighted_error,
    quantize,
    weighted_error,
)
from neuqi.quant.init import INIT_METHODS, best_zero, init_params
from neuqi.quant.magr import magr_preprocess

__all__ = [
    "ALGORITHMS",
    "INIT_METHODS",
    "GPTQResult",
    "QuantParams",
    "QuantSpec",
    "best_zero",
    "damp_hessian",
    "dequantize",
    "fake_quantize",
    "gptq_quantize",
    "group_weighted_error",
    "init_params",
    "magr_preprocess",
    "quant_losses",
    "quantize",
    "weighted_error",
]
