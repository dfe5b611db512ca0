"""deploy/compose.yaml, checked without a Docker engine: services, volumes, mounted files, references."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def binds(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of a service: target -> host path (relative to deploy/)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = source
    return out


def test_the_stack_has_two_replicas_redis_with_aof_prometheus_and_grafana() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "guardproxy-1", "guardproxy-2", "prometheus", "grafana", "guardproxy-solo"}
    redis = services["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert "redis-data:/data" in redis["volumes"] and "healthcheck" in redis
    ports = set()
    for name in ("guardproxy-1", "guardproxy-2"):
        replica = services[name]
        assert replica["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert replica["depends_on"]["redis"]["condition"] == "service_healthy"
        assert (DEPLOY / replica["build"]["context"] / replica["build"]["dockerfile"]).is_file()
        assert replica["command"][:1] == ["serve"] and "0.0.0.0" in replica["command"]
        ports.add(replica["ports"][0].split(":")[0])
    assert len(ports) == 2


def test_the_solo_service_keeps_its_sqlite_store_in_a_volume_and_needs_no_redis() -> None:
    doc = compose()
    solo = doc["services"]["guardproxy-solo"]
    assert solo["profiles"] == ["solo"] and "REDIS_URL" not in solo["environment"] and "depends_on" not in solo
    assert "guardproxy-state:/var/lib/guardproxy" in solo["volumes"] and "guardproxy-state" in doc["volumes"]
    dockerfile = (DEPLOY / solo["build"]["context"] / solo["build"]["dockerfile"]).read_text()
    assert "XDG_STATE_HOME=/var/lib/guardproxy" in dockerfile and "VOLUME /var/lib/guardproxy" in dockerfile


def test_every_mounted_file_exists_and_every_named_volume_is_declared() -> None:
    doc = compose()
    declared = set(doc["volumes"])
    for name, service in doc["services"].items():
        for target, source in binds(service).items():
            assert (DEPLOY / source).is_file(), f"{name}: {source} (for {target}) is missing"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} is not declared"
        for dependency in service.get("depends_on", []):
            assert dependency in doc["services"], f"{name} depends on unknown {dependency}"


def test_prometheus_scrapes_both_replicas() -> None:
    services = compose()["services"]
    config_path = binds(services["prometheus"])["/etc/prometheus/prometheus.yml"]
    scrape = yaml.safe_load((DEPLOY / config_path).read_text())["scrape_configs"]
    targets = {t for job in scrape for group in job["static_configs"] for t in group["targets"]}
    assert targets == {"guardproxy-1:8080", "guardproxy-2:8080"}
    assert all(t.split(":")[0] in services for t in targets)


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboard() -> None:
    services = compose()["services"]
    sources = binds(services["grafana"])
    datasources = next(s for t, s in sources.items() if "/provisioning/datasources/" in t)
    (datasource,) = yaml.safe_load((DEPLOY / datasources).read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    host = re.match(r"http://([\w-]+):9090$", datasource["url"])
    assert host and host.group(1) in services
    providers_file = next(s for t, s in sources.items() if "/provisioning/dashboards/" in t)
    (provider,) = yaml.safe_load((DEPLOY / providers_file).read_text())["providers"]
    dashboards = [t for t in sources if t.startswith(provider["options"]["path"] + "/")]
    assert dashboards == ["/var/lib/grafana/dashboards/guardproxy.json"]
    dashboard = json.loads((DEPLOY / sources[dashboards[0]]).read_text())
    assert dashboard["uid"] == "guardproxy-spend"
    # The dashboard picks its Prometheus through a datasource variable: the provisioned default.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == datasource["type"]
