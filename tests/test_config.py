import pytest

from stemstream.config import environment, load_settings, store_overrides
from stemstream.errors import ConfigError
from stemstream.sessions import session_params


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


def test_secrets_are_never_shown_and_can_come_from_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("STEMSTREAM_SFAPI_SECRET", "-----BEGIN PRIVATE KEY----- s3cr3t")
    settings = load_settings()
    assert "s3cr3t" not in repr(settings) and "s3cr3t" not in str(settings.model_dump())
    assert settings.secret("sfapi_secret") == "-----BEGIN PRIVATE KEY----- s3cr3t"
    key = tmp_path / "globus.secret"
    key.write_text("from-a-file\n")
    monkeypatch.setenv("STEMSTREAM_GLOBUS_CLIENT_SECRET_FILE", str(key))
    assert load_settings().secret("globus_client_secret") == "from-a-file"
    monkeypatch.setenv("STEMSTREAM_GLOBUS_CLIENT_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="STEMSTREAM_GLOBUS_CLIENT_SECRET_FILE: cannot read") as info:
        load_settings().secret("globus_client_secret")
    assert "\n" not in str(info.value)


def test_site_values_and_the_log_level_are_settings(monkeypatch):
    monkeypatch.setenv("STEMSTREAM_LOG_LEVEL", "debug")
    monkeypatch.setenv("STEMSTREAM_ACCOUNT", "m4242")
    monkeypatch.setenv("STEMSTREAM_ARCHIVE_DIR", "/archive")
    monkeypatch.setenv("STEMSTREAM_EXPERIMENT_CRON", "0 9 * * 1")
    settings = load_settings()
    assert (settings.log_level, settings.account, str(settings.archive_dir)) == ("DEBUG", "m4242", "/archive")
    assert settings.experiment_cron == "0 9 * * 1"
    monkeypatch.setenv("STEMSTREAM_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError, match="STEMSTREAM_LOG_LEVEL"):
        load_settings()


def test_a_session_takes_the_site_values_and_refuses_credentials_as_options():
    with environment(account="m4242", archive_dir="/archive", output_dir="/counted"):
        params = session_params()
    assert (params.account, params.archive_dir, params.output_dir) == ("m4242", "/archive", "/counted")
    with pytest.raises(ConfigError, match=r"allocator_options=<hidden>: .*credential") as info:
        session_params(allocator_options={"secret": "-----BEGIN PRIVATE KEY-----"})
    assert "PRIVATE" not in str(info.value) and "STEMSTREAM_SFAPI_SECRET" in str(info.value)


def test_a_store_on_the_command_line_replaces_the_settings_store_or_backup():
    assert store_overrides("tcp://10.0.0.1:6000") == {"store_host": "10.0.0.1", "store_port": 6000}
    assert store_overrides(None, "tcp://[::1]:6100") == {"store_backup_host": "::1", "store_backup_port": 6100}
    both = load_settings(**store_overrides("tcp://a:6000", "tcp://b:6100"))
    assert (both.store_address, both.store_backup_host, both.store_backup_port) == ("tcp://a:6000", "b", 6100)
    with pytest.raises(ConfigError, match="not tcp://HOST:PORT"):
        store_overrides("a:6000")
