"""Config strings, TOML files and the environment variable give the same configs."""

from __future__ import annotations

import pytest

from secureinfer import config
from secureinfer.errors import ConfigError, UnknownOptionError, UnknownSchemeError
from secureinfer.registry import resolve


def test_parse_full_form():
    cfg = config.parse("CKKS:TenSEAL?Poly_Modulus-Degree=16384&scale_bits=30")
    assert cfg.name == "ckks"
    assert cfg.backend == "tenseal"
    assert cfg.options == {"poly_modulus_degree": "16384", "scale_bits": "30"}


def test_dash_and_underscore_equivalent():
    assert config.parse("fe-ip?bits=8") == config.parse("FE_IP?BITS=8")


@pytest.mark.parametrize("bad", ["", "?bits=8", "clear?bits", "clear?bits=1&bits=2", "clear?=3"])
def test_malformed_strings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        config.parse(bad)


def test_toml_and_env_match_string(tmp_path, monkeypatch):
    f = tmp_path / "scheme.toml"
    f.write_text('[scheme]\nname = "Clear"\nbits = 8\n')
    from_toml = config.load_toml(f)
    monkeypatch.setenv(config.ENV_VAR, "clear?bits=8")
    from_env = config.from_env()
    assert from_toml.name == from_env.name == "clear"
    assert resolve(from_toml).opts == resolve(from_env).opts == {"bits": 8, "coeff_bits": None}


def test_toml_without_scheme_table(tmp_path):
    f = tmp_path / "x.toml"
    f.write_text("[other]\nname = 1\n")
    with pytest.raises(ConfigError, match=r"\[scheme\]"):
        config.load_toml(f)


def test_unknown_scheme_lists_valid():
    with pytest.raises(UnknownSchemeError) as info:
        resolve("nosuch")
    assert isinstance(info.value, ValueError)
    assert "clear" in str(info.value)


def test_unknown_option_lists_valid():
    with pytest.raises(UnknownOptionError, match="bits"):
        resolve("clear?nosuch=1")


def test_option_type_checked():
    with pytest.raises(ConfigError, match="bits=.eight. is not a valid int"):
        resolve("clear?bits=eight")


def test_alias_resolves_to_scheme():
    assert resolve("plain").name == "clear"


def test_wrong_backend_is_error():
    with pytest.raises(ConfigError, match="backend"):
        resolve("clear:tenseal")
