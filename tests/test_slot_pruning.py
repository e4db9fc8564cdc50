"""Pruning in the units of the compiled ckks plan (``SlotUnits``): the diagonals the plan
evaluates, runs of them kept, output units permuted to crowd the weights into them."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import secureinfer  # noqa: E402
from secureinfer import nn as snn  # noqa: E402
from secureinfer.nn.slot_pruning import slot_layers  # noqa: E402

from test_skip_zero_units import _run_counted  # noqa: E402

# the im2col first stage (hoisted rotations price conv1's 2 babies below the im2col's 1)
CKKS = "ckks?packing=single&flood_bits=0&input_shifts=1&hoist=false"


@pytest.fixture(scope="module")
def ckks_ready():
    pytest.importorskip("tenseal", reason="ckks needs tenseal: pip install secureinfer[ckks]")


@pytest.fixture(scope="module")
def cnn(toolkit_model):
    return toolkit_model("cnn")


@pytest.fixture(scope="module")
def pruned(cnn, digits, ckks_ready):
    return snn.prune(cnn, CKKS, sparsity=0.75, max_drop=100.0, data=digits, steps=2,
                     epochs=2)


def _units(model, digits):
    sm = secureinfer.compile(model, CKKS, calibration=digits.x_train[:256])
    return sm, sm.scheme.pruning_units()


def test_units_come_from_the_plan(cnn, digits, ckks_ready):
    sm, units = _units(cnn, digits)
    assert [u.layer for u in units] == ["conv1", "fc1", "fc2"]
    conv, fc1, fc2 = units
    assert conv.note == "im2col" and conv.permutable and fc1.permutable and not fc2.permutable
    assert len(np.unique(conv.unit_of())) == 4  # one diagonal per channel-tap shift
    # fc1 runs in the block layout the plan compiled: one unit per input alignment, each
    # a window of 128 consecutive diagonals of the grid's 256-slot period
    stage = sm.scheme.grid.stages[2]
    assert stage.name == "dense-block" and fc1.note == "block alignments"
    assert set(np.unique(fc1.unit_of()).tolist()) == {g + b for g, b in stage.keys}
    # fc2 reads fc1's block output (row r at slot 128 r): diagonal (pos(c) - pos(r)) mod 16
    assert fc2.width == 16 and fc2.slots[3] == 3 * 128
    assert fc2.unit_of()[5, 3] == (3 * 128 - 5) % 16


def test_without_block_layouts_every_dense_layer_is_in_diagonals(cnn, digits, ckks_ready):
    """``block_layouts=false``: the plan keeps fc1 in hybrid diagonals, so its units are
    single diagonals (prune under it, then compile the pruned model either way)."""
    sm = secureinfer.compile(cnn, CKKS + "&block_layouts=false",
                             calibration=digits.x_train[:256])
    assert "dense-block" not in [rp.name for rp in sm.scheme.grid.stages if rp is not None]
    fc1 = next(u for u in sm.scheme.pruning_units() if u.layer == "fc1")
    assert fc1.note == "hybrid diagonals" and fc1.groups is None
    # fc1 reads the im2col output: 4 channel blocks of 64 slots (6x6 used): the diagonal
    # of an entry is its slot minus its row's slot, modulo min(m', d') = 32
    assert fc1.width == 32 and fc1.slots[36] == 64 and fc1.unit_of()[3, 36] == (64 - 3) % 32


def test_zeroing_one_exported_unit_skips_exactly_one_more_plaintext(cnn, digits, ckks_ready):
    """The units are the compiled plan's: the weights of one exported unit zeroed (a
    diagonal, a block alignment), the plan runs exactly one plaintext product fewer and
    counts one more unit skipped."""
    import copy

    base, units = _units(cnn, digits)
    for u in units:
        values = np.unique(u.unit_of())
        model = copy.deepcopy(cnn)
        weight = dict(model.named_modules())[u.layer].weight
        with torch.no_grad():
            weight[torch.as_tensor(u.unit_of() == values[-1])] = 0.0
        sm = secureinfer.compile(model, CKKS, calibration=digits.x_train[:256])
        assert sm.plan["plaintext_products"] == base.plan["plaintext_products"] - 1, u.layer
        assert sm.plan["units_skipped"] == base.plan["units_skipped"] + 1, u.layer


def test_permuting_units_keeps_the_function(cnn, digits, ckks_ready):
    import copy

    model = copy.deepcopy(cnn)
    layers = slot_layers(model, _units(model, digits)[1])
    x = torch.tensor(digits.x_test[:16])
    with torch.no_grad():
        before = model(x)
        for layer in layers:
            if layer.units.permutable:
                n = layer.module.weight.shape[0]
                layer._permute(torch.as_tensor(np.random.default_rng(n).permutation(n)))
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert not torch.equal(model.fc1.weight, cnn.fc1.weight)


def test_pruned_diagonals_are_skipped_in_a_real_run(cnn, pruned, digits, ckks_ready):
    meta = pruned.meta
    assert meta["units_from"] == "plan" and meta["pruned"] > 0
    base = secureinfer.compile(cnn, CKKS, calibration=digits.x_train[:256])
    sm = secureinfer.compile(pruned.model, CKKS, calibration=digits.x_train[:256])
    assert sm.plan["units_skipped"] >= meta["pruned"] // 2
    for key in ("rotations_per_input", "plaintext_products", "galois_keys"):
        assert sm.plan[key] < base.plan[key], key
    assert sm.plan["galois_keys"] == len(sm.plan["rotation_steps"])
    x = digits.x_test[:2]
    out, counter = _run_counted(sm, x)
    assert counter.rotations == sm.plan["rotations_per_input"] * len(x)
    assert counter.products <= sm.plan["plaintext_products"] * len(x)
    _, counter_base = _run_counted(base, x)
    assert counter.rotations < counter_base.rotations
    np.testing.assert_allclose(out, sm.predict_clear(x), atol=sm.scheme.capabilities.tolerance)


def test_every_zeroed_weight_is_a_whole_diagonal(pruned, digits, ckks_ready):
    _, units = _units(pruned.model, digits)
    model = pruned.model
    for u in units:
        w = dict(model.named_modules())[u.layer].weight.detach().numpy()
        diag = u.unit_of()
        for v in np.unique(diag):
            live = w[diag == v] != 0
            assert live.all() or not live.any(), (u.layer, v)  # no diagonal half pruned


def test_budget_zero_changes_nothing_under_ckks(cnn, digits, ckks_ready):
    result = snn.prune(cnn, CKKS, sparsity=0.75, max_drop=0.0, data=digits, epochs=1)
    for (k, a), b in zip(cnn.state_dict().items(), result.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert result.meta["pruned"] == 0


def test_model_pruned_for_ckks_runs_under_clear_and_fe_ip(pruned, digits):
    x = digits.x_test[:3]
    clear = secureinfer.compile(pruned.model, "clear")
    with torch.no_grad():
        np.testing.assert_allclose(clear.predict_clear(x),
                                   pruned.model(torch.tensor(x)).double().numpy(), atol=1e-4)
    pytest.importorskip("pymcl", reason="fe-ip needs pymcl: pip install secureinfer[fe]")
    sm = secureinfer.compile(pruned.model, "fe-ip", calibration=digits.x_train[:256])
    client, server, _ = sm.setup()
    np.testing.assert_array_equal(server.infer(client.encrypt(x)), sm.reference(x))


def test_kernel_offsets_are_kept_where_the_plan_has_their_keys():
    """One rotation per kernel offset (a grid convolution): with a heavier offset whose
    step no kept unit or free key reaches, the choice keeps the keyed ones first, and
    every kept step is reached from 0 or another kept step by one free step."""
    from secureinfer.nn.slot_pruning import _keyed_choice, _new_keys

    width, free = 1024, frozenset({8, 224})
    values = np.array([0, 8, 16, 200, 224, 232, 1016])  # 1016 = -8: a key of its own
    energy = np.array([1.0, 2.0, 3.0, 9.0, 4.0, 5.0, 8.0])
    kept = _keyed_choice(values, energy, 5, width, free)
    assert sorted(values[kept].tolist()) == [0, 8, 16, 224, 232]
    assert _new_keys(values[kept].tolist(), width, free) == 0
    # more units than the keyed ones: the rest by weight, at the fewest new keys
    kept = _keyed_choice(values, energy, 6, width, free)
    assert 200 in values[kept].tolist() and _new_keys([200], width, free) == 1


def test_power_of_two_baby_steps_win_ties():
    """A run of 56 diagonals costs 13 rotations with baby steps of 7 or of 8; 8 is chosen
    (its giant steps are multiples of 8, keyed by the rotate-and-sums anyway)."""
    from secureinfer.plugins.ckks.search import _best_baby

    assert _best_baby(list(range(56))) == 8


def test_negative_weight_decay_is_refused(cnn, digits):
    with pytest.raises(secureinfer.SecureInferError, match="weight_decay"):
        snn.prune(cnn, unit="diagonals", weight_decay=-1.0, data=digits)


def test_a_diagonal_that_encodes_to_zero_is_left_out(cnn, digits, ckks_ready):
    """One tiny weight in a diagonal passes the slot check (value x scale >= 1/2) but its
    encoding rounds to the zero polynomial, whose product SEAL refuses (transparent
    ciphertext): the kernel leaves it out; a normal diagonal is kept."""
    from secureinfer.plugins.ckks.backend import Seal
    from secureinfer.plugins.ckks.layers import _encode_factor

    sm = secureinfer.compile(cnn, CKKS, calibration=digits.x_train[:256])
    seal = Seal(sm.scheme.params)
    scale = 2.0 ** 20
    tiny = np.zeros(seal.slots)
    tiny[3] = 0.6 / scale
    assert _encode_factor(seal, tiny, seal.top, scale) is None
    tiny[3] = 1.0
    assert _encode_factor(seal, tiny, seal.top, scale) is not None
