"""pytest plugin: ``pytest --secureinfer-scheme CONFIG`` runs the conformance suite on it.

Loaded automatically through the ``pytest11`` entry point. Without the option it adds
nothing to a test session.
"""

from __future__ import annotations

from typing import Any

import pytest

__all__ = ["pytest_addoption", "pytest_collect_file"]


def pytest_addoption(parser: Any) -> None:
    """Add ``--secureinfer-scheme``."""
    group = parser.getgroup("secureinfer")
    group.addoption("--secureinfer-scheme", action="append", default=[], metavar="CONFIG",
                    help="run the secureinfer conformance suite against this scheme config "
                         "(repeatable)")


class _SuiteModule(pytest.Module):
    def _getobj(self) -> Any:
        import types

        from .suite import SchemeConformance

        mod = types.ModuleType("secureinfer_conformance")
        for config in self.config.getoption("--secureinfer-scheme"):
            name = "TestConformance_" + "".join(c if c.isalnum() else "_" for c in config)
            setattr(mod, name, type(name, (SchemeConformance,), {"config": config}))
        return mod


def pytest_collect_file(file_path: Any, parent: Any) -> Any:
    """Attach the generated suite to the session once (to the first ``conftest``-level dir)."""
    if not parent.config.getoption("--secureinfer-scheme"):
        return None
    if getattr(parent.config, "_secureinfer_suite_added", False):
        return None
    parent.config._secureinfer_suite_added = True
    return _SuiteModule.from_parent(parent, path=file_path)
