"""The plaintext diagonals of a compiled ``single``-packing plan, as pruning units.

A weighted layer of the plan (``SingleLinearStep``) multiplies the input, rotated by
``d``, with diagonal ``d`` of its matrix in slot space: entry ``(r, c)`` sits in diagonal
``d = (slot(c) - slot(r)) mod T_out`` over the slots the plan gave the layer's input and
output (``layout.Diagonals``; ``T_out`` the output period). A diagonal with no nonzero
weight gets no plaintext, no product and, unless another diagonal uses its step, no
rotation and no Galois key. ``slot_units(plan)`` reports that map per weighted layer
(``secureinfer.units.SlotUnits``), read from the plan's own steps:

* a Linear layer: weight ``(r, c)`` at ``(slot(c) - slot(r)) mod T_out``, its input slots
  those of the layer before (a first convolution's spaced im2col output included);
* a first convolution on the client's im2col expansion: tap ``k`` of output channel ``o``
  at ``(k - o) P2 mod T_out`` (``P2`` the patch block): one diagonal per channel-tap
  shift.

A convolution the plan unfolds over the flattened tensor is left out: each weight appears
once per output position, and unless input and output rows have the same width (``same``
padding, stride 1) those copies fall in different diagonals, which also mix the weights of
other channel pairs and taps: no group of weights fills whole diagonals. Its all-zero
diagonals are still skipped and counted (``units_skipped``).

Which diagonals share one plaintext is not part of the unit: the baby-step giant-step
packs ``M_grp`` giant steps side by side into one plaintext per (group, baby step), and
the planner chooses that packing from the surviving diagonals at compile time; a run of
diagonals from 0 (what ``secureinfer.nn.prune`` keeps) empties whole plaintexts under any
packing. The plaintext primes of the CRT each get the same diagonals (their values reduced
modulo each prime), so the units do not depend on the split. A weight that quantizes to 0
(``bits``) counts as pruned: the plan may skip more diagonals than were pruned.
Pure numpy: nothing here imports the backend.
"""

from __future__ import annotations

import numpy as np
from secureinfer.layers import Conv2d, Linear
from secureinfer.quant import QuantLayer
from secureinfer.units import SlotUnits

from .linear import im2col_linear, integer_linear
from .planner import BfvPlan
from .program import SingleLinearStep

__all__ = ["slot_units"]


def _layer_units(step: SingleLinearStep, q: QuantLayer, in_slots: np.ndarray,
                 permutable: bool) -> SlotUnits | None:
    """The diagonal of every weight of ``step``'s layer, or ``None`` when a weight falls
    in several diagonals (or in none) or the diagonals do not split as
    ``slot(entry) - slot(unit)``."""
    lin = step.layout.layer
    shape = np.shape(q.weight)
    labels = np.arange(1, int(np.prod(shape)) + 1, dtype=np.int64).reshape(shape)
    labelled = im2col_linear(q, labels) if lin.im2col is not None else integer_linear(q, labels)
    width = step.layout.diagonals.t_out
    d = (in_slots[labelled.cols].astype(np.int64)
         - lin.output_slots[labelled.rows].astype(np.int64)) % width
    index = labelled.vals - 1
    per = np.full(labels.size, -1, dtype=np.int64)
    per[index] = d
    if np.any(per < 0) or np.any(per[index] != d):
        return None  # a weight with no entry, or with entries in two diagonals
    units, rest = shape[0], labels.size // shape[0]
    per = per.reshape(units, rest)
    anchors = lin.output_slots[np.arange(units) * (len(lin.output_slots) // units)]
    anchors = anchors.astype(np.int64) % width
    slots = (per[0] + anchors[0]) % width
    if np.any((slots[None, :] - anchors[:, None]) % width != per):
        return None
    note = "bfv im2col diagonals" if lin.im2col is not None else "bfv hybrid diagonals"
    return SlotUnits(q.spec.name, width, slots.reshape(shape[1:]), anchors, permutable,
                     note=note, pow2_runs=True)


def slot_units(plan: BfvPlan) -> list[SlotUnits]:
    """The diagonal units of every weighted layer of ``plan`` whose weights each fall in
    one diagonal (see the module docstring); ``[]`` under ``batch`` packing, where every
    weight is a constant product of its own."""
    if plan.packing != "single" or plan.input_slots is None:
        return []
    specs = [q.spec for q in plan.qnet.layers]
    last = [s.name for s in specs if isinstance(s, (Linear, Conv2d))][-1:]
    out: list[SlotUnits] = []
    slots = np.asarray(plan.input_slots, dtype=np.int64)
    for q, step in zip(plan.qnet.layers, plan.steps):
        if not isinstance(step, SingleLinearStep):
            continue
        if isinstance(q.spec, (Linear, Conv2d)):
            units = _layer_units(step, q, slots, q.spec.name not in last)
            if units is not None:
                out.append(units)
        slots = np.asarray(step.layout.output_slots, dtype=np.int64)
    return out
