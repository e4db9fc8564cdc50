"""Mutation fuzzing of every parser of received bytes.

A ``Target`` is one parser: valid seed inputs, the call that parses them, and inputs of
other kinds (the "wrong message kind" mutation). ``mutate`` derives a case from a seed by
one of ``MUTATIONS``; ``run_case`` runs it and returns a ``Failure`` when the parser
breaks the rule: only ``SecureInferError`` subclasses raised, each case under
``MAX_CASE_SECONDS``, at most ``max_case_bytes(data)`` traced memory allocated (a header
claiming a huge size must be refused before anything that size is allocated).

Parsers are entries of two tables, so that adding one is one entry:

- ``PARSERS``: name -> builder of a target from the shared ``Setups`` (envelopes, field
  payloads, model files);
- ``SCHEME_PARSERS``: name -> builder of a target from one scheme's ``SchemeSetup`` (its
  input, output and key payloads), run for every configured scheme.

``build_targets`` builds them all; ``tests/test_fuzz.py`` drives them with hypothesis and
``benchmarks/fuzz.py`` with a plain random generator for longer runs.
"""

from __future__ import annotations

import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import codec
from ..errors import SecureInferError
from ..model import Parties, SecureModel, compile_layers
from ..registry import get_registry
from .networks import NETWORKS, inputs

__all__ = [
    "MAX_CASE_SECONDS",
    "MUTATIONS",
    "PARSERS",
    "SCHEME_PARSERS",
    "Failure",
    "SchemeSetup",
    "Setups",
    "Target",
    "build_targets",
    "default_configs",
    "max_case_bytes",
    "mutate",
    "run_case",
]

MAX_CASE_SECONDS = 1.0
MUTATIONS = ("truncate", "flip", "insert", "huge_length", "wrong_kind")
# Values written over what looks like a length field.
HUGE = (2**64 - 1, 2**63, 2**40, 2**32 - 1, 2**31, 2**16 - 1)
_SHORT_SCAN = 1 << 16


@dataclass(frozen=True)
class Target:
    """One parser under fuzzing.

    Attributes:
        name: ``"envelope"``, ``"bfv.input"``, ...
        seeds: valid inputs.
        parse: parses one input (its result is discarded).
        others: valid inputs of other kinds, for the ``wrong_kind`` mutation.
    """

    name: str
    seeds: tuple[bytes, ...]
    parse: Callable[[bytes], Any]
    others: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Failure:
    """A case that broke the rule."""

    target: str
    mutation: str
    problem: str
    data: bytes = field(repr=False)

    def __str__(self) -> str:
        return f"{self.target} [{self.mutation}, {len(self.data)} bytes]: {self.problem}"


def max_case_bytes(data: bytes) -> int:
    """The traced allocation a case may make: 16 MiB plus 32 times its size (parsed keys
    and ciphertexts take a few times their serialized size)."""
    return 16 * 2**20 + 32 * len(data)


@lru_cache(maxsize=64)
def _length_offsets(data: bytes) -> tuple[tuple[int, int], ...]:
    """``(offset, width)`` of the little-endian integers in ``1..len(data)`` at any offset:
    likely length fields. Width 8 over the whole input; widths 4 and 2, which random bytes
    match often, over its first ``_SHORT_SCAN`` bytes. Vectorized, cached per seed."""
    found = []
    for width, dtype in ((8, "<u8"), (4, "<u4"), (2, "<u2")):
        end = len(data) if width == 8 else min(len(data), _SHORT_SCAN)
        for shift in range(width):
            count = (end - shift) // width
            if count <= 0:
                continue
            values = np.frombuffer(data, dtype=dtype, count=count, offset=shift)
            hits = np.flatnonzero((values > 0) & (values <= len(data)))
            found.extend((shift + width * int(i), width) for i in hits)
    return tuple(sorted(found))


def mutate(target: Target, seed: int, how: str, pos: int, value: int) -> bytes:
    """A case from ``target.seeds[seed]``: ``how`` is one of ``MUTATIONS``; ``pos`` and
    ``value`` (any non-negative integers) choose where and what."""
    data = target.seeds[seed % len(target.seeds)]
    n = len(data)
    if how == "truncate":
        return data[: pos % max(n, 1)]
    if how == "flip":
        if not n:
            return data
        i = pos % n
        return data[:i] + bytes([data[i] ^ (1 << (value % 8))]) + data[i + 1:]
    if how == "insert":
        i = pos % (n + 1)
        return data[:i] + bytes([value % 256]) * (1 + value % 7) + data[i:]
    if how == "huge_length":
        offsets = _length_offsets(data)
        if not offsets:
            return data
        i, width = offsets[pos % len(offsets)]
        big = HUGE[value % len(HUGE)] % (1 << (8 * width))
        return data[:i] + big.to_bytes(width, "little") + data[i + width:]
    if how == "wrong_kind":
        return target.others[value % len(target.others)] if target.others else data[::-1]
    raise ValueError(f"unknown mutation {how!r}; one of {', '.join(MUTATIONS)}")


def run_case(target: Target, data: bytes, how: str = "") -> Failure | None:
    """Parse ``data``; a ``Failure`` when the parser breaks the rule, else ``None``."""
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    problem = None
    try:
        target.parse(data)
    except SecureInferError:
        pass
    except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer looks for
        problem = f"raised {type(exc).__name__}: {str(exc)[:200]}"
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    if not tracing:
        tracemalloc.stop()
    if problem is None and seconds > MAX_CASE_SECONDS:
        problem = f"took {seconds:.2f} s (limit {MAX_CASE_SECONDS} s)"
    if problem is None and peak > max_case_bytes(data):
        problem = f"allocated {peak / 2**20:.1f} MiB (limit {max_case_bytes(data) / 2**20:.1f})"
    return None if problem is None else Failure(target.name, how, problem, data)


# ----- setups ---------------------------------------------------------------------------

FUZZ_NETWORK = "mlp_square"  # small, and every scheme runs it


@dataclass
class SchemeSetup:
    """One scheme compiled on ``FUZZ_NETWORK``, its parties, and one message of each
    kind (as payloads, the bytes inside the envelopes)."""

    config: str
    model: SecureModel
    parties: Parties

    @classmethod
    def create(cls, config: str) -> "SchemeSetup":
        """Compile, generate keys, build the server."""
        layers = NETWORKS[FUZZ_NETWORK](np.random.default_rng(0))
        model = compile_layers(layers, config, calibration=inputs(layers, 64, seed=2))
        return cls(config, model, model.setup())

    @cached_property
    def messages(self) -> dict[str, bytes]:
        """Sealed messages: ``public_keys``, ``functional_keys``, ``input``, ``output``."""
        client, server, _ = self.parties
        authority = self.parties.key_owner
        x = inputs(self.model.layers, 64, seed=2)[:2]  # inside the calibrated range
        message = client.encrypt(x)
        return {"public_keys": authority.public_keys(),
                "functional_keys": authority.functional_keys(),
                "input": message, "output": server.evaluate(message)}

    @cached_property
    def payloads(self) -> dict[str, bytes]:
        """The envelopes' payloads (``ciphertext``: the scheme's own input bytes)."""
        out = {k: codec.open_envelope(v).payload for k, v in self.messages.items()}
        out["ciphertext"] = codec.unpack_fields(out["input"])["ct"]
        return out

    def others(self, *names: str) -> tuple[bytes, ...]:
        """Payloads of other kinds, for ``wrong_kind``."""
        return tuple(self.payloads[n] for n in names if self.payloads[n])


@dataclass
class Setups:
    """What the builders share: scheme setups by config, and a scratch directory."""

    configs: Sequence[str]
    scratch: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="si-fuzz-")))
    schemes: dict[str, SchemeSetup] = field(default_factory=dict)

    def scheme(self, config: str) -> SchemeSetup:
        """The (cached) setup of ``config``."""
        if config not in self.schemes:
            self.schemes[config] = SchemeSetup.create(config)
        return self.schemes[config]


# ----- parsers: shared ------------------------------------------------------------------


def _envelope(setups: Setups) -> Target:
    seeds = tuple(m for s in map(setups.scheme, setups.configs) for m in s.messages.values())

    def parse(data: bytes) -> None:
        env = codec.open_envelope(data)
        codec.open_envelope(data, kind=codec.Kind.INPUT, scheme=env.scheme, digest=env.digest)

    kinds = tuple(codec.seal(k, "clear", b"\0" * 16, b"") for k in codec.Kind)
    return Target("envelope", seeds, parse, kinds)


def _fields(setups: Setups) -> Target:
    seeds = tuple(p for s in map(setups.scheme, setups.configs)
                  for k, p in s.payloads.items() if k != "ciphertext" and p)
    return Target("fields", seeds, codec.unpack_fields, tuple(seeds[:1]))


def _model_file(setups: Setups) -> Target | None:
    try:
        import torch
        from torch import nn

        from ..nn import modelfile
        from ..nn.activations import Square
    except ImportError:
        return None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), Square(), nn.Linear(4, 3))
    seed_path = modelfile.save(model, setups.scratch / "seed.npz", meta={},
                               input_shape=(1, 4, 4))
    case_path = setups.scratch / "case.npz"

    def parse(data: bytes) -> None:
        case_path.write_bytes(data)
        modelfile.load(case_path)

    return Target("model_file", (seed_path.read_bytes(),), parse,
                  (np.zeros(0).tobytes(), b"PK\x05\x06" + b"\0" * 18))


PARSERS: dict[str, Callable[[Setups], Target | None]] = {
    "envelope": _envelope,
    "fields": _fields,
    "model_file": _model_file,
}

# ----- parsers: each scheme's payloads ----------------------------------------------------


def _input(s: SchemeSetup) -> Target:
    scheme, ctx = s.model.scheme, s.parties.server.ctx
    return Target(f"{s.config}.input", (s.payloads["ciphertext"],),
                  lambda data: scheme.load_input(ctx, data), s.others("output", "public_keys"))


def _output(s: SchemeSetup) -> Target | None:
    if s.model.scheme.capabilities.output != "encrypted":
        return None  # plaintext output: a field payload, fuzzed as ``fields``
    scheme, secret = s.model.scheme, s.parties.key_owner.secret
    return Target(f"{s.config}.output", (s.payloads["output"],),
                  lambda data: scheme.decrypt(secret, data), s.others("ciphertext", "public_keys"))


def _public_keys(s: SchemeSetup) -> Target | None:
    scheme, functional = s.model.scheme, s.payloads["functional_keys"]
    if not s.payloads["public_keys"]:
        return None
    return Target(f"{s.config}.public_keys", (s.payloads["public_keys"],),
                  lambda data: scheme.open_server(data, functional),
                  s.others("functional_keys", "output"))


def _functional_keys(s: SchemeSetup) -> Target | None:
    scheme, public = s.model.scheme, s.payloads["public_keys"]
    if not s.payloads["functional_keys"]:
        return None
    return Target(f"{s.config}.functional_keys", (s.payloads["functional_keys"],),
                  lambda data: scheme.open_server(public, data), s.others("public_keys", "input"))


def _client_keys(s: SchemeSetup) -> Target | None:
    if s.model.output != "plaintext":
        return None  # HE clients make their own keys
    scheme = s.model.scheme
    return Target(f"{s.config}.client_keys", (s.payloads["public_keys"],), scheme.open_client,
                  s.others("functional_keys", "input"))


SCHEME_PARSERS: dict[str, Callable[[SchemeSetup], Target | None]] = {
    "input": _input,
    "output": _output,
    "public_keys": _public_keys,
    "functional_keys": _functional_keys,
    "client_keys": _client_keys,
}


def default_configs() -> list[str]:
    """Every registered scheme whose backend imports, by its name."""
    registry = get_registry()
    return [name for name in sorted(registry.schemes)
            if registry.get(name).availability() is None]


def build_targets(setups: Setups) -> list[Target]:
    """Every target of ``PARSERS`` and, per config, of ``SCHEME_PARSERS``."""
    targets = [PARSERS[name](setups) for name in PARSERS]
    for config in setups.configs:
        scheme = setups.scheme(config)
        targets.extend(build(scheme) for build in SCHEME_PARSERS.values())
    return [t for t in targets if t is not None]
