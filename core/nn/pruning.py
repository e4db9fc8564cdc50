"""HE-aware structured pruning: zero whole units of the form a scheme evaluates.

A zero weight inside a unit a scheme evaluates as a whole (a plaintext diagonal, a
functional key's row) costs as much as a nonzero one, so magnitude pruning of single
weights saves nothing under encryption. ``prune`` removes whole units instead; the scheme
says which kind (``Scheme.pruning_unit``), and the schemes skip all-zero units (see each
plugin's plan field ``units_skipped``):

* ``"rows"`` (inner-product FE): output units of the first weighted layer. Each is one
  functional key, one discrete logarithm and one row of group operations per input; a
  zero row gets no key, its output is the (public) bias.
* ``"hidden"`` (quadratic FE): units of the degree-2 activation (a row and bias of the
  layer before it, a column of the layer after it). Each costs two pairings per input.
* ``"diagonals"`` (CKKS and BFV single packing): the weights that become one plaintext
  diagonal. The scheme reports them from the layouts it compiled
  (``Scheme.pruning_units``, never a re-plan): the diagonal of every weight over the
  slots the planner actually gave the layer's input and output (the client's im2col
  expansion for a first convolution, a grid's gaps, a dense or block layout's output),
  a grid convolution's kernel offsets, and a CKKS block layout's input alignments (each a
  window of consecutive diagonals, ``SlotUnits.groups``). Each increment then keeps a run
  of consecutive diagonals per layer (a run frees whole baby and giant steps: rotations
  and Galois keys; a scattered set of the same size frees almost none; BFV packs giant
  steps in powers of two, so its runs are a power of two long) and permutes the output
  units of every layer but the last (with the next layer's inputs: the function is
  unchanged) so that the most weight falls inside the run (``slot_pruning``). A layer
  the plan's units do not cover (a CKKS block layout whose alignments overlap, a BFV
  convolution unfolded over the flattened tensor with its copies in several diagonals)
  is not pruned. Otherwise (batch packing, or a model whose layers the scheme's units do
  not name) the units are
  fixed by the shapes: for a convolution, one kernel offset ``(di, dj)`` across all
  channel pairs; for a Linear layer, one generalized diagonal
  ``{(j mod m', (j + i) mod d')}`` of its weight matrix (``m'``, ``d'`` the powers of two
  above its sizes), the unit of a dense layout. ``meta["units_from"]`` says which
  (``"plan"`` or ``"weights"``); the plan (``units_skipped``, ``rotations_per_input``,
  ``galois_keys``) and ``benchmarks/bench_prune.py`` show what is actually saved.

The schedule is iterative: the target ``sparsity`` (fraction of units) is reached in
``steps`` equal increments; each increment zeroes, layer by layer, the units of least
squared weight, then
fine-tunes the network by distillation from the unpruned model with the pruned weights
held at zero (their gradients are masked). It stops at the last increment whose test
accuracy is within ``max_drop`` points of the unpruned model's; a budget of 0 prunes
nothing. Pruning only zeroes weights and permutes units (which leaves the function as it
was): the network keeps its shapes and runs under every scheme.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import Dataset
from ..data import load as load_dataset
from ..errors import ConfigError, SecureInferError
from ..units import SlotUnits
from .slot_pruning import SlotLayer, slot_layers
from .training import INPUT_RANGE, accuracy, fit

__all__ = ["UNITS", "PruneResult", "magnitude_prune", "prune", "unit_masks"]

UNITS = ("rows", "hidden", "diagonals")
"""Kinds of pruning unit (``Scheme.pruning_unit`` names one)."""


@dataclass
class PruneResult:
    """A pruned model and its record.

    Attributes:
        model: the pruned network (a copy; calibrated, with ``secureinfer_meta``).
        meta: ``unit``, ``units_from`` (``"plan"``: the compiled layout's units;
            ``"weights"``: units fixed by the shapes), ``sparsity`` reached, ``units`` and
            ``pruned`` counts, ``accuracy_before``/``accuracy_after`` and the per-step
            ``history``.
    """

    model: nn.Module
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Group:
    """One prunable unit: ``(parameter, boolean mask of its entries)`` pairs, and the
    index of the layer it belongs to (units are ranked within their layer)."""

    parts: list[tuple[nn.Parameter, torch.Tensor]]
    layer: int = 0

    def score(self) -> float:
        return float(sum((p.detach()[m] ** 2).sum() for p, m in self.parts))

    def zero(self) -> None:
        with torch.no_grad():
            for p, m in self.parts:
                p[m] = 0.0


def _named_weighted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear and Conv2d layers of ``model`` with their names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _weighted(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in _named_weighted(model)]


def _mask(p: torch.Tensor, index: Any) -> torch.Tensor:
    mask = torch.zeros_like(p, dtype=torch.bool)
    mask[index] = True
    return mask


def _row_groups(model: nn.Module) -> list[_Group]:
    """Output units of the first weighted layer (the bias stays: it is the output)."""
    layers = _weighted(model)
    first = layers[0]
    return [_Group([(first.weight, _mask(first.weight, r))])
            for r in range(first.weight.shape[0])]


def _hidden_groups(model: nn.Module) -> list[_Group]:
    """Units between the first two weighted layers: a row and bias of the first, and the
    columns of the second that read the unit."""
    layers = _weighted(model)
    if len(layers) < 2:
        raise ConfigError("pruning by hidden units needs two weighted layers (Linear or "
                          f"Conv2d) around an activation; this model has {len(layers)}")
    first, second = layers[:2]
    units = first.weight.shape[0]
    per_unit = second.weight.shape[1] // units if isinstance(second, nn.Linear) else 1
    groups = []
    for u in range(units):
        parts = [(first.weight, _mask(first.weight, u))]
        if first.bias is not None:
            parts.append((first.bias, _mask(first.bias, u)))
        cols = slice(u * per_unit, (u + 1) * per_unit)  # Flatten after a conv: C*H*W
        parts.append((second.weight, _mask(second.weight, (slice(None), cols))))
        groups.append(_Group(parts))
    return groups


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _linear_diagonals(layer: nn.Linear) -> list[_Group]:
    m, d = layer.weight.shape
    mp, dp = _pow2(m), _pow2(d)
    j = np.arange(max(mp, dp))
    groups = []
    for i in range(min(mp, dp)):
        rows, cols = j % mp, (j + i) % dp
        ok = (rows < m) & (cols < d)
        if ok.any():
            index = (torch.as_tensor(rows[ok]), torch.as_tensor(cols[ok]))
            groups.append(_Group([(layer.weight, _mask(layer.weight, index))]))
    return groups


def _diagonal_groups(model: nn.Module) -> list[_Group]:
    groups: list[_Group] = []
    for index, layer in enumerate(_weighted(model)):
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.weight.shape[2:]
            found = [_Group([(layer.weight, _mask(layer.weight, (Ellipsis, di, dj)))])
                     for di in range(kh) for dj in range(kw)]
        else:
            found = _linear_diagonals(layer)
        for g in found:
            g.layer = index
        groups += found
    return groups


_GROUPS: dict[str, Callable[[nn.Module], list[_Group]]] = {
    "rows": _row_groups, "hidden": _hidden_groups, "diagonals": _diagonal_groups}


def unit_masks(model: nn.Module, unit: str) -> list[list[tuple[nn.Parameter, torch.Tensor]]]:
    """The prunable units of ``model`` of kind ``unit`` (one of ``UNITS``), each a list of
    ``(parameter, mask)``; a unit is pruned when all its masked entries are zero."""
    return [g.parts for g in _groups(model, unit)]


def _groups(model: nn.Module, unit: str) -> list[_Group]:
    if unit not in _GROUPS:
        raise ConfigError(f"unknown pruning unit {unit!r}; valid: {', '.join(UNITS)}")
    if not _weighted(model):
        raise ConfigError("the model has no Linear or Conv2d layer to prune")
    return _GROUPS[unit](model)


def _resolve_unit(scheme: str) -> str:
    """The pruning unit of the scheme named by the config string ``scheme``."""
    from ..registry import resolve

    unit = getattr(resolve(scheme), "pruning_unit", None)
    if unit is None:
        raise ConfigError(f"scheme {scheme!r} declares no pruning unit (Scheme.pruning_unit): "
                          f"it evaluates weights one by one; choose one of {', '.join(UNITS)} "
                          "with unit=")
    return str(unit)


def _is_pruned(group: _Group) -> bool:
    return all(not bool(p.detach()[m].any()) for p, m in group.parts)


def _grad_masks(groups: list[_Group]) -> list[Any]:
    """Hooks that keep the pruned units' entries at zero while fine-tuning."""
    keep: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for g in groups:
        if _is_pruned(g):
            for p, m in g.parts:
                cur = keep.get(id(p), (p, torch.ones_like(p, dtype=torch.bool)))[1]
                keep[id(p)] = (p, cur & ~m)
    return [p.register_hook(lambda grad, k=k: grad * k) for p, k in keep.values()]


def _data(data: str | Dataset) -> Dataset:
    return data if isinstance(data, Dataset) else load_dataset(data)


def _finish(model: nn.Module, data: Dataset, meta: dict[str, Any]) -> PruneResult:
    from .ranges import calibrate

    calibrate(model, data.x_train, data.input_shape, input_range=INPUT_RANGE)
    old = dict(getattr(model, "secureinfer_meta", {}) or {})
    model.secureinfer_meta = {**old, "pruning": meta}
    return PruneResult(model, meta)


def _prune_step(groups: list[_Group], fraction: Callable[[int], float]) -> None:
    """Zero, in every layer, the live units of least squared weight until
    ``fraction(layer)`` of that layer's units are zero (layers are pruned alike, so that no
    small layer, such as a convolution's few kernel offsets, is emptied first)."""
    for layer in sorted({g.layer for g in groups}):
        mine = [g for g in groups if g.layer == layer]
        live = [g for g in mine if not _is_pruned(g)]
        need = int(round(len(mine) * fraction(layer))) - (len(mine) - len(live))
        for g in sorted(live, key=_Group.score)[:max(0, need)]:
            g.zero()


def _check_targets(model: nn.Module, sparsity: float,
                   layer_sparsity: Mapping[str, float] | None) -> dict[str, float]:
    """``layer_sparsity`` as ``{name: fraction}``, every fraction and name checked."""
    targets = {str(k): float(v) for k, v in (layer_sparsity or {}).items()}
    for name, value in {"": sparsity, **targets}.items():
        if not 0.0 <= value < 1.0:
            where = f"layer_sparsity[{name!r}]" if name else "sparsity"
            raise ConfigError(f"{where}={value} must be in [0, 1) (a fraction of the units)")
    layers = {n for n, _ in _named_weighted(model)}
    unknown = sorted(set(targets) - layers)
    if unknown:
        raise ConfigError(f"layer_sparsity names {', '.join(unknown)}, not a Linear or Conv2d "
                          f"of this model; valid: {', '.join(sorted(layers))}")
    return targets


def prune(model: nn.Module, scheme: str | None = None, sparsity: float = 0.5,
          max_drop: float = 1.0, data: str | Dataset = "digits", *, unit: str | None = None,
          layer_sparsity: Mapping[str, float] | None = None, steps: int = 4,
          epochs: int = 8, weight_decay: float = 0.0, seed: int = 0,
          progress: bool = False) -> PruneResult:
    """Prune ``model`` in the units ``scheme`` evaluates, within an accuracy budget.

    Args:
        model: a trained HE-friendly ``nn.Sequential`` (left unchanged; a copy is pruned).
        scheme: a config string (``"ckks"``, ``"fe-ip"``, ...); its ``pruning_unit`` is
            the unit. Or give ``unit`` directly.
        sparsity: the fraction of units to zero, in ``[0, 1)``.
        max_drop: the accuracy budget, in points (percent) of test accuracy below the
            unpruned model; 0 prunes nothing.
        data: the dataset (name or ``Dataset``): fine-tuning on its training split,
            accuracy on its test split.
        unit: ``"rows"``, ``"hidden"`` or ``"diagonals"`` (instead of ``scheme``).
        layer_sparsity: ``{layer name: fraction}`` for layers pruned to another
            sparsity than ``sparsity`` (names as in ``model.named_modules()``), e.g. a
            first convolution with few diagonals or the classifier.
        steps: increments of the schedule.
        epochs: distillation epochs after each increment.
        weight_decay: Adam's L2 weight decay while fine-tuning. Smaller weights amplify
            the encryption noise less (CKKS: each affine stage by its largest row norm), so
            the planner may choose a smaller scale and, when the chain then fits, a
            smaller ring.
        seed: seed of the fine-tuning batches.
        progress: tqdm bars.

    Returns:
        A ``PruneResult``; its model is calibrated on the training set and its
        ``secureinfer_meta["pruning"]`` holds the record.

    Raises:
        ConfigError: a bad sparsity, budget, unit or scheme; the message says what is valid.
    """
    targets = _check_targets(model, sparsity, layer_sparsity)
    if max_drop < 0:
        raise ConfigError(f"max_drop={max_drop} must be >= 0 (accuracy points)")
    if steps < 1:
        raise ConfigError(f"steps={steps} must be at least 1")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay={weight_decay} must be >= 0")
    if (scheme is None) == (unit is None):
        raise ConfigError("give exactly one of scheme= (e.g. 'ckks') or unit= "
                          f"({', '.join(UNITS)})")
    kind = unit if unit is not None else _resolve_unit(str(scheme))
    ds = _data(data)
    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model)
    pruner = _pruner(student, kind, scheme, ds)
    pruner.targets = lambda name: targets.get(name, sparsity)
    base = accuracy(teacher, ds.x_test, ds.y_test)
    meta: dict[str, Any] = {"unit": kind, "scheme": scheme, "units": pruner.total,
                            "units_from": pruner.source, "target_sparsity": sparsity,
                            "layer_sparsity": targets, "weight_decay": weight_decay,
                            "max_drop": max_drop, "accuracy_before": base, "history": []}
    best = copy.deepcopy(student.state_dict())
    pruned_best = pruner.pruned()
    acc_best = base
    if max_drop > 0 and max([sparsity, *targets.values()]) > 0:
        for k in range(1, steps + 1):
            pruner.step(k / steps)
            hooks = pruner.hooks()
            try:
                fit(student, ds.x_train, ds.y_train, epochs=epochs, teacher=teacher,
                    weight_decay=weight_decay,
                    seed=seed + k, progress=progress, desc=f"prune {k}/{steps}")
            finally:
                for h in hooks:
                    h.remove()
            acc = accuracy(student, ds.x_test, ds.y_test)
            count = pruner.pruned()
            meta["history"].append({"step": k, "pruned": count, "accuracy": acc})
            if 100.0 * (base - acc) > max_drop:
                break
            best, pruned_best, acc_best = copy.deepcopy(student.state_dict()), count, acc
    student.load_state_dict(best)
    student.eval()
    meta.update(pruned=pruned_best, sparsity=pruned_best / max(pruner.total, 1),
                accuracy_after=acc_best)
    return _finish(student, ds, meta)


class _GroupPruner:
    """Units fixed by the weights' shapes (``_GROUPS``), ranked within their layer."""

    source = "weights"

    def __init__(self, model: nn.Module, unit: str) -> None:
        self.groups = _groups(model, unit)
        self.total = len(self.groups)
        self.names = [n for n, _ in _named_weighted(model)]
        self.targets: Callable[[str], float] = lambda name: 0.0

    def step(self, progress: float) -> None:
        """Prune every layer to ``progress`` (0..1) of its target sparsity."""
        _prune_step(self.groups, lambda layer: self.targets(self.names[layer]) * progress)

    def hooks(self) -> list[Any]:
        return _grad_masks(self.groups)

    def pruned(self) -> int:
        return sum(_is_pruned(g) for g in self.groups)


class _SlotPruner:
    """Units from the compiled plan (``Scheme.pruning_units``), with unit permutation."""

    source = "plan"

    def __init__(self, layers: list[SlotLayer]) -> None:
        self.layers = layers
        self.total = sum(s.count for s in layers)
        self.targets: Callable[[str], float] = lambda name: 0.0

    def step(self, progress: float) -> None:
        """Prune every layer to ``progress`` (0..1) of its target sparsity."""
        for layer in self.layers:  # network order: a permutation moves the next inputs
            layer.step(self.targets(layer.units.layer) * progress)

    def hooks(self) -> list[Any]:
        return [layer.hook() for layer in self.layers]

    def pruned(self) -> int:
        return sum(layer.pruned() for layer in self.layers)


def _plan_units(model: nn.Module, scheme: str, ds: Dataset) -> list[SlotUnits]:
    """Compile ``model`` under ``scheme`` (planning only: no keys) and ask for its units."""
    from ..model import compile as compile_model

    compiled = compile_model(model, scheme, input_shape=ds.input_shape,
                             calibration=ds.x_train[:256])
    return list(compiled.scheme.pruning_units())


def _pruner(model: nn.Module, kind: str, scheme: str | None,
            ds: Dataset) -> _GroupPruner | _SlotPruner:
    """The plan's own units when the scheme reports them for this model, else the
    shape-fixed units of ``kind``."""
    if kind == "diagonals" and scheme is not None:
        try:
            units = _plan_units(model, scheme, ds)
        except SecureInferError as exc:  # e.g. its backend is not installed
            warnings.warn(f"pruning by the shapes' diagonals: compiling under {scheme!r} "
                          f"to read its layout failed ({exc})", stacklevel=3)
            units = []
        layers = slot_layers(model, units) if units else None
        if layers:
            return _SlotPruner(layers)
    return _GroupPruner(model, kind)


def magnitude_prune(model: nn.Module, sparsity: float, data: str | Dataset = "digits", *,
                    layer_sparsity: Mapping[str, float] | None = None) -> PruneResult:
    """Unstructured magnitude pruning, for contrast: the ``sparsity`` fraction of each
    weighted layer's weights of least magnitude set to zero (``layer_sparsity``: another
    fraction for the named layers, as in ``prune``), no fine-tuning."""
    targets = _check_targets(model, sparsity, layer_sparsity)
    ds = _data(data)
    student = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in _named_weighted(student):
            w = layer.weight
            k = int(w.numel() * targets.get(name, sparsity))
            if k:
                cut = w.abs().flatten().kthvalue(k).values
                w[w.abs() <= cut] = 0.0
    meta = {"unit": "weights", "target_sparsity": sparsity, "layer_sparsity": targets,
            "accuracy_before": accuracy(model, ds.x_test, ds.y_test),
            "accuracy_after": accuracy(student, ds.x_test, ds.y_test)}
    return _finish(student.eval(), ds, meta)
