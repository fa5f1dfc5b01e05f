"""What every long-running consumer process shares around its checkpoint: a thread of its own for
blocking calls, and the wait until it has joined its groups before it reports ready."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class OwnThread:
    """One dedicated thread for blocking calls that must run one at a time (an engine, an embedded
    ClickHouse client), so the event loop keeps polling and heartbeating meanwhile."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self, wait: bool = False) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=not wait)


async def run_until_done(
    runs: Sequence[asyncio.Task], joined: Sequence[asyncio.Event], on_ready: Callable[[], None] | None
) -> None:
    """Call `on_ready` once every member has joined its group (not before: a ready file means "taking
    traffic"), then wait for the runs. The first run to fail is re-raised after the others finish."""
    joined_all = asyncio.ensure_future(asyncio.gather(*(event.wait() for event in joined)))
    try:
        await asyncio.wait([joined_all, *runs], return_when=asyncio.FIRST_COMPLETED)
        if joined_all.done() and on_ready is not None:
            on_ready()
        results = await asyncio.gather(*runs, return_exceptions=True)
    finally:
        joined_all.cancel()
        await asyncio.gather(joined_all, return_exceptions=True)  # retrieved: asyncio logs no stray CancelledError
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise failures[0]
