"""The model file: weights, architecture, activation ranges, quantization and training record.

A model file is an ``.npz`` archive (written by numpy, read entry by entry here: each ``.npy``
header is checked against its entry's size before any data is read, object arrays are
refused, and the whole file is at most ``MAX_FILE_BYTES``): one array per tensor of
the model's ``state_dict`` (``p:<name>``) and a UTF-8 JSON document (``secureinfer.json``)
holding the architecture as a tree of module descriptors, the input shape, the calibration
and the training record (``meta``). Loading parses and validates all of it; nothing is
unpickled, so a file from anywhere is safe to open, and a malformed one raises
``ConfigError`` saying what is wrong.

The architecture is an ``nn.Sequential`` (nested ones allowed) of the modules listed in
``MODULES``: everything ``secureinfer.nn`` builds, and the ReLU / max-pool networks it
converts from.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ModelFileError, SecureInferError
from ..scheme import Calibration
from .activations import PolyAct, Square

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_FILE_BYTES", "MODULES", "load", "save"]

FORMAT = "secureinfer-model"
FORMAT_VERSION = 1
_DOC = "secureinfer.json"
_PARAM = "p:"
_MAX_DOC_BYTES = 16 * 2**20
_MAX_DIM = 1 << 24
MAX_FILE_BYTES = 2**30  # all entries of a model file together, uncompressed
_MAX_ENTRIES = 4096
_MAX_NDIM = 8
_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")


class _Bad(Exception):
    """A validation failure inside ``load`` (turned into ``ConfigError``)."""


# ----- field types: (to JSON from the module attribute, validate from JSON) ------------

def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _MAX_DIM:
        raise _Bad(f"{v!r} is not an integer in 0..{_MAX_DIM}")
    return v


def _pos(v: Any) -> int:
    if _int(v) < 1:
        raise _Bad(f"{v!r} is not a positive integer")
    return v


def _dim(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not -8 <= v <= 8:
        raise _Bad(f"{v!r} is not a dimension index")
    return v


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _Bad(f"{v!r} is not a finite number")
    return float(v)


def _unit(v: Any) -> float:
    if not 0.0 <= _float(v) <= 1.0:
        raise _Bad(f"{v!r} is not in [0, 1]")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"{v!r} is not true or false")
    return v


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v, v]
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise _Bad(f"{v!r} is not a pair of integers")
    return (_int(v[0]), _int(v[1]))


def _range(v: Any) -> tuple[float, float]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise _Bad(f"{v!r} is not a (lo, hi) pair")
    lo, hi = _float(v[0]), _float(v[1])
    if not lo <= hi:
        raise _Bad(f"range ({lo}, {hi}) has lo > hi")
    return lo, hi


def _init(v: Any) -> str:
    if v not in ("relu", "square"):
        raise _Bad(f"{v!r} is not 'relu' or 'square'")
    return v


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# type name -> (class, {field: validator}, {field: module attribute})
_Spec = tuple[Callable[..., nn.Module], dict[str, Callable[[Any], Any]], dict[str, str]]
MODULES: dict[str, _Spec] = {
    "Flatten": (nn.Flatten, {"start_dim": _dim, "end_dim": _dim}, {}),
    "Linear": (nn.Linear, {"in_features": _pos, "out_features": _pos, "bias": _bool}, {}),
    "Conv2d": (nn.Conv2d, {"in_channels": _pos, "out_channels": _pos, "kernel_size": _pair,
                           "stride": _pair, "padding": _pair, "dilation": _pair,
                           "groups": _pos, "bias": _bool}, {}),
    "AvgPool2d": (nn.AvgPool2d, {"kernel_size": _pair, "stride": _pair, "padding": _pair,
                                 "ceil_mode": _bool, "count_include_pad": _bool}, {}),
    "MaxPool2d": (nn.MaxPool2d, {"kernel_size": _pair, "stride": _pair, "padding": _pair,
                                 "dilation": _pair, "ceil_mode": _bool}, {}),
    "BatchNorm1d": (nn.BatchNorm1d, {"num_features": _pos, "eps": _float, "momentum": _unit,
                                     "affine": _bool, "track_running_stats": _bool}, {}),
    "BatchNorm2d": (nn.BatchNorm2d, {"num_features": _pos, "eps": _float, "momentum": _unit,
                                     "affine": _bool, "track_running_stats": _bool}, {}),
    "Dropout": (nn.Dropout, {"p": _unit}, {}),
    "Identity": (nn.Identity, {}, {}),
    "ReLU": (nn.ReLU, {}, {}),
    "Square": (Square, {"input_range": _range}, {}),
    "PolyAct": (PolyAct, {"degree": _pos, "init": _init, "input_range": _range},
                {"blend": "blend"}),
}
_ATTR_VALIDATORS = {"blend": _unit}


def _describe(module: nn.Module, where: str) -> dict[str, Any]:
    kind = type(module).__name__
    if type(module) is nn.Sequential:
        return {"type": "Sequential",
                "children": [[name, _describe(child, f"{where}.{name}" if where else name)]
                             for name, child in module.named_children()]}
    if kind not in MODULES or type(module) is not MODULES[kind][0]:
        raise ConfigError(
            f"module {where or '(root)'} is a {kind}: a model file holds an nn.Sequential of "
            f"{', '.join(sorted(MODULES))}; save other models with torch.save(state_dict)")
    if getattr(module, "padding_mode", "zeros") != "zeros" or getattr(
            module, "divisor_override", None) is not None or getattr(
            module, "return_indices", False):
        raise ConfigError(f"module {where} ({kind}): non-default padding_mode, "
                          "divisor_override or return_indices cannot be saved")
    _, fields, attrs = MODULES[kind]
    desc: dict[str, Any] = {"type": kind}
    for name in fields:
        value = getattr(module, name)
        if name == "bias":
            value = value is not None
        elif name in ("kernel_size", "stride", "padding", "dilation") \
                and not isinstance(value, (tuple, list)):
            value = (value, value)
        desc[name] = _jsonable(value)
    for key, attr in attrs.items():
        desc[key] = getattr(module, attr)
    try:
        _build(desc, where or "(root)")
    except _Bad as exc:
        raise ConfigError(f"cannot save: {exc}") from None
    return desc


def _build(desc: Any, where: str, depth: int = 0) -> nn.Module:
    if not isinstance(desc, dict) or not isinstance(desc.get("type"), str):
        raise _Bad(f"module {where}: expected an object with a 'type'")
    kind = desc["type"]
    if kind == "Sequential":
        children = desc.get("children")
        if depth > 16 or not isinstance(children, list) or set(desc) != {"type", "children"}:
            raise _Bad(f"module {where}: a Sequential needs only a 'children' list")
        seq = nn.Sequential()
        for item in children:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                    and _NAME.match(item[0])) or item[0] in seq._modules:
                raise _Bad(f"module {where}: child {item!r:.60} is not a unique "
                           "[name, module] pair")
            seq.add_module(item[0], _build(item[1], f"{where}.{item[0]}", depth + 1))
        return seq
    if kind not in MODULES:
        raise _Bad(f"module {where}: unknown type {kind!r}; valid: {', '.join(sorted(MODULES))}")
    cls, fields, attrs = MODULES[kind]
    expected = {"type", *fields, *attrs}
    if set(desc) != expected:
        raise _Bad(f"module {where} ({kind}): fields {sorted(set(desc) - {'type'})}, "
                   f"expected {sorted(expected - {'type'})}")
    try:
        kwargs = {name: check(desc[name]) for name, check in fields.items()}
        module = cls(**kwargs)
        for key, attr in attrs.items():
            setattr(module, attr, _ATTR_VALIDATORS[key](desc[key]))
    except _Bad as exc:
        raise _Bad(f"module {where} ({kind}): {exc}") from None
    except (TypeError, ValueError, RuntimeError) as exc:
        raise _Bad(f"module {where} ({kind}): {exc}") from None
    return module


# ----- save ---------------------------------------------------------------------------

def _calibration_doc(cal: Calibration | None) -> dict[str, Any] | None:
    return None if cal is None else cal.to_dict()


def save(model: nn.Module, path: str | os.PathLike[str], *, meta: dict[str, Any] | None = None,
         input_shape: Sequence[int] | None = None) -> Path:
    """Write ``model`` to ``path`` (an ``.npz`` model file); return the path.

    Args:
        model: an ``nn.Sequential`` of supported modules (see ``MODULES``).
        path: where to write; the file is replaced atomically.
        meta: the JSON-able training record; defaults to ``model.secureinfer_meta``.
        input_shape: defaults to ``model.secureinfer_input_shape``.

    Raises:
        ConfigError: an unsupported module, no input shape, or a meta that is not JSON.
    """
    shape = input_shape or getattr(model, "secureinfer_input_shape", None)
    if shape is None:
        raise ConfigError("save() needs the model's input shape: pass input_shape=(c, h, w) "
                          "or calibrate the model (secureinfer.nn.calibrate)")
    meta = meta if meta is not None else getattr(model, "secureinfer_meta", {})
    doc = {"format": FORMAT, "version": FORMAT_VERSION,
           "architecture": _describe(model, ""),
           "input_shape": [int(d) for d in shape],
           "calibration": _calibration_doc(getattr(model, "secureinfer_calibration", None)),
           "meta": meta}
    try:
        text = json.dumps(doc, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"save(): the model's meta is not plain JSON ({exc})") from None
    arrays = {_PARAM + k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    arrays[_DOC] = np.frombuffer(text.encode(), dtype=np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ----- load ---------------------------------------------------------------------------

#: How to produce a model file, for error messages.
HOW_TO_MAKE = ("make one with `secureinfer train --dataset digits --out m.npz`, or "
               "secureinfer.nn.save(model, 'm.npz') from Python")

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # an .npz is a zip archive (or an empty one)


def _check_magic(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(4)
    if head not in _ZIP_MAGIC:
        raise ModelFileError(f"{path} is not a secureinfer model file (an .npz archive; this "
                             f"file starts with bytes {head!r}): {HOW_TO_MAKE}")


def _read_npy(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One ``.npy`` entry, its header checked against the entry's size before the data is
    read (a header claiming a huge shape is refused, not allocated)."""
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject or dtype.fields is not None or len(shape) > _MAX_NDIM:
            raise _Bad(f"entry {info.filename}: dtype {dtype} of shape {shape} is not a plain "
                       "numeric array (object arrays are never read)")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != info.file_size - f.tell():
            raise _Bad(f"entry {info.filename}: its header claims {nbytes} bytes of data, "
                       f"the entry holds {info.file_size - f.tell()}")
        data = f.read(nbytes)
    if len(data) != nbytes:
        raise _Bad(f"entry {info.filename} is truncated")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        total = sum(info.file_size for info in infos)
        if len(infos) > _MAX_ENTRIES or total > MAX_FILE_BYTES:
            raise _Bad(f"{len(infos)} entries of {total} bytes in all; a model file holds at "
                       f"most {_MAX_ENTRIES} entries and {MAX_FILE_BYTES} bytes")
        names = [info.filename.removesuffix(".npy") for info in infos]
        if _DOC not in names:
            raise _Bad(f"no {_DOC} entry: not a secureinfer model file")
        extra = [n for n, i in zip(names, infos)
                 if not i.filename.endswith(".npy") or n != _DOC and not n.startswith(_PARAM)]
        if extra:
            raise _Bad(f"unexpected entries {extra[:5]}")
        arrays = {n: _read_npy(archive, i) for n, i in zip(names, infos)}
    raw = arrays.pop(_DOC)
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > _MAX_DOC_BYTES:
        raise _Bad(f"{_DOC} is not a UTF-8 byte string")
    doc = json.loads(raw.tobytes().decode("utf-8"))
    params = {k[len(_PARAM):]: v for k, v in arrays.items()}
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _Bad(f"{_DOC} does not declare format {FORMAT!r}")
    if doc.get("version") != FORMAT_VERSION:
        raise _Bad(f"format version {doc.get('version')!r}; this secureinfer reads version "
                   f"{FORMAT_VERSION}: upgrade secureinfer or re-save the model")
    return doc, params


def _load_state(model: nn.Module, params: dict[str, np.ndarray]) -> None:
    state = model.state_dict()
    missing, extra = sorted(set(state) - set(params)), sorted(set(params) - set(state))
    if missing or extra:
        raise _Bad(f"tensors do not match the architecture (missing {missing[:5]}, "
                   f"unexpected {extra[:5]})")
    for name, tensor in state.items():
        arr = params[name]
        if tuple(arr.shape) != tuple(tensor.shape) or arr.dtype.kind not in "fiu":
            raise _Bad(f"tensor {name} has shape {arr.shape} and dtype {arr.dtype}; "
                       f"expected {tuple(tensor.shape)} numbers")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise _Bad(f"tensor {name} holds NaN or infinite values")
        tensor.copy_(torch.as_tensor(arr.astype(arr.dtype.newbyteorder("="))))


def _calibration(doc: Any, model: nn.Module, shape: tuple[int, ...]) -> Calibration | None:
    if doc is None:
        return None
    if not isinstance(doc, dict) or set(doc) != {"input_range", "layer_ranges"} \
            or not isinstance(doc["layer_ranges"], list):
        raise _Bad("calibration needs exactly 'input_range' and a 'layer_ranges' list")
    cal = Calibration(_range(doc["input_range"]), [_range(r) for r in doc["layer_ranges"]])
    from ..compiler import lower

    try:
        n_layers = len(lower(model, shape))
    except SecureInferError as exc:
        raise _Bad(f"calibration given for a network that does not compile ({exc})") from None
    if n_layers != len(cal.layer_ranges):
        raise _Bad(f"calibration has {len(cal.layer_ranges)} layer ranges for {n_layers} "
                   "layers")
    return cal


def load(path: str | os.PathLike[str]) -> nn.Module:
    """Read a model file written by ``save``.

    The returned module is in eval mode and carries ``secureinfer_input_shape``,
    ``secureinfer_calibration`` (``None`` for a network that does not compile, e.g. a ReLU
    teacher) and ``secureinfer_meta``, so ``secureinfer.compile(model, scheme)`` needs no
    other argument.

    Raises:
        ModelFileError: the file is missing, not a model file, or malformed; the message
            says which part (a ``ConfigError``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist: {HOW_TO_MAKE}")
    _check_magic(path)
    try:
        doc, params = _read(path)
        model = _build(doc.get("architecture"), "(root)")
        shape = doc.get("input_shape")
        if not isinstance(shape, list) or not 1 <= len(shape) <= 4:
            raise _Bad("input_shape is not a list of 1 to 4 sizes")
        shape = tuple(_pos(d) for d in shape)
        meta = doc.get("meta")
        if not isinstance(meta, dict):
            raise _Bad("meta is not an object")
        with torch.no_grad():
            _load_state(model, params)
        model.eval()
        cal = _calibration(doc.get("calibration"), model, shape)
    except _Bad as exc:
        raise ModelFileError(f"{path}: malformed model file: {exc}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, UnicodeDecodeError,
            NotImplementedError, RuntimeError, zlib.error) as exc:  # what zipfile raises
        if "pickle" in str(exc):  # numpy's hint to unpickle: unsafe, and no fix here
            exc = "an entry is not a plain array"
        raise ModelFileError(f"{path} is not a readable secureinfer model file ({exc}): "
                             f"{HOW_TO_MAKE}") from None
    model.secureinfer_input_shape = shape
    model.secureinfer_calibration = cal
    model.secureinfer_meta = meta
    return model
