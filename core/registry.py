"""Plugin loading and the scheme registry.

In-tree schemes and third-party ones load the same way: through the ``secureinfer``
entry-point group. ``SECUREINFER_BLOCK_PLUGINS`` (comma-separated entry-point names) keeps
plugins from loading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .config import SchemeConfig, normalize, parse
from .errors import PluginError, UnknownSchemeError
from .scheme import Scheme

__all__ = [
    "BLOCK_ENV_VAR",
    "Registry",
    "get_plugin_manager",
    "get_registry",
    "reset",
    "resolve",
]

BLOCK_ENV_VAR = "SECUREINFER_BLOCK_PLUGINS"
ENTRY_POINT_GROUP = "secureinfer"


@dataclass
class Registry:
    """Scheme classes by name, and aliases pointing at names."""

    schemes: dict[str, type[Scheme]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def register(self, scheme_cls: type[Scheme], aliases: tuple[str, ...] | list[str] = ()) -> None:
        """Add ``scheme_cls`` under its ``name`` and aliases (plugins call this)."""
        if not (isinstance(scheme_cls, type) and issubclass(scheme_cls, Scheme)):
            raise PluginError(f"register() takes a Scheme subclass, got {scheme_cls!r}")
        name = normalize(getattr(scheme_cls, "name", "") or "")
        if not name:
            raise PluginError(f"{scheme_cls.__qualname__} has no name")
        if not hasattr(scheme_cls, "capabilities"):
            raise PluginError(f"scheme {name!r} declares no capabilities")
        for key in (name, *map(normalize, (*scheme_cls.aliases, *aliases))):
            if key in self.schemes or key in self.aliases:
                raise PluginError(f"scheme name or alias {key!r} of {scheme_cls.__qualname__} "
                                  f"is already registered")
        self.schemes[name] = scheme_cls
        for alias in map(normalize, (*scheme_cls.aliases, *aliases)):
            self.aliases[alias] = name

    def names(self) -> list[str]:
        """Every valid name and alias."""
        return sorted([*self.schemes, *self.aliases])

    def get(self, name: str) -> type[Scheme]:
        """The scheme class for a name or alias, or ``UnknownSchemeError``."""
        key = normalize(name)
        key = self.aliases.get(key, key)
        try:
            return self.schemes[key]
        except KeyError:
            raise UnknownSchemeError(name, self.names()) from None


_pm: pluggy.PluginManager | None = None
_registry: Registry | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The plugin manager, with entry-point plugins loaded (built once)."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        for blocked in filter(None, map(str.strip, os.environ.get(BLOCK_ENV_VAR, "").split(","))):
            pm.set_blocked(blocked)
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        pm.check_pending()
        _pm = pm
    return _pm


def get_registry() -> Registry:
    """The registry filled by every plugin's ``secureinfer_register_schemes``."""
    global _registry
    if _registry is None:
        registry = Registry()
        get_plugin_manager().hook.secureinfer_register_schemes(register=registry.register)
        _registry = registry
    return _registry


def reset() -> None:
    """Forget the plugin manager and registry (they are rebuilt on next use)."""
    global _pm, _registry
    _pm = None
    _registry = None


def resolve(config: str | SchemeConfig, *, allow_insecure: bool = False,
            deploy: bool = False, **overrides: Any) -> Scheme:
    """Build a configured ``Scheme`` from a config string (``"fe-ip?bits=8"``).

    Keyword ``overrides`` take precedence over the string's keys. ``deploy``: the model
    will be deployed (the client does not hold it; ``Scheme.deploy``).

    Raises:
        UnknownSchemeError: no such scheme; the message lists the valid ones.
        UnknownOptionError: a key the scheme does not declare; lists the valid keys.
    """
    cfg = parse(config)
    cls = get_registry().get(cfg.name)
    if cfg.backend and cfg.backend != normalize(cls.backend or ""):
        from .errors import ConfigError

        raise ConfigError(f"scheme {cls.name!r} runs on backend {cls.backend!r}, "
                          f"not {cfg.backend!r}")
    options = {**cfg.options, **{normalize(k): v for k, v in overrides.items()}}
    return cls(options, allow_insecure=allow_insecure, deploy=deploy)
