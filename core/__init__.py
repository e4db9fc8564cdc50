"""secureinfer: private neural-network inference, one API for every encryption scheme.

    >>> import secureinfer
    >>> sm = secureinfer.compile(model, scheme="ckks", input_shape=(1, 28, 28))
    >>> client, server, _ = sm.setup()       # the third: the FE authority (None for HE)
    >>> logits = client.decrypt(server.evaluate(client.encrypt(x)))

Deployed: ``secureinfer.compile(..., deploy=True).save("artifact")`` (or ``secureinfer
compile --out``; HE outputs are then sanitized, ``secureinfer.privacy``); the evaluator runs
``secureinfer.load_server("artifact")`` (or ``secureinfer serve artifact``); a data owner
runs ``secureinfer.load_client("artifact" or URL)`` or ``secureinfer.remote.connect(URL)``.
"""

from __future__ import annotations

from .config import SchemeConfig, parse as parse_config
from .errors import (
    ArtifactError,
    BackendNotInstalledError,
    CompileError,
    ConfigError,
    EnvelopeError,
    EvaluationError,
    InputError,
    InvalidLayerError,
    ModelFileError,
    PluginError,
    RangeError,
    RangeWarning,
    RoleError,
    SecureInferError,
    UnknownOptionError,
    UnknownSchemeError,
    UnsupportedLayerError,
)
from .hookspecs import hookimpl
from .layers import AvgPool2d, Conv2d, Flatten, LayerSpec, Linear, Poly
from .model import Authority, Client, ClientModel, SecureModel, Server, compile, compile_layers
from .artifact import load_client, load_server
from .registry import get_registry, resolve
from .scheme import Calibration, Capabilities, Option, Scheme, SecureLayer

__version__ = "0.1.0"

__all__ = [
    "ArtifactError", "Authority", "AvgPool2d", "BackendNotInstalledError", "Calibration",
    "Capabilities", "Client", "ClientModel", "CompileError", "ConfigError", "Conv2d",
    "EnvelopeError", "EvaluationError", "Flatten", "InputError", "InvalidLayerError",
    "LayerSpec", "Linear", "ModelFileError", "Option", "PluginError", "Poly", "RangeError",
    "RangeWarning", "RoleError", "Scheme",
    "SchemeConfig", "SecureInferError", "SecureLayer", "SecureModel", "Server",
    "UnknownOptionError", "UnknownSchemeError", "UnsupportedLayerError", "__version__",
    "compile", "compile_layers", "get_registry", "hookimpl", "list_schemes", "load_client",
    "load_server", "parse_config", "resolve",
]


def list_schemes() -> list[str]:
    """Names of every registered scheme (aliases not included)."""
    return sorted(get_registry().schemes)
