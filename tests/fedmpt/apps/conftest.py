"""A Flower ``Grid`` that runs the ClientApp in this process, with nodes that can be dead or failing.

It lets the ServerApp's round loop run in milliseconds, without Ray or SuperNodes, and lets a test decide
which node times out (never replies) and which replies with an error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before flwr is imported: no usage events from tests

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class FakeGrid(Grid):
    """``nodes`` maps node id -> partition id; ``dead`` never reply; ``failing`` reply with an error.

    Dead and failing nodes misbehave only on the message types in ``fail_on``.
    """

    def __init__(
        self,
        client_app: ClientApp,
        nodes: Mapping[int, int],
        *,
        run_config: Mapping[str, Any] | None = None,
        dead: Iterable[int] = (),
        failing: Iterable[int] = (),
        crash_at_call: int | None = None,
        fail_on: Iterable[str] = ("query", "train", "evaluate"),
    ) -> None:
        self.client_app = client_app
        self.nodes = dict(nodes)
        self.dead = set(dead)
        self.failing = set(failing)
        self.crash_at_call = crash_at_call
        self.fail_on = set(fail_on)
        self.calls = 0
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config={"partition-id": partition, "num-partitions": len(self.nodes)},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for node_id, partition in self.nodes.items()
        }

    def set_run(self, run: Any) -> None:  # pragma: no cover - not used by the ServerApp
        raise NotImplementedError

    @property
    def run(self) -> Any:  # pragma: no cover
        raise NotImplementedError

    def create_message(  # pragma: no cover
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        return sorted(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        self.calls += 1
        if self.crash_at_call is not None and self.calls >= self.crash_at_call:
            raise RuntimeError("simulated server crash")
        replies = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            if message.metadata.message_type not in self.fail_on:
                replies.append(self.client_app(message, self.contexts[node_id]))
                continue
            if node_id in self.dead:
                continue
            if node_id in self.failing:
                replies.append(Message(Error(code=1, reason="boom"), reply_to=message))
                continue
            replies.append(self.client_app(message, self.contexts[node_id]))
        return iter(replies)


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower stamps messages with the process's task identity; set one as the ServerApp process would."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture
def fake_grid(task_identity: None) -> Callable[..., FakeGrid]:
    return FakeGrid


@pytest.fixture(scope="module")
def secagg_feature_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One frozen-feature cache per test module of secure-aggregation runs."""
    return str(tmp_path_factory.mktemp("secagg-feature-cache"))


@pytest.fixture
def secagg_run_config(
    tmp_path: Path, small_task: dict[str, Any], secagg_feature_cache: str
) -> Callable[..., dict[str, Any]]:
    """``make(**extra)``: the run config of a small masking run (3 clients, 1 round, PromptFL, seed 11, run "r")."""

    def make(**extra: Any) -> dict[str, Any]:
        return {
            "runs-dir": str(tmp_path),
            "run-name": "r",
            "num-server-rounds": 1,
            "seed": 11,
            "num-clients": 3,
            "method": "promptfl",
            **small_task,
            "cache-dir": secagg_feature_cache,
            "secure-aggregation": "masking",
            **extra,
        }

    return make
