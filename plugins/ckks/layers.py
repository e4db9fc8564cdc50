"""Server-side evaluation: the level/scale schedule, kernels and the ``SecureLayer``.

Scales are managed exactly. A plaintext multiplied into a ciphertext at chain index ``c``
is encoded at scale ``target * q_c / scale_in``, so that after the rescale by ``q_c`` the
result has exactly the scale the next stage wants: ``2^scale_bits``, or
``sqrt(2^scale_bits * q)`` before a folded square so the square lands on ``2^scale_bits``.
A lazy square is not rescaled: ``x^2`` stays at ``2^(2*scale_bits)`` on its level, and the
affine stage after it encodes its weights at ``2^scale_bits * q / 2^(2*scale_bits)`` for
its prime ``q`` of ``2*scale_bits`` bits.
"""

from __future__ import annotations

import abc
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from secureinfer.errors import EnvelopeError
from secureinfer.layers import LayerSpec
from secureinfer.scheme import SecureLayer

from .backend import Seal
from .grid import GridPlan, RotPlan
from .native import Sums
from .program import Affine, Polynomial, Program, SingleLayout
from .search import DenseLayouts

__all__ = ["CKKSLayer", "RotationKernel", "ServerContext", "Step", "Value", "schedule"]

_CLOSE = 1e-9


@dataclass(frozen=True)
class Step:
    """Where a stage starts and ends: chain index and scale, and its plaintext scale."""

    level_in: int
    scale_in: float
    level_out: int
    scale_out: float
    plain_scale: float = 0.0


def _power_schedule(level: int, scale: float, degree: int,
                    primes: list[int]) -> dict[int, tuple[int, float]]:
    """Level and scale of ``x^k`` for ``k <= degree``, each built as
    ``x^(2^j) * x^(k - 2^j)`` (depth ``ceil(log2 k)``)."""
    powers = {1: (level, scale)}

    def build(k: int) -> tuple[int, float]:
        if k not in powers:
            hi = 1 << (k.bit_length() - 1)
            if hi == k:
                a, b = build(k // 2), build(k // 2)
            else:
                a, b = build(hi), build(k - hi)
            lvl = min(a[0], b[0])
            powers[k] = (lvl - 1, a[1] * b[1] / float(primes[lvl]))
        return powers[k]

    for k in range(2, degree + 1):
        build(k)
    return powers


def schedule(program: Program, primes: list[int], scale_bits: int) -> list[Step]:
    """The level and scale of every stage, from fresh ciphertexts at the top level."""
    delta = 2.0 ** scale_bits
    level, scale = len(primes) - 1, delta
    steps = []
    for k, stage in enumerate(program.stages):
        nxt = program.stages[k + 1] if k + 1 < len(program.stages) else None
        if isinstance(stage, Affine):
            if stage.is_noop:
                steps.append(Step(level, scale, level, scale))
                continue
            target = delta
            if isinstance(nxt, Polynomial) and nxt.folded and not nxt.lazy:
                target = math.sqrt(delta * primes[level - 1])
            sigma = target * primes[level] / scale
            steps.append(Step(level, scale, level - 1, target, sigma))
        elif stage.folded and stage.lazy:  # x^2 stays at scale^2; the next stage rescales
            steps.append(Step(level, scale, level, scale * scale))
        elif stage.folded:
            steps.append(Step(level, scale, level - 1, scale * scale / float(primes[level])))
        else:
            steps.append(Step(level, scale, level - stage.depth, delta))
        level, scale = steps[-1].level_out, steps[-1].scale_out
    return steps


@dataclass
class ServerContext:
    """What the server holds: SEAL context, evaluation keys, the program and its schedule.

    There is no secret key here, nor anything that could decrypt.
    """

    seal: Seal
    relin: Any
    galois: Any
    program: Program
    steps: list[Step]
    packing: str
    grid: GridPlan | None = None
    dense: DenseLayouts | None = None
    flood: Any = None  # flood.Flooder when the plan floods outputs (public key only)
    pool: Any = None  # workers.StagePool when the plan splits stages over processes
    native: Any = None  # native.Native: hoisted rotations and fused products, if built


@dataclass
class Value:
    """An encrypted value on the server.

    ``single``: ``cts[i]`` is input ``i``'s ciphertext. ``batch``: ``cts[g]`` is group ``g``'s
    list of ciphertexts, one per feature, input ``j`` of the group in slot ``j``.
    """

    packing: str
    cts: list[Any]
    counts: list[int]


def _set_scale(ct: Any, expected: float, where: str) -> None:
    if abs(ct.scale / expected - 1.0) > _CLOSE:
        raise RuntimeError(f"ckks internal error in {where}: scale {ct.scale} != {expected}")
    ct.scale = expected


class _Kernel(abc.ABC):
    """Evaluates one stage on one ciphertext (or one batch group)."""

    per_group = False

    def __init__(self, ctx: ServerContext, stage: Any, step: Step) -> None:
        self.ctx = ctx
        self.seal = ctx.seal
        self.ev = ctx.seal.evaluator
        self.stage = stage
        self.step = step

    @abc.abstractmethod
    def __call__(self, item: Any) -> Any:
        """The stage applied to ``item``."""

    def _new(self) -> Any:
        return self.seal.new_ciphertext()

    def _rotate(self, ct: Any, step: int) -> Any:
        nat = self.ctx.native
        if nat is not None and nat.fast_single and step % self.seal.slots in nat.steps:
            return nat.rotate_one(ct, step)  # split and rotation on the threads
        out = self._new()
        self.ev.rotate_vector(ct, step, self.ctx.galois, out)
        return out

    def _rotations(self, ct: Any, steps: Sequence[int]) -> list[Any]:
        """``ct`` rotated by each of ``steps``: hoisted (one split, then each step from it)
        when there are two or more and the native part has their keys, else by SEAL."""
        nat = self.ctx.native
        if nat is not None and len(steps) >= 2 and all(s % self.seal.slots in nat.steps
                                                        for s in steps):
            return nat.rotations(nat.split(ct), steps)
        return [self._rotate(ct, s) for s in steps]

    def _sums(self, groups: Sequence[tuple[int, Sequence[tuple[int, Any]]]]) -> Any:
        """What ``_products_of`` needs for ``groups`` (``(giant, [(baby, plaintext)])``):
        the native part's ``Sums`` over all of them, or the non-empty groups themselves."""
        groups = [(g, terms) for g, terms in groups if terms]
        if self.ctx.native is None or not groups:
            return groups
        return self.ctx.native.sums([g for g, _ in groups], [t for _, t in groups],
                                    self.step.level_in + 1)

    def _products_of(self, rotated: dict[int, Any], sums: Any) -> dict[int, Any]:
        """``{giant: sum of plaintext * rotated[baby]}`` over ``sums`` (from ``_sums``)."""
        if isinstance(sums, Sums):
            return self.ctx.native.run(sums, rotated)
        return {g: self._sum_products((rotated[a], pt) for a, pt in terms) for g, terms in sums}

    def _sum_products(self, pairs: Iterable[tuple[Any, Any]]) -> Any | None:
        """``sum ct * pt`` over ``pairs`` with SEAL's calls (``None`` when empty)."""
        acc = prod = None
        for ct, pt in pairs:
            if acc is None:
                acc = self._new()
                self.ev.multiply_plain(ct, pt, acc)
            else:
                prod = prod or self._new()
                self.ev.multiply_plain(ct, pt, prod)
                self.ev.add_inplace(acc, prod)
        return acc

    def _finish(self, acc: Any, bias: Any | None) -> Any:
        self.ev.rescale_to_next_inplace(acc)
        _set_scale(acc, self.step.scale_out, self.stage.describe())
        if bias is not None:
            self.ev.add_plain_inplace(acc, bias)
        return acc

    def _tiny(self, ct: Any) -> Any:
        """``ct`` times the smallest nonzero plaintext: an encryption of ~0 (an all-zero
        product would be a transparent ciphertext, which SEAL refuses)."""
        pt = self.seal.encode(1.0 / self.step.plain_scale, self.step.level_in,
                              self.step.plain_scale)
        out = self._new()
        self.ev.multiply_plain(ct, pt, out)
        return out


def _nonzero(values: np.ndarray, scale: float) -> bool:
    return bool(np.max(np.abs(values), initial=0.0) * scale >= 0.5)


def _encode_factor(seal: Seal, values: np.ndarray, level: int, scale: float) -> Any | None:
    """``values`` encoded as a plaintext factor, or ``None`` when its encoding is the zero
    polynomial: a few slots of tiny weights (a nearly pruned diagonal) can round to zero
    coefficients although one slot times the scale exceeds 1/2, and SEAL refuses the
    product (a transparent ciphertext); the product is ~0, so it is left out."""
    if not _nonzero(values, scale):
        return None
    pt = seal.encode(values, level, scale)
    return None if pt.is_zero() else pt


class AffineSingle(_Kernel):
    """Hybrid diagonal method with baby-step giant-step, plaintexts encoded once.

    Giant-step rotations and the rotate-and-sum act on products before the rescale, at
    scale ~``2^(2*scale_bits)``, where key-switching noise is negligible; only the baby
    steps rotate the input itself.
    """

    def __init__(self, ctx: ServerContext, stage: Affine, step: Step,
                 lay: SingleLayout) -> None:
        super().__init__(ctx, stage, step)
        slots, width, baby = ctx.seal.slots, lay.width, lay.baby
        reps = slots // width
        self.babies = lay.baby_steps()
        groups: dict[int, list[tuple[int, Any]]] = {}
        for i, diag in sorted(lay.diagonals.items()):
            a, g = i % baby, i - i % baby
            pt = _encode_factor(ctx.seal, np.tile(np.roll(diag, g), reps), step.level_in,
                                step.plain_scale)
            if pt is not None:
                groups.setdefault(g, []).append((a, pt))
        self.sums = self._sums(sorted(groups.items()))
        self.rotsum = lay.rotsum
        _, bias = stage.weights()
        slot_bias = np.zeros(lay.out_layout.period)
        slot_bias[lay.out_layout.positions] = bias
        self.bias = None
        if _nonzero(slot_bias, step.scale_out):
            self.bias = ctx.seal.encode(np.tile(slot_bias, slots // lay.out_layout.period),
                                        step.level_out, step.scale_out)

    def __call__(self, ct: Any) -> Any:
        rotated = {0: ct, **dict(zip(self.babies, self._rotations(ct, self.babies)))}
        products = self._products_of(rotated, self.sums)
        acc = None
        for g, inner in sorted(products.items()):
            if g:
                inner = self._rotate(inner, g)
            if acc is None:
                acc = inner
            else:
                self.ev.add_inplace(acc, inner)
        if acc is None:
            acc = self._tiny(ct)
        for s in self.rotsum:
            self.ev.add_inplace(acc, self._rotate(acc, s))
        return self._finish(acc, self.bias)


class RotationKernel(_Kernel):
    """A ``RotPlan``: rotate-and-add passes, masked baby/giant rotations, rotate-and-sum.

    Plaintexts are the plan's diagonals pre-rotated by their giant step, tiled over the
    slots and encoded once at the level where they are used; the bias at the output level.
    With ``client_babies`` the item is the client's tuple of shifted input copies.
    """

    def __init__(self, ctx: ServerContext, stage: Affine, step: Step, plan: RotPlan,
                 index: int = 0) -> None:
        super().__init__(ctx, stage, step)
        slots = ctx.seal.slots
        reps = slots // plan.width
        self.plan = plan
        self.index = index
        groups: dict[int, list[tuple[int, Any]]] = {}
        for (g, a), diag in sorted(plan.diagonals().items()):
            pt = _encode_factor(ctx.seal, np.tile(np.roll(diag, g), reps), step.level_in,
                                step.plain_scale)
            if pt is not None:
                groups.setdefault(g, []).append((a, pt))
        self.tree = plan.baby_tree()
        self.chains = [plan.giant_chain(part) for part in plan.giant_parts()]
        self.sums = [self._sums([(g, groups.get(g, [])) for g, _ in chain])
                     for chain in self.chains]
        if ctx.pool is not None and len(self.chains) > 1:
            ctx.pool.register(index, self)
        bias = plan.bias()
        self.bias = None
        if _nonzero(bias, step.scale_out):
            self.bias = ctx.seal.encode(np.tile(bias, slots // len(bias)), step.level_out,
                                        step.scale_out)

    def _passes(self, ct: Any, passes: tuple[tuple[int, ...], ...]) -> Any:
        for steps in passes:
            acc = ct
            for rotated in self._rotations(ct, [s % self.plan.width for s in steps]):
                if acc is ct:
                    acc = self._new()
                    self.ev.add(ct, rotated, acc)
                else:
                    self.ev.add_inplace(acc, rotated)
            ct = acc
        return ct

    def _babies(self, item: Any) -> dict[int, Any]:
        """The input rotated by every baby step (``item``: the pre-passed input, or the
        client's shifted copies)."""
        if self.plan.client_babies:  # the client's shifted copies: input, then each baby
            return dict(zip((0, *self.plan.babies()), item))
        rotated = {0: item}
        # the babies of one parent together: hoisted (``_rotations``)
        for parent, run in itertools.groupby(self.tree, key=lambda t: t[1]):
            kids = list(run)
            made = self._rotations(rotated[parent], [k for _, _, k in kids])
            rotated.update(zip((a for a, _, _ in kids), made))
        return rotated

    def partial(self, item: Any, part: int, rotated: dict[int, Any] | None = None) -> Any:
        """The Horner sum over part ``part`` of the giant steps (``RotPlan.giant_parts``)
        before the rescale, or ``None`` when its plaintexts are all left out. ``item``: the
        input after the pre passes, or the client's copies. A worker process runs this."""
        rotated = self._babies(item) if rotated is None else rotated
        products = self._products_of(rotated, self.sums[part])
        acc = None
        for g, key in self.chains[part]:  # Horner over the giant steps, largest first
            inner = products.get(g)
            if inner is None:
                inner = acc
            elif acc is not None:
                self.ev.add_inplace(inner, acc)
            acc = self._rotate(inner, key) if key and inner is not None else inner
        return acc

    def parts_sum(self, item: Any, parts: Sequence[int]) -> Any:
        """The sum of ``partial`` over ``parts``, the baby rotations made once."""
        rotated = self._babies(item)
        return self.add_all([self.partial(item, part, rotated) for part in parts])

    def add_all(self, cts: Sequence[Any]) -> Any:
        """The sum of the non-empty partial sums ``cts`` (``None`` when all are empty)."""
        acc = None
        for ct in cts:
            if acc is None:
                acc = ct
            elif ct is not None:
                self.ev.add_inplace(acc, ct)
        return acc

    def __call__(self, item: Any) -> Any:
        if self.plan.client_babies:
            ct = item[0]
        else:
            ct = item = self._passes(item, self.plan.pre)
        pool = self.ctx.pool
        if pool is not None and len(self.chains) > 1:
            acc = pool.run(self, self.index, item)
        else:
            acc = self.parts_sum(item, range(len(self.chains)))
        if acc is None:
            acc = self._tiny(ct)
        for s in self.plan.rotsum:
            self.ev.add_inplace(acc, self._rotate(acc, s))
        self.ev.rescale_to_next_inplace(acc)
        _set_scale(acc, self.step.scale_out, self.stage.describe())
        acc = self._passes(acc, self.plan.post)
        if self.bias is not None:
            self.ev.add_plain_inplace(acc, self.bias)
        return acc


class AffineBatch(_Kernel):
    """CryptoNets-style: one ciphertext per feature, ``y_r = sum_c w_rc x_c + b_r``."""

    per_group = True

    def __init__(self, ctx: ServerContext, stage: Affine, step: Step) -> None:
        super().__init__(ctx, stage, step)
        matrix, bias = stage.weights()
        self.rows = []
        for r in range(matrix.shape[0]):
            cols = np.flatnonzero(np.abs(matrix[r]) * step.plain_scale >= 0.5)
            self.rows.append([(int(c), float(matrix[r, c])) for c in cols])
        self.bias = [None if abs(b) * step.scale_out < 0.5 else
                     ctx.seal.encode(float(b), step.level_out, step.scale_out) for b in bias]

    def __call__(self, group: list[Any]) -> list[Any]:
        out = []
        level, scale = self.step.level_in, self.step.plain_scale
        for terms, bias in zip(self.rows, self.bias):
            acc = self._sum_products((group[c], self.seal.encode(w, level, scale))
                                     for c, w in terms)
            out.append(self._finish(acc if acc is not None else self._tiny(group[0]), bias))
        return out


class FoldedSquare(_Kernel):
    """``a x^2 + b x + c`` on ``x' = sqrt(|a|) x``: ``sign(a) x'(x' + beta) + c``."""

    def __init__(self, ctx: ServerContext, stage: Polynomial, step: Step) -> None:
        super().__init__(ctx, stage, step)
        c0, b, a = stage.coeffs
        s = math.sqrt(abs(a))
        self.negate = a < 0
        beta = math.copysign(1.0, a) * b / s
        self.shift = (ctx.seal.encode(beta, step.level_in, step.scale_in)
                      if _nonzero(np.array([beta]), step.scale_in) else None)
        self.const = (ctx.seal.encode(c0, step.level_out, step.scale_out)
                      if _nonzero(np.array([c0]), step.scale_out) else None)

    def __call__(self, ct: Any) -> Any:
        out = self._new()
        if self.shift is None:
            self.ev.square(ct, out)
        else:
            shifted = self._new()
            self.ev.add_plain(ct, self.shift, shifted)
            self.ev.multiply(ct, shifted, out)
        self.ev.relinearize_inplace(out, self.ctx.relin)
        if self.step.level_out < self.step.level_in:  # a lazy square leaves it to the next
            self.ev.rescale_to_next_inplace(out)
        _set_scale(out, self.step.scale_out, self.stage.describe())
        if self.negate:
            self.ev.negate_inplace(out)
        if self.const is not None:
            self.ev.add_plain_inplace(out, self.const)
        return out


class GenericPoly(_Kernel):
    """``sum_k c_k x^k``: powers by squaring, then coefficients at one common level."""

    def __init__(self, ctx: ServerContext, stage: Polynomial, step: Step) -> None:
        super().__init__(ctx, stage, step)
        primes = ctx.seal.primes
        self.powers = _power_schedule(step.level_in, step.scale_in, stage.degree, primes)
        used = [k for k, c in enumerate(stage.coeffs) if k and c != 0.0]
        self.common = min(self.powers[k][0] for k in used)
        q = float(primes[self.common])
        self.terms = []
        for k in used:
            sigma = step.scale_out * q / self.powers[k][1]
            if _nonzero(np.array([stage.coeffs[k]]), sigma):
                self.terms.append((k, ctx.seal.encode(stage.coeffs[k], self.common, sigma)))
        c0 = stage.coeffs[0]
        self.const = (ctx.seal.encode(c0, step.level_out, step.scale_out)
                      if _nonzero(np.array([c0]), step.scale_out) else None)

    def _power(self, k: int, cache: dict[int, Any]) -> Any:
        if k not in cache:
            hi = 1 << (k.bit_length() - 1)
            parts = (k // 2, k // 2) if hi == k else (hi, k - hi)
            a, b = (self._power(p, cache) for p in parts)
            level = self.powers[k][0] + 1
            a, b = self._at(a, level), self._at(b, level)
            out = self._new()
            self.ev.multiply(a, b, out)
            self.ev.relinearize_inplace(out, self.ctx.relin)
            self.ev.rescale_to_next_inplace(out)
            _set_scale(out, self.powers[k][1], self.stage.describe())
            cache[k] = out
        return cache[k]

    def _at(self, ct: Any, level: int) -> Any:
        if ct.parms_id() == self.seal.parms_ids[level]:
            return ct
        out = self._new()
        self.ev.mod_switch_to(ct, self.seal.parms_ids[level], out)
        return out

    def __call__(self, ct: Any) -> Any:
        cache = {1: ct}
        acc = None
        for k, pt in self.terms:
            term = self._new()
            self.ev.multiply_plain(self._at(self._power(k, cache), self.common), pt, term)
            self.ev.rescale_to_next_inplace(term)
            _set_scale(term, self.step.scale_out, self.stage.describe())
            if acc is None:
                acc = term
            else:
                self.ev.add_inplace(acc, term)
        if acc is None:
            raise RuntimeError(f"ckks: {self.stage.describe()} has only negligible terms")
        if self.const is not None:
            self.ev.add_plain_inplace(acc, self.const)
        return acc


def make_kernel(ctx: ServerContext, index: int) -> _Kernel | None:
    """The kernel of stage ``index`` (``None`` for a stage that moves nothing)."""
    stage = ctx.program.stages[index]
    step = ctx.steps[index]
    if isinstance(stage, Affine):
        if stage.is_noop:
            return None
        if ctx.packing == "single" and ctx.grid is not None:
            plan = ctx.grid.stages[index]
            assert plan is not None
            return RotationKernel(ctx, stage, step, plan, index)
        if ctx.packing == "single":
            assert ctx.dense is not None
            single = ctx.dense.stages[index]
            assert single is not None
            return AffineSingle(ctx, stage, step, single)
        return AffineBatch(ctx, stage, step)
    return FoldedSquare(ctx, stage, step) if stage.folded else GenericPoly(ctx, stage, step)


def _apply(kernel: _Kernel, value: Value) -> Value:
    fn: Callable[[Any], Any] = kernel
    if value.packing == "single" or kernel.per_group:
        return Value(value.packing, [fn(item) for item in value.cts], value.counts)
    return Value(value.packing, [[fn(ct) for ct in group] for group in value.cts],
                 value.counts)


class CKKSLayer(SecureLayer):
    """Runs the fused stage that starts at ``spec``; the other layers of that stage (and
    Flatten) pass the value through. Plaintexts are encoded here, once per server."""

    def __init__(self, spec: LayerSpec, ctx: ServerContext, scheme: Any) -> None:
        super().__init__(spec, ctx, scheme)
        self.kernel = None
        for index, stage in enumerate(ctx.program.stages):
            if stage.specs[0] is spec:
                self.kernel = make_kernel(ctx, index)

    def forward(self, value: Value) -> Value:
        if not isinstance(value, Value):
            raise EnvelopeError("ckks: layer input is not an encrypted ckks value")
        return value if self.kernel is None else _apply(self.kernel, value)
