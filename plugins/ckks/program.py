"""Lower a network to a CKKS program: affine stages, polynomial stages and slot layouts.

Consecutive affine layers (Linear, Conv2d, AvgPool2d, Flatten, degree-1 polynomials) fuse
into one ``Affine`` stage ``y = M x + b`` that costs one level. A degree-2 polynomial
``a x^2 + b x + c`` right after an affine stage costs one level too: the stage is scaled by
``s = sqrt(|a|)`` so the polynomial becomes ``sign(a) * x'(x' + b/s) + c``. Other
polynomials are evaluated generically (powers, then coefficients: ``ceil(log2 d) + 1``
levels).

For ``single`` packing every value is one vector of slots, periodic with a power-of-two
``period`` (the client replicates the input to fill the slots). An affine stage is a matrix
from the input layout to the output layout, evaluated by the hybrid diagonal method
(Halevi-Shoup diagonals of an ``m' x d'`` matrix, baby-step giant-step, then a
rotate-and-sum when ``m' < d'``). When the first stage starts with a convolution, the client
may send its im2col expansion instead (``k * P' + p`` holds pixel ``k`` of window ``p``): the
convolution then needs only one diagonal per output-channel block. When the first stage is
small enough (``m' * d' <= slots``) the client may repeat each input ``m'`` times so every
product has its own slot: one diagonal and ``log2(d')`` rotations. The cheapest layout
(fewest rotations) wins.

Nothing here imports the backend: the planner runs from numpy alone.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from secureinfer.layers import Conv2d, LayerSpec, Linear, Poly, im2col

__all__ = [
    "Affine",
    "Layout",
    "Polynomial",
    "Program",
    "SingleLayout",
    "affine_matrix",
    "build_program",
    "input_layout",
    "layout_single",
    "output_layout",
    "pow2",
    "rotation_steps",
]

_AFFINE_KINDS = frozenset({"linear", "conv2d", "avgpool2d", "flatten"})
_MAX_SEARCH = 1 << 22  # (alignment, slot) pairs the block-layout search may examine


def pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 << max(0, int(n) - 1).bit_length()


def _is_affine(spec: LayerSpec) -> bool:
    return spec.kind in _AFFINE_KINDS or (spec.kind == "poly" and spec.degree <= 1)


def affine_matrix(spec: LayerSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(M, b)`` with ``spec(x).ravel() == M @ x.ravel() + b`` for an affine ``spec``."""
    if isinstance(spec, Linear):
        return spec.weight.copy(), spec.bias.copy()
    if isinstance(spec, Conv2d):
        return spec.as_matrix()
    d = int(np.prod(spec.in_shape))
    zero = spec.forward(np.zeros((1, *spec.in_shape))).reshape(-1)
    basis = spec.forward(np.eye(d).reshape(d, *spec.in_shape)).reshape(d, -1) - zero
    return basis.T.copy(), zero


@dataclass
class Layout:
    """Where a flat value sits in the slots: element ``i`` at ``positions[i]``, repeated
    every ``period`` slots."""

    period: int
    positions: np.ndarray

    @classmethod
    def dense(cls, size: int) -> Layout:
        """Elements ``0..size-1`` in slots ``0..size-1``, period ``pow2(size)``."""
        return cls(pow2(size), np.arange(size, dtype=np.int64))


@dataclass
class SingleLayout:
    """The hybrid-diagonal form of one affine stage for ``single`` packing.

    Attributes:
        in_layout: layout of the stage's input vector.
        out_layout: layout of its output.
        diagonals: nonzero diagonal index -> values over one period ``width``.
        baby: baby-step size of the baby-step giant-step split.
        rotsum: rotate-and-sum steps applied after the product (``m' < d'``).
        gather: for the first stage, the client's input map (slot -> flat input index,
            ``-1`` for zero); ``None`` when the stage reads the previous value.
        name: ``"plain"``, ``"expanded"``, ``"im2col"``, ``"chained"`` or ``"block"``.
    """

    in_layout: Layout
    out_layout: Layout
    diagonals: dict[int, np.ndarray]
    baby: int
    rotsum: list[int]
    gather: np.ndarray | None = None
    name: str = "chained"

    @property
    def width(self) -> int:
        """Period of the diagonals: ``max(m', d')``."""
        return max(self.in_layout.period, self.out_layout.period)

    def baby_steps(self) -> list[int]:
        """Rotations of the input: ``{i mod baby}`` without 0."""
        return sorted({i % self.baby for i in self.diagonals} - {0})

    def giant_steps(self) -> list[int]:
        """Rotations of the partial sums: ``{i - i mod baby}`` without 0."""
        return sorted({i - i % self.baby for i in self.diagonals} - {0})

    def rotations(self) -> int:
        """Ciphertext rotations per evaluation."""
        return len(self.baby_steps()) + len(self.giant_steps()) + len(self.rotsum)

    def steps(self) -> set[int]:
        """Distinct rotation steps (Galois keys) this stage needs."""
        return set(self.baby_steps()) | set(self.giant_steps()) | set(self.rotsum)


@dataclass(eq=False)
class Affine:
    """``y = scale * (M x + b)`` over the flattened value: one or more fused layers.

    ``M`` is built on first use of ``matrix`` only (the dense-matrix layouts need it); the
    convolution layouts (``grid``) and the planner's bounds read the layers themselves, so
    a convolution or a pool never becomes an ``n_out x n_in`` matrix on their path.
    """

    specs: list[LayerSpec]
    identity: bool = False
    scale: float = 1.0
    single: SingleLayout | None = None
    _fused: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    kind = "affine"

    @property
    def matrix(self) -> np.ndarray:
        """The fused dense matrix ``M`` (built on first use)."""
        if self._fused is None:
            self._fused = _fuse_matrix(self.specs)
        return self._fused[0]

    @property
    def bias(self) -> np.ndarray:
        """The fused bias ``b`` (the stage applied to zero)."""
        if self._fused is not None:
            return self._fused[1]
        return self.apply(np.zeros((1, int(np.prod(self.specs[0].in_shape)))))[0]

    @property
    def dense(self) -> bool:
        """True when the stage is Linear/Flatten layers only (its matrix is the weights)."""
        return all(s.kind in ("linear", "flatten") for s in self.specs)

    @property
    def shape(self) -> tuple[int, int]:
        """``(outputs, inputs)`` of the flattened stage."""
        return (int(np.prod(self.specs[-1].out_shape)), int(np.prod(self.specs[0].in_shape)))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``M x + b`` (unscaled) on a batch of flat inputs ``x``, through the layers."""
        y = np.asarray(x, dtype=np.float64).reshape(len(x), *self.specs[0].in_shape)
        for spec in self.specs:
            y = spec.forward(y)
        return y.reshape(len(x), -1)

    def abs_bound(self, bound: float) -> float:
        """Upper bound on ``max |M x + b|`` for ``|x| <= bound`` (``|M| 1 bound + |b|``)."""
        if self.dense or self._fused is not None:
            return float(np.max(np.abs(self.matrix).sum(axis=1) * bound + np.abs(self.bias),
                                initial=0.0))
        y = np.full((1, *self.specs[0].in_shape), float(bound))
        for spec in self.specs:
            y = _abs_forward(spec, y)
        return float(np.max(y.reshape(-1) + np.abs(self.bias), initial=0.0))

    def row_norm_max(self, probes: int = 32) -> float:
        """Largest row norm of ``M``: exact for dense stages, else estimated from random
        Gaussian probes (``E (M z)_r^2 = ||M_r||^2``), without building ``M``."""
        if self.dense or self._fused is not None:
            return float(np.max(np.linalg.norm(self.matrix, axis=1), initial=0.0))
        rng = np.random.default_rng(0)
        z = rng.standard_normal((probes, self.shape[1]))
        y = self.apply(z) - self.bias
        return float(np.sqrt(np.max(np.mean(y * y, axis=0), initial=0.0)))

    @property
    def depth(self) -> int:
        """Levels consumed: 0 for an unscaled identity (Flatten), else 1."""
        return 0 if self.is_noop else 1

    @property
    def is_noop(self) -> bool:
        """True when the stage moves nothing (only Flatten layers, unscaled)."""
        return self.identity and self.scale == 1.0

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """The scaled ``(M, b)`` actually evaluated (dense layouts only)."""
        return self.matrix * self.scale, self.bias * self.scale

    def describe(self) -> str:
        names = "+".join(s.name for s in self.specs)
        m, d = self.shape
        return f"affine[{names}] {d}->{m}" + (f" x{self.scale:.4g}" if self.scale != 1 else "")


def _abs_forward(spec: LayerSpec, x: np.ndarray) -> np.ndarray:
    """``|spec| x`` without bias for ``x >= 0``: the layer with absolute weights."""
    if isinstance(spec, Linear):
        return x @ np.abs(spec.weight).T
    if isinstance(spec, Conv2d):
        oc = spec.weight.shape[0]
        cols = im2col(x, spec.weight.shape[2:], spec.stride, spec.padding)
        y = cols @ np.abs(spec.weight).reshape(oc, -1).T
        return y.transpose(0, 2, 1).reshape(len(x), *spec.out_shape)
    if spec.kind == "poly":
        return x * abs(spec.coeffs[1]) if len(spec.coeffs) > 1 else np.zeros_like(x)
    return spec.forward(x)


@dataclass
class Polynomial:
    """An element-wise polynomial, ``coeffs`` lowest degree first.

    ``folded``: degree 2 with the preceding affine stage scaled by ``sqrt(|a|)``.
    """

    specs: list[LayerSpec]
    coeffs: tuple[float, ...]
    folded: bool = False

    kind = "poly"

    @property
    def degree(self) -> int:
        return len(self.coeffs) - 1

    @property
    def depth(self) -> int:
        """Levels consumed."""
        if self.folded:
            return 1
        return math.ceil(math.log2(self.degree)) + 1

    def describe(self) -> str:
        how = "folded" if self.folded else "generic"
        return f"poly[{self.specs[0].name}] degree {self.degree} ({how})"


Stage = Affine | Polynomial


@dataclass
class Program:
    """The stages of a network and its shapes."""

    stages: list[Stage]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    specs: list[LayerSpec] = field(default_factory=list)

    @property
    def depth(self) -> int:
        """Multiplicative depth of the whole program."""
        return sum(s.depth for s in self.stages)

    @property
    def needs_relin(self) -> bool:
        """True when a ciphertext-ciphertext product (relinearization key) is needed."""
        return any(isinstance(s, Polynomial) for s in self.stages)

    def stage_depths(self) -> list[tuple[str, int]]:
        """``(description, depth)`` per stage, for error messages and plans."""
        return [(s.describe(), s.depth) for s in self.stages]


# ----- lowering -------------------------------------------------------------------------


_FUSE_CHUNK_BYTES = 64 << 20
"""Memory of one block of basis vectors pushed through a run of affine layers."""


def _chain_matrix(specs: list[LayerSpec]) -> tuple[np.ndarray, np.ndarray]:
    """``(M, b)`` of a run of affine layers, by pushing blocks of basis vectors through it.

    Never builds a layer's own matrix: a pool after a wide convolution is a
    ``(d / 4) x d`` matrix (1.3 GB for 32 channels of 28x28) and its basis ``d x d``
    (5 GB), while the fused run usually ends in a small dense layer.
    """
    shape = specs[0].in_shape
    d_in, d_out = int(np.prod(shape)), int(np.prod(specs[-1].out_shape))

    def run(x: np.ndarray) -> np.ndarray:
        for spec in specs:
            x = spec.forward(x)
        return x.reshape(len(x), -1)

    bias = run(np.zeros((1, *shape)))[0]
    matrix = np.empty((d_out, d_in))
    widest = d_in + max(int(np.prod(s.out_shape)) for s in specs)
    step = max(1, _FUSE_CHUNK_BYTES // (8 * widest))
    for start in range(0, d_in, step):
        stop = min(d_in, start + step)
        basis = np.zeros((stop - start, d_in))
        basis[np.arange(stop - start), np.arange(start, stop)] = 1.0
        matrix[:, start:stop] = (run(basis.reshape(-1, *shape)) - bias).T
    return matrix, bias


def _fuse_matrix(specs: list[LayerSpec]) -> tuple[np.ndarray, np.ndarray]:
    moving = [s for s in specs if s.kind != "flatten"]
    if len(specs) == 1 or (moving and all(isinstance(s, Linear) for s in moving)):
        specs = moving or specs
        matrix, bias = affine_matrix(specs[0])
        for spec in specs[1:]:
            m2, b2 = affine_matrix(spec)
            matrix, bias = m2 @ matrix, m2 @ bias + b2
        return matrix, bias
    return _chain_matrix(list(specs))


def _fuse(specs: list[LayerSpec]) -> Affine:
    """One affine stage of ``specs`` (its matrix is built on first use)."""
    identity = all(s.kind == "flatten" for s in specs)
    return Affine(list(specs), identity=identity)


#: Smallest ``|a|`` of ``a x^2 + b x + c`` folded into the affine stage before it (the
#: fold multiplies the rescaling noise by ``1/sqrt(|a|)``, at most 10 here).
FOLD_MIN_SQUARE_COEFF = 1e-2


def build_program(specs: Sequence[LayerSpec]) -> Program:
    """Group ``specs`` into stages and fold degree-2 polynomials into their affine stage."""
    specs = list(specs)
    stages: list[Stage] = []
    run: list[LayerSpec] = []
    for spec in specs:
        if _is_affine(spec):
            run.append(spec)
            continue
        if run:
            stages.append(_fuse(run))
            run = []
        assert isinstance(spec, Poly)
        stages.append(Polynomial([spec], tuple(float(c) for c in spec.coeffs)))
    if run:
        stages.append(_fuse(run))
    for prev, stage in itertools.pairwise(stages):
        # Folding computes on x' = sqrt(|a|) x: noise on x' reaches the output multiplied by
        # 1/sqrt(|a|) more than unfolded, so a tiny x^2 coefficient is evaluated generically.
        if isinstance(stage, Polynomial) and stage.degree == 2 and isinstance(prev, Affine) \
                and abs(stage.coeffs[2]) >= FOLD_MIN_SQUARE_COEFF:
            prev.scale = math.sqrt(abs(stage.coeffs[2]))
            stage.folded = True
    return Program(stages, specs[0].in_shape, specs[-1].out_shape, specs)


# ----- single-packing layouts -------------------------------------------------------------


def _inverse(layout: Layout) -> np.ndarray:
    """Slot -> element index (``-1`` for an empty slot) over one period."""
    inv = -np.ones(layout.period, dtype=np.int64)
    inv[layout.positions] = np.arange(len(layout.positions))
    return inv


def _diagonals(matrix: np.ndarray, in_layout: Layout,
               out_layout: Layout) -> dict[int, np.ndarray]:
    """Nonzero generalized diagonals of ``matrix`` seen from slots to slots.

    With ``m'``/``d'`` the output/input periods, diagonal ``i < min(m', d')`` holds
    ``S[j mod m', (j + i) mod d']`` for ``j < max(m', d')``, ``S`` the slot matrix.
    """
    m, d = out_layout.period, in_layout.period
    width = max(m, d)
    j = np.arange(width)
    rows = _inverse(out_layout)[j % m]
    padded = np.zeros((matrix.shape[0] + 1, matrix.shape[1] + 1))
    padded[:-1, :-1] = matrix  # index -1 reads the zero row / column
    inv_in = _inverse(in_layout)
    out: dict[int, np.ndarray] = {}
    for i in range(min(m, d)):
        diag = padded[rows, inv_in[(j + i) % d]]
        if np.any(diag != 0.0):
            out[i] = diag
    return out


def _best_baby(indices: Sequence[int]) -> int:
    """Baby-step size minimising rotations (ties: fewer distinct steps, then smaller)."""
    if not indices:
        return 1
    top = max(indices) + 1
    candidates = set(range(1, min(top, 64) + 1)) | {1 << k for k in range(top.bit_length())}
    best, best_key = 1, None
    for b in sorted(candidates):
        baby = {i % b for i in indices} - {0}
        giant = {i - i % b for i in indices} - {0}
        key = (len(baby) + len(giant), len(baby | giant), b)
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
                 gather: np.ndarray | None, name: str) -> SingleLayout:
    diags = _diagonals(matrix, in_layout, out_layout)
    return SingleLayout(in_layout, out_layout, diags, _best_baby(sorted(diags)),
                        _rotsum_steps(out_layout.period, in_layout.period), gather, name)


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


def _im2col_candidate(stage: Affine, slots: int) -> tuple[np.ndarray, Layout, np.ndarray] | None:
    """The im2col input for a stage that starts with a convolution: ``(matrix over the
    im2col vector, its layout, gather map)``, or ``None`` when it does not apply or fit."""
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
    weights = conv.weight.reshape(oc, kernel)
    for o in range(oc):
        rows = o * windows + np.arange(windows)
        for k in range(kernel):
            conv_matrix[rows, k * pw + np.arange(windows)] = weights[o, k]
    rest = stage.specs[1:]
    matrix = conv_matrix
    for spec in rest:
        m2, _ = affine_matrix(spec)
        matrix = m2 @ matrix
    return matrix, Layout.dense(pk * pw), gather


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
    for r in range(m):
        expanded[r, r + rows * np.arange(d)] = matrix[r]
    return _make_single(expanded, Layout.dense(rows * cols), Layout.dense(m), gather,
                        "expanded")


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
    channel blocks a convolution leaves)."""
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
            out.append(SingleLayout(in_layout, layout, full, _best_baby(sorted(full)), steps,
                                    None, "block"))
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
        conv_matrix, layout, gather = im2col_form
        for out in _out_layouts(stage, conv_only):
            cands.append(_make_single(conv_matrix * stage.scale, layout, out, gather, "im2col"))
    return cands


def _fits(single: SingleLayout, slots: int) -> bool:
    return single.width <= slots


def _cost(single: SingleLayout) -> tuple[int, int]:
    return single.rotations(), len(single.diagonals)


def layout_single(program: Program, slots: int, search: bool = True) -> list[str] | None:
    """Choose the slot layout of every affine stage for ``slots`` slots.

    Sets ``stage.single`` on each non-trivial affine stage and returns a list of human
    notes, or returns ``None`` when some value does not fit in ``slots`` slots.
    ``search=False`` skips the block layouts (slower to plan, never needed to fit).
    """
    layout: Layout | None = None
    notes: list[str] = []
    first = True
    for stage in program.stages:
        if isinstance(stage, Polynomial):
            if layout is None:
                layout = Layout.dense(int(np.prod(program.input_shape)))
            first = False
            continue
        if stage.is_noop:
            stage.single = None
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
        stage.single = best
        layout = best.out_layout
        notes.append(f"{stage.describe()}: {best.name} input, {len(best.diagonals)} diagonals, "
                     f"{best.rotations()} rotations")
    if layout is None or layout.period > slots:
        return None
    return notes


def input_layout(program: Program) -> tuple[Layout, np.ndarray]:
    """The client's single-packing input: its layout and gather map (after ``layout_single``)."""
    for stage in program.stages:
        if isinstance(stage, Affine) and stage.single is not None:
            assert stage.single.gather is not None
            return stage.single.in_layout, stage.single.gather
        if isinstance(stage, Polynomial):
            break
    d = int(np.prod(program.input_shape))
    return Layout.dense(d), np.arange(d, dtype=np.int64)


def output_layout(program: Program) -> Layout:
    """Layout of the program's result under single packing (after ``layout_single``)."""
    layout, _ = input_layout(program)
    for stage in program.stages:
        if isinstance(stage, Affine) and stage.single is not None:
            layout = stage.single.out_layout
    return layout


def rotation_steps(program: Program, slots: int) -> list[int]:
    """Every distinct rotation step of the program, normalised to ``[1, slots)``."""
    steps: set[int] = set()
    for stage in program.stages:
        if isinstance(stage, Affine) and stage.single is not None:
            steps |= {s % slots for s in stage.single.steps()}
    steps.discard(0)
    return sorted(steps)
