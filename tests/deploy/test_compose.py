"""docker-compose.yml, its overlays, the Dockerfile and .dockerignore agree
with each other and with the code."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest

from tests.deploy.readers import (
    CLICKHOUSE_DATABASE,
    MODALITIES,
    OVERLAYS,
    REPO,
    check_sluice_argv,
    compose,
    compose_argv,
    compose_service_env,
    copy_instructions,
    dockerfile_instructions,
    dockerignored,
    effective_settings,
    env_mapping,
    image_entrypoint,
    image_env,
    overlay,
    role_of,
    runtime_stage,
    sluice_only,
    sluice_services,
)

# --- Dockerfile and build context --------------------------------------------


def test_dockerfile_runtime_image() -> None:
    instrs = dockerfile_instructions()
    args = {}
    for instr, rest in instrs:
        if instr == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip().strip('"')
    bases = [rest.split()[0] for instr, rest in instrs if instr == "FROM"]
    resolved = [re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), b) for b in bases]
    assert resolved[-1] == "python:3.11-slim", f"runtime base is {resolved[-1]}"
    assert image_entrypoint() == ["sluice"]
    users = [rest for instr, rest in runtime_stage() if instr == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must run as a non-root user"
    installs = [rest for instr, rest in instrs if instr == "RUN" and "pip install" in rest]
    assert any(re.search(r"pip install (\S+ )*\"?\.\[runtime\]\"?(\s|$|&)", r) for r in installs), (
        "expected `pip install \".[runtime]\"` (the base install is the device SDK alone)"
    )
    for extra in ("train", "local", "tensorrt", "torch"):
        assert not any(extra in r for r in installs), f"the runtime image must not install {extra!r}"


def test_image_migrations_dir_is_copied() -> None:
    target = image_env().get("SLUICE_CLICKHOUSE__MIGRATIONS_DIR")
    assert target, "the image must set SLUICE_CLICKHOUSE__MIGRATIONS_DIR"
    copies = [(srcs, dst) for srcs, dst in copy_instructions() if dst.rstrip("/") == target.rstrip("/")]
    assert copies, f"no COPY puts anything at {target}"
    assert any(s.rstrip("/") == "deploy/clickhouse/migrations" for srcs, _ in copies for s in srcs)


# Written by other parts of the project; the build needs them, but their
# absence in a partial checkout is reported as a skip, not a failure here.
_PENDING_OK = {"README.md", "deploy/clickhouse/migrations"}


def test_dockerfile_copy_sources_exist() -> None:
    missing = [s for srcs, _ in copy_instructions() for s in srcs if not (REPO / s).exists()]
    hard = [m for m in missing if m.rstrip("/") not in _PENDING_OK]
    assert not hard, f"Dockerfile copies paths that do not exist: {hard}"
    if missing:
        pytest.skip(f"not in this checkout yet (the image build needs them): {missing}")


def test_dockerignore_keeps_what_the_build_needs() -> None:
    assert dockerignored("tests/deploy/test_compose.py"), "sanity: tests are excluded"
    needed = ["pyproject.toml", "README.md"] + [s for srcs, _ in copy_instructions() for s in srcs]
    # Package data must reach `pip install .` (see [tool.setuptools.package-data]).
    for pattern in ("schemas/*.avsc", "schemas/registry.json", "engines/models/*/*/*", "streams/apps/*.toml"):
        needed += [str(p.relative_to(REPO)) for p in REPO.glob(pattern)]
    ignored = sorted({n for n in needed if dockerignored(n.rstrip("/"))})
    assert not ignored, f".dockerignore drops files the image build needs: {ignored}"


# --- docker-compose.yml and overlays -----------------------------------------


def test_compose_sluice_commands() -> None:
    roles: dict[str, list[str]] = {}
    modalities: list[str] = []
    for name, svc in sluice_services().items():
        sub, mods = check_sluice_argv(compose_argv(svc), f"docker-compose.yml service {name}")
        roles.setdefault(sub, []).append(name)
        modalities += mods
    for role in ("topics", "worker", "sink", "notifier"):
        assert role in roles, f"docker-compose.yml runs no `sluice {role}`"
    assert sorted(modalities) == sorted(MODALITIES), f"one worker service per modality expected, got {modalities}"


def test_compose_topics_run_before_consumers() -> None:
    services = compose()["services"]
    topics = [n for n, s in sluice_services().items() if compose_argv(s)[1:3] == ["topics", "create"]]
    assert len(topics) == 1, "exactly one one-shot `sluice topics create` service"
    assert services[topics[0]].get("restart", "no") == "no", "the topics service is one-shot"
    for name, svc in sluice_services().items():
        if role_of(compose_argv(svc)) not in {"worker", "sink", "notifier", "simulate"}:
            continue
        dep = (svc.get("depends_on") or {}).get(topics[0])
        assert dep and dep.get("condition") == "service_completed_successfully", (
            f"{name} must wait for {topics[0]} to complete successfully"
        )


def test_compose_health_conditions_have_healthchecks() -> None:
    services = {**compose()["services"]}
    for extra in OVERLAYS:
        for name, svc in overlay(extra)["services"].items():
            services.setdefault(name, svc)
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            continue
        for dep, cond in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if cond.get("condition") == "service_healthy":
                assert services[dep].get("healthcheck"), (
                    f"{name} waits for {dep} to be healthy, which has no healthcheck"
                )


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"kafka://{url}")
    return parts.hostname or "", parts.port or default_port


def test_compose_endpoints_point_at_services() -> None:
    services = compose()["services"]
    kafka_listeners = env_mapping(services["kafka"]["environment"])["KAFKA_ADVERTISED_LISTENERS"]
    advertised = {_host_port(x.split("://", 1)[1], 9092) for x in kafka_listeners.split(",")}
    ch_password = env_mapping(services["clickhouse"]["environment"]).get("CLICKHOUSE_PASSWORD", "")
    for name in sluice_services():
        s = effective_settings(sluice_only(compose_service_env(name)))
        role = role_of(compose_argv(services[name]))
        for server in s.kafka.bootstrap_servers.split(","):
            host, _ = _host_port(server, 9092)
            assert host in services, f"{name}: bootstrap server {server} is not a compose service"
            assert _host_port(server, 9092) in advertised, (
                f"{name}: bootstrap server {server} is not a listener the kafka service advertises ({kafka_listeners})"
            )
        if role == "sink":
            dsn = urlsplit(s.clickhouse.dsn)
            assert dsn.scheme in {"http", "https"}, (
                f"{name}: the sink needs a ClickHouse server DSN, got {s.clickhouse.dsn}"
            )
            assert dsn.hostname in services, f"{name}: ClickHouse host {dsn.hostname} is not a compose service"
            assert (dsn.password or "") == ch_password, f"{name}: DSN password differs from the clickhouse service's"
            assert s.clickhouse.database == CLICKHOUSE_DATABASE
        if role == "notifier":
            redis = urlsplit(s.redis.url)
            assert redis.hostname in services, f"{name}: Redis host {redis.hostname} is not a compose service"


def test_overlays_extend_known_services() -> None:
    base = compose()["services"]
    for name, svc in overlay("scale-workers")["services"].items():
        assert name in base, f"scale-workers.yml scales unknown service {name}"
        assert role_of(compose_argv(base[name])) == "worker", f"scale-workers.yml scales {name}, not a worker"
        assert int(svc["deploy"]["replicas"]) >= 2
        # Several replicas cannot share a container name or a host port.
        assert "container_name" not in base[name], f"{name} sets container_name; it cannot be replicated"
        assert not base[name].get("ports"), f"{name} publishes ports; replicas would collide"
    for name, svc in overlay("observability")["services"].items():
        assert name not in base or "image" not in svc, f"observability.yml replaces the image of {name}"
        for volume in svc.get("volumes") or []:
            src = str(volume).split(":", 1)[0]
            if src.startswith("./"):
                # Relative to the project directory (where docker-compose.yml lives).
                assert (REPO / src).exists(), f"observability.yml mounts {src}, which does not exist"
