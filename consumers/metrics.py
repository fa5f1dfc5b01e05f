"""Prometheus metrics of the worker and the sink, on a registry owned by the process (no module globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter("sluice_worker_messages", "Messages polled", ["modality"], registry=registry)
        self.results = Counter("sluice_worker_results", "Results acknowledged by the broker", ["modality"], registry=registry)
        self.dead_letters = Counter(
            "sluice_worker_dead_letters", "Inputs sent to the dead-letter topic", ["modality", "stage"], registry=registry
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


def serve_metrics(registry: CollectorRegistry, host: str, port: int | None) -> None:
    """Expose the registry for Prometheus at http://host:port/metrics; port None turns metrics off."""
    if port is not None:
        start_http_server(port, addr=host, registry=registry)
