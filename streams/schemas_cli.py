"""`sluice schemas register`: Sluice's `.avsc` files into a schema registry.

Every version of every record goes under the subject of each topic that carries it
(frames: FrameChunk, audio: AudioChunk, results and shadow results: InferenceResult,
alerts: Alert, drift events: DriftEvent, dead letters: DeadLetter), oldest first, so the
registry holds the history and checks each step against the compatibility mode set on
the subject. It prints the id the registry gave each one: the ids that processes configured
with the same registry (`SLUICE_SCHEMA_REGISTRY__URL`) write.
"""

from __future__ import annotations

import argparse

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from schemas.errors import ConfigError
from schemas.registry import COMPATIBILITY_LEVELS, SchemaRegistry, SchemaRegistrySettings, register_schemas
from streams.settings import SluiceSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    p = actions.add_parser("register", help="register every .avsc version under the subjects of its topics")
    p.add_argument("--registry", metavar="URL", help="the registry's URL (default: SLUICE_SCHEMA_REGISTRY__URL)")
    p.add_argument("--compatibility", choices=COMPATIBILITY_LEVELS,
                   help="set on every subject (default: SLUICE_SCHEMA_REGISTRY__COMPATIBILITY, BACKWARD)")  # fmt: skip


def main(settings: SluiceSettings, args: argparse.Namespace, console: Console) -> int:
    given = {name: value for name, value in (("url", args.registry), ("compatibility", args.compatibility)) if value}
    try:
        registry_settings = SchemaRegistrySettings(**{**settings.schema_registry.model_dump(), **given})
    except ValidationError as exc:
        raise ConfigError(f"--registry: {exc.errors()[0]['msg']}") from exc
    if registry_settings.url is None:
        raise ConfigError("no schema registry: pass --registry URL or set SLUICE_SCHEMA_REGISTRY__URL")
    registry = SchemaRegistry(registry_settings)
    try:
        registrations = register_schemas(registry, settings.kafka.topics, registry_settings.compatibility)
    finally:
        registry.close()
    title = f"{registry.where}, compatibility {registry_settings.compatibility} on every subject"
    table = Table("subject", "record", "schema file", "id", "", title=title)
    for r in registrations:
        table.add_row(r.subject, r.record, r.file, "" if r.schema_id is None else str(r.schema_id), r.outcome)
    console.print(table)
    return 0
