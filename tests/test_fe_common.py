"""Shared FE code: group adapters, packing, fixed-base and matrix tables, integer maps."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("pymcl", reason="the FE schemes need pymcl: pip install secureinfer[fe]")

from secureinfer.errors import CompileError, EnvelopeError  # noqa: E402
from secureinfer.layers import AvgPool2d, Conv2d, Flatten, Linear, Poly  # noqa: E402
from secureinfer.plugins.fe_common import backend  # noqa: E402
from secureinfer.plugins.fe_common.groups import (  # noqa: E402
    fr,
    fr_to_int,
    group,
    group_order,
    pack_elements,
    random_scalar,
    scalars_from_bytes,
    scalars_to_bytes,
    unpack_elements,
)
from secureinfer.plugins.fe_common.integer import affine_map, inner_product_bound  # noqa: E402
from secureinfer.plugins.fe_common.tables import FixedBase, SmallMatVec  # noqa: E402
from secureinfer.quant import quantize  # noqa: E402


def _naive(ops, matrix, bases):
    out = []
    for row in matrix:
        acc = ops.identity()
        for w, b in zip(row.tolist(), bases):
            acc = ops.law(acc, ops.pow(b, w))
        out.append(acc)
    return out


def test_scalars_wrap_modulo_the_order():
    r = group_order()
    assert fr_to_int(fr(-1)) == r - 1
    assert fr_to_int(fr(r + 5)) == 5
    values = [0, 1, r - 1, 2**200]
    assert scalars_from_bytes(scalars_to_bytes(values)) == [v % r for v in values]
    with pytest.raises(EnvelopeError):
        scalars_from_bytes(b"\xff" * 32)  # not reduced
    with pytest.raises(EnvelopeError):
        scalars_from_bytes(b"\x00" * 31)


@pytest.mark.parametrize("name", ["G1", "G2", "GT"])
def test_group_laws_agree(name):
    ops = group(name)
    g = ops.generator()
    a, b = random_scalar(), random_scalar()
    assert ops.law(ops.pow(g, a), ops.pow(g, b)) == ops.pow(g, a + b)
    assert ops.law(ops.pow(g, a), ops.inv(ops.pow(g, a))) == ops.identity()
    assert ops.pow(g, -3) == ops.inv(ops.pow(g, 3))
    elems = [ops.pow(g, k) for k in (1, 2, -5)]
    data = pack_elements(ops, elems)
    assert len(data) == 3 * ops.element_size
    assert unpack_elements(ops, data, count=3) == elems


def test_malformed_group_elements_raise_envelope_error():
    ops = group("G1")
    with pytest.raises(EnvelopeError):
        unpack_elements(ops, b"\x01" * 48)  # not a curve point
    with pytest.raises(EnvelopeError):
        unpack_elements(ops, b"\x00" * 47)  # not a whole element
    with pytest.raises(EnvelopeError):
        unpack_elements(ops, pack_elements(ops, [ops.generator()]), count=2)


@pytest.mark.parametrize("name", ["G1", "G2", "GT"])
def test_fixed_base_matches_power(name):
    ops = group(name)
    g = ops.pow(ops.generator(), 12345)
    for window in (4, 8):
        table = FixedBase(ops, g, window=window)
        exps = [0, 1, -1, group_order() - 2, random_scalar(), random_scalar()]
        assert table.pow_many(exps) == [ops.pow(g, e) for e in exps]
    with pytest.raises(ValueError):
        FixedBase(ops, g, window=5)


@pytest.mark.parametrize("name", ["G1", "GT"])
def test_small_matvec_matches_naive(name):
    ops = group(name)
    rng = np.random.default_rng(1)
    for high in (2, 127, 10**6):
        a = rng.integers(-high, high + 1, size=(6, 9))
        a[:, 2] = 0  # an unused element
        a[1] = 0     # an all-zero row
        bases = [ops.pow(ops.generator(), random_scalar()) for _ in range(9)]
        mv = SmallMatVec(ops, a)
        assert mv(bases) == _naive(ops, a, bases)
        starts = [ops.pow(ops.generator(), k) for k in range(6)]
        assert mv(bases, starts) == [ops.law(s, v) for s, v in zip(starts, _naive(ops, a, bases))]


def test_small_matvec_windows_follow_the_structure():
    ops = group("G1")
    dense = np.random.default_rng(0).integers(-127, 128, size=(200, 4))
    sparse = np.zeros((200, 4), dtype=np.int64)
    sparse[0] = [127, -100, 77, 3]
    dense_mv, sparse_mv = SmallMatVec(ops, dense), SmallMatVec(ops, sparse)
    assert dense_mv.windows.min() >= 6   # many uses: a full table, one addition per weight
    assert sparse_mv.windows.max() <= 3  # one use: a small window beats a big table
    # one addition per weight, one subtraction per row, one table of 126 sums per column
    assert dense_mv.adds <= dense.size + dense.shape[0] + 4 * 126
    with pytest.raises(ValueError):
        SmallMatVec(ops, np.ones((2, 2)))  # float matrix
    with pytest.raises(ValueError):
        dense_mv([ops.generator()])


def test_affine_map_is_exactly_forward_int(rng):
    conv = Conv2d("conv1", (2, 6, 6), weight=rng.normal(0, 0.3, (3, 2, 3, 3)),
                  bias=rng.normal(0, 0.1, 3), stride=(1, 1), padding=(1, 1))
    pool = AvgPool2d("pool1", conv.out_shape, kernel=2, stride=2)
    flat = Flatten("flat", pool.out_shape)
    fc = Linear("fc1", (27,), weight=rng.normal(0, 0.3, (4, 27)), bias=rng.normal(0, 0.1, 4))
    qnet = quantize([conv, pool, flat, fc], (-1.0, 1.0), bits=6)
    a, c = affine_map(qnet.layers, (2, 6, 6))
    assert a.shape == (4, 72) and a.dtype == np.int64
    x_q = rng.integers(-qnet.input_bound, qnet.input_bound + 1, size=(20, 2, 6, 6))
    np.testing.assert_array_equal(x_q.reshape(20, -1) @ a.T + c, qnet.forward_int(x_q))
    bound = inner_product_bound(a, qnet.input_bound, nonnegative=False)
    assert np.abs(x_q.reshape(20, -1) @ a.T).max() <= bound
    with pytest.raises(CompileError):
        affine_map(quantize([fc, Poly("act", (4,))], (0.0, 1.0)).layers, (27,))


def test_inner_product_bound_nonnegative_inputs():
    a = np.array([[3, -5, 1], [-1, -1, -1]])
    assert inner_product_bound(a, 10, nonnegative=True) == 50     # max(4, 5) * 10, max(0, 3)
    assert inner_product_bound(a, 10, nonnegative=False) == 90    # (4 + 5) * 10


def test_availability_names_the_extra(monkeypatch):
    assert backend.availability() is None
    assert backend.backend_version()
    monkeypatch.setitem(sys.modules, "pymcl", None)  # makes ``import pymcl`` fail
    message = backend.availability()
    assert message and "secureinfer[fe]" in message
    assert backend.backend_version() is None
