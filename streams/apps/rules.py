"""Notifier rules and their per-device cooldowns.

A cooldown is one Redis key per (rule, device) holding the id of the alert that
opened it, set with a TTL. A redelivered result (at-least-once) carries the same
source coordinates, so it derives the same alert id, finds its own id in the key,
and re-emits the alert instead of being suppressed: a crash between "cooldown
set" and "alert produced" loses nothing, and consumers deduplicate on alert_id.
"""

from __future__ import annotations

import asyncio
import logging
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.errors import ConfigError
from schemas.records import Alert, InferenceResult, alert_for
from schemas.topics import MODALITY_NAMES, modality

log = logging.getLogger(__name__)


class Rule(BaseModel):
    name: str
    labels: set[str]
    min_score: float = Field(ge=0.0, le=1.0)
    cooldown_s: float = Field(gt=0.0)
    modality: Literal[MODALITY_NAMES] | None = None  # type: ignore[valid-type]
    devices: set[str] | None = None

    def match(self, result: InferenceResult) -> tuple[str, float] | None:
        """The (label, score) this rule fires on, or None."""
        if self.modality is not None and result.modality != modality(self.modality).symbol:
            return None
        if self.devices is not None and result.device_id not in self.devices:
            return None
        for entry in result.top_k:
            if entry.label in self.labels and entry.score >= self.min_score:
                return entry.label, entry.score
        return None

    def alert(self, result: InferenceResult, label: str, score: float) -> Alert:
        return alert_for(self.name, self.cooldown_s, result, label, score)


class RuleSet(BaseModel):
    rules: list[Rule]

    @classmethod
    def load(cls, path: Path) -> RuleSet:
        try:
            with open(path, "rb") as f:
                return cls.model_validate(tomllib.load(f))
        except FileNotFoundError:
            raise ConfigError(f"rules file {path} does not exist (SLUICE_NOTIFIER__RULES_PATH)") from None
        except (tomllib.TOMLDecodeError, ValidationError) as exc:
            raise ConfigError(f"rules file {path} is invalid: {exc}") from exc


# Open the cooldown if it is closed; report open-by-us (same alert id) as acquired too.
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if current == ARGV[1] then return 1 end
return 0
"""


# Failures of Redis rather than of the command, which the same command outlives: Redis down, unreachable or too
# slow (connection errors include a server still loading its data, and a refused login, which its fix ends), a
# replica answering while a failover promotes it, a full Redis (our keys expire). Any other error is about this
# one command, and the notifier dead-letters its result.
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OutOfMemoryError)
_FIRST_RETRY_S = 0.1


class CooldownStore:
    def __init__(
        self, redis: Redis, prefix: str = "sluice:cooldown", retry_max_s: float = 5.0,
        on_reachable: Callable[[bool], None] | None = None,
    ) -> None:  # fmt: skip
        """`on_reachable(up)` hears whether each command reached Redis (the notifier's redis_up gauge)."""
        self._redis = redis
        self._prefix = prefix
        self._acquire = redis.register_script(_ACQUIRE)
        self._retry_max_s = retry_max_s
        self._on_reachable = on_reachable or (lambda up: None)

    async def acquire(self, rule: Rule, device_id: str, alert: str) -> bool:
        """Whether `alert` may be emitted: no cooldown for (rule, device), or one opened by this same alert.
        Waits, retrying, for as long as Redis cannot answer."""
        key = f"{self._prefix}:{rule.name}:{device_id}"
        delay, failures = _FIRST_RETRY_S, 0
        while True:
            try:
                acquired = bool(await self._acquire(keys=[key], args=[alert, int(rule.cooldown_s * 1000)]))
            except _UNAVAILABLE as exc:
                self._on_reachable(False)
                failures += 1
                log.warning("cooldown %s not taken, Redis cannot answer (%s: %s); retrying in %.1fs", key,
                            type(exc).__name__, exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
                continue
            self._on_reachable(True)
            if failures:
                log.info("cooldown %s answered after %d failed attempts: Redis is back", key, failures)
            return acquired

    async def probe(self) -> None:
        """Ping Redis once and report whether it answered, so that the gauge follows Redis while no result
        waits on it."""
        try:
            await self._redis.ping()
        except _UNAVAILABLE:
            self._on_reachable(False)
        else:
            self._on_reachable(True)
