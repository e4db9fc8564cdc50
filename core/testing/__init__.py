"""Testing helpers: the scheme conformance suite, usable from any project's tests.

``SchemeConformance`` is a pytest test class to subclass with ``config = "<scheme>"``.
The ``pytest11`` entry point ``secureinfer`` (``secureinfer.testing.plugin``) adds the
``--secureinfer-scheme`` option, which runs the suite against any installed scheme.
"""

from __future__ import annotations

from .holdings import decrypting_holdings, leaked_secrets, server_holdings
from .networks import NETWORKS, inputs
from .suite import SchemeConformance

__all__ = ["NETWORKS", "SchemeConformance", "decrypting_holdings", "inputs", "leaked_secrets",
           "server_holdings"]
