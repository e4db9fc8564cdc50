"""Mutation fuzzing of every parser of received bytes.

A ``Target`` is one parser: valid seed inputs, the call that parses them, and inputs of
other kinds (the "wrong message kind" mutation). ``mutate`` derives a case from a seed by
one of ``MUTATIONS``; ``run_case`` runs it and returns a ``Failure`` when the parser
breaks the rule: only ``SecureInferError`` subclasses raised, each case under
``MAX_CASE_SECONDS``, at most ``max_case_bytes(data)`` traced memory allocated (a header
claiming a huge size must be refused before anything that size is allocated).

Parsers are entries of two tables, so that adding one is one entry:

- ``PARSERS``: name -> builder of a target from the shared ``Setups`` (envelopes, field
  payloads, model files, compiled artifacts' client and server parts, and the HTTP bodies
  of ``secureinfer serve``: key uploads and inputs to a live service on 127.0.0.1, the
  client bundle a client fetches);
- ``SCHEME_PARSERS``: name -> builder of a target from one scheme's ``SchemeSetup`` (its
  input, output and key payloads), run for every configured scheme.

``build_targets`` builds them all; ``tests/test_fuzz.py`` drives them with hypothesis and
``benchmarks/fuzz.py`` with a plain random generator for longer runs.
"""

from __future__ import annotations

import json
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
    "HttpRefused",
    "LiveService",
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
        model = compile_layers(layers, config, calibration=inputs(layers, 64, seed=2),
                               deploy=True)  # as deployed: the artifacts are fuzzed too
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
    live: Any = None  # (LiveService, SchemeSetup) of the HTTP targets, started once
    fast: list[str] | None = None  # configs re-planned fast (server artifact targets)

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


# ----- parsers: compiled artifacts and HTTP bodies -----------------------------------------

#: Server artifacts are re-planned on every case: fuzzed for the configs that plan fast.
FAST_PLAN_SECONDS = MAX_CASE_SECONDS / 10


def _saved(setups: Setups, config: str) -> Path:
    path = setups.scratch / "artifacts" / str(abs(hash(config)))
    if not (path / "server").exists():
        setups.scheme(config).model.save(path)
    return path


def _fast_configs(setups: Setups) -> list[str]:
    """The configs whose ``load_server`` (after a first, warming one) is fast (cached)."""
    from ..artifact import load_server

    if setups.fast is None:
        setups.fast = []
        for config in setups.configs:
            load_server(_saved(setups, config))
            start = time.perf_counter()
            load_server(_saved(setups, config))
            if time.perf_counter() - start < FAST_PLAN_SECONDS:
                setups.fast.append(config)
    return setups.fast


def _client_manifest(setups: Setups) -> Target:
    from ..artifact import client_bundle, client_from_bundle

    bundles = [client_bundle(_saved(setups, c)) for c in setups.configs]
    arrays = dict(bundles)

    def parse(data: bytes) -> None:
        client_from_bundle(data, arrays.get(data))

    return Target("client_manifest", tuple(m for m, _ in bundles), parse,
                  tuple(a for _, a in bundles if a))


def _client_arrays(setups: Setups) -> Target | None:
    from ..artifact import client_bundle, client_from_bundle

    with_arrays = [b for b in map(client_bundle, (_saved(setups, c) for c in setups.configs))
                   if b[1]]
    if not with_arrays:
        return None
    manifests = {a: m for m, a in with_arrays}
    first = with_arrays[0][0]

    def parse(data: bytes) -> None:
        client_from_bundle(manifests.get(data, first), data)

    return Target("client_arrays", tuple(a for _, a in with_arrays), parse,
                  tuple(m for m, _ in with_arrays))


def _server_part(setups: Setups, name: str, which: str) -> Target | None:
    from ..artifact import ARRAYS, MANIFEST, load_server

    configs = _fast_configs(setups)
    if not configs:
        return None
    sources = [_saved(setups, c) / "server" for c in configs]
    file = MANIFEST if which == "manifest" else ARRAYS
    seeds = tuple((s / file).read_bytes() for s in sources if (s / file).exists())
    case = setups.scratch / f"case-{name}"
    (case / "server").mkdir(parents=True, exist_ok=True)
    source_of = {(s / file).read_bytes(): s for s in sources if (s / file).exists()}

    def parse(data: bytes) -> None:
        source = source_of.get(data, sources[0])
        for other in (MANIFEST, ARRAYS):
            target = case / "server" / other
            if other == file:
                target.write_bytes(data)
            elif (source / other).exists():
                target.write_bytes((source / other).read_bytes())
            else:
                target.unlink(missing_ok=True)
        load_server(case)

    others = tuple((s / (ARRAYS if file == MANIFEST else MANIFEST)).read_bytes()
                   for s in sources if (s / (ARRAYS if file == MANIFEST else MANIFEST)).exists())
    return Target(name, seeds, parse, others) if seeds else None


def _server_manifest(setups: Setups) -> Target | None:
    return _server_part(setups, "server_manifest", "manifest")


def _server_arrays(setups: Setups) -> Target | None:
    return _server_part(setups, "server_arrays", "arrays")


def _model_bundle(setups: Setups) -> Target | None:
    try:
        from ..remote import _split_bundle
        from ..serve.app import _bundle
        from ..serve.settings import Settings
    except SecureInferError:  # the serve extra is missing
        return None
    from ..artifact import client_from_bundle

    seeds = tuple(_bundle(Settings(artifact=_saved(setups, c))) for c in setups.configs)

    def parse(data: bytes) -> None:
        client_from_bundle(*_split_bundle(data, "GET /v1/model"))

    return Target("http.model_bundle", seeds, parse, (b"{}", b"[]"))


class HttpRefused(SecureInferError):
    """The service answered a fuzzed body with a 4xx (what it must do)."""


@dataclass
class LiveService:
    """``secureinfer serve`` of one artifact in a thread on 127.0.0.1, and an HTTP client."""

    url: str
    http: Any
    server: Any

    @classmethod
    def start(cls, artifact: Path, keys: Path) -> "LiveService":
        """Serve ``artifact`` (keys under ``keys``) on a free port; wait until it answers."""
        import socket
        import threading

        import httpx
        import uvicorn

        from ..serve import Settings, create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        app = create_app(Settings(artifact=artifact, keys_dir=keys, max_request_bytes=64 << 20))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               log_level="critical", access_log=False))
        threading.Thread(target=server.run, daemon=True, name="fuzz-serve").start()
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return cls(f"http://127.0.0.1:{port}", httpx.Client(timeout=5), server)

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
        """POST ``body``; the response body, ``HttpRefused`` on a 4xx, ``RuntimeError`` on
        anything else that is not a 2xx (a 5xx breaks the rule)."""
        response = self.http.post(self.url + path, content=body, headers=headers or {})
        if 400 <= response.status_code < 500:
            raise HttpRefused(f"{response.status_code}: {response.text[:200]}")
        if response.status_code >= 300 or "Traceback" in response.text:
            raise RuntimeError(f"HTTP {response.status_code} for a fuzzed body: "
                               f"{response.text[:300]}")
        return response.content


def _live(setups: Setups) -> tuple[LiveService, SchemeSetup] | None:
    try:
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401

        from .. import serve  # noqa: F401
    except (ImportError, SecureInferError):
        return None
    configs = _fast_configs(setups)
    if not configs:
        return None
    if setups.live is None:  # the smallest keys: cases stay small
        config = min(configs, key=lambda c: len(setups.scheme(c).messages["public_keys"]))
        setups.live = (LiveService.start(_saved(setups, config), setups.scratch / "keys"),
                       setups.scheme(config))
    return setups.live


def _http_keys(setups: Setups) -> Target | None:
    live = _live(setups)
    if live is None:
        return None
    service, setup = live
    from ..remote import bundle_keys

    seed = bundle_keys(setup.messages["public_keys"], setup.messages["functional_keys"] or None)
    return Target("http.keys", (seed,), lambda data: service.post("/v1/keys", data),
                  (setup.messages["input"], setup.messages["output"]))


def _http_infer(setups: Setups) -> Target | None:
    live = _live(setups)
    if live is None:
        return None
    service, setup = live
    from ..remote import bundle_keys

    keys = bundle_keys(setup.messages["public_keys"], setup.messages["functional_keys"] or None)
    key_id = json.loads(service.post("/v1/keys", keys))["key_id"]
    return Target("http.infer", (setup.messages["input"],),
                  lambda data: service.post("/v1/infer", data, {"X-Key-Id": key_id}),
                  (keys, setup.messages["output"]))


PARSERS: dict[str, Callable[[Setups], Target | None]] = {
    "envelope": _envelope,
    "fields": _fields,
    "model_file": _model_file,
    "client_manifest": _client_manifest,
    "client_arrays": _client_arrays,
    "server_manifest": _server_manifest,
    "server_arrays": _server_arrays,
    "http.model_bundle": _model_bundle,
    "http.keys": _http_keys,
    "http.infer": _http_infer,
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
