"""The app layer against a deviating server: each attack drives the real ClientApp through an in-process Grid.

* a plain ``train`` message to a node of a masking run (read the update in the clear) is refused;
* a server that lowers t, or lists fewer than t participants to replay a round to different subsets, is refused
  by every client (t and the run id come from the kit, not from the server);
* a round replayed to a restarted ClientApp (fresh ``context.state``, as under the deployment engine) is refused
  by the node's on-disk round counter;
* a round number in the message that differs from the protocol's round (to retrain with another round's seed)
  is refused;
* a run config that disagrees with a provisioned kit stops before round 1, naming both values.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedmpt.apps import task
from fedmpt.apps.client_app import build_client_app
from fedmpt.apps.config import read_app_config
from fedmpt.apps.kit import Kit, RoundCounter, ensure_run_kit
from fedmpt.apps.masking_app import MaskingAggregator
from fedmpt.apps.messages import Key, RecordName, to_array_record
from fedmpt.apps.secagg_config import SecAggKey, Stage
from fedmpt.apps.server_app import run_federation
from fedmpt.errors import ConfigError

NODES = {17: 0, 555: 1, 9001: 2}


@pytest.fixture
def config(secagg_run_config: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Run configs of a small 3-client masking run (``tests/fedmpt/apps/conftest.py``)."""
    return secagg_run_config


def _lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(node_id: int, content: RecordDict) -> Message:
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN, group_id="attack")


def test_a_plain_train_message_to_a_masking_node_is_refused(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    cfg = config()
    grid = fake_grid(build_client_app(), NODES, run_config=cfg)
    arrays = task.initial_arrays(read_app_config(cfg).task, 11)
    content = RecordDict(
        {RecordName.ARRAYS: to_array_record(arrays), RecordName.CONFIG: ConfigRecord({Key.SERVER_ROUND: 1})}
    )
    (reply,) = grid.send_and_receive([_train(17, content)])
    assert reply.has_error() and "refusing a plain train message" in reply.error.reason


def test_a_node_provisioned_for_secure_aggregation_refuses_plain_training_whatever_the_run_config(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any], tmp_path: Path
) -> None:
    cfg = config(**{"secure-aggregation": "none"})
    grid = fake_grid(build_client_app(), NODES, run_config=cfg)
    ensure_run_kit(tmp_path / "site-kit", 3)
    grid.contexts[17].node_config["secagg-dir"] = str(tmp_path / "site-kit")
    arrays = task.initial_arrays(read_app_config(cfg).task, 11)
    content = RecordDict(
        {RecordName.ARRAYS: to_array_record(arrays), RecordName.CONFIG: ConfigRecord({Key.SERVER_ROUND: 1})}
    )
    (reply,) = grid.send_and_receive([_train(17, content)])
    assert reply.has_error() and "provisioned for secure aggregation" in reply.error.reason


class _Recorder:
    """Grid wrapper recording every message sent (the server's requests)."""

    def __init__(self, grid: Any) -> None:
        self.grid, self.sent = grid, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        messages = list(messages)
        self.sent += messages
        return self.grid.send_and_receive(messages, timeout=timeout)


def test_a_recorded_round_replayed_to_a_restarted_client_app_is_refused(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    cfg = config()
    recorder = _Recorder(fake_grid(build_client_app(), NODES, run_config=cfg))
    run = run_federation(recorder, read_app_config(cfg))  # type: ignore[arg-type]
    assert _lines(run.path)[0]["status"] == "ok"
    advertise = [
        m
        for m in recorder.sent
        if m.content.config_records.get(RecordName.CONFIG, {}).get(SecAggKey.STAGE) == Stage.ADVERTISE
    ]
    assert len(advertise) == 3
    # Restarted SuperNodes: fresh ClientApp contexts (nothing in memory), the same disk.
    restarted = fake_grid(build_client_app(), NODES, run_config=cfg)
    replayed = [_train(m.metadata.dst_node_id, m.content) for m in advertise]
    replies = list(restarted.send_and_receive(replayed))
    assert len(replies) == 3
    for reply in replies:
        assert reply.has_error() and "replayed or re-run round" in reply.error.reason
    kit = Kit.load(run.path / "secagg")
    assert all(RoundCounter.for_node(kit.path / "masking", k).last_round(kit.params.run_id) == 1 for k in range(3))


def test_a_server_that_lowers_t_or_lists_fewer_than_t_participants_gets_nothing(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deviating server replays round 1 to the subsets {0,1}, {1,2}, {0,2} to difference their sums: with the
    kit's t = 3 a list of two is refused; lowering t in its requests is refused too. Nothing is aggregated."""
    cfg = config(**{"num-server-rounds": 3, "round-timeout-s": 0.5})
    real_create = MaskingAggregator.create

    def lowered(app_config: Any, run_path: Path) -> MaskingAggregator:
        honest = real_create(app_config, run_path)
        return MaskingAggregator(honest.config, honest.kit, replace(honest.protocol, threshold=2))

    monkeypatch.setattr(MaskingAggregator, "create", staticmethod(lowered))
    import fedmpt.apps.server_app as server_app

    subsets = iter([[0, 1], [1, 2], [0, 2]])
    monkeypatch.setattr(server_app, "sample_participants", lambda *a, **kw: next(subsets))
    run = run_federation(fake_grid(build_client_app(), NODES, run_config=cfg), read_app_config(cfg))
    lines = _lines(run.path)
    assert [x["status"] for x in lines] == ["secure-aggregation-failed"] * 3
    for line in lines:
        reasons = " ".join(f["reason"] for f in line["clients_failed"])
        assert "differ from this node's provisioned" in reasons
        assert "train" not in line


def test_a_round_number_that_differs_from_the_protocol_round_is_refused(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    cfg = config()
    recorder = _Recorder(fake_grid(build_client_app(), NODES, run_config=cfg))
    run_federation(recorder, read_app_config(cfg))  # type: ignore[arg-type]
    (first,) = [
        m
        for m in recorder.sent
        if m.metadata.dst_node_id == 17
        and m.content.config_records.get(RecordName.CONFIG, {}).get(SecAggKey.STAGE) == Stage.ADVERTISE
    ]
    # Round 2's protocol setup, but the message claims round 1 (the server wants round 1's training seed again).
    fresh = fake_grid(build_client_app(), NODES, run_config=cfg)
    kit = Kit.load(Path(cfg["runs-dir"]) / "r" / "secagg")
    from secagg import masking

    arrays = task.initial_arrays(read_app_config(cfg).task, 11)
    from fedmpt.apps.masking_app import masking_config
    from fedmpt.apps.update_vector import model_digest

    protocol = masking_config(kit, 16, 1.0)
    _, requests = masking.server_start_round(
        protocol, [0, 1, 2], sum(a.size for a in arrays.values()), 2,
        run_id=kit.params.run_id, graph_seed=kit.params.graph_seed, model_digest=model_digest(arrays),
        roster=kit.roster,
    )  # fmt: skip
    config_record = ConfigRecord(
        {Key.SERVER_ROUND: 1, SecAggKey.STAGE: str(Stage.ADVERTISE), SecAggKey.PAYLOAD: requests[0]}
    )
    content = RecordDict(
        {
            RecordName.ARRAYS: first.content.array_records[RecordName.ARRAYS],
            RecordName.CONFIG: config_record,
        }
    )
    (reply,) = fresh.send_and_receive([_train(17, content)])
    assert reply.has_error() and "carries a protocol setup for round 2" in reply.error.reason


def test_a_run_config_that_disagrees_with_the_kit_stops_before_round_one(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any], tmp_path: Path
) -> None:
    kit = ensure_run_kit(tmp_path / "kit", 3)
    assert kit.params.threshold == 3
    cfg = config(**{"secagg-dir": str(tmp_path / "kit"), "secagg-threshold": 2})
    with pytest.raises(ConfigError, match="'secagg-threshold'=2 differs from the kit's t=3"):
        run_federation(fake_grid(build_client_app(), NODES, run_config=cfg), read_app_config(cfg))
    low_participation = config(
        **{"secagg-dir": str(tmp_path / "kit"), "fraction-train": 0.5, "min-clients": 2, "run-name": "r2"}
    )
    with pytest.raises(ConfigError, match="raise 'fraction-train' or 'min-clients'"):
        run_federation(
            fake_grid(build_client_app(), NODES, run_config=low_participation), read_app_config(low_participation)
        )


@pytest.mark.parametrize("mode", ["masking", "ckks"])
def test_more_supernodes_than_provisioned_partitions_is_one_clear_error(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any], mode: str
) -> None:
    """Four SuperNodes, a run for three partitions: the round stops naming the key that fixes it (not an overflow
    or a protocol refusal far from the cause)."""
    from fedmpt.errors import FederationError

    cfg = config(**{"secure-aggregation": mode})
    nodes = {**NODES, 4242: 3}
    grid = fake_grid(build_client_app(), nodes, run_config=cfg)
    grid.contexts[4242].node_config["num-partitions"] = 4
    with pytest.raises(FederationError, match=r"partitions \[3\] are connected .* set 'num-clients'"):
        run_federation(grid, read_app_config(cfg))


def test_a_recorded_ckks_round_replayed_to_a_restarted_client_app_is_refused(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    """CKKS binds uploads to a round too: replaying round 2's train message (the verified state of round 1 down)
    to restarted ClientApps, to have them train and upload that round again, is refused by the disk counter."""
    cfg = config(**{"secure-aggregation": "ckks", "num-server-rounds": 2})
    recorder = _Recorder(fake_grid(build_client_app(), NODES, run_config=cfg))
    run = run_federation(recorder, read_app_config(cfg))  # type: ignore[arg-type]
    assert [x["status"] for x in _lines(run.path)] == ["ok", "ok"]
    second = [
        m
        for m in recorder.sent
        if m.content.config_records.get(RecordName.CONFIG, {}).get(SecAggKey.STAGE) == Stage.CKKS
        and m.content.config_records[RecordName.CONFIG].get(Key.SERVER_ROUND) == 2
    ]
    assert len(second) == 3 and all(m.content.config_records[RecordName.CONFIG][SecAggKey.PAYLOAD] for m in second)
    restarted = fake_grid(build_client_app(), NODES, run_config=cfg)
    replies = list(restarted.send_and_receive([_train(m.metadata.dst_node_id, m.content) for m in second]))
    assert len(replies) == 3
    for reply in replies:
        assert reply.has_error() and "replayed or re-run round" in reply.error.reason
