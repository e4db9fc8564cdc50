"""The exceptions secureinfer raises.

Every error says what was wrong, where (the layer, the key, the value) and what to change.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "BackendNotInstalledError",
    "CompileError",
    "ConfigError",
    "EnvelopeError",
    "EvaluationError",
    "PluginError",
    "RangeError",
    "RangeWarning",
    "SecureInferError",
    "UnknownOptionError",
    "UnknownSchemeError",
    "UnsupportedLayerError",
]


class SecureInferError(Exception):
    """Base class of every error raised by secureinfer."""


class ConfigError(SecureInferError, ValueError):
    """A config string, TOML file or option value is malformed."""


class UnknownSchemeError(ConfigError):
    """No registered scheme has this name or alias."""

    def __init__(self, name: str, valid: list[str]) -> None:
        self.name = name
        self.valid = sorted(valid)
        super().__init__(
            f"unknown scheme {name!r}; valid schemes: {', '.join(self.valid) or '(none registered)'}"
        )


class UnknownOptionError(ConfigError):
    """A config key that the chosen scheme does not declare."""

    def __init__(self, scheme: str, key: str, valid: list[str]) -> None:
        self.scheme = scheme
        self.key = key
        self.valid = sorted(valid)
        super().__init__(
            f"scheme {scheme!r} has no option {key!r}; valid options: "
            f"{', '.join(self.valid) or '(none)'}"
        )


class BackendNotInstalledError(SecureInferError, ImportError):
    """The library a scheme runs on cannot be imported."""


class PluginError(SecureInferError):
    """A plugin failed to load or registered something invalid."""


class CompileError(SecureInferError):
    """The model cannot be compiled for the chosen scheme."""


class UnsupportedLayerError(CompileError):
    """A layer of the torch model has no HE-friendly equivalent."""


class ArtifactError(SecureInferError, ValueError):
    """A compiled artifact is missing, corrupt, foreign or of another format version (the
    message names the file and the field)."""


class EnvelopeError(SecureInferError, ValueError):
    """A message is not a valid secureinfer envelope, or belongs to another setup."""


class EvaluationError(SecureInferError, RuntimeError):
    """A scheme's backend failed while the server ran a layer (the message names it)."""

    def __init__(self, scheme: str, layer: str, kind: str, cause: BaseException) -> None:
        self.scheme, self.layer, self.kind = scheme, layer, kind
        super().__init__(
            f"layer {layer} ({kind}): the {scheme} backend failed: "
            f"{type(cause).__name__}: {cause}. The input passed the envelope checks, so this "
            "is a plugin or backend fault: report it with the scheme's plan "
            "(`SecureModel.plan`)")


class RangeError(SecureInferError, ValueError):
    """A value left the range the scheme was planned for (it would give a wrong result)."""


class RangeWarning(UserWarning):
    """A value left the range calibrated on the training data (the result may be off)."""
