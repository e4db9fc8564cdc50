"""The ``ckks`` scheme: conformance, planner, keys, packings, messages."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tenseal", reason="ckks needs TenSEAL: pip install secureinfer[ckks]")

from secureinfer import codec
from secureinfer.errors import (
    CompileError,
    ConfigError,
    EnvelopeError,
    RangeError,
    RangeWarning,
    UnknownOptionError,
)
from secureinfer.layers import AvgPool2d, Conv2d, Flatten, Linear, Poly
from secureinfer.model import compile_layers
from secureinfer.plugins.ckks.backend import galois_element, sealapi
from secureinfer.plugins.ckks.layers import _Kernel

TOL = 1e-2


# ----- networks --------------------------------------------------------------------------


def _linear(rng: np.random.Generator, name: str, n_in: int, n_out: int) -> Linear:
    return Linear(name, (n_in,), weight=rng.normal(0, 1 / np.sqrt(n_in), (n_out, n_in)),
                  bias=rng.normal(0, 0.1, n_out))


def small_cnn(seed: int = 0) -> list:
    """Padded strided conv, generic cubic, avg-pool, linear, folded square, linear."""
    rng = np.random.default_rng(seed)
    conv = Conv2d("conv", (1, 8, 8), weight=rng.normal(0, 0.3, (3, 1, 3, 3)),
                  bias=rng.normal(0, 0.1, 3), stride=(1, 1), padding=(1, 1))
    pool = AvgPool2d("pool", conv.out_shape, kernel=2, stride=2)
    flat = Flatten("flat", pool.out_shape)
    n = int(np.prod(pool.out_shape))
    return [conv, Poly("cube", conv.out_shape, coeffs=(0.0, 1.0, 0.0, 0.2)), pool, flat,
            _linear(rng, "fc1", n, 12), Poly("sq", (12,), coeffs=(0.1, -0.3, -0.5)),
            _linear(rng, "fc2", 12, 5)]


def tutorial_cnn(seed: int = 0) -> list:
    """TenSEAL's MNIST tutorial network: conv 1->4 k7 s3, square, 256->64, square, 64->10."""
    rng = np.random.default_rng(seed)
    conv = Conv2d("conv1", (1, 28, 28), weight=rng.normal(0, 0.2, (4, 1, 7, 7)),
                  bias=rng.normal(0, 0.1, 4), stride=(3, 3))
    return [conv, Flatten("flat", conv.out_shape), Poly("sq1", (256,)),
            _linear(rng, "fc1", 256, 64), Poly("sq2", (64,)), _linear(rng, "fc2", 64, 10)]


def deep_mlp(depth: int) -> list:
    """``depth`` x (Linear 4->4, square) then Linear 4->2; values stay in [0, 1]."""
    layers: list = []
    for i in range(depth):
        layers += [Linear(f"fc{i}", (4,), weight=np.eye(4) * 0.5, bias=np.full(4, 0.25)),
                   Poly(f"sq{i}", (4,))]
    return layers + [Linear("out", (4,), weight=np.ones((2, 4)) / 4, bias=np.zeros(2))]


def conv_net(seed: int = 0) -> list:
    """Conv (padding 1) -> folded a x^2 + b x + c (a < 0) -> avg-pool -> flatten -> linear."""
    rng = np.random.default_rng(seed)
    conv = Conv2d("conv", (1, 6, 6), weight=rng.normal(0, 0.3, (2, 1, 3, 3)),
                  bias=rng.normal(0, 0.1, 2), padding=(1, 1))
    pool = AvgPool2d("pool", conv.out_shape, kernel=2, stride=2)
    return [conv, Poly("act", conv.out_shape, coeffs=(0.1, 0.4, -0.5)), pool,
            Flatten("flat", pool.out_shape), _linear(rng, "fc", int(np.prod(pool.out_shape)), 4)]


def _calib(layers: list, n: int = 32, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *layers[0].in_shape))


@pytest.fixture(scope="module")
def cnn_single():
    layers = small_cnn()
    # as deployed: the server floods its outputs, so it holds the public key too
    sm = compile_layers(layers, "ckks?packing=single", calibration=_calib(layers), deploy=True)
    return sm, sm.setup()


@pytest.fixture(scope="module")
def tutorial_single():
    layers = tutorial_cnn()
    sm = compile_layers(layers, "ckks?flood_bits=0", calibration=_calib(layers, 8))
    return sm, sm.setup()  # the tutorial's plan unflooded (flooding: test_privacy.py)


# ----- evaluation ------------------------------------------------------------------------


def test_single_and_batch_agree_with_clear() -> None:
    layers = conv_net()
    x = _calib(layers, 5, seed=9)
    results = {}
    for packing in ("single", "batch"):
        sm = compile_layers(layers, f"ckks?packing={packing}", calibration=_calib(layers))
        client, server, _ = sm.setup()
        results[packing] = client.decrypt(server.evaluate(client.encrypt(x)))
        assert sm.scheme.batch_size() == (1 if packing == "single" else sm.plan["slots"])
    ref = sm.reference(x)
    for y in results.values():
        assert y.shape == ref.shape == (5, 4)
        assert np.abs(y - ref).max() < TOL
        assert (y.argmax(1) == ref.argmax(1)).all()


def test_cnn_with_generic_cubic_matches_clear(cnn_single) -> None:
    sm, (client, server, _) = cnn_single
    x = _calib(sm.layers, 3, seed=9)
    np.testing.assert_allclose(client.decrypt(server.evaluate(client.encrypt(x))),
                               sm.reference(x), atol=TOL)


def test_batch_spans_several_groups() -> None:
    layers = [Flatten("flat", (1, 2, 2)), Linear("fc", (4,), weight=np.eye(4)[:3] * 2,
                                                 bias=np.array([0.5, 0.0, -1.0]))]
    sm = compile_layers(layers, "ckks?packing=batch&poly_modulus_degree=4096&flood_bits=0",
                        calibration=_calib(layers))
    client, server, _ = sm.setup()
    x = _calib(layers, 2049 + 7, seed=1)  # 2048 slots: two groups
    y = client.decrypt(server.evaluate(client.encrypt(x)))
    np.testing.assert_allclose(y, sm.reference(x), atol=TOL)


def test_generic_polynomial_without_preceding_affine() -> None:
    layers = [Poly("cube", (6,), coeffs=(0.5, -1.0, 0.25, 0.75)),
              Linear("fc", (6,), weight=np.ones((2, 6)) / 6, bias=np.zeros(2))]
    sm = compile_layers(layers, "ckks", calibration=_calib(layers))
    assert sm.plan["depth_needed"] == 3 + 1  # ceil(log2 3) + 1 for the cubic, 1 for fc
    client, server, _ = sm.setup()
    x = _calib(layers, 3, seed=4)
    np.testing.assert_allclose(client.decrypt(server.evaluate(client.encrypt(x))),
                               sm.reference(x), atol=TOL)


# ----- the planner -----------------------------------------------------------------------


def test_plan_is_recorded_and_json(cnn_single) -> None:
    sm, _ = cnn_single
    plan = json.loads(json.dumps(sm.plan))
    for key in ("security_bits", "poly_modulus_degree", "coeff_mod_bits", "scale_bits",
                "depth_needed", "depth_available", "packing", "rotation_steps",
                "estimated_max_error", "stages"):
        assert key in plan
    assert plan["security_bits"] == 128
    # conv 1, cubic ceil(log2 3) + 1 = 3, pool+flatten+fc1 1, folded square 1, fc2 1
    assert plan["depth_available"] >= plan["depth_needed"] == 7
    assert sum(plan["coeff_mod_bits"]) <= plan["max_bits_128"]
    assert plan["coeff_mod_bits"][-1] > max(plan["coeff_mod_bits"][:-1])  # special prime


def test_tutorial_network_plan(tutorial_single) -> None:
    sm, _ = tutorial_single
    plan = sm.plan
    # five products; each square's rescale is left to the dense layer after it (lazy), so
    # those two levels divide by one prime of twice the scale: three levels in all
    assert plan["poly_modulus_degree"] == 8192 and plan["lazy_squares"] == 2
    assert plan["depth_needed"] == 5 - plan["lazy_squares"]
    scale, middle = plan["scale_bits"], plan["coeff_mod_bits"][1:-1]
    assert sorted(middle) == [scale, 2 * scale, 2 * scale]
    assert plan["packing"] == "single" and "im2col" in plan["input_layout"]
    assert plan["rotations_per_input"] <= 32


def test_too_deep_network_is_refused_with_its_depth() -> None:
    layers = deep_mlp(7)  # 7 squares folded into 7 linears + the output layer: depth 15
    with pytest.raises(CompileError, match="depth 15"):
        compile_layers(layers, "ckks?poly_modulus_degree=8192&flood_bits=0",
                       calibration=_calib(layers))
    with pytest.raises(CompileError, match="depth 15.*gives 3 rescaling primes"):
        compile_layers(layers, "ckks?coeff_mod_bits=40,30,30,30,45&flood_bits=0",
                       calibration=_calib(layers))
    sm = compile_layers(layers, "ckks?flood_bits=0", calibration=_calib(layers))  # a larger ring
    assert sm.plan["poly_modulus_degree"] > 8192 and sm.plan["depth_available"] == 15


def test_options_override_the_planner() -> None:
    layers = small_cnn()
    sm = compile_layers(layers, "ckks?poly_modulus_degree=16384&scale_bits=30&flood_bits=0",
                        calibration=_calib(layers))
    assert sm.plan["poly_modulus_degree"] == 16384 and sm.plan["scale_bits"] == 30
    assert sm.plan["scale_bits_chosen_by"] == "option"
    layers = conv_net()
    sm = compile_layers(layers, "ckks?coeff_mod_bits=40,30,30,30,45&packing=batch&flood_bits=0",
                        calibration=_calib(layers))
    assert sm.plan["coeff_mod_bits"] == [40, 30, 30, 30, 45]
    assert sm.plan["scale_bits"] == 30 and sm.plan["packing"] == "batch"
    with pytest.raises(UnknownOptionError, match="packing"):
        compile_layers(layers, "ckks?slots=4")
    with pytest.raises(ConfigError, match="packing"):
        compile_layers(layers, "ckks?packing=diagonal")
    with pytest.raises(ConfigError, match="coeff_mod_bits"):
        compile_layers(layers, "ckks?coeff_mod_bits=40;30")
    with pytest.raises(ConfigError, match="poly_modulus_degree"):
        compile_layers(layers, "ckks?poly_modulus_degree=5000")


def test_scale_far_from_the_rescaling_primes_is_refused() -> None:
    # Rescaling divides by the middle primes: scale 2^20 against 40-bit primes would
    # drift by 2^20 per level (measured: errors of 6e7 before this check).
    layers = small_cnn()
    with pytest.raises(ConfigError, match="within 1 bit of the scale"):
        compile_layers(layers, "ckks?coeff_mod_bits=60,40,40,40,40,40,40,40,60&scale_bits=20&flood_bits=0",
                       calibration=_calib(layers))
    sm = compile_layers(layers, "ckks?coeff_mod_bits=60,40,40,40,40,40,40,40,60&scale_bits=40&flood_bits=0",
                        calibration=_calib(layers))
    assert sm.plan["scale_bits"] == 40


@pytest.mark.parametrize("a", [1e-5, 1e-8])
def test_tiny_square_coefficient_stays_accurate(a: float) -> None:
    # a x^2 + x: folding would compute on sqrt(a) x and multiply the noise by 1/sqrt(a).
    rng = np.random.default_rng(3)
    layers = [_linear(rng, "fc1", 6, 8), Poly("act", (8,), coeffs=(0.0, 1.0, a)),
              _linear(rng, "fc2", 8, 3)]
    calib = _calib(layers, 64)
    sm = compile_layers(layers, "ckks?packing=single", calibration=calib)
    client, server, _ = sm.setup()
    x = calib[:4]
    got = client.decrypt(server.evaluate(client.encrypt(x)))
    err = float(np.max(np.abs(got - sm.predict_clear(x))))
    assert err < 1e-2, (err, sm.plan.get("estimated_max_error"))
    assert err <= 10 * sm.plan["estimated_max_error"]


def test_insecure_chain_needs_allow_insecure() -> None:
    layers = small_cnn()
    config = ("ckks?poly_modulus_degree=4096&coeff_mod_bits=40,30,30,30,30,30,30,30,40"
              "&flood_bits=0")
    with pytest.raises(CompileError, match="128"):
        compile_layers(layers, config, calibration=_calib(layers))
    sm = compile_layers(layers, config, calibration=_calib(layers), allow_insecure=True)
    assert sm.plan["security_bits"] < 128


def test_input_outside_the_planned_range_is_refused(cnn_single) -> None:
    sm, (client, _, _) = cnn_single
    with pytest.warns(RangeWarning, match="calibrated"), pytest.raises(RangeError, match="calibration"):
        client.encrypt(np.full(sm.input_shape, 3.0))


# ----- keys and messages -----------------------------------------------------------------


def test_galois_keys_only_for_used_rotations(cnn_single, monkeypatch) -> None:
    sm, (client, server, _) = cnn_single
    steps = sm.plan["rotation_steps"]
    used: list[int] = []
    original = _Kernel._rotate

    def record(self, ct, step):
        used.append(step % sm.plan["slots"])
        return original(self, ct, step)

    monkeypatch.setattr(_Kernel, "_rotate", record)
    server.evaluate(client.encrypt(_calib(sm.layers, 1, seed=3)))
    assert len(used) == sm.plan["rotations_per_input"]
    assert steps and sorted(set(used)) == steps
    degree = sm.plan["poly_modulus_degree"]
    galois = server.ctx.galois
    assert all(galois.has_key(galois_element(s, degree)) for s in steps)
    unused = [s for s in range(1, 1100) if s not in steps]
    assert not any(galois.has_key(galois_element(s, degree)) for s in unused)
    assert galois.size() == len(steps)


def test_batch_packing_sends_no_galois_keys() -> None:
    layers = small_cnn()
    sm = compile_layers(layers, "ckks?packing=batch", calibration=_calib(layers))
    fields = codec.unpack_fields(codec.open_envelope(sm.setup().client.public_keys()).payload)
    assert fields["galois"] == b"" and fields["relin"] and sm.plan["rotation_steps"] == []


def test_server_cannot_decrypt(cnn_single) -> None:
    sm, (client, server, authority) = cnn_single
    assert authority is None  # HE: the client owns its keys
    api = sealapi()
    public = codec.unpack_fields(codec.open_envelope(client.public_keys()).payload)
    # the public key is there for the output flood (flood.Flooder encrypts zeros)
    assert set(public) == {"parms", "public", "relin", "galois", "steps"}
    held = list(vars(server.ctx).values()) + list(vars(server.ctx.seal).values())
    forbidden = (api.SecretKey, api.Decryptor, api.Encryptor, api.PublicKey)
    assert not any(isinstance(v, forbidden) for v in held)
    assert not any(isinstance(v, (api.SecretKey, api.Decryptor))
                   for v in vars(server.ctx.flood).values())
    # The public message loads as evaluation keys, not as a secret key.
    x = _calib(sm.layers, 1, seed=7)
    out = server.evaluate(client.encrypt(x))
    ct = server.ctx.seal.load_ciphertext(
        codec.unpack_fields(codec.open_envelope(out).payload)["cts"][0],
        server.ctx.seal.top - sm.plan["output_drop"], "output")
    guess = api.KeyGenerator(server.ctx.seal.context).secret_key()
    pt = api.Plaintext()
    api.Decryptor(server.ctx.seal.context, guess).decrypt(ct, pt)
    wrong = server.ctx.seal.decode(pt)[:5]
    right = client.decrypt(out)[0]
    assert np.abs(wrong - right).max() > 1e3 * TOL


def test_messages_round_trip_through_bytes(tutorial_single) -> None:
    sm, (client, _, _) = tutorial_single
    x = _calib(sm.layers, 2, seed=11)
    msg = client.encrypt(x)
    assert isinstance(msg, bytes) and len(msg) / len(x) <= 500_000  # <= 0.5 MB per image
    # A fresh server from the public-key bytes alone computes the same result.
    other = sm.server(bytes(client.public_keys()))
    y = client.decrypt(bytes(other.evaluate(bytes(msg))))
    np.testing.assert_allclose(y, sm.reference(x), atol=TOL)


def test_malformed_ciphertexts_are_envelope_errors(cnn_single) -> None:
    sm, (client, server, _) = cnn_single
    env = codec.open_envelope(client.encrypt(_calib(sm.layers, 1)))
    outer = codec.unpack_fields(env.payload)
    inner = codec.unpack_fields(outer["ct"])

    def with_cts(cts: list[bytes], packing: str = "single") -> bytes:
        payload = codec.pack_fields({"packing": packing, "counts": inner["counts"], "cts": cts})
        return codec.seal(codec.Kind.INPUT, sm.scheme.name, sm.digest,
                          codec.pack_fields({"n": 1, "ct": payload}))

    blob = inner["cts"][0]
    for bad in ([blob[:-100]], [blob[:20] + b"\0" * (len(blob) - 20)], [b"x" * 64], []):
        with pytest.raises(EnvelopeError):
            server.evaluate(with_cts(bad))
    with pytest.raises(EnvelopeError, match="packing"):
        server.evaluate(with_cts([blob], packing="batch"))
    public = codec.unpack_fields(codec.open_envelope(client.public_keys()).payload)
    with pytest.raises(EnvelopeError, match="Galois"):  # relinearization key as Galois keys
        sm.scheme.open_server(codec.pack_fields({**public, "galois": public["relin"]}), b"")
    with pytest.raises(EnvelopeError, match="public context"):
        sm.scheme.open_server(codec.pack_fields({**public, "parms": b"other"}), b"")


def test_scratch_files_avoid_a_small_dev_shm(monkeypatch) -> None:
    # A container's /dev/shm is often 64 MB; a Galois key set does not fit there.
    import shutil
    import tempfile

    from secureinfer.plugins.ckks import backend

    usage = shutil.disk_usage("/")
    monkeypatch.setattr(backend.shutil, "disk_usage",
                        lambda path: usage._replace(free=64 << 20))
    assert backend._scratch_dir(10 << 20) == tempfile.gettempdir()


def test_fused_affine_run_equals_the_product_of_its_layers(monkeypatch) -> None:
    """A pool -> flatten -> linear run is fused by pushing blocks of basis vectors through
    it (no layer's own matrix is built); it must equal the product of the layers' matrices."""
    from secureinfer.plugins.ckks import program

    monkeypatch.setattr(program, "_FUSE_CHUNK_BYTES", 8 * 135 * 7)  # blocks of 7 vectors
    rng = np.random.default_rng(4)
    pool = AvgPool2d("pool", (3, 6, 6), kernel=2, stride=2)
    flat = Flatten("flat", pool.out_shape)
    fc = Linear("fc", flat.out_shape, weight=rng.normal(size=(5, 27)), bias=rng.normal(size=5))
    specs = [pool, flat, fc]
    fused = program._fuse(specs)
    want, bias = program.affine_matrix(specs[0])
    for spec in specs[1:]:
        m2, b2 = program.affine_matrix(spec)
        want, bias = m2 @ want, m2 @ bias + b2
    np.testing.assert_allclose(fused.matrix, want, atol=1e-12)
    np.testing.assert_allclose(fused.bias, bias, atol=1e-12)
    x = rng.normal(size=(2, 3, 6, 6))
    np.testing.assert_allclose(x.reshape(2, -1) @ fused.matrix.T + fused.bias,
                               fc.forward(flat.forward(pool.forward(x))), atol=1e-12)
