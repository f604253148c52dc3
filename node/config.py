"""One typed settings object, built once at startup and passed down.

Sources, highest priority first: keyword overrides, ``GVR_*`` environment
variables, a TOML file (``--config`` or ``GVR_CONFIG``), the defaults below.
Nothing reads the environment at import time.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "GVR_"
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://\S*$")  # scheme://rest; the value is never shown (passwords)
_PEER = re.compile(r"^(?P<ae>[^@]*)@(?P<host>[^:@]+):(?P<port>\d+)$")


def split_list(value: Any) -> Any:
    """Accept a JSON list or a comma/space separated string (friendlier in env files)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [item for item in re.split(r"[,\s]+", text) if item]


def check_ae_title(value: str) -> str:
    """The AE title without padding; ValueError says which rule it breaks."""
    stripped = value.strip()
    if not stripped:
        raise ValueError("invalid AE title: it is empty (1-16 printable characters)")
    if len(stripped) > 16:
        raise ValueError(f"invalid AE title {stripped!r}: AE title longer than 16 characters ({len(stripped)})")
    if not _AE_TITLE.match(stripped):
        raise ValueError(f"invalid AE title {value!r}: printable ASCII only, no backslash")
    return stripped


class Peer(BaseModel):
    """A DICOM application entity we connect to (a PACS, a result destination)."""

    model_config = ConfigDict(frozen=True)

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    _check_ae = field_validator("ae_title")(lambda cls, v: check_ae_title(v))

    @classmethod
    def parse(cls, text: str) -> Peer:
        """Parse ``AE@host:port`` (the form the CLI and env vars use)."""
        match = _PEER.match(text.strip())
        if not match:
            raise ValueError(f"invalid peer {text!r}: expected AE@host:port, e.g. ORTHANC@127.0.0.1:4242")
        port = int(match["port"])
        if not 1 <= port <= 65535:  # checked here too, so the CLI's message is a sentence, not pydantic's
            raise ValueError(f"invalid peer {text!r}: port {port} is not in 1-65535")
        return cls(ae_title=check_ae_title(match["ae"]), host=match["host"], port=port)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class Settings(BaseSettings):
    """Every setting of the node, with a safe default. The README's table lists them."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # -- identity and network
    ae_title: str = Field("GVRNODE", description="AE title the storage SCP answers to")
    bind_address: str = Field("127.0.0.1", description="address the SCP listens on (0.0.0.0 for all)")
    port: int = Field(11112, ge=0, le=65535, description="DICOM port of the SCP")
    allowed_calling_aets: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="calling AE titles accepted; empty accepts any"
    )
    allowed_peer_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="peer IP addresses accepted; empty accepts any"
    )
    max_associations: int = Field(
        16, ge=1, description="concurrent associations the SCP serves, per SCP process (scp_processes)"
    )
    scp_processes: int = Field(
        1, ge=1, le=64, description="storage SCP processes on the port (SO_REUSEPORT, Linux spreads connections): "
        "above 1, concurrent associations use more cores; max_associations applies to each; a dead one is "
        "restarted; /metrics counts every process's C-STOREs"
    )
    max_pdu_size: int = Field(0, ge=0, description="maximum PDU we receive; 0 is unlimited (fastest)")
    network_timeout: float = Field(60.0, gt=0, description="seconds an idle association may stay open")
    dimse_timeout: float = Field(30.0, gt=0, description="seconds to wait for a DIMSE message")
    acse_timeout: float = Field(30.0, gt=0, description="seconds to wait for association messages")
    pdu_deadline_seconds: float = Field(
        10.0, gt=0, description="a PDU (the association request too) must arrive whole within this, plus its size "
        "at min_data_rate_kb; else the connection is closed"
    )
    min_data_rate_kb: float = Field(16.0, gt=0, description="slowest rate (KiB/s) a peer may send a PDU at")
    # -- TLS (all three for mutual TLS; cert+key for server-only TLS)
    tls_cert: Path | None = Field(None, description="PEM certificate: enables TLS on the SCP")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert")
    tls_ca: Path | None = Field(None, description="PEM CA bundle: clients must present a cert signed by it")
    # -- storage and state
    data_dir: Path = Field(Path("gvr-data"), description="spool and default SQLite files")
    database_url: str | None = Field(None, description="audit DB; default sqlite:///<data_dir>/audit.sqlite3")
    broker_url: str | None = Field(
        None, description="Celery broker; default sqla+sqlite:///<data_dir>/broker.sqlite3 (no server)"
    )
    min_free_disk_mb: int = Field(256, ge=0, description="refuse instances (0xA700) below this free space")
    # -- resource limits (issue 9), checked from headers before any decode or inflate; over a limit the SCP
    # answers 0xC001 and the worker skips the image. node.limits.ResourceLimits holds the same defaults.
    max_instance_mb: int = Field(
        256, ge=1,
        description="refuse (0xC001) an instance larger than this; abort the association as soon as one passes it",
    )
    max_image_pixels: int = Field(64_000_000, ge=1, description="refuse an image whose Rows x Columns x frames exceeds this")
    max_pixel_data_mb: int = Field(256, ge=1, description="refuse an image whose decoded pixels would exceed this")
    max_inflated_mb: int = Field(64, ge=1, description="refuse a deflated data set that inflates beyond this")
    max_sequence_items: int = Field(20_000, ge=1, description="refuse a data set with more sequence items or fragments")
    max_sequence_depth: int = Field(16, ge=1, description="refuse a data set whose sequences nest deeper")
    max_pixel_spacing_ratio: float = Field(
        10.0, gt=0, description="refuse an image whose larger pixel spacing exceeds the smaller this many times"
    )
    worker_max_memory_mb: int = Field(
        3072, ge=64, description="a prefork worker child is replaced after a task leaves it above this memory"
    )
    # -- study assembly
    study_stable_seconds: float = Field(
        30.0, gt=0, description="a study is complete after this quiet time (its association still open, or "
        "aborted); see release_quiet_seconds"
    )
    complete_on_release: bool = Field(
        True, description="a study is complete once the association that sent it is released and "
        "release_quiet_seconds pass with nothing more for it"
    )
    release_quiet_seconds: float = Field(
        1.0, ge=0, description="quiet time after the sending association's release before a study is complete"
    )
    assembler_poll_seconds: float = Field(0.5, gt=0, description="how often the assembler looks for stable studies")
    reconcile_seconds: float = Field(2.0, gt=0, description="how often the node re-publishes overdue jobs")
    job_lease_seconds: float = Field(
        30.0, gt=0, description="a RUNNING job whose worker sent no heartbeat for this long runs again"
    )
    job_publish_deadline_seconds: float = Field(
        60.0, gt=0, description="a job waiting this long for a worker to take it is published again"
    )
    # -- selection (the loop guard against our own and derived objects is not a setting)
    select_modalities: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["CR", "DX"], description="modalities analysed"
    )
    select_body_parts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["CHEST"], description="BodyPartExamined values analysed (an image without one is too)"
    )
    select_view_positions: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["PA", "AP"], description="ViewPosition values analysed (an image without one is too)"
    )
    select_image_types: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["ORIGINAL", "DERIVED\\PRIMARY"],
        description="ImageType prefixes analysed, values joined by a backslash (an image without one is too)",
    )
    report_ood_findings: bool = Field(
        False, description="give an out-of-distribution image a finding anyway (flagged); off: 'not analysed'"
    )
    # -- results
    destinations: Annotated[list[Peer], NoDecode] = Field(
        default_factory=list, description="where results go, AE@host:port each; e.g. the PACS"
    )
    bundle_dir: Path | None = Field(None, description="model bundle; default the demo bundle shipped")
    device: str = Field("cpu", description="cpu or cuda for the inference worker")
    # -- monitoring (issue 6)
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Prometheus /metrics port of the node, on bind_address; 0 turns it off"
    )
    # -- review page (issue 11): gvr web
    web_bind_address: str = Field("127.0.0.1", description="address the review page (gvr web) listens on")
    web_port: int = Field(8080, ge=1, le=65535, description="HTTP port of the review page (gvr web)")
    web_users_file: Path | None = Field(
        None, description="review page users, name:scrypt-hash lines (gvr web --add-user NAME); default <data_dir>/web-users"
    )
    # -- issue 11: a misspelt GVR_* variable stops every command, unless this says to warn only
    allow_unknown_env: bool = Field(
        False, description="start even when a GVR_* variable names no setting (a typo); logged as a warning"
    )

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("allowed_calling_aets", mode="before")
    @classmethod
    def _aets(cls, value: Any) -> Any:
        value = split_list(value)
        return [check_ae_title(v) for v in value]

    @field_validator("allowed_peer_ips", mode="before")
    @classmethod
    def _ips(cls, value: Any) -> Any:
        value = split_list(value)
        return value

    @field_validator("select_modalities", "select_body_parts", "select_view_positions", "select_image_types",
                     mode="before")  # fmt: skip
    @classmethod
    def _selection(cls, value: Any) -> Any:
        values = [str(v).strip().upper() for v in split_list(value)]
        if not values or not all(values):
            raise ValueError("a selection setting needs at least one non-empty value")
        return values

    @field_validator("destinations", mode="before")
    @classmethod
    def _destinations(cls, value: Any) -> Any:
        value = split_list(value)
        return [Peer.parse(v) if isinstance(v, str) else v for v in value]

    @field_validator("database_url", "broker_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        # issue 11: a malformed URL is a settings error here, not a traceback from SQLAlchemy or kombu later
        if value is not None and not _URL.match(value):
            raise ValueError("not a URL: expected scheme://..., e.g. postgresql+psycopg2://gvr:PASSWORD@host:5432/gvr "
                             "or redis://host:6379/0")  # fmt: skip
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError(f"invalid device {value!r}: expected cpu, cuda or cuda:N")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca needs tls_cert and tls_key (the SCP's own identity)")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = os.environ.get(ENV_PREFIX + "CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)

    # -- derived values (never stored twice)
    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def spool_dir(self) -> Path:
        return self.resolved_data_dir / "spool"

    @property
    def audit_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir / 'audit.sqlite3'}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.resolved_data_dir / 'broker.sqlite3'}"

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings once at startup.

    ``config_file`` wins over ``GVR_CONFIG``. Raises ``ValueError`` (pydantic's
    ``ValidationError``) naming the bad setting.
    """
    if config_file is not None:
        if not config_file.is_file():
            raise FileNotFoundError(f"config file {config_file} does not exist")
        previous = os.environ.get(ENV_PREFIX + "CONFIG")
        os.environ[ENV_PREFIX + "CONFIG"] = str(config_file)
        try:
            return Settings(**overrides)
        finally:
            if previous is None:
                del os.environ[ENV_PREFIX + "CONFIG"]
            else:
                os.environ[ENV_PREFIX + "CONFIG"] = previous
    return Settings(**overrides)


def settings_table() -> str:
    """The README's table of every setting, generated so the two cannot drift apart."""
    rows = ["| setting | environment variable | default | what it does |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "—" if default in (None, [], "") else f"`{default}`"
        rows.append(f"| `{name}` | `{ENV_PREFIX}{name.upper()}` | {shown} | {field.description or ''} |")
    return "\n".join(rows)
