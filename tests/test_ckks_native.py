"""The ckks plugin's native part (``plugins/ckks/_native.c``, ``native.py``): its transforms
are SEAL's, its hoisted rotations decrypt like SEAL's, its fused products equal SEAL's
``multiply_plain`` + ``add_inplace`` bit for bit, and a network evaluates the same with it
and without it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tenseal", reason="ckks needs TenSEAL: pip install secureinfer[ckks]")

from secureinfer.layers import AvgPool2d, Conv2d, Flatten, Linear, Poly
from secureinfer.model import compile_layers
from secureinfer.plugins.ckks import grid, native
from secureinfer.plugins.ckks.backend import ClientKeys, Seal, sealapi
from secureinfer.plugins.ckks.params import Params

if not native.available():  # CI builds the extension: this skip shows why it is missing
    pytest.skip(f"ckks native part unavailable: {native.why_unavailable()}",
                allow_module_level=True)

#: small rings; 60-bit primes exercise the reductions near their bounds
PARAMS = {"n4096-60bit": Params(4096, (60, 40, 40, 60), 40, 2, 0),
          "n2048-mixed": Params(2048, (30, 20, 20, 40), 20, 2, 0)}


@pytest.fixture(params=sorted(PARAMS), scope="module")
def ring(request):
    seal = Seal(PARAMS[request.param])
    steps = [1, 5, 200, -1, -37]
    keys = ClientKeys(seal, steps, False)
    return seal, keys, steps


def _at(seal, ct, level):
    out = sealapi().Ciphertext()
    seal.evaluator.mod_switch_to(ct, seal.parms_ids[level], out)
    return out


def test_transforms_are_seals(ring) -> None:
    from secureinfer.plugins.ckks import _native

    seal, keys, _ = ring
    ct = keys.encrypt(np.random.default_rng(0).random(seal.slots))
    coef = sealapi().Ciphertext()
    seal.evaluator.transform_from_ntt(ct, coef)
    ntt_form, coeff_form = native.buffer(ct), native.buffer(coef)
    for j, q in enumerate(seal.primes):
        limb = coeff_form[1, j].copy()
        table = native._table(q, seal.params.poly_modulus_degree)
        _native.ntt(limb.ctypes.data, limb.size, table.ctypes.data, False)
        assert (limb == ntt_form[1, j]).all()
        _native.ntt(limb.ctypes.data, limb.size, table.ctypes.data, True)
        assert (limb == coeff_form[1, j]).all()


def test_hoisted_rotations_decrypt_like_seals(ring) -> None:
    seal, keys, steps = ring
    values = np.random.default_rng(1).random(seal.slots) - 0.5
    nat = native.Native(seal, keys.galois, steps)
    for level in range(seal.top, 0, -1):
        ct = _at(seal, keys.encrypt(values), level)
        split = nat.split(ct)
        for step in steps:
            ref = sealapi().Ciphertext()
            seal.evaluator.rotate_vector(ct, step, keys.galois, ref)
            expected = np.roll(values, -step)
            got = np.abs(keys.decrypt(nat.rotate(split, step)) - expected).max()
            seals = np.abs(keys.decrypt(ref) - expected).max()
            # SEAL's own noise level (a wrong digit or key limb would be ~0.5)
            assert got < max(3 * seals, 1e-6) and got < 1e-2, (level, step, got, seals)
        # the input is untouched
        assert np.abs(keys.decrypt(ct) - values).max() < 1e-2


def test_a_step_without_its_key_is_refused(ring) -> None:
    seal, keys, steps = ring
    nat = native.Native(seal, keys.galois, steps[:2])
    split = nat.split(keys.encrypt(np.zeros(seal.slots)))
    with pytest.raises(KeyError, match="no Galois key for step 200"):
        nat.rotate(split, 200)
    with pytest.raises(KeyError, match="no Galois key for step 3"):
        native.Native(seal, keys.galois, [3])


@pytest.mark.parametrize("terms", [1, 7, 300])
def test_fused_products_equal_seals_bit_for_bit(ring, terms: int) -> None:
    """300 terms cross the 128-product reduction chunk (60-bit primes: 2^120 each)."""
    seal, keys, _ = ring
    rng = np.random.default_rng(terms)
    level = seal.top
    cts = [keys.encrypt(rng.random(seal.slots) - 0.5) for _ in range(min(terms, 9))]
    cts = [cts[t % len(cts)] for t in range(terms)]
    scale = 2.0 ** 18
    pts = [seal.encode(rng.random(seal.slots) - 0.5, level, scale) for _ in range(terms)]
    ev = seal.evaluator
    want = sealapi().Ciphertext()
    ev.multiply_plain(cts[0], pts[0], want)
    prod = sealapi().Ciphertext()
    for ct, pt in zip(cts[1:], pts[1:]):
        ev.multiply_plain(ct, pt, prod)
        ev.add_inplace(want, prod)
    nat = native.Native(seal)
    prods = nat.products(pts, level + 1)
    got = nat.dot(cts, prods)
    assert (native.buffer(got) == native.buffer(want)).all()
    assert got.scale == want.scale
    # into an accumulator, in place: acc + sum = 2 * sum
    acc = nat.dot(cts, prods)
    same = nat.dot(cts, prods, acc)
    assert same is acc
    ev.add_inplace(want, want)
    assert (native.buffer(acc) == native.buffer(want)).all()


def test_several_sums_over_one_pool_equal_seals_bit_for_bit(ring) -> None:
    """``Native.run``: three sums sharing some ciphertexts, one term repeated, in one pass."""
    seal, keys, _ = ring
    rng = np.random.default_rng(5)
    level = seal.top - 1
    pool = {k: _at(seal, keys.encrypt(rng.random(seal.slots) - 0.5), level) for k in "abcd"}
    enc = lambda: seal.encode(rng.random(seal.slots) - 0.5, level, 2.0 ** 18)  # noqa: E731
    terms = {7: [("a", enc()), ("b", enc())], 3: [("c", enc())],
             9: [("d", enc()), ("a", enc()), ("d", enc())]}
    nat = native.Native(seal)
    sums = nat.sums(list(terms), list(terms.values()), level + 1)
    got = nat.run(sums, pool)
    assert sorted(got) == [3, 7, 9]
    ev = seal.evaluator
    for label, t in terms.items():
        want = sealapi().Ciphertext()
        ev.multiply_plain(pool[t[0][0]], t[0][1], want)
        for key, pt in t[1:]:
            prod = sealapi().Ciphertext()
            ev.multiply_plain(pool[key], pt, prod)
            ev.add_inplace(want, prod)
        assert (native.buffer(got[label]) == native.buffer(want)).all()
        assert got[label].scale == want.scale


def test_mismatched_sums_are_refused(ring) -> None:
    seal, keys, _ = ring
    ct = keys.encrypt(np.zeros(seal.slots))
    low = _at(seal, ct, seal.top - 1)
    pts = [seal.encode(0.5, seal.top, 2.0 ** 10) for _ in range(2)]
    nat = native.Native(seal)
    prods = nat.products(pts, seal.top + 1)
    with pytest.raises(ValueError, match="differ in level or scale"):
        nat.dot([ct, low], prods)
    with pytest.raises(ValueError, match="2 plaintexts"):
        nat.dot([ct], prods)
    sums = nat.sums(["x"], [[("hi", pts[0]), ("lo", pts[1])]], seal.top + 1)
    with pytest.raises(ValueError, match="differ in level or scale"):
        nat.run(sums, {"hi": ct, "lo": low})
    with pytest.raises(ValueError, match="at least one term"):
        nat.sums(["x", "y"], [[("hi", pts[0])], []], seal.top + 1)


def test_self_test_can_be_switched_off(monkeypatch) -> None:
    monkeypatch.setattr(native, "_status", {})
    monkeypatch.setenv("SECUREINFER_CKKS_NATIVE", "0")
    assert not native.available()
    assert "SECUREINFER_CKKS_NATIVE=0" in native.why_unavailable()


def _lenet_small(seed: int = 0):
    rng = np.random.default_rng(seed)

    def conv(name, shape, out, k, pad=0):
        c = shape[0]
        return Conv2d(name, shape, weight=rng.normal(0, 1 / np.sqrt(c * k * k), (out, c, k, k)),
                      bias=rng.normal(0, 0.1, out), padding=(pad, pad))

    c1 = conv("c1", (1, 12, 12), 4, 3, pad=1)
    a1 = Poly("a1", c1.out_shape, coeffs=(0.05, 0.5, 0.3))
    p1 = AvgPool2d("p1", c1.out_shape)
    c2 = conv("c2", p1.out_shape, 8, 3)
    a2 = Poly("a2", c2.out_shape, coeffs=(0.05, 0.5, 0.3))
    p2 = AvgPool2d("p2", c2.out_shape)
    n = int(np.prod(p2.out_shape))
    return [c1, a1, p1, c2, a2, p2, Flatten("flat", p2.out_shape),
            Linear("fc", (n,), weight=rng.normal(0, 1 / np.sqrt(n), (3, n)),
                   bias=rng.normal(0, 0.1, 3))]


def _evaluate(config: str, x: np.ndarray):
    layers = _lenet_small()
    sm = compile_layers(layers, config,
                        calibration=np.random.default_rng(7).random((16, *layers[0].in_shape)))
    client, server, _ = sm.setup()
    return sm, client.decrypt(server.evaluate(client.encrypt(x))), sm.reference(x)


def test_network_evaluates_the_same_with_and_without_the_native_part(monkeypatch) -> None:
    """A hoisted plan (babies grouped by parent, the same Galois keys as the chained one)
    on the native part, on SEAL alone (``SECUREINFER_CKKS_NATIVE=0``), and the chained plan
    (``hoist=false``): all three agree with ``clear``, and the hoisted plan really splits
    parents with several babies."""
    monkeypatch.setattr(grid, "_im2col_first", lambda *_: None)  # babies on the server
    x = np.random.default_rng(3).random((2, 1, 12, 12))
    sm, y_native, ref = _evaluate("ckks?flood_bits=0&input_shifts=1", x)
    stages = [rp for rp in sm.scheme.grid.stages if rp is not None and rp.hoisted]
    assert stages, "no stage was hoisted"
    parents = [p for rp in stages for _, p, _ in rp.baby_tree()]
    assert max(parents.count(p) for p in set(parents)) >= 2
    calls = {"split": 0}
    real_split = native.Native.split

    def counting_split(self, ct):
        calls["split"] += 1
        return real_split(self, ct)

    monkeypatch.setattr(native.Native, "split", counting_split)
    _, y_again, _ = _evaluate("ckks?flood_bits=0&input_shifts=1", x)
    assert calls["split"] > 0
    chained, y_chained, _ = _evaluate("ckks?flood_bits=0&input_shifts=1&hoist=false", x)
    assert set(sm.plan["rotation_steps"]) <= set(chained.plan["rotation_steps"])
    assert chained.plan["rotations_per_input"] == sm.plan["rotations_per_input"]
    monkeypatch.setattr(native, "_status", {})
    monkeypatch.setenv("SECUREINFER_CKKS_NATIVE", "0")
    calls["split"] = 0
    _, y_seal, _ = _evaluate("ckks?flood_bits=0&input_shifts=1", x)
    assert calls["split"] == 0
    for y in (y_native, y_again, y_chained, y_seal):
        assert np.abs(y - ref).max() < 1e-2
    assert np.abs(y_native - y_seal).max() < 1e-3


def test_threads_agree_with_one_thread_and_refuse_workers(monkeypatch) -> None:
    """``threads=2``: every rotation (hoisted babies, giant steps, passes) and every sum
    on two threads, the same result; combined with forked ``workers`` it is refused."""
    from secureinfer.errors import ConfigError

    monkeypatch.setattr(grid, "_im2col_first", lambda *_: None)
    x = np.random.default_rng(4).random((2, 1, 12, 12))
    sm, y1, ref = _evaluate("ckks?flood_bits=0&input_shifts=1", x)
    calls = {"rotate_one": 0}
    real = native.Native.rotate_one

    def counting(self, ct, step):
        calls["rotate_one"] += 1
        return real(self, ct, step)

    monkeypatch.setattr(native.Native, "rotate_one", counting)
    monkeypatch.setattr(native, "FAST_SINGLE_DEGREE", 0)  # this small ring too
    threaded, y2, _ = _evaluate("ckks?flood_bits=0&input_shifts=1&threads=2", x)
    assert threaded.plan["rotation_steps"] == sm.plan["rotation_steps"]
    assert calls["rotate_one"] > 0  # giant steps and passes went native too
    assert np.abs(y2 - ref).max() < 1e-2 and np.abs(y2 - y1).max() < 1e-3
    with pytest.raises(ConfigError, match="cannot be combined"):
        _evaluate("ckks?threads=2&workers=2", x)
    with pytest.raises(ConfigError, match="threads=0"):
        _evaluate("ckks?threads=0", x)
