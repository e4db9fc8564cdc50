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


# ----- ckks single packing -------------------------------------------------------------


class _Counting:
    """The SEAL evaluator, counting the rotations and plaintext products it runs."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.rotations = self.products = 0

    def rotate_vector(self, *args):
        self.rotations += 1
        return self._inner.rotate_vector(*args)

    def multiply_plain(self, *args):
        self.products += 1
        return self._inner.multiply_plain(*args)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _CountingNative:
    """The ckks native part (hoisted rotations, fused sums of products), counting too."""

    def __init__(self, inner, counter: _Counting) -> None:
        self._inner, self._counter = inner, counter

    def rotate(self, *args):
        self._counter.rotations += 1
        return self._inner.rotate(*args)

    def rotations(self, split, steps):
        self._counter.rotations += len(steps)
        return self._inner.rotations(split, steps)

    def run(self, sums, cts):
        self._counter.products += int(sums.counts.sum())
        return self._inner.run(sums, cts)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _run_counted(sm, x):
    client, server, _ = sm.setup()
    counter = _Counting(server.ctx.seal.evaluator)
    if getattr(server.ctx, "native", None) is not None:  # ckks with its native part
        server.ctx.native = _CountingNative(server.ctx.native, counter)
    for layer in server.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is not None:
            kernel.ev = counter
    out = client.decrypt(server.evaluate(client.encrypt(x)))
    return out, counter


def _deep_mlp(seed: int, zero_diagonals: tuple[int, ...] = ()) -> list:
    rng = np.random.default_rng(seed)
    w2 = rng.normal(0, 0.3, (16, 16))
    j = np.arange(16)
    for i in zero_diagonals:  # the slot diagonals of a 16 -> 16 dense-to-dense stage
        w2[j, (j + i) % 16] = 0.0
    return [Flatten("flatten", (1, 4, 4)),
            Linear("fc1", (16,), weight=rng.normal(0, 0.3, (16, 16)), bias=rng.normal(0, .1, 16)),
            Poly("act1", (16,)),
            Linear("fc2", (16,), weight=w2, bias=rng.normal(0, 0.1, 16)),
            Poly("act2", (16,)),
            Linear("fc3", (16,), weight=rng.normal(0, 0.3, (4, 16)), bias=np.zeros(4))]


def _conv_net(seed: int, zero_taps: tuple[tuple[int, int], ...] = ()) -> list:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (2, 1, 3, 3))
    for di, dj in zero_taps:  # a kernel offset pruned for every channel pair
        w[:, :, di, dj] = 0.0
    conv = Conv2d("conv1", (1, 8, 8), weight=w, bias=rng.normal(0, 0.1, 2), stride=(1, 1),
                  padding=(1, 1))
    return [conv, Poly("act1", (2, 8, 8)), Flatten("flatten", (2, 8, 8)),
            Linear("fc1", (128,), weight=rng.normal(0, 0.1, (3, 128)), bias=np.zeros(3))]


@pytest.fixture(scope="module")
def ckks_ready():
    pytest.importorskip("tenseal", reason="ckks needs tenseal: pip install secureinfer[ckks]")


def _ckks_pair(layers_dense, layers_pruned, x, calib, config="ckks?packing=single"):
    dense = compile_layers(layers_dense, config, calibration=calib)
    pruned = compile_layers(layers_pruned, config, calibration=calib)
    return dense, pruned


def test_ckks_hybrid_diagonals_skip_zero_diagonals():
    """The hybrid diagonal method of a 32 -> 32 chained stage: pruned diagonals cost no
    product, and the baby/giant rotations and Galois steps of those alone go."""
    from secureinfer.plugins.ckks.program import Layout
    from secureinfer.plugins.ckks.search import _make_single

    rng = np.random.default_rng(2)
    w = rng.normal(size=(32, 32))
    j = np.arange(32)
    full = _make_single(w, Layout.dense(32), Layout.dense(32), None, "chained")
    kept = (0, 1, 2, 3)
    for i in set(range(32)) - set(kept):  # keep 4 diagonals: one baby group
        w[j, (j + i) % 32] = 0.0
    pruned = _make_single(w, Layout.dense(32), Layout.dense(32), None, "chained")
    assert full.skipped == 0 and len(full.diagonals) == 32
    assert pruned.skipped == 28 and sorted(pruned.diagonals) == list(kept)
    assert pruned.rotations() <= 3 and full.rotations() >= 10
    assert len(pruned.steps()) <= 3 < len(full.steps())


def test_ckks_dense_counts_match_the_plan(ckks_ready):
    rng = np.random.default_rng(7)
    calib, x = rng.uniform(-1, 1, (32, 1, 4, 4)), rng.uniform(-1, 1, (2, 1, 4, 4))
    for layers in (_deep_mlp(0), _deep_mlp(0, tuple(range(1, 16, 2)))):
        sm = compile_layers(layers, "ckks?packing=single", calibration=calib)
        out, counter = _run_counted(sm, x)
        assert counter.rotations == sm.plan["rotations_per_input"] * len(x)
        assert counter.products == sm.plan["plaintext_products"] * len(x)
        np.testing.assert_allclose(out, sm.predict_clear(x), atol=1e-2)


def test_ckks_grid_zero_kernel_offsets_skipped(ckks_ready):
    rng = np.random.default_rng(8)
    calib, x = rng.uniform(-1, 1, (32, 1, 8, 8)), rng.uniform(-1, 1, (2, 1, 8, 8))
    taps = ((0, 0), (0, 2), (2, 0), (2, 2), (1, 0))
    # the client's shifted copies off: the server rotates by every live kernel offset
    dense, pruned = _ckks_pair(_conv_net(0), _conv_net(0, taps), x, calib,
                               "ckks?packing=single&input_shifts=1")
    assert dense.plan["layout"] == pruned.plan["layout"] == "grid"
    assert dense.plan["units_skipped"] == 0 and pruned.plan["units_skipped"] > 0
    assert pruned.plan["rotations_per_input"] < dense.plan["rotations_per_input"]
    assert pruned.plan["galois_keys"] < dense.plan["galois_keys"]
    assert pruned.plan["galois_key_bytes"] < dense.plan["galois_key_bytes"]
    for sm in (dense, pruned):
        out, counter = _run_counted(sm, x)
        assert counter.rotations == sm.plan["rotations_per_input"] * len(x)
        assert counter.products == sm.plan["plaintext_products"] * len(x)
        np.testing.assert_allclose(out, sm.predict_clear(x), atol=1e-2)


def test_ckks_grid_zero_kernel_offsets_need_no_shifted_copy(ckks_ready):
    """With the client's shifted copies, a pruned kernel offset is one input ciphertext
    fewer (no copy for a baby step nothing reads)."""
    rng = np.random.default_rng(8)
    calib, x = rng.uniform(-1, 1, (32, 1, 8, 8)), rng.uniform(-1, 1, (2, 1, 8, 8))
    taps = ((0, 2), (2, 0), (2, 2))
    dense, pruned = _ckks_pair(_conv_net(0), _conv_net(0, taps), x, calib)
    shifts = len(dense.plan["input_shifts"])
    assert shifts > 1 and len(pruned.plan["input_shifts"]) == shifts - len(taps)
    for sm in (dense, pruned):
        out, counter = _run_counted(sm, x)
        assert counter.rotations == sm.plan["rotations_per_input"] * len(x)
        np.testing.assert_allclose(out, sm.predict_clear(x), atol=1e-2)


def test_ckks_plan_without_zeros_is_unchanged(ckks_ready):
    """A model with no zero unit plans exactly as before: nothing skipped, and the
    rotation steps are those of the nonzero diagonals."""
    rng = np.random.default_rng(9)
    calib = rng.uniform(-1, 1, (32, 1, 4, 4))
    sm = compile_layers(_deep_mlp(1), "ckks?packing=single", calibration=calib)
    assert sm.plan["units_skipped"] == 0
    assert sm.plan["galois_keys"] == len(sm.plan["rotation_steps"])


# ----- fe-quad --------------------------------------------------------------------------


def test_fe_quad_drops_pruned_hidden_units():
    pytest.importorskip("pymcl", reason="fe-quad needs pymcl: pip install secureinfer[fe]")
    rng = np.random.default_rng(5)
    calib, x = rng.random((32, 1, 4, 4)), rng.random((3, 1, 4, 4))
    base = _mlp(np.random.default_rng(1))
    base[2] = Poly("act1", (8,), coeffs=(0.25, 0.5, 1.0))  # q0 != 0: a dead row still counts
    w1, b1, w2 = base[1].weight.copy(), base[1].bias.copy(), base[3].weight.copy()
    w1[[0, 3]] = 0.0
    b1[[0, 3]] = 0.0  # units 0 and 3: constant activation, folded into the output bias
    w2[:, 6] = 0.0    # unit 6: no output reads it
    pruned = [base[0], Linear("fc1", (16,), weight=w1, bias=b1), base[2],
              Linear("fc2", (8,), weight=w2, bias=base[3].bias)]
    full = compile_layers(base, "fe-quad?bits=4", calibration=calib)
    sm = compile_layers(pruned, "fe-quad?bits=4", calibration=calib)
    assert full.plan["hidden"] == 8 and full.plan["units_skipped"] == 0
    assert sm.plan["hidden"] == 5 and sm.plan["units_skipped"] == 3
    assert sm.plan["pairings_per_input"] == full.plan["pairings_per_input"] - 6
    client, server, _ = sm.setup()
    np.testing.assert_array_equal(server.infer(client.encrypt(x)), sm.reference(x))
