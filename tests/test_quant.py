"""The integer reference shared by the exact schemes."""

from __future__ import annotations

import numpy as np
import pytest

from secureinfer.errors import CompileError, RangeError
from secureinfer.quant import quantize
from secureinfer.testing import NETWORKS, inputs


@pytest.mark.parametrize("net", sorted(NETWORKS))
def test_bounds_hold_and_result_close(net):
    layers = NETWORKS[net](np.random.default_rng(0))
    q = quantize(layers, (0.0, 1.0), bits=8)
    x = inputs(layers, 50)
    y = q.quantize_input(x)
    assert np.abs(y).max() <= q.input_bound
    for layer in q.layers:
        y = layer.forward_int(y)
        assert max(abs(int(v)) for v in np.ravel(y)) <= layer.bound, layer.spec.name
    from secureinfer.layers import forward

    ref = forward(layers, x)
    assert np.abs(q.forward(x) - ref).max() < 0.05 * np.abs(ref).max()


def test_extreme_inputs_reach_but_never_pass_bound():
    layers = NETWORKS["mlp_square"](np.random.default_rng(3))
    q = quantize(layers, (0.0, 1.0), bits=6)
    w = layers[1].weight
    # The input that maximises |fc1| output 0 reaches the first layer's worst case for it.
    x = (w[0] > 0).astype(float).reshape(1, 1, 4, 4)
    h = q.layers[1].forward_int(q.quantize_input(x).reshape(1, -1))
    assert abs(int(h[0, 0])) <= q.layers[1].bound


def test_more_bits_more_accuracy():
    layers = NETWORKS["mlp_poly"](np.random.default_rng(0))
    x = inputs(layers, 50)
    from secureinfer.layers import forward

    ref = forward(layers, x)
    errs = [np.abs(quantize(layers, (0, 1), bits=b).forward(x) - ref).max() for b in (4, 8, 12)]
    assert errs[0] > errs[1] > errs[2]


def test_big_integers_stay_exact():
    layers = NETWORKS["mlp_poly"](np.random.default_rng(0))
    q = quantize(layers, (0.0, 1.0), bits=16)
    assert q.max_bound > 2**62
    y = q.forward_int(q.quantize_input(inputs(layers, 3)))
    assert y.dtype == object


def test_input_out_of_range_is_named_error():
    layers = NETWORKS["mlp_square"](np.random.default_rng(0))
    q = quantize(layers, (0.0, 1.0), bits=8)
    with pytest.raises(RangeError, match=r"\[0, 1\]"):
        q.quantize_input(np.full((1, 1, 4, 4), 1.5))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_input_is_range_error_not_int64_min(bad):
    layers = NETWORKS["mlp_square"](np.random.default_rng(0))
    q = quantize(layers, (0.0, 1.0), bits=8)
    x = np.full((1, 1, 4, 4), 0.5)
    x[0, 0, 0, 0] = bad
    with pytest.raises(RangeError, match="NaN or infinity"):
        q.quantize_input(x)


def test_nonnegative_range_never_quantizes_below_zero():
    layers = NETWORKS["mlp_square"](np.random.default_rng(0))
    q = quantize(layers, (0.0, 1e-7), bits=8)
    x = np.full((1, 1, 4, 4), -1e-9)  # inside the 1e-9 tolerance, so accepted
    assert q.quantize_input(x).min() == 0


def test_signed_range_and_bad_bits():
    layers = NETWORKS["mlp_square"](np.random.default_rng(0))
    q = quantize(layers, (-1.0, 1.0), bits=8)
    assert q.input_bound == 127
    with pytest.raises(CompileError, match="bits"):
        quantize(layers, (0, 1), bits=1)
    with pytest.raises(CompileError, match="range"):
        quantize(layers, (1, 1), bits=8)


def test_padded_convolution_on_integers_past_64_bits():
    """A padded convolution deep in a network sees integers past 64 bits; padding must not
    bring in fixed-width zeros (their products with big integers overflowed)."""
    import dataclasses

    from secureinfer.layers import Conv2d

    rng = np.random.default_rng(0)
    conv = Conv2d("conv", (1, 4, 4), weight=rng.normal(size=(2, 1, 3, 3)), bias=np.zeros(2),
                  padding=(1, 1))
    q = dataclasses.replace(quantize([conv], (0.0, 1.0), bits=8).layers[0], bound=2**90)
    x = rng.integers(-9, 9, size=(1, 1, 4, 4)).astype(object) * 2**70
    got = q.forward_int(x)
    w, b = q.weight, q.bias
    for o in range(2):
        for i in range(4):
            for j in range(4):
                want = int(b[o]) + sum(int(w[o, 0, di, dj]) * x[0, 0, i + di - 1, j + dj - 1]
                                       for di in range(3) for dj in range(3)
                                       if 0 <= i + di - 1 < 4 and 0 <= j + dj - 1 < 4)
                assert got[0, o, i, j] == want
