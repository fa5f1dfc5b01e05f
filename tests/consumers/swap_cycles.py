"""Activate cycles in a process of their own: `python -m tests.consumers.swap_cycles REPOSITORY CYCLES` prints
JSON with the RSS after cycle 10 and after the last, and the engine threads before and after. A process that
does nothing else, so that no other test's memory (an embedded ClickHouse merging in the background, say)
moves the figure."""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import os
import sys
from pathlib import Path

import numpy as np

from consumers.model_control import ModelPlan
from consumers.model_swap import ModelSwap
from engines import EngineSettings, load_version
from streams.local.harness import rss_mb
from tests.consumers.test_model_swap import MODEL, engine_threads


async def cycles(root: Path, count: int) -> dict[str, float]:
    load = functools.partial(load_version, EngineSettings(model_repository=root), "frame")
    swap = ModelSwap(load(1), load, 8, asyncio.Lock())
    try:
        await swap.warmup()
        threads = engine_threads()
        rss: dict[str, float] = {}
        batch = np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3), dtype=np.uint8)
        for cycle in range(1, count + 1):
            assert await swap.apply(ModelPlan(model=MODEL, active=2 if cycle % 2 else 1, revision=cycle))
            assert (await swap.current.active.infer(batch))[0] is not None
            if cycle in (10, count):
                gc.collect()
                rss[f"rss_mb_{cycle}"] = rss_mb(os.getpid()) or 0.0
        return {**rss, "swaps": swap.swaps, "threads_before": threads, "threads_after": engine_threads()}
    finally:
        swap.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(cycles(Path(sys.argv[1]), int(sys.argv[2])))))
