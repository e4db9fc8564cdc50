"""The schemes skip zero units: a pruned output row, diagonal or kernel offset costs no
functional key, no plaintext product, no rotation and no Galois key."""

from __future__ import annotations

import numpy as np
import pytest

from secureinfer.layers import Conv2d, Flatten, Linear, Poly
from secureinfer.model import compile_layers


def _mlp(rng: np.random.Generator, zero_rows: tuple[int, ...] = ()) -> list:
    w1 = rng.normal(0, 0.4, (8, 16))
    w1[list(zero_rows)] = 0.0
    return [Flatten("flatten", (1, 4, 4)),
            Linear("fc1", (16,), weight=w1, bias=rng.normal(0, 0.3, 8)),
            Poly("act1", (8,)),
            Linear("fc2", (8,), weight=rng.normal(0, 0.4, (3, 8)), bias=np.zeros(3))]


# ----- fe-ip -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fe_ip_pair():
    pytest.importorskip("pymcl", reason="fe-ip needs pymcl: pip install secureinfer[fe]")
    rng = np.random.default_rng(3)
    calib = rng.random((64, 1, 4, 4))
    dense = compile_layers(_mlp(np.random.default_rng(1)), "fe-ip", calibration=calib)
    pruned = compile_layers(_mlp(np.random.default_rng(1), (1, 4, 5)), "fe-ip",
                            calibration=calib)
    return dense, pruned, rng.random((5, 1, 4, 4))


def test_fe_ip_zero_rows_get_no_functional_key(fe_ip_pair):
    dense, pruned, x = fe_ip_pair
    assert dense.plan["functional_keys"] == 8 and dense.plan["units_skipped"] == 0
    assert pruned.plan["functional_keys"] == 5 and pruned.plan["units_skipped"] == 3
    assert pruned.plan["outputs"] == 8
    client, server, _ = pruned.setup()
    assert len(server.ctx.sk) == 5
    layer = server.layers[0]
    assert layer._matvec.shape == (5, 16)
    assert layer._matvec.adds < dense.setup()[1].layers[0]._matvec.adds
    got = server.infer(client.encrypt(x))
    np.testing.assert_array_equal(got, pruned.reference(x))  # the quantized clear network


def test_fe_ip_all_rows_zero_still_answers_the_bias():
    pytest.importorskip("pymcl", reason="fe-ip needs pymcl: pip install secureinfer[fe]")
    rng = np.random.default_rng(4)
    calib = rng.random((32, 1, 4, 4))
    sm = compile_layers(_mlp(rng, tuple(range(8))), "fe-ip", calibration=calib)
    assert sm.plan["functional_keys"] == 0 and sm.plan["units_skipped"] == 8
    client, server, _ = sm.setup()
    x = rng.random((2, 1, 4, 4))
    np.testing.assert_array_equal(server.infer(client.encrypt(x)), sm.reference(x))
