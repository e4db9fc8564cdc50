"""Split a network into the prefix a scheme runs and the suffix run in the clear.

A clear-only layer (ReLU, max-pool, ...: ``LayerSpec.clear_only``) that the scheme does not
declare ends the prefix. It is accepted in the clear suffix of a plaintext-output scheme;
where a secure prefix or an encrypted-output scheme would have to run it, it is an
``UnsupportedLayerError`` that says how to make the network polynomial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import CompileError, UnsupportedLayerError
from .layers import HE_FRIENDLY_HINT, LayerSpec
from .scheme import Capabilities

__all__ = ["Partition", "partition"]


@dataclass(frozen=True)
class Partition:
    """``secure`` runs under the scheme, then ``clear`` runs on the evaluator in the clear."""

    secure: list[LayerSpec]
    clear: list[LayerSpec]
    stop_reason: str | None = None


def _trim_trailing(prefix: list[LayerSpec]) -> list[LayerSpec]:
    """Drop trailing Flatten layers: they move nothing and belong with the clear suffix."""
    while prefix and prefix[-1].kind == "flatten" and len(prefix) > 1:
        prefix = prefix[:-1]
    return prefix


def _refuse_clear_only(layers: list[LayerSpec], cut: int, caps: Capabilities,
                      scheme: str) -> None:
    """A clear-only layer at ``cut`` must land in the clear suffix of a plaintext-output
    scheme, after a non-empty prefix."""
    if cut == len(layers) or not layers[cut].clear_only:
        return
    layer = layers[cut]
    if caps.output == "encrypted":
        where = f"scheme {scheme} has encrypted output and would have to run it encrypted"
    elif all(l.kind == "flatten" for l in layers[:cut]):
        where = (f"no layer before it computes anything, so the secure prefix of {scheme} "
                 "would have to run it")
    else:
        return
    raise UnsupportedLayerError(f"layer {layer.name} ({layer.describe()}) is not a "
                                f"polynomial: {where}; {HE_FRIENDLY_HINT}")


def partition(layers: Sequence[LayerSpec], caps: Capabilities, scheme: str) -> Partition:
    """The longest prefix ``caps`` allows; the rest runs in the clear.

    Raises:
        CompileError: the scheme's output is encrypted and it cannot run every layer, or it
            cannot run even the first layer. The message names the layer and what to change.
    """
    layers = list(layers)
    degree = 1
    cut, reason = len(layers), None
    for i, layer in enumerate(layers):
        if layer.kind not in caps.layers:
            cut, reason = i, (f"{scheme} cannot evaluate {layer.kind} layers "
                              f"(it runs {', '.join(sorted(caps.layers))})")
            break
        if caps.max_degree is not None and degree * layer.degree > caps.max_degree:
            cut, reason = i, (f"{scheme} reaches polynomial degree {caps.max_degree} and this "
                              f"layer would make it {degree * layer.degree}")
            break
        degree *= layer.degree
    _refuse_clear_only(layers, cut, caps, scheme)
    secure = layers[:cut]
    if cut < len(layers) and caps.output == "plaintext":
        secure = _trim_trailing(secure)
    if cut < len(layers) and caps.output == "encrypted":
        raise CompileError(
            f"layer {layers[cut].name} ({layers[cut].describe()}): {reason}. A scheme with "
            "encrypted output must run the whole network: change that layer (e.g. a lower "
            "polynomial degree, average instead of max pooling), or choose a plaintext-output "
            "scheme that runs a prefix")
    if not secure:
        raise CompileError(
            f"layer {layers[0].name} ({layers[0].describe()}): {reason}; scheme {scheme} "
            "cannot run even the first layer of this network")
    return Partition(secure, layers[len(secure):], reason if cut < len(layers) else None)
