"""Which upstream a request goes to, and which session and agent it belongs to
(docs/reference.md §1, §2).

Pure functions of the path and headers: no I/O, so every rule is a one-line test.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from spendgate.settings import AgentHeaders, RouteConfig, Settings

ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
DEFAULT_SESSION = "default"
LABEL_HEADER = "X-Spendgate-Session-Label"
MAX_LABEL = 200
"""A session label's longest length in characters, after trimming (docs/reference.md §2)."""
_LABEL_REFUSED = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
    "\ud800-\udfff\ufeff\ufff9-\ufffb]"
)
"""Control characters (C0, DEL, C1), line and paragraph separators, the bidirectional
marks and overrides that make text read other than it is stored, byte-order marks and
interlinear annotations, and the surrogates that stand for bytes not valid UTF-8."""

OLLAMA_ENDPOINTS = frozenset(
    {
        "chat", "generate", "embed", "embeddings", "tags", "show", "ps", "version",
        "create", "copy", "delete", "pull", "push", "blobs",
    }
)  # fmt: skip
"""The first segments after ``/api/`` of Ollama's own API: an unprefixed ``/api/chat``
(a tool that takes only host:port) goes to the route named ``ollama``. Every other
``/api/...`` path is spendgate's (docs/reference.md §1 "Path forms"): its API never
uses one of these names (tests/test_routing.py checks the app's routes)."""

# Decoded in the canonical path: RFC 3986's unreserved characters (§2.3, §6.2.2.2) and the
# two pchars that delimit nothing inside a path, ':' and '@' (ASGI servers, Go's net/http
# and Google's front end read "%3A" as ":"; Gemini's "models/x:generateContent" must
# classify in either spelling). The
# sub-delims ("!$&'()*+,;=") stay encoded: RFC 3986 leaves their meaning to the server
# (";" path parameters, "+" read as a space), so "%3B" and ";" may not be the same path,
# and no endpoint a proxy meters is spelled with one.
_DECODED = frozenset(string.ascii_letters + string.digits + "-._~:@")
_REFUSED_ESCAPES = {
    0x2F: "an encoded '/' (%2F)",
    0x5C: "an encoded '\\' (%5C)",
    **{b: f"an encoded control character (%{b:02X})" for b in [*range(0x20), 0x7F]},
}


def _escape_tables() -> tuple[dict[str, str], dict[str, str]]:
    """Every spelling of two hex digits (either case) -> what it stands for in the
    canonical path (the character, or the escape with upper-case digits, §6.2.2.1), or
    why it is refused. Dictionary look-ups: no int() (which also takes "+f" or " f")."""
    canonical: dict[str, str] = {}
    refused: dict[str, str] = {}
    for byte in range(256):
        upper = f"{byte:02X}"
        hi, lo = upper[0], upper[1]
        for spelling in {upper, hi.lower() + lo, hi + lo.lower(), upper.lower()}:
            if byte in _REFUSED_ESCAPES:
                refused[spelling] = _REFUSED_ESCAPES[byte]
            else:
                canonical[spelling] = chr(byte) if chr(byte) in _DECODED else "%" + upper
    return canonical, refused


_CANONICAL_ESCAPES, _REFUSED_SPELLINGS = _escape_tables()


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    prefix: str
    upstream: str
    adapter: str
    provider: str
    headers: tuple[tuple[str, str], ...] = ()
    local: bool = False
    """Its models run on the user's machine: $0 unless priced (docs/reference.md §4)."""
    reported_cost: bool = False
    """The cost the upstream reports (``usage.cost``) is the row's cost (§4)."""


class Target(NamedTuple):
    """Where one request goes (a tuple: made for every request)."""

    route: Route
    path: str
    """The upstream path in canonical form (:func:`canonical_path`), less spendgate's prefixes."""
    session_id: str
    agent_id: str | None
    label: str | None = None
    """The session label the request's ``X-Spendgate-Session-Label`` header gave."""


class RoutingError(Exception):
    """A request spendgate must refuse before forwarding (400)."""

    def __init__(self, message: str, adapter: str = "openai") -> None:
        super().__init__(message)
        self.message = message
        self.adapter = adapter


def valid_id(value: str) -> bool:
    return ID_RE.fullmatch(value) is not None


def clean_label(raw: str) -> str | None:
    """A session label as given (a header, the API, the command line), trimmed of
    surrounding whitespace; None when nothing is left. ValueError, saying why, for one
    longer than MAX_LABEL characters or holding a character :data:`_LABEL_REFUSED`
    names: refused, not stripped, so a label is stored as its sender wrote it or not at
    all."""
    label = raw.strip()
    if len(label) > MAX_LABEL:
        raise ValueError(f"a session label is at most {MAX_LABEL} characters (got {len(label)})")
    bad = _LABEL_REFUSED.search(label)
    if bad is not None:
        raise ValueError(
            f"a session label may not hold control or bidirectional characters "
            f"(U+{ord(bad.group()):04X} at {bad.start()})"
        )
    return label or None


_SEPARATORS = frozenset({"2F", "2f", "5C", "5c"})
"""Spellings of an encoded '/' (%2F) and '\\' (%5C)."""


def canonical_path(raw: str, *, keep_separators: bool = False) -> str:
    """The one form of a path that is routed, parsed for ids, classified and sent upstream
    (docs/reference.md §1): escapes of unreserved characters, ':' and '@' decoded, every
    other escape with upper-case hex digits; still a valid encoded path ('%' is never
    decoded, so nothing is decoded twice). Refused (RoutingError): a '\\' or an encoded
    '/', '\\' or control character, a '%' not followed by two hex digits, and a '.' or '..'
    segment in any spelling.

    ``keep_separators``: an encoded '/' or '\\' is kept (upper-cased) rather than refused.
    For requests no adapter meters (every metered operation is a POST): a GET of
    ``/v1/models/org%2Fmodel`` is how the SDKs fetch a model whose id holds a '/'."""
    if "\\" in raw:
        raise RoutingError(f"path {raw!r} contains a '\\'")
    path = raw
    if "%" in raw:
        head, *pieces = raw.split("%")  # each piece starts with one escape's hex digits
        out = [head]
        for piece in pieces:
            hexes = piece[:2]
            char = _CANONICAL_ESCAPES.get(hexes)
            if char is None and keep_separators and hexes in _SEPARATORS:
                char = "%" + hexes.upper()  # an id holding '/', kept encoded as it came
            if char is None:
                why = _REFUSED_SPELLINGS.get(hexes, "a '%' not followed by two hex digits")
                raise RoutingError(f"path {raw!r} contains {why}")
            out += (char, piece[2:])
        path = "".join(out)
    # A routable path starts with "/", so every segment follows one: no "/.", no dot segment.
    if "/." in path and any(seg in (".", "..") for seg in path.split("/")):
        raise RoutingError(f"path {raw!r} contains a '.' or '..' segment")
    return path


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
        provider = rc.provider or (name if rc.adapter == "openai" else rc.adapter)
        routes.append(
            Route(
                name=name,
                prefix=rc.prefix,
                upstream=rc.upstream,
                adapter=rc.adapter,
                provider=provider,
                headers=tuple(rc.headers.items()),
                local=rc.adapter == "ollama" if rc.local is None else rc.local,
                reported_cost=(
                    provider == "openrouter" if rc.reported_cost is None else rc.reported_cost
                ),
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

    def resolve(self, raw_path: str, headers: Mapping[str, str], method: str = "POST") -> Target:
        """``raw_path``: as the client sent it (``rel_url.raw_path``), still percent-encoded."""
        path = raw_path
        if "%" in path or "\\" in path or "/." in path:  # else it is canonical already
            path = self._canonical(path, method.upper() != "POST")
        session = agent = None
        if path.startswith("/s/"):
            session, path = _take_segment(path[3:], "session")
            if path.startswith("/a/"):
                agent, path = _take_segment(path[3:], "agent")
        route, upstream_path = self._match(path)
        hs, ha = self._from_headers(headers, route.adapter)
        raw_label = headers.get(LABEL_HEADER)
        label = None
        if raw_label is not None:
            try:
                label = clean_label(raw_label)
            except ValueError as exc:
                raise RoutingError(f"invalid {LABEL_HEADER} header: {exc}", route.adapter) from None
        return Target(
            route=route,
            path=upstream_path or "/",
            session_id=session or hs or DEFAULT_SESSION,
            agent_id=agent or ha,
            label=label,
        )

    def _canonical(self, raw_path: str, keep_separators: bool) -> str:
        """:func:`canonical_path`, refusing in the error shape of the route the path names."""
        try:
            return canonical_path(raw_path, keep_separators=keep_separators)
        except RoutingError as exc:
            raise RoutingError(exc.message, self._adapter_of(raw_path)) from None

    def _adapter_of(self, path: str) -> str:
        """The adapter of the route a refused path names (ids skipped unchecked), else openai."""
        if path.startswith("/s/"):
            path = "/" + path[3:].partition("/")[2]
            if path.startswith("/a/"):
                path = "/" + path[3:].partition("/")[2]
        try:
            return self._match(path)[0].adapter
        except RoutingError:
            return "openai"

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
        ollama = path.startswith("/api/") and path[5:].partition("/")[0] in OLLAMA_ENDPOINTS
        if ollama and "ollama" in self._by_name:
            return self._by_name["ollama"], path
        prefixes = ", ".join(r.prefix for r in self._routes)
        raise RoutingError(
            f"no route for path {path!r}: use one of {prefixes} (optionally after "
            "/s/{session}/), or an unprefixed /v1/... OpenAI or Anthropic path or "
            "/api/chat-style Ollama path"
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
        """A coding agent's own headers; an invalid value is ignored, never an error.

        The most specific rule wins: a parent/child pair (OpenCode's sub-sessions) over a
        session with a sub-agent header over a session id alone, whichever agent's rule
        comes first in the list (OpenCode also sends Codex's ``session-id``)."""
        for name in self._agent_session_names:
            if name in headers:
                break
        else:
            return None, None  # no coding agent's session header (the usual case)
        best: tuple[int, str, str | None] | None = None
        for ah in self._agent_headers:
            sid = _first_valid(headers, ah.session)
            if sid is None:
                continue
            parent = _first_valid(headers, ah.parent_session)
            if parent is not None:
                return parent, sid  # nothing is more specific
            sub = _first_valid(headers, ah.subagent)
            rank = 1 if sub is not None else 0
            if best is None or rank > best[0]:
                best = (rank, sid, sub)
        return (best[1], best[2]) if best is not None else (None, None)


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
