"""docs/reference.md keeps up with the code: every setting, route, metric and command.

Each test reads the names from the code itself (the settings model, the running app's
router and registry, the argparse parser), so a new one that the reference does not
name fails here.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from pathlib import Path

from spendgate.cli import build_parser
from spendgate.settings import Settings
from tests.conftest import Proxy

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference.md"


def _reference() -> str:
    return REFERENCE.read_text(encoding="utf-8")


def _assert_named(names: Iterable[str], text: str) -> None:
    missing = sorted(n for n in set(names) if n not in text)
    assert not missing, f"not in docs/reference.md: {missing}"


def test_every_setting_has_its_variable() -> None:
    names = [f"`SPENDGATE_{name.upper()}`" for name in Settings.model_fields]
    _assert_named(names, _reference())


async def test_every_route_is_listed(proxy: Proxy) -> None:
    """``METHOD /path`` for every route the app registers (API, events, dashboard, ...);
    a placeholder's pattern is left out (``{model:.+}`` is written ``{model}``)."""
    names = []
    for route in proxy.app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method in ("HEAD", "*") or not path:  # HEAD mirrors GET; "*" is the proxy
            continue
        names.append(f"`{route.method} {path}`")
    assert any("/api/events" in n for n in names)
    _assert_named(names, _reference())


async def test_every_metric_is_listed(proxy: Proxy) -> None:
    """Every family a scrape of the app shows, by its exposed name (``..._total``)."""
    async with proxy.http.get(proxy.url("/metrics")) as resp:
        text = await resp.text()
    exposed = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    # prometheus_client's own counters add a ``*_created`` gauge beside ``*_total``.
    names = [
        f"`{n}`"
        for n in exposed
        if not (n.endswith("_created") and n.removesuffix("_created") + "_total" in exposed)
    ]
    assert len(names) > 10
    _assert_named(names, _reference())


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("spendgate has no subcommands")


def test_every_command_and_flag_is_listed() -> None:
    text = _reference()
    commands = _subcommands(build_parser())
    _assert_named([f"spendgate {name}" for name in commands], text)
    flags = {
        opt
        for sub in (build_parser(), *commands.values())
        for action in sub._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help"
    }
    absent = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    assert not absent, f"flags not in docs/reference.md: {sorted(absent)}"
