"""The README's plugin example: a working third-party plugin, and the conformance suite's
negative example. It passes every test but "the server can decrypt nothing", which it fails
as it must (its server holds the secret factor)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _example() -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- plugin-example -->", 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def test_readme_plugin_fails_only_the_no_decryption_test(tmp_path):
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "secureinfer_toy.py").write_text(_example())
    dist = pkg / "secureinfer_toy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: secureinfer-toy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[secureinfer]\ntoy = secureinfer_toy\n")
    tests = tmp_path / "test_toy.py"
    tests.write_text("from secureinfer.testing import SchemeConformance\n\n"
                     "class TestToy(SchemeConformance):\n"
                     "    config = 'toy'\n    allow_insecure = True\n")
    env = {"PYTHONPATH": str(pkg), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p",
                           "no:cacheprovider", str(tests)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, re.M)
    from secureinfer.testing import NETWORKS

    assert proc.returncode == 1, proc.stdout[-3000:]
    assert sorted(failed) == sorted(f"test_toy.py::TestToy::test_server_can_decrypt_nothing"
                                    f"[{net}]" for net in NETWORKS), proc.stdout[-3000:]
    assert "the server decrypts the output with what it holds: server.ctx" in proc.stdout
    assert re.search(r"\b\d{2,} passed", proc.stdout), proc.stdout[-3000:]

    run = subprocess.run([sys.executable, "-m", "secureinfer", "schemes"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert "toy (aliases: toy_scale)" in run.stdout


def test_toy_server_decrypts_with_what_it_holds(tmp_path, monkeypatch):
    """In process: the holdings check finds the factor the toy hands its server."""
    import importlib

    import numpy as np

    import secureinfer
    from secureinfer import registry
    from secureinfer.testing import decrypting_holdings, leaked_secrets

    (tmp_path / "secureinfer_toy.py").write_text(_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("secureinfer_toy")
    try:
        layers = [secureinfer.Linear("fc", (3,), weight=np.arange(6.0).reshape(2, 3),
                                     bias=np.ones(2))]
        sm = secureinfer.compile_layers(layers, mod.ToyScheme(allow_insecure=True))
        parties = sm.setup()
        x = np.random.default_rng(0).random((2, 3))
        out = parties.server.evaluate(parties.client.encrypt(x))
        want = parties.client.decrypt(out)
        found = decrypting_holdings(sm, parties, out, want)
        assert found == ["server.ctx", "received['public_keys_fields']['k']"]
        assert leaked_secrets(sm, parties) == ["secret == server.ctx"]
        # a wrong answer is not a decryption: a different "want" is not recovered
        assert decrypting_holdings(sm, parties, out, want + 1) == []
    finally:
        sys.modules.pop("secureinfer_toy", None)
        registry.reset()


def test_insecure_plugin_refused_without_opt_in(tmp_path, monkeypatch):
    import numpy as np

    import secureinfer
    from secureinfer import registry

    (tmp_path / "secureinfer_toy.py").write_text(_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("secureinfer_toy")
    layers = [secureinfer.Linear("fc", (2,), weight=np.eye(2), bias=np.zeros(2))]
    scheme = mod.ToyScheme()
    try:
        secureinfer.compile_layers(layers, scheme)
    except secureinfer.CompileError as exc:
        assert "0-bit" in str(exc) and "allow_insecure" in str(exc)
    else:
        raise AssertionError("a 0-bit scheme compiled without allow_insecure")
    sm = secureinfer.compile_layers(layers, mod.ToyScheme(allow_insecure=True))
    assert "INSECURE" in sm.summary()
    sys.modules.pop("secureinfer_toy", None)
    registry.reset()
