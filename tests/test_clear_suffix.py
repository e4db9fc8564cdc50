"""Non-polynomial layers (ReLU, max-pool, sigmoid, tanh, softmax) in the clear suffix of
plaintext-output schemes, and refused wherever a secure prefix or HE would run them."""

from __future__ import annotations

import numpy as np
import pytest

import secureinfer
from secureinfer.errors import UnsupportedLayerError
from secureinfer.layers import (Flatten, Linear, MaxPool2d, ReLU, Sigmoid, Softmax, Tanh,
                                forward)
from secureinfer.partition import partition
from secureinfer.scheme import Capabilities

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import secureinfer.compiler  # noqa: E402 - the torch lowering, not imported by the package

_FE_LIKE = Capabilities(layers=frozenset({"linear", "flatten", "conv2d"}), max_degree=1,
                        output="plaintext", exact=True)
_HE_LIKE = Capabilities(layers=frozenset({"linear", "flatten", "conv2d", "poly"}),
                        output="encrypted")


def test_clear_only_layers_match_torch(rng):
    x = rng.normal(size=(4, 2, 7, 7)) * 3
    t = torch.tensor(x)
    pool = MaxPool2d("p", (2, 7, 7), kernel=3, stride=2, padding=1)
    np.testing.assert_allclose(pool.forward(x), nn.MaxPool2d(3, 2, 1)(t).numpy(), atol=0)
    flat = x.reshape(4, -1)
    tf = torch.tensor(flat)
    for spec, ref in ((ReLU("r", flat.shape[1:]), torch.relu(tf)),
                      (Sigmoid("s", flat.shape[1:]), torch.sigmoid(tf)),
                      (Tanh("t", flat.shape[1:]), torch.tanh(tf)),
                      (Softmax("m", flat.shape[1:]), torch.softmax(tf, 1))):
        assert spec.clear_only
        np.testing.assert_allclose(spec.forward(flat), ref.numpy(), rtol=1e-12, atol=1e-15)
    # No overflow warning or NaN for large inputs.
    big = np.array([[-1e4, 0.0, 1e4]])
    assert np.all(np.isfinite(Sigmoid("s", (3,)).forward(big)))
    assert np.all(np.isfinite(Softmax("m", (3,)).forward(big)))


def _relu_net(rng):
    return [Flatten("flatten", (1, 2, 2)),
            Linear("fc1", (4,), weight=rng.normal(size=(3, 4)), bias=np.zeros(3)),
            ReLU("act", (3,)),
            Linear("fc2", (3,), weight=rng.normal(size=(2, 3)), bias=np.zeros(2))]


def test_partition_puts_clear_only_layers_in_the_clear_suffix(rng):
    layers = _relu_net(rng)
    part = partition(layers, _FE_LIKE, "fe_like")
    assert [l.name for l in part.secure] == ["flatten", "fc1"]
    assert [l.name for l in part.clear] == ["act", "fc2"]


def test_partition_refuses_clear_only_layers_under_encrypted_output(rng):
    with pytest.raises(UnsupportedLayerError) as info:
        partition(_relu_net(rng), _HE_LIKE, "he_like")
    msg = str(info.value)
    assert "layer act" in msg and "ReLU" in msg and "encrypted output" in msg
    assert "make_he_friendly" in msg and "--activation poly" in msg


@pytest.mark.parametrize("first", [0, 1])
def test_partition_refuses_a_clear_only_layer_the_prefix_would_run(rng, first):
    layers = [Flatten("flatten", (1, 2, 2)), ReLU("act", (4,)),
              Linear("fc", (4,), weight=rng.normal(size=(2, 4)), bias=np.zeros(2))]
    layers = layers[first:] if first else [ReLU("act", (4,)), *layers[2:]]
    with pytest.raises(UnsupportedLayerError, match="layer act .*secure prefix.*make_he_friendly"):
        partition(layers, _FE_LIKE, "fe_like")


def _torch_relu_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(27, 8), nn.Tanh(), nn.Linear(8, 10), nn.Softmax(dim=1)).eval()


def test_torch_lowering_of_clear_only_modules_and_functions(rng):
    model = _torch_relu_cnn()
    layers = secureinfer.compiler.lower(model, (1, 8, 8))
    assert [l.kind for l in layers] == ["conv2d", "relu", "maxpool2d", "flatten", "linear",
                                        "tanh", "linear", "softmax"]
    x = rng.random((5, 1, 8, 8))
    with torch.no_grad():
        want = model(torch.tensor(x).float()).double().numpy()
    np.testing.assert_allclose(forward(layers, x), want, atol=1e-5)

    class Functional(nn.Module):
        def forward(self, x):
            x = torch.nn.functional.max_pool2d(torch.relu(x), 2)
            return x.flatten(1).sigmoid()

    kinds = [l.kind for l in secureinfer.compiler.lower(Functional(), (1, 4, 4))]
    assert kinds == ["relu", "maxpool2d", "flatten", "sigmoid"]


def test_unsupported_max_pool_geometry_is_named():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, dilation=2))
    with pytest.raises(UnsupportedLayerError, match="layer 1: MaxPool2d"):
        secureinfer.compiler.lower(model, (1, 8, 8))


@pytest.mark.parametrize("scheme", ["clear", "ckks", "bfv"])
def test_he_schemes_refuse_a_relu_model_at_compile_time(scheme, digits):
    model = _torch_relu_cnn()
    cls = secureinfer.get_registry().get(scheme)
    if cls.availability():
        pytest.skip(f"{scheme}: {cls.availability()}")
    with pytest.raises(UnsupportedLayerError, match="layer 1 .*ReLU.*make_he_friendly"):
        secureinfer.compile(model, scheme, input_shape=(1, 8, 8),
                            calibration=digits.x_train[:64])


@pytest.mark.parametrize("scheme", ["fe-ip", "fe-quad"])
def test_fe_schemes_run_a_relu_max_pool_suffix(scheme, digits):
    pytest.importorskip("pymcl", reason="FE needs pymcl: pip install secureinfer[fe]")
    model = _torch_relu_cnn()
    sm = secureinfer.compile(model, scheme, input_shape=(1, 8, 8),
                             calibration=digits.x_train[:128])
    assert [l.kind for l in sm.secure_layers] == ["conv2d"]
    assert sm.clear_layers[0].kind == "relu" and sm.clear_layers[1].kind == "maxpool2d"
    client, server, _ = sm.setup()
    x = digits.x_test[:2]
    got = client.decrypt(server.evaluate(client.encrypt(x)))
    np.testing.assert_allclose(got, sm.reference(x), atol=1e-9)
    assert np.array_equal(got.argmax(1), sm.predict_clear(x).argmax(1))
