"""settings.py's strict loader (docs/reference.md §10 "Strict checks"): names that are no
setting stop start-up with the closest valid one, and every bad value names where it came
from (the file and key, the variable, or the flag)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from spendgate.providers import ADAPTERS
from spendgate.settings import (
    CARRIED_PATHS,
    RouteConfig,
    Settings,
    SettingsError,
    env_name,
    load_settings,
    unknown_variables,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No SPENDGATE_* settings from the outer environment, and a working directory of
    its own (the .env file is read from there)."""
    for name in list(os.environ):
        if name.upper().startswith("SPENDGATE_") and not name.upper().startswith(
            "SPENDGATE_REQUIRE_"
        ):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def error(**kw: object) -> str:
    config = kw.pop("config", None)
    with pytest.raises(SettingsError) as info:
        load_settings(config, **kw)  # type: ignore[arg-type]
    text = str(info.value)
    assert "\n" not in text  # one line, however many problems
    return text


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spendgate.toml"
    path.write_text(text)
    return path


def test_a_misspelt_toml_key_stops_start_up_with_the_closest_name(tmp_path: Path) -> None:
    """The issue's case: `admin_tokn` started the server with no token, the API open."""
    cfg = toml(tmp_path, 'admin_tokn = "s3cret"\nport = 9000\n')
    assert error(config=cfg) == (f"{cfg}: unknown key admin_tokn (did you mean admin_token?)")


def test_a_key_close_to_nothing_gets_no_guess(tmp_path: Path) -> None:
    cfg = toml(tmp_path, "zzz = 1\n")
    assert error(config=cfg) == f"{cfg}: unknown key zzz"


def test_unknown_environment_variables_are_named_all_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPENDGATE_ADMIN_TOKN", "x")
    monkeypatch.setenv("SPENDGATE_PROT", "9000")
    text = error()
    assert "unknown environment variable SPENDGATE_ADMIN_TOKN (did you mean " in text
    assert "SPENDGATE_ADMIN_TOKEN?)" in text
    assert "unknown environment variable SPENDGATE_PROT (did you mean SPENDGATE_PORT?)" in text


def test_unknown_names_in_dot_env_are_named_with_the_file(clean_env: Path) -> None:
    (clean_env / ".env").write_text("OPENAI_API_KEY=sk-not-ours\nSPENDGATE_PORTT=1\n")
    assert error() == "unknown variable in .env: SPENDGATE_PORTT (did you mean SPENDGATE_PORT?)"


def test_every_setting_is_a_known_variable_because_the_names_come_from_the_model() -> None:
    """Settings added by anyone (a new field) are known without a list to keep in step."""
    assert unknown_variables({env_name(f): "" for f in Settings.model_fields}, "x") == []
    assert unknown_variables({"spendgate_port": "1"}, "x") == []  # read ignoring case
    assert unknown_variables({"SPENDGATE_NOT_A_SETTING": "1"}, "x") != []


def test_test_switches_and_the_config_variable_do_not_stop_start_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """CI sets SPENDGATE_REQUIRE_BROWSER / _AGENTS; they are the suite's, not settings."""
    for name in ("SPENDGATE_REQUIRE_BROWSER", "SPENDGATE_REQUIRE_AGENTS", "SPENDGATE_REQUIRE_X"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("SPENDGATE_CHROMIUM", "/usr/bin/chromium")
    monkeypatch.setenv("SPENDGATE_AGENTS_DIR", str(tmp_path))
    monkeypatch.setenv("SPENDGATE_CONFIG", str(toml(tmp_path, "port = 9001\n")))
    assert load_settings().port == 9001


def test_the_test_suites_own_environment_starts() -> None:
    """Whatever the outer environment of this run holds besides settings must start."""
    outer = {k: v for k, v in os.environ.items() if k.upper().startswith("SPENDGATE_REQUIRE_")}
    assert unknown_variables(outer, "environment variable") == []


def test_every_variable_the_suite_and_its_scripts_use_is_known() -> None:
    """A switch added to the tests, CI or the scripts must be named in NOT_SETTINGS (or
    be a SPENDGATE_REQUIRE_* one), else a developer's environment set up for it would
    stop `spendgate serve`: the variables tests read, and every one CI, the scripts and
    docs/*.py name."""
    used: set[str] = set()
    read = re.compile(r"environ(?:\.get)?[(\[]\s*[\"'](SPENDGATE_[A-Z0-9_]+)")
    for path in (ROOT / "tests").rglob("*.py"):
        used.update(read.findall(path.read_text()))
    for path in [*(ROOT / ".ci").rglob("*"), *(ROOT / "scripts").rglob("*"),
                 *(ROOT / "docs").glob("*.py")]:  # fmt: skip
        if path.is_file():
            used.update(re.findall(r"SPENDGATE_[A-Z0-9_]+", path.read_text(errors="replace")))
    assert "SPENDGATE_REQUIRE_BROWSER" in used and "SPENDGATE_AGENTS_DIR" in used
    assert unknown_variables(dict.fromkeys(used, ""), "variable") == []


def test_a_bad_toml_value_is_named_by_file_and_key_not_by_a_variable(tmp_path: Path) -> None:
    cfg = toml(tmp_path, 'port = "eighty"\n')
    text = error(config=cfg)
    assert text.startswith(f"bad setting in {cfg}, key port: ")
    assert "SPENDGATE_PORT" not in text


def test_a_bad_value_is_named_where_it_came_from(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clean_env: Path
) -> None:
    cfg = toml(tmp_path, "port = 9000\n")
    monkeypatch.setenv("SPENDGATE_PORT", "eighty")  # the environment wins over the file
    assert error(config=cfg).startswith("bad setting in environment variable SPENDGATE_PORT: ")
    monkeypatch.delenv("SPENDGATE_PORT")
    (clean_env / ".env").write_text("SPENDGATE_LOG_LEVEL=loud\n")
    assert error().startswith("bad setting in .env, SPENDGATE_LOG_LEVEL: Input should be ")
    assert error(port=70000).startswith("bad setting in --port: ")


def test_an_unknown_adapter_names_the_route_the_file_the_key_and_the_adapters(
    tmp_path: Path,
) -> None:
    """It used to start, then answer every request on the route with a bare 500."""
    cfg = toml(
        tmp_path,
        '[[routes]]\nprefix = "/vllm"\nupstream = "http://127.0.0.1:8000"\n'
        '[[routes]]\nprefix = "/groq"\nupstream = "https://api.groq.com/openai"\n'
        'adapter = "openaii"\n',
    )
    text = error(config=cfg)
    assert text.startswith(
        f"bad setting in {cfg}, [[routes]] #2 (prefix /groq), key adapter: "
        "unknown adapter 'openaii' (did you mean openai?); adapters are "
    )
    assert all(name in text for name in ADAPTERS)


def test_a_misspelt_key_inside_a_route_is_named_with_its_route(tmp_path: Path) -> None:
    cfg = toml(tmp_path, '[[routes]]\nprefix = "/x"\nupstream = "http://x"\nadaptr = "ollama"\n')
    assert error(config=cfg) == (
        f"{cfg}, [[routes]] #1 (prefix /x): unknown key adaptr (did you mean adapter?)"
    )


def test_routes_from_the_environment_are_checked_as_well(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "SPENDGATE_ROUTES", '[{"prefix": "/a", "upstream": "http://a", "adapter": "olama"}]'
    )
    assert error().startswith(
        "bad setting in environment variable SPENDGATE_ROUTES, [[routes]] #1 (prefix /a), "
        "key adapter: unknown adapter 'olama' (did you mean ollama?)"
    )
    monkeypatch.setenv("SPENDGATE_ROUTES", '[{"prefix": "/a"')
    assert error() == "bad setting in environment variable SPENDGATE_ROUTES: not valid JSON"


def test_every_problem_is_in_the_one_line(tmp_path: Path) -> None:
    cfg = toml(tmp_path, 'port = "x"\nlog_level = "loud"\n')
    text = error(config=cfg)
    assert f"{cfg}, key port" in text and f"{cfg}, key log_level" in text


@pytest.mark.parametrize(
    ("setting", "value", "fix"),
    [
        ("openai_base_url", "https://api.openai.com/v1", "https://api.openai.com"),
        ("openai_base_url", "https://api.openai.com/v1/", "https://api.openai.com"),
        ("anthropic_base_url", "https://api.anthropic.com/v1", "https://api.anthropic.com"),
        (
            "gemini_base_url",
            "https://generativelanguage.googleapis.com/v1beta",
            "https://generativelanguage.googleapis.com",
        ),
        ("ollama_base_url", "http://127.0.0.1:11434/api", "http://127.0.0.1:11434"),
    ],
)
def test_a_base_url_ending_in_a_path_its_requests_carry_names_the_fix(
    monkeypatch: pytest.MonkeyPatch, setting: str, value: str, fix: str
) -> None:
    """`SPENDGATE_OPENAI_BASE_URL=…/v1` silently became /v1/v1/chat/completions."""
    monkeypatch.setenv(env_name(setting), value)
    text = error()
    assert text.startswith(f"bad setting in environment variable {env_name(setting)}: ")
    assert text.endswith(f"use {fix!r}")
    monkeypatch.setenv(env_name(setting), fix)
    assert getattr(load_settings(), setting) == fix


def test_a_route_upstream_ending_in_its_requests_path_is_refused(tmp_path: Path) -> None:
    cfg = toml(
        tmp_path, '[[routes]]\nprefix = "/groq"\nupstream = "https://api.groq.com/openai/v1"\n'
    )
    text = error(config=cfg)
    assert text.startswith(f"bad setting in {cfg}, [[routes]] #1 (prefix /groq): ")
    assert text.endswith("use 'https://api.groq.com/openai'")
    # a path that merely contains the segment is no doubling: Groq's own base is fine
    assert RouteConfig(prefix="/g", upstream="https://api.groq.com/openai").adapter == "openai"
    assert RouteConfig(prefix="/a", upstream="https://x/v1", adapter="azure").upstream


def test_every_adapter_has_its_carried_paths_stated() -> None:
    assert set(CARRIED_PATHS) == set(ADAPTERS)


def test_a_missing_or_unparsable_config_file_is_one_line(tmp_path: Path) -> None:
    assert (
        error(config=tmp_path / "none.toml")
        == f"config file {tmp_path / 'none.toml'} does not exist"
    )
    cfg = toml(tmp_path, "port = = 1\n")
    assert error(config=cfg).startswith(f"config file {cfg} is not valid TOML: ")


def test_an_unknown_keyword_is_refused_too() -> None:
    """Keyword overrides (the CLI's flags, the compose file's check) are names too."""
    assert error(prot=1) == "unknown setting prot (did you mean port?)"


def test_a_route_prefix_used_twice_is_refused(tmp_path: Path) -> None:
    route = '[[routes]]\nprefix = "/groq"\nupstream = "https://api.groq.com/openai"\n'
    cfg = toml(tmp_path, route + '[[routes]]\nprefix = "/x"\nupstream = "http://x"\n' + route)
    assert error(config=cfg) == (
        f"bad setting in {cfg}, key routes: [[routes]] #1 and #3 both have prefix /groq "
        "(the first would hide the second)"
    )


@pytest.mark.parametrize("prefix", ["/api", "/s", "/metrics", "/healthz/x", "api/ollama"])
def test_a_route_prefix_may_not_take_spendgates_own_paths(tmp_path: Path, prefix: str) -> None:
    cfg = toml(tmp_path, f'[[routes]]\nprefix = "{prefix}"\nupstream = "http://x"\n')
    text = error(config=cfg)
    assert text.startswith(f"bad setting in {cfg}, [[routes]] #1 (prefix {prefix}), key prefix: ")
    assert text.endswith("its requests would never reach the route")
    assert RouteConfig(prefix="/apis", upstream="http://x").prefix == "/apis"  # a name only
