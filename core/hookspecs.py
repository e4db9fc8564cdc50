"""The hooks a secureinfer plugin may implement.

A plugin is a module (or object) with functions named like these, decorated with
``secureinfer.hookimpl``, exposed through the ``secureinfer`` entry-point group::

    [project.entry-points.secureinfer]
    myscheme = "my_package.plugin"
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

__all__ = ["hookimpl", "hookspec", "secureinfer_register_schemes", "secureinfer_doctor"]

PROJECT = "secureinfer"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def secureinfer_register_schemes(register: Callable[..., None]) -> None:
    """Register the schemes a plugin provides.

    Called once when the plugin manager is first built. Call ``register`` once per scheme.

    :param register: ``register(SchemeClass, aliases=())``; ``SchemeClass`` subclasses
        ``secureinfer.Scheme`` and its ``name`` must be new. Extra ``aliases`` add to the
        class's own. A clash with a registered name or alias raises ``PluginError``.
    """


@hookspec
def secureinfer_doctor() -> list[dict[str, Any]] | None:
    """Report on anything besides scheme backends that a plugin needs.

    Called by ``secureinfer doctor``; every plugin's answer is listed.

    :return: a list of ``{"name": str, "ok": bool, "version": str | None, "hint": str}``
        dicts, or ``None`` when there is nothing to report.
    """
