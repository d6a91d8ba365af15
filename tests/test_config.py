import pytest

from stemstream.config import load_settings
from stemstream.errors import ConfigError


def test_defaults_load():
    settings = load_settings()
    assert settings.store_address.startswith("tcp://")


def test_bad_env_value_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv("STEMSTREAM_STORE_PORT", "not-a-port")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "STEMSTREAM_STORE_PORT" in message
    assert "\n" not in message


def test_out_of_range_value(monkeypatch):
    monkeypatch.setenv("STEMSTREAM_BACKGROUND_N_SIGMA", "500")
    with pytest.raises(ConfigError, match="STEMSTREAM_BACKGROUND_N_SIGMA"):
        load_settings()
