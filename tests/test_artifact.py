"""Compiled artifacts: what each part holds, the round trip for every scheme, and refusals."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import secureinfer
from secureinfer import ArtifactError
from secureinfer.artifact import ARTIFACT_VERSION
from secureinfer.cli import main
from secureinfer.testing import NETWORKS, inputs

SCHEMES = ["clear", "clear?bits=8", "ckks", "ckks?packing=batch", "bfv", "fe-ip", "fe-quad"]


def _need(config: str) -> None:
    reason = secureinfer.resolve(config).availability()
    if reason:
        pytest.skip(f"{config}: {reason}")


def _compiled(config: str, net: str = "mlp_square"):
    layers = NETWORKS[net](np.random.default_rng(3))
    x = inputs(layers, 48, seed=4)
    return secureinfer.compile_layers(layers, config, calibration=x, deploy=True), x


def _weights(layers) -> list[np.ndarray]:
    return [a for spec in layers for a in (getattr(spec, "weight", None),
                                           getattr(spec, "bias", None)) if a is not None]


def _client_numbers(directory: Path) -> list[np.ndarray]:
    """Every array in client/arrays.npz and every numeric list in client/manifest.json."""
    found: list[np.ndarray] = []
    npz = directory / "client" / "arrays.npz"
    if npz.exists():
        with np.load(npz, allow_pickle=False) as data:
            found += [data[k] for k in data.files]

    def walk(value):
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            found.append(np.asarray(value, dtype=np.float64))
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    walk(json.loads((directory / "client" / "manifest.json").read_text()))
    return found


def _contains(haystack: list[np.ndarray], needle: np.ndarray) -> bool:
    flat = needle.reshape(-1)
    return any(h.size == flat.size and np.allclose(h.reshape(-1), flat) for h in haystack)


@pytest.mark.parametrize("config", ["clear", "clear?bits=8", "ckks", "bfv"])
@pytest.mark.parametrize("net", ["mlp_square", "cnn"])
def test_he_client_artifact_holds_no_weight(tmp_path, config, net):
    _need(config)
    sm, _ = _compiled(config, net)
    sm.save(tmp_path)
    numbers = _client_numbers(tmp_path)
    weights = _weights(sm.layers)
    assert weights and not any(_contains(numbers, w) for w in weights)
    assert not (tmp_path / "client" / "arrays.npz").exists()
    with np.load(tmp_path / "server" / "arrays.npz", allow_pickle=False) as data:
        stored = [data[k] for k in data.files]
    assert all(_contains(stored, w) for w in weights)  # the server part has every one


@pytest.mark.parametrize("config,net", [("fe-ip", "mlp_square"), ("fe-quad", "mlp_poly")])
def test_fe_client_artifact_holds_exactly_the_prefix_weights(tmp_path, config, net):
    _need(config)
    sm, _ = _compiled(config, net)
    sm.save(tmp_path)
    numbers = _client_numbers(tmp_path)
    assert sm.clear_layers
    assert all(_contains(numbers, w) for w in _weights(sm.secure_layers))
    assert not any(_contains(numbers, w) for w in _weights(sm.clear_layers))


@pytest.mark.parametrize("config", SCHEMES)
def test_round_trip_client_and_server_from_the_artifact(tmp_path, config):
    _need(config)
    sm, x = _compiled(config)
    sm.save(tmp_path)
    server_model = secureinfer.load_server(tmp_path)
    client_model = secureinfer.load_client(tmp_path)
    assert server_model.digest == client_model.digest == sm.digest
    assert client_model.plan == sm.plan and client_model.input_shape == sm.input_shape
    client = client_model.owner()
    keys = client.keys
    server = server_model.server(keys.public_keys(), keys.functional_keys()
                                 if client_model.output == "plaintext" else None)
    got = client.decrypt(server.evaluate(client.encrypt(x[:3])))
    tol = sm.scheme.capabilities.tolerance if not sm.scheme.capabilities.exact else 0.0
    np.testing.assert_allclose(got, sm.reference(x[:3]), rtol=0, atol=tol)


def test_fe_client_without_the_authority_encrypts_from_the_plan(tmp_path):
    _need("fe-ip")
    sm, x = _compiled("fe-ip")
    sm.save(tmp_path)
    authority = secureinfer.load_client(tmp_path).authority()
    server = secureinfer.load_server(tmp_path).server(authority.public_keys(),
                                                      authority.functional_keys())
    client = secureinfer.load_client(tmp_path).client(authority.public_keys())
    np.testing.assert_array_equal(server.infer(client.encrypt(x[:2])), sm.reference(x[:2]))


def test_client_checks_its_input_range_only(tmp_path):
    sm, x = _compiled("clear")
    sm.save(tmp_path)
    client = secureinfer.load_client(tmp_path).owner()
    with pytest.warns(secureinfer.RangeWarning, match="the network input"):
        client.encrypt(x[:1] * 4)


# ----- refusals -----------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    sm, _ = _compiled("clear?bits=8")
    sm.save(tmp_path)
    return tmp_path


def _edit(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("part,load", [("client", secureinfer.load_client),
                                       ("server", secureinfer.load_server)])
def test_corrupt_foreign_and_other_version_are_refused(saved, part, load):
    manifest = saved / part / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good[:100])
    with pytest.raises(ArtifactError, match=rf"{part}/manifest.json: not JSON"):
        load(saved)
    manifest.write_text(good)
    _edit(manifest, format="onnx")
    with pytest.raises(ArtifactError, match=r"manifest.json: field 'format'.*not a secureinfer"):
        load(saved)
    manifest.write_text(good)
    _edit(manifest, version=ARTIFACT_VERSION + 1)
    with pytest.raises(ArtifactError, match=rf"field 'version' is {ARTIFACT_VERSION + 1}; .*"
                                            rf"reads artifact version {ARTIFACT_VERSION}"):
        load(saved)
    manifest.write_text(good)
    doc = json.loads(good)
    doc["plan"]["bits"] = 4
    manifest.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=r"field 'plan'"):
        load(saved)
    manifest.write_text(good)
    _edit(manifest, digest="zz")
    with pytest.raises(ArtifactError, match=r"field 'digest'"):
        load(saved)
    manifest.unlink()
    with pytest.raises(ArtifactError, match=rf"{part}/manifest.json: missing"):
        load(saved)


def test_server_arrays_are_never_unpickled(saved):
    npz = saved / "server" / "arrays.npz"
    with np.load(npz, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["layer1.weight"] = np.array([{"evil": 1}], dtype=object)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    npz.write_bytes(buf.getvalue())
    with pytest.raises(ArtifactError, match=r"arrays.npz: not a numpy .npz of plain arrays"):
        secureinfer.load_server(saved)
    npz.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ArtifactError, match="arrays.npz"):
        secureinfer.load_server(saved)


def test_server_layers_checked(saved):
    manifest = saved / "server" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["layers"][1]["kind"] = "lstm"
    manifest.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=r"layers\[1\].kind: unknown layer kind 'lstm'"):
        secureinfer.load_server(saved)
    doc["layers"][1]["kind"] = "linear"
    doc["layers"][1]["arrays"]["weight"] = "nosuch"
    manifest.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=r"layers\[1\].arrays.weight: array 'nosuch'"):
        secureinfer.load_server(saved)


def test_weights_changed_after_compile_are_refused(saved):
    npz = saved / "server" / "arrays.npz"
    with np.load(npz, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["layer1.weight"] = arrays["layer1.weight"] * 2
    np.savez(npz, **arrays)
    with pytest.raises(ArtifactError, match=r"field 'plan' is not what its layers give"):
        secureinfer.load_server(saved)


def test_compile_cli_writes_a_loadable_artifact(tmp_path, capsys):
    assert main(["compile", "--scheme", "clear?bits=8", "--out", str(tmp_path / "art"),
                 "--no-progress"]) == 0
    assert "client" in capsys.readouterr().out
    server_model = secureinfer.load_server(tmp_path / "art")
    client_model = secureinfer.load_client(tmp_path / "art")
    assert server_model.digest == client_model.digest
    assert client_model.input_shape == (1, 8, 8)
    assert zipfile.is_zipfile(tmp_path / "art" / "server" / "arrays.npz")


def _tamper_plan(directory: Path, scheme: str, **plan_changes) -> None:
    """Rewrite the client plan and recompute its digest, as a hostile server can."""
    from secureinfer import codec

    manifest = directory / "client" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["plan"].update(plan_changes)
    doc["scheme"]["allow_insecure"] = True
    doc["digest"] = codec.params_digest(scheme, doc["plan"]).hex()
    manifest.write_text(json.dumps(doc))


def test_client_refuses_a_plan_below_128_bits_whatever_the_manifest_says(tmp_path):
    _need("ckks")
    sm, x = _compiled("ckks")
    sm.save(tmp_path)
    _tamper_plan(tmp_path, "ckks", poly_modulus_degree=8192,
                 coeff_mod_bits=[60, 60, 60, 60, 60, 60, 60, 60], security_bits=20)
    with pytest.raises(ArtifactError, match=r"N=8192 with a 480-bit coefficient modulus.*"
                                            r"limit 218 bits.*refused"):
        secureinfer.load_client(tmp_path)
    client = secureinfer.load_client(tmp_path, allow_insecure=True)
    assert client.scheme.security_bits == int(128 * 218 / 480)  # recomputed, not the plan's 20


def test_bfv_client_refuses_a_modulus_above_the_standard(tmp_path):
    _need("bfv")
    sm, _ = _compiled("bfv")
    sm.save(tmp_path)
    doc = json.loads((tmp_path / "client" / "manifest.json").read_text())
    bits = doc["plan"]["coeff_modulus_bits"]
    _tamper_plan(tmp_path, "bfv", coeff_modulus_bits=bits + [60] * 8, security_bits=128)
    with pytest.raises(ArtifactError, match=r"bfv: the plan asks for N=\d+ with a \d+-bit "
                                            r"coefficient modulus.*refused"):
        secureinfer.load_client(tmp_path)


def _npy_claiming(shape: tuple[int, ...]) -> bytes:
    """An .npy header claiming ``shape`` of float64, followed by 8 bytes of data only."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue() + b"\0" * 8


def test_server_arrays_sizes_are_checked_before_reading(saved):
    npz = saved / "server" / "arrays.npz"
    with np.load(npz, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    good = npz.read_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:  # a header declaring 8 TB
        archive.writestr("layer1.weight.npy", _npy_claiming((1 << 20, 1 << 20)))
    npz.write_bytes(buf.getvalue())
    with pytest.raises(ArtifactError, match=r"server/arrays.npz: .*entry layer1.weight.npy: "
                                            r"its header claims 8796093022208 bytes"):
        secureinfer.load_server(saved)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays, bomb=np.zeros(1 << 20))  # deflate: a zip bomb's form
    npz.write_bytes(buf.getvalue())
    with pytest.raises(ArtifactError, match=r"server/arrays.npz: .*entry \S+\.npy is compressed"):
        secureinfer.load_server(saved)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:  # sizes in the directory beyond the budget
        for i in range(3):
            archive.writestr(f"a{i}.npy", _npy_claiming((1,)))
    npz.write_bytes(good)
    from secureinfer import npz as npz_module

    with zipfile.ZipFile(buf) as archive:
        with pytest.raises(npz_module.MalformedArchive, match=r"3 entries of \d+ bytes"):
            npz_module.check_members(archive.infolist(), max_entries=2, max_bytes=1 << 20)
    assert secureinfer.load_server(saved).digest  # the untouched file still loads
