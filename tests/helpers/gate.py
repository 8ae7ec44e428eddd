"""A gate for the fake upstream: each request waits at the upstream until the test lets
it go, so the proxy holds its reservation for real while it waits.

Install it as ``upstream.gate = Gate()``; ``FakeUpstream`` awaits ``gate.wait()`` after
recording a request and before answering it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Literal


class Gate(asyncio.Event):
    """An :class:`asyncio.Event` that also counts the requests it holds and can let them
    go one at a time: ``release(n)`` frees the ``n`` that arrived first, ``set()`` opens
    the gate for the held requests and every later one."""

    def __init__(self) -> None:
        super().__init__()
        self._held: deque[asyncio.Future[None]] = deque()
        self.peak = 0
        """The most requests held at once."""

    @property
    def held(self) -> int:
        return len(self._held)

    async def wait(self) -> Literal[True]:
        if self.is_set():
            return True
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._held.append(ticket)
        self.peak = max(self.peak, len(self._held))
        try:
            await ticket
        finally:
            if ticket in self._held:  # the request was cancelled while held
                self._held.remove(ticket)
        return True

    def release(self, n: int = 1) -> None:
        for _ in range(min(n, len(self._held))):
            self._held.popleft().set_result(None)

    def set(self) -> None:
        super().set()
        self.release(len(self._held))

    async def until_held(self, n: int, timeout: float = 5.0) -> None:
        """Wait until at least ``n`` requests are held (they crossed admission)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self._held) < n:
            if loop.time() > deadline:
                raise AssertionError(f"{len(self._held)} requests held at the upstream, not {n}")
            await asyncio.sleep(0.005)
