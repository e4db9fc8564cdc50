"""Architectures chosen by name: ``mlp`` and ``cnn``.

* ``mlp``: Flatten -> (Linear -> activation) per hidden width -> Linear to the classes.
  The default hidden widths are ``(32,)``: on ``digits`` that is 64 -> 32 -> 10, one degree-2
  activation between two Linear layers, which quadratic FE runs whole.
* ``cnn``: Conv2d (4 channels) -> activation -> Flatten -> (Linear -> activation) per hidden
  width (default ``(64,)``) -> Linear. On 28x28 single-channel inputs the convolution is
  kernel 7, stride 3 (8x8 outputs, 256 features): exactly the network of the TenSEAL MNIST
  benchmark. Other image sizes scale kernel and stride with the side (``cnn_geometry``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from .activations import DEFAULT_RANGE, PolyAct, Square
from ..errors import ConfigError

__all__ = ["ACTIVATIONS", "ARCHS", "activation_module", "build", "cnn_geometry",
           "default_hidden"]

ARCHS = ("mlp", "cnn")
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


def default_hidden(arch: str) -> tuple[int, ...]:
    """Hidden widths used when none are given: ``(32,)`` for mlp, ``(64,)`` for cnn."""
    return (32,) if arch == "mlp" else (64,)


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


def build(arch: str, input_shape: Sequence[int], num_classes: int, activation: str = "poly",
          *, hidden: Sequence[int] | None = None, degree: int = 2,
          input_range: Sequence[float] = DEFAULT_RANGE, norm: bool = False) -> nn.Sequential:
    """Build an untrained ``arch`` network for ``input_shape`` (no batch) images.

    Args:
        arch: ``mlp`` or ``cnn``.
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
    else:
        raise ConfigError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    for i, width in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(features, width)
        act(width)
        features = width
    layers[f"fc{len(hidden) + 1}"] = nn.Linear(features, int(num_classes))
    return nn.Sequential(layers)
