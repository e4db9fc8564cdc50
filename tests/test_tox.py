"""tox environments: the CPU build of torch where torch is needed, no torch where it is not.

These build real tox environments (a fresh virtualenv each, packages from pip's configured
sources), so they take a minute or two and are marked ``tox``: ``pytest -m "not tox"``
leaves them out.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.tox,
    pytest.mark.skipif(importlib.util.find_spec("tox") is None,
                       reason="tox is not installed: pip install secureinfer[dev]"),
]

ROOT = Path(__file__).resolve().parents[1]

# The distributions an environment holds, read by its own interpreter.
_LIST = ("import importlib.metadata as m, json; "
         "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))")


def _tox(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "tox", "--workdir", str(workdir),
                           "-c", str(ROOT / "tox.ini"), *args],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _installed(workdir: Path, env: str) -> dict[str, str]:
    python = workdir / env / "bin" / "python"
    out = subprocess.run([str(python), "-c", _LIST], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def _bench_result(name: str) -> dict:
    return {"scheme": name, "config": name, "security_bits": 128, "insecure": False,
            "output": "encrypted", "reveals": None, "accuracy": 0.9, "clear_accuracy": 0.9,
            "agreement": 1.0, "max_abs_error": 0.0, "throughput_per_s": 10.0,
            "latency_s": {"keygen": 0.1, "encrypt": 0.01, "evaluate": 0.02, "decrypt": 0.001},
            "bytes": {"input": 1000, "public_keys": 2000}, "peak_rss_mb": 100.0,
            "dataset": "digits", "model": "m", "samples": 10}


def test_compare_env_installs_no_torch_and_merges(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    for name in ("ckks", "fe_ip"):
        (results / f"bench-{name}.json").write_text(json.dumps([_bench_result(name)]))
    proc = _tox(tmp_path / "tox", "-e", "compare", "--", str(results))
    assert "merged bench-ckks.json, bench-fe_ip.json" in proc.stdout
    assert (results / "compare.md").is_file() and (results / "compare.png").is_file()
    dists = _installed(tmp_path / "tox", "compare")
    assert "secureinfer" in dists
    assert "torch" not in dists and not [d for d in dists if d.startswith("nvidia")], dists


def test_bench_env_gets_the_cpu_torch(tmp_path: Path) -> None:
    _tox(tmp_path / "tox", "-e", "bench-clear", "--notest")
    dists = _installed(tmp_path / "tox", "bench-clear")
    assert not [d for d in dists if d.startswith("nvidia")], sorted(dists)
    assert dists.get("torch", "").endswith("+cpu"), dists.get("torch")


def test_bench_envs_name_their_file_like_the_env() -> None:
    """``tox -e bench-fe_ip`` writes ``results/bench-fe_ip.json``: one spelling."""
    import configparser

    ini = configparser.ConfigParser(interpolation=None)
    ini.read(ROOT / "tox.ini")
    benches = [s.split(":", 1)[1] for s in ini.sections() if s.startswith("testenv:bench-")]
    assert {"bench-clear", "bench-fe_ip", "bench-fe_quad"} <= set(benches)
    for env in benches:
        set_env = ini[f"testenv:{env}"]["set_env"]
        scheme = [l.split("=", 1)[1].strip() for l in set_env.splitlines()
                  if l.strip().startswith("SCHEME")]
        assert f"bench-{scheme[0]}" == env, (env, scheme)
    assert "--name bench-{env:SCHEME}" in ini["bench"]["commands"]
