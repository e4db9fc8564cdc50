"""The plaintext diagonals of a compiled ``single``-packing plan, as pruning units.

``slot_units(program, grid, dense)`` reads the layouts the scheme compiled (``grid``: the
convolution-aware ``GridPlan``; ``dense``: the dense-matrix ``DenseLayouts``), never a
re-plan, and reports for each weighted layer whose plaintexts they evaluate as whole
diagonals the diagonal each weight lands in (``SlotUnits``):

* the first convolution on the client's im2col expansion: tap ``k`` of output channel
  ``o`` sits in the diagonal ``(k - o) * P' mod m'`` (``P'`` the window block, ``m'`` the
  output period): one diagonal per channel-tap shift, output channels permutable;
* a Linear layer in a hybrid-diagonal layout (``dense``, or ``plain``/``chained`` without
  a grid): entry ``(r, c)`` sits in the diagonal ``(pos(c) - pos(r)) mod min(m', d')``
  over the slot positions the plan gave its input (a grid's gaps, or the block layout
  of the layer before, included) and output; rows permutable, except the last layer's;
* a convolution on a channel-interleaved grid: one unit per kernel offset (its baby step),
  across every channel pair. When the plan folds base differences a column apart into one
  giant step (``grid._tap_key``), a pair's baby is its offset moved by whole columns: the
  unit is still the kernel offset and zeroing it removes its products; its rotation goes
  when the offsets sharing it are zero too (the pruned model's plan is chosen again on
  cost, folded or not);
* a convolution keyed by whole rotations (``grid._tap_key``'s ``merge``): one unit per
  rotation ``b_c + offset - t_o`` (input base minus output base plus kernel offset), each
  one plaintext of the plan, consecutive rotations sharing giant steps; left out when an
  input channel has several copies;
* a Linear layer in a block layout (``dense-block``, ``block``): row ``r`` sums its
  products in its own block of ``b`` slots, and the plaintext of input alignment ``a``
  holds the weights ``(r, c)`` with ``(pos(c) - r b - a) mod P < b``: a window of ``b``
  consecutive diagonals ``(pos(c) - r b) mod P`` (``SlotUnits.groups``), one unit per
  alignment the plan uses (one rotation each). The alignments are chosen greedily to
  cover the nonzero weights; when a weight lies in the windows of two of them, which
  plaintext holds it follows from that cover, not from the positions, and the layer is
  left out (not pruned, its zero plaintexts still skipped).

Also left out: an ``expanded`` first stage (every product in its own slot: one diagonal
for the whole matrix) and a dense-path ``im2col`` stage fused with the layers after it.
The units are those of the unpruned model's plan: the planner switches a block layer to
the hybrid layout only once enough of its hybrid diagonals are zero, and those are not the
plan's units, so pruning no longer aims at that switch.

Pure numpy: nothing here imports the backend.
"""

from __future__ import annotations

import numpy as np
from secureinfer.layers import AvgPool2d, Conv2d, LayerSpec, Linear
from secureinfer.units import SlotUnits

from . import grid as _grid
from . import search as _search
from .program import Affine, Layout, Program, pow2

__all__ = ["slot_units"]


def _last_weighted(program: Program) -> str:
    return [s.name for s in program.specs if isinstance(s, (Linear, Conv2d))][-1]


def _im2col_units(conv: Conv2d, last: str) -> SlotUnits:
    oc, ic, kh, kw = conv.weight.shape
    _, oh, ow = conv.out_shape
    pw, kernel = pow2(oh * ow), ic * kh * kw
    width = min(pow2(oc) * pw, pow2(kernel) * pw)
    return SlotUnits(conv.name, width, (np.arange(kernel) * pw).reshape(ic, kh, kw),
                     np.arange(oc) * pw, conv.name != last, note="im2col")


def _linear_units(linear: Linear, in_layout: Layout, out_layout: Layout,
                  last: str, note: str) -> SlotUnits:
    width = min(in_layout.period, out_layout.period)
    return SlotUnits(linear.name, width, np.asarray(in_layout.positions, dtype=np.int64),
                     np.asarray(out_layout.positions, dtype=np.int64), linear.name != last,
                     note=note)


def _block_units(linear: Linear, in_layout: Layout, out_layout: Layout,
                 alignments: set[int], block: int, last: str) -> SlotUnits | None:
    """A block layout's plaintexts as units: row ``r`` sums its products in slots
    ``[r * block, (r + 1) * block)`` and the plaintext of alignment ``a`` holds the weights
    ``(r, c)`` with ``(pos(c) - r * block - a) mod P < block``: a window of ``block``
    consecutive diagonals ``(pos(c) - r * block) mod P``. ``None`` when some weight is
    covered by two of the plan's alignments (which one holds it then follows the greedy
    cover, not the positions) or by none."""
    period = in_layout.period
    delta = np.arange(period)
    cover = np.zeros(period, dtype=np.int64)
    groups = np.full(period, -1, dtype=np.int64)
    for a in sorted(alignments):
        hit = (delta - a) % period < block
        cover += hit
        groups[hit] = a
    anchors = np.asarray(out_layout.positions, dtype=np.int64) % period
    slots = np.asarray(in_layout.positions, dtype=np.int64)
    used = (slots[None, :] - anchors[:, None]) % period
    if np.any(cover[used] != 1):
        return None
    return SlotUnits(linear.name, period, slots, anchors, linear.name != last,
                     contiguous=False, note="block alignments", groups=groups)


def _taps(conv: Conv2d, grid: _grid.Grid) -> np.ndarray:
    """The slot offset of every kernel offset ``(di, dj)`` on ``grid`` (padding taken off)."""
    _, _, kh, kw = conv.weight.shape
    ph, pw = conv.padding
    return (np.arange(kh)[:, None] - ph) * grid.rs + (np.arange(kw)[None, :] - pw) * grid.cs


def _tap_units(conv: Conv2d, grid: _grid.Grid, free: frozenset[int]) -> SlotUnits:
    oc, ic, kh, kw = conv.weight.shape
    taps = _taps(conv, grid)
    return SlotUnits(conv.name, grid.period, np.broadcast_to(taps % grid.period,
                                                             (ic, kh, kw)).copy(),
                     np.zeros(oc, dtype=np.int64), False, False, "grid kernel offsets",
                     frozenset(s % grid.period for s in free) - {0})


def _merged_units(conv: Conv2d, grid: _grid.Grid, out: _grid.Grid) -> SlotUnits | None:
    """A convolution keyed by whole rotations (``grid._tap_key``'s ``merge``): weight
    ``(o, c, di, dj)`` sits in the plaintext of rotation ``b_c + tap - t_o`` (``b_c`` input
    channel ``c``'s base, ``t_o`` output channel ``o``'s), one unit per rotation; ``None``
    when a channel has several copies (which one a pair reads follows the planner's
    choice, not the positions)."""
    bases: dict[int, int] = {}
    for c, b in grid.bases:
        if c in bases:
            return None
        bases[c] = b
    oc, ic = conv.weight.shape[:2]
    slots = (np.array([bases[c] for c in range(ic)])[:, None, None]
             + _taps(conv, grid)[None]) % grid.period
    anchors = dict(out.bases)
    return SlotUnits(conv.name, grid.period, slots.astype(np.int64),
                     np.array([anchors[o] for o in range(oc)], dtype=np.int64), False,
                     note="grid whole rotations")


def _single_linear(stage: Affine) -> Linear | None:
    linears = [s for s in stage.specs if isinstance(s, Linear)]
    moving = [s for s in stage.specs if s.kind not in ("flatten", "avgpool2d")]
    return linears[0] if len(linears) == 1 and len(moving) == 1 else None


def _pooled(cur: _grid.Grid | Layout, specs: list[LayerSpec]) -> _grid.Grid | Layout:
    for spec in specs:
        if isinstance(spec, AvgPool2d) and isinstance(cur, _grid.Grid):
            cur = cur.pooled(spec)
        elif isinstance(spec, (Linear, Conv2d)):
            break
    return cur


def _grid_units(program: Program, plan: _grid.GridPlan) -> list[SlotUnits]:
    last = _last_weighted(program)
    out: list[SlotUnits] = []
    free = frozenset(plan.fixed_steps(plan.period))  # pool passes, rotate-and-sums
    cur: _grid.Grid | Layout | None = plan.input_grid
    for stage, rp in zip(program.stages, plan.stages):
        if rp is None or not isinstance(stage, Affine):
            continue
        linear = _single_linear(stage)
        if rp.name == "im2col":
            out.append(_im2col_units(stage.specs[0], last))
        elif rp.name == "dense" and linear is not None and cur is not None:
            src = _pooled(cur, stage.specs)
            in_layout = src.as_layout() if isinstance(src, _grid.Grid) else src
            assert isinstance(rp.out, Layout)
            out.append(_linear_units(linear, in_layout, rp.out, last, "hybrid diagonals"))
        elif rp.name == "dense-block" and linear is not None and cur is not None:
            src = _pooled(cur, stage.specs)
            in_layout = src.as_layout() if isinstance(src, _grid.Grid) else src
            assert isinstance(rp.out, Layout)
            units = _block_units(linear, in_layout, rp.out, {g + b for g, b in rp.keys},
                                 1 << len(rp.rotsum), last)
            if units is not None:
                out.append(units)
        elif rp.name == "conv" and cur is not None:
            conv = next(s for s in stage.specs if isinstance(s, Conv2d))
            src = _pooled(cur, stage.specs)
            if isinstance(src, _grid.Grid) and rp.merged:
                assert isinstance(rp.out, _grid.Grid)
                merged = _merged_units(conv, src, rp.out)
                if merged is not None:
                    out.append(merged)
            elif isinstance(src, _grid.Grid):
                out.append(_tap_units(conv, src, free))
        cur = rp.out
    return out


def _dense_units(program: Program, layouts: _search.DenseLayouts) -> list[SlotUnits]:
    last = _last_weighted(program)
    out = []
    for stage, single in zip(program.stages, layouts.stages):
        if single is None or not isinstance(stage, Affine):
            continue
        linear = _single_linear(stage)
        if linear is None:
            continue
        if single.name in ("plain", "chained"):
            out.append(_linear_units(linear, single.in_layout, single.out_layout, last,
                                     f"{single.name} hybrid diagonals"))
        elif single.name == "block":
            units = _block_units(linear, single.in_layout, single.out_layout,
                                 set(single.diagonals), 1 << len(single.rotsum), last)
            if units is not None:
                out.append(units)
    return out


def slot_units(program: Program, grid: _grid.GridPlan | None = None,
               dense: _search.DenseLayouts | None = None) -> list[SlotUnits]:
    """The diagonal units of every weighted layer that the compiled layouts of
    ``program`` (``grid`` or ``dense``, as ``SinglePacking.layouts`` chose them) evaluate
    as whole plaintext diagonals; ``[]`` without layouts."""
    if grid is not None:
        return _grid_units(program, grid)
    return _dense_units(program, dense) if dense is not None else []
