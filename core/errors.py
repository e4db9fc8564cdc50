"""The exceptions secureinfer raises.

Every error says what was wrong, where (the layer, the key, the value) and what to change.
"""

from __future__ import annotations

import difflib

__all__ = [
    "ArtifactError",
    "BackendNotInstalledError",
    "CompileError",
    "ConfigError",
    "EnvelopeError",
    "EvaluationError",
    "InputError",
    "InvalidLayerError",
    "ModelFileError",
    "PluginError",
    "RangeError",
    "RangeWarning",
    "RoleError",
    "SecureInferError",
    "UnknownOptionError",
    "UnknownSchemeError",
    "UnsupportedLayerError",
]


class SecureInferError(Exception):
    """Base class of every error raised by secureinfer."""


class ConfigError(SecureInferError, ValueError):
    """A config string, TOML file or option value is malformed."""


def did_you_mean(word: str, valid: list[str]) -> str:
    """``" (did you mean 'x'?)"`` when ``valid`` holds a near match of ``word``, else ``""``.

    Spelling differences of ``-`` and ``_`` and of case do not count.
    """
    norm = {v.lower().replace("-", "_"): v for v in valid}
    near = difflib.get_close_matches(word.strip().lower().replace("-", "_"), list(norm),
                                     n=2, cutoff=0.6)
    if not near:
        return ""
    return " (did you mean " + " or ".join(repr(norm[n]) for n in near) + "?)"


class UnknownSchemeError(ConfigError):
    """No registered scheme has this name or alias."""

    def __init__(self, name: str, valid: list[str]) -> None:
        self.name = name
        self.valid = sorted(valid)
        super().__init__(
            f"unknown scheme {name!r}{did_you_mean(name, self.valid)}; valid schemes: "
            f"{', '.join(self.valid) or '(none registered)'}"
        )


class UnknownOptionError(ConfigError):
    """A config key that the chosen scheme does not declare."""

    def __init__(self, scheme: str, key: str, valid: list[str]) -> None:
        self.scheme = scheme
        self.key = key
        self.valid = sorted(valid)
        super().__init__(
            f"scheme {scheme!r} has no option {key!r}{did_you_mean(key, self.valid)}; valid "
            f"options: {', '.join(self.valid) or '(none)'}"
        )


class InputError(SecureInferError, ValueError):
    """An input given to a role call is malformed: wrong shape, NaN, not numbers."""


class RoleError(SecureInferError, ValueError):
    """A role was asked for what it cannot do: it lacks the key, or the scheme's kind of
    output rules it out (e.g. an FE client without the authority's public keys)."""


class ModelFileError(ConfigError):
    """A file given as a model is not a secureinfer model file (or is damaged)."""


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


class InvalidLayerError(CompileError, ValueError):
    """A LayerSpec is inconsistent: its weights do not fit its input shape."""


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
