"""The ``ckks`` scheme: the whole network on CKKS ciphertexts (SEAL via ``tenseal.sealapi``).

Encrypted output: the client encrypts with its secret key (symmetric CKKS); the server
receives the public context (SEAL's encryption parameters, checked against its own plan),
the relinearization key and the Galois keys of exactly the rotations the compiled model
uses, never a public or secret key; the client decrypts. Every message is bytes: SEAL
objects serialized with SEAL's own compression, inside ``pack_fields`` payloads.

Config keys (``ckks?packing=batch&scale_bits=30``):

* ``packing``: ``single`` (one input per ciphertext; hybrid diagonal matrix products with
  baby-step giant-step, lowest latency), ``batch`` (CryptoNets-style, input ``j`` of a
  group in slot ``j`` of one ciphertext per feature; no rotations, highest throughput) or
  ``auto`` (``single`` when every value fits one ciphertext, else ``batch``).
* ``poly_modulus_degree``, ``scale_bits``, ``coeff_mod_bits`` (``"q0,q1,...,special"``):
  override the planner (see ``secureinfer.plugins.ckks.params``).
* ``flood_bits`` (default 16): the server noise-floods every output so that a decryption
  is within statistical distance ``2^-flood_bits`` of one that shows the result only
  (``secureinfer.plugins.ckks.flood``); the server then also receives the public key.
  ``flood_bits=0``: no flooding, for a client that holds the model anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from secureinfer import codec
from secureinfer.errors import CompileError, ConfigError, EnvelopeError, RangeError
from secureinfer.hookspecs import hookimpl
from secureinfer.layers import LayerSpec
from secureinfer.scheme import (
    Calibration,
    Capabilities,
    Option,
    Scheme,
    SecureLayer,
    import_problem,
)

from . import flood as _flood
from . import params as _params
from . import program as _program
from .backend import ClientKeys, Seal, galois_element, sealapi, to_bytes
from .layers import CKKSLayer, ServerContext, Value, schedule

__all__ = ["CKKSScheme"]

_KINDS = frozenset({"linear", "conv2d", "avgpool2d", "flatten", "poly"})
TOLERANCE = 1e-2


@dataclass(frozen=True)
class _ClientLayout:
    """What the client reads from the plan (no weights): shapes, the single-packing input
    period and gather map, the output slot positions and the output level."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    period: int
    gather: np.ndarray
    positions: np.ndarray
    depth: int

    @classmethod
    def from_plan(cls, plan: Mapping[str, Any]) -> "_ClientLayout":
        return cls(tuple(plan["input_shape"]), tuple(plan["output_shape"]),
                   int(plan["input_period"]), np.asarray(plan["input_gather"], dtype=np.int64),
                   np.asarray(plan["output_positions"], dtype=np.int64),
                   int(plan.get("output_drop", plan["depth_needed"])))


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
    options = (
        Option("packing", str, "auto", "single (latency), batch (throughput) or auto",
               choices=("auto", "single", "batch")),
        Option("poly_modulus_degree", int, None, "ring degree N (default: planned)",
               choices=tuple(_params.DEGREES)),
        Option("scale_bits", int, None, "log2 of the CKKS scale (default: planned)"),
        Option("coeff_mod_bits", str, None,
               "prime sizes q0,q1,...,special, e.g. 40,26,26,40 (default: planned)"),
        Option("flood_bits", int, _flood.DEFAULT_FLOOD_BITS,
               "statistical security of the output flooding; 0: off (client holds the model)"),
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
        if not 0 <= self.opts["flood_bits"] <= 64:
            raise ConfigError(f"scheme 'ckks': flood_bits={self.opts['flood_bits']} must be "
                              "between 0 (no flooding) and 64")
        self.program: _program.Program | None = None
        self.params: _params.Params | None = None
        self.packing = "single"
        self._input_bound = 1.0
        self._client: _ClientLayout | None = None

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

    def batch_size(self) -> int:
        if self.packing == "batch" and self.params is not None:
            return self.params.slots
        return 1

    # ----- compile time ------------------------------------------------------------

    @staticmethod
    def _fits(program: _program.Program, packing: str) -> Callable[[int], bool]:
        def fits(degree: int) -> bool:
            if packing == "batch":
                return True
            return _program.layout_single(program, degree // 2, search=False) is not None
        return fits

    def _choose_params(self, program: _program.Program,
                       calibration: Calibration | None) -> tuple[str, _params.Params]:
        """Packing and parameters; ``auto`` is ``single`` unless a value cannot fit."""
        wanted = self.opts["packing"]
        packings = ["single", "batch"] if wanted == "auto" else [wanted]
        for packing in packings:
            try:
                return packing, _flood.choose_params(program, calibration, self.opts,
                                                     self._fits(program, packing),
                                                     self.allow_insecure, TOLERANCE)
            except CompileError:
                if packing == packings[-1]:
                    raise
        raise AssertionError("unreachable")

    def plan(self, prefix: Sequence[LayerSpec], calibration: Calibration | None) -> dict[str, Any]:
        program = _program.build_program(prefix)
        packing, params = self._choose_params(program, calibration)
        notes: list[str] = []
        if packing == "single":
            notes = _program.layout_single(program, params.slots) or []
        self.program, self.params, self.packing = program, params, packing
        self._input_bound = _params.input_limit(calibration)
        steps = _program.rotation_steps(program, params.slots) if packing == "single" else []
        error = _params.estimate_error(program, calibration, params.poly_modulus_degree,
                                       params.scale_bits)
        self.plan_ = {
            **params.to_dict(),
            "scheme": "CKKS (SEAL via tenseal.sealapi)",
            "packing": packing,
            "batch_size": self.batch_size(),
            "depth_needed": program.depth,
            "output_drop": program.depth + (_flood.MASK_DEPTH if self.opts["flood_bits"] else 0),
            "scale_bits_chosen_by": "option" if self.opts["scale_bits"] or
            self.opts["coeff_mod_bits"] else "planner",
            "stages": [{"stage": s.describe(), "depth": s.depth} for s in program.stages],
            "layouts": notes,
            "rotation_steps": steps,
            "galois_keys": len(steps),
            "relin_keys": program.needs_relin,
            "rotations_per_input": sum(s.single.rotations() for s in program.stages
                                       if isinstance(s, _program.Affine) and s.single)
            if packing == "single" else 0,
            "input_layout": self._input_layout_name(),
            "calibrated": calibration is not None,
            "input_limit": self._input_bound,
            "output_bound": _params.output_bound(program, calibration),
            "estimated_max_error": _flood.flooded_error(error, self.opts["flood_bits"],
                                                        params.poly_modulus_degree),
            **_flood.plan_keys(error, self.opts["flood_bits"], params.poly_modulus_degree),
            "input_ciphertexts_per_message": (1 if packing == "single" else
                                              int(np.prod(program.input_shape))),
            **self._client_layout(),
        }
        return self.plan_

    def _client_layout(self) -> dict[str, Any]:
        """The plan keys the client works from (``load_plan``)."""
        program = self.program
        period, gather, positions = 0, [], []
        if self.packing == "single":
            layout, gather_map = _program.input_layout(program)
            period, gather = layout.period, [int(i) for i in gather_map]
            positions = [int(i) for i in _program.output_layout(program).positions]
        return {"input_shape": list(program.input_shape),
                "output_shape": list(program.output_shape), "input_period": int(period),
                "input_gather": gather, "output_positions": positions}

    def load_plan(self, plan: Mapping[str, Any]) -> None:
        super().load_plan(plan)
        self.params = _params.Params(int(plan["poly_modulus_degree"]),
                                     tuple(int(b) for b in plan["coeff_mod_bits"]),
                                     int(plan["scale_bits"]), int(plan["depth_available"]),
                                     int(plan["security_bits"]))
        self.packing = str(plan["packing"])
        self._input_bound = float(plan["input_limit"])
        self._client = _ClientLayout.from_plan(plan)

    def _input_layout_name(self) -> str:
        if self.packing == "batch":
            return "batch: one ciphertext per input feature, one input per slot"
        layout, _ = _program.input_layout(self.program)
        first = self.program.stages[0]
        kind = first.single.name if isinstance(first, _program.Affine) and first.single \
            else "plain"
        return f"single: {kind}, period {layout.period}, replicated to fill the slots"

    def check_input(self, x: np.ndarray) -> None:
        peak = float(np.max(np.abs(x), initial=0.0))
        if peak > self._input_bound:
            raise RangeError(
                f"ckks: input magnitude {peak:.4g} exceeds {self._input_bound:.4g}, the input "
                "range the parameters were planned for (the calibrated range with a margin, "
                "or 1 without calibration); compile with calibration data covering these "
                "inputs")

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
        return keys, public

    def encrypt(self, keys: ClientKeys, x: np.ndarray) -> bytes:
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        client = self._client
        if self.packing == "single":
            gather = client.gather
            padded = np.concatenate([x, np.zeros((len(x), 1))], axis=1)
            period = np.zeros(client.period)
            blobs = []
            for row in padded:
                period[: len(gather)] = row[gather]
                blobs.append(to_bytes(keys.encrypt(np.tile(period, keys.seal.slots // client.period))))
            counts = np.ones(len(x), dtype=np.int64)
        else:
            slots = keys.seal.slots
            blobs, counts = [], []
            for start in range(0, len(x), slots):
                group = x[start: start + slots]
                counts.append(len(group))
                blobs.extend(to_bytes(keys.encrypt(col)) for col in group.T)
            counts = np.asarray(counts, dtype=np.int64)
        return codec.pack_fields({"packing": self.packing, "counts": counts, "cts": blobs})

    def decrypt(self, keys: ClientKeys, output: bytes) -> np.ndarray:
        seal = keys.seal
        counts, blobs = self._parse(output, "output")
        level = seal.top - self._client.depth
        out_shape = self._client.output_shape
        cts = [seal.load_ciphertext(b, level, "server output") for b in blobs]
        if self.packing == "single":
            positions = self._client.positions
            return np.stack([keys.decrypt(ct)[positions] for ct in cts]).reshape(-1, *out_shape)
        width = int(np.prod(out_shape))
        rows = []
        for g, n in enumerate(counts):
            feats = [keys.decrypt(ct)[:n] for ct in cts[g * width: (g + 1) * width]]
            rows.append(np.stack(feats, axis=1))
        return np.concatenate(rows).reshape(-1, *out_shape)

    # ----- messages ----------------------------------------------------------------

    def _parse(self, payload: bytes, what: str) -> tuple[list[int], list[bytes]]:
        fields = codec.unpack_fields(payload)
        packing, counts, blobs = fields.get("packing"), fields.get("counts"), fields.get("cts")
        if packing != self.packing or not isinstance(blobs, list) \
                or not isinstance(counts, np.ndarray) or counts.ndim != 1 or not len(counts):
            raise EnvelopeError(f"ckks: malformed {what} message (expected {self.packing} "
                                "packing with counts and ciphertexts)")
        counts = [int(c) for c in counts]
        if self.packing == "single":
            per, limit = 1, 1
        else:
            shape = self._client.input_shape if what == "input" else self._client.output_shape
            per, limit = int(np.prod(shape)), self.params.slots
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
        return ServerContext(seal, relin, galois, self.program,
                             schedule(self.program, seal.primes, self.params.scale_bits),
                             self.packing, _flood.open_flooder(seal, self.plan_, fields))

    def load_input(self, ctx: ServerContext, payload: bytes) -> Value:
        counts, blobs = self._parse(payload, "input")
        cts = [ctx.seal.load_ciphertext(b, ctx.seal.top, "client input") for b in blobs]
        expected = 2.0 ** self.params.scale_bits
        if any(abs(ct.scale / expected - 1) > 1e-9 for ct in cts):
            raise EnvelopeError("ckks: input ciphertexts are not at the planned scale")
        if self.packing == "single":
            return Value("single", cts, counts)
        per = int(np.prod(self.program.input_shape))
        return Value("batch", [cts[g * per: (g + 1) * per] for g in range(len(counts))], counts)

    def dump_output(self, ctx: ServerContext, value: Value) -> bytes:
        flat = value.cts if value.packing == "single" else [ct for g in value.cts for ct in g]
        if ctx.flood is not None:
            ctx.flood.apply_all(value, flat, self._client.positions,
                                int(np.prod(self._client.output_shape)))
        return codec.pack_fields({"packing": value.packing,
                                  "counts": np.asarray(value.counts, dtype=np.int64),
                                  "cts": [to_bytes(ct) for ct in flat]})


@hookimpl
def secureinfer_register_schemes(register: Any) -> None:
    """Register ``ckks``."""
    register(CKKSScheme)
