"""Avro records in the Confluent wire format.

Every Sluice message value is `[0x00][schema id: 4 bytes, big-endian][Avro binary body]`,
the framing Confluent's serializers, kcat, Kafka UI and ClickHouse's
`AvroConfluent` format understand. The ids are pinned in `registry.json` beside
the `.avsc` files rather than fetched from a registry service, so any consumer
holding this folder can decode every topic, and a local stack needs no registry.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import fastavro

from schemas.errors import SluiceError

FRAME_CHUNK = "io.sluice.FrameChunk"
AUDIO_CHUNK = "io.sluice.AudioChunk"
INFERENCE_RESULT = "io.sluice.InferenceResult"
ALERT = "io.sluice.Alert"
DEAD_LETTER = "io.sluice.DeadLetter"
DRIFT_EVENT = "io.sluice.DriftEvent"

if TYPE_CHECKING:
    from schemas.records import Record

R = TypeVar("R", bound="Record")

MAGIC_BYTE = 0
_HEADER = struct.Struct(">bI")
SCHEMA_DIR = Path(__file__).resolve().parent

AvroRecord = dict[str, Any]


class SchemaError(SluiceError, ValueError):
    """A message that is not a valid Sluice record: wrong framing, unknown schema id,
    a body that does not match its schema, or a record of an unexpected type."""


class Codec:
    """Encodes and decodes the records named in `registry.json`."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR) -> None:
        registry = json.loads((schema_dir / "registry.json").read_text())["schemas"]
        self._by_id: dict[int, tuple[str, Any]] = {}
        self._by_name: dict[str, tuple[int, Any]] = {}
        named: dict[str, Any] = {}
        for schema_id_text, entry in registry.items():
            schema_id = int(schema_id_text)
            parsed = fastavro.parse_schema(json.loads((schema_dir / entry["file"]).read_text()), named_schemas=named)
            if parsed["name"] != entry["name"]:
                raise SchemaError(f"registry.json names id {schema_id} {entry['name']}, the file says {parsed['name']}")
            self._by_id[schema_id] = (entry["name"], parsed)
            # The newest id of a name is the one writers use; older ids stay readable.
            if entry["name"] not in self._by_name or self._by_name[entry["name"]][0] < schema_id:
                self._by_name[entry["name"]] = (schema_id, parsed)

    def schema_id(self, name: str) -> int:
        return self._by_name[name][0]

    def encode(self, name: str, record: AvroRecord) -> bytes:
        try:
            schema_id, parsed = self._by_name[name]
        except KeyError:
            raise SchemaError(f"no schema named {name!r} in the registry") from None
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
        try:
            name, parsed = self._by_id[schema_id]
        except KeyError:
            raise SchemaError(f"unknown schema id {schema_id}; known: {sorted(self._by_id)}") from None
        if expect is not None and name != expect:
            raise SchemaError(f"expected a {expect}, got a {name} (schema id {schema_id})")
        body = io.BytesIO(data)
        body.seek(_HEADER.size)
        try:
            record = fastavro.schemaless_reader(body, parsed, parsed)
        except (EOFError, ValueError, TypeError, IndexError, UnicodeDecodeError, struct.error) as exc:
            raise SchemaError(f"Avro body does not decode as {name}: {type(exc).__name__}: {exc}") from exc
        if body.tell() != len(data):
            raise SchemaError(f"{len(data) - body.tell()} trailing bytes after the {name} body")
        return name, record  # type: ignore[return-value]

    def write(self, record: Record) -> bytes:
        """A typed record (`schemas/records.py`) in the wire format."""
        return self.encode(record.schema, record.to_avro())

    def read(self, data: bytes | None, record_type: type[R]) -> R:
        """One message value as a typed record of `record_type`; any other type is a SchemaError."""
        _, avro = self.decode(data, expect=record_type.schema)
        return record_type.from_avro(avro)  # type: ignore[return-value]
