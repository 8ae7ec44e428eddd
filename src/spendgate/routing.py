"""Which upstream a request goes to, and which session and agent it belongs to
(docs/reference.md §1, §2).

Pure functions of the path and headers: no I/O, so every rule is a one-line test.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from spendgate.settings import AgentHeaders, RouteConfig, Settings

ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
DEFAULT_SESSION = "default"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    prefix: str
    upstream: str
    adapter: str
    provider: str
    headers: tuple[tuple[str, str], ...] = ()


class Target(NamedTuple):
    """Where one request goes (a tuple: made for every request)."""

    route: Route
    path: str
    """The upstream path (raw, still percent-encoded), less spendgate's prefixes."""
    session_id: str
    agent_id: str | None


class RoutingError(Exception):
    """A request spendgate must refuse before forwarding (400)."""

    def __init__(self, message: str, adapter: str = "openai") -> None:
        super().__init__(message)
        self.message = message
        self.adapter = adapter


def valid_id(value: str) -> bool:
    return ID_RE.fullmatch(value) is not None


def build_routes(settings: Settings) -> list[Route]:
    """Configured routes first (they may shadow a built-in prefix), longest prefix first."""
    builtin = [
        RouteConfig(prefix="/openai", upstream=settings.openai_base_url, adapter="openai"),
        RouteConfig(prefix="/anthropic", upstream=settings.anthropic_base_url, adapter="anthropic"),
        RouteConfig(prefix="/gemini", upstream=settings.gemini_base_url, adapter="gemini"),
        RouteConfig(prefix="/ollama", upstream=settings.ollama_base_url, adapter="ollama"),
    ]
    seen: set[str] = set()
    routes: list[Route] = []
    for rc in [*settings.routes, *builtin]:
        if rc.prefix in seen:
            continue
        seen.add(rc.prefix)
        name = rc.prefix.strip("/").replace("/", "_")
        routes.append(
            Route(
                name=name,
                prefix=rc.prefix,
                upstream=rc.upstream,
                adapter=rc.adapter,
                provider=rc.provider or (name if rc.adapter == "openai" else rc.adapter),
                headers=tuple(rc.headers.items()),
            )
        )
    routes.sort(key=lambda r: len(r.prefix), reverse=True)
    return routes


class Router:
    def __init__(self, routes: list[Route], agent_headers: list[AgentHeaders]) -> None:
        self._routes = routes
        self._by_name = {r.name: r for r in routes}
        # Candidates by the prefix's first segment, longest prefix first (as ``routes``).
        self._by_head: dict[str, list[tuple[Route, str]]] = {}
        for r in routes:
            head = r.prefix[1:].partition("/")[0]
            self._by_head.setdefault(head, []).append((r, r.prefix + "/"))
        self._agent_headers = agent_headers
        self._agent_session_names = tuple(n for ah in agent_headers for n in ah.session)

    @property
    def routes(self) -> list[Route]:
        return self._routes

    def resolve(self, raw_path: str, headers: Mapping[str, str]) -> Target:
        path = raw_path
        session = agent = None
        if path.startswith("/s/"):
            session, path = _take_segment(path[3:], "session")
            if path.startswith("/a/"):
                agent, path = _take_segment(path[3:], "agent")
        route, upstream_path = self._match(path)
        if ("." in upstream_path or "%2" in upstream_path) and any(
            seg in (".", "..", "%2e%2e", "%2E%2E") for seg in upstream_path.split("/")
        ):
            raise RoutingError(f"path {raw_path!r} contains '.' or '..' segments", route.adapter)
        hs, ha = self._from_headers(headers, route.adapter)
        return Target(
            route=route,
            path=upstream_path or "/",
            session_id=session or hs or DEFAULT_SESSION,
            agent_id=agent or ha,
        )

    def _match(self, path: str) -> tuple[Route, str]:
        for r, with_slash in self._by_head.get(path[1:].partition("/")[0], ()):
            if path.startswith(with_slash) or path == r.prefix:
                return r, path[len(r.prefix) :]
        # The providers' own paths, so OPENAI_BASE_URL=http://host:8787/v1 just works.
        if path.startswith("/v1/messages") and "anthropic" in self._by_name:
            return self._by_name["anthropic"], path
        if path.startswith("/v1/") and "openai" in self._by_name:
            return self._by_name["openai"], path
        if path.startswith(("/v1beta/", "/v1alpha/")) and "gemini" in self._by_name:
            return self._by_name["gemini"], path
        prefixes = ", ".join(r.prefix for r in self._routes)
        raise RoutingError(
            f"no route for path {path!r}: use one of {prefixes} (optionally after "
            "/s/{session}/), or an unprefixed /v1/... OpenAI or Anthropic path"
        )

    def _from_headers(
        self, headers: Mapping[str, str], adapter: str
    ) -> tuple[str | None, str | None]:
        session = headers.get("X-Spendgate-Session")
        agent = headers.get("X-Spendgate-Agent")
        for name, value in (("X-Spendgate-Session", session), ("X-Spendgate-Agent", agent)):
            if value is not None and not valid_id(value):
                raise RoutingError(
                    f"invalid {name} header: ids are 1-128 characters of A-Z a-z 0-9 . _ : -",
                    adapter,
                )
        if session is not None and agent is not None:
            return session, agent
        known_session, known_agent = self._known_agent(headers)
        return session or known_session, agent or known_agent

    def _known_agent(self, headers: Mapping[str, str]) -> tuple[str | None, str | None]:
        """A coding agent's own headers; an invalid value is ignored, never an error."""
        for name in self._agent_session_names:
            if name in headers:
                break
        else:
            return None, None  # no coding agent's session header (the usual case)
        for ah in self._agent_headers:
            sid = _first_valid(headers, ah.session)
            if sid is None:
                continue
            parent = _first_valid(headers, ah.parent_session)
            if parent is not None:
                return parent, sid
            return sid, _first_valid(headers, ah.subagent)
        return None, None


def _first_valid(headers: Mapping[str, str], names: list[str]) -> str | None:
    for name in names:
        value = headers.get(name)
        if value is not None and valid_id(value):
            return value
    return None


def _take_segment(rest: str, what: str) -> tuple[str, str]:
    value, slash, tail = rest.partition("/")
    if not valid_id(value):
        raise RoutingError(
            f"invalid {what} id {value[:40]!r} in path: ids are 1-128 characters of "
            "A-Z a-z 0-9 . _ : -"
        )
    return value, slash + tail
