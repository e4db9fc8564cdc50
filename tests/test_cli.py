"""The command line, end to end through ``python -m secureinfer``."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from secureinfer import cli, registry
from secureinfer.runner import REPORT_FIELDS


def sh(*args, check=False):
    proc = subprocess.run([sys.executable, "-m", "secureinfer", *args], capture_output=True,
                          text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def clear_run():
    proc = sh("run", "--scheme", "clear", "--dataset", "digits", "--limit", "100", "--json",
              "--no-progress", check=True)
    return json.loads(proc.stdout)


def test_run_clear_json_has_every_field(clear_run):
    missing = set(REPORT_FIELDS) - set(clear_run)
    assert not missing
    assert set(clear_run["latency_s"]) == {"keygen", "encrypt", "evaluate", "decrypt"}
    assert set(clear_run["bytes"]) == {"input", "output", "public_keys", "functional_keys"}
    assert clear_run["samples"] == 100
    assert clear_run["agreement"] == 1.0
    assert clear_run["accuracy"] >= 0.9
    assert clear_run["security_bits"] is None
    # clear encrypts nothing: it never claims an encrypted output or a server that learns nothing
    assert clear_run["output"] == "clear"
    assert clear_run["reveals"] == "everything (reference, no encryption)"


def test_run_human_report_is_short_and_honest():
    out = sh("run", "--scheme", "clear?bits=8", "--limit", "5", "--no-progress",
             check=True).stdout
    lines = out.splitlines()
    assert "output      clear; server learns: everything (reference, no encryption)" in lines
    assert not any("encrypted" in line for line in lines)
    assert "plan        scale    8-bit integers" in lines and "(full plan: --json)" in out
    assert "{" not in out and max(map(len, lines)) < 200  # no JSON dump of the plan
    sizes = next(line for line in lines if line.startswith("bytes"))[len("bytes"):]
    fields = sizes.split("  (")[0].split(",")
    assert len(fields) >= 2
    assert all(re.fullmatch(r"[a-z ]+ \d[\d.]* (B|kB|MB|GB)", f.strip()) for f in fields), sizes


def test_schemes_lists_clear_output_as_clear():
    lines = sh("schemes", check=True).stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("clear "))
    assert lines[at + 1].strip().startswith("output clear,")
    rows = json.loads(sh("schemes", "--json", check=True).stdout)
    clear = next(r for r in rows if r["name"] == "clear")
    assert clear["output"] == "clear" and clear["encrypts"] is False


@pytest.mark.parametrize("config, hint", [("ckk", "did you mean 'ckks'?"),
                                          ("clear?bit=8", "did you mean 'bits'?")])
def test_unknown_name_suggests_a_near_match(config, hint):
    proc = sh("run", "--scheme", config)
    assert proc.returncode == 2 and hint in proc.stderr


def test_limit_zero_is_an_error():
    proc = sh("run", "--scheme", "clear", "--limit", "0")
    assert proc.returncode == 2 and "N >= 1" in proc.stderr


def test_random_bytes_as_model_say_how_to_make_one(tmp_path):
    junk = tmp_path / "m.npz"
    junk.write_bytes(bytes(range(256)) * 4)
    proc = sh("run", "--scheme", "clear", "--model", str(junk), "--no-progress")
    assert proc.returncode == 2
    assert "is not a secureinfer model file" in proc.stderr
    assert "secureinfer train" in proc.stderr and "secureinfer.nn.save" in proc.stderr
    assert "pickle" not in proc.stderr


def test_unknown_scheme_exits_2_and_lists_clear():
    proc = sh("run", "--scheme", "nosuch")
    assert proc.returncode == 2
    assert "clear" in proc.stderr and "nosuch" in proc.stderr


def test_unknown_option_exits_2():
    proc = sh("run", "--scheme", "clear?nosuch=1")
    assert proc.returncode == 2 and "bits" in proc.stderr


def test_bad_dataset_exits_2(tmp_path):
    proc = sh("run", "--scheme", "clear", "--dataset", f"npz:{tmp_path / 'none.npz'}")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_usage_error_exits_2():
    assert sh("run", "--limit", "many").returncode == 2


def test_schemes_json_fields():
    rows = json.loads(sh("schemes", "--json", check=True).stdout)
    clear = next(r for r in rows if r["name"] == "clear")
    for key in ("aliases", "backend", "output", "exact", "layers", "installed", "why_not"):
        assert key in clear
    assert clear["installed"] and "plain" in clear["aliases"]


def test_doctor_lists_schemes_and_plugin_checks(capsys):
    class Extra:
        @staticmethod
        @registry.hookspecs.hookimpl
        def secureinfer_doctor():
            return [{"name": "acme-hsm", "ok": False, "version": None,
                     "hint": "pip install acme-hsm"}]

    pm = registry.get_plugin_manager()
    pm.register(Extra, name="extra-doctor")
    try:
        assert cli.main(["doctor", "--json"]) == 0
    finally:
        pm.unregister(name="extra-doctor")
    checks = json.loads(capsys.readouterr().out)
    names = [c["name"] for c in checks]
    assert "acme-hsm" in names and any(n.startswith("scheme clear") for n in names)


def test_bench_writes_three_files(tmp_path):
    sh("bench", "--schemes", "clear,clear?bits=8", "--limit", "50", "--out", str(tmp_path),
       "--no-progress", check=True)
    results = json.loads((tmp_path / "bench.json").read_text())
    assert [r["config"] for r in results] == ["clear", "clear?bits=8"]
    md = (tmp_path / "bench.md").read_text()
    assert "`clear?bits=8`" in md and "evaluate ms/img" in md
    assert "everything (reference, no encryption)" in md  # clear never claims privacy
    png = (tmp_path / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_compare_merges(tmp_path):
    for name in ("clear", "other"):
        r = {k: None for k in REPORT_FIELDS}
        r.update(scheme=name, config=name, output="encrypted", security_bits=128,
                 accuracy=0.9, clear_accuracy=0.9, agreement=1.0, max_abs_error=0.0,
                 throughput_per_s=10.0, peak_rss_mb=100.0, dataset="digits", samples=5,
                 latency_s={"keygen": 0.1, "encrypt": 0.01, "evaluate": 0.1, "decrypt": 0.01},
                 bytes={"input": 1000, "output": 100, "public_keys": 10, "functional_keys": 0})
        (tmp_path / f"bench-{name}.json").write_text(json.dumps([r]))
    proc = sh("compare", str(tmp_path), check=True)
    assert "bench-clear.json" in proc.stdout
    assert (tmp_path / "compare.md").read_text().count("| `") == 2
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_compare_without_results_exits_2(tmp_path):
    proc = sh("compare", str(tmp_path))
    assert proc.returncode == 2 and "bench-clear" in proc.stderr


def test_env_var_config(monkeypatch):
    monkeypatch.setenv("SECUREINFER_SCHEME", "nosuch")
    assert sh("run").returncode == 2
