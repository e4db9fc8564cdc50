"""Output privacy of HE schemes: CKKS noise flooding, BFV re-randomization (issue 15, 4).

The tests decrypt the raw output slots (every slot, not only the result's) of the same
input evaluated twice: with flooding, their difference has the spread the plan states;
without, the evaluation is deterministic. Results still agree with the reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from secureinfer import codec, load_client, load_server
from secureinfer.errors import CompileError, EnvelopeError
from secureinfer.model import compile_layers
from secureinfer.registry import get_registry
from secureinfer.testing.networks import NETWORKS, inputs


def _need(name: str) -> None:
    reason = get_registry().get(name).availability()
    if reason:
        pytest.skip(f"{name} not available: {reason}")


def _compile(config: str, network: str = "mlp_square"):
    layers = NETWORKS[network](np.random.default_rng(0))
    return compile_layers(layers, config, calibration=inputs(layers, 64, seed=2))


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
    sm = _compile("ckks")  # flooding is the default
    client, server, _ = sm.setup()
    x = inputs(sm.layers, 64, seed=2)[:2]
    message = client.encrypt(x)
    return sm, client, server, x, message, server.evaluate(message), server.evaluate(message)


def test_ckks_floods_by_default_and_says_so(flooded):
    sm = flooded[0]
    assert sm.plan["flood_bits"] == 16 and sm.plan["public_key"]
    assert "2^-16" in sm.plan["output_privacy"]
    assert "flooded" in sm.summary()


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
    sm = _compile("ckks?packing=batch")
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


@pytest.mark.parametrize("config", ["bfv", "bfv?rerandomize=false"])
def test_bfv_rerandomizes_by_default(config):
    _need("bfv")
    sm = _compile(config)
    client, server, _ = sm.setup()
    x = inputs(sm.layers, 64, seed=2)[:2]
    message = client.encrypt(x)
    out1, out2 = server.evaluate(message), server.evaluate(message)
    rerandomized = config == "bfv"
    assert sm.plan["rerandomize"] is rerandomized
    assert (out1 != out2) is rerandomized  # fresh ciphertexts, or the same function of x
    assert (server.ctx.rerandomizer is not None) is rerandomized
    for out in (out1, out2):
        np.testing.assert_array_equal(client.decrypt(out), sm.reference(x))
