"""What a scheme plugin implements: ``Scheme``, ``Capabilities``, ``SecureLayer``, ``Option``.

A ``Scheme`` instance is one configured scheme (its options resolved). The core calls it in
this order; every object it returns is opaque to the core, and every ``bytes`` crosses a
role boundary (the core wraps it in a versioned envelope):

compile time (the model owner)::

    plan = scheme.plan(prefix, calibration)           # JSON-able dict, recorded in reports
    scheme.load_plan(frozen)                          # the core hands back the frozen plan

a client rebuilt from an artifact (no weights)::

    scheme = SchemeClass(options); scheme.load_plan(plan)

client (and, for FE, the authority)::

    secret, public = scheme.keygen()                  # secret: live object; public: bytes
    functional = scheme.functional_keys(secret, prefix)   # FE only; b"" otherwise
    ct = scheme.encrypt(secret, x)                    # x: (n, *input_shape) float -> bytes
    keys = scheme.open_client(public)                 # FE client without the master secret
    y = scheme.decrypt(secret, out)                   # HE only: bytes -> (n, *out_shape)

server (holds no secret; loaded from the server artifact, it re-plans from the layers and
the core checks that the plan and digest equal the stored ones)::

    ctx = scheme.open_server(public, functional)      # parse keys once
    layers = scheme.build_layers(prefix, ctx)         # SecureLayers, built once (encode once)
    value = scheme.load_input(ctx, ct)
    for layer in layers: value = layer.forward(value)
    out = scheme.dump_output(ctx, value)              # bytes (encrypted) or ndarray (plaintext)
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence

import numpy as np

from .errors import ConfigError, UnknownOptionError
from .layers import LayerSpec
from .units import SlotUnits

#: What the server learns under a scheme that encrypts nothing (``Scheme.reveals``).
NOTHING_ENCRYPTED = "everything (reference, no encryption)"

__all__ = [
    "Calibration",
    "Capabilities",
    "NOTHING_ENCRYPTED",
    "Option",
    "Scheme",
    "SecureLayer",
    "import_problem",
]


@dataclass(frozen=True)
class Capabilities:
    """What a scheme can run; the core partitions the network from this alone.

    Attributes:
        layers: LayerSpec kinds the scheme evaluates (``"linear"``, ``"conv2d"``, ...).
        max_degree: the highest total polynomial degree of the secure prefix (1 for
            inner-product FE, 2 for quadratic FE); ``None`` when only the depth budget
            checked by ``Scheme.plan`` limits it (CKKS, BFV).
        output: ``"encrypted"`` (HE: the whole network must run under the scheme) or
            ``"plaintext"`` (FE: the server learns the prefix output, runs the rest clear).
        exact: integer arithmetic, equal to its quantized clear reference bit for bit.
        tolerance: for inexact schemes, the absolute error on logits the conformance
            suite accepts.
        batch: ``encrypt`` accepts many inputs in one message.
        encrypts: ``False`` for a reference that encrypts nothing (``clear``): it runs the
            whole network like an HE scheme, but reports call its output ``clear`` and say
            the server learns everything.
    """

    layers: frozenset[str]
    max_degree: int | None = None
    output: Literal["encrypted", "plaintext"] = "encrypted"
    exact: bool = False
    tolerance: float = 0.0
    batch: bool = True
    encrypts: bool = True


@dataclass(frozen=True)
class Option:
    """One config key a scheme accepts (``ckks?scale_bits=30``).

    Attributes:
        name: the key, lowercase with ``_``.
        type: ``int``, ``float``, ``str`` or ``bool``; values from strings are converted.
        default: the value when the key is absent; ``None`` means "the scheme decides".
        help: one line shown by ``secureinfer schemes``.
        choices: the allowed values, if any.
    """

    name: str
    type: type = str
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] | None = None

    def convert(self, scheme: str, raw: Any) -> Any:
        """Turn ``raw`` (often a string) into this option's type, or raise ``ConfigError``."""
        try:
            if self.type is bool and isinstance(raw, str):
                low = raw.strip().lower()
                if low not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                    raise ValueError(raw)
                value: Any = low in {"1", "true", "yes", "on"}
            elif self.type is int and isinstance(raw, str):
                value = int(raw, 0)
            else:
                value = self.type(raw)
        except (TypeError, ValueError):
            raise ConfigError(
                f"scheme {scheme!r}: option {self.name}={raw!r} is not a valid "
                f"{self.type.__name__}"
            ) from None
        if self.choices is not None and value not in self.choices:
            raise ConfigError(
                f"scheme {scheme!r}: option {self.name}={raw!r} is not one of "
                f"{', '.join(map(str, self.choices))}"
            )
        return value


def import_problem(load: Callable[[], Any]) -> str | None:
    """``None`` when ``load()`` imports a scheme's backend, else the ``ImportError``'s
    message (which should name the extra to install): ``Scheme.availability`` in one line.
    """
    try:
        load()
    except ImportError as exc:
        return str(exc)
    return None


@dataclass
class Calibration:
    """Observed value ranges, used to plan parameters and to check inputs at run time.

    Attributes:
        input_range: ``(lo, hi)`` of every input value.
        layer_ranges: per layer of the network, ``(lo, hi)`` of its output values.
        samples: a few representative inputs (``(n, *input_shape)``), for quantization.
    """

    input_range: tuple[float, float]
    layer_ranges: list[tuple[float, float]]
    samples: np.ndarray | None = None

    @classmethod
    def from_data(cls, layers: Sequence[LayerSpec], x: np.ndarray,
                  margin: float = 0.25, max_samples: int = 256) -> "Calibration":
        """Run ``layers`` on ``x`` and record the range of every layer's output.

        ``margin`` widens every layer's range by that fraction of its width on both sides
        (the input range is kept as observed: it is the data's domain).
        """
        x = np.asarray(x, dtype=np.float64)
        ranges = []
        y = x
        for layer in layers:
            y = layer.forward(y)
            lo, hi = float(y.min()), float(y.max())
            pad = (hi - lo) * margin
            ranges.append((lo - pad, hi + pad))
        return cls((float(x.min()), float(x.max())), ranges, x[:max_samples].copy())

    def check(self, layers: Sequence[LayerSpec], x: np.ndarray,
              tolerance: float = 0.0) -> list[str]:
        """Run ``layers`` on ``x`` in float64; one message per range that ``x`` leaves.

        The input is compared with ``input_range`` and each layer's output (the next
        layer's input) with its ``layer_ranges`` entry; ``tolerance`` is the accepted
        excess as a fraction of a range's width.

        Raises:
            ConfigError: the calibration does not have one range per layer.
        """
        if len(self.layer_ranges) != len(layers):
            raise ConfigError(f"the calibration has {len(self.layer_ranges)} layer ranges for "
                             f"{len(layers)} layers; recalibrate this model")
        y = np.asarray(x, dtype=np.float64)
        problems = []
        found = _violation(y, self.input_range, tolerance)
        if found:
            problems.append(f"input of layer {layers[0].name} (the network input): {found}")
        for i, layer in enumerate(layers):
            y = layer.forward(y)
            found = _violation(y, self.layer_ranges[i], tolerance)
            if found:
                feeds = f", the input of layer {layers[i + 1].name}" if i + 1 < len(layers) \
                    else ""
                problems.append(f"output of layer {layer.name} ({layer.kind}{feeds}): {found}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (samples left out)."""
        return {"input_range": list(self.input_range),
                "layer_ranges": [list(r) for r in self.layer_ranges]}


def _violation(values: np.ndarray, bounds: Sequence[float], tolerance: float) -> str | None:
    lo, hi = float(bounds[0]), float(bounds[1])
    slack = tolerance * (hi - lo)
    flat = values.reshape(len(values), -1)
    bad = (flat < lo - slack).any(axis=1) | (flat > hi + slack).any(axis=1)
    if not bad.any():
        return None
    return (f"values span [{flat.min():.4g}, {flat.max():.4g}] in {int(bad.sum())} of "
            f"{len(values)} input(s), outside the calibrated [{lo:.4g}, {hi:.4g}]")


class SecureLayer(abc.ABC):
    """Evaluates one LayerSpec on the server under a scheme.

    Built once per server by ``Scheme.build_layers``: do the expensive, input-independent
    work (encoding weights as plaintexts, precomputing tables) in ``__init__``.

    Args:
        spec: the layer to evaluate.
        ctx: what ``Scheme.open_server`` returned (public and evaluation keys).
        scheme: the configured scheme (its ``plan_`` included).
    """

    def __init__(self, spec: LayerSpec, ctx: Any, scheme: "Scheme") -> None:
        self.spec = spec
        self.ctx = ctx
        self.scheme = scheme

    @abc.abstractmethod
    def forward(self, value: Any) -> Any:
        """Evaluate the layer on the scheme's encrypted (or in-flight) value."""


class Scheme(abc.ABC):
    """A configured encryption scheme. Subclass it in a plugin and register the class.

    Class attributes describe the scheme; ``secureinfer schemes`` lists them.

    Args:
        options: the config's keys (``Option`` names), converted and checked.
        allow_insecure: accept parameters below 128-bit security.
        deploy: the model is compiled for deployment, where the client does not hold it
            (``secureinfer.privacy``): unset output-privacy options resolve to on.
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    backend: ClassVar[str] = ""
    extra: ClassVar[str | None] = None
    description: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities]
    options: ClassVar[tuple[Option, ...]] = ()
    layer_types: ClassVar[dict[str, type[SecureLayer]]] = {}
    security_basis: ClassVar[str] = ""
    """How ``security_bits`` is obtained (which standard's table, which estimate), for
    ``secureinfer schemes``; a plan refines it as ``plan_["security_source"]``."""
    pruning_unit: ClassVar[str | None] = None
    """The weight group the scheme evaluates as a whole and skips when it is all zero
    (``secureinfer.nn.pruning.UNITS``: ``"rows"``, ``"hidden"``, ``"diagonals"``);
    ``None`` when zero weights save nothing in particular."""

    def pruning_units(self) -> list[SlotUnits]:
        """After ``plan``: for each weighted layer the compiled layout evaluates as
        plaintext diagonals, which diagonal every weight lands in (``SlotUnits``), so that
        ``secureinfer.nn.prune`` zeroes the units the plan really skips. ``[]`` (the
        default) when the scheme's units do not depend on its layout."""
        return []

    def __init__(self, options: dict[str, Any] | None = None, *,
                 allow_insecure: bool = False, deploy: bool = False) -> None:
        declared = {o.name: o for o in self.options}
        self.opts: dict[str, Any] = {name: o.default for name, o in declared.items()}
        for key, raw in (options or {}).items():
            norm = key.strip().lower().replace("-", "_")
            if norm not in declared:
                raise UnknownOptionError(self.name, norm, list(declared))
            self.opts[norm] = declared[norm].convert(self.name, raw)
        self.allow_insecure = allow_insecure
        # compiled for deployment (the client will not hold the model): schemes whose
        # outputs reveal more than the result resolve unset privacy options from it
        self.deploy = bool(deploy)
        self.plan_: dict[str, Any] = {}

    # ----- description -------------------------------------------------------------

    @classmethod
    def availability(cls) -> str | None:
        """``None`` when the backend imports; otherwise why not and what to install."""
        return None

    @classmethod
    def backend_version(cls) -> str | None:
        """The backend library's version, or ``None`` when it has none."""
        return None

    @property
    def security_bits(self) -> int | None:
        """Security level of the planned parameters (after ``plan``); ``None`` for a
        scheme that encrypts nothing (``clear``)."""
        return int(self.plan_.get("security_bits", 128))

    @property
    def security_source(self) -> str | None:
        """How this plan's ``security_bits`` was obtained (after ``plan``): the table row or
        estimate used; ``None`` for a scheme that encrypts nothing."""
        if self.security_bits is None:
            return None
        return str(self.plan_.get("security_source") or self.security_basis
                   or "not stated by the scheme")

    def batch_size(self) -> int:
        """How many inputs one ``encrypt`` call should carry (after ``plan``).

        1 for per-input packing; the slot capacity for batch packing. Runners and
        benchmarks group inputs by this.
        """
        return 1

    def reveals(self, prefix: Sequence[LayerSpec]) -> str | None:
        """What the server learns in plaintext.

        Plaintext-output schemes must override it (the prefix outputs the server sees).
        The default: ``None`` (the server learns nothing) when the scheme encrypts, and
        ``"everything (no encryption)"`` when ``capabilities.encrypts`` is false.
        """
        return None if self.capabilities.encrypts else NOTHING_ENCRYPTED

    def deploy_problem(self) -> str | None:
        """Why this planned scheme must not be written as an artifact (after ``plan``), with
        the fix; ``None`` when it may. The default reads the plan's ``output_privacy_by``
        (``secureinfer.privacy``): a model whose auto privacy option resolved to off
        because it was compiled for one process is refused."""
        from .privacy import save_problem

        return save_problem(self.name, self.plan_)

    # ----- compile time ------------------------------------------------------------

    def plan(self, prefix: Sequence[LayerSpec], calibration: Calibration | None) -> dict[str, Any]:
        """Choose parameters for ``prefix``; store and return them as a JSON-able dict.

        Raise ``CompileError`` (with the layer, the need and the fix) when the prefix
        cannot run, e.g. it is deeper than the modulus chain allows. The result must
        contain ``security_bits``.
        """
        self.plan_ = {"security_bits": 128}
        return self.plan_

    def load_plan(self, plan: Mapping[str, Any]) -> None:
        """Restore the client side of a freshly constructed scheme from ``plan`` alone.

        ``plan`` is what ``plan`` returned, frozen by the core (a JSON round trip: tuples
        become lists, arrays must already be lists). After it, ``keygen``, ``encrypt``,
        ``open_client``, ``check_input``, ``decrypt`` and ``batch_size`` work without the
        layers' weights, so everything they read must be in the plan. The core also calls
        it right after ``plan`` on the model owner's scheme, so the in-process client runs
        the same code as a deployed one; server-side state that ``plan`` derived from the
        weights may stay. The authority's ``functional_keys`` receives the prefix itself.
        """
        self.plan_ = dict(plan)

    def fresh(self) -> "Scheme":
        """An unplanned scheme with the same options: every compiled model owns one."""
        options = {k: v for k, v in self.opts.items() if v is not None}
        return type(self)(options, allow_insecure=self.allow_insecure, deploy=self.deploy)

    def reference(self, prefix: Sequence[LayerSpec], x: np.ndarray) -> np.ndarray:
        """The clear result the scheme must reproduce on ``x`` for ``prefix``.

        Exact schemes return their integer pipeline run in the clear (dequantized);
        the default is the float evaluation.
        """
        from .layers import forward

        return forward(list(prefix), x)

    def check_input(self, x: np.ndarray) -> None:
        """Raise ``RangeError`` when ``x`` would give a wrong result (client side)."""

    # ----- client / authority ------------------------------------------------------

    @abc.abstractmethod
    def keygen(self) -> tuple[Any, bytes]:
        """Generate keys: the client's live secret object and the server's public bytes."""

    def functional_keys(self, secret: Any, prefix: Sequence[LayerSpec]) -> bytes:
        """FE: the authority derives the server's functional keys for ``prefix``."""
        return b""

    def open_client(self, public: bytes) -> Any:
        """Plaintext-output schemes: the encryption key of a client that holds only the
        authority's master public key. ``encrypt`` then receives what this returns."""
        raise NotImplementedError(f"scheme {self.name!r}: clients encrypt with their own keys")

    @abc.abstractmethod
    def encrypt(self, keys: Any, x: np.ndarray) -> bytes:
        """Encrypt a batch ``x`` of shape ``(n, *input_shape)``.

        ``keys`` is the secret object from ``keygen`` or, for an FE client that is not the
        authority, what ``open_client`` returned.
        """

    def decrypt(self, secret: Any, output: bytes) -> np.ndarray:
        """HE: decrypt the server's output into ``(n, *out_shape)`` floats."""
        raise NotImplementedError(f"scheme {self.name!r} has plaintext output")

    # ----- server --------------------------------------------------------------------

    @abc.abstractmethod
    def open_server(self, public: bytes, functional: bytes) -> Any:
        """Parse the public (and functional) keys once; return the server context."""

    def build_layers(self, prefix: Sequence[LayerSpec], ctx: Any) -> list[SecureLayer]:
        """One SecureLayer per spec by ``layer_types``; override to fuse layers."""
        return [self.layer_types[spec.kind](spec, ctx, self) for spec in prefix]

    @abc.abstractmethod
    def load_input(self, ctx: Any, payload: bytes) -> Any:
        """Parse the client's ciphertext bytes into the value the first layer takes."""

    def input_count(self, value: Any) -> int | None:
        """How many inputs the value ``load_input`` returned carries, or ``None`` when the
        scheme cannot tell; the core refuses a message whose sample count differs."""
        return None

    @abc.abstractmethod
    def dump_output(self, ctx: Any, value: Any) -> bytes | np.ndarray:
        """The last layer's value: ciphertext bytes (HE) or plaintext ``(n, ...)`` (FE)."""


# A callable a plugin receives from ``secureinfer_register_schemes``.
RegisterFn = Callable[..., None]
