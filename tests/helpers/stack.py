"""The repository's deployment files (docker-compose, Prometheus, alerts, Grafana) and a reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = CONFIG / "prometheus.yml"
ALERTS = CONFIG / "alerts.yml"
GRAFANA = CONFIG / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "spendgate.json"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
