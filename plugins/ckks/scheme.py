"""The ``ckks`` scheme class: parameters, planning, keys, messages; one object per packing.

See the package docstring for the config keys. The client side (``keygen``, ``encrypt``,
``check_input``, ``decrypt``, ``batch_size``) reads the plan dict only: its input map
(``input_gather``, ``input_period``), output slots (``output_positions``), shapes and
parameters. The server side additionally holds the program and layouts built from the
layers.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from secureinfer import codec, privacy
from secureinfer.errors import CompileError, ConfigError, EnvelopeError, RangeError
from secureinfer.layers import LayerSpec
from secureinfer.units import SlotUnits
from secureinfer.scheme import (
    Calibration,
    Capabilities,
    Option,
    Scheme,
    SecureLayer,
    import_problem,
)

from . import flood as _flood
from . import grid as _grid
from . import native as _native
from . import params as _params
from . import program as _program
from . import search as _search
from . import units as _units
from .backend import ClientKeys, Seal, galois_element, sealapi, to_bytes
from .layers import CKKSLayer, ServerContext, Value, schedule
from .workers import StagePool

_log = logging.getLogger(__name__)

__all__ = ["BatchPacking", "CKKSScheme", "Packing", "SinglePacking"]

_KINDS = frozenset({"linear", "conv2d", "avgpool2d", "flatten", "poly"})
TOLERANCE = 1e-2


class Packing(abc.ABC):
    """How inputs map to ciphertexts: planning of the layouts and the client's codec."""

    name: ClassVar[str]

    def __init__(self, opts: Mapping[str, Any] | None = None) -> None:
        self.opts = dict(opts or {})

    @abc.abstractmethod
    def fits(self, program: _program.Program, degree: int) -> bool:
        """Whether the program's values fit the slots of ring degree ``degree``."""

    @abc.abstractmethod
    def layouts(self, program: _program.Program, params: _params.Params) -> dict[str, Any]:
        """Plan fields of the layouts; ``_grid``/``_dense`` hold the server's objects."""

    @abc.abstractmethod
    def batch_size(self, plan: dict[str, Any]) -> int:
        """Inputs per message group."""

    @abc.abstractmethod
    def per_group(self, plan: dict[str, Any], what: str) -> tuple[int, int]:
        """``(ciphertexts per group, largest group)`` of an ``input``/``output`` message."""

    @abc.abstractmethod
    def encrypt(self, keys: ClientKeys, x: np.ndarray,
                plan: dict[str, Any]) -> tuple[list[bytes], np.ndarray]:
        """Ciphertext bytes and group counts of the flat inputs ``x``."""

    @abc.abstractmethod
    def decrypt(self, keys: ClientKeys, cts: list[Any], counts: list[int],
                plan: dict[str, Any]) -> np.ndarray:
        """The flat outputs of the decrypted ciphertexts."""

    @abc.abstractmethod
    def group(self, cts: list[Any], counts: list[int], plan: dict[str, Any]) -> Value:
        """The server's value of loaded input ciphertexts."""


class SinglePacking(Packing):
    """One input per ciphertext, periodic slot layouts: convolution-aware grids when the
    network has convolutions or pools (``grid``), else dense-matrix layouts (``search``)."""

    name = "single"

    def __init__(self, opts: Mapping[str, Any] | None = None) -> None:
        super().__init__(opts)
        self.max_shifts = int(self.opts.get("input_shifts") or _grid.MAX_SHIFTS)
        self._grids: dict[int, _grid.GridPlan | None] = {}

    def _grid(self, program: _program.Program, degree: int) -> _grid.GridPlan | None:
        if degree not in self._grids:
            self._grids[degree] = _grid.plan_grid(program, degree // 2, search=False,
                                                  max_shifts=self.max_shifts)
        return self._grids[degree]

    def fits(self, program: _program.Program, degree: int) -> bool:
        if _grid.applicable(program):
            return self._grid(program, degree) is not None
        return _search.layout_single(program, degree // 2, search=False) is not None

    def layouts(self, program: _program.Program, params: _params.Params) -> dict[str, Any]:
        search = bool(self.opts.get("block_layouts", True))
        hoist = bool(self.opts.get("hoist", True))
        grid = (_grid.plan_grid(program, params.slots, search=search,
                                max_shifts=self.max_shifts, hoist=hoist)
                if _grid.applicable(program) else None)
        if grid is not None:
            if hoist:
                grid = _grid.hoist_stages(grid)
            grid = _grid.split_stages(grid, int(self.opts.get("workers") or 1))
            split = sum(1 for rp in grid.stages if rp is not None and rp.split)
            first = next((rp for rp in grid.stages if rp is not None), None)
            how = "im2col" if first is not None and first.name == "im2col" \
                else "channel-interleaved"
            if len(grid.shifts) > 1:
                how += f", {len(grid.shifts)} shifted copies (one ciphertext each)"
            return {
                "_grid": grid, "layout": "grid",
                "layouts": [f"{s.describe()}: {rp.name}, {rp.rotations()} rotations, "
                            f"{rp.products()} plaintext products"
                            for s, rp in zip(program.stages, grid.stages) if rp is not None],
                "rotation_steps": grid.steps(params.slots),
                "fixed_rotation_steps": grid.fixed_steps(params.slots),
                "rotations_per_input": grid.rotations(),
                "units_skipped": grid.skipped(),
                "workers": int(self.opts.get("workers") or 1) if split else 1,
                "split_stages": split,
                "input_layout": f"single: {how} grid, period {grid.period}, replicated to "
                                "fill the slots",
                **_grid_fields(grid, program, params),
            }
        dense = _search.layout_single(program, params.slots, search=search)
        if dense is None:
            raise CompileError("ckks: the network's values do not fit one ciphertext of "
                               f"{params.slots} slots; use packing=batch")
        layout, gather = _search.input_layout(program, dense)
        first = next((s for s in dense.stages if s is not None), None)
        kind = first.name if first is not None and first.gather is not None else "plain"
        return {
            "_dense": dense, "layout": "dense", "layouts": list(dense.notes),
            "rotation_steps": _search.rotation_steps(dense, params.slots),
            "fixed_rotation_steps": dense.fixed_steps(params.slots),
            "rotations_per_input": dense.rotations(),
            "plaintext_products": dense.products(),
            "units_skipped": dense.skipped(),
            "input_layout": f"single: {kind}, period {layout.period}, replicated to fill the "
                            "slots",
            "input_gather": gather.tolist(), "input_period": layout.period,
            "output_positions": _search.output_layout(program, dense).positions.tolist(),
        }

    def batch_size(self, plan: dict[str, Any]) -> int:
        return 1

    def per_group(self, plan: dict[str, Any], what: str) -> tuple[int, int]:
        return (len(plan.get("input_shifts", [0])) if what == "input" else 1), 1

    def encrypt(self, keys: ClientKeys, x: np.ndarray,
                plan: dict[str, Any]) -> tuple[list[bytes], np.ndarray]:
        gather = np.asarray(plan["input_gather"], dtype=np.int64)
        width = int(plan["input_period"])
        shifts = [int(s) for s in plan.get("input_shifts", [0])]
        padded = np.concatenate([x, np.zeros((len(x), 1))], axis=1)
        period = np.zeros(width)
        blobs = []
        for row in padded:
            period[: len(gather)] = row[gather]
            for shift in shifts:  # slot i of copy ``shift`` holds slot i + shift of the input
                tiled = np.tile(np.roll(period, -shift), keys.seal.slots // width)
                blobs.append(to_bytes(keys.encrypt(tiled)))
        return blobs, np.ones(len(x), dtype=np.int64)

    def decrypt(self, keys: ClientKeys, cts: list[Any], counts: list[int],
                plan: dict[str, Any]) -> np.ndarray:
        positions = np.asarray(plan["output_positions"], dtype=np.int64)
        return np.stack([keys.decrypt(ct)[positions] for ct in cts])

    def group(self, cts: list[Any], counts: list[int], plan: dict[str, Any]) -> Value:
        k = len(plan.get("input_shifts", [0]))
        if k == 1:
            return Value("single", cts, counts)
        return Value("single", [tuple(cts[i * k: (i + 1) * k]) for i in range(len(counts))],
                     counts)


class BatchPacking(Packing):
    """CryptoNets-style: input ``j`` of a group in slot ``j`` of one ciphertext per feature."""

    name = "batch"

    def fits(self, program: _program.Program, degree: int) -> bool:
        return True

    def layouts(self, program: _program.Program, params: _params.Params) -> dict[str, Any]:
        return {"layout": "batch", "layouts": [], "rotation_steps": [], "fixed_rotation_steps": [],
                "rotations_per_input": 0, "units_skipped": 0,
                "input_layout": "batch: one ciphertext per input feature, one input per slot"}

    def batch_size(self, plan: dict[str, Any]) -> int:
        return int(plan["slots"])

    def per_group(self, plan: dict[str, Any], what: str) -> tuple[int, int]:
        shape = plan["input_shape"] if what == "input" else plan["output_shape"]
        return int(np.prod(shape)), int(plan["slots"])

    def encrypt(self, keys: ClientKeys, x: np.ndarray,
                plan: dict[str, Any]) -> tuple[list[bytes], np.ndarray]:
        slots = keys.seal.slots
        blobs, counts = [], []
        for start in range(0, len(x), slots):
            group = x[start: start + slots]
            counts.append(len(group))
            blobs.extend(to_bytes(keys.encrypt(col)) for col in group.T)
        return blobs, np.asarray(counts, dtype=np.int64)

    def decrypt(self, keys: ClientKeys, cts: list[Any], counts: list[int],
                plan: dict[str, Any]) -> np.ndarray:
        width = int(np.prod(plan["output_shape"]))
        rows = []
        for g, n in enumerate(counts):
            feats = [keys.decrypt(ct)[:n] for ct in cts[g * width: (g + 1) * width]]
            rows.append(np.stack(feats, axis=1))
        return np.concatenate(rows)

    def group(self, cts: list[Any], counts: list[int], plan: dict[str, Any]) -> Value:
        per = int(np.prod(plan["input_shape"]))
        return Value("batch", [cts[g * per: (g + 1) * per] for g in range(len(counts))],
                     counts)


PACKINGS: dict[str, type[Packing]] = {"single": SinglePacking, "batch": BatchPacking}


class CKKSScheme(Scheme):
    """CKKS with automatic parameters, two packings and exact scale management."""

    name = "ckks"
    backend = "tenseal"
    extra = "ckks"
    security_basis = (f"{_params.HE_STANDARD}: the planner keeps log q within the row of the "
                      "ring degree N it picks")
    description = "CKKS approximate HE on SEAL (tenseal.sealapi); encrypted output"
    capabilities = Capabilities(layers=_KINDS, output="encrypted", exact=False,
                                tolerance=TOLERANCE, batch=True)
    pruning_unit = "diagonals"
    options = (
        Option("packing", str, "auto", "single (latency), batch (throughput) or auto",
               choices=("auto", "single", "batch")),
        Option("poly_modulus_degree", int, None, "ring degree N (default: planned)",
               choices=tuple(_params.DEGREES)),
        Option("scale_bits", int, None, "log2 of the CKKS scale (default: planned)"),
        Option("coeff_mod_bits", str, None,
               "prime sizes q0,q1,...,special, e.g. 40,26,26,40 (default: planned)"),
        Option("input_shifts", int, _grid.MAX_SHIFTS,
               "most input ciphertexts per image: the client sends its input rotated by the "
               "first layer's baby steps so the server skips them (1: one ciphertext)"),
        Option("workers", int, 1,
               "server processes per image: each costly convolution or dense stage splits its "
               "giant steps over them (single packing with grid layouts; 1: one process)"),
        Option("lazy_rescale", str, "auto",
               "auto: a square leaves its rescale to the affine stage after it (one prime of "
               "twice the scale per pair, so fewer primes and cheaper rotations) when that "
               "keeps the ring degree; off: a rescale after every product",
               choices=("auto", "off")),
        Option("threads", int, 1,
               "threads of the native part per evaluation: hoisted rotations, digit splits "
               "and sums of products side by side (SEAL's own calls stay on one); 1: none"),
        Option("hoist", bool, True,
               "single packing with grid layouts: group each stage's baby rotations by "
               "parent over the same Galois keys, the server splitting each parent once "
               "(hoisted rotations, about 0.6 of a rotation each), and plan with them priced "
               "so; false: babies chained, every rotation at full price"),
        Option("block_layouts", bool, True,
               "single packing may use block layouts for dense layers (false: hybrid "
               "diagonals only, whose diagonals secureinfer.nn.prune can zero one by one)"),
        Option("flood_bits", int, None,
               f"statistical security of the output flooding (bits); default: "
               f"{_flood.DEFAULT_FLOOD_BITS} when compiled for deployment, 0 (off) in one "
               "process, where the client holds the model"),
    )
    layer_types: ClassVar[dict[str, type[SecureLayer]]] = {kind: CKKSLayer for kind in _KINDS}

    def __init__(self, options: dict[str, Any] | None = None, **kw: Any) -> None:
        super().__init__(options, **kw)
        scale = self.opts["scale_bits"]
        if scale is not None and not 10 <= scale <= _params.MAX_PRIME_BITS - 1:
            raise ConfigError(f"scheme 'ckks': scale_bits={scale} must be between 10 and "
                              f"{_params.MAX_PRIME_BITS - 1}")
        if self.opts["coeff_mod_bits"] is not None:
            _params.parse_bits(self.opts["coeff_mod_bits"])
        if not 1 <= self.opts["workers"] <= _grid.MAX_WORKERS:
            raise ConfigError(f"scheme 'ckks': workers={self.opts['workers']} must be between 1 "
                              f"and {_grid.MAX_WORKERS} processes")
        if not 1 <= self.opts["threads"] <= 64:
            raise ConfigError(f"scheme 'ckks': threads={self.opts['threads']} must be between 1 "
                              "and 64")
        if self.opts["threads"] > 1 and self.opts["workers"] > 1:
            raise ConfigError(f"scheme 'ckks': threads={self.opts['threads']} and "
                              f"workers={self.opts['workers']} cannot be combined (a forked "
                              "helper has none of the server's threads); use threads for one "
                              "image on several cores")
        if not 1 <= self.opts["input_shifts"] <= 256:
            raise ConfigError(f"scheme 'ckks': input_shifts={self.opts['input_shifts']} must "
                              "be between 1 (the input alone) and 256 ciphertexts per image")
        if self.opts["flood_bits"] is not None and not 0 <= self.opts["flood_bits"] <= 64:
            raise ConfigError(f"scheme 'ckks': flood_bits={self.opts['flood_bits']} must be "
                              "between 0 (no flooding) and 64")
        self.program: _program.Program | None = None
        self.grid: _grid.GridPlan | None = None
        self.dense: _search.DenseLayouts | None = None
        self.params: _params.Params | None = None
        self.packing: Packing = SinglePacking(self.opts)
        self.plan_: dict[str, Any] = {}
        self._input_bound = 1.0

    # ----- description -------------------------------------------------------------

    @classmethod
    def availability(cls) -> str | None:
        return import_problem(sealapi)

    @classmethod
    def backend_version(cls) -> str | None:
        try:
            import tenseal
        except ImportError:
            return None
        return str(tenseal.__version__)

    @property
    def security_bits(self) -> int | None:
        if self.params is None:
            return super().security_bits
        return self.params.security_bits

    @property
    def security_source(self) -> str | None:
        if self.params is None:
            return super().security_source
        return _params.security_source(self.params.poly_modulus_degree,
                                       sum(self.params.coeff_mod_bits))

    def batch_size(self) -> int:
        if not self.plan_:
            return 1
        return self.packing.batch_size(self.plan_)

    # ----- compile time ------------------------------------------------------------

    def _flood_bits(self) -> tuple[int, str]:
        """``flood_bits`` resolved (an unset one from ``deploy``) and who chose it."""
        bits = self.opts["flood_bits"]
        if bits is not None:
            return int(bits), privacy.BY_OPTION
        by = privacy.auto(self.deploy)
        return (_flood.DEFAULT_FLOOD_BITS if by == privacy.BY_DEPLOY else 0), by

    def _choose_params(self, program: _program.Program, calibration: Calibration | None,
                       flood_bits: int) -> tuple[Packing, _params.Params]:
        """Packing and parameters; ``auto`` is ``single`` unless a value cannot fit."""
        opts = {**self.opts, "flood_bits": flood_bits}
        wanted = self.opts["packing"]
        names = ["single", "batch"] if wanted == "auto" else [wanted]
        for name in names:
            packing = PACKINGS[name](self.opts)
            try:
                return packing, _flood.choose_params(
                    program, calibration, opts,
                    lambda degree, p=packing: p.fits(program, degree),
                    self.allow_insecure, TOLERANCE)
            except CompileError:
                if name == names[-1]:
                    raise
        raise AssertionError("unreachable")

    def _choose_program(self, program: _program.Program, calibration: Calibration | None,
                        flood_bits: int
                        ) -> tuple[_program.Program, Packing, _params.Params]:
        """``program`` with lazy squares when ``lazy_rescale=auto`` and its chain keeps the
        packing and ring degree of the eager one (same layouts, one prime fewer per lazy
        square: every rotation and product is cheaper), else ``program`` as it is."""
        packing, params = self._choose_params(program, calibration, flood_bits)
        lazy = program.with_lazy_squares()
        if lazy is None or self.opts["lazy_rescale"] == "off" or flood_bits \
                or self.opts["coeff_mod_bits"]:
            return program, packing, params
        try:
            lazy_packing, lazy_params = self._choose_params(lazy, calibration, flood_bits)
        except CompileError:
            return program, packing, params
        if lazy_packing.name == packing.name \
                and lazy_params.poly_modulus_degree <= params.poly_modulus_degree:
            return lazy, lazy_packing, lazy_params
        return program, packing, params

    def plan(self, prefix: Sequence[LayerSpec], calibration: Calibration | None) -> dict[str, Any]:
        program = _program.build_program(prefix)
        flood_bits, by = self._flood_bits()
        program, packing, params = self._choose_program(program, calibration, flood_bits)
        fields = packing.layouts(program, params)
        self.grid, self.dense = fields.pop("_grid", None), fields.pop("_dense", None)
        self.program, self.params, self.packing = program, params, packing
        self._input_bound = _params.input_limit(calibration)
        steps = fields["rotation_steps"]
        error = _params.estimate_error(program, calibration, params.poly_modulus_degree,
                                       params.scale_bits)
        self.plan_ = {
            **params.to_dict(),
            "scheme": "CKKS (SEAL via tenseal.sealapi)",
            "packing": packing.name,
            "input_shape": list(program.input_shape),
            "output_shape": list(program.output_shape),
            "depth_needed": program.depth,
            "output_drop": program.depth + (_flood.MASK_DEPTH if flood_bits else 0),
            "scale_bits_chosen_by": "option" if self.opts["scale_bits"] or
            self.opts["coeff_mod_bits"] else "planner",
            "stages": [{"stage": s.describe(), "depth": s.depth} for s in program.stages],
            "lazy_squares": program.lazy_squares,
            **fields,
            "galois_keys": len(steps),
            "galois_key_bytes": len(steps) * _key_bytes(params),
            "relin_keys": program.needs_relin,
            "calibrated": calibration is not None,
            "input_limit": self._input_bound,
            "output_bound": _params.output_bound(program, calibration),
            "estimated_max_error": _flood.flooded_error(error, flood_bits,
                                                        params.poly_modulus_degree),
            **_flood.plan_keys(error, flood_bits, params.poly_modulus_degree, by),
        }
        self.plan_["batch_size"] = packing.batch_size(self.plan_)
        self.plan_["input_ciphertexts_per_message"] = packing.per_group(self.plan_, "input")[0]
        return self.plan_

    def load_plan(self, plan: Mapping[str, Any]) -> None:
        """Restore the client from ``plan``; the security level is recomputed from ``N`` and
        the modulus bits (never read from the plan) and refused below 128 bits unless this
        scheme was built with ``allow_insecure``."""
        super().load_plan(plan)
        degree = int(plan["poly_modulus_degree"])
        bits = tuple(int(b) for b in plan["coeff_mod_bits"])
        level = _params.security_bits(degree, sum(bits))
        if level < 128 and not self.allow_insecure:
            raise CompileError(
                f"ckks: the plan asks for N={degree} with a {sum(bits)}-bit coefficient modulus "
                f"(limit {_params.MAX_BITS_128[degree]} bits at 128-bit security): about "
                f"{level}-bit security; refused (pass allow_insecure=True to accept it)")
        self.params = _params.Params(degree, bits, int(plan["scale_bits"]),
                                     int(plan["depth_available"]), level)
        self.packing = PACKINGS[str(plan["packing"])](self.opts)
        self._input_bound = float(plan["input_limit"])

    def check_input(self, x: np.ndarray) -> None:
        peak = float(np.max(np.abs(x), initial=0.0))
        if peak > self._input_bound:
            raise RangeError(
                f"ckks: input magnitude {peak:.4g} exceeds {self._input_bound:.4g}, the input "
                "range the parameters were planned for (the calibrated range with a margin, "
                "or 1 without calibration); compile with calibration data covering these "
                "inputs")

    def pruning_units(self) -> list[SlotUnits]:
        """The diagonal units of the compiled layouts (``self.grid`` or ``self.dense``;
        ``units.slot_units``); none under batch packing, where a weight is one plaintext
        product of its own."""
        if self.program is None or self.packing.name != "single":
            return []
        return _units.slot_units(self.program, self.grid, self.dense)

    # ----- client ------------------------------------------------------------------

    def _seal(self) -> Seal:
        assert self.params is not None, "plan() first"
        return Seal(self.params)

    def keygen(self) -> tuple[Any, bytes]:
        keys = ClientKeys(self._seal(), self.plan_["rotation_steps"], self.plan_["relin_keys"],
                          public=bool(self.plan_.get("public_key")))
        public = codec.pack_fields({
            "parms": keys.seal.parms_bytes,
            "public": to_bytes(keys.public_key) if keys.public_key is not None else b"",
            "relin": to_bytes(keys.relin) if keys.relin is not None else b"",
            "galois": to_bytes(keys.galois) if keys.galois is not None else b"",
            "steps": np.asarray(self.plan_["rotation_steps"], dtype=np.int64),
        })
        keys.galois = None  # the client never rotates: drop its copy of the Galois keys
        return keys, public

    def encrypt(self, keys: ClientKeys, x: np.ndarray) -> bytes:
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        blobs, counts = self.packing.encrypt(keys, x, self.plan_)
        return codec.pack_fields({"packing": self.packing.name, "counts": counts,
                                  "cts": blobs})

    def decrypt(self, keys: ClientKeys, output: bytes) -> np.ndarray:
        seal = keys.seal
        counts, blobs = self._parse(output, "output")
        level = seal.top - int(self.plan_.get("output_drop", self.plan_["depth_needed"]))
        cts = [seal.load_ciphertext(b, level, "server output") for b in blobs]
        flat = self.packing.decrypt(keys, cts, counts, self.plan_)
        return flat.reshape(-1, *self.plan_["output_shape"])

    # ----- messages ----------------------------------------------------------------

    def _parse(self, payload: bytes, what: str) -> tuple[list[int], list[bytes]]:
        fields = codec.unpack_fields(payload)
        packing, counts, blobs = fields.get("packing"), fields.get("counts"), fields.get("cts")
        name = self.packing.name
        if packing != name or not isinstance(blobs, list) \
                or not isinstance(counts, np.ndarray) or counts.ndim != 1 or not len(counts):
            raise EnvelopeError(f"ckks: malformed {what} message (expected {name} "
                                "packing with counts and ciphertexts)")
        counts = [int(c) for c in counts]
        per, limit = self.packing.per_group(self.plan_, what)
        if any(not 1 <= c <= limit for c in counts) or len(blobs) != per * len(counts):
            raise EnvelopeError(f"ckks: {what} message holds {len(blobs)} ciphertexts for "
                                f"groups {counts[:8]}; expected {per} per group of 1..{limit}")
        return counts, blobs

    # ----- server ------------------------------------------------------------------

    def open_server(self, public: bytes, functional: bytes) -> ServerContext:
        seal = self._seal()
        fields = codec.unpack_fields(public)
        if fields.get("parms") != seal.parms_bytes:
            raise EnvelopeError("ckks: the public context (encryption parameters) differs from "
                                "this server's plan: compile the same model and config")
        steps = list(self.plan_["rotation_steps"])
        got = fields.get("steps")
        if not isinstance(got, np.ndarray) or got.tolist() != steps:
            raise EnvelopeError("ckks: the public keys were made for other rotation steps")
        relin = galois = None
        if self.plan_["relin_keys"]:
            relin = seal.load_keys("RelinKeys", fields.get("relin", b""), "relinearization key", 1)
        if steps:
            galois = seal.load_keys("GaloisKeys", fields.get("galois", b""), "Galois keys",
                                    len(steps))
            missing = [s for s in steps
                       if not galois.has_key(galois_element(s, self.params.poly_modulus_degree))]
            if missing:
                raise EnvelopeError(f"ckks: Galois keys lack rotation steps {missing[:8]}")
        workers = int(self.plan_.get("workers", 1))
        return ServerContext(seal, relin, galois, self.program,
                             schedule(self.program, seal.primes, self.params.scale_bits),
                             self.packing.name, self.grid, self.dense,
                             _flood.open_flooder(seal, self.plan_, fields),
                             StagePool(seal, workers) if workers > 1 else None,
                             self._native(seal, galois, steps))

    def _native(self, seal: Any, galois: Any, steps: list[int]) -> Any:
        """The native part (hoisted rotations, fused products) for single packing, or
        ``None``: not built here, its self-test failed, or ``SECUREINFER_CKKS_NATIVE=0``
        (``secureinfer doctor`` says which); the server then runs on SEAL's calls alone."""
        if self.packing.name != "single" or not _native.available():
            return None
        try:
            return _native.Native(seal, galois, steps, int(self.opts["threads"]))
        except (RuntimeError, KeyError) as exc:
            _log.warning("ckks: native rotations off (%s)", exc)
            return None

    def load_input(self, ctx: ServerContext, payload: bytes) -> Value:
        counts, blobs = self._parse(payload, "input")
        cts = [ctx.seal.load_ciphertext(b, ctx.seal.top, "client input") for b in blobs]
        expected = 2.0 ** self.params.scale_bits
        if any(abs(ct.scale / expected - 1) > 1e-9 for ct in cts):
            raise EnvelopeError("ckks: input ciphertexts are not at the planned scale")
        return self.packing.group(cts, counts, self.plan_)

    def input_count(self, value: Value) -> int:
        return int(sum(value.counts))

    def dump_output(self, ctx: ServerContext, value: Value) -> bytes:
        flat = value.cts if value.packing == "single" else [ct for g in value.cts for ct in g]
        if ctx.flood is not None:
            ctx.flood.apply_all(value, flat,
                                np.asarray(self.plan_.get("output_positions", []), dtype=np.int64),
                                int(np.prod(self.plan_["output_shape"])))
        return codec.pack_fields({"packing": value.packing,
                                  "counts": np.asarray(value.counts, dtype=np.int64),
                                  "cts": [to_bytes(ct) for ct in flat]})


#: Evaluation keys held at once when client and server share a process, in units of their
#: raw size: the client's SEAL objects (their memory stays in SEAL's pool after the client
#: drops them), the serialized message and the server's parsed copy of it (compressed, about
#: 0.8 each), SEAL's decompression buffer and the server's objects. Measured: 4.3 on
#: TenSEAL's CNN (N=8192, 13 keys); 5 leaves a margin.
KEY_COPIES_ONE_PROCESS = 5


def _key_bytes(params: _params.Params) -> int:
    """Bytes of one Galois (or relinearization) key, uncompressed: ``k - 1`` key-switching
    components of two polynomials over all ``k`` primes (special prime included)."""
    k = len(params.coeff_mod_bits)
    return (k - 1) * 2 * params.poly_modulus_degree * k * 8


def _grid_fields(grid: _grid.GridPlan, program: _program.Program,
                 params: _params.Params) -> dict[str, Any]:
    """The plan's grid-layout fields: what the client needs, and what the server costs."""
    n, top = params.poly_modulus_degree, len(params.coeff_mod_bits) - 2
    level, plain_bytes, ct_peak, per_stage = top, 0, 0, []
    for stage, rp in zip(program.stages, grid.stages):
        if rp is not None:
            plain_bytes += (rp.products() + 1) * n * (level + 1) * 8
            ct_peak = max(ct_peak, (len(rp.babies()) + 4) * 2 * n * (level + 1) * 8)
            per_stage.append({"stage": stage.describe(), "level": level, **rp.describe()})
        level -= stage.depth
    keys = (len(grid.steps(params.slots)) + int(program.needs_relin)) * _key_bytes(params)
    # the client's message and the server's loaded copies, at the top level
    inputs = 2 * len(grid.shifts) * 2 * n * (top + 1) * 8
    return {
        "input_gather": grid.gather.tolist(),
        "input_shifts": list(grid.shifts),
        "input_period": grid.period,
        "output_positions": grid.output_positions.tolist(),
        "output_period": grid.output_period,
        "output_level": top - program.depth,
        "grid_stages": per_stage,
        "plaintext_products": grid.products(),
        "estimated_memory": {
            "plaintexts": plain_bytes, "evaluation_keys": keys,
            "ciphertexts": ct_peak + inputs,
            "peak_one_process": plain_bytes + KEY_COPIES_ONE_PROCESS * keys + ct_peak + inputs,
        },
    }
