"""Range control: keep activation inputs where the polynomials behave, and check it.

* ``RangeRegularizer``: in training, a penalty on every polynomial activation's input that
  leaves the activation's declared ``input_range`` (squared excess, relative to the range's
  half-width, averaged over elements, summed over layers).
* ``calibrate``: the observed range of every layer of the lowered network, recorded as the
  model's ``secureinfer_calibration``; schemes plan their parameters from it and it travels
  with the saved model.
* ``check_ranges``: at run time, the layer whose values leave the calibrated range is named
  in a ``RangeError`` (or a ``RangeWarning``), instead of a silently wrong answer.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal, Self

import numpy as np
import torch
from torch import nn

from ..errors import RangeError
from ..layers import LayerSpec
from ..errors import ConfigError, RangeWarning
from ..scheme import Calibration
from .activations import DEFAULT_RANGE

__all__ = ["RangeRegularizer", "RangeWarning", "calibrate", "check_ranges"]


class RangeRegularizer:
    """Penalty on polynomial-activation inputs outside their declared range.

    Hooks every module with ``secureinfer_poly`` (``Square``, ``PolyAct``, user modules);
    its range is the module's ``input_range`` attribute or ``default_range``. Use it as a
    context manager, or call ``close`` to remove the hooks::

        with RangeRegularizer(model, weight=1.0) as reg:
            loss = criterion(model(x), y) + reg.penalty()

    Attributes:
        weight: multiplier of the penalty.
        peaks: the largest ``|input|`` each activation saw in the last training forward.
    """

    def __init__(self, model: nn.Module, weight: float = 1.0,
                 default_range: Sequence[float] = DEFAULT_RANGE) -> None:
        self.weight = float(weight)
        self.peaks: dict[str, float] = {}
        self._terms: list[torch.Tensor] = []
        self._hooks = []
        for name, m in model.named_modules():
            if hasattr(m, "secureinfer_poly"):
                lo, hi = getattr(m, "input_range", None) or default_range
                self._hooks.append(m.register_forward_pre_hook(self._hook(name, lo, hi)))

    def _hook(self, name: str, lo: float, hi: float) -> Any:
        half = (hi - lo) / 2

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if not module.training:
                return
            x = args[0]
            excess = torch.relu(x - hi) + torch.relu(lo - x)
            self._terms.append(torch.mean((excess / half) ** 2))
            self.peaks[name] = float(x.detach().abs().max())
        return hook

    def penalty(self) -> torch.Tensor:
        """``weight`` times the summed penalty of the forward passes since the last call."""
        total = torch.stack(self._terms).sum() if self._terms else torch.zeros(())
        self._terms = []
        return self.weight * total

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lowered(model: Any, input_shape: Sequence[int] | None) -> list[LayerSpec]:
    from ..compiler import lower

    shape = input_shape if input_shape is not None else getattr(
        model, "secureinfer_input_shape", None)
    if shape is None:
        raise ConfigError("input_shape is needed (the model has no secureinfer_input_shape)")
    return lower(model, tuple(shape))


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def calibrate(model: nn.Module, x: Any, input_shape: Sequence[int] | None = None, *,
              margin: float = 0.25, input_range: Sequence[float] | None = None) -> Calibration:
    """Record the observed range of every layer of ``model`` on the inputs ``x``.

    The model is lowered (``secureinfer.compiler.lower``) and run in float64; the range of
    each LayerSpec's output, widened by ``margin`` of its width on each side, becomes
    ``layer_ranges``. The calibration and input shape are attached to ``model`` as
    ``secureinfer_calibration`` and ``secureinfer_input_shape``.

    Args:
        model: an HE-friendly network.
        x: representative inputs ``(n, *input_shape)`` (the training set).
        input_shape: one input's shape; defaults to ``x.shape[1:]``.
        margin: widening of each layer's range.
        input_range: the declared input domain (e.g. ``(0, 1)`` for images); defaults to
            the observed one, unwidened.
    """
    x = _numpy(x)
    shape = tuple(int(d) for d in (input_shape or x.shape[1:]))
    observed = Calibration.from_data(_lowered(model, shape), x, margin=margin)
    if input_range is None:
        input_range = observed.input_range
    cal = Calibration((float(input_range[0]), float(input_range[1])), observed.layer_ranges,
                      None)
    model.secureinfer_calibration = cal
    model.secureinfer_input_shape = shape
    return cal


def check_ranges(model_or_layers: Any, x: Any, calibration: Calibration | None = None, *,
                 action: Literal["raise", "warn"] = "raise", tolerance: float = 0.0,
                 input_shape: Sequence[int] | None = None) -> list[str]:
    """Check that ``x`` keeps every layer inside its calibrated range.

    The network runs in float64 on ``x``; the input is compared with
    ``calibration.input_range`` and each layer's output with its ``layer_ranges`` entry.

    Args:
        model_or_layers: a torch model (lowered here) or its LayerSpecs.
        x: a batch ``(n, *input_shape)`` (or one input).
        calibration: defaults to the model's ``secureinfer_calibration``.
        action: ``"raise"`` a ``RangeError`` at the first layer out of range, or ``"warn"``
            with a ``RangeWarning`` listing every such layer.
        tolerance: accepted excess, as a fraction of each range's width.
        input_shape: for a torch model without ``secureinfer_input_shape``.

    Returns:
        One message per layer out of range (empty when everything is in range).

    Raises:
        RangeError: ``action="raise"`` and a value left its range; the message names the
            layer and what to do.
        ValueError: no calibration, or one that does not match the layers.
    """
    if action not in ("raise", "warn"):
        raise ConfigError(f"action {action!r} is not 'raise' or 'warn'")
    if isinstance(model_or_layers, nn.Module):
        if calibration is None:
            calibration = getattr(model_or_layers, "secureinfer_calibration", None)
        layers = _lowered(model_or_layers, input_shape)
    else:
        layers = list(model_or_layers)
    if calibration is None:
        raise ConfigError("check_ranges needs a Calibration (secureinfer.nn.calibrate)")
    y = _numpy(x)
    if y.shape == layers[0].in_shape:
        y = y[None]
    problems = calibration.check(layers, y, tolerance)
    if problems:
        fix = ("scale inputs like the training data, or recalibrate (secureinfer.nn.calibrate) "
               "on data that covers them")
        if action == "raise":
            raise RangeError(f"{problems[0]}; the scheme was planned for the calibrated "
                             f"range and could return a wrong result: {fix}")
        warnings.warn("; ".join(problems) + f": {fix}", RangeWarning, stacklevel=2)
    return problems
