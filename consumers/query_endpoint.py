"""Read-only SQL over HTTP, served by the process that owns the embedded ClickHouse engine.

chDB allows one process per data directory, and the sink is that process whenever
the system runs: without this, an analyst's `sluice clickhouse query` (or the
dashboard) could not read while results flow in. The sink serves queries on
loopback, on the same thread as its inserts (the engine is not shared between
threads), with ClickHouse's own `readonly=1`: a query that would write, drop or
change a setting is refused by the engine, not by parsing SQL here. Against a
ClickHouse server there is no need for it: readers go straight to the server.

    POST /query   body: one SQL statement   -> 200 {"columns": [...], "types": [...], "rows": [[...], ...]}
                                                400 {"error": ...}  ClickHouse refused the query
                                                503 {"error": ...}  the engine could not answer in time
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from schemas.errors import SluiceError

log = logging.getLogger(__name__)

MAX_SQL_BYTES = 1 << 20


class QueryFailed(SluiceError):
    """ClickHouse refused the query (a syntax error, an unknown table, a write in read-only mode)."""


class QueryUnavailable(SluiceError):
    """No one could run the query: the endpoint did not answer, or the engine timed out."""


@dataclass
class QueryResult:
    columns: list[str]
    types: list[str]
    rows: list[list[Any]]

    def as_dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def run_readonly(client: Client, sql: str) -> QueryResult:
    """`sql` on `client` in ClickHouse's read-only mode. Blocking: call it where the client lives."""
    try:
        result = client.query(sql, settings={"readonly": 1})
    except DatabaseError as exc:
        raise QueryFailed(str(exc).strip()) from exc
    return QueryResult(list(result.column_names), [t.name for t in result.column_types],
                       [list(row) for row in result.result_rows])  # fmt: skip


class QueryEndpoint:
    """An HTTP server on its own thread; each query is handed to `run` on the owner's event loop."""

    def __init__(
        self, host: str, port: int, run: Callable[[str], Awaitable[QueryResult]], loop: asyncio.AbstractEventLoop,
        timeout_s: float = 30.0,
    ) -> None:  # fmt: skip
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                if self.path != "/query":
                    self._reply(HTTPStatus.NOT_FOUND, {"error": "POST /query with SQL in the body"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_SQL_BYTES:
                    self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"SQL over {MAX_SQL_BYTES} bytes"})
                    return
                status, body = endpoint._answer(self.rfile.read(length).decode("utf-8", errors="replace"))
                self._reply(status, body)

            def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
                data = json.dumps(body, default=str).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
                log.debug("query endpoint: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._run = run
        self._loop = loop
        self._timeout_s = timeout_s
        self._thread = threading.Thread(target=self._server.serve_forever, name="query-endpoint", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()
        log.info("read-only SQL endpoint on %s/query", self.url)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _answer(self, sql: str) -> tuple[HTTPStatus, dict[str, Any]]:
        if not sql.strip():
            return HTTPStatus.BAD_REQUEST, {"error": "empty query"}
        future = asyncio.run_coroutine_threadsafe(self._run(sql), self._loop)  # type: ignore[arg-type]
        try:
            result = future.result(self._timeout_s)
        except QueryFailed as exc:
            return HTTPStatus.BAD_REQUEST, {"error": str(exc)}
        except FutureTimeout:
            future.cancel()
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"no answer within {self._timeout_s:.0f} s"}
        except Exception as exc:  # whatever the engine raised: the analyst gets a message, the sink goes on
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"{type(exc).__name__}: {exc}"}
        return HTTPStatus.OK, {"columns": result.columns, "types": result.types, "rows": result.rows}


def query_endpoint(url: str, sql: str, timeout_s: float = 60.0) -> QueryResult:
    """Run `sql` through the endpoint at `url`. QueryUnavailable when nothing answers there."""
    request = urllib.request.Request(f"{url}/query", data=sql.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        error = json.loads(exc.read() or b"{}").get("error", str(exc))
        if exc.code == HTTPStatus.BAD_REQUEST:
            raise QueryFailed(error) from exc
        raise QueryUnavailable(f"the query endpoint at {url} could not run the query: {error}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise QueryUnavailable(f"no query endpoint answers at {url} ({exc})") from exc
    return QueryResult(body["columns"], body["types"], body["rows"])
