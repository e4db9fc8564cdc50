"""Config strings: ``name[:backend][?key=value&key=value]``.

Case-insensitive, ``-`` and ``_`` equivalent. The same keys come from a TOML file
(``[scheme]`` table with ``name``, optional ``backend`` and any option keys) and from the
``SECUREINFER_SCHEME`` environment variable (a config string).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from .errors import ConfigError

__all__ = ["ENV_VAR", "SchemeConfig", "from_env", "load_toml", "normalize", "parse"]

ENV_VAR = "SECUREINFER_SCHEME"


def normalize(name: str) -> str:
    """Lowercase, ``-`` as ``_``, surrounding space removed."""
    return name.strip().lower().replace("-", "_")


@dataclass(frozen=True)
class SchemeConfig:
    """A parsed config: scheme name, optional backend, option values (still raw)."""

    name: str
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        text = self.name + (f":{self.backend}" if self.backend else "")
        if self.options:
            text += "?" + "&".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return text


def parse(text: str | SchemeConfig) -> SchemeConfig:
    """Parse a config string such as ``"ckks?poly_modulus_degree=16384&scale_bits=30"``.

    Raises:
        ConfigError: on an empty name, a key without ``=``, or a key given twice.
    """
    if isinstance(text, SchemeConfig):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"a scheme config must be a non-empty string, got {text!r}")
    head, _, query = text.strip().partition("?")
    name, _, backend = head.partition(":")
    if not normalize(name):
        raise ConfigError(f"config {text!r} has no scheme name (expected name[:backend][?k=v&...])")
    options: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not normalize(key):
            raise ConfigError(f"config {text!r}: {part!r} is not key=value")
        key = normalize(unquote(key))
        if key in options:
            raise ConfigError(f"config {text!r}: key {key!r} given twice")
        options[key] = unquote(value.strip())
    return SchemeConfig(normalize(name), normalize(backend) or None, options)


def load_toml(path: str | os.PathLike[str]) -> SchemeConfig:
    """Read the ``[scheme]`` table of a TOML file into a ``SchemeConfig``."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read scheme config {p}: {exc}") from None
    table = data.get("scheme")
    if not isinstance(table, dict) or "name" not in table:
        raise ConfigError(f"{p}: expected a [scheme] table with at least name = \"...\"")
    table = {normalize(k): v for k, v in table.items()}
    name = str(table.pop("name"))
    backend = table.pop("backend", None)
    return SchemeConfig(normalize(name), normalize(str(backend)) if backend else None, table)


def from_env(default: str | None = None) -> SchemeConfig | None:
    """The config in ``SECUREINFER_SCHEME``, else ``default`` parsed, else ``None``."""
    text = os.environ.get(ENV_VAR) or default
    return parse(text) if text else None
