"""Every SLUICE_* name in the deployment files is a real setting, and every
`sluice` command line is one the CLI accepts.

pydantic-settings (extra="ignore") would otherwise ignore an environment
variable with a typo without a word.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from streams.cli import build_parser
from tests.deploy.readers import (
    CLICKHOUSE_TABLES,
    REPO,
    SUBCOMMANDS,
    check_sluice_argv,
    compose_service_env,
    deploy_files,
    effective_settings,
    image_sluice_env,
    k8s_configmaps,
    rel,
    settings_field,
    sluice_only,
    sluice_services,
)

# Environment variables with a SLUICE_ prefix that are not settings fields but
# are read by the code directly.
NON_FIELD_ENV = {"SLUICE_CONFIG": REPO / "streams" / "settings.py"}

SLUICE_ENV_RE = re.compile(r"(?<![A-Za-z0-9_])SLUICE_[A-Z0-9_]+")
# `sluice.<name>`, not preceded by a dot (so `redis.sluice.svc` is not read as one).
DOTTED_SLUICE_RE = re.compile(r"(?<![\w.])sluice\.([a-z][a-z0-9_-]*)")


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


@pytest.mark.parametrize("path", deploy_files(), ids=rel)
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
                problems.append(f"{rel(path)}:{lineno}: {exc}")
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


def test_dotted_names_are_topics_or_tables() -> None:
    topics = effective_settings({}).kafka.topics
    topic_names = set(topics.names())
    allowed = {n.split(".", 1)[1] for n in topic_names} | CLICKHOUSE_TABLES
    problems = []
    for path in deploy_files():
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for name in DOTTED_SLUICE_RE.findall(line):
                if name not in allowed:
                    problems.append(f"{rel(path)}:{lineno}: sluice.{name} is neither a topic nor a Sluice table")
    assert not problems, "\n".join(problems)
