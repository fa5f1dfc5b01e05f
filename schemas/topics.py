"""The bus layout: topic names and partition counts, and the one modality table.

A modality (frames, audio) is one row of `MODALITIES`: the name used on the
command line, in model configs and in consumer-group names; the enum symbol in
results and alerts; the schema of its input records; and the topic setting its
inputs arrive on. Code that differs by modality looks the row up here (the
decoders register themselves by modality in `consumers/decode.py`) instead of
branching on "frame" or "audio".
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, PositiveInt

from schemas.codec import AUDIO_CHUNK, FRAME_CHUNK
from schemas.errors import ConfigError


class TopicSettings(BaseModel):
    """Topic names and partition counts. Every record is keyed by device_id."""

    frames: str = "sluice.frames"
    audio: str = "sluice.audio"
    results: str = "sluice.results"
    # Results of a model version in shadow (`sluice models activate --shadow`): the sink stores them apart,
    # and nothing that acts on results (the notifier) reads them.
    shadow_results: str = "sluice.results.shadow"
    alerts: str = "sluice.alerts"
    # The drift monitor's verdicts (`streams/apps/drift_monitor.py`); the sink stores them in drift_events.
    drift_events: str = "sluice.drift-events"
    dead_letters: str = "sluice.dead-letters"
    frames_partitions: PositiveInt = 8
    audio_partitions: PositiveInt = 4
    results_partitions: PositiveInt = 8
    shadow_results_partitions: PositiveInt = 8
    alerts_partitions: PositiveInt = 2
    drift_events_partitions: PositiveInt = 2
    dead_letters_partitions: PositiveInt = 2
    replication_factor: PositiveInt = 1

    def plan(self) -> dict[str, int]:
        """Every topic Sluice uses, with its partition count."""
        return {
            self.frames: self.frames_partitions,
            self.audio: self.audio_partitions,
            self.results: self.results_partitions,
            self.shadow_results: self.shadow_results_partitions,
            self.alerts: self.alerts_partitions,
            self.drift_events: self.drift_events_partitions,
            self.dead_letters: self.dead_letters_partitions,
        }

    def names(self) -> list[str]:
        return list(self.plan())

    def prefixed(self, prefix: str) -> TopicSettings:
        """The same layout with every name prefixed, e.g. to give a test or a benchmark its own topics."""
        return self.model_copy(update={name: f"{prefix}.{getattr(self, name)}" for name in _NAME_FIELDS})


_NAME_FIELDS = ("frames", "audio", "results", "shadow_results", "alerts", "drift_events", "dead_letters")


@dataclass(frozen=True, slots=True)
class Modality:
    name: str  # "frame": CLI, model configs, group suffixes, metric labels
    symbol: str  # "FRAME": the Avro enum symbol in results and alerts
    record: str  # the schema of its input records
    topic_field: str  # the TopicSettings field that names its input topic

    def input_topic(self, topics: TopicSettings) -> str:
        return getattr(topics, self.topic_field)

    def partitions(self, topics: TopicSettings) -> int:
        return getattr(topics, f"{self.topic_field}_partitions")


FRAME = Modality("frame", "FRAME", FRAME_CHUNK, "frames")
AUDIO = Modality("audio", "AUDIO", AUDIO_CHUNK, "audio")
MODALITIES: dict[str, Modality] = {m.name: m for m in (FRAME, AUDIO)}
MODALITY_NAMES: tuple[str, ...] = tuple(MODALITIES)


def modality(name: str) -> Modality:
    """The modality called `name` (or with that enum symbol)."""
    found = MODALITIES.get(name) or next((m for m in MODALITIES.values() if m.symbol == name), None)
    if found is None:
        raise ConfigError(f"unknown modality {name!r}; Sluice has: {', '.join(MODALITIES)}")
    return found
