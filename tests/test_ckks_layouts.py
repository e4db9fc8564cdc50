"""CKKS convolution-aware layouts (``grid``): agreement with ``clear`` and operation counts.

Every test here runs with the dense-matrix builders disabled: a convolution or a pool that
became an ``n_out x n_in`` matrix, at plan time or while the server builds its kernels or
evaluates, fails the test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tenseal", reason="ckks needs TenSEAL: pip install secureinfer[ckks]")

from secureinfer import codec
from secureinfer.errors import ConfigError, EnvelopeError
from secureinfer.layers import AvgPool2d, Conv2d, Flatten, LayerSpec, Linear, Poly
from secureinfer.model import compile_layers
from secureinfer.plugins.ckks import grid, program

TOL = 1e-2


@pytest.fixture(autouse=True)
def no_dense_conv_matrix(monkeypatch):
    def refuse(*_args, **_kw):
        raise AssertionError("a convolution or pool was turned into a dense matrix")

    monkeypatch.setattr(Conv2d, "as_matrix", refuse)
    monkeypatch.setattr(program, "_chain_matrix", refuse)


def _conv(rng, name, shape, out, k, stride=1, pad=0) -> Conv2d:
    c = shape[0]
    return Conv2d(name, shape, weight=rng.normal(0, 1 / np.sqrt(c * k * k), (out, c, k, k)),
                  bias=rng.normal(0, 0.1, out), stride=(stride, stride), padding=(pad, pad))


def _act(name, shape) -> Poly:
    return Poly(name, shape, coeffs=(0.05, 0.5, 0.3))


def _head(rng, layers: list[LayerSpec], outputs: int = 5) -> list[LayerSpec]:
    shape = layers[-1].out_shape
    n = int(np.prod(shape))
    return layers + [Flatten("flat", shape),
                     Linear("fc", (n,), weight=rng.normal(0, 1 / np.sqrt(n), (outputs, n)),
                            bias=rng.normal(0, 0.1, outputs))]


def conv_net(cin: int, size: int, cout: int, k: int, stride: int, pad: int,
             pool: bool, seed: int = 0) -> list[LayerSpec]:
    """conv -> act [-> avgpool 2] -> flatten -> linear."""
    rng = np.random.default_rng(seed)
    conv = _conv(rng, "conv", (cin, size, size), cout, k, stride, pad)
    layers: list[LayerSpec] = [conv, _act("act", conv.out_shape)]
    if pool:
        layers.append(AvgPool2d("pool", conv.out_shape, kernel=2, stride=2))
    return _head(rng, layers)


def lenet_small(seed: int = 0) -> list[LayerSpec]:
    """LeNet-shaped: conv p1, act, pool, conv, act, pool, dense."""
    rng = np.random.default_rng(seed)
    c1 = _conv(rng, "c1", (1, 12, 12), 4, 3, pad=1)
    p1 = AvgPool2d("p1", c1.out_shape)
    c2 = _conv(rng, "c2", p1.out_shape, 8, 3)
    p2 = AvgPool2d("p2", c2.out_shape)
    return _head(rng, [c1, _act("a1", c1.out_shape), p1, c2, _act("a2", c2.out_shape), p2], 3)


def _run(layers: list[LayerSpec], config: str = "ckks", n: int = 2):
    rng = np.random.default_rng(7)
    shape = layers[0].in_shape
    sm = compile_layers(layers, config, calibration=rng.random((16, *shape)))
    client, server, _ = sm.setup()
    x = rng.random((n, *shape))
    return sm, client.decrypt(server.evaluate(client.encrypt(x))), sm.reference(x)


CASES = {
    "stride1-pad1-pool": (1, 8, 3, 3, 1, 1, True),
    "stride2-nopad": (1, 9, 4, 3, 2, 0, False),
    "stride2-pad1-rgb": (3, 8, 8, 3, 2, 1, False),
    "pad2-k5": (1, 8, 2, 5, 1, 2, False),
    "64-out-channels": (2, 6, 64, 3, 1, 1, False),
    "64-in-channels": (64, 4, 4, 3, 1, 1, False),
}


@pytest.mark.parametrize("first", ["rotations", "planner"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_grid_layout_matches_clear(case: str, first: str, monkeypatch) -> None:
    """``rotations``: the first convolution in the slots (kernel-offset rotations), the
    client's im2col and shifted copies disabled; ``planner``: whatever the planner picks."""
    config = "ckks"
    if first == "rotations":
        monkeypatch.setattr(grid, "_im2col_first", lambda *_: None)
        config = "ckks?input_shifts=1"
    sm, y, ref = _run(conv_net(*CASES[case]), config)
    assert sm.plan["layout"] == "grid"
    if first == "rotations":
        assert sm.plan["grid_stages"][0]["kind"] == "conv"
    assert y.shape == ref.shape
    assert np.abs(y - ref).max() < TOL


def test_lenet_shaped_network_matches_clear(monkeypatch) -> None:
    monkeypatch.setattr(grid, "_im2col_first", lambda *_: None)
    sm, y, ref = _run(lenet_small())
    assert sm.plan["layout"] == "grid"
    kinds = [s["kind"] for s in sm.plan["grid_stages"]]
    assert kinds[:2] == ["conv", "conv"] and kinds[2].startswith("dense")
    assert np.abs(y - ref).max() < TOL


def test_pool_after_conv_and_pool_alone() -> None:
    """conv -> pool (rotate-and-add after the products) -> act -> pool alone (a mask) ->
    act -> dense."""
    rng = np.random.default_rng(3)
    conv = _conv(rng, "conv", (2, 8, 8), 3, 3, pad=1)
    p1 = AvgPool2d("p1", conv.out_shape)
    p2 = AvgPool2d("p2", p1.out_shape)
    layers = _head(rng, [conv, p1, _act("act", p1.out_shape), p2, _act("act2", p2.out_shape)])
    sm, y, ref = _run(layers)
    kinds = [s["kind"] for s in sm.plan["grid_stages"]]
    assert kinds[0] in ("conv", "im2col") and kinds[1] == "scale"
    assert sm.plan["grid_stages"][0]["pool_rotations"] == 2
    assert np.abs(y - ref).max() < TOL


def test_first_convolution_on_the_clients_shifted_copies() -> None:
    """The client sends its input rotated by each kernel offset: the first convolution
    costs products only, the result is the same as with the server's rotations."""
    layers = conv_net(1, 8, 4, 3, 1, 1, True)
    sm, y, ref = _run(layers)
    first = sm.plan["grid_stages"][0]
    assert first["kind"] == "conv" and first["client_babies"] and first["rotations"] == 0
    assert sm.plan["input_shifts"][0] == 0 and len(sm.plan["input_shifts"]) == 9
    assert sm.plan["input_ciphertexts_per_message"] == 9
    assert np.abs(y - ref).max() < TOL
    off, y_off, _ = _run(layers, "ckks?input_shifts=1")
    assert off.plan["input_shifts"] == [0] and off.plan["input_ciphertexts_per_message"] == 1
    assert off.plan["grid_stages"][0]["rotations"] > 0
    assert off.plan["rotations_per_input"] > sm.plan["rotations_per_input"]
    assert np.abs(y_off - y).max() < 2 * TOL


@pytest.mark.parametrize("stride", [1, 2])
def test_first_convolution_split_by_kernel_rows(stride: int, monkeypatch) -> None:
    """A 5x5 first convolution: the client sends 5 column shifts, the server rotates by
    the 4 other kernel rows (cheaper than 25 copies at ``COPY_COST``); same as clear."""
    monkeypatch.setattr(grid, "_im2col_first", lambda *_: None)
    sm, y, ref = _run(conv_net(1, 9, 3, 5, stride, 2, stride == 1))
    first = sm.plan["grid_stages"][0]
    assert first["client_babies"] and len(sm.plan["input_shifts"]) == 5
    assert first["baby_steps"] == 4 and first["rotations"] == first["giant_steps"] >= 4
    assert np.abs(y - ref).max() < TOL


@pytest.mark.parametrize("value", [0, 257])
def test_input_shifts_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(ConfigError, match="input_shifts"):
        compile_layers(conv_net(1, 8, 2, 3, 1, 1, False), f"ckks?input_shifts={value}")


def test_input_message_with_the_wrong_number_of_copies_is_refused() -> None:
    layers = conv_net(1, 8, 4, 3, 1, 1, True)
    rng = np.random.default_rng(7)
    sm = compile_layers(layers, "ckks", calibration=rng.random((8, 1, 8, 8)))
    client, server, _ = sm.setup()
    one = compile_layers(layers, "ckks?input_shifts=1", calibration=rng.random((8, 1, 8, 8)))
    one_client = one.setup()[0]
    fields = codec.unpack_fields(one.scheme.encrypt(one_client._enc_keys, rng.random((1, 1, 8, 8))))
    payload = codec.pack_fields(fields)
    with pytest.raises(EnvelopeError, match="expected 9 per group"):
        sm.scheme.load_input(server.ctx, payload)


def test_first_convolution_on_the_clients_im2col() -> None:
    sm, y, ref = _run(conv_net(1, 10, 4, 4, 3, 0, False), "ckks?input_shifts=1")
    assert sm.plan["grid_stages"][0]["kind"] == "im2col"
    assert "im2col" in sm.plan["input_layout"]
    assert np.abs(y - ref).max() < TOL


def _lenet5(seed: int = 0) -> list[LayerSpec]:
    rng = np.random.default_rng(seed)
    c1 = _conv(rng, "c1", (1, 28, 28), 6, 5, pad=2)
    p1 = AvgPool2d("p1", c1.out_shape)
    c2 = _conv(rng, "c2", p1.out_shape, 16, 5)
    p2 = AvgPool2d("p2", c2.out_shape)
    layers: list[LayerSpec] = [c1, _act("a1", c1.out_shape), p1, c2, _act("a2", c2.out_shape),
                               p2, Flatten("f", p2.out_shape)]
    for i, (n_in, n_out) in enumerate([(400, 120), (120, 84), (84, 10)]):
        if i:
            layers.append(_act(f"a{i + 2}", (n_in,)))
        layers.append(Linear(f"fc{i + 1}", (n_in,),
                             weight=rng.normal(0, 1 / np.sqrt(n_in), (n_out, n_in)),
                             bias=np.zeros(n_out)))
    return layers


def test_lenet5_operation_counts() -> None:
    """The plan (no keys) of LeNet-5: per-convolution products and rotations follow the
    kernel-offset x channel-difference structure; a dense conv matrix would need thousands
    of diagonals (and the fixture refuses to build one)."""
    # the layout's own counts: without the output flood (which raises the scale, so the ring)
    sm = compile_layers(_lenet5(), "ckks?flood_bits=0",
                        calibration=np.random.default_rng(1).random((8, 1, 28, 28)))
    plan = json.loads(json.dumps(sm.plan))
    assert plan["layout"] == "grid" and plan["security_bits"] == 128
    c1, c2, fc1, fc2, fc3 = plan["grid_stages"]
    assert c1["kind"] == c2["kind"] == "conv"
    # conv 1->6: the client sends the image shifted by each kernel column (5 copies), the
    # server rotates by the 4 other kernel rows; 25 products
    assert c1["plaintext_products"] <= 25 and c1["client_babies"]
    assert len(plan["input_shifts"]) == 5 and c1["rotations"] == 4
    # pool + conv 6->16: (6 + 16 - 1) channel differences x 25 taps at most
    assert c2["plaintext_products"] <= 21 * 25
    assert c2["rotations"] <= 24 + 20 + 2
    assert fc1["plaintext_products"] <= 128
    assert plan["rotations_per_input"] == sum(s["rotations"] for s in plan["grid_stages"])
    assert plan["galois_keys"] == len(plan["rotation_steps"]) <= 30
    # the pool passes and rotate-and-sums are keyed whatever the weights (a floor for
    # pruning at these layouts): two pools' column and row steps, the dense rotate-and-sums
    fixed = set(plan["fixed_rotation_steps"])
    assert fixed <= set(plan["rotation_steps"])
    pools = {s % plan["slots"] for st in sm.scheme.grid.stages
             if st is not None for p in (*st.pre, *st.post) for s in p}
    assert len(pools) >= 3 and pools <= fixed
    assert {1 << k for k in range(13)} <= fixed  # fc1, fc2, fc3: every power of two
    assert plan["estimated_memory"]["peak_one_process"] < 3 * 2 ** 30
    assert len(plan["input_gather"]) == plan["input_period"]
    assert sorted(set(plan["input_gather"]) - {-1}) == list(range(28 * 28))


def test_base_differences_a_column_apart_share_a_giant_step(monkeypatch) -> None:
    """LeNet-5's conv 6->16: channels interleaved 16 to a column, so a base difference d
    and d - 16 are one giant step, the column going to the kernel offset (baby): 16 giants
    in place of 20, 425 products in place of 525, and no rotation more: the planner takes it."""
    calib = np.random.default_rng(1).random((8, 1, 28, 28))
    sm = compile_layers(_lenet5(), "ckks?flood_bits=0", calibration=calib)
    c2 = sm.plan["grid_stages"][1]
    assert c2["folded"] and c2["plaintext_products"] <= 16 * 25 + 5 * 5
    assert c2["giant_steps"] <= 15
    original = grid._tap_key
    monkeypatch.setattr(grid, "_tap_key", lambda g, d, di, dj, rows, fold=False, merge=0:
                        original(g, d, di, dj, rows, False, 0))
    plain = compile_layers(_lenet5(), "ckks?flood_bits=0", calibration=calib)
    u2 = plain.plan["grid_stages"][1]
    assert u2["plaintext_products"] > c2["plaintext_products"]
    assert u2["rotations"] >= c2["rotations"]  # folded only where no rotation is added


def test_folded_convolution_matches_clear(monkeypatch) -> None:
    """A second convolution on interleaved channels, evaluated folded, against clear."""
    monkeypatch.setattr(grid, "_im2col_first", lambda *_: None)
    rng = np.random.default_rng(3)
    c1 = _conv(rng, "c1", (1, 12, 12), 6, 3, pad=1)
    p1 = AvgPool2d("p1", c1.out_shape)
    c2 = _conv(rng, "c2", p1.out_shape, 16, 3, pad=1)
    layers = _head(rng, [c1, _act("a1", c1.out_shape), p1, c2, _act("a2", c2.out_shape)], 4)
    # every rotation at full price (no hoisting): here the folded plan has the fewest
    sm, y, ref = _run(layers, "ckks?flood_bits=0&hoist=false")
    assert [s["folded"] for s in sm.plan["grid_stages"] if s["kind"] == "conv"][1]
    assert np.abs(y - ref).max() < TOL


def test_layout_search_is_pure() -> None:
    prog = program.build_program(lenet_small())
    before = [(type(s).__name__, getattr(s, "scale", None), getattr(s, "single", None),
               getattr(s, "_fused", None)) for s in prog.stages]
    first = grid.plan_grid(prog, 4096)
    second = grid.plan_grid(prog, 4096)
    after = [(type(s).__name__, getattr(s, "scale", None), getattr(s, "single", None),
              getattr(s, "_fused", None)) for s in prog.stages]
    assert first is not None and second is not None
    assert before == after
    assert first.steps(4096) == second.steps(4096) and first.cost == second.cost


def test_conv_after_dense_is_not_a_grid_program() -> None:
    rng = np.random.default_rng(0)
    layers = [Flatten("f", (1, 4, 4)),
              Linear("fc", (16,), weight=rng.normal(0, 0.3, (16, 16)), bias=np.zeros(16))]
    assert not grid.applicable(program.build_program(layers))


def test_client_side_reads_the_plan_only() -> None:
    """Encrypt and decrypt work with the scheme's weight-built objects gone (issue 12's
    contract: the client is rebuilt from the plan)."""
    layers = conv_net(1, 8, 3, 3, 1, 1, True)
    rng = np.random.default_rng(2)
    sm = compile_layers(layers, "ckks", calibration=rng.random((8, *layers[0].in_shape)))
    client, server, _ = sm.setup()
    sm.scheme.program = sm.scheme.grid = sm.scheme.dense = None
    x = rng.random((2, *layers[0].in_shape))
    y = client.decrypt(server.evaluate(client.encrypt(x)))
    assert np.abs(y - sm.reference(x)).max() < TOL


def _strided_pair(seed: int = 0) -> list[LayerSpec]:
    """Orion's LeNet in small: two stride-2 convolutions, 1 -> 4 -> 8 channels."""
    rng = np.random.default_rng(seed)
    c1 = _conv(rng, "c1", (1, 12, 12), 4, 3, stride=2, pad=1)
    c2 = _conv(rng, "c2", c1.out_shape, 8, 3, stride=2, pad=1)
    return _head(rng, [c1, _act("a1", c1.out_shape), c2, _act("a2", c2.out_shape)], 3)


def test_convolution_keyed_by_whole_rotations(monkeypatch) -> None:
    """conv 4 -> 8 stride 2: its output channels sit in two cosets of the input's channel
    bases (``c`` and ``c + 1``), so the two base differences of a channel pair with the
    kernel offsets ``t`` and ``t + 1`` read the input at one rotation. Keyed by the whole
    rotation, they share one plaintext: fewer products and fewer giant steps than keyed by
    (base difference, offset), and the result is the same as ``clear``'s."""
    sm, y, ref = _run(_strided_pair(), "ckks?flood_bits=0")
    c2 = sm.plan["grid_stages"][1]
    assert c2["kind"] == "conv" and c2["merged"] > 0
    assert np.abs(y - ref).max() < TOL
    monkeypatch.setattr(grid, "_merge_moduli", lambda period: [])
    plain, y_plain, _ = _run(_strided_pair(), "ckks?flood_bits=0")
    u2 = plain.plan["grid_stages"][1]
    assert u2["merged"] == 0
    assert c2["plaintext_products"] < u2["plaintext_products"]
    assert c2["rotations"] <= u2["rotations"]
    assert c2["giant_steps"] < u2["giant_steps"]
    assert np.abs(y_plain - y).max() < 2 * TOL


def test_merged_convolution_units_are_its_plaintexts() -> None:
    """Pruning units of a convolution keyed by whole rotations: one per rotation, so the
    weights of one unit zeroed, the plan runs exactly one plaintext product fewer."""
    calib = np.random.default_rng(1).random((8, 1, 12, 12))
    layers = _strided_pair()
    base = compile_layers(layers, "ckks?flood_bits=0", calibration=calib)
    c2 = base.plan["grid_stages"][1]
    assert c2["merged"] > 0
    units = next(u for u in base.scheme.pruning_units() if u.layer == "c2")
    assert units.note == "grid whole rotations" and not units.permutable
    assert len(np.unique(units.unit_of())) == c2["plaintext_products"]
    for value in np.unique(units.unit_of())[[0, -1]]:
        pruned = _strided_pair()
        pruned[2].weight[units.unit_of() == value] = 0.0
        sm = compile_layers(pruned, "ckks?flood_bits=0", calibration=calib)
        s2 = sm.plan["grid_stages"][1]
        assert s2["merged"] > 0
        assert s2["plaintext_products"] == c2["plaintext_products"] - 1
        assert s2["units_skipped"] == c2["units_skipped"] + 1
