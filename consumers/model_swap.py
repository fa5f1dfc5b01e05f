"""The engines one pipeline serves with, and their warm replacement when the model's plan changes.

`ServingSet` is what a batch runs on: the active version, and a canary and a
shadow when the plan names them. `ModelSwap` turns a plan (`model_control.py`)
into a new serving set the way Triton's users wish it did:

1. load each version the plan names that is not loaded yet, on a loader thread,
   beside the versions serving (the pipeline keeps inferring meanwhile);
2. check that it takes the same input as the version the pipeline decodes for,
   and warm it at every batch size the batcher can send (on the engine's own
   thread), so the first batch after the swap does not stall (Triton #7776);
3. swap between two batches: under the pipeline's batch lock, which `_process`
   holds for a whole batch, so a batch runs on one set from start to end;
4. close what no role uses any more: its thread, its session, its device memory.

A version that fails at 1 or 2 (a corrupt file, an input that does not match, out
of memory) is closed at once, and the old set goes on serving: nothing changes
but the failure, which the worker logs and reports in Redis (`sluice models
status`). The failed revision is not retried; the next change of the plan is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from consumers.engine_runner import EngineRunner
from consumers.lifecycle import OwnThread
from consumers.model_control import ModelControl, ModelControlUnavailable, ModelPlan, Role, WorkerModelStatus
from engines import Engine
from engines.repository import ModelSpec
from schemas.errors import SluiceError

log = logging.getLogger(__name__)

# A version number -> its engine, loaded (not warmed) for the pipeline's model.
VersionLoader = Callable[[int], Engine]


class VersionRefused(SluiceError):
    """A version cannot serve in this pipeline; the reason says why and what to do."""


@dataclass(eq=False)
class ServingSet:
    revision: int
    active: EngineRunner
    canary: EngineRunner | None = None
    canary_share: float = 0.0
    shadow: EngineRunner | None = None
    shadow_share: float = 0.0

    def roles(self) -> dict[Role, EngineRunner]:
        found: dict[Role, EngineRunner] = {"active": self.active}
        if self.canary is not None:
            found["canary"] = self.canary
        if self.shadow is not None:
            found["shadow"] = self.shadow
        return found

    def versions(self) -> dict[str, int]:
        return {role: runner.spec.version for role, runner in self.roles().items()}


@dataclass
class SwapFailure:
    version: int
    reason: str
    at: float = field(default_factory=time.time)


class ModelSwap:
    def __init__(
        self,
        first: Engine,
        load: VersionLoader,
        warm_sizes: int,
        batch_lock: asyncio.Lock,
        configured_version: int | None = None,
    ) -> None:
        """`first` serves until a plan says otherwise; `configured_version` is what a plan without an
        active version means (the version `first` was loaded as, by default)."""
        self.model = first.spec.name
        self._contract = _input_contract(first.spec)
        self._contract_text = _describe(first.spec)
        self._load = load
        self._warm_sizes = warm_sizes
        self._batch_lock = batch_lock
        self.configured_version = first.spec.version if configured_version is None else configured_version
        self.current = ServingSet(revision=0, active=EngineRunner(first))
        self.last_failure: SwapFailure | None = None
        self.swaps = 0
        self._loader = OwnThread(f"model-loader-{first.spec.modality}")

    async def warmup(self) -> None:
        await self.current.active.warmup(self._warm_sizes)

    def wanted(self, plan: ModelPlan) -> dict[Role, int]:
        wanted: dict[Role, int] = {"active": plan.active if plan.active is not None else self.configured_version}
        if plan.canary is not None and plan.canary_share > 0 and plan.canary != wanted["active"]:
            wanted["canary"] = plan.canary
        if plan.shadow is not None and plan.shadow_share > 0 and plan.shadow != wanted["active"]:
            wanted["shadow"] = plan.shadow
        return wanted

    async def apply(self, plan: ModelPlan) -> bool:
        """Serve what `plan` names. True once it is served (at once when nothing changes); False if a
        version failed, with the old set still serving and `last_failure` saying why."""
        wanted = self.wanted(plan)
        current = self.current
        if current.versions() == wanted:
            self._retag(plan)
            return True
        loaded = {runner.spec.version: runner for runner in current.roles().values()}
        fresh: dict[int, EngineRunner] = {}
        for version in dict.fromkeys(wanted.values()):
            if version in loaded:
                continue
            try:
                fresh[version] = await self._prepare(version)
            except Exception as exc:  # whatever a version does wrong, the serving set stays as it was
                reason = f"{type(exc).__name__}: {exc}"
                log.error("%s v%d failed to load or warm; v%d keeps serving: %s", self.model, version,
                          current.active.spec.version, reason)  # fmt: skip
                self.last_failure = SwapFailure(version, reason)
                for runner in fresh.values():
                    await self._retire(runner)
                return False
        runners = {**loaded, **fresh}
        new = ServingSet(
            revision=plan.revision, active=runners[wanted["active"]],
            canary=runners.get(wanted["canary"]) if "canary" in wanted else None, canary_share=plan.canary_share,
            shadow=runners.get(wanted["shadow"]) if "shadow" in wanted else None, shadow_share=plan.shadow_share,
        )  # fmt: skip
        async with self._batch_lock:  # between two batches
            self.current = new
        self.swaps += 1
        kept = set(map(id, new.roles().values()))
        for runner in current.roles().values():
            if id(runner) not in kept:
                await self._retire(runner)
        log.info("%s now serving %s (revision %d)", self.model, new.versions(), plan.revision)
        return True

    def _retag(self, plan: ModelPlan) -> None:
        """Same versions, new shares or revision: no engine moves."""
        current = self.current
        current.revision = plan.revision
        current.canary_share = plan.canary_share if current.canary is not None else 0.0
        current.shadow_share = plan.shadow_share if current.shadow is not None else 0.0

    async def _prepare(self, version: int) -> EngineRunner:
        engine = await self._loader.call(self._load, version)
        runner = EngineRunner(engine)
        try:
            if _input_contract(engine.spec) != self._contract:
                raise VersionRefused(
                    f"{self.model} v{version} takes {_describe(engine.spec)}, but this pipeline decodes for "
                    f"{self._contract_text}: a version with another input contract needs new workers (restart "
                    "them with it configured) or another model name"
                )
            started = time.perf_counter()
            await runner.warmup(self._warm_sizes)
            log.info("%s v%d loaded and warmed at batch sizes 1..%d in %.2fs", self.model, version, self._warm_sizes,
                     time.perf_counter() - started)  # fmt: skip
        except BaseException:
            await self._retire(runner)
            raise
        return runner

    async def _retire(self, runner: EngineRunner) -> None:
        """Free a runner no batch can reach any more: its thread, then its engine (on the loader thread, as
        a GPU engine is best freed where no batch runs)."""
        runner.close(wait=True)
        await self._loader.call(runner.engine.close)

    def close(self) -> None:
        for runner in self.current.roles().values():
            runner.close(wait=True)
            runner.engine.close()
        self._loader.close(wait=True)


def _input_contract(spec: ModelSpec) -> tuple[tuple[int, ...], str, str]:
    """What the decoder builds an input from: shape, dtype and preprocessing. The model's own output,
    labels and engine may differ between versions."""
    return tuple(spec.input.shape), spec.input.dtype, spec.preprocessing.model_dump_json(exclude={"in_graph"})


def _describe(spec: ModelSpec) -> str:
    shape, dtype, preprocessing = _input_contract(spec)
    return f"{list(shape)} {dtype} ({preprocessing})"


class PlanWatch:
    """Keeps a pipeline's `ModelSwap` on its model's plan: applies a plan when a notice says it changed,
    and re-reads it every `poll_s` (a notice sent while Redis or this worker was away is lost). Reports
    what it serves to Redis at each change and each poll, with a lifetime of a few polls. Redis being
    away is logged once per outage and changes nothing: the pipeline serves on."""

    def __init__(
        self, control: ModelControl, swap: ModelSwap, worker_id: str, modality: str, poll_s: float,
        on_applied: Callable[[bool], None] | None = None,
    ) -> None:  # fmt: skip
        self.control = control
        self.swap = swap
        self.worker_id = worker_id
        self.modality = modality
        self.poll_s = poll_s
        self._on_applied = on_applied  # called with whether a new revision is served
        self._done_revision = 0  # the last revision served or failed: not tried again
        self._wake = asyncio.Event()
        self._away = False

    async def run(self) -> None:
        listener = asyncio.create_task(self._listen(), name=f"model-notices-{self.modality}")
        try:
            while True:
                await self.check()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                self._wake.clear()
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def check(self) -> None:
        """Read the plan; apply it if its revision is new; report."""
        try:
            plan = await self.control.plan(self.swap.model)
            if plan.revision != self._done_revision:
                self._done_revision = plan.revision
                served = await self.swap.apply(plan)
                if self._on_applied is not None:
                    self._on_applied(served)
            await self.control.report(self.status(), ttl_s=3 * self.poll_s + 5)
            if self._away:
                log.info("Redis answers again; %s follows its model plan", self.modality)
                self._away = False
        except ModelControlUnavailable as exc:
            if not self._away:
                log.warning("%s; serving %s until it answers", exc, self.swap.current.versions())
                self._away = True

    def status(self) -> WorkerModelStatus:
        failure = self.swap.last_failure
        return WorkerModelStatus(
            worker_id=self.worker_id, model=self.swap.model, modality=self.modality,
            serving=self.swap.current.versions(), applied_revision=self.swap.current.revision,
            failed_version=failure.version if failure else None, failed_reason=failure.reason if failure else None,
            failed_at=failure.at if failure else None,
        )  # fmt: skip

    async def _listen(self) -> None:
        while True:
            try:
                async for model in self.control.notices():
                    if model == self.swap.model:
                        self._wake.set()
            except ModelControlUnavailable:
                pass  # check() reports the outage; listen again after a poll
            await asyncio.sleep(self.poll_s)
