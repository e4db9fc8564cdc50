"""Inner-product functional encryption: the ``fe-ip`` scheme (alias ``ipfe``).

The data owner encrypts an input once; the authority (by default the data owner) issues
one functional key per output of the network's first linear layers; the server decrypts
exactly those inner products, learns them in plaintext and runs the rest of the network
in the clear. ABDP 2015 (DDH) over G1 of BLS12-381 with pymcl:
``pip install secureinfer[fe]``. See ``scheme`` for the construction and the speed-ups.
"""

from __future__ import annotations

from typing import Any

from secureinfer.hookspecs import hookimpl

from .scheme import InnerProductFE

__all__ = ["InnerProductFE"]


@hookimpl
def secureinfer_register_schemes(register: Any) -> None:
    """Register ``fe_ip`` (config strings may write ``fe-ip``)."""
    register(InnerProductFE)
