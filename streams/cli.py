"""`sluice`: one subcommand per long-running process, plus the local stack and the demo.

    sluice stack up|down|status      the local broker and Redis (ClickHouse is embedded in the sink)
    sluice topics create             create the topics with the configured partitions
    sluice simulate                  synthetic cameras and microphones
    sluice worker [--modality M]     inference workers (one consumer group per modality)
    sluice sink                      results -> ClickHouse
    sluice notifier                  results -> alerts (Faust)
    sluice drift                     results -> drift verdicts and alerts (Faust)
    sluice demo                      all of the above for a minute, then a summary
    sluice bench engines|engine|pipeline|cookbook
                                     speed ratios, measured side by side in one run
    sluice clickhouse migrate|query  the sink's DDL, and ad-hoc SQL
    sluice schemas register [--registry URL]   the .avsc files into a schema registry; prints the ids
    sluice models list|build|activate|deactivate|status
                                     the model repository, and which version serves (plans in Redis)
    sluice config                    the effective configuration

Every process takes its settings from `streams/settings.py` (defaults, `--config`
TOML file, `SLUICE_*` environment variables). A mistake a user can fix ends in
one line saying what to do and exit status 2; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.metadata
import json
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    from rich.console import Console
    from rich.logging import RichHandler
    from rich.markup import escape
    from rich.table import Table

    import streams.settings  # noqa: F401 (pydantic-settings: the first import of the runtime extra)
except ImportError as missing:  # the base install is the device SDK alone
    sys.exit(f"error: the sluice command needs the runtime ({missing.name} is missing): pip install 'sluice[runtime]'")

from schemas.errors import SluiceError
from schemas.topics import MODALITY_NAMES
from streams.settings import SluiceSettings, load_settings, redacted

if TYPE_CHECKING:
    from producers.simulator import FleetReport

console = Console()


def _setup_logging(level: str) -> None:
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(console=Console(stderr=True), show_path=False)
        fmt = "%(name)s: %(message)s"
    else:  # into a log file: plain lines with time and level
        handler = logging.StreamHandler()
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, handlers=[handler], force=True)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retry warnings repeat the error we report
    for name in ("httpx", "httpx2"):  # the registry client's HTTP library logs every request at INFO
        logging.getLogger(name).setLevel(logging.WARNING)


def _ready_callback(path: Path | None) -> Callable[[], None] | None:
    if path is None:
        return None

    def ready() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    return ready


def _run_until_signalled(main: Callable[[asyncio.Event], Coroutine[Any, Any, Any]]) -> Any:
    """Run `main(stopping)`; SIGTERM and SIGINT set `stopping` so it drains and commits before exiting."""

    async def runner() -> Any:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        return await main(stopping)

    return asyncio.run(runner())


# -- commands ------------------------------------------------------------------------------------------


def cmd_stack(settings: SluiceSettings, args: argparse.Namespace) -> int:
    from streams.local.stack import LocalStack

    stack = LocalStack(settings)
    if args.action == "up":
        for process in stack.up():
            console.print(f"[green]{process.name}[/] running, PID {process.pid}, log {process.log_path}")
        asyncio.run(_create_topics(settings))
    elif args.action == "down":
        for name, graceful in stack.down().items():
            console.print(f"{name} stopped{'' if graceful else ' (killed)'}")
    table = Table("service", "running", "pid", "endpoint")
    for row in stack.status():
        table.add_row(row.name, "yes" if row.running else "no", str(row.pid or ""), row.endpoint)
    console.print(table)
    return 0


async def _create_topics(settings: SluiceSettings) -> None:
    from consumers.kafka import ensure_topics

    created = await ensure_topics(settings.kafka)
    console.print(f"topics created: {', '.join(created) or 'none (all exist)'}")


def cmd_topics(settings: SluiceSettings, args: argparse.Namespace) -> int:
    asyncio.run(_create_topics(settings))
    return 0


def cmd_simulate(settings: SluiceSettings, args: argparse.Namespace) -> int:
    from consumers.kafka import device_client, ensure_topics
    from producers.simulator import run_fleet
    from schemas.registry import codec_for

    updates = {
        k: v
        for k, v in {
            "cameras": args.cameras,
            "camera_fps": args.camera_fps,
            "microphones": args.microphones,
            "chunks_per_s": args.chunks_per_s,
            "frame_encoding": args.encoding,
            "drift_at_s": args.drift_at,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    sim = settings.simulator.model_copy(update=updates)
    if args.seconds is None and args.frames is None and args.audio_chunks is None:
        args.seconds = 60.0

    async def main(stopping: asyncio.Event) -> int:
        await ensure_topics(settings.kafka)
        async with device_client(settings.kafka, codec=codec_for(settings.schema_registry)) as client:
            report = await run_fleet(
                client,
                sim,
                seconds=args.seconds,
                frames_per_camera=args.frames,
                chunks_per_microphone=args.audio_chunks,
                realtime=not args.as_fast_as_possible,
                stopping=stopping,
                on_progress=_print_progress,
            )
        summary = report.as_dict()
        if args.report:
            Path(args.report).write_text(json.dumps(summary, indent=2))
        console.print_json(data=summary)
        return 1 if report.failed else 0

    return _run_until_signalled(main)


def _print_progress(report: FleetReport, elapsed_s: float) -> None:
    Console(stderr=True).print(
        f"{elapsed_s:6.1f} s: {report.frames_published} frames and {report.audio_published} audio chunks published"
        + (f", [red]{report.failed} failed[/]" if report.failed else ""), highlight=False,
    )  # fmt: skip


def cmd_worker(settings: SluiceSettings, args: argparse.Namespace) -> int:
    from consumers.model_control import ModelControl
    from consumers.worker import run_worker
    from engines import load_engines, load_version

    modalities = args.modality or MODALITY_NAMES
    engines = load_engines(settings.engine, modalities)
    loaders = {m: functools.partial(load_version, settings.engine, m) for m in modalities}
    _run_until_signalled(
        lambda stopping: run_worker(
            settings.kafka, settings.worker, engines, stopping, _ready_callback(args.ready_file),
            metrics_host=settings.metrics_host, control=ModelControl(settings.redis), loaders=loaders,
            schema_registry=settings.schema_registry,
        )
    )  # fmt: skip
    return 0


def cmd_sink(settings: SluiceSettings, args: argparse.Namespace) -> int:
    from consumers.sink import run_sink

    _run_until_signalled(
        lambda stopping: run_sink(
            settings.kafka, settings.sink, settings.clickhouse, stopping, _ready_callback(args.ready_file),
            metrics_host=settings.metrics_host, schema_registry=settings.schema_registry,
        )
    )  # fmt: skip
    return 0


def cmd_notifier(settings: SluiceSettings, args: argparse.Namespace) -> int:
    from consumers.kafka import ensure_topics
    from streams.apps.notifier import create_app, run_faust_app

    asyncio.run(ensure_topics(settings.kafka))
    app = create_app(settings.kafka, settings.notifier, settings.redis, settings.metrics_host,
                     _ready_callback(args.ready_file), settings.schema_registry)  # fmt: skip
    run_faust_app(app, settings.log_level)
    return 0


def cmd_drift(settings: SluiceSettings, args: argparse.Namespace) -> int:
    from consumers.kafka import ensure_topics
    from streams.apps.drift_monitor import create_drift_app
    from streams.apps.notifier import run_faust_app

    asyncio.run(ensure_topics(settings.kafka))
    app = create_drift_app(settings.kafka, settings.drift, settings.engine.model_repository, settings.metrics_host,
                           _ready_callback(args.ready_file), settings.schema_registry)  # fmt: skip
    run_faust_app(app, settings.log_level)
    return 0


def cmd_demo(settings: SluiceSettings, args: argparse.Namespace) -> int:
    from streams.local.demo import run_demo

    summary = run_demo(settings, seconds=args.seconds, json_path=args.json, console=console, drift_at=args.drift_at)
    return 0 if summary["ok"] else 1


def cmd_bench(settings: SluiceSettings, args: argparse.Namespace) -> int:
    from streams.local.bench import bench_engines, bench_pipeline, print_rows

    if args.what == "engine":
        from streams.local import bench_engine

        return bench_engine.main(settings, args, console)
    if args.what == "cookbook":
        from streams.local.cookbook import bench_cookbook

        generated_s, timed = bench_cookbook(args.rows, settings.clickhouse)
        rows = [{"query": t.title, "seconds": round(t.seconds, 3), "rows": t.rows} for t in timed]
        title = f"cookbook queries on {args.rows:,} generated results (generated in {generated_s:.1f} s)"
        print_rows(console, title, rows)
    elif args.what == "engines":
        rows = bench_engines(settings, tuple(args.batch_sizes), args.seconds)
        print_rows(console, "engine throughput by batch size (ratio to batch 1, same run)", rows)
    else:
        rows = bench_pipeline(settings, args.messages, args.encoding)
        print_rows(console, f"worker draining {args.messages} frames from the broker (same run)", rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def cmd_clickhouse(settings: SluiceSettings, args: argparse.Namespace) -> int:
    from consumers.clickhouse import ClickHouseUnavailable, apply_migrations, connect
    from consumers.query_endpoint import QueryUnavailable, query_endpoint, run_readonly

    ch, sink = settings.clickhouse, settings.sink
    endpoint = f"http://{sink.query_host}:{sink.query_port}" if sink.query_port is not None else None
    if args.action == "query" and ch.dsn.startswith("chdb://") and endpoint is not None:
        try:  # the sink holds the embedded engine while it runs, and serves reads
            print(json.dumps(query_endpoint(endpoint, args.sql).as_dicts(), default=str))
            return 0
        except QueryUnavailable:
            pass  # no sink running: open the engine here
    try:
        client = connect(ch.dsn)
    except ClickHouseUnavailable as exc:
        if ch.dsn.startswith("chdb://"):
            raise ClickHouseUnavailable(
                f"{exc}. Another process (the sink?) holds this embedded ClickHouse; a running sink serves "
                f"queries at {endpoint or 'SLUICE_SINK__QUERY_PORT'} (is it the sink's SLUICE_SINK__QUERY_PORT?), "
                "and migrations run when the sink starts"
            ) from exc
        raise
    try:
        if args.action == "migrate":
            applied = apply_migrations(client, ch.migrations_dir, ch.database)
            console.print(f"applied: {', '.join(applied) or 'nothing new'}")
        else:
            print(json.dumps(run_readonly(client, args.sql).as_dicts(), default=str))
    finally:
        client.close()
    return 0


def cmd_models(settings: SluiceSettings, args: argparse.Namespace) -> int:
    from streams import models

    return models.main(settings, args, console)


def cmd_schemas(settings: SluiceSettings, args: argparse.Namespace) -> int:
    from streams import schemas_cli

    return schemas_cli.main(settings, args, console)


def cmd_config(settings: SluiceSettings, args: argparse.Namespace) -> int:
    console.print_json(data=redacted(settings))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", type=Path, help="TOML settings file (also SLUICE_CONFIG)")
    parser.add_argument("--log-level", help="overrides SLUICE_LOG_LEVEL")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its message")
    parser.add_argument("--version", action="version", version=f"sluice {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="the local broker and Redis")
    p.add_argument("action", choices=["up", "down", "status"],
                   help="up: start (idempotent) and create the topics; down: stop by PID; status: what runs where")
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("topics", help="create the topics")
    p.add_argument("action", choices=["create"], help="create the missing topics with the configured partitions")
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("simulate", help="synthetic cameras and microphones")
    p.add_argument("--seconds", type=float, help="run this long (default 60 unless counts are given)")
    p.add_argument("--frames", type=int, help="frames per camera, then stop")
    p.add_argument("--audio-chunks", type=int, help="audio chunks per microphone, then stop")
    p.add_argument("--cameras", type=int, help="number of cameras (SLUICE_SIMULATOR__CAMERAS)")
    p.add_argument("--camera-fps", type=float, help="frames per second per camera")
    p.add_argument("--microphones", type=int, help="number of microphones")
    p.add_argument("--chunks-per-s", type=float, help="audio chunks per second per microphone")
    p.add_argument("--encoding", choices=["raw", "jpeg"], help="how cameras encode frames")
    p.add_argument("--drift-at", type=float, help="seconds after start when drift begins (darker frames, noisier audio)")
    p.add_argument("--seed", type=int, help="seed of the scenes (same seed, same frames and labels)")
    p.add_argument("--as-fast-as-possible", action="store_true", help="ignore the rates (with counts)")
    p.add_argument("--report", type=Path, help="write the publish counts as JSON here")
    p.set_defaults(func=cmd_simulate)

    for name, func, help_text in (
        ("worker", cmd_worker, "inference workers"),
        ("sink", cmd_sink, "results -> ClickHouse"),
        ("notifier", cmd_notifier, "results -> alerts"),
        ("drift", cmd_drift, "results -> drift verdicts (drift_events) and drift alerts"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--ready-file", type=Path, help="touched once the process has joined its consumer group")
        if name == "worker":
            p.add_argument("--modality", action="append", choices=MODALITY_NAMES, help="repeatable; default all")
        p.set_defaults(func=func)

    p = sub.add_parser("demo", help="the whole system for a while, then a summary")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the simulator publishes")
    p.add_argument("--drift-at", type=float, help="seconds after start when the simulator starts drifting")
    p.add_argument("--json", type=Path, help="also write the summary here")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="speed ratios measured side by side in one run")
    benches = p.add_subparsers(dest="what", required=True)
    b = benches.add_parser("engines", help="items/s of each bundled model per batch size, relative to batch 1")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32], help="sizes to compare")
    b.add_argument("--seconds", type=float, default=2.0, help="time per batch size")
    b = benches.add_parser("pipeline", help="one worker draining the same backlog: batching off and on, raw and JPEG")
    b.add_argument("--messages", type=int, default=2000, help="backlog of frames to drain per variant")
    b.add_argument("--encoding", type=lambda text: tuple(x.strip() for x in text.split(",")), default=("raw",),
                   help="frame encodings to compare, comma-separated (raw,jpeg); one backlog and worker each")
    b = benches.add_parser("cookbook", help="the analyst cookbook's queries on generated results")
    b.add_argument("--rows", type=int, default=10_000_000, help="generated results to query")
    b = benches.add_parser("engine", help="one model's engine alone and behind the decode pool, per batch size")
    from streams.local.bench_engine import add_arguments as add_engine_arguments

    add_engine_arguments(b)
    for b in benches.choices.values():
        if not any(action.dest == "json" for action in b._actions):
            b.add_argument("--json", type=Path, help="also write the figures here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("clickhouse", help="apply the DDL, or run read-only SQL (prints JSON rows; served by a running sink)")
    p.add_argument("action", choices=["migrate", "query"], help="migrate: apply the DDL; query: run read-only SQL")
    p.add_argument("sql", nargs="?", default="SELECT 1", help="the SQL of `query`")
    p.set_defaults(func=cmd_clickhouse)

    p = sub.add_parser("models", help="the model repository, and which version serves")
    from streams.models import add_arguments as add_models_arguments

    add_models_arguments(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("schemas", help="Sluice's .avsc files in a schema registry")
    from streams.schemas_cli import add_arguments as add_schemas_arguments

    add_schemas_arguments(p)
    p.set_defaults(func=cmd_schemas)

    p = sub.add_parser("config", help="print the effective configuration")
    p.set_defaults(func=cmd_config)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("sluice")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        _setup_logging(args.log_level or settings.log_level)
        return args.func(settings, args)
    except SluiceError as exc:
        # Something a user can fix: one clear line (the traceback only with --debug).
        if args.debug:
            raise
        # Escaped: a message may hold brackets (pip install 'sluice[runtime]') that rich would take for markup.
        Console(stderr=True).print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
