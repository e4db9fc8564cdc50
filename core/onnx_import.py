"""Lower an ONNX file to LayerSpecs (the only module of the core that reads ONNX).

An ONNX file is untrusted input. ``read`` checks its size before reading it, parses the
protobuf (never ``onnx.load``, which follows external-data paths), refuses external-data
references and graphs beyond ``Limits``, and decodes only numeric tensors, itself. Every
problem is a ``ConfigError`` (the file) or an ``UnsupportedLayerError`` / ``CompileError``
(the graph) that names the node, its op type and the fix.

``lower`` walks the nodes of a sequential graph (one input, one output, no branches):

==========================================  ==============================================
ONNX nodes                                  LayerSpec
==========================================  ==============================================
Conv (groups 1, dilation 1, any stride and  ``Conv2d``
symmetric padding, with or without bias)
Gemm; MatMul (+ Add of the bias)            ``Linear``
AveragePool, GlobalAveragePool              ``AvgPool2d`` (square kernel, no padding)
Flatten, Reshape to ``(batch, -1)``         ``Flatten``
BatchNormalization; Mul/Add/Sub/Div by a    folded into the Conv or Linear before it
constant right after Conv/Gemm/MatMul
Mul(x, x), Pow(x, k), Mul/Add/Sub/Div/Neg   ``Poly`` (the chain is evaluated symbolically
chains with constant coefficients           as a polynomial in the tensor that feeds it)
Identity, Dropout, Constant                 nothing (constants give weights)
Relu, MaxPool, Sigmoid, Tanh, Softmax       clear-only layers: only in the clear suffix of
                                            a plaintext-output scheme (``partition``)
==========================================  ==============================================

Any other node is an ``UnsupportedLayerError``. The input shape comes from the graph (the
first dimension is the batch) or, when it is dynamic, from ``input_shape=``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import BackendNotInstalledError, CompileError, ConfigError, UnsupportedLayerError
from .layers import (HE_FRIENDLY_HINT, AvgPool2d, Conv2d, Flatten, LayerSpec, Linear,
                     MaxPool2d, Poly, ReLU, Sigmoid, Softmax, Tanh, nonfinite_parameters)

__all__ = ["DEFAULT_LIMITS", "Limits", "SUPPORTED_OPS", "is_onnx_path", "load", "lower", "read"]


@dataclass(frozen=True)
class Limits:
    """How large an ONNX file ``read`` accepts.

    Attributes:
        max_bytes: file size, checked before the file is read.
        max_nodes: nodes of the graph.
        max_initializers: initializers plus Constant nodes.
        max_tensor_elements: elements of one tensor (weights, constants).
        max_total_elements: elements of all tensors together.
        max_input_elements: elements of one input (without the batch dimension).
        max_degree: degree of a polynomial activation.
    """

    max_bytes: int = 256 * 2**20
    max_nodes: int = 4096
    max_initializers: int = 4096
    max_tensor_elements: int = 2**25
    max_total_elements: int = 2**26
    max_input_elements: int = 2**22
    max_degree: int = 16


DEFAULT_LIMITS = Limits()

_POLY_OPS = ("Mul", "Add", "Sub", "Div", "Neg", "Pow")
_CLEAR_ONLY = {"Relu": ReLU, "Sigmoid": Sigmoid, "Tanh": Tanh}
_PASS = ("Identity", "Dropout")
SUPPORTED_OPS = ("Conv", "Gemm", "MatMul", "AveragePool", "GlobalAveragePool", "Flatten",
                 "Reshape", "BatchNormalization", *_POLY_OPS, *_PASS, "Constant", *_CLEAR_ONLY,
                 "MaxPool", "Softmax")
"""The ONNX op types ``lower`` accepts (the clear-only ones in a clear suffix only)."""

_NON_POLYNOMIAL = ("Gelu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Softplus",
                   "Softsign", "HardSigmoid", "HardSwish", "Mish", "Erf", "Exp", "Log",
                   "Sqrt", "Abs", "Sign", "Clip", "Max", "Min", "LogSoftmax", "Hardmax",
                   "GlobalMaxPool", "LpPool", "ThresholdedRelu", "Swish")
_FLOAT_TYPES = {1: "<f4", 11: "<f8", 10: "<f2"}  # FLOAT, DOUBLE, FLOAT16
_INT_TYPES = {6: "<i4", 7: "<i8"}  # INT32, INT64
_SUPPORTED_TEXT = ("supported: Conv, Gemm, MatMul(+Add), AveragePool, GlobalAveragePool, "
                   "Flatten, Reshape (to a flat vector), BatchNormalization (folded), "
                   "Mul/Add/Pow polynomial chains, Identity, Dropout, Constant")


def is_onnx_path(model: Any) -> bool:
    """True for a ``str`` or path ending in ``.onnx`` (what ``compile`` and the CLI read)."""
    return isinstance(model, (str, os.PathLike)) and str(model).lower().endswith(".onnx")


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise BackendNotInstalledError(
            "reading ONNX files needs the onnx package: pip install 'secureinfer[onnx]'"
        ) from None
    return onnx


# ----- reading an untrusted file --------------------------------------------------------

def read(source: str | os.PathLike[str] | bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Parse and check an ONNX file (a path or its bytes); return the ``onnx.ModelProto``.

    Raises:
        ConfigError: missing, too large, not an ONNX protobuf, external data, or beyond
            ``limits``; the message names the problem.
        BackendNotInstalledError: the ``onnx`` package is missing.
    """
    onnx = _onnx()
    if isinstance(source, (bytes, bytearray)):
        data, where = bytes(source), "ONNX bytes"
        if len(data) > limits.max_bytes:
            raise ConfigError(f"{where}: {len(data)} bytes, above the limit of "
                              f"{limits.max_bytes}")
    else:
        path = Path(source).expanduser()
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"ONNX file {path} does not exist")
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ConfigError(f"{where}: {size} bytes, above the ONNX file limit of "
                              f"{limits.max_bytes} (onnx_import.Limits.max_bytes)")
        data = path.read_bytes()
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, RuntimeError...
        raise ConfigError(f"{where} is not a readable ONNX model (a malformed or truncated "
                          f"protobuf: {type(exc).__name__}: {exc})") from None
    _check(model, where, limits)
    return model


def _check(model: Any, where: str, limits: Limits) -> None:
    if not model.HasField("graph") or not model.graph.node:
        raise ConfigError(f"{where} holds no ONNX graph (empty, truncated or not an ONNX file)")
    g = model.graph
    if len(g.node) > limits.max_nodes:
        raise ConfigError(f"{where}: {len(g.node)} nodes, above the limit of {limits.max_nodes}")
    constants = [n for n in g.node if n.op_type == "Constant"]
    if len(g.initializer) + len(constants) > limits.max_initializers:
        raise ConfigError(f"{where}: {len(g.initializer) + len(constants)} initializers and "
                          f"constants, above the limit of {limits.max_initializers}")
    if g.sparse_initializer:
        raise ConfigError(f"{where}: sparse initializers are not supported; re-export with "
                          "dense weights")
    tensors = list(g.initializer) + [a.t for n in constants for a in n.attribute
                                     if a.HasField("t")]
    total = 0
    for t in tensors:
        if t.data_location == 1 or t.external_data:
            loc = next((e.value for e in t.external_data if e.key == "location"), "?")
            raise ConfigError(
                f"{where}: tensor {t.name!r} refers to external data ({loc!r}); secureinfer "
                "reads self-contained ONNX files only: re-export with the weights embedded "
                "(onnx.save(model, path, save_as_external_data=False))")
        total += _elements(t, where, limits)
    if total > limits.max_total_elements:
        raise ConfigError(f"{where}: {total} weight elements, above the limit of "
                          f"{limits.max_total_elements}")
    for n in g.node:
        for a in n.attribute:
            if a.HasField("g") or a.graphs:
                raise UnsupportedLayerError(
                    f"node {_name(n)} (op {n.op_type}): subgraphs (control flow) are not "
                    f"supported; {_SUPPORTED_TEXT}")


def _elements(t: Any, where: str, limits: Limits) -> int:
    n = 1
    for d in t.dims:
        if d < 0:
            raise ConfigError(f"{where}: tensor {t.name!r} has a negative dimension {d}")
        n *= d
        if n > limits.max_tensor_elements:
            raise ConfigError(f"{where}: tensor {t.name!r} has more than "
                              f"{limits.max_tensor_elements} elements (the limit)")
    return n


def _tensor(t: Any, what: str) -> np.ndarray:
    """A numeric ``TensorProto`` as a float64 (or int64) array, decoded here."""
    dims = tuple(int(d) for d in t.dims)
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if t.data_type in _FLOAT_TYPES:
        dtype = np.dtype(_FLOAT_TYPES[t.data_type])
    elif t.data_type in _INT_TYPES:
        dtype = np.dtype(_INT_TYPES[t.data_type])
    else:
        raise UnsupportedLayerError(f"{what}: tensor {t.name!r} has ONNX data type "
                                    f"{t.data_type}; only float, double, float16, int32 "
                                    "and int64 weights are supported")
    if t.HasField("raw_data"):
        if len(t.raw_data) != count * dtype.itemsize:
            raise ConfigError(f"{what}: tensor {t.name!r} holds {len(t.raw_data)} bytes for "
                              f"shape {dims} ({count * dtype.itemsize} expected)")
        arr = np.frombuffer(t.raw_data, dtype=dtype)
    else:
        field = {1: t.float_data, 11: t.double_data, 10: t.int32_data, 6: t.int32_data,
                 7: t.int64_data}[t.data_type]
        if len(field) != count:
            raise ConfigError(f"{what}: tensor {t.name!r} holds {len(field)} values for "
                              f"shape {dims} ({count} expected)")
        if t.data_type == 10:  # float16 bits stored in int32_data
            arr = np.asarray(field, dtype=np.uint16).view(np.float16)
        else:
            arr = np.asarray(field, dtype=dtype)
    arr = arr.reshape(dims)
    return arr.astype(np.float64) if dtype.kind == "f" else arr.astype(np.int64)


def _name(node: Any) -> str:
    name = node.name or (node.output[0] if node.output else "") or "(unnamed)"
    return name if node.op_type in name else f"{name}/{node.op_type}"


# ----- the symbolic values of the walk ---------------------------------------------------

@dataclass(frozen=True)
class _Sym:
    """A tensor ``poly(base)``: ``coeffs`` (lowest first) of a polynomial in the tensor
    ``base`` (a version number of the current tensor, 0 for the graph input). ``origin``:
    the node that made the polynomial (the name of its ``Poly`` layer)."""

    base: int
    coeffs: tuple[float, ...] = (0.0, 1.0)
    origin: str = ""

    @property
    def identity(self) -> bool:
        return self.coeffs == (0.0, 1.0)


def _trim(c: np.ndarray) -> tuple[float, ...]:
    c = list(np.asarray(c, dtype=np.float64))
    while len(c) > 1 and c[-1] == 0.0:
        c.pop()
    return tuple(float(v) for v in c)


class _Walk:
    """The state of ``lower``: layers so far, the current tensor and every named value."""

    def __init__(self, shape: tuple[int, ...], limits: Limits) -> None:
        self.layers: list[LayerSpec] = []
        self.shape = shape
        self.limits = limits
        self.values: dict[str, _Sym | np.ndarray] = {}
        self.base = 0  # bumped by every new layer and every fold: older values branch
        self.affine_base: int | None = None  # the base that is a Conv/Linear output as is

    def add(self, spec: LayerSpec, affine: bool = False) -> _Sym:
        self.layers.append(spec)
        self.shape = spec.out_shape
        self.base += 1
        self.affine_base = self.base if affine else None
        return _Sym(self.base)

    def foldable(self, value: Any) -> bool:
        """``value`` is the output of the latest Conv or Linear layer, unchanged."""
        return isinstance(value, _Sym) and value.identity and value.base == self.affine_base

    def current(self, node: Any, value: _Sym, what: str = "it") -> None:
        """Refuse a value that is not a polynomial of the latest layer's output."""
        if value.base != self.base:
            raise UnsupportedLayerError(
                f"node {_name(node)} (op {node.op_type}): {what} reads a tensor from before "
                f"layer {self.layers[-1].name if self.layers else '(input)'}: the graph "
                "branches (a residual or parallel path); secureinfer runs sequential networks")

    def materialize(self, node: Any, value: _Sym) -> None:
        """Make ``value`` the current tensor: a ``Poly`` layer unless it is the identity."""
        self.current(node, value)
        if value.identity:
            return
        if len(value.coeffs) <= 2 and value.base == self.affine_base:  # a*y + b: fold it
            a = value.coeffs[1] if len(value.coeffs) == 2 else 0.0
            _fold(self, node, _Sym(value.base), np.asarray(a), np.asarray(value.coeffs[0]),
                  node.op_type)
        else:
            self.add(Poly(value.origin or _name(node), self.shape, coeffs=value.coeffs))


def _attrs(node: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        out[a.name] = {1: a.f, 2: a.i, 3: a.s, 4: a.t, 6: list(a.floats), 7: list(a.ints)}.get(
            a.type, a)
    return out


def _unsupported(node: Any, why: str | None = None) -> UnsupportedLayerError:
    op = node.op_type
    if why is None:
        if op == "Shape":
            why = ("Shape computes a tensor shape at run time (a dynamic batch axis, or "
                   "x.view(x.size(0), -1)); export without dynamic_axes, or flatten with "
                   "torch.flatten(x, 1) / nn.Flatten(), which export as Flatten")
        elif op in _NON_POLYNOMIAL:
            why = f"{op} is not a polynomial; {HE_FRIENDLY_HINT}"
        else:
            why = (f"{op} has no HE-friendly equivalent; {_SUPPORTED_TEXT}; for activations: "
                   f"{HE_FRIENDLY_HINT}")
    return UnsupportedLayerError(f"node {_name(node)} (op {op}): {why}")


@dataclass(frozen=True)
class _GraphOutput:
    """Stands for the graph output where a node is named (its pending polynomial)."""

    name: str = "output"
    op_type: str = "Output"
    output: tuple[str, ...] = ()


def lower(model: Any, input_shape: Sequence[int] | None = None, *,
          limits: Limits = DEFAULT_LIMITS) -> list[LayerSpec]:
    """Turn a checked ``onnx.ModelProto`` (see ``read``) into LayerSpecs.

    Args:
        model: the parsed model.
        input_shape: one input's shape without the batch dimension; required when the
            graph's is dynamic, and checked against it otherwise.
        limits: the size limits.

    Raises:
        UnsupportedLayerError: a node with no HE-friendly form, named with its op type and
            the fix; a branching graph.
        CompileError: weights or attributes that do not fit together (named).
        ConfigError: a malformed graph.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1 or len(g.output) != 1:
        raise ConfigError(f"the ONNX graph has {len(inputs)} inputs and {len(g.output)} "
                          "outputs; secureinfer runs networks with one input and one output")
    walk = _Walk(_input_shape(inputs[0], input_shape, limits), limits)
    walk.values[inputs[0].name] = _Sym(0)
    for t in g.initializer:
        walk.values[t.name] = _tensor(t, "initializer")
    for node in g.node:
        _node(walk, node)
    out = walk.values.get(g.output[0].name)
    if not isinstance(out, _Sym):
        raise ConfigError(f"the graph output {g.output[0].name!r} is not computed from the "
                          "input")
    walk.materialize(_GraphOutput(), out)
    if not walk.layers:
        raise UnsupportedLayerError("the ONNX graph has no layer secureinfer can run")
    bad = nonfinite_parameters(walk.layers)
    if bad:
        raise ConfigError(f"the ONNX weights {', '.join(bad)} are NaN or infinite")
    return walk.layers


def load(source: str | os.PathLike[str] | bytes, input_shape: Sequence[int] | None = None,
         *, limits: Limits = DEFAULT_LIMITS) -> list[LayerSpec]:
    """``lower(read(source))``: the LayerSpecs of an ONNX file or its bytes.

    Raises:
        ConfigError, UnsupportedLayerError, CompileError: see ``read`` and ``lower``; a
            malformed graph never escapes as another exception.
    """
    model = read(source, limits)
    try:
        return lower(model, input_shape, limits=limits)
    except (UnsupportedLayerError, CompileError, ConfigError):
        raise
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, ZeroDivisionError,
            AttributeError, RecursionError, FloatingPointError) as exc:
        raise ConfigError(f"malformed ONNX graph: {type(exc).__name__}: {exc}") from None


def _input_shape(value: Any, given: Sequence[int] | None, limits: Limits) -> tuple[int, ...]:
    t = value.type.tensor_type if value.type.HasField("tensor_type") else None
    if t is None or t.elem_type not in (1, 10, 11):
        raise ConfigError(f"the ONNX input {value.name!r} is not a float tensor")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] \
        if t.HasField("shape") else None
    graph_shape = tuple(dims[1:]) if dims else None
    if given is not None:
        shape = tuple(int(d) for d in given)
        if graph_shape is not None and None not in graph_shape and graph_shape != shape:
            raise ConfigError(f"input_shape={shape} but the ONNX input {value.name!r} has "
                              f"shape {graph_shape} (after the batch dimension)")
    elif graph_shape is None or None in graph_shape or not graph_shape:
        raise ConfigError(f"the ONNX input {value.name!r} has a dynamic shape {dims}: pass "
                          "input_shape=(c, h, w) (one input, no batch dimension)")
    else:
        shape = graph_shape
    if not shape or any(d < 1 for d in shape) or len(shape) > 3 \
            or int(np.prod(shape, dtype=np.int64)) > limits.max_input_elements:
        raise ConfigError(f"input shape {shape} is not 1 to 3 positive sizes of at most "
                          f"{limits.max_input_elements} elements")
    return shape


# ----- nodes ------------------------------------------------------------------------------

def _node(walk: _Walk, node: Any) -> None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        raise _unsupported(node, f"custom-domain op {node.domain}.{op} is not supported; "
                                 f"{_SUPPORTED_TEXT}")
    if op == "Constant":
        _set(walk, node, _constant(node))
        return
    args = [_get(walk, node, name) if name else None for name in node.input]
    if op in _PASS:
        if len(node.output) > 1 and node.output[1]:
            raise _unsupported(node, "the Dropout mask output is used; export in eval mode")
        _set(walk, node, args[0])
        return
    if all(isinstance(a, np.ndarray) or a is None for a in args):
        _set(walk, node, _fold_constants(node, args))
        return
    handler = _HANDLERS.get(op)
    if handler is None:
        raise _unsupported(node)
    _set(walk, node, handler(walk, node, args, _attrs(node)))


def _get(walk: _Walk, node: Any, name: str) -> _Sym | np.ndarray:
    if name not in walk.values:
        raise ConfigError(f"node {_name(node)} (op {node.op_type}) reads {name!r}, which no "
                          "earlier node produces (a truncated or unsorted graph)")
    return walk.values[name]


def _set(walk: _Walk, node: Any, value: _Sym | np.ndarray) -> None:
    if not node.output:
        raise ConfigError(f"node {_name(node)} (op {node.op_type}) has no output")
    walk.values[node.output[0]] = value


def _constant(node: Any) -> np.ndarray:
    a = _attrs(node)
    if hasattr(a.get("value"), "dims"):
        return _tensor(a["value"], f"node {_name(node)}")
    if "value_float" in a:
        return np.asarray(float(a["value_float"]))
    if "value_floats" in a:
        return np.asarray(a["value_floats"], dtype=np.float64)
    if "value_int" in a:
        return np.asarray(int(a["value_int"]), dtype=np.int64)
    if "value_ints" in a:
        return np.asarray(a["value_ints"], dtype=np.int64)
    raise _unsupported(node, "a Constant needs a numeric value, value_float(s) or value_int(s)")


def _fold_constants(node: Any, args: list[np.ndarray | None]) -> np.ndarray:
    """A node on constants only (e.g. a weight transposed by Identity or scaled by Mul)."""
    op = node.op_type
    a = [x for x in args if x is not None]
    with np.errstate(all="raise"):
        try:
            if op in ("Add", "Sub", "Mul", "Div") and len(a) == 2:
                return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply,
                        "Div": np.divide}[op](a[0].astype(np.float64), a[1])
            if op == "Neg" and len(a) == 1:
                return -a[0]
        except FloatingPointError as exc:
            raise CompileError(f"node {_name(node)} (op {op}): {exc} folding constants") \
                from None
    raise _unsupported(node, f"{op} on constants only is not supported; fold it into the "
                             "weights before export")


def _const(node: Any, value: Any, what: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise _unsupported(node, f"its {what} must be a constant (an initializer or a "
                                 "Constant node), not a computed tensor")
    return value


def _attr_int(node: Any, attrs: dict[str, Any], key: str, default: int) -> int:
    v = attrs.get(key, default)
    if not isinstance(v, int):
        raise ConfigError(f"node {_name(node)} (op {node.op_type}): attribute {key} is not an "
                          "integer")
    return v


def _attr_ints(node: Any, attrs: dict[str, Any], key: str, default: list[int]) -> list[int]:
    v = attrs.get(key, default)
    if not isinstance(v, list) or not all(isinstance(i, int) for i in v):
        raise ConfigError(f"node {_name(node)} (op {node.op_type}): attribute {key} is not a "
                          "list of integers")
    return v


def _spec(node: Any, make: Any, *args: Any, **kw: Any) -> LayerSpec:
    try:
        return make(*args, **kw)
    except (ValueError, TypeError, IndexError) as exc:
        raise CompileError(f"node {_name(node)} (op {node.op_type}): {exc}") from None


def _input(walk: _Walk, node: Any, args: list[Any], rank: int | None = None) -> None:
    """Materialize the node's data input as the current tensor; check its rank."""
    x = args[0] if args else None
    if not isinstance(x, _Sym):
        raise _unsupported(node, "its first input must be computed from the graph input")
    walk.materialize(node, x)
    if rank is not None and len(walk.shape) != rank:
        need = "a flat vector: add Flatten before it" if rank == 1 else "a (C, H, W) image"
        raise UnsupportedLayerError(f"node {_name(node)} (op {node.op_type}) receives shape "
                                    f"{walk.shape}; it needs {need}")


def _pads2d(node: Any, attrs: dict[str, Any]) -> tuple[int, int]:
    auto = attrs.get("auto_pad", b"NOTSET")
    if auto not in (b"NOTSET", b"VALID"):
        raise _unsupported(node, f"auto_pad={auto.decode(errors='replace')} is not supported; "
                                 "export with explicit pads")
    pads = _attr_ints(node, attrs, "pads", [0, 0, 0, 0])
    if auto != b"NOTSET" and any(pads):
        raise _unsupported(node, f"auto_pad={auto.decode()} together with pads {pads}: ONNX "
                                 "allows pads only with auto_pad=NOTSET; export with explicit "
                                 "pads")
    if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3] or min(pads) < 0:
        raise _unsupported(node, f"pads {pads} are not symmetric 2-D padding")
    return pads[0], pads[1]


def _conv(walk: _Walk, node: Any, args: list[Any], attrs: dict[str, Any]) -> _Sym:
    _input(walk, node, args, 3)
    w = _const(node, args[1] if len(args) > 1 else None, "weight")
    if w.ndim != 4:
        raise _unsupported(node, f"a {w.ndim - 2}-D convolution; only 2-D Conv is supported")
    b = args[2] if len(args) > 2 and args[2] is not None else np.zeros(w.shape[0])
    b = _const(node, b, "bias")
    if b.shape != (w.shape[0],):
        raise CompileError(f"node {_name(node)} (op Conv): bias B of shape {b.shape} does not "
                           f"have one entry per output channel (M={w.shape[0]})")
    if _attr_int(node, attrs, "group", 1) != 1:
        raise _unsupported(node, "group > 1 (grouped or depthwise convolution) is not "
                                 "supported; use groups=1")
    if any(d != 1 for d in _attr_ints(node, attrs, "dilations", [1, 1])):
        raise _unsupported(node, "dilation is not supported; use dilations=1")
    ks = _attr_ints(node, attrs, "kernel_shape", list(w.shape[2:]))
    if tuple(ks) != tuple(w.shape[2:]):
        raise CompileError(f"node {_name(node)} (op Conv): kernel_shape {ks} does not match "
                           f"the weight shape {w.shape}")
    strides = _attr_ints(node, attrs, "strides", [1, 1])
    if len(strides) != 2 or min(strides) < 1:
        raise CompileError(f"node {_name(node)} (op Conv): strides {strides} are not 2 "
                           "positive integers")
    spec = _spec(node, Conv2d, _name(node), walk.shape, weight=w, bias=b.reshape(-1),
                 stride=tuple(strides), padding=_pads2d(node, attrs))
    return walk.add(spec, affine=True)


def _gemm(walk: _Walk, node: Any, args: list[Any], attrs: dict[str, Any]) -> _Sym:
    _input(walk, node, args, 1)
    w = _const(node, args[1] if len(args) > 1 else None, "weight B")
    if w.ndim != 2 or _attr_int(node, attrs, "transA", 0) != 0:
        raise _unsupported(node, "Gemm needs a 2-D constant B and transA=0")
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    weight = alpha * (w if _attr_int(node, attrs, "transB", 0) else w.T)
    c = args[2] if len(args) > 2 and args[2] is not None else np.zeros(1)
    c = _const(node, c, "bias C")
    try:
        bias = beta * np.broadcast_to(c, (1, weight.shape[0])).reshape(-1)
    except ValueError:
        raise CompileError(f"node {_name(node)} (op Gemm): bias C of shape {c.shape} does not "
                           f"match {weight.shape[0]} outputs") from None
    return walk.add(_spec(node, Linear, _name(node), walk.shape, weight=weight, bias=bias),
                    affine=True)


def _matmul(walk: _Walk, node: Any, args: list[Any], attrs: dict[str, Any]) -> _Sym:
    _input(walk, node, args, 1)
    w = _const(node, args[1] if len(args) > 1 else None, "second operand")
    if w.ndim != 2:
        raise _unsupported(node, f"MatMul by a {w.ndim}-D constant; only x @ W with a 2-D W")
    return walk.add(_spec(node, Linear, _name(node), walk.shape, weight=w.T,
                          bias=np.zeros(w.shape[1])), affine=True)


def _avgpool(walk: _Walk, node: Any, args: list[Any], attrs: dict[str, Any]) -> _Sym:
    _input(walk, node, args, 3)
    k = _attr_ints(node, attrs, "kernel_shape", [])
    s = _attr_ints(node, attrs, "strides", [1, 1])
    if len(k) != 2 or k[0] != k[1] or len(s) != 2 or s[0] != s[1] or _pads2d(node, attrs) \
            != (0, 0) or _attr_int(node, attrs, "ceil_mode", 0) or any(
            d != 1 for d in _attr_ints(node, attrs, "dilations", [1, 1])):
        raise _unsupported(node, "AveragePool needs a square kernel and stride, no padding, "
                                 "no dilation and ceil_mode=0")
    return walk.add(_spec(node, AvgPool2d, _name(node), walk.shape, kernel=k[0], stride=s[0]))


def _global_avgpool(walk: _Walk, node: Any, args: list[Any], attrs: dict[str, Any]) -> _Sym:
    _input(walk, node, args, 3)
    _, h, w = walk.shape
    if h != w:
        raise _unsupported(node, f"GlobalAveragePool over a {h}x{w} map; only square maps")
    return walk.add(AvgPool2d(_name(node), walk.shape, kernel=h, stride=h))


def _maxpool(walk: _Walk, node: Any, args: list[Any], attrs: dict[str, Any]) -> _Sym:
    _input(walk, node, args, 3)
    k = _attr_ints(node, attrs, "kernel_shape", [])
    s = _attr_ints(node, attrs, "strides", [1, 1])
    p = _pads2d(node, attrs)
    if len(k) != 2 or k[0] != k[1] or len(s) != 2 or s[0] != s[1] or p[0] != p[1] \
            or _attr_int(node, attrs, "ceil_mode", 0) or len(node.output) > 1 or any(
            d != 1 for d in _attr_ints(node, attrs, "dilations", [1, 1])):
        raise _unsupported(node, "MaxPool needs a square kernel, stride and padding, no "
                                 "dilation, ceil_mode=0 and no indices output")
    return walk.add(_spec(node, MaxPool2d, _name(node), walk.shape, kernel=k[0], stride=s[0],
                          padding=p[0]))


def _flatten(walk: _Walk, node: Any, args: list[Any], attrs: dict[str, Any]) -> _Sym:
    if _attr_int(node, attrs, "axis", 1) != 1:
        raise _unsupported(node, "Flatten with axis != 1; flatten everything but the batch")
    return _to_flat(walk, node, args)


def _to_flat(walk: _Walk, node: Any, args: list[Any]) -> _Sym:
    _input(walk, node, args)
    if len(walk.shape) > 1:
        return walk.add(Flatten(_name(node), walk.shape))
    return _Sym(walk.base)


def _reshape(walk: _Walk, node: Any, args: list[Any], attrs: dict[str, Any]) -> _Sym:
    target = _const(node, args[1] if len(args) > 1 else None, "shape")
    if not isinstance(args[0], _Sym):
        raise _unsupported(node, "its data input must be computed from the graph input")
    walk.current(node, args[0])
    n = int(np.prod(walk.shape))
    t = [int(v) for v in target.reshape(-1)]
    if len(t) != 2 or t[0] not in (-1, 0, 1) or t[1] not in (-1, n) or t == [-1, -1]:
        raise _unsupported(node, f"Reshape to {t}; only to a flat vector (batch, -1) or "
                                 f"(batch, {n})")
    return _to_flat(walk, node, args)


def _batchnorm(walk: _Walk, node: Any, args: list[Any], attrs: dict[str, Any]) -> _Sym:
    x = args[0]
    if _attr_int(node, attrs, "training_mode", 0) or len(node.output) > 1:
        raise _unsupported(node, "BatchNormalization in training mode; export in eval mode")
    if len(args) != 5:
        raise ConfigError(f"node {_name(node)} (op BatchNormalization) needs 5 inputs")
    scale, bias, mean, var = (_const(node, a, "statistics") for a in args[1:])
    channels = walk.shape[0] if walk.shape else 0
    sizes = {name: a.shape for name, a in zip(("scale", "B", "input_mean", "input_var"),
                                              (scale, bias, mean, var)) if a.shape != (channels,)}
    if sizes:
        raise CompileError(f"node {_name(node)} (op BatchNormalization): statistics "
                           + ", ".join(f"{k} of shape {v}" for k, v in sizes.items())
                           + f"; each must have one entry per channel ({channels}) of the "
                           f"tensor of shape {walk.shape}")
    eps = float(attrs.get("epsilon", 1e-5))
    with np.errstate(all="ignore"):
        mult = scale / np.sqrt(var + eps)
    axis = (-1,) + (1,) * (len(walk.shape) - 1)  # the statistics are per channel (axis 1)
    try:
        mult, add = mult.reshape(axis), (bias - mean * mult).reshape(axis)
    except ValueError:
        raise CompileError(f"node {_name(node)} (op BatchNormalization): statistics of shape "
                           f"{scale.shape} for a tensor of shape {walk.shape}") from None
    return _fold(walk, node, x, mult, add, "BatchNormalization")


def _fold(walk: _Walk, node: Any, x: Any, mult: np.ndarray, add: np.ndarray,
          what: str) -> _Sym:
    """``x * mult + add`` with per-channel constants, folded into the affine layer that
    produced ``x``; the result is a new layer output (other readers of ``x`` branch)."""
    if not walk.foldable(x):
        raise _unsupported(node, f"{what} must directly follow a Conv, Gemm or MatMul to be "
                                 "folded into it; move it after one")
    layer = walk.layers[-1]
    channels = layer.out_shape[0]
    vecs = []
    for c in (mult, add):
        try:
            full = np.broadcast_to(np.asarray(c, dtype=np.float64), (1, *layer.out_shape))[0]
        except ValueError:
            raise CompileError(f"node {_name(node)} (op {node.op_type}): a constant of shape "
                               f"{np.shape(c)} does not broadcast to {layer.out_shape}") from None
        per = full.reshape(channels, -1)
        if not np.all(per == per[:, :1]):
            raise _unsupported(node, f"{what} by a constant that varies within a channel "
                                     "cannot be folded into the layer before it")
        vecs.append(per[:, 0])
    m, a = vecs
    layer.weight = layer.weight * m.reshape((-1,) + (1,) * (layer.weight.ndim - 1))
    layer.bias = layer.bias * m + a
    walk.base += 1  # the folded output is a new tensor: readers of the old one branch
    walk.affine_base = walk.base
    return _Sym(walk.base)


def _poly_op(walk: _Walk, node: Any, args: list[Any], attrs: dict[str, Any]) -> _Sym:
    op = node.op_type
    P = np.polynomial.polynomial
    syms = [a for a in args if isinstance(a, _Sym)]
    for s in syms:
        walk.current(node, s, "an operand")
    if op == "Neg":
        return _poly(walk, node, -np.asarray(syms[0].coeffs))
    if len(args) != 2 or any(a is None for a in args):
        raise ConfigError(f"node {_name(node)} (op {op}) needs 2 inputs")
    a, b = args
    if op == "Pow":
        if not isinstance(a, _Sym) or not isinstance(b, np.ndarray) or b.size != 1:
            raise _unsupported(node, "Pow needs a tensor base and a constant scalar exponent")
        k = float(b.reshape(-1)[0])
        if k != int(k) or not 1 <= k <= walk.limits.max_degree:
            raise _unsupported(node, f"Pow with exponent {k}: only x**k for integer k in 1.."
                                     f"{walk.limits.max_degree} is a polynomial; "
                                     f"{HE_FRIENDLY_HINT}")
        return _poly(walk, node, P.polypow(a.coeffs, int(k)))
    if isinstance(a, _Sym) and isinstance(b, _Sym):
        if op == "Div":
            raise _unsupported(node, f"division by a tensor is not a polynomial; "
                                     f"{HE_FRIENDLY_HINT}")
        fn = {"Add": P.polyadd, "Sub": P.polysub, "Mul": P.polymul}[op]
        return _poly(walk, node, fn(a.coeffs, b.coeffs))
    sym, c = (a, b) if isinstance(a, _Sym) else (b, a)
    if op == "Div" and sym is b:
        raise _unsupported(node, f"a constant divided by a tensor is not a polynomial; "
                                 f"{HE_FRIENDLY_HINT}")
    flat = c.reshape(-1)
    scalar = flat.size >= 1 and bool(np.all(flat == flat[0])) and c.ndim <= len(walk.shape) + 1 \
        and np.broadcast_shapes(c.shape, (1, *walk.shape)) == (1, *walk.shape)
    if not scalar:
        if not walk.foldable(sym):
            raise _unsupported(node, f"{op} by a per-element constant of shape {c.shape} is "
                                     "only supported right after a Conv, Gemm or MatMul "
                                     "(folded into it); an activation's coefficients must be "
                                     "scalars")
        one, zero = np.ones(1), np.zeros(1)
        with np.errstate(divide="raise", invalid="raise"):
            try:
                mult, add = {"Add": (one, c), "Mul": (c, zero), "Div": (1.0 / c, zero),
                             "Sub": (one, -c) if sym is a else (-one, c)}[op]
            except FloatingPointError:
                raise CompileError(f"node {_name(node)} (op Div): division by zero") from None
        return _fold(walk, node, sym, mult, add, op)
    v = float(flat[0])
    if op == "Div":
        if v == 0.0:
            raise CompileError(f"node {_name(node)} (op Div): division by zero")
        return _poly(walk, node, np.asarray(sym.coeffs) / v)
    if op == "Mul":
        return _poly(walk, node, np.asarray(sym.coeffs) * v)
    sign = 1.0 if op == "Add" or sym is a else -1.0
    coeffs = np.asarray(sym.coeffs) * sign
    coeffs[0] += v if op == "Add" or sym is b else -v
    return _poly(walk, node, coeffs)


def _poly(walk: _Walk, node: Any, coeffs: np.ndarray) -> _Sym:
    c = _trim(coeffs)
    if len(c) - 1 > walk.limits.max_degree:
        raise _unsupported(node, f"the polynomial reaches degree {len(c) - 1}, above "
                                 f"{walk.limits.max_degree}")
    if not all(np.isfinite(c)):
        raise CompileError(f"node {_name(node)} (op {node.op_type}): polynomial coefficients "
                           "overflow")
    return _Sym(walk.base, c, origin=_name(node))


def _clear_only(walk: _Walk, node: Any, args: list[Any], attrs: dict[str, Any]) -> _Sym:
    _input(walk, node, args)
    return walk.add(_spec(node, _CLEAR_ONLY[node.op_type], _name(node), walk.shape))


def _softmax(walk: _Walk, node: Any, args: list[Any], attrs: dict[str, Any]) -> _Sym:
    _input(walk, node, args, 1)
    if _attr_int(node, attrs, "axis", -1) not in (-1, 1):
        raise _unsupported(node, "Softmax over the batch axis")
    return walk.add(Softmax(_name(node), walk.shape))


_HANDLERS = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": _matmul, "AveragePool": _avgpool,
    "GlobalAveragePool": _global_avgpool, "Flatten": _flatten, "Reshape": _reshape,
    "BatchNormalization": _batchnorm, "MaxPool": _maxpool, "Softmax": _softmax,
    **{op: _poly_op for op in _POLY_OPS}, **{op: _clear_only for op in _CLEAR_ONLY},
}
