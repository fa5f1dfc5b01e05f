"""Prometheus metrics of the worker and the sink, on a registry owned by the process (no module globals),
and the health probes served beside them."""

from __future__ import annotations

import asyncio
import threading
import time
from socketserver import ThreadingMixIn
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector, make_wsgi_app,
)  # fmt: skip

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter("sluice_worker_messages", "Messages polled", ["modality"], registry=registry)
        self.results = Counter("sluice_worker_results", "Results acknowledged by the broker", ["modality"], registry=registry)
        self.dead_letters = Counter(
            "sluice_worker_dead_letters", "Inputs sent to the dead-letter topic, by stage and error type",
            ["modality", "stage", "error"], registry=registry,
        )
        self.batch_size = Histogram(
            "sluice_worker_batch_size", "Messages per engine call", ["modality"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry,
        )
        self.inference_seconds = Histogram(
            "sluice_worker_inference_seconds", "Engine time per batch", ["modality"],
            buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.capture_to_result_seconds = Histogram(
            "sluice_worker_capture_to_result_seconds", "Capture until the result was acknowledged", ["modality"],
            buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.inflight = Gauge("sluice_worker_inflight_messages", "Polled, not yet safe", ["modality"], registry=registry)
        self.inflight_bytes = Gauge(
            "sluice_worker_inflight_bytes", "Bytes of the messages polled, not yet safe", ["modality"], registry=registry
        )
        self.lag = Gauge(
            "sluice_worker_consumer_lag", "Messages behind the partition's high watermark, per assigned partition",
            ["modality", "partition"], registry=registry,
        )
        self.queue_seconds = Histogram(
            "sluice_worker_queue_seconds", "Capture until polled (network, broker, lag)", ["modality"],
            buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.batch_wait_seconds = Histogram(
            "sluice_worker_batch_wait_seconds", "Polled until its batch closed", ["modality"],
            buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.paused = Gauge("sluice_worker_paused", "1 while over the in-flight budget", ["modality"], registry=registry)
        self.commits = Counter("sluice_worker_commits", "Offset commits", ["modality"], registry=registry)
        self.model_version = Gauge(
            "sluice_worker_model_version", "The model version playing each role (active, canary, shadow)",
            ["modality", "model", "role"], registry=registry,
        )
        self.model_swaps = Counter(
            "sluice_worker_model_swaps", "Model plan changes applied (ok) or refused (failed)", ["modality", "outcome"],
            registry=registry,
        )
        self.shadow_results = Counter(
            "sluice_worker_shadow_results", "Shadow results sent (ok) or lost (failed); at most once",
            ["modality", "outcome"], registry=registry,
        )


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rows_inserted = Counter("sluice_sink_rows_inserted", "Rows inserted into ClickHouse", registry=registry)
        self.insert_seconds = Histogram(
            "sluice_sink_insert_seconds", "Time per insert", buckets=_LATENCY_BUCKETS, registry=registry
        )
        self.buffered_rows = Gauge("sluice_sink_buffered_rows", "Rows waiting for the next insert", registry=registry)
        self.insert_failures = Counter("sluice_sink_insert_failures", "Failed insert attempts", registry=registry)


class Health:
    """What the probes ask: is the event loop turning (`/healthz`, liveness) and is the process taking traffic
    (`/readyz`, readiness: joined its consumer groups, not stopping). The metrics server answers from a thread
    of its own, so without a heartbeat from the loop a worker whose loop is stuck would still look alive."""

    def __init__(self, stall_s: float = 30.0) -> None:
        self.stall_s = stall_s
        self._beat = time.monotonic()
        self._ready = False

    async def keep_beating(self, stopping: asyncio.Event | None = None, every_s: float = 1.0) -> None:
        """Run on the event loop for the process's lifetime; once `stopping` is set, the process is no
        longer ready (it drains), though alive."""
        while True:
            self._beat = time.monotonic()
            if stopping is not None and stopping.is_set():
                self._ready = False
            await asyncio.sleep(every_s)

    def ready_then(self, on_ready: Callable[[], None] | None) -> Callable[[], None]:
        """An on_ready callback that marks the process ready, then calls `on_ready`."""

        def ready() -> None:
            self._ready = True
            if on_ready is not None:
                on_ready()

        return ready

    def live(self) -> tuple[bool, str]:
        silent = time.monotonic() - self._beat
        if silent > self.stall_s:
            return False, f"event loop stalled: no heartbeat for {silent:.0f} s (limit {self.stall_s:.0f} s)"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        live, why = self.live()
        if not live:
            return False, why
        return (True, "ok") if self._ready else (False, "not taking traffic (joining its consumer groups, or stopping)")


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        pass  # a probe every few seconds is no news


def serve_metrics(registry: CollectorRegistry, host: str, port: int | None, health: Health | None = None) -> None:
    """Serve http://host:port/metrics (the registry, plus this process's CPU, memory and file descriptors),
    and with `health` /healthz and /readyz for k8s probes and compose healthchecks; port None turns it off."""
    if port is None:
        return
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        probe = {"/healthz": health.live, "/readyz": health.ready}.get(environ.get("PATH_INFO", "")) if health else None
        if probe is None:
            return metrics_app(environ, start_response)
        ok, why = probe()
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [f"{why}\n".encode()]

    server = make_server(host, port, app, server_class=_Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
