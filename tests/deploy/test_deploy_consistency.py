"""The deployment files must stay consistent with the code.

No Docker and no cluster: the compose files, the Kubernetes manifests, the
Prometheus config, the Grafana dashboard and the Dockerfile are parsed and
checked against `streams.config.SluiceSettings` and the contracts below. Each
check names the file and the thing that drifted, e.g. an environment variable
with a typo, which pydantic-settings (extra="ignore") would otherwise ignore
without a word.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import io
import json
import os
import re
import shlex
import types
import typing
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ValidationError

from consumers.metrics import SinkMetrics, WorkerMetrics
from streams.cli import build_parser
from streams.config import KafkaSettings, SluiceSettings
from streams.notifier import NotifierMetrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = REPO / "docker-compose.yml"
OVERLAYS = {
    "observability": DEPLOY / "compose" / "observability.yml",
    "scale-workers": DEPLOY / "compose" / "scale-workers.yml",
}
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA_DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yml"
GRAFANA_DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
GRAFANA_DASHBOARDS = DEPLOY / "grafana" / "dashboards"
MIGRATIONS = DEPLOY / "clickhouse" / "migrations"

# --- Contracts with the code -------------------------------------------------

# `sluice` subcommands and their own subcommands (None: takes none). Checked
# against streams.cli.build_parser(), which also parses every command line below.
SUBCOMMANDS: dict[str, set[str] | None] = {
    "stack": {"up", "down", "status"},
    "topics": {"create"},
    "simulate": None,
    "worker": None,
    "sink": None,
    "notifier": None,
    "demo": None,
    "config": None,
    "clickhouse": {"migrate", "query"},
    "bench": {"engines", "pipeline"},
}
# `stack`, `demo` and `bench pipeline` start the embedded local stack: never what a container should run.
LOCAL_ONLY_SUBCOMMANDS = {"stack", "demo", "bench"}
MODALITIES = {"frame", "audio"}
# Roles whose processes serve Prometheus metrics, and the settings section holding the port.
METRICS_ROLES = {"worker": "worker", "sink": "sink", "notifier": "notifier"}

# Every Prometheus metric Sluice exports: name -> (type, labels), as exposed
# (counters with _total). Checked against the metric classes in the code.
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "sluice_worker_messages_total": ("counter", frozenset({"modality"})),
    "sluice_worker_results_total": ("counter", frozenset({"modality"})),
    "sluice_worker_dead_letters_total": ("counter", frozenset({"modality", "stage"})),
    "sluice_worker_batch_size": ("histogram", frozenset({"modality"})),
    "sluice_worker_inference_seconds": ("histogram", frozenset({"modality"})),
    "sluice_worker_capture_to_result_seconds": ("histogram", frozenset({"modality"})),
    "sluice_worker_inflight_messages": ("gauge", frozenset({"modality"})),
    "sluice_worker_paused": ("gauge", frozenset({"modality"})),
    "sluice_worker_commits_total": ("counter", frozenset({"modality"})),
    "sluice_sink_rows_inserted_total": ("counter", frozenset()),
    "sluice_sink_insert_seconds": ("histogram", frozenset()),
    "sluice_sink_buffered_rows": ("gauge", frozenset()),
    "sluice_sink_insert_failures_total": ("counter", frozenset()),
    "sluice_notifier_alerts_total": ("counter", frozenset({"rule"})),
    "sluice_notifier_suppressed_total": ("counter", frozenset({"rule"})),
}
# Labels Prometheus attaches at scrape time (job/instance) or our relabelling adds.
TARGET_LABELS = {"job", "instance", "service"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# ClickHouse objects the dashboard may query (the lead's migrations create them).
CLICKHOUSE_DATABASE = "sluice"
CLICKHOUSE_TABLES = {"inference_results", "inference_results_dedup"}

# Environment variables with a SLUICE_ prefix that are not settings fields but
# are read by the code directly.
NON_FIELD_ENV = {"SLUICE_CONFIG": REPO / "streams" / "config.py"}

# Deployment files scanned as text for SLUICE_* names and topic names.
SCANNED_SUFFIXES = {".yml", ".yaml", ".json", ".md", ".toml", ""}
SLUICE_ENV_RE = re.compile(r"(?<![A-Za-z0-9_])SLUICE_[A-Z0-9_]+")
# `sluice.<name>`, not preceded by a dot (so `redis.sluice.svc` is not read as one).
DOTTED_SLUICE_RE = re.compile(r"(?<![\w.])sluice\.([a-z][a-z0-9_-]*)")


# --- Helpers -----------------------------------------------------------------


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def deploy_files() -> list[Path]:
    files = [COMPOSE, DOCKERIGNORE]
    for path in sorted(DEPLOY.rglob("*")):
        if not path.is_file() or MIGRATIONS in path.parents:
            continue
        if path.suffix in SCANNED_SUFFIXES:
            files.append(path)
    return [f for f in files if f.exists()]


def _section_model(annotation: object) -> type[BaseModel] | None:
    """The BaseModel a field holds, unwrapping Optional/Union; None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        models = [m for m in (_section_model(a) for a in typing.get_args(annotation)) if m is not None]
        return models[0] if len(models) == 1 else None
    return None


def settings_field(env_name: str) -> str:
    """The dotted settings path an environment variable sets, or raise ValueError.

    Mirrors pydantic-settings: prefix SLUICE_, nested delimiter __, case-insensitive.
    A name that stops at a section (e.g. SLUICE_KAFKA) is rejected: it would have
    to carry the whole section as JSON, which the deployment files never want.
    """
    prefix = SluiceSettings.model_config.get("env_prefix", "")
    delimiter = SluiceSettings.model_config.get("env_nested_delimiter")
    assert prefix.upper() == "SLUICE_" and delimiter == "__", "SluiceSettings changed its env naming"
    if not env_name.upper().startswith(prefix.upper()):
        raise ValueError(f"{env_name}: not {prefix}-prefixed")
    parts = env_name[len(prefix) :].lower().split(delimiter)
    model: type[BaseModel] = SluiceSettings
    walked: list[str] = []
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            known = ", ".join(sorted(fields))
            where = ".".join(walked) or "SluiceSettings"
            raise ValueError(f"{env_name}: {where} has no field {part!r} (fields: {known})")
        walked.append(part)
        sub = _section_model(fields[part].annotation)
        last = i == len(parts) - 1
        if last and sub is not None:
            raise ValueError(f"{env_name}: {'.'.join(walked)} is a section; set its knobs as {env_name}__<KNOB>")
        if not last and sub is None:
            raise ValueError(f"{env_name}: {'.'.join(walked)} is a value, not a section")
        if sub is not None:
            model = sub
    return ".".join(walked)


def effective_settings(env: dict[str, str]) -> SluiceSettings:
    """SluiceSettings as a process with exactly this SLUICE_* environment sees them."""
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("SLUICE_")}
    with mock.patch.dict(os.environ, {**base, **env}, clear=True):
        return SluiceSettings()


_INTERPOLATION_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: object) -> str:
    """Compose variable interpolation with an empty shell environment: the defaults a
    user gets without a .env file. `${VAR:?msg}` (required) is an error here."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group(4):
            return ""
        op, default = m.group(2), m.group(3)
        if op and op.endswith("?"):
            raise AssertionError(f"{m.group(0)} has no default; the stack must start without a .env file")
        return default if op else ""

    return _INTERPOLATION_RE.sub(sub, text)


def env_mapping(environment: object) -> dict[str, str]:
    if environment is None:
        return {}
    if isinstance(environment, dict):
        return {str(k): interpolate(v) for k, v in environment.items()}
    out: dict[str, str] = {}
    for item in environment:
        key, _, val = str(item).partition("=")
        out[key] = interpolate(val)
    return out


def load_yaml(path: Path) -> object:
    with path.open() as fh:
        return yaml.safe_load(fh)


def load_yaml_all(path: Path) -> list[dict]:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


# --- Dockerfile ----------------------------------------------------------------


@functools.cache
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined, comments dropped."""
    lines: list[str] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    out = []
    for line in lines:
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def runtime_stage() -> list[tuple[str, str]]:
    """Instructions of the last stage: what the shipped image is made of."""
    instrs = dockerfile_instructions()
    starts = [i for i, (instr, _) in enumerate(instrs) if instr == "FROM"]
    return instrs[starts[-1] :]


def _dockerfile_env(args: str) -> dict[str, str]:
    out = {}
    for token in shlex.split(args):
        key, eq, val = token.partition("=")
        if eq:
            out[key] = val
    return out


@functools.cache
def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in runtime_stage():
        if instr == "ENV":
            env.update(_dockerfile_env(args))
    return env


def image_sluice_env() -> dict[str, str]:
    return {k: v for k, v in image_env().items() if k.startswith("SLUICE_")}


def _json_array(args: str, what: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{what} must be exec (JSON) form"
    return value


def image_entrypoint() -> list[str]:
    entry = [args for instr, args in runtime_stage() if instr == "ENTRYPOINT"]
    assert entry, "Dockerfile has no ENTRYPOINT"
    return _json_array(entry[-1], "ENTRYPOINT")


def copy_instructions() -> list[tuple[list[str], str]]:
    """(sources, destination) of COPY instructions that read the build context."""
    out = []
    for instr, args in dockerfile_instructions():
        if instr not in {"COPY", "ADD"}:
            continue
        tokens = shlex.split(args)
        if any(t.startswith("--from") for t in tokens):
            continue
        paths = [t for t in tokens if not t.startswith("--")]
        out.append((paths[:-1], paths[-1]))
    return out


# --- Compose -------------------------------------------------------------------


@functools.cache
def compose() -> dict:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@functools.cache
def overlay(name: str) -> dict:
    data = load_yaml(OVERLAYS[name])
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def uses_sluice_image(service: dict) -> bool:
    build = service.get("build")
    if isinstance(build, dict) and build.get("dockerfile") == "deploy/docker/Dockerfile":
        return True
    image = str(service.get("image", ""))
    return image.split(":")[0].rsplit("/", 1)[-1] == "sluice"


def compose_argv(service: dict) -> list[str]:
    def as_list(v: object) -> list[str]:
        if v is None:
            return []
        return shlex.split(v) if isinstance(v, str) else [str(x) for x in v]

    entrypoint = [interpolate(a) for a in as_list(service.get("entrypoint"))] or image_entrypoint()
    command = [interpolate(a) for a in as_list(service.get("command"))]
    if not command:
        cmd = [args for instr, args in runtime_stage() if instr == "CMD"]
        command = _json_array(cmd[-1], "CMD") if cmd else []
    return entrypoint + command


def sluice_services() -> dict[str, dict]:
    return {name: svc for name, svc in compose()["services"].items() if uses_sluice_image(svc)}


def compose_service_env(name: str) -> dict[str, str]:
    return {**image_env(), **env_mapping(compose()["services"][name].get("environment"))}


# --- Kubernetes ----------------------------------------------------------------


@functools.cache
def kustomization() -> dict:
    return load_yaml(K8S / "kustomization.yaml")


@functools.cache
def k8s_docs() -> list[tuple[str, dict]]:
    docs = []
    for resource in kustomization()["resources"]:
        for doc in load_yaml_all(K8S / resource):
            docs.append((resource, doc))
    return docs


def k8s_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_docs() if doc.get("kind") == kind}


def k8s_configmaps() -> dict[str, dict[str, str]]:
    return {
        name: {k: str(v) for k, v in (doc.get("data") or {}).items()} for name, doc in k8s_kind("ConfigMap").items()
    }


def k8s_containers(deployment: dict) -> list[dict]:
    spec = deployment["spec"]["template"]["spec"]
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def k8s_is_sluice_image(image: str) -> bool:
    names = {"sluice"} | {i.get("newName", "") for i in kustomization().get("images", []) if i.get("name") == "sluice"}
    return image.split(":")[0] in names


def k8s_argv(container: dict) -> list[str]:
    command = list(container.get("command") or []) or image_entrypoint()
    return [str(c) for c in command + list(container.get("args") or [])]


def k8s_container_env(container: dict) -> dict[str, str]:
    """What the container's process sees from the image, ConfigMaps and literal env.
    Secrets are not in the repository, so secret-sourced values are absent."""
    env = dict(image_env())
    configmaps = k8s_configmaps()
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            ref = source["configMapRef"]["name"]
            assert ref in configmaps, f"envFrom references ConfigMap {ref!r}, which the kustomization does not define"
            env.update(configmaps[ref])
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = str(var["value"])
    return env


def sluice_only(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.upper().startswith("SLUICE_")}


# --- Command checks ------------------------------------------------------------


def check_sluice_argv(argv: list[str], where: str) -> tuple[str, list[str]]:
    """Validate a `sluice ...` command line; returns (subcommand, worker modalities)."""
    assert argv and argv[0] == "sluice", f"{where}: runs {argv!r}, not the sluice console script"
    assert len(argv) > 1, f"{where}: `sluice` without a subcommand"
    sub = argv[1]
    assert sub in SUBCOMMANDS, f"{where}: unknown subcommand `sluice {sub}` (known: {sorted(SUBCOMMANDS)})"
    assert sub not in LOCAL_ONLY_SUBCOMMANDS, f"{where}: `sluice {sub}` starts the local stack; not for containers"
    nested = SUBCOMMANDS[sub]
    if nested is not None:
        assert len(argv) > 2 and argv[2] in nested, (
            f"{where}: `sluice {sub}` needs one of {sorted(nested)}, got {argv[2:]}"
        )
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            build_parser().parse_args(argv[1:])
    except SystemExit:
        raise AssertionError(f"{where}: `{shlex.join(argv)}` does not parse: {stderr.getvalue().strip()}") from None
    modalities: list[str] = []
    if sub == "worker":
        rest = argv[2:]
        for i, token in enumerate(rest):
            if token == "--modality":
                assert i + 1 < len(rest), f"{where}: --modality without a value"
                modalities.append(rest[i + 1])
            elif token.startswith("--modality="):
                modalities.append(token.split("=", 1)[1])
        assert modalities, f"{where}: `sluice worker` without --modality (one consumer group per deployed process)"
        unknown = set(modalities) - MODALITIES
        assert not unknown, f"{where}: unknown modality {sorted(unknown)} (known: {sorted(MODALITIES)})"
    return sub, modalities


def role_of(argv: list[str]) -> str:
    return argv[1] if len(argv) > 1 else ""


def metrics_port(settings: SluiceSettings, role: str) -> int | None:
    return getattr(settings, METRICS_ROLES[role]).metrics_port


# ==============================================================================
# Tests: environment variables
# ==============================================================================


def test_settings_walker_rejects_typos() -> None:
    # The checker itself must be able to fail, or every test below is vacuous.
    assert settings_field("SLUICE_KAFKA__BOOTSTRAP_SERVERS") == "kafka.bootstrap_servers"
    assert settings_field("SLUICE_kafka__topics__frames") == "kafka.topics.frames"
    assert settings_field("SLUICE_LOG_LEVEL") == "log_level"
    for bad in (
        "SLUICE_KAFKA__BOOTSTRAP_SERVER",  # typo in the knob
        "SLUICE_KAFKA_BOOTSTRAP_SERVERS",  # single underscore: not nested
        "SLUICE_KAFKA",  # a whole section
        "SLUICE_LOG_LEVEL__X",  # a value is not a section
        "SLUICE_WORKERS__METRICS_PORT",  # typo in the section
    ):
        with pytest.raises(ValueError):
            settings_field(bad)


def test_subcommand_contract_matches_the_cli() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(SUBCOMMANDS), "SUBCOMMANDS drifted from streams/cli.py"
    for name, sub in subparsers.choices.items():
        positional = [a for a in sub._actions if not a.option_strings and a.choices]
        nested = set(positional[0].choices) if positional else None
        assert nested == SUBCOMMANDS[name], f"`sluice {name}` takes {nested}, the contract says {SUBCOMMANDS[name]}"
    with pytest.raises(AssertionError):
        check_sluice_argv(["sluice", "worker", "--modality", "video"], "t")
    with pytest.raises(AssertionError):
        check_sluice_argv(["sluice", "simulate", "--camras", "2"], "t")


@pytest.mark.parametrize("path", deploy_files(), ids=_rel)
def test_every_sluice_env_var_is_a_setting(path: Path) -> None:
    problems = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        for name in SLUICE_ENV_RE.findall(line):
            if name in NON_FIELD_ENV:
                assert name in NON_FIELD_ENV[name].read_text(), f"{name} is no longer read by {NON_FIELD_ENV[name]}"
                continue
            try:
                settings_field(name)
            except ValueError as exc:
                problems.append(f"{_rel(path)}:{lineno}: {exc}")
    assert not problems, "\n".join(problems)


def test_dockerfile_env_is_valid() -> None:
    env = image_sluice_env()
    assert env, "the image should set SLUICE_CLICKHOUSE__MIGRATIONS_DIR"
    for name in env:
        settings_field(name)
    effective_settings(env)


@pytest.mark.parametrize("name", sorted(sluice_services()))
def test_compose_service_settings_parse(name: str) -> None:
    env = sluice_only(compose_service_env(name))
    try:
        effective_settings(env)
    except ValidationError as exc:
        pytest.fail(f"docker-compose.yml service {name}: settings do not validate:\n{exc}")


def test_k8s_configmap_settings_parse() -> None:
    for name, data in k8s_configmaps().items():
        for key in data:
            settings_field(key)
        try:
            effective_settings({**image_sluice_env(), **sluice_only(data)})
        except ValidationError as exc:
            pytest.fail(f"ConfigMap {name}: settings do not validate:\n{exc}")


# ==============================================================================
# Tests: Dockerfile and build context
# ==============================================================================


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
    assert any(re.search(r"pip install (\S+ )*\.(\s|$|&)", r) for r in installs), "expected `pip install .`"
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


def _dockerignore_patterns() -> list[tuple[bool, str]]:
    out = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        out.append((negate, line.lstrip("!").strip("/")))
    return out


def dockerignored(path: str) -> bool:
    """Approximates Docker's .dockerignore matching: last matching pattern wins, a
    pattern matching a directory excludes everything under it."""
    candidates = [path] + ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
    ignored = False
    for negate, pattern in _dockerignore_patterns():
        variants = {pattern, pattern[3:]} if pattern.startswith("**/") else {pattern}
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_build_needs() -> None:
    assert dockerignored("tests/deploy/test_deploy_consistency.py"), "sanity: tests are excluded"
    needed = ["pyproject.toml", "README.md"] + [s for srcs, _ in copy_instructions() for s in srcs]
    # Package data must reach `pip install .` (see [tool.setuptools.package-data]).
    for pattern in ("schemas/*.avsc", "schemas/registry.json", "engines/models/*/*/*", "streams/*.toml"):
        needed += [str(p.relative_to(REPO)) for p in REPO.glob(pattern)]
    ignored = sorted({n for n in needed if dockerignored(n.rstrip("/"))})
    assert not ignored, f".dockerignore drops files the image build needs: {ignored}"


# ==============================================================================
# Tests: docker-compose.yml and overlays
# ==============================================================================


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


@functools.cache
def prometheus_targets() -> dict[str, int]:
    """compose service name -> port Prometheus scrapes."""
    out: dict[str, int] = {}
    for job in load_yaml(PROMETHEUS)["scrape_configs"]:
        for sd in job.get("dns_sd_configs") or []:
            for name in sd["names"]:
                out[name] = int(sd["port"])
        for sc in job.get("static_configs") or []:
            for target in sc["targets"]:
                host, _, port = target.rpartition(":")
                out[host] = int(port)
    return out


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
    for probed in re.findall(r":(\d+)/metrics", health):
        assert int(probed) == port, f"{name}: healthcheck probes :{probed}, metrics are on {port}"


def test_prometheus_only_scrapes_known_services() -> None:
    services = set(compose()["services"]) | set(overlay("observability")["services"]) | {"localhost"}
    unknown = set(prometheus_targets()) - services
    assert not unknown, f"prometheus.yml scrapes hosts that are not compose services: {sorted(unknown)}"


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


# ==============================================================================
# Tests: Kubernetes
# ==============================================================================


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


def _modality_topic(settings: SluiceSettings, modality: str) -> tuple[str, int]:
    topics = settings.kafka.topics
    if modality == "frame":
        return topics.frames, topics.frames_partitions
    if modality == "audio":
        return topics.audio, topics.audio_partitions
    raise AssertionError(modality)


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


# ==============================================================================
# Tests: topics and ClickHouse objects named in the files
# ==============================================================================


def test_dotted_names_are_topics_or_tables() -> None:
    topics = effective_settings({}).kafka.topics
    topic_names = {topics.frames, topics.audio, topics.results, topics.alerts, topics.dead_letters}
    allowed = {n.split(".", 1)[1] for n in topic_names} | CLICKHOUSE_TABLES
    problems = []
    for path in deploy_files():
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for name in DOTTED_SLUICE_RE.findall(line):
                if name not in allowed:
                    problems.append(f"{_rel(path)}:{lineno}: sluice.{name} is neither a topic nor a Sluice table")
    assert not problems, "\n".join(problems)


# ==============================================================================
# Tests: Prometheus metric names in the dashboard (and anywhere else)
# ==============================================================================


_METRIC_TOKEN_RE = re.compile(r"\bsluice_[a-z0-9_]+\b")


def resolve_metric(token: str) -> tuple[str, bool]:
    """(base metric name, is a histogram bucket series) or raise AssertionError."""
    if token in METRICS:
        kind, _ = METRICS[token]
        assert kind != "histogram", f"{token} is a histogram; query {token}_bucket/_sum/_count"
        return token, False
    for suffix in HISTOGRAM_SUFFIXES:
        base = token.removesuffix(suffix)
        if base != token and METRICS.get(base, ("",))[0] == "histogram":
            return base, suffix == "_bucket"
    raise AssertionError(f"unknown metric {token!r}")


def promql_labels(expr: str) -> set[str]:
    labels = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {g.strip() for g in group.split(",") if g.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        if matchers.startswith("{") or "}}" in matchers:
            continue
        labels |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return labels


def assert_known_metrics(expr: str, where: str) -> set[str]:
    used = set()
    allowed_labels = set(TARGET_LABELS)
    for token in _METRIC_TOKEN_RE.findall(expr):
        try:
            base, bucket = resolve_metric(token)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from None
        used.add(base)
        allowed_labels |= METRICS[base][1]
        if bucket:
            allowed_labels.add("le")
    # Legend templates ({{modality}}) are not PromQL; strip them before reading labels.
    unknown = promql_labels(re.sub(r"\{\{[^}]*\}\}", "", expr)) - allowed_labels
    assert not unknown, f"{where}: labels {sorted(unknown)} are not on {sorted(used)}"
    return used


def _walk(node: object, path: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


@functools.cache
def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(GRAFANA_DASHBOARDS.glob("*.json"))}


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
        for path, value in _walk(dash):
            if isinstance(value, str) and "sluice_" in value:
                used |= assert_known_metrics(value, f"{fname} {path}")
    missing = set(METRICS) - used
    assert not missing, f"metrics without a dashboard panel: {sorted(missing)}"


def test_metric_names_in_other_deploy_files() -> None:
    for path in deploy_files():
        if path.suffix == ".json":
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for token in _METRIC_TOKEN_RE.findall(line):
                try:
                    resolve_metric(token)
                except AssertionError as exc:
                    if "is a histogram" in str(exc):
                        continue  # prose may name a histogram by its family name
                    raise AssertionError(f"{_rel(path)}:{lineno}: {exc}") from None


def exported_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """What the code's metric classes define, as exposed: name -> (type, labels)."""
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for cls in (WorkerMetrics, SinkMetrics, NotifierMetrics):
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


# ==============================================================================
# Tests: Grafana provisioning and the ClickHouse panels
# ==============================================================================


@functools.cache
def datasources() -> dict[str, str]:
    return {d["uid"]: d["type"] for d in load_yaml(GRAFANA_DATASOURCES)["datasources"]}


def test_dashboard_datasources_are_provisioned() -> None:
    for fname, dash in dashboards().items():
        for path, value in _walk(dash):
            if path.endswith("datasource.uid") and not str(value).startswith("-- "):
                dtype = dict(_walk(dash)).get(path.removesuffix(".uid") + ".type")
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


_SQL_KEYWORDS = {
    "select", "from", "where", "group", "by", "order", "as", "and", "or", "not", "in", "desc", "asc",
    "limit", "having", "final", "with", "case", "when", "then", "else", "end", "interval", "second",
    "minute", "hour", "day", "is", "null", "distinct", "on", "join", "left", "settings",
}  # fmt: skip


def sql_columns(sql: str) -> set[str]:
    """Identifiers in a dashboard query that must be table columns: everything but
    keywords, functions, aliases, Grafana macros, literals and the table name."""
    text = re.sub(r"'(?:[^'\\]|\\.)*'", " ", sql)  # string literals
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # macros and variables, keeping their arguments
    text = re.sub(r"\b[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*\b", " ", text)  # db.table
    aliases = {a.lower() for a in re.findall(r"\bAS\s+([A-Za-z_][A-Za-z0-9_]*)", text, flags=re.IGNORECASE)}
    functions = {f.lower() for f in re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*\(", text)}
    idents = {i.lower() for i in re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)\b", text)}
    return idents - _SQL_KEYWORDS - aliases - functions


# `db.table` (identifiers only, so `quantile(0.1)` is not read as one).
_TABLE_REF_RE = re.compile(r"\b([A-Za-z_]\w*)\.([A-Za-z_]\w*)\b")


def clickhouse_queries() -> list[tuple[str, str]]:
    out = []
    for fname, dash in dashboards().items():
        for path, value in _walk(dash):
            if path.endswith(".rawSql"):
                out.append((f"{fname} {path}", str(value)))
    return out


def test_sql_column_extraction() -> None:
    sql = "SELECT $__timeInterval(ts) AS time, model, count() / $__interval_s AS n FROM sluice.t WHERE $__timeFilter(ts) AND label = 'x y' GROUP BY time, model"
    assert sql_columns(sql) == {"ts", "model", "label"}


# An optional database qualifier: `db.`, `\`db\`.` or the migrations' `${database}.` placeholder.
_DB_PREFIX = r"(?:(?:`?\w+`?|\$\{\w+\})\.)?"


@functools.cache
def migration_columns() -> dict[str, set[str]]:
    """table -> columns, from CREATE TABLE and ALTER TABLE ... ADD COLUMN in the migrations."""
    tables: dict[str, set[str]] = {}
    files = sorted(MIGRATIONS.glob("*.sql")) if MIGRATIONS.is_dir() else []
    for path in files:
        sql = re.sub(r"--[^\n]*", "", path.read_text())
        for m in re.finditer(
            rf"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?{_DB_PREFIX}`?(\w+)`?\s*(?:ON\s+CLUSTER\s+\S+\s*)?\(",
            sql,
            re.IGNORECASE,
        ):
            depth, i, start = 1, m.end(), m.end()
            items, current = [], start
            while i < len(sql) and depth:
                ch = sql[i]
                if ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                elif ch == "," and depth == 1:
                    items.append(sql[current:i])
                    current = i + 1
                i += 1
            items.append(sql[current : i - 1])
            cols = set()
            for item in items:
                words = item.strip().split()
                if words and words[0].upper() not in {"INDEX", "PROJECTION", "CONSTRAINT", "PRIMARY"}:
                    cols.add(words[0].strip('`"').lower())
            tables.setdefault(m.group(1).lower(), set()).update(cols)
        for m in re.finditer(rf"ALTER\s+TABLE\s+{_DB_PREFIX}`?(\w+)`?(.*?);", sql, re.IGNORECASE | re.DOTALL):
            for col in re.findall(r"ADD\s+COLUMN\s+(?:IF\s+NOT\s+EXISTS\s+)?`?(\w+)`?", m.group(2), re.IGNORECASE):
                tables.setdefault(m.group(1).lower(), set()).add(col.lower())
        for m in re.finditer(
            rf"CREATE\s+(?:OR\s+REPLACE\s+)?(?:MATERIALIZED\s+)?VIEW\s+(?:IF\s+NOT\s+EXISTS\s+)?{_DB_PREFIX}`?(\w+)`?",
            sql,
            re.IGNORECASE,
        ):
            tables.setdefault(m.group(1).lower(), set())
    return tables


def test_clickhouse_panels_query_sluice_tables() -> None:
    queries = clickhouse_queries()
    assert queries, "the dashboard should have a ClickHouse panel"
    for where, sql in queries:
        refs = set(_TABLE_REF_RE.findall(sql))
        assert refs, f"{where}: name the table with its database"
        for db, table in refs:
            assert db == CLICKHOUSE_DATABASE and table in CLICKHOUSE_TABLES, f"{where}: unexpected table {db}.{table}"


def test_clickhouse_panel_columns_exist_in_migrations() -> None:
    tables = migration_columns()
    used = {col for _, sql in clickhouse_queries() for col in sql_columns(sql)}
    if not tables:
        pytest.skip(f"no ClickHouse migrations yet; the dashboard assumes columns {sorted(used)}")
    for where, sql in clickhouse_queries():
        for _, table in _TABLE_REF_RE.findall(sql):
            assert table in tables, f"{where}: the migrations create no table {table}"
            columns = tables[table] or tables.get("inference_results", set())
            missing = sql_columns(sql) - columns
            assert not missing, f"{where}: columns {sorted(missing)} are not in {table} ({sorted(columns)})"
