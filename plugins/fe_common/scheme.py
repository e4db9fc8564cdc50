"""What the two FE schemes share as ``Scheme`` subclasses: the pymcl backend, the
discrete-log table option and the calibration they both need to quantize."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from secureinfer.errors import CompileError
from secureinfer.layers import LayerSpec
from secureinfer.quant import EdgeQuantizer
from secureinfer.scheme import Calibration, Option, Scheme

from . import backend

__all__ = ["BLS12_381_SECURITY", "MAX_TABLE_BITS", "FeScheme", "dlog_table_option"]

#: Largest default discrete-log table: 2**22 entries (about 80 MB on disk for GT).
MAX_TABLE_BITS = 22

#: How both FE schemes' "128 bits" is obtained: the curve's listed level, and the doubt.
BLS12_381_SECURITY = (
    "BLS12-381: the CFRG pairing-friendly-curves draft (draft-irtf-cfrg-pairing-friendly-"
    "curves) lists it at the 128-bit level; recent estimates that account for exTNFS (the "
    "extended tower number field sieve in the pairing's target field) put it at about "
    "117-126 bits. Reported as 128, the listed level")


def dlog_table_option() -> Option:
    """The ``dlog_table_bits`` option, the same for every FE scheme."""
    return Option("dlog_table_bits", int, None, "log2 of the discrete-log table (default: "
                  f"from the bound, at most {MAX_TABLE_BITS})")


class FeScheme(Scheme):
    """Base of the pymcl FE schemes: availability, version, calibration check, and the
    quantized reference of the program ``plan`` stores in ``self._program`` (any object
    with a ``qnet``: ``secureinfer.quant.QuantizedNetwork``).

    Clients work from the plan alone (``load_plan``): the input quantizer comes from the
    plan's ``quantization`` entry, the sizes from its ``inputs``; the authority's
    ``functional_keys`` derives the weights from the prefix it is given."""

    backend = "pymcl"
    extra = "fe"
    security_basis = BLS12_381_SECURITY

    def __init__(self, options: dict[str, Any] | None = None, **kw: Any) -> None:
        super().__init__(options, **kw)
        self._program: Any = None
        self._edges: EdgeQuantizer | None = None

    def load_plan(self, plan: Mapping[str, Any]) -> None:
        super().load_plan(plan)
        self._edges = EdgeQuantizer.from_dict(plan["quantization"])

    @classmethod
    def availability(cls) -> str | None:
        return backend.availability()

    @classmethod
    def backend_version(cls) -> str | None:
        return backend.backend_version()

    def _require_calibration(self, calibration: Calibration | None) -> Calibration:
        if calibration is None:
            raise CompileError(f"{self.name} quantizes inputs and weights and needs the input "
                               "range: pass calibration= (representative inputs) to compile()")
        return calibration

    def _planned(self) -> Any:
        if self._program is None:
            raise CompileError(f"{self.name}: plan() must run before keys, encryption or "
                               "evaluation (compile the model first)")
        return self._program

    def edges(self) -> EdgeQuantizer:
        """The client's input quantizer (from the plan)."""
        if self._edges is None:
            raise CompileError(f"{self.name}: load or compile a plan before keys or "
                               "encryption")
        return self._edges

    def inputs(self) -> int:
        """Integers in one encrypted input (from the plan)."""
        self.edges()
        return int(self.plan_["inputs"])

    def _prefix_program(self, prefix: Sequence[LayerSpec], digest_key: str) -> Any:
        """The planned program or, for an authority rebuilt from a client artifact, the
        one ``derive(prefix)`` gives, checked against the plan's digest ``digest_key``."""
        if self._program is not None:
            return self._program
        self.edges()
        program = self._derive(prefix)
        if program.digest != self.plan_[digest_key]:
            raise CompileError(f"{self.name}: the prefix given to functional_keys is not the "
                               "one this plan was made for (its digest differs): load the "
                               "client artifact of the model the server runs")
        self._program = program
        return program

    def _derive(self, prefix: Sequence[LayerSpec]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def reference(self, prefix: Sequence[LayerSpec], x: np.ndarray) -> np.ndarray:
        return self._planned().qnet.forward(x)

    def check_input(self, x: np.ndarray) -> None:
        self.edges().quantize_input(x)
