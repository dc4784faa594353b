"""A Grid proxy that collects replies as soon as they arrive, for the ServerApp.

Flower 1.41's ``Grid.send_and_receive`` pushes the messages, then pulls the replies and sleeps a fixed interval
between pulls: 0.1 s in the simulation's in-memory grid and 3 s in the deployment engine's grid
(``flwr/superlink/grid/http_grid.py``), and returns only once every reply is in or the timeout has passed. Each
exchange of a round therefore waits up to one interval after its last reply. A plain round has two exchanges
(train, evaluate); a secure-aggregation round with masking has five (four protocol stages, evaluate), so in a
deployment the fixed 3 s interval alone could add seconds to every masked round.

:class:`ResponsiveGrid` keeps the same contract (push, pull until every message is answered or ``timeout``
passes) but polls with a short interval that grows geometrically from ``first_poll_s`` to ``max_poll_s``
while nothing arrives, and yields each reply as soon as it is pulled. Everything else goes to the wrapped grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedmpt.errors import ConfigError


class GridProxy(Grid):
    """A ``Grid`` that forwards everything to the wrapped ``grid``; subclasses override what they change."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class ResponsiveGrid(GridProxy):
    """``grid`` with a ``send_and_receive`` that polls from ``first_poll_s`` up to ``max_poll_s`` (x1.5 per empty
    pull, back to ``first_poll_s`` after each reply) and streams the replies."""

    def __init__(
        self,
        grid: Grid,
        *,
        first_poll_s: float = 0.002,
        max_poll_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not 0 < first_poll_s <= max_poll_s:
            raise ConfigError(f"need 0 < first_poll_s <= max_poll_s, got {first_poll_s}, {max_poll_s}")
        super().__init__(grid)
        self.first_poll_s, self.max_poll_s = first_poll_s, max_poll_s
        self._clock, self._sleep = clock, sleep

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        """Push ``messages`` and yield their replies as they arrive, until all are in or ``timeout`` seconds
        (None: no limit) have passed; a message without a reply by then yields nothing."""
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else self._clock() + timeout
        interval = self.first_poll_s
        while pending:
            replies = list(self._grid.pull_messages(sorted(pending)))
            for reply in replies:
                pending.discard(reply.metadata.reply_to_message_id)
                yield reply
            if not pending:
                return
            now = self._clock()
            if deadline is not None and now >= deadline:
                return
            interval = self.first_poll_s if replies else min(interval * 1.5, self.max_poll_s)
            self._sleep(interval if deadline is None else min(interval, deadline - now))
