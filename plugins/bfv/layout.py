"""``single`` packing: one input per ciphertext row, linear layers by rotated diagonals.

A BFV ciphertext holds two rows of ``R = N / 2`` integer slots; rotations move slots
cyclically within each row. An input occupies row 0 (a second input, row 1). A value of
``n`` features has a *period* ``T`` (a power of two, ``n <= T``): feature ``f`` sits at slot
``slot[f] + m * T`` for every ``m``, and the slots ``[0, W)`` that hold it (the *window*
``W``) are correct; ``W = R`` means the whole row, where reads may wrap around.

A linear layer with ``T_out`` output slots runs the hybrid diagonal method (Halevi-Shoup
with folding): for every diagonal ``d < T_out`` of the zero-padded ``T_out x T`` matrix
(``T = max(T_in, T_out)``), multiply the input rotated by ``d`` with that diagonal, sum,
then fold the ``T / T_out`` partial sums with ``log2(T / T_out)`` rotations. The output has
period ``T_out``. Diagonals that are multiples of ``sigma`` only (a first convolution on
im2col input) are indexed ``d = sigma * e``.

The sum over diagonals uses baby-step giant-step (``e = g * m + b``): ``g`` rotated copies
of the input, one plaintext product per baby step and *group* of giant steps. A group packs
``M_grp`` giant steps side by side into regions of ``S`` slots of the same row (the input
is replicated there), so one plaintext product serves them all, and a rotate-and-add tree
of ``log2(M_grp)`` rotations lines them up again. Packing trades the output window for
fewer products; ``plan_windows`` picks, for every layer, the packing that the next layer's
window allows at the lowest cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .linear import IntegerLinear, pow2

__all__ = ["Bsgs", "Diagonals", "LinearLayout", "plan_windows"]

ROTATION_COST = 2.5
"""Cost of a rotation in plaintext products (measured 1.8 at N=8192, 2.7 at N=16384)."""


@dataclass
class Diagonals:
    """The nonzero generalized diagonals of a linear layer in slot space.

    Attributes:
        t_out: output period (a power of two).
        period: ``T = max(T_in, T_out)``: the input is read with this period.
        sigma: every diagonal index is a multiple of it.
        diags: ``e -> (T,)`` int64, the diagonal ``d = sigma * e``:
            ``diag[i] = A[i mod t_out, (i + d) mod T]``.
    """

    t_out: int
    period: int
    sigma: int
    diags: dict[int, np.ndarray]

    @staticmethod
    def period_of(layer: IntegerLinear, t_in: int) -> int:
        """``T`` of ``layer`` on an input of period ``t_in`` (before building anything)."""
        return max(t_in, pow2(int(layer.output_slots.max()) + 1))

    @staticmethod
    def indices(layer: IntegerLinear, in_slots: np.ndarray) -> np.ndarray:
        """The distinct ``d`` of ``layer``'s entries read at ``in_slots``: of its support
        (``integer_linear(q, ones)``), every diagonal of the unpruned layer."""
        t_out = pow2(int(layer.output_slots.max()) + 1)
        d = (in_slots[layer.cols].astype(np.int64)
             - layer.output_slots[layer.rows].astype(np.int64)) % t_out
        return np.unique(d)

    @classmethod
    def of(cls, layer: IntegerLinear, in_slots: np.ndarray, t_in: int) -> "Diagonals":
        """Diagonals of ``layer`` reading features at ``in_slots`` with period ``t_in``."""
        t_out = pow2(int(layer.output_slots.max()) + 1)
        period = max(t_in, t_out)
        rows, cols, vals = layer.rows, layer.cols, layer.vals
        r = layer.output_slots[rows].astype(np.int64)
        c = in_slots[cols].astype(np.int64)
        d = (c - r) % t_out
        i = r + ((c - r - d) % period)  # the unique i = r (mod t_out) with i + d = c (mod T)
        sigma = math.gcd(t_out, *map(int, np.unique(d))) if len(d) else t_out
        e_all = d // sigma
        order = np.argsort(e_all, kind="stable")
        keys, starts = np.unique(e_all[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        diags: dict[int, np.ndarray] = {}
        for e, a, b in zip(keys, starts, ends):
            sel = order[a:b]
            vec = np.zeros(period, np.int64)
            vec[i[sel]] = vals[sel]
            diags[int(e)] = vec
        return cls(t_out, period, sigma, diags)

    @property
    def fold(self) -> int:
        """``T / T_out``: partial sums folded after the products."""
        return self.period // self.t_out

    @property
    def span(self) -> int:
        """``T_out / sigma``: the range of diagonal indices ``e``."""
        return self.t_out // self.sigma


@dataclass(frozen=True)
class Bsgs:
    """One way to run a layer's diagonals (see the module docstring).

    Attributes:
        baby: ``g``, rotated copies of the input.
        packed: ``M_grp``, giant steps per plaintext product.
        region: ``S``, slots per packed giant step (the whole row when ``packed == 1``).
        giants: ``M = span / g``.
    """

    baby: int
    packed: int
    region: int
    giants: int

    @property
    def groups(self) -> int:
        """Plaintext products per baby step."""
        return self.giants // self.packed

    def slots(self, e: int) -> tuple[int, int, int]:
        """``(group, position in group, baby step)`` of diagonal index ``e``."""
        m, b = divmod(e, self.baby)
        j, local = divmod(m, self.packed)
        return j, local, b

    def window_in(self, dg: Diagonals, row: int) -> int:
        """Slots of the input this packing reads (``row``: the whole row)."""
        if self.packed == 1:
            return row
        return min(row, self.packed * self.region + dg.sigma * (self.baby - 1))

    def window_out(self, dg: Diagonals, w_in: int, row: int) -> int:
        """Valid output slots given ``w_in`` valid input slots (``<= 0``: infeasible)."""
        if self.packed == 1:
            if w_in == row:
                return row
            inner = w_in - dg.sigma * (self.baby * self.giants - 1)
        else:
            if self.window_in(dg, row) > w_in:
                return 0
            inner = self.region - dg.sigma * self.baby * (self.giants - 1)
        return inner - (dg.fold - 1) * dg.t_out

    def counts(self, dg: Diagonals) -> tuple[int, int]:
        """``(plaintext products, rotations)`` to run ``dg`` this way."""
        babies, after = self.rotation_counts(dg)
        return len({(j, b) for j, _, b in map(self.slots, dg.diags)}), babies + after

    def rotation_counts(self, dg: Diagonals) -> tuple[int, int]:
        """``(baby-step rotations, rotations after the products)``; none for a layer whose
        diagonals are all zero (its output is the bias)."""
        if not dg.diags:
            return 0, 0
        used = {self.slots(e) for e in dg.diags}
        babies = len({b for _, _, b in used if b})
        groups = {j for j, _, _ in used}
        after = (len(groups) * int(math.log2(self.packed)) + len(groups - {0})
                 + int(math.log2(dg.fold)))
        return babies, after

    def cost(self, dg: Diagonals) -> float:
        """Estimated time in plaintext products."""
        products, rotations = self.counts(dg)
        return products + ROTATION_COST * rotations

    def steps(self, dg: Diagonals, row: int) -> list[int]:
        """Every rotation step this packing uses (positive, ``< row``); none when every
        diagonal is zero."""
        if not dg.diags:
            return []
        used = {self.slots(e) for e in dg.diags}
        out = {dg.sigma * b for _, _, b in used if b}
        stride = self.region + dg.sigma * self.baby
        out |= {stride << k for k in range(int(math.log2(self.packed)))}
        out |= {dg.sigma * self.baby * self.packed * j for j, _, _ in used if j}
        out |= {dg.t_out << k for k in range(int(math.log2(dg.fold)))}
        return sorted(s % row for s in out if s % row)

    def plaintexts(self, dg: Diagonals, row: int) -> dict[tuple[int, int], np.ndarray]:
        """``(group, baby) -> (row,)`` the packed, pre-rotated diagonals to multiply by."""
        out: dict[tuple[int, int], np.ndarray] = {}
        for e, diag in dg.diags.items():
            j, local, b = self.slots(e)
            vec = out.setdefault((j, b), np.zeros(row, np.int64))
            m = e // self.baby
            start = local * self.region
            vec[start:start + self.region] = np.tile(
                np.roll(diag, dg.sigma * self.baby * m), self.region // dg.period)
        return out


def _candidates(dg: Diagonals, row: int) -> list[Bsgs]:
    out = []
    for gl in range(int(math.log2(dg.span)) + 1):
        baby = 1 << gl
        giants = dg.span // baby
        out.append(Bsgs(baby, 1, row, giants))
        for pl in range(1, int(math.log2(giants)) + 1):
            packed = 1 << pl
            region = dg.period
            while region * packed <= row:
                out.append(Bsgs(baby, packed, region, giants))
                region *= 2
    return out


@dataclass
class LinearLayout:
    """A linear layer planned for ``single`` packing.

    Attributes:
        layer: the integer matrix.
        diagonals: its diagonals in slot space.
        bsgs: the chosen packing.
        row: slots per row.
        steps: the rotation steps (Galois keys) of the chosen packing.
        skipped: diagonals of the unpruned layer that are all zero here (pruned units):
            no plaintext, no product, no rotation or Galois key of their own.
    """

    layer: IntegerLinear
    diagonals: Diagonals
    bsgs: Bsgs | None = None
    row: int = 0
    steps: list[int] = field(default_factory=list)
    skipped: int = 0

    @property
    def output_slots(self) -> np.ndarray:
        """Slot of every output feature within the output period."""
        return self.layer.output_slots

    @property
    def products(self) -> int:
        """Plaintext products summed per output (for the noise model)."""
        return len(self.diagonals.diags) * self.diagonals.fold

    @property
    def rotation_counts(self) -> tuple[int, int]:
        """``(baby-step rotations, rotations after the products)`` of the chosen packing."""
        return self.bsgs.rotation_counts(self.diagonals) if self.bsgs else (0, 0)


def plan_windows(layouts: Sequence[LinearLayout], row: int) -> float:
    """Choose every layer's packing (in place) for the lowest total cost.

    The first layer reads the client's fully replicated input; each later layer must fit
    in the window its predecessor leaves; the last must leave its output slots readable.

    Returns:
        The total estimated cost (in plaintext products).

    Raises:
        ValueError: no packing fits (cannot happen while every period fits in the row).
    """
    # Pareto fronts of (window, cost, choices), widest window first.
    front: list[tuple[int, float, tuple[Bsgs, ...]]] = [(row, 0.0, ())]
    for lay in layouts:
        dg = lay.diagonals
        nxt: dict[int, tuple[float, tuple[Bsgs, ...]]] = {}
        for w_in, cost, chosen in front:
            for cand in _candidates(dg, row):
                w_out = cand.window_out(dg, w_in, row)
                if w_out <= 0:
                    continue
                total = cost + cand.cost(dg)
                if w_out not in nxt or total < nxt[w_out][0]:
                    nxt[w_out] = (total, chosen + (cand,))
        front = []
        for w in sorted(nxt, reverse=True):
            if not front or nxt[w][0] < front[-1][1]:
                front.append((w, nxt[w][0], nxt[w][1]))
    need = int(layouts[-1].output_slots.max()) + 1
    best = min((f for f in front if f[0] >= need), key=lambda f: f[1], default=None)
    if best is None:
        raise ValueError("no packing leaves the output readable")
    for lay, cand in zip(layouts, best[2]):
        lay.bsgs, lay.row = cand, row
        lay.steps = cand.steps(lay.diagonals, row)
    return best[1]
