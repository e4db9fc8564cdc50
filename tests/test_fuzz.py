"""Fuzzing every parser of received bytes (``secureinfer.testing.fuzz``), with hypothesis.

One test per shared parser (envelopes, field payloads, model files, compiled artifacts,
HTTP bodies to a live service) and one per scheme
(its input, output and key payloads), each running ``EXAMPLES`` hypothesis cases of every
mutation of every target. Together they stay within 60 s (about 30 s measured on the
project's 2-core machine, setups included); ``benchmarks/fuzz.py
--minutes N`` runs the same cases for longer. Each case must raise nothing but
``SecureInferError``, finish within ``MAX_CASE_SECONDS`` and allocate at most
``max_case_bytes``.
"""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secureinfer import codec
from secureinfer.errors import ConfigError, EnvelopeError
from secureinfer.registry import get_registry
from secureinfer.testing import fuzz

EXAMPLES = 15  # per target and mutation
# Small discrete-log tables: the key and ciphertext parsers are the same at any size.
# CKKS in batch packing: flooded single-packing keys (about 75 MB of Galois keys at
# N=16384) take over 1 s to parse here; batch keys (public, relinearization) go through the
# same loader (backend.from_bytes) within it.
CONFIG = {"fe_ip": "fe-ip?dlog_table_bits=12", "fe_quad": "fe-quad?dlog_table_bits=12",
          "ckks": "ckks?packing=batch"}
SCHEMES = sorted(get_registry().schemes)

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def setups():
    configs = [CONFIG.get(name, name) for name in SCHEMES
               if get_registry().get(name).availability() is None]
    return fuzz.Setups(configs)


def _fuzz(target: fuzz.Target) -> None:
    """``EXAMPLES`` hypothesis cases of every mutation of ``target``."""
    for how in fuzz.MUTATIONS:
        @FUZZ
        @given(st.integers(0, 1 << 16), st.integers(0, 1 << 32), st.integers(0, 1 << 32))
        def run(seed: int, pos: int, value: int) -> None:
            data = fuzz.mutate(target, seed, how, pos, value)
            failure = fuzz.run_case(target, data, how)
            assert failure is None, str(failure)

        run()


@pytest.mark.parametrize("parser", sorted(fuzz.PARSERS))
def test_shared_parser_survives_mutations(parser, setups):
    target = fuzz.PARSERS[parser](setups)
    if target is None:
        pytest.skip(f"{parser}: its dependency is not installed (model files need torch)")
    _fuzz(target)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_payload_parsers_survive_mutations(scheme, setups):
    reason = get_registry().get(scheme).availability()
    if reason:
        pytest.skip(f"{scheme} not available: {reason}")
    setup = setups.scheme(CONFIG.get(scheme, scheme))
    targets = [t for t in (build(setup) for build in fuzz.SCHEME_PARSERS.values()) if t]
    assert {t.name.rsplit(".", 1)[1] for t in targets} >= {"input", "public_keys"} or \
        scheme == "clear", f"{scheme}: its input and key parsers are not fuzzed"
    for target in targets:
        _fuzz(target)


# ----- the rule's parts, each shown to be enforced -------------------------------------


def test_run_case_reports_foreign_exceptions_slow_cases_and_big_allocations():
    def crash(data):
        raise KeyError("x")

    def hog(data):
        return np.ones(64 * 2**20, dtype=np.uint8)

    assert "KeyError" in fuzz.run_case(fuzz.Target("t", (b"",), crash), b"").problem
    assert "allocated" in fuzz.run_case(fuzz.Target("t", (b"",), hog), b"").problem
    assert fuzz.run_case(fuzz.Target("t", (b"",), codec.unpack_fields), b"\0") is None
    slow = fuzz.Target("t", (b"",), lambda d: __import__("time").sleep(1.05))
    assert "took" in fuzz.run_case(slow, b"").problem


def test_mutations_change_the_seed_as_named():
    seed = codec.pack_fields({"a": b"xyz", "b": np.arange(3)})
    target = fuzz.Target("t", (seed,), codec.unpack_fields, (b"other",))
    assert fuzz.mutate(target, 0, "truncate", 5, 0) == seed[:5]
    assert fuzz.mutate(target, 0, "wrong_kind", 0, 0) == b"other"
    flipped = fuzz.mutate(target, 0, "flip", 3, 1)
    assert len(flipped) == len(seed) and sum(a != b for a, b in zip(flipped, seed)) == 1
    assert len(fuzz.mutate(target, 0, "insert", 2, 3)) == len(seed) + 4
    huge = fuzz.mutate(target, 0, "huge_length", 0, 0)
    assert len(huge) == len(seed) and huge != seed and b"\xff\xff" in huge


def test_huge_array_header_refused_before_allocation():
    body = (struct.pack("<I", 1) + struct.pack("<H", 1) + b"a" + b"a" + b"\x03<f8" + b"\x01"
            + struct.pack("<Q", 2**31) + struct.pack("<Q", 8) + b"\0" * 8)
    tracemalloc.start()
    try:
        with pytest.raises(EnvelopeError, match="do not fill"):
            codec.unpack_fields(body)
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()


def test_model_file_with_huge_header_refused_before_allocation(tmp_path):
    pytest.importorskip("torch")
    import zipfile

    from secureinfer.nn import modelfile

    header = np.lib.format.header_data_from_array_1_0(np.zeros(1))
    header["shape"] = (2**40,)
    npy = tmp_path / "x.npy"
    with open(npy, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 8)
    path = tmp_path / "m.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.write(npy, "secureinfer.json.npy")
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="claims 8796093022208 bytes"):
            modelfile.load(path)
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()


def test_artifact_arrays_with_huge_header_refused_before_allocation(setups):
    import io
    import zipfile

    from secureinfer.artifact import _parse_arrays, client_bundle
    from secureinfer.errors import ArtifactError

    header = np.lib.format.header_data_from_array_1_0(np.zeros(1))
    header["shape"] = (2**40,)
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, header)
    npy.write(b"\0" * 8)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("layer0.weight.npy", npy.getvalue())
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError, match="claims 8796093022208 bytes"):
            _parse_arrays(archive.getvalue(), "arrays.npz")
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()
    # and the artifact targets are built from real saved artifacts of every config
    manifests = [client_bundle(fuzz._saved(setups, c))[0] for c in setups.configs]
    assert fuzz.PARSERS["client_manifest"](setups).seeds == tuple(manifests)


def test_http_targets_post_to_a_live_service(setups):
    live = fuzz._live(setups)
    if live is None:
        pytest.skip("the serve extra (fastapi, uvicorn, httpx) is not installed")
    service, _ = live
    target = fuzz.PARSERS["http.keys"](setups)
    assert service.url.startswith("http://127.0.0.1:")
    assert b"key_id" in target.parse(target.seeds[0])  # the valid upload is stored
    with pytest.raises(fuzz.HttpRefused, match="^400"):
        target.parse(b"not a key bundle")
    assert fuzz.run_case(target, b"not a key bundle") is None  # a 4xx keeps the rule
