"""SecureModel roles and run-time checks that every scheme shares."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import secureinfer
from secureinfer.plugins.clear import ClearScheme
from secureinfer.testing import NETWORKS, inputs


@pytest.fixture
def net():
    layers = NETWORKS["mlp_square"](np.random.default_rng(0))
    return layers, inputs(layers, 64, seed=2)


def test_range_warning_names_layer(net):
    layers, calib = net
    sm = secureinfer.compile_layers(layers, "clear", calibration=calib)
    client, server, _ = sm.setup()
    with pytest.warns(secureinfer.RangeWarning, match=r"the network input: .*calibrated"):
        client.encrypt(calib[:2] * 5)  # the client checks its input only: it has no model
    with pytest.warns(secureinfer.RangeWarning, match=r"the outputs of .*\bfc1\b"):
        sm.check_ranges(calib[:2] * 5)  # the model owner sees every layer


def _mlp_pair():
    rng = np.random.default_rng(5)
    small = NETWORKS["mlp_square"](rng)
    other = NETWORKS["mlp_square"](np.random.default_rng(6))
    return small, other


@pytest.mark.parametrize("how", ["config", "instance"])
def test_one_config_compiles_two_models_that_both_keep_working(how):
    a, b = _mlp_pair()
    xa, xb = inputs(a, 4, seed=1), inputs(b, 4, seed=1)
    config = secureinfer.parse_config("clear?bits=8")
    if how == "instance":
        config = secureinfer.resolve(config)
    sm_a = secureinfer.compile_layers(a, config, calibration=xa)
    sm_b = secureinfer.compile_layers(b, config, calibration=xb)
    assert sm_a.scheme is not sm_b.scheme and sm_a.scheme is not config
    assert sm_a.plan != sm_b.plan  # other weights, other quantization scales
    for sm, x in ((sm_a, xa), (sm_b, xb)):
        client, server, _ = sm.setup()
        got = client.decrypt(server.evaluate(client.encrypt(x)))
        np.testing.assert_array_equal(got, sm.reference(x))
    assert not np.allclose(sm_a.reference(xa), sm_b.reference(xa))


def test_plan_is_frozen_data(net):
    layers, calib = net
    sm = secureinfer.compile_layers(layers, "clear?bits=6", calibration=calib)
    plan = sm.plan
    plan["bits"] = 3
    plan["quantization"]["input_scale"] = 1e9
    assert sm.plan["bits"] == 6 and sm.plan["quantization"]["input_scale"] != 1e9
    client, server, _ = sm.setup()
    np.testing.assert_array_equal(client.decrypt(server.evaluate(client.encrypt(calib[:2]))),
                                  sm.reference(calib[:2]))


def test_range_error_mode_refuses(net):
    layers, calib = net
    sm = secureinfer.compile_layers(layers, "clear", calibration=calib, range_check="error")
    client, _, _ = sm.setup()
    with pytest.raises(secureinfer.RangeError, match="calibrated"):
        client.encrypt(calib[:1] * 5)
    client.encrypt(calib[:1])  # in range: no error


def test_range_check_off_and_bad_value(net):
    layers, calib = net
    sm = secureinfer.compile_layers(layers, "clear", calibration=calib, range_check="off")
    client, _, _ = sm.setup()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        client.encrypt(calib[:1] * 5)
    with pytest.raises(ValueError, match="range_check"):
        secureinfer.compile_layers(layers, "clear", range_check="maybe")


def test_nan_input_rejected(net):
    layers, calib = net
    client, _, _ = secureinfer.compile_layers(layers, "clear", calibration=calib).setup()
    x = calib[:1].copy()
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(secureinfer.RangeError, match="NaN"):
        client.encrypt(x)


def test_wrong_shape_named(net):
    layers, calib = net
    client, _, _ = secureinfer.compile_layers(layers, "clear", calibration=calib).setup()
    with pytest.raises(ValueError, match=r"\(1, 4, 4\)"):
        client.encrypt(np.zeros((2, 3, 3)))


def test_timings_and_sizes_recorded_per_sample(net):
    layers, calib = net
    sm = secureinfer.compile_layers(layers, "clear", calibration=calib)
    client, server, _ = sm.setup()
    client.decrypt(server.evaluate(client.encrypt(calib[:8])))
    assert sm.meter.samples("encrypt") == sm.meter.samples("evaluate") == 8
    assert sm.meter.samples("decrypt") == 8 and len(sm.meter.times["keygen"]) == 1
    assert sm.meter.per_sample_bytes("input") * 8 <= sm.meter.sizes["input"][0][0]


def test_server_in_another_process_counts_samples(net):
    """A server built from bytes alone (a fresh SecureModel) still times per sample."""
    layers, calib = net
    sm_client = secureinfer.compile_layers(layers, "clear", calibration=calib)
    sm_server = secureinfer.compile_layers(layers, "clear", calibration=calib)
    client = sm_client.client()
    server = sm_server.server(client.public_keys())
    server.evaluate(client.encrypt(calib[:5]))
    assert sm_server.meter.samples("evaluate") == 5


def test_messages_from_other_model_rejected(net):
    layers, calib = net
    a = secureinfer.compile_layers(layers, "clear", calibration=calib)
    other = NETWORKS["mlp_square"](np.random.default_rng(9))
    b = secureinfer.compile_layers(other, "clear?bits=8", calibration=calib)
    client = b.client()
    with pytest.raises(secureinfer.EnvelopeError):
        a.server(client.public_keys())


def test_fe_client_needs_public_keys(net):
    layers, calib = net
    from secureinfer.registry import get_registry

    if get_registry().get("fe-ip").availability():
        pytest.skip("fe-ip not installed: pip install secureinfer[fe]")
    sm = secureinfer.compile_layers(layers, "fe-ip", calibration=calib)
    with pytest.raises(secureinfer.RoleError, match="authority") as info:
        sm.client()
    assert isinstance(info.value, ValueError)


def test_nonfinite_weights_are_a_compile_error_naming_the_layer(net):
    layers, calib = net
    first = next(layer for layer in layers if layer.kind == "linear")
    first.weight[0, 0] = np.nan
    with pytest.raises(secureinfer.CompileError, match=rf"{first.name}\.weight.*NaN"):
        secureinfer.compile_layers(layers, "clear")


def test_calibration_of_another_network_is_refused(net):
    layers, calib = net
    cal = secureinfer.Calibration.from_data(layers[:-1], calib)
    with pytest.raises(secureinfer.CompileError, match="recalibrate"):
        secureinfer.compile_layers(layers, "clear", calibration=cal)


def test_backend_failure_names_the_layer(net, monkeypatch):
    """A backend's own exception inside a layer is an EvaluationError naming that layer."""
    layers, calib = net
    sm = secureinfer.compile_layers(layers, "clear", calibration=calib)
    client, server, _ = sm.setup()
    msg = client.encrypt(calib[:1])
    victim = server.layers[1]

    def broken(value):
        raise RuntimeError("ciphertext is not valid for encryption parameters")

    monkeypatch.setattr(victim, "forward", broken)
    with pytest.raises(secureinfer.EvaluationError) as info:
        server.evaluate(msg)
    assert info.value.layer == victim.spec.name
    assert f"layer {victim.spec.name} ({victim.spec.kind})" in str(info.value)
    assert "not valid for encryption parameters" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_secureinfer_errors_inside_a_layer_pass_through(net, monkeypatch):
    layers, calib = net
    sm = secureinfer.compile_layers(layers, "clear", calibration=calib)
    client, server, _ = sm.setup()

    def refuse(value):
        raise secureinfer.EnvelopeError("wrong key set")

    monkeypatch.setattr(server.layers[0], "forward", refuse)
    with pytest.raises(secureinfer.EnvelopeError, match="wrong key set"):
        server.evaluate(client.encrypt(calib[:1]))


# ----- errors inside the hierarchy, setup's parties, what the server learns ---------------

def test_compile_without_input_shape_is_a_config_error():
    torch = pytest.importorskip("torch", reason="compile() of a torch model needs torch")
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with pytest.raises(secureinfer.ConfigError, match=r"input_shape=\(\.\.\.\)") as info:
        secureinfer.compile(model, "clear")
    assert isinstance(info.value, ValueError)  # old `except ValueError` code still works


def test_encrypt_of_a_wrong_shape_is_an_input_error(net):
    layers, calib = net
    client, _, _ = secureinfer.compile_layers(layers, "clear", calibration=calib).setup()
    with pytest.raises(secureinfer.InputError, match=r"input of shape \(2, 5\) does not "
                                                     r"match the model.s input \(1, 4, 4\)") as info:
        client.encrypt(np.zeros((2, 5)))
    assert isinstance(info.value, secureinfer.SecureInferError)
    assert isinstance(info.value, ValueError)


def test_bad_range_check_and_roles_are_secureinfer_errors(net):
    layers, calib = net
    with pytest.raises(secureinfer.ConfigError, match="range_check='loud'"):
        secureinfer.compile_layers(layers, "clear", calibration=calib, range_check="loud")
    sm = secureinfer.compile_layers(layers, "clear", calibration=calib)
    client, server, _ = sm.setup()
    with pytest.raises(secureinfer.RoleError, match="clear output.*client.decrypt"):
        server.infer(client.encrypt(calib[:1]))


def test_layer_spec_of_wrong_shape_is_an_invalid_layer_error():
    with pytest.raises(secureinfer.InvalidLayerError, match=r"layer fc: input shape \(3,\)"):
        secureinfer.Linear("fc", (3,), weight=np.zeros((2, 4)), bias=np.zeros(2))


class _EncryptingClear(ClearScheme):
    """The clear arithmetic declared as encrypting: the core's HE paths, no cryptography."""

    name = "he_like"
    capabilities = replace(ClearScheme.capabilities, encrypts=True)


def test_he_setup_has_no_authority_and_says_the_server_learns_nothing(net):
    layers, calib = net
    sm = secureinfer.compile_layers(layers, _EncryptingClear(), calibration=calib)
    client, server, authority = sm.setup()
    assert authority is None and client.keys is not None
    assert sm.output == "encrypted" and sm.reveals is None
    assert sm.summary().splitlines()[-1] == "server learns: nothing (encrypted output)"
    x = calib[:2]
    np.testing.assert_allclose(client.decrypt(server.evaluate(client.encrypt(x))),
                               sm.reference(x))


def test_clear_says_it_encrypts_nothing(net):
    layers, calib = net
    sm = secureinfer.compile_layers(layers, "clear", calibration=calib)
    _, _, authority = sm.setup()
    assert authority is None
    assert sm.output == "clear"
    assert sm.reveals == "everything (reference, no encryption)"
    assert sm.summary().splitlines()[-1] == "server learns: everything (reference, no encryption)"
