"""The ``clear`` reference scheme: no cryptography, the same layers, the oracle.

``clear`` runs the network in float64. ``clear?bits=8`` runs the quantized integer network
that the exact schemes (BFV, FE) reproduce, so it is their reference too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np

from secureinfer import codec
from secureinfer.errors import EnvelopeError
from secureinfer.hookspecs import hookimpl
from secureinfer.layers import LayerSpec
from secureinfer.quant import EdgeQuantizer, QuantizedNetwork, quantize
from secureinfer.scheme import Calibration, Capabilities, Option, Scheme, SecureLayer

__all__ = ["ClearScheme"]

_ALL_KINDS = frozenset({"linear", "conv2d", "avgpool2d", "flatten", "poly"})


class ClearLayer(SecureLayer):
    """Runs the spec's float reference (or its quantized integer form)."""

    def __init__(self, spec: LayerSpec, ctx: Any, scheme: "ClearScheme") -> None:
        super().__init__(spec, ctx, scheme)
        qnet = scheme.qnet
        self.qlayer = qnet.layers[scheme.index[id(spec)]] if qnet is not None else None

    def forward(self, value: np.ndarray) -> np.ndarray:
        if self.qlayer is not None:
            return self.qlayer.forward_int(value)
        return self.spec.forward(value)


class ClearScheme(Scheme):
    """Plain evaluation: what every other scheme is compared against."""

    name = "clear"
    aliases = ("plain", "none")
    backend = "numpy"
    description = "reference: no encryption, float64 or quantized integers (?bits=N)"
    capabilities = Capabilities(layers=_ALL_KINDS, output="encrypted", exact=False,
                                tolerance=1e-9, encrypts=False)
    options = (Option("bits", int, None, "quantize inputs and weights to N-bit integers"),
               Option("coeff_bits", int, None,
                      "fractional bits of polynomial coefficients (default: bits)"))
    layer_types = {kind: ClearLayer for kind in _ALL_KINDS}

    def __init__(self, options: dict[str, Any] | None = None, **kw: Any) -> None:
        super().__init__(options, **kw)
        self.qnet: QuantizedNetwork | None = None
        self.edges: EdgeQuantizer | None = None  # the client's: from the plan alone
        self.index: dict[int, int] = {}
        if self.opts["bits"] is not None:  # integers: equal to the reference bit for bit
            self.capabilities = replace(self.capabilities, exact=True, tolerance=0.0)

    @classmethod
    def backend_version(cls) -> str | None:
        return np.__version__

    def plan(self, prefix: Sequence[LayerSpec], calibration: Calibration | None) -> dict[str, Any]:
        self.index = {id(spec): i for i, spec in enumerate(prefix)}
        bits = self.opts["bits"]
        if bits is not None:
            if calibration is None:
                from secureinfer.errors import CompileError

                raise CompileError("clear?bits=N needs calibration data (the input range) "
                                   "to quantize: pass calibration= to compile()")
            self.qnet = quantize(prefix, calibration.input_range, bits,
                                 coeff_bits=self.opts["coeff_bits"])
        self.plan_ = {"security_bits": None, "bits": bits,
                      "quantization": self.qnet.to_dict() if self.qnet else None}
        return self.plan_

    def load_plan(self, plan: Mapping[str, Any]) -> None:
        super().load_plan(plan)
        quant = plan.get("quantization")
        self.edges = EdgeQuantizer.from_dict(quant) if quant else None

    @property
    def security_bits(self) -> None:
        """``clear`` encrypts nothing: no security level (reports say "none")."""
        return None

    def reference(self, prefix: Sequence[LayerSpec], x: np.ndarray) -> np.ndarray:
        if self.qnet is not None:
            return self.qnet.forward(x)
        return super().reference(prefix, x)

    def keygen(self) -> tuple[Any, bytes]:
        return None, b""

    def encrypt(self, keys: Any, x: np.ndarray) -> bytes:
        if self.edges is not None:
            return codec.pack_fields({"x": self.edges.quantize_input(x)})
        return codec.pack_fields({"x": np.asarray(x, dtype=np.float64)})

    def decrypt(self, secret: Any, output: bytes) -> np.ndarray:
        y = self._array(output, "y", "output")
        return self.edges.dequantize(y) if self.edges is not None else y

    def open_server(self, public: bytes, functional: bytes) -> Any:
        return None

    def load_input(self, ctx: Any, payload: bytes) -> np.ndarray:
        return self._array(payload, "x", "input")

    def _array(self, payload: bytes, key: str, what: str) -> np.ndarray:
        value = codec.unpack_fields(payload).get(key)
        if not isinstance(value, np.ndarray) or value.ndim < 1 or value.dtype.kind not in "iufO":
            raise EnvelopeError(f"clear {what} message: no numeric array field {key!r}")
        return value

    def dump_output(self, ctx: Any, value: np.ndarray) -> bytes:
        return codec.pack_fields({"y": value})


@hookimpl
def secureinfer_register_schemes(register: Any) -> None:
    """Register ``clear``."""
    register(ClearScheme)
