"""ResponsiveGrid: replies are yielded as they arrive, polling backs off while idle, the timeout holds."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedmpt.apps.grid import ResponsiveGrid
from fedmpt.errors import ConfigError


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class _ScriptedGrid:
    """Push assigns ids m0, m1, ...; the reply to message i becomes pullable at ``arrival[i]`` (None: never)."""

    def __init__(self, clock: _Clock, arrival: list[float | None]) -> None:
        self.clock, self.arrival = clock, arrival
        self.sent: list[Message] = []
        self.pulls = 0
        self.delivered: set[str] = set()

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        self.sent = list(messages)
        return [f"m{i}" for i in range(len(self.sent))]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        out = []
        for mid in message_ids:
            i = int(mid[1:])
            due = self.arrival[i]
            if mid not in self.delivered and due is not None and due <= self.clock.now:
                self.delivered.add(mid)
                reply = Message(RecordDict({"config": ConfigRecord({"i": i})}), reply_to=self.sent[i])
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                out.append(reply)
        return out


def _messages(n: int) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=10 + i, message_type="train", group_id="g") for i in range(n)]


def _run(arrival: list[float | None], timeout: float | None) -> tuple[list[tuple[int, float]], Any]:
    clock = _Clock()
    inner = _ScriptedGrid(clock, arrival)
    grid = ResponsiveGrid(inner, first_poll_s=0.002, max_poll_s=0.1, clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    got: Iterator[Message] = grid.send_and_receive(_messages(len(arrival)), timeout=timeout)
    seen = [(int(m.content.config_records["config"]["i"]), clock.now) for m in got]
    return seen, (clock, inner)


@pytest.mark.usefixtures("task_identity")  # Flower stamps new messages with the process's task identity
def test_replies_are_yielded_promptly_and_in_arrival_order() -> None:
    seen, (clock, inner) = _run([0.5, 0.01, 2.0], timeout=60.0)
    assert [i for i, _ in seen] == [1, 0, 2]
    for i, at in seen:
        due = [0.5, 0.01, 2.0][i]
        assert due <= at <= due + 0.1 + 1e-9  # never later than one maximal poll interval (Flower: 0.1 s / 3 s)
    assert max(clock.sleeps) <= 0.1 + 1e-12
    assert clock.now == seen[-1][1]  # returns as soon as the last reply is in


@pytest.mark.usefixtures("task_identity")
def test_polling_backs_off_while_idle() -> None:
    _, (clock, inner) = _run([10.0], timeout=None)
    assert clock.sleeps[0] == pytest.approx(0.003)  # 0.002 * 1.5 after the first empty pull
    assert clock.sleeps[-1] == pytest.approx(0.1)
    assert inner.pulls < 10.0 / 0.1 + 20  # about one pull per 0.1 s once backed off


@pytest.mark.usefixtures("task_identity")
def test_timeout_ends_the_wait_without_the_missing_reply() -> None:
    seen, (clock, _) = _run([0.2, None], timeout=1.5)
    assert [i for i, _ in seen] == [0]
    assert clock.now == pytest.approx(1.5)


def test_poll_bounds_are_checked() -> None:
    with pytest.raises(ConfigError, match="first_poll_s"):
        ResponsiveGrid(object(), first_poll_s=0.5, max_poll_s=0.1)  # type: ignore[arg-type]
