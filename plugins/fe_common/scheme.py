"""What the two FE schemes share as ``Scheme`` subclasses: the pymcl backend, the
discrete-log table option and the calibration they both need to quantize."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from secureinfer.errors import CompileError
from secureinfer.layers import LayerSpec
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
    with a ``qnet``: ``secureinfer.quant.QuantizedNetwork``)."""

    backend = "pymcl"
    extra = "fe"
    security_basis = BLS12_381_SECURITY

    def __init__(self, options: dict[str, Any] | None = None, **kw: Any) -> None:
        super().__init__(options, **kw)
        self._program: Any = None

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

    def reference(self, prefix: Sequence[LayerSpec], x: np.ndarray) -> np.ndarray:
        return self._planned().qnet.forward(x)

    def check_input(self, x: np.ndarray) -> None:
        self._planned().qnet.quantize_input(x)
