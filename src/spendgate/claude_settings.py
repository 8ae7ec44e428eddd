"""Installing spendgate's status line in Claude Code: ``spendgate statusline --install`` /
``--uninstall`` edit the ``statusLine`` entry of Claude Code's ``settings.json``
(docs/reference.md §11).

Minimal text edits, never a re-serialization: every byte of the user's other settings
stays as it was, an existing status line command is chained (``--then``), a backup is
written before every change, and uninstalling restores the file exactly.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEY = "statusLine"
INSTALL_BACKUP = ".before-spendgate-install"
UNINSTALL_BACKUP = ".before-spendgate-uninstall"


class SetupError(Exception):
    """The settings file cannot be edited safely; the text says why."""


def claude_settings(given: str | None) -> Path:
    """``--settings``, else ``$CLAUDE_CONFIG_DIR/settings.json``, else
    ``~/.claude/settings.json``."""
    if given:
        return Path(given).expanduser()
    base = os.environ.get("CLAUDE_CONFIG_DIR")
    return (Path(base).expanduser() if base else Path.home() / ".claude") / "settings.json"


@dataclass(frozen=True, slots=True)
class _Member:
    key: str
    key_start: int
    value_start: int
    value_end: int
    value: Any


_DECODER = json.JSONDecoder()
_WS = " \t\r\n"


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _members(text: str, start: int) -> tuple[list[_Member], int, int]:
    """The members of the JSON object at ``text[start:]`` with their exact spans, and the
    positions of its braces. The text is valid JSON already (checked by the caller)."""
    i = _skip(text, start)
    opening = i
    i = _skip(text, i + 1)
    out: list[_Member] = []
    if text[i] == "}":
        return out, opening, i
    while True:
        key, j = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
        vs = _skip(text, _skip(text, j) + 1)
        value, ve = _DECODER.raw_decode(text, vs)
        out.append(_Member(key, i, vs, ve, value))
        k = _skip(text, ve)
        if text[k] == "}":
            return out, opening, k
        i = _skip(text, k + 1)


def _find(members: list[_Member], key: str) -> _Member | None:
    found = [m for m in members if m.key == key]
    return found[-1] if found else None  # JSON's last duplicate wins


def _parse(text: str) -> tuple[str, str, list[_Member], int, int]:
    """(BOM, body, members, opening brace, closing brace) of a settings file's text."""
    bom = "\ufeff" if text.startswith("\ufeff") else ""
    body = text[len(bom) :]
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise SetupError(f"not valid JSON ({exc}); fix or move it first") from None
    if not isinstance(data, dict):
        raise SetupError("not a JSON object")
    members, opening, closing = _members(body, 0)
    return bom, body, members, opening, closing


def _dumps(value: Any, indent: str | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _tokens(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:
        return []


def is_ours(command: str) -> bool:
    tokens = _tokens(command)
    return len(tokens) >= 2 and Path(tokens[0]).stem == "spendgate" and tokens[1] == "statusline"


def _then_of(command: str) -> tuple[str, str | None]:
    """Our installed command without its ``--then``, and the chained command."""
    tokens = _tokens(command)
    for i, tok in enumerate(tokens):
        if tok == "--then" and i + 1 < len(tokens):
            return shlex.join(tokens[:i] + tokens[i + 2 :]), tokens[i + 1]
        if tok.startswith("--then="):
            return shlex.join(tokens[:i] + tokens[i + 1 :]), tok[len("--then=") :]
    return command, None


def _command_member(body: str, entry: _Member) -> _Member:
    """The ``command`` member of a ``statusLine`` entry that runs a command."""
    if isinstance(entry.value, dict) and entry.value.get("type", "command") == "command":
        inner = _find(_members(body, entry.value_start)[0], "command")
        if inner is not None and isinstance(inner.value, str):
            return inner
    raise SetupError(f"its {KEY} is not a command entry; change it by hand")


def new_file(command: str) -> str:
    """The whole settings file install writes where there was none."""
    return _dumps({KEY: {"type": "command", "command": command}}, "  ") + "\n"


def plan_install(text: str | None, command: str) -> str:
    """The settings text with spendgate's ``statusLine`` entry (``command``): added after
    the last member, in the file's own indentation and line endings; or, when a command is
    there, that command chained with ``--then`` (only the ``command`` string changes). Every
    other byte stays as it was; already installed, the text is returned unchanged."""
    if text is None or not text.strip():
        return new_file(command)
    bom, body, members, opening, closing = _parse(text)
    entry = _find(members, KEY)
    if entry is not None:
        inner = _command_member(body, entry)
        if is_ours(inner.value):
            return text
        chained = f"{command} --then {shlex.quote(inner.value)}"
        return bom + body[: inner.value_start] + _dumps(chained) + body[inner.value_end :]
    value = {"type": "command", "command": command}
    newline = "\r\n" if "\r\n" in body else "\n"
    if not members:
        member = f"{newline}  {_dumps(KEY)}: " + _dumps(value, "  ").replace("\n", newline + "  ")
        return bom + body[: opening + 1] + member + newline + body[closing:]
    before_first = body[opening + 1 : members[0].key_start]
    if "\n" in before_first:
        indent = before_first.rsplit("\n", 1)[1]
        text_value = _dumps(value, indent).replace("\n", newline + indent)
        member = f",{newline}{indent}{_dumps(KEY)}: {text_value}"
    else:
        member = f", {_dumps(KEY)}: {_dumps(value)}"
    end = members[-1].value_end
    return bom + body[:end] + member + body[end:]


def plan_uninstall(text: str, backup: str | None) -> str | None:
    """The settings text without spendgate's entry (None: delete the file install created;
    the text unchanged when spendgate's command is not there).

    When nothing changed since install (the text is what installing over ``backup`` gives),
    the backup's text comes back exactly. Otherwise the one edit install made is undone and
    later edits stay: the chained command is put back (its JSON text as in the backup when
    that still names it), or the member install added is removed."""
    bom, body, members, opening, closing = _parse(text)
    entry = _find(members, KEY)
    inner = None if entry is None else _command_member(body, entry)
    if entry is None or inner is None or not is_ours(inner.value):
        return text  # not installed: nothing to undo
    base, old = _then_of(inner.value)
    if backup is not None:
        try:
            if plan_install(backup, base) == text:
                return backup
        except SetupError:
            pass
    if text == new_file(base):
        return None
    if old is not None:
        raw = _dumps(old)
        if backup is not None:
            with contextlib.suppress(SetupError, ValueError, IndexError):
                _, b_body, b_members, _, _ = _parse(backup)
                b_entry = _find(b_members, KEY)
                if b_entry is not None:
                    b_inner = _command_member(b_body, b_entry)
                    if b_inner.value == old:
                        raw = b_body[b_inner.value_start : b_inner.value_end]
        return bom + body[: inner.value_start] + raw + body[inner.value_end :]
    i = members.index(entry)
    if i > 0:  # from the end of the member before it, as install added it
        cut = body[: members[i - 1].value_end] + body[entry.value_end :]
    elif i + 1 < len(members):
        cut = body[: entry.key_start] + body[members[i + 1].key_start :]
    else:
        cut = body[: opening + 1] + body[closing:]
    return bom + cut


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise SetupError("not UTF-8 text") from None
    except OSError as exc:
        raise SetupError(f"cannot read it ({exc.strerror})") from None


def _write(path: Path, text: str | None, backup_suffix: str) -> Path | None:
    """Back the file up beside it, then replace it atomically (``None`` deletes it); a
    symlinked file is written through the link. Returns the backup's path."""
    target = path.resolve()
    backup = None
    if target.exists():
        backup = target.with_name(target.name + backup_suffix)
        shutil.copy2(target, backup)
    if text is None:
        target.unlink()
        return backup
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.spendgate-tmp")
    tmp.write_bytes(text.encode("utf-8"))
    if target.exists():
        shutil.copymode(target, tmp)
    os.replace(tmp, target)
    return backup


def _diff(path: Path, old: str | None, new: str | None) -> str:
    lines = difflib.unified_diff(
        (old or "").splitlines(keepends=True),
        (new or "").splitlines(keepends=True),
        fromfile=str(path) if old is not None else "/dev/null",
        tofile=str(path) if new is not None else "/dev/null",
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def setup(
    settings_path: str | None,
    install: bool,
    dry_run: bool = False,
    config: str | None = None,
) -> int:
    """``statusline --install`` / ``--uninstall`` (``--dry-run``: print the diff only)."""
    path = claude_settings(settings_path)
    command = "spendgate statusline"
    if config:
        command += " --config " + shlex.quote(str(Path(config).resolve()))
    try:
        old = _read(path)
        backup_path = path.resolve().with_name(path.resolve().name + INSTALL_BACKUP)
        if install:
            new: str | None = plan_install(old, command)
        else:
            new = old if old is None else plan_uninstall(old, _read(backup_path))
    except SetupError as exc:
        print(f"spendgate: {path}: {exc}", file=sys.stderr)
        return 1
    if new == old:
        does = "already runs" if install else "does not run"
        print(f"{path}: nothing to change ({KEY} {does} spendgate)")
        return 0
    if dry_run:
        sys.stdout.write(_diff(path, old, new))
        return 0
    try:
        saved = _write(path, new, INSTALL_BACKUP if install else UNINSTALL_BACKUP)
    except OSError as exc:
        print(f"spendgate: cannot write {path}: {exc}", file=sys.stderr)
        return 1
    what = f"{KEY} now runs spendgate" if install else f"{KEY} restored"
    print(f"{path}: {what}" + (f" (backup: {saved})" if saved else ""))
    if install and shutil.which("spendgate") is None:
        print("note: `spendgate` is not on this PATH; Claude Code must find it on its own")
    return 0
