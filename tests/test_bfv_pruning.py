"""Pruning in the units of the compiled bfv single-packing plan: the diagonals it evaluates
(``plugins/bfv/units.py``), skipped when all zero, exactly as the plan counts them."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from secureinfer.layers import Conv2d, Flatten, Linear, Poly
from secureinfer.model import compile_layers

torch = pytest.importorskip("torch")
pytest.importorskip("Pyfhel", reason="bfv needs Pyfhel: pip install secureinfer[bfv]")

import secureinfer  # noqa: E402
from secureinfer import nn as snn  # noqa: E402

BFV = "bfv?packing=single"


class _CountingHe:
    """A server's Pyfhel object, counting the rotations and plaintext products it runs."""

    def __init__(self, inner, counts) -> None:
        self._inner, self._counts = inner, counts

    def rotate(self, *args, **kw):
        self._counts["rotations"] += 1
        return self._inner.rotate(*args, **kw)

    def multiply_plain(self, *args, **kw):
        self._counts["products"] += 1
        return self._inner.multiply_plain(*args, **kw)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _CountingPrime:
    def __init__(self, inner, counts) -> None:
        self._inner, self.he = inner, _CountingHe(inner.he, counts)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _run_counted(sm, x):
    """Decrypted outputs, and the rotations and products the server ran on every prime."""
    client, server, _ = sm.setup()
    counts = {"rotations": 0, "products": 0}
    for layer in server.layers:
        for op in getattr(layer, "ops", []):
            if op is not None:
                op.ctx = _CountingPrime(op.ctx, counts)
    out = client.decrypt(server.evaluate(client.encrypt(x)))
    return out, counts


@pytest.fixture(scope="module")
def mlp(toolkit_model):
    return toolkit_model("mlp")


@pytest.fixture(scope="module")
def pruned(mlp, digits):
    return snn.prune(mlp, BFV, sparsity=0.75, max_drop=100.0, data=digits, steps=2,
                     epochs=2)


def _compile(model, digits, config=BFV):
    return secureinfer.compile(model, config, calibration=digits.x_train[:256])


def _layer(plan, name):
    return next(e for e in plan["layers"] if e["layer"] == name)


def test_units_come_from_the_plan(mlp, digits):
    sm = _compile(mlp, digits)
    units = sm.scheme.pruning_units()
    assert [u.layer for u in units] == ["fc1", "fc2"]
    fc1, fc2 = units
    assert fc1.permutable and not fc2.permutable and fc1.pow2_runs
    # 64 -> 32: diagonal d = (c - r) mod T_out, T_out = 32 (the output period)
    assert fc1.width == 32 and fc1.unit_of()[3, 40] == (40 - 3) % 32
    for u in units:  # unpruned: every diagonal of the layer is in the plan
        assert len(np.unique(u.unit_of())) == _layer(sm.plan, u.layer)["diagonals"]
    assert sm.plan["units_skipped"] == 0


def test_zeroing_one_exported_unit_skips_exactly_one_plaintext_diagonal(mlp, digits):
    """The units agree with the compiled plan: the weights of one exported unit zeroed,
    the plan evaluates one diagonal fewer in that layer and counts one more skipped."""
    base = _compile(mlp, digits)
    for u in base.scheme.pruning_units():
        model = copy.deepcopy(mlp)
        weight = dict(model.named_modules())[u.layer].weight
        with torch.no_grad():
            weight[torch.as_tensor(u.unit_of() == 5)] = 0.0
        sm = _compile(model, digits)
        assert sm.plan["units_skipped"] == 1, u.layer
        assert _layer(sm.plan, u.layer)["diagonals"] == _layer(base.plan, u.layer)["diagonals"] - 1


def test_pruned_diagonals_are_skipped_in_a_real_run(mlp, pruned, digits):
    meta = pruned.meta
    assert meta["units_from"] == "plan" and meta["pruned"] > 0
    base, sm = _compile(mlp, digits), _compile(pruned.model, digits)
    assert sm.plan["units_skipped"] >= meta["pruned"]  # weights rounding to 0 add to it
    for key in ("rotations_per_input", "plaintext_products", "galois_keys",
                "galois_key_bytes"):
        assert sm.plan[key] < base.plan[key], key
    assert sm.plan["galois_keys"] == len(sm.plan["rotation_steps"])
    x = digits.x_test[:3]  # two ciphertexts (two inputs per ciphertext)
    runs = {}
    for name, model in (("base", base), ("pruned", sm)):
        out, counts = _run_counted(model, x)
        per = 2 * len(model.plan["plain_moduli"])  # ciphertexts x primes
        assert counts["rotations"] == model.plan["rotations_per_input"] * per, name
        assert counts["products"] == model.plan["plaintext_products"] * per, name
        runs[name] = counts
        clear = secureinfer.compile(pruned.model if name == "pruned" else mlp, "clear?bits=8",
                                    calibration=digits.x_train[:256])
        c_client, c_server, _ = clear.setup()
        np.testing.assert_array_equal(out, c_client.decrypt(c_server.evaluate(
            c_client.encrypt(x))))  # the quantized clear network, integer for integer
    assert runs["pruned"]["rotations"] < runs["base"]["rotations"]
    assert runs["pruned"]["products"] < runs["base"]["products"]


def test_pruned_units_are_runs_and_the_plan_skips_exactly_them(pruned, digits):
    """Outside a run of a power of two diagonals (``pow2_runs``) every weight is zero,
    and the plan skips exactly the diagonals with no nonzero weight."""
    sm = _compile(pruned.model, digits)
    empty = 0
    for u in sm.scheme.pruning_units():
        w = dict(pruned.model.named_modules())[u.layer].weight.detach().numpy()
        diag = u.unit_of()
        values = np.unique(diag)
        kept = [i for i, v in enumerate(values) if (w[diag == v] != 0).any()]
        n = len(kept)
        assert n & (n - 1) == 0, u.layer
        assert sorted((i - kept[0]) % len(values) for i in kept) == list(range(n)), u.layer
        assert _layer(sm.plan, u.layer)["diagonals"] == n
        empty += len(values) - n
    assert sm.plan["units_skipped"] == empty == pruned.meta["pruned"]


def test_budget_zero_changes_nothing_under_bfv(mlp, digits):
    result = snn.prune(mlp, BFV, sparsity=0.75, max_drop=0.0, data=digits, epochs=1)
    for (k, a), b in zip(mlp.state_dict().items(), result.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert result.meta["pruned"] == 0 and result.meta["units_from"] == "plan"


def test_model_pruned_for_bfv_runs_under_ckks_and_clear(pruned, digits):
    x = digits.x_test[:2]
    clear = secureinfer.compile(pruned.model, "clear")
    with torch.no_grad():
        np.testing.assert_allclose(clear.predict_clear(x),
                                   pruned.model(torch.tensor(x)).double().numpy(), atol=1e-4)
    pytest.importorskip("tenseal", reason="ckks needs tenseal: pip install secureinfer[ckks]")
    sm = secureinfer.compile(pruned.model, "ckks?packing=single&flood_bits=0",
                             calibration=digits.x_train[:256])
    client, server, _ = sm.setup()
    np.testing.assert_allclose(client.decrypt(server.evaluate(client.encrypt(x))),
                               sm.predict_clear(x), atol=sm.scheme.capabilities.tolerance)


def _two_convs(seed: int, padding: int) -> list:
    """conv1 (first: the client's im2col) -> x^2 -> conv2 (unfolded over the flat tensor)
    -> flatten -> fc1."""
    rng = np.random.default_rng(seed)
    side = 8 - 2 * (1 - padding)
    return [Conv2d("conv1", (1, 8, 8), weight=rng.normal(0, 0.3, (2, 1, 3, 3)),
                   bias=rng.normal(0, 0.1, 2), stride=(1, 1), padding=(1, 1)),
            Poly("act1", (2, 8, 8)),
            Conv2d("conv2", (2, 8, 8), weight=rng.normal(0, 0.3, (2, 2, 3, 3)),
                   bias=rng.normal(0, 0.1, 2), stride=(1, 1), padding=(padding, padding)),
            Flatten("flatten", (2, side, side)),
            Linear("fc1", (2 * side * side,), weight=rng.normal(0, 0.1, (3, 2 * side * side)),
                   bias=np.zeros(3))]


def test_an_unfolded_convolution_is_a_unit_only_when_each_weight_is_one_diagonal():
    """A second convolution runs as a matrix over the flat tensor: with ``same`` padding
    each weight sits in one diagonal (exported, and zeroing one unit skips exactly one
    diagonal); with ``valid`` padding its copies fall in several (left out)."""
    calib = np.random.default_rng(1).uniform(0, 1, (32, 1, 8, 8))
    valid = compile_layers(_two_convs(0, 0), BFV, calibration=calib)
    assert [u.layer for u in valid.scheme.pruning_units()] == ["conv1", "fc1"]
    same = compile_layers(_two_convs(0, 1), BFV, calibration=calib)
    units = {u.layer: u for u in same.scheme.pruning_units()}
    assert list(units) == ["conv1", "conv2", "fc1"]
    conv2 = units["conv2"]
    assert conv2.permutable and len(np.unique(conv2.unit_of())) == _layer(same.plan,
                                                                           "conv2")["diagonals"]
    layers = _two_convs(0, 1)
    w = layers[2].weight
    w[conv2.unit_of() == conv2.unit_of()[0, 0, 1, 1]] = 0.0
    zeroed = compile_layers(layers, BFV, calibration=calib)
    assert zeroed.plan["units_skipped"] == 1
    assert _layer(zeroed.plan, "conv2")["diagonals"] == _layer(same.plan, "conv2")["diagonals"] - 1


def test_an_all_zero_layer_costs_no_rotation_and_no_key():
    from secureinfer.plugins.bfv.layout import Bsgs, Diagonals

    empty = Diagonals(t_out=16, period=32, sigma=16, diags={})
    bsgs = Bsgs(baby=1, packed=1, region=32, giants=1)
    assert bsgs.counts(empty) == (0, 0) and bsgs.steps(empty, 32) == []


def test_galois_key_bytes_are_those_sent(mlp, digits):
    from secureinfer import codec

    sm = _compile(mlp, digits)
    _, public = sm.scheme.keygen()
    sent = sum(len(b) for b in codec.unpack_fields(public)["rotate_key"])
    assert abs(sent - sm.plan["galois_key_bytes"]) < 0.01 * sent
