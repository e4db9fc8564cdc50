"""Post-training quantization report for the integer schemes (BFV, inner-product and
quadratic FE).

The integer network is ``secureinfer.quant.quantize`` applied to the lowered model: the
reference every exact scheme reproduces bit for bit. So the accuracy reported here at ``b``
bits is the accuracy those schemes reach with ``bits=b``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from ..compiler import lower
from ..data import Dataset
from ..data import load as load_dataset
from ..errors import ConfigError
from ..layers import forward
from ..quant import quantize
from ..scheme import Calibration

__all__ = ["REFERENCE_BITS", "quantization_meta", "quantization_report"]

REFERENCE_BITS = 8
"""The bit width whose scales and bounds are recorded in a saved model."""


def _input_range(model: nn.Module, calibration: Calibration | None) -> tuple[float, float]:
    cal = calibration or getattr(model, "secureinfer_calibration", None)
    if cal is None:
        raise ConfigError("the model has no calibration: run secureinfer.nn.calibrate(model, "
                         "x_train) first, or pass calibration=")
    return cal.input_range


def quantization_report(model: nn.Module, dataset: str | Dataset = "digits",
                        bits: Sequence[int] = (4, 6, 8, 10, 12), *,
                        calibration: Calibration | None = None) -> list[dict[str, Any]]:
    """Test accuracy of the integer network at each bit width, next to the float one.

    Args:
        model: a calibrated HE-friendly network (or pass ``calibration``).
        dataset: a dataset name or ``Dataset``; its test split is used.
        bits: bit widths of inputs and weights (2..16).
        calibration: overrides the model's ``secureinfer_calibration``.

    Returns:
        One dict per width: ``bits``, ``accuracy``, ``float_accuracy``, ``drop`` (float
        minus quantized, in accuracy points) and ``max_bound_bits`` (bits of the largest
        worst-case integer, what BFV's plaintext modulus and FE's discrete-log bound must
        hold).
    """
    data = load_dataset(dataset) if isinstance(dataset, str) else dataset
    layers = lower(model, data.input_shape)
    in_range = _input_range(model, calibration)
    x = data.x_test.astype(np.float64)
    float_acc = float(np.mean(forward(layers, x).argmax(1) == data.y_test))
    rows = []
    for b in bits:
        qnet = quantize(layers, in_range, int(b))
        acc = float(np.mean(qnet.forward(x).argmax(1) == data.y_test))
        rows.append({"bits": int(b), "accuracy": acc, "float_accuracy": float_acc,
                     "drop": round(100 * (float_acc - acc), 4),
                     "max_bound_bits": int(qnet.max_bound).bit_length()})
    return rows


def quantization_meta(model: nn.Module, dataset: str | Dataset,
                      bits: Sequence[int] = (4, 6, 8, 10, 12)) -> dict[str, Any]:
    """What a saved model records: the report and the scales and bounds at
    ``REFERENCE_BITS``."""
    in_range = _input_range(model, None)
    shape = model.secureinfer_input_shape
    qnet = quantize(lower(model, shape), in_range, REFERENCE_BITS)
    return {"reference_bits": REFERENCE_BITS, "params": qnet.to_dict(),
            "report": quantization_report(model, dataset, bits)}
