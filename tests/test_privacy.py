"""Output privacy of HE schemes (issue 15, 4): CKKS noise flooding, BFV re-randomization,
slot masking and noise flooding, and who gets them by default.

The tests decrypt the raw outputs (every slot, not only the result's, and SEAL's measured
noise budget) with the client's secret key: with flooding, the noise has the size the plan
states, whatever the computation; without, it is the evaluation's own. Results still agree
with the reference. By default outputs are protected when the model is compiled for
deployment and not in one process, and an artifact never ships them unprotected unless the
config says so.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from secureinfer import codec, load_client, load_server, privacy
from secureinfer.errors import ArtifactError, CompileError, ConfigError, EnvelopeError
from secureinfer.model import compile_layers
from secureinfer.registry import get_registry
from secureinfer.testing.networks import NETWORKS, inputs


def _need(name: str) -> None:
    reason = get_registry().get(name).availability()
    if reason:
        pytest.skip(f"{name} not available: {reason}")


def _compile(config: str, network: str = "mlp_square", deploy: bool = False):
    layers = NETWORKS[network](np.random.default_rng(0))
    return compile_layers(layers, config, calibration=inputs(layers, 64, seed=2),
                          deploy=deploy)


def _raw_slots(sm, keys, output: bytes) -> np.ndarray:
    """Every decrypted slot of every output ciphertext (real parts)."""
    scheme = sm.scheme
    _, blobs = scheme._parse(codec.open_envelope(output).payload, "output")
    level = keys.seal.top - sm.plan["output_drop"]
    return np.concatenate([keys.decrypt(keys.seal.load_ciphertext(b, level, "output"))
                           for b in blobs])


@pytest.fixture(scope="module")
def flooded():
    _need("ckks")
    sm = _compile("ckks", deploy=True)  # flooding is the default for a deployed model
    client, server, _ = sm.setup()
    x = inputs(sm.layers, 64, seed=2)[:2]
    message = client.encrypt(x)
    return sm, client, server, x, message, server.evaluate(message), server.evaluate(message)


def test_ckks_floods_by_default_when_deployed_and_says_so(flooded):
    sm = flooded[0]
    assert sm.plan["flood_bits"] == 16 and sm.plan["public_key"]
    assert sm.plan["output_privacy_by"] == privacy.BY_DEPLOY
    assert sm.plan["flood_statistical_security_bits"] == 16
    assert "estimated slot-error bound" in sm.plan["flood_measured_against"]
    assert "2^-16" in sm.plan["output_privacy"]
    assert "estimated error bound" in sm.plan["output_privacy"]
    assert "compiled for deployment" in sm.summary()


def test_ckks_flood_has_the_planned_spread(flooded):
    sm, client, _, _, _, out1, out2 = flooded
    keys = client.keys.secret
    diff = _raw_slots(sm, keys, out1) - _raw_slots(sm, keys, out2)
    sigma = sm.plan["flood_slot_sigma"]
    assert sigma > 1e3 * sm.plan["error_before_flood"]  # it covers the noise by far
    measured = float(np.std(diff)) / np.sqrt(2)  # two independent floods
    assert 0.9 * sigma < measured < 1.1 * sigma, (measured, sigma)
    # Gaussian, not a few values: about 68% within one sigma of each flood's difference
    inside = float(np.mean(np.abs(diff) < np.sqrt(2) * sigma))
    assert 0.64 < inside < 0.72, inside


def test_ckks_slots_beside_the_result_hold_only_the_flood(flooded):
    sm, client, _, _, _, out1, _ = flooded
    raw = _raw_slots(sm, client.keys.secret, out1)
    slots = client.keys.secret.seal.slots
    beside = np.ones(len(raw), bool)
    for i in range(len(raw) // slots):
        beside[i * slots + np.asarray(sm.plan["output_positions"])] = False
    sigma = sm.plan["flood_slot_sigma"]
    assert abs(float(np.mean(raw[beside]))) < 0.05 * sigma
    assert 0.9 * sigma < float(np.std(raw[beside])) < 1.1 * sigma
    # unmasked, the same slots hold the last layers' other values (what the mask removes)
    plain = _compile("ckks?flood_bits=0")
    c, s, _ = plain.setup()
    out = s.evaluate(c.encrypt(flooded[3]))
    raw = _raw_slots(plain, c.keys.secret, out)[:slots]
    others = np.delete(raw, plain.plan["output_positions"])
    assert np.abs(others).max() > 100 * sigma


def test_ckks_flooded_results_agree_with_reference(flooded):
    sm, client, _, x, _, out1, out2 = flooded
    want = sm.reference(x)
    for out in (out1, out2):
        np.testing.assert_allclose(client.decrypt(out), want, rtol=0,
                                   atol=sm.scheme.capabilities.tolerance)
    assert out1 != out2  # the ciphertext itself is fresh each time


def test_ckks_without_flood_is_deterministic():
    _need("ckks")
    sm = _compile("ckks?flood_bits=0")
    client, server, _ = sm.setup()
    message = client.encrypt(inputs(sm.layers, 64, seed=2)[:2])
    out1, out2 = server.evaluate(message), server.evaluate(message)
    assert out1 == out2 and sm.plan["flood_bits"] == 0 and not sm.plan["public_key"]
    assert "not flooded" in sm.plan["output_privacy"]


def test_ckks_flood_the_chain_cannot_carry_is_refused():
    _need("ckks")
    with pytest.raises(CompileError, match=r"carries at most flood_bits=\d+"):
        _compile("ckks?flood_bits=40")
    with pytest.raises(CompileError, match="flood_bits=30 adds noise"):
        _compile("ckks?flood_bits=30&scale_bits=40")


def test_ckks_flooding_server_needs_the_public_key(flooded):
    sm, client = flooded[0], flooded[1]
    fields = codec.unpack_fields(codec.open_envelope(client.public_keys()).payload)
    fields["public"] = b""
    stripped = codec.seal(codec.Kind.PUBLIC_KEYS, sm.scheme.name, sm.digest,
                          codec.pack_fields(fields))
    with pytest.raises(EnvelopeError, match="needs the client's public key"):
        sm.server(stripped)


def test_deployed_client_and_server_agree_on_flooding(flooded, tmp_path):
    sm = flooded[0]
    sm.save(tmp_path)
    client_model, server_model = load_client(tmp_path), load_server(tmp_path)
    assert client_model.digest == server_model.digest == sm.digest
    assert client_model.plan["flood_bits"] == server_model.plan["flood_bits"] == 16
    owner = client_model.owner()
    server = server_model.server(owner.keys.public_keys())
    assert server.ctx.flood is not None
    x = flooded[3]
    np.testing.assert_allclose(owner.decrypt(server.evaluate(owner.encrypt(x))),
                               sm.reference(x), atol=sm.scheme.capabilities.tolerance)


def test_ckks_batch_packing_is_masked_and_flooded():
    _need("ckks")
    sm = _compile("ckks?packing=batch", deploy=True)
    client, server, _ = sm.setup()
    x = inputs(sm.layers, 64, seed=2)[:3]
    out = server.evaluate(client.encrypt(x))
    np.testing.assert_allclose(client.decrypt(out), sm.reference(x), rtol=0,
                               atol=sm.scheme.capabilities.tolerance)
    raw = _raw_slots(sm, client.keys.secret, out)
    slots = client.keys.secret.seal.slots
    past = np.concatenate([raw[i * slots + 3:(i + 1) * slots] for i in range(len(raw) // slots)])
    sigma = sm.plan["flood_slot_sigma"]  # past the 3 inputs: the flood only, not f(0)
    assert 0.9 * sigma < float(np.std(past)) < 1.1 * sigma



# ----- who gets protected outputs by default (both HE schemes, one rule) ------------------

_OPT_OUT = {"ckks": "flood_bits=0", "bfv": "rerandomize=false"}


@pytest.mark.parametrize("name", sorted(_OPT_OUT))
def test_one_process_default_is_unprotected_and_save_refuses_it(name, tmp_path):
    _need(name)
    sm = _compile(name)  # one process: the client holds the model
    assert sm.plan["output_privacy_by"] == privacy.BY_ONE_PROCESS
    assert sm.plan["flood_bits"] == 0
    assert "compiled for one process" in sm.plan["output_privacy"]
    with pytest.raises(ArtifactError, match=rf"deploy=True.*set {_OPT_OUT[name]} explicitly"):
        sm.save(tmp_path)
    assert not (tmp_path / "server").exists()  # nothing written


@pytest.mark.parametrize("name", sorted(_OPT_OUT))
def test_an_explicit_opt_out_may_be_saved_and_says_so(name, tmp_path):
    _need(name)
    sm = _compile(f"{name}?{_OPT_OUT[name]}")
    assert sm.plan["output_privacy_by"] == privacy.BY_OPTION and sm.plan["flood_bits"] == 0
    sm.save(tmp_path)
    assert load_server(tmp_path).plan == sm.plan  # re-planned for deployment: still off
    assert load_client(tmp_path).plan["output_privacy_by"] == privacy.BY_OPTION


@pytest.mark.parametrize("name,bits", [("ckks", 16), ("bfv", 40)])
def test_deployed_default_is_protected_and_load_server_replans_it(name, bits, tmp_path):
    _need(name)
    sm = _compile(name, deploy=True)
    assert sm.plan["output_privacy_by"] == privacy.BY_DEPLOY and sm.plan["flood_bits"] == bits
    assert f"2^-{bits}" in sm.plan["output_privacy"]
    sm.save(tmp_path)
    # the manifest keeps the config (privacy unset); the server re-plans it for deployment
    served = load_server(tmp_path)
    assert served.digest == sm.digest and served.plan["flood_bits"] == bits


def test_a_forced_flood_applies_in_one_process_too():
    _need("ckks")
    sm = _compile("ckks?flood_bits=8")
    assert sm.plan["flood_bits"] == 8 and sm.plan["output_privacy_by"] == privacy.BY_OPTION
    assert sm.scheme.deploy_problem() is None


# ----- bfv: re-randomization, slot masking, noise flooding ---------------------------------


def _bfv_outputs(sm, keys, output: bytes) -> list[list]:
    """The output ciphertexts, ``[item][prime]`` (one ciphertext, or a list: batch)."""
    from secureinfer.plugins.bfv.scheme import _parse

    plan = sm.scheme._client_plan()
    return _parse(plan, keys.primes, codec.open_envelope(output).payload,
                  plan.output_width).items


def _first(ct):
    return ct[0] if isinstance(ct, list) else ct


def _noise_bits(sm, prime, ct) -> float:
    """``log2 ||v||`` of ``ct`` (``c0 + c1 s = Delta m + v``) from SEAL's measured noise
    budget: ``log2(q / 2t) - budget``, ``q`` the output level's data primes."""
    data = [int(v) for v in prime.he.get_qi()][:-1]
    q = math.prod(data[:len(data) - sm.scheme._levels[-1]])
    return math.log2(q / (2 * prime.t)) - prime.he.noise_level(ct)


def _budgets(sm, keys, output: bytes) -> np.ndarray:
    """SEAL's measured budget of every output ciphertext: ``(items, primes)``."""
    return np.array([[keys.primes[i].he.noise_level(_first(ct)) for i, ct in enumerate(item)]
                     for item in _bfv_outputs(sm, keys, output)])


@pytest.fixture(scope="module")
def bfv_deployed():
    _need("bfv")
    sm = _compile("bfv", deploy=True)
    client, server, _ = sm.setup()
    x = inputs(sm.layers, 64, seed=2)[:3]  # two items: 2 + 1 inputs (single packing)
    message = client.encrypt(x)
    return sm, client, server, x, message, server.evaluate(message), server.evaluate(message)


def test_bfv_flooded_outputs_decrypt_exactly(bfv_deployed):
    sm, client, _, x, _, out1, out2 = bfv_deployed
    for out in (out1, out2):
        np.testing.assert_array_equal(client.decrypt(out), sm.reference(x))
    assert out1 != out2
    plan = sm.plan
    assert plan["rerandomize"] and plan["flood_bits"] == 40
    assert plan["flood_log2_bound"] > 0
    assert "flood_bits=40" in plan["output_privacy"] and "2^-40" in plan["output_privacy"]
    assert "estimated noise bound" in plan["output_privacy"]
    assert "budget estimate before the flood" in plan["flood_measured_against"]


def test_bfv_client_measures_the_planned_budget_whatever_the_computation(bfv_deployed):
    sm, client, _, _, _, out1, out2 = bfv_deployed
    keys, plan = client.keys.secret, sm.plan
    largest = int(np.argmax(plan["plain_moduli"]))
    b1, b2 = _budgets(sm, keys, out1), _budgets(sm, keys, out2)
    # the flood sets the budget: what the plan says for the largest prime (the others,
    # smaller, keep a little more), the same in every evaluation
    assert np.all(np.abs(b1[:, largest] - plan["noise_budget_left_bits"]) <= 1.5), b1
    assert np.all(b1 >= plan["noise_budget_left_bits"] - 1.5)
    assert np.all(np.abs(b1 - b2) <= 1)
    assert plan["noise_budget_before_flood_bits"] - plan["noise_budget_left_bits"] \
        >= plan["flood_bits"] + math.log2(plan["poly_modulus_degree"])


def test_bfv_flood_is_there_and_covers_the_noise(bfv_deployed):
    """The decrypted noise is about ``2^b`` flooded; the same server without the flood
    leaves the evaluation's own noise, at most the estimate the flood was sized for."""
    sm, client, _, _, message, out, _ = bfv_deployed
    keys, plan = client.keys.secret, sm.plan
    b, bits = plan["flood_log2_bound"], plan["flood_bits"]
    log_n = math.log2(plan["poly_modulus_degree"])
    for item in _bfv_outputs(sm, keys, out):
        for i, ct in enumerate(item):
            assert abs(_noise_bits(sm, keys.primes[i], _first(ct)) - b) <= 1.5
    bare = sm.server(client.public_keys())
    bare.ctx.rerandomizer.flood_log2 = None  # the same parameters and keys, no flood
    unflooded = bare.evaluate(message)
    np.testing.assert_array_equal(client.decrypt(unflooded), client.decrypt(out))
    for item in _bfv_outputs(sm, keys, unflooded):
        for i, ct in enumerate(item):
            noise = _noise_bits(sm, keys.primes[i], _first(ct))
            assert noise <= b - bits - log_n + 1.5, (noise, b)  # within the estimate
            assert noise < b - 20  # and far below the flood


def test_bfv_slots_beside_the_result_are_uniform(bfv_deployed):
    sm, client, _, x, message, out1, out2 = bfv_deployed
    keys, scheme = client.keys.secret, sm.scheme
    plan = scheme._client_plan()
    row = plan.row

    def beside(output: bytes, prime: int) -> np.ndarray:
        vals = []
        for k, item in enumerate(_bfv_outputs(sm, keys, output)):
            slots = keys.primes[prime].he.decryptInt(_first(item[prime]))
            keep = np.zeros(len(slots), bool)
            for r in range(min(2, len(x) - 2 * k)):
                keep[r * row + plan.output_slots] = True
            vals.append(np.mod(slots[~keep], keys.primes[prime].t))
        return np.concatenate(vals)

    t = keys.primes[0].t
    first, second = beside(out1, 0), beside(out2, 0)
    assert np.mean(first != second) > 0.99  # fresh each time
    assert 0.47 < np.mean(first < t // 2) < 0.53  # uniform mod t, not small partial sums
    # unprotected, the same slots hold the computation's other values, the same each time
    plain = _compile("bfv?rerandomize=false")
    c, s, _ = plain.setup()
    msg = c.encrypt(x)
    raw = [[c.keys.secret.primes[0].he.decryptInt(_first(item[0]))
            for item in _bfv_outputs(plain, c.keys.secret, s.evaluate(msg))] for _ in range(2)]
    np.testing.assert_array_equal(raw[0][0], raw[1][0])
    assert np.count_nonzero(np.delete(raw[0][0], plan.output_slots)) > 0


def test_bfv_batch_packing_is_flooded_and_masked():
    _need("bfv")
    sm = _compile("bfv?packing=batch", deploy=True)
    client, server, _ = sm.setup()
    x = inputs(sm.layers, 64, seed=2)[:3]
    out = server.evaluate(client.encrypt(x))
    np.testing.assert_array_equal(client.decrypt(out), sm.reference(x))
    keys = client.keys.secret
    b = sm.plan["flood_log2_bound"]
    item = _bfv_outputs(sm, keys, out)[0]
    for i, cts in enumerate(item):
        for ct in cts:
            assert abs(_noise_bits(sm, keys.primes[i], ct) - b) <= 1.5
    past = keys.primes[0].he.decryptInt(item[0][0])[3:]  # past the 3 inputs: not f(0)
    assert 0.47 < np.mean(np.mod(past, keys.primes[0].t) < keys.primes[0].t // 2) < 0.53


def test_bfv_workers_flood_the_same_way():
    _need("bfv")
    sm = _compile("bfv?workers=2", deploy=True)
    client, server, _ = sm.setup()
    assert server.ctx.pool is not None and server.ctx.rerandomizer.flood_log2 == \
        sm.plan["flood_log2_bound"]
    x = inputs(sm.layers, 64, seed=2)[:2]
    out = server.evaluate(client.encrypt(x))
    np.testing.assert_array_equal(client.decrypt(out), sm.reference(x))
    budgets = _budgets(sm, client.keys.secret, out)
    largest = int(np.argmax(sm.plan["plain_moduli"]))
    assert np.all(np.abs(budgets[:, largest] - sm.plan["noise_budget_left_bits"]) <= 1.5)


def test_bfv_flood_the_budget_cannot_hold_is_refused():
    _need("bfv")
    with pytest.raises(CompileError, match=r"flood_bits=100 needs 100 \+ log2 N \+ 2 bits.*"
                                           r"carries at most flood_bits=\d+ \(at N=8192\).*"
                                           r"Lower flood_bits"):
        _compile("bfv?poly_modulus_degree=8192&flood_bits=100")


@pytest.mark.parametrize("config,match", [
    ("bfv?rerandomize=false&flood_bits=8", "needs rerandomize=true"),
    ("bfv?flood_bits=200", "between 0"),
])
def test_bfv_flood_options_are_checked(config, match):
    _need("bfv")
    with pytest.raises(ConfigError, match=match):
        _compile(config)


# ----- bfv: the ciphertext bytes the flood edits ------------------------------------------


@pytest.fixture(scope="module")
def small_bfv():
    _need("bfv")
    from secureinfer.plugins.bfv.backend import new_contexts

    (prime,) = new_contexts(4096, [40961], [36, 36, 37])
    prime.he.keyGen()
    return prime


def test_wire_layout_limbs_and_crt_are_what_seal_decrypts(small_bfv):
    """``Delta = floor(q / t)`` added to coefficient 0 of ``c0`` in every limb adds 1 to
    every slot: the offsets, the polynomial order, the limb order and the residues."""
    from secureinfer.plugins.bfv import wire
    from secureinfer.plugins.bfv.backend import RAW

    p = small_bfv
    ct = wire.parse(p.encrypt(np.arange(p.slots)).to_bytes(RAW), p.slots, 2)
    data = [int(v) for v in p.he.get_qi()][:2]
    delta = math.prod(data) // p.t
    for j, q in enumerate(data):
        ct.data[0, j, 0] = (int(ct.data[0, j, 0]) + delta % q) % q
    np.testing.assert_array_equal(p.he.decryptInt(p.load(ct.dump())), np.arange(p.slots) + 1)


def test_wire_refuses_what_it_does_not_know(small_bfv):
    from secureinfer.plugins.bfv import wire
    from secureinfer.plugins.bfv.backend import RAW

    p = small_bfv
    blob = bytearray(p.encrypt(np.zeros(p.slots, np.int64)).to_bytes(RAW))
    with pytest.raises(EnvelopeError, match="at 1 coefficient primes"):
        wire.parse(bytes(blob), p.slots, 1)
    for offset, value, match in ((0, 0x00, "not a SEAL"), (5, 0x02, "compressed"),
                                 (48, 0x01, "ntt=1"), (89, 0x00, "not a SEAL")):
        bad = bytearray(blob)
        bad[offset] = value
        with pytest.raises(EnvelopeError, match=match):
            wire.parse(bytes(bad), p.slots, 2)


def test_flood_residues_are_one_uniform_integer_per_coefficient():
    from secureinfer.plugins.bfv.rerandomize import flood_residues

    moduli = [(1 << 36) - 5, (1 << 58) - 27, (1 << 60) - 93]  # the last: nibble steps
    bits, count = 70, 4000
    res = flood_residues(bits, count, moduli)
    q = math.prod(moduli)
    values = []
    for i in range(count):
        # CRT: the residues are of one integer, in [-2^bits, 2^bits)
        x = sum(int(res[j, i]) * (q // m) * pow(q // m, -1, m) for j, m in enumerate(moduli)) % q
        values.append(x - q if x > q // 2 else x)
    values = np.array(values, dtype=float) / 2.0 ** bits
    assert values.min() >= -1 and values.max() < 1
    assert abs(values.mean()) < 0.05 and abs(values.std() - 1 / math.sqrt(3)) < 0.02


def test_compile_cli_writes_protected_outputs_and_says_so(tmp_path, capsys):
    _need("bfv")
    from secureinfer.cli import main

    assert main(["compile", "--scheme", "bfv", "--out", str(tmp_path / "art"),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "outputs: outputs re-randomized, slot-masked and noise-flooded" in printed
    client_model = load_client(tmp_path / "art")
    assert client_model.plan["output_privacy_by"] == privacy.BY_DEPLOY
    assert client_model.plan["flood_bits"] == 40
