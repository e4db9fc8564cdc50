"""The dense-matrix layout search for ``single`` packing (networks without convolutions,
or with shapes the grid layouts do not take): a pure function of a ``Program``.

Each affine stage is a matrix from its input layout to its output layout, evaluated by the
hybrid diagonal method (Halevi-Shoup diagonals of an ``m' x d'`` matrix, baby-step
giant-step, then a rotate-and-sum when ``m' < d'``). The first stage may read the client's
im2col expansion or an expanded input where every product has its own slot; later stages
may use block layouts. The cheapest layout (fewest rotations) wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from secureinfer.layers import Conv2d, im2col

from .program import Affine, Layout, Polynomial, Program, SingleLayout, affine_matrix, pow2

__all__ = ["DenseLayouts", "input_layout", "layout_single", "output_layout", "rotation_steps"]

_MAX_SEARCH = 1 << 22  # (alignment, slot) pairs the block-layout search may examine


@dataclass(frozen=True)
class DenseLayouts:
    """The chosen layout of every stage (``None`` for stages that move nothing or are not
    affine) and a human note per affine stage."""

    stages: tuple[SingleLayout | None, ...]
    notes: tuple[str, ...]

    def rotations(self) -> int:
        return sum(s.rotations() for s in self.stages if s is not None)

    def products(self) -> int:
        """Plaintext products per evaluation (one per nonzero diagonal)."""
        return sum(len(s.diagonals) for s in self.stages if s is not None)

    def fixed_steps(self, modulus: int) -> list[int]:
        """The rotate-and-sum steps, modulo ``modulus``: keyed whatever the weights at
        these layouts (``GridPlan.fixed_steps``)."""
        return sorted({r % modulus for s in self.stages if s is not None
                       for r in s.rotsum} - {0})

    def skipped(self) -> int:
        """All-zero diagonals (pruned units) left out of every stage."""
        return sum(s.skipped for s in self.stages if s is not None)


def _inverse(layout: Layout) -> np.ndarray:
    """Slot -> element index (``-1`` for an empty slot) over one period."""
    inv = -np.ones(layout.period, dtype=np.int64)
    inv[layout.positions] = np.arange(len(layout.positions))
    return inv


def _diagonals(matrix: np.ndarray, in_layout: Layout, out_layout: Layout,
               structure: np.ndarray | None = None) -> tuple[dict[int, np.ndarray], int]:
    """Nonzero generalized diagonals of ``matrix`` seen from slots to slots, and how many
    diagonals are all zero although ``structure`` (where the unpruned layer has weights)
    is not: pruned units, skipped (0 without a structure).

    With ``m'``/``d'`` the output/input periods, diagonal ``i < min(m', d')`` holds
    ``S[j mod m', (j + i) mod d']`` for ``j < max(m', d')``, ``S`` the slot matrix.
    """
    m, d = out_layout.period, in_layout.period
    width = max(m, d)
    j = np.arange(width)
    rows = _inverse(out_layout)[j % m]
    padded = np.zeros((matrix.shape[0] + 1, matrix.shape[1] + 1))
    padded[:-1, :-1] = matrix  # index -1 reads the zero row / column
    shape = None
    if structure is not None:
        shape = np.zeros_like(padded, dtype=bool)
        shape[:-1, :-1] = structure != 0
    inv_in = _inverse(in_layout)
    out: dict[int, np.ndarray] = {}
    skipped = 0
    for i in range(min(m, d)):
        cols = inv_in[(j + i) % d]
        diag = padded[rows, cols]
        if np.any(diag != 0.0):
            out[i] = diag
        elif shape is not None and shape[rows, cols].any():
            skipped += 1
    return out, skipped


def _best_baby(indices: Sequence[int],
               baby_cost: Callable[[int], float] | None = None) -> int:
    """Baby-step size minimising rotations, ``baby_cost(babies)`` pricing the baby
    rotations (default: one each; ties: fewer distinct steps, then a power of two, whose
    giant steps are multiples of it and reuse power-of-two Galois keys, then smaller)."""
    if not indices:
        return 1
    top = max(indices) + 1
    candidates = set(range(1, min(top, 64) + 1)) | {1 << k for k in range(top.bit_length())}
    best, best_key = 1, None
    for b in sorted(candidates):
        baby = {i % b for i in indices} - {0}
        giant = {i - i % b for i in indices} - {0}
        babies = baby_cost(len(baby)) if baby_cost is not None else len(baby)
        key = (babies + len(giant), len(baby | giant), b & (b - 1) != 0, b)
        if best_key is None or key < best_key:
            best, best_key = b, key
    return best


def _rotsum_steps(out_period: int, in_period: int) -> list[int]:
    steps, step = [], out_period
    while step < in_period:
        steps.append(step)
        step *= 2
    return steps


def _make_single(matrix: np.ndarray, in_layout: Layout, out_layout: Layout,
                 gather: np.ndarray | None, name: str,
                 structure: np.ndarray | None = None,
                 baby_cost: Callable[[int], float] | None = None) -> SingleLayout:
    """The hybrid-diagonal form of ``matrix``; ``structure`` marks where the unpruned layer
    has weights (default: everywhere), so all-zero diagonals count as skipped units.
    ``baby_cost``: what its baby rotations cost (``_best_baby``)."""
    if structure is None:
        structure = np.ones(matrix.shape, dtype=bool)
    diags, skipped = _diagonals(matrix, in_layout, out_layout, structure)
    return SingleLayout(in_layout, out_layout, diags, _best_baby(sorted(diags), baby_cost),
                        _rotsum_steps(out_layout.period, in_layout.period), gather, name,
                        skipped)


def _out_layouts(stage: Affine, conv_only: bool) -> list[Layout]:
    """Candidate output layouts: dense, and channel blocks of ``pow2(oh*ow)`` slots."""
    m = stage.shape[0]
    layouts = [Layout.dense(m)]
    last = stage.specs[-1]
    shape = last.out_shape if last.kind != "flatten" else last.in_shape
    if conv_only and len(shape) == 3:
        c, h, w = shape
        block = pow2(h * w)
        if block != h * w:
            pos = (np.arange(c)[:, None] * block + np.arange(h * w)[None, :]).reshape(-1)
            layouts.append(Layout(pow2(c * block), pos.astype(np.int64)))
    return layouts


def _im2col_candidate(stage: Affine, slots: int
                      ) -> tuple[np.ndarray, np.ndarray, Layout, np.ndarray] | None:
    """The im2col input for a stage that starts with a convolution: ``(matrix over the
    im2col vector, where the unpruned matrix has weights, its layout, gather map)``, or
    ``None`` when it does not apply or fit."""
    conv = stage.specs[0]
    if not isinstance(conv, Conv2d):
        return None
    oc, ic, kh, kw = conv.weight.shape
    _, oh, ow = conv.out_shape
    windows, kernel = oh * ow, ic * kh * kw
    pw, pk = pow2(windows), pow2(kernel)
    if pw * pk > slots:
        return None
    index = np.arange(1, int(np.prod(conv.in_shape)) + 1, dtype=np.float64)
    cols = im2col(index.reshape(1, *conv.in_shape), (kh, kw), conv.stride, conv.padding)[0]
    gather = -np.ones(pk * pw, dtype=np.int64)
    k_idx, p_idx = np.meshgrid(np.arange(kernel), np.arange(windows), indexing="ij")
    gather[(k_idx * pw + p_idx).ravel()] = cols.T.ravel().astype(np.int64) - 1
    conv_matrix = np.zeros((oc * windows, pk * pw))
    structure = np.zeros((oc * windows, pk * pw), dtype=bool)
    weights = conv.weight.reshape(oc, kernel)
    for o in range(oc):
        rows = o * windows + np.arange(windows)
        for k in range(kernel):
            conv_matrix[rows, k * pw + np.arange(windows)] = weights[o, k]
            structure[rows, k * pw + np.arange(windows)] = True
    rest = stage.specs[1:]
    matrix = conv_matrix
    for spec in rest:
        m2, _ = affine_matrix(spec)
        matrix = m2 @ matrix
        structure = (np.abs(m2) @ structure) != 0
    return matrix, structure, Layout.dense(pk * pw), gather


def _expanded_candidate(matrix: np.ndarray, slots: int) -> SingleLayout | None:
    """Every product ``M[r, c] * x_c`` in its own slot ``c * m' + r``: the client repeats
    each input ``m'`` times, one diagonal, then ``log2(d')`` rotate-and-sum steps. Fits
    when ``m' * d' <= slots``."""
    m, d = matrix.shape
    rows, cols = pow2(m), pow2(d)
    if rows * cols > slots:
        return None
    c = np.arange(rows * cols) // rows
    gather = np.where(c < d, c, -1).astype(np.int64)
    expanded = np.zeros((m, rows * cols))
    structure = np.zeros((m, rows * cols), dtype=bool)
    for r in range(m):
        expanded[r, r + rows * np.arange(d)] = matrix[r]
        structure[r, r + rows * np.arange(d)] = True
    return _make_single(expanded, Layout.dense(rows * cols), Layout.dense(m), gather,
                        "expanded", structure)


def _greedy_alignments(matrix: np.ndarray, in_layout: Layout, block: int,
                       budget: int) -> dict[int, np.ndarray] | None:
    """Cover every nonzero ``(row, column)`` of ``matrix`` with products in row ``r``'s
    block of slots ``[r * block, (r + 1) * block)``, reading the input at an alignment
    (rotation) ``a``; pick alignments greedily. ``None`` beyond ``budget`` alignments."""
    m, _ = matrix.shape
    period = in_layout.period
    inv = _inverse(in_layout)
    slots = np.arange(m * block)
    rows = slots // block
    remaining = matrix != 0.0
    cols = inv[(slots[None, :] + np.arange(period)[:, None]) % period]  # (alignment, slot)
    safe = np.where(cols >= 0, cols, 0)
    diags: dict[int, np.ndarray] = {}
    while remaining.any():
        gain = (remaining[rows[None, :], safe] & (cols >= 0)).sum(axis=1)
        a = int(np.argmax(gain))
        if gain[a] == 0 or len(diags) >= budget:
            return None
        take = remaining[rows, safe[a]] & (cols[a] >= 0)
        diag = np.zeros(m * block)
        diag[take] = matrix[rows[take], cols[a][take]]
        remaining[rows[take], cols[a][take]] = False
        diags[a] = diag
    return diags


def _block_candidates(matrix: np.ndarray, in_layout: Layout, slots: int,
                      budget: int) -> list[SingleLayout]:
    """Row ``r`` sums the products in its own block of ``block`` slots (rotate-and-sum by
    1, 2, .., block/2); products read the input at a few alignments chosen greedily. Wins
    when the input's layout repeats a structure the hybrid method cannot use (e.g. the
    channel blocks a convolution leaves). ``skipped``: alignments the unpruned layer's
    cover (every weight nonzero) needs beyond this one's (pruned units)."""
    m, _ = matrix.shape
    out = []
    block = 2
    while block <= in_layout.period and m * block <= slots \
            and in_layout.period * m * block <= _MAX_SEARCH:
        width = max(pow2(m * block), in_layout.period)
        diags = _greedy_alignments(matrix, in_layout, block, budget)
        if diags is not None:
            full = {a: np.concatenate([d, np.zeros(width - len(d))]) for a, d in diags.items()}
            layout = Layout(width, np.arange(m, dtype=np.int64) * block)
            steps = [1 << k for k in range(block.bit_length() - 1)]
            unpruned = _greedy_alignments(np.ones_like(matrix), in_layout, block,
                                          in_layout.period)
            skipped = max(0, len(unpruned or {}) - len(full))
            out.append(SingleLayout(in_layout, layout, full, _best_baby(sorted(full)), steps,
                                    None, "block", skipped))
        block *= 2
    return out


def _first_candidates(stage: Affine, slots: int) -> list[SingleLayout]:
    matrix, _ = stage.weights()
    d = matrix.shape[1]
    conv_only = all(s.kind in ("conv2d", "flatten") for s in stage.specs)
    cands = []
    plain_in = Layout.dense(d)
    for out in _out_layouts(stage, conv_only):
        cands.append(_make_single(matrix, plain_in, out, np.arange(d, dtype=np.int64), "plain"))
    expanded = _expanded_candidate(matrix, slots)
    if expanded is not None:
        cands.append(expanded)
    im2col_form = _im2col_candidate(stage, slots)
    if im2col_form is not None:
        conv_matrix, structure, layout, gather = im2col_form
        for out in _out_layouts(stage, conv_only):
            cands.append(_make_single(conv_matrix * stage.scale, layout, out, gather, "im2col",
                                      structure))
    return cands


def _fits(single: SingleLayout, slots: int) -> bool:
    return single.width <= slots


def _cost(single: SingleLayout) -> tuple[int, int]:
    return single.rotations(), len(single.diagonals)


def layout_single(program: Program, slots: int, search: bool = True) -> DenseLayouts | None:
    """Choose the slot layout of every affine stage for ``slots`` slots.

    Pure: returns the layouts (``None`` when some value does not fit in ``slots`` slots)
    and mutates nothing. ``search=False`` skips the block layouts (slower to plan, never
    needed to fit).
    """
    layout: Layout | None = None
    chosen: list[SingleLayout | None] = []
    notes: list[str] = []
    first = True
    for stage in program.stages:
        if isinstance(stage, Polynomial):
            if layout is None:
                layout = Layout.dense(int(np.prod(program.input_shape)))
            first = False
            chosen.append(None)
            continue
        if stage.is_noop:
            chosen.append(None)
            if layout is None:
                layout = Layout.dense(int(np.prod(program.input_shape)))
            continue
        if first:
            cands = [c for c in _first_candidates(stage, slots) if _fits(c, slots)]
            first = False
        else:
            matrix, _ = stage.weights()
            assert layout is not None
            cands = [_make_single(matrix, layout, out, None, "chained")
                     for out in _out_layouts(stage, conv_only=False)]
            cands = [c for c in cands if _fits(c, slots)]
            if search:
                budget = min((c.rotations() for c in cands), default=slots)
                cands += _block_candidates(matrix, layout, slots, budget)
        if not cands:
            return None
        best = min(cands, key=_cost)
        chosen.append(best)
        layout = best.out_layout
        notes.append(f"{stage.describe()}: {best.name} input, {len(best.diagonals)} diagonals, "
                     f"{best.rotations()} rotations, {best.skipped} zero diagonals skipped")
    if layout is None or layout.period > slots:
        return None
    return DenseLayouts(tuple(chosen), tuple(notes))


def input_layout(program: Program, layouts: DenseLayouts) -> tuple[Layout, np.ndarray]:
    """The client's single-packing input: its layout and gather map."""
    for stage, single in zip(program.stages, layouts.stages):
        if single is not None:
            assert single.gather is not None
            return single.in_layout, single.gather
        if isinstance(stage, Polynomial):
            break
    d = int(np.prod(program.input_shape))
    return Layout.dense(d), np.arange(d, dtype=np.int64)


def output_layout(program: Program, layouts: DenseLayouts) -> Layout:
    """Layout of the program's result under single packing."""
    layout, _ = input_layout(program, layouts)
    for single in layouts.stages:
        if single is not None:
            layout = single.out_layout
    return layout


def distinct_steps(stages: Sequence[object | None], slots: int) -> list[int]:
    """Every distinct rotation step of ``stages`` (each ``None`` or with ``steps()``),
    normalised to ``[1, slots)``: the Galois keys a plan needs."""
    steps: set[int] = set()
    for stage in stages:
        if stage is not None:
            steps |= {s % slots for s in stage.steps()}  # type: ignore[attr-defined]
    steps.discard(0)
    return sorted(steps)


def rotation_steps(layouts: DenseLayouts, slots: int) -> list[int]:
    """Every distinct rotation step of the layouts, normalised to ``[1, slots)``."""
    return distinct_steps(layouts.stages, slots)
