"""`sluice bench` runs end to end and reports ratios; the figures themselves are not asserted
(they are benchmark output on a shared machine, not timed tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _bench(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / "bench.json"
    env = os.environ | {"SLUICE_STACK__RUN_DIR": str(tmp_path / "run")}
    subprocess.run([sys.executable, "-m", "streams.cli", "bench", *args, "--json", str(out)],
                   env=env, check=True, capture_output=True, timeout=240)  # fmt: skip
    return json.loads(out.read_text())


def test_engine_bench_reports_ratios_to_batch_one(tmp_path: Path) -> None:
    rows = _bench(tmp_path, "engines", "--batch-sizes", "1", "8", "--seconds", "0.2")
    assert {(r["modality"], r["batch_size"]) for r in rows} == {("frame", 1), ("frame", 8), ("audio", 1), ("audio", 8)}
    assert all(r["items_per_s"] > 0 for r in rows)
    assert [r["vs_batch_1"] for r in rows if r["batch_size"] == 1] == [1.0, 1.0]


@pytest.mark.slow
def test_pipeline_bench_drains_the_same_backlog_with_batching_off_and_on(tmp_path: Path) -> None:
    rows = _bench(tmp_path, "pipeline", "--messages", "120")
    off, on = rows
    assert (off["max_batch_size"], off["mean_batch_size"]) == (1, 1.0)
    assert on["max_batch_size"] == 16 and on["mean_batch_size"] > 1
    assert off["vs_batching_off"] == 1.0 and on["vs_batching_off"] > 0
