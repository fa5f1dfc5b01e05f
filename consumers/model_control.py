"""Which version of each model serves, kept in Redis so that every worker of a group agrees.

A model's plan (`ModelPlan`) names the version each role plays:

- active: serves every device the canary does not;
- canary: serves a share of the devices, chosen by a consistent hash of device_id
  (`canary_bucket`), so one device always meets one version and the same devices
  stay in the canary as its share grows;
- shadow: runs on a sampled share of the batches beside the serving version; its
  results go to the shadow results topic and its own ClickHouse table, never to the
  notifier;
- deprecated: was active once, replaced or deactivated; kept for the record (and
  for a rollback: activate it again).

`sluice models activate|deactivate` change a plan (optimistically, under WATCH, so
two operators cannot lose each other's change), bump its revision and publish a
notice on `<namespace>:models:notices`. Each worker applies a plan it has not
applied yet (`consumers/model_swap.py`) and reports what it serves, or why a version
failed to load, under a key that expires unless renewed: `sluice models status`
reads those reports, so a worker that died drops out of the status by itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, Field
from redis.exceptions import RedisError, WatchError

from consumers.settings import RedisSettings
from schemas.errors import SluiceError, redact_url

log = logging.getLogger(__name__)

Role = Literal["active", "canary", "shadow"]
ROLES: tuple[Role, ...] = ("active", "canary", "shadow")


class ModelControlUnavailable(SluiceError):
    """Redis, where the model plans live, does not answer (check SLUICE_REDIS__URL)."""


class ModelPlan(BaseModel):
    model: str
    # None: each worker's configured version (SLUICE_ENGINE__<MODALITY>_MODEL_VERSION, else the newest).
    active: int | None = None
    canary: int | None = None
    canary_share: float = Field(0.0, ge=0.0, le=1.0)
    shadow: int | None = None
    shadow_share: float = Field(1.0, ge=0.0, le=1.0)
    deprecated: list[int] = Field(default_factory=list)
    revision: int = 0
    changed_at: float = 0.0

    def role_of(self, version: int) -> str:
        """What `version` does in this plan: a role, "deprecated", or "available"."""
        for role in ROLES:
            if getattr(self, role) == version:
                return role
        return "deprecated" if version in self.deprecated else "available"


class WorkerModelStatus(BaseModel):
    """What one worker serves for one model, and the last version it failed to load (why, when)."""

    worker_id: str
    model: str
    modality: str
    serving: dict[str, int]  # role -> version
    applied_revision: int
    failed_version: int | None = None
    failed_reason: str | None = None
    failed_at: float | None = None
    updated_at: float = Field(default_factory=time.time)


def canary_bucket(model: str, device_id: str) -> float:
    """Where a device falls in [0, 1): it is in the canary when this is below the canary's share. A hash
    of its own rather than Python's `hash()`, which differs between processes."""
    digest = hashlib.blake2b(f"{model}\0{device_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class ModelControl:
    """The plans and the workers' reports in Redis, under `<namespace>:models:`."""

    def __init__(self, settings: RedisSettings) -> None:
        namespace = settings.namespace
        self._url = settings.url
        self._redis = aioredis.Redis.from_url(
            settings.url, socket_timeout=settings.timeout_s, socket_connect_timeout=settings.timeout_s
        )
        self._prefix = f"{namespace}:models"
        self.notices_channel = f"{self._prefix}:notices"

    async def close(self) -> None:
        await self._redis.aclose()

    async def plan(self, model: str) -> ModelPlan:
        raw = await self._call(self._redis.get(self._plan_key(model)))
        return ModelPlan.model_validate_json(raw) if raw else ModelPlan(model=model)

    async def plans(self) -> list[ModelPlan]:
        keys = sorted(await self._call(self._redis.keys(f"{self._prefix}:plan:*")))
        return [await self.plan(key.decode().rsplit(":", 1)[1]) for key in keys]

    async def change(self, model: str, edit: Callable[[ModelPlan], None]) -> ModelPlan:
        """Apply `edit` to the current plan and store it with the next revision, retried if another
        change landed in between; then publish a notice, so workers apply it at once."""
        key = self._plan_key(model)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(key)
                        raw = await pipe.get(key)
                        plan = ModelPlan.model_validate_json(raw) if raw else ModelPlan(model=model)
                        edit(plan)
                        plan.revision += 1
                        plan.changed_at = time.time()
                        pipe.multi()
                        pipe.set(key, plan.model_dump_json())
                        pipe.publish(self.notices_channel, model)
                        await pipe.execute()
                        return plan
                    except WatchError:
                        continue
        except RedisError as exc:
            raise self._unavailable(exc) from exc

    async def activate(self, model: str, version: int, role: Role = "active", share: float | None = None) -> ModelPlan:
        def edit(plan: ModelPlan) -> None:
            _remove(plan, version)
            if role == "active" and plan.active is not None and plan.active not in plan.deprecated:
                plan.deprecated.append(plan.active)
            setattr(plan, role, version)
            if role == "canary":
                plan.canary_share = 0.1 if share is None else share
            elif role == "shadow":
                plan.shadow_share = 1.0 if share is None else share
            plan.deprecated = sorted(v for v in plan.deprecated if v != version)

        return await self.change(model, edit)

    async def deactivate(self, model: str, version: int) -> ModelPlan:
        """`version` plays no role any more and is marked deprecated. Deactivating the active version
        hands the devices back to each worker's configured version."""

        def edit(plan: ModelPlan) -> None:
            _remove(plan, version)
            plan.deprecated = sorted({*plan.deprecated, version})

        return await self.change(model, edit)

    async def report(self, status: WorkerModelStatus, ttl_s: float) -> None:
        key = f"{self._prefix}:status:{status.model}:{status.worker_id}"
        await self._call(self._redis.set(key, status.model_dump_json(), px=int(ttl_s * 1000)))

    async def statuses(self, model: str) -> list[WorkerModelStatus]:
        keys = sorted(await self._call(self._redis.keys(f"{self._prefix}:status:{model}:*")))
        values = await self._call(self._redis.mget(keys)) if keys else []
        return [WorkerModelStatus.model_validate_json(v) for v in values if v is not None]

    async def notices(self) -> AsyncIterator[str]:
        """The names of models whose plan changed, as the notices arrive. Notices sent while this is not
        subscribed are lost: a watcher re-reads its plan periodically too."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await self._call(pubsub.subscribe(self.notices_channel))
            while True:
                message = await self._call(pubsub.get_message(timeout=1.0))
                if message is not None and message["type"] == "message":
                    yield message["data"].decode()
        finally:
            await pubsub.aclose()

    def _plan_key(self, model: str) -> str:
        return f"{self._prefix}:plan:{model}"

    async def _call(self, awaitable):  # type: ignore[no-untyped-def]
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: BaseException) -> ModelControlUnavailable:
        return ModelControlUnavailable(f"Redis at {redact_url(self._url)} does not answer ({exc}); the model plans "
                                       "live there (SLUICE_REDIS__URL)")  # fmt: skip


def _remove(plan: ModelPlan, version: int) -> None:
    """`version` leaves whatever role it plays."""
    for role in ROLES:
        if getattr(plan, role) == version:
            setattr(plan, role, None)


def describe(plan: ModelPlan) -> str:
    """One line for logs and the CLI."""
    parts = [f"active v{plan.active}" if plan.active is not None else "active: configured version"]
    if plan.canary is not None:
        parts.append(f"canary v{plan.canary} on {plan.canary_share:.0%} of devices")
    if plan.shadow is not None:
        parts.append(f"shadow v{plan.shadow} on {plan.shadow_share:.0%} of batches")
    if plan.deprecated:
        parts.append(f"deprecated {json.dumps(plan.deprecated)}")
    return f"{plan.model} (revision {plan.revision}): " + ", ".join(parts)
