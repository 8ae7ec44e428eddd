"""The ``spendgate`` command: parse arguments, build Settings, dispatch.

What the reports say is :mod:`spendgate.reports`; how they look, :mod:`spendgate.render`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import errno
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager, suppress
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import orjson

from spendgate import __version__
from spendgate.address import http_url, is_loopback, local_url
from spendgate.settings import Settings, SettingsError, load_settings

GC_THRESHOLDS = (10_000, 10, 10)
"""The collector's thresholds while serving. Each request allocates a few hundred
short-lived objects, nearly all freed by reference counting; at Python's default (a
young collection every 700 allocations) the collector kept scanning the in-flight
requests' objects. This measured about 4 % fewer instructions per request
(``bench/instructions.py``); peak RSS with 1,000 open streams stayed under 100 MB."""


LISTEN_ERRORS = {
    errno.EADDRINUSE: "the port is in use (another spendgate, or another program?): "
    "choose another with --port or SPENDGATE_PORT",
    errno.EACCES: "permission denied (ports below 1024 need privileges): "
    "choose another with --port or SPENDGATE_PORT",
    errno.EADDRNOTAVAIL: "the address is not one of this machine's: check --host or SPENDGATE_HOST",
}
"""Why ``serve`` could not bind, by errno: each a one-line error, exit 1."""


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in ("host", "port", "db_path"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return load_settings(args.config, **overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from aiohttp import web

    from spendgate.app import make_app
    from spendgate.ledger_factory import SharedSetupError
    from spendgate.store import StoreOpenError
    from spendgate.store_factory import describe

    settings = _settings(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    remote = not settings.admin_token and not is_loopback(settings.host)
    if remote and not settings.allow_remote_without_token:
        print(
            f"spendgate: refusing to listen on {settings.host} without SPENDGATE_ADMIN_TOKEN "
            "(set one, or SPENDGATE_ALLOW_REMOTE_WITHOUT_TOKEN=true)",
            file=sys.stderr,
        )
        return 2
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]

        uvloop.install()  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        pass
    gc.set_threshold(*GC_THRESHOLDS)
    print(
        f"spendgate {__version__} on {http_url(settings.host, settings.port)} "
        f"(db {describe(settings)})"
    )
    try:
        web.run_app(
            make_app(settings),
            host=settings.host,
            port=settings.port,
            print=None,
            access_log=None,
            shutdown_timeout=5,
        )
    except StoreOpenError as exc:  # one line, no traceback (docs/reference.md §5)
        print(f"spendgate: cannot use the database {exc}", file=sys.stderr)
        return 1
    except SharedSetupError as exc:  # one line (docs/reference.md §6 "Several replicas")
        print(f"spendgate: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the listening socket: one line, no traceback (§11)
        if exc.errno not in LISTEN_ERRORS:
            raise
        print(
            f"spendgate: cannot listen on {http_url(settings.host, settings.port)}: "
            f"{LISTEN_ERRORS[exc.errno]}",
            file=sys.stderr,
        )
        return 1
    finally:  # whatever is left to do at exit can still be stopped
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return 0


@asynccontextmanager
async def _open_store(settings: Settings) -> AsyncIterator[Any]:
    from spendgate.store_factory import make_store

    store = make_store(settings)
    await store.open(start_writer=False)
    try:
        yield store
    finally:
        await store.close()


def _run(coro: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a command that reads the database; a file it cannot use is one line, exit 1."""
    from spendgate.store import StoreOpenError

    try:
        return asyncio.run(coro())
    except StoreOpenError as exc:  # one line, no traceback (docs/reference.md §5)
        print(f"spendgate: cannot use the database {exc}", file=sys.stderr)
        return 1


def _no_database(settings: Settings) -> bool:
    """Reports read the store directly; say so plainly (and create nothing) when its
    SQLite file is missing (a server's database is always there to ask)."""
    from spendgate.store_factory import is_postgres, sqlite_path

    if is_postgres(settings.store_url) or sqlite_path(settings).exists():
        return False
    print(
        f"spendgate: no database at {sqlite_path(settings)} (nothing recorded yet? "
        "point --db or SPENDGATE_DB_PATH at the proxy's file)",
        file=sys.stderr,
    )
    return True


def cmd_sessions(args: argparse.Namespace) -> int:
    """Every session with its totals, newest activity first; needs no running proxy."""
    from spendgate import render, reports
    from spendgate.store_factory import describe

    since = None
    if args.since:
        import time

        from spendgate.timespec import TimeSpecError, parse

        try:
            since = parse(args.since, time.time(), "since")
        except TimeSpecError as exc:
            print(f"spendgate: {exc}", file=sys.stderr)
            return 2

    async def go() -> int:
        settings = _settings(args)
        if _no_database(settings):
            return 1
        async with _open_store(settings) as store:
            rows = await reports.sessions_list(store, since=since)
        if args.format == "json":
            shown = [reports.exported(r) for r in rows]
            print(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())
        else:
            render.print_sessions(rows, describe(settings), args.since)
        return 0

    return _run(go)


def _report_over_time(args: argparse.Namespace) -> int:
    """``report [SESSION] --since/--until/--by``: totals per period, model, agent or session
    across sessions (or of SESSION), aggregated by the store (docs/reference.md §11)."""
    import time

    from spendgate import render, reports
    from spendgate.timespec import TimeSpecError

    try:
        since, until = reports.bounds(args.since, args.until, time.time())
    except TimeSpecError as exc:
        print(f"spendgate: {exc}", file=sys.stderr)
        return 2

    async def go() -> int:
        settings = _settings(args)
        if _no_database(settings):
            return 1
        async with _open_store(settings) as store:
            found = await reports.over_time(store, args.by or "day", since, until, args.session)
        if args.format == "csv":
            csv.writer(sys.stdout, lineterminator="\n").writerows(found.csv_rows())
        elif args.format == "json":
            print(orjson.dumps(found.to_json(), option=orjson.OPT_INDENT_2).decode())
        else:
            render.print_report(found.to_json())
        return 0

    return _run(go)


def cmd_report(args: argparse.Namespace) -> int:
    """One session: totals by model and agent (table, json), or every message (csv); with
    ``--since``, ``--until`` or ``--by``, or no session, totals over time."""
    from spendgate import render, reports
    from spendgate.price_files import load_price_table
    from spendgate.records import EXPORT_HEADER
    from spendgate.store_factory import describe

    if args.session is None or args.by or args.since or args.until:
        return _report_over_time(args)

    async def go() -> int:
        settings = _settings(args)
        if _no_database(settings):
            return 1
        async with _open_store(settings) as store:
            sessions = {s.id: s for s in await store.load_sessions()}
            rec = sessions.get(args.session)
            if rec is None:
                print(
                    f"spendgate: unknown session {args.session!r} in {describe(settings)} "
                    "(`spendgate sessions` lists them)",
                    file=sys.stderr,
                )
                return 1
            if args.format == "csv":
                writer = csv.writer(sys.stdout, lineterminator="\n")
                writer.writerow(EXPORT_HEADER)
                async for m in store.iter_messages(rec.id):
                    writer.writerow(m.csv_cells(rec.label))
                return 0
            spent = (await store.spend_by_session()).get(rec.id, Decimal(0))
            prices = load_price_table(settings.pricing_file, settings.model_aliases)
            summary = await reports.session_summary(store, prices, rec, spent)
        if args.format == "json":
            print(orjson.dumps(reports.exported(summary), option=orjson.OPT_INDENT_2).decode())
        else:
            render.print_summary(summary)
        return 0

    return _run(go)


class _NoProxy(Exception):
    """Nothing answered at the proxy's address (the message says where and why)."""


class _Refused(Exception):
    """The proxy answered with an error (the message: its status and reason)."""


def _call(settings: Settings, method: str, path: str, body: Any = None) -> Any:
    """One request to the running proxy's API: its JSON answer; _NoProxy, _Refused."""
    import urllib.error
    import urllib.request

    url = local_url(settings.host, settings.port) + path
    req = urllib.request.Request(
        url, method=method, data=None if body is None else orjson.dumps(body)
    )
    req.add_header("Content-Type", "application/json")
    if settings.admin_token:
        req.add_header("Authorization", f"Bearer {settings.admin_token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        with suppress(orjson.JSONDecodeError, KeyError, TypeError):
            text = orjson.loads(text)["error"]["message"]
        raise _Refused(f"{exc.code}: {text}") from None
    except urllib.error.URLError as exc:
        raise _NoProxy(f"no proxy running at {url} ({exc.reason})") from None


def _admin(args: argparse.Namespace, method: str, path: str, body: Any = None) -> int:
    """Change a session through the running proxy, so its in-memory ledger sees it."""
    try:
        data = _call(_settings(args), method, path, body)
    except _Refused as exc:
        print(f"spendgate: {exc}", file=sys.stderr)
        return 1
    except _NoProxy as exc:
        print(f"spendgate: {exc}; start `spendgate serve` first", file=sys.stderr)
        return 1
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """``prune --before WHEN [--yes] [--dry-run]``: remove old sessions, through the
    running proxy (its ledger forgets them), else on the database file itself; asks
    first on a terminal (docs/reference.md §11)."""
    import time
    import urllib.parse
    from datetime import UTC, datetime

    from spendgate import journal, pruning
    from spendgate.store import StoreOpenError
    from spendgate.store_factory import describe, is_postgres, sqlite_path
    from spendgate.timespec import TimeSpecError, parse

    try:
        before = parse(args.before, time.time(), "--before")
    except TimeSpecError as exc:
        print(f"spendgate: {exc}", file=sys.stderr)
        return 2
    settings = _settings(args)
    exact = datetime.fromtimestamp(before, UTC).isoformat()  # the proxy reads it as is
    query = urllib.parse.urlencode({"before": exact})

    def through_proxy(dry_run: bool) -> Any:
        tail = "&dryRun=true" if dry_run else ""
        return _call(settings, "DELETE", f"/api/sessions?{query}{tail}")

    def on_file(dry_run: bool) -> Any:
        async def go() -> Any:
            async with _open_store(settings) as store:
                pruned = await store.prune(before, dry_run=dry_run)
            return pruning.pruned_json(pruned, before, dry_run)

        return asyncio.run(go())

    run: Callable[[bool], Any] = through_proxy
    try:
        plan = through_proxy(True)
        where = f"through the proxy at {local_url(settings.host, settings.port)}"
    except _Refused as exc:
        print(f"spendgate: {exc}", file=sys.stderr)
        return 1
    except _NoProxy as exc:
        if _no_database(settings):
            return 1
        if not is_postgres(settings.store_url) and journal.in_use(sqlite_path(settings)):
            print(  # a proxy elsewhere writes this file: its ledger must forget them too
                f"spendgate: {exc}, but a running spendgate holds {sqlite_path(settings)}: "
                "prune through it (its --port or SPENDGATE_PORT)",
                file=sys.stderr,
            )
            return 1
        run, where = on_file, f"in {describe(settings)} (no proxy running)"
        try:
            plan = on_file(True)
        except StoreOpenError as exc1:
            print(f"spendgate: cannot use the database {exc1}", file=sys.stderr)
            return 1
    count, rows = plan["sessionCount"], plan["messageCount"]
    when = plan["before"]
    kept = plan["keptInFlight"]
    if kept:
        print(f"{len(kept)} sessions with requests in flight are kept: {', '.join(kept[:5])}")
    if not count:
        print(f"no sessions last active before {when}: nothing to remove")
        return 0
    what = f"{count:,} sessions ({rows:,} messages) last active before {when}"
    if args.dry_run:
        print(f"would remove {what} {where}")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            print(
                f"spendgate: would remove {what}; stdin is not a terminal, so nothing is "
                "asked and nothing removed: add --yes",
                file=sys.stderr,
            )
            return 2
        answer = input(f"remove {what} {where}? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("nothing removed")
            return 1
    try:
        done = run(False)
    except (_Refused, _NoProxy) as exc:
        print(f"spendgate: {exc}; nothing removed", file=sys.stderr)
        return 1
    print(
        f"removed {done['sessionCount']:,} sessions ({done['messageCount']:,} messages) "
        f"last active before {done['before']}"
    )
    return 0


def _amount(text: str) -> float | None:
    """A budget from the command line: USD ≥ 0, or none/unlimited/off. ValueError if not."""
    raw = text.strip().lstrip("$")
    if raw.lower() in ("none", "unlimited", "off"):
        return None
    try:
        amount = Decimal(raw)
    except InvalidOperation:
        raise ValueError from None
    if not amount.is_finite() or amount < 0:
        raise ValueError
    return float(amount)


def cmd_budget(args: argparse.Namespace) -> int:
    """``budget SESSION USD [--agent AGENT]`` or ``budget --global USD``."""
    glob = args.global_usd is not None
    if (args.session is None, args.usd is None) != (glob, glob):  # one form or the other
        print(
            "spendgate: use `budget SESSION USD [--agent AGENT]` or `budget --global USD`",
            file=sys.stderr,
        )
        return 2
    if glob and args.agent:
        print("spendgate: --agent is for a session's agent, not the global budget", file=sys.stderr)
        return 2
    given = args.global_usd if glob else args.usd
    try:
        budget = _amount(given)
    except ValueError:
        print(f"spendgate: {given!r} is not an amount in USD ≥ 0 (or 'none')", file=sys.stderr)
        return 2
    if glob:
        path = "/api/budget"
    elif args.agent:
        path = f"/api/sessions/{args.session}/agents/{args.agent}/budget"
    else:
        path = f"/api/sessions/{args.session}/budget"
    return _admin(args, "PUT", path, {"budgetUsd": budget})


def cmd_label(args: argparse.Namespace) -> int:
    """``label SESSION TEXT`` or ``label SESSION --clear``, through the running proxy."""
    if (args.text is None) == (not args.clear):
        print("spendgate: use `label SESSION TEXT` or `label SESSION --clear`", file=sys.stderr)
        return 2
    return _admin(args, "PUT", f"/api/sessions/{args.session}/label", {"label": args.text})


def cmd_resume(args: argparse.Namespace) -> int:
    return _admin(args, "POST", f"/api/sessions/{args.session}/resume")


def cmd_pause(args: argparse.Namespace) -> int:
    return _admin(args, "POST", f"/api/sessions/{args.session}/pause")


def _pricing_update(args: argparse.Namespace, settings: Settings) -> int:
    """``pricing update``: fetch, check, report, store (docs/reference.md §4)."""
    from spendgate import price_files
    from spendgate.pricing import PricingError

    source = args.source or price_files.DEFAULT_UPDATE_URL
    target = price_files.update_path(settings)
    try:
        body, origin = price_files.fetch_table(source)
        plan = price_files.plan_update(body, origin, target)
    except PricingError as exc:
        print(f"spendgate: {exc}; nothing stored", file=sys.stderr)
        return 1
    print("\n".join(plan.lines(None if args.verbose else 20)))
    if plan.refused and not args.force:
        print(
            "spendgate: not stored: the table drops prices or has absurd ones (above); "
            "--force stores it anyway",
            file=sys.stderr,
        )
        return 1
    if args.dry_run:
        print("dry run: nothing stored")
        return 0
    price_files.store_update(plan, target)
    date = price_files.bundled_date() or "unknown date"
    print(f"stored in {target}; it takes precedence over the bundled table ({date})")
    if args.reload:
        return _admin(args, "POST", "/api/pricing/reload")
    print("a running proxy takes it on `spendgate pricing reload` (or SIGHUP)")
    return 0


def _pricing_list(args: argparse.Namespace, settings: Settings) -> int:
    """``pricing --list [--search TEXT] [--json]``: the effective table, each id priced
    by the proxy's own lookup (on ``--route`` etc. when given)."""
    from spendgate import price_files, render, reports
    from spendgate.pricing import PricingError

    if args.model is not None:
        print("spendgate: --list takes no MODEL (filter with --search TEXT)", file=sys.stderr)
        return 2
    quiet = logging.getLogger("spendgate.pricing")  # its "no price" is for the proxy's log
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        table = price_files.settings_table(settings)
        local = True if args.local else None
        # the route is checked once, even when the search matches nothing
        price_files.lookup(table, settings, "", route=args.route, provider=args.provider)

        def charged(model: str) -> Any:
            return price_files.lookup(
                table, settings, model, route=args.route, provider=args.provider, local=local
            )[0]

        rows = reports.price_list(table, charged, args.search)
    except PricingError as exc:
        print(f"spendgate: {exc}", file=sys.stderr)
        return 2
    finally:
        quiet.setLevel(level)
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    else:
        render.print_prices(rows, args.search)
    return 0


def cmd_pricing(args: argparse.Namespace) -> int:
    from spendgate import price_files
    from spendgate.pricing import PricingError

    settings = _settings(args)
    if args.model == "import":
        if not args.file:
            print("usage: spendgate pricing import FILE [--to PRICING_FILE]", file=sys.stderr)
            return 2
        target = Path(args.to) if args.to else settings.pricing_file
        if target is None:
            target = settings.db_path.parent / "pricing.json"
        try:
            count = price_files.import_into(Path(args.file), target)
        except (OSError, ValueError) as exc:
            print(f"spendgate: cannot import {args.file}: {exc}", file=sys.stderr)
            return 1
        print(f"imported {count} models into {target}; set SPENDGATE_PRICING_FILE={target}")
        return 0
    if args.model == "update":
        return _pricing_update(args, settings)
    if args.model == "reload":
        return _admin(args, "POST", "/api/pricing/reload")
    if args.list or args.search is not None:
        return _pricing_list(args, settings)
    try:
        table = price_files.settings_table(settings)
        if args.model is None:  # where the prices come from
            print(orjson.dumps({"sources": table.sources}, option=orjson.OPT_INDENT_2).decode())
            return 0
        quiet = logging.getLogger("spendgate.pricing")  # its "no price" is for the proxy's log
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            price, asked = price_files.lookup(
                table,
                settings,
                args.model,
                route=args.route,
                provider=args.provider,
                local=True if args.local else None,
            )
        finally:
            quiet.setLevel(level)
    except PricingError as exc:
        print(f"spendgate: {exc}", file=sys.stderr)
        return 2
    if price is None:
        print(f"spendgate: no price for {args.model!r} (its cost shows as N/A)", file=sys.stderr)
        return 1
    shown = {**price.to_json(), "query": asked}
    print(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from spendgate.top import run_top

    return run_top(_settings(args))


def cmd_statusline(args: argparse.Namespace) -> int:
    """Claude Code's ``statusLine`` command: one line, exit 0 whatever happens; or
    ``--install`` / ``--uninstall`` of that entry in Claude Code's settings."""
    from spendgate import statusline

    if args.install or args.uninstall:
        from spendgate import claude_settings

        return claude_settings.setup(args.settings, args.install, args.dry_run, args.config)
    if args.dry_run or args.settings:
        print("spendgate: --dry-run and --settings need --install or --uninstall", file=sys.stderr)
        return 2
    return statusline.statusline(
        lambda: _settings(args), args.session, args.template, args.color, args.then
    )


def cmd_status(args: argparse.Namespace) -> int:
    """The status line for shells, tmux and scripts (``--json``)."""
    from spendgate import statusline

    return statusline.status(_settings(args), args.session, args.json, args.template, args.color)


def build_parser() -> argparse.ArgumentParser:
    from spendgate.store import REPORT_BY

    p = argparse.ArgumentParser(prog="spendgate", description="LLM cost proxy")
    p.add_argument("--version", action="version", version=f"spendgate {__version__}")
    p.add_argument("--config", help="TOML settings file (or SPENDGATE_CONFIG)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(
        name: str, fn: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", default=argparse.SUPPRESS, help="TOML settings file")
        sp.add_argument(
            "--db", dest="db_path", default=None, help="SQLite file (SPENDGATE_DB_PATH)"
        )
        sp.set_defaults(func=fn)
        return sp

    sp = add("serve", cmd_serve, "run the proxy")
    sp.add_argument("--host")
    sp.add_argument("--port", type=int)
    sp = add("sessions", cmd_sessions, "list sessions with totals")
    sp.add_argument("--since", help="only those active since: 2026-12-01, 7d, ...")
    sp.add_argument("--format", choices=("table", "json"), default="table")
    sp = add("report", cmd_report, "cost over time across sessions, or a session's report")
    sp.add_argument("session", nargs="?", help="one session (alone: its summary, csv: its rows)")
    sp.add_argument("--since", help="from: 2026-12-01, 2026-12-01T13:00Z, or back from now: 7d")
    sp.add_argument("--until", help="to (exclusive; a date takes in its whole day)")
    sp.add_argument("--by", choices=REPORT_BY, help="group rows (default: day)")
    sp.add_argument("--format", choices=("table", "json", "csv"), default="table")
    sp = add(
        "budget",
        cmd_budget,
        "set a session's, an agent's or the global budget in USD ('none' for unlimited)",
    )
    sp.add_argument("session", nargs="?")
    sp.add_argument("usd", nargs="?")
    sp.add_argument("--agent", help="the budget of this agent inside the session")
    sp.add_argument(
        "--global", dest="global_usd", metavar="USD", help="the budget across all sessions"
    )
    sp = add("label", cmd_label, "set or clear a session's label")
    sp.add_argument("session")
    sp.add_argument("text", nargs="?", help="the label (at most 200 characters)")
    sp.add_argument("--clear", action="store_true", help="remove the label")
    sp = add("prune", cmd_prune, "remove sessions last active before a date")
    sp.add_argument("--before", required=True, help="2026-11-01, 2026-11-01T12:00Z or 90d")
    sp.add_argument("--yes", action="store_true", help="do not ask (needed without a terminal)")
    sp.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    sp = add("resume", cmd_resume, "lift a session's pause")
    sp.add_argument("session")
    sp = add("pause", cmd_pause, "pause a session by hand")
    sp.add_argument("session")
    sp = add(
        "pricing",
        cmd_pricing,
        "a model's price as the proxy charges it; `pricing import FILE`, `pricing update`, "
        "`pricing reload`",
    )
    sp.add_argument("model", nargs="?", help="a model id, or import, update, reload")
    sp.add_argument("file", nargs="?")
    sp.add_argument("--to", help="pricing file to write (default SPENDGATE_PRICING_FILE)")
    sp.add_argument("--route", help="price as on this route (its provider and local flag)")
    sp.add_argument("--provider", help="price as on a route of this provider")
    sp.add_argument("--local", action="store_true", help="price as on a local route")
    sp.add_argument("--list", action="store_true", help="every model id and alias, priced")
    sp.add_argument("--search", metavar="TEXT", help="--list: only ids containing TEXT")
    sp.add_argument("--json", action="store_true", help="--list: as JSON")
    sp.add_argument("--from", dest="source", metavar="URL|FILE", help="update: the table to fetch")
    sp.add_argument("--force", action="store_true", help="update: store a refused table")
    sp.add_argument("--dry-run", action="store_true", help="update: check and report only")
    sp.add_argument("--verbose", action="store_true", help="update: list every change")
    sp.add_argument("--reload", action="store_true", help="update: then reload the proxy")
    add("top", cmd_top, "live terminal view of a running proxy")
    sp = add("statusline", cmd_statusline, "Claude Code's status line (its JSON on stdin)")
    sp.add_argument("--session", help="the session to show (default: session_id on stdin)")
    sp.add_argument("--format", dest="template", metavar="TEMPLATE", help="e.g. '{cost} {state}'")
    sp.add_argument("--color", choices=("auto", "always", "never", "tmux"))
    sp.add_argument("--then", metavar="COMMAND", help="a status line command to show first")
    mode = sp.add_mutually_exclusive_group()
    mode.add_argument("--install", action="store_true", help="add it to Claude Code's settings")
    mode.add_argument("--uninstall", action="store_true", help="put back what was there")
    sp.add_argument("--dry-run", "--diff", dest="dry_run", action="store_true")
    sp.add_argument("--settings", metavar="PATH", help="Claude Code's settings.json")
    sp = add("status", cmd_status, "one status line for shells and tmux, or --json")
    sp.add_argument("session", nargs="?", help="default: the global budget, else the latest")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--format", dest="template", metavar="TEMPLATE")
    sp.add_argument("--color", choices=("auto", "always", "never", "tmux"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "config"):
        args.config = None
    try:
        result: int = args.func(args)
        return result
    except SettingsError as exc:
        print(f"spendgate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _closed_pipe()


def _closed_pipe() -> int:
    """The reader of stdout closed it (``spendgate sessions | head -1``): stop quietly,
    status 0 as for the tables, which rich already writes so (docs/reference.md §11):
    the reader chose to stop reading, nothing failed. What Python still holds for
    stdout would raise again when flushed at exit, so stdout becomes /dev/null first."""
    with suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0
