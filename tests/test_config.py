"""Settings: defaults, config/gateway.toml, GATEWAY_* environment, credentials directory."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from gateway.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
REPO_CONFIG = ROOT / "config" / "gateway.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GATEWAY_* variable or credentials directory leaks in from the developer's shell."""
    for name in list(os.environ):
        if name.upper().startswith("GATEWAY_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def write_config(tmp_path: Path, text: str, name: str = "gateway.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **files: str) -> Path:
    """A credentials directory holding ``files`` (dotted key -> content), selected by env."""
    directory = tmp_path / "credentials"
    directory.mkdir(exist_ok=True)
    for key, content in files.items():
        (directory / key).write_text(content)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(directory))
    return directory


def config_error(path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


# --- defaults and the documented file --------------------------------------------------------


def test_defaults_load_without_a_file() -> None:
    settings = load_settings()
    assert settings.stt.engine == "local"
    assert settings.stt.local.beam_size == 5
    assert settings.stt.local.model_path == ""
    assert settings.stt.local.min_turn_silence_ms == 400
    assert settings.stt.local.max_turn_silence_ms == 1280
    assert settings.calls.default_roles == ("customer", "agent")
    assert settings.calls.max_channels == 8
    assert settings.transcript.join_same_speaker is True
    assert settings.logging.level == "info"
    assert settings.logging.log_transcripts is False


def test_repo_config_loads_and_equals_the_defaults() -> None:
    assert load_settings(REPO_CONFIG) == load_settings() == Settings()


def _plain(value: Any) -> Any:
    """A default as TOML would spell it: tuples as lists, secrets as their text."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def test_repo_config_documents_every_key_with_its_default() -> None:
    """Each key is set to its default in the file, or (unset/secret keys) shown commented out."""
    text = REPO_CONFIG.read_text()
    documented = tomllib.loads(text)
    defaults = Settings().model_dump()
    problems: list[str] = []

    def walk(default: dict[str, Any], doc: dict[str, Any], prefix: str) -> None:
        for key, value in default.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, doc.get(key, {}), f"{dotted}.")
            elif key in doc:
                if doc[key] != _plain(value):
                    problems.append(f"{dotted}: file {doc[key]!r}, default {_plain(value)!r}")
            elif not re.search(rf"^#\s*{re.escape(key)}\s*=", text, re.MULTILINE):
                problems.append(f"{dotted}: not documented")
            elif value is not None and not isinstance(value, SecretStr):
                problems.append(f"{dotted}: commented out but has a default ({value!r})")

    walk(defaults, documented, "")
    assert not problems


# --- sources and precedence ------------------------------------------------------------------


def test_precedence_file_then_env_then_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(tmp_path, "[stt.local]\nbeam_size = 3\n")
    assert load_settings(cfg).stt.local.beam_size == 3

    monkeypatch.setenv("GATEWAY_STT__LOCAL__BEAM_SIZE", "4")
    assert load_settings(cfg).stt.local.beam_size == 4

    credentials(tmp_path, monkeypatch, **{"stt.local.beam_size": "7\n"})
    assert load_settings(cfg).stt.local.beam_size == 7

    monkeypatch.delenv("GATEWAY_STT__LOCAL__BEAM_SIZE")
    assert load_settings(cfg).stt.local.beam_size == 7
    assert load_settings().stt.local.beam_size == 7


def test_env_uses_double_underscore_between_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_STT__LOCAL__BEAM_SIZE", "2")
    monkeypatch.setenv("GATEWAY_TRANSCRIPT__MAX_JOIN_GAP_MS", "250")
    monkeypatch.setenv("GATEWAY_LOGGING__LEVEL", "debug")
    monkeypatch.setenv("GATEWAY_TRANSCRIPT__JOIN_SAME_SPEAKER", "false")
    settings = load_settings()
    assert settings.stt.local.beam_size == 2
    assert settings.transcript.max_join_gap_ms == 250
    assert settings.transcript.join_same_speaker is False
    assert settings.logging.level == "debug"
    # Untouched keys keep their defaults.
    assert settings.stt.local.workers == 0
    assert settings.calls.max_channels == 8


def test_env_list_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CALLS__DEFAULT_ROLES", '["caller","agent"]')
    assert load_settings().calls.default_roles == ("caller", "agent")


def test_env_list_not_json_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CALLS__DEFAULT_ROLES", "caller,agent")
    assert "default_roles" in config_error()


def test_env_and_file_merge_within_one_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(tmp_path, '[stt.local]\nbeam_size = 3\ncompute_type = "float32"\n')
    monkeypatch.setenv("GATEWAY_STT__LOCAL__WORKERS", "2")
    monkeypatch.setenv("GATEWAY_CALLS__MAX_CHANNELS", "4")
    settings = load_settings(cfg)
    assert settings.stt.local.beam_size == 3
    assert settings.stt.local.compute_type == "float32"
    assert settings.stt.local.workers == 2
    assert settings.calls.max_channels == 4
    assert settings.calls.default_roles == ("customer", "agent")


def test_credentials_merge_with_file_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(tmp_path, "[stt.local]\nbeam_size = 3\n")
    monkeypatch.setenv("GATEWAY_STT__LOCAL__WORKERS", "2")
    credentials(tmp_path, monkeypatch, **{"stt.local.cpu_threads": "6"})
    settings = load_settings(cfg)
    assert (settings.stt.local.beam_size, settings.stt.local.workers) == (3, 2)
    assert settings.stt.local.cpu_threads == 6


def test_unrelated_files_in_credentials_directory_are_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = credentials(
        tmp_path,
        monkeypatch,
        **{
            "other-service.token": "s3cret",
            "README": "not ours",
            "stt.local.beam_size.bak": "nonsense",
            "database.password": "hunter2",
            "stt.local.max_turn_ms": "5000",
        },
    )
    (directory / "nested.dir").mkdir()
    settings = load_settings()
    assert settings.stt.local.max_turn_ms == 5000
    assert settings.stt.local.beam_size == 5


def test_gateway_config_env_selects_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = write_config(tmp_path, "[stt.local]\nbeam_size = 9\n")
    monkeypatch.setenv("GATEWAY_CONFIG", str(chosen))
    assert load_settings().stt.local.beam_size == 9
    # An explicit path wins over the variable.
    other = write_config(tmp_path, "[stt.local]\nbeam_size = 2\n", name="other.toml")
    assert load_settings(other).stt.local.beam_size == 2


def test_gateway_config_env_naming_a_missing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_CONFIG", str(tmp_path / "missing.toml"))
    message = config_error()
    assert "missing.toml" in message and "not found" in message


# --- errors name the key ---------------------------------------------------------------------


def test_bad_type_names_the_key(tmp_path: Path) -> None:
    message = config_error(write_config(tmp_path, '[stt.local]\nbeam_size = "five"\n'))
    assert message.startswith("stt.local.beam_size:")
    assert "five" in message


@pytest.mark.parametrize("value", [0, 11, -1])
def test_out_of_range_names_the_key(tmp_path: Path, value: int) -> None:
    message = config_error(write_config(tmp_path, f"[stt.local]\nbeam_size = {value}\n"))
    assert message.startswith("stt.local.beam_size:")
    assert str(value) in message


def test_bad_env_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_STT__LOCAL__BEAM_SIZE", "abc")
    message = config_error()
    assert message.startswith("stt.local.beam_size:") and "abc" in message


def test_unknown_key_in_file_names_the_key(tmp_path: Path) -> None:
    message = config_error(write_config(tmp_path, "[stt.local]\nbeam_width = 5\n"))
    assert "stt.local.beam_width" in message and "unknown" in message


def test_unknown_section_in_file_names_it(tmp_path: Path) -> None:
    message = config_error(write_config(tmp_path, "[stt.cloud]\napi_key = 'x'\n"))
    assert "stt.cloud" in message and "unknown" in message


def test_unknown_gateway_env_var_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_STT__LOCAL__BEAM_WIDTH", "5")
    message = config_error()
    assert "GATEWAY_STT__LOCAL__BEAM_WIDTH" in message
    assert "stt.local.beam_width" in message and "unknown" in message


def test_single_underscore_env_var_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    # GATEWAY_STT_LOCAL_BEAM_SIZE is a typo for the __ form; silently ignoring it would hide it.
    monkeypatch.setenv("GATEWAY_STT_LOCAL_BEAM_SIZE", "3")
    assert "GATEWAY_STT_LOCAL_BEAM_SIZE" in config_error()


def test_max_turn_silence_below_min_names_the_key(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path, "[stt.local]\nmin_turn_silence_ms = 800\nmax_turn_silence_ms = 500\n"
    )
    message = config_error(cfg)
    assert "stt.local.max_turn_silence_ms" in message
    assert "min_turn_silence_ms" in message


def test_model_path_not_a_directory_names_the_key(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "model.bin"
    not_a_dir.write_bytes(b"\x00")
    cfg = write_config(tmp_path, f"[stt.local]\nmodel_path = {str(not_a_dir)!r}\n")
    message = config_error(cfg)
    assert "stt.local.model_path" in message
    assert "not a directory" in message


def test_model_path_that_is_a_directory_is_accepted(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    cfg = write_config(tmp_path, f"[stt.local]\nmodel_path = {str(model)!r}\n")
    assert load_settings(cfg).stt.local.model_path == str(model)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    message = config_error(write_config(tmp_path, "[stt.local\nbeam_size = 5\n"))
    assert "gateway.toml" in message and "invalid TOML" in message


def test_config_path_that_is_a_directory(tmp_path: Path) -> None:
    message = config_error(tmp_path)
    assert str(tmp_path) in message and "directory" in message


def test_credentials_directory_that_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "nope"))
    assert "CREDENTIALS_DIRECTORY" in config_error()


def test_bad_credential_value_names_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials(tmp_path, monkeypatch, **{"stt.local.beam_size": "many"})
    message = config_error()
    assert message.startswith("stt.local.beam_size:")


def test_list_valued_credential_as_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # config/gateway.toml points at a credential file stt_server.api_keys for the server's keys;
    # like the environment, a list there is JSON.
    credentials(tmp_path, monkeypatch, **{"stt_server.api_keys": '["key-one", "key-two"]\n'})
    keys = load_settings().stt_server.api_keys
    assert [k.get_secret_value() for k in keys] == ["key-one", "key-two"]


def test_bad_secret_credential_value_is_never_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "sk-live-0123456789abcdef"
    credentials(tmp_path, monkeypatch, **{"stt_server.api_keys": secret})
    try:
        settings = load_settings()
    except ConfigError as exc:
        assert "stt_server.api_keys" in str(exc)
        assert secret not in str(exc), "a secret must not reach stderr or logs"
    else:
        assert [k.get_secret_value() for k in settings.stt_server.api_keys] == [secret]


def test_secret_from_env_is_masked_in_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_STT__ASSEMBLYAI__API_KEY", "sk-live-abc")
    settings = load_settings()
    assert settings.stt.assemblyai.api_key.get_secret_value() == "sk-live-abc"
    assert "sk-live-abc" not in settings.model_dump_json()
