"""The plugin system: entry points (third-party included), blocking, registration errors."""

from __future__ import annotations

import sys
import textwrap

import pytest

import secureinfer
from secureinfer import registry
from secureinfer.errors import PluginError


@pytest.fixture
def fresh_registry():
    registry.reset()
    yield
    registry.reset()


def _third_party(tmp_path, name="acme_scheme"):
    """A distribution outside this repository: a module and a .dist-info declaring an
    entry point in the ``secureinfer`` group."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f'''
        import numpy as np
        import secureinfer
        from secureinfer import codec

        class Negate(secureinfer.SecureLayer):
            def forward(self, value):
                return self.spec.forward(value)

        class AcmeScheme(secureinfer.Scheme):
            name = "acme"
            aliases = ("acme-he",)
            backend = "acme"
            capabilities = secureinfer.Capabilities(
                layers=frozenset({{"linear", "flatten", "poly"}}), tolerance=1e-9)
            layer_types = {{k: Negate for k in ("linear", "flatten", "poly")}}

            def keygen(self):
                return None, b"pk"

            def encrypt(self, keys, x):
                return codec.pack_fields({{"x": np.asarray(x, dtype=np.float64)}})

            def decrypt(self, secret, output):
                return codec.unpack_fields(output)["y"]

            def open_server(self, public, functional):
                assert public == b"pk"
                return None

            def load_input(self, ctx, payload):
                return codec.unpack_fields(payload)["x"]

            def dump_output(self, ctx, value):
                return codec.pack_fields({{"y": value}})

        @secureinfer.hookimpl
        def secureinfer_register_schemes(register):
            register(AcmeScheme)
    '''))
    dist = tmp_path / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[secureinfer]\nacme = {name}\n")
    return tmp_path


def test_third_party_entry_point_discovered_and_runs(tmp_path, monkeypatch, fresh_registry):
    import numpy as np

    monkeypatch.syspath_prepend(str(_third_party(tmp_path)))
    assert "acme" in secureinfer.list_schemes()
    assert registry.resolve("ACME_HE").name == "acme"
    layers = [secureinfer.Linear("fc", (3,), weight=np.eye(3), bias=np.ones(3)),
              secureinfer.Poly("sq", (3,))]
    sm = secureinfer.compile_layers(layers, "acme")
    client, server, _ = sm.setup()
    x = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(client.decrypt(server.evaluate(client.encrypt(x))),
                               [[4.0, 9.0, 16.0]])
    sys.modules.pop("acme_scheme", None)


def test_blocked_plugin_is_not_loaded(tmp_path, monkeypatch, fresh_registry):
    monkeypatch.syspath_prepend(str(_third_party(tmp_path)))
    monkeypatch.setenv(registry.BLOCK_ENV_VAR, "acme, unrelated")
    assert "acme" not in secureinfer.list_schemes()
    assert "clear" in secureinfer.list_schemes()
    sys.modules.pop("acme_scheme", None)


def test_in_tree_plugins_load_through_entry_points(fresh_registry):
    import importlib.metadata as md

    eps = {ep.name: ep.value for ep in md.entry_points(group="secureinfer")}
    assert eps["clear"] == "secureinfer.plugins.clear"
    pm = registry.get_plugin_manager()
    assert pm.get_plugin("clear") is sys.modules["secureinfer.plugins.clear"]


def test_misspelled_hook_fails_at_load(monkeypatch, fresh_registry):
    import pluggy

    class Bad:
        @secureinfer.hookimpl
        def secureinfer_register_schemez(self, register):  # typo
            pass

    pm = registry.get_plugin_manager()
    pm.register(Bad(), name="bad")
    with pytest.raises(pluggy.PluginValidationError):
        pm.check_pending()
    pm.unregister(name="bad")


def test_name_clash_is_plugin_error():
    reg = registry.Registry()
    from secureinfer.plugins.clear import ClearScheme

    reg.register(ClearScheme)
    with pytest.raises(PluginError, match="already registered"):
        reg.register(ClearScheme)


def test_register_rejects_non_scheme():
    with pytest.raises(PluginError):
        registry.Registry().register(object)  # type: ignore[arg-type]


def test_every_hookspec_is_documented_and_tested():
    from secureinfer import hookspecs

    specs = [n for n in dir(hookspecs) if n.startswith("secureinfer_")]
    assert specs
    source = open(__file__).read() + open(__file__.replace("test_plugins", "test_cli")).read()
    for name in specs:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert len(doc.split()) > 10, f"hook {name} needs a docstring"
        assert name in source, f"hook {name} has no test"
