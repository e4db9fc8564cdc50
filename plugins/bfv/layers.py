"""The server's layers: each runs its planned step on every plaintext prime's ciphertexts.

A value is a list of *items*, each a list over the plaintext primes: for ``single`` packing
one ciphertext (up to two inputs, one per row), for ``batch`` packing a list of
ciphertexts, one per feature (inputs in the slots). Plaintexts are encoded once, when the
server builds its layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from secureinfer.layers import LayerSpec
from secureinfer.scheme import SecureLayer

from .backend import PrimeContext
from .program import BatchLinearStep, PolyStep, SingleLinearStep, Step

__all__ = ["BfvLayer", "RemoteValue", "ServerContext", "Value", "run_item"]

@dataclass
class Value:
    """Ciphertexts in flight.

    Attributes:
        items: ``[item][prime]``: a ciphertext (``single``, up to two inputs) or a list of
            them, one per feature (``batch``, up to ``N`` inputs).
        samples: how many inputs the items carry.
    """

    items: list[list[Any]]
    samples: int


@dataclass
class RemoteValue:
    """A value held by the worker processes (``workers > 1``), each its primes' share.

    Attributes:
        samples: how many inputs the items carry.
        items: how many items.
    """

    samples: int
    items: int


@dataclass
class ServerContext:
    """What the server holds: one context per prime, with public and evaluation keys only.

    Attributes:
        primes: the contexts (empty when ``pool`` holds them).
        input_size: bytes of one serialized input ciphertext.
        pool: worker processes running the contexts in parallel, or ``None``.
    """

    primes: list[PrimeContext]
    input_size: int = 0
    pool: Any = None
    rerandomizer: Any = None  # rerandomize.Rerandomizer (public keys only), or None


def _row(vec: np.ndarray) -> np.ndarray:
    """A row pattern for both rows of the ciphertext."""
    return np.concatenate([vec, vec])


def _encrypt_at(ctx: PrimeContext, values: np.ndarray, level: int) -> Any:
    ct = ctx.encrypt(values)
    ctx.switch_down(ct, level)
    return ct


class _SingleLinear:
    """Rotated diagonals, baby-step giant-step with packed giant steps, folding."""

    def __init__(self, step: SingleLinearStep, ctx: PrimeContext, level: int) -> None:
        lay = step.layout
        dg, bsgs = lay.diagonals, lay.bsgs
        assert bsgs is not None
        self.ctx, self.level, self.mid_drop = ctx, level, step.drops[0]
        self.sigma, self.baby, self.packed = dg.sigma, bsgs.baby, bsgs.packed
        self.tree_step = bsgs.region + dg.sigma * bsgs.baby
        self.folds = [dg.t_out << k for k in range(int(math.log2(dg.fold)))]
        self.groups: dict[int, list[tuple[int, Any]]] = {}
        for (j, b), vec in sorted(bsgs.plaintexts(dg, lay.row).items()):
            self.groups.setdefault(j, []).append((b, ctx.encode(_row(vec))))
        bias = np.zeros(lay.row, dtype=object)
        reps = lay.row // dg.t_out
        for copy in range(reps):
            bias[copy * dg.t_out + lay.output_slots] = lay.layer.bias
        self.bias = _row(bias)
        self.bias_plain = ctx.encode(self.bias)

    def __call__(self, x: Any) -> Any:
        he = self.ctx.he
        if not self.groups:
            return _encrypt_at(self.ctx, self.bias, self.level + self.mid_drop)
        babies = {b for parts in self.groups.values() for b, _ in parts}
        rotated = {b: he.rotate(x, self.sigma * b, True) if b else x for b in babies}
        sums = {}
        for j, parts in self.groups.items():
            z = None
            for b, plain in parts:
                term = he.multiply_plain(rotated[b], plain, True)
                z = term if z is None else he.add(z, term)
            self.ctx.switch_down(z, self.mid_drop)
            sums[j] = z
        acc = None
        for j, z in sums.items():
            for k in range(int(math.log2(self.packed))):
                z = he.add(z, he.rotate(z, self.tree_step << k, True))
            if j:
                he.rotate(z, self.sigma * self.baby * self.packed * j)
            acc = z if acc is None else he.add(acc, z)
        for step in self.folds:
            acc = he.add(acc, he.rotate(acc, step, True))
        return he.add_plain(acc, self.bias_plain)


class _BatchLinear:
    """``y_i = sum_v v * (sum of x_j with |W_ij| = v, signed) + b_i``: constant products."""

    def __init__(self, step: BatchLinearStep, ctx: PrimeContext, level: int) -> None:
        self.ctx, self.level = ctx, level
        lin = step.layer
        self.rows: list[list[tuple[int, list[int], list[int]]]] = []
        for sl in lin.row_slices():
            cols, vals = lin.cols[sl], lin.vals[sl]
            groups = []
            for v in np.unique(np.abs(vals)):
                groups.append((int(v), cols[vals == v].tolist(), cols[vals == -v].tolist()))
            self.rows.append(groups)
        self.bias = [ctx.signed(b) for b in step.layer.bias]
        self.bias_plain = [ctx.encode_constant(b) for b in self.bias]

    def _signed_sum(self, x: Sequence[Any], pos: list[int], neg: list[int]) -> Any:
        he = self.ctx.he
        if pos:
            acc = x[pos[0]].copy()
            rest = pos[1:]
        else:
            acc = he.negate(x[neg[0]], True)
            neg = neg[1:]
            rest = []
        for j in rest:
            he.add(acc, x[j])
        for j in neg:
            he.sub(acc, x[j])
        return acc

    def __call__(self, x: Sequence[Any]) -> list[Any]:
        he = self.ctx.he
        out = []
        for groups, b, b_plain in zip(self.rows, self.bias, self.bias_plain):
            acc = None
            for v, pos, neg in groups:
                term = self.ctx.times(self._signed_sum(x, pos, neg), v)
                if term is not None:
                    acc = term if acc is None else he.add(acc, term)
            if acc is None:
                acc = _encrypt_at(self.ctx, np.full(self.ctx.slots, b, np.int64), self.level)
            else:
                he.add_plain(acc, b_plain)
            out.append(acc)
        return out


class _Poly:
    """``sum_k q_k x**k``: powers by products (depth ``ceil(log2 d)``), constants as ``|c|``."""

    def __init__(self, step: PolyStep, ctx: PrimeContext, level: int) -> None:
        self.step, self.ctx, self.level = step, ctx, level
        self.constant = np.full(ctx.slots, ctx.signed(step.coeffs[0]), np.int64)
        self.constant_plain = ctx.encode(self.constant)

    def _product(self, a: Any, b: Any) -> Any:
        he = self.ctx.he
        out = he.square(a, True) if a is b else he.multiply(a, b, True)
        he.relinearize(out)
        return out

    def one(self, x: Any) -> Any:
        """The polynomial on one ciphertext."""
        if self.step.is_square:
            return self._product(x, x)
        powers = {1: x}
        for k in range(2, self.step.degree + 1):
            a, b = self.step.factors(k)
            powers[k] = self._product(powers[a], powers[b])
        acc = None
        for k, c in enumerate(self.step.coeffs):
            term = self.ctx.times(powers[k], c) if k and c else None
            if term is not None:
                acc = term if acc is None else self.ctx.he.add(acc, term)
        if acc is None:
            return _encrypt_at(self.ctx, self.constant, self.level)
        return self.ctx.he.add_plain(acc, self.constant_plain)

    def __call__(self, x: Any) -> Any:
        return [self.one(c) for c in x] if isinstance(x, list) else self.one(x)


class BfvLayer(SecureLayer):
    """One planned step, on every plaintext prime; modulus switching after it if planned."""

    def __init__(self, spec: LayerSpec, ctx: ServerContext, scheme: Any) -> None:
        super().__init__(spec, ctx, scheme)
        self.step: Step = scheme.step_of(spec)
        self.index = scheme.index_of(spec)
        level = scheme.level_before(spec)
        self.ops = [self.build_op(self.step, prime, level) for prime in ctx.primes]

    @staticmethod
    def build_op(step: Step, prime: PrimeContext, level: int) -> Any:
        """The callable that runs ``step`` on one prime's ciphertexts (``None``: nothing)."""
        if isinstance(step, SingleLinearStep):
            return _SingleLinear(step, prime, level)
        if isinstance(step, BatchLinearStep):
            return _BatchLinear(step, prime, level)
        if isinstance(step, PolyStep):
            return _Poly(step, prime, level)
        return None

    def forward(self, value: Value | RemoteValue) -> Value | RemoteValue:
        if isinstance(value, RemoteValue):
            self.ctx.pool.run_layer(self.index, self.spec.name)
            return value
        return Value([run_item(self.ops, self.ctx.primes, item, self.step.last_drop)
                      for item in value.items], value.samples)


def run_item(ops: Sequence[Any], primes: Sequence[PrimeContext], item: list[Any],
             drop: int) -> list[Any]:
    """One step on one item (one op per prime), then ``drop`` coefficient primes dropped
    (the server process and its workers both run steps this way)."""
    res = [op(v) if op is not None else v for op, v in zip(ops, item)]
    for prime, v in zip(primes, res):
        for ct in (v if isinstance(v, list) else [v]):
            prime.switch_down(ct, drop)
    return res
