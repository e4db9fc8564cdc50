"""The CKKS planner's noise estimate: each affine stage amplifies slot errors by its largest
row norm, which is computed exactly (colored probes) without building the stage's matrix."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tenseal", reason="ckks needs TenSEAL: pip install secureinfer[ckks]")

from secureinfer.layers import AvgPool2d, Conv2d, Flatten, LayerSpec, Linear, Poly
from secureinfer.plugins.ckks.program import Affine, _sample_floats


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv(rng, name, shape, out, k, stride=1, pad=0) -> Conv2d:
    kh, kw = _pair(k)
    return Conv2d(name, shape, weight=rng.normal(0, 1, (out, shape[0], kh, kw)),
                  bias=rng.normal(0, 1, out), stride=_pair(stride), padding=_pair(pad))


def _stacks(rng) -> dict[str, list[LayerSpec]]:
    c1 = _conv(rng, "c1", (1, 12, 12), 3, 5, pad=2)
    pool = AvgPool2d("pool", (3, 12, 12), kernel=2, stride=2)
    c2 = _conv(rng, "c2", pool.out_shape, 4, 3)
    c3 = _conv(rng, "c3", (2, 11, 9), 3, (3, 2), stride=2, pad=1)
    overlap = AvgPool2d("overlap", c3.out_shape, kernel=3, stride=1)
    c4 = _conv(rng, "c4", (2, 9, 9), 2, 3, pad=1)
    c5 = _conv(rng, "c5", c4.out_shape, 3, 3, stride=2)
    flat = Flatten("flat", c2.out_shape)
    fc = Linear("fc", flat.out_shape, weight=rng.normal(0, 1, (5, 64)), bias=np.zeros(5))
    c6 = _conv(rng, "c6", (2, 13, 10), 3, (1, 4), stride=(3, 1), pad=(0, 2))
    scale = Poly("scale", c6.out_shape, coeffs=(0.5, -2.0))
    gappy = AvgPool2d("gappy", c6.out_shape, kernel=2, stride=3)
    c7 = _conv(rng, "c7", (2, 6, 6), 2, 5, pad=2)  # window 5 of a 6x6 map; then 9 > 6
    c8 = _conv(rng, "c8", c7.out_shape, 2, 5, pad=2)
    pool_flat = Flatten("flat2", pool.out_shape)
    return {"conv padded": [c1], "pool+conv": [pool, c2], "strided conv+overlapping pool":
            [c3, overlap], "conv+strided conv": [c4, c5], "pool+conv+flatten+linear":
            [pool, c2, flat, fc], "non-square stride+degree-1 poly+pool with gaps":
            [c6, scale, gappy], "window wider than the map": [c7, c8],
            "pool+flatten": [pool, pool_flat]}


NAMES = ["conv padded", "pool+conv", "strided conv+overlapping pool", "conv+strided conv",
         "pool+conv+flatten+linear", "non-square stride+degree-1 poly+pool with gaps",
         "window wider than the map", "pool+flatten"]


def _exact(specs: list[LayerSpec]) -> np.ndarray:
    return np.linalg.norm(Affine(list(specs)).matrix, axis=1)  # the fused matrix


@pytest.mark.parametrize("name", NAMES)
def test_row_norm_max_is_exact(name: str) -> None:
    specs = _stacks(np.random.default_rng(3))[name]
    stage = Affine(specs)
    assert stage.row_norm_max() == pytest.approx(_exact(specs).max(), rel=1e-12)
    assert stage._fused is None  # the estimate did not build the matrix


@pytest.mark.parametrize("name", NAMES)
def test_row_norms_are_exact_in_small_batches(name: str) -> None:
    """Batches of a few probes (the last one partial) give every row's norm, not only
    the largest."""
    specs = _stacks(np.random.default_rng(4))[name]
    stage = Affine(specs)
    squares = np.zeros(stage.shape[0])
    batches = list(stage._color_probes(floats=3 * _sample_floats(specs)))
    assert len(batches) > 1 and len(batches[-1]) <= 3
    for probes in batches:
        y = stage.apply(probes) - stage.bias
        squares += (y * y).sum(axis=0)
    assert np.allclose(np.sqrt(squares), _exact(specs), rtol=1e-12, atol=1e-12)


def test_a_convolutions_probes_cover_one_window_per_channel() -> None:
    """pool 2 then conv 5x5 reads a 10x10 window: 6 channels x 100 colors, not 4704
    basis vectors (LeNet-5's pool1+conv2)."""
    rng = np.random.default_rng(0)
    pool = AvgPool2d("pool1", (6, 28, 28), kernel=2, stride=2)
    conv = _conv(rng, "conv2", pool.out_shape, 16, 5)
    stage = Affine([pool, conv])
    assert sum(len(p) for p in stage._color_probes()) == 6 * 10 * 10
    # a 3x2 conv of stride 2, then a 3x3 pool of stride 1: windows of 1 + 2 + 2 * 2 = 7
    # rows and 1 + 1 + 2 * 2 = 6 columns, on a (2, 11, 9) input
    c3, overlap = _stacks(rng)["strided conv+overlapping pool"]
    assert sum(len(p) for p in Affine([c3, overlap])._color_probes()) == 2 * 7 * 6
    # The colors partition the inputs: every input is in exactly one probe.
    total = sum(p.sum(axis=0) for p in stage._color_probes())
    assert np.array_equal(total, np.ones(6 * 28 * 28))
