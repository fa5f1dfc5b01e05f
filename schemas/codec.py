"""Avro records in the Confluent wire format.

Every Sluice message value is `[0x00][schema id: 4 bytes, big-endian][Avro binary body]`,
the framing Confluent's serializers, kcat, Kafka UI and ClickHouse's
`AvroConfluent` format understand.

Where the ids come from:

- Pinned (the default): the ids in `registry.json` beside the `.avsc` files, so any
  consumer holding this folder decodes every topic and a local stack needs no registry.
- A schema registry (`codec_for` in `schemas/registry.py`, when a registry URL is set):
  writers register (or look up) their schema under the subject of the topic they write
  to and use the id the registry assigns; readers fetch the writer's schema of an id
  they have not seen and resolve it to Sluice's own (newest) schema of that record, so
  a producer on an older or newer compatible version still decodes. Registry calls
  block, so every answer is kept: after the first sighting of a subject or an id, the
  hot path does no I/O.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.schema import SchemaParseException, to_parsing_canonical_form

from schemas.errors import SluiceError

FRAME_CHUNK = "io.sluice.FrameChunk"
AUDIO_CHUNK = "io.sluice.AudioChunk"
INFERENCE_RESULT = "io.sluice.InferenceResult"
ALERT = "io.sluice.Alert"
DEAD_LETTER = "io.sluice.DeadLetter"
DRIFT_EVENT = "io.sluice.DriftEvent"

if TYPE_CHECKING:
    from schemas.records import Record
    from schemas.registry import SchemaRegistry

R = TypeVar("R", bound="Record")

MAGIC_BYTE = 0
_HEADER = struct.Struct(">bI")
SCHEMA_DIR = Path(__file__).resolve().parent

# How long an id the registry did not know is taken as unknown (or as a pinned id) before it is asked
# again: poison with made-up ids costs one request per id and interval, not one per message, while an
# id registered meanwhile becomes readable. At most this many such ids are remembered.
_NOT_IN_REGISTRY_S = 30.0
_NOT_IN_REGISTRY_MAX = 10_000

AvroRecord = dict[str, Any]


class SchemaError(SluiceError, ValueError):
    """A message that is not a valid Sluice record: wrong framing, unknown schema id,
    a body that does not match its schema, or a record of an unexpected type."""


class PinnedSchema(NamedTuple):
    """One `.avsc` file with its pinned id, as `registry.json` lists it."""

    schema_id: int
    name: str  # the record's full name, e.g. io.sluice.DeadLetter
    path: Path


def pinned_schemas(schema_dir: Path = SCHEMA_DIR) -> list[PinnedSchema]:
    """Every schema version in `registry.json`, oldest first: ids only grow, so a record's versions
    come in the order they were written."""
    registry = json.loads((schema_dir / "registry.json").read_text())["schemas"]
    return sorted(PinnedSchema(int(schema_id), entry["name"], schema_dir / entry["file"])
                  for schema_id, entry in registry.items())  # fmt: skip


class _Reader(NamedTuple):
    """How to read the body behind one schema id: the record name, the schema it was written with
    and the schema to resolve it to (the same object when no resolution is needed)."""

    name: str
    writer: Any
    reader: Any


class Codec:
    """Encodes and decodes the records named in `registry.json`, with pinned ids or, given
    `registry`, with the ids of a schema registry (see the module's docstring).

    With a registry, an id the registry does not know is read as a pinned id, so records
    written before the registry was configured still decode while a topic drains."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR, registry: SchemaRegistry | None = None) -> None:
        self._pinned: dict[int, _Reader] = {}
        self._by_name: dict[str, tuple[int, Any]] = {}
        self._texts: dict[str, str] = {}  # name -> its newest schema as written in the .avsc: what gets registered
        named: dict[str, Any] = {}
        for schema_id, name, path in pinned_schemas(schema_dir):
            text = path.read_text()
            parsed = fastavro.parse_schema(json.loads(text), named_schemas=named)
            if parsed["name"] != name:
                raise SchemaError(f"registry.json names id {schema_id} {name}, the file says {parsed['name']}")
            self._pinned[schema_id] = _Reader(name, parsed, parsed)
            # The newest id of a name is the one writers use; older ids stay readable.
            self._by_name[name] = (schema_id, parsed)
            self._texts[name] = text
        self._registry = registry
        self._readers: dict[int, _Reader] = dict(self._pinned) if registry is None else {}
        self._writer_ids: dict[tuple[str, str | None], int] = {}  # (name, topic) -> registry id
        self._not_in_registry: dict[int, float] = {}  # id -> monotonic time until which it is not asked again
        self._registry_lock = threading.Lock()  # decode threads share a codec: each miss goes out once

    def schema_id(self, name: str, topic: str | None = None) -> int:
        """The id writers of `name` put in front of a record bound for `topic` (the topic matters
        only with a registry, whose subjects are per topic by default)."""
        return self._writer(name, topic)[0]

    def encode(self, name: str, record: AvroRecord, topic: str | None = None) -> bytes:
        """`record` as a `name` in the wire format. With a registry, `topic` (where it is going) names
        the subject its schema is registered under, so a writer must pass it."""
        schema_id, parsed = self._writer(name, topic)
        buf = io.BytesIO()
        buf.write(_HEADER.pack(MAGIC_BYTE, schema_id))
        try:
            fastavro.schemaless_writer(buf, parsed, record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SchemaError(f"record does not match {name}: {exc}") from exc
        return buf.getvalue()

    def decode(self, data: bytes | None, expect: str | None = None) -> tuple[str, AvroRecord]:
        """Decode one message value into (schema name, record). With `expect`, a record
        of any other type is a SchemaError too."""
        if data is None:
            raise SchemaError("message has no value (a tombstone)")
        if len(data) < _HEADER.size:
            raise SchemaError(f"message is {len(data)} bytes, shorter than the 5-byte Confluent header")
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC_BYTE:
            raise SchemaError(f"first byte is {magic:#04x}, not the Confluent magic byte 0x00")
        name, writer, reader = self._readers.get(schema_id) or self._reader_from_registry(schema_id)
        if expect is not None and name != expect:
            raise SchemaError(f"expected a {expect}, got a {name} (schema id {schema_id})")
        body = io.BytesIO(data)
        body.seek(_HEADER.size)
        try:
            record = fastavro.schemaless_reader(body, writer, reader)
        except SchemaResolutionError as exc:
            raise SchemaError(f"schema id {schema_id} does not resolve to Sluice's {name}: {exc}") from exc
        except (EOFError, ValueError, TypeError, IndexError, UnicodeDecodeError, struct.error) as exc:
            raise SchemaError(f"Avro body does not decode as {name}: {type(exc).__name__}: {exc}") from exc
        if body.tell() != len(data):
            raise SchemaError(f"{len(data) - body.tell()} trailing bytes after the {name} body")
        return name, record  # type: ignore[return-value]

    def write(self, record: Record, topic: str | None = None) -> bytes:
        """A typed record (`schemas/records.py`) in the wire format, bound for `topic` (see `encode`)."""
        return self.encode(record.schema, record.to_avro(), topic)

    def read(self, data: bytes | None, record_type: type[R]) -> R:
        """One message value as a typed record of `record_type`; any other type is a SchemaError."""
        _, avro = self.decode(data, expect=record_type.schema)
        return record_type.from_avro(avro)  # type: ignore[return-value]

    # -- ids -------------------------------------------------------------------------------------------

    def _writer(self, name: str, topic: str | None) -> tuple[int, Any]:
        try:
            pinned_id, parsed = self._by_name[name]
        except KeyError:
            raise SchemaError(f"no schema named {name!r} in the registry") from None
        if self._registry is None:
            return pinned_id, parsed
        schema_id = self._writer_ids.get((name, topic))
        if schema_id is None:
            schema_id = self._register_writer(self._registry, name, topic, parsed)
        return schema_id, parsed

    def _register_writer(self, registry: SchemaRegistry, name: str, topic: str | None, parsed: Any) -> int:
        with self._registry_lock:
            if (known := self._writer_ids.get((name, topic))) is not None:
                return known
            schema_id = registry.writer_id(registry.subject(topic, name), self._texts[name])
            self._writer_ids[(name, topic)] = schema_id
            # The id is this very schema: reading it back needs no request.
            self._readers.setdefault(schema_id, _Reader(name, parsed, parsed))
            return schema_id

    def _reader_from_registry(self, schema_id: int) -> _Reader:
        registry = self._registry
        if registry is None:
            raise SchemaError(f"unknown schema id {schema_id}; known: {sorted(self._pinned)}")
        with self._registry_lock:
            if (known := self._readers.get(schema_id)) is not None:
                return known
            if self._not_in_registry.get(schema_id, 0.0) <= time.monotonic():
                text = registry.schema_text(schema_id)
                if text is not None:
                    self._readers[schema_id] = reader = self._resolved(schema_id, text)
                    return reader
                self._remember_not_in_registry(schema_id)
        if schema_id in self._pinned:
            return self._pinned[schema_id]
        raise SchemaError(
            f"unknown schema id {schema_id}: the schema registry at {registry.where} has no such id "
            f"(nor is it one of Sluice's pinned ids {sorted(self._pinned)})"
        )

    def _remember_not_in_registry(self, schema_id: int) -> None:
        if len(self._not_in_registry) >= _NOT_IN_REGISTRY_MAX:
            del self._not_in_registry[next(iter(self._not_in_registry))]  # the oldest
        self._not_in_registry[schema_id] = time.monotonic() + _NOT_IN_REGISTRY_S

    def _resolved(self, schema_id: int, text: str) -> _Reader:
        """The writer's schema of a registry id, resolved to Sluice's newest schema of the same record."""
        try:
            writer = fastavro.parse_schema(json.loads(text))
        except (ValueError, TypeError, KeyError, SchemaParseException) as exc:  # JSON, or Avro it cannot parse
            raise SchemaError(f"schema id {schema_id} from the registry is not an Avro schema Sluice can parse: "
                              f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
        name = writer["name"] if isinstance(writer, dict) and "name" in writer else json.dumps(writer)[:80]
        if name not in self._by_name:  # not a Sluice record: read it as written (`expect` then rejects it)
            return _Reader(name, writer, writer)
        reader = self._by_name[name][1]
        if to_parsing_canonical_form(writer) == to_parsing_canonical_form(reader):
            # The same fields in the same order: read as Sluice's own, with no resolution per record.
            return _Reader(name, reader, reader)
        return _Reader(name, writer, reader)
