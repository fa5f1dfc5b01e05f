import asyncio
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis

from schemas.records import InferenceResult, alert_id
from streams.apps.rules import CooldownStore, Rule, RuleSet
from streams.apps.settings import NotifierSettings
from streams.settings import SluiceSettings
from tests.records import make_result


def _result(label: str, score: float, modality: str = "FRAME", offset: int = 0, device: str = "cam-1") -> InferenceResult:
    return make_result(offset, label=label, score=score, runner_up="other", modality=modality, device_id=device)


RULE = Rule(name="tri", labels={"triangle"}, min_score=0.9, cooldown_s=0.5, modality="frame")


def test_rule_matches_label_in_set_at_or_above_the_threshold() -> None:
    assert RULE.match(_result("triangle", 0.9)) == ("triangle", 0.9)
    assert RULE.match(_result("triangle", 0.89)) is None
    assert RULE.match(_result("circle", 0.99)) is None
    assert RULE.match(_result("triangle", 0.99, modality="AUDIO")) is None
    scoped = RULE.model_copy(update={"devices": {"cam-2"}})
    assert scoped.match(_result("triangle", 0.99)) is None


def test_default_rules_file_loads() -> None:
    rules = RuleSet.load(NotifierSettings().rules_path)
    assert {r.name for r in rules.rules} == {"triangle-in-view", "chirp-heard"}


def test_bad_rules_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text('[[rules]]\nname = "x"\nlabels = ["a"]\nmin_score = 1.5\ncooldown_s = 1\n')
    with pytest.raises(ValueError, match="min_score"):
        RuleSet.load(path)


def test_alert_ids_are_deterministic_per_rule_and_source() -> None:
    assert RULE.alert(_result("triangle", 0.95), "triangle", 0.95).alert_id == \
        RULE.alert(_result("triangle", 0.97), "triangle", 0.97).alert_id
    assert alert_id(RULE.name, _result("triangle", 0.95).source) != alert_id(RULE.name, _result("triangle", 0.95, offset=1).source)
    alert = RULE.alert(_result("triangle", 0.95), "triangle", 0.95)
    assert alert.rule == "tri" and alert.device_id == "cam-1" and alert.cooldown_s == 0.5


async def test_cooldown_in_redis_suppresses_then_expires(stack_settings: SluiceSettings) -> None:
    redis = Redis.from_url(stack_settings.redis.url)
    try:
        store = CooldownStore(redis, prefix=f"test:{uuid.uuid4().hex}")
        first = alert_id(RULE.name, _result("triangle", 0.95, offset=1).source)
        second = alert_id(RULE.name, _result("triangle", 0.95, offset=2).source)
        assert await store.acquire(RULE, "cam-1", first)
        assert not await store.acquire(RULE, "cam-1", second), "same device, inside the cooldown"
        assert await store.acquire(RULE, "cam-2", second), "cooldowns are per device"
        assert await store.acquire(RULE, "cam-1", first), "a redelivered result re-emits its own alert"
        await asyncio.sleep(0.6)
        assert await store.acquire(RULE, "cam-1", second), "the cooldown expired"
    finally:
        await redis.aclose()
