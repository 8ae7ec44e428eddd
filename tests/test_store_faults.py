"""The store against bad rows, bad files and broken disks (issue #16, items 1, 6-9).

Real files, real SQLite (its own errors: ``max_page_count`` is a full disk to SQLite, a
small tmpfs is a full disk to everyone) and real ``spendgate serve`` processes; the
figures of the issue are the cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from spendgate import journal
from spendgate.records import SessionRecord
from spendgate.store import OP_COLUMNS, SQLiteStore, StoreOpenError, _message_params
from tests.helpers.records import message
from tests.upstream import FakeUpstream, fixture_reply, json_reply

ROOT = os.geteuid() == 0
"""As root, file modes do not stop writes: those cases use a read-only mount instead."""


def rows_in(path: Path, where: str = "") -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        (n,) = db.execute(f"SELECT COUNT(*) FROM token_usage {where}").fetchone()
    return int(n)


def rejected_in(path: Path) -> list[tuple[str, str, dict[str, Any]]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        found = db.execute("SELECT kind, reason, data FROM rejected_rows ORDER BY id").fetchall()
    return [(k, r, json.loads(d)) for k, r, d in found]


def left_files(directory: Path) -> list[str]:
    return sorted(
        p.name for p in directory.iterdir() if ".journal-" in p.name or "recovery" in p.name
    )


# -- one bad row never wedges the writer ------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "kept_as"),
    [(2**63, 2**63), (1e300, 1e300), (float("nan"), "nan"), (-1, -1), (float("inf"), "inf")],
)
async def test_a_bad_usage_number_is_rejected_and_every_other_row_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: Any, kept_as: Any
) -> None:
    """The issue's 12 rows with 2**63 or 1e300 in one: 11 written, 1 in rejected_rows."""
    path = tmp_path / "bad.db"
    counted: list[int] = []
    store = SQLiteStore(path, flush_interval=0.01, on_reject=counted.append)
    await store.open()
    for i in range(12):
        store.add_message(message(id=f"m{i}", input_tokens=bad if i == 5 else 10))
    (tot,) = await store.totals("run-1")
    assert tot["message_count"] == 11 and tot["input_tokens"] == 110
    store.add_message(message(id="later"))  # the next batches are not stuck behind it
    (tot,) = await store.totals("run-1")
    assert tot["message_count"] == 12 and store.queue_depth == 0
    await store.close()
    ((kind, reason, data),) = rejected_in(path)
    assert kind == "message" and data["id"] == "m5" and data["input_tokens"] == kept_as
    assert reason.startswith(("OverflowError", "IntegrityError"))
    assert counted == [1] and store.rejected == 1
    assert "refused 1 rows" in caplog.text and "'m5'" in caplog.text
    assert left_files(tmp_path) == []  # nothing left to import


async def test_a_refused_session_row_is_rejected_and_the_rest_written(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path, flush_interval=60)
    await store.open()
    store.save_session(SessionRecord("ok-1", 1.0))
    store.save_session(SessionRecord("broken", float("nan")))  # NaN is NULL: NOT NULL
    store.save_session(SessionRecord("ok-2", 2.0))
    store.add_message(message(id="m1"))
    await store.flush()
    assert sorted(s.id for s in await store.load_sessions()) == ["ok-1", "ok-2"]
    await store.close()
    ((kind, reason, data),) = rejected_in(path)
    assert (kind, data["id"], data["created_at"]) == ("session", "broken", "nan")
    assert "NOT NULL" in reason and rows_in(path) == 1


async def test_sigterm_with_a_bad_row_queued_keeps_all_twelve(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The issue: 2**63 in one of 12 responses, then SIGTERM: 1 of 12 rows reached disk."""
    good = fixture_reply("openai/chat_json_gpt-3.5-turbo.json")
    usage = {"prompt_tokens": 2**63, "completion_tokens": 1, "total_tokens": 2**63 + 1}
    bad = json_reply({"id": "x", "object": "chat.completion", "model": "gpt-3.5-turbo",
                      "choices": [], "usage": usage})  # fmt: skip
    upstream.queue(*([good] * 5), bad, *([good] * 6))
    async with serving(upstream, tmp_path / "t.db", 60_000, tmp_path) as proc:
        for _ in range(12):
            assert (await post(proc.port))[0] == 200
        proc.popen.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.popen.wait, 15) == 0
    stored, rejected = rows_in(proc.db), rejected_in(proc.db)
    assert stored + len(rejected) == 12 and stored >= 11
    assert "Traceback" not in proc.stderr()


# -- start-up against a bad database -----------------------------------------------------


def spendgate_db(path: Path, rows: int = 2000) -> Path:
    """A real spendgate database with enough rows to span many pages."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE t (x BLOB)")
        db.executemany("INSERT INTO t VALUES (?)", [(os.urandom(400),) for _ in range(rows)])
        db.commit()
    return path


def garble(path: Path, every: int) -> None:
    """Overwrite the start of every ``every``-th page after the first few."""
    data = bytearray(path.read_bytes())
    for at in range(4096 * 3, len(data), 4096 * every):
        data[at : at + 64] = os.urandom(64)
    path.write_bytes(bytes(data))


@contextlib.contextmanager
def read_only_mount(base: Path) -> Iterator[Path]:
    """A tmpfs mounted read-only (a read-only file or mount, even for root)."""
    mnt = base / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                      capture_output=True).returncode:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here")
    try:
        spendgate_db(mnt / "ro.db", rows=10)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt / "ro.db"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def bad_file(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.db"
    if case == "text":
        path.write_text("spendgate: not a database\n" * 10)
    elif case == "truncated":
        data = spendgate_db(path).read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif case == "damaged":
        garble(spendgate_db(path), every=7)
    elif case == "directory":
        path.mkdir()
    elif case == "read-only file":
        spendgate_db(path, rows=1).chmod(0o444)
    elif case == "read-only directory":
        path.parent.joinpath("ro-dir").mkdir()
        path = path.parent / "ro-dir" / "x.db"
        spendgate_db(path, rows=1)
        path.parent.chmod(0o555)
    return path


PROBLEMS = {
    "text": "not a SQLite database",
    "truncated": "damaged",
    "damaged": "damaged",
    "directory": "is a directory",
    "read-only file": "cannot be written",
    "read-only directory": "cannot be written",
}


@pytest.mark.parametrize("case", list(PROBLEMS))
async def test_a_bad_database_fails_the_open_at_once_saying_why(tmp_path: Path, case: str) -> None:
    if ROOT and case.startswith("read-only"):
        pytest.skip("root writes whatever the mode says (the read-only mount case covers it)")
    path = bad_file(tmp_path, case)
    started = time.monotonic()
    with pytest.raises(StoreOpenError) as caught:
        await SQLiteStore(path).open()
    assert time.monotonic() - started < 3
    assert str(path) in str(caught.value) and PROBLEMS[case] in str(caught.value)
    assert "\n" not in str(caught.value)


async def test_quick_check_is_bounded_in_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file too big to check in QUICK_CHECK_S (here: no time at all) still opens, and
    the log says it was not checked in full."""
    import spendgate.store

    path = tmp_path / "big.db"
    store = SQLiteStore(path)
    await store.open(start_writer=False)
    for i in range(3000):
        store.add_message(message(id=f"m{i}"))
    await store.flush()
    await store.close()
    monkeypatch.setattr(spendgate.store, "QUICK_CHECK_S", 0.0)
    again = SQLiteStore(path)
    await again.open()
    await again.close()
    assert "quick_check stopped after 0 s" in caplog.text


def test_read_only_file_and_directory_refuse_an_unprivileged_user(tmp_path: Path) -> None:
    """Root writes whatever the mode says, so as root the modes are tried by an
    unprivileged user (``setpriv``), on files in a directory that user can reach."""
    if not ROOT or shutil.which("setpriv") is None:
        pytest.skip("the in-process cases cover this when not root")
    base = Path(tempfile.mkdtemp(prefix="spendgate-modes-"))
    try:
        base.chmod(0o755)
        read_only = spendgate_db(base / "ro.db", rows=1)
        (base / "ro-dir").mkdir()
        in_read_only = spendgate_db(base / "ro-dir" / "x.db", rows=1)
        for path in (base / "ro-dir", in_read_only, read_only):
            os.chown(path, 65534, 65534)
        read_only.chmod(0o444)
        (base / "ro-dir").chmod(0o555)
        script = (
            "import asyncio, sys\n"
            "from pathlib import Path\n"
            "from spendgate.store import SQLiteStore, StoreOpenError\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n"
            "        asyncio.run(SQLiteStore(Path(p)).open())\n"
            "    except StoreOpenError as exc:\n"
            "        print(exc)\n"
        )
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-c", script, str(read_only), str(in_read_only)],
            capture_output=True, text=True, timeout=30, env={**os.environ, "HOME": str(base)},
        )  # fmt: skip
        if done.returncode and "Permission denied" in done.stderr:
            pytest.skip(f"the unprivileged user cannot run this Python: {done.stderr[-200:]}")
        first, second = done.stdout.splitlines()
        assert (
            first
            == f"{read_only}: it cannot be written: the file is read-only for this user (mode 444)"
        )
        assert second.startswith(
            f"{in_read_only}: its directory {base / 'ro-dir'} cannot be written"
        )
        assert "(mode 555)" in second
    finally:
        (base / "ro-dir").chmod(0o755)
        shutil.rmtree(base)


async def test_a_read_only_mount_fails_the_open_saying_why(tmp_path: Path) -> None:
    if not ROOT:
        pytest.skip("mounting needs root")
    with read_only_mount(tmp_path) as path:
        with pytest.raises(StoreOpenError, match="read-only file system"):
            await SQLiteStore(path).open()


def hold_lock(path: Path, wal: bool) -> subprocess.Popen[str]:
    """Another process holding the database's lock until killed."""
    script = (
        "import sqlite3, sys, time\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        + (
            "db.execute('PRAGMA journal_mode=WAL'); db.execute('PRAGMA locking_mode=EXCLUSIVE')\n"
            "db.execute('BEGIN IMMEDIATE'); db.execute('CREATE TABLE IF NOT EXISTS h (x)')\n"
            if wal
            else "db.execute('BEGIN EXCLUSIVE'); db.execute('CREATE TABLE IF NOT EXISTS h (x)')\n"
        )
        + "print('held', flush=True)\ntime.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


async def test_a_database_locked_by_another_process_fails_the_open_in_time(
    tmp_path: Path,
) -> None:
    """Held by another process: in a transaction (rollback journal), or in WAL mode with
    ``locking_mode=EXCLUSIVE`` (the 2 s of ``spendgate serve`` shortened here)."""
    paths = [spendgate_db(tmp_path / f"locked-{wal}.db", rows=1) for wal in (False, True)]
    holders = [hold_lock(p, wal) for p, wal in zip(paths, (False, True), strict=True)]

    async def opened(path: Path) -> tuple[str, float]:
        started = time.monotonic()
        with pytest.raises(StoreOpenError) as caught:
            await SQLiteStore(path, lock_wait=0.3).open()
        return str(caught.value), time.monotonic() - started

    try:
        results = await asyncio.gather(*(opened(p) for p in paths))
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    for text, took in results:
        assert "held it locked for more than 0.3 s" in text and took < 2, (text, took)


async def run_serve(db: Path, *, stop_after: float | None = None, sig: int = signal.SIGTERM,
                    ) -> tuple[int | None, float, str]:  # fmt: skip
    """``spendgate serve`` on ``db`` until it exits (or ``sig`` after ``stop_after`` s):
    its status, the seconds it took (from the signal, if sent), and its stderr."""
    env = {**os.environ, "SPENDGATE_PORT": str(free_port()), "SPENDGATE_DB_PATH": str(db)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spendgate", "serve", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    await proc.stdout.readline()  # the "spendgate ... on http://..." line: run_app is next
    started = time.monotonic()
    if stop_after is not None:
        await asyncio.sleep(stop_after)
        proc.send_signal(sig)
        started = time.monotonic()
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    except TimeoutError:
        proc.kill()
        raise
    return proc.returncode, time.monotonic() - started, err.decode()


async def test_serve_against_a_bad_database_says_one_line_and_exits_non_zero(
    tmp_path: Path,
) -> None:
    """The issue: a 43-line traceback, never listening, deaf to SIGTERM. Here ``spendgate
    serve`` exits non-zero within 5 s with one line naming the file and the problem (a
    text file; a database another process holds locked), and a SIGTERM or SIGINT while
    start-up waits for that lock ends it at once. The four processes run at once."""
    text = bad_file(tmp_path, "text")
    locked = spendgate_db(tmp_path / "locked.db", rows=1)
    holder = hold_lock(locked, wal=False)
    try:
        results = await asyncio.gather(
            run_serve(text),
            run_serve(locked),
            run_serve(locked, stop_after=0.5, sig=signal.SIGTERM),
            run_serve(locked, stop_after=0.5, sig=signal.SIGINT),
        )
    finally:
        holder.kill()
        holder.wait()
    (s1, t1, e1), (s2, t2, e2), (s3, t3, e3), (s4, t4, e4) = results
    for path, status, took, err in ((text, s1, t1, e1), (locked, s2, t2, e2)):
        assert status == 1 and took < 5, (status, took, err)
        (line,) = err.splitlines()
        assert line.startswith(f"spendgate: cannot use the database {path}: "), line
    assert "not a SQLite database" in e1 and "held it locked" in e2
    for status, took, err in ((s3, t3, e3), (s4, t4, e4)):  # from the signal to the exit
        assert status is not None and took < 1, (status, took, err)
        assert "Traceback" not in err


# -- disk full and I/O errors while running ------------------------------------------------


async def fill_up(store: SQLiteStore) -> None:
    """A full disk, as SQLite sees it: no page beyond those the file has now."""
    async with store.db.execute("PRAGMA page_count") as cur:
        row = await cur.fetchone()
    assert row is not None
    await store.db.execute(f"PRAGMA max_page_count = {row[0]}")


async def test_a_full_database_keeps_rows_answers_reads_and_saves_them_at_shutdown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue: 50 of 51 rows lost at SIGTERM with the disk full, no log line, reads
    stalled for more than 20 s."""
    caplog.set_level(logging.INFO, "spendgate.store")
    path = tmp_path / "full.db"
    errors: list[int] = []
    store = SQLiteStore(path, flush_interval=0.01, on_error=errors.append)
    await store.open()
    store.add_message(message(id="before"))
    await store.flush()
    await fill_up(store)
    for i in range(51):
        store.add_message(message(id=f"m{i}", error="x" * 2000))  # needs new pages
    await asyncio.sleep(0.1)
    assert store.failing is not None and "full" in store.failing and errors
    for _ in range(3):
        started = time.monotonic()
        (tot,) = await store.totals("run-1")
        assert time.monotonic() - started < 1 and tot["message_count"] == 1
    assert store.queue_depth == 51
    assert "51 writes queued (51 message rows" in caplog.text
    await store.close()
    recovery, _ = journal.recovery_paths(path)
    assert recovery.exists() and left_files(tmp_path) == [recovery.name]
    assert "51 writes (51 message rows) could not be written" in caplog.text
    assert str(recovery) in caplog.text
    caplog.clear()

    again = SQLiteStore(path)  # the next start imports them
    await again.open()
    (tot,) = await again.totals("run-1")
    assert tot["message_count"] == 52
    await again.close()
    assert "importing 51 writes (51 message rows)" in caplog.text
    assert "51 new message rows, 0 already stored, 0 rejected" in caplog.text
    assert left_files(tmp_path) == []


@contextlib.contextmanager
def small_tmpfs(base: Path, size: str) -> Iterator[Path]:
    mnt = base / "small"
    mnt.mkdir()
    if (
        not ROOT
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_a_really_full_disk_loses_nothing_without_saying_so(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A 1 MiB tmpfs, filled up while serving: reads stay fast; at SIGTERM with the disk
    still full every row is accounted for: in the database, in the journal the next
    start imports, or counted as lost in the log."""
    upstream.default = fixture_reply("openai/chat_json_gpt-3.5-turbo.json")
    with small_tmpfs(tmp_path, "1m") as disk:
        db = disk / "spendgate.db"
        async with serving(upstream, db, 20, tmp_path) as proc:
            for _ in range(10):
                await post(proc.port)
            await wait_for_rows(proc, 10)
            with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 65536)
            sent = 10
            for _ in range(40):
                status, _ = await post(proc.port)
                sent += status == 200
            async with aiohttp.ClientSession() as http:
                for _ in range(3):
                    started = time.monotonic()
                    async with http.get(proc.url("/api/sessions/disk/cost")) as r:
                        assert r.status == 200
                    assert time.monotonic() - started < 1
            proc.popen.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.popen.wait, 30) == 0
        err = proc.stderr()
        assert "Traceback" not in err
        lost = 0
        for line in err.splitlines():
            if "are lost" in line:
                lost += int(line.rsplit("; ", 1)[1].split()[0])
        (disk / "filler").unlink()
        async with serving(upstream, db, 20, tmp_path) as again:
            await wait_for_rows(again, sent - lost)
            again.popen.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(again.popen.wait, 30) == 0
        assert rows_in(db) == sent - lost, err  # every row stored, or counted as lost
        if not lost:  # the recovery file (beside the database, else in the temp directory)
            assert f"{sent - 10} writes ({sent - 10} message rows) could not be written" in err
            assert f"{sent - 10} new message rows" in again.stderr()


# -- durable before the client's last byte -------------------------------------------------


async def test_sigkill_right_after_the_responses_loses_no_row(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The issue: 31 requests that had returned 200 lost their rows to kill -9 (the
    batching window). The writer here never commits by itself (60 s interval): only
    the journal can have them."""
    json_ok = fixture_reply("openai/chat_json_gpt-3.5-turbo.json")
    streamed = fixture_reply("openai/chat_stream_usage_gpt-4.sse")
    upstream.queue(*([json_ok, streamed] * 40))
    async with serving(upstream, tmp_path / "k.db", 60_000, tmp_path) as proc:
        results = await asyncio.gather(*(post(proc.port, stream=i % 2 == 1) for i in range(80)))
        assert [s for s, _ in results] == [200] * 80
        proc.popen.kill()  # at once, the moment the last response is read
        await asyncio.to_thread(proc.popen.wait, 10)
    assert rows_in(proc.db) < 80  # the writer had not committed them
    store = SQLiteStore(proc.db)
    await store.open()
    (tot,) = await store.totals("disk")
    await store.close()
    assert tot["message_count"] == 80


# -- the database file deleted or replaced while running -----------------------------------


async def watched(path: Path, rows: int) -> SQLiteStore:
    """A store checking its file every 0.1 s, with ``rows`` rows m0… committed."""
    store = SQLiteStore(path, flush_interval=0.02, watch_interval=0.1)
    await store.open()
    for i in range(rows):
        store.add_message(message(id=f"m{i}"))
    await store.flush()
    return store


@pytest.mark.parametrize("removed", [("",), ("", "-wal", "-shm")])
async def test_a_deleted_database_is_recreated_with_every_row(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, removed: tuple[str, ...]
) -> None:
    """The issue: deleting the file went unnoticed and all history was gone at the next
    start. Here the file comes back within a few seconds, holding every row."""
    path = tmp_path / "gone.db"
    store = await watched(path, 20)
    store.save_session(SessionRecord("run-1", 1.0))
    for suffix in removed:
        path.with_name(path.name + suffix).unlink()
    for i in range(20, 25):
        store.add_message(message(id=f"m{i}"))
    await eventually_true(lambda: path.exists() and rows_in(path) == 25, 5)
    assert "was deleted while spendgate was running" in caplog.text
    (tot,) = await store.totals("run-1")
    assert tot["message_count"] == 25
    store.add_message(message(id="after"))
    await store.close()
    assert rows_in(path) == 26
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA quick_check").fetchone() == ("ok",)
        assert db.execute("SELECT id FROM sessions").fetchall() == [("run-1",)]


async def test_a_replaced_database_gets_the_rows_of_the_one_it_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "db.db"
    store = await watched(path, 10)
    other = SQLiteStore(tmp_path / "other.db", flush_interval=60)
    await other.open(start_writer=False)
    for i in range(3):
        other.add_message(message(id=f"other{i}", session_id="restored"))
    await other.flush()
    await other.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "other.db")) as db:
        db.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
    os.replace(tmp_path / "other.db", path)  # a backup put back while running
    store.add_message(message(id="m10"))
    # Nothing else may open the path before the store has let go of the old file's -wal:
    # SQLite would read that WAL as the new file's.
    await eventually_true(lambda: "holds the rows of the lost file too" in caplog.text, 5)
    assert "was replaced by another file" in caplog.text
    await store.flush()
    assert rows_in(path) == 14
    (tot,) = await store.totals("run-1")
    assert tot["message_count"] == 11
    await store.close()
    assert rows_in(path, "WHERE session_id = 'restored'") == 3


async def test_a_garbage_file_put_in_its_place_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "db.db"
    store = await watched(path, 1)
    replacement = tmp_path / "junk"
    replacement.write_text("junk\n" * 100)
    os.replace(replacement, path)
    await eventually_true(lambda: "recreated with every row" in caplog.text, 5)
    assert "the file now there is unusable (it is not a SQLite database" in caplog.text
    await store.close()
    assert rows_in(path) == 1
    assert [p.read_text()[:5] for p in tmp_path.glob("db.db.replaced-*")] == ["junk\n"]


# -- the journal itself --------------------------------------------------------------------


async def test_the_journal_is_emptied_as_rows_are_committed(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    store = SQLiteStore(path, flush_interval=60)
    await store.open()
    (segment,) = tmp_path.glob("j.db.journal-*.jsonl")
    head = segment.stat().st_size
    store.add_message(message(id="m1"))
    assert segment.stat().st_size > head  # on disk before any commit
    await store.flush()
    assert segment.stat().st_size == head
    await store.close()
    assert left_files(tmp_path) == []


async def test_an_empty_journal_left_behind_is_deleted_without_a_word(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The common case after a kill: the writer had caught up, the segment holds only
    its header."""
    path = tmp_path / "e.db"
    (tmp_path / "e.db.journal-dead-0001.jsonl").write_bytes(journal.header(OP_COLUMNS))
    store = SQLiteStore(path)
    await store.open()
    assert [p.name for p in tmp_path.glob("*dead*")] == [] and "importing" not in caplog.text
    await store.close()


async def test_a_live_process_journal_is_not_imported_by_another(tmp_path: Path) -> None:
    path = tmp_path / "two.db"
    first = SQLiteStore(path, flush_interval=60)
    await first.open()
    first.add_message(message(id="first"))
    second = SQLiteStore(path, flush_interval=60)
    await second.open()  # a second proxy on the same file
    assert rows_in(path) == 0  # the first one's row is still the first one's
    await second.close()
    await first.close()
    assert rows_in(path) == 1 and left_files(tmp_path) == []


async def test_an_older_journal_is_imported_by_column_name(tmp_path: Path) -> None:
    """A journal written by a version without the ``note`` column: the row gets the
    column's default, the columns it does name keep their values."""
    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    await store.open(start_writer=False)
    await store.close()
    cols = [c for c in OP_COLUMNS["message"] if c != "note"]
    full = dict(zip(OP_COLUMNS["message"], _message_params(message(id="old")), strict=True))
    line = orjson.dumps(["message", [full[c] for c in cols]])
    head = journal.header({"message": cols})
    (tmp_path / "old.db.journal-dead-0001.jsonl").write_bytes(head + line + b"\n" + b'["mess')
    again = SQLiteStore(path)
    await again.open()
    latest = await again.latest_message("run-1")
    await again.close()
    assert latest is not None and latest.id == "old" and latest.input_tokens == 1200
    assert latest.note is None and left_files(tmp_path) == []


# -- helpers: a real ``spendgate serve`` ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serving:
    def __init__(self, popen: subprocess.Popen[bytes], port: int, db: Path, err: Path) -> None:
        self.popen, self.port, self.db, self._err = popen, port, db, err

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stderr(self) -> str:
        return self._err.read_text()


@contextlib.asynccontextmanager
async def serving(
    upstream: FakeUpstream, db: Path, flush_ms: int, logs: Path
) -> AsyncIterator[Serving]:
    port = free_port()
    env = {
        **os.environ,
        "SPENDGATE_PORT": str(port),
        "SPENDGATE_DB_PATH": str(db),
        "SPENDGATE_OPENAI_BASE_URL": upstream.base_url,  # type: ignore[attr-defined]
        "SPENDGATE_FLUSH_INTERVAL_MS": str(flush_ms),
    }
    err = logs / f"serve-{port}.err"
    with open(err, "wb") as err_file:
        popen = subprocess.Popen(
            [sys.executable, "-m", "spendgate", "serve"],
            env=env, stdout=subprocess.DEVNULL, stderr=err_file,
        )  # fmt: skip
    served = Serving(popen, port, db, err)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(served.url("/healthz")) as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.03)
            else:
                raise AssertionError(f"spendgate serve did not start: {served.stderr()}")
        yield served
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.wait(10)


async def post(port: int, stream: bool = False) -> tuple[int, bytes]:
    body: dict[str, Any] = {
        "model": "gpt-3.5-turbo",
        "messages": [{"role": "user", "content": "x"}],
    }
    if stream:
        body["stream"] = True
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"http://127.0.0.1:{port}/s/disk/openai/v1/chat/completions", json=body
        ) as r:
            return r.status, await r.read()


async def wait_for_rows(proc: Serving, n: int) -> None:
    await eventually_true(lambda: rows_in_or_zero(proc.db) >= n, 10)


def rows_in_or_zero(path: Path) -> int:
    try:
        return rows_in(path)
    except sqlite3.Error:
        return 0


async def eventually_true(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except sqlite3.Error:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)
