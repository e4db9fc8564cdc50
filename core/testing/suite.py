"""The conformance suite every scheme passes against ``clear``.

Subclass ``SchemeConformance`` in a test module and set ``config``::

    from secureinfer.testing import SchemeConformance

    class TestMySchemeConformance(SchemeConformance):
        config = "myscheme?bits=8"

Exact schemes must equal their reference (the quantized integer run) bit for bit; inexact
ones must stay within ``capabilities.tolerance``. Networks a scheme cannot run (compile-time
``CompileError``) are skipped with the reason, so every test either checks something or
says why not.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest

from .. import codec
from ..errors import CompileError, EnvelopeError, SecureInferError
from ..layers import forward
from ..model import SecureModel, compile_layers
from ..registry import get_registry, resolve
from .networks import NETWORKS, inputs

__all__ = ["SchemeConformance"]


class SchemeConformance:
    """Tests any scheme must pass. Set ``config`` (a config string) in the subclass."""

    config: ClassVar[str] = "clear"
    allow_insecure: ClassVar[bool] = False
    samples: ClassVar[int] = 3

    # ----- helpers ---------------------------------------------------------------------

    @pytest.fixture(scope="class")
    def scheme_cls(self) -> Any:
        from ..config import parse

        cls = get_registry().get(parse(self.config).name)
        reason = cls.availability()
        if reason:
            pytest.skip(f"{cls.name} not available: {reason}")
        return cls

    def _compile(self, name: str) -> tuple[SecureModel, np.ndarray]:
        layers = NETWORKS[name](np.random.default_rng(0))
        calib = inputs(layers, 64, seed=2)
        try:
            sm = compile_layers(layers, self.config, calibration=calib,
                                allow_insecure=self.allow_insecure)
        except CompileError as exc:
            pytest.skip(f"{self.config} does not run network {name}: {exc}")
        return sm, inputs(layers, self.samples)

    @pytest.fixture(scope="class", params=sorted(NETWORKS))
    def compiled(self, request: Any, scheme_cls: Any) -> tuple[SecureModel, Any, np.ndarray]:
        sm, x = self._compile(request.param)
        return sm, sm.setup(), x

    def _run(self, sm: SecureModel, parties: Any, x: np.ndarray) -> np.ndarray:
        client, server, _ = parties
        return client.decrypt(server.evaluate(client.encrypt(x)))

    # ----- the suite -----------------------------------------------------------------

    def test_registered_with_capabilities(self, scheme_cls: Any) -> None:
        caps = scheme_cls.capabilities
        assert caps.output in ("encrypted", "plaintext")
        assert caps.layers, "a scheme must run at least one layer kind"
        assert caps.exact or caps.tolerance > 0, "inexact schemes must state a tolerance"
        from ..config import normalize

        assert normalize(scheme_cls.name) in get_registry().schemes

    def test_matches_reference(self, compiled: Any) -> None:
        sm, parties, x = compiled
        got = self._run(sm, parties, x)
        want = sm.reference(x)
        assert got.shape == want.shape
        if sm.scheme.capabilities.exact:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=sm.scheme.capabilities.tolerance)

    def test_reference_close_to_float(self, compiled: Any) -> None:
        sm, _, x = compiled
        ref, flt = sm.reference(x), sm.predict_clear(x)
        spread = float(np.abs(flt).max()) + 1e-9
        assert np.abs(ref - flt).max() <= 0.1 * spread, (
            "the scheme's reference (e.g. quantization) drifts more than 10% from float")

    def test_each_sample_independent(self, compiled: Any) -> None:
        sm, parties, x = compiled
        batch = self._run(sm, parties, x)
        one = self._run(sm, parties, x[1:2])
        if sm.scheme.capabilities.exact and not sm.clear_layers:
            np.testing.assert_array_equal(one[0], batch[1])
        elif sm.scheme.capabilities.exact:  # a float clear suffix: BLAS may differ by an ulp
            np.testing.assert_allclose(one[0], batch[1], rtol=1e-12, atol=1e-12)
        else:
            np.testing.assert_allclose(one[0], batch[1], atol=2 * sm.scheme.capabilities.tolerance)

    def test_messages_are_bytes_with_envelope(self, compiled: Any) -> None:
        sm, parties, x = compiled
        client, server, authority = parties
        for msg, kind in ((authority.public_keys(), codec.Kind.PUBLIC_KEYS),
                          (client.encrypt(x[:1]), codec.Kind.INPUT)):
            assert isinstance(msg, bytes)
            env = codec.open_envelope(msg, scheme=sm.scheme.name, digest=sm.digest)
            assert env.kind == kind

    def test_server_holds_no_secret(self, compiled: Any) -> None:
        sm, parties, _ = compiled
        _, server, authority = parties
        secret = authority.secret
        if secret is None:
            pytest.skip(f"{sm.scheme.name} has no secret key")
        assert all(v is not secret for v in vars(server).values())
        assert not any(secret is v for v in vars(server.ctx).values()) \
            if hasattr(server.ctx, "__dict__") else True

    def test_tampered_and_foreign_messages_rejected(self, compiled: Any) -> None:
        sm, parties, x = compiled
        client, server, _ = parties
        ct = client.encrypt(x[:1])
        with pytest.raises(EnvelopeError):
            server.evaluate(ct[:-7])
        with pytest.raises(EnvelopeError):
            server.evaluate(b"not a secureinfer message")
        other = codec.seal(codec.Kind.INPUT, sm.scheme.name, b"\0" * 16,
                           codec.open_envelope(ct).payload)
        with pytest.raises(EnvelopeError):
            server.evaluate(other)

    def test_garbage_payload_is_an_error_not_a_crash(self, compiled: Any) -> None:
        sm, parties, _ = compiled
        _, server, _ = parties
        junk = codec.seal(codec.Kind.INPUT, sm.scheme.name, sm.digest, b"\x01" * 40)
        with pytest.raises((SecureInferError, ValueError)):
            server.evaluate(junk)

    def test_agrees_with_clear_decisions(self, compiled: Any) -> None:
        sm, parties, x = compiled
        got = self._run(sm, parties, x)
        ref = sm.reference(x)
        assert (got.argmax(axis=1) == ref.argmax(axis=1)).all()

    def test_unknown_option_lists_valid(self, scheme_cls: Any) -> None:
        from ..errors import UnknownOptionError

        with pytest.raises(UnknownOptionError) as info:
            resolve(f"{scheme_cls.name}?no_such_option=1")
        for opt in scheme_cls.options:
            assert opt.name in str(info.value)

    def test_clear_suffix_only_for_plaintext_output(self, compiled: Any) -> None:
        sm, _, _ = compiled
        if sm.output == "encrypted":
            assert sm.clear_layers == []
        else:
            assert sm.reveals, "plaintext-output schemes must say what the server learns"
            assert forward(sm.clear_layers, np.zeros((1, *sm.secure_layers[-1].out_shape))) \
                .shape[1:] == sm.layers[-1].out_shape

    def test_client_and_server_from_the_artifact(self, compiled: Any, tmp_path: Any) -> None:
        """A client rebuilt from the client artifact (config and plan, no weights under HE)
        and a server from the server artifact reproduce the in-process result."""
        from ..artifact import load_client, load_server

        sm, _, x = compiled
        sm.save(tmp_path)
        client_model, server_model = load_client(tmp_path), load_server(tmp_path)
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
