"""Settings from the environment (``SPENDGATE_*``), a ``.env`` file and a TOML file.

Precedence, highest first: keyword arguments (tests), environment, ``.env``, TOML
(``--config`` or ``SPENDGATE_CONFIG``), defaults. Every field has a description, and
docs/reference.md §10 lists every field (tests/test_reference.py checks it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import platformdirs
from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("spendgate_config_file", default=None)


class RouteConfig(BaseModel):
    """A configured route: path prefix → upstream base URL, read with one wire format."""

    prefix: str = Field(description="Path prefix, e.g. /groq")
    upstream: str = Field(description="Upstream base URL, e.g. https://api.groq.com/openai")
    adapter: str = Field(
        default="openai", description="Wire format: openai, anthropic, gemini, ollama"
    )
    provider: str | None = Field(default=None, description="Provider id for pricing and metrics")
    local: bool | None = Field(
        default=None,
        description="A model on your own machine: its requests cost $0 unless a price entry "
        "for provider/model says otherwise (default: true for the ollama adapter)",
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Headers added upstream (e.g. a key held by the proxy)"
    )

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = "/" + v.strip("/")
        if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", v):
            raise ValueError(f"route prefix {v!r} must be /name[/name...]")
        return v

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str) -> str:
        if not re.match(r"^https?://[^/]+", v):
            raise ValueError(f"route upstream {v!r} must be an http(s) URL")
        return v.rstrip("/")


class AgentHeaders(BaseModel):
    """A known coding agent's own session header (and optional sub-agent header)."""

    agent: str
    session: list[str]
    subagent: list[str] = Field(default_factory=list)
    parent_session: list[str] = Field(
        default_factory=list,
        description="When present, this header's value is the session and the session "
        "header's value becomes the agent (OpenCode/Kilo Code sub-sessions)",
    )


DEFAULT_AGENT_HEADERS = [
    AgentHeaders(
        agent="claude-code",
        session=["X-Claude-Code-Session-Id"],
        subagent=["X-Claude-Code-Agent-Id"],
    ),
    AgentHeaders(
        agent="codex",
        session=["session-id", "session_id", "conversation_id"],
        subagent=["x-openai-subagent"],
    ),
    AgentHeaders(
        agent="opencode", session=["X-Session-Id"], parent_session=["x-parent-session-id"]
    ),
    AgentHeaders(agent="goose", session=["agent-session-id"]),
]


def default_db_path() -> Path:
    return Path(platformdirs.user_data_dir("spendgate", appauthor=False)) / "spendgate.db"


class Settings(BaseSettings):
    """spendgate's settings; see docs/reference.md §10."""

    model_config = SettingsConfigDict(
        env_prefix="SPENDGATE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    host: str = Field(default="127.0.0.1", description="Listen address")
    port: int = Field(default=8787, ge=0, le=65535, description="Listen port")
    db_path: Path = Field(default_factory=default_db_path, description="The SQLite file")
    openai_base_url: str = Field(
        default="https://api.openai.com", description="Upstream of /openai"
    )
    anthropic_base_url: str = Field(
        default="https://api.anthropic.com", description="Upstream of /anthropic"
    )
    gemini_base_url: str = Field(
        default="https://generativelanguage.googleapis.com", description="Upstream of /gemini"
    )
    ollama_base_url: str = Field(
        default="http://127.0.0.1:11434", description="Upstream of /ollama"
    )
    routes: list[RouteConfig] = Field(
        default_factory=list, description="Extra routes ([[routes]] in the TOML file)"
    )
    pricing_file: Path | None = Field(default=None, description="Your price overrides/additions")
    price_update_file: Path | None = Field(
        default=None,
        description="Where `spendgate pricing update` stores the fetched table "
        "(default: prices-update.json beside db_path)",
    )
    model_aliases: dict[str, str] = Field(
        default_factory=dict, description="Model id → priced model id ([model_aliases] in TOML)"
    )
    default_session_budget_usd: float | None = Field(
        default=None, ge=0, description="Budget of a new session; none means unlimited"
    )
    budget_thresholds: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [0.5, 0.8, 0.9], description="Budget warning fractions"
    )
    global_budget_usd: float | None = Field(
        default=None, ge=0, description="Budget across all sessions; none means unlimited"
    )
    global_budget_period: Literal["total", "day", "week", "month"] = Field(
        default="total",
        description="The global budget's period: total, or a calendar day, week or month",
    )
    budget_timezone: str = Field(
        default="UTC", description="Time zone of budget periods (an IANA name, e.g. Europe/Paris)"
    )
    admission_wait_s: float = Field(
        default=30.0,
        ge=0,
        description="Longest wait for headroom held by in-flight reservations (then 429)",
    )
    unpriced_models: str = Field(
        default="refuse",
        description="Budgeted requests for a model with no price: refuse, allow, or price_as:MODEL",
    )
    on_budget_mid_stream: Literal["finish", "cut"] = Field(
        default="finish", description="finish: let a running stream end; cut: stop it"
    )
    reserve_output_tokens: int | None = Field(
        default=None,
        ge=0,
        description="Output tokens reserved per request without max_tokens "
        "(default: the smaller of 4096 and the model's max_output_tokens)",
    )
    admin_token: str | None = Field(default=None, description="Bearer token for /api and /")
    metrics_require_token: bool = Field(default=False, description="Guard /metrics with the token")
    metrics_session_labels: bool = Field(
        default=False, description="Add a session label to metrics (cardinality!)"
    )
    metrics_max_models: int = Field(
        default=100,
        ge=0,
        description='Metric model labels beyond the price table\'s; later ones count as "other"',
    )
    allow_remote_without_token: bool = Field(
        default=False, description="Allow a non-loopback bind with no admin token"
    )
    inject_stream_usage: bool = Field(
        default=True, description="Add include_usage to OpenAI chat streams"
    )
    live_interval_ms: int = Field(
        default=250, ge=0, description="Live token.usage throttle per stream"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Logging level"
    )
    max_request_bytes: int = Field(
        default=32 * 1024 * 1024, gt=0, description="Largest request body forwarded (413 above)"
    )
    upstream_connect_timeout_s: float = Field(default=10.0, gt=0, description="Connect timeout")
    upstream_idle_timeout_s: float = Field(
        default=300.0, gt=0, description="Longest silence from the upstream before 504 / cut"
    )
    upstream_total_timeout_s: float | None = Field(
        default=None, description="Longest whole request; none means no limit"
    )
    flush_interval_ms: int = Field(default=200, gt=0, description="Batched writer interval")
    event_history: int = Field(default=2048, gt=0, description="Events kept for Last-Event-ID")
    subscriber_queue: int = Field(default=1024, gt=0, description="Events queued per subscriber")
    agent_headers: list[AgentHeaders] = Field(
        default_factory=lambda: list(DEFAULT_AGENT_HEADERS),
        description="Known coding agents' session headers",
    )
    cors_origins: list[str] = Field(default_factory=list, description="CORS origins for /api")

    @field_validator("budget_thresholds", mode="before")
    @classmethod
    def _thresholds(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [p for p in (s.strip() for s in v.split(",")) if p]
        return v

    @field_validator("budget_thresholds")
    @classmethod
    def _thresholds_range(cls, v: list[float]) -> list[float]:
        for t in v:
            if not 0 < t <= 1:
                raise ValueError("thresholds are fractions between 0 and 1, e.g. 0.5,0.8,0.9")
        return sorted(set(v))

    @field_validator("budget_timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (use an IANA name such as UTC)") from None
        return v

    @field_validator("unpriced_models")
    @classmethod
    def _unpriced(cls, v: str) -> str:
        v = v.strip()
        if v in ("refuse", "allow"):
            return v
        if v.startswith("price_as:") and v[len("price_as:") :].strip():
            return "price_as:" + v[len("price_as:") :].strip()
        raise ValueError("unpriced_models is refuse, allow or price_as:MODEL")

    @field_validator("openai_base_url", "anthropic_base_url", "gemini_base_url", "ollama_base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        config = _CONFIG_FILE.get()
        if config is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config))
        return tuple(sources)


class SettingsError(Exception):
    """A bad setting, with one readable line naming it."""


@contextmanager
def _config_file(path: Path | None) -> Iterator[None]:
    token = _CONFIG_FILE.set(path)
    try:
        yield
    finally:
        _CONFIG_FILE.reset(token)


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Build Settings, turning validation errors into one line per bad setting."""
    path = config or os.environ.get("SPENDGATE_CONFIG")
    cfg = Path(path) if path else None
    if cfg is not None and not cfg.is_file():
        raise SettingsError(f"config file {cfg} does not exist")
    try:
        with _config_file(cfg):
            return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            env = f"SPENDGATE_{str(err['loc'][0]).upper()}" if err["loc"] else ""
            lines.append(f"bad setting {name} ({env}): {err['msg']}")
        raise SettingsError("; ".join(lines)) from None
    except ValueError as exc:  # e.g. unparsable TOML or env JSON
        raise SettingsError(f"bad settings: {exc}") from None
