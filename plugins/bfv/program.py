"""The planned network: one step per layer, with its effect on the noise budget.

Steps are plain data (numpy arrays, no Pyfhel objects): the planner builds them, simulates
the noise budget through them, and the server's ``SecureLayer``s encode and run them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .layout import LinearLayout
from .linear import IntegerLinear
from .noise import NoiseModel

__all__ = ["BatchLinearStep", "FlattenStep", "Ops", "Phase", "PolyStep", "SingleLinearStep",
           "Step"]

Phase = Callable[[NoiseModel, float, float], float]
"""``(model, budget, q_bits) -> budget``: one phase of a layer at a data modulus of
``q_bits`` bits. Modulus switching may follow any phase."""


# Seconds per operation at N = 16384 per coefficient prime in use (``l``), measured with
# Pyfhel 3.5 on one core: products ~ l, key switching ~ l (l + 1); linear in N.
_PRODUCT_S, _KEYSWITCH_S, _MULTIPLY_S = 1.95e-3, 0.62e-3, 9e-3
_CONSTANT_S, _ADD_S = 0.06e-3, 0.05e-3


@dataclass(frozen=True)
class Ops:
    """Homomorphic operations of one phase of a layer, for the planner's cost estimate."""

    products: int = 0
    rotations: int = 0
    multiplies: int = 0
    constants: int = 0
    adds: int = 0

    def seconds(self, poly_degree: int, primes: int) -> float:
        """Estimated time with ``primes`` coefficient primes in use (one plaintext prime)."""
        keyswitch = _KEYSWITCH_S * primes * (primes + 1)
        per_prime = (self.products * _PRODUCT_S + self.multiplies * _MULTIPLY_S
                     + self.constants * _CONSTANT_S + self.adds * _ADD_S)
        total = per_prime * primes + (self.rotations + self.multiplies) * keyswitch
        return total * poly_degree / 16384


@dataclass
class Step:
    """A layer of the planned network.

    Attributes:
        name: the layer (``spec.name``).
        drops: coefficient primes dropped (modulus switching) after each phase.
    """

    name: str
    drops: list[int] = field(default_factory=list)

    def phases(self) -> list[Phase]:
        """The layer's phases, in order (see ``Phase``)."""
        return [self.noise]

    def ops(self) -> list[Ops]:
        """The operations of each phase."""
        return [Ops()]

    def noise(self, model: NoiseModel, budget: float, q_bits: float) -> float:
        """The budget after this layer, from ``budget`` at a data modulus of ``q_bits``."""
        return budget

    @property
    def last_drop(self) -> int:
        """Coefficient primes dropped after the layer's last phase."""
        return self.drops[-1] if self.drops else 0

    @property
    def drop(self) -> int:
        """Coefficient primes dropped during and after this layer."""
        return sum(self.drops)


@dataclass
class FlattenStep(Step):
    """Flatten: nothing moves (features are already in row-major order)."""


@dataclass(kw_only=True)
class SingleLinearStep(Step):
    """A linear layer by rotated diagonals (``single`` packing)."""

    layout: LinearLayout

    def phases(self) -> list[Phase]:
        """Baby-step rotations and products; then (after a switch, cheaper) the giant-step,
        tree and folding rotations."""
        return [self._products, self._rotations]

    def ops(self) -> list[Ops]:
        if not self.layout.bsgs:
            return [Ops(), Ops()]
        products, _ = self.layout.bsgs.counts(self.layout.diagonals)
        babies, after = self.layout.rotation_counts
        return [Ops(products=products, rotations=babies, adds=products),
                Ops(rotations=after, adds=after)]

    def _products(self, model: NoiseModel, budget: float, q_bits: float) -> float:
        if not self.layout.diagonals.diags:
            return model.fresh(q_bits)
        babies, _ = self.layout.rotation_counts
        budget = model.rotate(budget, q_bits, babies)
        return model.plain_products(budget, self.layout.products)

    def _rotations(self, model: NoiseModel, budget: float, q_bits: float) -> float:
        return model.rotate(budget, q_bits, self.layout.rotation_counts[1])


@dataclass(kw_only=True)
class BatchLinearStep(Step):
    """A linear layer on one ciphertext per feature (``batch`` packing): constant products."""

    layer: IntegerLinear

    def noise(self, model: NoiseModel, budget: float, q_bits: float) -> float:
        return min(model.constant_products(budget, self.layer.max_row_l1), model.fresh(q_bits))

    def ops(self) -> list[Ops]:
        lin = self.layer
        distinct = len(np.unique(np.stack([lin.rows, np.abs(lin.vals)]), axis=1).T)
        return [Ops(constants=distinct, adds=lin.nnz)]


@dataclass(kw_only=True)
class PolyStep(Step):
    """An element-wise polynomial with integer coefficients, lowest degree first."""

    coeffs: tuple[int, ...]
    width: int = 1

    def ops(self) -> list[Ops]:
        terms = sum(1 for k, c in enumerate(self.coeffs) if k and c)
        return [Ops(multiplies=self.width * (self.degree - 1),
                    constants=self.width * terms, adds=self.width * terms)]

    @property
    def is_square(self) -> bool:
        """Exactly ``x**2``."""
        return tuple(self.coeffs) == (0, 0, 1)

    @property
    def degree(self) -> int:
        """Polynomial degree."""
        return len(self.coeffs) - 1

    @staticmethod
    def factors(k: int) -> tuple[int, int]:
        """``x**k = x**a * x**b``: the split that keeps the depth at ``ceil(log2 k)``."""
        return k // 2, k - k // 2

    def noise(self, model: NoiseModel, budget: float, q_bits: float) -> float:
        powers = {1: budget}
        for k in range(2, self.degree + 1):
            a, b = self.factors(k)
            powers[k] = model.multiply(powers[a], powers[b])
        terms = [model.constant(powers[k], c) for k, c in enumerate(self.coeffs) if k and c]
        loss = math.log2(len(terms)) if len(terms) > 1 else 0.0
        return min(terms) - loss
