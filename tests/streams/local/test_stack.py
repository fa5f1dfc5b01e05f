"""`sluice stack up|status|down` through the real CLI, on ports of its own."""

import os
import subprocess
import sys
from pathlib import Path

from streams.local import processes
from streams.local.harness import free_port


def _sluice(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *args], env=os.environ | env, capture_output=True, text=True, timeout=60
    )


def test_stack_up_status_down_by_pid(tmp_path: Path) -> None:
    env = {
        "SLUICE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "SLUICE_REDIS__URL": f"redis://127.0.0.1:{free_port()}/0",
        "SLUICE_STACK__RUN_DIR": str(tmp_path),
        "COLUMNS": "200",
    }
    try:
        up = _sluice(env, "stack", "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "sluice.frames" in up.stdout, "stack up creates the topics"
        kafka, redis = processes.read("kafka", tmp_path), processes.read("redis", tmp_path)
        assert kafka is not None and kafka.alive() and redis is not None and redis.alive()

        again = _sluice(env, "stack", "up")
        assert again.returncode == 0 and f"PID {kafka.pid}" in again.stdout, "up is idempotent"

        status = _sluice(env, "stack", "status")
        assert str(kafka.pid) in status.stdout and str(redis.pid) in status.stdout

        down = _sluice(env, "stack", "down")
        assert down.returncode == 0
        assert not kafka.alive() and not redis.alive()
        assert not (tmp_path / "kafka.pid").exists()
    finally:
        for name in ("kafka", "redis"):
            process = processes.read(name, tmp_path)
            if process is not None:
                processes.stop(process)


def test_stack_refuses_non_loopback_addresses(tmp_path: Path) -> None:
    env = {"SLUICE_KAFKA__BOOTSTRAP_SERVERS": "10.1.2.3:9092", "SLUICE_STACK__RUN_DIR": str(tmp_path)}
    result = _sluice(env, "stack", "up")
    assert result.returncode != 0
    assert "loopback" in result.stderr
