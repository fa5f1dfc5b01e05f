"""A registry-protocol double for the tests: NOT a schema registry.

It serves the subset of Confluent Schema Registry's REST API that confluent-kafka's
`SchemaRegistryClient` (and so its `AvroSerializer`/`AvroDeserializer`) and Sluice's codec
call, with stdlib `http.server` on a thread of the test process, on loopback, on a free
port. It stands in for a real registry because none installs from the package registries
here (Karapace is published as source only and needs Python >= 3.12, Confluent's is a JVM
service); issue 9 accepts a named double for this one component. Like Karapace and
Confluent's registry, it assigns its own ids from 1, gives an identical schema (compared
after parsing) the same id in every subject, numbers each subject's versions from 1, and
refuses a version that breaks the subject's compatibility mode with 409 (the check is
`schemas.registry.compatibility_problems`, so it proves the protocol, not that check).

    POST /subjects/{s}/versions                  register            -> {"id"}
    POST /subjects/{s}                           look a schema up    -> {"subject", "id", "version", "schema"}
    GET  /schemas/ids/{id}                       a schema by id      -> {"schema"}
    GET  /subjects                               subject names
    GET  /subjects/{s}/versions                  version numbers
    GET  /subjects/{s}/versions/{v|latest}       one version
    PUT|GET /config[/{s}]                        compatibility mode
    POST /compatibility/subjects/{s}/versions/{v|latest}  -> {"is_compatible"}

Every request is recorded in `requests` (method, path), so a test can count what a client
asked for; `last_authorization` keeps the latest Authorization header.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import unquote, urlsplit

from schemas.registry import COMPATIBILITY_LEVELS, compatibility_problems

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class RegistryAnswer(Exception):
    """An error answer: HTTP status, the registry's error code and its message."""

    def __init__(self, status: int, error_code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.error_code, self.message = status, error_code, message


def _canonical(schema: str) -> str:
    """What makes two schema texts the same schema: the JSON, whitespace and key order aside."""
    return json.dumps(json.loads(schema), sort_keys=True, separators=(",", ":"))


class RegistryDouble:
    """The registry's state, and the HTTP server that serves it (`with RegistryDouble() as registry:`)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.last_authorization: str | None = None  # the Authorization header of the latest request
        self._schemas: list[str] = []  # id - 1 -> schema text, as first registered
        self._ids: dict[str, int] = {}  # canonical text -> id
        self._subjects: dict[str, list[int]] = {}  # subject -> schema id of each version
        self._compatibility: dict[str, str] = {}  # subject -> mode
        self.global_compatibility = "BACKWARD"  # Confluent's and Karapace's default
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        # A short poll: shutdown() waits for the loop to look again, and each test stops its own double.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="registry-double", daemon=True
        )
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def subject_ids(self, subject: str) -> list[int]:
        """The schema id of each version of `subject`, oldest first."""
        return list(self._subjects.get(subject, []))

    def schema_id(self, schema: str) -> int | None:
        return self._ids.get(_canonical(schema))

    # -- the API -------------------------------------------------------------------------------------------

    def answer(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        parts = [unquote(part) for part in path.strip("/").split("/")]
        with self._lock:
            for pattern_method, pattern, action in _ROUTES:
                if pattern_method == method and (match := pattern.fullmatch("/".join(parts))) is not None:
                    return action(self, *match.groups(), body or {})
        raise RegistryAnswer(404, 404, f"no route {method} {path} in the registry double")

    def _register(self, subject: str, body: dict[str, Any]) -> Any:
        schema = self._schema_of(body)
        versions = self._subjects.get(subject, [])
        canonical = _canonical(schema)
        if canonical in self._ids and self._ids[canonical] in versions:
            return {"id": self._ids[canonical]}
        mode = self._compatibility.get(subject, self.global_compatibility)
        history = [self._schemas[schema_id - 1] for schema_id in versions]
        problems = compatibility_problems(mode, history, schema)  # type: ignore[arg-type]
        if problems:
            raise RegistryAnswer(409, 409, f"Schema being registered is incompatible with an earlier schema for "
                                           f"subject \"{subject}\" ({mode}): {'; '.join(problems)}")  # fmt: skip
        if canonical not in self._ids:
            self._schemas.append(schema)
            self._ids[canonical] = len(self._schemas)
        self._subjects.setdefault(subject, []).append(self._ids[canonical])
        return {"id": self._ids[canonical]}

    def _lookup(self, subject: str, body: dict[str, Any]) -> Any:
        versions = self._versions(subject)
        schema_id = self._ids.get(_canonical(self._schema_of(body)))
        if schema_id not in versions:
            raise RegistryAnswer(404, 40403, "Schema not found")
        return self._version_answer(subject, versions.index(schema_id) + 1)

    def _schema_by_id(self, schema_id: str, _: dict[str, Any]) -> Any:
        if not 1 <= int(schema_id) <= len(self._schemas):
            raise RegistryAnswer(404, 40403, f"Schema {schema_id} not found")
        return {"schema": self._schemas[int(schema_id) - 1]}

    def _subject_names(self, _: dict[str, Any]) -> Any:
        return sorted(self._subjects)

    def _version_numbers(self, subject: str, _: dict[str, Any]) -> Any:
        return list(range(1, len(self._versions(subject)) + 1))

    def _version(self, subject: str, version: str, _: dict[str, Any]) -> Any:
        return self._version_answer(subject, self._version_number(subject, version))

    def _set_compatibility(self, subject: str | None, body: dict[str, Any]) -> Any:
        level = str(body.get("compatibility", "")).upper()
        if level not in COMPATIBILITY_LEVELS:
            raise RegistryAnswer(422, 42203, f"Invalid compatibility level {level!r}")
        if subject is None:
            self.global_compatibility = level
        else:
            self._compatibility[subject] = level
        return {"compatibility": level}

    def _get_compatibility(self, subject: str | None, _: dict[str, Any]) -> Any:
        level = self.global_compatibility if subject is None else self._compatibility.get(subject)
        if level is None:
            raise RegistryAnswer(
                404, 40408, f"Subject '{subject}' does not have subject-level compatibility configured"
            )
        return {"compatibilityLevel": level}

    def _test_compatibility(self, subject: str, version: str, body: dict[str, Any]) -> Any:
        against = self._schemas[self._versions(subject)[self._version_number(subject, version) - 1] - 1]
        mode = self._compatibility.get(subject, self.global_compatibility)
        problems = compatibility_problems(mode, [against], self._schema_of(body))  # type: ignore[arg-type]
        return {"is_compatible": not problems, "messages": problems}

    def _schema_of(self, body: dict[str, Any]) -> str:
        if body.get("schemaType", "AVRO") != "AVRO" or body.get("references"):
            raise RegistryAnswer(422, 42201, "the registry double holds plain Avro schemas only")
        schema = body.get("schema")
        try:
            _canonical(schema)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise RegistryAnswer(422, 42201, f"Invalid schema: {exc}") from exc
        return schema  # type: ignore[return-value]

    def _versions(self, subject: str) -> list[int]:
        if subject not in self._subjects:
            raise RegistryAnswer(404, 40401, f"Subject '{subject}' not found.")
        return self._subjects[subject]

    def _version_number(self, subject: str, version: str) -> int:
        versions = self._versions(subject)
        number = len(versions) if version == "latest" else int(version)
        if not 1 <= number <= len(versions):
            raise RegistryAnswer(404, 40402, f"Version {version} not found.")
        return number

    def _version_answer(self, subject: str, version: int) -> dict[str, Any]:
        schema_id = self._subjects[subject][version - 1]
        return {"subject": subject, "id": schema_id, "version": version, "schema": self._schemas[schema_id - 1]}


_SUBJECT = r"([^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], Callable[..., Any]]] = [
    ("POST", re.compile(rf"subjects/{_SUBJECT}/versions"), RegistryDouble._register),
    ("POST", re.compile(rf"subjects/{_SUBJECT}"), RegistryDouble._lookup),
    ("GET", re.compile(r"schemas/ids/(\d+)"), RegistryDouble._schema_by_id),
    ("GET", re.compile(r"subjects"), RegistryDouble._subject_names),
    ("GET", re.compile(rf"subjects/{_SUBJECT}/versions"), RegistryDouble._version_numbers),
    ("GET", re.compile(rf"subjects/{_SUBJECT}/versions/(latest|\d+)"), RegistryDouble._version),
    ("PUT", re.compile(rf"config(?:/{_SUBJECT})?"), RegistryDouble._set_compatibility),
    ("GET", re.compile(rf"config(?:/{_SUBJECT})?"), RegistryDouble._get_compatibility),
    (
        "POST",
        re.compile(rf"compatibility/subjects/{_SUBJECT}/versions/(latest|\d+)"),
        RegistryDouble._test_compatibility,
    ),
]


def _handler_for(registry: RegistryDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            path = urlsplit(self.path).path
            registry.requests.append((self.command, path))
            registry.last_authorization = self.headers.get("Authorization")
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length)) if length else None
                status, answer = 200, registry.answer(self.command, path, body)
            except RegistryAnswer as refused:
                status, answer = refused.status, {"error_code": refused.error_code, "message": refused.message}
            except ValueError as exc:  # a body that is not JSON
                status, answer = 400, {"error_code": 400, "message": f"body is not JSON: {exc}"}
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the tests count `requests` instead."""

    return Handler
