"""The conformance suite every scheme passes against ``clear``.

Subclass ``SchemeConformance`` in a test module and set ``config``::

    from secureinfer.testing import SchemeConformance

    class TestMySchemeConformance(SchemeConformance):
        config = "myscheme?bits=8"

Exact schemes must equal their reference (the quantized integer run) bit for bit; inexact
ones must stay within ``capabilities.tolerance``. Every network of ``NETWORKS`` (or of
``networks``) must compile: a ``CompileError`` is a failure unless ``refusals`` declares it,
``{"network": "regex the error message must match"}``; a declared refusal is itself checked
(the network must be refused, for the stated reason). The server must be unable to decrypt
anything with what it holds (``holdings``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np
import pytest

from .. import codec
from ..config import normalize, parse
from ..errors import CompileError, EnvelopeError, SecureInferError, UnknownOptionError
from ..layers import forward
from ..model import Parties, SecureModel, compile_layers
from ..registry import get_registry, resolve
from .holdings import decrypting_holdings, leaked_secrets
from .networks import NETWORKS, inputs

__all__ = ["SchemeConformance"]

# (config, allow_insecure, network) -> the compiled model or the CompileError; a test
# session compiles each network once per config.
_OUTCOMES: dict[tuple[str, bool, str], SecureModel | CompileError] = {}


@dataclass
class Run:
    """One compiled network with its parties, inputs and (computed once) results."""

    model: SecureModel
    parties: Parties
    x: np.ndarray
    _results: dict[int, tuple[bytes, np.ndarray]] = field(default_factory=dict)

    def result(self, n: int | None = None) -> tuple[bytes, np.ndarray]:
        """The output message and decrypted result for the first ``n`` inputs (all)."""
        n = len(self.x) if n is None else n
        if n not in self._results:
            client, server = self.parties.client, self.parties.server
            out = server.evaluate(client.encrypt(self.x[:n]))
            self._results[n] = out, client.decrypt(out)
        return self._results[n]


class SchemeConformance:
    """Tests any scheme must pass. Set ``config`` (a config string) in the subclass.

    Attributes:
        config: the scheme config string under test.
        allow_insecure: compile below 128 bits (toy and test schemes only).
        samples: inputs per run.
        networks: the networks of ``NETWORKS`` to run (``None``: all of them).
        refusals: network name -> a regex: that network must be refused at compile time
            with a ``CompileError`` whose message matches.
    """

    config: ClassVar[str] = "clear"
    allow_insecure: ClassVar[bool] = False
    samples: ClassVar[int] = 3
    networks: ClassVar[tuple[str, ...] | None] = None
    refusals: ClassVar[Mapping[str, str]] = {}

    # ----- parametrization and fixtures --------------------------------------------

    @classmethod
    def selected_networks(cls) -> list[str]:
        """The networks this class compiles (``networks``, else all), sorted."""
        return sorted(NETWORKS if cls.networks is None else cls.networks)

    @classmethod
    def running_networks(cls) -> list[str]:
        """The selected networks not declared as refused: the ones that must run."""
        return [n for n in cls.selected_networks() if n not in cls.refusals]

    def pytest_generate_tests(self, metafunc: Any) -> None:
        """Parametrize ``network``: every selected network for the compile check, the
        running ones for the tests that evaluate."""
        if "network" not in metafunc.fixturenames:
            return
        unknown = sorted((set(self.selected_networks()) | set(self.refusals)) - set(NETWORKS))
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown networks {unknown}; "
                             f"known: {sorted(NETWORKS)}")
        names = (self.selected_networks() if metafunc.function.__name__ ==
                 "test_compiles_unless_refusal_declared" else self.running_networks())
        metafunc.parametrize("network", names, scope="class")

    @pytest.fixture(scope="class")
    @classmethod
    def scheme_cls(cls) -> Any:
        """The registered scheme class; skips (with the reason) when its backend is
        missing."""
        scheme = get_registry().get(parse(cls.config).name)
        reason = scheme.availability()
        if reason:
            pytest.skip(f"{scheme.name} not available: {reason}")
        return scheme

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _forget_compiled(cls) -> Any:
        """Drop this class's compiled models when it is done (a session would otherwise
        keep every scheme's models, keys and plaintexts alive to the end)."""
        yield
        for key in [k for k in _OUTCOMES if k[:2] == (cls.config, cls.allow_insecure)]:
            del _OUTCOMES[key]

    @classmethod
    def _outcome(cls, network: str) -> SecureModel | CompileError:
        key = (cls.config, cls.allow_insecure, network)
        if key not in _OUTCOMES:
            layers = NETWORKS[network](np.random.default_rng(0))
            try:
                # as deployed (the artifact test saves it): privacy options resolve on
                _OUTCOMES[key] = compile_layers(layers, cls.config,
                                                calibration=inputs(layers, 64, seed=2),
                                                allow_insecure=cls.allow_insecure,
                                                deploy=True)
            except CompileError as exc:
                _OUTCOMES[key] = exc
        return _OUTCOMES[key]

    @pytest.fixture(scope="class")
    @classmethod
    def compiled(cls, network: str, scheme_cls: Any) -> Run:
        """The network compiled under ``config``, with fresh parties and inputs."""
        outcome = cls._outcome(network)
        if isinstance(outcome, CompileError):
            pytest.fail(f"{cls.config} refused network {network}: {outcome}\n(declare it in "
                        f"{cls.__name__}.refusals if this refusal is expected)")
        layers = NETWORKS[network](np.random.default_rng(0))
        return Run(outcome, outcome.setup(), inputs(layers, cls.samples))

    # ----- the suite -----------------------------------------------------------------

    def test_compiles_unless_refusal_declared(self, network: str, scheme_cls: Any) -> None:
        outcome = self._outcome(network)
        expected = self.refusals.get(network)
        if expected is None:
            assert not isinstance(outcome, CompileError), (
                f"{self.config} refused network {network}: {outcome}")
        else:
            assert isinstance(outcome, CompileError), (
                f"{self.config} compiled network {network}, declared as refused "
                f"({expected!r}): remove the declaration")
            assert re.search(expected, str(outcome)), (
                f"{self.config} refused network {network} for another reason than "
                f"{expected!r}: {outcome}")

    def test_registered_with_capabilities(self, scheme_cls: Any) -> None:
        caps = scheme_cls.capabilities
        assert caps.output in ("encrypted", "plaintext")
        assert caps.layers, "a scheme must run at least one layer kind"
        assert caps.exact or caps.tolerance > 0, "inexact schemes must state a tolerance"
        assert normalize(scheme_cls.name) in get_registry().schemes

    def test_matches_reference(self, compiled: Run) -> None:
        sm = compiled.model
        _, got = compiled.result()
        want = sm.reference(compiled.x)
        assert got.shape == want.shape
        if sm.scheme.capabilities.exact:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=sm.scheme.capabilities.tolerance)

    def test_reference_close_to_float(self, compiled: Run) -> None:
        sm, x = compiled.model, compiled.x
        ref, flt = sm.reference(x), sm.predict_clear(x)
        spread = float(np.abs(flt).max()) + 1e-9
        assert np.abs(ref - flt).max() <= 0.1 * spread, (
            "the scheme's reference (e.g. quantization) drifts more than 10% from float")

    def test_each_sample_independent(self, compiled: Run) -> None:
        sm, parties, x = compiled.model, compiled.parties, compiled.x
        _, batch = compiled.result()
        one = parties.client.decrypt(parties.server.evaluate(parties.client.encrypt(x[1:2])))
        if sm.scheme.capabilities.exact and not sm.clear_layers:
            np.testing.assert_array_equal(one[0], batch[1])
        elif sm.scheme.capabilities.exact:  # a float clear suffix: BLAS may differ by an ulp
            np.testing.assert_allclose(one[0], batch[1], rtol=1e-12, atol=1e-12)
        else:
            np.testing.assert_allclose(one[0], batch[1], atol=2 * sm.scheme.capabilities.tolerance)

    def test_messages_are_bytes_with_envelope(self, compiled: Run) -> None:
        sm, (client, _, _), x = compiled.model, compiled.parties, compiled.x
        owner = compiled.parties.key_owner  # HE: the client's own keys
        output, _ = compiled.result()
        want_out = (codec.Kind.OUTPUT if sm.scheme.capabilities.output == "encrypted"
                    else codec.Kind.PLAINTEXT_OUTPUT)
        for msg, kind in ((owner.public_keys(), codec.Kind.PUBLIC_KEYS),
                          (client.encrypt(x[:1]), codec.Kind.INPUT), (output, want_out)):
            assert isinstance(msg, bytes)
            env = codec.open_envelope(msg, scheme=sm.scheme.name, digest=sm.digest)
            assert env.kind == kind

    def test_server_can_decrypt_nothing(self, compiled: Run) -> None:
        """Everything the server holds, given to the scheme's decrypt path, fails to
        decrypt; and no secret value of the key owner is among what it holds."""
        sm, parties = compiled.model, compiled.parties
        if sm.scheme.security_bits is None:
            pytest.skip(f"{sm.scheme.name} encrypts nothing: there is no secret to keep")
        if sm.output == "encrypted":
            output, want = compiled.result()
            control = sm.scheme.decrypt(parties.key_owner.secret,
                                        codec.open_envelope(output).payload)
            np.testing.assert_allclose(control, want, rtol=0, atol=1e-9,
                                       err_msg="the decrypt path itself does not work")
            found = decrypting_holdings(sm, parties, output, want)
            assert not found, (f"{sm.scheme.name}: the server decrypts the output with what "
                               f"it holds: {', '.join(found[:5])}")
        leaks = leaked_secrets(sm, parties)
        assert not leaks, f"{sm.scheme.name}: the server holds secret values: {leaks[:5]}"

    def test_tampered_and_foreign_messages_rejected(self, compiled: Run) -> None:
        sm, (client, server, _), x = compiled.model, compiled.parties, compiled.x
        ct = client.encrypt(x[:1])
        with pytest.raises(EnvelopeError):
            server.evaluate(ct[:-7])
        with pytest.raises(EnvelopeError):
            server.evaluate(b"not a secureinfer message")
        other = codec.seal(codec.Kind.INPUT, sm.scheme.name, b"\0" * 16,
                           codec.open_envelope(ct).payload)
        with pytest.raises(EnvelopeError):
            server.evaluate(other)

    def test_garbage_payload_is_an_error_not_a_crash(self, compiled: Run) -> None:
        sm, server = compiled.model, compiled.parties.server
        junk = codec.seal(codec.Kind.INPUT, sm.scheme.name, sm.digest, b"\x01" * 40)
        with pytest.raises(SecureInferError):
            server.evaluate(junk)

    def test_agrees_with_clear_decisions(self, compiled: Run) -> None:
        _, got = compiled.result()
        ref = compiled.model.reference(compiled.x)
        assert (got.argmax(axis=1) == ref.argmax(axis=1)).all()

    def test_setup_names_the_key_owner(self, compiled: Run) -> None:
        sm, (client, _, authority) = compiled.model, compiled.parties
        if sm.output == "plaintext":  # FE: the data owner is the authority
            assert authority is not None and client.keys is authority
        else:  # HE (and clear): no authority; the client holds its own keys
            assert authority is None and client.keys is not None

    def test_says_what_the_server_learns(self, compiled: Run) -> None:
        sm = compiled.model
        learns = sm.summary().splitlines()[-1]
        if sm.output == "encrypted":
            assert sm.reveals is None
            assert learns == "server learns: nothing (encrypted output)"
        else:  # plaintext output, or nothing encrypted at all
            assert sm.reveals and learns == f"server learns: {sm.reveals}"
        if sm.output == "clear":
            assert sm.reveals.startswith("everything")

    def test_unknown_option_lists_valid(self, scheme_cls: Any) -> None:
        with pytest.raises(UnknownOptionError) as info:
            resolve(f"{scheme_cls.name}?no_such_option=1")
        for opt in scheme_cls.options:
            assert opt.name in str(info.value)

    def test_clear_suffix_only_for_plaintext_output(self, compiled: Run) -> None:
        sm = compiled.model
        if sm.output != "plaintext":
            assert sm.clear_layers == []
        else:
            assert sm.reveals, "plaintext-output schemes must say what the server learns"
            assert forward(sm.clear_layers, np.zeros((1, *sm.secure_layers[-1].out_shape))) \
                .shape[1:] == sm.layers[-1].out_shape

    def test_client_and_server_from_the_artifact(self, compiled: Run, tmp_path: Any) -> None:
        """A client rebuilt from the client artifact (config and plan, no weights under HE)
        and a server from the server artifact reproduce the in-process result."""
        from ..artifact import load_client, load_server

        sm, x = compiled.model, compiled.x
        sm.save(tmp_path)
        # the data owner opts in to what the model owner compiled (never the manifest)
        client_model = load_client(tmp_path, allow_insecure=sm.scheme.allow_insecure)
        server_model = load_server(tmp_path)
        assert client_model.digest == server_model.digest == sm.digest
        owner = client_model.owner()
        keys = owner.keys
        server = server_model.server(keys.public_keys(), keys.functional_keys()
                                     if sm.output == "plaintext" else None)
        got = owner.decrypt(server.evaluate(owner.encrypt(x)))
        if sm.scheme.capabilities.exact:
            np.testing.assert_allclose(got, sm.reference(x), rtol=1e-12, atol=1e-12)
        else:
            np.testing.assert_allclose(got, sm.reference(x), rtol=0,
                                       atol=sm.scheme.capabilities.tolerance)
