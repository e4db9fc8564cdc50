"""The ``bfv`` scheme: the quantized network on exact encrypted integers (Pyfhel / SEAL).

The client quantizes its input (``secureinfer.quant``), encrypts it under one BFV context
per plaintext prime, the server runs the integer network on every context with public and
evaluation keys only, and the client decrypts, checks every ciphertext's noise budget,
recombines the residues with the CRT, checks the result against the worst-case bound and
dequantizes. The result equals the quantized network run in the clear
(``clear?bits=N``, ``Scheme.reference``) integer for integer, or the client raises.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from secureinfer import codec, privacy
from secureinfer.errors import (CompileError, ConfigError, EnvelopeError, EvaluationError,
                                RangeError)
from secureinfer.layers import LayerSpec
from secureinfer.quant import QuantizedNetwork, quantize
from secureinfer.scheme import Calibration, Capabilities, Option, Scheme, import_problem
from secureinfer.units import SlotUnits

from .backend import (HE_STANDARD, MAX_COEFF_BITS, RAW, PrimeContext, backend, load_ciphertexts,
                      new_contexts)
from .layers import BfvLayer, RemoteValue, ServerContext, Value
from .planner import DEGREES, BfvClientPlan, BfvPlan, make_plan
from .primes import MAX_PLAIN_BITS, crt_combine
from .program import Step
from .rerandomize import DEFAULT_FLOOD_BITS, Rerandomizer
from .units import slot_units
from .workers import WorkerPool

__all__ = ["BfvScheme", "ClientKeys"]

_KINDS = frozenset({"linear", "conv2d", "avgpool2d", "flatten", "poly"})


class ClientKeys:
    """The client's live keys: one BFV context with its secret key per plaintext prime."""

    def __init__(self, primes: list[PrimeContext]) -> None:
        self.primes = primes


class BfvScheme(Scheme):
    """BFV with exact integer arithmetic, CRT over plaintext primes, two packings.

    Options (``bfv?bits=6&packing=batch``):

    * ``bits``: quantization width of inputs and weights (the ``clear?bits=N`` reference).
    * ``packing``: ``single`` (one input per ciphertext row, two per ciphertext; linear
      layers by rotated diagonals; lowest latency), ``batch`` (CryptoNets: input ``j`` in
      slot ``j`` of one ciphertext per feature; no rotations; ``N`` inputs per message) or
      ``auto`` (``single`` when the network fits a row, else ``batch``).
    * ``poly_modulus_degree``, ``plain_modulus_bits``, ``max_primes``: planner overrides
      (``secureinfer.plugins.bfv.planner``); ``max_primes=1`` disables the CRT.
    * ``workers``: the server runs the CRT contexts in that many processes (``workers.py``):
      the contexts never exchange data, so latency falls with the cores given; the
      evaluation keys are loaded once per process.
    * ``rerandomize``, ``flood_bits``: output privacy (``rerandomize.py``): a fresh
      encryption of zero, uniform values in the slots beside the result, and a noise flood
      at statistical distance ``2^-flood_bits`` (against the planner's noise estimate).
      Unset (auto, ``secureinfer.privacy``): on with ``flood_bits=40`` when compiled for
      deployment, off in one process, where the client holds the model.
    """

    name = "bfv"
    backend = "pyfhel"
    extra = "bfv"
    security_basis = (f"{HE_STANDARD}: the planner keeps log q within the row of the ring "
                      "degree N it picks")
    description = "BFV exact integer HE on SEAL (Pyfhel), CRT over plaintext primes; encrypted output"
    capabilities = Capabilities(layers=_KINDS, output="encrypted", exact=True, batch=True)
    pruning_unit = "diagonals"
    options = (
        Option("bits", int, 8, "quantization width of inputs and weights (2..16)"),
        Option("packing", str, "auto", "single (latency), batch (throughput) or auto",
               choices=("auto", "single", "batch")),
        Option("poly_modulus_degree", int, None, "ring degree N (default: the smallest that "
               "holds the network)", choices=DEGREES),
        Option("plain_modulus_bits", int, None, "bits of each plaintext prime (default: the "
               "smallest that hold the output in the cheapest number of primes)"),
        Option("max_primes", int, 8, "most CRT plaintext primes (BFV contexts); 1: no CRT"),
        Option("workers", int, 1, "server processes running the CRT contexts in parallel "
               "(at most one per prime); 1: in the server's process"),
        Option("rerandomize", bool, None, "re-randomize, slot-mask and flood every output "
               "(rerandomize.py); default: true when compiled for deployment, false in one "
               "process, where the client holds the model"),
        Option("flood_bits", int, None, "statistical security of the output noise flood "
               f"(bits; default {DEFAULT_FLOOD_BITS} when outputs are re-randomized); 0: "
               "re-randomize without flooding"),
    )
    layer_types = {kind: BfvLayer for kind in _KINDS}

    def __init__(self, options: dict[str, Any] | None = None, **kw: Any) -> None:
        super().__init__(options, **kw)
        bits = self.opts["flood_bits"]
        if bits is not None and not 0 <= bits <= 128:
            raise ConfigError(f"scheme 'bfv': flood_bits={bits} must be between 0 (no flood) "
                              "and 128")
        if self.opts["rerandomize"] is False and bits:
            raise ConfigError(f"scheme 'bfv': flood_bits={bits} needs rerandomize=true (the "
                              "flood hides the noise, the fresh zero and the slot masks the "
                              "rest); drop flood_bits or set rerandomize=true")
        self._plan: BfvPlan | None = None
        self._client: BfvClientPlan | None = None
        self._index: dict[int, int] = {}
        self._levels: list[int] = []

    # ----- description -------------------------------------------------------------

    @classmethod
    def availability(cls) -> str | None:
        return import_problem(backend)

    @classmethod
    def backend_version(cls) -> str | None:
        try:
            return str(backend().__version__)
        except ImportError:
            return None

    def batch_size(self) -> int:
        """``single``: 2 (one input per ciphertext row); ``batch``: ``N`` (one per slot)."""
        plan = self._client_plan()
        return 2 if plan.packing == "single" else plan.poly_degree

    # ----- compile time ------------------------------------------------------------

    def plan(self, prefix: Sequence[LayerSpec], calibration: Calibration | None) -> dict[str, Any]:
        if calibration is None:
            raise CompileError("bfv quantizes the network and needs calibration data (the "
                               "input range): pass calibration= to compile()")
        qnet = quantize(prefix, calibration.input_range, self.opts["bits"])
        max_primes = self.opts["max_primes"]
        if max_primes < 1:
            raise CompileError(f"bfv: max_primes={max_primes} must be at least 1")
        if self.opts["workers"] < 1:
            raise CompileError(f"bfv: workers={self.opts['workers']} must be at least 1")
        plain_bits = self.opts["plain_modulus_bits"]
        if plain_bits is not None and not 2 <= plain_bits <= MAX_PLAIN_BITS:
            raise CompileError(f"bfv: plain_modulus_bits={plain_bits} is outside 2.."
                               f"{MAX_PLAIN_BITS} (SEAL's plaintext primes have at most "
                               f"{MAX_PLAIN_BITS} bits); leave it unset to let the planner "
                               "choose")
        rerandomize, flood_bits, by = self._privacy()
        self._plan = make_plan(qnet, self.opts["packing"], self.opts["poly_modulus_degree"],
                               self.opts["plain_modulus_bits"], max_primes, rerandomize,
                               flood_bits)
        self._index = {id(spec): i for i, spec in enumerate(prefix)}
        self._levels = np.cumsum([0] + [s.drop for s in self._plan.steps]).tolist()
        self.plan_ = {"bits": self.opts["bits"], **self._plan.to_dict(),
                      **_privacy_plan(self._plan, by)}
        return self.plan_

    def pruning_units(self) -> list[SlotUnits]:
        """The diagonals of the compiled ``single`` plan's weighted layers
        (``units.slot_units``): the units it skips when all zero (plan ``units_skipped``);
        none under ``batch`` packing, where each weight is a constant product of its own."""
        return slot_units(self._plan) if self._plan is not None else []

    def _privacy(self) -> tuple[bool, int, str]:
        """``(rerandomize, flood_bits, who chose)``; unset options resolve from ``deploy``."""
        rerandomize, bits = self.opts["rerandomize"], self.opts["flood_bits"]
        if rerandomize is None and bits is None:
            by = privacy.auto(self.deploy)
            on = by == privacy.BY_DEPLOY
            return on, DEFAULT_FLOOD_BITS if on else 0, by
        if rerandomize is False:
            return False, 0, privacy.BY_OPTION
        return True, DEFAULT_FLOOD_BITS if bits is None else int(bits), privacy.BY_OPTION

    def load_plan(self, plan: Mapping[str, Any]) -> None:
        """Restore the client from ``plan``; the ring degree and coefficient modulus must be
        within the 128-bit row of the HE standard (recomputed, never read from the plan),
        unless this scheme was built with ``allow_insecure``."""
        super().load_plan(plan)
        client = BfvClientPlan.from_dict(dict(plan))
        total, limit = sum(client.coeff_bits), MAX_COEFF_BITS.get(client.poly_degree)
        if (limit is None or total > limit) and not self.allow_insecure:
            raise CompileError(
                f"bfv: the plan asks for N={client.poly_degree} with a {total}-bit coefficient "
                f"modulus; 128-bit security allows at most {limit} bits for that degree "
                f"({HE_STANDARD}); refused (pass allow_insecure=True to accept it)")
        self._client = client

    @property
    def security_bits(self) -> int | None:
        """128 within the standard's row; below it ``128 * limit / log q`` (an
        extrapolation, reachable only with ``allow_insecure``)."""
        if self._client is None:
            return super().security_bits
        total = sum(self._client.coeff_bits)
        limit = MAX_COEFF_BITS.get(self._client.poly_degree, 0)
        return 128 if total <= limit else int(128 * limit / total)

    def _client_plan(self) -> BfvClientPlan:
        if self._client is None:
            raise CompileError("bfv: compile the model first (Scheme.plan was not called)")
        return self._client

    def _planned(self) -> BfvPlan:
        if self._plan is None:
            raise CompileError("bfv: compile the model first (Scheme.plan was not called)")
        return self._plan

    @property
    def qnet(self) -> QuantizedNetwork:
        """The integer reference of the planned prefix."""
        return self._planned().qnet

    def step_of(self, spec: LayerSpec) -> Step:
        """The planned step of ``spec``."""
        return self._planned().steps[self._index[id(spec)]]

    def index_of(self, spec: LayerSpec) -> int:
        """Position of ``spec``'s step in the plan."""
        return self._index[id(spec)]

    def level_before(self, spec: LayerSpec) -> int:
        """Coefficient primes already dropped when ``spec`` runs."""
        return int(self._levels[self._index[id(spec)]])

    def reference(self, prefix: Sequence[LayerSpec], x: np.ndarray) -> np.ndarray:
        return self.qnet.forward(x)

    def check_input(self, x: np.ndarray) -> None:
        self._client_plan().edges.quantize_input(x)

    # ----- client --------------------------------------------------------------------

    def keygen(self) -> tuple[Any, bytes]:
        plan = self._client_plan()
        primes = new_contexts(plan.poly_degree, plan.plain_moduli, plan.coeff_bits)
        public, relin, rotate = [], [], []
        for p in primes:
            p.he.keyGen()
            public.append(p.he.to_bytes_public_key(RAW))
            if plan.relinearize:
                p.he.relinKeyGen()
                relin.append(p.he.to_bytes_relin_key(RAW))
            if plan.rotations:
                p.he.rotateKeyGen(list(plan.rotations))
                rotate.append(p.he.to_bytes_rotate_key(RAW))
        payload = codec.pack_fields({"public_key": public, "relin_key": relin,
                                     "rotate_key": rotate})
        return ClientKeys(primes), payload

    def encrypt(self, keys: Any, x: np.ndarray) -> bytes:
        plan = self._client_plan()
        x_q = plan.edges.quantize_input(x)
        if plan.im2col is not None:
            features = plan.im2col.unfold(x_q)
        else:
            features = x_q.reshape(len(x_q), -1)
        rows = _slot_rows(plan, features)
        blobs = [p.encrypt(vec).to_bytes(RAW) for vec in rows for p in keys.primes] \
            if plan.packing == "single" else \
            [p.encrypt(vec).to_bytes(RAW) for chunk in rows for p in keys.primes for vec in chunk]
        return codec.pack_fields({"samples": len(x_q), "ct": blobs})

    def decrypt(self, secret: Any, output: bytes) -> np.ndarray:
        plan = self._client_plan()
        if not isinstance(secret, ClientKeys) or len(secret.primes) != len(plan.plain_moduli) \
                or any(p.he.is_secret_key_empty() for p in secret.primes):
            # SEAL dereferences a missing secret key (a crash, not an exception)
            raise ValueError("bfv: decryption needs the client's secret keys (keygen's first "
                             f"value, one per plaintext prime), not a {type(secret).__name__}")
        value = _parse(plan, secret.primes, output, plan.output_width)
        n = value.samples
        residues = []
        for i, prime in enumerate(secret.primes):
            per_item = [_decrypt_item(plan, prime, item[i]) for item in value.items]
            residues.append(np.concatenate(per_item)[:n])
        y = crt_combine(residues, plan.plain_moduli)
        if y.size and int(np.abs(y).max()) > plan.bound:
            raise RangeError(f"bfv: a decrypted output exceeds the worst-case bound "
                             f"{plan.bound} of the plan; refusing a possibly wrong result")
        return plan.edges.dequantize(y.reshape(n, *plan.output_shape))

    # ----- server --------------------------------------------------------------------

    def open_server(self, public: bytes, functional: bytes) -> Any:
        plan = self._planned()
        fields = codec.unpack_fields(public)
        n = len(plan.plain_moduli)
        expect = {"public_key": n, "relin_key": n * plan.relinearize,
                  "rotate_key": n * bool(plan.rotations)}
        for key, count in expect.items():
            blobs = fields.get(key)
            if not isinstance(blobs, list) or len(blobs) != count:
                raise EnvelopeError(f"bfv public keys: expected {count} {key} entries")
        # No SEAL key here exceeds (keys) x 2 x N x k^2 words for k coefficient primes; a
        # longer blob is refused before SEAL tries to allocate what its header claims.
        k = len(plan.coeff_bits)
        limit = (len(plan.rotations) + 2) * 2 * plan.poly_degree * k * k * 8 + (1 << 20)
        for key in expect:
            for blob in fields[key]:
                if not isinstance(blob, bytes) or len(blob) > limit:
                    raise EnvelopeError(f"bfv public keys: a {key} entry of "
                                        f"{len(blob) if isinstance(blob, bytes) else '?'} "
                                        f"bytes exceeds the {limit} these parameters allow")
        if self.opts["workers"] > 1 and n > 1:  # the workers build the contexts
            pool = WorkerPool(plan, {key: fields[key] for key in expect}, self._levels[:-1],
                              self.opts["workers"])
            rerand = Rerandomizer.from_public_keys(
                plan.poly_degree, plan.plain_moduli, plan.coeff_bits, fields["public_key"],
                self._levels[-1], plan.flood_log2) if plan.rerandomize else None
            return ServerContext([], pool.input_size, pool, rerand)
        primes = new_contexts(plan.poly_degree, plan.plain_moduli, plan.coeff_bits)
        for i, p in enumerate(primes):
            p.load_keys(fields, i)
        rerand = Rerandomizer(primes, self._levels[-1], plan.flood_log2) \
            if plan.rerandomize else None
        return ServerContext(primes, primes[0].ciphertext_size(), None, rerand)

    def load_input(self, ctx: Any, payload: bytes) -> Value | RemoteValue:
        plan = self._planned()
        if ctx.pool is not None:
            n, items = _split(plan, len(plan.plain_moduli), payload, plan.input_width)
            try:
                ctx.pool.load(items, plan.input_width, ctx.input_size)
            except RuntimeError as exc:
                raise EvaluationError(self.name, "(input)", "load", exc) from exc
            return RemoteValue(n, len(items))
        return _parse(plan, ctx.primes, payload, plan.input_width, ctx.input_size)

    def input_count(self, value: Value | RemoteValue) -> int:
        return int(value.samples)

    def dump_output(self, ctx: Any, value: Value | RemoteValue) -> bytes:
        plan, rerand = self._planned(), ctx.rerandomizer
        if isinstance(value, RemoteValue):
            try:
                parts = ctx.pool.dump()
            except RuntimeError as exc:
                raise EvaluationError(self.name, "(output)", "dump", exc) from exc
            blobs = [rerand.apply_bytes(i, b, keep) if rerand else b
                     for k, item in enumerate(parts)
                     for keep in [_result_slots(plan, value.samples, k)]  # once per item
                     for i, per_prime in enumerate(item) for b in per_prime]
        else:
            blobs = [rerand.apply(i, ct, keep) if rerand else ct.to_bytes(RAW)
                     for k, item in enumerate(value.items)
                     for keep in [_result_slots(plan, value.samples, k)]  # once per item
                     for i, per_prime in enumerate(item)
                     for ct in (per_prime if isinstance(per_prime, list) else [per_prime])]
        return codec.pack_fields({"samples": value.samples, "ct": blobs})


def _privacy_plan(plan: BfvPlan, by: str) -> dict[str, Any]:
    """The plan's output-privacy keys: what protects the outputs, at what security, and
    who chose it (``secureinfer.privacy``)."""
    bits = plan.flood_bits
    if bits:
        protection = (
            f"outputs re-randomized, slot-masked and noise-flooded (flood_bits={bits}): each "
            f"decrypted output ciphertext is within statistical distance 2^-{bits} of one "
            "showing the result only, measured against the planner's estimated noise bound "
            f"(budget {plan.budget_before_flood:.1f} bits before the flood; a flood of "
            f"2^{plan.flood_log2}), not a proven bound")
    elif plan.rerandomize:
        protection = ("outputs re-randomized and slot-masked (flood_bits=0): the ciphertext "
                      "does not show how it was computed; the decrypted noise is not flooded")
    else:
        protection = ("outputs not re-randomized (rerandomize=false): the output ciphertext, "
                      "its other slots and its noise depend on the weights")
    return {"flood_statistical_security_bits": bits,
            "flood_measured_against": (
                f"the noise model's budget estimate before the flood, "
                f"{plan.budget_before_flood:.1f} bits (noise.py: measured losses, rounded up)"
                if bits else None),
            **privacy.plan_keys(by, protection, "rerandomize=false")}


def _result_slots(plan: BfvPlan, samples: int, item: int) -> np.ndarray:
    """The slots of output ciphertext set ``item`` that hold results (the others get
    uniform values): ``single``, the output positions of the rows with a sample;
    ``batch``, the first slots, one per sample of the item."""
    count = min(plan.inputs_per_item, samples - item * plan.inputs_per_item)
    if plan.packing == "batch":
        return np.arange(count)
    return np.concatenate([r * plan.row + plan.output_slots for r in range(count)])


def _slot_rows(plan: BfvClientPlan, features: np.ndarray) -> list[Any]:
    """The slot vectors to encrypt: ``single``: one per two inputs; ``batch``: per chunk
    of ``N`` inputs, one per feature."""
    n_slots = plan.poly_degree
    if plan.packing == "batch":
        return [[_column(features[c:c + n_slots, f], n_slots) for f in range(features.shape[1])]
                for c in range(0, len(features), n_slots)]
    row = plan.row
    copies = row // plan.input_period
    offsets = (np.arange(copies)[:, None] * plan.input_period + plan.input_slots).reshape(-1)
    out = []
    for start in range(0, len(features), 2):
        vec = np.zeros(n_slots, np.int64)
        for r, sample in enumerate(features[start:start + 2]):
            vec[r * row + offsets] = np.tile(sample, copies)
        out.append(vec)
    return out


def _column(values: np.ndarray, n_slots: int) -> np.ndarray:
    vec = np.zeros(n_slots, np.int64)
    vec[:len(values)] = values
    return vec


def _split(plan: BfvPlan | BfvClientPlan, n_primes: int, payload: bytes,
           width: int) -> tuple[int, list[list[list[bytes]]]]:
    """A ciphertext message -> ``(samples, blobs[item][prime])`` (``width`` blobs each)."""
    fields = codec.unpack_fields(payload)
    n, blobs = fields.get("samples"), fields.get("ct")
    if not isinstance(n, int) or n < 1 or not isinstance(blobs, list):
        raise EnvelopeError("bfv message lacks its sample count or ciphertexts")
    items = -(-n // plan.inputs_per_item)
    step = n_primes * width
    if len(blobs) != items * step:
        raise EnvelopeError(f"bfv message: {len(blobs)} ciphertexts for {n} samples, "
                            f"expected {items * step}")
    return n, [[blobs[i * step + k * width:i * step + (k + 1) * width]
                for k in range(n_primes)] for i in range(items)]


def _parse(plan: BfvPlan | BfvClientPlan, primes: list[PrimeContext], payload: bytes, width: int,
           expected_size: int | None = None) -> Value:
    """A ciphertext message -> its ``Value``; ``width``: ciphertexts per item and prime."""
    n, items = _split(plan, len(primes), payload, width)
    value = []
    for item in items:
        flat = [b for per_prime in item for b in per_prime]
        loaded = load_ciphertexts(primes, flat, width, expected_size)
        value.append([cts[0] if plan.packing == "single" else cts for cts in loaded])
    return Value(value, n)


def _decrypt_item(plan: BfvClientPlan, prime: PrimeContext, item: Any) -> np.ndarray:
    """Residues mod ``prime.t`` of the inputs in one item: ``(inputs, outputs)``."""
    cts = item if isinstance(item, list) else [item]
    for ct in cts:
        if prime.he.noise_level(ct) <= 0:
            raise RangeError(
                f"bfv: the noise budget of an output ciphertext (t={prime.t}) is exhausted, "
                f"so it would decrypt wrongly (the plan expected {plan.budget:.0f} bits "
                "left); recompile with a larger poly_modulus_degree or smaller "
                "plain_modulus_bits")
    if plan.packing == "batch":
        return np.stack([prime.he.decryptInt(ct) for ct in cts], axis=1)
    vec = prime.he.decryptInt(cts[0])
    slots = plan.output_slots
    return np.stack([vec[slots], vec[plan.row + slots]])
