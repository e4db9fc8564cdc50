"""The README's plugin example is a working third-party plugin that passes the suite."""

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


def test_readme_plugin_passes_conformance(tmp_path):
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
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tests)], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout

    run = subprocess.run([sys.executable, "-m", "secureinfer", "schemes"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert "toy (aliases: toy_scale)" in run.stdout


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
