"""Weight-only quantization: int8 / int4 by round to nearest, GPTQ or AWQ, with calibration.

    from flashc.passes.quantize import QuantConfig, QuantizeWeights, resolve_calibration
    QuantizeWeights(QuantConfig.parse("int4-gptq"), resolve_calibration("builtin", tokenizer))

One module per idea: config (QuantConfig), grid (scales, zero points, codes), rtn, gptq,
awq, quip (the methods; quip: Hadamard rotations around GPTQ), aqlm (2-bit additive
quantization with learned codebooks), calibration (data and the statistics run), weights (the pass).
"""

from flashc.passes.quantize.calibration import CalibrationData, resolve_calibration
from flashc.passes.quantize.config import NOT_IMPLEMENTED, SCHEMES, QuantConfig
from flashc.passes.quantize.weights import QuantizeWeights

__all__ = ["CalibrationData", "QuantConfig", "QuantizeWeights", "SCHEMES", "NOT_IMPLEMENTED", "resolve_calibration"]
