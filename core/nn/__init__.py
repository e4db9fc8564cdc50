"""The HE-friendly network toolkit: polynomial activations, conversion of trained ReLU
networks, distillation, range control, HE-aware pruning, quantization reports and the model file.

    >>> from secureinfer import nn as snn
    >>> result = snn.train("digits", "mlp", "poly", distill_from="relu")
    >>> snn.save(result.model, "digits-mlp.npz")
    >>> model = snn.load("digits-mlp.npz")          # carries its ranges and input shape
    >>> secureinfer.compile(model, "ckks")

Every polynomial module exposes ``secureinfer_poly()``, which ``secureinfer.compile`` lowers.
"""

from __future__ import annotations

from .activations import DEFAULT_RANGE, PolyAct, Square, relu_fit
from .arch import ACTIVATIONS, ARCHS, build, cnn_geometry
from .convert import make_he_friendly
from .modelfile import load, save
from .pruning import PruneResult, magnitude_prune, prune
from .quantization import quantization_report
from .ranges import RangeRegularizer, RangeWarning, calibrate, check_ranges
from .training import TrainingDiverged, TrainResult, accuracy, fit, train
from .zoo import default_model

__all__ = [
    "ACTIVATIONS", "ARCHS", "DEFAULT_RANGE", "PolyAct", "PruneResult", "RangeRegularizer",
    "RangeWarning", "Square", "TrainResult", "TrainingDiverged", "accuracy", "build", "calibrate",
    "check_ranges", "cnn_geometry", "default_model", "fit", "load", "magnitude_prune",
    "make_he_friendly", "prune", "quantization_report", "relu_fit", "save", "train",
]
