"""Lower a torch model to LayerSpecs (the only module of the core that reads torch models).

The model is traced with ``torch.fx``; every node must map to a LayerSpec. BatchNorm is
folded into the Linear or Conv2d before it. A module (or function) with a
``secureinfer_poly()`` method returning polynomial coefficients (lowest first) becomes a
``Poly`` layer; that is how ``secureinfer.nn.Square`` and ``PolyAct`` lower, and how a user's
own polynomial activation can. ReLU, max-pool, sigmoid, tanh and softmax lower to clear-only
layers: the partition accepts them in the clear suffix of a plaintext-output scheme and
refuses them anywhere else (with the ``make_he_friendly`` advice).
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import numpy as np

from .errors import UnsupportedLayerError
from .layers import (HE_FRIENDLY_HINT, AvgPool2d, Conv2d, Flatten, LayerSpec, Linear,
                     MaxPool2d, Poly, ReLU, Sigmoid, Softmax, Tanh)

__all__ = ["lower"]


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().double().numpy().copy()


def _fold_bn(prev: LayerSpec | None, bn: Any, name: str) -> None:
    if not isinstance(prev, (Linear, Conv2d)):
        raise UnsupportedLayerError(
            f"layer {name}: BatchNorm must follow a Linear or Conv2d layer to be folded into "
            f"it (it follows {prev.describe() if prev else 'the input'}); move it after one")
    gamma = _np(bn.weight) if bn.weight is not None else np.ones(bn.num_features)
    beta = _np(bn.bias) if bn.bias is not None else np.zeros(bn.num_features)
    if bn.running_mean is None:
        raise UnsupportedLayerError(
            f"layer {name}: BatchNorm without running statistics cannot be folded; "
            "construct it with track_running_stats=True")
    mult = gamma / np.sqrt(_np(bn.running_var) + bn.eps)
    shape = (-1,) + (1,) * (prev.weight.ndim - 1)
    prev.weight = prev.weight * mult.reshape(shape)
    prev.bias = (prev.bias - _np(bn.running_mean)) * mult + beta


def lower(model: Any, input_shape: Sequence[int]) -> list[LayerSpec]:
    """Turn a torch ``model`` taking inputs of ``input_shape`` (no batch) into LayerSpecs.

    Raises:
        UnsupportedLayerError: a layer with no HE-friendly equivalent (ReLU, max-pool, ...),
            named, with what to do instead.
    """
    import torch
    import torch.fx
    import torch.nn as nn
    import torch.nn.functional as F

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return hasattr(m, "secureinfer_poly") or super().is_leaf_module(m, qualname)

    elementwise_modules = {nn.ReLU: ReLU, nn.Sigmoid: Sigmoid, nn.Tanh: Tanh}
    elementwise_functions = {torch.relu: ReLU, torch.relu_: ReLU, F.relu: ReLU, F.relu_: ReLU,
                             torch.sigmoid: Sigmoid, F.sigmoid: Sigmoid, torch.tanh: Tanh,
                             F.tanh: Tanh}
    model = model.eval()
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    layers: list[LayerSpec] = []
    shape = tuple(int(d) for d in input_shape)

    def add(spec: LayerSpec) -> None:
        nonlocal shape
        layers.append(spec)
        shape = spec.out_shape

    def unsupported(what: str, name: str) -> UnsupportedLayerError:
        low = what.lower()
        if "relu" in low or "maxpool" in low or "max_pool" in low or "gelu" in low \
                or "sigmoid" in low or "tanh" in low:
            return UnsupportedLayerError(f"layer {name}: {what} is not a polynomial; "
                                         f"{HE_FRIENDLY_HINT}")
        return UnsupportedLayerError(
            f"layer {name}: {what} has no HE-friendly equivalent; supported: Linear, Conv2d, "
            "AvgPool2d, Flatten, BatchNorm (folded), Dropout/Identity (dropped), "
            "secureinfer.nn.Square/PolyAct and any module with secureinfer_poly(); ReLU, "
            "MaxPool2d, Sigmoid, Tanh, Softmax in the clear suffix of plaintext-output schemes")

    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        name = str(node.target) if node.op == "call_module" else node.name
        if node.op == "call_module":
            m = modules[node.target]
            if hasattr(m, "secureinfer_poly"):
                add(Poly(name, shape, coeffs=tuple(float(c) for c in m.secureinfer_poly())))
            elif isinstance(m, nn.Linear):
                if len(shape) != 1:
                    raise UnsupportedLayerError(
                        f"layer {name}: Linear receives shape {shape}; add nn.Flatten() before it")
                add(Linear(name, shape, weight=_np(m.weight),
                           bias=_np(m.bias) if m.bias is not None else np.zeros(m.out_features)))
            elif isinstance(m, nn.Conv2d):
                if m.groups != 1 or _pair(m.dilation) != (1, 1) or isinstance(m.padding, str) \
                        or m.padding_mode != "zeros":
                    raise UnsupportedLayerError(
                        f"layer {name}: Conv2d with groups, dilation, string or non-zero padding "
                        "mode is not supported; use groups=1, dilation=1, integer zero padding")
                add(Conv2d(name, shape, weight=_np(m.weight),
                           bias=_np(m.bias) if m.bias is not None else np.zeros(m.out_channels),
                           stride=_pair(m.stride), padding=_pair(m.padding)))
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                _fold_bn(layers[-1] if layers else None, m, name)
            elif isinstance(m, nn.AvgPool2d):
                k, s = _pair(m.kernel_size), _pair(m.stride or m.kernel_size)
                if k[0] != k[1] or s[0] != s[1] or _pair(m.padding) != (0, 0) or m.ceil_mode:
                    raise UnsupportedLayerError(
                        f"layer {name}: AvgPool2d needs a square kernel and stride, no padding "
                        "and ceil_mode=False")
                add(AvgPool2d(name, shape, kernel=k[0], stride=s[0]))
            elif isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    raise UnsupportedLayerError(f"layer {name}: only Flatten(1, -1) is supported")
                if len(shape) > 1:
                    add(Flatten(name, shape))
            elif isinstance(m, (nn.Dropout, nn.Identity)):
                continue
            elif isinstance(m, nn.MaxPool2d):
                add(_maxpool(name, shape, m.kernel_size, m.stride, m.padding, m.dilation,
                             m.ceil_mode, m.return_indices))
            elif isinstance(m, nn.Softmax) and m.dim in (1, -1) and len(shape) == 1:
                add(Softmax(name, shape))
            elif type(m) in elementwise_modules:
                add(elementwise_modules[type(m)](name, shape))
            else:
                raise unsupported(type(m).__name__, name)
        elif node.op == "call_function":
            fn = node.target
            if fn in (torch.flatten,) or (fn is torch.reshape and _is_flat(node.args[1:])):
                if len(shape) > 1:
                    add(Flatten(name, shape))
            elif fn in (torch.square,) or (fn in (operator.pow, torch.pow)
                                           and node.args[1] == 2):
                add(Poly(name, shape, coeffs=(0.0, 0.0, 1.0)))
            elif fn in (F.dropout, getattr) or fn is operator.getitem:
                continue
            elif fn in (F.max_pool2d, torch.max_pool2d):
                kw = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                               "return_indices"), node.args[1:]), **node.kwargs)
                add(_maxpool(name, shape, kw["kernel_size"], kw.get("stride"),
                             kw.get("padding", 0), kw.get("dilation", 1),
                             kw.get("ceil_mode", False), kw.get("return_indices", False)))
            elif fn in elementwise_functions:
                add(elementwise_functions[fn](name, shape))
            else:
                raise unsupported(getattr(fn, "__name__", str(fn)), name)
        elif node.op == "call_method":
            meth = node.target
            if meth in ("view", "reshape") and _is_flat(node.args[1:]) \
                    or meth == "flatten" and tuple(node.args[1:]) in ((), (1,)):
                if len(shape) > 1:
                    add(Flatten(name, shape))
            elif meth == "square" or (meth == "pow" and node.args[1] == 2):
                add(Poly(name, shape, coeffs=(0.0, 0.0, 1.0)))
            elif meth in ("contiguous", "size"):
                continue
            elif meth in _ELEMENTWISE_METHODS:
                add(_ELEMENTWISE_METHODS[meth](name, shape))
            else:
                raise unsupported(f"tensor method .{meth}()", name)
    if not layers:
        raise UnsupportedLayerError("the model has no layer secureinfer can run")
    return layers


_ELEMENTWISE_METHODS = {"relu": ReLU, "relu_": ReLU, "sigmoid": Sigmoid, "tanh": Tanh}


def _maxpool(name: str, shape: tuple[int, ...], kernel: Any, stride: Any, padding: Any,
             dilation: Any, ceil_mode: bool, return_indices: bool) -> MaxPool2d:
    k, s = _pair(kernel), _pair(stride if stride not in (None, (), []) else kernel)
    p = _pair(padding)
    if k[0] != k[1] or s[0] != s[1] or p[0] != p[1] or _pair(dilation) != (1, 1) \
            or ceil_mode or return_indices:
        raise UnsupportedLayerError(
            f"layer {name}: MaxPool2d needs a square kernel, stride and padding, dilation 1, "
            "ceil_mode=False and no indices")
    return MaxPool2d(name, shape, kernel=k[0], stride=s[0], padding=p[0])


def _is_flat(args: Sequence[Any]) -> bool:
    """True for reshape arguments ``(batch, -1)`` (batch given as a size or ``-1``)."""
    flat = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    return len(flat) == 2 and flat[1] == -1
