"""The conformance suite over every registered scheme: one generated class per config.

Every scheme in the registry runs at least its default config (its name) on every network
of ``secureinfer.testing.NETWORKS``; ``VARIANTS`` adds configs that exercise another code
path (packings, worker processes), on the networks that path changes. A scheme that refuses
a network must declare it in ``REFUSALS`` with the reason its ``CompileError`` gives.
``test_every_registered_scheme_has_a_run`` fails when a registered scheme has none.
"""

from __future__ import annotations

import numpy as np
import pytest

import secureinfer
from secureinfer.config import normalize, parse
from secureinfer.registry import get_registry
from secureinfer.testing import NETWORKS, SchemeConformance

# Extra configs beyond each scheme's default, and the networks they run (None: all).
# The variants skip ``lenet``, the slowest network: its layers run the default's code.
VARIANTS: dict[str, tuple[str, ...] | None] = {
    "clear?bits=8": None,
    "ckks?packing=batch": ("cnn", "mlp_poly", "mlp_square"),
    "bfv?packing=batch": ("cnn", "mlp_poly", "mlp_square"),
    "bfv?workers=2": ("cnn", "mlp_poly", "mlp_square"),
    "bfv?max_primes=1": ("lenet", "mlp_square"),  # one plaintext prime: no CRT
}
# config -> {network: regex of the expected CompileError}. The default configs run every
# network (FE schemes run the prefix they can, the rest in the clear).
BOUND_TOO_BIG = r"cannot hold layer fc2: its worst-case \|output\| .* moduli must multiply"
REFUSALS: dict[str, dict[str, str]] = {
    "bfv?max_primes=1": {"lenet": BOUND_TOO_BIG},
}


def _class_name(config: str) -> str:
    return "TestConformance_" + "".join(c if c.isalnum() else "_" for c in config)


def _configs() -> dict[str, tuple[str, ...] | None]:
    configs: dict[str, tuple[str, ...] | None] = {name: None
                                                 for name in sorted(get_registry().schemes)}
    configs.update(VARIANTS)
    return configs


CLASSES: dict[str, type[SchemeConformance]] = {}
for _config, _networks in _configs().items():
    CLASSES[_config] = type(_class_name(_config), (SchemeConformance,), {
        "config": _config, "networks": _networks, "refusals": REFUSALS.get(_config, {}),
        "__module__": __name__})
    globals()[_class_name(_config)] = CLASSES[_config]


def _without_run(classes: dict[str, type[SchemeConformance]], names) -> list[str]:
    running = {normalize(parse(config).name) for config, cls in classes.items()
               if cls.running_networks()}
    return sorted({normalize(name) for name in names} - running)


def test_every_registered_scheme_has_a_run():
    """Each scheme registered now has a class that runs (not only refuses) networks."""
    registered = list(get_registry().schemes)
    assert registered, "no scheme registered"
    missing = _without_run(CLASSES, registered)
    assert not missing, f"registered schemes without a conformance run: {missing}"
    assert {"lenet", "cnn", "mlp_poly", "mlp_square"} <= set(NETWORKS)


def test_the_meta_test_sees_a_missing_or_all_refused_scheme():
    only_refuses = type("C", (SchemeConformance,), {
        "config": "bfv?max_primes=1", "networks": ("lenet",),
        "refusals": {"lenet": BOUND_TOO_BIG}})
    classes = {c: k for c, k in CLASSES.items() if parse(c).name != "bfv"}
    assert _without_run(classes, ["bfv", "clear"]) == ["bfv"]
    assert _without_run({**classes, "bfv?max_primes=1": only_refuses}, ["bfv"]) == ["bfv"]
    assert _without_run(CLASSES, ["bfv", "clear"]) == []


def test_declared_refusals_name_known_networks_and_configs():
    for config, refused in REFUSALS.items():
        assert config in CLASSES, f"refusal declared for {config!r}, which has no run"
        assert set(refused) <= set(NETWORKS)


def test_refusals_are_checked_both_ways():
    """The suite's refusal rule on a real refusal: undeclared fails, a declaration with
    another reason fails, a declaration for a network that compiles fails."""
    pytest.importorskip("Pyfhel", reason="the refused config is bfv: pip install "
                                         "secureinfer[bfv]")

    def check(config: str, refusals: dict[str, str]) -> None:
        cls = type("Case", (SchemeConformance,), {"config": config, "refusals": refusals})
        cls().test_compiles_unless_refusal_declared("lenet", None)

    check("bfv?max_primes=1", {"lenet": BOUND_TOO_BIG})
    with pytest.raises(AssertionError, match="refused network lenet"):
        check("bfv?max_primes=1", {})
    with pytest.raises(AssertionError, match="for another reason"):
        check("bfv?max_primes=1", {"lenet": "multiplicative depth"})
    with pytest.raises(AssertionError, match="declared as refused"):
        check("clear", {"lenet": BOUND_TOO_BIG})


def test_holdings_checks_catch_a_planted_secret():
    """Both checks of ``test_server_can_decrypt_nothing`` on a server given the secret:
    the decrypt path finds it (HE), the value comparison finds it (FE)."""
    from secureinfer.testing import decrypting_holdings, inputs, leaked_secrets

    for config in ("ckks", "fe-ip"):
        scheme = get_registry().get(parse(config).name)
        if scheme.availability():
            continue
        layers = NETWORKS["mlp_square"](np.random.default_rng(0))
        sm = secureinfer.compile_layers(layers, config, calibration=inputs(layers, 64, seed=2))
        parties = sm.setup()
        x = inputs(layers, 64, seed=2)[:2]
        out = parties.server.evaluate(parties.client.encrypt(x))
        if sm.output == "encrypted":
            want = parties.client.decrypt(out)
            assert decrypting_holdings(sm, parties, out, want) == []
            parties.server.stolen = {"keys": [parties.key_owner.secret]}
            assert decrypting_holdings(sm, parties, out, want) == \
                ["server.stolen['keys'][0]"]
        else:
            assert leaked_secrets(sm, parties) == []
            parties.server.ctx.stolen = list(parties.key_owner.secret.s[:2])
            assert leaked_secrets(sm, parties) == ["secret.s[0] == server.ctx.stolen[0]",
                                                   "secret.s[1] == server.ctx.stolen[1]"]
