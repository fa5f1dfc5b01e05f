"""Sluice's one configuration, composed from the sections each package declares.

Every knob has a default in its package (`consumers/kafka.py`, `consumers/settings.py`,
`engines/settings.py`, `producers/settings.py`, `streams/apps/settings.py`,
`streams/local/stack.py`), can be set in a TOML file (`--config PATH` or
`SLUICE_CONFIG`), and can be overridden by an environment variable named
`SLUICE_<SECTION>__<KNOB>`, e.g. `SLUICE_KAFKA__BOOTSTRAP_SERVERS=kafka:9092` or
`SLUICE_WORKER__MAX_BATCH_SIZE=32`. Precedence: init arguments > environment >
TOML file > defaults. `sluice config` prints the effective values (secrets masked).

Endpoints (Kafka, ClickHouse, Redis) are plain settings, so the same code runs
against the local stack and against Apache Kafka, a ClickHouse server and Redis.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from consumers.kafka import KafkaSettings
from consumers.settings import ClickHouseSettings, RedisSettings, SinkSettings, WorkerSettings
from engines.settings import EngineSettings
from producers.settings import SimulatorSettings
from schemas.errors import ConfigError, redact_url
from schemas.registry import SchemaRegistrySettings
from streams.apps.settings import DriftSettings, NotifierSettings
from streams.local.stack import StackSettings


class SluiceSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SLUICE_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    clickhouse: ClickHouseSettings = Field(default_factory=ClickHouseSettings)
    sink: SinkSettings = Field(default_factory=SinkSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    notifier: NotifierSettings = Field(default_factory=NotifierSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    simulator: SimulatorSettings = Field(default_factory=SimulatorSettings)
    stack: StackSettings = Field(default_factory=StackSettings)
    schema_registry: SchemaRegistrySettings = Field(default_factory=SchemaRegistrySettings)
    log_level: str = "INFO"
    # Where the metrics endpoints listen. Loopback for the local stack; 0.0.0.0 in containers.
    metrics_host: str = "127.0.0.1"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get("SLUICE_CONFIG")
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)


def load_settings(config_path: Path | None = None) -> SluiceSettings:
    """Settings from defaults, the TOML file (argument or SLUICE_CONFIG) and the environment.
    A file given here is also put in SLUICE_CONFIG, so the processes this one starts read it too.
    A value that does not parse is a ConfigError naming the setting and its environment variable."""
    if config_path is not None:
        if not config_path.is_file():
            raise ConfigError(f"config file {config_path} does not exist")
        os.environ["SLUICE_CONFIG"] = str(config_path)
    try:
        return SluiceSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"SLUICE_{'__'.join(str(p).upper() for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc


def redacted(settings: SluiceSettings) -> dict[str, Any]:
    """The settings as printable JSON data: secrets masked, passwords inside URLs (DSNs) too."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, str) and "://" in value:
            return redact_url(value)
        return value

    return walk(settings.model_dump(mode="json"))


def settings_env(settings: SluiceSettings) -> dict[str, str]:
    """The settings as SLUICE_* environment variables, so a child process sees exactly
    these settings (the demo and the test harness start components this way).
    Unset (None) knobs are left out: the child falls back to their defaults."""
    env: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(f"{prefix}__{name.upper()}" if prefix else name.upper(), getattr(value, name))
        elif isinstance(value, SecretStr):
            env[f"SLUICE_{prefix}"] = value.get_secret_value()
        elif isinstance(value, list | dict | set):
            env[f"SLUICE_{prefix}"] = json.dumps(sorted(value) if isinstance(value, set) else value)
        elif value is not None:
            env[f"SLUICE_{prefix}"] = str(value)

    walk("", settings)
    return env
