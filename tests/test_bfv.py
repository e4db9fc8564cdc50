"""The ``bfv`` scheme: exact equality with the quantized clear run, the planner, the roles."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import re

import numpy as np
import pytest

pytest.importorskip("Pyfhel", reason="the bfv scheme needs Pyfhel: pip install secureinfer[bfv]")

import secureinfer  # noqa: E402
from secureinfer import codec  # noqa: E402
from secureinfer.errors import CompileError, EnvelopeError, RangeError, RangeWarning  # noqa: E402
from secureinfer.plugins.bfv.primes import (  # noqa: E402
    batching_primes, choose_plain_moduli, crt_combine, is_prime)
from secureinfer.testing import NETWORKS, inputs  # noqa: E402


def _compiled(net: str = "mlp_square", config: str = "bfv"):
    layers = NETWORKS[net](np.random.default_rng(0))
    return layers, secureinfer.compile_layers(layers, config,
                                              calibration=inputs(layers, 64, seed=2))


@pytest.fixture(scope="module")
def cnn_single():
    layers, sm = _compiled("cnn")
    return layers, sm, sm.setup()


# ----- arithmetic ---------------------------------------------------------------------


def test_primes_and_crt_recover_big_integers():
    assert [p for p in range(2, 60) if is_prime(p)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29,
                                                        31, 37, 41, 43, 47, 53, 59]
    assert not is_prime(2**61 + 1) and is_prime(2**61 - 1)
    bound = 3**80  # ~127 bits: several primes
    moduli = choose_plain_moduli(8192, bound, max_bits=30, max_primes=8)
    assert moduli is not None and len(moduli) == 5
    assert all(is_prime(t) and t % (2 * 8192) == 1 and t.bit_length() <= 30 for t in moduli)
    assert math.prod(moduli) > 2 * bound
    values = np.array([bound, -bound, 0, 12345, -(3**70)], dtype=object)
    residues = [np.array([int(v) % t for v in values]) for t in moduli]
    assert list(crt_combine(residues, moduli)) == list(values)
    assert choose_plain_moduli(8192, bound, max_bits=30, max_primes=4) is None


def test_largest_batching_primes_come_from_the_top():
    from secureinfer.plugins.bfv.primes import is_prime, largest_batching_primes

    top = largest_batching_primes(8192, 17, 8)
    every = [t for t in range(16385, 1 << 17, 16384) if is_prime(t)]
    assert top == sorted(every, reverse=True)[:8] and len(top) < 8
    big = largest_batching_primes(4096, 40, 3)
    assert len(big) == 3 and all(t % 8192 == 1 and t.bit_length() == 40 for t in big)


def test_batching_primes_ascend_and_fit_the_ring():
    it = batching_primes(4096, 20)
    first = [next(it) for _ in range(3)]
    assert first == sorted(first) and all(t % 8192 == 1 and t >= 2**19 for t in first)


# ----- exactness ------------------------------------------------------------------------


def test_exact_on_digits_test_set(square_mlp, digits):
    """The whole digits test set, one batch: equal to clear?bits=8 integer for integer."""
    sm = secureinfer.compile(square_mlp, "bfv?packing=batch", input_shape=(1, 8, 8),
                             calibration=digits.x_train)
    clear = secureinfer.compile(square_mlp, "clear?bits=8", input_shape=(1, 8, 8),
                                calibration=digits.x_train)
    client, server, _ = sm.setup()
    got = client.decrypt(server.evaluate(client.encrypt(digits.x_test)))
    c_client, c_server, _ = clear.setup()
    want = c_client.decrypt(c_server.evaluate(c_client.encrypt(digits.x_test)))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, sm.reference(digits.x_test))
    assert np.mean(got.argmax(1) == digits.y_test) > 0.9


def test_single_packing_equals_batch_packing(square_mlp, digits):
    x = digits.x_test[:9]
    outs = []
    for packing in ("single", "batch"):
        sm = secureinfer.compile(square_mlp, f"bfv?packing={packing}", input_shape=(1, 8, 8),
                                 calibration=digits.x_train)
        assert sm.plan["packing"] == packing
        client, server, _ = sm.setup()
        outs.append(client.decrypt(server.evaluate(client.encrypt(x))))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_crt_needed_and_exact():
    """A network whose output needs more than one plaintext prime still decrypts exactly."""
    layers, sm = _compiled("mlp_poly")
    assert len(sm.plan["plain_moduli"]) >= 2
    assert sm.plan["crt_bits"] > sm.plan["output_bound_bits"] + 1
    client, server, _ = sm.setup()
    x = inputs(layers, 3, seed=7)
    np.testing.assert_array_equal(client.decrypt(server.evaluate(client.encrypt(x))),
                                  sm.reference(x))


def _wide_net(channels: int) -> list:
    """Conv 1->c k5 (28x28, stride 1, padding 2) -> x^2 -> AvgPool 2 -> Flatten -> Linear."""
    from secureinfer.layers import AvgPool2d, Conv2d, Flatten, Linear, Poly

    rng = np.random.default_rng(3)
    conv = Conv2d("conv1", (1, 28, 28), weight=rng.normal(0, 0.2, (channels, 1, 5, 5)),
                  bias=rng.normal(0, 0.1, channels), padding=(2, 2))
    act = Poly("act1", conv.out_shape, coeffs=(0.0, 0.0, 1.0))
    pool = AvgPool2d("pool1", act.out_shape, kernel=2, stride=2)
    flat = Flatten("flat", pool.out_shape)
    n = int(np.prod(flat.out_shape))
    fc = Linear("fc", flat.out_shape, weight=rng.normal(0, 0.05, (10, n)),
                bias=np.zeros(10))
    return [conv, act, pool, flat, fc]


def test_integer_matrices_equal_the_quantized_layers():
    """The sparse matrices the server runs compute what the integer reference computes,
    for a padded multi-channel convolution (also on the client's im2col input), a pool and
    a dense layer, on large signed inputs (Python integers past 64 bits)."""
    from secureinfer.plugins.bfv.linear import im2col_linear, integer_linear
    from secureinfer.quant import quantize

    qnet = quantize(_wide_net(3), (0.0, 1.0), bits=8)
    rng = np.random.default_rng(5)
    for q in qnet.layers:
        if q.spec.kind not in ("conv2d", "avgpool2d", "linear"):
            continue
        lin = integer_linear(q)
        x = rng.integers(-2**40, 2**40, size=(2, *q.spec.in_shape)).astype(object) * 2**30
        big = dataclasses.replace(q, bound=2**80)  # the reference on Python integers
        want = big.forward_int(x).reshape(2, -1)
        for xi, wi in zip(x.reshape(2, -1), want):
            np.testing.assert_array_equal(lin.apply(xi), wi)
        assert lin.nnz == np.count_nonzero(lin.dense())
    conv = qnet.layers[0]
    unfold = im2col_linear(conv)
    x = rng.integers(0, 256, size=(2, *conv.spec.in_shape))
    want = conv.forward_int(x).reshape(2, -1)
    for xi, ui, wi in zip(x, unfold.im2col.unfold(x), want):
        np.testing.assert_array_equal(unfold.apply(ui), wi)


@pytest.mark.parametrize("net", ["cnn", "mlp_poly"])
def test_interval_bound_holds_for_extreme_inputs(net):
    """The planner's bound is never passed by in-range inputs, corners included, and is
    never looser than the per-layer bound of the quantization."""
    from secureinfer.plugins.bfv.bounds import output_bound
    from secureinfer.quant import quantize

    layers = NETWORKS[net](np.random.default_rng(0))
    qnet = quantize(layers, (0.0, 1.0), bits=6)
    bound = output_bound(qnet)
    rng = np.random.default_rng(1)
    shape = (64, *layers[0].in_shape)
    x = np.concatenate([rng.integers(0, qnet.input_bound + 1, shape),
                        rng.choice([0, qnet.input_bound], shape)])
    reached = max(abs(int(v)) for v in qnet.forward_int(x).reshape(-1))
    assert reached <= bound <= qnet.bounds[-1]


def test_interval_bound_is_reached_by_one_affine_layer():
    """For a single linear layer the interval bound is exact: the sign-chosen corner input
    reaches it."""
    from secureinfer.layers import Linear
    from secureinfer.plugins.bfv.bounds import output_bound
    from secureinfer.quant import quantize

    rng = np.random.default_rng(2)
    fc = Linear("fc", (12,), weight=rng.normal(size=(5, 12)), bias=rng.normal(size=5))
    qnet = quantize([fc], (0.0, 1.0), bits=8)
    w, b, top = qnet.layers[0].weight, qnet.layers[0].bias, qnet.input_bound
    corners = np.concatenate([np.where(w > 0, top, 0), np.where(w < 0, top, 0)])
    reached = np.abs(qnet.forward_int(corners)).max()
    assert output_bound(qnet) == reached


def test_a_network_too_wide_for_any_row_is_refused_before_its_diagonals_are_built(
        monkeypatch):
    """32 channels of 28x28 need 32768 slots per row: single packing refuses at every ring
    degree from the layer's period alone (building its diagonals took gigabytes)."""
    from secureinfer.plugins.bfv.layout import Diagonals

    built = []
    original = Diagonals.of.__func__

    def spy(cls, layer, in_slots, t_in):
        dg = original(cls, layer, in_slots, t_in)
        built.append(dg.period)
        return dg

    monkeypatch.setattr(Diagonals, "of", classmethod(spy))
    layers = _wide_net(32)
    with pytest.raises(CompileError, match=r"conv1 needs 32768 slots per row, N=32768 has 16384"):
        secureinfer.compile_layers(layers, "bfv?packing=single",
                                   calibration=inputs(layers, 16, seed=2))
    assert all(period <= 16384 for period in built)


# ----- planner --------------------------------------------------------------------------


def test_planner_refuses_a_network_that_would_wrap():
    layers = NETWORKS["mlp_poly"](np.random.default_rng(0))
    calib = inputs(layers, 64, seed=2)
    bound = secureinfer.compile_layers(layers, "bfv", calibration=calib).plan["output_bound"]
    with pytest.raises(CompileError) as info:
        secureinfer.compile_layers(layers, "bfv?max_primes=1", calibration=calib)
    msg = str(info.value)
    assert str(bound) in msg and "worst-case" in msg and "fc3" in msg
    assert "max_primes" in msg


def test_planner_refuses_insufficient_noise_budget():
    layers = NETWORKS["cnn"](np.random.default_rng(0))
    with pytest.raises(CompileError, match="noise budget"):
        secureinfer.compile_layers(layers, "bfv?poly_modulus_degree=4096&plain_modulus_bits=40",
                                   calibration=inputs(layers, 64, seed=2))


def test_refusal_says_what_the_usable_primes_hold():
    # What the largest allowed primes multiply to, not max_primes times their size.
    layers = NETWORKS["cnn"](np.random.default_rng(0))
    with pytest.raises(CompileError) as info:
        secureinfer.compile_layers(
            layers, "bfv?packing=single&poly_modulus_degree=8192&max_primes=1",
            calibration=inputs(layers, 64, seed=2))
    msg = str(info.value)
    found = re.search(r"at most (\d+) bits, and the largest (\d+) batching primes t = 1 "
                      r"\(mod 16384\) of that size \(max_primes=1\) hold only ([\d.]+) bits",
                      msg)
    assert found, msg
    t_bits, count, held = int(found.group(1)), int(found.group(2)), float(found.group(3))
    need = float(re.search(r"multiply to more than 2\^([\d.]+)", msg).group(1))
    assert count == 1 and t_bits - 2 < held < t_bits < need


@pytest.mark.parametrize("bits, says", [
    (70, r"plain_modulus_bits=70 is outside 2\.\.60"),
    (12, r"N=8192: plain_modulus_bits=12: the smallest batching prime t = 1 \(mod 16384\) "
         r"has 17 bits"),
])
def test_plain_modulus_bits_out_of_reach_are_named(bits, says):
    layers = NETWORKS["mlp_square"](np.random.default_rng(0))
    with pytest.raises(CompileError, match=says):
        secureinfer.compile_layers(layers, f"bfv?plain_modulus_bits={bits}",
                                   calibration=inputs(layers, 64, seed=2))


def test_plan_follows_options_and_keeps_security():
    layers = NETWORKS["mlp_square"](np.random.default_rng(0))
    calib = inputs(layers, 64, seed=2)
    plan = secureinfer.compile_layers(
        layers, "bfv?poly_modulus_degree=16384&plain_modulus_bits=30", calibration=calib).plan
    assert plan["poly_modulus_degree"] == 16384
    assert set(plan["plain_modulus_bits"]) == {30}
    assert plan["security_bits"] == 128 and sum(plan["coeff_modulus_bits"]) <= 438
    fewer = secureinfer.compile_layers(layers, "bfv?bits=4", calibration=calib).plan
    more = secureinfer.compile_layers(layers, "bfv?bits=8", calibration=calib).plan
    assert fewer["output_bound"] < more["output_bound"]


def test_galois_keys_only_for_the_rotations_used(cnn_single):
    _, sm, _ = cnn_single
    steps = {s for layer in sm.scheme._plan.steps if hasattr(layer, "layout")
             for s in layer.layout.steps}
    assert sorted(steps) == sm.plan["rotation_steps"] and sm.plan["galois_keys"] == len(steps)
    _, batch = _compiled("cnn", "bfv?packing=batch")
    assert batch.plan["galois_keys"] == 0
    fields = codec.unpack_fields(codec.open_envelope(batch.setup().client.public_keys()).payload)
    assert fields["rotate_key"] == []


# ----- roles and messages ---------------------------------------------------------------


def test_server_holds_no_secret_key(cnn_single):
    _, _, (client, server, authority) = cnn_single
    assert authority is None  # HE: the client owns its keys
    assert all(p.he.is_secret_key_empty() for p in server.ctx.primes)
    assert not any(p.he.is_secret_key_empty() for p in client.keys.secret.primes)
    public = client.public_keys()
    for p in client.keys.secret.primes:
        secret = p.he.to_bytes_secret_key("none")
        chunk = secret[len(secret) // 2: len(secret) // 2 + 64]
        assert chunk not in public


def test_bytes_round_trip_between_separate_compilations(cnn_single):
    """Client and server compiled apart (as in two processes) agree through bytes only."""
    layers, sm, (client, _, _) = cnn_single
    other = secureinfer.compile_layers(layers, "bfv", calibration=inputs(layers, 64, seed=2))
    assert other.digest == sm.digest
    server = other.server(client.public_keys())
    x = inputs(layers, 3, seed=5)
    out = server.evaluate(client.encrypt(x))
    assert isinstance(out, bytes)
    np.testing.assert_array_equal(client.decrypt(out), sm.reference(x))


def _with_payload(sm, message: bytes, payload: bytes) -> bytes:
    env = codec.open_envelope(message)
    return codec.seal(env.kind, env.scheme, env.digest, payload)


def test_malformed_ciphertexts_are_envelope_errors(cnn_single):
    layers, sm, (client, server, _) = cnn_single
    msg = client.encrypt(inputs(layers, 1))
    outer = codec.unpack_fields(codec.open_envelope(msg).payload)
    inner = codec.unpack_fields(outer["ct"])
    blob = inner["ct"][0]
    bad_blobs = [blob[:-10], blob[:64] + bytes(len(blob) - 64), b"", b"\x00" * len(blob)]
    for bad in bad_blobs:
        cts = [bad] + inner["ct"][1:]
        payload = codec.pack_fields({"n": 1, "ct": codec.pack_fields(
            {"samples": 1, "ct": cts})})
        with pytest.raises(EnvelopeError):
            server.evaluate(_with_payload(sm, msg, payload))
    wrong_count = codec.pack_fields({"n": 1, "ct": codec.pack_fields(
        {"samples": 5, "ct": inner["ct"]})})
    with pytest.raises(EnvelopeError):
        server.evaluate(_with_payload(sm, msg, wrong_count))


def test_malformed_public_keys_are_envelope_errors(cnn_single):
    _, sm, (client, _, _) = cnn_single
    public = client.public_keys()
    fields = codec.unpack_fields(codec.open_envelope(public).payload)
    fields["public_key"] = [b"\x01" * 100] + fields["public_key"][1:]
    with pytest.raises(EnvelopeError):
        sm.server(_with_payload(sm, public, codec.pack_fields(fields)))


def test_oversized_key_blob_is_refused_before_seal_reads_it(cnn_single):
    _, sm, (client, _, _) = cnn_single
    public = client.public_keys()
    fields = codec.unpack_fields(codec.open_envelope(public).payload)
    fields["relin_key"] = [fields["relin_key"][0] * 200] + fields["relin_key"][1:]
    with pytest.raises(EnvelopeError, match="exceeds"):
        sm.server(_with_payload(sm, public, codec.pack_fields(fields)))
    sm.server(public)  # the real keys still load


def test_out_of_range_input_rejected_at_encrypt(cnn_single):
    layers, _, (client, _, _) = cnn_single
    x = inputs(layers, 1)
    x[0, 0, 0, 0] = 1.5
    with pytest.warns(RangeWarning, match="calibrated"), pytest.raises(RangeError, match="quantized for"):
        client.encrypt(x)


def test_exhausted_noise_budget_raises_instead_of_a_wrong_result(cnn_single):
    layers, sm, (client, server, _) = cnn_single
    scheme = sm.scheme
    fields = codec.unpack_fields(codec.open_envelope(client.encrypt(inputs(layers, 1))).payload)
    value = scheme.load_input(server.ctx, fields["ct"])
    for layer in server.layers:
        value = layer.forward(value)
    for prime, ct in zip(server.ctx.primes, value.items[0]):
        for _ in range(6):  # squares until the budget is gone
            prime.he.square(ct)
            prime.he.relinearize(ct)
    out = codec.seal(codec.Kind.OUTPUT, scheme.name, sm.digest, scheme.dump_output(
        server.ctx, value))
    with pytest.raises(RangeError, match="noise budget"):
        client.decrypt(out)


def test_batch_size_follows_packing(cnn_single):
    _, sm, _ = cnn_single
    assert sm.scheme.batch_size() == 2
    _, batch = _compiled("cnn", "bfv?packing=batch")
    assert batch.scheme.batch_size() == batch.plan["poly_modulus_degree"]


# ----- parallel CRT contexts (workers) -------------------------------------------------


@pytest.fixture(scope="module")
def crt_workers():
    """A two-prime network, its server running each prime in its own process."""
    layers = NETWORKS["mlp_poly"](np.random.default_rng(0))
    calib = inputs(layers, 64, seed=2)
    sm = secureinfer.compile_layers(layers, "bfv?workers=4", calibration=calib)
    client, server, _ = sm.setup()
    yield layers, sm, client, server
    server.ctx.pool.close()


def test_workers_run_each_prime_in_its_own_process_exactly(crt_workers):
    layers, sm, client, server = crt_workers
    primes = len(sm.plan["plain_moduli"])
    assert primes >= 2 and server.ctx.pool.size == primes  # capped at one per prime
    assert server.ctx.primes == []  # the server process itself loads no keys
    pids = set(server.ctx.pool.pids)
    assert len(pids) == primes and os.getpid() not in pids
    assert server.ctx.pool.engine == "local"
    x = inputs(layers, 5, seed=11)
    np.testing.assert_array_equal(client.decrypt(server.evaluate(client.encrypt(x))),
                                  sm.reference(x))
    # workers is the server's own affair: a server compiled without it takes the same
    # keys and messages, and its output decrypts the same.
    plain = secureinfer.compile_layers(layers, "bfv", calibration=inputs(layers, 64, seed=2))
    in_process = plain.server(client.public_keys())
    assert in_process.ctx.pool is None and len(in_process.ctx.primes) == primes
    msg = client.encrypt(x)
    np.testing.assert_array_equal(client.decrypt(in_process.evaluate(msg)),
                                  client.decrypt(server.evaluate(msg)))


def test_workers_parse_client_bytes_like_the_server(crt_workers):
    layers, sm, client, server = crt_workers
    msg = client.encrypt(inputs(layers, 1, seed=3))
    outer = codec.unpack_fields(codec.open_envelope(msg).payload)
    inner = codec.unpack_fields(outer["ct"])
    blob = inner["ct"][-1]  # the last prime's: parsed by the last worker
    for bad in (blob[:-10], b"\x00" * len(blob)):
        payload = codec.pack_fields({"n": 1, "ct": codec.pack_fields(
            {"samples": 1, "ct": inner["ct"][:-1] + [bad]})})
        with pytest.raises(EnvelopeError, match="BFV ciphertext"):
            server.evaluate(_with_payload(sm, msg, payload))
    # The pool is still usable after refusing a message.
    x = inputs(layers, 2, seed=8)
    np.testing.assert_array_equal(client.decrypt(server.evaluate(client.encrypt(x))),
                                  sm.reference(x))


def test_a_dead_worker_is_an_error_naming_where_not_a_hang(crt_workers):
    # Last user of the module's pool: it kills one of its workers.
    layers, _, client, server = crt_workers
    msg = client.encrypt(inputs(layers, 1, seed=4))
    os.kill(server.ctx.pool.pids[1], signal.SIGKILL)
    with pytest.raises(secureinfer.EvaluationError, match=r"worker for primes \[1\]"):
        server.evaluate(msg)
    with pytest.raises(secureinfer.EvaluationError, match="failed earlier"):
        server.evaluate(msg)  # the pool stays refused, not out of step


def test_workers_refuse_malformed_keys_as_envelope_errors():
    layers = NETWORKS["mlp_poly"](np.random.default_rng(0))
    sm = secureinfer.compile_layers(layers, "bfv?workers=2", calibration=inputs(layers, 64, 2))
    public = sm.client().public_keys()
    fields = codec.unpack_fields(codec.open_envelope(public).payload)
    fields["relin_key"] = fields["relin_key"][:-1] + [b"\x01" * 100]  # parsed by a worker
    with pytest.raises(EnvelopeError, match="malformed key for prime"):
        sm.server(_with_payload(sm, public, codec.pack_fields(fields)))


def test_workers_must_be_positive():
    layers = NETWORKS["mlp_square"](np.random.default_rng(0))
    with pytest.raises(CompileError, match="workers=0 must be at least 1"):
        secureinfer.compile_layers(layers, "bfv?workers=0", calibration=inputs(layers, 8, 2))
