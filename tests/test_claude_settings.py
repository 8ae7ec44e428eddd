"""`spendgate statusline --install` / `--uninstall` (src/spendgate/claude_settings.py): the
statusLine entry in Claude Code's settings files, every other byte kept."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from spendgate.cli import main

SETTINGS = """{
    "model": "opus",
    "permissions": {"allow": ["Bash(npm test)"],   "deny": []},
    "env": {
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:8787/anthropic",
        "NOTE": "caf\\u00e9 ☕"
    },
    "hooks": {}
}
"""
OURS = {"type": "command", "command": "spendgate statusline"}


def setup(run_main: Callable[[list[str]], int], path: Path, *flags: str) -> tuple[int, str]:
    return run_main(["statusline", *flags, "--settings", str(path)]), path.read_text("utf-8")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[[list[str]], int]:
    def go(argv: list[str]) -> int:
        code = main(argv)
        capsys.readouterr()
        return code

    return go


def test_install_adds_the_entry_and_keeps_every_other_byte(
    tmp_path: Path, cli: Callable[[list[str]], int]
) -> None:
    path = tmp_path / "settings.json"
    path.write_bytes(SETTINGS.encode())
    code, text = setup(cli, path, "--install")
    assert code == 0
    added = (
        ',\n    "statusLine": {\n        "type": "command",\n'
        '        "command": "spendgate statusline"\n    }'
    )  # in the file's own four-space indentation, after the last key
    assert text.replace(added, "", 1) == SETTINGS  # everything else, byte for byte
    assert orjson.loads(text) == {**orjson.loads(SETTINGS), "statusLine": OURS}
    backup = tmp_path / "settings.json.before-spendgate-install"
    assert backup.read_bytes() == SETTINGS.encode()
    assert setup(cli, path, "--install") == (0, text)  # once is enough
    code, text = setup(cli, path, "--uninstall")
    assert code == 0 and path.read_bytes() == SETTINGS.encode()
    assert (tmp_path / "settings.json.before-spendgate-uninstall").exists()
    assert setup(cli, path, "--uninstall") == (0, SETTINGS)  # nothing left to undo


def test_install_chains_an_existing_command(
    tmp_path: Path, cli: Callable[[list[str]], int]
) -> None:
    before = (
        '{"theme":"dark",\n  "statusLine": {"type": "command", '
        '"command": "~/.claude/line.sh --short \\u00e9", "padding": 0}\n}\n'
    )
    path = tmp_path / "settings.json"
    path.write_text(before, "utf-8")
    code, text = setup(cli, path, "--install")
    chained = "spendgate statusline --then '~/.claude/line.sh --short é'"
    assert code == 0
    assert text == before.replace('"~/.claude/line.sh --short \\u00e9"', f'"{chained}"')
    assert orjson.loads(text)["statusLine"] == {**OURS, "command": chained, "padding": 0}
    # what was there is restored exactly, its \u escape too
    assert setup(cli, path, "--uninstall") == (0, before)


def test_uninstall_after_later_edits_undoes_only_its_own(
    tmp_path: Path, cli: Callable[[list[str]], int]
) -> None:
    path = tmp_path / "settings.json"
    path.write_text('{\n  "a": 1,\n  "statusLine": {"type": "command", "command": "x"}\n}\n')
    setup(cli, path, "--install")
    edited = path.read_text().replace('"a": 1', '"a": 2')
    path.write_text(edited)
    _, text = setup(cli, path, "--uninstall")
    assert text == '{\n  "a": 2,\n  "statusLine": {"type": "command", "command": "x"}\n}\n'
    path.write_text('{\n  "a": 1\n}\n')
    setup(cli, path, "--install")
    path.write_text(path.read_text().replace('"a": 1', '"b": [],\n  "a": 1'))
    _, text = setup(cli, path, "--uninstall")
    assert text == '{\n  "b": [],\n  "a": 1\n}\n'


def test_dry_run_shows_the_diff_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "settings.json"
    path.write_bytes(SETTINGS.encode())
    for flag in ("--dry-run", "--diff"):
        assert main(["statusline", "--install", flag, "--settings", str(path)]) == 0
        diff = capsys.readouterr().out
        assert diff.startswith(f"--- {path}\n+++ {path}\n")
        assert '-    "hooks": {}\n+    "hooks": {},\n+    "statusLine": {\n' in diff
    assert path.read_bytes() == SETTINGS.encode()
    assert not (tmp_path / "settings.json.before-spendgate-install").exists()


def test_claude_config_dir_new_file_compact_and_crlf(
    tmp_path: Path, cli: Callable[[list[str]], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(tmp_path / "cc"))
    assert cli(["statusline", "--install"]) == 0
    made = tmp_path / "cc" / "settings.json"
    assert orjson.loads(made.read_bytes()) == {"statusLine": OURS}
    assert cli(["statusline", "--uninstall"]) == 0
    assert not made.exists()  # there was no file: there is none again
    path = tmp_path / "compact.json"
    path.write_text('{"a":1}')
    _, text = setup(cli, path, "--install")  # one line stays one line
    assert text == '{"a":1, "statusLine": {"type": "command", "command": "spendgate statusline"}}'
    path.write_bytes(b'{\r\n\t"a": 1\r\n}\r\n')
    setup(cli, path, "--install")
    assert path.read_bytes() == (
        b'{\r\n\t"a": 1,\r\n\t"statusLine": {\r\n\t\t"type": "command",\r\n'
        b'\t\t"command": "spendgate statusline"\r\n\t}\r\n}\r\n'
    )


def test_config_file_goes_into_the_installed_command(
    tmp_path: Path, cli: Callable[[list[str]], int]
) -> None:
    config = tmp_path / "my conf.toml"
    config.write_text("port = 9999\n")
    path = tmp_path / "settings.json"
    assert cli(["--config", str(config), "statusline", "--install", "--settings", str(path)]) == 0
    command = orjson.loads(path.read_bytes())["statusLine"]["command"]
    assert shlex.split(command) == ["spendgate", "statusline", "--config", str(config)]


@pytest.mark.parametrize(
    "content",
    [
        '{"a": 1,}',
        '{"statusLine": "~/.claude/line.sh"}',
        '{"statusLine": {"type": "static"}}',
        "[]",
    ],
)
def test_install_refuses_what_it_cannot_edit_safely(
    tmp_path: Path, content: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "settings.json"
    path.write_text(content)
    assert main(["statusline", "--install", "--settings", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"spendgate: {path}: ")
    assert path.read_text() == content


def test_setup_flags_need_install_or_uninstall(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["statusline", "--dry-run"]) == 2
    assert "--install" in capsys.readouterr().err
