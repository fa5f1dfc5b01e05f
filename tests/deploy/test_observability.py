"""Prometheus scrapes what the services serve, the Grafana dashboards query
metrics the code exports, and their datasources and folders are provisioned."""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client import CollectorRegistry

from consumers.metrics import SinkMetrics, WorkerMetrics
from streams.apps.drift_monitor import DriftMetrics
from streams.apps.notifier import NotifierMetrics
from tests.deploy.readers import (
    DEPLOY,
    GRAFANA_DASHBOARD_PROVIDERS,
    GRAFANA_DASHBOARDS,
    LOOPBACK,
    METRIC_TOKEN_RE,
    METRICS,
    METRICS_ROLES,
    PROMETHEUS,
    REPO,
    assert_known_metrics,
    compose,
    compose_argv,
    compose_service_env,
    dashboards,
    datasources,
    deploy_files,
    effective_settings,
    load_yaml,
    metrics_port,
    overlay,
    prometheus_targets,
    rel,
    resolve_metric,
    role_of,
    sluice_only,
    sluice_services,
    walk,
)

# --- Prometheus --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(sluice_services()))
def test_compose_metrics_ports_match_prometheus(name: str) -> None:
    svc = compose()["services"][name]
    role = role_of(compose_argv(svc))
    if role not in METRICS_ROLES:
        assert name not in prometheus_targets(), f"Prometheus scrapes {name}, which serves no metrics"
        return
    port = metrics_port(effective_settings(sluice_only(compose_service_env(name))), role)
    assert port is not None, f"{name}: SLUICE_{METRICS_ROLES[role].upper()}__METRICS_PORT is not set"
    host = effective_settings(sluice_only(compose_service_env(name))).metrics_host
    assert host not in LOOPBACK, f"{name}: metrics bind to {host}; Prometheus in another container cannot scrape them"
    assert prometheus_targets().get(name) == port, (
        f"{name} serves metrics on {port}, Prometheus scrapes {prometheus_targets().get(name)}"
    )
    health = json.dumps((svc.get("healthcheck") or {}).get("test", ""))
    for probed in re.findall(r":(\d+)/(?:metrics|healthz|readyz)", health):
        assert int(probed) == port, f"{name}: healthcheck probes :{probed}, metrics are on {port}"


def test_prometheus_only_scrapes_known_services() -> None:
    services = set(compose()["services"]) | set(overlay("observability")["services"]) | {"localhost"}
    unknown = set(prometheus_targets()) - services
    assert not unknown, f"prometheus.yml scrapes hosts that are not compose services: {sorted(unknown)}"


# --- Metric names in the dashboards (and anywhere else) ----------------------


def test_metric_checker_rejects_unknown_names() -> None:
    assert assert_known_metrics('sum by (modality) (rate(sluice_worker_messages_total{modality=~"$m"}[1m]))', "t")
    for bad in (
        "rate(sluice_worker_message_total[1m])",  # typo
        "sluice_worker_batch_size",  # bare histogram
        "sum by (rule) (rate(sluice_worker_messages_total[1m]))",  # label of another metric
        "histogram_quantile(0.9, rate(sluice_sink_rows_inserted_total_bucket[1m]))",  # counter is no histogram
    ):
        with pytest.raises(AssertionError):
            assert_known_metrics(bad, "t")


def test_dashboard_metrics_exist_and_are_all_shown() -> None:
    assert dashboards(), "no dashboards"
    used: set[str] = set()
    for fname, dash in dashboards().items():
        for path, value in walk(dash):
            if isinstance(value, str) and "sluice_" in value:
                used |= assert_known_metrics(value, f"{fname} {path}")
    missing = set(METRICS) - used
    assert not missing, f"metrics without a dashboard panel: {sorted(missing)}"


def test_metric_names_in_other_deploy_files() -> None:
    for path in deploy_files():
        if path.suffix == ".json":
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for token in METRIC_TOKEN_RE.findall(line):
                try:
                    resolve_metric(token)
                except AssertionError as exc:
                    if "is a histogram" in str(exc):
                        continue  # prose may name a histogram by its family name
                    raise AssertionError(f"{rel(path)}:{lineno}: {exc}") from None


def exported_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """What the code's metric classes define, as exposed: name -> (type, labels)."""
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for cls in (WorkerMetrics, SinkMetrics, NotifierMetrics, DriftMetrics):
        instance = cls(CollectorRegistry())
        for metric in vars(instance).values():
            kind = getattr(metric, "_type", None)
            if kind is None:
                continue
            name = metric._name
            if kind == "counter":
                name = name.removesuffix("_total") + "_total"
            out[name] = (kind, frozenset(metric._labelnames))
    return out


def test_code_exports_the_metrics() -> None:
    exported = exported_metrics()
    assert exported, "found no metrics on WorkerMetrics/SinkMetrics/NotifierMetrics"
    missing = set(METRICS) - set(exported)
    extra = set(exported) - set(METRICS)
    assert not missing, f"the deployment files expect metrics the code does not define: {sorted(missing)}"
    assert not extra, f"the code defines metrics this contract (and the dashboard) lacks: {sorted(extra)}"
    for name, (kind, labels) in METRICS.items():
        assert exported[name] == (kind, labels), f"{name}: code has {exported[name]}, contract says {(kind, labels)}"


# --- Grafana provisioning ----------------------------------------------------


def test_dashboard_datasources_are_provisioned() -> None:
    for fname, dash in dashboards().items():
        for path, value in walk(dash):
            if path.endswith("datasource.uid") and not str(value).startswith("-- "):
                dtype = dict(walk(dash)).get(path.removesuffix(".uid") + ".type")
                assert value in datasources(), f"{fname} {path}: datasource uid {value!r} is not provisioned"
                assert datasources()[value] == dtype, f"{fname} {path}: uid {value!r} is a {datasources()[value]}"
    assert "grafana-clickhouse-datasource" in datasources().values()


def test_dashboard_provider_path_is_mounted() -> None:
    provider_paths = {p["options"]["path"] for p in load_yaml(GRAFANA_DASHBOARD_PROVIDERS)["providers"]}
    grafana = overlay("observability")["services"]["grafana"]
    mounts = {}
    for volume in grafana.get("volumes") or []:
        src, dst = str(volume).split(":")[:2]
        mounts[dst] = src
    for path in provider_paths:
        assert path in mounts, f"dashboards.yml reads {path}, which is not mounted into grafana"
        assert (REPO / mounts[path]).resolve() == GRAFANA_DASHBOARDS.resolve()


def test_alert_rules_query_known_metrics_and_are_loaded() -> None:
    rules_file = DEPLOY / "prometheus" / "alerts.yml"
    rules = [rule for group in load_yaml(rules_file)["groups"] for rule in group["rules"]]
    assert len(rules) >= 5
    for rule in rules:
        if not rule["expr"].startswith("up{"):  # Prometheus's own per-target metric
            assert assert_known_metrics(rule["expr"], f"alerts.yml {rule['alert']}"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    assert "/etc/prometheus/alerts.yml" in load_yaml(PROMETHEUS)["rule_files"]
    volumes = overlay("observability")["services"]["prometheus"]["volumes"]
    assert any(v.startswith("./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml") for v in volumes)
