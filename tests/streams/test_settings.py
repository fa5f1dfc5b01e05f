import os
from pathlib import Path

import pytest

from streams.settings import SluiceSettings, load_settings, settings_env


def test_environment_overrides_nested_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_KAFKA__BOOTSTRAP_SERVERS", "kafka-1:9092,kafka-2:9092")
    monkeypatch.setenv("SLUICE_WORKER__MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("SLUICE_KAFKA__TOPICS__RESULTS", "prod.results")
    settings = SluiceSettings()
    assert settings.kafka.bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert settings.worker.max_batch_size == 32
    assert settings.kafka.topics.results == "prod.results"


def test_toml_file_sets_knobs_and_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "sluice.toml"
    config.write_text('[worker]\nmax_batch_size = 8\nmax_delay_ms = 3.5\n[redis]\nurl = "redis://r:6379/1"\n')
    monkeypatch.setenv("SLUICE_WORKER__MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("SLUICE_CONFIG", "")  # restored (unset) after the test
    settings = load_settings(config)
    assert settings.worker.max_batch_size == 64
    assert settings.worker.max_delay_ms == 3.5
    assert settings.redis.url == "redis://r:6379/1"
    assert os.environ["SLUICE_CONFIG"] == str(config), "children started by this process read the same file"


def test_settings_env_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    original = SluiceSettings().model_copy(update={"log_level": "DEBUG"})
    for key, value in settings_env(original).items():
        monkeypatch.setenv(key, value)
    assert SluiceSettings() == original


def test_producer_options_never_ask_for_idempotence() -> None:
    """Tansu refuses aiokafka's idempotent producer; at-least-once comes from commit ordering instead."""
    options = SluiceSettings().kafka.producer_options()
    assert options["enable_idempotence"] is False and options["acks"] == "all"
    assert SluiceSettings().kafka.consumer_options()["enable_auto_commit"] is False
