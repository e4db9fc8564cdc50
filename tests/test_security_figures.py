"""Every security figure says how it was obtained: ``secureinfer schemes``, the plan, the
model summary and the reports."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from secureinfer.model import compile_layers
from secureinfer.registry import get_registry
from secureinfer.report import write_reports
from secureinfer.runner import REPORT_FIELDS
from secureinfer.testing import NETWORKS, inputs

# What each in-tree scheme's figure must cite.
CITES = {
    "ckks": ("HomomorphicEncryption.org security standard", "ternary-secret row", "N=",
             "log q <="),
    "bfv": ("HomomorphicEncryption.org security standard", "ternary-secret row", "N=",
            "log q <="),
    "fe_ip": ("CFRG", "BLS12-381", "128-bit level", "exTNFS", "117-126 bits"),
    "fe_quad": ("CFRG", "BLS12-381", "128-bit level", "exTNFS", "117-126 bits"),
}


def _available(name: str) -> None:
    reason = get_registry().get(name).availability()
    if reason:
        pytest.skip(f"{name} not available: {reason}")


@pytest.mark.parametrize("name", sorted(CITES))
def test_plan_states_its_source(name):
    _available(name)
    layers = NETWORKS["mlp_square"](np.random.default_rng(0))
    sm = compile_layers(layers, name, calibration=inputs(layers, 64, seed=2))
    source = sm.scheme.security_source
    assert sm.scheme.security_bits == 128
    for phrase in CITES[name]:
        assert phrase in source, (name, phrase, source)
    assert sm.scheme.plan_["security_source"] == source
    assert f"security from: {source}" in sm.summary()
    if name in ("ckks", "bfv"):  # the row of the planned ring degree, and the plan's log q
        n = sm.scheme.plan_["poly_modulus_degree"]
        assert f"N={n}:" in source and "this plan: log q = " in source


def test_ckks_below_the_table_says_it_extrapolates():
    _available("ckks")
    from secureinfer.plugins.ckks.params import security_bits, security_source

    assert "extrapolation, not a table value" in security_source(4096, 218)
    assert f"figure {security_bits(4096, 218)} " in security_source(4096, 218)
    assert "log q <= 218" in security_source(8192, 200)


def test_schemes_listing_states_each_basis():
    proc = subprocess.run([sys.executable, "-m", "secureinfer", "schemes", "--json"],
                          capture_output=True, text=True, check=True, timeout=300)
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    for name, phrases in CITES.items():
        assert all(p in rows[name]["security_basis"] for p in phrases[:2]), rows[name]
    assert rows["clear"]["security_basis"] is None  # it encrypts nothing
    text = subprocess.run([sys.executable, "-m", "secureinfer", "schemes"],
                          capture_output=True, text=True, check=True, timeout=300).stdout
    assert text.count("    security: ") == len(CITES)
    assert "117-126 bits" in text


def test_reports_state_the_source(tmp_path):
    assert "security_source" in REPORT_FIELDS
    r = {k: None for k in REPORT_FIELDS}
    r.update(scheme="fe_ip", config="fe-ip", output="plaintext", security_bits=128,
             security_source=CITES["fe_ip"][1] + ": listed at the 128-bit level (CFRG)",
             accuracy=0.9, clear_accuracy=0.9, agreement=1.0, max_abs_error=0.0,
             throughput_per_s=10.0, peak_rss_mb=100.0, dataset="digits", samples=5,
             latency_s={"keygen": 0.1, "encrypt": 0.01, "evaluate": 0.1, "decrypt": 0.01},
             bytes={"input": 1000, "output": 100, "public_keys": 10, "functional_keys": 0})
    md_path = write_reports([r], tmp_path)[1]
    assert "- `fe-ip`: 128-bit figure from BLS12-381: listed at the 128-bit level (CFRG)." \
        in md_path.read_text()


def test_reports_state_what_protects_he_outputs(tmp_path):
    if get_registry().get("ckks").availability():
        pytest.skip(f"ckks: {get_registry().get('ckks').availability()}")
    layers = NETWORKS["mlp_square"](np.random.default_rng(0))
    calib = inputs(layers, 16, seed=1)
    results = []
    for deploy in (False, True):
        sm = compile_layers(layers, "ckks", calibration=calib, deploy=deploy)
        r = {k: None for k in REPORT_FIELDS}
        r.update(scheme="ckks", config=f"ckks-{deploy}", output="encrypted", security_bits=128,
                 plan=sm.plan, accuracy=0.9, clear_accuracy=0.9, agreement=1.0,
                 max_abs_error=0.0, throughput_per_s=10.0, peak_rss_mb=100.0,
                 dataset="digits", samples=5,
                 latency_s={"keygen": 0.1, "encrypt": 0.01, "evaluate": 0.1, "decrypt": 0.01},
                 bytes={"input": 1000, "output": 100, "public_keys": 10, "functional_keys": 0})
        results.append(r)
    md = write_reports(results, tmp_path)[1].read_text()
    one, deployed = (next(line for line in md.splitlines()
                          if line.startswith(f"- `ckks-{d}` outputs")) for d in (False, True))
    assert "off by default" in one and "one process" in one
    assert "on by default" in deployed and "2^-16" in deployed
