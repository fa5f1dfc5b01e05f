"""Kafka settings and the one place every Sluice process builds its Kafka clients.

Workers, the sink, the notifier (Faust), the simulator and the device SDK, the
benchmarks and the tests all get their clients here, so a security setting
(TLS, SASL) or a timeout applies to every process alike.
"""

from __future__ import annotations

import logging
from ssl import SSLContext
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context
from pydantic import BaseModel, Field, PositiveInt, SecretStr, field_validator

from producers.sdk import DeviceClient
from schemas.codec import Codec
from schemas.errors import SluiceError
from schemas.topics import TopicSettings

log = logging.getLogger(__name__)


class KafkaUnavailable(SluiceError):
    """The cluster could not be reached or refused a request (check SLUICE_KAFKA__BOOTSTRAP_SERVERS)."""


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "sluice"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # Group membership. Short enough that a joining worker starts in seconds,
    # long enough that a busy host does not lose its heartbeat.
    session_timeout_ms: PositiveInt = 10_000
    heartbeat_interval_ms: PositiveInt = 1_000
    rebalance_timeout_ms: PositiveInt = 5_000
    # Polling and processing are separate tasks, so this is only a safety net.
    max_poll_interval_ms: PositiveInt = 300_000
    # Tansu does not wake a waiting fetch when data arrives, so a long wait here
    # adds up to this much latency per hop. Apache Kafka answers as soon as data
    # arrives, so there a short wait only costs idle fetch requests: the compose
    # and k8s deployments set 500.
    fetch_max_wait_ms: int = Field(10, ge=0)
    max_partition_fetch_bytes: PositiveInt = 4 * 1024 * 1024
    # Producer: acks from all in-sync replicas, a short linger so batches form
    # without adding visible latency. Idempotence and transactions stay off:
    # delivery is at-least-once through commit ordering, and Tansu lacks them.
    acks: Literal["all", "1", "0"] = "all"
    linger_ms: int = Field(5, ge=0)
    compression_type: Literal["lz4", "gzip", "zstd", "snappy"] | None = "lz4"
    max_request_size: PositiveInt = 4 * 1024 * 1024
    request_timeout_ms: PositiveInt = 30_000
    topics: TopicSettings = Field(default_factory=TopicSettings)

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        """host:port[,host:port...]: a typo here would otherwise surface as a ValueError deep in the client."""
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{server.strip()!r} is not host:port (e.g. kafka-1:9092; several separated by commas)")
        return value

    def _ssl_context(self) -> SSLContext | None:
        return create_ssl_context() if self.security_protocol in ("SSL", "SASL_SSL") else None

    def _sasl_password(self) -> str | None:
        return self.sasl_password.get_secret_value() if self.sasl_password else None

    def client_options(self) -> dict[str, Any]:
        """aiokafka keyword arguments shared by producers, consumers and admin clients."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if (context := self._ssl_context()) is not None:
            options["ssl_context"] = context
        if self.sasl_mechanism:
            options.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self._sasl_password(),
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


def make_producer(kafka: KafkaSettings, role: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(**kafka.producer_options(), client_id=f"{kafka.client_id}-{role}")


def make_consumer(kafka: KafkaSettings, group_id: str | None, role: str, **overrides: object) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        **{**kafka.consumer_options(), **overrides}, group_id=group_id, client_id=f"{kafka.client_id}-{role}"
    )


def make_admin(kafka: KafkaSettings, role: str = "admin") -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**kafka.client_options(), client_id=f"{kafka.client_id}-{role}")


def device_client(kafka: KafkaSettings, role: str = "simulator", codec: Codec | None = None) -> DeviceClient:
    """A device SDK client on the configured cluster and topics, with the configured producer options."""
    options = kafka.producer_options()
    return DeviceClient(
        options.pop("bootstrap_servers"),
        frames_topic=kafka.topics.frames,
        audio_topic=kafka.topics.audio,
        client_id=f"{kafka.client_id}-{role}",
        codec=codec,
        **options,
    )


def faust_broker_options(kafka: KafkaSettings, role: str) -> dict[str, Any]:
    """faust.App keyword arguments for the same cluster, credentials and group timings as every other process."""
    import faust  # the notifier's dependency; imported only by the process that runs it

    credentials: Any = None
    if kafka.sasl_mechanism:
        credentials = faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka._sasl_password(),
            mechanism=kafka.sasl_mechanism,
            ssl_context=kafka._ssl_context(),
        )
    elif kafka.security_protocol == "SSL":
        credentials = faust.SSLCredentials(kafka._ssl_context())
    return {
        "broker": [f"kafka://{server.strip()}" for server in kafka.bootstrap_servers.split(",")],
        "broker_client_id": f"{kafka.client_id}-{role}",
        "broker_credentials": credentials,
        "broker_session_timeout": kafka.session_timeout_ms / 1000,
        "broker_heartbeat_interval": kafka.heartbeat_interval_ms / 1000,
        "broker_rebalance_timeout": kafka.rebalance_timeout_ms / 1000,
        "broker_max_poll_interval": kafka.max_poll_interval_ms / 1000,
        "consumer_auto_offset_reset": "earliest",
        "consumer_max_fetch_size": kafka.max_partition_fetch_bytes,
        "producer_acks": -1 if kafka.acks == "all" else int(kafka.acks),
        "producer_linger_ms": kafka.linger_ms,
        "producer_compression_type": kafka.compression_type,
        "producer_max_request_size": kafka.max_request_size,
    }


async def ensure_topics(kafka: KafkaSettings) -> list[str]:
    """Create the missing topics; return the names created. Safe to run from every process at start,
    so a cluster with auto-creation off works, and so partition counts are ours rather than the broker's default."""
    admin = make_admin(kafka)
    try:
        await admin.start()
    except KafkaConnectionError as exc:
        raise KafkaUnavailable(f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc}") from exc
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, num_partitions=partitions, replication_factor=kafka.topics.replication_factor)
            for name, partitions in kafka.topics.plan().items()
            if name not in existing
        ]
        if not wanted:
            return []
        response = await admin.create_topics(wanted)
        created = []
        for name, code, message in ((e[0], e[1], e[2]) for e in response.topic_errors):
            if code == 0:
                created.append(name)
            elif code != TopicAlreadyExistsError.errno:  # a racing process created it first
                raise KafkaUnavailable(f"could not create topic {name}: error {code}: {message}")
        log.info("created topics %s", created)
        return created
    except KafkaError as exc:
        raise KafkaUnavailable(f"Kafka at {kafka.bootstrap_servers} refused the topic set-up: {exc}") from exc
    finally:
        await admin.close()
