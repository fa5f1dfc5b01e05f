"""The probes beside the metrics: /healthz follows the event loop, /readyz the group membership and the stop."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry

from consumers.metrics import Health, serve_metrics
from streams.local.harness import free_port


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_healthz_fails_while_the_event_loop_is_stuck() -> None:
    port = free_port()
    health = Health(stall_s=0.5)
    serve_metrics(CollectorRegistry(), "127.0.0.1", port, health)
    beating = asyncio.create_task(health.keep_beating(every_s=0.05))
    try:
        await asyncio.sleep(0.1)
        assert (await asyncio.to_thread(_get, port, "/healthz"))[0] == 200
        answers: list[tuple[int, str]] = []
        probe = threading.Thread(target=lambda: (time.sleep(1.0), answers.append(_get(port, "/healthz"))))
        probe.start()
        time.sleep(1.5)  # a blocking call on the loop: what a stuck worker looks like from outside
        probe.join()
        status, body = answers[0]
        assert status == 503 and "event loop stalled" in body
        await asyncio.sleep(0.1)
        assert (await asyncio.to_thread(_get, port, "/healthz"))[0] == 200, "alive again once the loop turns"
    finally:
        beating.cancel()


async def test_readyz_follows_joining_and_stopping_and_metrics_include_the_process() -> None:
    port = free_port()
    health = Health()
    serve_metrics(CollectorRegistry(), "127.0.0.1", port, health)
    stopping = asyncio.Event()
    beating = asyncio.create_task(health.keep_beating(stopping, every_s=0.05))
    try:
        status, body = await asyncio.to_thread(_get, port, "/readyz")
        assert status == 503 and "not taking traffic" in body
        joined: list[bool] = []
        health.ready_then(lambda: joined.append(True))()
        assert joined and (await asyncio.to_thread(_get, port, "/readyz"))[0] == 200
        stopping.set()
        await asyncio.sleep(0.1)
        assert (await asyncio.to_thread(_get, port, "/readyz"))[0] == 503, "draining is not ready"
        assert (await asyncio.to_thread(_get, port, "/healthz"))[0] == 200, "but alive"
        _, metrics = await asyncio.to_thread(_get, port, "/metrics")
        assert "process_resident_memory_bytes" in metrics and "python_info" in metrics
    finally:
        beating.cancel()
