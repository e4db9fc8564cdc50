"""secureinfer.nn: polynomial activations, architectures and make_he_friendly."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="secureinfer.nn needs torch")
import secureinfer
import torch.nn.functional as F
from secureinfer.compiler import lower
from secureinfer.errors import UnsupportedLayerError
from secureinfer.layers import Conv2d, Flatten, Linear, Poly
from secureinfer.nn import (
    PolyAct,
    Square,
    build,
    cnn_geometry,
    make_he_friendly,
    relu_fit,
)
from torch import nn


def test_relu_fit_is_the_least_squares_fit():
    # On [-1, 1] the L2 projection of ReLU onto degree-2 polynomials is 3/32 + x/2 + 15/32 x^2.
    c = relu_fit(2, (-1, 1))
    assert c == pytest.approx((3 / 32, 0.5, 15 / 32), abs=5e-4)  # 2001-point grid
    # The fit scales with the range: relu(x) = B relu(x / B).
    assert relu_fit(2, (-4, 4)) == pytest.approx((4 * 3 / 32, 0.5, 15 / 32 / 4), abs=1e-3)
    xs = np.linspace(-3, 5, 400)
    fit4 = np.polynomial.polynomial.polyval(xs, relu_fit(4, (-3, 5)))
    fit2 = np.polynomial.polynomial.polyval(xs, relu_fit(2, (-3, 5)))
    assert np.abs(fit4 - np.maximum(xs, 0)).mean() < np.abs(fit2 - np.maximum(xs, 0)).mean()


def test_polyact_inits_forward_and_lowering():
    sq = PolyAct(2, init="square")
    assert sq.secureinfer_poly() == (0.0, 0.0, 1.0)
    p = PolyAct(3, init="relu", input_range=(-2, 2))
    x = torch.linspace(-2, 2, 11)
    expected = np.polynomial.polynomial.polyval(x.numpy(), p.secureinfer_poly())
    assert torch.allclose(p(x), torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    assert all(type(c) is float for c in p.secureinfer_poly())
    assert p.coeffs.requires_grad  # trainable
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), p, nn.Linear(3, 2), Square())
    layers = lower(model, (1, 2, 2))
    assert isinstance(layers[2], Poly) and layers[2].coeffs == pytest.approx(p.secureinfer_poly())
    assert layers[-1].is_square
    with pytest.raises(ValueError):
        PolyAct(2, init="gelu")


def test_blended_polyact_does_not_compile():
    p = PolyAct(2)
    p.blend = 0.5
    x = torch.linspace(-3, 3, 7)
    assert torch.allclose(p(x), 0.5 * torch.relu(x) + 0.5 * torch.tensor(
        np.polynomial.polynomial.polyval(x.numpy(), p.coeffs.detach().numpy()),
        dtype=torch.float32))
    with pytest.raises(UnsupportedLayerError, match="blend"):
        secureinfer.compile(nn.Sequential(nn.Linear(2, 2), p), "clear", input_shape=(2,))


def test_cnn_on_28x28_is_the_tenseal_mnist_network():
    model = build("cnn", (1, 28, 28), 10, "square")
    layers = lower(model, (1, 28, 28))
    conv, act1, flat, fc1, act2, fc2 = layers
    assert isinstance(conv, Conv2d) and conv.weight.shape == (4, 1, 7, 7)
    assert conv.stride == (3, 3) and conv.padding == (0, 0)
    assert isinstance(flat, Flatten) and flat.out_shape == (256,)
    assert isinstance(fc1, Linear) and fc1.weight.shape == (64, 256)
    assert isinstance(fc2, Linear) and fc2.weight.shape == (10, 64)
    assert act1.is_square and act2.is_square
    assert cnn_geometry(8, 8) == (3, 1)


def test_mlp_hidden_layers_and_norm():
    model = build("mlp", (1, 8, 8), 10, "poly", hidden=(16, 8), norm=True)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Flatten", "Linear", "BatchNorm1d", "PolyAct", "Linear", "BatchNorm1d",
                     "PolyAct", "Linear"]
    # BatchNorm folds away: the lowered network has only Linear and Poly layers.
    assert [spec.kind for spec in lower(model, (1, 8, 8))] == [
        "flatten", "linear", "poly", "linear", "poly", "linear"]
    with pytest.raises(ValueError, match="arch"):
        build("resnet", (1, 8, 8), 10)


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(48, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(x.flatten(1).relu())


def test_make_he_friendly_replaces_modules_and_keeps_weights():
    torch.manual_seed(0)
    relu_net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(18, 4), nn.ReLU(), nn.Linear(4, 3))
    he = make_he_friendly(relu_net, "poly", degree=3)
    assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in he.modules())
    assert isinstance(he[1], PolyAct) and he[1].degree == 3
    assert isinstance(he[2], nn.AvgPool2d) and he[2].kernel_size == 2
    assert torch.equal(he[0].weight, relu_net[0].weight)
    assert isinstance(relu_net[1], nn.ReLU)  # the original is untouched
    secureinfer.compile(he, "clear", input_shape=(1, 8, 8))
    sq = make_he_friendly(relu_net, "square")
    assert isinstance(sq[5], Square)


def test_make_he_friendly_rewrites_functional_calls():
    torch.manual_seed(0)
    net = _Functional()
    x = torch.rand(16, 1, 8, 8)
    with pytest.raises(UnsupportedLayerError):
        secureinfer.compile(net, "clear", input_shape=(1, 8, 8))
    he = make_he_friendly(net, data=x)
    kinds = [spec.kind for spec in lower(he, (1, 8, 8))]
    assert kinds == ["conv2d", "poly", "avgpool2d", "flatten", "poly", "linear"]
    # Blend 0 is exactly the ReLU network with average pooling in place of max pooling.
    ref = net.fc(F.avg_pool2d(F.relu(net.conv(x)), 2).flatten(1).relu())
    start = make_he_friendly(net, data=x, blend=0.0)
    assert torch.allclose(start(x), ref, atol=1e-6)


def test_make_he_friendly_fits_on_observed_ranges():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].weight.mul_(20)
    x = torch.rand(256, 4)
    he = make_he_friendly(net, data=x)
    pre = net[0](x).detach()
    lo, hi = he[1].input_range
    mean, std = float(pre.mean()), float(pre.std())
    assert lo == pytest.approx(max(mean - 3 * std, float(pre.min())), rel=1e-3, abs=1e-3)
    assert hi == pytest.approx(min(mean + 3 * std, float(pre.max())), rel=1e-3, abs=1e-3)
    assert he[1].secureinfer_poly() == pytest.approx(relu_fit(2, (lo, hi)), rel=1e-4)
    # Fitted where the data lies, it tracks ReLU better than the default range's fit.
    err_fit = (he[1](pre) - torch.relu(pre)).abs().mean()
    err_default = (PolyAct(2)(pre) - torch.relu(pre)).abs().mean()
    assert err_fit < err_default
