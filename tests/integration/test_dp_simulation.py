"""DP through Flower's simulation engine (Ray): context.state, node ledgers, run ledger, then ``fedmpt report``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedmpt.apps.kit import Kit
from fedmpt.apps.simulation import run_local_simulation
from privacy.accounting import DpSgdEvent
from privacy.ledger import LedgerEntry, verify_ledger

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_dp_simulation_then_report(tmp_path: Path, small_task: dict[str, Any]) -> None:
    ray = pytest.importorskip("ray")
    from fedmpt.cli import main

    overrides = {
        "num-server-rounds": 2,
        "runs-dir": str(tmp_path),
        "run-name": "dpsim",
        "seed": 3,
        "num-clients": 3,
        "method": "promptfl",
        "dp": True,
        "noise-multiplier": 1.3,
        "delta": 1e-3,
        # a budget that is never reached (privacy.report reads max-epsilon = 0, "no budget" here, as a budget of 0)
        "max-epsilon": 50.0,
        **small_task,
    }
    path = run_local_simulation(overrides, num_supernodes=3)
    assert not ray.is_initialized()
    lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    entries = [LedgerEntry.from_line(x) for x in (path / "epsilon_ledger.jsonl").read_bytes().splitlines()]
    # 16 records, expected batch 8: two steps of (1.3, 0.5) per round per node, accumulated across rounds even
    # though Flower rebuilt the ClientApp for every message
    assert sorted((e.node_id, e.round, e.seq) for e in entries) == [
        (str(k), r, r - 1) for k in range(3) for r in (1, 2)
    ]
    assert {e.event() for e in entries} == {DpSgdEvent(1.3, 0.5, 2)}
    for line in lines:
        assert line["clients_replied"] == [0, 1, 2]
        for node, values in line["epsilon"]["clients"].items():
            mine = [e for e in entries if e.node_id == node and e.round <= line["round"]]
            assert values["epsilon_rdp"] == pytest.approx(mine[-1].epsilon_rdp, rel=1e-9)
    assert lines[1]["epsilon"]["max_epsilon_rdp"] > lines[0]["epsilon"]["max_epsilon_rdp"] > 0
    assert verify_ledger(path / "epsilon_ledger.jsonl", Kit.load(path / "secagg").roster).ok  # the per-run kit
    assert main(["report", str(path)]) == 0
    report = json.loads((path / "report" / "report.json").read_text())
    assert report["ok"] is True
