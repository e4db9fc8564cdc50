"""Choose BFV parameters for a quantized network: ring degree, plaintext primes, modulus chain.

1. **Bound.** The worst-case ``|integer|`` of the last layer, ``B``, over every input inside
   the calibrated range (``bounds.output_bound``, interval arithmetic on the quantized
   network, never above ``quantize``'s per-layer bound). The client rejects inputs outside
   the range at encrypt time, so no input can pass ``B``. Intermediate values may exceed
   ``t``: BFV computes modulo ``t`` and the network is a polynomial with integer
   coefficients, so only the output has to fit.
2. **Plaintext moduli.** For each ring degree ``N`` (smallest first), the noise model
   (``noise``) gives the largest prime ``t`` the budget carries through the network's
   depth; batching-friendly primes ``t_i = 1 (mod 2N)`` whose product exceeds ``2B`` are
   taken (CRT: one BFV context each, ``max_primes`` at most). The smallest ``N`` that works
   is chosen; when none does, the error names the bound and what failed at each ``N``.
3. **Coefficient modulus.** For the fewest primes and up to two more (smaller primes need
   shorter chains), the fewest equal coefficient primes (at most 60 bits, total within the
   128-bit bound of the HE standard) that keep the budget, with modulus switching after
   each phase as far as the rest of the network allows; the cheapest by the cost model
   (``program.Ops``) wins.
4. **Output privacy** (``rerandomize``). A re-randomized output carries the fresh zero's
   noise too; a flooded one (``flood_bits = lambda``) needs ``lambda + log2 N + 2`` more bits
   at the output, which every step above keeps in reserve. The plan states the flood's
   half-width ``2^b`` (``flood_log2_bound``), from the budget estimate before it, and the
   budget the client will measure after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from secureinfer.errors import CompileError
from secureinfer.layers import AvgPool2d, Conv2d, Flatten, Linear, Poly
from secureinfer.quant import EdgeQuantizer, QuantizedNetwork

from .backend import MAX_COEFF_BITS, key_bytes, security_source
from .bounds import output_bound
from .layout import Diagonals, LinearLayout, plan_windows
from .linear import Im2col, IntegerLinear, im2col_linear, integer_linear, pow2
from .noise import MARGIN, NoiseModel
from .primes import (
    MAX_PLAIN_BITS,
    batching_primes,
    choose_plain_moduli,
    largest_batching_primes,
    plain_moduli,
)
from .program import BatchLinearStep, FlattenStep, PolyStep, SingleLinearStep, Step

__all__ = ["DEGREES", "BfvClientPlan", "BfvPlan", "make_plan"]

DEGREES = (4096, 8192, 16384, 32768)
_MAX_PRIME_BITS = 60
_MIN_PRIME_BITS = 30


class _Infeasible(Exception):
    """This ring degree cannot run the network; the message says why."""


class _Packing:
    """The slot arithmetic both the full plan and the client's part of it share."""

    poly_degree: int
    packing: str

    @property
    def row(self) -> int:
        """Slots per ciphertext row (``N / 2``)."""
        return self.poly_degree // 2

    @property
    def inputs_per_item(self) -> int:
        """Inputs per ciphertext (``single``: one per row) or per ciphertext set (``batch``)."""
        return 2 if self.packing == "single" else self.poly_degree


@dataclass
class BfvPlan(_Packing):
    """Everything client and server derive identically from the network and the options.

    Attributes:
        packing: ``single`` (one input per ciphertext row) or ``batch`` (one input per slot).
        poly_degree: ``N``.
        plain_moduli: the CRT primes ``t_i``.
        coeff_bits: bit sizes of the coefficient primes (data primes, then the special one).
        steps: one per layer.
        input_slots: ``single``: slot of every (possibly unfolded) input feature.
        input_period: ``single``: the input's period.
        im2col: ``single`` with a first Conv2d: how the client unfolds the input.
        rotations: Galois keys to generate (rotation steps).
        relinearize: whether relinearization keys are needed.
        bound: worst-case ``|integer|`` of the output.
        budget: the noise model's estimate of the budget left at the end (after the
            output flood, if any: what the client measures), in bits.
        seconds: the cost model's estimate of one evaluation (all primes, one core).
        qnet: the integer reference.
        rerandomize: outputs get a fresh encryption of zero and uniform non-result slots.
        flood_bits: the flood's statistical security ``lambda`` (0: no flood).
        flood_log2: ``b``: flood coefficients are uniform in ``[-2^b, 2^b)``.
        budget_before_flood: the estimated budget before the flood (``None``: no flood).
    """

    packing: str
    poly_degree: int
    plain_moduli: list[int]
    coeff_bits: list[int]
    steps: list[Step]
    input_slots: np.ndarray | None
    input_period: int
    im2col: Im2col | None
    rotations: list[int]
    relinearize: bool
    bound: int
    budget: float
    seconds: float
    qnet: QuantizedNetwork
    rerandomize: bool = False
    flood_bits: int = 0
    flood_log2: int | None = None
    budget_before_flood: float | None = None

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one output."""
        return tuple(self.qnet.layers[-1].spec.out_shape)

    @property
    def input_width(self) -> int:
        """Ciphertexts per item and prime in an input message."""
        return 1 if self.packing == "single" else int(np.prod(self.qnet.layers[0].spec.in_shape))

    @property
    def output_width(self) -> int:
        """Ciphertexts per item and prime in an output message."""
        return 1 if self.packing == "single" else int(np.prod(self.output_shape))

    @property
    def output_slots(self) -> np.ndarray:
        """``single``: slot of every output feature within its row."""
        for step in reversed(self.steps):
            if isinstance(step, SingleLinearStep):
                return step.layout.output_slots
        return self.input_slots if self.input_slots is not None else np.zeros(0, np.int64)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary, recorded in reports and hashed into every message."""
        product = math.prod(self.plain_moduli)
        layers = []
        for step in self.steps:
            entry: dict[str, Any] = {"layer": step.name, "switch_down": step.drops}
            if isinstance(step, SingleLinearStep) and step.layout.bsgs is not None:
                products, rotations = step.layout.bsgs.counts(step.layout.diagonals)
                entry.update(products=products, rotations=rotations,
                             baby_steps=step.layout.bsgs.baby,
                             packed_giant_steps=step.layout.bsgs.packed,
                             diagonals=len(step.layout.diagonals.diags),
                             units_skipped=step.layout.skipped)
            layers.append(entry)
        single = self.packing == "single"
        return {
            "security_bits": 128,
            "security_source": security_source(self.poly_degree, sum(self.coeff_bits)),
            "packing": self.packing, "poly_modulus_degree": self.poly_degree,
            "plain_moduli": [int(t) for t in self.plain_moduli],
            "plain_modulus_bits": [int(t).bit_length() for t in self.plain_moduli],
            "crt_bits": round(math.log2(product), 2), "output_bound": int(self.bound),
            "output_bound_bits": round(math.log2(max(self.bound, 1)), 2),
            "coeff_modulus_bits": list(self.coeff_bits),
            "noise_budget_left_bits": round(self.budget, 1),
            "noise_budget_before_flood_bits": None if self.budget_before_flood is None
            else round(self.budget_before_flood, 1),
            "rerandomize": bool(self.rerandomize), "flood_bits": int(self.flood_bits),
            "flood_log2_bound": self.flood_log2,
            "estimated_evaluate_s": round(self.seconds, 3),
            "galois_keys": len(self.rotations), "rotation_steps": list(self.rotations),
            "galois_key_bytes": len(self.rotations) * len(self.plain_moduli)
            * key_bytes(self.poly_degree, len(self.coeff_bits)),
            # single packing, per input ciphertext (two inputs) and plaintext prime
            "rotations_per_input": sum(e.get("rotations", 0) for e in layers) if single
            else 0,
            "plaintext_products": sum(e.get("products", 0) for e in layers) if single
            else None,
            "units_skipped": sum(e.get("units_skipped", 0) for e in layers),
            "input_im2col": self.im2col is not None, "layers": layers,
            "quantization": self.qnet.to_dict(),
            # what the client works from (BfvClientPlan.from_dict): no weights
            "input_slots": [] if self.input_slots is None else [int(v) for v in self.input_slots],
            "input_period": int(self.input_period),
            "im2col": None if self.im2col is None else {
                "kernel": list(self.im2col.kernel), "stride": list(self.im2col.stride),
                "padding": list(self.im2col.padding), "patches": self.im2col.patches,
                "taps": self.im2col.taps},
            "output_slots": [int(v) for v in self.output_slots],
            "output_shape": list(self.output_shape), "input_width": self.input_width,
            "output_width": self.output_width, "relinearize": bool(self.relinearize),
        }


@dataclass(frozen=True)
class BfvClientPlan(_Packing):
    """The client's part of a ``BfvPlan``, rebuilt from the plan dict alone (no weights):
    contexts and keys to make, how to quantize and lay out an input, where the outputs
    are, the bound and budget a decryption is checked against."""

    packing: str
    poly_degree: int
    plain_moduli: list[int]
    coeff_bits: list[int]
    input_slots: np.ndarray | None
    input_period: int
    im2col: Im2col | None
    rotations: list[int]
    relinearize: bool
    bound: int
    budget: float
    output_slots: np.ndarray
    output_shape: tuple[int, ...]
    input_width: int
    output_width: int
    edges: EdgeQuantizer

    @classmethod
    def from_dict(cls, plan: dict[str, Any]) -> "BfvClientPlan":
        """From ``BfvPlan.to_dict()`` (after a JSON round trip)."""
        cut = plan["im2col"]
        im2col = None if cut is None else Im2col(
            tuple(cut["kernel"]), tuple(cut["stride"]), tuple(cut["padding"]),
            int(cut["patches"]), int(cut["taps"]))
        slots = plan["input_slots"]
        return cls(str(plan["packing"]), int(plan["poly_modulus_degree"]),
                   [int(t) for t in plan["plain_moduli"]],
                   [int(b) for b in plan["coeff_modulus_bits"]],
                   np.asarray(slots, dtype=np.int64) if slots else None,
                   int(plan["input_period"]), im2col, [int(r) for r in plan["rotation_steps"]],
                   bool(plan["relinearize"]), int(plan["output_bound"]),
                   float(plan["noise_budget_left_bits"]),
                   np.asarray(plan["output_slots"], dtype=np.int64),
                   tuple(int(d) for d in plan["output_shape"]), int(plan["input_width"]),
                   int(plan["output_width"]), EdgeQuantizer.from_dict(plan["quantization"]))


# ----- steps ------------------------------------------------------------------------------


def _poly_step(q: Any) -> PolyStep:
    coeffs = tuple(int(c) for c in q.coeffs)
    if not any(coeffs[1:]):
        raise CompileError(f"layer {q.spec.name}: the quantized activation {coeffs} is "
                           "constant; retrain it or use more bits")
    return PolyStep(q.spec.name, coeffs=coeffs)


def _batch_steps(qnet: QuantizedNetwork, cache: _Linears) -> list[Step]:
    steps: list[Step] = []
    for i, q in enumerate(qnet.layers):
        if isinstance(q.spec, Flatten):
            steps.append(FlattenStep(q.spec.name))
        elif isinstance(q.spec, Poly):
            step = _poly_step(q)
            step.width = int(np.prod(q.spec.in_shape))
            steps.append(step)
        else:
            steps.append(BatchLinearStep(q.spec.name, layer=cache.linear(i)))
    return steps


class _Linears:
    """Each linear layer's integer matrix and diagonals, built once for every ring degree."""

    def __init__(self, qnet: QuantizedNetwork) -> None:
        self.qnet = qnet
        self._lin: dict[Any, IntegerLinear] = {}
        self._diags: dict[tuple[Any, int], Diagonals] = {}
        self._every: dict[tuple[Any, int], int] = {}

    def linear(self, i: int, unfolded: bool = False) -> IntegerLinear:
        key = ("im2col", i) if unfolded else i
        if key not in self._lin:
            q = self.qnet.layers[i]
            self._lin[key] = im2col_linear(q) if unfolded else integer_linear(q)
        return self._lin[key]

    def diagonals(self, key: Any, lin: IntegerLinear, slots: np.ndarray,
                  period: int) -> Diagonals:
        if (key, period) not in self._diags:
            self._diags[(key, period)] = Diagonals.of(lin, slots, period)
        return self._diags[(key, period)]

    def every(self, i: int, unfolded: bool, slots: np.ndarray, period: int) -> int:
        """Diagonals of layer ``i`` unpruned: of its support (every weight 1) read at
        ``slots`` (cached like ``diagonals``)."""
        key = (("im2col", i) if unfolded else i, period)
        if key not in self._every:
            q = self.qnet.layers[i]
            ones = np.ones(np.shape(q.weight), np.int64) if q.weight is not None else None
            lin = im2col_linear(q, ones) if unfolded else integer_linear(q, ones)
            self._every[key] = len(Diagonals.indices(lin, slots))
        return self._every[key]


def _single_steps(qnet: QuantizedNetwork, row: int,
                  cache: _Linears) -> tuple[list[Step], np.ndarray, int, Im2col | None]:
    steps: list[Step] = []
    first = qnet.layers[0].spec if qnet.layers else None
    unfold = None
    if isinstance(first, Conv2d):
        lin = cache.linear(0, unfolded=True)
        if pow2(int(lin.input_slots.max()) + 1) <= row:
            unfold = lin
    n_in = int(np.prod(qnet.layers[0].spec.in_shape)) if qnet.layers else 0
    slots = unfold.input_slots if unfold is not None else np.arange(n_in)
    period = pow2(int(slots.max()) + 1 if len(slots) else 1)
    in_slots, in_period = slots, period
    for i, q in enumerate(qnet.layers):
        spec = q.spec
        if isinstance(spec, Flatten):
            steps.append(FlattenStep(spec.name))
            continue
        if isinstance(spec, Poly):
            steps.append(_poly_step(q))
            continue
        if not isinstance(spec, (Linear, Conv2d, AvgPool2d)):
            raise CompileError(f"layer {spec.name}: bfv cannot run {spec.kind} layers")
        unfolded = i == 0 and unfold is not None
        lin = unfold if unfolded else cache.linear(i)
        need = Diagonals.period_of(lin, period)
        if need > row:
            raise _Infeasible(f"layer {spec.name} needs {need} slots per row, "
                              f"N={2 * row} has {row}")
        dg = cache.diagonals(("im2col", i) if unfolded else i, lin, slots, period)
        skipped = cache.every(i, unfolded, slots, period) - len(dg.diags)
        steps.append(SingleLinearStep(spec.name, layout=LinearLayout(lin, dg, skipped=skipped)))
        slots, period = lin.output_slots, dg.t_out
    if period > row:
        raise _Infeasible(f"the input needs {period} slots per row, N={2 * row} has {row}")
    layouts = [s.layout for s in steps if isinstance(s, SingleLinearStep)]
    if layouts:
        plan_windows(layouts, row)
    return steps, in_slots, in_period, unfold.im2col if unfold is not None else None


# ----- noise ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Output:
    """What the server does to the outputs after the last layer (``rerandomize``)."""

    rerandomize: bool = False
    flood_bits: int = 0

    def floor(self, poly_degree: int) -> float:
        """The budget the last layer must leave: ``MARGIN``, plus the flood's reserve."""
        return MARGIN + (self.flood_bits + math.log2(poly_degree) + 2 if self.flood_bits
                         else 0.0)

    def flood(self, model: NoiseModel, q_bits: float, budget: float) -> tuple[int, float]:
        """``(b, budget after)`` for a flood over noise of estimated ``budget`` at a data
        modulus of ``q_bits``: ``||v|| <= q / (2t) 2^-budget``, ``b = ceil(log2 ||v|| +
        lambda + log2 N)``; half a bit off the budget after for primes just below their
        size."""
        headroom = q_bits - model.t_bits - 1
        b = math.ceil(headroom - budget + self.flood_bits + math.log2(model.poly_degree))
        return b, headroom - b - 0.5


def _simulate(steps: Sequence[Step], model: NoiseModel, data_bits: Sequence[int],
              drops: Sequence[Sequence[int]] | None = None,
              output: _Output = _Output()) -> float:
    """The budget at the output, before any flood (with the re-randomizing zero's noise)."""
    return _run(steps, model, data_bits, drops, output)[0]


def _run(steps: Sequence[Step], model: NoiseModel, data_bits: Sequence[int],
         drops: Sequence[Sequence[int]] | None, output: _Output) -> tuple[float, float]:
    """``(budget, q_bits)`` at the output."""
    chain = list(data_bits)
    q = float(sum(chain))
    budget = model.fresh(q)
    for i, step in enumerate(steps):
        for j, phase in enumerate(step.phases()):
            budget = phase(model, budget, q)
            for _ in range(drops[i][j] if drops else 0):
                q -= chain.pop()
                budget = model.switch(budget, q)
    if output.rerandomize:  # a fresh zero, switched down to the output's level
        budget = model.switch(budget, q)
    return budget, q


def _chains(poly_degree: int) -> list[list[int]]:
    """Candidate coefficient chains (equal data primes + special prime), fewest first."""
    out = []
    for n_data in range(1, 20):
        size = min(_MAX_PRIME_BITS, MAX_COEFF_BITS[poly_degree] // (n_data + 1))
        if size < _MIN_PRIME_BITS:
            break
        out.append([size] * (n_data + 1))
    return out


def _schedule(steps: Sequence[Step], model: NoiseModel, data_bits: Sequence[int],
              output: _Output) -> list[list[int]]:
    """Switch down after each phase as far as the rest of the network allows."""
    floor = output.floor(model.poly_degree)
    drops = [[0] * len(step.phases()) for step in steps]
    for i, step in enumerate(steps):
        for j in range(len(step.phases())):
            while sum(map(sum, drops)) < len(data_bits) - 1:
                drops[i][j] += 1
                if _simulate(steps, model, data_bits, drops, output) < floor:
                    drops[i][j] -= 1
                    break
    return drops


def _max_t_bits(steps: Sequence[Step], poly_degree: int, output: _Output) -> int:
    """The largest plaintext prime (bits) the noise budget allows; 0 if none."""
    smallest = next(batching_primes(poly_degree, 2)).bit_length()
    floor = output.floor(poly_degree)
    for bits in range(MAX_PLAIN_BITS, smallest - 1, -1):
        model = NoiseModel(poly_degree, float(bits))
        if any(_simulate(steps, model, c[:-1], None, output) >= floor
               for c in _chains(poly_degree)):
            return bits
    return 0


# ----- search -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    packing: str
    poly_degree: int | None
    plain_bits: int | None
    max_primes: int
    output: _Output = _Output()


def _cost(steps: Sequence[Step], poly_degree: int, chain: Sequence[int],
          drops: Sequence[Sequence[int]]) -> float:
    """Estimated evaluation seconds for one plaintext prime (see ``Ops``)."""
    primes = len(chain) - 1
    total = 0.0
    for step, step_drops in zip(steps, drops):
        for ops, drop in zip(step.ops(), step_drops):
            total += ops.seconds(poly_degree, primes)
            primes -= drop
    return total


@dataclass(frozen=True)
class _Choice:
    moduli: list[int]
    chain: list[int]
    drops: list[list[int]]
    budget: float
    q_bits: float
    seconds: float


def _choose(steps: Sequence[Step], poly_degree: int, moduli: list[int],
            output: _Output) -> _Choice | None:
    """The fewest coefficient primes that keep the budget for ``moduli``, then switching."""
    model = NoiseModel(poly_degree, math.log2(max(moduli)))
    for chain in _chains(poly_degree):
        if _simulate(steps, model, chain[:-1], None, output) >= output.floor(poly_degree):
            drops = _schedule(steps, model, chain[:-1], output)
            budget, q_bits = _run(steps, model, chain[:-1], drops, output)
            return _Choice(moduli, chain, drops, budget, q_bits,
                           len(moduli) * _cost(steps, poly_degree, chain, drops))
    return None


def _plan_at(qnet: QuantizedNetwork, req: _Request, poly_degree: int, bound: int,
             cache: _Linears) -> BfvPlan:
    row = poly_degree // 2
    if req.packing == "single":
        steps, in_slots, in_period, unfold = _single_steps(qnet, row, cache)
    else:
        steps, in_slots, in_period, unfold = _batch_steps(qnet, cache), None, 1, None
    t_max = _max_t_bits(steps, poly_degree, req.output)
    smallest = next(batching_primes(poly_degree, 2)).bit_length()
    if req.plain_bits is not None and req.plain_bits < smallest:
        raise _Infeasible(f"plain_modulus_bits={req.plain_bits}: the smallest batching prime "
                          f"t = 1 (mod {2 * poly_degree}) has {smallest} bits")
    if req.plain_bits is not None:
        if req.plain_bits > t_max:
            raise _Infeasible(f"plain_modulus_bits={req.plain_bits}: the noise budget holds "
                              f"primes of at most {t_max} bits through the network's depth")
        t_max = req.plain_bits
    if not t_max:
        raise _Infeasible("the noise budget cannot hold even the smallest batching prime "
                          "through the network's depth")
    least = choose_plain_moduli(poly_degree, bound, t_max, req.max_primes, req.plain_bits)
    if least is None:
        usable = largest_batching_primes(poly_degree, t_max, req.max_primes)
        raise _Infeasible(f"the noise budget allows primes of at most {t_max} bits, and the "
                          f"largest {len(usable)} batching primes t = 1 (mod {2 * poly_degree}) "
                          f"of that size (max_primes={req.max_primes}) hold only "
                          f"{math.log2(max(math.prod(usable), 2)) - 1:.1f} bits")
    choices = []
    fewest = len(least)
    for k in range(fewest, min(fewest + 2, req.max_primes) + 1):
        moduli = plain_moduli(poly_degree, bound, k, t_max, req.plain_bits)
        choice = _choose(steps, poly_degree, moduli, req.output) if moduli else None
        if choice is not None:
            choices.append(choice)
    if not choices:
        raise _Infeasible("no coefficient modulus keeps the noise budget")
    best = min(choices, key=lambda c: c.seconds)
    for step, drop in zip(steps, best.drops):
        step.drops = drop
    rotations = sorted({s for st in steps if isinstance(st, SingleLinearStep)
                        for s in st.layout.steps})
    budget, flood_log2, before = best.budget, None, None
    if req.output.flood_bits:
        before = best.budget
        flood_log2, budget = req.output.flood(NoiseModel(poly_degree, math.log2(max(best.moduli))),
                                              best.q_bits, before)
    return BfvPlan(req.packing, poly_degree, best.moduli, best.chain, steps, in_slots,
                   in_period, unfold, rotations, any(isinstance(s, PolyStep) for s in steps),
                   bound, budget, best.seconds, qnet, req.output.rerandomize,
                   req.output.flood_bits, flood_log2, before)


def _search(qnet: QuantizedNetwork, req: _Request) -> BfvPlan:
    cache = _Linears(qnet)
    bound = min(output_bound(qnet, cache.linear), int(qnet.bounds[-1]))
    reasons = []
    for n in ([req.poly_degree] if req.poly_degree else DEGREES):
        try:
            return _plan_at(qnet, req, n, bound, cache)
        except _Infeasible as exc:
            reasons.append(f"N={n}: {exc}")
    need = math.log2(2 * bound + 1)
    raise CompileError(
        f"bfv ({req.packing} packing) cannot hold layer {qnet.layers[-1].spec.name}: its "
        f"worst-case |output| is {bound} (2^{math.log2(max(bound, 1)):.1f}, for inputs in "
        f"{list(qnet.input_range)} at bits={qnet.bits}), so the plaintext moduli must "
        f"multiply to more than 2^{need:.1f}; " + "; ".join(reasons)
        + ". Lower bits, raise max_primes, or pick a larger poly_modulus_degree.")


def make_plan(qnet: QuantizedNetwork, packing: str = "auto", poly_degree: int | None = None,
              plain_bits: int | None = None, max_primes: int = 8, rerandomize: bool = False,
              flood_bits: int = 0) -> BfvPlan:
    """Plan BFV for ``qnet`` (see the module docstring).

    Args:
        qnet: the quantized prefix.
        packing: ``auto`` (``single`` when it fits, else ``batch``), ``single`` or ``batch``.
        poly_degree: force the ring degree ``N``.
        plain_bits: force the size of every plaintext prime.
        max_primes: the most CRT primes (BFV contexts); 1 disables the CRT.
        rerandomize: the server adds a fresh encryption of zero to every output.
        flood_bits: the output flood's statistical security (0: none; needs
            ``rerandomize``).

    Raises:
        CompileError: no parameters hold the network; the message names the output bound
            and, for each ring degree, what failed; or no ring holds the flood's reserve,
            and the message says how much flood the network carries without it.
    """
    output = _Output(rerandomize, flood_bits)
    try:
        return _plan(qnet, packing, poly_degree, plain_bits, max_primes, output)
    except CompileError as exc:
        if not flood_bits:
            raise
        carried = _most_flood(qnet, packing, poly_degree, plain_bits, max_primes, output)
        if carried is None:
            raise
        ring = f"N={poly_degree}" if poly_degree else f"any ring degree up to {DEGREES[-1]}"
        fix = ("leave poly_modulus_degree to the planner" if poly_degree
               else "use fewer bits")
        raise CompileError(
            f"bfv: flood_bits={flood_bits} needs {flood_bits} + log2 N + 2 bits of noise "
            f"budget at the output beyond the {MARGIN:g} kept, more than {ring} holds for "
            f"this network: it carries at most flood_bits={carried[0]} (at "
            f"N={carried[1]}). Lower flood_bits (0 re-randomizes without flooding) or "
            f"{fix}") from exc


def _most_flood(qnet: QuantizedNetwork, packing: str, poly_degree: int | None,
                plain_bits: int | None, max_primes: int,
                output: _Output) -> tuple[int, int] | None:
    """``(flood_bits, N)`` of the largest flood below ``output``'s that plans (bisection;
    ``None``: none, not even 0)."""
    lo, hi, found = 0, output.flood_bits - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            plan = _plan(qnet, packing, poly_degree, plain_bits, max_primes,
                         _Output(output.rerandomize, mid))
        except CompileError:
            hi = mid - 1
        else:
            found, lo = (mid, plan.poly_degree), mid + 1
    return found


def _plan(qnet: QuantizedNetwork, packing: str, poly_degree: int | None,
          plain_bits: int | None, max_primes: int, output: _Output) -> BfvPlan:
    if packing != "auto":
        return _search(qnet, _Request(packing, poly_degree, plain_bits, max_primes, output))
    try:
        return _search(qnet, _Request("single", poly_degree, plain_bits, max_primes, output))
    except CompileError as single:
        try:
            return _search(qnet, _Request("batch", poly_degree, plain_bits, max_primes, output))
        except CompileError as batch:
            raise CompileError(f"{single}\n{batch}") from None
