"""Lower a network to a CKKS program: affine stages, polynomial stages and slot layouts.

Consecutive affine layers (Linear, Conv2d, AvgPool2d, Flatten, degree-1 polynomials) fuse
into one ``Affine`` stage ``y = M x + b`` that costs one level. A degree-2 polynomial
``a x^2 + b x + c`` right after an affine stage costs one level too: the stage is scaled by
``s = sqrt(|a|)`` so the polynomial becomes ``sign(a) * x'(x' + b/s) + c``. Other
polynomials are evaluated generically (powers, then coefficients: ``ceil(log2 d) + 1``
levels).

The layouts are searched elsewhere (``search`` for dense-matrix layouts, ``grid`` for
convolution-aware ones), by pure functions of a ``Program``. For ``single`` packing every
value is one vector of slots, periodic with a power-of-two
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from secureinfer.layers import AvgPool2d, Conv2d, LayerSpec, Linear, Poly, im2col

__all__ = [
    "Affine",
    "Layout",
    "Polynomial",
    "Program",
    "SingleLayout",
    "affine_matrix",
    "build_program",
    "pow2",
]

_AFFINE_KINDS = frozenset({"linear", "conv2d", "avgpool2d", "flatten"})


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
        skipped: all-zero diagonals (pruned units) left out: no product, no rotation.
    """

    in_layout: Layout
    out_layout: Layout
    diagonals: dict[int, np.ndarray]
    baby: int
    rotsum: list[int]
    gather: np.ndarray | None = None
    name: str = "chained"
    skipped: int = 0

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


_FUSE_CHUNK_BYTES = 64 << 20
"""Memory of one block of basis vectors pushed through a run of affine layers."""


def _window(specs: Sequence[LayerSpec]) -> tuple[int, int] | None:
    """Rows x columns of the input window one output of the spatial layers ``specs``
    reads (each kernel widens it by ``k - 1`` input strides; element-wise layers and
    Flatten keep it), or ``None`` when a Linear layer makes every output read the whole
    input."""
    high = wide = 1
    down = across = 1
    for spec in specs:
        if isinstance(spec, Conv2d):
            (kh, kw), (sh, sw) = spec.weight.shape[2:], spec.stride
        elif isinstance(spec, AvgPool2d):
            kh = kw = spec.kernel
            sh = sw = spec.stride
        elif spec.kind in ("poly", "flatten"):
            continue
        else:
            return None
        high, wide = high + (kh - 1) * down, wide + (kw - 1) * across
        down, across = down * sh, across * sw
    return high, wide


def _sample_floats(specs: Sequence[LayerSpec]) -> int:
    """Values one input of ``specs`` holds at once at its widest layer: the layer's input
    and output, and a window layer's im2col columns (``out_h * out_w * c * k_h * k_w``)."""
    widest = 1
    for spec in specs:
        size = int(np.prod(spec.in_shape)) + int(np.prod(spec.out_shape))
        if isinstance(spec, Conv2d):
            size += int(np.prod(spec.out_shape[1:])) * int(np.prod(spec.weight.shape[1:]))
        elif isinstance(spec, AvgPool2d):
            size += int(np.prod(spec.out_shape)) * spec.kernel ** 2
        widest = max(widest, size)
    return widest


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
    _fused: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _row_norm: float | None = field(default=None, repr=False)

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

    def row_norm_max(self) -> float:
        """Largest row norm of ``M`` (how much the stage amplifies independent slot
        errors), exact and without building ``M``: dense stages read the matrix; the others
        apply ``M`` to the colored probes of ``_color_probes``, whose squared outputs sum
        to each row's squared norm. Computed once per stage (the planner asks at every
        scale it tries; the scale factor is not part of ``M``)."""
        if self._row_norm is not None:
            return self._row_norm
        if self.dense or self._fused is not None:
            squares = np.sum(self.matrix ** 2, axis=1)
        else:
            squares = np.zeros(self.shape[0])
            bias = self.bias
            for probes in self._color_probes():
                y = self.apply(probes) - bias
                squares += np.einsum("ij,ij->j", y, y)
        self._row_norm = float(np.sqrt(np.max(squares, initial=0.0)))
        return self._row_norm

    def _color_probes(self, floats: int = _FUSE_CHUNK_BYTES // 8) -> Iterator[np.ndarray]:
        """Indicator vectors of the input's color classes, in batches of at most
        ``floats`` values in flight (``_sample_floats`` per probe, at least one probe):
        input ``(c, i, j)`` has color ``(c, i mod P, j mod Q)``, ``P x Q`` the window one
        output reads (``_window``; the whole map when a Linear reads everything). No two
        inputs of one output's window share a color, so ``(M z_color)_r`` is the single entry of row ``r`` of that color, and the squares
        over the colors sum to ``||M_r||^2``. Convolutions and pools need
        ``c * P * Q`` probes (600 for LeNet-5's pool1+conv2, against 4704 inputs)."""
        shape = self.specs[0].in_shape
        n = self.shape[1]
        if len(shape) == 3:
            c, h, w = shape
            win = _window(self.specs)
            p, q = (min(h, win[0]), min(w, win[1])) if win else (h, w)
            ii, jj = np.meshgrid(np.arange(h) % p, np.arange(w) % q, indexing="ij")
            color = (np.arange(c)[:, None, None] * p + ii) * q + jj
            colors = c * p * q
        else:
            color, colors = np.arange(n), n
        color = color.reshape(-1)
        per = max(1, floats // _sample_floats(self.specs))
        for start in range(0, colors, per):
            ids = np.arange(start, min(colors, start + per))
            probes = np.zeros((len(ids), n))
            hit = (color >= ids[0]) & (color <= ids[-1])
            probes[color[hit] - ids[0], np.flatnonzero(hit)] = 1.0
            yield probes

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
    ``lazy``: a folded square whose rescale is left to the affine stage after it, which
    then divides by one prime of twice the scale's bits (``Program.with_lazy_squares``).
    """

    specs: list[LayerSpec]
    coeffs: tuple[float, ...]
    folded: bool = False
    lazy: bool = False

    kind = "poly"

    @property
    def degree(self) -> int:
        return len(self.coeffs) - 1

    @property
    def depth(self) -> int:
        """Levels consumed (none for a lazy square: the next stage's rescale takes it)."""
        if self.folded:
            return 0 if self.lazy else 1
        return math.ceil(math.log2(self.degree)) + 1

    def describe(self) -> str:
        how = ("folded, lazy rescale" if self.lazy else "folded") if self.folded else "generic"
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

    @property
    def lazy_squares(self) -> int:
        """How many squares leave their rescale to the next stage."""
        return sum(1 for s in self.stages if isinstance(s, Polynomial) and s.lazy)

    def with_lazy_squares(self) -> Program | None:
        """A copy in which every folded square followed by an affine stage is lazy, or
        ``None`` when there is none. Pure: ``self`` is unchanged.

        SEAL's cost per rotation and per product grows with the number of primes left
        (key switching ~ ``L^1.3``), not with their size. An eager square rescales by a
        prime of ``scale_bits``; a lazy one keeps ``x^2`` at scale ``2^(2*scale_bits)``,
        the next affine stage multiplies it by its weights at ``~2^scale_bits`` and
        rescales once by a prime of ``2 * scale_bits`` bits: the same precision and the
        same modulus bits (but a wider special prime) in one prime fewer per square.
        """
        stages: list[Stage] = []
        for k, stage in enumerate(self.stages):
            nxt = self.stages[k + 1] if k + 1 < len(self.stages) else None
            if isinstance(stage, Polynomial) and stage.folded and isinstance(nxt, Affine) \
                    and not nxt.is_noop:
                stage = replace(stage, lazy=True)
            stages.append(stage)
        if not any(isinstance(s, Polynomial) and s.lazy for s in stages):
            return None
        return replace(self, stages=stages)

    def level_bits(self, scale_bits: int) -> list[int]:
        """The size of the prime each level divides by, in evaluation order: twice the
        scale for an affine stage after a lazy square, else the scale."""
        sizes: list[int] = []
        prev: Stage | None = None
        for stage in self.stages:
            lazy_in = isinstance(prev, Polynomial) and prev.lazy
            if stage.depth:
                sizes.extend([2 * scale_bits if lazy_in else scale_bits]
                             + [scale_bits] * (stage.depth - 1))
            prev = stage
        return sizes


# ----- lowering -------------------------------------------------------------------------


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
