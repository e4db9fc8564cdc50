"""Human-readable reports: plan summaries, byte counts, what the server learns."""

from __future__ import annotations

import pytest

from secureinfer import ConfigError
from secureinfer.report import human_bytes, human_report, plan_summary, server_learns
from secureinfer.runner import run

# Plans shaped like the ones CKKS, BFV and FE record (trimmed; the keys the summary reads).
CKKS_PLAN = {"poly_modulus_degree": 8192, "slots": 4096, "coeff_mod_bits": [38, 27, 27, 43],
             "max_bits_128": 218, "scale_bits": 27, "depth_available": 2, "depth_needed": 2,
             "packing": "single", "batch_size": 1, "galois_keys": 11, "relin_keys": True,
             "stages": [{"layer": f"l{i}", "detail": "x" * 200} for i in range(10)]}
BFV_PLAN = {"bits": 8, "poly_modulus_degree": 8192, "plain_modulus_bits": [26, 26],
            "coeff_modulus_bits": [54, 54, 54, 54], "noise_budget_left_bits": 10.7,
            "packing": "single", "galois_keys": 10, "layers": ["..." * 300]}
FE_PLAN = {"curve": "BLS12-381", "group": "G1", "bits": 8, "functional_keys": 32}


def test_plan_summary_rows():
    assert dict(plan_summary(CKKS_PLAN)) == {
        "ring": "N = 8192 (4096 slots)",
        "chain": "ciphertext modulus 38+27+27+43 = 135 bits (at most 218 at 128-bit)",
        "scale": "2^27",
        "packing": "single, 1 input(s) per message",
        "depth": "2 used of 2 levels",
        "keys": "11 Galois (rotation) keys, relinearization keys"}
    bfv = dict(plan_summary(BFV_PLAN))
    assert bfv["chain"] == ("ciphertext modulus 54+54+54+54 = 216 bits; "
                            "plaintext moduli 26+26 = 52 bits")
    assert bfv["scale"] == "8-bit integers" and "10.7 bits" in bfv["depth"]
    assert dict(plan_summary(FE_PLAN)) == {"group": "BLS12-381 G1", "scale": "8-bit integers",
                                           "keys": "32 functional keys"}


def test_human_bytes():
    assert [human_bytes(n) for n in (None, 0, 639, 1234, 590_123, 35_800_000, 2 * 10**9)] == \
        ["-", "-", "639 B", "1.23 kB", "590 kB", "35.8 MB", "2 GB"]


def test_server_learns():
    assert server_learns("encrypted", None) == "nothing (encrypted output)"
    assert server_learns("plaintext", "the 8 outputs of fc1") == "the 8 outputs of fc1"
    assert server_learns("clear", None).startswith("everything")


def _report(plan):
    return {"config": "ckks", "backend": "tenseal", "backend_version": "0.3.18",
            "security_bits": 128, "insecure": False, "plan": plan,
            "secure_layers": ["Linear fc1 64->32"], "clear_layers": [], "output": "encrypted",
            "reveals": None, "dataset": "digits", "model": "m", "samples": 3,
            "accuracy": 1.0, "clear_accuracy": 1.0, "agreement": 1.0, "max_abs_error": 1e-3,
            "latency_s": {"keygen": 0.5, "encrypt": 0.01, "evaluate": 0.1, "decrypt": None},
            "throughput_per_s": 9.0, "peak_rss_mb": 500.0,
            "bytes": {"input": 334_000, "output": 120_500, "public_keys": 35_812_345,
                      "functional_keys": None}}


def test_human_report_summarizes_the_plan_and_sizes():
    text = human_report(_report(CKKS_PLAN))
    lines = text.splitlines()
    assert len(text) < 2000 and "x" * 50 not in text  # the plan's stages stay in --json
    assert lines[2] == "plan        ring     N = 8192 (4096 slots)"
    assert "            depth    2 used of 2 levels" in lines
    assert "output      encrypted; server learns: nothing (encrypted output)" in lines
    assert ("bytes       input 334 kB, output 120 kB, public keys 35.8 MB  "
            "(input and output per image)") in lines
    assert "35812345" not in text


def test_run_refuses_limit_zero():
    with pytest.raises(ConfigError, match="limit=0"):
        run("clear", limit=0)
