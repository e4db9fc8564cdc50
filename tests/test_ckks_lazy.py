"""Lazy rescaling in ``ckks``: a square leaves its rescale to the affine stage after it.

The pair then divides by one prime of twice the scale's bits, so the chain has one prime
fewer per square and every rotation and product after it is cheaper. These tests check the
chain, the exact scale schedule, the results against ``clear``, the operation counts of a
real evaluation, and when the planner keeps the eager chain.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tenseal", reason="ckks needs TenSEAL: pip install secureinfer[ckks]")

from secureinfer.errors import ConfigError
from secureinfer.layers import AvgPool2d, Conv2d, Flatten, Linear, Poly
from secureinfer.model import compile_layers
from secureinfer.plugins.ckks import params as ckks_params
from secureinfer.plugins.ckks.backend import sealapi
from secureinfer.plugins.ckks.layers import schedule
from secureinfer.plugins.ckks.program import Affine, Polynomial, build_program

TOL = 1e-2


def lenet_like(seed: int = 0) -> list:
    """conv (stride 1, pad 1) -> square -> avg-pool -> conv 2->4 (stride 2) -> a x^2 + b x + c
    -> flatten -> linear -> square -> linear: three squares, each before an affine stage."""
    rng = np.random.default_rng(seed)
    c1 = Conv2d("c1", (1, 8, 8), weight=rng.normal(0, 0.3, (2, 1, 3, 3)),
                bias=rng.normal(0, 0.1, 2), padding=(1, 1))
    pool = AvgPool2d("pool", c1.out_shape, kernel=2, stride=2)
    c2 = Conv2d("c2", pool.out_shape, weight=rng.normal(0, 0.3, (4, 2, 3, 3)),
                bias=rng.normal(0, 0.1, 4), stride=(2, 2), padding=(1, 1))
    n = int(np.prod(c2.out_shape))
    return [c1, Poly("sq1", c1.out_shape), pool, c2,
            Poly("act2", c2.out_shape, coeffs=(0.1, 0.4, -0.5)), Flatten("flat", c2.out_shape),
            Linear("fc1", (n,), weight=rng.normal(0, 1 / np.sqrt(n), (6, n)),
                   bias=rng.normal(0, 0.1, 6)),
            Poly("sq3", (6,)),
            Linear("fc2", (6,), weight=rng.normal(0, 0.4, (3, 6)), bias=rng.normal(0, 0.1, 3))]


def _calib(layers: list, n: int = 16, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *layers[0].in_shape))


def _compiled(config: str, layers: list | None = None):
    layers = layers or lenet_like()
    return compile_layers(layers, config, calibration=_calib(layers))


@pytest.fixture(scope="module")
def pair():
    """The same network lazy and eager, both on N=16384 so the layouts are identical."""
    base = "ckks?flood_bits=0&poly_modulus_degree=16384"
    return _compiled(base), _compiled(base + "&lazy_rescale=off")


def test_lazy_chain_has_one_prime_fewer_per_square(pair) -> None:
    lazy, eager = pair
    lp, ep = lazy.plan, eager.plan
    assert lp["lazy_squares"] == 3 and ep["lazy_squares"] == 0
    assert len(lp["coeff_mod_bits"]) == len(ep["coeff_mod_bits"]) - 3
    assert lp["depth_needed"] == ep["depth_needed"] - 3
    scale = lp["scale_bits"]
    assert sorted(lp["coeff_mod_bits"][1:-1]) == [scale] + [2 * scale] * 3
    # the special prime stays above every data prime (key-switching noise ~ q_max / P)
    assert lp["coeff_mod_bits"][-1] >= 2 * scale + ckks_params.SPECIAL_MARGIN_BITS
    assert lp["security_bits"] == 128
    assert [s["stage"] for s in lp["stages"] if "lazy" in s["stage"]] == [
        "poly[sq1] degree 2 (folded, lazy rescale)",
        "poly[act2] degree 2 (folded, lazy rescale)",
        "poly[sq3] degree 2 (folded, lazy rescale)"]
    # same layouts, same rotations; keys are smaller (fewer primes in each)
    assert lp["rotations_per_input"] == ep["rotations_per_input"]
    assert lp["galois_keys"] == ep["galois_keys"]
    assert lp["galois_key_bytes"] < 0.6 * ep["galois_key_bytes"]
    assert lp["estimated_memory"]["peak_one_process"] \
        < ep["estimated_memory"]["peak_one_process"]


def test_lazy_and_eager_agree_with_clear(pair) -> None:
    x = _calib(pair[0].layers, 4, seed=11)
    ref = pair[0].reference(x)
    for sm in pair:
        client, server, _ = sm.setup()
        y = client.decrypt(server.evaluate(client.encrypt(x)))
        assert np.abs(y - ref).max() < TOL, sm.plan["lazy_squares"]
        assert (y.argmax(1) == ref.argmax(1)).all()


def test_lazy_squares_are_not_rescaled_in_a_real_run(pair, monkeypatch) -> None:
    """A real evaluation rescales once per level: the squares' rescales are gone."""
    lazy, eager = pair
    counts = {}
    for sm in pair:
        client, server, _ = sm.setup()
        msg = client.encrypt(_calib(sm.layers, 1, seed=3))
        calls = []
        ev = server.ctx.seal.evaluator
        original = type(ev).rescale_to_next_inplace

        def counted(self, ct, *a, _orig=original, _calls=calls):
            _calls.append(1)
            return _orig(self, ct, *a)

        monkeypatch.setattr(type(ev), "rescale_to_next_inplace", counted)
        out = server.evaluate(msg)
        monkeypatch.setattr(type(ev), "rescale_to_next_inplace", original)
        counts[sm.plan["lazy_squares"]] = len(calls)
        client.decrypt(out)  # the output lands on the level the client expects
    assert counts[0] == eager.plan["depth_needed"]
    assert counts[3] == lazy.plan["depth_needed"] == counts[0] - 3


def test_schedule_is_exact_and_keeps_the_weights_precision() -> None:
    """Each lazy square stays on its level at scale^2; the affine stage after it encodes its
    weights at about 2^scale_bits (not fewer bits), and every stage lands on its scale."""
    layers = lenet_like()
    program = build_program(layers).with_lazy_squares()
    assert program is not None and program.lazy_squares == 3
    scale_bits = 25
    sizes = program.level_bits(scale_bits)
    api = sealapi()
    primes = [q.value() for q in api.CoeffModulus.Create(16384, [35, *sizes[::-1], 55])][:-1]
    steps = schedule(program, primes, scale_bits)
    delta = 2.0 ** scale_bits
    for k, (stage, step) in enumerate(zip(program.stages, steps)):
        if isinstance(stage, Polynomial):
            assert stage.lazy and step.level_out == step.level_in
            assert step.scale_out == pytest.approx(step.scale_in ** 2)
        elif not stage.is_noop:
            assert step.level_out == step.level_in - 1
            assert abs(np.log2(step.plain_scale) - scale_bits) < 1.5  # weights at ~Delta
            nxt = program.stages[k + 1] if k + 1 < len(program.stages) else None
            if isinstance(nxt, Polynomial) or nxt is None:
                assert step.scale_out == pytest.approx(delta)
    assert steps[-1].level_out == 0


def test_build_program_is_not_changed_by_the_lazy_copy() -> None:
    program = build_program(lenet_like())
    before = [(type(s).__name__, s.depth) for s in program.stages]
    lazy = program.with_lazy_squares()
    assert [(type(s).__name__, s.depth) for s in program.stages] == before
    assert lazy is not None and lazy.depth == program.depth - 3
    # a square with no affine stage after it (the network's last layer) stays eager
    last = build_program(lenet_like()[:5])
    assert isinstance(last.stages[-1], Polynomial)
    assert last.with_lazy_squares() is not None
    assert not last.with_lazy_squares().stages[-1].lazy
    assert isinstance(last.stages[-2], Affine)


def test_auto_never_grows_the_ring() -> None:
    """``auto`` goes lazy only on the ring degree the eager chain needs: lazy chains carry a
    wider special prime, so a network that just fits a ring eagerly stays eager there."""
    layers = lenet_like()
    lazy_levels = build_program(layers).with_lazy_squares().level_bits
    outcomes = set()
    for scale in range(18, 25):
        eager = _compiled(f"ckks?flood_bits=0&lazy_rescale=off&scale_bits={scale}", layers)
        auto = _compiled(f"ckks?flood_bits=0&scale_bits={scale}", layers)
        degree = eager.plan["poly_modulus_degree"]
        assert auto.plan["poly_modulus_degree"] == degree
        headroom = eager.plan["coeff_mod_bits"][0] - scale
        chain = ckks_params._chain(scale, headroom, lazy_levels(scale))
        fits = sum(chain) <= ckks_params.MAX_BITS_128[degree]
        assert (auto.plan["lazy_squares"] == 3) == fits, (scale, chain)
        if fits:
            assert auto.plan["coeff_mod_bits"] == chain
        outcomes.add(fits)
    assert outcomes == {True, False}  # both sides of the rule were exercised


def test_wide_scales_and_flooded_plans_stay_eager() -> None:
    layers = lenet_like()
    # 2 x 30 bits + the special prime's margin exceeds SEAL's 60-bit primes
    wide = _compiled("ckks?flood_bits=0&scale_bits=30&poly_modulus_degree=16384", layers)
    assert wide.plan["lazy_squares"] == 0
    assert max(wide.plan["coeff_mod_bits"]) <= ckks_params.MAX_PRIME_BITS
    x = _calib(layers, 2, seed=4)
    client, server, _ = wide.setup()
    np.testing.assert_allclose(client.decrypt(server.evaluate(client.encrypt(x))),
                               wide.reference(x), atol=TOL)
    flooded = _compiled("ckks?flood_bits=8&poly_modulus_degree=16384", layers)
    assert flooded.plan["lazy_squares"] == 0 and flooded.plan["flood_bits"] == 8


def test_batch_packing_is_lazy_too() -> None:
    rng = np.random.default_rng(2)
    layers = [Linear("fc1", (6,), weight=rng.normal(0, 0.4, (5, 6)), bias=rng.normal(0, 0.1, 5)),
              Poly("sq", (5,)),
              Linear("fc2", (5,), weight=rng.normal(0, 0.4, (2, 5)), bias=rng.normal(0, 0.1, 2))]
    sm = _compiled("ckks?flood_bits=0&packing=batch&poly_modulus_degree=8192", layers)
    assert sm.plan["lazy_squares"] == 1 and sm.plan["depth_needed"] == 2
    x = _calib(layers, 40, seed=8)
    client, server, _ = sm.setup()
    np.testing.assert_allclose(client.decrypt(server.evaluate(client.encrypt(x))),
                               sm.reference(x), atol=TOL)


def test_lazy_rescale_option_is_checked() -> None:
    with pytest.raises(ConfigError, match="lazy_rescale"):
        _compiled("ckks?lazy_rescale=sometimes")
