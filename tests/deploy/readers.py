"""Readers for the deployment files, and the contracts they are checked against.

No Docker and no cluster: the compose files, the Kubernetes manifests, the
Prometheus config, the Grafana dashboards, the ClickHouse migrations and the
Dockerfile are parsed here into plain Python values, for the tests in
tests/deploy to check against `streams.settings.SluiceSettings`, the CLI and
the metric classes. No test functions live here.
"""

from __future__ import annotations

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

import yaml
from pydantic import BaseModel

from streams.cli import build_parser
from streams.settings import SluiceSettings

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
# against streams.cli.build_parser(), which also parses every deployed command line.
SUBCOMMANDS: dict[str, set[str] | None] = {
    "stack": {"up", "down", "status"},
    "topics": {"create"},
    "simulate": None,
    "worker": None,
    "sink": None,
    "notifier": None,
    "drift": None,
    "demo": None,
    "config": None,
    "clickhouse": {"migrate", "query"},
    "bench": {"engines", "engine", "pipeline", "cookbook"},
    "models": {"list", "build", "activate", "deactivate", "status"},
    "schemas": {"register"},
}
# `stack`, `demo` and `bench pipeline` start the embedded local stack: never what a container should run.
LOCAL_ONLY_SUBCOMMANDS = {"stack", "demo", "bench"}
MODALITIES = {"frame", "audio"}
# Roles whose processes serve Prometheus metrics, and the settings section holding the port.
METRICS_ROLES = {"worker": "worker", "sink": "sink", "notifier": "notifier", "drift": "drift"}

# Every Prometheus metric Sluice exports: name -> (type, labels), as exposed
# (counters with _total). Checked against the metric classes in the code.
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "sluice_worker_messages_total": ("counter", frozenset({"modality"})),
    "sluice_worker_results_total": ("counter", frozenset({"modality"})),
    "sluice_worker_dead_letters_total": ("counter", frozenset({"modality", "stage", "error"})),
    "sluice_worker_inflight_bytes": ("gauge", frozenset({"modality"})),
    "sluice_worker_consumer_lag": ("gauge", frozenset({"modality", "partition"})),
    "sluice_worker_queue_seconds": ("histogram", frozenset({"modality"})),
    "sluice_worker_batch_wait_seconds": ("histogram", frozenset({"modality"})),
    "sluice_worker_batch_size": ("histogram", frozenset({"modality"})),
    "sluice_worker_inference_seconds": ("histogram", frozenset({"modality"})),
    "sluice_worker_capture_to_result_seconds": ("histogram", frozenset({"modality"})),
    "sluice_worker_inflight_messages": ("gauge", frozenset({"modality"})),
    "sluice_worker_paused": ("gauge", frozenset({"modality"})),
    "sluice_worker_commits_total": ("counter", frozenset({"modality"})),
    "sluice_worker_model_version": ("gauge", frozenset({"modality", "model", "role"})),
    "sluice_worker_model_swaps_total": ("counter", frozenset({"modality", "outcome"})),
    "sluice_worker_shadow_results_total": ("counter", frozenset({"modality", "outcome"})),
    "sluice_sink_rows_inserted_total": ("counter", frozenset()),
    "sluice_sink_insert_seconds": ("histogram", frozenset()),
    "sluice_sink_buffered_rows": ("gauge", frozenset()),
    "sluice_sink_insert_failures_total": ("counter", frozenset()),
    "sluice_notifier_alerts_total": ("counter", frozenset({"rule"})),
    "sluice_notifier_suppressed_total": ("counter", frozenset({"rule"})),
    "sluice_notifier_redis_up": ("gauge", frozenset()),
    "sluice_drift_windows_total": ("counter", frozenset({"model", "device_group_kind"})),
    "sluice_drift_flags_total": ("counter", frozenset({"model", "statistic"})),
}
# Labels Prometheus attaches at scrape time (job/instance) or our relabelling adds.
TARGET_LABELS = {"job", "instance", "service"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# ClickHouse objects the dashboard may query (the lead's migrations create them).
CLICKHOUSE_DATABASE = "sluice"
CLICKHOUSE_TABLES = {
    "inference_results", "inference_results_dedup", "shadow_results", "shadow_results_dedup", "drift_events",
    "results_per_minute", "input_stats_per_minute",
}  # fmt: skip

# Deployment files scanned as text for SLUICE_* names and topic names.
SCANNED_SUFFIXES = {".yml", ".yaml", ".json", ".md", ".toml", ""}


# --- Settings and environment ------------------------------------------------


def rel(path: Path) -> str:
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


def sluice_only(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.upper().startswith("SLUICE_")}


def load_yaml(path: Path) -> object:
    with path.open() as fh:
        return yaml.safe_load(fh)


def load_yaml_all(path: Path) -> list[dict]:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


# --- Dockerfile and .dockerignore --------------------------------------------


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


# --- Compose -----------------------------------------------------------------


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


# --- Kubernetes --------------------------------------------------------------


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


# --- Command lines -----------------------------------------------------------


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


# --- Prometheus targets and PromQL metric names ------------------------------


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


METRIC_TOKEN_RE = re.compile(r"\bsluice_[a-z0-9_]+\b")


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
    for token in METRIC_TOKEN_RE.findall(expr):
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


# --- Grafana -----------------------------------------------------------------


def walk(node: object, path: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, node


@functools.cache
def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(GRAFANA_DASHBOARDS.glob("*.json"))}


@functools.cache
def datasources() -> dict[str, str]:
    return {d["uid"]: d["type"] for d in load_yaml(GRAFANA_DATASOURCES)["datasources"]}


def clickhouse_queries() -> list[tuple[str, str]]:
    out = []
    for fname, dash in dashboards().items():
        for path, value in walk(dash):
            if path.endswith(".rawSql"):
                out.append((f"{fname} {path}", str(value)))
    return out


# --- ClickHouse SQL ----------------------------------------------------------


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
TABLE_REF_RE = re.compile(r"\b([A-Za-z_]\w*)\.([A-Za-z_]\w*)\b")


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
