"""Routes, sessions and agents from paths and headers (docs/reference.md §1, §2): pure
rules, then over HTTP."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spendgate.app import make_app
from spendgate.routing import OLLAMA_ENDPOINTS, Router, RoutingError, build_routes, canonical_path
from spendgate.settings import RouteConfig, Settings
from tests.conftest import Proxy, StartProxy
from tests.paths import FIXTURES
from tests.upstream import FakeUpstream, fixture_reply


@pytest.fixture
def router() -> Router:
    s = Settings(routes=[RouteConfig(prefix="/groq", upstream="https://api.groq.com/openai")])
    return Router(build_routes(s), s.agent_headers)


@pytest.mark.parametrize(
    ("path", "route", "upstream_path", "session", "agent"),
    [
        ("/openai/v1/chat/completions", "openai", "/v1/chat/completions", "default", None),
        ("/s/run-42/openai/v1/responses", "openai", "/v1/responses", "run-42", None),
        ("/s/run-42/a/sub.1/anthropic/v1/messages", "anthropic", "/v1/messages", "run-42", "sub.1"),
        ("/v1/chat/completions", "openai", "/v1/chat/completions", "default", None),
        ("/v1/embeddings", "openai", "/v1/embeddings", "default", None),
        ("/v1/messages", "anthropic", "/v1/messages", "default", None),
        ("/s/x/v1/messages", "anthropic", "/v1/messages", "x", None),
        ("/gemini/v1beta/models/gemini-2.5-flash:generateContent", "gemini",
         "/v1beta/models/gemini-2.5-flash:generateContent", "default", None),
        ("/ollama/api/chat", "ollama", "/api/chat", "default", None),
        ("/api/chat", "ollama", "/api/chat", "default", None),
        ("/api/generate", "ollama", "/api/generate", "default", None),
        ("/api/embed", "ollama", "/api/embed", "default", None),
        ("/api/embeddings", "ollama", "/api/embeddings", "default", None),
        ("/api/tags", "ollama", "/api/tags", "default", None),
        ("/api/show", "ollama", "/api/show", "default", None),
        ("/api/blobs/sha256:abc", "ollama", "/api/blobs/sha256:abc", "default", None),
        ("/s/local-1/api/chat", "ollama", "/api/chat", "local-1", None),
        ("/groq/v1/chat/completions", "groq", "/v1/chat/completions", "default", None),
    ],
)  # fmt: skip
def test_paths(
    router: Router, path: str, route: str, upstream_path: str, session: str, agent: str | None
) -> None:
    t = router.resolve(path, {})
    assert (t.route.name, t.path, t.session_id, t.agent_id) == (
        route,
        upstream_path,
        session,
        agent,
    )


def test_configured_route_provider_and_headers() -> None:
    s = Settings(
        routes=[
            RouteConfig(
                prefix="/deepseek",
                upstream="https://api.deepseek.com/",
                headers={"Authorization": "Bearer held-by-proxy"},
            )
        ]
    )
    t = Router(build_routes(s), s.agent_headers).resolve("/deepseek/chat/completions", {})
    assert t.route.upstream == "https://api.deepseek.com" and t.route.provider == "deepseek"
    assert t.route.headers == (("Authorization", "Bearer held-by-proxy"),)


@pytest.mark.parametrize(
    "path",
    ["/s/bad id/openai/v1/x", "/s//openai/v1/x", "/s/" + "a" * 129 + "/openai/v1/x",
     "/s/ok/a/b%0d%0a/openai/v1/x", "/nowhere/v1/x", "/openai/../admin", "/openai/v1/%2e%2e/x"],
)  # fmt: skip
def test_bad_paths_are_refused(router: Router, path: str) -> None:
    with pytest.raises(RoutingError):
        router.resolve(path, {})


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/chat/completion%73", "/v1/chat/completions"),
        ("/v1/chat/completion%53", "/v1/chat/completionS"),  # decoded, not case-folded
        ("/ollama/api/cha%74", "/ollama/api/chat"),
        ("/%41%5a%61%7A%30%39%2D%2E%5F%7E", "/AZaz09-._~"),  # every unreserved kind
        ("/gemini/v1beta/models/gemini-2.5-flash%3AgenerateContent",
         "/gemini/v1beta/models/gemini-2.5-flash:generateContent"),
        ("/gemini/v1beta/models/gemini-2.5-flash%3agenerateContent",
         "/gemini/v1beta/models/gemini-2.5-flash:generateContent"),
        ("/x/a%40b", "/x/a@b"),
        ("/x/a%2bb%3b%3D%2c%21%24%26%27%28%29%2A", "/x/a%2Bb%3B%3D%2C%21%24%26%27%28%29%2A"),
        ("/x/%3f%23%25%20%e2%82%ac", "/x/%3F%23%25%20%E2%82%AC"),  # upper-case hex only
        ("/x/%252e%252e/y", "/x/%252e%252e/y"),  # '%' is never decoded: nothing twice
        ("/x/.hidden/a.b/...", "/x/.hidden/a.b/..."),  # dots, but no dot segment
        ("/x/%2ehidden", "/x/.hidden"),
    ],
)  # fmt: skip
def test_canonical_path(raw: str, canonical: str) -> None:
    assert canonical_path(raw) == canonical
    assert canonical_path(canonical) == canonical  # idempotent


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("/openai/v1/a%2Fb", "an encoded '/'"),
        ("/openai/v1/a%2fb", "an encoded '/'"),
        ("/openai/v1/..%2fadmin", "an encoded '/'"),
        ("/openai/v1/a%5Cb", "an encoded '\\'"),
        ("/openai/v1/a%5cb", "an encoded '\\'"),
        ("/openai/v1/a\\b", "contains a '\\'"),
        ("/openai/v1/a%00b", "control character (%00)"),
        ("/openai/v1/a%0ab", "control character (%0A)"),
        ("/openai/v1/a%1Fb", "control character (%1F)"),
        ("/openai/v1/a%7fb", "control character (%7F)"),
        ("/openai/v1/a%", "'%' not followed by two hex digits"),
        ("/openai/v1/a%4", "'%' not followed by two hex digits"),
        ("/openai/v1/a%zz", "'%' not followed by two hex digits"),
        ("/openai/v1/a%+f", "'%' not followed by two hex digits"),  # int("+f", 16) == 15
        ("/openai/v1/a% f", "'%' not followed by two hex digits"),
        ("/openai/v1/a%%41", "'%' not followed by two hex digits"),
        ("/openai/v1/./x", "'.' or '..' segment"),
        ("/openai/../admin", "'.' or '..' segment"),
        ("/openai/v1/..", "'.' or '..' segment"),
        ("/openai/v1/%2e/x", "'.' or '..' segment"),
        ("/openai/v1/%2E/x", "'.' or '..' segment"),
        ("/openai/v1/%2e%2e/x", "'.' or '..' segment"),
        ("/openai/v1/%2E%2E/x", "'.' or '..' segment"),
        ("/openai/v1/%2e%2E/x", "'.' or '..' segment"),
        ("/openai/v1/%2e./x", "'.' or '..' segment"),
        ("/openai/v1/.%2e/x", "'.' or '..' segment"),
        ("/openai/v1/.%2E", "'.' or '..' segment"),
        ("/s/%2e%2e/openai/v1/x", "'.' or '..' segment"),
    ],
)  # fmt: skip
def test_refused_paths(router: Router, raw: str, why: str) -> None:
    with pytest.raises(RoutingError, match=re.escape(why)) as exc:
        canonical_path(raw)
    assert exc.value.message.startswith(f"path {raw!r} contains ")
    with pytest.raises(RoutingError, match=re.escape(why)):
        router.resolve(raw, {})


def test_canonical_path_is_what_routes_and_goes_upstream(router: Router) -> None:
    t = router.resolve("/v1/chat/completion%73", {})
    assert (t.route.name, t.path) == ("openai", "/v1/chat/completions")
    t = router.resolve("/s/run%2D1/a/sub%2e1/v1/messag%65s", {})
    assert (t.route.name, t.path, t.session_id, t.agent_id) == (
        "anthropic",
        "/v1/messages",
        "run-1",
        "sub.1",
    )
    t = router.resolve("/%67emini/v1beta/models/gemini-2.5-flash%3agenerateContent", {})
    assert (t.route.name, t.path) == ("gemini", "/v1beta/models/gemini-2.5-flash:generateContent")
    assert router.resolve("/gro%71/v1/x%2b", {}).path == "/v1/x%2B"


@pytest.mark.parametrize(
    ("raw", "adapter"),
    [
        ("/ollama/api/cha%2Ft", "ollama"),
        ("/s/run-1/a/x/gemini/v1beta/%2e%2e/x", "gemini"),
        ("/s/run-1/anthropic/v1/messages%00", "anthropic"),
        ("/v1/messages/%2e%2e", "anthropic"),
        ("/nowhere/%2e%2e", "openai"),
    ],
)
def test_refusal_speaks_the_routes_error_shape(router: Router, raw: str, adapter: str) -> None:
    with pytest.raises(RoutingError) as exc:
        router.resolve(raw, {})
    assert exc.value.adapter == adapter


def test_header_precedence(router: Router) -> None:
    h = {"X-Spendgate-Session": "hdr", "X-Claude-Code-Session-Id": "cc"}
    assert router.resolve("/s/path/openai/v1/x", h).session_id == "path"
    assert router.resolve("/openai/v1/x", h).session_id == "hdr"
    assert router.resolve("/openai/v1/x", {"X-Claude-Code-Session-Id": "cc"}).session_id == "cc"
    with pytest.raises(RoutingError, match="X-Spendgate-Session"):
        router.resolve("/openai/v1/x", {"X-Spendgate-Session": "no spaces"})
    with pytest.raises(RoutingError, match="X-Spendgate-Agent"):
        router.resolve("/openai/v1/x", {"X-Spendgate-Agent": "é"})


@pytest.mark.parametrize(
    ("headers", "session", "agent"),
    [
        ({"X-Claude-Code-Session-Id": "c1", "X-Claude-Code-Agent-Id": "a1"}, "c1", "a1"),
        ({"session_id": "codex-1", "x-openai-subagent": "review"}, "codex-1", "review"),
        ({"Session-Id": "codex-2"}, "codex-2", None),
        ({"conversation_id": "codex-3"}, "codex-3", None),
        ({"X-Session-Id": "oc-child", "x-parent-session-id": "oc-parent"}, "oc-parent", "oc-child"),
        ({"X-Session-Id": "oc-1"}, "oc-1", None),
        ({"agent-session-id": "goose-1"}, "goose-1", None),
        ({"X-Claude-Code-Session-Id": "bad value!"}, "default", None),  # ignored, never an error
        # The header sets the real CLIs send today (issue #17): the most specific rule wins.
        ({"X-Claude-Code-Session-Id": "cc-1", "x-claude-code-agent-id": "sub-7",
          "anthropic-version": "2023-06-01"}, "cc-1", "sub-7"),
        ({"session-id": "cx-1", "thread-id": "th-1", "originator": "codex_cli_rs"},
         "cx-1", None),
        ({"session-id": "c1", "x-session-id": "c1", "x-parent-session-id": "p1"}, "p1", "c1"),
        ({"session-id": "c1", "x-session-id": "c1"}, "c1", None),
        ({"session-id": "c1", "x-openai-subagent": "review", "x-session-id": "c1"},
         "c1", "review"),
    ],
)  # fmt: skip
def test_known_agent_headers(
    router: Router, headers: dict[str, str], session: str, agent: str | None
) -> None:
    from multidict import CIMultiDict

    t = router.resolve("/openai/v1/chat/completions", CIMultiDict(headers))
    assert (t.session_id, t.agent_id) == (session, agent)


async def test_codex_underscore_header_over_http(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.queue(fixture_reply("openai/chat_json_gpt-3.5-turbo.json"))
    async with proxy.http.post(
        proxy.url("/v1/chat/completions"),
        json={"model": "gpt-3.5-turbo", "messages": []},
        headers={"session_id": "codex-http", "X-Spendgate-Agent": "main"},
    ) as r:
        assert r.status == 200
    rows = await proxy.messages("codex-http")
    assert rows[0]["agentId"] == "main"
    # spendgate's own headers are not forwarded; the agent's are
    assert "X-Spendgate-Agent" not in upstream.seen[0].headers
    assert upstream.seen[0].headers["session_id"] == "codex-http"


def test_an_encoded_slash_is_kept_only_where_nothing_is_metered(router: Router) -> None:
    """A GET of a model whose id holds a '/' (how the SDKs spell it) is forwarded as it
    came; a POST, which may be metered, is refused."""
    t = router.resolve("/v1/models/meta-llama%2fLlama-3-8B", {}, "GET")
    assert t.path == "/v1/models/meta-llama%2FLlama-3-8B"
    assert router.resolve("/v1/files/a%5cb", {}, "delete").path == "/v1/files/a%5Cb"
    for method in ("POST", "post"):
        with pytest.raises(RoutingError, match="encoded '/'"):
            router.resolve("/v1/chat%2Fcompletions", {}, method)
    with pytest.raises(RoutingError, match="segment"):
        router.resolve("/v1/models/%2e%2E/x", {}, "GET")  # dot segments: never
    assert canonical_path("/a%2fb", keep_separators=True) == "/a%2Fb"


@pytest.mark.parametrize("path", ["/api/sessions", "/api/chatx", "/api/", "/apichat", "/api"])
def test_other_api_paths_are_not_ollamas(router: Router, path: str) -> None:
    """Only Ollama's own endpoint names leave spendgate's /api/ namespace."""
    with pytest.raises(RoutingError, match="no route"):
        router.resolve(path, {})


def test_spendgate_api_uses_no_ollama_endpoint_name(tmp_path: Path) -> None:
    """The clash rule (docs/reference.md §1 "Path forms"): aiohttp dispatches spendgate's
    own routes first, so an API route named like an Ollama endpoint would hide it."""
    app = make_app(Settings(db_path=tmp_path / "x.db"))
    ours = {
        r.canonical.split("/")[2] for r in app.router.resources() if r.canonical.startswith("/api/")
    }
    assert "sessions" in ours and "budget" in ours  # the check sees the API
    assert not ours & OLLAMA_ENDPOINTS


async def test_unprefixed_ollama_paths_through_the_proxy(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    """OLLAMA_HOST=http://127.0.0.1:8787 (host:port only): /api/chat is metered on the
    ollama route while /api/sessions stays spendgate's, behind its token."""
    proxy = await start_proxy(admin_token="tok")
    upstream.queue(fixture_reply("ollama/chat_stream_llama3.ndjson"))
    body = (FIXTURES / "ollama/chat_stream_llama3.request.json").read_bytes()
    async with proxy.http.post(
        proxy.url("/api/chat"), data=body, headers={"X-Spendgate-Session": "olla"}
    ) as r:
        assert r.status == 200
        await r.read()
    assert upstream.seen[0].path == "/api/chat"
    async with proxy.http.get(proxy.url("/api/sessions")) as r:
        assert r.status == 401  # the API, not forwarded
    auth = {"Authorization": "Bearer tok"}
    async with proxy.http.get(proxy.url("/api/sessions/olla/messages"), headers=auth) as r:
        rows = (await r.json())["messages"]
    assert [(m["route"], m["modelId"], m["outputTokens"] > 0) for m in rows] == [
        ("ollama", "llama3", True)
    ]
    assert len(upstream.seen) == 1
