"""The simulated engine: admission through the scheduler, the clock of a GPU (time to first
token, prefill of what the prefix cache does not hold, decode steps: timing.py), the client
going away, and vLLM's metrics.

aiohttp tells a handler that its client left only by cancelling it, and only when the server
runs with ``handler_cancellation=True`` (``python -m agent.simulator`` and aiohttp's TestServer
do). So that an app served by a plain AppRunner also frees a slot when its client leaves, every
wait here checks the connection at least every DISCONNECT_POLL seconds. With no latency to
simulate nothing waits, and nothing is checked.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from aiohttp import web

from agent.simulator.metrics import EngineMetrics
from agent.simulator.scheduler import Scheduler
from agent.simulator.timing import GpuClock
from services.infra.aio import wait_event

DISCONNECT_POLL = 0.1


class ClientGone(Exception):
    """The client closed the connection (or, for a hung request, the server is stopping)."""


def client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@dataclass(slots=True)
class Ticket:
    """A request the engine admitted: it holds sequences and KV blocks until released."""

    id: int
    seqs: int
    prompt_tokens: int
    arrival: float
    admitted: float = 0.0
    first_token: float | None = None
    generated: int = 0
    reasons: list[str] = field(default_factory=list)


class Engine:
    def __init__(self, scheduler: Scheduler, metrics: EngineMetrics,
                 clock: GpuClock | None = None) -> None:
        self.scheduler = scheduler
        self.metrics = metrics
        self.clock = clock or GpuClock()
        self.stopping = asyncio.Event()
        """Set when the server shuts down: hung requests end instead of holding it up."""
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.Future[None], Ticket]] = {}

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def admit(self, request: web.BaseRequest, seqs: int, prompt_tokens: int,
                    arrival: float) -> Ticket:
        """Wait for the request's turn (FIFO); ClientGone when the client leaves meanwhile."""
        ticket = Ticket(next(self._ids), seqs, prompt_tokens, arrival)
        if self.scheduler.submit(ticket.id, seqs, prompt_tokens):
            self._started(ticket)
            return ticket
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[ticket.id] = (turn, ticket)
        try:
            while True:
                done, _ = await asyncio.wait((turn,), timeout=DISCONNECT_POLL)
                if done:
                    return ticket
                if client_gone(request):
                    raise ClientGone
        except BaseException:
            # Gone while waiting, or admitted and cancelled before resuming: either way the
            # slot or the queue place must go now, not when someone notices.
            self._waiting.pop(ticket.id, None)
            self._wake(self.scheduler.finish(ticket.id))
            raise

    def _started(self, ticket: Ticket) -> None:
        ticket.admitted = self.now()
        self.metrics.prompt_tokens.inc(ticket.prompt_tokens)

    def _wake(self, admitted: list[int]) -> None:
        for request_id in admitted:
            turn, ticket = self._waiting.pop(request_id)
            self._started(ticket)
            if not turn.done():
                turn.set_result(None)

    def first_token(self, ticket: Ticket, at: float) -> None:
        if ticket.first_token is None:
            ticket.first_token = at
            self.metrics.time_to_first_token.observe(at - ticket.arrival)

    def grow(self, ticket: Ticket, tokens_per_seq: int) -> None:
        self.scheduler.grow(ticket.id, ticket.prompt_tokens // max(1, ticket.seqs)
                            + tokens_per_seq)

    def release(self, ticket: Ticket) -> None:
        """Done or aborted: count it (reasons empty means aborted) and free its slots."""
        m = self.metrics
        if ticket.generated:
            m.generation_tokens.inc(ticket.generated)
        for reason in ticket.reasons or ["abort"] * ticket.seqs:
            m.request_success[reason].inc()
        m.e2e_request_latency.observe(self.now() - ticket.arrival)
        self._wake(self.scheduler.finish(ticket.id))

    async def sleep_until(self, request: web.BaseRequest, deadline: float) -> None:
        """Sleep until the loop's clock reads `deadline`; ClientGone if the client leaves."""
        loop = asyncio.get_running_loop()
        while (remaining := deadline - loop.time()) > 0:
            await asyncio.sleep(min(remaining, DISCONNECT_POLL))
            if client_gone(request):
                raise ClientGone

    async def hang(self, request: web.BaseRequest) -> None:
        """Send nothing more, keep the connection, until the client leaves or we stop."""
        while not (client_gone(request) or self.stopping.is_set()):
            await wait_event(self.stopping, DISCONNECT_POLL)
        raise ClientGone
