"""Inner-product functional encryption (Abdalla, Bourse, De Caro, Pointcheval, PKC 2015).

The DDH-based scheme over G1 of BLS12-381 (pymcl), with ``g`` mcl's G1 generator and
``r`` the group order:

* master keys: ``s`` uniform in ``Z_r^n`` (secret), ``h_i = s_i g`` (public);
* functional key for an integer vector ``y``: ``sk_y = <s, y> mod r``;
* encryption of an integer vector ``x`` with fresh ``rho``: ``ct_0 = rho g``,
  ``ct_i = rho h_i + x_i g``;
* decryption with ``(y, sk_y)``: ``sum_i y_i ct_i - sk_y ct_0 = <x, y> g``, then a bounded
  discrete logarithm gives ``<x, y>``.

The secure prefix is every layer before the first activation (Linear, Conv2d with
folded BatchNorm, AvgPool2d, Flatten). Quantized by ``secureinfer.quant.quantize``, that
prefix is one integer affine map ``y = A x_q + c`` (``fe_common.integer.affine_map``,
exact); the authority issues one functional key per nonzero row of ``A`` (an all-zero row,
a pruned output unit, gets none: its output is the bias, public anyway), the server
decrypts ``A x_q`` on those rows and adds the public bias ``c``: the result equals
``qnet.forward_int(x_q)`` integer for integer. The server learns the prefix outputs in plaintext, nothing else
about ``x`` (selective IND-CPA under DDH in G1), and runs the rest of the network in the
clear. When ``A`` has full column rank (as many independent outputs as inputs) those
outputs determine ``x``; ``reveals`` says so.

Speed comes from the problem's structure (``fe_common.tables``): the weights are small,
so the server builds a windowed table of multiples of each ciphertext element and pays
about one G1 addition per weight; encryption uses a fixed-base table of ``g`` for
``rho g`` and the plaintext terms; the discrete-log table (``fe_common.dlog``) is sized
from the quantization bound so that a search takes a few giant steps. What no table
removes, at about one scalar multiplication (50 us) each: ``rho h_i`` per input on the
client; mcl's check, on the server, that each received point lies in the prime-order
subgroup (kept: a point with a small-order component would let a client learn the
functional keys modulo the small primes of the cofactor); ``sk_j ct_0`` per output.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from secureinfer import codec
from secureinfer.errors import CompileError, EnvelopeError
from secureinfer.layers import LayerSpec
from secureinfer.quant import QuantizedNetwork, quantize
from secureinfer.scheme import Calibration, Capabilities, Option, SecureLayer

from ..fe_common.dlog import DlogOutOfRange, DlogTable, max_giant_steps, table_bits_for
from ..fe_common.groups import (
    fr,
    group,
    group_order,
    pack_elements,
    random_scalar,
    scalars_from_bytes,
    scalars_to_bytes,
    unpack_elements,
)
from ..fe_common.integer import affine_map, inner_product_bound
from ..fe_common.tables import FixedBase, SmallMatVec
from ..fe_common.scheme import MAX_TABLE_BITS as _MAX_TABLE_BITS
from ..fe_common.scheme import BLS12_381_SECURITY, FeScheme, dlog_table_option

__all__ = ["InnerProductFE", "InnerProductLayer", "MasterSecret", "PublicKey", "ServerKeys"]

_KINDS = frozenset({"linear", "conv2d", "avgpool2d", "flatten"})
_MAX_STEPS = 1024


@dataclass
class _Program:
    """What the plan derives from the prefix: the quantized net and its affine map."""

    qnet: QuantizedNetwork
    weights: np.ndarray  # A, (n_out, n_in) int64
    bias: np.ndarray     # c, (n_out,) int64
    bound: int           # max |A_j . x_q|
    digest: str          # sha256 of A and c

    @property
    def active(self) -> np.ndarray:
        """Indices of the rows of ``A`` with a nonzero weight: one functional key each."""
        return np.flatnonzero(np.any(self.weights != 0, axis=1))


@dataclass
class PublicKey:
    """A client's encryption key: the master public key ``h`` and tables of ``g``."""

    h: list[Any]
    g_table: FixedBase
    small: list[Any]  # x * g for x in [-input_bound, input_bound], index x + input_bound


@dataclass
class MasterSecret:
    """The authority's master secret key ``s`` (and the public key it goes with)."""

    s: list[int]
    public: PublicKey


@dataclass
class ServerKeys:
    """What the server holds: one functional key ``<s, A_j>`` per output, no master key."""

    sk: list[int]


class InnerProductFE(FeScheme):
    """Inner-product FE (ABDP 2015, DDH in G1 of BLS12-381): the server learns the outputs
    of the network's first linear layers in plaintext and runs the rest in the clear."""

    name = "fe_ip"
    aliases = ("ipfe",)
    description = ("inner-product functional encryption (ABDP 2015, DDH, BLS12-381 G1): "
                   "server learns the first linear layer's outputs")
    capabilities = Capabilities(layers=_KINDS, max_degree=1, output="plaintext", exact=True)
    pruning_unit = "rows"
    options = (
        Option("bits", int, 8, "quantize inputs and weights to N-bit integers"),
        dlog_table_option(),
    )

    # ----- description -----------------------------------------------------------------

    def reveals(self, prefix: Sequence[LayerSpec]) -> str | None:
        n_out = int(np.prod(prefix[-1].out_shape))
        shown = [s for s in prefix if s.kind != "flatten"] or list(prefix)
        what = "; ".join(s.describe().replace(f" {s.name}", "", 1) for s in shown)
        if len(shown) == 1:
            text = f"the {n_out} outputs of layer {shown[0].name} ({what})"
        else:
            text = f"the {n_out} outputs of layers {shown[0].name}..{shown[-1].name} ({what})"
        if self.plan_.get("determines_input"):
            text += ("; they have full rank, so they determine the input itself: use a "
                     "first layer with fewer outputs than inputs to hide it")
        return text

    # ----- compile time ----------------------------------------------------------------

    def plan(self, prefix: Sequence[LayerSpec], calibration: Calibration | None) -> dict[str, Any]:
        calibration = self._require_calibration(calibration)
        self._program = self._map(prefix, calibration.input_range)
        weights, bound, digest = self._program.weights, self._program.bound, self._program.digest
        table_bits = self.opts["dlog_table_bits"]
        if table_bits is None:
            table_bits = table_bits_for(bound, 8, _MAX_TABLE_BITS)
        elif not 8 <= table_bits <= 28:
            raise CompileError(f"{self.name}: dlog_table_bits={table_bits} is outside 8..28 "
                               f"(2**{_MAX_TABLE_BITS} entries, 80 MB, is the default cap)")
        steps = max_giant_steps(bound, table_bits)
        if steps > _MAX_STEPS:
            raise CompileError(
                f"layer {prefix[-1].name}: with bits={self.opts['bits']} the inner products "
                f"reach {bound} (about 2**{bound.bit_length()}); a discrete-log table of "
                f"2**{table_bits} would need {steps} giant steps per output: use fewer bits "
                f"or a larger dlog_table_bits")
        self.plan_ = {
            "security_bits": 128,
            "security_source": BLS12_381_SECURITY,
            "curve": "BLS12-381",
            "group": "G1",
            "bits": self.opts["bits"],
            "inputs": int(weights.shape[1]),
            "outputs": int(weights.shape[0]),
            "functional_keys": int(len(self._program.active)),
            "units_skipped": int(weights.shape[0] - len(self._program.active)),
            "weights_digest": digest,
            "determines_input": bool(np.linalg.matrix_rank(weights.astype(np.float64))
                                     == weights.shape[1]),
            "dlog": {"bound": bound, "table_bits": table_bits, "max_steps": steps},
            "quantization": self._program.qnet.to_dict(),
        }
        return self.plan_

    def _map(self, prefix: Sequence[LayerSpec], input_range: tuple[float, float]) -> _Program:
        qnet = quantize(prefix, input_range, self.opts["bits"])
        weights, bias = affine_map(qnet.layers, prefix[0].in_shape)
        bound = inner_product_bound(weights, qnet.input_bound, qnet.input_range[0] >= 0)
        digest = hashlib.sha256(weights.tobytes() + b"|" + bias.tobytes()).hexdigest()
        return _Program(qnet, weights, bias, bound, digest)

    def _derive(self, prefix: Sequence[LayerSpec]) -> _Program:
        return self._map(prefix, self.edges().input_range)

    # ----- authority and client --------------------------------------------------------

    def _public_key(self, h: list[Any]) -> PublicKey:
        ops = group("G1")
        g = ops.generator()
        bound = self.edges().input_bound
        pos = list(itertools.accumulate(itertools.repeat(g, bound), ops.law))
        small = [ops.inv(e) for e in reversed(pos)] + [ops.identity()] + pos
        return PublicKey(h, FixedBase(ops, g), small)

    def keygen(self) -> tuple[MasterSecret, bytes]:
        n = self.inputs()
        ops = group("G1")
        s = [random_scalar() for _ in range(n)]
        g_table = FixedBase(ops, ops.generator())
        h = g_table.pow_many(s)
        public = self._public_key(h)
        return MasterSecret(s, public), codec.pack_fields({"h": pack_elements(ops, h)})

    def functional_keys(self, secret: MasterSecret, prefix: Sequence[LayerSpec]) -> bytes:
        """``<s, A_j> mod r`` for every nonzero row of the planned prefix's integer map
        ``A``, and the digest of ``A`` and ``c`` the server checks against its own model."""
        prog = self._prefix_program(prefix, "weights_digest")
        s = np.array(secret.s, dtype=object)
        sk = (prog.weights[prog.active].astype(object) @ s) % group_order()
        return codec.pack_fields({"sk": scalars_to_bytes(sk.tolist()),
                                  "weights_digest": prog.digest})

    def open_client(self, public: bytes) -> PublicKey:
        n = self.inputs()
        fields = codec.unpack_fields(public)
        if not isinstance(fields.get("h"), bytes):
            raise EnvelopeError(f"{self.name} public key: missing field 'h'")
        return self._public_key(unpack_elements(group("G1"), fields["h"], count=n))

    def encrypt(self, keys: MasterSecret | PublicKey, x: np.ndarray) -> bytes:
        edges = self.edges()
        x_q = edges.quantize_input(x).reshape(len(x), -1)
        ops = group("G1")
        pk = keys.public if isinstance(keys, MasterSecret) else keys
        r, parts = group_order(), []
        for row in x_q:
            rho = random_scalar()
            if isinstance(keys, MasterSecret):  # ct_i = (rho s_i + x_i) g, fixed base g
                body = pk.g_table.pow_many([(rho * s + int(v)) % r
                                            for s, v in zip(keys.s, row.tolist())])
            else:  # ct_i = rho h_i + x_i g
                rho_fr, off = fr(rho), edges.input_bound
                body = [ops.law(h * rho_fr, pk.small[v + off])
                        for h, v in zip(pk.h, row.tolist())]
            parts.append(pack_elements(ops, [pk.g_table.pow(rho), *body]))
        return codec.pack_fields({"count": len(parts), "ct": b"".join(parts)})

    # ----- server --------------------------------------------------------------------

    def open_server(self, public: bytes, functional: bytes) -> ServerKeys:
        prog = self._planned()
        pub = codec.unpack_fields(public)
        n_in = int(prog.weights.shape[1])
        if not isinstance(pub.get("h"), bytes) or len(pub["h"]) != group("G1").element_size * n_in:
            raise EnvelopeError(f"{self.name} public key: expected {n_in} G1 elements")
        fields = codec.unpack_fields(functional)
        if fields.get("weights_digest") != prog.digest:
            raise EnvelopeError(f"{self.name}: the functional keys were issued for other "
                                "weights than this server's model; compile the same model "
                                "on both sides")
        sk_raw = fields.get("sk")
        if not isinstance(sk_raw, bytes):
            raise EnvelopeError(f"{self.name} functional keys: missing field 'sk'")
        return ServerKeys(scalars_from_bytes(sk_raw, count=len(prog.active)))

    def build_layers(self, prefix: Sequence[LayerSpec], ctx: ServerKeys) -> list[SecureLayer]:
        """One fused layer for the whole prefix (its integer affine map)."""
        return [InnerProductLayer(prefix[-1], ctx, self)]

    def load_input(self, ctx: ServerKeys, payload: bytes) -> list[tuple[Any, list[Any]]]:
        n = int(self._planned().weights.shape[1]) + 1
        fields = codec.unpack_fields(payload)
        count, data = fields.get("count"), fields.get("ct")
        if not isinstance(count, int) or not isinstance(data, bytes) or count < 1:
            raise EnvelopeError(f"{self.name} ciphertext: missing or malformed fields")
        elems = unpack_elements(group("G1"), data, count=count * n)
        return [(elems[k * n], elems[k * n + 1:(k + 1) * n]) for k in range(count)]

    def dump_output(self, ctx: ServerKeys, value: np.ndarray) -> np.ndarray:
        return self._planned().qnet.dequantize(value)


class InnerProductLayer(SecureLayer):
    """Decrypts the prefix's outputs with the functional keys: ``A x_q + c``, integers.

    Built once per server: the window plan of the weight matrix's nonzero rows and the
    discrete-log table. Outputs of all-zero rows are the bias alone, with no key, no
    group operation and no discrete logarithm. ``forward`` takes the parsed ciphertexts
    and returns ``(n, *out_shape)`` int64.
    """

    def __init__(self, spec: LayerSpec, ctx: ServerKeys, scheme: InnerProductFE) -> None:
        super().__init__(spec, ctx, scheme)
        prog = scheme._planned()
        ops = group("G1")
        self._ops = ops
        self._bias = prog.bias
        self._active = prog.active
        self._matvec = SmallMatVec(ops, prog.weights[self._active])
        self._neg_sk = [fr(-k) for k in ctx.sk]
        dlog = scheme.plan_["dlog"]
        self._dlog = DlogTable(ops, ops.generator(), dlog["bound"],
                               table_bits=dlog["table_bits"])

    def forward(self, value: list[tuple[Any, list[Any]]]) -> np.ndarray:
        out = []
        for ct0, body in value:
            masks = [ct0 * k for k in self._neg_sk]  # -sk_j ct_0
            points = self._matvec(body, masks)       # <x, A_j> g
            try:
                ips = self._dlog.solve_many(points)
            except DlogOutOfRange as exc:
                raise DlogOutOfRange(
                    f"layer {self.spec.name}: output {self._active[exc.index]} decrypts outside "
                    f"[-{exc.bound}, {exc.bound}], the range its keys were planned for: the "
                    "ciphertext was not made for this model, or its input left the "
                    "calibrated range", index=int(self._active[exc.index]),
                    bound=exc.bound) from None
            row = self._bias.copy()
            row[self._active] += ips
            out.append(row)
        return np.stack(out).reshape(len(value), *self.spec.out_shape)
