"""Group adapters for pymcl's BLS12-381 groups, scalar conversion and element packing.

The FE code is written once against ``GroupOps``, a small adapter that hides whether a
group is written additively (G1, G2: ``+``, ``-``, ``* Fr``) or multiplicatively (GT:
``*``, ``~``, ``** Fr``). Every adapter offers: ``identity()``, ``op(a, b)`` (the group
law), ``inv(a)``, ``pow(a, k)`` (``a`` to an integer ``k`` of any size and sign, reduced
modulo the group order ``r``), ``to_bytes(a)`` (mcl's fixed-size serialization) and
``from_bytes(data)`` (parsing with mcl's checks; ``EnvelopeError`` on malformed bytes).

Serialized sizes: G1 48 bytes (compressed x, little-endian, flags in the top bits of the
last byte), G2 96 bytes, GT 576 bytes (12 Fp coefficients, little-endian). mcl checks
that a G1/G2 point lies on the curve and in the prime-order subgroup when it parses one
(about 55 us per G1 point); it does not check GT membership.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Iterable, Sequence

from secureinfer.errors import EnvelopeError

from .backend import pymcl

__all__ = [
    "GroupOps",
    "fr",
    "fr_to_int",
    "group",
    "group_order",
    "pack_elements",
    "random_scalar",
    "scalars_from_bytes",
    "scalars_to_bytes",
    "unpack_elements",
]


@functools.cache
def group_order() -> int:
    """The prime order ``r`` of G1, G2 and GT (255 bits)."""
    return int(pymcl().r)


def fr(k: int) -> Any:
    """The scalar ``k mod r`` as a ``pymcl.Fr`` (any size and sign)."""
    return pymcl().Fr.deserialize((int(k) % group_order()).to_bytes(32, "little"))


def fr_to_int(x: Any) -> int:
    """A ``pymcl.Fr`` as the integer in ``[0, r)``."""
    return int.from_bytes(x.serialize(), "little")


def random_scalar() -> int:
    """A uniform scalar in ``[0, r)`` from mcl's CSPRNG."""
    return fr_to_int(pymcl().Fr.random())


class GroupOps:
    """One group of the pairing, seen through a uniform interface.

    Attributes:
        name: ``"G1"``, ``"G2"`` or ``"GT"``.
        element_size: bytes of one serialized element.
        cls: the pymcl class of the elements.
        law: the group law as a C-level callable (``operator.add`` or ``operator.mul``),
            for hot loops such as ``itertools.accumulate`` and ``functools.reduce``.
    """

    name: str
    element_size: int
    multiplicative: bool = False

    def __init__(self) -> None:
        self.cls = getattr(pymcl(), self.name)
        self.law = operator.mul if self.multiplicative else operator.add

    def identity(self) -> Any:
        """The neutral element."""
        return self.cls()

    def generator(self) -> Any:
        """mcl's fixed generator of the group (``e(g1, g2)`` for GT)."""
        mcl = pymcl()
        if self.name == "GT":
            return mcl.pairing(mcl.g1, mcl.g2)
        return getattr(mcl, self.name.lower())

    def op(self, a: Any, b: Any) -> Any:
        """The group law: ``a + b`` (G1, G2) or ``a * b`` (GT)."""
        return a * b if self.multiplicative else a + b

    def inv(self, a: Any) -> Any:
        """The inverse: ``-a`` (G1, G2) or ``a**-1`` (GT)."""
        return ~a if self.multiplicative else -a

    def pow(self, a: Any, k: int) -> Any:
        """``a`` to the integer ``k`` (``k * a`` written additively), ``k`` reduced mod r."""
        return a ** fr(k) if self.multiplicative else a * fr(k)

    def to_bytes(self, a: Any) -> bytes:
        """mcl's fixed-size serialization of ``a``."""
        return a.serialize()

    def from_bytes(self, data: bytes) -> Any:
        """Parse one element; ``EnvelopeError`` when ``data`` is not one."""
        if len(data) != self.element_size:
            raise EnvelopeError(f"a {self.name} element is {self.element_size} bytes, "
                                f"got {len(data)}")
        try:
            return self.cls.deserialize(bytes(data))
        except (ValueError, RuntimeError):
            raise EnvelopeError(f"malformed {self.name} element (not a point of the "
                                "BLS12-381 group)") from None

    def __repr__(self) -> str:
        return f"GroupOps({self.name})"


class _G1(GroupOps):
    name = "G1"
    element_size = 48


class _G2(GroupOps):
    name = "G2"
    element_size = 96


class _GT(GroupOps):
    name = "GT"
    element_size = 576
    multiplicative = True


_GROUPS = {"G1": _G1, "G2": _G2, "GT": _GT}


@functools.cache
def group(name: str) -> GroupOps:
    """The adapter for ``"G1"``, ``"G2"`` or ``"GT"`` (built once)."""
    try:
        return _GROUPS[name.upper()]()
    except KeyError:
        raise ValueError(f"unknown group {name!r}; valid: {', '.join(_GROUPS)}") from None


def pack_elements(ops: GroupOps, elements: Iterable[Any]) -> bytes:
    """Concatenate the fixed-size serializations of ``elements``."""
    return b"".join(map(ops.to_bytes, elements))


def unpack_elements(ops: GroupOps, data: bytes, count: int | None = None) -> list[Any]:
    """Parse what ``pack_elements`` wrote; ``EnvelopeError`` on any malformed part.

    Args:
        ops: the group of the elements.
        data: concatenated serializations.
        count: the number of elements expected, if known.
    """
    size = ops.element_size
    if len(data) % size:
        raise EnvelopeError(f"{len(data)} bytes is not a whole number of {ops.name} "
                            f"elements ({size} bytes each)")
    n = len(data) // size
    if count is not None and n != count:
        raise EnvelopeError(f"expected {count} {ops.name} elements, got {n}")
    view = memoryview(data)
    return [ops.from_bytes(view[i * size:(i + 1) * size]) for i in range(n)]


def scalars_to_bytes(values: Sequence[int]) -> bytes:
    """Scalars mod r as concatenated 32-byte little-endian words."""
    r = group_order()
    return b"".join((int(v) % r).to_bytes(32, "little") for v in values)


def scalars_from_bytes(data: bytes, count: int | None = None) -> list[int]:
    """Parse what ``scalars_to_bytes`` wrote; ``EnvelopeError`` when malformed."""
    if len(data) % 32:
        raise EnvelopeError(f"{len(data)} bytes is not a whole number of 32-byte scalars")
    n = len(data) // 32
    if count is not None and n != count:
        raise EnvelopeError(f"expected {count} scalars, got {n}")
    r = group_order()
    out = [int.from_bytes(data[i * 32:(i + 1) * 32], "little") for i in range(n)]
    if any(v >= r for v in out):
        raise EnvelopeError("a scalar is not reduced modulo the group order")
    return out
