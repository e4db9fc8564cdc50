"""``compile`` and the compiled ``SecureModel`` with its roles: client, server, authority.

Each role holds only what it may hold: the client (HE) or the authority (FE) holds the
secret key; the FE client holds the master public key only; the server holds the public
and evaluation keys (or functional keys) and the model. Everything that passes between
them is ``bytes`` in a versioned envelope.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Sequence

import numpy as np

from . import codec
from .codec import Kind
from .config import SchemeConfig
from .errors import (CompileError, EnvelopeError, EvaluationError, RangeError,
                     RangeWarning, SecureInferError)
from .layers import LayerSpec, forward, nonfinite_parameters
from .metrics import Meter
from .onnx_import import is_onnx_path, load as onnx_load
from .partition import Partition, partition
from .registry import resolve
from .scheme import Calibration, Scheme

#: Accepted excess past a calibrated range, as a fraction of its width, before
#: ``SecureModel.check_ranges`` reports it (layer ranges already carry a 25% margin).
RANGE_TOLERANCE = 0.02

__all__ = ["Authority", "Client", "Parties", "SecureModel", "Server", "compile",
           "compile_layers"]


class SecureModel:
    """A network compiled for one scheme: its secure prefix, clear suffix and plan.

    Attributes:
        layers: every layer of the network.
        scheme: the configured scheme (its ``plan_`` filled).
        secure_layers: the prefix the scheme runs.
        clear_layers: the suffix run in the clear by the server (plaintext-output schemes).
        calibration: observed ranges (``None`` if no calibration data was given).
        meter: timings and message sizes of every role call.
    """

    def __init__(self, layers: Sequence[LayerSpec], scheme: Scheme,
                 calibration: Calibration | None = None, range_check: str = "warn") -> None:
        if range_check not in ("warn", "error", "off"):
            raise ValueError(f"range_check={range_check!r}: use 'warn', 'error' or 'off'")
        self.layers = list(layers)
        bad = nonfinite_parameters(self.layers)
        if bad:
            raise CompileError(f"{', '.join(bad)} contain NaN or infinity: the model diverged "
                               "or was corrupted; retrain it or load a good checkpoint")
        if calibration is not None and len(calibration.layer_ranges) != len(self.layers):
            raise CompileError(
                f"the calibration has {len(calibration.layer_ranges)} layer ranges for a "
                f"network of {len(self.layers)} layers ({self.layers[-1].name} last): it "
                "belongs to another model; recalibrate (secureinfer.nn.calibrate, or "
                "calibration=<representative inputs>)")
        self.scheme = scheme
        self.calibration = calibration
        self.range_check = range_check
        self.partition: Partition = partition(self.layers, scheme.capabilities, scheme.name)
        self.plan: dict[str, Any] = scheme.plan(self.secure_layers, calibration)
        bits = scheme.security_bits
        if bits is not None and bits < 128 and not scheme.allow_insecure:
            raise CompileError(
                f"scheme {scheme.name}: planned parameters give {scheme.security_bits}-bit "
                "security, below the 128-bit default; pass allow_insecure=True to accept it")
        self.digest = codec.params_digest(scheme.name, self.plan)
        self.meter = Meter()

    # ----- description -------------------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input (no batch dimension)."""
        return self.layers[0].in_shape

    @property
    def secure_layers(self) -> list[LayerSpec]:
        """The prefix run under the scheme."""
        return self.partition.secure

    @property
    def clear_layers(self) -> list[LayerSpec]:
        """The suffix run in the clear (empty for encrypted-output schemes)."""
        return self.partition.clear

    @property
    def output(self) -> str:
        """``"encrypted"`` or ``"plaintext"``."""
        return self.scheme.capabilities.output

    @property
    def reveals(self) -> str | None:
        """What the server learns in plaintext, or ``None``."""
        return self.scheme.reveals(self.secure_layers)

    def summary(self) -> str:
        """A few lines: scheme, security, which layers run where, what is revealed."""
        bits = self.scheme.security_bits
        security = "no encryption (reference)" if bits is None else f"{bits}-bit security" + (
            "  [INSECURE: allow_insecure]" if bits < 128 else "")
        lines = [f"scheme {self.scheme.name} ({self.scheme.backend or 'no backend'}), {security}",
                 "secure: " + "; ".join(l.describe() for l in self.secure_layers)]
        if self.clear_layers:
            lines.append("clear:  " + "; ".join(l.describe() for l in self.clear_layers))
        if self.reveals:
            lines.append(f"server learns: {self.reveals}")
        return "\n".join(lines)

    # ----- references ----------------------------------------------------------------

    def predict_clear(self, x: np.ndarray) -> np.ndarray:
        """The float network on ``x`` (no scheme involved)."""
        return forward(self.layers, self._batch(x))

    def reference(self, x: np.ndarray) -> np.ndarray:
        """What the secure pipeline must return on ``x``: the scheme's reference for the
        prefix (the quantized integer run for exact schemes), then the clear suffix."""
        y = self.scheme.reference(self.secure_layers, self._batch(x))
        return forward(self.clear_layers, y)

    def check_ranges(self, x: np.ndarray) -> list[str]:
        """Compare ``x`` and every layer's values on it with the calibrated ranges.

        The schemes planned their parameters (CKKS scale, BFV modulus, FE discrete-log
        bounds) for those ranges. Per ``range_check``: ``"warn"`` (default) issues a
        ``RangeWarning`` naming each layer out of range, ``"error"`` raises ``RangeError``
        at the first, ``"off"`` checks nothing. A value within ``RANGE_TOLERANCE`` of a
        range's width past its end passes. Returns the problems found.
        """
        cal = self.calibration
        if self.range_check == "off" or cal is None:
            return []
        problems = cal.check(self.layers, self._batch(x), tolerance=RANGE_TOLERANCE)
        if problems:
            fix = ("scale inputs like the training data, or recalibrate "
                   "(secureinfer.nn.calibrate) on data that covers them")
            if self.range_check == "error":
                raise RangeError(f"{problems[0]}; the scheme was planned for the calibrated "
                                 f"range and could return a wrong result: {fix}")
            later = [p.split(" (", 1)[0].replace("output of layer ", "") for p in problems[1:]]
            more = f"; also out of range: the outputs of {', '.join(later)}" if later else ""
            warnings.warn(f"{problems[0]}{more}: {fix}", RangeWarning, stacklevel=3)
        return problems

    def _batch(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.shape == self.input_shape:
            x = x[None]
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"input of shape {x.shape} does not match the model's input "
                             f"{self.input_shape} (with or without a batch dimension)")
        return x

    # ----- roles ---------------------------------------------------------------------

    def _seal(self, kind: Kind, payload: bytes) -> bytes:
        return codec.seal(kind, self.scheme.name, self.digest, payload)

    def _open(self, data: bytes, kind: Kind) -> bytes:
        return codec.open_envelope(data, kind=kind, scheme=self.scheme.name,
                                   digest=self.digest).payload

    def authority(self) -> "Authority":
        """Generate keys (timed as ``keygen``); the key owner of the setup."""
        return Authority(self)

    def client(self, public_keys: bytes | None = None) -> "Client":
        """A data owner. HE: generates and holds the secret key (``public_keys`` unused).
        FE: encrypts with the authority's master public key ``public_keys`` only."""
        if self.output == "plaintext":
            if public_keys is None:
                raise ValueError("an FE client encrypts with the authority's public keys: "
                                 "model.client(authority.public_keys())")
            return Client(self, None, public_keys)
        return Client(self, Authority(self), None)

    def server(self, public_keys: bytes, functional_keys: bytes | None = None) -> "Server":
        """The evaluator, from the key owner's public (and functional) key messages."""
        return Server(self, public_keys, functional_keys)

    def setup(self) -> "Parties":
        """Keys for everyone, the client as authority (the usual single-owner setting).

        For FE the client then holds the master secret key, which some schemes use for a
        faster encryption; ``client(authority.public_keys())`` is a client without it."""
        if self.output == "plaintext":
            authority = self.authority()
            client = Client(self, authority, None)  # the data owner is the authority
            server = self.server(authority.public_keys(), authority.functional_keys())
            return Parties(client, server, authority)
        client = self.client()
        return Parties(client, self.server(client.public_keys()), client.keys)


class Parties(NamedTuple):
    """What ``SecureModel.setup`` hands out."""

    client: "Client"
    server: "Server"
    authority: "Authority"


class Authority:
    """Owns the secret (or master secret) key; gives out public and functional keys."""

    def __init__(self, model: SecureModel) -> None:
        self._model = model
        scheme = model.scheme
        with model.meter.phase("keygen"):
            self._secret, public = scheme.keygen()
            functional = scheme.functional_keys(self._secret, model.secure_layers)
        self._public = model._seal(Kind.PUBLIC_KEYS, public)
        self._functional = model._seal(Kind.FUNCTIONAL_KEYS, functional)
        model.meter.size("public_keys", len(self._public))
        model.meter.size("functional_keys", len(functional) and len(self._functional))

    @property
    def secret(self) -> Any:
        """The live secret-key object. Never give it to the server."""
        return self._secret

    def public_keys(self) -> bytes:
        """What the server (and an FE client) needs: public and evaluation keys."""
        return self._public

    def functional_keys(self) -> bytes:
        """FE: the functional keys for the secure prefix (empty payload for HE)."""
        return self._functional


class Client:
    """Encrypts inputs and reads results."""

    def __init__(self, model: SecureModel, keys: Authority | None,
                 public_keys: bytes | None) -> None:
        self._model = model
        self.keys = keys
        if keys is not None:
            self._enc_keys = keys.secret
        else:
            payload = model._open(public_keys, Kind.PUBLIC_KEYS)
            self._enc_keys = model.scheme.open_client(payload)

    def public_keys(self) -> bytes:
        """HE: the public and evaluation keys to send to the server."""
        if self.keys is None:
            raise ValueError("this FE client holds no keys of its own: the authority does")
        return self.keys.public_keys()

    def encrypt(self, x: np.ndarray) -> bytes:
        """Encrypt one input or a batch ``(n, *input_shape)`` (timed as ``encrypt``)."""
        model = self._model
        x = model._batch(x)
        if not np.all(np.isfinite(x)):
            raise RangeError("input contains NaN or infinity")
        model.check_ranges(x)
        model.scheme.check_input(x)
        with model.meter.phase("encrypt", len(x)):
            payload = model.scheme.encrypt(self._enc_keys, x)
            msg = model._seal(Kind.INPUT, codec.pack_fields({"n": len(x), "ct": payload}))
        model.meter.size("input", len(msg), len(x))
        return msg

    def decrypt(self, output: bytes) -> np.ndarray:
        """The result the server returned, as ``(n, *output_shape)`` floats."""
        model = self._model
        env = codec.open_envelope(output, scheme=model.scheme.name, digest=model.digest)
        if env.kind not in (Kind.OUTPUT, Kind.PLAINTEXT_OUTPUT):
            raise EnvelopeError(f"expected the server's output, got a {env.kind.name} message")
        if env.kind == Kind.OUTPUT and self.keys is None:
            raise ValueError("this client holds no secret key and cannot decrypt")
        with model.meter.phase("decrypt", 1):
            if env.kind == Kind.PLAINTEXT_OUTPUT:
                y = codec.unpack_fields(env.payload)["y"]
            else:
                y = model.scheme.decrypt(self.keys.secret, env.payload)
            y = np.asarray(y, dtype=np.float64)
        model.meter.times["decrypt"][-1] = (model.meter.times["decrypt"][-1][0], len(y))
        return y


class Server:
    """Evaluates encrypted inputs with public/evaluation or functional keys only."""

    def __init__(self, model: SecureModel, public_keys: bytes,
                 functional_keys: bytes | None) -> None:
        self._model = model
        scheme = model.scheme
        public = model._open(public_keys, Kind.PUBLIC_KEYS)
        functional = (model._open(functional_keys, Kind.FUNCTIONAL_KEYS)
                      if functional_keys is not None else b"")
        if model.output == "plaintext" and not functional:
            raise ValueError("an FE server needs the authority's functional keys")
        self.ctx = scheme.open_server(public, functional)
        self.layers = scheme.build_layers(model.secure_layers, self.ctx)

    def evaluate(self, ciphertext: bytes) -> bytes:
        """Run the network on an input message; return the output message (timed as
        ``evaluate``; for plaintext-output schemes the clear suffix is included)."""
        model = self._model
        scheme = model.scheme
        fields = codec.unpack_fields(model._open(ciphertext, Kind.INPUT))
        n, payload = fields.get("n"), fields.get("ct")
        if not isinstance(n, int) or not isinstance(payload, bytes) or n < 1:
            raise EnvelopeError("input message lacks its sample count or ciphertext")
        with model.meter.phase("evaluate", n):
            value = scheme.load_input(self.ctx, payload)
            for layer in self.layers:
                value = _run_layer(scheme.name, layer, value)
            out = scheme.dump_output(self.ctx, value)
            if isinstance(out, np.ndarray):
                y = forward(model.clear_layers, out)
                msg = model._seal(Kind.PLAINTEXT_OUTPUT, codec.pack_fields({"y": y}))
            else:
                msg = model._seal(Kind.OUTPUT, out)
        model.meter.size("output", len(msg), n)
        return msg

    def infer(self, ciphertext: bytes) -> np.ndarray:
        """Plaintext-output schemes: evaluate and read the result on the server."""
        if self._model.output != "plaintext":
            raise ValueError(f"scheme {self._model.scheme.name} has encrypted output: "
                             "only the client can decrypt it")
        env = codec.open_envelope(self.evaluate(ciphertext))
        return codec.unpack_fields(env.payload)["y"].astype(np.float64)


def _run_layer(scheme: str, layer: Any, value: Any) -> Any:
    """``layer.forward(value)``; a backend's own exception becomes an ``EvaluationError``
    naming the layer (secureinfer's errors pass through: they already say where)."""
    try:
        return layer.forward(value)
    except (SecureInferError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - backends raise RuntimeError, ValueError, ...
        raise EvaluationError(scheme, layer.spec.name, layer.spec.kind, exc) from exc


def compile_layers(layers: Sequence[LayerSpec], scheme: str | SchemeConfig | Scheme = "clear",
                   *, calibration: Calibration | np.ndarray | None = None,
                   allow_insecure: bool = False, range_check: str = "warn",
                   **options: Any) -> SecureModel:
    """Compile already-lowered LayerSpecs for ``scheme`` (see ``compile``)."""
    if isinstance(scheme, Scheme):
        sch = scheme
    else:
        sch = resolve(scheme, allow_insecure=allow_insecure, **options)
    if isinstance(calibration, np.ndarray):
        calibration = Calibration.from_data(layers, calibration)
    return SecureModel(layers, sch, calibration, range_check)


def compile(model: Any, scheme: str | SchemeConfig | Scheme = "clear", *,
            input_shape: Sequence[int] | None = None,
            calibration: Calibration | np.ndarray | None = None,
            allow_insecure: bool = False, range_check: str = "warn",
            **options: Any) -> SecureModel:
    """Compile a torch model or an ONNX file for private inference under ``scheme``.

    Args:
        model: a ``torch.nn.Module`` with polynomial activations (see ``secureinfer.nn``),
            or the path of an ``.onnx`` file (see ``secureinfer.onnx_import``).
        scheme: a config string (``"ckks"``, ``"fe-ip?bits=8"``), a ``SchemeConfig`` or
            a configured ``Scheme``.
        input_shape: one input's shape without the batch dimension; taken from the model's
            ``secureinfer_input_shape`` attribute (an ONNX file: from its graph) when
            omitted.
        calibration: a ``Calibration``, or representative inputs to compute one from;
            defaults to the model's ``secureinfer_calibration`` attribute (set by
            ``secureinfer.nn`` when it trains or loads a model).
        allow_insecure: accept parameters below 128-bit security.
        range_check: what ``client.encrypt`` does when an input, or a layer's values on
            it, leave the calibrated ranges: ``"warn"``, ``"error"`` or ``"off"``.
        **options: scheme options, overriding the config string's.

    Raises:
        UnsupportedLayerError: a layer with no HE-friendly form, named; or a ReLU (max-pool,
            ...) that an HE scheme or the secure prefix would have to run.
        CompileError: the scheme cannot run the network; the message says what to change.
        ConfigError: unknown scheme or option (the message lists the valid ones); an ONNX
            file that is malformed or beyond the limits of ``secureinfer.onnx_import``.
    """
    from .compiler import lower

    if is_onnx_path(model):
        return compile_layers(onnx_load(model, input_shape), scheme, calibration=calibration,
                              allow_insecure=allow_insecure, range_check=range_check, **options)
    if input_shape is None:
        input_shape = getattr(model, "secureinfer_input_shape", None)
        if input_shape is None:
            raise ValueError("compile() needs input_shape=(...) (one input, no batch dimension)")
    layers = lower(model, input_shape)
    if calibration is None:
        calibration = getattr(model, "secureinfer_calibration", None)
    return compile_layers(layers, scheme, calibration=calibration,
                          allow_insecure=allow_insecure, range_check=range_check, **options)
