"""Schema evolution: every new `.avsc` version of a record is BACKWARD compatible with the one before it
(consumers on the new schema read everything written with the old), so a new field cannot break anyone
reading the topic's history. Each pair of consecutive versions in `registry.json` is checked twice:

- by data: records written with the old schema (fastavro's generator, seeded) are read with the new one
  through Avro schema resolution, and the fields come out as written, new ones as their defaults;
- by structure (`schemas.registry.compatibility_problems`, the check `sluice schemas register` and the
  registry double make): new fields need defaults, and no type changes without an Avro promotion.

The pairs come from `registry.json`, so the next version of any record is checked as soon as it is listed."""

from __future__ import annotations

import io
import itertools
import json
import random
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.read import SchemaResolutionError
from fastavro.schema import to_parsing_canonical_form
from fastavro.utils import generate_many

from schemas.codec import DEAD_LETTER
from schemas.registry import compatibility_problems, schema_history

RECORDS_PER_PAIR = 50

PAIRS = [
    pytest.param(older.path, newer.path, id=f"{newer.name}:{older.path.name}->{newer.path.name}")
    for versions in schema_history().values()
    for older, newer in itertools.pairwise(versions)
]


def read_old_data_with_new_schema(old: str, new: str) -> int:
    """Write records with `old`, read them with `new`; assert each field reads as written (or, if new, as its
    default). Returns how many records it read. Raises fastavro's SchemaResolutionError where they do not resolve."""
    writer, reader = (fastavro.parse_schema(json.loads(text)) for text in (old, new))
    state = random.getstate()
    random.seed(2030)  # the generator draws from the module's random: the same records every run
    try:
        records = list(generate_many(writer, RECORDS_PER_PAIR))
    finally:
        random.setstate(state)
    written_fields = {f["name"]: f for f in fastavro.parse_schema(json.loads(old), expand=True)["fields"]}
    for record in records:
        body = io.BytesIO()
        fastavro.schemaless_writer(body, writer, record)
        as_written = fastavro.schemaless_reader(io.BytesIO(body.getvalue()), writer, writer)  # floats as stored
        as_read = fastavro.schemaless_reader(io.BytesIO(body.getvalue()), writer, reader)
        for field in fastavro.parse_schema(json.loads(new), expand=True)["fields"]:
            name = field["name"]
            if name not in written_fields:
                assert as_read[name] == field["default"], f"new field {name} did not read as its default"
            elif _same_type(written_fields[name]["type"], field["type"]):
                assert as_read[name] == as_written[name], f"{name} did not read as written"
            # A changed type (a promotion, a field added inside a nested record) is the structural check's.
    return len(records)


def _same_type(a: Any, b: Any) -> bool:
    return to_parsing_canonical_form(a) == to_parsing_canonical_form(b)


def test_there_are_versions_to_check() -> None:
    """The checks below are per pair of versions: an empty list would pass them all vacuously."""
    assert len(schema_history()[DEAD_LETTER]) >= 2 and PAIRS


@pytest.mark.parametrize(("older", "newer"), PAIRS)
def test_a_new_version_reads_data_written_with_the_previous_one(older: Path, newer: Path) -> None:
    assert read_old_data_with_new_schema(older.read_text(), newer.read_text()) == RECORDS_PER_PAIR


@pytest.mark.parametrize(("older", "newer"), PAIRS)
def test_a_new_version_is_backward_compatible_by_structure(older: Path, newer: Path) -> None:
    assert compatibility_problems("BACKWARD", [older.read_text()], newer.read_text()) == []


# -- the check catches what it is for ----------------------------------------------------------------------------


def _dead_letter_v2_with(change: Any) -> tuple[str, str]:
    """(dead_letter_v2.avsc, the same schema with `change` applied to a copy of it)."""
    old = schema_history()[DEAD_LETTER][-1].path.read_text()
    new = json.loads(old)
    change(new)
    return old, json.dumps(new)


def test_a_new_field_without_a_default_is_caught() -> None:
    old, new = _dead_letter_v2_with(lambda s: s["fields"].append({"name": "attempts", "type": "int"}))
    problems = compatibility_problems("BACKWARD", [old], new)
    assert problems == [
        "reading old data with the new schema: attempts: new field without a default, so records written without "
        + "it cannot be read"
    ]
    with pytest.raises(SchemaResolutionError, match="attempts"):
        read_old_data_with_new_schema(old, new)


def test_a_type_change_without_a_promotion_is_caught() -> None:
    def stage_becomes_an_int(schema: dict) -> None:
        next(f for f in schema["fields"] if f["name"] == "stage")["type"] = "int"

    old, new = _dead_letter_v2_with(stage_becomes_an_int)
    assert compatibility_problems("BACKWARD", [old], new) == [
        "reading old data with the new schema: stage: type changed from string to int, which Avro does not promote"
    ]
    with pytest.raises(SchemaResolutionError):
        read_old_data_with_new_schema(old, new)


def test_a_nested_field_without_a_default_is_caught() -> None:
    def header_gains_a_field(schema: dict) -> None:
        headers = next(f for f in schema["fields"] if f["name"] == "headers")
        headers["type"]["items"]["fields"].append({"name": "encoding", "type": "string"})

    old, new = _dead_letter_v2_with(header_gains_a_field)
    assert any(
        "headers[].encoding: new field without a default" in p for p in compatibility_problems("BACKWARD", [old], new)
    )


def test_promotions_and_new_fields_with_defaults_pass() -> None:
    def evolve(schema: dict) -> None:
        next(f for f in schema["fields"] if f["name"] == "source_partition")["type"] = "long"  # int -> long
        schema["fields"].append({"name": "attempts", "type": "int", "default": 0})
        schema["fields"].append({"name": "note", "type": ["null", "string"], "default": None})

    old, new = _dead_letter_v2_with(evolve)
    assert compatibility_problems("BACKWARD", [old], new) == []
    assert read_old_data_with_new_schema(old, new) == RECORDS_PER_PAIR


def test_removing_a_field_is_backward_but_not_forward_compatible() -> None:
    """Readers of the new schema skip what they do not know; readers of the old one miss a field with no default."""
    old, new = _dead_letter_v2_with(lambda s: s["fields"].remove(next(f for f in s["fields"] if f["name"] == "stage")))
    assert compatibility_problems("BACKWARD", [old], new) == []
    assert compatibility_problems("FORWARD", [old], new) == [
        "reading new data with the old schema: stage: new field without a default, so records written without "
        + "it cannot be read"
    ]
