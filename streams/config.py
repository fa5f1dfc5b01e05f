"""Sluice's one configuration.

Every knob has a default here, can be set in a TOML file (`--config PATH` or
`SLUICE_CONFIG`), and can be overridden by an environment variable named
`SLUICE_<SECTION>__<KNOB>`, e.g. `SLUICE_KAFKA__BOOTSTRAP_SERVERS=kafka:9092` or
`SLUICE_WORKER__MAX_BATCH_SIZE=32`. Precedence: init arguments > environment >
TOML file > defaults. `sluice config` prints the effective values.

Endpoints (Kafka, ClickHouse, Redis) are plain settings, so the same code runs
against the local stack and against Apache Kafka, a ClickHouse server and Redis.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from aiokafka.helpers import create_ssl_context
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


class TopicSettings(BaseModel):
    """Topic names and partition counts. Every record is keyed by device_id."""

    frames: str = "sluice.frames"
    audio: str = "sluice.audio"
    results: str = "sluice.results"
    alerts: str = "sluice.alerts"
    dead_letters: str = "sluice.dead-letters"
    frames_partitions: int = 8
    audio_partitions: int = 4
    results_partitions: int = 8
    alerts_partitions: int = 2
    dead_letters_partitions: int = 2
    replication_factor: int = 1


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "sluice"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # Group membership. Short enough that a joining worker starts in seconds,
    # long enough that a busy host does not lose its heartbeat.
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    rebalance_timeout_ms: int = 5_000
    # Polling and processing are separate tasks, so this is only a safety net.
    max_poll_interval_ms: int = 300_000
    # Tansu does not wake a waiting fetch when data arrives, so a long wait here
    # adds up to this much latency per hop. Against Apache Kafka it only costs
    # extra idle fetch requests.
    fetch_max_wait_ms: int = 10
    max_partition_fetch_bytes: int = 4 * 1024 * 1024
    # Producer: acks from all in-sync replicas, a short linger so batches form
    # without adding visible latency. Idempotence and transactions stay off:
    # delivery is at-least-once through commit ordering, and Tansu lacks them.
    acks: Literal["all", "1", "0"] = "all"
    linger_ms: int = 5
    compression_type: Literal["lz4", "gzip", "zstd", "snappy"] | None = "lz4"
    max_request_size: int = 4 * 1024 * 1024
    request_timeout_ms: int = 30_000
    topics: TopicSettings = Field(default_factory=TopicSettings)

    def client_options(self) -> dict[str, Any]:
        """aiokafka keyword arguments shared by producers, consumers and admin clients."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = create_ssl_context()
        if self.sasl_mechanism:
            options.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password.get_secret_value() if self.sasl_password else None,
            )
        return options

    def producer_options(self) -> dict[str, Any]:
        return {
            **self.client_options(),
            "acks": "all" if self.acks == "all" else int(self.acks),
            "linger_ms": self.linger_ms,
            "compression_type": self.compression_type,
            "max_request_size": self.max_request_size,
            "enable_idempotence": False,
        }

    def consumer_options(self) -> dict[str, Any]:
        """Manual commits only: Sluice commits an offset once the work it stands for is safe."""
        return {
            **self.client_options(),
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "rebalance_timeout_ms": self.rebalance_timeout_ms,
            "max_poll_interval_ms": self.max_poll_interval_ms,
            "fetch_max_wait_ms": self.fetch_max_wait_ms,
            "max_partition_fetch_bytes": self.max_partition_fetch_bytes,
        }


class EngineSettings(BaseModel):
    kind: Literal["onnxruntime"] = "onnxruntime"
    # ONNX Runtime threads per session; each modality has its own session.
    intra_op_threads: int = 1
    model_repository: Path = REPO_ROOT / "engines" / "models"
    frame_model: str = "frame_classifier"
    frame_model_version: int | None = None  # None: the highest version in the repository
    audio_model: str = "audio_classifier"
    audio_model_version: int | None = None


class WorkerSettings(BaseModel):
    group_prefix: str = "sluice-worker"
    # A batch closes at max_batch_size messages or max_delay_ms after its first
    # message arrived, whichever comes first.
    max_batch_size: int = 16
    max_delay_ms: float = 10.0
    # Polled but not yet acknowledged work. Above either bound the worker pauses
    # its partitions (it keeps polling, so it stays in the group) and resumes
    # below half of it.
    max_inflight_messages: int = 512
    max_inflight_bytes: int = 256 * 1024 * 1024
    commit_interval_ms: int = 250
    top_k: int = 3
    # How long a revoke waits for in-flight results before giving the partition up uncommitted.
    drain_timeout_s: float = 10.0
    metrics_port: int | None = None


class ClickHouseSettings(BaseModel):
    # chdb:///abs/path (embedded engine, one process per path) or http(s)://user:pass@host:8123
    dsn: str = f"chdb://{(REPO_ROOT / '.sluice' / 'clickhouse').as_posix()}"
    database: str = "sluice"
    migrations_dir: Path = REPO_ROOT / "deploy" / "clickhouse" / "migrations"


class SinkSettings(BaseModel):
    group_id: str = "sluice-sink"
    # ClickHouse prefers few large inserts: flush at batch_rows or every flush_interval_ms.
    batch_rows: int = 10_000
    flush_interval_ms: int = 1_000
    # At this many buffered rows (an insert is failing) the sink pauses its partitions.
    max_buffered_rows: int = 100_000
    insert_retry_backoff_ms: int = 500
    # How long a stopping sink keeps retrying its last insert before leaving the rows to be re-read.
    drain_timeout_s: float = 10.0
    metrics_port: int | None = None


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"


class NotifierSettings(BaseModel):
    app_id: str = "sluice-notifier"
    rules_path: Path = Path(__file__).resolve().parent / "rules.toml"
    metrics_port: int | None = None


class SimulatorSettings(BaseModel):
    cameras: int = 8
    camera_fps: float = 10.0
    microphones: int = 4
    chunks_per_s: float = 4.0
    frame_encoding: Literal["raw", "jpeg"] = "raw"
    seed: int = 7
    # Inject drift from this many seconds after start (None: never).
    drift_at_s: float | None = None
    drift_brightness: float = 0.45
    drift_extra_noise: float = 0.08


class StackSettings(BaseModel):
    """The local stack: where its PID files, logs and data live, and how Tansu stores data.
    Ports come from kafka.bootstrap_servers and redis.url, which must be loopback."""

    run_dir: Path = REPO_ROOT / ".sluice" / "run"
    kafka_storage: str = "memory://tansu/"
    ready_timeout_s: float = 20.0


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
    simulator: SimulatorSettings = Field(default_factory=SimulatorSettings)
    stack: StackSettings = Field(default_factory=StackSettings)
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
    A file given here is also put in SLUICE_CONFIG, so the processes this one starts read it too."""
    if config_path is not None:
        os.environ["SLUICE_CONFIG"] = str(config_path)
    return SluiceSettings()


def settings_env(settings: SluiceSettings) -> dict[str, str]:
    """The settings as SLUICE_* environment variables, so a child process sees exactly
    these settings (the demo and the test fixtures start components this way).
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
