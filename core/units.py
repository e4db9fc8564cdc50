"""Slot units: which weights a scheme's compiled layout puts in one plaintext.

A scheme that evaluates an affine layer as plaintext diagonals over slot layouts (CKKS and
BFV single packing) groups the layer's weights by the difference of two slots: entry
``(r, e)`` of the weight (output unit ``r``, input entry ``e``) lands in the diagonal
``(slots[e] - anchors[r]) mod width``. An all-zero diagonal is skipped: no plaintext
product, and no rotation or Galois key unless another diagonal needs that step. A
``SlotUnits`` records that map for one layer, as the scheme's planner laid it out, so that
``secureinfer.nn.prune`` can zero whole diagonals (and permute output units so that the
surviving weights crowd into few of them) without knowing the scheme.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SlotUnits"]


@dataclass(frozen=True)
class SlotUnits:
    """The plaintext diagonals of one weighted layer in a compiled layout.

    Attributes:
        layer: the layer's name (its torch module path, ``LayerSpec.name``).
        width: the diagonal period (CKKS: ``min`` of the output and input slot periods;
            BFV: the output period).
        slots: the slot of every input entry, of the weight's shape without its first axis
            (Linear: one per input feature; Conv2d: one per ``(in channel, di, dj)`` tap).
        anchors: the slot of every output unit (Linear row, Conv2d output channel).
        permutable: the output units may be permuted (with the next layer's inputs): false
            for the network's last layer, whose output order is the result.
        contiguous: the diagonals are combined by baby-step giant-step, so a run of
            consecutive diagonals needs fewest rotations (false: every unit is one rotation
            of its own, e.g. a kernel offset on a grid).
        note: the layout the map comes from (for messages and records).
        free_steps: rotation steps (modulo ``width``) whose Galois keys the plan needs
            whatever the weights at its layouts (pool passes, rotate-and-sums): a unit
            reached from 0 or from a kept unit by one of them costs no key of its own.
        pow2_runs: the plan packs a run's giant steps in powers of two (BFV: several
            giant steps share one plaintext, lined up by ``log2`` rotations), so a run
            costs less only when its length halves: runs are a power of two long.
        groups: for a layout whose plaintexts each hold a window of consecutive diagonals
            (a block layout's input alignment), the unit of every diagonal: ``(width,)``,
            ``groups[d]`` is the unit of diagonal ``d`` (``None``: each diagonal is a unit).
    """

    layer: str
    width: int
    slots: np.ndarray
    anchors: np.ndarray
    permutable: bool
    contiguous: bool = True
    note: str = ""
    free_steps: frozenset[int] = frozenset()
    pow2_runs: bool = False
    groups: np.ndarray | None = None

    def unit_of(self, anchors: np.ndarray | None = None) -> np.ndarray:
        """The unit (diagonal, or its ``groups`` entry) of every weight entry (the
        weight's shape), with output unit ``r`` at slot ``anchors[r]`` (default: the
        layout's own anchors)."""
        a = self.anchors if anchors is None else anchors
        flat = (self.slots.reshape(1, -1) - np.asarray(a).reshape(-1, 1)) % self.width
        if self.groups is not None:
            flat = self.groups[flat]
        return flat.reshape(len(a), *self.slots.shape)
