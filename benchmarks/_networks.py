"""Networks with random weights for latency benchmarks (latency does not depend on them)."""

from __future__ import annotations

import numpy as np
from secureinfer.layers import Conv2d, Flatten, LayerSpec, Linear, Poly

__all__ = ["random_cnn"]


def random_cnn(seed: int = 0) -> list[LayerSpec]:
    """TenSEAL's MNIST ConvNet (conv 1->4 k7 s3, x^2, 256->64, x^2, 64->10), random weights."""
    rng = np.random.default_rng(seed)
    conv = Conv2d("conv1", (1, 28, 28), weight=rng.normal(0, 0.15, (4, 1, 7, 7)),
                  bias=rng.normal(0, 0.1, 4), stride=(3, 3))
    return [conv, Flatten("flatten", conv.out_shape), Poly("act1", (256,)),
            Linear("fc1", (256,), weight=rng.normal(0, 0.06, (64, 256)),
                   bias=rng.normal(0, 0.1, 64)),
            Poly("act2", (64,)),
            Linear("fc2", (64,), weight=rng.normal(0, 0.12, (10, 64)),
                   bias=rng.normal(0, 0.1, 10))]
