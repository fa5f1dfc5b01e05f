"""Hot-swap in one process, on real ONNX Runtime engines from a repository of good and broken versions:
warm before the swap, swap between batches, failed versions leave the old one serving and leak nothing,
50 cycles keep memory and threads flat. The plans come from the real redis-server of the local stack."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from consumers.model_control import ModelControl, ModelPlan
from consumers.model_swap import ModelSwap, PlanWatch
from engines import Engine, EngineSettings, load_version
from streams.settings import SluiceSettings
from tests.model_versions import MODEL, repository

WARM_SIZES = 8


@pytest.fixture
def versions(tmp_path: Path) -> Path:
    return repository(
        tmp_path / "models",
        {1: "good", 2: "good", 3: "good", 4: "corrupt", 5: "tampered", 6: "other_input", 7: "wrong_graph"},
    )


def _loader(root: Path) -> functools.partial[Engine]:
    return functools.partial(load_version, EngineSettings(model_repository=root), "frame")


@pytest.fixture
def swap(versions: Path) -> Iterator[ModelSwap]:
    load = _loader(versions)
    swap = ModelSwap(load(1), load, WARM_SIZES, asyncio.Lock())
    yield swap
    swap.close()


def _batch(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 255, (n, 224, 224, 3), dtype=np.uint8)


async def test_a_new_version_is_warmed_at_every_batch_size_before_it_serves(versions: Path) -> None:
    load = _loader(versions)
    seen: list[tuple[int, int]] = []  # (batch size, version serving while it ran)

    def spying_load(version: int) -> Engine:
        engine = load(version)
        real_infer = engine.infer

        def infer(batch: np.ndarray) -> np.ndarray:
            seen.append((len(batch), swap.current.active.spec.version))
            return real_infer(batch)

        engine.infer = infer  # type: ignore[method-assign]
        return engine

    swap = ModelSwap(load(1), spying_load, WARM_SIZES, asyncio.Lock())
    try:
        assert await swap.apply(ModelPlan(model=MODEL, active=2, revision=1))
        assert swap.current.versions() == {"active": 2}
        assert swap.current.revision == 1
        assert sorted(size for size, _ in seen) == list(range(1, WARM_SIZES + 1)), "every batch size, once"
        assert {serving for _, serving in seen} == {1}, "all of the warm-up ran while v1 still served"
        assert (await swap.current.active.infer(_batch(3)))[0] is not None
    finally:
        swap.close()


async def test_the_swap_waits_for_the_batch_in_progress(versions: Path) -> None:
    load = _loader(versions)
    batch_lock = asyncio.Lock()
    swap = ModelSwap(load(1), load, WARM_SIZES, batch_lock)
    try:
        async with batch_lock:  # a batch is running on v1
            applying = asyncio.create_task(swap.apply(ModelPlan(model=MODEL, active=2, revision=1)))
            for _ in range(100):  # long enough to load and warm v2 several times over
                await asyncio.sleep(0.05)
                assert swap.current.versions() == {"active": 1}, "swapped under a running batch"
            assert not applying.done()
        assert await asyncio.wait_for(applying, 10)
        assert swap.current.versions() == {"active": 2}
    finally:
        swap.close()


@pytest.mark.parametrize(
    ("version", "why"),
    [
        (4, "INVALID_PROTOBUF|Protobuf parsing failed|Load model"),  # corrupt file
        (5, "checksum"),  # tampered file
        (6, r"\[112, 112, 3\].*needs new workers"),  # another input contract
        (7, "onnxruntime failed on a batch"),  # loads, fails to warm: the graph takes another shape
    ],
    ids=["corrupt", "tampered", "other_input", "wrong_graph"],
)
async def test_a_version_that_fails_leaves_the_old_one_serving_and_leaks_no_thread(
    swap: ModelSwap, version: int, why: str
) -> None:
    await swap.warmup()
    threads = engine_threads()
    assert not await swap.apply(ModelPlan(model=MODEL, active=version, revision=1))
    assert swap.current.versions() == {"active": 1}
    assert swap.current.revision == 0, "the failed revision is not reported as applied"
    assert swap.last_failure is not None and swap.last_failure.version == version
    assert re.search(why, swap.last_failure.reason), swap.last_failure.reason
    rows = await swap.current.active.infer(_batch(4))
    assert all(row is not None for row in rows), "v1 still serves"
    assert engine_threads() == threads, "the failed version's engine thread is gone"


async def test_canary_and_shadow_load_beside_the_active_version_without_reloading_it(swap: ModelSwap) -> None:
    await swap.warmup()
    active = swap.current.active
    plan = ModelPlan(model=MODEL, active=1, canary=2, canary_share=0.25, shadow=3, shadow_share=0.5, revision=4)
    assert await swap.apply(plan)
    assert swap.current.versions() == {"active": 1, "canary": 2, "shadow": 3}
    assert swap.current.active is active, "v1 kept its warm engine"
    assert (swap.current.canary_share, swap.current.shadow_share) == (0.25, 0.5)
    # A share change alone moves no engine.
    canary = swap.current.canary
    assert await swap.apply(plan.model_copy(update={"canary_share": 0.5, "revision": 5}))
    assert swap.current.canary is canary and swap.current.canary_share == 0.5 and swap.current.revision == 5
    # Promote the canary: v2 becomes active (its engine kept), v1 and the shadow are freed.
    assert await swap.apply(ModelPlan(model=MODEL, active=2, revision=6))
    assert swap.current.active is canary and swap.current.versions() == {"active": 2}


@pytest.mark.slow
def test_fifty_activate_cycles_keep_memory_and_threads_flat(versions: Path) -> None:
    """Triton's users report reload leaks (triton-inference-server #3320, #5841, #8969). The tolerance: 40 MB of
    RSS growth from cycle 10 to cycle 50, in a process that does nothing else. One version of this model is ~1 MB
    of weights and an ONNX Runtime session of some 10-20 MB with its arenas: a session leaked per cycle would
    add 400 MB or more."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.consumers.swap_cycles", str(versions), "50"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    growth = figures["rss_mb_50"] - figures["rss_mb_10"]
    print(f"RSS after cycle 10: {figures['rss_mb_10']:.1f} MB, after cycle 50: {figures['rss_mb_50']:.1f} MB, "
          f"growth {growth:+.1f} MB")  # fmt: skip
    assert figures["swaps"] == 50
    assert figures["threads_after"] == figures["threads_before"], "no engine thread left behind"
    assert growth < 40, f"RSS grew {growth:.1f} MB over 40 swap cycles"


async def test_plan_watch_follows_notices_and_reports_what_it_serves(settings: SluiceSettings, versions: Path) -> None:
    load = _loader(versions)
    swap = ModelSwap(load(1), load, WARM_SIZES, asyncio.Lock())
    control = ModelControl(settings.redis)
    # A poll far longer than the test: only a notice can make the watch apply the plan in time.
    watch = PlanWatch(control, swap, "worker-a", "frame", poll_s=600)
    running = asyncio.create_task(watch.run())
    try:
        await asyncio.sleep(0.5)  # subscribed
        await control.activate(MODEL, 2)
        assert await _until(lambda: _serving(swap, {"active": 2}), 20), "the notice did not reach the watch"
        await control.activate(MODEL, 4)  # corrupt: fails, v2 keeps serving, the status says why
        assert await _until(lambda: _failed(control, 4), 20)
        (status,) = await control.statuses(MODEL)
        assert status.worker_id == "worker-a" and status.serving == {"active": 2} and status.applied_revision == 1
        assert "v4" not in str(status.serving) and status.failed_reason
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await control.close()
        swap.close()


def engine_threads() -> int:
    """Engine threads alive (`EngineRunner`: one per loaded version). The loader's own thread is not counted:
    it starts with the first load and lives as long as the pipeline."""
    return sum(thread.name.startswith("engine-") for thread in threading.enumerate())


async def _serving(swap: ModelSwap, versions: dict[str, int]) -> bool:
    return swap.current.versions() == versions


async def _failed(control: ModelControl, version: int) -> bool:
    return any(s.failed_version == version for s in await control.statuses(MODEL))


async def _until(check, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.1)
    return False


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_available(), reason="needs torch with a CUDA GPU; this host has none")
async def test_fifty_cycles_on_cuda_keep_device_memory_flat(tmp_path: Path) -> None:
    """The torch engine on CUDA (fp16, a CUDA graph per bucket, pinned staging): what a swapped-out engine
    held on the device must go back, or a GPU worker runs out of memory after some releases."""
    import torch

    from engines.repository import Batching
    from engines.zoo import write_zoo_model

    batching = Batching(max_batch_size=8, preferred_batch_sizes=[1, 4, 8])
    for version in (1, 2):
        write_zoo_model("audio_cnn", tmp_path, version, seed=version, model_name="mic_cnn", batching=batching)
    settings = EngineSettings(model_repository=tmp_path, kind="torch", device="cuda", precision="fp16",
                              audio_model="mic_cnn")  # fmt: skip
    load = functools.partial(load_version, settings, "audio")
    swap = ModelSwap(load(1), load, 8, asyncio.Lock())
    try:
        await swap.warmup()
        allocated: dict[int, int] = {}
        for cycle in range(1, 51):
            assert await swap.apply(ModelPlan(model="mic_cnn", active=2 if cycle % 2 else 1, revision=cycle))
            if cycle in (10, 50):
                torch.cuda.synchronize()
                allocated[cycle] = torch.cuda.memory_allocated()
        growth_mb = (allocated[50] - allocated[10]) / 2**20
        print(f"CUDA memory allocated after cycle 10: {allocated[10] / 2**20:.1f} MB, growth to 50: {growth_mb:+.1f} MB")
        assert growth_mb < 16
    finally:
        swap.close()
