"""Secure aggregation through Flower's simulation engine (Ray): a masked run equals the plain ("none") run.

The ClientApp keeps the protocol state of a round in ``context.state`` between the four ``train`` stages, so
this also checks that the state survives Flower running successive messages of one node on any Ray actor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedmpt.apps.simulation import run_local_simulation

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLOAT32_SLACK = 1e-6  # float32 storage of states of magnitude <= ~5


def test_masked_simulation_matches_the_plain_run(tmp_path: Path, small_task: dict[str, Any]) -> None:
    ray = pytest.importorskip("ray")
    base = {
        "num-server-rounds": 2,
        "runs-dir": str(tmp_path),
        "seed": 5,
        "num-clients": 3,
        "method": "promptfl",
        **small_task,
    }
    plain = run_local_simulation({**base, "run-name": "plain"}, num_supernodes=3)
    masked = run_local_simulation({**base, "run-name": "masked", "secure-aggregation": "masking"}, num_supernodes=3)
    assert not ray.is_initialized()

    lines = [json.loads(x) for x in (masked / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    for line in lines:
        assert line["status"] == "ok" and line["secure_aggregation"] == "masking"
        assert line["clients_replied"] == [0, 1, 2] and line["clients_failed"] == []
    plain_lines = [json.loads(x) for x in (plain / "metrics.jsonl").read_text().splitlines()]
    assert all(x["secure_aggregation"] == "none" for x in plain_lines)

    bound = sum(x["secagg"]["error_bound"] for x in lines) + FLOAT32_SLACK
    a = load_file(str(plain / "final.safetensors"))
    b = load_file(str(masked / "final.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert np.max(np.abs(a[name].astype(np.float64) - b[name].astype(np.float64))) <= bound, name
