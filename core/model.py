"""``compile`` and the compiled ``SecureModel`` with its roles: client, server, authority.

Each role holds only what it may hold: the client (HE) or the authority (FE) holds the
secret key; the FE client holds the master public key only; the server holds the public
and evaluation keys (or functional keys) and the model. Everything that passes between
them is ``bytes`` in a versioned envelope.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from . import codec
from .codec import Kind
from .config import SchemeConfig
from .errors import (CompileError, ConfigError, EnvelopeError, EvaluationError, InputError,
                     RangeError, RangeWarning, RoleError, SecureInferError)
from .layers import LayerSpec, forward, nonfinite_parameters
from .metrics import Meter
from .onnx_import import is_onnx_path, load as onnx_load
from .partition import Partition, partition
from .registry import resolve
from .report import server_learns
from .scheme import Calibration, Scheme, _violation

#: Accepted excess past a calibrated range, as a fraction of its width, before
#: ``SecureModel.check_ranges`` reports it (layer ranges already carry a 25% margin).
RANGE_TOLERANCE = 0.02

__all__ = ["Authority", "Client", "ClientModel", "Parties", "SecureModel", "Server", "compile",
           "compile_layers", "freeze_plan"]


def freeze_plan(plan: Mapping[str, Any]) -> str:
    """A plan as canonical JSON text: the frozen form every role and artifact shares."""
    try:
        return json.dumps(plan, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CompileError(f"the scheme's plan is not JSON data ({exc}): the plugin must "
                           "return lists, numbers, strings and dicts only") from None


class _Roles:
    """What every holder of a compiled model shares: the scheme rebuilt from its plan, the
    digest stamped on every message, the input's shape and calibrated range, the meter.

    ``SecureModel`` (the model owner's, with every layer) and ``ClientModel`` (a data
    owner's, from the client artifact) both hand out ``client()`` and ``authority()``.
    """

    scheme: Scheme
    digest: bytes
    meter: Meter
    range_check: str
    input_range: tuple[float, float] | None
    _plan_text: str

    @property
    def plan(self) -> dict[str, Any]:
        """The frozen plan (a fresh copy: changing it changes nothing)."""
        return json.loads(self._plan_text)

    @property
    def input_shape(self) -> tuple[int, ...]:  # pragma: no cover - both subclasses define it
        raise NotImplementedError

    @property
    def secure_layers(self) -> list[LayerSpec]:  # pragma: no cover - both subclasses define it
        raise NotImplementedError

    @property
    def output(self) -> str:
        """``"encrypted"`` (HE), ``"plaintext"`` (FE) or ``"clear"`` (a scheme that
        encrypts nothing: the ``clear`` reference)."""
        caps = self.scheme.capabilities
        return caps.output if caps.encrypts else "clear"

    def check_input_range(self, x: np.ndarray) -> list[str]:
        """The client's check: ``x`` against the calibrated input range (no model needed).

        Per ``range_check`` as in ``SecureModel.check_ranges``; returns the problems found.
        """
        if self.range_check == "off" or self.input_range is None:
            return []
        found = _violation(self._batch(x), self.input_range, RANGE_TOLERANCE)
        problems = [f"the network input: {found}"] if found else []
        self._report(problems)
        return problems

    def _report(self, problems: list[str]) -> None:
        if not problems:
            return
        fix = ("scale inputs like the training data, or recalibrate "
               "(secureinfer.nn.calibrate) on data that covers them")
        if self.range_check == "error":
            raise RangeError(f"{problems[0]}; the scheme was planned for the calibrated "
                             f"range and could return a wrong result: {fix}")
        later = [p.split(" (", 1)[0].replace("output of layer ", "") for p in problems[1:]]
        more = f"; also out of range: the outputs of {', '.join(later)}" if later else ""
        warnings.warn(f"{problems[0]}{more}: {fix}", RangeWarning, stacklevel=4)

    def _batch(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.shape == self.input_shape:
            x = x[None]
        if x.shape[1:] != self.input_shape:
            raise InputError(f"input of shape {x.shape} does not match the model's input "
                             f"{self.input_shape} (with or without a batch dimension)")
        return x

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
                raise RoleError("an FE client encrypts with the authority's public keys: "
                                 "model.client(authority.public_keys())")
            return Client(self, None, public_keys)
        return Client(self, Authority(self), None)

    def owner(self) -> "Client":
        """The data owner as its own key owner: HE, the client with its secret key; FE,
        the client that is the authority (``client.keys`` is the ``Authority``)."""
        if self.output == "plaintext":
            return Client(self, self.authority(), None)
        return self.client()


class SecureModel(_Roles):
    """A network compiled for one scheme: its secure prefix, clear suffix and plan.

    Attributes:
        layers: every layer of the network.
        scheme: the configured scheme, owned by this model alone (its ``plan_`` filled).
        secure_layers: the prefix the scheme runs.
        clear_layers: the suffix run in the clear by the server (plaintext-output schemes).
        calibration: observed ranges (``None`` if no calibration data was given).
        plan: the frozen plan (JSON data; a copy on every read).
        meter: timings and message sizes of every role call.
    """

    def __init__(self, layers: Sequence[LayerSpec], scheme: Scheme,
                 calibration: Calibration | None = None, range_check: str = "warn") -> None:
        if range_check not in ("warn", "error", "off"):
            raise ConfigError(f"range_check={range_check!r}: use 'warn', 'error' or 'off'")
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
        self.input_range = calibration.input_range if calibration is not None else None
        self.range_check = range_check
        self.partition: Partition = partition(self.layers, scheme.capabilities, scheme.name)
        self._plan_text = freeze_plan(scheme.plan(self.secure_layers, calibration))
        scheme.load_plan(json.loads(self._plan_text))
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
    def reveals(self) -> str | None:
        """What the server learns in plaintext.

        Plaintext-output schemes (FE): the values of the secure prefix's outputs, e.g.
        ``"the 32 outputs of layer fc1 (Linear 64->32)"``. Encrypted-output schemes (HE):
        ``None``, the server learns nothing. A scheme that encrypts nothing (``clear``)
        says so: the server learns everything.
        """
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
        if self.scheme.security_source:
            lines.append(f"security from: {self.scheme.security_source}")
        if self.plan.get("output_privacy"):
            lines.append(f"client learns: the result; {self.plan['output_privacy']}")
        lines.append(f"server learns: {server_learns(self.output, self.reveals)}")
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
        """The model owner's check: ``x`` and every layer's values on it against the
        calibrated ranges (a client checks only its input: ``check_input_range``).

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
        self._report(problems)
        return problems

    def check_revealed(self, y: np.ndarray) -> list[str]:
        """The FE server's check: the prefix outputs it learned against their calibrated
        range (the only intermediate values it sees). Returns the problems found."""
        cal = self.calibration
        if self.range_check == "off" or cal is None or not self.clear_layers:
            return []
        last = self.secure_layers[-1]
        found = _violation(np.asarray(y, dtype=np.float64),
                           cal.layer_ranges[len(self.secure_layers) - 1], RANGE_TOLERANCE)
        problems = [f"output of layer {last.name} ({last.kind}, revealed to the server): "
                    f"{found}"] if found else []
        self._report(problems)
        return problems

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the versioned artifact: ``server/`` and ``client/`` (``secureinfer.artifact``).

        Raises:
            ArtifactError: the model was compiled for one process and its outputs are
                not protected by default (``Scheme.deploy_problem``): compile it with
                ``deploy=True``, or set the scheme's privacy option explicitly.
        """
        from .artifact import save

        return save(self, directory)

    # ----- roles ---------------------------------------------------------------------

    def server(self, public_keys: bytes, functional_keys: bytes | None = None) -> "Server":
        """The evaluator, from the key owner's public (and functional) key messages."""
        return Server(self, public_keys, functional_keys)

    def setup(self) -> "Parties":
        """Keys for everyone: ``(client, server, authority)``.

        FE: the client is the authority (the usual single-owner setting) and holds the
        master secret key, which some schemes use for a faster encryption;
        ``client(authority.public_keys())`` is a client without it. HE: there is no
        authority (``None``); the client generates and holds its own secret key and
        ``client.public_keys()`` is what the server got."""
        client = self.owner()
        keys = client.keys
        if self.output == "plaintext":
            return Parties(client, self.server(keys.public_keys(), keys.functional_keys()),
                           keys)
        return Parties(client, self.server(keys.public_keys()), None)


class ClientModel(_Roles):
    """A compiled model as a data owner holds it: no weights of the layers the server
    runs under HE (FE: the secure prefix, which the authority needs for functional keys).

    Built by ``secureinfer.load_client`` from the client artifact: the scheme is
    constructed from its config and restored from the plan (``Scheme.load_plan``); the
    client checks its input against the calibrated input range only.

    Attributes:
        scheme: the scheme restored from the plan.
        digest: the plan digest stamped on every message.
        input_range: the calibrated ``(lo, hi)`` of the inputs, or ``None``.
        secure_layers: FE: the secure prefix (for ``functional_keys``); HE: empty.
    """

    def __init__(self, scheme: Scheme, plan_text: str, digest: bytes,
                 input_shape: Sequence[int], input_range: tuple[float, float] | None,
                 range_check: str = "warn", secure_layers: Sequence[LayerSpec] = ()) -> None:
        self.scheme = scheme
        self._plan_text = plan_text
        self.digest = digest
        self._input_shape = tuple(int(d) for d in input_shape)
        self.input_range = input_range
        self.range_check = range_check
        self._secure = list(secure_layers)
        self.meter = Meter()

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input (no batch dimension)."""
        return self._input_shape

    @property
    def secure_layers(self) -> list[LayerSpec]:
        """FE: the prefix the authority derives functional keys from; HE: empty."""
        return self._secure


class Parties(NamedTuple):
    """What ``SecureModel.setup`` hands out; ``authority`` is ``None`` for HE schemes."""

    client: "Client"
    server: "Server"
    authority: "Authority | None"

    @property
    def key_owner(self) -> "Authority":
        """Who holds the secret key: the FE authority, or the HE client's own keys."""
        return self.authority if self.authority is not None else self.client.keys


class Authority:
    """Owns the secret (or master secret) key; gives out public and functional keys."""

    def __init__(self, model: _Roles) -> None:
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

    def __init__(self, model: _Roles, keys: Authority | None,
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
            raise RoleError("this FE client holds no keys of its own: the authority does")
        return self.keys.public_keys()

    def encrypt(self, x: np.ndarray) -> bytes:
        """Encrypt one input or a batch ``(n, *input_shape)`` (timed as ``encrypt``)."""
        model = self._model
        x = model._batch(x)
        if not np.all(np.isfinite(x)):
            raise RangeError("input contains NaN or infinity")
        model.check_input_range(x)
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
            raise RoleError("this client holds no secret key and cannot decrypt")
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
            raise RoleError("an FE server needs the authority's functional keys")
        self.ctx = scheme.open_server(public, functional)
        self.layers = scheme.build_layers(model.secure_layers, self.ctx)

    def evaluate(self, ciphertext: bytes, meter: Meter | None = None) -> bytes:
        """Run the network on an input message; return the output message (timed as
        ``evaluate`` on ``meter``, by default the model's; for plaintext-output schemes the
        clear suffix is included, after the revealed prefix outputs are range-checked)."""
        model = self._model
        scheme = model.scheme
        meter = model.meter if meter is None else meter
        fields = codec.unpack_fields(model._open(ciphertext, Kind.INPUT))
        n, payload = fields.get("n"), fields.get("ct")
        if not isinstance(n, int) or not isinstance(payload, bytes) or n < 1:
            raise EnvelopeError("input message lacks its sample count or ciphertext")
        with meter.phase("evaluate", n):
            value = scheme.load_input(self.ctx, payload)
            _check_count(scheme.input_count(value), n, "input ciphertext")
            for layer in self.layers:
                value = _run_layer(scheme.name, layer, value)
            out = scheme.dump_output(self.ctx, value)
            if isinstance(out, np.ndarray):
                _check_count(len(out), n, "revealed prefix output")
                model.check_revealed(out)
                y = forward(model.clear_layers, out)
                msg = model._seal(Kind.PLAINTEXT_OUTPUT, codec.pack_fields({"y": y}))
            else:
                msg = model._seal(Kind.OUTPUT, out)
        meter.size("output", len(msg), n)
        return msg

    def infer(self, ciphertext: bytes) -> np.ndarray:
        """Plaintext-output schemes: evaluate and read the result on the server."""
        if self._model.output != "plaintext":
            raise RoleError(f"scheme {self._model.scheme.name} has {self._model.output} "
                            "output, not plaintext for the server: the client reads the "
                            "result (client.decrypt)")
        env = codec.open_envelope(self.evaluate(ciphertext))
        return codec.unpack_fields(env.payload)["y"].astype(np.float64)


def _check_count(found: int | None, n: int, what: str) -> None:
    if found is not None and found != n:
        raise EnvelopeError(f"the input message says it holds {n} sample(s); its {what} "
                            f"holds {found}")


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
                   deploy: bool = False, **options: Any) -> SecureModel:
    """Compile already-lowered LayerSpecs for ``scheme`` (see ``compile``)."""
    if isinstance(scheme, Scheme):
        # compiled models never share a Scheme (nor its plan); the keyword options override
        # the template's and are validated like a config string's (UnknownOptionError)
        template = {k: v for k, v in scheme.opts.items() if v is not None}
        sch = type(scheme)({**template, **options},
                           allow_insecure=scheme.allow_insecure or allow_insecure,
                           deploy=scheme.deploy or deploy)
    else:
        sch = resolve(scheme, allow_insecure=allow_insecure, deploy=deploy, **options)
    if isinstance(calibration, np.ndarray):
        calibration = Calibration.from_data(layers, calibration)
    return SecureModel(layers, sch, calibration, range_check)


def compile(model: Any, scheme: str | SchemeConfig | Scheme = "clear", *,
            input_shape: Sequence[int] | None = None,
            calibration: Calibration | np.ndarray | None = None,
            allow_insecure: bool = False, range_check: str = "warn", deploy: bool = False,
            **options: Any) -> SecureModel:
    """Compile a torch model or an ONNX file for private inference under ``scheme``.

    Args:
        model: a ``torch.nn.Module`` with polynomial activations (see ``secureinfer.nn``),
            or the path of an ``.onnx`` file (see ``secureinfer.onnx_import``).
        scheme: a config string (``"ckks"``, ``"fe-ip?bits=8"``), a ``SchemeConfig`` or
            a configured ``Scheme`` (used as a template: the model gets its own copy,
            ``Scheme.fresh``, so one object compiles any number of networks).
        input_shape: one input's shape without the batch dimension; taken from the model's
            ``secureinfer_input_shape`` attribute (an ONNX file: from its graph) when
            omitted.
        calibration: a ``Calibration``, or representative inputs to compute one from;
            defaults to the model's ``secureinfer_calibration`` attribute (set by
            ``secureinfer.nn`` when it trains or loads a model).
        allow_insecure: accept parameters below 128-bit security.
        range_check: what ``client.encrypt`` does when an input, or a layer's values on
            it, leave the calibrated ranges: ``"warn"``, ``"error"`` or ``"off"``.
        deploy: compile for deployment (``save``, then ``secureinfer serve``), where the
            data owners do not hold the model: HE outputs are then sanitized by default
            (``secureinfer.privacy``). ``False``: one process, where the client holds the
            model; the outputs are not sanitized unless an option asks, and ``save``
            refuses the model.
        **options: scheme options, overriding the config string's.

    Raises:
        UnsupportedLayerError: a layer with no HE-friendly form, named; or a ReLU (max-pool,
            ...) that an HE scheme or the secure prefix would have to run.
        CompileError: the scheme cannot run the network; the message says what to change.
        ConfigError: unknown scheme or option (the message lists the valid ones), no
            ``input_shape`` given and none on the model, or an ONNX file that is malformed
            or beyond the limits of ``secureinfer.onnx_import``.
    """
    from .compiler import lower

    if is_onnx_path(model):
        return compile_layers(onnx_load(model, input_shape), scheme, calibration=calibration,
                              allow_insecure=allow_insecure, range_check=range_check,
                              deploy=deploy, **options)
    if input_shape is None:
        input_shape = getattr(model, "secureinfer_input_shape", None)
        if input_shape is None:
            raise ConfigError("compile() needs input_shape=(...) (one input, no batch "
                              "dimension, e.g. (1, 28, 28)), or a model with a "
                              "secureinfer_input_shape attribute (secureinfer.nn sets it)")
    layers = lower(model, input_shape)
    if calibration is None:
        calibration = getattr(model, "secureinfer_calibration", None)
    return compile_layers(layers, scheme, calibration=calibration,
                          allow_insecure=allow_insecure, range_check=range_check,
                          deploy=deploy, **options)
