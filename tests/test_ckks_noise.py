"""The CKKS planner's noise estimate: each affine stage amplifies slot errors by its largest
row norm, which is computed exactly (colored probes) without building the stage's matrix."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tenseal", reason="ckks needs TenSEAL: pip install secureinfer[ckks]")

from secureinfer.layers import AvgPool2d, Conv2d, Flatten, LayerSpec, Linear
from secureinfer.plugins.ckks.program import Affine


def _conv(rng, name, shape, out, k, stride=1, pad=0) -> Conv2d:
    kh, kw = (k, k) if isinstance(k, int) else k
    return Conv2d(name, shape, weight=rng.normal(0, 1, (out, shape[0], kh, kw)),
                  bias=rng.normal(0, 1, out), stride=(stride, stride), padding=(pad, pad))


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
    return {"conv padded": [c1], "pool+conv": [pool, c2], "strided conv+overlapping pool":
            [c3, overlap], "conv+strided conv": [c4, c5], "pool+conv+flatten+linear":
            [pool, c2, flat, fc]}


@pytest.mark.parametrize("name", ["conv padded", "pool+conv", "strided conv+overlapping pool",
                                  "conv+strided conv", "pool+conv+flatten+linear"])
def test_row_norm_max_is_exact(name: str) -> None:
    specs = _stacks(np.random.default_rng(3))[name]
    stage = Affine(specs)
    matrix = Affine(list(specs)).matrix  # the fused matrix, for reference only
    exact = np.linalg.norm(matrix, axis=1)
    assert stage.row_norm_max() == pytest.approx(exact.max(), rel=1e-12)
    assert stage._fused is None  # the estimate did not build the matrix


def test_a_convolutions_probes_cover_one_window_per_channel() -> None:
    """pool 2 then conv 5x5 reads a 10x10 window: 6 channels x 100 colors, not 4704
    basis vectors (LeNet-5's pool1+conv2)."""
    rng = np.random.default_rng(0)
    pool = AvgPool2d("pool1", (6, 28, 28), kernel=2, stride=2)
    conv = _conv(rng, "conv2", pool.out_shape, 16, 5)
    stage = Affine([pool, conv])
    assert sum(len(p) for p in stage._color_probes()) == 6 * 10 * 10
    # The colors partition the inputs: every input is in exactly one probe.
    total = sum(p.sum(axis=0) for p in stage._color_probes())
    assert np.array_equal(total, np.ones(6 * 28 * 28))
