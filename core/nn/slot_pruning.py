"""Pruning in the diagonals of a compiled layout, with unit permutation (``SlotUnits``).

A scheme that packs a layer as plaintext diagonals reports, per weighted layer, the
diagonal of every weight (``Scheme.pruning_units``). One increment of the schedule, layer
by layer in network order:

1. keeps a *run* of consecutive diagonals (``keep`` of the layer's ``n``, rounded to a
   multiple of a power of two ``b`` near ``sqrt(keep)``, or to a power of two when the
   plan packs giant steps, ``SlotUnits.pow2_runs``): baby-step giant-step needs
   about ``2 sqrt(keep)`` rotations for a run, and about
   as many as for all ``n`` for a scattered set of the same size, so a run frees whole
   baby and giant steps (rotations and Galois keys), and its giant steps are multiples of
   ``b``; it starts at 0 (or at a power of two, see ``_run_starts``). Units that are
   one rotation each (kernel offsets on a grid) keep the ``keep`` of most weight among
   those whose rotation needs no Galois key the plan lacks (reached from 0 or from a kept
   offset by a step the plan keys whatever the weights: ``SlotUnits.free_steps``), then
   the others by weight at the fewest new keys;
2. for a layer whose output units may move (every layer but the last), permutes them:
   unit ``r`` moved to the slot of unit ``a`` sees its weights in diagonals
   ``(slot(e) - slot(a)) mod width``; the assignment of units to slots that keeps the most
   squared weight inside the run is solved exactly (``scipy.optimize.linear_sum_assignment``).
   The next layer's inputs (and any BatchNorm between) are
   permuted alike, which leaves the network's function unchanged;
3. zeroes the weights outside the run; the caller fine-tunes with them held at zero.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..units import SlotUnits

__all__ = ["SlotLayer", "slot_layers"]


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children())]


@dataclass(eq=False)
class SlotLayer:
    """One layer's diagonals and the modules its unit permutation touches."""

    units: SlotUnits
    module: nn.Module
    between: list[nn.Module]
    after: nn.Module | None

    def __post_init__(self) -> None:
        self.values = np.unique(self.units.unit_of())
        self.keep = np.ones(self.module.weight.shape, dtype=bool)

    @property
    def count(self) -> int:
        """Diagonals of the layer (all anchors)."""
        return len(self.values)

    def pruned(self) -> int:
        """Diagonals that hold weights but only zeros."""
        w = self.module.weight.detach().cpu().numpy()
        pos = np.searchsorted(self.values, self.units.unit_of()).reshape(w.shape[0], -1)
        live = np.zeros(self.count, dtype=bool)
        np.logical_or.at(live, pos.ravel(), (w.reshape(w.shape[0], -1) != 0).ravel())
        return int(self.count - live.sum())

    def _energy(self) -> np.ndarray:
        w = self.module.weight.detach().cpu().double().numpy()
        return (w * w).reshape(w.shape[0], -1)

    def _choose(self, keep: int) -> tuple[np.ndarray | None, np.ndarray]:
        """``(order or None, keep mask over the weight in the new order)``."""
        energy = self._energy()
        pos = np.searchsorted(self.values, self.units.unit_of()).reshape(len(energy), -1)
        n = self.count
        if not self.units.contiguous:
            per = np.zeros(n)
            np.add.at(per, pos.ravel(), energy.ravel())
            top = _keyed_choice(self.values, per, keep, self.units.width,
                                self.units.free_steps)
            return None, np.isin(pos, top)
        starts = _run_starts(n, keep, self.units.permutable)
        best: tuple[float, np.ndarray | None, np.ndarray] | None = None
        for t in starts:
            inside = (pos - t) % n < keep  # (anchor, entry)
            if self.units.permutable:
                from scipy.optimize import linear_sum_assignment

                gain = energy @ inside.T.astype(np.float64)  # (unit, anchor)
                rows, cols = linear_sum_assignment(-gain)
                order = np.empty(len(rows), dtype=np.int64)
                order[cols] = rows
                score = float(gain[rows, cols].sum())
            else:
                order, score = None, float((energy * inside).sum())
            if best is None or score > best[0]:
                best = (score, order, inside)
        assert best is not None
        return best[1], best[2]

    def step(self, fraction: float) -> None:
        """Keep ``1 - fraction`` of the diagonals (a run), permute, zero the rest."""
        keep = self.count - int(round(self.count * fraction))
        if self.units.contiguous and keep < self.count:
            keep = _run_length(keep, self.units.pow2_runs)
        if keep >= self.count:
            self.keep = np.ones(self.module.weight.shape, dtype=bool)
            return
        order, inside = self._choose(max(keep, 1))
        if order is not None and not np.array_equal(order, np.arange(len(order))):
            self._permute(torch.as_tensor(order))
        self.keep = inside.reshape(self.module.weight.shape)
        with torch.no_grad():
            self.module.weight[~torch.as_tensor(self.keep)] = 0.0

    def _permute(self, order: torch.Tensor) -> None:
        """Output unit ``order[a]`` moves to position ``a``; the next layer follows."""
        with torch.no_grad():
            self.module.weight.copy_(self.module.weight[order])
            if self.module.bias is not None:
                self.module.bias.copy_(self.module.bias[order])
            for m in self.between:
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for t in (m.weight, m.bias, m.running_mean, m.running_var):
                        if t is not None:
                            t.copy_(t[order])
            nxt = self.after
            if isinstance(nxt, nn.Linear):
                per = nxt.weight.shape[1] // len(order)
                cols = (order[:, None] * per + torch.arange(per)[None, :]).reshape(-1)
                nxt.weight.copy_(nxt.weight[:, cols])
            elif isinstance(nxt, nn.Conv2d):
                nxt.weight.copy_(nxt.weight[:, order])

    def hook(self) -> torch.utils.hooks.RemovableHandle:
        """Hold the zeroed weights at zero while fine-tuning."""
        mask = torch.as_tensor(self.keep, dtype=self.module.weight.dtype)
        return self.module.weight.register_hook(lambda grad: grad * mask)


def _signed(v: int, width: int) -> int:
    return v - width if v > width // 2 else v


def _new_keys(steps: list[int], width: int, free: frozenset[int]) -> int:
    """Galois keys that rotations by ``steps`` (each one rotation from 0 or from another
    of them, in ascending signed order, as ``grid.RotPlan.baby_tree`` builds them) need
    beyond ``free``."""
    keys, done = set(free), [0]
    for a in sorted(steps, key=lambda v: _signed(v, width)):
        if a % width and not any((a - n) % width in keys for n in done):
            keys.add(a % width)  # a key of its own: reached from 0
        done.append(a)
    return len(keys - set(free))


def _keyed_choice(values: np.ndarray, energy: np.ndarray, keep: int, width: int,
                  free: frozenset[int]) -> np.ndarray:
    """The ``keep`` units (each one rotation by its step ``values[i]``) to keep: by
    squared weight, among those whose rotation needs no Galois key the plan does not
    generate anyway (reached from 0 or from another kept unit by one step of ``free``);
    then by squared weight, each at the least number of new keys. Step 0 is free."""
    order = [int(i) for i in np.argsort(-energy, kind="stable")]
    chosen: list[int] = []
    while len(chosen) < min(keep, len(order)):
        rest = [i for i in order if i not in chosen]
        steps = [int(values[i]) for i in chosen]
        base = _new_keys(steps, width, free)
        cost = {i: _new_keys(steps + [int(values[i])], width, free) - base for i in rest}
        least = min(cost.values())
        chosen.append(next(i for i in rest if cost[i] == least))
    return np.asarray(chosen, dtype=np.int64)


def _run_baby(keep: int) -> int:
    """The power of two near ``sqrt(keep)``: a run a multiple of it long, starting at 0 or
    at a power of two no smaller, splits into that many baby steps and giant steps that
    are multiples of it, whose Galois keys the rotate-and-sum passes of other stages
    mostly need anyway."""
    return 1 << max(0, round(np.log2(max(keep, 1)) / 2))


def _run_length(keep: int, pow2: bool) -> int:
    """The run's length for about ``keep`` diagonals: a multiple of ``_run_baby(keep)``,
    or (``pow2``, ``SlotUnits.pow2_runs``) the power of two nearest ``keep`` in log scale."""
    if pow2:
        return 1 << max(0, round(np.log2(max(keep, 1))))
    baby = _run_baby(keep)
    return max(baby, int(round(keep / baby)) * baby)


def _run_starts(n: int, keep: int, permutable: bool) -> list[int]:
    """Where a run of ``keep`` of ``n`` diagonals may start. The smallest giant step is
    the start itself, one more Galois key unless it is 0 or a power of two (which the
    rotate-and-sum passes need anyway), and a run that wraps past ``n`` adds a far giant
    step: so 0, and for fixed units (no permutation to move the weights into the run)
    the powers of two at least ``_run_baby(keep)`` whose run does not wrap."""
    if permutable:
        return [0]
    baby = _run_baby(keep)
    return [0] + [1 << k for k in range(n.bit_length())
                  if (1 << k) >= baby and (1 << k) + keep <= n]


def _movable(between: list[nn.Module], after: nn.Module | None, units: int) -> bool:
    """Whether permuting ``units`` outputs can be followed exactly downstream."""
    if after is None:
        return False
    for m in between:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if any(p.dim() > 0 and p.numel() == units and p.numel() > 1
               for p in m.parameters(recurse=False)):
            return False  # a per-unit parameter this code does not know how to move
    fan_in = after.weight.shape[1]
    return fan_in % units == 0


def slot_layers(model: nn.Module, units: list[SlotUnits]) -> list[SlotLayer] | None:
    """Bind the scheme's ``units`` to the model's modules (network order), or ``None``
    when a layer named by the scheme is not a Linear/Conv2d of this model."""
    named = dict(model.named_modules())
    leaves = _leaves(model)
    weighted = [i for i, m in enumerate(leaves) if isinstance(m, (nn.Linear, nn.Conv2d))]
    out = []
    for u in units:
        module = named.get(u.layer)
        if not isinstance(module, (nn.Linear, nn.Conv2d)) \
                or tuple(module.weight.shape[1:]) != tuple(u.slots.shape) \
                or module.weight.shape[0] != len(u.anchors):
            return None
        i = next(k for k in weighted if leaves[k] is module)
        later = [k for k in weighted if k > i]
        after = leaves[later[0]] if later else None
        between = leaves[i + 1: later[0]] if later else []
        if u.permutable and not _movable(between, after, module.weight.shape[0]):
            u = dataclasses.replace(u, permutable=False)
        out.append(SlotLayer(u, module, between, after))
    order = {id(m): k for k, m in enumerate(leaves)}
    return sorted(out, key=lambda s: order[id(s.module)])
