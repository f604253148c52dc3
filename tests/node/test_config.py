"""Settings: GVR_* variables, the TOML file, list formats, and errors that name the bad setting."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from node.config import Peer, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start each test from no GVR_* variables, whatever the caller's shell holds."""
    for name in list(os.environ):
        if name.startswith("GVR_"):
            monkeypatch.delenv(name)


def test_settings_defaults_are_safe_without_any_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing set: loopback, port 11112, embedded SQLite under the data folder, no TLS."""
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert (settings.ae_title, settings.bind_address, settings.port) == ("GVRNODE", "127.0.0.1", 11112)
    assert settings.audit_url == f"sqlite:///{tmp_path / 'gvr-data' / 'audit.sqlite3'}"
    assert settings.celery_broker_url.startswith("sqla+sqlite:///")
    assert not settings.tls_enabled and settings.destinations == []


def test_settings_env_prefix_gvr_sets_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GVR_* variables set typed values; variables without the prefix are ignored."""
    monkeypatch.setenv("GVR_PORT", "4242")
    monkeypatch.setenv("GVR_AE_TITLE", "WARD7AI")
    monkeypatch.setenv("GVR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("GVR_STUDY_STABLE_SECONDS", "2.5")
    monkeypatch.setenv("GVR_COMPLETE_ON_RELEASE", "true")
    monkeypatch.setenv("PORT", "1")
    settings = load_settings()
    assert (settings.port, settings.ae_title, settings.study_stable_seconds) == (4242, "WARD7AI", 2.5)
    assert settings.complete_on_release is True
    assert settings.spool_dir == tmp_path.resolve() / "spool"


def test_settings_toml_via_gvr_config_and_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TOML file named by GVR_CONFIG is read; a GVR_* variable overrides the same key."""
    config = tmp_path / "gvr.toml"
    config.write_text('ae_title = "FROMTOML"\nport = 5000\nallowed_calling_aets = ["PACS1", "PACS2"]\n')
    monkeypatch.setenv("GVR_CONFIG", str(config))
    settings = load_settings()
    assert (settings.ae_title, settings.port) == ("FROMTOML", 5000)
    assert settings.allowed_calling_aets == ["PACS1", "PACS2"]
    monkeypatch.setenv("GVR_PORT", "6000")
    assert load_settings().port == 6000


def test_settings_config_argument_wins_over_gvr_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``load_settings(path)`` reads that file, not GVR_CONFIG's, and restores GVR_CONFIG after."""
    (tmp_path / "a.toml").write_text("port = 1111\n")
    (tmp_path / "b.toml").write_text("port = 2222\n")
    monkeypatch.setenv("GVR_CONFIG", str(tmp_path / "a.toml"))
    assert load_settings(tmp_path / "b.toml").port == 2222
    assert os.environ["GVR_CONFIG"] == str(tmp_path / "a.toml")
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        load_settings(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "value",
    ["STORESCU,ORTHANC", "STORESCU, ORTHANC", "STORESCU ORTHANC", '["STORESCU", "ORTHANC"]'],
)
def test_settings_allowed_calling_aets_comma_space_or_json(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calling AE lists accept commas, spaces or a JSON list."""
    monkeypatch.setenv("GVR_ALLOWED_CALLING_AETS", value)
    assert load_settings().allowed_calling_aets == ["STORESCU", "ORTHANC"]


@pytest.mark.parametrize(
    "value",
    [
        "ORTHANC@127.0.0.1:4242,PACS@pacs.example.org:104",
        '["ORTHANC@127.0.0.1:4242", "PACS@pacs.example.org:104"]',
    ],
)
def test_settings_destinations_parse_ae_at_host_port(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Destinations are AE@host:port, as a comma list or a JSON list."""
    monkeypatch.setenv("GVR_DESTINATIONS", value)
    destinations = load_settings().destinations
    assert destinations == [Peer(ae_title="ORTHANC", host="127.0.0.1", port=4242),
                            Peer(ae_title="PACS", host="pacs.example.org", port=104)]  # fmt: skip
    assert [str(d) for d in destinations] == ["ORTHANC@127.0.0.1:4242", "PACS@pacs.example.org:104"]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("GVR_AE_TITLE", "WAY_TOO_LONG_AE_TITLE", "invalid AE title"),
        ("GVR_AE_TITLE", "BACK\\SLASH", "invalid AE title"),
        ("GVR_ALLOWED_CALLING_AETS", "OK,SEVENTEEN_CHARS_X", "invalid AE title"),
        ("GVR_PORT", "70000", "less than or equal to 65535"),
        ("GVR_PORT", "eleven", "valid integer"),
        ("GVR_DESTINATIONS", "PACS@host", "expected AE@host:port"),
        ("GVR_DESTINATIONS", "PACS@host:99999", "port 99999 is not in 1-65535"),
        ("GVR_DEVICE", "tpu", "invalid device"),
    ],
)
def test_settings_invalid_value_names_the_setting(
    name: str, value: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad value raises ValidationError naming the setting and saying what is expected."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as error:
        load_settings()
    text = str(error.value)
    assert name.removeprefix("GVR_").lower() in text
    assert message in text


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tls_cert": "node.pem"}, "tls_cert and tls_key must be set together"),
        ({"tls_key": "node.key"}, "tls_cert and tls_key must be set together"),
        ({"tls_ca": "ca.pem"}, "tls_ca needs tls_cert and tls_key"),
    ],
)
def test_settings_tls_half_pair_refused(values: dict[str, Any], message: str) -> None:
    """A certificate without its key (or a CA without both) is refused, naming the TLS settings."""
    with pytest.raises(ValidationError, match=message):
        load_settings(None, **values)


def test_settings_tls_full_pair_enables_tls() -> None:
    """Certificate and key together turn TLS on."""
    settings = load_settings(tls_cert=Path("node.pem"), tls_key=Path("node.key"))
    assert settings.tls_enabled


def test_settings_unknown_key_in_toml_refused(tmp_path: Path) -> None:
    """A misspelt key in the TOML file is an error naming it, not silently ignored."""
    config = tmp_path / "gvr.toml"
    config.write_text("prot = 104\n")
    with pytest.raises(ValidationError, match="prot"):
        load_settings(config)


def test_settings_frozen_after_load() -> None:
    """Settings are built once and never changed in place."""
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.port = 1
