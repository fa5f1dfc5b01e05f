"""Schema Registry: the settings, the client, the subjects Sluice's records live under, and
whether one version of a schema can follow another.

Without a registry URL (the default) Sluice writes the pinned ids of `registry.json` and
nothing here talks to a network. With one, `codec_for` gives a codec that registers each
writer schema under its subject (Confluent's TopicNameStrategy by default: `<topic>-value`)
and fetches the writer schema of every id it has not seen (`schemas/codec.py`);
`register_schemas` (`sluice schemas register`) puts every `.avsc` version in the registry,
oldest first, with the compatibility mode of each subject set.

The client is confluent-kafka's `SchemaRegistryClient`: Confluent maintains it beside the
serializers downstream services use (`AvroSerializer`, `AvroDeserializer`), it speaks
Confluent's registry and Karapace alike, handles basic auth, TLS and retries, and is imported
only when a registry is configured, so a device program that never uses one does not need it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import unquote, urlsplit, urlunsplit

import fastavro
from fastavro.schema import SchemaParseException
from pydantic import BaseModel, PositiveFloat, SecretStr, field_validator, model_validator

from schemas.codec import (
    ALERT,
    AUDIO_CHUNK,
    DEAD_LETTER,
    DRIFT_EVENT,
    FRAME_CHUNK,
    INFERENCE_RESULT,
    SCHEMA_DIR,
    Codec,
    PinnedSchema,
    SchemaError,
    pinned_schemas,
)
from schemas.errors import ConfigError, SluiceError, redact_url
from schemas.topics import TopicSettings

if TYPE_CHECKING:
    from confluent_kafka.schema_registry import SchemaRegistryClient

# Confluent's names, which a registry's users already know. TopicNameStrategy: `<topic>-value`;
# RecordNameStrategy: the record's full name (one subject across topics); TopicRecordNameStrategy:
# `<topic>-<record full name>`.
SubjectNameStrategy = Literal["TopicNameStrategy", "RecordNameStrategy", "TopicRecordNameStrategy"]
Compatibility = Literal[
    "BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE", "NONE"
]
COMPATIBILITY_LEVELS: tuple[str, ...] = get_args(Compatibility)


class SchemaRegistrySettings(BaseModel):
    """Where the schema registry is, if there is one (`SLUICE_SCHEMA_REGISTRY__*`)."""

    # Comma-separated base URLs of a Confluent-protocol registry (Confluent Schema Registry, Karapace,
    # Redpanda, Apicurio's ccompat API). None: the pinned ids of schemas/registry.json, no registry.
    url: str | None = None
    subject_name_strategy: SubjectNameStrategy = "TopicNameStrategy"
    # Basic auth; or put the user in the URL (https://user:pass@registry:8081), not both.
    basic_auth_user: str | None = None
    basic_auth_password: SecretStr | None = None
    # What `sluice schemas register` sets on each subject: the registry then refuses a version that
    # breaks it. BACKWARD: consumers on the new schema read everything written with the previous one.
    compatibility: Compatibility = "BACKWARD"
    # Writers register their schema when the registry lacks it (as Confluent's serializers do). False:
    # they only look it up, and a schema nobody registered (`sluice schemas register`) is an error.
    auto_register: bool = True
    # Per request. Registry calls happen once per subject and per unseen id, then answers are cached.
    timeout_s: PositiveFloat = 10.0

    @field_validator("url")
    @classmethod
    def _http_urls(cls, url: str | None) -> str | None:
        if url is not None:
            for part in url.split(","):
                if not part.strip().startswith(("http://", "https://")):
                    raise ValueError(f"{redact_url(part.strip())!r} is not an http:// or https:// URL")
        return url

    @model_validator(mode="after")
    def _user_with_password(self) -> SchemaRegistrySettings:
        if (self.basic_auth_user is None) != (self.basic_auth_password is None):
            raise ValueError("basic_auth_user and basic_auth_password go together")
        return self


class RegistryUnavailable(SluiceError):
    """The schema registry did not answer (down, unreachable, or not a registry). Nothing is wrong with
    the record at hand: it can be tried again."""


class RegistryRefused(SluiceError):
    """The schema registry refused a request: a schema incompatible with the subject's history, bad
    credentials, or a schema not registered where writers may not register it."""


def subject_name(strategy: SubjectNameStrategy, topic: str | None, record_name: str) -> str:
    """The subject a `record_name` bound for `topic` is registered under (message values only: keys
    are plain device ids)."""
    if strategy == "RecordNameStrategy":
        return record_name
    if topic is None:
        raise SchemaError(f"writing a {record_name} with a schema registry needs the topic it goes to "
                          f"({strategy} names the subject after it): pass topic=")  # fmt: skip
    return f"{topic}-value" if strategy == "TopicNameStrategy" else f"{topic}-{record_name}"


def records_by_topic(topics: TopicSettings) -> dict[str, str]:
    """The record every Sluice topic carries, by topic name."""
    return {
        topics.frames: FRAME_CHUNK,
        topics.audio: AUDIO_CHUNK,
        topics.results: INFERENCE_RESULT,
        topics.shadow_results: INFERENCE_RESULT,
        topics.alerts: ALERT,
        topics.drift_events: DRIFT_EVENT,
        topics.dead_letters: DEAD_LETTER,
    }


class SchemaRegistry:
    """The calls Sluice makes to a schema registry, with the registry's answers turned into Sluice's
    errors: an id or schema it does not have is None, a refusal `RegistryRefused`, no answer
    `RegistryUnavailable`. Each call blocks; `Codec` caches what it learns."""

    def __init__(self, settings: SchemaRegistrySettings) -> None:
        if settings.url is None:
            raise ConfigError("no schema registry URL (SLUICE_SCHEMA_REGISTRY__URL)")
        try:
            from confluent_kafka.schema_registry import SchemaRegistryClient
        except ImportError as missing:
            raise ConfigError(f"a schema registry needs confluent-kafka's client ({missing.name} is missing): "
                              "pip install 'sluice[registry]'") from missing  # fmt: skip
        self.settings = settings
        urls, credentials = _without_credentials(settings.url)
        self.where = ", ".join(urls)
        if settings.basic_auth_user is not None and settings.basic_auth_password is not None:
            if credentials is not None:
                raise ConfigError("schema registry credentials are both in SLUICE_SCHEMA_REGISTRY__URL and in "
                                  "SLUICE_SCHEMA_REGISTRY__BASIC_AUTH_USER/PASSWORD: keep one")  # fmt: skip
            credentials = f"{settings.basic_auth_user}:{settings.basic_auth_password.get_secret_value()}"
        conf: dict[str, Any] = {"url": ",".join(urls), "timeout": settings.timeout_s}
        if credentials is not None:
            conf["basic.auth.user.info"] = credentials
        try:
            self._client: SchemaRegistryClient = SchemaRegistryClient(conf)
        except ValueError as exc:  # the client checks its configuration
            raise ConfigError(f"schema registry settings: {exc}") from exc

    def subject(self, topic: str | None, record_name: str) -> str:
        return subject_name(self.settings.subject_name_strategy, topic, record_name)

    def writer_id(self, subject: str, schema: str) -> int:
        """The id a writer of `schema` uses under `subject`: registered if writers may register it."""
        if self.settings.auto_register:
            return self.register(subject, schema)
        schema_id = self.lookup(subject, schema)
        if schema_id is None:
            raise RegistryRefused(f"subject {subject!r} at {self.where} has no version matching Sluice's schema, "
                                  "and writers may not register it (SLUICE_SCHEMA_REGISTRY__AUTO_REGISTER=false): "
                                  "run `sluice schemas register`")  # fmt: skip
        return schema_id

    def register(self, subject: str, schema: str) -> int:
        """Register `schema` under `subject` (the id it has if it is there already)."""
        from confluent_kafka.schema_registry import Schema

        return self._call(f"registering a schema under {subject!r}",
                          lambda: self._client.register_schema(subject, Schema(schema, "AVRO")))  # fmt: skip

    def lookup(self, subject: str, schema: str) -> int | None:
        """The id of `schema` under `subject`, or None if it is not one of the subject's versions."""
        from confluent_kafka.schema_registry import Schema

        found = self._call(
            f"looking up a schema under {subject!r}",
            lambda: self._client.lookup_schema(subject, Schema(schema, "AVRO")),
            not_found_is_none=True,
        )
        return None if found is None else found.schema_id

    def schema_text(self, schema_id: int) -> str | None:
        """The schema registered with `schema_id`, or None if the registry has no such id."""
        schema = self._call(f"fetching schema id {schema_id}", lambda: self._client.get_schema(schema_id),
                            not_found_is_none=True)  # fmt: skip
        return None if schema is None else schema.schema_str

    def set_compatibility(self, subject: str, level: Compatibility) -> None:
        self._call(f"setting {level} on {subject!r}", lambda: self._client.set_compatibility(subject, level))

    def close(self) -> None:
        self._client.close()

    def _call(self, doing: str, call: Callable[[], Any], not_found_is_none: bool = False) -> Any:
        """`call()`, its failures as Sluice's errors (with `not_found_is_none`, a 404 is None)."""
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            return call()
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404 and not_found_is_none:
                return None
            if exc.http_status_code >= 500:
                raise RegistryUnavailable(f"schema registry at {self.where} failed {doing}: {exc}") from exc
            raise RegistryRefused(f"schema registry at {self.where} refused {doing}: {exc}") from exc
        except Exception as exc:
            # Whatever else the client raises comes from its HTTP layer (httpx or httpx2, whichever it was
            # built with) after its own retries: no connection, a timeout, an answer that is not a registry's.
            raise RegistryUnavailable(f"schema registry at {self.where} did not answer {doing}: "
                                      f"{type(exc).__name__}: {exc}") from exc  # fmt: skip


def _without_credentials(urls: str) -> tuple[list[str], str | None]:
    """The base URLs with any `user:password@` taken out, and the first such `user:password`. The client
    would take them from the first URL too, but it keeps them in the URLs it requests, which its HTTP
    library logs: out of the URLs, they go only into the Authorization header."""
    bare: list[str] = []
    credentials = None
    for url in (part.strip() for part in urls.split(",")):
        parts = urlsplit(url)
        userinfo, at, host = parts.netloc.rpartition("@")
        if at:
            credentials = credentials or ":".join(unquote(x) for x in userinfo.split(":", 1))
            url = urlunsplit(parts._replace(netloc=host))
        bare.append(url)
    return bare, credentials


def codec_for(settings: SchemaRegistrySettings | None) -> Codec:
    """The codec a process uses: with the registry's ids when a registry URL is set, else the pinned ids."""
    if settings is None or settings.url is None:
        return Codec()
    return Codec(registry=SchemaRegistry(settings))


# -- registering Sluice's schemas -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Registration:
    """What `register_schemas` did with one schema version under one subject."""

    subject: str
    record: str
    file: str
    schema_id: int | None  # None: skipped
    outcome: str  # registered | already registered | skipped: why


def schema_history(schema_dir: Path = SCHEMA_DIR) -> dict[str, list[PinnedSchema]]:
    """Each record's `.avsc` versions, oldest first."""
    history: dict[str, list[PinnedSchema]] = {}
    for pinned in pinned_schemas(schema_dir):
        history.setdefault(pinned.name, []).append(pinned)
    return history


def register_schemas(registry: SchemaRegistry, topics: TopicSettings, compatibility: Compatibility,
                     schema_dir: Path = SCHEMA_DIR) -> list[Registration]:  # fmt: skip
    """Register every version of every record under the subject of each topic that carries it, oldest
    first, so the registry holds the history and checks each step; `compatibility` is set on each
    subject first. Each step is checked here too, so a refusal names the field at fault. A version older
    than one the subject already has is skipped: registered now, it would become the subject's latest."""
    history = schema_history(schema_dir)
    for versions in history.values():
        texts = [v.path.read_text() for v in versions]
        for i in range(1, len(texts)):
            if problems := compatibility_problems(compatibility, texts[:i], texts[i]):
                raise RegistryRefused(f"{versions[i].path.name} is not {compatibility} compatible with the versions "
                                      f"before it: {'; '.join(problems)}")  # fmt: skip
    done: list[Registration] = []
    for topic, record in records_by_topic(topics).items():
        subject = registry.subject(topic, record)
        registry.set_compatibility(subject, compatibility)
        versions = history[record]
        texts = [v.path.read_text() for v in versions]
        found = [registry.lookup(subject, text) for text in texts]
        newest_found = max((i for i, schema_id in enumerate(found) if schema_id is not None), default=-1)
        for i, (version, text) in enumerate(zip(versions, texts, strict=True)):
            file = version.path.name
            if found[i] is not None:
                done.append(Registration(subject, record, file, found[i], "already registered"))
            elif i < newest_found:
                newer = versions[newest_found].path.name
                done.append(Registration(subject, record, file, None, f"skipped: {newer} is registered already"))
            else:
                done.append(Registration(subject, record, file, registry.register(subject, text), "registered"))
    return done


# -- compatibility ----------------------------------------------------------------------------------------

# Avro's promotions: a reader of the value type reads data written as the key type.
_PROMOTIONS: dict[str, frozenset[str]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}
_COMPLEX = frozenset({"record", "error", "enum", "fixed", "array", "map"})


def compatibility_problems(mode: Compatibility, previous: Sequence[str], new: str) -> list[str]:
    """Why `new` cannot follow `previous` (a subject's versions, oldest first, as JSON text) under
    `mode`, as Confluent's registry decides it; empty if it can. BACKWARD: a reader of `new` reads data
    written with the latest previous version; FORWARD: the other way round; FULL: both; *_TRANSITIVE:
    against every previous version, not only the latest."""
    if mode == "NONE":
        return []
    candidate = _expanded(new)
    against = previous if mode.endswith("_TRANSITIVE") else previous[-1:]
    problems: list[str] = []
    for old_text in against:
        old = _expanded(old_text)
        if mode.startswith(("BACKWARD", "FULL")):
            problems += [f"reading old data with the new schema: {p}" for p in read_problems(old, candidate)]
        if mode.startswith(("FORWARD", "FULL")):
            problems += [f"reading new data with the old schema: {p}" for p in read_problems(candidate, old)]
    return problems


def read_problems(writer: Any, reader: Any, where: str = "") -> list[str]:
    """Why data written with `writer` cannot be read with `reader` under Avro's schema resolution
    (both parsed and expanded, see `_expanded`); empty if it can."""
    at = where or "the record"
    kind_w, kind_r = _kind(writer), _kind(reader)
    if kind_w == "union":  # every branch the writer may have used must be readable
        return [problem for branch in writer for problem in read_problems(branch, reader, where)]
    if kind_r == "union":
        if any(not read_problems(writer, branch, where) for branch in reader):
            return []
        return [f"{at}: {_describe(writer)} is not readable as any of {_describe(reader)}"]
    if kind_w != kind_r:
        if kind_r in _PROMOTIONS.get(kind_w, frozenset()):
            return []
        return [f"{at}: type changed from {_describe(writer)} to {_describe(reader)}, which Avro does not promote"]
    if kind_w in ("record", "error"):
        return _record_problems(writer, reader, where)
    if kind_w == "enum":
        if not _same_name(writer, reader):
            return [f"{at}: enum {writer['name']} became {reader['name']}"]
        lost = [s for s in writer["symbols"] if s not in reader["symbols"]]
        if lost and "default" not in reader:
            return [f"{at}: enum {reader['name']} lost symbols {lost} and has no default to read them as"]
        return []
    if kind_w == "fixed":
        if not _same_name(writer, reader) or writer["size"] != reader["size"]:
            return [f"{at}: fixed {writer['name']}[{writer['size']}] became {reader['name']}[{reader['size']}]"]
        return []
    if kind_w == "array":
        return read_problems(writer["items"], reader["items"], f"{where}[]")
    if kind_w == "map":
        return read_problems(writer["values"], reader["values"], f"{where}{{}}")
    return []  # the same primitive


def _record_problems(writer: dict, reader: dict, where: str) -> list[str]:
    if not _same_name(writer, reader):
        return [f"{where or 'the record'}: record {writer['name']} became {reader['name']}"]
    written = {field["name"]: field for field in writer["fields"]}
    problems: list[str] = []
    for field in reader["fields"]:
        path = f"{where}.{field['name']}" if where else field["name"]
        source = next((written[n] for n in (field["name"], *field.get("aliases", ())) if n in written), None)
        if source is None:
            if "default" not in field:
                problems.append(f"{path}: new field without a default, so records written without it cannot be read")
        else:
            problems += read_problems(source["type"], field["type"], path)
    return problems


def _expanded(text: str) -> Any:
    """A schema parsed with every named type written out where it is used, so it compares by structure."""
    try:
        return fastavro.parse_schema(json.loads(text), expand=True)
    except (ValueError, TypeError, KeyError, SchemaParseException) as exc:
        raise SchemaError(f"not an Avro schema: {type(exc).__name__}: {exc}") from exc


def _kind(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, dict):
        inner = schema["type"]
        return inner if inner in _COMPLEX else _kind(inner)  # a logical type reads as its underlying type
    return schema


def _same_name(writer: dict, reader: dict) -> bool:
    return writer["name"] == reader["name"] or writer["name"] in reader.get("aliases", ())


def _describe(schema: Any) -> str:
    if isinstance(schema, list):
        return "[" + ", ".join(_describe(branch) for branch in schema) + "]"
    kind = _kind(schema)
    return f"{kind} {schema['name']}" if kind in ("record", "error", "enum", "fixed") else kind
