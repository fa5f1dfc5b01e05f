"""The Kubernetes manifests (deploy/k8s) and the KEDA ScaledObjects agree with
the settings, the CLI and the exported metrics."""

from __future__ import annotations

import json
import re

from consumers.kafka import KafkaSettings
from schemas.topics import modality
from streams.settings import SluiceSettings
from tests.deploy.readers import (
    K8S,
    LOOPBACK,
    METRICS_ROLES,
    MODALITIES,
    assert_known_metrics,
    check_sluice_argv,
    effective_settings,
    k8s_argv,
    k8s_configmaps,
    k8s_container_env,
    k8s_containers,
    k8s_is_sluice_image,
    k8s_kind,
    kustomization,
    metrics_port,
    role_of,
    settings_field,
    sluice_only,
)


def test_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization()["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present, f"kustomization resources {sorted(listed)} != manifests {sorted(present)}"


def _deployment_sluice_containers(deployment: dict) -> list[tuple[dict, list[str]]]:
    return [(c, k8s_argv(c)) for c in k8s_containers(deployment) if k8s_is_sluice_image(c.get("image", ""))]


def test_k8s_sluice_commands() -> None:
    roles = []
    modalities = []
    for name, dep in k8s_kind("Deployment").items():
        main = [c["name"] for c in dep["spec"]["template"]["spec"]["containers"]]
        for container, argv in _deployment_sluice_containers(dep):
            sub, mods = check_sluice_argv(argv, f"Deployment {name} container {container['name']}")
            if container["name"] in main:
                roles.append(sub)
                modalities += mods
    for role in ("worker", "sink", "notifier"):
        assert role in roles, f"no Deployment runs `sluice {role}`"
    assert sorted(modalities) == sorted(MODALITIES), f"one worker Deployment per modality expected, got {modalities}"


def test_k8s_metrics_ports_and_annotations() -> None:
    for name, dep in k8s_kind("Deployment").items():
        annotations = dep["spec"]["template"]["metadata"].get("annotations") or {}
        for container in dep["spec"]["template"]["spec"]["containers"]:
            argv = k8s_argv(container)
            role = role_of(argv)
            if role not in METRICS_ROLES:
                continue
            s = effective_settings(sluice_only(k8s_container_env(container)))
            port = metrics_port(s, role)
            assert port is not None, f"{name}: no {role} metrics port configured"
            assert s.metrics_host not in LOOPBACK, (
                f"{name}: metrics bind to {s.metrics_host}, unreachable from Prometheus"
            )
            declared = {p["containerPort"] for p in container.get("ports") or []}
            assert port in declared, f"{name}: metrics on {port}, containerPorts {sorted(declared)}"
            assert str(annotations.get("prometheus.io/port")) == str(port), f"{name}: prometheus.io/port annotation"


def test_k8s_default_engine_needs_no_gpu() -> None:
    # The default engine is CPU onnxruntime; the GPU request stays a commented alternative.
    for name, dep in k8s_kind("Deployment").items():
        for container in k8s_containers(dep):
            resources = json.dumps(container.get("resources") or {})
            assert "nvidia.com/gpu" not in resources, f"{name}/{container['name']} requests a GPU by default"
    assert re.search(r"#\s*nvidia\.com/gpu:\s*1", (K8S / "worker-frame.yaml").read_text()), (
        "worker-frame.yaml should keep the GPU request as a commented alternative"
    )


def test_k8s_sink_requires_the_dsn_secret() -> None:
    # The DSN carries a password, so it is not in the ConfigMap, and without it the
    # sink would fall back to the embedded default: the Secret must be mandatory.
    for data in k8s_configmaps().values():
        assert "SLUICE_CLICKHOUSE__DSN" not in data, "the ClickHouse DSN holds a password; keep it in a Secret"
    for name, dep in k8s_kind("Deployment").items():
        for container in dep["spec"]["template"]["spec"]["containers"]:
            if role_of(k8s_argv(container)) == "sink":
                refs = [s["secretRef"] for s in container.get("envFrom") or [] if "secretRef" in s]
                assert refs and not any(r.get("optional") for r in refs), f"{name}: the DSN Secret must not be optional"


def _modality_topic(settings: SluiceSettings, name: str) -> tuple[str, int]:
    row = modality(name)
    return row.input_topic(settings.kafka.topics), row.partitions(settings.kafka.topics)


def test_keda_scaledobjects_match_workers() -> None:
    deployments = k8s_kind("Deployment")
    scaled = k8s_kind("ScaledObject")
    assert scaled, "no KEDA ScaledObjects"
    covered = set()
    for name, so in scaled.items():
        spec = so["spec"]
        target = spec["scaleTargetRef"]["name"]
        assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert target in deployments, f"ScaledObject {name} targets unknown Deployment {target}"
        dep = deployments[target]
        assert "replicas" not in dep["spec"], f"{target}: KEDA owns replicas; a fixed count would fight the HPA"
        containers = {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}
        source = spec["scaleTargetRef"].get("envSourceContainerName") or next(iter(containers))
        assert source in containers, f"ScaledObject {name}: envSourceContainerName {source!r} is not a container"
        container = containers[source]
        argv = k8s_argv(container)
        sub, modalities = check_sluice_argv(argv, f"Deployment {target}")
        assert sub == "worker" and len(modalities) == 1, f"{name} must scale a single-modality worker"
        modality = modalities[0]
        env = k8s_container_env(container)
        settings = effective_settings(sluice_only(env))
        topic, partitions = _modality_topic(settings, modality)
        assert spec["minReplicaCount"] == 1, f"{name}: minReplicaCount"
        assert spec["maxReplicaCount"] == partitions, (
            f"{name}: maxReplicaCount {spec['maxReplicaCount']} != {topic} partitions {partitions}"
        )
        triggers = spec["triggers"]
        assert triggers and all(t["type"] == "kafka" for t in triggers), f"{name}: kafka triggers only"
        for trigger in triggers:
            md = trigger["metadata"]
            assert md["consumerGroup"] == f"{settings.worker.group_prefix}-{modality}", f"{name}: consumerGroup"
            assert md["topic"] == topic, f"{name}: topic {md['topic']} != {topic}"
            assert int(md["lagThreshold"]) > 0
            # Lag of a group without commits is counted as the consumer would start.
            reset = KafkaSettings().consumer_options()["auto_offset_reset"]
            assert md.get("offsetResetPolicy", "latest") == reset, f"{name}: offsetResetPolicy must be {reset}"
            if "bootstrapServersFromEnv" in md:
                var = md["bootstrapServersFromEnv"]
                assert settings_field(var) == "kafka.bootstrap_servers", f"{name}: {var} is not the broker list"
                assert var in env, f"{name}: {var} is not in {target}'s environment"
            else:
                assert md["bootstrapServers"] == settings.kafka.bootstrap_servers, f"{name}: bootstrapServers"
            for key in ("metricName", "query"):
                if key in md:
                    assert_known_metrics(str(md[key]), f"ScaledObject {name} {key}")
        covered.add(modality)
    assert covered == MODALITIES, f"KEDA scales {sorted(covered)}, workers exist for {sorted(MODALITIES)}"
