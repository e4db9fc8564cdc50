"""Polynomial activations: ``Square`` and ``PolyAct`` (trainable coefficients).

Both expose ``secureinfer_poly()`` (coefficients, lowest degree first), which is how
``secureinfer.compile`` lowers them to a ``Poly`` layer. Both carry an ``input_range``: the
range their input is declared to stay in, which the range regulariser enforces in training.

A ``PolyAct`` can also be *blended* with the ReLU it replaces (``blend < 1``):
``blend * p(x) + (1 - blend) * relu(x)``. The gradual schedule of ``secureinfer.nn.fit``
moves ``blend`` from 0 to 1; a blended activation is not a polynomial and does not compile.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, UnsupportedLayerError

__all__ = ["DEFAULT_RANGE", "PolyAct", "Square", "relu_fit"]

DEFAULT_RANGE: tuple[float, float] = (-4.0, 4.0)
"""Declared input range of an activation when none is given."""

_INITS = ("relu", "square")


def _check_range(input_range: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in input_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ConfigError(f"input_range must be finite with lo < hi, got ({lo}, {hi})")
    return lo, hi


def relu_fit(degree: int, input_range: Sequence[float] = DEFAULT_RANGE,
             points: int = 2001) -> tuple[float, ...]:
    """Least-squares fit of ReLU on ``input_range`` (uniform weight), lowest degree first.

    Example: on ``(-1, 1)`` at degree 2 it is ``0.094 + 0.5 x + 0.469 x**2`` (rounded).
    """
    if degree < 1:
        raise ConfigError(f"degree must be at least 1, got {degree}")
    lo, hi = _check_range(input_range)
    # Fit on [-1, 1] for conditioning, then map the coefficients back to [lo, hi].
    t = np.linspace(-1.0, 1.0, points)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    fit = np.polynomial.Polynomial.fit(t * half + mid, np.maximum(t * half + mid, 0.0),
                                       degree, domain=[lo, hi])
    return tuple(float(c) for c in fit.convert().coef)


class Square(nn.Module):
    """``x ** 2`` (CryptoNets). Lowers to ``Poly(coeffs=(0, 0, 1))``.

    Args:
        input_range: declared range of the input, for the range regulariser.
    """

    def __init__(self, input_range: Sequence[float] = DEFAULT_RANGE) -> None:
        super().__init__()
        self.input_range = _check_range(input_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x

    def secureinfer_poly(self) -> tuple[float, ...]:
        """Coefficients, lowest degree first: ``(0, 0, 1)``."""
        return (0.0, 0.0, 1.0)

    def extra_repr(self) -> str:
        return f"input_range={self.input_range}"


class PolyAct(nn.Module):
    """A polynomial activation ``sum_k c_k x**k`` with trainable coefficients.

    Args:
        degree: the polynomial degree (2 by default; higher costs depth under CKKS/BFV).
        init: ``"relu"`` (least-squares fit of ReLU on ``input_range``) or ``"square"``
            (``x**2``).
        input_range: declared range of the input: where the ReLU fit is made, and what the
            range regulariser keeps the input inside.
        coeffs: explicit initial coefficients (lowest first), overriding ``init``.
    """

    def __init__(self, degree: int = 2, init: str = "relu",
                 input_range: Sequence[float] = DEFAULT_RANGE,
                 coeffs: Sequence[float] | None = None) -> None:
        super().__init__()
        if int(degree) < 1:
            raise ConfigError(f"PolyAct degree must be at least 1, got {degree}")
        if init not in _INITS:
            raise ConfigError(f"PolyAct init {init!r} is not one of {', '.join(_INITS)}")
        self.degree = int(degree)
        self.init = init
        self.input_range = _check_range(input_range)
        self.blend = 1.0
        if coeffs is None:
            coeffs = self._initial_coeffs()
        if len(coeffs) != self.degree + 1:
            raise ConfigError(f"PolyAct of degree {degree} needs {degree + 1} coefficients, "
                             f"got {len(coeffs)}")
        self.coeffs = nn.Parameter(torch.tensor([float(c) for c in coeffs]))

    def _initial_coeffs(self) -> tuple[float, ...]:
        if self.init == "square":
            coeffs = [0.0] * (self.degree + 1)
            coeffs[min(2, self.degree)] = 1.0
            return tuple(coeffs)
        return relu_fit(self.degree, self.input_range)

    def refit(self, input_range: Sequence[float]) -> None:
        """Set ``input_range`` and re-initialise the coefficients for it (``init`` kept)."""
        self.input_range = _check_range(input_range)
        with torch.no_grad():
            self.coeffs.copy_(torch.tensor(self._initial_coeffs()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.coeffs.to(x.dtype)
        y = c[-1] * x + c[-2]
        for k in range(self.degree - 2, -1, -1):
            y = y * x + c[k]
        if self.blend < 1.0:
            return self.blend * y + (1.0 - self.blend) * torch.relu(x)
        return y

    def secureinfer_poly(self) -> tuple[float, ...]:
        """Coefficients, lowest degree first, as Python floats.

        Raises:
            UnsupportedLayerError: the activation is still blended with ReLU.
        """
        if self.blend < 1.0:
            raise UnsupportedLayerError(
                f"PolyAct is blended with ReLU (blend={self.blend:.3f}); finish the gradual "
                "schedule (blend=1) before compiling")
        return tuple(float(c) for c in self.coeffs.detach().cpu().double())

    def extra_repr(self) -> str:
        lo, hi = self.input_range
        blend = f", blend={self.blend:.3f}" if self.blend < 1.0 else ""
        return f"degree={self.degree}, init={self.init!r}, input_range=({lo:.3g}, {hi:.3g}){blend}"
