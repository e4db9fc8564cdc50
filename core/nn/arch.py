"""Architectures chosen by name: ``mlp``, ``cnn``, ``lenet5`` and ``alexnet``.

* ``mlp``: Flatten -> (Linear -> activation) per hidden width -> Linear to the classes.
  The default hidden widths are ``(32,)``: on ``digits`` that is 64 -> 32 -> 10, one degree-2
  activation between two Linear layers, which quadratic FE runs whole.
* ``cnn``: Conv2d (4 channels) -> activation -> Flatten -> (Linear -> activation) per hidden
  width (default ``(64,)``) -> Linear. On 28x28 single-channel inputs the convolution is
  kernel 7, stride 3 (8x8 outputs, 256 features): exactly the network of the TenSEAL MNIST
  benchmark. Other image sizes scale kernel and stride with the side (``cnn_geometry``).
* ``lenet5``: Conv2d c->6 k5 p2 -> activation -> AvgPool 2 -> Conv2d 6->16 k5 -> activation
  -> AvgPool 2 -> Flatten -> (Linear -> activation) per hidden width (default ``(120, 84)``)
  -> Linear: on 28x28 inputs 400 -> 120 -> 84 -> 10, LeNet-5 with HE-friendly activations.
* ``alexnet``: an HE-friendly AlexNet-style network for 64x64 images (any side >= 32):
  Conv2d c->6 k5 s2 p2, AvgPool 2, Conv2d 6->16 k3 p1, AvgPool 2, three Conv2d k3 p1
  (16->32, 32->32, 32->32), AvgPool 2, an activation after every convolution, then
  (Linear -> activation) per hidden width (default ``(128,)``) -> Linear. Small enough
  that one image fits one CKKS ciphertext at N=16384 (``ckks`` grid layouts).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from torch import nn

from .activations import DEFAULT_RANGE, PolyAct, Square
from ..errors import ConfigError

__all__ = ["ACTIVATIONS", "ARCHS", "activation_module", "build", "cnn_geometry",
           "conv_activations", "default_hidden"]

ARCHS = ("mlp", "cnn", "lenet5", "alexnet")
ACTIVATIONS = ("relu", "square", "poly")
_CNN_CHANNELS = 4


def activation_module(kind: str, degree: int = 2,
                      input_range: Sequence[float] = DEFAULT_RANGE) -> nn.Module:
    """A fresh activation: ``relu``, ``square`` or ``poly`` (ReLU-fit ``PolyAct``)."""
    if kind == "relu":
        return nn.ReLU()
    if kind == "square":
        return Square(input_range)
    if kind == "poly":
        return PolyAct(degree, "relu", input_range)
    raise ConfigError(f"unknown activation {kind!r}; valid: {', '.join(ACTIVATIONS)}")


_HIDDEN = {"mlp": (32,), "cnn": (64,), "lenet5": (120, 84), "alexnet": (128,)}
#: (out channels, kernel, stride, padding, avg-pool after) of the convolutional archs
_CONVS = {
    "lenet5": ((6, 5, 1, 2, True), (16, 5, 1, 0, True)),
    "alexnet": ((6, 5, 2, 2, True), (16, 3, 1, 1, True), (32, 3, 1, 1, False),
                (32, 3, 1, 1, False), (32, 3, 1, 1, True)),
}


def default_hidden(arch: str) -> tuple[int, ...]:
    """Hidden widths used when none are given: ``(32,)`` for mlp, ``(64,)`` for cnn,
    ``(120, 84)`` for lenet5, ``(128,)`` for alexnet."""
    return _HIDDEN.get(arch, (64,))


def conv_activations(arch: str) -> int:
    """Activations after convolutions in ``arch`` (0 for mlp)."""
    return {"mlp": 0, "cnn": 1}.get(arch, len(_CONVS.get(arch, ())))


def cnn_geometry(height: int, width: int) -> tuple[int, int]:
    """Kernel and stride of the ``cnn`` convolution for a ``height`` x ``width`` image.

    Proportionate to the TenSEAL MNIST network (kernel 7, stride 3 on 28x28):
    ``kernel = max(3, round(side / 4))``, ``stride = max(1, round(3 * side / 28))``.
    8x8 inputs get kernel 3, stride 1.
    """
    side = min(height, width)
    kernel = min(side, max(3, round(side / 4)))
    stride = max(1, round(3 * side / 28))
    return kernel, stride


def _conv_stack(arch: str, shape: tuple[int, ...], layers: OrderedDict[str, nn.Module],
                act: Callable[[int, type[nn.Module]], None]) -> int:
    """Append ``arch``'s convolutions, activations and pools; the flattened width."""
    channels, h, w = shape
    if arch == "alexnet" and min(h, w) < 32:
        raise ValueError(f"alexnet needs images of at least 32x32 (got {h}x{w}); use lenet5")
    for i, (out, k, stride, pad, pool) in enumerate(_CONVS[arch], start=1):
        layers[f"conv{i}"] = nn.Conv2d(channels, out, k, stride, pad)
        h, w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        if h < 1 or w < 1:
            raise ValueError(f"{arch}: input {shape} is too small for conv{i} (kernel {k})")
        act(out, nn.BatchNorm2d)
        if pool:
            layers[f"pool{i}"] = nn.AvgPool2d(2)
            h, w = h // 2, w // 2
        channels = out
    layers["flatten"] = nn.Flatten()
    return channels * h * w


def build(arch: str, input_shape: Sequence[int], num_classes: int, activation: str = "poly",
          *, hidden: Sequence[int] | None = None, degree: int = 2,
          input_range: Sequence[float] = DEFAULT_RANGE, norm: bool = False) -> nn.Sequential:
    """Build an untrained ``arch`` network for ``input_shape`` (no batch) images.

    Args:
        arch: ``mlp``, ``cnn``, ``lenet5`` or ``alexnet``.
        input_shape: ``(channels, height, width)``.
        num_classes: outputs of the last Linear layer.
        activation: ``relu``, ``square`` or ``poly``.
        hidden: hidden Linear widths (see ``default_hidden``); at least one for mlp.
        degree: degree of ``poly`` activations.
        input_range: declared input range of every activation.
        norm: a BatchNorm before every activation (range control by normalisation; folded
            into the layer before it at compile time).

    Raises:
        ValueError: an unknown arch or activation, or an input shape it cannot take.
    """
    hidden = tuple(int(h) for h in (default_hidden(arch) if hidden is None else hidden))
    if any(h < 1 for h in hidden):
        raise ConfigError(f"hidden widths must be positive, got {hidden}")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3:
        raise ConfigError(f"input shape {shape} is not (channels, height, width)")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    n_act = 0

    def act(features: int, norm_type: type[nn.Module] = nn.BatchNorm1d) -> None:
        nonlocal n_act
        n_act += 1
        if norm:
            layers[f"norm{n_act}"] = norm_type(features)
        layers[f"act{n_act}"] = activation_module(activation, degree, input_range)

    if arch == "mlp":
        if not hidden:
            raise ConfigError("mlp needs at least one hidden layer (e.g. hidden=(32,))")
        layers["flatten"] = nn.Flatten()
        features = shape[0] * shape[1] * shape[2]
    elif arch == "cnn":
        kernel, stride = cnn_geometry(shape[1], shape[2])
        layers["conv1"] = nn.Conv2d(shape[0], _CNN_CHANNELS, kernel, stride)
        act(_CNN_CHANNELS, nn.BatchNorm2d)
        layers["flatten"] = nn.Flatten()
        oh = (shape[1] - kernel) // stride + 1
        ow = (shape[2] - kernel) // stride + 1
        features = _CNN_CHANNELS * oh * ow
    elif arch in _CONVS:
        features = _conv_stack(arch, shape, layers, act)
    else:
        raise ConfigError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    for i, width in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(features, width)
        act(width)
        features = width
    layers[f"fc{len(hidden) + 1}"] = nn.Linear(features, int(num_classes))
    return nn.Sequential(layers)
