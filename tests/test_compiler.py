"""Lowering torch models to LayerSpecs, and the float reference of every layer kind."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is a core dependency; install secureinfer")
from torch import nn  # noqa: E402

import secureinfer  # noqa: E402
from secureinfer.compiler import lower  # noqa: E402
from secureinfer.errors import CompileError, UnsupportedLayerError  # noqa: E402
from secureinfer.layers import forward  # noqa: E402


class Sq(nn.Module):
    def forward(self, x):
        return x * x

    def secureinfer_poly(self):
        return (0.0, 0.0, 1.0)


class Functional(nn.Module):
    """Uses functional ops and tensor methods rather than modules."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.pool(self.bn(self.conv(x)).pow(2))
        x = x.view(x.size(0), -1)
        return self.fc(torch.square(x))


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), Sq(),
                           nn.Dropout(0.2), nn.Linear(8, 3)), (1, 4, 4)),
    (lambda: Functional(), (1, 8, 8)),
])
def test_lowered_network_matches_torch(make, shape):
    torch.manual_seed(0)
    model = make()
    _randomize_bn(model)
    model.eval()
    layers = lower(model, shape)
    assert not any(type(l).__name__ == "BatchNorm" for l in layers)
    x = np.random.default_rng(0).random((5, *shape))
    with torch.no_grad():
        want = model(torch.tensor(x, dtype=torch.float64).float()).double().numpy()
    np.testing.assert_allclose(forward(layers, x), want, rtol=1e-4, atol=1e-4)


def test_kinds_and_shapes():
    layers = lower(Functional(), (1, 8, 8))
    assert [l.kind for l in layers] == ["conv2d", "poly", "avgpool2d", "flatten", "poly",
                                        "linear"]
    assert layers[0].out_shape == (3, 4, 4) and layers[2].out_shape == (3, 2, 2)


@pytest.mark.parametrize("bad, word", [
    (nn.ReLU(), "ReLU"), (nn.MaxPool2d(2), "MaxPool2d"), (nn.Sigmoid(), "Sigmoid")])
def test_non_polynomial_layer_says_how_to_fix(bad, word):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), bad, nn.Flatten())
    with pytest.raises(UnsupportedLayerError) as info:
        secureinfer.compile(model, "clear", input_shape=(1, 8, 8))
    msg = str(info.value)
    assert word in msg and "make_he_friendly" in msg and "layer 1" in msg


def test_functional_relu_rejected():
    class F(nn.Module):
        def forward(self, x):
            return torch.relu(x)

    assert [l.kind for l in lower(F(), (4,))] == ["relu"]  # a clear-only layer
    with pytest.raises(UnsupportedLayerError, match="ReLU.*make_he_friendly"):
        secureinfer.compile(F(), "clear", input_shape=(4,))


def test_batchnorm_first_cannot_fold():
    with pytest.raises(UnsupportedLayerError, match="BatchNorm"):
        lower(nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)), (4,))


def test_compile_needs_input_shape():
    with pytest.raises(ValueError, match="input_shape"):
        secureinfer.compile(nn.Sequential(nn.Linear(4, 2)), "clear")


def test_linear_after_image_needs_flatten():
    with pytest.raises(UnsupportedLayerError, match="Flatten"):
        lower(nn.Sequential(nn.Linear(4, 2)), (1, 2, 2))


def test_conv_as_matrix_equals_conv(rng):
    conv = secureinfer.Conv2d("c", (2, 6, 6), weight=rng.normal(size=(3, 2, 3, 3)),
                              bias=rng.normal(size=3), stride=(2, 2), padding=(1, 1))
    mat, bias = conv.as_matrix()
    x = rng.random((4, 2, 6, 6))
    np.testing.assert_allclose(x.reshape(4, -1) @ mat.T + bias,
                               conv.forward(x).reshape(4, -1), atol=1e-12)


def test_poly_horner_and_degree():
    p = secureinfer.Poly("p", (3,), coeffs=(1.0, -2.0, 0.5, 0.0))
    assert p.degree == 2 and p.coeffs == (1.0, -2.0, 0.5)
    x = np.array([[0.0, 1.0, -2.0]])
    np.testing.assert_allclose(p.forward(x), 1 - 2 * x + 0.5 * x * x)


def test_compile_error_for_encrypted_output_names_layer(rng):
    from secureinfer.partition import partition
    from secureinfer.scheme import Capabilities

    layers = [secureinfer.Linear("fc1", (4,), weight=rng.normal(size=(3, 4)), bias=np.zeros(3)),
              secureinfer.Poly("act", (3,))]
    caps = Capabilities(layers=frozenset({"linear"}), output="encrypted", tolerance=1)
    with pytest.raises(CompileError, match="layer act"):
        partition(layers, caps, "he")
    caps = Capabilities(layers=frozenset({"linear", "poly"}), max_degree=1, output="plaintext",
                        exact=True)
    part = partition(layers, caps, "fe")
    assert [l.name for l in part.secure] == ["fc1"] and [l.name for l in part.clear] == ["act"]
    assert "degree 1" in part.stop_reason


@pytest.mark.parametrize("make, pattern", [
    (lambda L: L.AvgPool2d("pool", (1, 4, 4), kernel=5, stride=1),
     r"layer pool: avg-pool kernel 5x5 is larger than its \(padded\) input 4x4"),
    (lambda L: L.AvgPool2d("pool", (1, 4, 4), kernel=0, stride=1),
     r"layer pool: avg-pool kernel \(0, 0\), stride \(1, 1\).*at least 1"),
    (lambda L: L.AvgPool2d("pool", (1, 4, 4), kernel=2, stride=0),
     r"layer pool: avg-pool kernel \(2, 2\), stride \(0, 0\)"),
    (lambda L: L.AvgPool2d("pool", (4, 4), kernel=2, stride=2),
     r"layer pool: input shape \(4, 4\) is not \(C, H, W\)"),
    (lambda L: L.MaxPool2d("mp", (1, 4, 4), kernel=2, stride=0),
     r"layer mp: max-pool kernel \(2, 2\), stride \(0, 0\)"),
    (lambda L: L.Conv2d("c", (1, 6, 6), weight=np.ones((2, 1, 3, 3)), bias=np.zeros(2),
                        stride=(0, 1)), r"layer c: conv2d kernel \(3, 3\), stride \(0, 1\)"),
    (lambda L: L.Conv2d("c", (1, 6, 6), weight=np.ones((2, 1, 3, 3)), bias=np.zeros(2),
                        padding=(-1, 0)), r"layer c: conv2d .*padding \(-1, 0\)"),
    (lambda L: L.Conv2d("c", (1, 6, 6), weight=np.ones((2, 1, 3, 3)), bias=np.zeros(3)),
     r"layer c: bias shape \(3,\) != \(2,\)"),
])
def test_window_layers_check_kernel_stride_padding_and_bias(make, pattern):
    from secureinfer import layers as L
    from secureinfer.errors import InvalidLayerError

    with pytest.raises(InvalidLayerError, match=pattern):
        make(L)


def test_a_manifest_with_stride_zero_is_an_artifact_error(tmp_path):
    import json

    from secureinfer.testing import NETWORKS, inputs

    layers = NETWORKS["cnn"](np.random.default_rng(0))
    sm = secureinfer.compile_layers(layers, "clear", calibration=inputs(layers, 8, seed=1))
    sm.save(tmp_path)
    manifest = tmp_path / "server" / "manifest.json"
    doc = json.loads(manifest.read_text())
    pool = next(i for i, e in enumerate(doc["layers"]) if e["kind"] == "avgpool2d")
    doc["layers"][pool]["fields"]["stride"] = 0
    manifest.write_text(json.dumps(doc))
    with pytest.raises(secureinfer.ArtifactError, match=rf"layers\[{pool}\]: a avgpool2d layer "
                                                       r"cannot be built.*stride \(0, 0\)"):
        secureinfer.load_server(tmp_path)
