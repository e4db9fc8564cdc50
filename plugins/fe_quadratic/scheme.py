"""The ``fe_quad`` scheme: a degree-2 prefix under quadratic FE, the rest in the clear.

Compile time: ``secureinfer.quant.quantize`` turns the prefix into integers (``bits`` for
inputs and weights, ``coeff_bits`` for a general activation's coefficients) and
``function.lower`` into one quadratic function per output. The discrete-log bound is the
exact worst case of those functions over every input in the calibrated range, so every
such input decrypts; the search starts at each output's calibration median, so its time
grows with the distance to typical values, not with the bound.

Roles: the authority generates the master key (``dgp.setup``) and one functional key per
output; a client encrypts with the master public key only; the server holds the
functional keys and the discrete-log table, never the master secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from secureinfer import codec
from secureinfer.errors import CompileError, EnvelopeError
from secureinfer.layers import LayerSpec
from secureinfer.quant import QuantizedNetwork, quantize
from secureinfer.scheme import Calibration, Capabilities, Option, SecureLayer

from ..fe_common.dlog import DlogOutOfRange, DlogTable, table_bits_for
from ..fe_common.groups import group, pack_elements, unpack_elements
from ..fe_common.scheme import MAX_TABLE_BITS as _MAX_TABLE_BITS
from ..fe_common.scheme import BLS12_381_SECURITY, FeScheme, dlog_table_option
from . import dgp
from .function import QuadraticFunction, lower

__all__ = ["QuadraticFE", "QuadraticLayer", "ServerKeys"]

_KINDS = frozenset({"linear", "conv2d", "avgpool2d", "flatten", "poly"})
_MAX_STEPS = 1 << 20


@dataclass
class _Program:
    """What the plan derives from the prefix."""

    qnet: QuantizedNetwork
    function: QuadraticFunction
    digest: str          # sha256 of every integer of ``function``
    centers: list[int]   # where each output's discrete-log search starts
    bound: int           # max |output - center| over the calibrated input range
    table_bits: int


@dataclass
class ServerKeys:
    """What the server holds: one functional key (a G2 element) per output."""

    keys: list[Any]


class QuadraticFE(FeScheme):
    """Quadratic FE (Dufour-Sans, Gay, Pointcheval 2018) on BLS12-381: the server learns
    the outputs of a ``Linear -> degree-2 activation -> Linear`` prefix in plaintext."""

    name = "fe_quad"
    aliases = ("qfe",)
    description = ("quadratic functional encryption (DGP 2018, BLS12-381 pairing): server "
                   "learns the outputs of a Linear -> x^2 -> Linear prefix")
    capabilities = Capabilities(layers=_KINDS, max_degree=2, output="plaintext", exact=True)
    pruning_unit = "hidden"
    options = (
        Option("bits", int, 5, "quantize inputs and weights to N-bit integers (the outputs, "
                               "and the discrete-log work, grow about 16x per bit)"),
        Option("coeff_bits", int, None,
               "fractional bits of a degree-2 activation's coefficients (default: the fewest "
               "that keep each within a relative 2**-bits; unused for x**2)"),
        Option("max_hidden", int, 1024, "widest degree-2 activation accepted (decryption "
                                        "pairs twice per unit)"),
        dlog_table_option(),
    )

    # ----- description -----------------------------------------------------------------

    def reveals(self, prefix: Sequence[LayerSpec]) -> str | None:
        last = prefix[-1]
        n_out = int(np.prod(last.out_shape))
        return (f"the {n_out} outputs of layer {last.name} "
                f"({last.describe().replace(f' {last.name}', '', 1)}), one quadratic "
                "function of the input each; nothing of the layers before it")

    # ----- compile time ----------------------------------------------------------------

    def plan(self, prefix: Sequence[LayerSpec], calibration: Calibration | None) -> dict[str, Any]:
        calibration = self._require_calibration(calibration)
        coeff_bits = self.opts["coeff_bits"]
        if coeff_bits is None:
            coeff_bits = _auto_coeff_bits(quantize(prefix, calibration.input_range,
                                                   self.opts["bits"]))
        qnet = quantize(prefix, calibration.input_range, self.opts["bits"],
                        coeff_bits=coeff_bits)
        fn = lower(qnet, prefix[0].in_shape, self.opts["max_hidden"])
        low = 0 if qnet.input_range[0] >= 0 else -qnet.input_bound
        ranges = fn.output_ranges(low, qnet.input_bound)
        centers = _centers(fn, qnet, ranges, calibration)
        bound = max(max(hi - c, c - lo) for (lo, hi), c in zip(ranges, centers))
        bits = self.opts["dlog_table_bits"]
        table_bits = bits if bits is not None else table_bits_for(bound, 8, _MAX_TABLE_BITS)
        steps = 2 * bound // (1 << table_bits) + 1
        if steps > _MAX_STEPS:
            last = prefix[-1]
            raise CompileError(
                f"layer {last.name}: with bits={self.opts['bits']} its outputs span up to "
                f"{bound} (about 2**{bound.bit_length()}) around their typical values; a "
                f"discrete-log table of 2**{table_bits} would need up to {steps} giant "
                "steps per output: use fewer bits (each one divides the span by about 16), "
                "a smaller coeff_bits, or a larger dlog_table_bits")
        self._program = _Program(qnet, fn, fn.digest(), centers, bound, table_bits)
        self.plan_ = {
            "security_bits": 128,
            "security_source": BLS12_381_SECURITY,
            "curve": "BLS12-381",
            "construction": "Dufour-Sans-Gay-Pointcheval 2018 (generic bilinear group model)",
            "bits": self.opts["bits"],
            "coeff_bits": coeff_bits,
            "inputs": int(fn.pre.shape[1]) - 1,
            "hidden": fn.hidden,
            "units_skipped": _units(prefix) - fn.hidden,
            "functional_keys": fn.outputs,
            "pairings_per_input": 2 * fn.hidden + fn.outputs + 2,
            "function_digest": fn.digest(),
            "dlog": {"bound": bound, "table_bits": table_bits, "max_steps": steps,
                     "centers": centers},
            "quantization": qnet.to_dict(),
        }
        return self.plan_

    # ----- authority and client --------------------------------------------------------

    def _size(self) -> int:
        """Coordinates of an encrypted vector: the constant 1 and the inputs."""
        return self.inputs() + 1

    def _derive(self, prefix: Sequence[LayerSpec]) -> _Program:
        """The quadratic functions of ``prefix`` under this plan's quantization (for an
        authority rebuilt from the client artifact; the discrete-log fields stay empty)."""
        edges = self.edges()
        qnet = quantize(prefix, edges.input_range, edges.bits,
                        coeff_bits=int(self.plan_["coeff_bits"]))
        fn = lower(qnet, prefix[0].in_shape, self.opts["max_hidden"])
        return _Program(qnet, fn, fn.digest(), [], 0, 0)

    def keygen(self) -> tuple[dgp.MasterKey, bytes]:
        msk = dgp.setup(self._size())
        return msk, msk.public.to_bytes()

    def functional_keys(self, secret: dgp.MasterKey, prefix: Sequence[LayerSpec]) -> bytes:
        prog = self._prefix_program(prefix, "function_digest")
        keys = dgp.functional_keys(secret, prog.function)
        return codec.pack_fields({"keys": pack_elements(group("G2"), keys),
                                  "function_digest": prog.digest})

    def open_client(self, public: bytes) -> dgp.PublicKey:
        return dgp.PublicKey.from_bytes(public, self._size())

    def encrypt(self, keys: dgp.MasterKey | dgp.PublicKey, x: np.ndarray) -> bytes:
        x_q = self.edges().quantize_input(x).reshape(len(x), -1)
        public = keys.public if isinstance(keys, dgp.MasterKey) else keys
        return codec.pack_fields({"ct": [dgp.encrypt(public, [1, *row]).to_bytes()
                                         for row in x_q.tolist()]})

    # ----- server --------------------------------------------------------------------

    def open_server(self, public: bytes, functional: bytes) -> ServerKeys:
        prog = self._planned()
        fields = codec.unpack_fields(functional)
        if fields.get("function_digest") != prog.digest:
            raise EnvelopeError(f"{self.name}: the functional keys were issued for other "
                                "functions than this server's model; compile the same model "
                                "and config on both sides")
        raw = fields.get("keys")
        if not isinstance(raw, bytes):
            raise EnvelopeError(f"{self.name} functional keys: missing field 'keys'")
        return ServerKeys(unpack_elements(group("G2"), raw, count=prog.function.outputs))

    def build_layers(self, prefix: Sequence[LayerSpec], ctx: ServerKeys) -> list[SecureLayer]:
        """One fused layer for the whole prefix (its quadratic functions)."""
        return [QuadraticLayer(prefix[-1], ctx, self)]

    def load_input(self, ctx: ServerKeys, payload: bytes) -> list[dgp.Ciphertext]:
        cts = codec.unpack_fields(payload).get("ct")
        if not isinstance(cts, list) or not cts:
            raise EnvelopeError(f"{self.name} ciphertext: missing or empty field 'ct'")
        size = self._size()
        return [dgp.Ciphertext.from_bytes(blob, size) for blob in cts]

    def dump_output(self, ctx: ServerKeys, value: np.ndarray) -> np.ndarray:
        return self._planned().qnet.dequantize(value)


def _auto_coeff_bits(qnet: QuantizedNetwork) -> int:
    """The fewest fractional bits (0..16) that put every nonzero coefficient of the
    degree-2 activation within a relative ``2**-bits`` of its exact value, as precise as the
    weights; the outputs, and the discrete-log search, double with each bit."""
    act = next((q for q in qnet.layers if q.spec.degree == 2), None)
    if act is None or act.spec.is_square:
        return 0
    scale, tol = act.in_scale, 2.0 ** -qnet.bits
    for bits in range(17):
        exact = [c * scale ** (k - 2) * 2.0**bits for k, c in enumerate(act.spec.coeffs) if c]
        if all(abs(round(t) - t) <= tol * abs(t) for t in exact):
            return bits
    return 16


def _centers(fn: QuadraticFunction, qnet: QuantizedNetwork, ranges: list[tuple[int, int]],
             calibration: Calibration) -> list[int]:
    """Per output, the median over the calibration samples (0 without samples), kept
    inside the output's range: where the discrete-log search starts."""
    if calibration.samples is None or not len(calibration.samples):
        mid = [0] * len(ranges)
    else:
        y = fn.evaluate(qnet.quantize_input(calibration.samples))
        mid = [int(v) for v in np.median(y.astype(np.float64), axis=0)]
    return [min(max(m, lo), hi) for m, (lo, hi) in zip(mid, ranges)]


class QuadraticLayer(SecureLayer):
    """Functional decryption of every output of the prefix, then the discrete logarithms.

    Built once per server: the projection plans of the weight matrices, the functional
    keys and the discrete-log table. ``forward`` takes the parsed ciphertexts and returns
    ``(n, *out_shape)`` integers.
    """

    def __init__(self, spec: LayerSpec, ctx: ServerKeys, scheme: QuadraticFE) -> None:
        super().__init__(spec, ctx, scheme)
        prog = scheme._planned()
        gt = group("GT")
        self._decryptor = dgp.Decryptor(prog.function, ctx.keys)
        self._recenter = [gt.pow(gt.generator(), -c) for c in prog.centers]
        self._centers = np.array(prog.centers, dtype=object)
        self._dlog = DlogTable(gt, gt.generator(), prog.bound, table_bits=prog.table_bits)

    def forward(self, value: list[dgp.Ciphertext]) -> np.ndarray:
        out = []
        for ct in value:
            shifted = [z * u for z, u in zip(self._decryptor.decrypt(ct), self._recenter)]
            try:
                found = self._dlog.solve_many(shifted)
            except DlogOutOfRange as exc:
                raise DlogOutOfRange(
                    f"layer {self.spec.name}: output {exc.index} decrypts outside the range "
                    "its keys were planned for: the ciphertext was not made for this model, "
                    "or its input left the calibrated range", index=exc.index,
                    bound=exc.bound) from None
            out.append(found.astype(object) + self._centers)
        return np.stack(out).reshape(len(value), *self.spec.out_shape)


def _units(prefix: Sequence[LayerSpec]) -> int:
    """Units of the prefix's degree-2 activation before pruned ones are dropped (its
    outputs for an affine prefix)."""
    act = next((s for s in prefix if s.kind == "poly"), prefix[-1])
    return int(np.prod(act.out_shape))
