"""Quadratic functional encryption: the ``fe_quad`` scheme."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pymcl", reason="fe_quad needs pymcl: pip install secureinfer[fe]")

from secureinfer import codec  # noqa: E402
from secureinfer.codec import Kind  # noqa: E402
from secureinfer.errors import CompileError, EnvelopeError, RangeError, RangeWarning  # noqa: E402
from secureinfer.layers import AvgPool2d, Conv2d, Flatten, Linear, Poly  # noqa: E402
from secureinfer.model import compile_layers  # noqa: E402
from secureinfer.plugins.fe_common.backend import pymcl  # noqa: E402
from secureinfer.plugins.fe_common.groups import group  # noqa: E402
from secureinfer.plugins.fe_quadratic import QuadraticFE, dgp  # noqa: E402
from secureinfer.plugins.fe_quadratic.function import lower  # noqa: E402
from secureinfer.quant import quantize  # noqa: E402
from secureinfer.registry import resolve  # noqa: E402

FAST = "fe-quad?dlog_table_bits=16"  # a small discrete-log table: quick to build in tests


def _mlp(rng: np.random.Generator, n_in: int = 16, hidden: int = 8, out: int = 4,
         coeffs: tuple[float, ...] = (0.0, 0.0, 1.0)) -> list:
    return [Flatten("flatten", (1, 1, n_in)),
            Linear("fc1", (n_in,), weight=rng.normal(0, 1 / np.sqrt(n_in), (hidden, n_in)),
                   bias=rng.normal(0, 0.1, hidden)),
            Poly("act1", (hidden,), coeffs=coeffs),
            Linear("fc2", (hidden,), weight=rng.normal(0, 0.5, (out, hidden)),
                   bias=rng.normal(0, 0.1, out))]


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    layers = _mlp(rng)
    sm = compile_layers(layers, FAST, calibration=rng.random((64, 1, 1, 16)))
    return sm, sm.setup(), rng.random((3, 1, 1, 16))


def _payload(sm, message: bytes) -> bytes:
    """The scheme's own ciphertext payload inside the core's input message."""
    return codec.unpack_fields(sm._open(message, Kind.INPUT))["ct"]


def _message(sm, payload: bytes, n: int = 1) -> bytes:
    """An input message around a scheme payload, as ``Client.encrypt`` builds it."""
    return sm._seal(Kind.INPUT, codec.pack_fields({"n": n, "ct": payload}))


def test_registered_under_name_and_alias():
    for name in ("fe_quad", "fe-quad", "qfe"):
        assert isinstance(resolve(name), QuadraticFE)
    caps = QuadraticFE.capabilities
    assert (caps.output, caps.exact, caps.max_degree) == ("plaintext", True, 2)
    assert caps.layers == {"linear", "poly", "flatten", "avgpool2d", "conv2d"}


def test_equals_quantized_clear_on_digits_shape(rng):
    """64 -> 16 -> x^2 -> 10 with signed inputs: integer for integer the clear reference,
    and the same numbers as ``clear?bits=5``."""
    layers = _mlp(rng, 64, 16, 10)
    calib = rng.uniform(-1, 1, (128, 1, 1, 64))
    sm = compile_layers(layers, FAST, calibration=calib)
    clear = compile_layers(layers, "clear?bits=5", calibration=calib)
    client, server, _ = sm.setup()
    x = rng.uniform(-1, 1, (4, 1, 1, 64))
    got = client.decrypt(server.evaluate(client.encrypt(x)))
    np.testing.assert_array_equal(got, sm.reference(x))
    np.testing.assert_array_equal(got, clear.reference(x))


def test_general_polynomial_conv_and_pool_exact(rng):
    """Conv -> a*h^2 + b*h + c -> AvgPool -> Linear: every kind in one prefix."""
    conv = Conv2d("conv1", (1, 6, 6), weight=rng.normal(0, 0.3, (2, 1, 3, 3)),
                  bias=rng.normal(0, 0.1, 2), stride=(1, 1), padding=(0, 0))
    pool = AvgPool2d("pool1", conv.out_shape, kernel=2, stride=2)
    layers = [conv, Poly("act1", conv.out_shape, coeffs=(0.2, 0.5, 0.3)), pool,
              Flatten("flatten", pool.out_shape),
              Linear("fc1", (8,), weight=rng.normal(0, 0.5, (3, 8)), bias=np.zeros(3))]
    sm = compile_layers(layers, FAST, calibration=rng.random((64, 1, 6, 6)))
    assert sm.clear_layers == [] and sm.plan["hidden"] == 32
    client, server, _ = sm.setup()
    x = rng.random((2, 1, 6, 6))
    np.testing.assert_array_equal(client.decrypt(server.evaluate(client.encrypt(x))),
                                  sm.reference(x))


def test_trained_model_matches_quantized_clear(square_mlp, digits):
    """The conftest's trained 64 -> 32 -> x^2 -> 10 digits model: same decisions as the
    quantized clear model, same logits as the reference."""
    import secureinfer

    sm = secureinfer.compile(square_mlp, FAST, input_shape=(1, 8, 8),
                             calibration=digits.x_train)
    clear = secureinfer.compile(square_mlp, "clear?bits=5", input_shape=(1, 8, 8),
                                calibration=digits.x_train)
    client, server, _ = sm.setup()
    x = digits.x_test[:8]
    got = client.decrypt(server.evaluate(client.encrypt(x)))
    np.testing.assert_array_equal(got, sm.reference(x))
    np.testing.assert_array_equal(got.argmax(1), clear.reference(x).argmax(1))


def test_lowering_equals_forward_int(rng):
    """No cryptography: the quadratic functions equal the quantized network exactly."""
    from secureinfer.partition import partition
    from secureinfer.testing.networks import NETWORKS

    for make in NETWORKS.values():
        prefix = partition(make(rng), QuadraticFE.capabilities, "fe_quad").secure
        qnet = quantize(prefix, (0.0, 1.0), 8, coeff_bits=8)
        fn = lower(qnet, prefix[0].in_shape, 1024)
        x_q = qnet.quantize_input(rng.random((5, *prefix[0].in_shape)))
        want = qnet.forward_int(x_q).reshape(5, -1)
        assert (fn.evaluate(x_q) == want.astype(object)).all()


def test_output_ranges_hold_the_extremes(rng):
    layers = _mlp(rng, coeffs=(0.1, -0.6, 0.4))
    qnet = quantize(layers, (0.0, 1.0), 5, coeff_bits=8)
    fn = lower(qnet, (1, 1, 16), 1024)
    ranges = fn.output_ranges(0, qnet.input_bound)
    x_q = np.concatenate([np.zeros((1, 16), int), np.full((1, 16), qnet.input_bound),
                          rng.integers(0, qnet.input_bound + 1, (200, 16))])
    y = fn.evaluate(x_q)
    for c, (lo, hi) in enumerate(ranges):
        assert lo <= min(y[:, c]) and max(y[:, c]) <= hi


def test_pairings_grow_with_hidden_width_not_input_size(rng, monkeypatch):
    """784 inputs, 3 hidden units, 2 outputs: 2*3 + 2 + 2 = 10 pairings, not 785**2."""
    layers = _mlp(rng, 784, 3, 2)
    sm = compile_layers(layers, FAST, calibration=rng.random((16, 1, 1, 784)))
    client, server, _ = sm.setup()
    ct = client.encrypt(rng.random((1, 1, 1, 784)))
    mcl = pymcl()
    calls = []
    real = mcl.pairing
    monkeypatch.setattr(mcl, "pairing", lambda a, b: calls.append(1) or real(a, b))
    server.evaluate(ct)
    assert len(calls) == sm.plan["pairings_per_input"] == 10


def test_plan_and_reveals(setup):
    sm, _, _ = setup
    plan = sm.plan
    assert plan["security_bits"] == 128 and plan["curve"] == "BLS12-381"
    assert (plan["inputs"], plan["hidden"], plan["functional_keys"]) == (16, 8, 4)
    assert plan["dlog"]["table_bits"] == 16
    assert "4 outputs of layer fc2" in sm.reveals and "quadratic" in sm.reveals


def test_refused_prefixes_name_the_layer_and_the_fix(rng):
    calib = rng.random((16, 1, 1, 16))
    with pytest.raises(CompileError, match=r"layer act1 .*64 units.*max_hidden=32"):
        compile_layers(_mlp(rng, 16, 64, 4), "fe-quad?max_hidden=32", calibration=calib)
    with pytest.raises(CompileError, match=r"layer fc2: with bits=12 .*fewer bits"):
        compile_layers(_mlp(rng), "fe-quad?bits=12", calibration=calib)
    with pytest.raises(CompileError, match="calibration"):
        compile_layers(_mlp(rng), "fe-quad")
    affine_act = [*_mlp(rng)[:2], Poly("scale", (8,), coeffs=(0.0, 2.0))]
    with pytest.raises(CompileError, match="layer scale"):
        compile_layers(affine_act, "fe-quad", calibration=calib)


def test_server_and_client_hold_no_master_secret(setup):
    _, (client, server, authority), _ = setup
    msk = authority.secret
    assert isinstance(msk, dgp.MasterKey)
    secret_ints = set(msk.s) | set(msk.t)

    def walk(obj, seen, depth=0):
        if id(obj) in seen or depth > 6:
            return
        seen.add(id(obj))
        assert not isinstance(obj, dgp.MasterKey), f"master key reachable from {type(obj)}"
        if isinstance(obj, int):
            assert obj not in secret_ints
        items = (vars(obj).values() if hasattr(obj, "__dict__")
                 else obj if isinstance(obj, (list, tuple)) else ())
        for item in items:
            walk(item, seen, depth + 1)

    assert client.keys is authority  # setup(): the data owner is the authority
    owner_less = setup[0].client(authority.public_keys())
    assert owner_less.keys is None and isinstance(owner_less._enc_keys, dgp.PublicKey)
    walk(server, set())
    walk(owner_less, set())


def test_bytes_round_trip(setup):
    sm, (client, _, authority), x = setup
    size = sm.plan["inputs"] + 1
    pk_bytes = sm._open(authority.public_keys(), Kind.PUBLIC_KEYS)
    assert dgp.PublicKey.from_bytes(pk_bytes, size).to_bytes() == pk_bytes
    blobs = codec.unpack_fields(_payload(sm, client.encrypt(x[:1])))["ct"]
    ct = dgp.Ciphertext.from_bytes(blobs[0], size)
    assert ct.to_bytes() == blobs[0] and len(blobs[0]) > 288 * size
    functional = sm._open(authority.functional_keys(), Kind.FUNCTIONAL_KEYS)
    keys = sm.scheme.open_server(b"", functional).keys
    assert len(keys) == 4 and all(isinstance(k, pymcl().G2) for k in keys)


def test_ciphertexts_are_randomized(setup):
    sm, (client, _, _), x = setup
    a, b = (codec.unpack_fields(_payload(sm, client.encrypt(x[:1])))["ct"][0] for _ in "ab")
    assert a != b


def test_malformed_bytes_raise_envelope_error(setup):
    sm, (client, server, authority), x = setup
    blob = codec.unpack_fields(_payload(sm, client.encrypt(x[:1])))["ct"][0]
    fields = codec.unpack_fields(blob)
    bad_point = dict(fields, a0=b"\xff" * len(fields["a0"]))
    short = dict(fields, b1=fields["b1"][:-96])
    for payload in (codec.pack_fields({"ct": [codec.pack_fields(bad_point)]}),
                    codec.pack_fields({"ct": [codec.pack_fields(short)]}),
                    codec.pack_fields({"ct": [blob[:-1]]}),
                    codec.pack_fields({"ct": []}),
                    codec.pack_fields({"x": blob})):
        with pytest.raises(EnvelopeError):
            server.evaluate(_message(sm, payload))
    with pytest.raises(EnvelopeError):
        sm.scheme.open_client(b"\x00" * 10)
    functional = codec.unpack_fields(sm._open(authority.functional_keys(),
                                              Kind.FUNCTIONAL_KEYS))
    with pytest.raises(EnvelopeError, match="other functions"):
        sm.scheme.open_server(b"", codec.pack_fields(dict(functional, function_digest="0")))
    with pytest.raises(EnvelopeError):
        sm.scheme.open_server(b"", codec.pack_fields(dict(functional, keys=b"\x01" * 96)))


def test_out_of_range_value_raises_instead_of_hanging(setup):
    """A ciphertext of a vector far outside the input range: DlogOutOfRange, a RangeError
    naming the layer, after a bounded search."""
    sm, (_, server, authority), _ = setup
    prog = sm.scheme._planned()
    x_q = [1000] * 16
    value = prog.function.evaluate(np.array([x_q]))[0]
    assert max(abs(v - c) for v, c in zip(value, prog.centers)) > prog.bound
    ct = dgp.encrypt(authority.secret.public, [1, *x_q])
    with pytest.raises(RangeError, match="layer fc2"):
        server.evaluate(_message(sm, codec.pack_fields({"ct": [ct.to_bytes()]})))


def test_input_outside_calibrated_range_rejected_by_client(setup):
    _, (client, _, _), x = setup
    with pytest.warns(RangeWarning, match="calibrated"), pytest.raises(RangeError):
        client.encrypt(x * 3)


def test_functional_key_decrypts_only_its_function(setup):
    """The raw scheme: a key for out_c unmasks e(g1, g2)^out_c; without the key's factor
    the same product is masked (the server cannot skip it)."""
    sm, (_, _, authority), x = setup
    fn = sm.scheme._planned().function
    msk = authority.secret
    x_q = sm.scheme._planned().qnet.quantize_input(x[:1]).reshape(-1).tolist()
    ct = dgp.encrypt(msk.public, [1, *x_q])
    gt = group("GT")
    want = fn.evaluate(np.array([x_q]))[0]
    dec = dgp.Decryptor(fn, dgp.functional_keys(msk, fn))
    expected = [gt.pow(gt.generator(), int(v)) for v in want]
    assert dec.decrypt(ct) == expected
    wrong = dgp.Decryptor(fn, [group("G2").generator()] * fn.outputs)
    assert not any(z == e for z, e in zip(wrong.decrypt(ct), expected))
