"""The compiled artifact: the seam between the model owner, the server and the clients.

``SecureModel.save(DIR)`` (and ``secureinfer compile``) writes a versioned, pickle-free
directory::

    DIR/server/manifest.json   scheme config, plan, digest, layer specs, calibration ranges
    DIR/server/arrays.npz      every layer's weights and the calibration samples
    DIR/client/manifest.json   scheme config, plan, digest, input shape, input range and
                               quantization, what the server learns
    DIR/client/arrays.npz      FE only: the secure prefix's weights, which the key
                               authority needs to derive functional keys

Under HE the client part holds no weight of any layer (the server runs them all). Arrays
are read with ``allow_pickle=False`` and JSON is parsed, never unpickled. ``load_server``
re-plans from the layers and refuses an artifact whose plan or digest differs;
``load_client`` restores the scheme from the plan alone (``Scheme.load_plan``). An artifact
is a deployment (``secureinfer.privacy``): ``save`` refuses a model compiled for one process
whose outputs are unprotected by default, and ``load_server`` re-plans for deployment.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
import zlib
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import codec
from .errors import ArtifactError, SecureInferError
from .layers import LayerSpec
from .model import ClientModel, SecureModel, freeze_plan
from .npz import MalformedArchive, read_arrays
from .registry import resolve
from .scheme import Calibration

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_VERSION",
    "client_bundle",
    "client_from_bundle",
    "load_client",
    "load_server",
    "save",
]

ARTIFACT_FORMAT = "secureinfer-artifact"
ARTIFACT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"
#: Largest client bundle ``load_client`` accepts from a URL.
MAX_BUNDLE_BYTES = 256 << 20
#: Most arrays, and most bytes of array data in all, an ``arrays.npz`` may hold.
MAX_ARRAYS = 4096
MAX_ARRAY_BYTES = 1 << 30


# ----- layer specs ------------------------------------------------------------------------


def _layer_classes() -> dict[str, type[LayerSpec]]:
    found: dict[str, type[LayerSpec]] = {}
    todo = list(LayerSpec.__subclasses__())
    while todo:
        cls = todo.pop()
        found.setdefault(cls.kind, cls)
        todo.extend(cls.__subclasses__())
    return found


def _spec_entry(i: int, spec: LayerSpec, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    entry: dict[str, Any] = {"kind": spec.kind, "fields": {}, "arrays": {}}
    for f in fields(spec):
        if not f.init:
            continue
        value = getattr(spec, f.name)
        if isinstance(value, np.ndarray):
            key = f"layer{i}.{f.name}"
            arrays[key] = np.ascontiguousarray(value)
            entry["arrays"][f.name] = key
        else:
            entry["fields"][f.name] = list(value) if isinstance(value, tuple) else value
    return entry


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _spec_from(entry: Any, arrays: Mapping[str, np.ndarray], where: str) -> LayerSpec:
    if not isinstance(entry, dict) or not isinstance(entry.get("fields"), dict) \
            or not isinstance(entry.get("arrays"), dict):
        raise ArtifactError(f"{where}: expected an object with kind, fields and arrays")
    cls = _layer_classes().get(entry.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise ArtifactError(f"{where}.kind: unknown layer kind {entry.get('kind')!r} "
                            f"(known: {', '.join(sorted(_layer_classes()))})")
    kwargs = {name: _tuples(v) for name, v in entry["fields"].items()}
    for name, key in entry["arrays"].items():
        if key not in arrays:
            raise ArtifactError(f"{where}.arrays.{name}: array {key!r} is missing from "
                                f"{ARRAYS}")
        kwargs[name] = arrays[key]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise ArtifactError(f"{where}: a {cls.kind} layer cannot be built from it: {exc}") \
            from None


# ----- writing ----------------------------------------------------------------------------


def _scheme_config(model: SecureModel) -> dict[str, Any]:
    scheme = model.scheme
    return {"name": scheme.name,
            "options": {k: v for k, v in scheme.opts.items() if v is not None},
            "allow_insecure": bool(scheme.allow_insecure)}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _head(role: str, model: SecureModel) -> dict[str, Any]:
    return {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "role": role,
            "scheme": _scheme_config(model), "plan": model.plan,
            "digest": model.digest.hex(), "input_shape": list(model.input_shape),
            "range_check": model.range_check}


def _client_manifest(model: SecureModel) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    arrays: dict[str, np.ndarray] = {}
    fe = model.output == "plaintext"
    layers = [_spec_entry(i, s, arrays) for i, s in enumerate(model.secure_layers)] if fe \
        else []
    quant = model.plan.get("quantization")
    manifest = {**_head("client", model),
                "input_range": None if model.input_range is None else list(model.input_range),
                "quantization": None if not isinstance(quant, dict) else {
                    k: quant.get(k) for k in ("bits", "input_range", "input_scale",
                                              "input_bound", "output_scale")},
                "output": model.output, "reveals": model.reveals, "layers": layers}
    return manifest, arrays


def _server_manifest(model: SecureModel) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    arrays: dict[str, np.ndarray] = {}
    layers = [_spec_entry(i, s, arrays) for i, s in enumerate(model.layers)]
    cal = model.calibration
    calibration = None
    if cal is not None:
        calibration = {"input_range": list(cal.input_range),
                       "layer_ranges": [list(r) for r in cal.layer_ranges], "samples": None}
        if cal.samples is not None:
            arrays["calibration.samples"] = np.asarray(cal.samples, dtype=np.float64)
            calibration["samples"] = "calibration.samples"
    return {**_head("server", model), "layers": layers, "calibration": calibration}, arrays


def save(model: SecureModel, directory: str | os.PathLike[str]) -> Path:
    """Write ``model``'s artifact to ``directory`` (created; existing files replaced).

    Returns the directory. Every file is written atomically (temp file, fsync, rename).

    Raises:
        ArtifactError: ``model`` was compiled for one process and its outputs are not
            protected by default (``Scheme.deploy_problem``, ``secureinfer.privacy``); an
            artifact never ships them unless the privacy option was set explicitly.
    """
    problem = model.scheme.deploy_problem()
    if problem:
        raise ArtifactError(problem)
    root = Path(directory)
    for role, (manifest, arrays) in (("server", _server_manifest(model)),
                                     ("client", _client_manifest(model))):
        part = root / role
        part.mkdir(parents=True, exist_ok=True)
        if arrays:
            _atomic_write(part / ARRAYS, _npz_bytes(arrays))
        elif (part / ARRAYS).exists():
            (part / ARRAYS).unlink()
        _atomic_write(part / MANIFEST, json.dumps(manifest, indent=1, allow_nan=False).encode())
    return root


# ----- reading ----------------------------------------------------------------------------


def _parse_manifest(data: bytes, where: str, role: str) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{where}: not JSON ({exc})") from None
    except RecursionError:
        raise ArtifactError(f"{where}: not JSON a manifest can be (nested too deeply)") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where}: expected a JSON object")
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{where}: field 'format' is {manifest.get('format')!r}, not "
                            f"{ARTIFACT_FORMAT!r}: not a secureinfer artifact")
    version = manifest.get("version")
    if version != ARTIFACT_VERSION:
        raise ArtifactError(f"{where}: field 'version' is {version!r}; this secureinfer reads "
                            f"artifact version {ARTIFACT_VERSION}: recompile the model with "
                            "`secureinfer compile` of this version")
    if manifest.get("role") != role:
        raise ArtifactError(f"{where}: field 'role' is {manifest.get('role')!r}, expected "
                            f"{role!r}")
    return manifest


def _need(manifest: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = manifest.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ArtifactError(f"{where}: field {key!r} is missing or not a "
                            f"{getattr(kind, '__name__', kind)}")
    return value


def _parse_arrays(data: bytes | None, where: str) -> dict[str, np.ndarray]:
    """Every array of an ``arrays.npz``: each member's size and header are checked before
    it is read (``secureinfer.npz``), never ``np.load`` on untrusted bytes."""
    if data is None:
        return {}
    try:
        return read_arrays(data, max_entries=MAX_ARRAYS, max_bytes=MAX_ARRAY_BYTES)
    except MalformedArchive as exc:
        raise ArtifactError(f"{where}: not a numpy .npz of plain arrays: {exc}") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, NotImplementedError,
            zlib.error) as exc:
        raise ArtifactError(f"{where}: not a numpy .npz of plain arrays ({exc})") from None


def _scheme_from(manifest: dict[str, Any], where: str, allow_insecure: bool) -> Any:
    """The manifest's scheme, configured for deployment (its clients do not hold the model:
    unset privacy options resolve as when it was compiled for ``save``)."""
    config = _need(manifest, "scheme", dict, where)
    name, options = config.get("name"), config.get("options", {})
    if not isinstance(name, str) or not isinstance(options, dict):
        raise ArtifactError(f"{where}: field 'scheme' needs a name and an options object")
    try:
        return resolve(name, allow_insecure=allow_insecure, deploy=True, **options)
    except SecureInferError as exc:
        raise ArtifactError(f"{where}: field 'scheme': {exc}") from None


def _digest(manifest: dict[str, Any], where: str) -> bytes:
    text = _need(manifest, "digest", str, where)
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        digest = b""
    if len(digest) != 16:
        raise ArtifactError(f"{where}: field 'digest' is not 32 hex digits")
    return digest


def _range(value: Any, where: str, key: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (int, float)) for v in value)):
        raise ArtifactError(f"{where}: field {key!r} is not [lo, hi]")
    return float(value[0]), float(value[1])


def _read(path: Path, required: bool = True) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        if not required:
            return None
        raise ArtifactError(f"{path}: missing (is this a secureinfer artifact directory? "
                            "write one with `secureinfer compile --out DIR`)") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot be read: {exc}") from None


def client_from_bundle(manifest_bytes: bytes, arrays_bytes: bytes | None,
                       where: str = f"client/{MANIFEST}", *,
                       allow_insecure: bool = False) -> ClientModel:
    """A ``ClientModel`` from the client manifest and its arrays (``None``: no arrays).

    The manifest may come from an untrusted server: its ``allow_insecure`` flag is ignored
    (only the caller's counts) and the scheme recomputes the security level from the
    plan's parameters in ``load_plan``.

    Raises:
        ArtifactError: a corrupt or foreign manifest (naming the field), another version,
            or parameters below 128-bit security without ``allow_insecure``.
    """
    m = _parse_manifest(manifest_bytes, where, "client")
    scheme = _scheme_from(m, where, allow_insecure)
    plan = _need(m, "plan", dict, where)
    digest = _digest(m, where)
    if codec.params_digest(scheme.name, plan) != digest:
        raise ArtifactError(f"{where}: field 'plan' does not match field 'digest': the file "
                            "was modified or mixed from two artifacts")
    shape = _need(m, "input_shape", list, where)
    if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ArtifactError(f"{where}: field 'input_shape' is not a list of positive sizes")
    range_check = m.get("range_check", "warn")
    if range_check not in ("warn", "error", "off"):
        raise ArtifactError(f"{where}: field 'range_check' is {range_check!r}")
    arrays = _parse_arrays(arrays_bytes, where.replace(MANIFEST, ARRAYS))
    entries = _need(m, "layers", list, where)
    layers = [_spec_from(e, arrays, f"{where}: layers[{i}]") for i, e in enumerate(entries)]
    try:
        scheme.load_plan(plan)
    except SecureInferError as exc:
        raise ArtifactError(f"{where}: field 'plan': {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{where}: field 'plan' lacks what scheme {scheme.name} needs "
                            f"({type(exc).__name__}: {exc})") from None
    _check_security(scheme, where)
    return ClientModel(scheme, freeze_plan(plan), digest, shape,
                       _range(m.get("input_range"), where, "input_range"), range_check, layers)


def _check_security(scheme: Any, where: str) -> None:
    """Backstop for every scheme: the level the scheme computed in ``load_plan``."""
    bits = scheme.security_bits
    if bits is not None and bits < 128 and not scheme.allow_insecure:
        raise ArtifactError(f"{where}: field 'plan' gives {bits}-bit security under scheme "
                            f"{scheme.name} ({scheme.security_source}), below the 128-bit "
                            "default; refused (pass allow_insecure=True to accept it)")


def client_bundle(directory: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    """The client part's raw files: manifest bytes and arrays bytes (or ``None``)."""
    part = Path(directory) / "client"
    return _read(part / MANIFEST), _read(part / ARRAYS, required=False)  # type: ignore[return-value]


def load_client(source: str | os.PathLike[str], *, token: str | None = None,
                allow_insecure: bool = False) -> ClientModel:
    """The data owner's model from an artifact directory or a server URL.

    Args:
        source: the artifact directory (its ``client/`` part is read) or ``http(s)://``
            URL of a ``secureinfer serve`` service (``GET /v1/model``).
        token: the service's bearer token, for a URL.
        allow_insecure: accept parameters below 128-bit security (the manifest's own flag
            is never trusted).

    Raises:
        ArtifactError: a missing, corrupt or foreign artifact, another format version, or
            parameters below 128-bit security without ``allow_insecure``.
    """
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        from .remote import fetch_client_bundle

        manifest, arrays = fetch_client_bundle(text, token=token)
        return client_from_bundle(manifest, arrays, f"{text}/v1/model",
                                  allow_insecure=allow_insecure)
    manifest, arrays = client_bundle(text)
    return client_from_bundle(manifest, arrays, str(Path(text) / "client" / MANIFEST),
                              allow_insecure=allow_insecure)


def load_server(directory: str | os.PathLike[str]) -> SecureModel:
    """The evaluator's model from an artifact directory (its ``server/`` part).

    The scheme is re-planned from the stored layers and calibration; the result must equal
    the stored plan and digest.

    Raises:
        ArtifactError: a missing, corrupt or foreign artifact, another format version, or
            a plan that the stored layers do not reproduce.
    """
    part = Path(directory) / "server"
    where = str(part / MANIFEST)
    m = _parse_manifest(_read(part / MANIFEST), where, "server")  # type: ignore[arg-type]
    # the operator's own artifact: its compile-time choice is kept (re-planning checks it)
    scheme = _scheme_from(m, where, bool(_need(m, "scheme", dict, where).get("allow_insecure")))
    plan = _need(m, "plan", dict, where)
    digest = _digest(m, where)
    arrays = _parse_arrays(_read(part / ARRAYS, required=False), str(part / ARRAYS))
    entries = _need(m, "layers", list, where)
    if not entries:
        raise ArtifactError(f"{where}: field 'layers' is empty")
    layers = [_spec_from(e, arrays, f"{where}: layers[{i}]") for i, e in enumerate(entries)]
    calibration = _calibration(m.get("calibration"), arrays, where)
    range_check = m.get("range_check", "warn")
    if range_check not in ("warn", "error", "off"):
        raise ArtifactError(f"{where}: field 'range_check' is {range_check!r}")
    model = SecureModel(layers, scheme, calibration, range_check)
    if model.plan != plan or model.digest != digest:
        raise ArtifactError(f"{where}: field 'plan' is not what its layers give under scheme "
                            f"{scheme.name} (digest {model.digest.hex()} != {digest.hex()}): "
                            "the file was modified, or written by another secureinfer "
                            "version; recompile")
    return model


def _calibration(value: Any, arrays: Mapping[str, np.ndarray], where: str) -> Calibration | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("layer_ranges"), list):
        raise ArtifactError(f"{where}: field 'calibration' needs input_range and layer_ranges")
    input_range = _range(value.get("input_range"), where, "calibration.input_range")
    ranges = [_range(r, where, "calibration.layer_ranges") for r in value["layer_ranges"]]
    samples = None
    key = value.get("samples")
    if key is not None:
        if key not in arrays:
            raise ArtifactError(f"{where}: field 'calibration.samples' names array {key!r}, "
                                f"missing from {ARRAYS}")
        samples = np.asarray(arrays[key], dtype=np.float64)
    return Calibration(input_range, ranges, samples)  # type: ignore[arg-type]
