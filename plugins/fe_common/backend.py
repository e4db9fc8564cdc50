"""Lazy import of pymcl (mcl's BLS12-381 pairing groups), shared by the FE plugins."""

from __future__ import annotations

from types import ModuleType

from secureinfer.errors import BackendNotInstalledError
from secureinfer.scheme import import_problem

__all__ = ["EXTRA_HINT", "availability", "backend_version", "pymcl"]

EXTRA_HINT = "pip install secureinfer[fe]  (installs pymcl, mcl's BLS12-381 pairing library)"


def pymcl() -> ModuleType:
    """The ``pymcl`` module, imported on first use.

    Raises:
        BackendNotInstalledError: pymcl is missing; the message says what to install.
    """
    try:
        import pymcl as module
    except ImportError as exc:
        raise BackendNotInstalledError(
            f"the functional-encryption schemes need pymcl, which does not import ({exc}): "
            f"{EXTRA_HINT}") from None
    return module


def availability() -> str | None:
    """``None`` when pymcl imports, else why not and what to install."""
    return import_problem(pymcl)


def backend_version() -> str | None:
    """pymcl's version, or ``None`` when it is missing."""
    try:
        return str(getattr(pymcl(), "__version__", "unknown"))
    except BackendNotInstalledError:
        return None
