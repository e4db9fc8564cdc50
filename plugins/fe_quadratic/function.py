"""A quantized degree-2 prefix as the integer quadratic functions quadratic FE evaluates.

Every prefix the scheme runs is, on integers, ``Linear -> p -> Linear``: the layers before
the degree-2 activation compose into one integer affine map, the activation is the
element-wise integer polynomial ``p(h) = q0 + q1 h + q2 h**2`` of ``secureinfer.quant``,
and the layers after it compose into another integer affine map. With ``x' = [1, x_q]``
(the constant coordinate carries the first bias)::

    out_c = sum_h post[c, h] * p(<pre[h], x'>) + post_bias[c]

The maps are read off the quantized layers themselves (``fe_common.integer.affine_map``,
shared with inner-product FE), so ``QuadraticFunction.evaluate`` equals
``QuantizedNetwork.forward_int`` integer for integer, whatever mix of Linear, Conv2d,
AvgPool2d and Flatten surrounds the activation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from secureinfer.errors import CompileError
from secureinfer.quant import QuantizedNetwork

from ..fe_common.integer import affine_map

__all__ = ["QuadraticFunction", "lower"]


@dataclass(frozen=True)
class QuadraticFunction:
    """``out = post @ p(pre @ [1, x]) + post_bias`` on integers.

    Attributes:
        pre: ``(hidden, 1 + inputs)`` int64; column 0 multiplies the constant 1.
        coeffs: ``(q0, q1, q2)``, the activation's integer coefficients.
        post: ``(outputs, hidden)`` int64.
        post_bias: ``(outputs,)`` int64.
        out_shape: shape of one output (the prefix's last layer).
    """

    pre: np.ndarray
    coeffs: tuple[int, int, int]
    post: np.ndarray
    post_bias: np.ndarray
    out_shape: tuple[int, ...]

    @property
    def hidden(self) -> int:
        """Hidden units kept (pruned ones are dropped by ``lower``): one pairing pair per
        unit at decryption."""
        return int(self.pre.shape[0])

    @property
    def outputs(self) -> int:
        """Number of values the server learns per input."""
        return int(self.post.shape[0])

    @property
    def constant(self) -> list[int]:
        """Per output, the coefficient of ``1 * 1``: ``q0 * sum_h post[c, h] + post_bias[c]``."""
        q0 = self.coeffs[0]
        return [q0 * sum(row) + b for row, b in zip(self.post.tolist(), self.post_bias.tolist())]

    def evaluate(self, x_q: np.ndarray) -> np.ndarray:
        """The function on a batch of integer inputs ``(n, *input_shape)``; object ints."""
        flat = np.asarray(x_q).reshape(len(x_q), -1).astype(object)
        ext = np.concatenate([np.ones((len(flat), 1), dtype=object), flat], axis=1)
        h = ext @ self.pre.T.astype(object)
        q0, q1, q2 = self.coeffs
        act = q2 * h * h + q1 * h + q0
        return act @ self.post.T.astype(object) + self.post_bias.astype(object)

    def output_ranges(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Exact ``(min, max)`` of every output over all integer inputs in ``[lo, hi]``.

        Interval arithmetic, exact at each stage: the range of each ``<pre[h], x'>``, of the
        activation on it (endpoints and the integers next to the parabola's vertex), then of
        each output.
        """
        pre = self.pre.astype(object)
        pos, neg = np.maximum(pre[:, 1:], 0), np.minimum(pre[:, 1:], 0)
        h_lo = pre[:, 0] + (pos * lo + neg * hi).sum(axis=1)
        h_hi = pre[:, 0] + (pos * hi + neg * lo).sum(axis=1)
        acts = [_poly_range(self.coeffs, int(a), int(b)) for a, b in zip(h_lo, h_hi)]
        a_lo = np.array([a for a, _ in acts], dtype=object)
        a_hi = np.array([b for _, b in acts], dtype=object)
        post = self.post.astype(object)
        pos, neg = np.maximum(post, 0), np.minimum(post, 0)
        bias = self.post_bias.astype(object)
        o_lo = bias + (pos * a_lo + neg * a_hi).sum(axis=1)
        o_hi = bias + (pos * a_hi + neg * a_lo).sum(axis=1)
        return [(int(a), int(b)) for a, b in zip(o_lo, o_hi)]

    def digest(self) -> str:
        """SHA-256 of every integer: client and server must hold the same function."""
        sha = hashlib.sha256()
        for part in (self.pre, np.asarray(self.coeffs, dtype=object), self.post,
                     self.post_bias, np.asarray(self.out_shape)):
            sha.update(repr(part.shape).encode())
            sha.update(",".join(map(str, part.ravel().tolist())).encode())
        return sha.hexdigest()


def _poly_range(coeffs: tuple[int, int, int], lo: int, hi: int) -> tuple[int, int]:
    """``(min, max)`` of ``q0 + q1 h + q2 h**2`` over the integers ``h`` in ``[lo, hi]``."""
    q0, q1, q2 = coeffs
    points = {lo, hi}
    if q2:
        vertex = -q1 // (2 * q2)  # floor of -q1 / (2 q2)
        points.update(v for v in (vertex, vertex + 1) if lo <= v <= hi)
    values = [q0 + q1 * h + q2 * h * h for h in points]
    return min(values), max(values)


def _activation_index(qnet: QuantizedNetwork) -> int | None:
    """Index of the degree-2 layer, ``None`` for an affine prefix; ``CompileError`` for a
    polynomial of another degree (only one activation, of degree 2, has a place)."""
    for q in qnet.layers:
        if q.spec.kind == "poly" and q.spec.degree != 2:
            raise CompileError(
                f"layer {q.spec.name} ({q.spec.describe()}): fe_quad runs Linear -> one "
                f"degree-2 activation -> Linear; fold this degree-{q.spec.degree} "
                "polynomial into the layer next to it, or remove it")
    found = [i for i, q in enumerate(qnet.layers) if q.spec.degree == 2]
    return found[0] if found else None


def _check_width(qnet: QuantizedNetwork, k: int | None, max_hidden: int) -> int:
    """Units of the activation (of the output for an affine prefix), at most ``max_hidden``."""
    spec = qnet.layers[-1 if k is None else k].spec
    hidden = int(np.prod(spec.out_shape))
    if hidden > max_hidden:
        raise CompileError(
            f"layer {spec.name} ({spec.describe()}): fe_quad decrypts with two pairings per "
            f"unit of the degree-2 activation, and this one has {hidden} units "
            f"(max_hidden={max_hidden}): narrow the layers before it (fewer channels, a "
            "larger stride or pooling), or raise max_hidden if that decryption time is fine")
    return hidden


def lower(qnet: QuantizedNetwork, input_shape: tuple[int, ...],
          max_hidden: int) -> QuadraticFunction:
    """The quantized prefix ``qnet`` as a ``QuadraticFunction``.

    An affine prefix (no degree-2 activation) becomes ``p(h) = h`` with ``post`` the
    identity: one quadratic function (with only linear terms) per output.

    Args:
        qnet: the quantized prefix (degree at most 2, as the partition guarantees).
        input_shape: one input's shape.
        max_hidden: the widest activation accepted (decryption pairs twice per unit).

    Raises:
        CompileError: the activation (or, for an affine prefix, the output) is wider
            than ``max_hidden``, or the prefix holds a polynomial of degree other than 2;
            the message names the layer and what to change.
    """
    k = _activation_index(qnet)
    hidden = _check_width(qnet, k, max_hidden)
    layers = qnet.layers
    if k is None:
        pre_m, pre_c = affine_map(layers, tuple(input_shape))
        coeffs = (0, 1, 0)
        post, post_bias = np.eye(hidden, dtype=np.int64), np.zeros(hidden, dtype=np.int64)
    else:
        pre_m, pre_c = affine_map(layers[:k], tuple(input_shape))
        q0, q1, q2 = (list(layers[k].coeffs) + [0, 0, 0])[:3]
        coeffs = (int(q0), int(q1), int(q2))
        post, post_bias = affine_map(layers[k + 1:], tuple(layers[k].spec.out_shape))
    pre = np.concatenate([pre_c[:, None], pre_m], axis=1)
    if k is not None:
        pre, post, post_bias = _drop_dead_units(pre, coeffs, post, post_bias)
    return QuadraticFunction(pre, coeffs, post, post_bias, tuple(layers[-1].spec.out_shape))


def _drop_dead_units(pre: np.ndarray, coeffs: tuple[int, int, int], post: np.ndarray,
                     post_bias: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Remove the hidden units that cost pairings for nothing (pruned units): those no
    output reads (a zero column of ``post``), and those with an all-zero row of ``pre``,
    whose activation is the constant ``q0``, folded into ``post_bias``. The function is
    unchanged integer for integer; at least one unit is kept."""
    dead_in = ~np.any(pre != 0, axis=1)
    unread = ~np.any(post != 0, axis=0)
    keep = ~(dead_in | unread)
    if not keep.any():
        keep[0] = True
    folded = post_bias + coeffs[0] * post[:, dead_in & ~keep].sum(axis=1)
    return pre[keep], post[:, keep], folded.astype(np.int64)
