"""Settings precedence: CLI overrides > LOWVOX_* environment > TOML file > defaults."""

from pathlib import Path

import pytest

from lowvox.errors import LowvoxError
from lowvox.settings import load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("LOWVOX_"):
            monkeypatch.delenv(key)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lowvox.toml"
    path.write_text(text)
    return path


def test_defaults_bind_localhost_on_alltalk_port():
    s = load_settings()
    assert s.host == "127.0.0.1"
    assert s.port == 7851
    assert s.api_key is None


def test_file_then_env_then_override(tmp_path, monkeypatch):
    cfg = write_toml(
        tmp_path, 'port = 9000\nlanguage = "fr"\nengine = "espeak"\nmax_text_chars = 50\n'
    )
    s = load_settings(cfg)
    assert (s.port, s.language, s.max_text_chars) == (9000, "fr", 50)

    monkeypatch.setenv("LOWVOX_PORT", "9100")
    s = load_settings(cfg)
    assert s.port == 9100  # env beats file
    assert s.language == "fr"  # file still applies where env is silent

    s = load_settings(cfg, port=9200, language=None)
    assert s.port == 9200  # explicit beats env
    assert s.language == "fr"  # None overrides are ignored


def test_config_file_from_env_variable(tmp_path, monkeypatch):
    cfg = write_toml(tmp_path, 'voice = "narrator"\n')
    monkeypatch.setenv("LOWVOX_CONFIG", str(cfg))
    assert load_settings().voice == "narrator"


def test_folders_default_under_home(tmp_path):
    s = load_settings(home=tmp_path, voices_dir=tmp_path / "elsewhere")
    assert s.outputs_path == tmp_path / "outputs"
    assert s.models_path == tmp_path / "models"
    assert s.voices_path == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    "toml, message",
    [
        ("port = 70000\n", "port"),
        ("no_such_setting = 1\n", "no_such_setting"),
        ("port = [\n", "invalid settings"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, toml, message):
    with pytest.raises(LowvoxError, match=message):
        load_settings(write_toml(tmp_path, toml))


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(LowvoxError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")


def test_bad_env_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LOWVOX_PORT", "not-a-number")
    with pytest.raises(LowvoxError, match="port"):
        load_settings()


def test_missing_config_file_from_env_is_a_clear_error(tmp_path, monkeypatch):
    """LOWVOX_CONFIG naming no file must not quietly run without that file's settings
    (its api_key, say)."""
    monkeypatch.setenv("LOWVOX_CONFIG", str(tmp_path / "typo.toml"))
    with pytest.raises(LowvoxError, match="config file not found: .*typo.toml.*LOWVOX_CONFIG"):
        load_settings()


@pytest.mark.parametrize("content", [b"port = [\n", b"\xff\xfeport = 1\n"])
def test_unreadable_config_file_is_named(tmp_path, content):
    path = tmp_path / "broken.toml"
    path.write_bytes(content)
    with pytest.raises(LowvoxError, match="invalid settings: cannot read config file .*broken"):
        load_settings(path)


def test_audio_format_is_checked_when_settings_load(tmp_path, monkeypatch):
    """A wrong default format is the operator's mistake: it fails at start-up, not as a
    400 to every client that leaves the format out."""
    monkeypatch.setenv("LOWVOX_AUDIO_FORMAT", "wma")
    with pytest.raises(LowvoxError, match="audio_format: unsupported audio format: 'wma'"):
        load_settings()
    monkeypatch.setenv("LOWVOX_AUDIO_FORMAT", "OGG")
    assert load_settings().audio_format == "opus"  # aliases become the canonical name


def test_invalid_values_are_one_clear_line_each(monkeypatch):
    monkeypatch.setenv("LOWVOX_PORT", "seventy")
    monkeypatch.setenv("LOWVOX_LOG_LEVEL", "loud")
    with pytest.raises(LowvoxError) as info:
        load_settings()
    message = str(info.value)
    assert "port: Input should be a valid integer" in message and "'seventy'" in message
    assert "log_level: " in message and "'loud'" in message
    assert "\n" not in message and "errors.pydantic.dev" not in message
