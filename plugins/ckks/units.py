"""The plaintext diagonals of a compiled ``single``-packing plan, as pruning units.

``slot_units(program, slots)`` plans the hybrid-diagonal layouts (no block layouts: their
plaintexts mix every weight of a layer, so no weight group can be dropped from them) and
reports, for each weighted layer, the diagonal each weight lands in (``SlotUnits``):

* the first convolution on the client's im2col expansion: tap ``k`` of output channel
  ``o`` sits in the diagonal ``(k - o) * P' mod m'`` (``P'`` the window block, ``m'`` the
  output period): one diagonal per channel-tap shift, output channels permutable;
* a Linear layer read from a grid or a dense layout: entry ``(r, c)`` sits in the diagonal
  ``(pos(c) - pos(r)) mod min(m', d')`` over the actual slot positions of its input
  (a grid's gaps included) and output; rows permutable, except the last layer's;
* a convolution on a channel-interleaved grid: one unit per kernel offset (its baby step),
  across every channel pair.

When enough whole diagonals are zero, the all-hybrid chain of layouts costs fewer rotations
than the block layouts and the planner picks it (``grid.plan_grid`` compares the two).
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


def _tap_units(conv: Conv2d, grid: _grid.Grid, free: frozenset[int]) -> SlotUnits:
    oc, ic, kh, kw = conv.weight.shape
    ph, pw = conv.padding
    taps = ((np.arange(kh)[:, None] - ph) * grid.rs + (np.arange(kw)[None, :] - pw) * grid.cs)
    return SlotUnits(conv.name, grid.period, np.broadcast_to(taps % grid.period,
                                                             (ic, kh, kw)).copy(),
                     np.zeros(oc, dtype=np.int64), False, False, "grid kernel offsets",
                     frozenset(s % grid.period for s in free) - {0})


def _free_steps(plan: _grid.GridPlan) -> frozenset[int]:
    """The steps of the pool passes and rotate-and-sums: keyed whatever the weights."""
    return frozenset(s % plan.period for rp in plan.stages if rp is not None
                     for p in (*rp.pre, *rp.post, rp.rotsum) for s in p) - {0}


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
    free = _free_steps(plan)
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
        elif rp.name == "conv" and cur is not None:
            conv = next(s for s in stage.specs if isinstance(s, Conv2d))
            src = _pooled(cur, stage.specs)
            if isinstance(src, _grid.Grid):
                out.append(_tap_units(conv, src, free))
        cur = rp.out
    return out


def _dense_units(program: Program, layouts: _search.DenseLayouts) -> list[SlotUnits]:
    last = _last_weighted(program)
    out = []
    for stage, single in zip(program.stages, layouts.stages):
        if single is None or not isinstance(stage, Affine) or single.name not in ("plain",
                                                                                  "chained"):
            continue
        linear = _single_linear(stage)
        if linear is not None:
            out.append(_linear_units(linear, single.in_layout, single.out_layout, last,
                                     f"{single.name} hybrid diagonals"))
    return out


def slot_units(program: Program, slots: int,
               max_shifts: int = _grid.MAX_SHIFTS) -> list[SlotUnits]:
    """The diagonal units of every weighted layer that the hybrid-diagonal layouts of
    ``program`` in ``slots`` slots evaluate as whole plaintexts (``[]`` if none fit);
    ``max_shifts``: the scheme's ``input_shifts`` (the client's shifted copies)."""
    if _grid.applicable(program):
        plan = _grid.plan_grid(program, slots, search=False, max_shifts=max_shifts)
        return _grid_units(program, plan) if plan is not None else []
    layouts = _search.layout_single(program, slots, search=False)
    return _dense_units(program, layouts) if layouts is not None else []
