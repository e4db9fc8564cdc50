"""Structured replacement: turn a trained ReLU network into an HE-friendly one.

``make_he_friendly`` swaps every ReLU for a polynomial activation and every max-pool for an
average-pool of the same geometry, keeping all the weights. ReLU and max-pool *modules* are
replaced in place of a copy (the model keeps its class); *functional* calls in ``forward``
(``F.relu``, ``torch.relu``, ``x.relu()``, ``F.max_pool2d``) are rewritten with ``torch.fx``,
which returns a ``GraphModule``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .activations import DEFAULT_RANGE, PolyAct, Square

__all__ = ["make_he_friendly", "observe_activation_inputs"]

_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_}
_MAXPOOL_FUNCTIONS = {F.max_pool2d, torch.max_pool2d}
_MAXPOOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")


def _factory(activation: str | Callable[[], nn.Module], degree: int,
             input_range: Sequence[float]) -> Callable[[], nn.Module]:
    if callable(activation):
        return activation
    if activation == "poly":
        return lambda: PolyAct(degree, "relu", input_range)
    if activation == "square":
        return lambda: Square(input_range)
    raise ConfigError(f"activation {activation!r} is not 'poly', 'square' or a callable "
                     "returning a module")


def _avgpool(kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
             ceil_mode: bool = False, where: str = "") -> nn.AvgPool2d:
    if dilation not in (1, (1, 1), [1, 1]):
        raise ConfigError(f"max-pool {where} has dilation {dilation}; average pooling has none")
    return nn.AvgPool2d(kernel_size, stride, padding, ceil_mode=ceil_mode)


def _replace_modules(model: nn.Module, make: Callable[[], nn.Module]) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.ReLU):
            setattr(model, name, make())
        elif isinstance(child, nn.MaxPool2d):
            setattr(model, name, _avgpool(child.kernel_size, child.stride, child.padding,
                                          child.dilation, child.ceil_mode, name))
        else:
            _replace_modules(child, make)


def _is_functional(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS or node.target in _MAXPOOL_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _rewrite_functional(model: nn.Module, make: Callable[[], nn.Module]) -> nn.Module:
    """Replace functional ReLU / max-pool calls by modules; ``model`` if there are none."""

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return hasattr(m, "secureinfer_poly") or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - untraceable forward: module replacement is all we can do
        return model
    nodes = [n for n in graph.nodes if _is_functional(n)]
    if not nodes:
        return model
    gm = torch.fx.GraphModule(model, graph, type(model).__name__)
    for i, node in enumerate(nodes, start=1):
        if node.target in _MAXPOOL_FUNCTIONS:
            name = f"he_pool{i}"
            kwargs = dict(zip(_MAXPOOL_ARGS, node.args[1:]), **{
                k: v for k, v in node.kwargs.items() if k in _MAXPOOL_ARGS})
            gm.add_submodule(name, _avgpool(where=node.name, **kwargs))
        else:
            name = f"he_act{i}"
            gm.add_submodule(name, make())
        with graph.inserting_after(node):
            new = graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def observe_activation_inputs(model: nn.Module, x: torch.Tensor,
                              batch_size: int = 512) -> dict[str, dict[str, float]]:
    """Run ``x`` through ``model`` (eval mode, no grad) and summarise the input of every
    polynomial activation: ``min``, ``max``, ``mean`` and ``std`` over all its elements,
    by module name."""
    sums: dict[str, list[float]] = {}
    hooks = []
    for name, m in model.named_modules():
        if hasattr(m, "secureinfer_poly"):
            def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                v = args[0].detach().double()
                acc = sums.setdefault(name, [0.0, 0.0, 0.0, math.inf, -math.inf])
                acc[0] += v.numel()
                acc[1] += float(v.sum())
                acc[2] += float((v * v).sum())
                acc[3] = min(acc[3], float(v.min()))
                acc[4] = max(acc[4], float(v.max()))
            hooks.append(m.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                model(x[start:start + batch_size])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    stats = {}
    for name, (n, s1, s2, lo, hi) in sums.items():
        mean = s1 / n
        stats[name] = {"min": lo, "max": hi, "mean": mean,
                       "std": math.sqrt(max(s2 / n - mean * mean, 0.0))}
    return stats


def make_he_friendly(model: nn.Module, activation: str | Callable[[], nn.Module] = "poly", *,
                     degree: int = 2, input_range: Sequence[float] = DEFAULT_RANGE,
                     data: torch.Tensor | None = None, spread: float = 3.0,
                     blend: float = 1.0) -> nn.Module:
    """A copy of ``model`` with polynomial activations and average pooling, weights kept.

    Args:
        model: a (trained) network with ReLU activations and possibly max-pooling.
        activation: ``"poly"`` (a ``PolyAct`` initialised as the least-squares fit of ReLU),
            ``"square"``, or a callable returning a fresh activation module.
        degree: degree of ``poly`` activations.
        input_range: declared input range of each new activation (where ``poly`` fits ReLU).
        data: a batch of training inputs; when given, each activation's range is where its
            input lies on ``data``: ``mean +- spread * std`` (clipped to the observed min and
            max), and ``poly`` fits ReLU there. The range regulariser then keeps the rare
            values outside it inside.
        spread: width of data-derived ranges, in standard deviations.
        blend: initial ``PolyAct.blend``; 0 starts exactly at the ReLU network (for the
            gradual schedule of ``fit``), 1 is purely polynomial.

    Returns:
        The converted copy (a ``torch.fx.GraphModule`` if functional calls were rewritten);
        it keeps ``secureinfer_input_shape`` but not the original's calibration or meta:
        run ``calibrate`` after fine-tuning.
    """
    make = _factory(activation, degree, input_range)
    new = copy.deepcopy(model)
    for stale in ("secureinfer_calibration", "secureinfer_meta"):  # about the old network
        new.__dict__.pop(stale, None)
    _replace_modules(new, make)
    new = _rewrite_functional(new, make)
    polys = [m for m in new.modules() if isinstance(m, PolyAct)]
    if data is not None:
        for m in polys:
            m.blend = 0.0  # observe the inputs the ReLU network produces
        for name, st in observe_activation_inputs(new, data).items():
            module = new.get_submodule(name)
            half = max(spread * st["std"], 1e-3)
            lo = max(st["mean"] - half, st["min"])
            hi = max(min(st["mean"] + half, st["max"]), lo + 1e-3)
            if isinstance(module, PolyAct):
                module.refit((lo, hi))
            elif hasattr(module, "input_range"):
                module.input_range = (lo, hi)
    for m in polys:
        m.blend = float(blend)
    return new
