"""The docker-compose stack, Prometheus config, alerting rules and Grafana dashboard.

No Docker engine needed: the files are parsed and checked against each other and
against the app (port, /metrics, exported metric names); ``promtool`` checks the
config and unit-tests the alerts where it is installed, ``docker compose config``
validates the compose file where the plugin is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import CollectorRegistry

from spendgate.app import make_app
from spendgate.metrics import Metrics
from spendgate.settings import Settings, load_settings
from tests.helpers.records import message
from tests.helpers.stack import (
    ALERTS,
    COMPOSE,
    DASHBOARD,
    GRAFANA,
    PROMETHEUS,
    ROOT,
    dashboard_exprs,
    load,
)

METRIC_NAME = re.compile(r"\b((?:spendgate|gen_ai)_[a-z0-9_]+)\b")


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with no variables set: the defaults."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def service(name: str) -> dict[str, Any]:
    svc: dict[str, Any] = load(COMPOSE)["services"][name]
    return svc


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Container path → source (a repo path for bind mounts, else the volume name)."""
    out = {}
    for spec in svc.get("volumes", []):
        source, target, *_ = spec.split(":")
        out[target] = str((ROOT / source).resolve()) if source.startswith(".") else source
    return out


def published(svc: dict[str, Any]) -> list[tuple[str, int, int]]:
    out = []
    for spec in svc.get("ports", []):
        host, host_port, container_port = spec.split(":")
        out.append((host, int(host_port), int(container_port)))
    return out


def spendgate_env() -> dict[str, str]:
    env = service("spendgate")["environment"]
    return {k: interpolate(str(v)) for k, v in env.items()}


def exported_metric_names() -> set[str]:
    """Every sample name the app exports (histograms with their suffixes)."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.record(message(), "chat", "gpt-4o")
    metrics.upstream_errors.labels("openai", "timeout").inc()
    metrics.budget_rejections.labels("openai", "session_budget_exceeded").inc()
    metrics.bind_gauges(
        lambda: 0, lambda: 0, lambda: 0, budgets=lambda: [("s", Decimal(1), Decimal(0))]
    )
    return {s.name for family in registry.collect() for s in family.samples}


# -- docker-compose.yml --------------------------------------------------------------------


def test_compose_has_the_three_services_and_named_volumes() -> None:
    compose = load(COMPOSE)
    by_profile: dict[str, set[str]] = {}
    for name, svc in compose["services"].items():
        for profile in svc.get("profiles", [""]):
            by_profile.setdefault(profile, set()).add(name)
    assert by_profile == {
        "": {"spendgate", "prometheus", "grafana"},
        "shared": {"postgres", "redis", "spendgate-shared", "lb"},
    }
    for name, svc in compose["services"].items():
        for target, source in mounts(svc).items():
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts missing {source} at {target}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
        for host, _, _ in published(svc):
            assert host == "127.0.0.1", f"{name} must publish on the host's loopback only"


def test_spendgate_service_settings_port_and_data_volume() -> None:
    svc = service("spendgate")
    assert svc["build"]["context"] == "."
    assert (ROOT / svc["build"]["dockerfile"]).is_file()
    env = spendgate_env()
    settings = load_settings(**{k.removeprefix("SPENDGATE_").lower(): v for k, v in env.items()})
    assert settings.host == "0.0.0.0"
    assert settings.allow_remote_without_token or settings.admin_token
    assert settings.admin_token is None or settings.admin_token == ""
    (_, host_port, container_port) = published(svc)[0]
    assert container_port == settings.port == host_port
    # the SQLite file sits on the named volume
    data_dir = str(settings.db_path.parent)
    assert data_dir in mounts(svc) and mounts(svc)[data_dir] in load(COMPOSE)["volumes"]


def test_dockerfile_agrees_with_compose() -> None:
    text = (ROOT / "Dockerfile").read_text()
    env = spendgate_env()
    assert re.search(rf"^EXPOSE {env['SPENDGATE_PORT']}$", text, re.M)
    assert f"SPENDGATE_DB_PATH={env['SPENDGATE_DB_PATH']}" in text
    volume = re.search(r'^VOLUME \["([^"]+)"\]', text, re.M)
    assert volume and Path(env["SPENDGATE_DB_PATH"]).parent == Path(volume.group(1))
    assert 'ENTRYPOINT ["spendgate"]' in text and 'CMD ["serve"]' in text
    assert "/healthz" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and "*.db" in ignored and "src" not in ignored


def has_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    run = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return run.returncode == 0


@pytest.mark.skipif(not has_compose(), reason="the docker compose plugin is not installed")
@pytest.mark.parametrize("profile", [[], ["--profile", "shared"]])
def test_docker_compose_config_is_valid(profile: list[str]) -> None:
    run = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), *profile, "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SPENDGATE_ADMIN_TOKEN": "t"},
    )
    assert run.returncode == 0, run.stderr


# -- the "shared" profile: PostgreSQL, Redis, 3 replicas behind nginx -------------------------


def shared_env() -> dict[str, str]:
    env = service("spendgate-shared")["environment"]
    return {k: interpolate(str(v)) for k, v in env.items()}


def test_the_replicas_share_postgres_and_redis_and_need_a_token() -> None:
    svc = service("spendgate-shared")
    assert svc["deploy"]["replicas"] == 3
    assert svc["image"] == service("spendgate")["image"]  # one image, with the shared extra
    raw = service("spendgate-shared")["environment"]
    assert raw["SPENDGATE_ADMIN_TOKEN"].startswith("${SPENDGATE_ADMIN_TOKEN:?")  # no default
    env = shared_env()
    known = {f"SPENDGATE_{name.upper()}" for name in Settings.model_fields}
    checked = {k.removeprefix("SPENDGATE_").lower(): v for k, v in env.items() if k in known}
    settings = load_settings(**{**checked, "admin_token": "t"})
    assert settings.host == "0.0.0.0" and not settings.allow_remote_without_token
    pg = urlsplit(settings.store_url or "")
    db = service("postgres")["environment"]
    assert pg.scheme == "postgresql" and pg.hostname == "postgres" and pg.port == 5432
    assert (pg.username, pg.password, pg.path) == (
        db["POSTGRES_USER"], interpolate(db["POSTGRES_PASSWORD"]), "/" + db["POSTGRES_DB"],
    )  # fmt: skip
    redis = urlsplit(env["SPENDGATE_REDIS_URL"])
    assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", 6379)
    command = service("redis")["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    for name in ("postgres", "redis"):
        assert svc["depends_on"][name]["condition"] == "service_healthy"
        assert service(name)["healthcheck"]["test"]
    assert settings.db_path.parent.as_posix() in mounts(svc)  # journals on a volume
    text = (ROOT / "Dockerfile").read_text()
    assert '".[shared]"' in text


def nginx_conf() -> str:
    target = "/etc/nginx/conf.d/default.conf"
    return Path(mounts(service("lb"))[target]).read_text()


def test_nginx_balances_every_replica_and_passes_streams_and_header_names() -> None:
    conf = nginx_conf()
    directives = {line.split()[0]: line.split(None, 1)[1].rstrip(";").strip()
                  for line in (raw.split("#")[0].strip() for raw in conf.splitlines())
                  if line and not line.endswith(("{", "}")) and " " in line}  # fmt: skip
    assert directives["underscores_in_headers"] == "on"
    assert directives["proxy_buffering"] == "off"
    assert directives["proxy_request_buffering"] == "off"
    assert directives["proxy_pass"] == "http://spendgate"
    port = int(shared_env()["SPENDGATE_PORT"])
    assert directives["server"] == f"spendgate-shared:{port} resolve"
    (host, _, container_port) = published(service("lb"))[0]
    assert host == "127.0.0.1" and directives["listen"] == str(container_port)
    assert "proxy_set_header Upgrade $http_upgrade;" in conf  # WebSocket upgrades
    body_limit = int(directives["client_max_body_size"].removesuffix("m")) * 1024 * 1024
    assert body_limit >= load_settings().max_request_bytes


def test_prometheus_finds_every_replica_and_the_dashboard_sums_them() -> None:
    (job,) = [j for j in load(PROMETHEUS)["scrape_configs"] if j["job_name"] == "spendgate-shared"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["spendgate-shared"] and sd["type"] == "A"
    assert sd["port"] == int(shared_env()["SPENDGATE_PORT"])
    rules = [r for g in load(ALERTS)["groups"] for r in g["rules"] if r.get("alert")]
    (down,) = [r for r in rules if r["alert"] == "SpendgateDown"]
    assert "spendgate-shared" in down["expr"]
    # Each panel aggregates over instances: a per-replica series would show N lines
    for expr in dashboard_exprs(json.loads(DASHBOARD.read_text())):
        inner = expr.removeprefix("histogram_quantile(").split(",", 1)[-1].strip()
        assert re.match(r"(sum|max|topk)\b", inner) or re.match(r"(sum|max|topk)\b", expr), expr


# -- Prometheus ------------------------------------------------------------------------------


def spendgate_job(config: dict[str, Any]) -> dict[str, Any]:
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "spendgate"]
    return job


def test_prometheus_scrapes_the_apps_metrics_path_and_port() -> None:
    job = spendgate_job(load(PROMETHEUS))
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.rsplit(":", 1)
    assert host == "spendgate"  # the compose service name
    assert int(port) == int(spendgate_env()["SPENDGATE_PORT"])
    app = make_app(load_settings())
    paths = {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource}
    assert job.get("metrics_path", "/metrics") == "/metrics" in paths


def test_prometheus_service_mounts_its_config_and_rules() -> None:
    svc = service("prometheus")
    args = dict(a.removeprefix("--").split("=", 1) for a in svc["command"])
    m = {source: target for target, source in mounts(svc).items()}
    config_path = Path(args["config.file"])
    assert m[str(PROMETHEUS)] == str(config_path)
    for rule_file in load(PROMETHEUS)["rule_files"]:
        # rule files resolve against the config's directory, in the repo and in the container
        assert (PROMETHEUS.parent / rule_file).resolve() == ALERTS
        assert m[str(ALERTS)] == str(config_path.parent / rule_file)
    assert args["storage.tsdb.path"] in mounts(svc)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_checks_config_and_rules() -> None:
    for args in (["check", "config", str(PROMETHEUS)], ["check", "rules", str(ALERTS)]):
        run = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr


def test_alerts_cover_budget_spend_rate_and_error_ratio() -> None:
    rules = {r["alert"]: r for g in load(ALERTS)["groups"] for r in g["rules"] if "alert" in r}
    assert (
        "spendgate_session_budget_used_ratio" in rules["SpendgateSessionBudgetNearlySpent"]["expr"]
    )
    assert "0.9" in rules["SpendgateSessionBudgetNearlySpent"]["expr"]
    assert "spendgate_cost_usd_total" in rules["SpendgateSpendRateHigh"]["expr"]
    assert "spendgate_upstream_errors_total" in rules["SpendgateUpstreamErrorRatioHigh"]["expr"]
    names = exported_metric_names()
    for name, rule in rules.items():
        for metric in METRIC_NAME.findall(rule["expr"]):
            assert metric in names, f"alert {name} uses {metric}, which spendgate does not export"


# promtool's unit-test format; the expected annotations are filled in from the rules.
ALERT_TESTS = """
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: spendgate_session_budget_used_ratio{session="near"}
        values: 0.5 0.95 1
      - series: spendgate_session_budget_used_ratio{session="fine"}
        values: 0.1 0.2 0.3
      # 1 USD a minute = 60 USD/hour
      - series: spendgate_cost_usd_total{provider="openai",model="a"}
        values: 0+1x40
      # 20 % of openai's requests fail, 1 % of anthropic's
      - series: spendgate_requests_total{route="openai",status="200"}
        values: 0+100x40
      - series: spendgate_upstream_errors_total{route="openai",kind="http_5xx"}
        values: 0+20x40
      - series: spendgate_requests_total{route="anthropic",status="200"}
        values: 0+100x40
      - series: spendgate_upstream_errors_total{route="anthropic",kind="reset"}
        values: 0+1x40
      - series: up{job="spendgate",instance="spendgate:8787"}
        values: "0x10"  # (quoted, or YAML reads hex 16)
    alert_rule_test:
      - {eval_time: 0m, alertname: SpendgateSessionBudgetNearlySpent, exp_alerts: []}
      - eval_time: 1m
        alertname: SpendgateSessionBudgetNearlySpent
        exp_alerts: [{exp_labels: {session: near, severity: warning}}]
      - {eval_time: 2m, alertname: SpendgateSpendRateHigh, exp_alerts: []}
      - eval_time: 20m
        alertname: SpendgateSpendRateHigh
        exp_alerts: [{exp_labels: {severity: warning}}]
      - eval_time: 20m
        alertname: SpendgateUpstreamErrorRatioHigh
        exp_alerts: [{exp_labels: {route: openai, severity: warning}}]
      - eval_time: 5m
        alertname: SpendgateDown
        exp_alerts:
          - exp_labels: {job: spendgate, instance: "spendgate:8787", severity: critical}
  - interval: 1m
    input_series:
      # 0.1 USD a minute = 6 USD/hour
      - series: spendgate_cost_usd_total{provider="openai",model="a"}
        values: 0+0.1x40
      # a 100 % error ratio on 3 requests is not enough traffic to page anyone
      - series: spendgate_requests_total{route="openai",status="502"}
        values: 0 1 2 3 3 3 3 3 3 3
      - series: spendgate_upstream_errors_total{route="openai",kind="connect"}
        values: 0 1 2 3 3 3 3 3 3 3
    alert_rule_test:
      - {eval_time: 20m, alertname: SpendgateSpendRateHigh, exp_alerts: []}
      - {eval_time: 8m, alertname: SpendgateUpstreamErrorRatioHigh, exp_alerts: []}
"""


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_alert_rules_fire_when_they_should(tmp_path: Path) -> None:
    tests = {"rule_files": [str(ALERTS)], **yaml.safe_load(ALERT_TESTS)}
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            for alert in check["exp_alerts"]:  # compare labels only: fill in the annotations
                alert["exp_annotations"] = annotations(check["alertname"], alert["exp_labels"])
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests))
    run = subprocess.run(
        ["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


def annotations(alertname: str, labels: dict[str, str]) -> dict[str, str]:
    """The rule's annotations with the test's expected value filled in."""
    (rule,) = [r for g in load(ALERTS)["groups"] for r in g["rules"] if r.get("alert") == alertname]
    value = {
        "SpendgateSessionBudgetNearlySpent": "95%",
        "SpendgateSpendRateHigh": "60.00",
        "SpendgateUpstreamErrorRatioHigh": "20%",
    }.get(alertname, "")
    out = {}
    for key, text in rule.get("annotations", {}).items():
        text = re.sub(r"\{\{ \$value \| humanizePercentage \}\}", value, text)
        text = re.sub(r'\{\{ \$value \| printf "%\.2f" \}\}', value, text)
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), text)
        out[key] = text
    return out


# -- Grafana ---------------------------------------------------------------------------------


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    (ds,) = load(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert ds["type"] == "prometheus"
    prom = service("prometheus")
    listen = next(a for a in prom["command"] if a.startswith("--web.listen-address="))
    assert ds["url"] == f"http://prometheus:{listen.rsplit(':', 1)[1]}"
    (provider,) = load(GRAFANA / "provisioning" / "dashboards" / "spendgate.yml")["providers"]
    grafana = mounts(service("grafana"))
    assert grafana[provider["options"]["path"]] == str(DASHBOARD.parent)
    assert grafana["/etc/grafana/provisioning"] == str(GRAFANA / "provisioning")
    home = service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home) == Path(provider["options"]["path"]) / DASHBOARD.name
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {ds["uid"]}


def test_dashboard_shows_what_the_issue_asks_for_with_real_metric_names() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "spendgate"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = dashboard_exprs(dashboard)
    text = "\n".join(exprs)
    names = exported_metric_names()
    for metric in METRIC_NAME.findall(text):
        assert metric in names, f"the dashboard queries {metric}, which spendgate does not export"
    assert any("by (model)" in e and "spendgate_cost_usd_total" in e for e in exprs)
    assert any("by (type)" in e and "spendgate_tokens_total" in e for e in exprs)
    assert any("spendgate_requests_total" in e and "by (status)" in e for e in exprs)
    assert "spendgate_upstream_errors_total" in text
    for hist in ("spendgate_request_duration_seconds", "spendgate_time_to_first_token_seconds"):
        for q in ("0.5", "0.95"):
            assert any(f"histogram_quantile({q}," in e and f"{hist}_bucket" in e for e in exprs)
    assert "spendgate_active_streams" in text and "spendgate_paused_sessions" in text
