"""``secureinfer convert``: an ONNX file to a secureinfer model file.

The graph is lowered to LayerSpecs (``secureinfer.onnx_import``), rebuilt as the
``nn.Sequential`` that lowers to the same LayerSpecs (``to_module``), calibrated on a
dataset's training inputs and saved with ``secureinfer.nn.save``. The model file then works
wherever one does (``--model``, ``secureinfer.nn.load``), with its ranges recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..data import Dataset, load as load_dataset
from ..errors import CompileError, ConfigError, SecureInferError
from ..layers import (AvgPool2d, Conv2d, Flatten, LayerSpec, Linear, MaxPool2d, Poly, ReLU,
                      Sigmoid, Softmax, Tanh, forward)
from ..scheme import Calibration
from .activations import PolyAct, Square

__all__ = ["add_convert_parser", "convert", "run_convert", "to_module"]

_TOLERANCE = 1e-4  # float32 weights in torch against float64 LayerSpecs


def _param(t: torch.Tensor, value: np.ndarray) -> None:
    with torch.no_grad():
        t.copy_(torch.as_tensor(np.asarray(value, dtype=np.float32)).reshape(t.shape))


def _module(spec: LayerSpec, input_range: tuple[float, float]) -> nn.Module:
    if isinstance(spec, Linear):
        m = nn.Linear(spec.weight.shape[1], spec.weight.shape[0])
        _param(m.weight, spec.weight)
        _param(m.bias, spec.bias)
        return m
    if isinstance(spec, Conv2d):
        oc, ic, kh, kw = spec.weight.shape
        m = nn.Conv2d(ic, oc, (kh, kw), spec.stride, spec.padding)
        _param(m.weight, spec.weight)
        _param(m.bias, spec.bias)
        return m
    if isinstance(spec, Poly):
        lo, hi = input_range
        rng = (lo, hi) if hi > lo else (lo - 1.0, lo + 1.0)
        if spec.is_square:
            return Square(rng)
        coeffs = spec.coeffs + (0.0,) * (2 - len(spec.coeffs))  # PolyAct has degree >= 1
        return PolyAct(len(coeffs) - 1, "relu", rng, coeffs=coeffs)
    if isinstance(spec, AvgPool2d):
        return nn.AvgPool2d(spec.kernel, spec.stride)
    if isinstance(spec, MaxPool2d):
        return nn.MaxPool2d(spec.kernel, spec.stride, spec.padding)
    simple = {Flatten: nn.Flatten, ReLU: nn.ReLU, Sigmoid: nn.Sigmoid, Tanh: nn.Tanh}
    if type(spec) in simple:
        return simple[type(spec)]()
    if isinstance(spec, Softmax):
        return nn.Softmax(dim=1)
    raise CompileError(f"layer {spec.name} ({spec.describe()}) has no torch module")


def to_module(layers: Sequence[LayerSpec], calibration: Calibration | None = None
              ) -> nn.Sequential:
    """The ``nn.Sequential`` that lowers to ``layers`` (float32 weights).

    Polynomial activations declare the calibrated range of their input (``calibration``),
    or ``(-4, 4)`` without one.
    """
    seq = nn.Sequential()
    for i, spec in enumerate(layers):
        if calibration is None:
            rng = (-4.0, 4.0)
        else:
            rng = calibration.layer_ranges[i - 1] if i else calibration.input_range
        seq.add_module(f"l{i}_{spec.kind}", _module(spec, rng))
    return seq.eval()


def convert(source: str | os.PathLike[str] | bytes, dataset: str | Dataset = "digits"
            ) -> nn.Sequential:
    """An ONNX file as a calibrated secureinfer torch model, ready for ``nn.save``.

    Args:
        source: the ``.onnx`` file (or its bytes).
        dataset: where the calibration inputs (the training set) and the input shape come
            from; the test accuracy of the imported network is recorded in its meta.

    Raises:
        ConfigError, UnsupportedLayerError, CompileError: as ``secureinfer.onnx_import.load``;
            a rebuilt module that does not reproduce the graph (a CompileError).
    """
    from ..compiler import lower
    from ..onnx_import import load
    from .ranges import calibrate

    data = load_dataset(dataset) if isinstance(dataset, str) else dataset
    layers = load(source, data.input_shape)
    observed = Calibration.from_data(layers, data.x_train)
    model = to_module(layers, observed)
    x = np.asarray(data.x_test[:64], dtype=np.float64)
    want = forward(layers, x)
    got = forward(lower(model, data.input_shape), x)
    err = float(np.abs(got - want).max())
    if not err <= _TOLERANCE * max(1.0, float(np.abs(want).max())):
        raise CompileError(f"the rebuilt torch module differs from the ONNX graph by {err:.3g} "
                           "on the test inputs; report this with the ONNX file")
    calibrate(model, data.x_train, data.input_shape, input_range=(0.0, 1.0))
    logits = forward(layers, np.asarray(data.x_test, dtype=np.float64))
    model.secureinfer_meta = {
        "source": "onnx",
        "onnx_file": "(bytes)" if isinstance(source, (bytes, bytearray)) else str(source),
        "dataset": data.name,
        "layers": [spec.describe() for spec in layers],
        "test_accuracy": float(np.mean(logits.argmax(1) == data.y_test)),
    }
    return model


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``convert`` sub-command to ``subparsers``; its ``func`` is ``run_convert``."""
    p = subparsers.add_parser(
        "convert", help="convert an ONNX file to a secureinfer model file",
        description="Lower an ONNX file (Conv, Gemm/MatMul, AveragePool, Flatten, "
                    "BatchNormalization, polynomial activations; ReLU/MaxPool only for the "
                    "clear suffix of FE schemes) and save it as a model file (.npz) with "
                    "ranges calibrated on --dataset.")
    p.add_argument("onnx", help="the .onnx file")
    p.add_argument("--out", required=True, metavar="FILE", help="model file to write (.npz)")
    p.add_argument("--dataset", default="digits",
                   help="calibration data and input shape: digits (default), digits28 or "
                        "npz:PATH")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_convert)
    return p


def run_convert(args: argparse.Namespace) -> int:
    """Run ``secureinfer convert``; return the exit code (2 for config errors)."""
    from .modelfile import save

    try:
        model = convert(args.onnx, args.dataset)
        out = save(model, args.out)
    except ConfigError as exc:
        print(f"secureinfer convert: error: {exc}", file=sys.stderr)
        return 2
    except SecureInferError as exc:
        print(f"secureinfer convert: error: {exc}", file=sys.stderr)
        return 1
    meta = model.secureinfer_meta
    if args.json:
        print(json.dumps({**meta, "out": str(out)}, indent=2))
    else:
        print(f"{Path(args.onnx).name}: {len(meta['layers'])} layers; on {meta['dataset']} "
              f"test accuracy {100 * meta['test_accuracy']:.2f}%")
        for line in meta["layers"]:
            print(f"  {line}")
        print(f"saved to {out}")
    return 0
