"""Inner-product functional encryption: the ``fe-ip`` scheme."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pymcl", reason="fe-ip needs pymcl: pip install secureinfer[fe]")

from secureinfer import codec  # noqa: E402
from secureinfer.codec import Kind  # noqa: E402
from secureinfer.errors import CompileError, EnvelopeError, RangeError, RangeWarning  # noqa: E402
from secureinfer.layers import AvgPool2d, Conv2d, Flatten, Linear, Poly  # noqa: E402
from secureinfer.model import compile_layers  # noqa: E402
from secureinfer.plugins.fe_common.dlog import DlogOutOfRange  # noqa: E402
from secureinfer.plugins.fe_common.groups import (  # noqa: E402
    fr,
    group,
    group_order,
    pack_elements,
    random_scalar,
)
from secureinfer.plugins.fe_inner_product import InnerProductFE  # noqa: E402
from secureinfer.plugins.fe_inner_product.scheme import (  # noqa: E402
    MasterSecret,
    PublicKey,
    ServerKeys,
)
from secureinfer.registry import resolve  # noqa: E402


def _mlp(rng: np.random.Generator) -> list:
    return [Flatten("flatten", (1, 4, 4)),
            Linear("fc1", (16,), weight=rng.normal(0, 0.4, (8, 16)), bias=rng.normal(0, 0.1, 8)),
            Poly("act1", (8,)),
            Linear("fc2", (8,), weight=rng.normal(0, 0.4, (3, 8)), bias=np.zeros(3))]


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    layers = _mlp(rng)
    sm = compile_layers(layers, "fe-ip", calibration=rng.random((64, 1, 4, 4)))
    return sm, sm.setup(), rng.random((4, 1, 4, 4))


def _payload(sm, message: bytes) -> bytes:
    """The scheme's own ciphertext payload inside the core's input message."""
    return codec.unpack_fields(sm._open(message, Kind.INPUT))["ct"]


def _message(sm, payload: bytes, n: int) -> bytes:
    """An input message around a scheme payload, as ``Client.encrypt`` builds it."""
    return sm._seal(Kind.INPUT, codec.pack_fields({"n": n, "ct": payload}))


def _linear_prefix(rng: np.random.Generator) -> list:
    """Conv -> AvgPool -> Flatten -> Linear: several linear layers before any activation."""
    conv = Conv2d("conv1", (2, 6, 6), weight=rng.normal(0, 0.3, (3, 2, 3, 3)),
                  bias=rng.normal(0, 0.1, 3), stride=(1, 1), padding=(1, 1))
    pool = AvgPool2d("pool1", conv.out_shape, kernel=2, stride=2)
    flat = Flatten("flat", pool.out_shape)
    return [conv, pool, flat,
            Linear("fc1", (27,), weight=rng.normal(0, 0.3, (4, 27)), bias=rng.normal(0, 0.1, 4))]


def test_registered_under_name_and_alias():
    assert isinstance(resolve("fe-ip?bits=6"), InnerProductFE)
    assert resolve("ipfe").opts["bits"] == 8
    assert InnerProductFE.availability() is None
    assert InnerProductFE.backend_version()


def test_exact_against_quantized_clear_with_negative_values():
    rng = np.random.default_rng(5)
    layers = _linear_prefix(rng)
    calib = rng.uniform(-1, 1, (64, 2, 6, 6))
    calib[0, 0, 0, :2] = (-1.0, 1.0)
    x = rng.uniform(-1, 1, (3, 2, 6, 6))
    fe = compile_layers(layers, "fe-ip?bits=5", calibration=calib)
    clear = compile_layers(layers, "clear?bits=5", calibration=calib)
    assert [s.name for s in fe.secure_layers] == ["conv1", "pool1", "flat", "fc1"]
    client, server, _ = fe.setup()
    got = server.infer(client.encrypt(x))
    c_client, c_server, _ = clear.setup()
    want = c_client.decrypt(c_server.evaluate(c_client.encrypt(x)))
    np.testing.assert_array_equal(got, want)
    assert (got < 0).any() and (got > 0).any()
    assert fe.reveals.startswith("the 4 outputs of layers conv1..fc1")


def test_trained_model_matches_quantized_clear(square_mlp, digits):
    from secureinfer import compile

    sm = compile(square_mlp, "fe-ip?bits=8", input_shape=(1, 8, 8),
                 calibration=digits.x_train[:256])
    assert sm.reveals == "the 32 outputs of layer 1 (Linear 64->32)"  # torch module "1"
    client, server, _ = sm.setup()
    x = digits.x_test[:30]
    got = server.infer(client.encrypt(x))
    np.testing.assert_array_equal(got, sm.reference(x))
    assert (got.argmax(1) == sm.predict_clear(x).argmax(1)).mean() >= 0.9


def test_plan_and_reveals(setup):
    sm, _, _ = setup
    plan = sm.plan
    assert plan["security_bits"] == 128 and plan["curve"] == "BLS12-381"
    assert plan["inputs"] == 16 and plan["functional_keys"] == 8
    assert plan["dlog"]["max_steps"] <= 9
    assert sm.reveals == "the 8 outputs of layer fc1 (Linear 16->8)"
    narrow = compile_layers(sm.layers, "fe-ip?bits=4", calibration=sm.calibration)
    assert narrow.plan["dlog"]["bound"] < plan["dlog"]["bound"] / 100


def test_needs_calibration_and_bounded_bits(rng):
    layers = _mlp(rng)
    with pytest.raises(CompileError, match="calibration"):
        compile_layers(layers, "fe-ip")
    wide = [Flatten("flatten", (1, 16, 16)),
            Linear("fc1", (256,), weight=rng.normal(size=(4, 256)), bias=np.zeros(4))]
    with pytest.raises(CompileError, match="dlog_table_bits"):
        compile_layers(wide, "fe-ip?bits=16", calibration=rng.random((8, 1, 16, 16)))
    with pytest.raises(CompileError, match="outside 8..28"):
        compile_layers(layers, "fe-ip?dlog_table_bits=40", calibration=rng.random((8, 1, 4, 4)))
    small = compile_layers(layers, "fe-ip?dlog_table_bits=10", calibration=rng.random((8, 1, 4, 4)))
    assert small.plan["dlog"]["table_bits"] == 10 and small.plan["dlog"]["max_steps"] > 50


def test_functional_keys_are_inner_products_with_the_master_key(setup):
    sm, (_, server, authority), _ = setup
    secret = authority.secret
    assert isinstance(secret, MasterSecret)
    weights = sm.scheme._planned().weights
    want = [sum(int(w) * s for w, s in zip(row, secret.s)) % group_order() for row in weights]
    assert server.ctx.sk == want


def test_server_and_client_hold_no_master_secret(setup):
    sm, (client, server, authority), _ = setup
    secret = authority.secret
    assert isinstance(server.ctx, ServerKeys) and set(vars(server.ctx)) == {"sk"}
    seen = [server, server.ctx, *server.layers]
    for obj in seen:
        for value in vars(obj).values():
            assert not isinstance(value, MasterSecret) and value is not secret.s
    assert not set(secret.s) & set(server.ctx.sk)
    assert client.keys is authority  # setup(): the data owner is the authority
    owner_less = sm.client(authority.public_keys())
    assert owner_less.keys is None and isinstance(owner_less._enc_keys, PublicKey)


def test_bytes_round_trip(setup):
    sm, (client, server, authority), x = setup
    scheme = sm.scheme
    public = sm._open(authority.public_keys(), Kind.PUBLIC_KEYS)
    assert scheme.open_client(public).h == authority.secret.public.h
    payload = _payload(sm, client.encrypt(x[:2]))
    parsed = scheme.load_input(server.ctx, payload)
    assert len(parsed) == 2 and len(parsed[0][1]) == 16
    again = b"".join(pack_elements(group("G1"), [ct0, *body]) for ct0, body in parsed)
    assert codec.unpack_fields(payload)["ct"] == again
    functional = sm._open(authority.functional_keys(), Kind.FUNCTIONAL_KEYS)
    assert scheme.open_server(public, functional).sk == server.ctx.sk


def test_authority_encrypts_with_the_master_secret_too(setup):
    sm, (client, server, authority), x = setup
    direct = _message(sm, sm.scheme.encrypt(authority.secret, x), len(x))
    np.testing.assert_array_equal(server.infer(direct), server.infer(client.encrypt(x)))


def test_ciphertexts_are_randomized(setup):
    _, (client, _, _), x = setup
    assert client.encrypt(x[:1]) != client.encrypt(x[:1])


def _forge(sm, authority, values: np.ndarray) -> bytes:
    """A well-formed ciphertext of arbitrary integers (bypassing quantization)."""
    ops = group("G1")
    g = ops.generator()
    h = authority.secret.public.h
    rho = random_scalar()
    body = [ops.law(hi * fr(rho), ops.pow(g, int(v))) for hi, v in zip(h, values)]
    payload = codec.pack_fields({"count": 1, "ct": pack_elements(ops, [ops.pow(g, rho), *body])})
    return _message(sm, payload, 1)


def test_out_of_range_plaintext_raises_instead_of_hanging(setup):
    sm, (_, server, authority), _ = setup
    with pytest.raises(DlogOutOfRange, match="layer fc1") as info:  # timed: bench_refusals
        server.evaluate(_forge(sm, authority, np.full(16, 10**7)))
    assert isinstance(info.value, RangeError)
    ok = _forge(sm, authority, np.full(16, 3))  # in range: decrypts
    assert server.infer(ok).shape == (1, 3)


def test_input_outside_calibrated_range_rejected_by_client(setup):
    _, (client, _, _), x = setup
    with pytest.warns(RangeWarning, match="calibrated"), pytest.raises(RangeError):
        client.encrypt(x * 3)


def test_malformed_messages_raise_envelope_error(setup):
    sm, (client, server, authority), x = setup
    scheme = sm.scheme
    payload = _payload(sm, client.encrypt(x[:1]))
    fields = codec.unpack_fields(payload)
    bad_point = fields["ct"][:48] + b"\x01" * 48 + fields["ct"][96:]
    short = fields["ct"][:-48]
    for ct, count in ((bad_point, 1), (short, 1), (fields["ct"], 2), (fields["ct"], 0)):
        with pytest.raises(EnvelopeError):
            scheme.load_input(server.ctx, codec.pack_fields({"count": count, "ct": ct}))
    with pytest.raises(EnvelopeError):
        scheme.load_input(server.ctx, payload[:-5])
    public = sm._open(authority.public_keys(), Kind.PUBLIC_KEYS)
    functional = sm._open(authority.functional_keys(), Kind.FUNCTIONAL_KEYS)
    with pytest.raises(EnvelopeError):
        scheme.open_client(codec.pack_fields({"h": b"\x02" * 48 * 16}))
    with pytest.raises(EnvelopeError):
        scheme.open_client(codec.pack_fields({"h": b"\x00" * 48 * 15}))
    with pytest.raises(EnvelopeError):
        scheme.open_server(codec.pack_fields({"x": 1}), functional)
    forged = codec.unpack_fields(functional)
    forged["weights_digest"] = "0" * 64
    with pytest.raises(EnvelopeError, match="other weights"):
        scheme.open_server(public, codec.pack_fields(forged))
    forged = codec.unpack_fields(functional)
    forged["sk"] = forged["sk"][:-32]
    with pytest.raises(EnvelopeError):
        scheme.open_server(public, codec.pack_fields(forged))


def test_reveals_says_when_outputs_determine_the_input(rng):
    wide = [Linear("fc1", (4,), weight=rng.normal(size=(6, 4)), bias=np.zeros(6)),
            Poly("act1", (6,)), Linear("fc2", (6,), weight=rng.normal(size=(2, 6)),
                                       bias=np.zeros(2))]
    sm = compile_layers(wide, "fe-ip", calibration=rng.random((16, 4)))
    assert sm.plan["determines_input"] and "determine the input" in sm.reveals
    narrow = compile_layers(_mlp(rng), "fe-ip", calibration=rng.random((16, 1, 4, 4)))
    assert not narrow.plan["determines_input"] and "determine" not in narrow.reveals
