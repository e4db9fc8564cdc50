"""A wheel install imports the same way as the editable install: core as ``secureinfer``,
plugins as ``secureinfer.plugins.*``, in-tree schemes through entry points."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import json, secureinfer, secureinfer.plugins.clear as clear, secureinfer.testing
print(json.dumps({"core": secureinfer.__file__, "clear": clear.__file__,
                  "schemes": secureinfer.list_schemes()}))
"""


def _probe(env_path: str | None, cwd: Path) -> dict:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    if env_path:
        env["PYTHONPATH"] = env_path
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-w", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return next(out.glob("secureinfer-*.whl"))


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "secureinfer/__init__.py" in names
    assert "secureinfer/plugins/clear/__init__.py" in names
    # the ckks plugin's native part is compiled into the wheel (optional only without a
    # C compiler, which this machine has)
    assert any(n.startswith("secureinfer/plugins/ckks/_native") and n.endswith(".so")
               for n in names)
    assert not any(n.startswith(("core/", "plugins/")) for n in names)
    ep = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(ep).decode()
    assert "clear = secureinfer.plugins.clear" in text


def test_wheel_and_editable_import_alike(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), str(wheel)], check=True, timeout=600)
    from_wheel = _probe(str(target), tmp_path)
    editable = _probe(None, tmp_path)
    assert from_wheel["core"].startswith(str(target))
    assert from_wheel["clear"].startswith(str(target))
    assert Path(editable["core"]).parent == ROOT / "core"
    assert "clear" in from_wheel["schemes"] and from_wheel["schemes"] == editable["schemes"]
