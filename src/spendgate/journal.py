"""The store's write-ahead journal and recovery file (docs/reference.md §5 "Durability").

Every write the store queues is appended to the journal as one JSON line when it is
queued, before the response that made it sends its last byte. Once the database has
committed a write, its line is no longer needed: a segment whose writes are all done is
deleted, and the segment being written is truncated back to its header whenever the
writer has caught up. A process that dies without closing the store (SIGKILL, a crash,
the OOM killer) leaves its segments behind, and the next start imports them.

"Durable" means: survives the death of the process. A ``write()`` puts the line in the
kernel's page cache, which outlives the process; lines are not fsynced, so a power loss
or a kernel crash can lose the last ones (as it can lose SQLite's last commits at
``synchronous=NORMAL``). That is out of scope.

The recovery file is where, at shutdown, the writes the database refused to take (full
disk, I/O errors) go; it is fsynced. Both are JSON lines: a header line naming each
operation's columns (so a later version can import an older file by name), then one
``[op, [values...]]`` line per write. Each file is held with ``flock`` by the process
writing it, so a start only imports files no live process owns (two proxies may share
a database).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("spendgate.store")

SEGMENT_BYTES = 8 << 20
"""A segment is closed and a new one started past this size; a closed segment is
deleted once every write in it is committed."""
FILE_MODE = 0o600
"""The rows hold session ids and key fingerprints: readable by the owner only."""


def encode(op: str, values: Sequence[Any]) -> bytes:
    """One journal line. orjson for speed; the standard library for what orjson refuses
    (integers beyond 64 bits: a bad usage number must still reach the journal, and then
    ``rejected_rows``). orjson writes NaN and infinities as null, which the database
    refuses just the same."""
    try:
        return orjson.dumps((op, values), option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return (json.dumps([op, list(values)], default=repr) + "\n").encode()


def decode(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return json.loads(line)  # what ``encode`` wrote with the standard library


def header(columns: Mapping[str, Sequence[str]]) -> bytes:
    return orjson.dumps(
        {"spendgate": "journal", "version": 1, "columns": columns},
        option=orjson.OPT_APPEND_NEWLINE,
    )


def jsonable(value: Any) -> Any:
    """A value as it can stand in a JSON document (``rejected_rows.data``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


@dataclass
class Entry:
    """One write read back from a journal or recovery file."""

    op: str
    columns: Sequence[str]
    values: Sequence[Any]


@dataclass
class Found:
    """A journal or recovery file no live process holds: its writes, and its lock."""

    path: Path
    fd: int
    entries: list[Entry]
    bad_lines: int


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(path: Path, fd: int) -> bool:
    try:
        st, own = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def recovery_paths(db_path: Path) -> tuple[Path, Path]:
    """Where the recovery file goes: beside the database, else (that directory full or
    unwritable) in the temporary directory, under a name taken from the database's path."""
    digest = hashlib.sha256(str(db_path.resolve()).encode()).hexdigest()[:16]
    fallback = Path(tempfile.gettempdir()) / f"spendgate-{digest}.recovery.jsonl"
    return db_path.with_name(db_path.name + ".recovery.jsonl"), fallback


def _candidates(db_path: Path) -> list[Path]:
    found = [*db_path.parent.glob(f"{_glob_escape(db_path.name)}.journal-*.jsonl")]
    found.extend(p for p in recovery_paths(db_path) if p.exists())

    def age(p: Path) -> tuple[int, str]:
        try:
            return p.stat().st_mtime_ns, p.name
        except OSError:
            return 0, p.name

    return sorted(set(found), key=age)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def read_entries(fd: int) -> tuple[list[Entry], int]:
    """Every write in a file, and how many lines could not be read (a line cut short by
    a full disk or a kill in the middle of a write, or garbage)."""
    entries: list[Entry] = []
    bad = 0
    columns: Mapping[str, Sequence[str]] = {}
    os.lseek(fd, 0, os.SEEK_SET)
    with os.fdopen(os.dup(fd), "rb") as f:
        for raw in f:
            line = raw.strip()
            if not line:
                continue
            try:
                item = decode(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(item, dict) and item.get("spendgate") == "journal":
                columns = item.get("columns") or {}
                continue
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[1], list)
                or item[0] not in columns
            ):
                bad += 1
                continue
            entries.append(Entry(item[0], columns[item[0]], item[1]))
    return entries, bad


def orphans(db_path: Path) -> list[Found]:
    """The journals and recovery files of ``db_path`` that no live process holds, oldest
    first, each locked by this process from now on (release with :func:`discard`)."""
    out: list[Found] = []
    for path in _candidates(db_path):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        if not _lock(fd):
            os.close(fd)  # a running process's own journal
            continue
        try:
            entries, bad = read_entries(fd)
        except BaseException:
            os.close(fd)
            raise
        out.append(Found(path, fd, entries, bad))
    return out


def in_use(db_path: Path) -> bool:
    """Does a live process (a running ``spendgate serve``) hold a journal of ``db_path``?
    Commands that change the file behind a proxy's back ask this first."""
    for path in _candidates(db_path):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if not _lock(fd):
                return True
        finally:
            os.close(fd)  # closing lets go of a lock this process took
    return False


def discard(path: Path, fd: int) -> None:
    """Delete a file this process holds (its writes are all done) and let go of it."""
    if _same_file(path, fd):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    os.close(fd)


def save_recovery(db_path: Path, head: bytes, lines: Iterable[bytes]) -> Path:
    """Append ``lines`` to the recovery file, fsynced; returns where they went. Raises
    OSError (naming both places) if neither place can take them."""
    body = head + b"".join(lines)
    errors = []
    for path in recovery_paths(db_path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror}")
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as exc:
                os.ftruncate(fd, size)  # no half a file: the other place gets it whole
                if not size:
                    path.unlink()
                errors.append(f"{path}: {exc.strerror}")
                continue
            return path
        finally:
            os.close(fd)
    raise OSError("; ".join(errors))


@dataclass
class _Segment:
    path: Path
    fd: int
    last: int = 0
    """The index of the last write appended to it (0: none yet)."""
    size: int = 0


class Journal:
    """This process's journal segments beside the database (created at once; OSError if
    the directory cannot take them)."""

    def __init__(
        self,
        db_path: Path,
        columns: Mapping[str, Sequence[str]],
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        self._dir = db_path.parent
        self._prefix = f"{db_path.name}.journal-{os.urandom(4).hex()}-"
        self._header = header(columns)
        self._segment_bytes = segment_bytes
        self._number = 0
        self._segments: list[_Segment] = []
        self._torn = False
        """The last append was cut short: the next line starts on a fresh line."""
        self.failures = 0
        """Appends that failed (each such write is only in memory until committed)."""
        self.last_error: str | None = None
        self._current: _Segment | None = self._open_segment()

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self._segments]

    def _open_segment(self) -> _Segment:
        self._number += 1
        path = self._dir / f"{self._prefix}{self._number:04d}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, FILE_MODE)
        try:
            _lock(fd)
            os.write(fd, self._header)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        seg = _Segment(path, fd, 0, len(self._header))
        self._segments.append(seg)
        self._torn = False
        return seg

    def append(self, index: int, line: bytes) -> bool:
        """Append write number ``index``; False if it could not be (full disk, I/O
        error: counted, and logged by the store)."""
        seg = self._current
        try:
            if seg is None:  # the last segment could not be started: try again
                seg = self._current = self._open_segment()
            if self._torn:
                line = b"\n" + line
            written = os.write(seg.fd, line)
        except OSError as exc:
            self._failed(exc.strerror or str(exc))
            return False
        seg.size += written
        if written != len(line):
            self._torn = True
            self._failed("short write")
            return False
        self._torn = False
        seg.last = index
        if seg.size >= self._segment_bytes:
            self._rotate()
        return True

    def _failed(self, why: str) -> None:
        self.failures += 1
        self.last_error = why

    def _rotate(self) -> None:
        try:
            self._current = self._open_segment()
        except OSError as exc:
            self._current = None  # the next append tries again
            self._failed(exc.strerror or str(exc))

    def adopt(self, found: Found, last: int) -> None:
        """Take over a file left behind (its writes are queued up to index ``last``): it
        is deleted with the segments once they are all done."""
        self._segments.insert(0, _Segment(found.path, found.fd, last, 1 << 62))

    def release(self, done: int) -> None:
        """Every write up to index ``done`` is committed (or rejected, or dropped)."""
        current = self._current
        keep = []
        for seg in self._segments:
            if seg is current:
                if seg.last <= done and seg.size > len(self._header):
                    with contextlib.suppress(OSError):  # a full disk cannot stop a truncate
                        os.ftruncate(seg.fd, len(self._header))
                        seg.size = len(self._header)
                        self._torn = False
                keep.append(seg)
            elif seg.last <= done:
                discard(seg.path, seg.fd)
            else:
                keep.append(seg)
        self._segments = keep

    def intact(self) -> bool:
        """Is the segment being written still at its path (not deleted or replaced)?"""
        return self._current is None or _same_file(self._current.path, self._current.fd)

    def restart(self, pending: Iterable[tuple[int, bytes]]) -> bool:
        """The segments were deleted under us: a new one with every write not yet done.
        Returns whether all of them could be written."""
        for seg in self._segments:
            discard(seg.path, seg.fd)  # (only if still ours: a file now at the path is not)
        self._segments = []
        try:
            self._current = self._open_segment()
        except OSError as exc:
            self._current = None
            self._failed(exc.strerror or str(exc))
            return False
        return all([self.append(index, line) for index, line in pending])

    def close(self, delete: bool) -> list[Path]:
        """Let go of every segment, deleting them if ``delete`` (all their writes are
        done or saved elsewhere); returns the paths of those kept."""
        kept = []
        for seg in self._segments:
            if delete:
                discard(seg.path, seg.fd)
            else:
                kept.append(seg.path)
                os.close(seg.fd)
        self._segments = []
        self._current = None
        return kept


def entries_lines(items: Iterable[tuple[str, Sequence[Any]]]) -> Iterator[bytes]:
    for op, values in items:
        yield encode(op, values)
