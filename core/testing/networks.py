"""Small seeded networks (as LayerSpecs) that the conformance suite runs every scheme on."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..layers import AvgPool2d, Conv2d, Flatten, LayerSpec, Linear, Poly

__all__ = ["NETWORKS", "inputs"]


def _lin(rng: np.random.Generator, name: str, n_in: int, n_out: int) -> Linear:
    return Linear(name, (n_in,), weight=rng.normal(0, 1 / np.sqrt(n_in), (n_out, n_in)),
                  bias=rng.normal(0, 0.1, n_out))


def mlp_square(rng: np.random.Generator) -> list[LayerSpec]:
    """Flatten -> Linear 16->8 -> x^2 -> Linear 8->4 (the quadratic-FE shape)."""
    return [Flatten("flatten", (1, 4, 4)), _lin(rng, "fc1", 16, 8), Poly("act1", (8,)),
            _lin(rng, "fc2", 8, 4)]


def mlp_poly(rng: np.random.Generator) -> list[LayerSpec]:
    """Two hidden layers with a general degree-2 polynomial: depth 2."""
    coeffs = (0.1, 0.5, 0.25)
    return [Flatten("flatten", (1, 4, 4)), _lin(rng, "fc1", 16, 8),
            Poly("act1", (8,), coeffs=coeffs), _lin(rng, "fc2", 8, 6),
            Poly("act2", (6,), coeffs=coeffs), _lin(rng, "fc3", 6, 3)]


def cnn(rng: np.random.Generator) -> list[LayerSpec]:
    """Conv (stride 2, padding 1) -> x^2 -> AvgPool -> Flatten -> Linear."""
    conv = Conv2d("conv1", (1, 8, 8), weight=rng.normal(0, 0.3, (2, 1, 3, 3)),
                  bias=rng.normal(0, 0.1, 2), stride=(2, 2), padding=(1, 1))
    pool = AvgPool2d("pool1", conv.out_shape, kernel=2, stride=2)
    return [conv, Poly("act1", conv.out_shape), pool, Flatten("flatten", pool.out_shape),
            _lin(rng, "fc1", int(np.prod(pool.out_shape)), 3)]


def lenet(rng: np.random.Generator) -> list[LayerSpec]:
    """LeNet's shape, small: (conv -> x^2 -> avgpool) twice, then two dense layers.

    Degree 4 in the input over two convolutions (two channels, an 8x8 image).
    """
    conv1 = Conv2d("conv1", (1, 8, 8), weight=rng.normal(0, 0.4, (2, 1, 3, 3)),
                   bias=rng.normal(0, 0.1, 2), padding=(1, 1))
    pool1 = AvgPool2d("pool1", conv1.out_shape, kernel=2, stride=2)
    conv2 = Conv2d("conv2", pool1.out_shape, weight=rng.normal(0, 0.3, (2, 2, 3, 3)),
                   bias=rng.normal(0, 0.1, 2), padding=(1, 1))
    pool2 = AvgPool2d("pool2", conv2.out_shape, kernel=2, stride=2)
    flat = int(np.prod(pool2.out_shape))
    return [conv1, Poly("act1", conv1.out_shape), pool1,
            conv2, Poly("act2", conv2.out_shape), pool2,
            Flatten("flatten", pool2.out_shape), _lin(rng, "fc1", flat, 6), _lin(rng, "fc2", 6, 3)]


NETWORKS: dict[str, Callable[[np.random.Generator], list[LayerSpec]]] = {
    "mlp_square": mlp_square,
    "mlp_poly": mlp_poly,
    "cnn": cnn,
    "lenet": lenet,
}


def inputs(layers: list[LayerSpec], n: int, seed: int = 1) -> np.ndarray:
    """``n`` inputs in [0, 1], the range every shipped dataset uses."""
    return np.random.default_rng(seed).random((n, *layers[0].in_shape))
