"""Settings from the environment (``SPENDGATE_*``), a ``.env`` file and a TOML file.

Precedence, highest first: keyword arguments (tests), environment, ``.env``, TOML
(``--config`` or ``SPENDGATE_CONFIG``), defaults. Every field has a description, and
docs/reference.md §10 lists every field (tests/test_reference.py checks it).

:func:`load_settings` is strict (docs/reference.md §10 "Strict checks"): a name that is
no setting, in the TOML file, the environment or ``.env``, stops start-up naming the
closest valid one, and every bad value is named with where it came from. The valid names
are the model's own fields, so a setting added to :class:`Settings` is known at once.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import tomllib
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import dotenv
import orjson
import platformdirs
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from spendgate.providers import ADAPTERS
from spendgate.webhooks import ALERT_TYPES

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("spendgate_config_file", default=None)


CARRIED_PATHS: dict[str, tuple[str, ...]] = {
    "openai": ("/v1",),
    "openai_compatible": ("/v1",),
    "anthropic": ("/v1",),
    "gemini": ("/v1beta", "/v1alpha", "/v1"),
    "ollama": ("/api",),
    "azure": ("/openai",),
}
"""Per adapter, the path segments its clients' requests already start with (the SDKs
and agents add ``/v1/...`` to a base URL, Ollama clients ``/api/...``, Azure's
``/openai/deployments/...``): an upstream ending in one would get it twice
(``/v1/v1/chat/completions``), docs/reference.md §10 "Strict checks"."""


def doubled_path(upstream: str, adapter: str) -> str | None:
    """The path ``upstream`` ends in that the route's requests carry again, or None."""
    path = "/" + upstream.partition("://")[2].partition("/")[2]
    for carried in CARRIED_PATHS.get(adapter, ()):
        if path.lower().endswith(carried):
            return carried
    return None


def _doubled_error(upstream: str, adapter: str) -> None:
    carried = doubled_path(upstream, adapter)
    if carried is not None:
        fix = upstream[: -len(carried)] or upstream
        raise ValueError(
            f"{upstream!r} ends in {carried}, which the {adapter} route's requests already "
            f"carry (it would send {carried}{carried}/...): use {fix!r}"
        )


RESERVED_SEGMENTS = frozenset({"s", "api", "metrics", "healthz"})
"""First path segments that are spendgate's (``/s/{session}/``, its API, /metrics,
/healthz): no route prefix may start with one (docs/reference.md §10 "Strict checks")."""


class RouteConfig(BaseModel):
    """A configured route: path prefix → upstream base URL, read with one wire format."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a default

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
    reported_cost: bool | None = Field(
        default=None,
        description="The cost the upstream reports in usage.cost is the row's cost, the "
        "table's kept beside it (default: true for provider openrouter)",
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
        if v.partition("/")[2].partition("/")[0] in RESERVED_SEGMENTS:
            raise ValueError(
                f"route prefix {v!r} starts with a path of spendgate's own ("
                + ", ".join(f"/{r}" for r in sorted(RESERVED_SEGMENTS))
                + "): its requests would never reach the route"
            )
        return v

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str) -> str:
        if not re.match(r"^https?://[^/]+", v):
            raise ValueError(f"route upstream {v!r} must be an http(s) URL")
        return v.rstrip("/")

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, v: str) -> str:
        if v not in ADAPTERS:
            raise ValueError(
                f"unknown adapter {v!r}{_closest(v, ADAPTERS)}; adapters are "
                + ", ".join(sorted(ADAPTERS))
            )
        return v

    @model_validator(mode="after")
    def _not_doubled(self) -> RouteConfig:
        _doubled_error(self.upstream, self.adapter)
        return self


class AgentHeaders(BaseModel):
    """A known coding agent's own session header (and optional sub-agent header)."""

    model_config = ConfigDict(extra="forbid")

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


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


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
    store_url: str | None = Field(
        default=None,
        description="Where rows are stored: sqlite:///PATH, or postgresql://user:pw@host:port/db "
        "(shared by several replicas; needs pip install 'spendgate[shared]'). "
        "Unset: the SQLite file at db_path",
    )
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
    webhook_url: str | None = Field(
        default=None,
        description="Where alerts are POSTed as JSON with a Slack-compatible text field",
    )
    webhook_events: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(ALERT_TYPES),
        description="The alerts sent to webhook_url (comma-separated)",
    )
    access_log: bool = Field(
        default=False,
        description="One log line per proxied request (spendgate.access, from its row)",
    )
    response_headers: bool = Field(
        default=False,
        description="X-Spendgate-Message-Id on proxied responses, and X-Spendgate-Cost-Usd "
        "on non-streamed ones (their body is held until it is priced)",
    )

    redis_url: str | None = Field(
        default=None,
        description="redis:// URL of the shared budget ledger and event log of several "
        "replicas (the shared extra); none: in this process's memory",
    )
    replica_id: str = Field(
        default_factory=default_replica_id,
        description="This replica's name in leases, listeners and logs (default: host-pid)",
    )
    reservation_lease_s: float = Field(
        default=60.0,
        gt=0,
        description="Lease of an in-flight reservation in the shared ledger, renewed while "
        "the request runs: a dead replica's reservations are released within it",
    )
    ledger_failure_mode: Literal["closed", "open"] = Field(
        default="closed",
        description="While Redis is unreachable: closed answers 503 (retryable), open "
        "admits unmetered and settles when Redis is back",
    )

    @field_validator("store_url")
    @classmethod
    def _store_url(cls, v: str | None) -> str | None:
        if v is None or v.startswith("sqlite:///"):
            return v
        shown = v.split("@")[-1]  # never the password
        if not v.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"store_url ...{shown!r} must be sqlite:///PATH or postgresql://...")
        try:
            urlsplit(v).port  # noqa: B018 (a port that is no number raises here)
        except ValueError as exc:
            raise ValueError(f"store_url ...{shown!r}: {exc}") from None
        return v

    @field_validator("routes")
    @classmethod
    def _distinct_prefixes(cls, v: list[RouteConfig]) -> list[RouteConfig]:
        first: dict[str, int] = {}
        for i, route in enumerate(v, 1):
            if route.prefix in first:
                raise ValueError(
                    f"[[routes]] #{first[route.prefix]} and #{i} both have prefix "
                    f"{route.prefix} (the first would hide the second)"
                )
            first[route.prefix] = i
        return v

    @field_validator("budget_thresholds", "webhook_events", mode="before")
    @classmethod
    def _comma_separated(cls, v: Any) -> Any:
        """Lists that the environment spells comma-separated, not as JSON."""
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

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/]+", v):
            raise ValueError("webhook_url must be an http(s) URL")  # never echoed: a secret
        return v

    @field_validator("webhook_events")
    @classmethod
    def _webhook_events(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one of " + ", ".join(ALERT_TYPES))
        for name in v:
            if name not in ALERT_TYPES:
                raise ValueError(
                    f"unknown alert {name!r}{_closest(name, ALERT_TYPES)}; alerts are "
                    + ", ".join(ALERT_TYPES)
                )
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

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(redis|rediss|unix)://", v):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return v or None

    @field_validator("openai_base_url", "anthropic_base_url", "gemini_base_url", "ollama_base_url")
    @classmethod
    def _base_url(cls, v: str, info: ValidationInfo) -> str:
        if not re.match(r"^https?://[^/]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        v = v.rstrip("/")
        _doubled_error(v, str(info.field_name).removesuffix("_base_url"))
        return v

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


NOT_SETTINGS: dict[str, str] = {
    "SPENDGATE_CONFIG": "the TOML file's path, read by load_settings itself",
    # Switches of the test suite and its scripts, not settings: a developer's or CI's
    # environment may hold them while `spendgate serve` starts (tests/README.md).
    "SPENDGATE_CHROMIUM": "the browser tests' Chromium (tests/test_dashboard.py)",
    "SPENDGATE_DASHBOARD_SCREENSHOT": "where the browser tests save the README's screenshot",
    "SPENDGATE_DASHBOARD_SCREENSHOT_NARROW": "the same for the narrow (phone-width) one",
    "SPENDGATE_AGENTS_DIR": "where scripts/install-agents puts the agent CLIs the tests run",
    "SPENDGATE_AGENTS_MAX_AGE_H": "how often scripts/install-agents refreshes them",
}
"""``SPENDGATE_*`` environment variables that are known but are no setting."""

TEST_SWITCH_PREFIX = "SPENDGATE_REQUIRE_"
"""``SPENDGATE_REQUIRE_BROWSER``, ``SPENDGATE_REQUIRE_AGENTS`` and any such: the test
suite's switches that turn a skip into a failure (``.ci/run`` sets them), not settings."""

_SUBMODELS: dict[str, type[BaseModel]] = {"routes": RouteConfig, "agent_headers": AgentHeaders}
"""Settings that are lists of tables, whose keys are checked too (extra="forbid")."""

_FLAGS = {"host": "--host", "port": "--port", "db_path": "--db"}
"""Command-line flags that become keyword overrides (cli._settings)."""


def setting_names() -> list[str]:
    """Every setting's name, from the model itself (so settings added later are known)."""
    return list(Settings.model_fields)


def env_name(setting: str) -> str:
    return f"SPENDGATE_{setting.upper()}"


def _closest(name: str, valid: Collection[str], prefix: str = "") -> str:
    """`` (did you mean X?)`` for the closest valid name, or nothing when none is close.
    ``prefix``, shared by every name, is left out of the comparison (else every
    ``SPENDGATE_*`` name would look close to every other)."""
    near = difflib.get_close_matches(name.removeprefix(prefix), list(valid), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{near[0]}?)" if near else ""


def unknown_variables(env: Mapping[str, str], where: str) -> list[str]:
    """One problem per ``SPENDGATE_*`` name in ``env`` that is no setting. Names are
    matched ignoring case, as pydantic-settings reads them."""
    names = [n.upper() for n in setting_names()]
    known = {f"SPENDGATE_{n}" for n in names}
    problems = []
    for name in sorted(env):
        upper = name.upper()
        if not upper.startswith("SPENDGATE_") or upper in known or upper in NOT_SETTINGS:
            continue
        if upper.startswith(TEST_SWITCH_PREFIX):
            continue
        problems.append(f"unknown {where} {name}{_closest(upper, names, 'SPENDGATE_')}")
    return problems


def unknown_keys(data: Mapping[str, Any], where: str) -> list[str]:
    """One problem per top-level key of a TOML file that is no setting (keys inside
    ``[[routes]]`` and ``[[agent_headers]]`` are the models' own check)."""
    names = setting_names()
    return [f"{where}: unknown key {key}{_closest(key, names)}" for key in data if key not in names]


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None


def _read_dotenv(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    return {k: v or "" for k, v in dotenv.dotenv_values(path).items()}


class _Origins:
    """Where each setting's value came from, in the sources' precedence, to name it in
    an error: the flag, the variable (environment or ``.env``), or the file and key."""

    def __init__(
        self,
        overrides: Mapping[str, Any],
        env: Mapping[str, str],
        dotenv_path: Path,
        dotenv_vars: Mapping[str, str],
        config: Path | None,
        toml: Mapping[str, Any],
    ) -> None:
        self._overrides = overrides
        self._env = {k.upper(): v for k, v in env.items()}
        self._dotenv_path = dotenv_path
        self._dotenv = {k.upper(): v for k, v in dotenv_vars.items()}
        self._config = config
        self._toml = toml

    def describe(self, loc: tuple[int | str, ...]) -> str:
        """``loc`` (pydantic's error location) as the place the user wrote it."""
        if not loc:
            return "settings"
        field = str(loc[0])
        var = env_name(field)
        if field in self._overrides:
            return _FLAGS.get(field, f"argument {field}")
        for vars_, place in ((self._env, "environment variable"), (self._dotenv, None)):
            if var in vars_:
                where = f"{place} {var}" if place else f"{self._dotenv_path}, {var}"
                return where + _inner(loc, _json(vars_[var]))
        if field in self._toml and self._config is not None:
            inner = _inner(loc, self._toml.get(field))
            return f"{self._config}" + (inner or f", key {field}")
        return field


def _json(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def _inner(loc: tuple[int | str, ...], value: Any) -> str:
    """The part of ``loc`` inside a setting: ``, [[routes]] #2 (prefix /groq), key
    adapter`` for a table of a list, ``, key field.key`` for a dictionary; empty for the
    whole setting."""
    field, rest = str(loc[0]), loc[1:]
    if not rest:
        return ""
    if not isinstance(rest[0], int):
        return ", key " + ".".join(str(p) for p in loc)
    label = f", [[{field}]] #{rest[0] + 1}"
    entry = value[rest[0]] if isinstance(value, list) and rest[0] < len(value) else None
    if isinstance(entry, dict) and isinstance(entry.get("prefix"), str):
        label += f" (prefix {entry['prefix']})"
    keys = ".".join(str(p) for p in rest[1:])
    return label + (f", key {keys}" if keys else "")


def _problem(err: Any, origins: _Origins) -> str:
    """One pydantic error as one readable problem, naming where the value came from."""
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden" and len(loc) >= 3:
        model = _SUBMODELS.get(str(loc[0]))
        hint = _closest(str(loc[-1]), list(model.model_fields)) if model else ""
        where = origins.describe(loc).rpartition(", key ")[0]
        return f"{where}: unknown key {loc[-1]}{hint}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"bad setting in {origins.describe(loc)}: {msg}"


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Build Settings strictly (docs/reference.md §10 "Strict checks"): names that are no
    setting, then bad values, each problem naming its source; all of them in one line."""
    env = os.environ
    path = config or env.get("SPENDGATE_CONFIG")
    cfg = Path(path) if path else None
    if cfg is not None and not cfg.is_file():
        raise SettingsError(f"config file {cfg} does not exist")
    toml = _read_toml(cfg) if cfg is not None else {}
    dotenv_path = Path(str(Settings.model_config.get("env_file") or ".env"))
    dotenv_vars = _read_dotenv(dotenv_path)
    problems = [
        *(
            f"unknown setting {k}{_closest(k, setting_names())}"
            for k in overrides
            if k not in Settings.model_fields
        ),
        *unknown_keys(toml, str(cfg)),
        *unknown_variables(env, "environment variable"),
        *unknown_variables(dotenv_vars, f"variable in {dotenv_path}:"),
    ]
    if problems:
        raise SettingsError("; ".join(problems))
    origins = _Origins(overrides, env, dotenv_path, dotenv_vars, cfg, toml)
    try:
        with _config_file(cfg):
            return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError("; ".join(_problem(e, origins) for e in exc.errors())) from None
    except ValueError as exc:  # pydantic-settings: JSON in a variable that does not parse
        found = re.search(r'field "(\w+)" from source "(\w+)"', str(exc))
        if found is None:
            raise SettingsError(f"bad settings: {exc}") from None
        var = env_name(found[1])
        dotenv_src = found[2].startswith("DotEnv")
        where = f"{dotenv_path}, {var}" if dotenv_src else f"environment variable {var}"
        raise SettingsError(f"bad setting in {where}: not valid JSON") from None
