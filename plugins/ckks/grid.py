"""Convolution-aware single-image layouts: channel-interleaved grids and rotation plans.

A ``(C, H, W)`` tensor lives in the slots as a ``Grid``: copy ``k`` of channel ``c`` starts
at slot ``base_k`` and element ``(c, i, j)`` sits at ``base_k + i * rs + j * cs`` (modulo
the period ``P``; the client repeats the period to fill the ciphertext). Row and column
strides grow with every stride-2 convolution and every pool, which leaves gaps; the next
layer's channels are multiplexed into those gaps.

Every affine stage becomes a ``RotPlan``: a sum of plaintext-masked rotations
``y = sum_(g, a) rot_g(rot_a(x) * roll(d_(g,a), g))`` (baby steps ``a`` rotate the input,
giant steps ``g`` the partial products) plus rotate-and-add passes before or after it.

* Convolution: output channel ``o`` at base ``t_o`` reads input channel ``c`` from copy
  ``b`` through rotation ``(b - t_o) + ((di - p) * rs + (dj - p) * cs)``: the kernel
  offset is the baby step (shared by every channel pair) and the base difference the giant
  step. Output bases are chosen greedily to reuse giant steps; padding is a zero in the
  mask, stride is the output's stride in the grid. Cost: ``K^2 - 1`` baby rotations,
  one rotation per distinct base difference, one plaintext product per (difference, tap).
  When channels are interleaved ``cs`` to a column, differences ``d`` and ``d - cs`` can
  share one giant step, the whole column joining the kernel offset (``_tap_key``'s
  ``fold``): LeNet-5's conv 6->16 has 16 giants and 425 products in place of 21 and 525;
  the plan folds when that adds no rotation. More generally the product only depends on
  the whole rotation ``d``: keyed by ``d`` alone (``_tap_key``'s ``merge``, baby ``d``'s
  residue modulo a power of two ``M``, giant the rest), every (channel pair, offset) that
  reads the input at one rotation shares a plaintext. When a stride-2 convolution puts its
  output channels in two cosets of the input's bases (``t`` and ``t + 1``), the offsets
  ``k`` and ``k + 1`` of the two cosets coincide: Orion's LeNet conv 32->64 has 960
  products and 60 rotations in place of 1600 and 87. The plan takes the fewest rotations,
  then the fewest products, over unfolded, folded and each ``M``.
* Average pool: rotate-and-add along columns then rows (``2 (k - 1)`` rotations, no
  level); its ``1 / k^2`` goes into the stage's plaintexts.
* Dense layer after a grid: the hybrid diagonal method over the grid's slot positions (the
  weights of that layer only, built against those positions).
* Client shifts: when the first stage reads the input itself (no pool before it), the
  client encrypts its input rotated by each of that stage's baby steps (the shifted copies
  are a public function of the input, they reveal nothing about the weights) and the
  server skips those rotations, the most expensive of the network (top level, most
  limbs). ``GridPlan.shifts`` lists them; one input ciphertext per shift. A convolution
  may instead keep its kernel rows as giant steps (the client sends the ``kw`` column
  shifts, the server rotates by the rows), whichever costs less at ``COPY_COST`` per copy.

No matrix over the flattened tensor is ever built for a convolution or a pool. The search
(``plan_grid``) is a pure function of the program and the slot count; the diagonals are
computed from the layers when the server builds its kernels (``RotPlan.diagonals``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from secureinfer.layers import AvgPool2d, Conv2d, LayerSpec, Linear, im2col

from .program import Affine, Layout, Polynomial, Program, SingleLayout, pow2
from .search import _best_baby, _block_candidates, _make_single, _rotsum_steps, distinct_steps

__all__ = ["Grid", "GridPlan", "RotPlan", "applicable", "plan_grid", "split_stages"]

#: Relative cost of a plaintext product against a rotation (measured with SEAL: ~1/25).
PRODUCT_COST = 0.04
#: Largest ``input period x outputs`` of a dense layer whose block layouts are searched.
_BLOCK_SEARCH_MAX = 1 << 19
#: Fewest baby steps for which the client sends shifted copies: each copy is one more
#: input ciphertext (bytes, encryption), worth it only against several top-level rotations.
MIN_SHIFTS = 4
#: Most shifted copies (input ciphertexts) per input.
MAX_SHIFTS = 32
#: One more input ciphertext against one top-level rotation: the server loads it (about
#: a fifth of a rotation at N=16384, measured with SEAL), the client encrypts and sends it.
COPY_COST = 0.25


@dataclass(frozen=True)
class Grid:
    """A ``(C, H, W)`` tensor in the slots; ``bases`` holds ``(channel, base)`` per copy."""

    period: int
    shape: tuple[int, int, int]
    rs: int
    cs: int
    bases: tuple[tuple[int, int], ...]

    def offsets(self) -> np.ndarray:
        """Slot offsets of one copy's ``H * W`` elements from its base (row-major)."""
        _, h, w = self.shape
        return (np.arange(h)[:, None] * self.rs + np.arange(w)[None, :] * self.cs).ravel()

    def slot_map(self) -> np.ndarray | None:
        """Slot -> flat element index (``-1`` empty) over one period, ``None`` if copies
        overlap or one copy wraps onto itself."""
        _, h, w = self.shape
        out = -np.ones(self.period, dtype=np.int64)
        off = self.offsets()
        for c, b in self.bases:
            slots = (b + off) % self.period
            if np.any(out[slots] >= 0) or len(np.unique(slots)) != len(slots):
                return None
            out[slots] = c * h * w + np.arange(h * w)
        return out

    def positions(self) -> np.ndarray:
        """Slot of every flat element in its first copy."""
        c_count, h, w = self.shape
        pos = np.empty(c_count * h * w, dtype=np.int64)
        seen: set[int] = set()
        off = self.offsets()
        for c, b in self.bases:
            if c not in seen:
                seen.add(c)
                pos[c * h * w: (c + 1) * h * w] = (b + off) % self.period
        return pos

    def all_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """``(slots, flat element)`` of every copy."""
        _, h, w = self.shape
        off = self.offsets()
        slots = [(b + off) % self.period for _, b in self.bases]
        elems = [c * h * w + np.arange(h * w) for c, _ in self.bases]
        return np.concatenate(slots), np.concatenate(elems)

    def pooled(self, pool: AvgPool2d) -> Grid:
        """The grid after average pooling in place (window sums at the window's corner)."""
        _, h2, w2 = pool.out_shape
        return Grid(self.period, (self.shape[0], h2, w2), self.rs * pool.stride,
                    self.cs * pool.stride, self.bases)

    def as_layout(self) -> Layout:
        return Layout(self.period, self.positions())


@dataclass(eq=False)
class RotPlan:
    """One affine stage as masked rotations.

    Attributes:
        name: ``"conv"``, ``"dense"`` or ``"scale"`` (pools alone: a mask).
        width: period of the diagonals (``max`` of the input and output periods).
        pre: rotate-and-add passes on the input (each pass: ``x += sum rot(x, s)``).
        keys: the ``(giant, baby)`` pairs with a nonzero diagonal.
        rotsum: rotate-and-sum steps after the products (dense layers, ``m' < d'``).
        post: rotate-and-add passes after the rescale (pools after a convolution).
        out: the output's grid (or dense layout).
        known: steps (modulo the width) whose Galois keys other stages need anyway; the
            baby-step tree uses them before adding keys of its own.
        diagonals: ``() -> {(giant, baby): values over width}`` from the layers' weights,
            scaled; called by the server only.
        bias: ``() -> values over the output period`` (bias at every output copy).
        skipped: all-zero masks or diagonals (pruned units: a kernel offset of a channel
            pair, a dense diagonal) left out: no product, and no rotation or Galois key
            unless another unit still uses that step.
        client_babies: the client sends the input rotated by every baby step (first
            stage only): no baby rotation and no baby Galois key on the server.
        folded: a convolution whose base differences a column apart share a giant step
            (``_tap_key``'s ``fold``).
        merged: a convolution keyed by whole rotations (``_tap_key``'s ``merge``): its
            baby-step modulus, 0 if not.
        split: cut points in the sorted giant steps (``split_stages``): part ``k`` of the
            giants runs in worker process ``k`` (part 0 in the server's own), each part's
            Horner chain ending on its smallest giant; empty: one process.
        hoisted: the baby-step tree groups the babies by parent, as many per parent as the
            chain's Galois keys allow (``hoist_stages``), so that the server splits each
            parent once and derives its babies from the split (``native.Native``): about
            half a rotation each, with no key added.
    """

    name: str
    width: int
    pre: tuple[tuple[int, ...], ...]
    keys: frozenset[tuple[int, int]]
    rotsum: tuple[int, ...]
    post: tuple[tuple[int, ...], ...]
    out: Grid | Layout
    diagonals: Callable[[], dict[tuple[int, int], np.ndarray]] = field(repr=False)
    bias: Callable[[], np.ndarray] = field(repr=False)
    known: frozenset[int] = frozenset()
    skipped: int = 0
    client_babies: bool = False
    split: tuple[int, ...] = ()
    folded: bool = False
    merged: int = 0
    hoisted: bool = False

    def babies(self) -> list[int]:
        return sorted({a % self.width for _, a in self.keys} - {0})

    def giants(self) -> list[int]:
        return sorted({g % self.width for g, _ in self.keys} - {0})

    def _signed(self, v: int) -> int:
        return v - self.width if v > self.width // 2 else v

    def baby_tree(self) -> list[tuple[int, int, int]]:
        """``(baby, parent, key step)`` in evaluation order: each baby rotation starts from
        an earlier one (or the input) so that few distinct steps (Galois keys) serve all
        of them; the rotation count stays one per baby step. ``hoisted``: the same keys,
        but the babies of one parent are consecutive and parents have as many as the keys
        allow (the server splits a parent once for all of its children)."""
        chain = self._chain_tree()
        return self._hoisted_tree({k for _, _, k in chain}) if self.hoisted else chain

    def _chain_tree(self) -> list[tuple[int, int, int]]:
        done, keys, out = [0], set(self.known), []
        # ascending signed order: one key reaches the most negative step, then the others
        # follow from a smaller neighbour (kernel taps: one column or row further)
        for a in sorted(self.babies(), key=self._signed):
            parent = next((n for n in reversed(done) if (a - n) % self.width in keys), None)
            if parent is None:
                below = [n for n in done if self._signed(n) < self._signed(a)] or done
                parent = min(below, key=lambda n: abs(self._signed((a - n) % self.width)))
                keys.add((a - parent) % self.width)
            out.append((a, parent, (a - parent) % self.width))
            done.append(a)
        return out

    def _hoisted_tree(self, tree_keys: set[int]) -> list[tuple[int, int, int]]:
        """Greedy: split the reached rotation that reaches the most remaining babies by
        one known step (``known`` and the chain's own keys, so no key is added), make all
        of them, repeat. The chain reaches every baby with these keys, so this does too."""
        keys = set(self.known) | tree_keys
        width = self.width
        reached, remaining, out = [0], set(self.babies()), []
        while remaining:
            best, kids = 0, []
            for n in reached:
                got = [b for b in remaining if (b - n) % width in keys]
                if len(got) > len(kids):
                    best, kids = n, got
            assert kids, "the chain's keys reach every baby"
            for b in sorted(kids, key=self._signed):
                out.append((b, best, (b - best) % width))
                remaining.discard(b)
                reached.append(b)
        return out

    def giant_parts(self) -> list[list[int]]:
        """The sorted giant steps cut at ``split``: one list per process."""
        giants = sorted({g % self.width for g, _ in self.keys})
        cuts = (0, *self.split, len(giants))
        return [giants[a:b] for a, b in zip(cuts, cuts[1:])]

    def giant_chain(self, giants: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """``(giant, step to the next smaller giant)`` from the largest down (Horner:
        ``rot_g1(p1 + rot_(g2-g1)(p2 + ...))``); the last step is the smallest giant.
        ``giants``: a part of them (``giant_parts``), its chain ending on its own smallest."""
        giants = sorted({g % self.width for g, _ in self.keys} if giants is None else giants)
        return [(g, g - (giants[k - 1] if k else 0)) for k, g in enumerate(giants)][::-1]

    def rotations(self) -> int:
        """Ciphertext rotations per evaluation."""
        passes = sum(len(p) for p in self.pre) + sum(len(p) for p in self.post)
        babies = 0 if self.client_babies else len(self.babies())
        return passes + babies + len(self.giants()) + len(self.rotsum)

    def products(self) -> int:
        """Plaintext products per evaluation."""
        return len(self.keys)

    def weighted(self, hoist: bool = False) -> float:
        """Rotations, the server-side baby rotations priced as hoisted ones when
        ``hoist`` (``hoisted_cost``)."""
        babies = 0 if self.client_babies else len(self.babies())
        return self.rotations() - babies + (hoisted_cost(babies) if hoist else babies)

    def hoisting(self) -> tuple[int, int]:
        """``(splits, hoisted babies)``: the parents of two or more babies in the baby-step
        tree, each split once, and their babies (with the native part; else plain
        rotations). ``(0, 0)`` unless ``hoisted``."""
        if not self.hoisted or self.client_babies:
            return 0, 0
        kids: dict[int, int] = {}
        for _, parent, _ in self.baby_tree():
            kids[parent] = kids.get(parent, 0) + 1
        many = [k for k in kids.values() if k >= 2]
        return len(many), sum(many)

    def steps(self) -> set[int]:
        """Distinct rotation steps (Galois keys), modulo the width."""
        passes = {s for p in (*self.pre, *self.post) for s in p} | set(self.rotsum)
        tree = set() if self.client_babies else {k for _, _, k in self.baby_tree()}
        chain = {k for part in self.giant_parts() for _, k in self.giant_chain(part)}
        return ({s % self.width for s in passes} | tree | chain) - {0}

    def describe(self) -> dict[str, Any]:
        splits, hoisted = self.hoisting()
        return {"kind": self.name, "width": self.width, "rotations": self.rotations(),
                "galois_steps": len(self.steps()),
                "baby_steps": len(self.babies()), "giant_steps": len(self.giants()),
                "client_babies": self.client_babies,
                "pool_rotations": sum(len(p) for p in (*self.pre, *self.post)),
                "rotsum": len(self.rotsum), "plaintext_products": self.products(),
                "units_skipped": self.skipped, "folded": self.folded, "merged": self.merged,
                "hoisted": self.hoisted, "splits": splits, "hoisted_rotations": hoisted,
                "giant_parts": [len(p) for p in self.giant_parts()] if self.split else []}


@dataclass(eq=False)
class GridPlan:
    """The layouts of a whole program: one ``RotPlan`` per stage (``None`` for stages
    that are not affine or move nothing), the client's input map and the output slots.

    ``shifts``: the rotations of its input the client encrypts, one ciphertext each
    (``(0,)``: the input alone; else ``0`` and the first stage's baby steps)."""

    period: int
    stages: list[RotPlan | None]
    gather: np.ndarray
    output_positions: np.ndarray
    output_period: int
    cost: float
    shifts: tuple[int, ...] = (0,)
    input_grid: Grid | None = None
    """The client's input grid (``None`` when the first stage reads its im2col)."""

    def steps(self, slots: int) -> list[int]:
        """Every distinct rotation step normalised to ``[1, slots)``."""
        return distinct_steps(self.stages, slots)

    def rotations(self) -> int:
        return sum(rp.rotations() for rp in self.stages if rp is not None)

    def fixed_steps(self, modulus: int) -> list[int]:
        """The steps of the pool passes and rotate-and-sums, modulo ``modulus``: keyed
        whatever the weights at these layouts (zeroing units never removes them, unless
        the pruned model's plan picks other layouts)."""
        return sorted({s % modulus for rp in self.stages if rp is not None
                       for p in (*rp.pre, *rp.post, rp.rotsum) for s in p} - {0})

    def products(self) -> int:
        return sum(rp.products() for rp in self.stages if rp is not None)

    def skipped(self) -> int:
        """All-zero units left out of every stage."""
        return sum(rp.skipped for rp in self.stages if rp is not None)


# ----- stages --------------------------------------------------------------------------


def _weighted(specs: Sequence[LayerSpec]) -> list[LayerSpec]:
    return [s for s in specs if s.kind not in ("flatten", "avgpool2d")]


def applicable(program: Program) -> bool:
    """True when the program has a convolution or pool and every affine stage is pools and
    flattens around at most one convolution, or pools then Linear layers, with no
    convolution after a dense layer."""
    has_grid = any(s.kind in ("conv2d", "avgpool2d") for s in program.specs)
    if not has_grid or len(program.input_shape) != 3:
        return False
    dense_seen = False
    for stage in program.stages:
        if not isinstance(stage, Affine):
            continue
        kinds = [s.kind for s in stage.specs]
        if any(k == "poly" for k in kinds):
            return False
        weighted = [k for k in kinds if k in ("conv2d", "linear")]
        if "conv2d" in weighted:
            if dense_seen or len(weighted) > 1:
                return False
        elif "avgpool2d" in kinds and dense_seen:
            return False
        if "linear" in weighted:
            first = kinds.index("linear")
            if any(k != "linear" and k != "flatten" for k in kinds[first:]):
                return False
            dense_seen = True
    return True


def _pool_passes(grid: Grid, pool: AvgPool2d) -> tuple[tuple[int, ...], tuple[int, ...]]:
    k = pool.kernel
    return (tuple(b * grid.cs for b in range(1, k)), tuple(a * grid.rs for a in range(1, k)))


def _stage_bias(stage: Affine, out: Grid | Layout) -> Callable[[], np.ndarray]:
    def bias() -> np.ndarray:
        b = stage.bias * stage.scale
        vec = np.zeros(out.period)
        if isinstance(out, Grid):
            slots, elems = out.all_positions()
            vec[slots] = b[elems]
        else:
            vec[out.positions] = b
        return vec
    return bias


def _free_bases(occupied: np.ndarray, foot: np.ndarray) -> np.ndarray:
    """``conflict[t]``: how many slots of the footprint placed at ``t`` are occupied."""
    return np.rint(np.fft.irfft(np.fft.rfft(occupied) * np.conj(np.fft.rfft(foot)),
                                n=len(occupied))).astype(np.int64)


def _place_conv(grid: Grid, conv: Conv2d) -> tuple[Grid, dict[tuple[int, int], int]] | None:
    """Output bases and, per ``(o, c)`` pair with nonzero weights, the input copy read.

    Output channel ``o`` goes to the free base that adds the fewest new giant steps
    (base differences), the lowest such base on ties.
    """
    period = grid.period
    oc, ic = conv.weight.shape[:2]
    _, oh, ow = conv.out_shape
    rs, cs = grid.rs * conv.stride[0], grid.cs * conv.stride[1]
    out_off = (np.arange(oh)[:, None] * rs + np.arange(ow)[None, :] * cs).ravel() % period
    if len(np.unique(out_off)) != len(out_off):
        return None
    foot = np.zeros(period)
    foot[out_off] = 1.0
    occupied = np.zeros(period)
    giants = np.zeros(period, dtype=bool)
    copies: dict[int, np.ndarray] = {}
    for c, b in grid.bases:
        copies.setdefault(c, np.empty(0, dtype=np.int64))
        copies[c] = np.append(copies[c], b)
    used = np.abs(conv.weight).reshape(oc, ic, -1).max(axis=2) > 0.0
    t = np.arange(period)
    bases: list[tuple[int, int]] = []
    choice: dict[tuple[int, int], int] = {}
    for o in range(oc):
        free = _free_bases(occupied, foot) == 0
        if not free.any():
            return None
        new = np.zeros(period, dtype=np.int64)
        for c in np.flatnonzero(used[o]):
            has = np.zeros(period, dtype=bool)
            for b in copies[int(c)]:
                has |= giants[(b - t) % period]
            new += ~has
        score = np.where(free, new * period + t, np.iinfo(np.int64).max)
        base = int(np.argmin(score))
        for c in np.flatnonzero(used[o]):
            cand = copies[int(c)]
            diffs = (cand - base) % period
            hit = np.flatnonzero(giants[diffs])
            if len(hit):
                pick = int(cand[hit[0]])
            else:
                signed = np.where(diffs > period // 2, diffs - period, diffs)
                pick = int(cand[int(np.argmin(np.abs(signed)))])
                giants[(pick - base) % period] = True
            choice[(o, int(c))] = pick
        occupied[(base + out_off) % period] = 1.0
        bases.append((o, base))
    out = Grid(period, (oc, oh, ow), rs, cs, tuple(bases))
    return out, choice


def _tap_key(grid: Grid, g: int, di: int, dj: int, split_rows: bool,
             fold: bool = False, merge: int = 0) -> tuple[int, int]:
    """The ``(giant, baby)`` of kernel offset ``(di, dj)`` (padding subtracted) read at
    base difference ``g``: the whole offset is the baby step, or (``split_rows``) only its
    column part, the row part joining the giant step. ``fold``: the whole columns of the
    base difference move to the baby step (``g = g' + m * cs`` with ``0 <= g' < cs``, baby
    ``di * rs + (dj + m) * cs``), so that base differences a column apart share one giant
    step: fewer giants and products, a few more babies (``_plan_stage`` compares both).
    ``merge`` (a power of two ``M``): the key depends on the whole rotation ``d = g + row +
    col`` only, split as baby ``r`` (``d``'s residue modulo ``M`` in ``[-M/2, M/2)``) and giant
    ``d - r``: every (channel pair, offset) reading the input at the same rotation shares one
    plaintext, whatever base difference it came from."""
    row, col = di * grid.rs, dj * grid.cs
    period = grid.period
    if merge:  # ints or numpy arrays alike (``_conv_keys`` passes arrays)
        total = (g + row + col) % period
        signed = total - period * (total > period // 2)
        r = (signed + merge // 2) % merge - merge // 2
        return (signed - r) % period, r % period
    if split_rows:
        return (g + row) % period, col % period
    if fold:
        signed = g - period * (g > period // 2)
        m = signed // grid.cs
        return (signed - m * grid.cs) % period, (row + col + m * grid.cs) % period
    return g % period, (row + col) % period


def _merge_moduli(period: int) -> list[int]:
    """The baby-step moduli ``_tap_key``'s ``merge`` is tried with: powers of two from 2
    to half the period."""
    out, m = [], 2
    while m <= period // 2:
        out.append(m)
        m *= 2
    return out


def _conv_keys(grid: Grid, conv: Conv2d, out: Grid, choice: dict[tuple[int, int], int],
               nonzero: bool = True, split_rows: bool = False,
               fold: bool = False, merge: int = 0) -> frozenset[tuple[int, int]]:
    """The ``(giant, baby)`` masks of the convolution: those with a nonzero weight, or
    (``nonzero=False``) every mask its channel pairs' taps would use unpruned."""
    period = grid.period
    _, _, kh, kw = conv.weight.shape
    ph, pw = conv.padding
    base_of = dict((o, b) for o, b in out.bases)
    pairs = list(choice.items())
    if not pairs:
        return frozenset()
    o_idx = np.array([o for (o, _), _ in pairs])
    c_idx = np.array([c for (_, c), _ in pairs])
    g = np.array([(b - base_of[o]) % period for (o, _), b in pairs], dtype=np.int64)
    used = np.ones((len(pairs), kh, kw), dtype=bool)
    if nonzero:
        used = conv.weight[o_idx, c_idx] != 0.0
    p, di, dj = np.nonzero(used)
    giant, baby = _tap_key(grid, g[p], di - ph, dj - pw, split_rows, fold, merge)
    codes = np.unique(np.asarray(giant, dtype=np.int64) * period
                      + np.asarray(baby, dtype=np.int64))
    return frozenset((int(k // period), int(k % period)) for k in codes)


def _conv_diagonals(grid: Grid, conv: Conv2d, out: Grid, choice: dict[tuple[int, int], int],
                    scale: float, split_rows: bool = False, fold: bool = False,
                    merge: int = 0) -> Callable[[], dict[tuple[int, int], np.ndarray]]:
    def diagonals() -> dict[tuple[int, int], np.ndarray]:
        period = grid.period
        _, _, kh, kw = conv.weight.shape
        sh, sw = conv.stride
        ph, pw = conv.padding
        _, h, w = grid.shape
        _, oh, ow = out.shape
        base_of = dict((o, b) for o, b in out.bases)
        off = out.offsets()
        ii = np.repeat(np.arange(oh), ow) * sh - ph
        jj = np.tile(np.arange(ow), oh) * sw - pw
        diags: dict[tuple[int, int], np.ndarray] = {}
        for (o, c), b in choice.items():
            g = (b - base_of[o]) % period
            slots = (base_of[o] + off) % period
            for di in range(kh):
                rows_ok = (ii + di >= 0) & (ii + di < h)
                for dj in range(kw):
                    weight = conv.weight[o, c, di, dj]
                    if weight == 0.0:
                        continue
                    ok = rows_ok & (jj + dj >= 0) & (jj + dj < w)
                    key = _tap_key(grid, g, di - ph, dj - pw, split_rows, fold, merge)
                    vec = diags.get(key)
                    if vec is None:
                        vec = diags[key] = np.zeros(period)
                    vec[slots[ok]] += weight * scale
        return diags
    return diagonals


def _mask_diagonals(out: Grid | Layout,
                    scale: float) -> Callable[[], dict[tuple[int, int], np.ndarray]]:
    def diagonals() -> dict[tuple[int, int], np.ndarray]:
        vec = np.zeros(out.period)
        vec[out.all_positions()[0] if isinstance(out, Grid) else out.positions] = scale
        return {(0, 0): vec}
    return diagonals


def _from_single(single: SingleLayout, pre: tuple[tuple[int, ...], ...],
                 stage: Affine) -> RotPlan:
    """A hybrid-diagonal (or block) form of a dense layer as a ``RotPlan``."""
    baby = single.baby
    frozen = {(i - i % baby, i % baby): d for i, d in single.diagonals.items()}
    return RotPlan("dense" if single.name == "dense" else "dense-block", single.width, pre,
                   frozenset(frozen), tuple(single.rotsum), (), single.out_layout,
                   lambda: frozen, _stage_bias(stage, single.out_layout),
                   skipped=single.skipped)


def _linear_matrix(specs: Sequence[LayerSpec]) -> np.ndarray:
    linears = [s for s in specs if isinstance(s, Linear)]
    matrix = linears[0].weight
    for spec in linears[1:]:
        matrix = spec.weight @ matrix
    return matrix


def _plan_stage(stage: Affine, cur: Grid | Layout, slots: int,
                search: bool, split_rows: bool = False, merge: bool = True,
                hoist: bool = False) -> RotPlan | None:
    """The ``RotPlan`` of one affine stage reading ``cur``; ``None`` if it cannot.
    ``split_rows``: a convolution's kernel rows go to the giant steps (``_tap_key``).
    ``merge``: also try keying a convolution by whole rotations (``_tap_key``'s ``merge``;
    a first stage does not: its babies are the client's copies). ``hoist``: price the
    baby rotations as hoisted ones (``RotPlan.weighted``)."""
    pre: list[tuple[int, ...]] = []
    post: list[tuple[int, ...]] = []
    scale = stage.scale
    conv: Conv2d | None = None
    in_grid: Grid | None = None
    for spec in stage.specs:
        if isinstance(spec, AvgPool2d):
            if not isinstance(cur, Grid):
                return None
            passes = [p for p in _pool_passes(cur, spec) if p]
            (post if conv is not None else pre).extend(passes)
            scale /= spec.kernel * spec.kernel
            cur = cur.pooled(spec)
        elif isinstance(spec, Conv2d):
            if not isinstance(cur, Grid):
                return None
            placed = _place_conv(cur, spec)
            if placed is None:
                return None
            in_grid, conv = cur, spec
            cur, choice = placed
        elif isinstance(spec, Linear):
            break
    weighted = _weighted(stage.specs)
    assert isinstance(cur, (Grid, Layout))
    if conv is not None:
        assert in_grid is not None
        # post-pools re-scale the convolution: fold the total factor into its plaintexts
        conv_out = _conv_out(in_grid, conv, cur)
        if cur.slot_map() is None:
            return None
        plans = []
        ways = [(False, 0)] if split_rows else [(False, 0), (True, 0)] + [
            (False, m) for m in (_merge_moduli(in_grid.period) if merge else ())]
        for fold, modulus in ways:
            keys = _conv_keys(in_grid, conv, conv_out, choice, split_rows=split_rows,
                              fold=fold, merge=modulus)
            plans.append(RotPlan(
                "conv", in_grid.period, tuple(pre), keys, (), tuple(post), cur,
                _conv_diagonals(in_grid, conv, conv_out, choice, scale, split_rows, fold,
                                modulus),
                _stage_bias(stage, cur), folded=fold, merged=modulus))
        # fewest rotations, then fewest products (latency first: a merged plan may need a
        # Galois key or two more than the unmerged one). Folding on Orion's LeNet (conv
        # 32->64) trades 4 more rotations (52 more babies, 48 fewer giants) for 24 % fewer
        # products and measured slower; merging there takes both fewer rotations and
        # fewer products
        best = min(plans, key=lambda rp: (rp.weighted(hoist), rp.products()))
        every = _conv_keys(in_grid, conv, conv_out, choice, nonzero=False,
                           split_rows=split_rows, fold=best.folded, merge=best.merged)
        return replace(best, skipped=len(every) - len(best.keys))
    if weighted:
        in_layout = cur.as_layout() if isinstance(cur, Grid) else cur
        matrix = _linear_matrix(stage.specs) * scale
        hybrid = _make_single(matrix, in_layout, Layout.dense(matrix.shape[0]), None, "dense",
                              baby_cost=hoisted_cost if hoist else None)
        cands = [hybrid]
        if search and in_layout.period * matrix.shape[0] <= _BLOCK_SEARCH_MAX:
            cands += _block_candidates(matrix, in_layout, slots, hybrid.rotations())
        best = min(cands, key=lambda c: (c.rotations(), len(c.diagonals)))
        return _from_single(best, tuple(pre), stage)
    return RotPlan("scale", cur.period, tuple(pre), frozenset({(0, 0)}), (), (), cur,
                   _mask_diagonals(cur, scale), _stage_bias(stage, cur))


def _conv_out(in_grid: Grid, conv: Conv2d, final: Grid) -> Grid:
    """The convolution's own output grid (before the pools that follow it)."""
    _, oh, ow = conv.out_shape
    return Grid(final.period, (final.shape[0], oh, ow), in_grid.rs * conv.stride[0],
                in_grid.cs * conv.stride[1], final.bases)


# ----- search --------------------------------------------------------------------------


def _input_grids(shape: tuple[int, ...], period: int, max_cs: int) -> list[Grid]:
    """Client input grids: channels interleaved ``cs`` apart, copies filling the gaps
    (the first convolution then reads a copy beside each output channel)."""
    c, h, w = shape
    grids = []
    cs = 1
    while cs <= max_cs:
        rs = w * cs
        blocks = math.ceil(c / cs)
        copies = blocks * cs if cs >= c else c
        bases = tuple((k % c, (k // cs) * h * rs + k % cs) for k in range(copies))
        grid = Grid(period, (c, h, w), rs, cs, bases)
        if (h - 1) * rs + (w - 1) * cs + (blocks - 1) * h * rs < period \
                and grid.slot_map() is not None:
            grids.append(grid)
        cs *= 2
    return grids


def _level_weight(level: int) -> float:
    """Relative cost of a rotation at ``level`` (key switching grows ~ level^1.3)."""
    return float((level + 2) ** 1.3)


def _client_baby(indices: Sequence[int], max_shifts: int) -> int:
    """Baby-step size of a first stage's diagonals: the lowest giant steps (server
    rotations) plus ``COPY_COST`` per copy, the client sending the babies as ``MIN_SHIFTS``
    to ``max_shifts - 1`` shifted copies, or the size with the fewest rotations."""
    top = max(indices, default=0) + 1
    best = _best_baby(indices)
    giants = {i - i % best for i in indices} - {0}
    best_key = (len({i % best for i in indices} - {0}) + len(giants) + COPY_COST, 0)
    for b in (1 << k for k in range(top.bit_length() + 1)):
        babies = len({i % b for i in indices} - {0})
        if MIN_SHIFTS <= babies < max_shifts:
            cost = len({i - i % b for i in indices} - {0}) + COPY_COST * (babies + 1)
            if (cost, babies) < best_key:
                best, best_key = b, (cost, babies)
    return best


def _im2col_first(program: Program, slots: int,
                  max_shifts: int = 1) -> tuple[np.ndarray, RotPlan] | None:
    """The first convolution on the client's im2col expansion, when it fits the slots.

    Slot ``k * P' + p`` holds tap ``k`` of window ``p``; output channel ``o`` lands in
    block ``o`` (slot ``o * P' + p``). The slot matrix has one nonzero per
    (channel, tap, window) and its hybrid diagonals are built from those entries alone:
    ``pow2(out channels)`` diagonals at most, then ``log2(taps / channels)`` rotate-and-sums.
    """
    stage = next(s for s in program.stages if isinstance(s, Affine) and not s.is_noop)
    if stage is not program.stages[0] or not isinstance(stage.specs[0], Conv2d):
        return None
    conv = stage.specs[0]
    oc, ic, kh, kw = conv.weight.shape
    _, oh, ow = conv.out_shape
    windows, kernel = oh * ow, ic * kh * kw
    pw, pk = pow2(windows), pow2(kernel)
    d, m = pk * pw, pow2(oc) * pw
    if max(d, m) > slots:
        return None
    index = np.arange(1, int(np.prod(conv.in_shape)) + 1, dtype=np.float64)
    cols = im2col(index.reshape(1, *conv.in_shape), (kh, kw), conv.stride, conv.padding)[0]
    gather = -np.ones(d, dtype=np.int64)
    k_idx, p_idx = np.meshgrid(np.arange(kernel), np.arange(windows), indexing="ij")
    gather[(k_idx * pw + p_idx).ravel()] = cols.T.ravel().astype(np.int64) - 1
    o_i, k_i, p_i = (a.ravel() for a in np.meshgrid(np.arange(oc), np.arange(kernel),
                                                      np.arange(windows), indexing="ij"))
    rows, cols_ = o_i * pw + p_i, k_i * pw + p_i
    delta = (cols_ - rows) % d
    if m <= d:
        diag_index, slot = delta % m, rows + (delta // m) * m
    else:
        diag_index, slot = delta, rows
    width = max(m, d)
    live = conv.weight.reshape(oc, kernel)[o_i, k_i] != 0.0  # pruned taps: no diagonal
    every = set(diag_index.tolist())
    o_i, k_i, diag_index, slot = o_i[live], k_i[live], diag_index[live], slot[live]
    indices = sorted(set(diag_index.tolist()))
    baby = _client_baby(indices, max_shifts)
    keys = frozenset((i - i % baby, i % baby) for i in indices)
    out = Grid(m, (oc, oh, ow), ow, 1, tuple((o, o * pw) for o in range(oc)))
    scale = stage.scale
    post: list[tuple[int, ...]] = []
    cur = out
    for spec in stage.specs[1:]:
        if isinstance(spec, AvgPool2d):
            post.extend(p for p in _pool_passes(cur, spec) if p)
            scale /= spec.kernel * spec.kernel
            cur = cur.pooled(spec)
        elif not spec.kind == "flatten":
            return None

    def diagonals() -> dict[tuple[int, int], np.ndarray]:
        values = conv.weight.reshape(oc, kernel)[o_i, k_i] * scale
        diags: dict[tuple[int, int], np.ndarray] = {}
        for i in indices:
            sel = diag_index == i
            vec = np.zeros(width)
            np.add.at(vec, slot[sel], values[sel])
            diags[(i - i % baby, i % baby)] = vec
        return diags

    rotsum = tuple(_rotsum_steps(m, d))
    plan = RotPlan("im2col", width, (), keys, rotsum, tuple(post), cur, diagonals,
                   _stage_bias(stage, cur), skipped=len(every) - len(indices))
    return gather, plan


def _first_cost(rp: RotPlan, max_shifts: int) -> float:
    """Server rotations plus ``COPY_COST`` per input ciphertext of a first stage, with
    the client's shifted copies when ``_client_shifts`` would use them."""
    babies = len(rp.babies())
    if not rp.pre and MIN_SHIFTS <= babies < max_shifts:
        return rp.rotations() - babies + COPY_COST * (babies + 1)
    return rp.rotations() + COPY_COST


def _first_stage(stage: Affine, cur: Grid | Layout, slots: int, search: bool,
                 max_shifts: int, hoist: bool = False) -> RotPlan | None:
    """The first stage's plan: a convolution's whole kernel offsets as baby steps, or
    only their columns (the client sends ``kw`` copies and the server rotates by the
    rows), whichever costs less with the client's copies. Without copies
    (``max_shifts <= MIN_SHIFTS``) the convolution may be keyed by whole rotations, as
    any later one."""
    if max_shifts <= MIN_SHIFTS:
        return _plan_stage(stage, cur, slots, search, hoist=hoist)
    whole = _plan_stage(stage, cur, slots, search, merge=False, hoist=hoist)
    if whole is None or whole.name != "conv":
        return whole
    rows = _plan_stage(stage, cur, slots, search, split_rows=True, hoist=hoist)
    cands = [whole] + ([rows] if rows is not None else [])
    return min(cands, key=lambda rp: (_first_cost(rp, max_shifts), rp.products()))


def _client_shifts(program: Program, stages: list[RotPlan | None],
                   max_shifts: int) -> tuple[int, ...]:
    """The input rotations the client sends: the first stage's baby steps when that stage
    reads the input itself (no pass before it) and has ``MIN_SHIFTS..max_shifts - 1`` of
    them; that stage is replaced in ``stages`` by its ``client_babies`` form."""
    for k, (stage, rp) in enumerate(zip(program.stages, stages)):
        if isinstance(stage, Polynomial):
            return (0,)
        if rp is None:
            continue
        babies = rp.babies()
        if rp.pre or not MIN_SHIFTS <= len(babies) < max_shifts:
            return (0,)
        stages[k] = replace(rp, client_babies=True)
        return (0, *babies)
    return (0,)


def _plan_with(program: Program, start: Grid | tuple[np.ndarray, RotPlan],
               slots: int, search: bool, max_shifts: int = MAX_SHIFTS,
               hoist: bool = False) -> GridPlan | None:
    stages: list[RotPlan | None] = []
    levels: list[int] = []
    level = program.depth
    if isinstance(start, Grid):
        cur: Grid | Layout = start
        gather = start.slot_map()
        assert gather is not None
        first = None
    else:
        gather, first = start
        cur = first.out
    for stage in program.stages:
        if isinstance(stage, Polynomial):
            stages.append(None)
            level -= stage.depth
            continue
        if stage.is_noop:
            stages.append(None)
            continue
        if first is not None:
            rp = first
        elif level == program.depth and all(p is None for p in stages):
            rp = _first_stage(stage, cur, slots, search, max_shifts, hoist)
        else:
            rp = _plan_stage(stage, cur, slots, search, hoist=hoist)
        first = None
        if rp is None or rp.width > slots:
            return None
        stages.append(rp)
        levels.append(level)
        cur = rp.out
        level -= 1
    shifts = _client_shifts(program, stages, max_shifts)
    plans = [rp for rp in stages if rp is not None]
    cost = sum(_level_weight(lv) * (rp.weighted(hoist) + PRODUCT_COST * rp.products())
               for rp, lv in zip(plans, levels))
    cost += _level_weight(program.depth) * COPY_COST * (len(shifts) - 1)
    _share_keys(plans, slots)
    if isinstance(cur, Grid):
        out_pos, out_period = cur.positions(), cur.period
    else:
        out_pos, out_period = cur.positions, cur.period
    return GridPlan(len(gather), stages, gather, out_pos, out_period, cost, shifts,
                    start if isinstance(start, Grid) else None)


def _share_keys(plans: list[RotPlan], slots: int) -> None:
    """Let each stage's baby-step tree reuse the Galois keys the plan needs anyway (pool
    passes, rotate-and-sums, earlier stages' steps): fewer keys, same rotation count.
    Sets ``known`` on the plans this search just built."""
    known = {s % slots for rp in plans for p in (*rp.pre, *rp.post, rp.rotsum) for s in p}
    for rp in plans:
        rp.known = frozenset(k % rp.width for k in known) - {0}
        known |= {s % slots for s in rp.steps()}


#: Cost of moving one ciphertext between processes, in rotations at the stage's level
#: (SEAL's compressed save ~16 ms and load ~5 ms at N=16384, against ~13-18 ms a rotation).
TRANSFER_COST = 1.2
#: Most processes one stage is split over.
MAX_WORKERS = 8


def _split_points(rp: RotPlan, workers: int) -> tuple[int, ...]:
    """Cut points giving each of ``workers`` processes a run of giant steps of about equal
    cost (one rotation plus its products each; every process also makes the baby
    rotations), or ``()`` when the split would not pay for its transfers."""
    giants = sorted({g % rp.width for g, _ in rp.keys})
    per: dict[int, int] = {}
    for g, _ in rp.keys:
        per[g % rp.width] = per.get(g % rp.width, 0) + 1
    cost = [(1.0 if g else 0.0) + PRODUCT_COST * per[g] for g in giants]
    parts = min(workers, len(giants))
    # a helper's share must clearly outweigh its transfers: the input (the client's copies
    # for a first stage) in, its partial sum out
    inputs = 1 + (len(rp.babies()) if rp.client_babies else 0)
    if parts < 2 or sum(cost) / parts <= 3 * (inputs + 1) * TRANSFER_COST:
        return ()
    target, acc, cuts = sum(cost) / parts, 0.0, []
    for i, c in enumerate(cost[:-1]):
        acc += c
        if acc >= target * (len(cuts) + 1) and len(cuts) < parts - 1:
            cuts.append(i + 1)
    return tuple(cuts)


def split_stages(plan: GridPlan, workers: int) -> GridPlan:
    """``plan`` with each costly stage's giant steps split over ``workers`` processes
    (``RotPlan.split``); a new plan, ``plan`` is unchanged. A helper's last giant rotation
    may need one Galois key more (its part's smallest giant)."""
    if workers < 2:
        return plan
    stages = [rp if rp is None else replace(rp, split=_split_points(rp, workers))
              for rp in plan.stages]
    return replace(plan, stages=stages)


#: Fewest baby rotations made on the server for which ``hoist_stages`` hoists a stage: a
#: split and each baby from it cost about 0.6 of a rotation (``HOISTED_ROTATION``), so two
#: babies already gain a little.
MIN_HOISTED = 2


#: A rotation from a split and a split, in rotations (SEAL's ``rotate_vector``), measured
#: at LeNet-5's second convolution (N=16384, 5 primes): ~10 ms each against ~17 ms.
HOISTED_ROTATION, SPLIT = 0.6, 0.6
#: Babies per split that ``RotPlan``'s hoisted tree reaches with the chain's keys (LeNet-5:
#: 29 babies from 7 splits, 12 from 4; Orion's LeNet 29 from 8, 26 from 5).
BABIES_PER_SPLIT = 4


def hoisted_cost(babies: int) -> float:
    """What ``babies`` baby rotations of one stage cost hoisted, in rotations (as many
    as there are below ``MIN_HOISTED``)."""
    if babies < MIN_HOISTED:
        return float(babies)
    return HOISTED_ROTATION * babies + SPLIT * max(1.0, babies / BABIES_PER_SPLIT)

def hoist_stages(plan: GridPlan) -> GridPlan:
    """``plan`` with every stage of ``MIN_HOISTED`` or more server-side baby rotations
    hoisted (``RotPlan.hoisted``: babies grouped by parent); a new plan, ``plan`` is
    unchanged. The same rotations and Galois keys; cheaper rotations where the server has
    the native part."""
    stages = [rp if rp is None or rp.client_babies or len(rp.babies()) < MIN_HOISTED
              else replace(rp, hoisted=True) for rp in plan.stages]
    return replace(plan, stages=stages)


def plan_grid(program: Program, slots: int, search: bool = True,
              max_shifts: int = MAX_SHIFTS, hoist: bool = False) -> GridPlan | None:
    """The cheapest grid layouts of ``program`` in ``slots`` slots, or ``None``.

    Pure: reads the program, mutates nothing. Tries every power-of-two period that holds
    the input, every interleave of the input's channels and the client's im2col, and keeps
    the plan with the lowest level-weighted rotation count. ``search=False`` skips the
    block layouts of dense layers after dense layers (never needed to fit). ``max_shifts``:
    most input ciphertexts per input (the client's shifted copies; 1: none).
    ``hoist``: price server-side baby rotations as hoisted ones (``hoisted_cost``), for a
    plan that ``hoist_stages`` will hoist.
    """
    if not applicable(program):
        return None
    size = int(np.prod(program.input_shape))
    max_cs = pow2(max(s.weight.shape[0] for s in program.specs if isinstance(s, Conv2d))
                  if any(isinstance(s, Conv2d) for s in program.specs) else 1)
    starts: list[Grid | tuple[np.ndarray, RotPlan]] = []
    period = pow2(size)
    while period <= slots:
        starts.extend(_input_grids(program.input_shape, period, max_cs))
        period *= 2
    first = _im2col_first(program, slots, max_shifts)
    if first is not None:
        starts.append(first)
    best: GridPlan | None = None
    best_start = None
    for start in starts:
        plan = _plan_with(program, start, slots, False, max_shifts, hoist)
        if plan is not None and (best is None or plan.cost < best.cost):
            best, best_start = plan, start
    if search and best_start is not None:
        searched = _plan_with(program, best_start, slots, True, max_shifts, hoist)
        if searched is not None and searched.cost < best.cost:
            best = searched
    return best
