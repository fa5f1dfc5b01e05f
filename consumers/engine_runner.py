"""An engine in a thread of its own: warm-up before traffic, batch calls, and finding the poison input.

Engine calls block for as long as the model takes; on their own thread the event
loop keeps polling meanwhile, so a long batch never costs group membership.
"""

from __future__ import annotations

import logging

import numpy as np

from consumers.lifecycle import OwnThread
from engines import Engine, EngineError
from schemas.errors import SluiceError

log = logging.getLogger(__name__)


class EngineBroken(SluiceError):
    """The engine fails on every input, a blank one too: not the inputs' fault (a lost GPU, a bad model).
    The worker stops without committing rather than dead-letter good data."""


class EngineRunner:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.spec = engine.spec
        self._thread = OwnThread(f"engine-{engine.spec.modality}")

    async def warmup(self, max_batch_size: int) -> None:
        await self._thread.call(self.engine.warmup, max_batch_size)

    async def infer(self, items: np.ndarray) -> list[np.ndarray | None]:
        """Probabilities per item; None for an item the engine fails on alone (poison)."""
        try:
            return list(await self._thread.call(self.engine.infer, items))
        except EngineError as exc:
            log.warning("%s batch of %d failed (%s); retrying its inputs one by one", self.spec.modality, len(items),
                        exc)  # fmt: skip
            return await self._isolate_poison(items)

    async def _isolate_poison(self, items: np.ndarray) -> list[np.ndarray | None]:
        rows: list[np.ndarray | None] = []
        for item in items:
            try:
                rows.append((await self._thread.call(self.engine.infer, item[None]))[0])
            except EngineError:
                rows.append(None)
        if all(row is None for row in rows):
            try:
                await self._thread.call(self.engine.infer, np.zeros_like(items[:1]))
            except EngineError as exc:
                raise EngineBroken(f"engine {self.engine.kind} fails on a blank input too: {exc}") from exc
        return rows

    def close(self, wait: bool = False) -> None:
        """Stop the thread (`wait`: until its call in progress returns); the engine itself belongs to
        whoever loaded it."""
        self._thread.close(wait=wait)
